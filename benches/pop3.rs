//! POP3 benchmark: login latency and RETR throughput over a large maildrop.
//!
//! ```text
//! cargo bench --bench pop3 -- --messages 10000 --size 4096           # starts and fills postrider
//! cargo bench --bench pop3 -- --target 127.0.0.1:2111 --user u --pass p   # any POP3 server
//! ```
//! Without `--target` it starts the release binary with a fresh data directory under `target/`,
//! delivers `--messages` messages of `--size` octets over SMTP and waits until they are stored.
//! Then: `--logins` USER/PASS/QUIT sessions (latency percentiles), and one session that RETRs
//! every message (messages/s and MB/s). All traffic stays on loopback; every loop is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Opts {
    messages: usize,
    size: usize,
    logins: usize,
    target: Option<SocketAddr>,
    user: String,
    pass: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        messages: 10_000,
        size: 4096,
        logins: 50,
        target: None,
        user: "bench@localhost".into(),
        pass: "bench-password".into(),
    };
    let a: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < a.len() {
        let v = a.get(i + 1).cloned().unwrap_or_default();
        match a[i].as_str() {
            "--messages" => o.messages = v.parse().expect("--messages N"),
            "--size" => o.size = v.parse().expect("--size BYTES"),
            "--logins" => o.logins = v.parse().expect("--logins N"),
            "--target" => o.target = Some(v.parse().expect("--target HOST:PORT")),
            "--user" => o.user = v,
            "--pass" => o.pass = v,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Postrider {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Postrider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "pop3-bench-token-0123456789";

/// Starts postrider, creates the user and fills its INBOX over SMTP; returns the POP3 address.
fn start_postrider(o: &Opts) -> (Postrider, SocketAddr) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nhostname = \"localhost\"\ndata_dir = \"{}\"\n\
             [[listener]]\nname = \"smtp\"\nkind = \"smtp\"\nbind = \"127.0.0.1:0\"\n\
             [[listener]]\nname = \"pop3\"\nkind = \"pop3\"\nbind = \"127.0.0.1:0\"\nallow_plaintext_auth = true\n\
             [domains]\nlocal = [\"localhost\"]\n[limits]\nmax_connections_per_ip = 1000\nauth_failures_per_minute = 1000\n\
             [http]\nbind = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n[log]\nlevel = \"warn\"\n",
            dir.path().join("data").display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_postrider"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start postrider");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut addrs = std::collections::HashMap::new();
    for line in out.lines() {
        let line = line.expect("stdout");
        let p: Vec<&str> = line.split(' ').collect();
        match p.as_slice() {
            ["listening", name, a] => {
                addrs.insert(name.to_string(), a.parse::<SocketAddr>().expect("addr"));
            }
            ["ready"] => break,
            _ => {}
        }
    }
    let http = addrs["http"];
    ureq::post(&format!("http://{http}/api/users"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(serde_json::json!({"address": o.user, "password": o.pass}))
        .expect("create user");
    fill(addrs["smtp"], o);
    // Wait for local delivery to store everything.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let m = ureq::get(&format!("http://{http}/metrics"))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default();
        if m.lines().any(|l| l == "postrider_queue_messages 0") {
            break;
        }
        assert!(Instant::now() < deadline, "delivery did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Postrider { child, _dir: dir }, addrs["pop3"])
}

fn reply(r: &mut impl BufRead) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("read");
    l
}

fn fill(smtp: SocketAddr, o: &Opts) {
    let s = TcpStream::connect(smtp).expect("smtp");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let smtp_reply = |r: &mut BufReader<TcpStream>| loop {
        let l = reply(r);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return l;
        }
    };
    smtp_reply(&mut r);
    w.write_all(b"EHLO fill\r\n").expect("write");
    smtp_reply(&mut r);
    let mut body = format!(
        "From: load@example.org\r\nTo: {}\r\nSubject: pop3 bench\r\n\r\n",
        o.user
    )
    .into_bytes();
    while body.len() + 80 <= o.size {
        body.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\r\n",
        );
    }
    body.extend_from_slice(b".\r\n");
    let head = format!(
        "MAIL FROM:<load@example.org>\r\nRCPT TO:<{}>\r\nDATA\r\n",
        o.user
    );
    for _ in 0..o.messages {
        w.write_all(head.as_bytes()).expect("write");
        for _ in 0..3 {
            smtp_reply(&mut r);
        }
        w.write_all(&body).expect("write");
        assert!(smtp_reply(&mut r).starts_with("250"));
    }
}

fn login(addr: SocketAddr, o: &Opts) -> (BufReader<TcpStream>, TcpStream) {
    let s = TcpStream::connect(addr).expect("pop3");
    s.set_nodelay(true).ok();
    let w = s.try_clone().expect("clone");
    let mut r = BufReader::with_capacity(256 * 1024, s);
    assert!(reply(&mut r).starts_with("+OK"));
    let mut w2 = w.try_clone().expect("clone");
    w2.write_all(format!("USER {}\r\nPASS {}\r\n", o.user, o.pass).as_bytes())
        .expect("write");
    assert!(reply(&mut r).starts_with("+OK"));
    let l = reply(&mut r);
    assert!(l.starts_with("+OK"), "login failed: {l}");
    (r, w)
}

fn main() {
    let o = opts();
    let (_server, addr) = match o.target {
        Some(t) => (None, t),
        None => {
            let (p, a) = start_postrider(&o);
            (Some(p), a)
        }
    };
    let mut lat = Vec::with_capacity(o.logins);
    for _ in 0..o.logins {
        let t = Instant::now();
        let (mut r, mut w) = login(addr, &o);
        lat.push(t.elapsed());
        w.write_all(b"QUIT\r\n").expect("write");
        reply(&mut r);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "pop3 at {addr}: login (connect+USER+PASS) p50 {:.2} ms, p99 {:.2} ms over {} logins",
        pct(0.5),
        pct(0.99),
        o.logins
    );

    let (mut r, mut w) = login(addr, &o);
    w.write_all(b"STAT\r\n").expect("write");
    let stat = reply(&mut r);
    let n: usize = stat
        .split(' ')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("STAT count");
    let start = Instant::now();
    let mut bytes = 0u64;
    // Pipeline RETRs in windows of 32 (RFC 2449 PIPELINING), as fast clients do.
    let window = 32;
    let mut sent = 0;
    let mut done = 0;
    let mut line = Vec::new();
    while done < n {
        while sent < n && sent - done < window {
            sent += 1;
            w.write_all(format!("RETR {sent}\r\n").as_bytes())
                .expect("write");
        }
        line.clear();
        r.read_until(b'\n', &mut line).expect("read");
        assert!(
            line.starts_with(b"+OK"),
            "{}",
            String::from_utf8_lossy(&line)
        );
        loop {
            line.clear();
            r.read_until(b'\n', &mut line).expect("read");
            if line == b".\r\n" {
                break;
            }
            bytes += line.len() as u64;
        }
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    w.write_all(b"QUIT\r\n").expect("write");
    let _ = r.read(&mut [0u8; 64]);
    println!(
        "RETR of {n} messages: {:.2} s = {:.0} msg/s, {:.1} MB/s",
        secs,
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );
}
