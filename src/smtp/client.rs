//! Outbound SMTP client (RFC 5321 as the client side, PIPELINING RFC 2920, STARTTLS RFC 3207,
//! SIZE RFC 1870, 8BITMIME RFC 6152, SMTPUTF8 RFC 6531, DSN RFC 3461, AUTH RFC 4954).
//!
//! The pure parts (reply parsing, EHLO keywords, command building, outcome mapping) are free
//! functions tested directly; [`Client`] is the thin I/O layer over one connection.

use crate::config::TlsPolicy;
use crate::net::Conn;
use crate::smtp::session::TlsInfo;
use base64::Engine;
use postrider_queue::{Outcome, Recipient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest reply line we accept (RFC 5321 §4.5.3.1.5 says 512; real servers send longer).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply (EHLO has a dozen or so).
const MAX_REPLY_LINES: usize = 200;

/// One complete server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Response {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The RFC 3463 enhanced status code at the start of the text, if the server sent one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let tok = first.split_whitespace().next()?;
        let mut parts = tok.split('.');
        let class = parts.next()?;
        let ok = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(tok)
    }

    /// An enhanced status code for this reply: the server's own, else one by class.
    pub fn status(&self) -> String {
        match self.enhanced() {
            Some(s) if s.starts_with((self.code / 100).to_string().as_str()) => s.to_string(),
            _ => match self.code / 100 {
                2 => "2.0.0".into(),
                4 => "4.0.0".into(),
                _ => "5.0.0".into(),
            },
        }
    }

    /// The reply as one line: `550 5.1.1 no such user`.
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
    }
}

/// Parses one reply line: code, whether more lines follow, text.
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), String> {
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "malformed reply line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        ));
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    if !(200..600).contains(&code) {
        return Err(format!("reply code {code} out of range"));
    }
    let more = match line.get(3) {
        None | Some(b' ') => false,
        Some(b'-') => true,
        Some(_) => return Err("malformed reply line: bad separator".into()),
    };
    let text = line.get(4..).unwrap_or_default();
    // Control characters from a remote server never reach our logs or DSNs.
    let text: String = String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok((code, more, text))
}

/// What the server announced in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    /// `Some(0)` means no fixed limit (RFC 1870 §4).
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
}

impl Extensions {
    pub fn from_ehlo(r: &Response) -> Extensions {
        let mut e = Extensions::default();
        // The first line is the greeting; keywords follow.
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "STARTTLS" => e.starttls = true,
                "SIZE" => e.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => e.eightbitmime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => e.auth_plain = true,
                            "LOGIN" => e.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }
}

/// Time limits, RFC 5321 §4.5.3.2 by default (see [`crate::config::DeliveryConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// How one connection attempt should go.
#[derive(Clone)]
pub struct ConnectParams {
    pub helo: String,
    pub tls: TlsPolicy,
    /// Any-certificate config (opportunistic, required) and verifying config (verify).
    pub tls_any: Arc<rustls::ClientConfig>,
    pub tls_verify: Arc<rustls::ClientConfig>,
    pub auth: Option<(String, String)>,
    pub timeouts: Timeouts,
}

/// Why a connection could not be set up. Every kind moves on to the next address/MX.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("4.4.1 connect to {peer} failed: {why}")]
    Connect { peer: String, why: String },
    /// The server answered, but not as we need: greeting, EHLO/HELO or AUTH refused. Even a
    /// 5xx here is about this host, not the recipient: the next MX is tried and the message
    /// deferred, never bounced for it alone (Postfix's smtp_skip_5xx_greeting), hence 4.4.0.
    #[error("4.4.0 {peer} said: {reply} (in reply to {stage})")]
    Refused {
        peer: String,
        reply: String,
        stage: &'static str,
    },
    /// The TLS handshake failed; opportunistic delivery may retry this address in clear.
    #[error("4.7.5 TLS handshake with {peer} failed: {why}")]
    Tls { peer: String, why: String },
    /// Our TLS policy cannot be met (no STARTTLS, credentials would go in clear).
    #[error("{0}")]
    Policy(String),
    /// The next hop greeted us with our own name: delivering there would loop.
    #[error("5.4.6 mail loops back to myself ({peer} greeted us as {name})")]
    Loop { peer: String, name: String },
    #[error("4.4.2 {peer}: {why} (during {stage})")]
    Lost {
        peer: String,
        why: String,
        stage: &'static str,
    },
}

/// One message as the client sends it.
pub struct OutMessage<'a> {
    pub sender: &'a str,
    pub body: &'a [u8],
    pub smtputf8: bool,
    pub body_type: Option<&'a str>,
    pub ret: Option<postrider_queue::Ret>,
    pub envid: Option<&'a str>,
}

impl OutMessage<'_> {
    /// Whether the message cannot be sent without SMTPUTF8: the client declared it, and an
    /// address or a header field really contains non-ASCII (RFC 6531 §3.2).
    pub fn needs_smtputf8(&self, rcpts: &[&Recipient]) -> bool {
        if !self.smtputf8 {
            return false;
        }
        !self.sender.is_ascii()
            || rcpts.iter().any(|r| !r.address.is_ascii())
            || !crate::smtp::proto::header_section(self.body).is_ascii()
    }
}

/// The MAIL FROM command for this server's extensions.
pub fn mail_command(m: &OutMessage<'_>, ext: &Extensions, utf8: bool) -> String {
    let mut s = format!("MAIL FROM:<{}>", m.sender);
    if ext.size.is_some() {
        s.push_str(&format!(" SIZE={}", m.body.len()));
    }
    if ext.eightbitmime
        && let Some(b) = m.body_type
    {
        s.push_str(&format!(" BODY={b}"));
    }
    if utf8 {
        s.push_str(" SMTPUTF8");
    }
    if ext.dsn {
        match m.ret {
            Some(postrider_queue::Ret::Full) => s.push_str(" RET=FULL"),
            Some(postrider_queue::Ret::Hdrs) => s.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(e) = m.envid {
            s.push_str(&format!(" ENVID={e}"));
        }
    }
    s.push_str("\r\n");
    s
}

/// RCPT TO with the DSN parameters passed on when the server supports DSN (RFC 3461 §4.1).
pub fn rcpt_command(r: &Recipient, ext: &Extensions) -> String {
    let mut s = format!("RCPT TO:<{}>", r.address);
    if ext.dsn {
        if !r.notify.is_empty() {
            s.push_str(&format!(" NOTIFY={}", r.notify.join(",")));
        }
        if let Some(o) = &r.orcpt {
            s.push_str(&format!(" ORCPT={o}"));
        }
    }
    s.push_str("\r\n");
    s
}

/// One live, set-up connection to a next hop.
pub struct Client {
    conn: Conn<TcpStream>,
    rbuf: Vec<u8>,
    pub ext: Extensions,
    pub tls: Option<TlsInfo>,
    /// `name[ip]:port`, for logs and DSNs.
    pub peer: String,
    t: Timeouts,
}

enum Read {
    Reply(Response),
    Lost(String),
}

impl Client {
    /// Connects to `addr` (the host `host`), reads the greeting, says EHLO (HELO when EHLO is
    /// refused), negotiates TLS per policy and authenticates when the route has credentials.
    /// `plaintext_only`: a previous opportunistic attempt failed its TLS handshake.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        p: &ConnectParams,
        plaintext_only: bool,
    ) -> Result<Client, SetupError> {
        let peer = format!("{host}[{}]:{}", addr.ip(), addr.port());
        let stream = match tokio::time::timeout(p.timeouts.connect, TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(SetupError::Connect {
                    peer,
                    why: e.to_string(),
                });
            }
            Err(_) => {
                return Err(SetupError::Connect {
                    peer,
                    why: "timed out".into(),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        let mut c = Client {
            conn: Conn::Plain(stream),
            rbuf: Vec::with_capacity(4096),
            ext: Extensions::default(),
            tls: None,
            peer,
            t: p.timeouts,
        };
        let greeting = c.expect(p.timeouts.greeting, "initial greeting").await?;
        if !greeting.is_positive() {
            // RFC 5321 §3.1: after a refusing greeting the client should still say QUIT.
            let _ = c.write(b"QUIT\r\n", Duration::from_secs(5)).await;
            return Err(c.refused(&greeting, "initial greeting"));
        }
        c.hello(&p.helo).await?;
        let want_tls = p.tls != TlsPolicy::None && !plaintext_only;
        if want_tls && c.ext.starttls {
            let r = c
                .command("STARTTLS\r\n", p.timeouts.command, "STARTTLS")
                .await?;
            if r.code != 220 {
                if matches!(p.tls, TlsPolicy::Required | TlsPolicy::Verify) {
                    return Err(c.refused(&r, "STARTTLS"));
                }
            } else {
                // Anything the server sent after 220 was injected before the handshake
                // (RFC 3207 §4.2 / CVE-2011-0411 mirrored): refuse to continue.
                if !c.rbuf.is_empty() {
                    return Err(SetupError::Tls {
                        peer: c.peer.clone(),
                        why: "server sent data after its 220 to STARTTLS".into(),
                    });
                }
                let cfg = if p.tls == TlsPolicy::Verify {
                    p.tls_verify.clone()
                } else {
                    p.tls_any.clone()
                };
                match c.conn.upgrade_client(cfg, server_name(host, addr)).await {
                    Ok(info) => c.tls = Some(info),
                    Err(e) => {
                        return Err(SetupError::Tls {
                            peer: c.peer.clone(),
                            why: e.to_string(),
                        });
                    }
                }
                // RFC 3207 §4.2: forget everything learnt before TLS; EHLO again.
                c.ext = Extensions::default();
                c.hello(&p.helo).await?;
            }
        }
        if c.tls.is_none() && matches!(p.tls, TlsPolicy::Required | TlsPolicy::Verify) {
            let why = if c.ext.starttls {
                "TLS could not be started"
            } else {
                "STARTTLS not offered"
            };
            return Err(SetupError::Policy(format!(
                "4.7.4 TLS is required for {} but {why}; not sent in clear",
                c.peer
            )));
        }
        if let Some((user, pass)) = &p.auth {
            c.authenticate(user, pass).await?;
        }
        Ok(c)
    }

    fn refused(&self, r: &Response, stage: &'static str) -> SetupError {
        SetupError::Refused {
            peer: self.peer.clone(),
            reply: r.one_line(),
            stage,
        }
    }

    async fn hello(&mut self, helo: &str) -> Result<(), SetupError> {
        let r = self
            .command(&format!("EHLO {helo}\r\n"), self.t.command, "EHLO")
            .await?;
        if r.is_positive() {
            self.check_loop(&r, helo)?;
            self.ext = Extensions::from_ehlo(&r);
            return Ok(());
        }
        // RFC 5321 §3.2: fall back to HELO for servers without ESMTP.
        let r = self
            .command(&format!("HELO {helo}\r\n"), self.t.command, "HELO")
            .await?;
        if !r.is_positive() {
            return Err(self.refused(&r, "HELO"));
        }
        self.check_loop(&r, helo)?;
        self.ext = Extensions::default();
        Ok(())
    }

    /// RFC 5321 §5.1: an MX that is us must not be delivered to. The EHLO/HELO reply starts
    /// with the server's name; ours there means a route or MX points back at this server.
    fn check_loop(&self, r: &Response, helo: &str) -> Result<(), SetupError> {
        let name = r
            .lines
            .first()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("");
        if name
            .trim_end_matches('.')
            .eq_ignore_ascii_case(helo.trim_end_matches('.'))
        {
            return Err(SetupError::Loop {
                peer: self.peer.clone(),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, pass: &str) -> Result<(), SetupError> {
        if self.tls.is_none() {
            return Err(SetupError::Policy(format!(
                "4.7.0 {} did not start TLS; credentials are never sent in clear",
                self.peer
            )));
        }
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let r = if self.ext.auth_plain {
            let token = b64(format!("\0{user}\0{pass}").as_bytes());
            self.command(&format!("AUTH PLAIN {token}\r\n"), self.t.command, "AUTH")
                .await?
        } else if self.ext.auth_login {
            let r = self
                .command("AUTH LOGIN\r\n", self.t.command, "AUTH")
                .await?;
            if r.code != 334 {
                return Err(self.refused(&r, "AUTH"));
            }
            let r = self
                .command(
                    &format!("{}\r\n", b64(user.as_bytes())),
                    self.t.command,
                    "AUTH",
                )
                .await?;
            if r.code != 334 {
                return Err(self.refused(&r, "AUTH"));
            }
            self.command(
                &format!("{}\r\n", b64(pass.as_bytes())),
                self.t.command,
                "AUTH",
            )
            .await?
        } else {
            return Err(SetupError::Policy(format!(
                "4.7.0 {} offers no AUTH mechanism we support (PLAIN, LOGIN)",
                self.peer
            )));
        };
        if r.code != 235 {
            return Err(self.refused(&r, "AUTH"));
        }
        Ok(())
    }

    async fn command(
        &mut self,
        line: &str,
        t: Duration,
        stage: &'static str,
    ) -> Result<Response, SetupError> {
        if let Err(e) = self.write(line.as_bytes(), t).await {
            return Err(SetupError::Lost {
                peer: self.peer.clone(),
                why: e,
                stage,
            });
        }
        self.expect(t, stage).await
    }

    async fn expect(&mut self, t: Duration, stage: &'static str) -> Result<Response, SetupError> {
        match self.read_reply(t).await {
            Read::Reply(r) => Ok(r),
            Read::Lost(why) => Err(SetupError::Lost {
                peer: self.peer.clone(),
                why,
                stage,
            }),
        }
    }

    async fn write(&mut self, data: &[u8], t: Duration) -> Result<(), String> {
        match tokio::time::timeout(t, async {
            self.conn.write_all(data).await?;
            self.conn.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err("timed out writing".into()),
        }
    }

    /// Reads one whole (possibly multi-line) reply within `t`.
    async fn read_reply(&mut self, t: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + t;
        let mut lines = Vec::new();
        loop {
            while let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.rbuf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                match parse_reply_line(&line) {
                    Ok((code, more, text)) => {
                        lines.push(text);
                        if !more {
                            return Read::Reply(Response { code, lines });
                        }
                        if lines.len() > MAX_REPLY_LINES {
                            return Read::Lost("reply has too many lines".into());
                        }
                    }
                    Err(e) => return Read::Lost(e),
                }
            }
            if self.rbuf.len() > MAX_REPLY_LINE {
                return Read::Lost("reply line too long".into());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.conn.read(&mut chunk)).await {
                Ok(Ok(0)) => return Read::Lost("connection closed by server".into()),
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Read::Lost(format!("read failed: {e}")),
                Err(_) => return Read::Lost(format!("timed out after {}s", t.as_secs())),
            }
        }
    }

    /// Sends one message to `rcpts` (indexes into the envelope with their recipients) and
    /// returns an outcome per recipient, plus whether the connection is still usable.
    /// `reused`: an RSET is pipelined first, and a connection found dead at that point is
    /// reported as [`Sent::Stale`] (nothing was sent; retry on a fresh connection).
    pub async fn send(
        &mut self,
        m: &OutMessage<'_>,
        rcpts: &[(usize, &Recipient)],
        reused: bool,
    ) -> Sent {
        let peer = self.peer.clone();
        let all = |o: Outcome| {
            rcpts
                .iter()
                .map(|(i, _)| (*i, o.clone()))
                .collect::<Vec<_>>()
        };
        let list: Vec<&Recipient> = rcpts.iter().map(|(_, r)| *r).collect();
        if let Some(max) = self.ext.size
            && max > 0
            && m.body.len() as u64 > max
        {
            return Sent::Done(
                all(Outcome::Failed(format!(
                    "5.3.4 message of {} octets exceeds the {max}-octet limit of {peer}",
                    m.body.len()
                ))),
                true,
            );
        }
        let utf8 = m.needs_smtputf8(&list);
        if utf8 && !self.ext.smtputf8 {
            return Sent::Done(
                all(Outcome::Failed(format!(
                    "5.6.7 the message needs SMTPUTF8 (non-ASCII addresses or headers) and {peer} does not support it"
                ))),
                true,
            );
        }
        if m.body_type == Some("8BITMIME") && !self.ext.eightbitmime && !m.body.is_ascii() {
            // RFC 6152 §3: without conversion (which we do not do) the message is returned.
            return Sent::Done(
                all(Outcome::Failed(format!(
                    "5.6.3 the message has 8-bit content and {peer} does not support 8BITMIME"
                ))),
                true,
            );
        }
        let t = self.t.command;
        let mail = mail_command(m, &self.ext, utf8);
        let rcpt_lines: Vec<String> = list.iter().map(|r| rcpt_command(r, &self.ext)).collect();
        let mut results: Vec<(usize, Outcome)> = Vec::with_capacity(rcpts.len());
        let lost = |why: String, stage: &str, pending: &[(usize, &Recipient)]| {
            pending
                .iter()
                .map(|(i, _)| {
                    (
                        *i,
                        Outcome::Deferred(format!("4.4.2 {peer}: {why} (in reply to {stage})")),
                    )
                })
                .collect::<Vec<_>>()
        };
        let said = |r: &Response, stage: &str| {
            format!(
                "{} {peer} said: {} (in reply to {stage})",
                r.status(),
                r.one_line()
            )
        };
        let outcome_of = |r: &Response, stage: &str| {
            if r.is_transient() {
                Outcome::Deferred(said(r, stage))
            } else {
                Outcome::Failed(said(r, stage))
            }
        };

        // The command group: with PIPELINING one write (RFC 2920 §3.1: RSET, MAIL and RCPT
        // may be grouped; DATA ends the group); without it, command by command.
        let pipelining = self.ext.pipelining;
        if pipelining {
            let mut group = String::new();
            if reused {
                group.push_str("RSET\r\n");
            }
            group.push_str(&mail);
            for l in &rcpt_lines {
                group.push_str(l);
            }
            group.push_str("DATA\r\n");
            if let Err(e) = self.write(group.as_bytes(), t).await {
                return if reused {
                    Sent::Stale(e)
                } else {
                    Sent::Done(lost(e, "MAIL FROM", rcpts), false)
                };
            }
        }
        if reused {
            if !pipelining && let Err(e) = self.write(b"RSET\r\n", t).await {
                return Sent::Stale(e);
            }
            match self.read_reply(t).await {
                Read::Reply(r) if r.is_positive() => {}
                Read::Reply(r) => return Sent::Stale(format!("RSET refused: {}", r.one_line())),
                Read::Lost(why) => return Sent::Stale(why),
            }
        }
        if !pipelining && let Err(e) = self.write(mail.as_bytes(), t).await {
            return Sent::Done(lost(e, "MAIL FROM", rcpts), false);
        }
        let mail_reply = match self.read_reply(t).await {
            Read::Reply(r) => r,
            Read::Lost(why) => return Sent::Done(lost(why, "MAIL FROM", rcpts), false),
        };
        let mail_ok = mail_reply.is_positive();
        let mut accepted: Vec<(usize, &Recipient)> = Vec::new();
        for (k, (i, r)) in rcpts.iter().enumerate() {
            if !pipelining {
                if !mail_ok {
                    break;
                }
                if let Err(e) = self.write(rcpt_lines[k].as_bytes(), t).await {
                    results.extend(lost(e, "RCPT TO", &rcpts[k..]));
                    return Sent::Done(results, false);
                }
            }
            match self.read_reply(t).await {
                Read::Reply(rr) => {
                    if !mail_ok {
                        continue;
                    }
                    if rr.is_positive() {
                        accepted.push((*i, *r));
                    } else {
                        results.push((*i, outcome_of(&rr, "RCPT TO")));
                    }
                }
                Read::Lost(why) => {
                    let mut pending = accepted.clone();
                    pending.extend_from_slice(&rcpts[k..]);
                    results.retain(|(i, _)| !pending.iter().any(|(j, _)| j == i));
                    results.extend(lost(why, "RCPT TO", &pending));
                    return Sent::Done(results, false);
                }
            }
        }
        if !mail_ok {
            // A refused MAIL FROM is the answer for every recipient.
            let o = outcome_of(&mail_reply, "MAIL FROM");
            if pipelining {
                // Drain the reply to the pipelined DATA.
                if let Read::Lost(_) = self.read_reply(t).await {
                    return Sent::Done(all(o), false);
                }
            }
            return Sent::Done(all(o), true);
        }
        let data_reply = if pipelining || !accepted.is_empty() {
            if !pipelining && let Err(e) = self.write(b"DATA\r\n", t).await {
                results.extend(lost(e, "DATA", &accepted));
                return Sent::Done(results, false);
            }
            // RFC 5321 §4.5.3.2.4 allows 2 minutes here; the command timeout is longer.
            match self.read_reply(t).await {
                Read::Reply(r) => Some(r),
                Read::Lost(why) => {
                    results.extend(lost(why, "DATA", &accepted));
                    return Sent::Done(results, false);
                }
            }
        } else {
            None
        };
        let Some(data_reply) = data_reply else {
            // Nobody accepted and DATA was never sent.
            return Sent::Done(results, true);
        };
        if data_reply.code != 354 {
            let o = outcome_of(&data_reply, "DATA");
            results.extend(accepted.iter().map(|(i, _)| (*i, o.clone())));
            return Sent::Done(results, true);
        }
        if accepted.is_empty() {
            // RFC 2920 §3.1: a server that says 354 with no valid recipient gets an empty
            // message, which it must not deliver.
            if let Err(e) = self.write(b".\r\n", t).await {
                return Sent::Done(
                    lost(e, "DATA", &[]).into_iter().chain(results).collect(),
                    false,
                );
            }
            let alive = matches!(self.read_reply(t).await, Read::Reply(_));
            return Sent::Done(results, alive);
        }
        let mut out = Vec::with_capacity(m.body.len() + m.body.len() / 64 + 8);
        crate::pop3::proto::write_stuffed(&mut out, m.body, None);
        if let Err(e) = self.write(&out, self.t.data).await {
            results.extend(lost(e, "end of data", &accepted));
            return Sent::Done(results, false);
        }
        match self.read_reply(self.t.data).await {
            Read::Reply(r) => {
                let o = if r.is_positive() {
                    if self.ext.dsn {
                        Outcome::Delivered
                    } else {
                        Outcome::Relayed
                    }
                } else {
                    outcome_of(&r, "end of data")
                };
                results.extend(accepted.iter().map(|(i, _)| (*i, o.clone())));
                Sent::Done(results, true)
            }
            Read::Lost(why) => {
                // RFC 5321 §6.1: the server may have taken it; deferring risks a duplicate,
                // which is better than a loss.
                results.extend(lost(why, "end of data", &accepted));
                Sent::Done(results, false)
            }
        }
    }

    /// Ends the session politely (QUIT, bounded wait) and closes.
    pub async fn quit(mut self) {
        let t = Duration::from_secs(5).min(self.t.command);
        if self.write(b"QUIT\r\n", t).await.is_ok() {
            let _ = self.read_reply(t).await;
        }
        self.conn.finish().await;
    }
}

/// Result of [`Client::send`].
pub enum Sent {
    /// Per-recipient outcomes; `bool`: the connection can carry another message.
    Done(Vec<(usize, Outcome)>, bool),
    /// A reused connection turned out dead before anything was sent.
    Stale(String),
}

fn server_name(host: &str, addr: SocketAddr) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from(host.trim_end_matches('.').to_string())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(addr.ip().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line(b"250-mx.example greets you").unwrap(),
            (250, true, "mx.example greets you".into())
        );
        assert_eq!(
            parse_reply_line(b"354").unwrap(),
            (354, false, String::new())
        );
        assert_eq!(
            parse_reply_line(b"550 5.1.1 no\x1b[31m").unwrap().2,
            "5.1.1 no [31m"
        );
        assert!(parse_reply_line(b"25").is_err());
        assert!(parse_reply_line(b"abc def").is_err());
        assert!(parse_reply_line(b"250x").is_err());
        assert!(parse_reply_line(b"700 no").is_err());
    }

    #[test]
    fn enhanced_status() {
        let r = |code, t: &str| Response {
            code,
            lines: vec![t.to_string()],
        };
        assert_eq!(r(550, "5.1.1 unknown user").status(), "5.1.1");
        assert_eq!(r(550, "unknown user").status(), "5.0.0");
        assert_eq!(r(451, "4.3.0 try later").status(), "4.3.0");
        // A status of the wrong class is not believed.
        assert_eq!(r(451, "5.1.1 confused").status(), "4.0.0");
        assert_eq!(r(250, "2.1.5.1 odd").status(), "2.0.0");
    }

    #[test]
    fn ehlo_keywords() {
        let r = Response {
            code: 250,
            lines: vec![
                "mx.example".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8bitmime".into(),
                "STARTTLS".into(),
                "AUTH LOGIN PLAIN".into(),
                "DSN".into(),
            ],
        };
        let e = Extensions::from_ehlo(&r);
        assert!(e.pipelining && e.starttls && e.eightbitmime && e.dsn);
        assert!(e.auth_plain && e.auth_login && !e.smtputf8);
        assert_eq!(e.size, Some(1000));
    }

    #[test]
    fn commands_carry_parameters_the_server_knows() {
        let m = OutMessage {
            sender: "a@x",
            body: b"Subject: t\r\n\r\nhi\r\n",
            smtputf8: false,
            body_type: Some("8BITMIME"),
            ret: Some(postrider_queue::Ret::Hdrs),
            envid: Some("ID+2B1"),
        };
        let mut r = Recipient::new("b@y");
        r.notify = vec!["SUCCESS".into(), "FAILURE".into()];
        r.orcpt = Some("rfc822;b@y".into());
        let none = Extensions::default();
        assert_eq!(mail_command(&m, &none, false), "MAIL FROM:<a@x>\r\n");
        assert_eq!(rcpt_command(&r, &none), "RCPT TO:<b@y>\r\n");
        let all = Extensions {
            size: Some(0),
            eightbitmime: true,
            dsn: true,
            ..Default::default()
        };
        assert_eq!(
            mail_command(&m, &all, false),
            "MAIL FROM:<a@x> SIZE=18 BODY=8BITMIME RET=HDRS ENVID=ID+2B1\r\n"
        );
        assert_eq!(
            rcpt_command(&r, &all),
            "RCPT TO:<b@y> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@y\r\n"
        );
    }

    fn params() -> ConnectParams {
        ConnectParams {
            helo: "me.test".into(),
            tls: TlsPolicy::Opportunistic,
            tls_any: crate::tls::client_config(false, None).unwrap(),
            tls_verify: crate::tls::client_config(true, None).unwrap(),
            auth: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(2),
                greeting: Duration::from_secs(2),
                command: Duration::from_secs(2),
                data: Duration::from_secs(2),
            },
        }
    }

    /// A server that sends `bytes` and then holds the connection.
    async fn server_sending(bytes: Vec<u8>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(&bytes).await;
                let mut sink = [0u8; 1024];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn hostile_replies_are_bounded() {
        // An endless line: refused once it passes the line limit, not buffered forever.
        let addr = server_sending(vec![b'2'; 1 << 20]).await;
        match Client::open(addr, "flood.test", &params(), false).await {
            Err(SetupError::Lost { why, .. }) => assert!(why.contains("too long"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
        // Endless continuation lines.
        let addr = server_sending(b"220-x\r\n".repeat(1000)).await;
        match Client::open(addr, "flood.test", &params(), false).await {
            Err(SetupError::Lost { why, .. }) => assert!(why.contains("too many lines"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
        // Not SMTP at all.
        let addr = server_sending(b"HTTP/1.1 400 Bad Request\r\n".to_vec()).await;
        match Client::open(addr, "web.test", &params(), false).await {
            Err(SetupError::Lost { why, .. }) => assert!(why.contains("malformed"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn smtputf8_needed_only_for_real_utf8() {
        let r = Recipient::new("b@y");
        let mut m = OutMessage {
            sender: "a@x",
            body: b"Subject: plain\r\n\r\nk\xc3\xa4se\r\n",
            smtputf8: true,
            body_type: None,
            ret: None,
            envid: None,
        };
        assert!(
            !m.needs_smtputf8(&[&r]),
            "UTF-8 in the body alone needs 8BITMIME only"
        );
        m.body = "Subject: k\u{e4}se\r\n\r\nx\r\n".as_bytes();
        assert!(m.needs_smtputf8(&[&r]));
        m.body = b"Subject: x\r\n\r\n";
        let u = Recipient::new("j\u{f6}rg@y");
        assert!(m.needs_smtputf8(&[&u]));
        m.smtputf8 = false;
        assert!(!m.needs_smtputf8(&[&u]));
    }
}
