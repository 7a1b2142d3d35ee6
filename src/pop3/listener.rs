//! The tokio layer for POP3: moves bytes, verifies passwords, locks maildrops, streams
//! messages and performs UPDATE-state deletions for the pure [`Session`].

use super::proto::{MAX_AUTH_LINE, MAX_LINE, write_stuffed};
use super::session::{Action, Maildrop, MsgInfo, Pop3Config, Session};
use crate::config::{ListenerConfig, ListenerKind};
use crate::metrics::METRICS;
use crate::net::{
    Conn, ConnLimits, Line, TLS_HANDSHAKE_TIMEOUT, accept_loop, drop_overlong, take_line,
    tokio_util_tasks,
};
use crate::server::App;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

/// RFC 1939 §3: the autologout timer must be at least 10 minutes.
const MIN_AUTOLOGOUT: Duration = Duration::from_secs(600);
/// Messages are written in pieces of this size, so a large one is never stuffed whole.
const SEND_PIECE: usize = 64 * 1024;

/// Releases the maildrop lock when the session ends, however it ends.
struct MaildropLock {
    app: Arc<App>,
    account: String,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        self.app.pop3_locks().remove(&self.account);
    }
}

pub async fn serve(
    app: Arc<App>,
    lcfg: ListenerConfig,
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
    tasks: tokio_util_tasks::Tracker,
) {
    let name = lcfg.name.clone();
    let refusal = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n";
    accept_loop(&name, listener, limits, shutdown.clone(), refusal, |a| {
        METRICS.pop3_sessions.with_label_values(&[&lcfg.name]).inc();
        let (app, lcfg, shutdown) = (app.clone(), lcfg.clone(), shutdown.clone());
        let span = tracing::info_span!("pop3", listener = %lcfg.name, client = %a.peer);
        tasks.spawn(
            async move {
                let _guard = a.guard;
                if let Err(e) = handle(app, &lcfg, a.stream, a.peer, shutdown).await {
                    tracing::debug!(error = %e, "POP3 session ended with an I/O error");
                }
            }
            .instrument(span),
        );
    })
    .await;
}

async fn handle(
    app: Arc<App>,
    lcfg: &ListenerConfig,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let cfg = Pop3Config {
        hostname: app.cfg.server.hostname.clone(),
        tls_available: true,
        plaintext_auth_ok: lcfg.allow_plaintext_auth && peer.ip().is_loopback(),
        max_bad_commands: app.cfg.limits.max_bad_commands,
    };
    let implicit = lcfg.kind == ListenerKind::Pop3s;
    let conn = if implicit {
        let acceptor = tokio_rustls::TlsAcceptor::from(app.tls.clone());
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Conn::Tls(Box::new(tls))
    } else {
        Conn::Plain(stream)
    };
    let mut io = PopIo {
        conn,
        rbuf: Vec::with_capacity(1024),
        out: Vec::with_capacity(1024),
        app,
        peer,
        shutdown,
        lock: None,
    };
    let mut session = Session::new(cfg, implicit);
    io.run(&mut session).await
}

struct PopIo<S> {
    conn: Conn<S>,
    rbuf: Vec<u8>,
    out: Vec<u8>,
    app: Arc<App>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    lock: Option<MaildropLock>,
}

enum Flow {
    Continue,
    Close,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PopIo<S> {
    fn line(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.conn.write_all(&self.out).await?;
            self.conn.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn run(&mut self, session: &mut Session) -> std::io::Result<()> {
        let g = session.greeting();
        self.line(&g);
        let timeout = self.app.cfg.limits.command_timeout.max(MIN_AUTOLOGOUT);
        let mut discarding = false;
        loop {
            // Answer every complete line already received (RFC 2449 PIPELINING).
            loop {
                let limit = if session.in_sasl() {
                    MAX_AUTH_LINE
                } else {
                    MAX_LINE
                };
                let Some(line) = take_line(&mut self.rbuf, limit, &mut discarding) else {
                    drop_overlong(&mut self.rbuf, limit, &mut discarding);
                    break;
                };
                let action = match line {
                    Line::TooLong => session.line_too_long(),
                    Line::Text(l) => session.command(&l),
                };
                if let Flow::Close = self.perform(session, action).await? {
                    self.flush_out().await?;
                    self.conn.finish().await;
                    return Ok(());
                }
            }
            self.flush_out().await?;
            self.rbuf.reserve(4096);
            let mut sd = self.shutdown.clone();
            let read = tokio::time::timeout(timeout, self.conn.read_buf(&mut self.rbuf));
            let n = tokio::select! {
                r = read => Some(r),
                _ = sd.wait_for(|v| *v) => None,
            };
            let Some(n) = n else {
                // A dropped session deletes nothing (RFC 1939 §6).
                self.line("-ERR [SYS/TEMP] Server shutting down");
                return self.flush_out().await;
            };
            match n {
                Err(_) => {
                    let t = session.timeout_reply();
                    self.line(&t);
                    return self.flush_out().await;
                }
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    async fn perform(&mut self, session: &mut Session, first: Action) -> std::io::Result<Flow> {
        let mut next = Some(first);
        while let Some(action) = next.take() {
            match action {
                Action::Reply(s) => self.line(&s),
                Action::Close(s) => {
                    self.line(&s);
                    return Ok(Flow::Close);
                }
                Action::Multi(status, lines) => {
                    self.line(&status);
                    for l in lines {
                        self.line(&l);
                    }
                    self.line(".");
                }
                Action::StartTls(s) => {
                    self.line(&s);
                    self.flush_out().await?;
                    match self
                        .conn
                        .upgrade(&mut self.rbuf, self.app.tls.clone())
                        .await
                    {
                        Some(_) => session.tls_started(),
                        None => return Ok(Flow::Close),
                    }
                }
                Action::CheckAuth { user, password } => {
                    next = Some(self.login(session, user, password).await?);
                }
                Action::Send { status, uid, top } => {
                    let Some(account) = self.lock.as_ref().map(|l| l.account.clone()) else {
                        self.line("-ERR [SYS/PERM] No maildrop");
                        continue;
                    };
                    // Inline: a read from sled's cache takes microseconds, far less than a
                    // hand-off to the blocking pool per message.
                    let raw = self.app.store.message_raw(&account, "INBOX", uid);
                    match raw {
                        Ok(raw) => {
                            self.line(&status);
                            self.send_stuffed(&raw, top).await?;
                            if top.is_none() {
                                METRICS.pop3_retrieved.inc();
                            }
                        }
                        // Expunged meanwhile (e.g. by IMAP): RFC 1939 leaves this to us.
                        Err(e) => {
                            self.line(&format!("-ERR [SYS/TEMP] Message no longer available: {e}"))
                        }
                    }
                }
                Action::Update { account, expunge } => {
                    let store = self.app.store.clone();
                    let n = expunge.len();
                    let res = tokio::task::spawn_blocking(move || {
                        store.expunge(&account, "INBOX", &expunge)
                    })
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(|e| e.to_string());
                    if res.is_ok() {
                        METRICS.pop3_deleted.inc_by(n as u64);
                        tracing::info!(deleted = n, "POP3 UPDATE");
                    }
                    self.lock = None;
                    next = Some(session.updated(res));
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Appends the message dot-stuffed to the output, writing out whenever a piece of
    /// `SEND_PIECE` has accumulated (a large message is never held stuffed in full). Small
    /// messages stay buffered so pipelined RETRs go out in few writes.
    async fn send_stuffed(&mut self, raw: &[u8], top: Option<u32>) -> std::io::Result<()> {
        let before = self.out.len();
        if top.is_some() {
            write_stuffed(&mut self.out, raw, top);
            METRICS
                .pop3_bytes_sent
                .inc_by((self.out.len() - before) as u64);
            return Ok(());
        }
        let mut sent = 0;
        for line in raw.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                self.out.push(b'.');
            }
            self.out.extend_from_slice(line);
            if self.out.len() >= SEND_PIECE {
                sent += self.out.len();
                self.flush_out().await?;
            }
        }
        if !raw.is_empty() && !raw.ends_with(b"\n") {
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b".\r\n");
        METRICS
            .pop3_bytes_sent
            .inc_by((sent + self.out.len()).saturating_sub(before) as u64);
        Ok(())
    }

    async fn login(
        &mut self,
        session: &mut Session,
        user: String,
        password: String,
    ) -> std::io::Result<Action> {
        let ip = self.peer.ip();
        let store = self.app.store.clone();
        let u = user.clone();
        let ok = tokio::task::spawn_blocking(move || store.verify_password(&u, &password))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if !ok {
            tracing::warn!(%user, "POP3 login failed");
            METRICS.pop3_logins.with_label_values(&["failure"]).inc();
            self.flush_out().await?;
            if self.app.auth_failures.check_key(&ip).is_err() {
                METRICS.pop3_logins.with_label_values(&["blocked"]).inc();
                return Ok(Action::Close(
                    "-ERR [AUTH] Too many failed logins; try again later".into(),
                ));
            }
            tokio::time::sleep(self.app.cfg.limits.auth_failure_delay).await;
            return Ok(session.auth_failed());
        }
        let account = crate::store::normalize(&user).unwrap_or(user.to_lowercase());
        if !self.app.pop3_locks().insert(account.clone()) {
            METRICS.pop3_logins.with_label_values(&["in_use"]).inc();
            return Ok(session.in_use());
        }
        self.lock = Some(MaildropLock {
            app: self.app.clone(),
            account: account.clone(),
        });
        let store = self.app.store.clone();
        let acc = account.clone();
        let snapshot = tokio::task::spawn_blocking(move || {
            let mb = store.mailbox(&acc, "INBOX")?;
            let msgs = store.list_messages(&acc, "INBOX")?;
            Ok::<_, crate::store::StoreError>((mb, msgs))
        })
        .await
        .map_err(std::io::Error::other)?;
        match snapshot {
            Ok((mb, msgs)) => {
                METRICS.pop3_logins.with_label_values(&["success"]).inc();
                tracing::info!(%account, messages = msgs.len(), "POP3 login");
                Ok(session.login(Maildrop {
                    account,
                    uidvalidity: mb.uidvalidity,
                    msgs: msgs
                        .iter()
                        .map(|m| MsgInfo {
                            uid: m.uid,
                            size: m.size,
                        })
                        .collect(),
                }))
            }
            Err(e) => {
                self.lock = None;
                Ok(Action::Close(format!(
                    "-ERR [SYS/TEMP] Cannot open maildrop: {e}"
                )))
            }
        }
    }
}
