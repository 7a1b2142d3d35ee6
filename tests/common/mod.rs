//! Test harness: starts the real `postrider` binary on ephemeral loopback ports with a config in
//! a temporary directory, and offers a raw SMTP client, the CLI and the admin API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ports: std::collections::HashMap<String, SocketAddr>,
}

/// The config every test starts from; `extra` is appended (TOML), `relay` sets relay.networks.
pub fn config_text(data_dir: &Path, relay: &str, limits: &str, extra: &str) -> String {
    format!(
        r#"
[server]
hostname = "mx.local.test"
data_dir = "{data}"

[[listener]]
name = "smtp"
kind = "smtp"
bind = "127.0.0.1:0"

[[listener]]
name = "submission"
kind = "submission"
bind = "127.0.0.1:0"

[[listener]]
name = "submission-plain"
kind = "submission"
bind = "127.0.0.1:0"
allow_plaintext_auth = true

[[listener]]
name = "submissions"
kind = "submissions"
bind = "127.0.0.1:0"

[[listener]]
name = "pop3"
kind = "pop3"
bind = "127.0.0.1:0"
allow_plaintext_auth = true

[[listener]]
name = "pop3-strict"
kind = "pop3"
bind = "127.0.0.1:0"

[[listener]]
name = "pop3s"
kind = "pop3s"
bind = "127.0.0.1:0"

[domains]
local = ["local.test", "localhost"]
postmaster = "admin@local.test"

[relay]
networks = [{relay}]

[limits]
{limits}

[http]
bind = "127.0.0.1:0"
admin_token = "{TOKEN}"

[log]
level = "info,postrider=debug"
{dns}
{extra}
"#,
        data = data_dir.display(),
        // Tests never query real DNS: without a test DNS server of their own, lookups go to a
        // closed loopback port and fail temporarily (mail to remote domains is deferred).
        dns = if extra.contains("[dns]") {
            ""
        } else {
            "[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"500ms\"\n"
        }
    )
}

impl Server {
    pub fn start() -> Server {
        Server::start_with("", "auth_failure_delay = \"10ms\"", "")
    }

    pub fn start_with(relay: &str, limits: &str, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("postrider.toml");
        let text = config_text(&dir.path().join("data"), relay, limits, extra);
        std::fs::write(&config, text).expect("write config");
        let mut s = Server {
            child: None,
            dir,
            config,
            ports: Default::default(),
        };
        s.launch();
        s
    }

    /// Starts (or restarts) the binary on the same data directory.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_postrider"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn postrider");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ports = std::collections::HashMap::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "ready" {
                    let _ = tx.send(ports.clone());
                    continue;
                }
                let parts: Vec<&str> = line.split(' ').collect();
                if parts.len() == 3 && parts[0] == "listening" {
                    ports.insert(
                        parts[1].to_string(),
                        parts[2].parse::<SocketAddr>().unwrap(),
                    );
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(p) => self.ports = p,
            Err(_) => panic!("server did not become ready; log:\n{}", self.log()),
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn port(&self, name: &str) -> SocketAddr {
        self.ports[name]
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().expect("wait")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_postrider"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run cli")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "postrider {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn add_user(&self, addr: &str, pw: &str) {
        self.cli_ok(&["user", "add", addr, "--password", pw]);
    }

    pub fn api(&self, path: &str) -> serde_json::Value {
        let url = format!("http://{}/api{}", self.port("http"), path);
        ureq::get(&url)
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .expect("json")
    }

    /// Messages in an account's INBOX (uid, size, subject...).
    pub fn mailbox(&self, addr: &str) -> Vec<serde_json::Value> {
        let out = self.cli_ok(&["mailbox", "list", addr, "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("mailbox json")
    }

    pub fn message(&self, addr: &str, uid: u64) -> Vec<u8> {
        let o = self.cli(&["mailbox", "show", addr, &uid.to_string()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    }

    /// Polls until the account has at least `n` messages (delivery is asynchronous).
    pub fn wait_mailbox(&self, addr: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.mailbox(addr);
            if m.len() >= n {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} has {} of {n} messages; log:\n{}",
                m.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until the queue holds exactly `n` messages.
    pub fn wait_queue(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = self.api("/queue");
            let list = q.as_array().cloned().unwrap_or_default();
            if list.len() == n {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "queue has {} messages, want {n}",
                list.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal SMTP client over a blocking socket: exactly the bytes we write reach the server.
pub struct Smtp {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Smtp {
    pub fn connect(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut s = Smtp { stream, reader };
        let (code, _) = s.reply();
        assert_eq!(code, 220);
        s
    }

    pub fn send(&mut self, data: &[u8]) {
        self.stream.write_all(data).expect("write");
    }

    /// Reads one (possibly multi-line) reply: code and the full text.
    pub fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed; got so far: {text:?}");
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line[..3]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad reply {line:?}"));
                return (code, text);
            }
        }
    }

    /// Sends one command line and returns the reply code.
    pub fn cmd(&mut self, line: &str) -> u16 {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply().0
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }
}

/// Runs a Python script with the machine's python3; returns stdout, panics with stderr on failure.
pub fn python(script: &str, env: &[(&str, String)]) -> String {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("python3 on PATH");
    assert!(
        o.status.success(),
        "python failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The body as stored minus the headers local delivery and the SMTP server add.
pub fn strip_trace_headers(raw: &[u8]) -> Vec<u8> {
    let mut rest = raw;
    loop {
        let is_trace = rest.starts_with(b"Return-Path:")
            || rest.starts_with(b"Delivered-To:")
            || rest.starts_with(b"Received:");
        if !is_trace {
            return rest.to_vec();
        }
        // Skip the field including folded continuation lines.
        let mut i = 0;
        loop {
            let nl = rest[i..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| i + p + 1)
                .unwrap_or(rest.len());
            i = nl;
            if i >= rest.len() || !(rest[i] == b' ' || rest[i] == b'\t') {
                break;
            }
        }
        rest = &rest[i..];
    }
}

/// Dot-stuffs lines starting with '.' (RFC 5321 §4.5.2, RFC 1939 §3), without a terminator.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}
