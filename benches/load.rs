//! The load benchmark: many concurrent SMTP clients send N messages of a given size to a local
//! recipient; prints accepted messages/s, p50/p99 latency of the reply to end-of-data, and how
//! fast local delivery drained the queue.
//!
//! ```text
//! cargo bench --bench load -- --messages 5000 --sessions 20 --size 2048
//! cargo bench --bench load -- --target 127.0.0.1:25 --rcpt bench@localhost   # any SMTP server
//! ```
//! Without `--target` it starts the release `postrider` binary on loopback ports with a fresh
//! data directory under `target/` (a real disk: fsyncs cost what they cost in production).
//! Loops are bounded by `--messages` and by a 10-minute cap.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    messages: usize,
    sessions: usize,
    size: usize,
    target: Option<SocketAddr>,
    rcpt: String,
}

fn opts() -> Opts {
    let mut o = Opts {
        messages: 5000,
        sessions: 20,
        size: 2048,
        target: None,
        rcpt: "bench@localhost".into(),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--messages" => o.messages = val.parse().expect("--messages N"),
            "--sessions" => o.sessions = val.parse().expect("--sessions N"),
            "--size" => o.size = val.parse().expect("--size BYTES"),
            "--target" => o.target = Some(val.parse().expect("--target HOST:PORT")),
            "--rcpt" => o.rcpt = val,
            _ => {
                i += 1; // e.g. cargo's own --bench
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Postrider {
    child: Child,
    http: SocketAddr,
    smtp: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Postrider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "load-bench-token-0123456789";

fn start_postrider() -> Postrider {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[server]
hostname = "localhost"
data_dir = "{}"
[[listener]]
name = "smtp"
kind = "smtp"
bind = "127.0.0.1:0"
[domains]
local = ["localhost"]
[limits]
max_connections_per_ip = 1000
[http]
bind = "127.0.0.1:0"
admin_token = "{TOKEN}"
[log]
level = "warn"
"#,
            dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_postrider"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start postrider");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut smtp, mut http) = (None, None);
    for line in out.lines() {
        let line = line.expect("read stdout");
        let p: Vec<&str> = line.split(' ').collect();
        match p.as_slice() {
            ["listening", "smtp", a] => smtp = a.parse().ok(),
            ["listening", "http", a] => http = a.parse().ok(),
            ["ready"] => break,
            _ => {}
        }
    }
    let http = http.expect("http address");
    ureq::post(&format!("http://{http}/api/users"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_json(serde_json::json!({"address": "bench@localhost", "password": "x"}))
        .expect("create bench user");
    Postrider {
        child,
        http,
        smtp: smtp.expect("smtp address"),
        _dir: dir,
    }
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    let text = ureq::get(&format!("http://{http}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return line[..3]
                .parse()
                .map_err(|_| std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// One client session sending `n` messages; returns end-of-data latencies of accepted ones.
fn client(
    addr: SocketAddr,
    n: usize,
    body: Arc<Vec<u8>>,
    rcpt: String,
    deadline: Instant,
) -> std::io::Result<Vec<Duration>> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    reply(&mut r)?;
    w.write_all(b"EHLO load.example\r\n")?;
    reply(&mut r)?;
    let mut lat = Vec::with_capacity(n);
    let head = format!("MAIL FROM:<load@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
    for _ in 0..n {
        if Instant::now() > deadline {
            break;
        }
        w.write_all(head.as_bytes())?;
        let codes = [reply(&mut r)?, reply(&mut r)?, reply(&mut r)?];
        if codes[2] != 354 {
            return Err(std::io::Error::other(format!(
                "unexpected replies {codes:?}"
            )));
        }
        w.write_all(&body)?;
        let t = Instant::now();
        if reply(&mut r)? == 250 {
            lat.push(t.elapsed());
        }
    }
    w.write_all(b"QUIT\r\n")?;
    Ok(lat)
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: load@example.org\r\nTo: bench@localhost\r\nSubject: load test\r\n\r\n".to_vec();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() + 2 < size {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n.\r\n");
    m
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let o = opts();
    let server = if o.target.is_none() {
        Some(start_postrider())
    } else {
        None
    };
    let addr = o
        .target
        .or(server.as_ref().map(|s| s.smtp))
        .expect("target");
    let body = Arc::new(message(o.size));
    let deadline = Instant::now() + Duration::from_secs(600);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let threads: Vec<_> = (0..o.sessions)
        .map(|i| {
            let n = o.messages / o.sessions + usize::from(i < o.messages % o.sessions);
            let (body, rcpt, lat) = (body.clone(), o.rcpt.clone(), latencies.clone());
            std::thread::spawn(move || match client(addr, n, body, rcpt, deadline) {
                Ok(l) => lat.lock().expect("lock").extend(l),
                Err(e) => eprintln!("session {i}: {e}"),
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort();
    println!(
        "load: {} messages of {} B over {} sessions to {}",
        o.messages, o.size, o.sessions, addr
    );
    println!(
        "accepted: {} in {:.2} s = {:.0} msg/s; end-of-data reply latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        elapsed,
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
    if let Some(s) = &server {
        // How long local delivery took to put everything into the mailbox store.
        let want = lat.len() as f64;
        while metric(
            s.http,
            "postrider_local_deliveries_total{result=\"delivered\"}",
        ) < want
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let total = start.elapsed().as_secs_f64();
        println!(
            "delivered to mailbox: {} in {:.2} s = {:.0} msg/s end to end",
            want,
            total,
            want / total
        );
    }
}
