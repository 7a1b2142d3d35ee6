//! `postrider serve`: opens the queue and the store, binds every listener, starts the delivery
//! runner and the admin HTTP server, and shuts all of it down in order on SIGINT/SIGTERM.

use crate::config::Config;
use crate::delivery::local::LocalDelivery;
use crate::delivery::runner::Runner;
use crate::net::{ConnLimits, tokio_util_tasks::Tracker};
use crate::smtp::listener::{self, StoreDirectory};
use crate::store::Store;
use postrider_queue::Queue;
use postrider_queue::schedule::RetryPolicy;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Everything a session or handler needs, shared.
pub struct App {
    pub cfg: Arc<Config>,
    pub queue: Queue,
    pub store: Store,
    pub tls: Arc<rustls::ServerConfig>,
    /// Wakes the delivery runner when a message is queued.
    pub wake: Arc<Notify>,
    pub admin_token: String,
    /// Failed AUTH attempts per client IP (governor; pruned by `maintenance`).
    pub auth_failures: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    /// Accounts with an open POP3 session (one per maildrop, RFC 1939 §8).
    pub pop3_locked: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl App {
    pub fn directory(self: &Arc<Self>) -> StoreDirectory {
        StoreDirectory { app: self.clone() }
    }

    pub fn pop3_locks(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        // Poisoning only means a panic elsewhere while holding it; the set stays valid.
        self.pop3_locked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] postrider_queue::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Remote(#[from] crate::delivery::remote::RemoteError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn admin_token(cfg: &Config) -> Result<String, ServeError> {
    if let Some(t) = &cfg.http.admin_token {
        return Ok(t.clone());
    }
    let path = cfg.server.data_dir.join("admin.token");
    if let Ok(t) = std::fs::read_to_string(&path)
        && t.trim().len() >= 32
    {
        return Ok(t.trim().to_string());
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    crate::tls::write_private(&path, token.as_bytes())?;
    Ok(token)
}

pub async fn run(cfg: Config) -> Result<(), ServeError> {
    let cfg = Arc::new(cfg);
    let data = &cfg.server.data_dir;
    std::fs::create_dir_all(data).map_err(|source| ServeError::DataDir {
        path: data.display().to_string(),
        source,
    })?;
    // One database for queue and mailbox store: every flush covers both.
    let (db, commit) = postrider_queue::durable::open_db(&data.join("db"))?;
    let queue = Queue::with_db(db.clone(), commit.clone())?;
    let store = Store::with_db(db, commit.clone())?;
    let tls = match &cfg.tls {
        Some(t) => crate::tls::load(&t.cert, &t.key)?,
        None => {
            tracing::warn!(
                dir = %data.display(),
                "no [tls] configured: using a self-signed certificate (fine for testing, not for production)"
            );
            crate::tls::self_signed(data, &cfg.server.hostname)?
        }
    };
    let postmaster = cfg.domains.postmaster_account();
    if cfg.domains.postmaster.is_none() {
        tracing::warn!(account = %postmaster, "domains.postmaster is not set: postmaster mail goes to this account");
    }
    store.ensure_account(&postmaster)?;
    let app = Arc::new(App {
        admin_token: admin_token(&cfg)?,
        cfg: cfg.clone(),
        queue: queue.clone(),
        store: store.clone(),
        tls,
        wake: Arc::new(Notify::new()),
        pop3_locked: Default::default(),
        auth_failures: governor::RateLimiter::keyed(governor::Quota::per_minute(
            std::num::NonZeroU32::new(cfg.limits.auth_failures_per_minute)
                .unwrap_or(std::num::NonZeroU32::MIN),
        )),
    });

    let mut signals = Signals::register()?;
    // Bind everything first, so a port conflict fails start-up instead of half-running.
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        let sock = tokio::net::TcpListener::bind(l.bind)
            .await
            .map_err(|source| ServeError::Bind {
                what: format!("listener {:?}", l.name),
                addr: l.bind,
                source,
            })?;
        bound.push((l.clone(), sock));
    }
    let http = tokio::net::TcpListener::bind(cfg.http.bind)
        .await
        .map_err(|source| ServeError::Bind {
            what: "http".into(),
            addr: cfg.http.bind,
            source,
        })?;
    let http_addr = http.local_addr()?;
    std::fs::write(data.join("admin.addr"), http_addr.to_string())?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tasks = Tracker::default();
    let limits = ConnLimits::new(
        cfg.limits.max_connections,
        cfg.limits.max_connections_per_ip,
    );
    {
        // Tests and scripts read these lines to find ephemeral ports.
        let mut out = std::io::stdout().lock();
        for (l, sock) in &bound {
            let addr = sock.local_addr()?;
            tracing::info!(listener = %l.name, kind = ?l.kind, %addr, "listening");
            writeln!(out, "listening {} {}", l.name, addr)?;
        }
        writeln!(out, "listening http {http_addr}")?;
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let mut accept_loops = Vec::new();
    for (l, sock) in bound {
        let (app, limits, sd, tasks) = (
            app.clone(),
            limits.clone(),
            shutdown_rx.clone(),
            tasks.clone(),
        );
        accept_loops.push(if l.kind.is_pop3() {
            tokio::spawn(crate::pop3::listener::serve(
                app, l, sock, limits, sd, tasks,
            ))
        } else {
            tokio::spawn(listener::serve(app, l, sock, limits, sd, tasks))
        });
    }
    let local = Arc::new(LocalDelivery {
        store: store.clone(),
        postmaster,
    });
    let domains = cfg.domains.clone();
    let remote = crate::delivery::remote::RemoteDelivery::new(&cfg)?;
    let recovered = queue.recover_in_flight(cfg.queue.retry_initial.as_millis() as u64)?;
    if recovered > 0 {
        tracing::warn!(
            messages = recovered,
            "messages were being delivered when the server stopped; they are retried after queue.retry_initial"
        );
    }
    let runner = Runner {
        queue: queue.clone(),
        local: Arc::new(local),
        remote: Arc::new(remote),
        hostname: cfg.server.hostname.clone(),
        delay_warning: cfg.queue.delay_warning_after(),
        is_local: Box::new(move |d| domains.is_local(d)),
        policy: RetryPolicy {
            initial: cfg.queue.retry_initial,
            max: cfg.queue.retry_max,
            lifetime: cfg.queue.lifetime,
        },
        wake: app.wake.clone(),
    };
    let runner_task = tokio::spawn(runner.run(shutdown_rx.clone()));
    let http_task = tokio::spawn(crate::http::serve(app.clone(), http, shutdown_rx.clone()));
    let maint = tokio::spawn(maintenance(app.clone(), shutdown_rx.clone()));
    tracing::info!("postrider started");

    signals.wait().await;
    tracing::info!("shutting down: refusing new connections, finishing sessions");
    let _ = shutdown_tx.send(true);
    for a in accept_loops {
        let _ = a.await;
    }
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not finish in 10s");
    }
    let _ = runner_task.await;
    let _ = http_task.await;
    maint.abort();
    queue.sync()?;
    commit.stop();
    tracing::info!("stopped");
    Ok(())
}

/// Periodic chores: forget idle rate-limiter keys (governor keeps them forever otherwise) and
/// old delivery dedupe keys.
async fn maintenance(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut minutes = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
        app.auth_failures.retain_recent();
        app.auth_failures.shrink_to_fit();
        minutes += 1;
        if !minutes.is_multiple_of(60) {
            continue;
        }
        let store = app.store.clone();
        // Keys only guard against replays after a crash; a week is far beyond any lease.
        let _ = tokio::task::spawn_blocking(move || store.prune_dedupe(7 * 86_400_000)).await;
    }
}

/// SIGTERM and SIGINT, registered before start-up completes: a signal that arrives right after
/// "ready" must start a clean shutdown, not kill the process with the default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
