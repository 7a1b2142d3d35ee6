//! A scriptable SMTP server that plays the far side of outbound delivery in tests: it records
//! every command and message, and can refuse, defer, require TLS or AUTH, or offer STARTTLS
//! with a self-signed certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Code of the greeting (220; 421 or 554 to refuse; 0: never greet).
    pub greeting: u16,
    /// The name it gives in its greeting and EHLO reply.
    pub name: String,
    pub starttls: bool,
    pub pipelining: bool,
    pub dsn: bool,
    pub smtputf8: bool,
    /// Announced in EHLO SIZE.
    pub size: u64,
    /// `(user, password)`: AUTH PLAIN required before MAIL.
    pub auth: Option<(String, String)>,
    /// Recipient (lower-case) -> reply to its RCPT, e.g. "550 5.1.1 no such user".
    pub rcpt_replies: HashMap<String, String>,
    /// Answer this many upcoming end-of-data with 451, then accept.
    pub defer_data: u32,
    /// Answer end-of-data with this permanent failure.
    pub reject_data: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            greeting: 220,
            name: "sink.test".into(),
            starttls: false,
            pipelining: true,
            dsn: true,
            smtputf8: true,
            size: 10_000_000,
            auth: None,
            rcpt_replies: HashMap::new(),
            defer_data: 0,
            reject_data: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Received {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// The message as the client sent it, after removing dot-stuffing.
    pub data: Vec<u8>,
    pub tls: bool,
    pub auth: Option<String>,
}

#[derive(Default)]
struct Shared {
    behaviour: Behaviour,
    received: Vec<Received>,
    /// Every command line seen, with whether it came under TLS.
    commands: Vec<(bool, String)>,
    connections: usize,
    active: usize,
    max_active: usize,
}

#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    /// PEM of the test CA that signed the sink's certificate (for `sink.test`).
    pub ca_pem: String,
    shared: Arc<Mutex<Shared>>,
}

impl Sink {
    pub fn start(rt: &tokio::runtime::Runtime, bind: SocketAddr, b: Behaviour) -> Sink {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .expect("bind sink");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Mutex::new(Shared {
            behaviour: b,
            ..Default::default()
        }));
        let s2 = shared.clone();
        let (tls, ca_pem) = tls_config();
        let tls = Arc::new(tls);
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                {
                    let mut sh = s2.lock().unwrap();
                    sh.connections += 1;
                    sh.active += 1;
                    sh.max_active = sh.max_active.max(sh.active);
                }
                let s3 = s2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Some(plain) = session(stream, s3.clone(), false).await {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                        if let Ok(t) = acceptor.accept(plain).await {
                            session(t, s3.clone(), true).await;
                        }
                    }
                    s3.lock().unwrap().active -= 1;
                });
            }
        });
        Sink {
            addr,
            ca_pem,
            shared,
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.lock().unwrap().behaviour);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().unwrap().received.clone()
    }

    pub fn commands(&self) -> Vec<(bool, String)> {
        self.shared.lock().unwrap().commands.clone()
    }

    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }

    /// Most connections that were open at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.shared.lock().unwrap().max_active
    }

    /// Polls until `n` messages arrived (panics after `timeout`).
    pub fn wait(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let r = self.received();
            if r.len() >= n {
                return r;
            }
            assert!(
                start.elapsed() < timeout,
                "sink {} got {} of {n} messages",
                self.addr,
                r.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A certificate for `sink.test` issued by a fresh test CA (so clients can verify it when they
/// trust the CA), and the CA's PEM.
fn tls_config() -> (rustls::ServerConfig, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postrider test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["sink.test".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let chain = vec![leaf.der().clone(), ca.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    (cfg, ca.pem())
}

/// Runs one session; returns the stream when the client asked for STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    shared: Arc<Mutex<Shared>>,
    tls: bool,
) -> Option<S> {
    let b = shared.lock().unwrap().behaviour.clone();
    let mut r = BufReader::new(stream);
    if !tls {
        let g = b.greeting;
        if g == 0 {
            // Silent: hold the connection without a greeting (a hung server).
            let mut line = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await;
            return None;
        }
        let text = if g == 220 {
            format!("220 {} ESMTP test sink\r\n", b.name)
        } else {
            format!("{g} {} go away\r\n", b.name)
        };
        r.get_mut().write_all(text.as_bytes()).await.ok()?;
        if g != 220 {
            // Like real servers, wait for QUIT (or anything) and close.
            let mut line = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let _ = r.get_mut().write_all(b"221 bye\r\n").await;
            return None;
        }
    }
    let mut cur: Option<Received> = None;
    let mut authed: Option<String> = None;
    loop {
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
        let line = line.trim_end().to_string();
        shared.lock().unwrap().commands.push((tls, line.clone()));
        let b = shared.lock().unwrap().behaviour.clone();
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut s = format!("250-{}\r\n", b.name);
            if b.pipelining {
                s.push_str("250-PIPELINING\r\n");
            }
            if b.starttls && !tls {
                s.push_str("250-STARTTLS\r\n");
            }
            if b.dsn {
                s.push_str("250-DSN\r\n");
            }
            if b.auth.is_some() {
                s.push_str("250-AUTH PLAIN LOGIN\r\n");
            }
            s.push_str(&format!("250-SIZE {}\r\n", b.size));
            if b.smtputf8 {
                s.push_str("250-SMTPUTF8\r\n");
            }
            s.push_str("250 8BITMIME\r\n");
            s
        } else if upper.starts_with("HELO") {
            format!("250 {}\r\n", b.name)
        } else if upper == "STARTTLS" && b.starttls && !tls {
            r.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n")
                .await
                .ok()?;
            return Some(r.into_inner());
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine;
            let tok = base64::engine::general_purpose::STANDARD
                .decode(line[11..].trim())
                .unwrap_or_default();
            let parts: Vec<&[u8]> = tok.split(|&c| c == 0).collect();
            match (&b.auth, parts.as_slice()) {
                (Some((u, p)), [_, gu, gp]) if gu == &u.as_bytes() && gp == &p.as_bytes() => {
                    authed = Some(u.clone());
                    "235 2.7.0 ok\r\n".into()
                }
                _ => "535 5.7.8 bad credentials\r\n".into(),
            }
        } else if upper.starts_with("MAIL FROM:") {
            if b.auth.is_some() && authed.is_none() {
                "530 5.7.0 authentication required\r\n".into()
            } else {
                let from = line[10..]
                    .split('>')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('<')
                    .to_string();
                cur = Some(Received {
                    mail_from: from,
                    tls,
                    auth: authed.clone(),
                    ..Default::default()
                });
                "250 2.1.0 ok\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let to = line[8..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_string();
            match (&mut cur, b.rcpt_replies.get(&to.to_ascii_lowercase())) {
                (None, _) => "503 5.5.1 MAIL first\r\n".into(),
                (Some(_), Some(rep)) => format!("{rep}\r\n"),
                (Some(c), None) => {
                    c.rcpts.push(to);
                    "250 2.1.5 ok\r\n".into()
                }
            }
        } else if upper == "DATA" {
            match &cur {
                Some(c) if !c.rcpts.is_empty() => {
                    r.get_mut().write_all(b"354 go on\r\n").await.ok()?;
                    let mut data = Vec::new();
                    loop {
                        let mut l = Vec::new();
                        let n = r.read_until(b'\n', &mut l).await.ok()?;
                        if n == 0 {
                            return None;
                        }
                        if l == b".\r\n" {
                            break;
                        }
                        if l.starts_with(b".") {
                            l.remove(0);
                        }
                        data.extend_from_slice(&l);
                    }
                    let mut c = cur.take().unwrap();
                    c.data = data;
                    let mut sh = shared.lock().unwrap();
                    if sh.behaviour.defer_data > 0 {
                        sh.behaviour.defer_data -= 1;
                        "451 4.3.0 try again later\r\n".into()
                    } else if let Some(rej) = sh.behaviour.reject_data.clone() {
                        format!("{rej}\r\n")
                    } else {
                        sh.received.push(c);
                        "250 2.0.0 queued\r\n".into()
                    }
                }
                _ => "554 5.5.1 no valid recipients\r\n".into(),
            }
        } else if upper == "RSET" {
            cur = None;
            "250 2.0.0 ok\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".into()
        } else if upper == "QUIT" {
            let _ = r.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
            return None;
        } else {
            "500 5.5.2 unknown command\r\n".into()
        };
        r.get_mut().write_all(reply.as_bytes()).await.ok()?;
    }
}
