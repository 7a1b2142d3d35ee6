//! Local delivery into the mailbox store.

use super::{BoxFuture, Delivery, Job, JobResult};
use crate::metrics::METRICS;
use crate::store::Store;
use postrider_queue::Outcome;

/// Delivers to accounts of local domains.
pub struct LocalDelivery {
    pub store: Store,
    /// Account that receives postmaster@ every local domain.
    pub postmaster: String,
}

impl LocalDelivery {
    /// The account a local recipient maps to; `Ok(None)` when nobody has it (any more).
    fn account_for(&self, address: &str) -> Result<Option<String>, crate::store::StoreError> {
        let local = address.rsplit_once('@').map_or(address, |(l, _)| l);
        if local.eq_ignore_ascii_case("postmaster") {
            self.store.ensure_account(&self.postmaster)?;
            return Ok(Some(self.postmaster.clone()));
        }
        self.store.resolve(address)
    }

    fn deliver_sync(&self, jobs: &[Job]) -> Vec<JobResult> {
        let now = postrider_queue::now_ms();
        let mut results: Vec<JobResult> = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut res = Vec::with_capacity(job.rcpts.len());
            for &idx in &job.rcpts {
                let Some(rcpt) = job.envelope.recipients.get(idx) else {
                    continue;
                };
                let outcome = match self.account_for(&rcpt.address) {
                    Ok(None) => Outcome::Failed("5.1.1 mailbox unavailable: no such user".into()),
                    Err(e) => Outcome::Deferred(format!("4.3.0 mailbox store error: {e}")),
                    Ok(Some(account)) => {
                        // RFC 5321 §4.4: Return-Path is added at final delivery.
                        let mut raw = Vec::with_capacity(job.body.len() + 128);
                        raw.extend_from_slice(
                            format!(
                                "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                                job.envelope.sender, rcpt.address
                            )
                            .as_bytes(),
                        );
                        raw.extend_from_slice(&job.body);
                        // Dedupe by queue id + account: a replay after a crash (or the same
                        // account reached twice through aliases) stores one copy.
                        let key = format!("{}/{}", job.id, account);
                        match self.store.append(
                            &account,
                            "INBOX",
                            &raw,
                            &[],
                            now,
                            Some(key.as_bytes()),
                        ) {
                            Ok(Some(uid)) => {
                                tracing::info!(queue_id = %job.id, rcpt = %rcpt.address, %account, uid, "delivered to mailbox");
                                METRICS
                                    .local_deliveries
                                    .with_label_values(&["delivered"])
                                    .inc();
                                Outcome::Delivered
                            }
                            Ok(None) => {
                                tracing::info!(queue_id = %job.id, rcpt = %rcpt.address, %account, "already delivered (duplicate suppressed)");
                                METRICS
                                    .local_deliveries
                                    .with_label_values(&["duplicate"])
                                    .inc();
                                Outcome::Delivered
                            }
                            Err(e) => Outcome::Deferred(format!("4.3.0 mailbox store error: {e}")),
                        }
                    }
                };
                res.push((idx, outcome));
            }
            results.push(res);
        }
        // One fsync for the whole batch; only then may the queue forget these messages.
        if let Err(e) = self.store.sync() {
            tracing::error!(error = %e, "mailbox store sync failed; deferring the batch");
            for res in &mut results {
                for (_, o) in res.iter_mut() {
                    if *o == Outcome::Delivered {
                        *o = Outcome::Deferred(format!("4.3.0 mailbox store sync failed: {e}"));
                    }
                }
            }
        }
        results
    }
}

impl Delivery for std::sync::Arc<LocalDelivery> {
    fn deliver(&self, jobs: Vec<Job>) -> BoxFuture<Vec<JobResult>> {
        let me = self.clone();
        Box::pin(async move {
            let n = jobs.len();
            match tokio::task::spawn_blocking(move || me.deliver_sync(&jobs)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "local delivery task failed");
                    vec![Vec::new(); n]
                }
            }
        })
    }
}
