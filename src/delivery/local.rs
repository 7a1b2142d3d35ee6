//! Local delivery into the mailbox store.

use super::{BoxFuture, Delivery, Job, JobResult};
use crate::metrics::METRICS;
use crate::store::{Append, Store};
use postrider_queue::Outcome;
use std::collections::HashMap;

/// Delivers to accounts of local domains.
pub struct LocalDelivery {
    pub store: Store,
    /// Account that receives postmaster@ every local domain.
    pub postmaster: String,
}

/// One recipient's copy, waiting to be appended.
struct Copy {
    job: usize,
    rcpt: usize,
    raw: Vec<u8>,
    key: String,
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

    /// Delivers a batch: copies are grouped per account and appended in one transaction per
    /// account (see the note at the end about durability).
    fn deliver_sync(&self, jobs: &[Job]) -> Vec<JobResult> {
        let now = postrider_queue::now_ms();
        let mut results: Vec<JobResult> = vec![Vec::new(); jobs.len()];
        let mut per_account: HashMap<String, Vec<Copy>> = HashMap::new();
        for (j, job) in jobs.iter().enumerate() {
            for &idx in &job.rcpts {
                let Some(rcpt) = job.envelope.recipients.get(idx) else {
                    continue;
                };
                match self.account_for(&rcpt.address) {
                    Ok(None) => results[j].push((
                        idx,
                        Outcome::Failed("5.1.1 mailbox unavailable: no such user".into()),
                    )),
                    Err(e) => results[j].push((
                        idx,
                        Outcome::Deferred(format!("4.3.0 mailbox store error: {e}")),
                    )),
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
                        // Dedupe by queue id + account: a replay after a crash (or one account
                        // reached twice through aliases) stores one copy.
                        let key = format!("{}/{}", job.id, account);
                        per_account.entry(account).or_default().push(Copy {
                            job: j,
                            rcpt: idx,
                            raw,
                            key,
                        });
                    }
                }
            }
        }
        for (account, copies) in &per_account {
            let items: Vec<Append<'_>> = copies
                .iter()
                .map(|c| Append {
                    raw: &c.raw,
                    flags: &[],
                    internal_date_ms: now,
                    dedupe_key: Some(c.key.as_bytes()),
                })
                .collect();
            let res = self.store.append_many(account, "INBOX", &items);
            for (k, c) in copies.iter().enumerate() {
                let id = jobs[c.job].id;
                let addr = &jobs[c.job].envelope.recipients[c.rcpt].address;
                let outcome = match res.as_ref().map(|r| r.get(k)) {
                    Ok(Some(Ok(Some(uid)))) => {
                        tracing::info!(queue_id = %id, rcpt = %addr, %account, uid, "delivered to mailbox");
                        METRICS
                            .local_deliveries
                            .with_label_values(&["delivered"])
                            .inc();
                        Outcome::Delivered
                    }
                    Ok(Some(Ok(None))) => {
                        tracing::info!(queue_id = %id, rcpt = %addr, %account, "already delivered (duplicate suppressed)");
                        METRICS
                            .local_deliveries
                            .with_label_values(&["duplicate"])
                            .inc();
                        Outcome::Delivered
                    }
                    Ok(Some(Err(e))) => {
                        Outcome::Deferred(format!("4.3.0 mailbox store error: {e}"))
                    }
                    Ok(None) => Outcome::Deferred("4.3.0 mailbox store gave no result".into()),
                    Err(e) => Outcome::Deferred(format!("4.3.0 mailbox store error: {e}")),
                };
                results[c.job].push((c.rcpt, outcome));
            }
        }
        // No sync here, on purpose: the queue may forget these messages before the copies are
        // durable. Each copy is written with its dedupe key in one sled transaction, and the
        // queue's forgetting becomes durable only after it: a sled transaction later in the
        // same log (sled recovers a prefix), or, for a message still only in the journal, the
        // next checkpoint's flush, which covers these writes too. A crash in between replays
        // the message, and its dedupe key (or its absence) decides: one copy either way.
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
