//! The delivery runner: sleeps until the queue's next due time (or a wake-up from a new
//! message), leases due messages, routes each pending recipient to a transport and hands the
//! outcomes to the settler. Idle cost is zero: it never scans the queue.
//!
//! Local delivery is fast and batched (one store transaction per account per round), so the
//! runner waits for it.
//! Remote delivery can take minutes, so each message with remote recipients gets its own task
//! and the runner goes on; a bounded number of such messages are in flight at once.
//!
//! The settler applies outcomes: expiry (RFC 5321 §4.5.4.1 queue lifetime), DSNs (queued
//! durably *before* the outcome is recorded, so a crash can duplicate a bounce but never lose
//! one), and the queue update in one transaction per batch.

use super::dsn::{self, Action, Entry};
use super::remote::outcome_class;
use super::{Delivery, Job, JobResult};
use crate::metrics::METRICS;
use postrider_queue::schedule::RetryPolicy;
use postrider_queue::{Envelope, Lease, Outcome, Queue, QueueId, Recipient, Settled, now_ms};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

/// Leases taken per round: large enough that one store transaction covers many messages.
const BATCH: usize = 256;
/// How long a woken, idle runner waits before taking work: a few ms of delivery latency buys
/// far fewer, larger delivery rounds under load.
const GATHER: Duration = Duration::from_millis(50);
/// Messages with remote recipients being delivered at once (each holds its body in memory).
const REMOTE_IN_FLIGHT: usize = 4096;
/// Finished messages settled in one queue transaction at most.
const SETTLE_BATCH: usize = 512;

pub struct Runner {
    pub queue: Queue,
    pub local: Arc<dyn Delivery>,
    pub remote: Arc<dyn Delivery>,
    /// Decides which recipients are local.
    pub is_local: Box<dyn Fn(&str) -> bool + Send + Sync>,
    pub policy: RetryPolicy,
    pub wake: Arc<Notify>,
    /// Our name in DSNs (Reporting-MTA).
    pub hostname: String,
    /// Send a delay DSN once a message has waited this long (`None`: never).
    pub delay_warning: Option<Duration>,
}

/// A message whose attempt is over, waiting to be settled.
struct Finished {
    id: QueueId,
    envelope: Envelope,
    body: Arc<Vec<u8>>,
    outcomes: Vec<(usize, Outcome)>,
    /// Recipients that went to the local store (their success is final delivery).
    local: HashSet<usize>,
}

/// The transport's outcome for recipient `i`; a transport that forgot one defers it.
fn outcome_for(got: &[(usize, Outcome)], i: usize) -> Outcome {
    got.iter()
        .find(|(j, _)| *j == i)
        .map(|(_, o)| o.clone())
        .unwrap_or_else(|| Outcome::Deferred("4.3.0 transport gave no result".into()))
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

impl Runner {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = Arc::new(self);
        let settler = tokio::spawn(me.clone().settler(rx));
        let in_flight = Arc::new(Semaphore::new(REMOTE_IN_FLIGHT));
        loop {
            if *shutdown.borrow() {
                break;
            }
            let q = me.queue.clone();
            let leases =
                match tokio::task::spawn_blocking(move || q.take_due(now_ms(), BATCH)).await {
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read due work from the queue");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "queue task failed");
                        continue;
                    }
                };
            if leases.is_empty() {
                // Messages being delivered keep their old due time; skip them, or the runner
                // would spin on work it already has.
                let wait = match me.queue.next_unleased_due_ms() {
                    Ok(Some(t)) => Duration::from_millis(t.saturating_sub(now_ms()).max(1)),
                    _ => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = me.wake.notified() => {
                        // Let a burst gather: one round (one store sync, one settle
                        // transaction) for many messages instead of one per message.
                        tokio::time::sleep(GATHER).await;
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            me.round(leases, &tx, &in_flight).await;
        }
        drop(tx);
        // In-flight remote deliveries are abandoned with the runtime; their messages are
        // still due in the queue and are tried again at the next start.
        settler.abort();
    }

    async fn round(
        self: &Arc<Self>,
        leases: Vec<Lease>,
        tx: &mpsc::UnboundedSender<Finished>,
        in_flight: &Arc<Semaphore>,
    ) {
        let mut local_jobs = Vec::new();
        let mut pending = Vec::new();
        for lease in leases {
            let id = lease.id;
            let body = match self.queue.body_shared(id) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "message body unreadable");
                    let outcomes = lease
                        .envelope
                        .pending()
                        .map(|(i, _)| {
                            (
                                i,
                                Outcome::Deferred(format!("4.3.0 queue body unreadable: {e}")),
                            )
                        })
                        .collect();
                    let _ = tx.send(Finished {
                        id,
                        envelope: lease.envelope,
                        body: Arc::new(Vec::new()),
                        outcomes,
                        local: HashSet::new(),
                    });
                    continue;
                }
            };
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for (i, r) in lease.envelope.pending() {
                let d = domain_of(&r.address);
                if d.is_empty() || (self.is_local)(d) {
                    local.push(i);
                } else {
                    remote.push(i);
                }
            }
            if !local.is_empty() {
                local_jobs.push(Job {
                    id,
                    envelope: lease.envelope.clone(),
                    rcpts: local.clone(),
                    body: body.clone(),
                });
            }
            pending.push((id, lease.envelope, body, local, remote));
        }
        let ids: Vec<QueueId> = local_jobs.iter().map(|j| j.id).collect();
        // One local result per job, in job order.
        let results = if local_jobs.is_empty() {
            Vec::new()
        } else {
            let started = std::time::Instant::now();
            let r = self.local.deliver(local_jobs).await;
            METRICS
                .delivery_seconds
                .with_label_values(&["local"])
                .observe(started.elapsed().as_secs_f64());
            r
        };
        // Remote attempts can take minutes: record durably that they are in flight, so a crash
        // during one pushes the message back at start instead of retrying it at once (no
        // crash loop; see Queue::recover_in_flight).
        let remote_ids: Vec<QueueId> = pending
            .iter()
            .filter(|p| !p.4.is_empty())
            .map(|p| p.0)
            .collect();
        if !remote_ids.is_empty() {
            let q = self.queue.clone();
            match tokio::task::spawn_blocking(move || q.mark_in_flight(&remote_ids)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot record in-flight attempts"),
                Err(e) => tracing::warn!(error = %e, "in-flight record task failed"),
            }
        }
        let mut by_id: HashMap<QueueId, JobResult> = ids.into_iter().zip(results).collect();
        for (id, envelope, body, local, remote) in pending {
            let mut outcomes = Vec::new();
            if !local.is_empty() {
                let got = by_id.remove(&id).unwrap_or_default();
                for &i in &local {
                    let o = outcome_for(&got, i);
                    METRICS
                        .delivery_attempts
                        .with_label_values(&["local", outcome_class(&o)])
                        .inc();
                    outcomes.push((i, o));
                }
            }
            let local: HashSet<usize> = local.into_iter().collect();
            if remote.is_empty() {
                let _ = tx.send(Finished {
                    id,
                    envelope,
                    body,
                    outcomes,
                    local,
                });
                continue;
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let job = Job {
                    id,
                    envelope: envelope.clone(),
                    rcpts: remote.clone(),
                    body: body.clone(),
                };
                let got = me.remote.deliver(vec![job]).await.pop().unwrap_or_default();
                for i in remote {
                    outcomes.push((i, outcome_for(&got, i)));
                }
                drop(permit);
                let _ = tx.send(Finished {
                    id,
                    envelope,
                    body,
                    outcomes,
                    local,
                });
            });
        }
    }

    async fn settler(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Finished>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < SETTLE_BATCH {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            self.settle(batch).await;
            // Requeued messages have new due times the sleeping runner does not know.
            self.wake.notify_one();
        }
    }

    async fn settle(&self, mut batch: Vec<Finished>) {
        let now = now_ms();
        let mut warn = Vec::new();
        for f in &mut batch {
            let expired = self.policy.expired(f.envelope.arrival_ms, now);
            for (i, o) in f.outcomes.iter_mut() {
                if expired && let Outcome::Deferred(why) = o {
                    *o = Outcome::Failed(format!(
                        "5.4.7 message expired in the queue; last error: {why}"
                    ));
                }
                let rcpt = f
                    .envelope
                    .recipients
                    .get(*i)
                    .map_or("?", |r| r.address.as_str());
                match o {
                    Outcome::Deferred(w) => {
                        tracing::warn!(queue_id = %f.id, %rcpt, reason = %w, "deferred")
                    }
                    Outcome::Failed(w) => {
                        tracing::warn!(queue_id = %f.id, %rcpt, reason = %w, "failed")
                    }
                    Outcome::Delivered | Outcome::Relayed => {
                        let transport = if f.local.contains(i) {
                            "local"
                        } else {
                            "remote"
                        };
                        METRICS
                            .delivery_delay_seconds
                            .with_label_values(&[transport])
                            .observe(now.saturating_sub(f.envelope.arrival_ms) as f64 / 1000.0);
                    }
                }
                if f.local.contains(i) {
                    match o {
                        Outcome::Deferred(_) => METRICS
                            .local_deliveries
                            .with_label_values(&["deferred"])
                            .inc(),
                        Outcome::Failed(_) => METRICS
                            .local_deliveries
                            .with_label_values(&["failed"])
                            .inc(),
                        _ => {}
                    }
                }
            }
            self.send_reports(f).await;
            if let Some(after) = self.delay_warning
                && !f.envelope.delay_warned
                && now.saturating_sub(f.envelope.arrival_ms) >= after.as_millis() as u64
                && f.outcomes
                    .iter()
                    .any(|(_, o)| matches!(o, Outcome::Deferred(_)))
            {
                self.send_delay_warning(f).await;
                warn.push(f.id);
            }
        }
        let settle: Vec<_> = batch
            .iter()
            .map(|f| {
                let retry_at = self.policy.next_attempt_ms(
                    f.envelope.attempts + 1,
                    now,
                    rand::random::<f64>(),
                );
                (f.id, f.outcomes.clone(), retry_at)
            })
            .collect();
        let q = self.queue.clone();
        match tokio::task::spawn_blocking(move || {
            let r = q.settle_many(&settle);
            if let Ok(results) = &r {
                for ((id, _, _), s) in settle.iter().zip(results) {
                    if warn.contains(id)
                        && matches!(s, Settled::Requeued(_))
                        && let Err(e) = q.mark_delay_warned(*id)
                    {
                        tracing::warn!(queue_id = %id, error = %e, "cannot record the delay warning");
                    }
                }
            }
            (settle, r)
        })
        .await
        {
            Ok((settle, Ok(results))) => {
                for ((id, _, retry_at), r) in settle.iter().zip(results) {
                    match r {
                        Settled::Done(_) => {
                            tracing::info!(queue_id = %id, "message done, removed from queue")
                        }
                        Settled::Requeued(_) => {
                            tracing::info!(queue_id = %id, next_attempt_ms = retry_at, "message requeued")
                        }
                        Settled::Gone => {
                            tracing::info!(queue_id = %id, "message was deleted during delivery")
                        }
                    }
                }
            }
            Ok((_, Err(e))) => tracing::error!(error = %e, "cannot settle delivery outcomes"),
            Err(e) => tracing::error!(error = %e, "settle task failed"),
        }
    }

    /// Failure and success reports for this attempt's final outcomes, as one DSN.
    async fn send_reports(&self, f: &Finished) {
        let mut entries = Vec::new();
        for (i, o) in &f.outcomes {
            let Some(r) = f.envelope.recipients.get(*i) else {
                continue;
            };
            if r.state != postrider_queue::RcptState::Pending {
                continue;
            }
            let Some(action) = Action::of(o, f.local.contains(i)) else {
                continue;
            };
            if !dsn::wanted(&f.envelope, r, action) {
                continue;
            }
            let reason = match o {
                Outcome::Failed(w) => Some(w.clone()),
                _ => None,
            };
            entries.push(Entry {
                rcpt: r,
                action,
                reason,
            });
        }
        if !entries.is_empty() {
            self.queue_report(f, &entries, None).await;
        } else if f.envelope.sender.is_empty()
            && f.outcomes
                .iter()
                .any(|(_, o)| matches!(o, Outcome::Failed(_)))
        {
            tracing::warn!(queue_id = %f.id, "a report (from <>) could not be delivered; not bouncing a bounce");
        }
    }

    async fn send_delay_warning(&self, f: &Finished) {
        let entries: Vec<Entry<'_>> = f
            .outcomes
            .iter()
            .filter_map(|(i, o)| match o {
                Outcome::Deferred(w) => {
                    let r: &Recipient = f.envelope.recipients.get(*i)?;
                    dsn::wanted(&f.envelope, r, Action::Delayed).then(|| Entry {
                        rcpt: r,
                        action: Action::Delayed,
                        reason: Some(w.clone()),
                    })
                }
                _ => None,
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        let until = f.envelope.arrival_ms + self.policy.lifetime.as_millis() as u64;
        self.queue_report(f, &entries, Some(until)).await;
    }

    async fn queue_report(&self, f: &Finished, entries: &[Entry<'_>], until: Option<u64>) {
        match dsn::enqueue(
            &self.queue,
            &self.hostname,
            f.id,
            &f.envelope,
            &f.body,
            entries,
            until,
        )
        .await
        {
            Ok(id) => {
                tracing::info!(queue_id = %f.id, dsn_id = %id, to = %f.envelope.sender, recipients = entries.len(), "DSN queued")
            }
            Err(e) => tracing::error!(queue_id = %f.id, error = %e, "cannot queue a DSN"),
        }
    }
}
