//! The POP3 session as a pure state machine (RFC 1939 §3: AUTHORIZATION -> TRANSACTION ->
//! UPDATE). The I/O layer verifies passwords, locks and loads the maildrop, streams messages
//! and performs the UPDATE-state deletions.

use super::proto::{Command, parse};
use base64::Engine as _;

#[derive(Debug, Clone)]
pub struct Pop3Config {
    pub hostname: String,
    /// A certificate is loaded: STLS can be offered.
    pub tls_available: bool,
    /// The listener allows plaintext login and the client is on loopback.
    pub plaintext_auth_ok: bool,
    pub max_bad_commands: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgInfo {
    pub uid: u32,
    pub size: u64,
}

/// The snapshot of the INBOX taken at login: message numbers are fixed for the session.
#[derive(Debug, Clone)]
pub struct Maildrop {
    pub account: String,
    pub uidvalidity: u32,
    pub msgs: Vec<MsgInfo>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// One response line (without CRLF).
    Reply(String),
    /// A multi-line response: status line, then lines (never starting with '.'), then ".".
    Multi(String, Vec<String>),
    /// Send the status line, then message `uid` dot-stuffed (only `top` body lines if set).
    Send {
        status: String,
        uid: u32,
        top: Option<u32>,
    },
    /// Send the reply, discard pipelined input, hand-shake, then call `tls_started`.
    StartTls(String),
    /// Verify the password (off the async threads), then call `login` or `auth_failed`.
    CheckAuth { user: String, password: String },
    /// Remove these UIDs from the INBOX (UPDATE state), then call `updated`.
    Update { account: String, expunge: Vec<u32> },
    /// Send the reply and close.
    Close(String),
}

enum State {
    Authorization { user: Option<String> },
    Transaction { drop: Maildrop, deleted: Vec<bool> },
}

pub struct Session {
    cfg: Pop3Config,
    tls: bool,
    state: State,
    bad: u32,
    /// `AUTH PLAIN` sent without an initial response: the next line is the response.
    awaiting_sasl: bool,
}

fn ok(s: impl AsRef<str>) -> Action {
    Action::Reply(format!("+OK {}", s.as_ref()))
}

impl Session {
    pub fn new(cfg: Pop3Config, tls: bool) -> Session {
        Session {
            cfg,
            tls,
            state: State::Authorization { user: None },
            bad: 0,
            awaiting_sasl: false,
        }
    }

    pub fn greeting(&self) -> String {
        format!("+OK {} POP3 server (postrider) ready", self.cfg.hostname)
    }

    pub fn in_sasl(&self) -> bool {
        self.awaiting_sasl
    }

    fn err(&mut self, text: impl AsRef<str>) -> Action {
        self.bad += 1;
        if self.bad >= self.cfg.max_bad_commands {
            return Action::Close(format!("-ERR {} (too many errors, closing)", text.as_ref()));
        }
        Action::Reply(format!("-ERR {}", text.as_ref()))
    }

    fn login_allowed(&self) -> bool {
        self.tls || self.cfg.plaintext_auth_ok
    }

    pub fn line_too_long(&mut self) -> Action {
        self.err("Line too long")
    }

    pub fn timeout_reply(&self) -> String {
        "-ERR Autologout; idle for too long".into()
    }

    pub fn command(&mut self, line: &[u8]) -> Action {
        if self.awaiting_sasl {
            self.awaiting_sasl = false;
            return self.sasl_plain(line);
        }
        let cmd = match parse(line) {
            Ok(c) => c,
            Err(e) => return self.err(e),
        };
        match cmd {
            Command::Capa => Action::Multi("+OK Capability list follows".into(), self.capa()),
            Command::Noop if matches!(self.state, State::Transaction { .. }) => ok(""),
            Command::Quit => match &self.state {
                State::Authorization { .. } => {
                    Action::Close(format!("+OK {} POP3 server signing off", self.cfg.hostname))
                }
                State::Transaction { drop, deleted } => Action::Update {
                    account: drop.account.clone(),
                    expunge: drop
                        .msgs
                        .iter()
                        .zip(deleted)
                        .filter(|(_, d)| **d)
                        .map(|(m, _)| m.uid)
                        .collect(),
                },
            },
            Command::Stls => {
                if !self.cfg.tls_available {
                    self.err("STLS not available")
                } else if self.tls || !matches!(self.state, State::Authorization { .. }) {
                    self.err("Command not permitted now")
                } else {
                    Action::StartTls("+OK Begin TLS negotiation".into())
                }
            }
            Command::Apop => self.err("APOP not supported; use USER/PASS or AUTH PLAIN"),
            c => match self.state {
                State::Authorization { .. } => self.authorization(c),
                State::Transaction { .. } => self.transaction(c),
            },
        }
    }

    fn capa(&self) -> Vec<String> {
        let mut v = vec![
            "TOP".to_string(),
            "UIDL".into(),
            "RESP-CODES".into(),
            "PIPELINING".into(),
            "AUTH-RESP-CODE".into(),
        ];
        if matches!(self.state, State::Authorization { .. }) {
            if self.login_allowed() {
                v.push("USER".into());
                v.push("SASL PLAIN".into());
            }
            if self.cfg.tls_available && !self.tls {
                v.push("STLS".into());
            }
        }
        v.push("IMPLEMENTATION postrider".into());
        v
    }

    fn authorization(&mut self, cmd: Command) -> Action {
        match cmd {
            Command::User(u) => {
                if !self.login_allowed() {
                    return self
                        .err("[AUTH] Plaintext login disallowed without TLS; use STLS first");
                }
                self.state = State::Authorization { user: Some(u) };
                ok("send PASS")
            }
            Command::Pass(p) => {
                let State::Authorization { user } = &mut self.state else {
                    return self.err("Not now");
                };
                match user.take() {
                    Some(u) => Action::CheckAuth {
                        user: u,
                        password: p,
                    },
                    None => self.err("USER first"),
                }
            }
            Command::Auth {
                mechanism: None, ..
            } => Action::Multi("+OK SASL mechanisms follow".into(), vec!["PLAIN".into()]),
            Command::Auth {
                mechanism: Some(m),
                initial,
            } => {
                if !self.login_allowed() {
                    return self
                        .err("[AUTH] Authentication disallowed without TLS; use STLS first");
                }
                if m != "PLAIN" {
                    return self.err("Unsupported SASL mechanism");
                }
                match initial {
                    Some(i) => self.sasl_plain(i.as_bytes()),
                    None => {
                        self.awaiting_sasl = true;
                        Action::Reply("+ ".into())
                    }
                }
            }
            _ => self.err("Command not valid before login"),
        }
    }

    /// RFC 5034 / RFC 4616: `[authzid] NUL authcid NUL passwd`, base64; `*` cancels.
    fn sasl_plain(&mut self, line: &[u8]) -> Action {
        if line == b"*" {
            return self.err("Authentication cancelled");
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line)
        };
        let Some(text) = decoded.ok().and_then(|b| String::from_utf8(b).ok()) else {
            return self.err("Invalid base64 response");
        };
        let parts: Vec<&str> = text.split('\0').collect();
        if parts.len() != 3 || parts[1].is_empty() {
            return self.err("Malformed PLAIN response");
        }
        if !parts[0].is_empty() && !parts[0].eq_ignore_ascii_case(parts[1]) {
            return self.err("[AUTH] Authorization identity not permitted");
        }
        Action::CheckAuth {
            user: parts[1].to_string(),
            password: parts[2].to_string(),
        }
    }

    /// Credentials were good and the maildrop is locked and loaded.
    pub fn login(&mut self, drop: Maildrop) -> Action {
        let n = drop.msgs.len();
        let size: u64 = drop.msgs.iter().map(|m| m.size).sum();
        let deleted = vec![false; n];
        self.state = State::Transaction { drop, deleted };
        ok(format!("Logged in, {n} messages ({size} octets)"))
    }

    pub fn auth_failed(&mut self) -> Action {
        self.err("[AUTH] Authentication failed")
    }

    /// Another session holds the maildrop (RFC 2449 §8.1.2).
    pub fn in_use(&mut self) -> Action {
        self.err("[IN-USE] Maildrop already locked by another POP3 session")
    }

    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    fn transaction(&mut self, cmd: Command) -> Action {
        let State::Transaction { drop, deleted } = &mut self.state else {
            return self.err("Not logged in");
        };
        // Message number -> index, refusing deleted or absent ones (RFC 1939 §5).
        let index = |n: u32, deleted: &[bool]| -> Option<usize> {
            let i = (n as usize).checked_sub(1)?;
            (i < deleted.len() && !deleted[i]).then_some(i)
        };
        match cmd {
            Command::Stat => {
                let (n, size) = drop
                    .msgs
                    .iter()
                    .zip(deleted.iter())
                    .filter(|(_, d)| !**d)
                    .fold((0, 0u64), |(n, s), (m, _)| (n + 1, s + m.size));
                ok(format!("{n} {size}"))
            }
            Command::List(None) | Command::Uidl(None) => {
                let uidl = matches!(cmd, Command::Uidl(None));
                let lines = drop
                    .msgs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !deleted[*i])
                    .map(|(i, m)| {
                        if uidl {
                            format!("{} {}.{}", i + 1, drop.uidvalidity, m.uid)
                        } else {
                            format!("{} {}", i + 1, m.size)
                        }
                    })
                    .collect::<Vec<_>>();
                let status = if uidl {
                    "+OK Unique-ID listing follows".to_string()
                } else {
                    format!("+OK {} messages", lines.len())
                };
                Action::Multi(status, lines)
            }
            Command::List(Some(n)) => match index(n, deleted) {
                Some(i) => ok(format!("{n} {}", drop.msgs[i].size)),
                None => self.err("No such message"),
            },
            Command::Uidl(Some(n)) => match index(n, deleted) {
                Some(i) => ok(format!("{n} {}.{}", drop.uidvalidity, drop.msgs[i].uid)),
                None => self.err("No such message"),
            },
            Command::Retr(n) => match index(n, deleted) {
                Some(i) => Action::Send {
                    status: format!("+OK {} octets", drop.msgs[i].size),
                    uid: drop.msgs[i].uid,
                    top: None,
                },
                None => self.err("No such message"),
            },
            Command::Top(n, lines) => match index(n, deleted) {
                Some(i) => Action::Send {
                    status: "+OK Top of message follows".into(),
                    uid: drop.msgs[i].uid,
                    top: Some(lines),
                },
                None => self.err("No such message"),
            },
            Command::Dele(n) => match index(n, deleted) {
                Some(i) => {
                    deleted[i] = true;
                    ok(format!("Message {n} deleted"))
                }
                None => self.err("No such message"),
            },
            Command::Rset => {
                deleted.iter_mut().for_each(|d| *d = false);
                let n = deleted.len();
                ok(format!("Maildrop has {n} messages"))
            }
            Command::Noop => ok(""),
            _ => self.err("Command not valid in this state"),
        }
    }

    /// The UPDATE state finished (RFC 1939 §6).
    pub fn updated(&mut self, result: Result<usize, String>) -> Action {
        match result {
            Ok(left) => Action::Close(format!(
                "+OK {} POP3 server signing off ({left} messages left)",
                self.cfg.hostname
            )),
            Err(e) => Action::Close(format!(
                "-ERR [SYS/TEMP] Some deleted messages not removed: {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(plain: bool) -> Session {
        Session::new(
            Pop3Config {
                hostname: "mx.test".into(),
                tls_available: true,
                plaintext_auth_ok: plain,
                max_bad_commands: 10,
            },
            false,
        )
    }

    fn drop3() -> Maildrop {
        Maildrop {
            account: "a@x".into(),
            uidvalidity: 7,
            msgs: vec![
                MsgInfo { uid: 3, size: 100 },
                MsgInfo { uid: 5, size: 200 },
                MsgInfo { uid: 9, size: 300 },
            ],
        }
    }

    fn reply(a: Action) -> String {
        match a {
            Action::Reply(s) | Action::Close(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn login_and_listing() {
        let mut s = session(true);
        let Action::Multi(_, capa) = s.command(b"CAPA") else {
            panic!()
        };
        assert!(capa.contains(&"USER".to_string()) && capa.contains(&"STLS".to_string()));
        assert!(reply(s.command(b"STAT")).starts_with("-ERR"));
        assert!(
            reply(s.command(b"PASS x")).starts_with("-ERR"),
            "PASS before USER"
        );
        assert!(reply(s.command(b"USER a@x")).starts_with("+OK"));
        assert_eq!(
            s.command(b"PASS p w"),
            Action::CheckAuth {
                user: "a@x".into(),
                password: "p w".into()
            }
        );
        assert!(reply(s.login(drop3())).contains("3 messages (600 octets)"));
        assert_eq!(reply(s.command(b"STAT")), "+OK 3 600");
        assert_eq!(
            s.command(b"UIDL"),
            Action::Multi(
                "+OK Unique-ID listing follows".into(),
                vec!["1 7.3".into(), "2 7.5".into(), "3 7.9".into()]
            )
        );
        assert_eq!(reply(s.command(b"DELE 2")), "+OK Message 2 deleted");
        assert!(reply(s.command(b"DELE 2")).starts_with("-ERR"));
        assert!(reply(s.command(b"RETR 2")).starts_with("-ERR"));
        assert!(reply(s.command(b"LIST 4")).starts_with("-ERR"));
        assert!(reply(s.command(b"LIST 0")).starts_with("-ERR"));
        assert_eq!(reply(s.command(b"STAT")), "+OK 2 400");
        assert_eq!(
            s.command(b"LIST"),
            Action::Multi(
                "+OK 2 messages".into(),
                vec!["1 100".into(), "3 300".into()]
            )
        );
        assert_eq!(
            s.command(b"TOP 3 0"),
            Action::Send {
                status: "+OK Top of message follows".into(),
                uid: 9,
                top: Some(0)
            }
        );
        assert_eq!(reply(s.command(b"RSET")), "+OK Maildrop has 3 messages");
        s.command(b"DELE 1");
        s.command(b"DELE 3");
        assert_eq!(
            s.command(b"QUIT"),
            Action::Update {
                account: "a@x".into(),
                expunge: vec![3, 9]
            }
        );
        assert!(reply(s.updated(Ok(1))).contains("1 messages left"));
    }

    #[test]
    fn plaintext_refused_without_tls_and_stls_rules() {
        let mut s = session(false);
        let Action::Multi(_, capa) = s.command(b"CAPA") else {
            panic!()
        };
        assert!(!capa.contains(&"USER".to_string()));
        assert!(reply(s.command(b"USER a@x")).contains("[AUTH]"));
        assert!(reply(s.command(b"AUTH PLAIN AGFAeABw")).starts_with("-ERR"));
        assert_eq!(
            s.command(b"STLS"),
            Action::StartTls("+OK Begin TLS negotiation".into())
        );
        s.tls_started();
        assert!(reply(s.command(b"STLS")).starts_with("-ERR"));
        assert!(reply(s.command(b"USER a@x")).starts_with("+OK"));
    }

    #[test]
    fn sasl_plain_forms() {
        let mut s = session(true);
        // "\0a@x\0pw"
        assert_eq!(
            s.command(b"AUTH PLAIN AGFAeABwdw=="),
            Action::CheckAuth {
                user: "a@x".into(),
                password: "pw".into()
            }
        );
        assert!(reply(s.auth_failed()).contains("[AUTH]"));
        assert_eq!(s.command(b"AUTH PLAIN"), Action::Reply("+ ".into()));
        assert!(s.in_sasl());
        assert_eq!(
            s.command(b"AGFAeABwdw=="),
            Action::CheckAuth {
                user: "a@x".into(),
                password: "pw".into()
            }
        );
        s.command(b"AUTH PLAIN");
        assert!(reply(s.command(b"*")).starts_with("-ERR"));
        assert!(reply(s.command(b"AUTH CRAM-MD5")).starts_with("-ERR"));
        assert!(reply(s.in_use()).contains("[IN-USE]"));
    }

    #[test]
    fn random_input_never_panics() {
        let pieces: &[&[u8]] = &[
            b"USER a@x",
            b"PASS ",
            b"STAT",
            b"LIST",
            b"RETR ",
            b"DELE ",
            b"TOP ",
            b"UIDL",
            b"1",
            b"0",
            b"4294967295",
            b"99999999999",
            b" ",
            b"AUTH PLAIN",
            b"*",
            b"=",
            b"\x00",
            b"\xff",
            b"STLS",
            b"RSET",
            b"QUIT",
            b"NOOP",
            b"CAPA",
            b"APOP",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut s = Session::new(
                Pop3Config {
                    hostname: "h".into(),
                    tls_available: true,
                    plaintext_auth_ok: next() % 2 == 0,
                    max_bad_commands: 1000,
                },
                false,
            );
            for _ in 0..40 {
                let mut line = Vec::new();
                for _ in 0..(next() % 4) {
                    line.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                }
                match s.command(&line) {
                    Action::CheckAuth { .. } => {
                        let _ = if next() % 2 == 0 {
                            s.login(drop3())
                        } else {
                            s.auth_failed()
                        };
                    }
                    Action::StartTls(_) => s.tls_started(),
                    Action::Update { .. } => {
                        let _ = s.updated(Ok(0));
                        break;
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn errors_pile_up_to_a_close() {
        let mut s = session(true);
        for _ in 0..9 {
            assert!(matches!(s.command(b"BOGUS"), Action::Reply(_)));
        }
        assert!(matches!(s.command(b"BOGUS"), Action::Close(_)));
    }
}
