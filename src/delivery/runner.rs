//! The delivery runner: sleeps until the queue's next due time (or a wake-up from a new
//! message), leases due messages, routes each pending recipient to a transport and settles the
//! outcomes. Idle cost is zero: it never scans the queue.

use super::{Delivery, Job};
use crate::metrics::METRICS;
use postrider_queue::schedule::RetryPolicy;
use postrider_queue::{Outcome, Queue, Settled, now_ms};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Leases taken per round: large enough that one store fsync covers many messages.
const BATCH: usize = 256;
/// How long a woken, idle runner waits before taking work: a few ms of delivery latency buys
/// far fewer, larger delivery rounds under load.
const GATHER: Duration = Duration::from_millis(50);

pub struct Runner {
    pub queue: Queue,
    pub local: Arc<dyn Delivery>,
    /// Decides which recipients are local.
    pub is_local: Box<dyn Fn(&str) -> bool + Send + Sync>,
    pub policy: RetryPolicy,
    pub wake: Arc<Notify>,
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

impl Runner {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let q = self.queue.clone();
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
                let wait = match self.queue.next_due_ms() {
                    Ok(Some(t)) => Duration::from_millis(t.saturating_sub(now_ms()).max(1)),
                    _ => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = self.wake.notified() => {
                        // Let a burst gather: one round (one store sync, one settle
                        // transaction) for many messages instead of one per message.
                        tokio::time::sleep(GATHER).await;
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            self.round(leases).await;
        }
    }

    async fn round(&self, leases: Vec<postrider_queue::Lease>) {
        let mut jobs = Vec::new();
        let mut outcomes: HashMap<postrider_queue::QueueId, Vec<(usize, Outcome)>> = HashMap::new();
        let mut envs = HashMap::new();
        for lease in leases {
            let id = lease.id;
            let body = match self.queue.body_shared(id) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "message body unreadable");
                    let o: Vec<_> = lease
                        .envelope
                        .pending()
                        .map(|(i, _)| {
                            (
                                i,
                                Outcome::Deferred(format!("4.3.0 queue body unreadable: {e}")),
                            )
                        })
                        .collect();
                    outcomes.insert(id, o);
                    envs.insert(id, lease.envelope);
                    continue;
                }
            };
            let mut local = Vec::new();
            let mut other = Vec::new();
            for (i, r) in lease.envelope.pending() {
                let d = domain_of(&r.address);
                if d.is_empty() || (self.is_local)(d) {
                    local.push(i);
                } else {
                    other.push((
                        i,
                        Outcome::Deferred(
                            "4.4.0 remote delivery is not enabled in this build; message kept in the queue".into(),
                        ),
                    ));
                }
            }
            outcomes.insert(id, other);
            if !local.is_empty() {
                jobs.push(Job {
                    id,
                    envelope: lease.envelope.clone(),
                    rcpts: local,
                    body,
                });
            }
            envs.insert(id, lease.envelope);
        }
        let ids: Vec<_> = jobs.iter().map(|j| (j.id, j.rcpts.clone())).collect();
        let results = self.local.deliver(jobs).await;
        for (k, (id, rcpts)) in ids.into_iter().enumerate() {
            let got = results.get(k).cloned().unwrap_or_default();
            let entry = outcomes.entry(id).or_default();
            for i in rcpts {
                match got.iter().find(|(j, _)| *j == i) {
                    Some((_, o)) => entry.push((i, o.clone())),
                    None => entry.push((
                        i,
                        Outcome::Deferred("4.3.0 transport gave no result".into()),
                    )),
                }
            }
        }
        let now = now_ms();
        let mut settle = Vec::with_capacity(outcomes.len());
        for (id, mut outs) in outcomes {
            let Some(env) = envs.get(&id) else { continue };
            if self.policy.expired(env.arrival_ms, now) {
                for (_, o) in outs.iter_mut() {
                    if let Outcome::Deferred(why) = o {
                        *o = Outcome::Failed(format!(
                            "5.4.7 message expired in the queue; last error: {why}"
                        ));
                    }
                }
            }
            for (i, o) in &outs {
                let rcpt = env.recipients.get(*i).map_or("?", |r| r.address.as_str());
                match o {
                    Outcome::Deferred(w) => {
                        METRICS
                            .local_deliveries
                            .with_label_values(&["deferred"])
                            .inc();
                        tracing::warn!(queue_id = %id, %rcpt, reason = %w, "deferred");
                    }
                    Outcome::Failed(w) => {
                        METRICS
                            .local_deliveries
                            .with_label_values(&["failed"])
                            .inc();
                        tracing::warn!(queue_id = %id, %rcpt, reason = %w, "failed");
                    }
                    Outcome::Delivered => {}
                }
            }
            let retry_at =
                self.policy
                    .next_attempt_ms(env.attempts + 1, now, rand::random::<f64>());
            settle.push((id, outs, retry_at));
        }
        let q = self.queue.clone();
        match tokio::task::spawn_blocking(move || {
            let r = q.settle_many(&settle);
            (settle, r)
        })
        .await
        {
            Ok((settle, Ok(results))) => {
                for ((id, _, _), r) in settle.iter().zip(results) {
                    match r {
                        Settled::Done(_) => {
                            tracing::debug!(queue_id = %id, "message done, removed from queue")
                        }
                        Settled::Requeued(_) => {}
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
}
