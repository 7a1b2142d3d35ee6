//! The SMTP server session as a pure state machine: commands in, [`Action`]s out.
//!
//! The tokio layer ([`super::listener`]) moves bytes and carries out what an action asks for
//! (read a DATA stream, start TLS, verify a password, enqueue a message) and feeds the result
//! back. Everything that decides a reply lives here, so every rule is unit-tested without I/O.

use super::proto::{Address, Command, DataError, MailParams, RcptParams, Reply, parse_command};
use crate::config::ListenerKind;
use base64::Engine as _;
use std::net::SocketAddr;

/// Answers the session needs about addresses; implemented over the store and the config.
pub trait Directory: Send + Sync {
    fn is_local_domain(&self, domain: &str) -> bool;
    /// Whether a local address has an account or alias. `Err` = storage trouble (-> 451).
    fn local_exists(&self, address: &str) -> Result<bool, String>;
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub kind: ListenerKind,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_bad_commands: u32,
    pub max_received_headers: usize,
    /// A certificate is loaded, so STARTTLS can be offered.
    pub tls_available: bool,
}

/// What we know about the client at connect time.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    /// In `relay.networks`: may relay without AUTH (port-25 role only).
    pub relay_allowed: bool,
    /// The listener allows plaintext AUTH and the client is on loopback.
    pub plaintext_auth_ok: bool,
}

/// The negotiated TLS parameters, for the Received header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// A message ready to be queued.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Empty for the null sender.
    pub from: String,
    pub params: MailParams,
    pub rcpts: Vec<(Address, RcptParams)>,
    pub body: Vec<u8>,
}

/// What the I/O layer must do next.
#[derive(Debug)]
pub enum Action {
    Reply(Reply),
    /// Send the reply, then close the connection.
    Close(Reply),
    /// Send the reply, discard anything the client pipelined after STARTTLS, hand-shake, then
    /// call [`Session::tls_started`].
    StartTls(Reply),
    /// Send the 354 reply, read the DATA stream with a `DataReader` of this limit, then call
    /// [`Session::data_done`].
    ReadData {
        reply: Reply,
        max_size: usize,
    },
    /// Read exactly `size` octets; keep them only if `keep` (else discard while reading), then
    /// call [`Session::bdat_done`].
    ReadBdat {
        size: u64,
        last: bool,
        keep: bool,
    },
    /// Verify the credentials (argon2: off the async threads), then call
    /// [`Session::auth_result`].
    CheckAuth {
        user: String,
        password: String,
    },
    /// Enqueue durably, then call [`Session::queued`].
    Deliver(Draft),
}

#[derive(Debug)]
enum AuthStep {
    Plain,
    LoginUser,
    LoginPass(String),
}

#[derive(Debug, Default)]
struct Transaction {
    from: Option<Option<Address>>,
    params: MailParams,
    rcpts: Vec<(Address, RcptParams)>,
    /// BDAT chunks so far; `Some` once BDAT was used (DATA then refused).
    bdat: Option<Vec<u8>>,
}

pub struct Session<'d> {
    cfg: SessionConfig,
    client: ClientInfo,
    dir: &'d dyn Directory,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    auth_user: Option<String>,
    auth_step: Option<AuthStep>,
    tx: Transaction,
    bad_commands: u32,
    /// Reply for a BDAT chunk that is being read only to be discarded.
    pending_bdat_error: Option<Reply>,
}

fn r(code: u16, esc: &str, text: &str) -> Reply {
    Reply::new(code, esc, text)
}

fn bad_sequence(text: &str) -> Reply {
    r(503, "5.5.1", text)
}

impl<'d> Session<'d> {
    pub fn new(cfg: SessionConfig, client: ClientInfo, dir: &'d dyn Directory) -> Self {
        Session {
            cfg,
            client,
            dir,
            helo: None,
            esmtp: false,
            tls: None,
            auth_user: None,
            auth_step: None,
            tx: Transaction::default(),
            bad_commands: 0,
            pending_bdat_error: None,
        }
    }

    /// For implicit-TLS listeners: the session starts inside TLS.
    pub fn with_tls(mut self, info: TlsInfo) -> Self {
        self.tls = Some(info);
        self
    }

    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP postrider", self.cfg.hostname))
    }

    pub fn timeout_reply(&self) -> Reply {
        r(
            421,
            "4.4.2",
            &format!("{} Error: timeout exceeded", self.cfg.hostname),
        )
    }

    pub fn shutdown_reply(&self) -> Reply {
        r(
            421,
            "4.3.2",
            &format!("{} Service shutting down", self.cfg.hostname),
        )
    }

    pub fn line_too_long(&mut self) -> Action {
        self.error(r(
            500,
            "5.5.2",
            "Line too long (max 1000 octets incl. CRLF)",
        ))
    }

    pub fn authenticated_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Whether the next input line is an AUTH continuation rather than a command.
    pub fn in_auth(&self) -> bool {
        self.auth_step.is_some()
    }

    fn auth_offered(&self) -> bool {
        self.tls.is_some() || self.client.plaintext_auth_ok
    }

    /// Counts a protocol error; too many and the session ends (421).
    fn error(&mut self, reply: Reply) -> Action {
        self.bad_commands += 1;
        if self.bad_commands >= self.cfg.max_bad_commands {
            let mut lines = reply.lines;
            lines.push("4.7.0 Too many errors, closing connection".into());
            return Action::Close(Reply { code: 421, lines });
        }
        Action::Reply(reply)
    }

    fn reset(&mut self) {
        self.tx = Transaction::default();
    }

    /// One command line (CRLF removed).
    pub fn command(&mut self, line: &[u8]) -> Action {
        if let Some(step) = self.auth_step.take() {
            return self.auth_continue(step, line);
        }
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.error(e.0),
        };
        match cmd {
            Command::Ehlo(domain) => {
                self.reset();
                self.helo = Some(domain.clone());
                self.esmtp = true;
                Action::Reply(self.ehlo_reply(&domain))
            }
            Command::Helo(domain) => {
                self.reset();
                self.helo = Some(domain);
                self.esmtp = false;
                Action::Reply(Reply::plain(250, self.cfg.hostname.clone()))
            }
            Command::Mail(from, params) => self.mail(from, params),
            Command::Rcpt(to, params) => self.rcpt(to, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset();
                Action::Reply(r(250, "2.0.0", "OK"))
            }
            Command::Noop => Action::Reply(r(250, "2.0.0", "OK")),
            Command::Quit => Action::Close(r(221, "2.0.0", "Bye")),
            Command::Vrfy => Action::Reply(r(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => Action::Reply(r(502, "5.5.1", "EXPN not available")),
            Command::Help => Action::Reply(r(
                214,
                "2.0.0",
                "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT STARTTLS AUTH",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
        }
    }

    fn ehlo_reply(&self, client: &str) -> Reply {
        let mut lines = vec![
            format!("{} greets {}", self.cfg.hostname, client),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "DSN".into(),
        ];
        if self.cfg.tls_available && self.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Reply { code: 250, lines }
    }

    fn mail(&mut self, from: Option<Address>, params: MailParams) -> Action {
        if self.helo.is_none() {
            return self.error(bad_sequence("Send EHLO or HELO first"));
        }
        if self.tx.from.is_some() {
            return self.error(bad_sequence("Nested MAIL command"));
        }
        if self.cfg.kind != ListenerKind::Smtp && self.auth_user.is_none() {
            return self.error(r(530, "5.7.0", "Authentication required"));
        }
        if !self.esmtp && params != MailParams::default() {
            return self.error(r(555, "5.5.4", "MAIL parameters need EHLO"));
        }
        if let Some(size) = params.size
            && size > self.cfg.max_message_size
        {
            return Action::Reply(r(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
        }
        if from.as_ref().is_some_and(|a| a.utf8) && !params.smtputf8 {
            return self.error(r(553, "5.6.7", "UTF-8 address requires SMTPUTF8"));
        }
        self.tx.from = Some(from);
        self.tx.params = params;
        Action::Reply(r(250, "2.1.0", "Sender OK"))
    }

    fn rcpt(&mut self, to: Address, params: RcptParams) -> Action {
        if self.tx.from.is_none() {
            return self.error(bad_sequence("Need MAIL before RCPT"));
        }
        if self.tx.bdat.is_some() {
            return self.error(bad_sequence("RCPT not allowed after BDAT"));
        }
        if to.utf8 && !self.tx.params.smtputf8 {
            return self.error(r(553, "5.6.7", "UTF-8 address requires SMTPUTF8"));
        }
        if self.tx.rcpts.len() >= self.cfg.max_recipients {
            return Action::Reply(r(452, "4.5.3", "Too many recipients"));
        }
        let local_domain = to.domain.is_empty() || self.dir.is_local_domain(&to.domain);
        if local_domain {
            // RFC 5321 §4.5.1: postmaster of every local domain is always accepted.
            let ok = to.local.eq_ignore_ascii_case("postmaster") || {
                match self.dir.local_exists(&to.full) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "recipient lookup failed");
                        return Action::Reply(r(451, "4.3.0", "Temporary lookup failure"));
                    }
                }
            };
            if !ok {
                return self.error(r(550, "5.1.1", "User unknown in local recipient table"));
            }
        } else if self.auth_user.is_none()
            && !(self.client.relay_allowed && self.cfg.kind == ListenerKind::Smtp)
        {
            return self.error(r(554, "5.7.1", "Relay access denied"));
        }
        self.tx.rcpts.push((to, params));
        Action::Reply(r(250, "2.1.5", "Recipient OK"))
    }

    fn check_ready_for_body(&mut self) -> Option<Action> {
        if self.tx.from.is_none() {
            return Some(self.error(bad_sequence("Need MAIL command")));
        }
        if self.tx.rcpts.is_empty() {
            // RFC 2920 §3.1: the pipelined DATA after refused RCPTs.
            return Some(self.error(r(554, "5.5.1", "No valid recipients")));
        }
        None
    }

    fn data(&mut self) -> Action {
        if self.tx.bdat.is_some() {
            return self.error(bad_sequence("DATA not allowed after BDAT"));
        }
        if let Some(a) = self.check_ready_for_body() {
            return a;
        }
        Action::ReadData {
            reply: Reply::plain(354, "End data with <CR><LF>.<CR><LF>"),
            max_size: self.cfg.max_message_size as usize,
        }
    }

    /// The DATA stream was read to its end.
    pub fn data_done(&mut self, res: Result<Vec<u8>, DataError>) -> Action {
        match res {
            Ok(body) => self.finish_body(body),
            Err(e) => {
                self.reset();
                Action::Reply(e.reply())
            }
        }
    }

    fn bdat(&mut self, size: u64, last: bool) -> Action {
        // RFC 3030 §2: the chunk is read even when the command is refused.
        let refuse = if self.tx.from.is_none() {
            Some(bad_sequence("Need MAIL command"))
        } else if self.tx.rcpts.is_empty() {
            Some(r(554, "5.5.1", "No valid recipients"))
        } else {
            let have = self.tx.bdat.as_ref().map_or(0, |b| b.len() as u64);
            (have.saturating_add(size) > self.cfg.max_message_size).then(|| {
                r(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                )
            })
        };
        match refuse {
            Some(reply) => {
                self.pending_bdat_error = Some(reply);
                Action::ReadBdat {
                    size,
                    last,
                    keep: false,
                }
            }
            None => {
                self.tx.bdat.get_or_insert_with(Vec::new);
                Action::ReadBdat {
                    size,
                    last,
                    keep: true,
                }
            }
        }
    }

    /// A BDAT chunk was read (`data` is `None` when it was discarded).
    pub fn bdat_done(&mut self, data: Option<Vec<u8>>, last: bool) -> Action {
        if let Some(reply) = self.pending_bdat_error.take() {
            // A refused chunk ends the transaction: later chunks get 503 until a new MAIL.
            if self.tx.bdat.is_some() || reply.code == 552 {
                self.reset();
            }
            return self.error(reply);
        }
        let chunk = data.unwrap_or_default();
        let buf = self.tx.bdat.get_or_insert_with(Vec::new);
        buf.extend_from_slice(&chunk);
        let n = chunk.len();
        if !last {
            return Action::Reply(r(250, "2.0.0", &format!("{n} octets received")));
        }
        let body = self.tx.bdat.take().unwrap_or_default();
        self.finish_body(body)
    }

    fn finish_body(&mut self, body: Vec<u8>) -> Action {
        let hops = count_received(&body);
        if hops >= self.cfg.max_received_headers {
            self.reset();
            return Action::Reply(r(554, "5.4.6", "Too many hops (mail loop?)"));
        }
        let tx = std::mem::take(&mut self.tx);
        let from = tx.from.flatten().map(|a| a.full).unwrap_or_default();
        Action::Deliver(Draft {
            from,
            params: tx.params,
            rcpts: tx.rcpts,
            body,
        })
    }

    /// The message was (or failed to be) made durable. Only now may we say 250.
    pub fn queued(&mut self, res: Result<String, String>) -> Reply {
        match res {
            Ok(id) => r(250, "2.0.0", &format!("Ok: queued as {id}")),
            Err(e) => {
                tracing::error!(error = %e, "enqueue failed");
                r(451, "4.3.0", "Local error in processing; try again later")
            }
        }
    }

    fn starttls(&mut self) -> Action {
        if !self.cfg.tls_available {
            return self.error(r(502, "5.5.1", "STARTTLS not available"));
        }
        if self.tls.is_some() {
            return self.error(bad_sequence("Already in TLS"));
        }
        Action::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    /// RFC 3207 §4.2: after the handshake the client must start over.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
        self.auth_user = None;
        self.auth_step = None;
        self.reset();
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Action {
        if self.helo.is_none() || !self.esmtp {
            return self.error(bad_sequence("Send EHLO first"));
        }
        if self.auth_user.is_some() {
            return self.error(bad_sequence("Already authenticated"));
        }
        if self.tx.from.is_some() {
            return self.error(bad_sequence("AUTH not allowed during a mail transaction"));
        }
        if !self.auth_offered() {
            return self.error(r(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        match mechanism {
            "PLAIN" => match initial {
                None => {
                    self.auth_step = Some(AuthStep::Plain);
                    Action::Reply(Reply::plain(334, ""))
                }
                Some(i) => self.auth_continue(AuthStep::Plain, i.as_bytes()),
            },
            "LOGIN" => match initial {
                None => {
                    self.auth_step = Some(AuthStep::LoginUser);
                    Action::Reply(Reply::plain(334, "VXNlcm5hbWU6"))
                }
                Some(i) => self.auth_continue(AuthStep::LoginUser, i.as_bytes()),
            },
            _ => self.error(r(504, "5.5.4", "Unrecognized authentication mechanism")),
        }
    }

    fn auth_continue(&mut self, step: AuthStep, line: &[u8]) -> Action {
        if line == b"*" {
            return self.error(r(501, "5.0.0", "Authentication cancelled"));
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line)
        };
        let Ok(bytes) = decoded else {
            return self.error(r(501, "5.5.2", "Invalid base64 data"));
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return self.error(r(501, "5.5.2", "Credentials are not UTF-8"));
        };
        match step {
            AuthStep::Plain => {
                // RFC 4616: [authzid] NUL authcid NUL passwd
                let parts: Vec<&str> = text.split('\0').collect();
                if parts.len() != 3 || parts[1].is_empty() {
                    return self.error(r(501, "5.5.2", "Malformed PLAIN response"));
                }
                if !parts[0].is_empty() && !parts[0].eq_ignore_ascii_case(parts[1]) {
                    return self.error(r(535, "5.7.8", "Authentication credentials invalid"));
                }
                Action::CheckAuth {
                    user: parts[1].to_string(),
                    password: parts[2].to_string(),
                }
            }
            AuthStep::LoginUser => {
                self.auth_step = Some(AuthStep::LoginPass(text));
                Action::Reply(Reply::plain(334, "UGFzc3dvcmQ6"))
            }
            AuthStep::LoginPass(user) => Action::CheckAuth {
                user,
                password: text,
            },
        }
    }

    pub fn auth_result(&mut self, user: &str, ok: bool) -> Action {
        if ok {
            self.auth_user = Some(user.to_lowercase());
            Action::Reply(r(235, "2.7.0", "Authentication successful"))
        } else {
            self.error(r(535, "5.7.8", "Authentication credentials invalid"))
        }
    }

    /// The `Received:` header for this message (RFC 5321 §4.4; protocol names RFC 3848/6531).
    pub fn received_header(
        &self,
        id: &str,
        single_rcpt: Option<&str>,
        date: &str,
        utf8: bool,
    ) -> String {
        let mut proto = String::from(if utf8 {
            "UTF8SMTP"
        } else if self.esmtp {
            "ESMTP"
        } else {
            "SMTP"
        });
        if self.tls.is_some() {
            proto.push('S');
        }
        if self.auth_user.is_some() {
            proto.push('A');
        }
        let ip = match self.client.addr.ip() {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let mut h = format!(
            "Received: from {} ([{}])\r\n\tby {} (postrider) with {} id {}",
            self.helo.as_deref().unwrap_or("unknown"),
            ip,
            self.cfg.hostname,
            proto,
            id
        );
        if let Some(t) = &self.tls {
            h.push_str(&format!(
                "\r\n\t(using {} with cipher {})",
                t.version, t.cipher
            ));
        }
        if let Some(rcpt) = single_rcpt {
            h.push_str(&format!("\r\n\tfor <{rcpt}>"));
        }
        h.push_str(&format!(";\r\n\t{date}\r\n"));
        h
    }
}

/// Number of `Received:` fields in the header section (loop detection, RFC 5321 §6.3).
pub fn count_received(body: &[u8]) -> usize {
    let mut n = 0;
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir;
    impl Directory for Dir {
        fn is_local_domain(&self, d: &str) -> bool {
            d.eq_ignore_ascii_case("local.test")
        }
        fn local_exists(&self, a: &str) -> Result<bool, String> {
            Ok(a.eq_ignore_ascii_case("alice@local.test"))
        }
    }

    fn cfg(kind: ListenerKind) -> SessionConfig {
        SessionConfig {
            hostname: "mx.local.test".into(),
            kind,
            max_message_size: 1000,
            max_recipients: 100,
            max_bad_commands: 20,
            max_received_headers: 3,
            tls_available: true,
        }
    }

    fn client(relay: bool, plain_auth: bool) -> ClientInfo {
        ClientInfo {
            addr: "192.0.2.7:4000".parse().unwrap(),
            relay_allowed: relay,
            plaintext_auth_ok: plain_auth,
        }
    }

    fn code(a: Action) -> u16 {
        match a {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) => r.code,
            Action::ReadData { reply, .. } => reply.code,
            other => panic!("unexpected action {other:?}"),
        }
    }

    fn reply(a: Action) -> Reply {
        match a {
            Action::Reply(r) | Action::Close(r) => r,
            other => panic!("unexpected action {other:?}"),
        }
    }

    #[test]
    fn local_delivery_flow_and_sequence_errors() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(false, false), &d);
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example>")), 503);
        let ehlo = reply(s.command(b"EHLO client.example"));
        assert!(ehlo.lines.contains(&"STARTTLS".to_string()));
        assert!(
            !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
            "no AUTH in plaintext"
        );
        assert_eq!(code(s.command(b"RCPT TO:<alice@local.test>")), 503);
        assert_eq!(code(s.command(b"DATA")), 503);
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example>")), 250);
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example>")), 503);
        assert_eq!(code(s.command(b"RCPT TO:<bob@local.test>")), 550);
        assert_eq!(code(s.command(b"RCPT TO:<x@elsewhere.example>")), 554);
        assert_eq!(code(s.command(b"RCPT TO:<Postmaster@LOCAL.test>")), 250);
        assert_eq!(code(s.command(b"RCPT TO:<postmaster>")), 250);
        assert_eq!(code(s.command(b"RCPT TO:<alice@local.test>")), 250);
        assert_eq!(code(s.command(b"DATA")), 354);
        let Action::Deliver(d) = s.data_done(Ok(b"Subject: t\r\n\r\nhi\r\n".to_vec())) else {
            panic!()
        };
        assert_eq!(d.rcpts.len(), 3);
        assert_eq!(d.from, "a@b.example");
        assert_eq!(s.queued(Ok("ABC".into())).code, 250);
        // The transaction is over: a new one needs MAIL again.
        assert_eq!(code(s.command(b"RCPT TO:<alice@local.test>")), 503);
    }

    #[test]
    fn relay_rules() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(true, false), &d);
        s.command(b"EHLO c");
        s.command(b"MAIL FROM:<>");
        assert_eq!(code(s.command(b"RCPT TO:<x@elsewhere.example>")), 250);
        // Source routes are never followed: the relay decision uses the final domain.
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(false, false), &d);
        s.command(b"EHLO c");
        s.command(b"MAIL FROM:<>");
        assert_eq!(
            code(s.command(b"RCPT TO:<@local.test:x@elsewhere.example>")),
            554
        );
        // A relay network does not make the submission port open.
        let mut s = Session::new(cfg(ListenerKind::Submission), client(true, false), &d);
        s.command(b"EHLO c");
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example>")), 530);
    }

    #[test]
    fn auth_rules() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Submission), client(false, false), &d);
        s.command(b"EHLO c");
        assert_eq!(code(s.command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")), 538);
        s.tls_started(TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "X".into(),
        });
        assert_eq!(
            code(s.command(b"AUTH PLAIN")),
            503,
            "EHLO needed again after TLS"
        );
        let ehlo = reply(s.command(b"EHLO c"));
        assert!(ehlo.lines.contains(&"AUTH PLAIN LOGIN".to_string()));
        assert!(!ehlo.lines.contains(&"STARTTLS".to_string()));
        match s.command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==") {
            Action::CheckAuth { user, password } => {
                assert_eq!((user.as_str(), password.as_str()), ("alice", "secret"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(code(s.auth_result("alice", false)), 535);
        assert_eq!(code(s.command(b"AUTH LOGIN")), 334);
        assert!(s.in_auth());
        assert_eq!(code(s.command(b"YWxpY2U=")), 334);
        let Action::CheckAuth { user, password } = s.command(b"c2VjcmV0") else {
            panic!()
        };
        assert_eq!((user.as_str(), password.as_str()), ("alice", "secret"));
        assert_eq!(code(s.auth_result("alice", true)), 235);
        assert_eq!(code(s.command(b"AUTH PLAIN")), 503);
        assert_eq!(code(s.command(b"MAIL FROM:<alice@local.test>")), 250);
        assert_eq!(code(s.command(b"RCPT TO:<x@elsewhere.example>")), 250);
        let mut h = String::new();
        h.push_str(&s.received_header("Q1", None, "date", false));
        assert!(h.contains("with ESMTPSA id Q1"), "{h}");
        assert!(h.contains("(using TLSv1.3 with cipher X)"), "{h}");
    }

    #[test]
    fn auth_cancel_and_garbage() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Submission), client(false, true), &d);
        s.command(b"EHLO c");
        assert_eq!(code(s.command(b"AUTH PLAIN")), 334);
        assert_eq!(code(s.command(b"*")), 501);
        assert_eq!(code(s.command(b"AUTH PLAIN !!!notbase64")), 501);
        assert_eq!(code(s.command(b"AUTH CRAM-MD5")), 504);
    }

    #[test]
    fn size_utf8_and_limits() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(false, false), &d);
        s.command(b"EHLO c");
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example> SIZE=1001")), 552);
        assert_eq!(code(s.command("MAIL FROM:<δ@b.example>".as_bytes())), 553);
        assert_eq!(
            code(s.command("MAIL FROM:<δ@b.example> SMTPUTF8".as_bytes())),
            250
        );
        assert_eq!(code(s.command("RCPT TO:<ñ@local.test>".as_bytes())), 550);
        s.command(b"RSET");
        s.command(b"MAIL FROM:<a@b.example>");
        assert_eq!(code(s.command("RCPT TO:<ñ@local.test>".as_bytes())), 553);
        // HELO sessions take no ESMTP parameters.
        s.command(b"HELO c");
        assert_eq!(code(s.command(b"MAIL FROM:<a@b.example> SIZE=10")), 555);
    }

    #[test]
    fn too_many_errors_closes() {
        let d = Dir;
        let mut c = cfg(ListenerKind::Smtp);
        c.max_bad_commands = 5;
        let mut s = Session::new(c, client(false, false), &d);
        for _ in 0..4 {
            assert!(matches!(s.command(b"BOGUS"), Action::Reply(_)));
        }
        let Action::Close(r) = s.command(b"BOGUS") else {
            panic!()
        };
        assert_eq!(r.code, 421);
    }

    #[test]
    fn bdat_flow() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(false, false), &d);
        s.command(b"EHLO c");
        // Refused BDAT is still read (RFC 3030 §2).
        assert!(matches!(
            s.command(b"BDAT 5"),
            Action::ReadBdat { keep: false, .. }
        ));
        assert_eq!(code(s.bdat_done(None, false)), 503);
        s.command(b"MAIL FROM:<a@b.example>");
        s.command(b"RCPT TO:<alice@local.test>");
        assert!(matches!(
            s.command(b"BDAT 3"),
            Action::ReadBdat {
                keep: true,
                last: false,
                ..
            }
        ));
        assert_eq!(code(s.bdat_done(Some(b"abc".to_vec()), false)), 250);
        assert_eq!(code(s.command(b"DATA")), 503, "DATA and BDAT do not mix");
        assert!(matches!(
            s.command(b"BDAT 0 LAST"),
            Action::ReadBdat {
                keep: true,
                last: true,
                ..
            }
        ));
        let Action::Deliver(d) = s.bdat_done(Some(Vec::new()), true) else {
            panic!()
        };
        assert_eq!(d.body, b"abc");
        // Over the size limit: refused, transaction over.
        s.command(b"MAIL FROM:<a@b.example>");
        s.command(b"RCPT TO:<alice@local.test>");
        assert!(matches!(
            s.command(b"BDAT 2000 LAST"),
            Action::ReadBdat { keep: false, .. }
        ));
        assert_eq!(code(s.bdat_done(None, true)), 552);
        assert_eq!(code(s.command(b"RCPT TO:<alice@local.test>")), 503);
    }

    /// Whatever arrives, the session answers with a reply or an action; it never panics.
    /// Lines are built from command fragments and hostile bytes (NUL, 8-bit, CR, '<', '>').
    #[test]
    fn random_input_never_panics() {
        let d = Dir;
        let pieces: &[&[u8]] = &[
            b"EHLO x",
            b"HELO",
            b"MAIL FROM:",
            b"RCPT TO:",
            b"<",
            b">",
            b"@",
            b"local.test",
            b"postmaster",
            b"DATA",
            b"BDAT ",
            b"LAST",
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"=",
            b"*",
            b"STARTTLS",
            b"RSET",
            b"SIZE=",
            b"99999999999999999999",
            b"SMTPUTF8",
            b"\xc3\xa9",
            b"\xff",
            b"\x00",
            b"\r",
            b" ",
            b"NOTIFY=",
            b"ORCPT=rfc822;",
            b"+2B",
            b"\"",
            b"[IPv6:",
            b"QUIT",
            b"NOOP",
            b"VRFY",
            b"AGFsaWNlAHNlY3JldA==",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for kind in [ListenerKind::Smtp, ListenerKind::Submission] {
            for _ in 0..300 {
                let mut c = cfg(kind);
                c.max_bad_commands = 1000;
                let mut s = Session::new(c, client(next() % 2 == 0, next() % 2 == 0), &d);
                for _ in 0..40 {
                    let mut line = Vec::new();
                    for _ in 0..(next() % 6) {
                        line.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                    }
                    match s.command(&line) {
                        Action::ReadData { .. } => {
                            let _ = s.data_done(Ok(line.clone()));
                        }
                        Action::ReadBdat { last, keep, .. } => {
                            let _ = s.bdat_done(keep.then(|| line.clone()), last);
                        }
                        Action::CheckAuth { user, .. } => {
                            let _ = s.auth_result(&user, next() % 2 == 0);
                        }
                        Action::Deliver(_) => {
                            let _ = s.queued(Ok("Q".into()));
                        }
                        Action::StartTls(_) => s.tls_started(TlsInfo {
                            version: "TLSv1.3".into(),
                            cipher: "X".into(),
                        }),
                        Action::Reply(r) | Action::Close(r) => {
                            assert!((200..600).contains(&r.code), "{r:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn loops_are_refused() {
        let d = Dir;
        let mut s = Session::new(cfg(ListenerKind::Smtp), client(false, false), &d);
        s.command(b"EHLO c");
        s.command(b"MAIL FROM:<a@b.example>");
        s.command(b"RCPT TO:<alice@local.test>");
        s.command(b"DATA");
        let body = b"Received: a\r\nReceived: b\r\nreceived: c\r\n\r\nx\r\n".to_vec();
        assert_eq!(code(s.data_done(Ok(body))), 554);
        assert_eq!(
            count_received(b"Received: a\r\n\r\nReceived: in body\r\n"),
            1
        );
    }
}
