//! The thin tokio layer: accepts connections, moves bytes between the socket and the pure
//! [`Session`], and carries out its [`Action`]s (TLS, DATA/BDAT reading, AUTH checks, durable
//! enqueue). Every read has a size limit and a timeout.

use super::proto::{DataProgress, DataReader, MAX_COMMAND_LINE, Reply};
use super::session::{Action, ClientInfo, Directory, Draft, Session, SessionConfig};
use crate::config::{ListenerConfig, ListenerKind};
use crate::metrics::METRICS;
use crate::net::{
    Conn, ConnLimits, Line, TLS_HANDSHAKE_TIMEOUT, accept_loop, drop_overlong, take_line,
    tokio_util_tasks,
};
use crate::server::App;
use postrider_queue::{Envelope, Recipient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

/// RFC 4954 §4: an AUTH response line may be up to 12288 octets.
const MAX_AUTH_LINE: usize = 12288;

/// Accepts connections for one listener until shutdown.
pub async fn serve(
    app: Arc<App>,
    lcfg: ListenerConfig,
    listener: TcpListener,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
    tasks: tokio_util_tasks::Tracker,
) {
    let name = lcfg.name.clone();
    let refusal = b"421 4.7.0 Too many connections, try again later\r\n";
    accept_loop(&name, listener, limits, shutdown.clone(), refusal, |a| {
        METRICS
            .smtp_connections
            .with_label_values(&[&lcfg.name])
            .inc();
        let (app, lcfg, shutdown) = (app.clone(), lcfg.clone(), shutdown.clone());
        let span = tracing::info_span!("smtp", listener = %lcfg.name, client = %a.peer);
        tasks.spawn(
            async move {
                let _guard = a.guard;
                let active = METRICS
                    .smtp_sessions_active
                    .with_label_values(&[&lcfg.name]);
                active.inc();
                if let Err(e) = handle(app, &lcfg, a.stream, a.peer, shutdown).await {
                    tracing::debug!(error = %e, "session ended with an I/O error");
                }
                active.dec();
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
    let client = ClientInfo {
        addr: peer,
        relay_allowed: app
            .cfg
            .relay
            .networks
            .iter()
            .any(|n| n.contains(&peer.ip())),
        plaintext_auth_ok: lcfg.allow_plaintext_auth && peer.ip().is_loopback(),
    };
    let scfg = SessionConfig {
        hostname: app.cfg.server.hostname.clone(),
        kind: lcfg.kind,
        max_message_size: app.cfg.limits.max_message_size,
        max_recipients: app.cfg.limits.max_recipients,
        max_bad_commands: app.cfg.limits.max_bad_commands,
        max_received_headers: app.cfg.limits.max_received_headers,
        tls_available: true,
    };
    let dir = app.directory();
    let mut session = Session::new(scfg, client, &dir);
    let conn = if lcfg.kind == ListenerKind::Submissions {
        let acceptor = tokio_rustls::TlsAcceptor::from(app.tls.clone());
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        session = session.with_tls(crate::tls::describe(tls.get_ref().1));
        Conn::Tls(Box::new(tls))
    } else {
        Conn::Plain(stream)
    };
    let mut io = SmtpIo {
        conn,
        rbuf: Vec::with_capacity(4096),
        out: Vec::with_capacity(1024),
        app: app.clone(),
        listener: lcfg.name.clone(),
        peer,
        shutdown,
    };
    io.run(&mut session).await
}

enum Flow {
    Continue,
    Close,
}

struct SmtpIo<S> {
    conn: Conn<S>,
    rbuf: Vec<u8>,
    out: Vec<u8>,
    app: Arc<App>,
    listener: String,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
}

enum ReadOutcome {
    Data,
    Eof,
    Timeout,
    Shutdown,
}

/// Reason label for a refusal, from its enhanced status code.
fn reject_reason(reply: &Reply) -> Option<&'static str> {
    if reply.code < 500 && reply.code != 451 && reply.code != 452 {
        return None;
    }
    let esc = reply.lines.first()?.split(' ').next()?;
    Some(match esc {
        "5.1.1" => "unknown_user",
        "5.7.1" => "relay_denied",
        "5.3.4" => "too_big",
        "5.6.11" => "bare_line_ending",
        "5.5.2" => "syntax",
        "5.4.6" => "too_many_hops",
        "5.7.0" => "auth_required",
        "5.6.7" => "utf8_without_smtputf8",
        "4.3.0" => "storage",
        "4.5.3" => "too_many_recipients",
        _ => return None,
    })
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpIo<S> {
    async fn flush_out(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.conn.write_all(&self.out).await?;
            self.conn.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    fn push(&mut self, reply: &Reply) {
        if let Some(reason) = reject_reason(reply) {
            METRICS.messages_rejected.with_label_values(&[reason]).inc();
        }
        reply.write_to(&mut self.out);
    }

    /// Reads more input into `rbuf`, bounded by `timeout`; stops early on shutdown when `idle`.
    async fn read_more(&mut self, timeout: Duration, idle: bool) -> std::io::Result<ReadOutcome> {
        // Read straight into the spare capacity of `rbuf` (no zeroed scratch buffer per read).
        self.rbuf.reserve(16 * 1024);
        let read = tokio::time::timeout(timeout, self.conn.read_buf(&mut self.rbuf));
        let n = if idle {
            let mut sd = self.shutdown.clone();
            tokio::select! {
                r = read => r,
                _ = sd.wait_for(|v| *v) => return Ok(ReadOutcome::Shutdown),
            }
        } else {
            read.await
        };
        match n {
            Err(_) => Ok(ReadOutcome::Timeout),
            Ok(Ok(0)) => Ok(ReadOutcome::Eof),
            Ok(Ok(_)) => Ok(ReadOutcome::Data),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Reads more of a DATA/BDAT stream (`limits.data_timeout` per read; shutdown waits for
    /// it). `false`: the session must end (EOF, or timeout after a 421).
    async fn read_message_data(&mut self, session: &Session<'_>) -> std::io::Result<bool> {
        match self
            .read_more(self.app.cfg.limits.data_timeout, false)
            .await?
        {
            ReadOutcome::Data => Ok(true),
            ReadOutcome::Eof => Ok(false),
            ReadOutcome::Timeout | ReadOutcome::Shutdown => {
                self.push(&session.timeout_reply());
                Ok(false)
            }
        }
    }

    async fn run(&mut self, session: &mut Session<'_>) -> std::io::Result<()> {
        let greeting = session.greeting();
        self.push(&greeting);
        let cmd_timeout = self.app.cfg.limits.command_timeout;
        let mut discarding = false;
        loop {
            // Answer every complete line already received before reading again (RFC 2920).
            loop {
                let limit = if session.in_auth() {
                    MAX_AUTH_LINE
                } else {
                    MAX_COMMAND_LINE
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
            match self.read_more(cmd_timeout, self.rbuf.is_empty()).await? {
                ReadOutcome::Data => {}
                ReadOutcome::Eof => return Ok(()),
                ReadOutcome::Timeout => {
                    tracing::info!("command timeout");
                    let r = session.timeout_reply();
                    self.push(&r);
                    self.flush_out().await?;
                    return Ok(());
                }
                ReadOutcome::Shutdown => {
                    let r = session.shutdown_reply();
                    self.push(&r);
                    self.flush_out().await?;
                    return Ok(());
                }
            }
        }
    }

    async fn perform(&mut self, session: &mut Session<'_>, first: Action) -> std::io::Result<Flow> {
        let mut next = Some(first);
        while let Some(action) = next.take() {
            match action {
                Action::Reply(r) => self.push(&r),
                Action::Close(r) => {
                    self.push(&r);
                    return Ok(Flow::Close);
                }
                Action::StartTls(r) => {
                    self.push(&r);
                    self.flush_out().await?;
                    match self
                        .conn
                        .upgrade(&mut self.rbuf, self.app.tls.clone())
                        .await
                    {
                        Some(info) => session.tls_started(info),
                        None => return Ok(Flow::Close),
                    }
                }
                Action::ReadData { reply, max_size } => {
                    self.push(&reply);
                    self.flush_out().await?;
                    let mut reader = DataReader::new(max_size);
                    // A client that streams far past the limit is cut off rather than read forever.
                    let hard_cap = (max_size as u64).saturating_mul(2).saturating_add(1 << 20);
                    loop {
                        match reader.feed(&self.rbuf) {
                            DataProgress::Done(n) => {
                                self.rbuf.drain(..n);
                                break;
                            }
                            DataProgress::NeedMore => self.rbuf.clear(),
                        }
                        if reader.consumed() > hard_cap {
                            self.push(&Reply::new(
                                552,
                                "5.3.4",
                                "Message size exceeds fixed maximum message size",
                            ));
                            return Ok(Flow::Close);
                        }
                        if !self.read_message_data(session).await? {
                            return Ok(Flow::Close);
                        }
                    }
                    next = Some(session.data_done(reader.finish()));
                }
                Action::ReadBdat { size, last, keep } => {
                    let mut data = keep.then(|| Vec::with_capacity((size as usize).min(1 << 20)));
                    let mut remaining = size;
                    loop {
                        let take = (remaining as usize).min(self.rbuf.len());
                        if let Some(d) = data.as_mut() {
                            d.extend_from_slice(&self.rbuf[..take]);
                        }
                        self.rbuf.drain(..take);
                        remaining -= take as u64;
                        if remaining == 0 {
                            break;
                        }
                        if !self.read_message_data(session).await? {
                            return Ok(Flow::Close);
                        }
                    }
                    next = Some(session.bdat_done(data, last));
                }
                Action::CheckAuth { user, password } => {
                    let store = self.app.store.clone();
                    let u = user.clone();
                    let ok =
                        tokio::task::spawn_blocking(move || store.verify_password(&u, &password))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or(false);
                    METRICS
                        .auth_attempts
                        .with_label_values(&[if ok { "success" } else { "failure" }])
                        .inc();
                    if ok {
                        tracing::info!(user = %user, "authenticated");
                    } else {
                        tracing::warn!(user = %user, "authentication failed");
                        if self.app.auth_failures.check_key(&self.peer.ip()).is_err() {
                            METRICS.auth_attempts.with_label_values(&["blocked"]).inc();
                            self.push(&Reply::new(
                                421,
                                "4.7.0",
                                "Too many failed authentications; try again later",
                            ));
                            return Ok(Flow::Close);
                        }
                        self.flush_out().await?;
                        tokio::time::sleep(self.app.cfg.limits.auth_failure_delay).await;
                    }
                    next = Some(session.auth_result(&user, ok));
                }
                Action::Deliver(draft) => {
                    let res = self.enqueue(session, draft).await;
                    if res.is_ok() {
                        METRICS
                            .messages_accepted
                            .with_label_values(&[&self.listener])
                            .inc();
                    }
                    let reply = session.queued(res);
                    self.push(&reply);
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Makes the message durable in the queue. Returns the queue id only after the flush.
    async fn enqueue(&self, session: &Session<'_>, draft: Draft) -> Result<String, String> {
        let started = Instant::now();
        let queue = &self.app.queue;
        let id = queue.new_id().map_err(|e| e.to_string())?;
        let date = chrono::Local::now().to_rfc2822();
        let single = (draft.rcpts.len() == 1).then(|| draft.rcpts[0].0.full.as_str());
        let received =
            session.received_header(&id.to_string(), single, &date, draft.params.smtputf8);
        let mut body = Vec::with_capacity(received.len() + draft.body.len());
        body.extend_from_slice(received.as_bytes());
        body.extend_from_slice(&draft.body);
        let rcpts = draft
            .rcpts
            .iter()
            .map(|(a, p)| {
                let mut r = Recipient::new(if a.domain.is_empty() {
                    // Bare <postmaster> (RFC 5321 §4.5.1) goes to our primary domain's.
                    format!(
                        "postmaster@{}",
                        self.app
                            .cfg
                            .domains
                            .local
                            .first()
                            .map(String::as_str)
                            .unwrap_or("localhost")
                    )
                } else {
                    a.full.clone()
                });
                r.orcpt = p.orcpt.clone();
                r.notify = p.notify.clone();
                r
            })
            .collect();
        let mut env = Envelope::new(draft.from.clone(), rcpts, body.len() as u64);
        env.ret = draft.params.ret.map(|r| match r {
            super::proto::Ret::Full => postrider_queue::Ret::Full,
            super::proto::Ret::Hdrs => postrider_queue::Ret::Hdrs,
        });
        env.envid = draft.params.envid.clone();
        env.smtputf8 = draft.params.smtputf8;
        env.body_type = draft.params.body.map(|b| b.keyword().to_string());
        env.info.insert("listener".into(), self.listener.clone());
        if let Some(h) = session.helo() {
            env.info.insert("helo".into(), h.to_string());
        }
        if let Some(u) = session.authenticated_user() {
            env.info.insert("auth".into(), u.to_string());
        }
        if let Some(t) = session.tls() {
            env.info
                .insert("tls".into(), format!("{} {}", t.version, t.cipher));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        queue
            .enqueue_with(
                id,
                &env,
                body,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .map_err(|e| e.to_string())?;
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("flusher stopped".into()),
        }
        METRICS
            .enqueue_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(queue_id = %id, from = %draft.from, rcpts = draft.rcpts.len(), size = env.size, "queued");
        self.app.wake.notify_one();
        Ok(id.to_string())
    }
}

/// Address checks backed by the config and the store.
pub struct StoreDirectory {
    pub app: Arc<App>,
}

impl Directory for StoreDirectory {
    fn is_local_domain(&self, domain: &str) -> bool {
        self.app.cfg.domains.is_local(domain)
    }
    fn local_exists(&self, address: &str) -> Result<bool, String> {
        self.app
            .store
            .resolve(address)
            .map(|a| a.is_some())
            .map_err(|e| e.to_string())
    }
}
