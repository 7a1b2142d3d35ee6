//! Remote delivery over SMTP: routing (static routes, else MX), a queue of work per
//! destination served by a bounded number of connections that are reused for several
//! messages, and a global cap on outbound connections.
//!
//! A destination is one MX domain or one route's next hop (Postfix's "nexthop"). Work for a
//! destination waits in its queue; up to `concurrency_per_destination` workers each hold one
//! connection and take work until the queue stays empty for `connection_reuse`, then QUIT.
//! When a worker cannot connect at all, every message waiting for that destination gets the
//! same answer at once instead of each trying the dead host in turn.

use super::mx::{DnsFailure, Resolver};
use super::{BoxFuture, Delivery, Job, JobResult};
use crate::config::{Config, RouteConfig, TlsPolicy};
use crate::metrics::METRICS;
use crate::smtp::client::{Client, ConnectParams, OutMessage, Sent, SetupError, Timeouts};
use postrider_queue::{Outcome, QueueId};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, oneshot};

/// Recipients per transaction (RFC 5321 §4.5.3.1.8: the minimum a server must accept).
const MAX_RCPTS: usize = 100;

/// Where a destination's mail goes.
#[derive(Debug, Clone)]
enum Target {
    /// Look up the domain's MX hosts.
    Mx(String),
    /// A configured next hop (no MX lookup).
    Hop {
        host: String,
        port: u16,
        tls: TlsPolicy,
        auth: Option<(String, String)>,
    },
}

/// One message's recipients for one destination.
struct Work {
    id: QueueId,
    job: Arc<Job>,
    rcpts: Vec<usize>,
    reply: oneshot::Sender<Vec<(usize, Outcome)>>,
}

#[derive(Default)]
struct DestState {
    queue: VecDeque<Work>,
    workers: usize,
    idle: usize,
}

struct Dest {
    key: String,
    target: Target,
    state: Mutex<DestState>,
    work_ready: Notify,
}

impl Dest {
    fn state(&self) -> std::sync::MutexGuard<'_, DestState> {
        // A panic while holding the lock leaves a consistent queue (push/pop only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    routes: Vec<RouteConfig>,
    port: u16,
    base: ConnectParams,
    resolver: Resolver,
    global: Arc<Semaphore>,
    per_dest: usize,
    reuse: Duration,
    dests: Mutex<HashMap<String, Arc<Dest>>>,
}

/// The remote transport. Cheap to clone.
#[derive(Clone)]
pub struct RemoteDelivery {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(#[from] hickory_resolver::net::NetError),
    #[error("cannot set up client TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl RemoteDelivery {
    pub fn new(cfg: &Config) -> Result<RemoteDelivery, RemoteError> {
        let d = &cfg.delivery;
        let base = ConnectParams {
            helo: d
                .helo_name
                .clone()
                .unwrap_or_else(|| cfg.server.hostname.clone()),
            tls: TlsPolicy::Opportunistic,
            tls_any: crate::tls::client_config(false, None)?,
            tls_verify: crate::tls::client_config(true, d.ca_file.as_deref())?,
            auth: None,
            timeouts: Timeouts {
                connect: d.connect_timeout,
                greeting: d.greeting_timeout,
                command: d.command_timeout,
                data: d.data_timeout,
            },
        };
        Ok(RemoteDelivery {
            inner: Arc::new(Inner {
                routes: cfg.routes.clone(),
                port: d.port,
                base,
                resolver: Resolver::new(&cfg.dns)?,
                global: Arc::new(Semaphore::new(d.max_connections)),
                per_dest: d.concurrency_per_destination,
                reuse: d.connection_reuse,
                dests: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The destination for a recipient domain: the first matching route, else its MX.
    fn destination(&self, domain: &str) -> (String, Target) {
        for r in &self.inner.routes {
            if r.matches(domain)
                && let Some((host, port)) = r.host_port()
            {
                let auth = r.auth_username.clone().zip(r.auth_password.clone());
                return (
                    format!("route:{host}:{port}"),
                    Target::Hop {
                        host,
                        port,
                        tls: r.tls,
                        auth,
                    },
                );
            }
        }
        // RFC 5321 §4.1.3 address literal: that host, no DNS.
        if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let host = lit
                .strip_prefix("IPv6:")
                .or_else(|| lit.strip_prefix("ipv6:"))
                .unwrap_or(lit)
                .to_string();
            return (
                format!("literal:{host}"),
                Target::Hop {
                    host,
                    port: self.inner.port,
                    tls: TlsPolicy::Opportunistic,
                    auth: None,
                },
            );
        }
        let d = domain.to_ascii_lowercase();
        (format!("mx:{d}"), Target::Mx(d))
    }

    /// Queues one job's recipients, grouped per destination (all destinations at once), and
    /// returns what to wait for.
    fn start_job(&self, job: Job) -> Vec<(Vec<usize>, oneshot::Receiver<JobResult>)> {
        let job = Arc::new(job);
        let mut groups: HashMap<String, (Target, Vec<usize>)> = HashMap::new();
        for &i in &job.rcpts {
            let Some(r) = job.envelope.recipients.get(i) else {
                continue;
            };
            let domain = r.address.rsplit_once('@').map_or("", |(_, d)| d);
            let (key, target) = self.destination(domain);
            groups
                .entry(key)
                .or_insert_with(|| (target, Vec::new()))
                .1
                .push(i);
        }
        let mut waits = Vec::new();
        for (key, (target, rcpts)) in groups {
            let (tx, rx) = oneshot::channel();
            self.submit(
                key,
                target,
                Work {
                    id: job.id,
                    job: job.clone(),
                    rcpts: rcpts.clone(),
                    reply: tx,
                },
            );
            waits.push((rcpts, rx));
        }
        waits
    }
}

async fn collect(waits: Vec<(Vec<usize>, oneshot::Receiver<JobResult>)>) -> JobResult {
    let mut out = Vec::new();
    for (rcpts, rx) in waits {
        match rx.await {
            Ok(r) => out.extend(r),
            Err(_) => out.extend(
                rcpts
                    .into_iter()
                    .map(|i| (i, Outcome::Deferred("4.3.0 delivery worker stopped".into()))),
            ),
        }
    }
    out
}

impl RemoteDelivery {
    fn submit(&self, key: String, target: Target, work: Work) {
        let dest = {
            let mut m = self.inner.dests.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Dest {
                        key,
                        target,
                        state: Mutex::default(),
                        work_ready: Notify::new(),
                    })
                })
                .clone()
        };
        let spawn = {
            let mut st = dest.state();
            st.queue.push_back(work);
            // A new connection only when no idle worker can take it and the destination is
            // under its limit; otherwise it waits its turn in the queue.
            if st.idle == 0 && st.workers < self.inner.per_dest {
                st.workers += 1;
                true
            } else {
                false
            }
        };
        if spawn {
            let me = self.clone();
            tokio::spawn(async move { me.worker(dest).await });
        } else {
            dest.work_ready.notify_one();
        }
    }

    /// Takes work for one destination over one connection at a time until the queue stays
    /// empty for the reuse time.
    async fn worker(self, dest: Arc<Dest>) {
        let permit = self.inner.global.clone().acquire_owned().await;
        let mut client: Option<Client> = None;
        loop {
            let next = {
                let mut st = dest.state();
                match st.queue.pop_front() {
                    Some(w) => Some(w),
                    None if client.is_none() => {
                        st.workers -= 1;
                        self.forget_if_idle(&dest, &st);
                        None
                    }
                    None => {
                        st.idle += 1;
                        None
                    }
                }
            };
            let work = match next {
                Some(w) => w,
                None if client.is_none() => break,
                None => {
                    // Wait for more work while holding the connection open.
                    let woke = tokio::time::timeout(self.inner.reuse, dest.work_ready.notified())
                        .await
                        .is_ok();
                    let done = {
                        let mut st = dest.state();
                        st.idle -= 1;
                        let done = !woke && st.queue.is_empty();
                        if done {
                            st.workers -= 1;
                            self.forget_if_idle(&dest, &st);
                        }
                        done
                    };
                    if done {
                        if let Some(c) = client.take() {
                            c.quit().await;
                        }
                        break;
                    }
                    continue;
                }
            };
            self.run(&dest, &mut client, work).await;
        }
        drop(permit);
    }

    /// Drops the destination from the map when nothing uses it (called with its state locked).
    fn forget_if_idle(&self, dest: &Arc<Dest>, st: &DestState) {
        if st.workers == 0 && st.queue.is_empty() {
            let mut m = self.inner.dests.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(&dest.key).is_some_and(|d| Arc::ptr_eq(d, dest)) {
                m.remove(&dest.key);
            }
        }
    }

    async fn run(&self, dest: &Arc<Dest>, client: &mut Option<Client>, work: Work) {
        let started = Instant::now();
        let env = &work.job.envelope;
        let msg = OutMessage {
            sender: &env.sender,
            body: &work.job.body,
            smtputf8: env.smtputf8,
            body_type: env.body_type.as_deref(),
            ret: env.ret,
            envid: env.envid.as_deref(),
        };
        let rcpts: Vec<_> = work
            .rcpts
            .iter()
            .filter_map(|&i| env.recipients.get(i).map(|r| (i, r)))
            .collect();
        let mut results = Vec::with_capacity(rcpts.len());
        // RFC 5321 §4.5.3.1.8 obliges servers to take only 100 recipients per transaction;
        // more go in further transactions on the same connection.
        for (n, chunk) in rcpts.chunks(MAX_RCPTS).enumerate() {
            match self.transaction(dest, client, &msg, chunk).await {
                Ok((r, peer, tls)) => {
                    log_outcomes(work.id, env, &r, &peer, tls.as_deref(), started);
                    results.extend(r);
                }
                Err(o) if n == 0 => {
                    self.fail_waiting(dest, &o, work, started).await;
                    return;
                }
                Err(o) => results.extend(chunk.iter().map(|(i, _)| (*i, o.clone()))),
            }
        }
        record(&results, started);
        let _ = work.reply.send(results);
    }

    /// One transaction for `rcpts`, on the held connection or a new one; returns the outcomes
    /// with the peer and TLS version (for the log). `Err`: no connection could be made (the
    /// outcome for everything waiting for this destination).
    async fn transaction(
        &self,
        dest: &Arc<Dest>,
        client: &mut Option<Client>,
        msg: &OutMessage<'_>,
        rcpts: &[(usize, &postrider_queue::Recipient)],
    ) -> Result<(Vec<(usize, Outcome)>, String, Option<String>), Outcome> {
        // At most two tries: a reused connection may turn out dead (the server closed it while
        // idle); then once more on a fresh one.
        for _ in 0..2 {
            let reused = client.is_some();
            if client.is_none() {
                *client = Some(self.connect(&dest.target).await?);
            }
            let Some(c) = client.as_mut() else { break };
            match c.send(msg, rcpts, reused).await {
                Sent::Stale(why) => {
                    tracing::debug!(peer = %c.peer, %why, "cached connection was dead; reconnecting");
                    *client = None;
                }
                Sent::Done(r, alive) => {
                    let (peer, tls) = (c.peer.clone(), c.tls.as_ref().map(|t| t.version.clone()));
                    if !alive {
                        *client = None;
                    }
                    return Ok((r, peer, tls));
                }
            }
        }
        let lost = rcpts
            .iter()
            .map(|(i, _)| (*i, Outcome::Deferred("4.4.2 connection lost twice".into())))
            .collect();
        Ok((lost, dest.key.clone(), None))
    }

    /// The destination is unreachable: this work and everything queued behind it get the same
    /// outcome now.
    async fn fail_waiting(&self, dest: &Arc<Dest>, o: &Outcome, first: Work, started: Instant) {
        let mut all = vec![first];
        all.extend(dest.state().queue.drain(..));
        for w in all {
            let r: Vec<_> = w.rcpts.iter().map(|&i| (i, o.clone())).collect();
            tracing::warn!(queue_id = %w.id, destination = %dest.key, reason = ?o, "cannot reach destination");
            record(&r, started);
            let _ = w.reply.send(r);
        }
    }

    /// Connects to the first host that takes us: MX hosts in order, every address of each.
    async fn connect(&self, target: &Target) -> Result<Client, Outcome> {
        let mut params = self.inner.base.clone();
        let (hosts, port) = match target {
            Target::Mx(domain) => match self.inner.resolver.mx_hosts(domain).await {
                Ok(h) => (
                    h.into_iter().map(|m| m.name).collect::<Vec<_>>(),
                    self.inner.port,
                ),
                Err(f) => return Err(dns_outcome(&f)),
            },
            Target::Hop {
                host,
                port,
                tls,
                auth,
            } => {
                params.tls = *tls;
                params.auth = auth.clone();
                (vec![host.clone()], *port)
            }
        };
        let mut last: Option<String> = None;
        let mut temporary = false;
        for host in &hosts {
            let addrs = match self.inner.resolver.addresses(host).await {
                Ok(a) => a,
                Err(f) => {
                    temporary |= !f.is_permanent();
                    last = Some(f.to_string());
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                let mut r = Client::open(addr, host, &params, false).await;
                if let Err(SetupError::Tls { .. }) = &r
                    && params.tls == TlsPolicy::Opportunistic
                {
                    tracing::info!(%addr, %host, "TLS handshake failed; retrying without TLS (opportunistic)");
                    r = Client::open(addr, host, &params, true).await;
                }
                match r {
                    Ok(c) => return Ok(c),
                    // Trying other hosts of a destination that includes us cannot help.
                    Err(e @ SetupError::Loop { .. }) => return Err(Outcome::Failed(e.to_string())),
                    Err(e) => {
                        tracing::info!(%addr, %host, error = %e, "next address");
                        temporary = true;
                        last = Some(e.to_string());
                    }
                }
            }
        }
        let why = last.unwrap_or_else(|| "4.4.4 no host to try".into());
        Err(if temporary {
            Outcome::Deferred(why)
        } else {
            Outcome::Failed(why)
        })
    }
}

fn dns_outcome(f: &DnsFailure) -> Outcome {
    if f.is_permanent() {
        Outcome::Failed(f.to_string())
    } else {
        Outcome::Deferred(f.to_string())
    }
}

fn record(r: &[(usize, Outcome)], started: Instant) {
    METRICS
        .delivery_seconds
        .with_label_values(&["remote"])
        .observe(started.elapsed().as_secs_f64());
    for (_, o) in r {
        METRICS
            .delivery_attempts
            .with_label_values(&["remote", outcome_class(o)])
            .inc();
    }
}

/// The metrics label of an outcome.
pub fn outcome_class(o: &Outcome) -> &'static str {
    match o {
        Outcome::Delivered | Outcome::Relayed => "delivered",
        Outcome::Deferred(_) => "deferred",
        Outcome::Failed(_) => "failed",
    }
}

fn log_outcomes(
    id: QueueId,
    env: &postrider_queue::Envelope,
    r: &[(usize, Outcome)],
    peer: &str,
    tls: Option<&str>,
    started: Instant,
) {
    for (i, o) in r {
        let rcpt = env.recipients.get(*i).map_or("?", |x| x.address.as_str());
        if matches!(o, Outcome::Delivered | Outcome::Relayed) {
            tracing::info!(
                queue_id = %id,
                %rcpt,
                relay = %peer,
                tls = %tls.unwrap_or("none"),
                attempt_ms = started.elapsed().as_millis() as u64,
                "delivered"
            );
        }
    }
}

impl Delivery for RemoteDelivery {
    fn deliver(&self, jobs: Vec<Job>) -> BoxFuture<Vec<JobResult>> {
        let me = self.clone();
        // Everything is queued before the first wait, so the jobs proceed in parallel.
        let started: Vec<_> = jobs.into_iter().map(|j| me.start_job(j)).collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(started.len());
            for w in started {
                out.push(collect(w).await);
            }
            out
        })
    }
}
