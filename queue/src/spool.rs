//! The queue proper: four sled trees.
//!
//! - `env`:   id -> envelope (JSON, small, rewritten on every state change)
//! - `body`:  id ++ chunk number -> body bytes (written once, read at delivery)
//! - `due`:   next-attempt time (ms, big-endian) ++ id -> (); the key order *is* the schedule, so
//!   finding due work costs O(due), never O(queue).
//!
//! Leases (messages handed to a runner) live in memory only: a leased message keeps its `due`
//! entry until it is settled, so after a crash it is simply due again. Taking work therefore
//! writes nothing, which halves the writes per delivered message.
//!
//! Envelope and body are apart (as KumoMTA keeps meta and data spools apart) because the
//! envelope changes on every attempt while the body never does.
//!
//! Fresh messages live in memory first. An enqueue is durable once its journal record is (see
//! [`crate::journal`]); the message then waits in [`Fresh`] and goes into the trees above only
//! when a checkpoint comes while it is still queued, when it is deferred, or when an admin
//! operation touches it. Most mail is delivered within milliseconds, so most messages never cost
//! a sled write (sled rewrites whole leaves: ~29 KB written per 2 KiB message, measured).

use crate::durable::{CHUNK, GroupCommit, Waiter, chunk_key, read_chunked};
use crate::journal::Inserts;
use crate::{Envelope, Error, Lease, Outcome, QueueId, RcptState, Result, Settled, now_ms};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The durable queue. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    env: sled::Tree,
    body: sled::Tree,
    due: sled::Tree,
    /// Messages a slow transport is trying right now (ids; empty values). Written and made
    /// durable before the attempt, removed when it is settled: what is left at start was in
    /// flight during a crash (see [`Queue::recover_in_flight`]).
    inflight: sled::Tree,
    leased: Mutex<HashSet<QueueId>>,
    /// Serialises read-modify-write of envelopes (settle, hold, release, delete, take_due's
    /// repairs); enqueue needs none (fresh ids).
    meta: Mutex<()>,
    /// Bodies of recently enqueued messages, bounded by `HOT_BYTES`.
    hot: Arc<Mutex<HotBodies>>,
    /// Messages durable in the journal only (see the module doc). Lock order: `meta`, then
    /// `leased`, then `fresh`.
    fresh: Arc<Mutex<Fresh>>,
    trees: Arc<Trees>,
    commit: GroupCommit,
    /// Opened by [`Queue::open`]: the flusher is ours to stop.
    owns_commit: bool,
    depth: Arc<AtomicU64>,
}

/// One message's outcomes for [`Queue::settle_many`]: id, per-recipient outcomes, and when
/// to retry the recipients still pending.
pub type SettleItem = (QueueId, Vec<(usize, Outcome)>, u64);

/// Memory for bodies kept between enqueue and delivery.
const HOT_BYTES: usize = 64 << 20;

#[derive(Default)]
struct HotBodies {
    map: std::collections::HashMap<QueueId, Arc<Vec<u8>>>,
    bytes: usize,
}

/// A message that is durable in the journal only.
struct FreshMsg {
    env: Envelope,
    body: Arc<Vec<u8>>,
}

/// The queue's memtable: journaled messages not (yet) written into sled. Every checkpoint (at
/// least one a second while the journal holds anything) moves whatever is left into sled, and
/// a backlog beyond [`FRESH_WAITING_MAX`] messages or [`FRESH_BYTES_MAX`] goes there sooner.
#[derive(Default)]
struct Fresh {
    msgs: std::collections::HashMap<QueueId, FreshMsg>,
    /// The ones a runner may take: not leased, not held; by (due time, id).
    due: std::collections::BTreeSet<(u64, QueueId)>,
    /// Body bytes held.
    bytes: usize,
}

/// Waiting fresh messages (not being delivered) kept in memory at most, by count and by body
/// bytes. Beyond either, the oldest go into sled one by one as new ones arrive: when delivery
/// falls behind, the sled writes are spread over the rounds instead of landing all at once in
/// the next checkpoint (which stalls every enqueue meanwhile), and memory stays bounded.
const FRESH_WAITING_MAX: usize = 2048;
const FRESH_BYTES_MAX: usize = 64 << 20;

impl Fresh {
    fn insert(&mut self, id: QueueId, m: FreshMsg) {
        if !m.env.held {
            self.due.insert((m.env.next_attempt_ms, id));
        }
        self.bytes += m.body.len();
        if let Some(old) = self.msgs.insert(id, m) {
            self.bytes -= old.body.len();
        }
    }

    fn remove(&mut self, id: QueueId) -> Option<FreshMsg> {
        let m = self.msgs.remove(&id)?;
        self.due.remove(&(m.env.next_attempt_ms, id));
        self.bytes -= m.body.len();
        Some(m)
    }

    fn clear(&mut self) {
        self.msgs.clear();
        self.due.clear();
        self.bytes = 0;
    }
}

/// The trees a message is written into, for code that runs without a [`Queue`] handle (the
/// checkpoint hook runs on the flusher thread and must not keep the queue alive).
struct Trees {
    env: sled::Tree,
    body: sled::Tree,
    due: sled::Tree,
}

impl Trees {
    /// Plain inserts in the order `repair` expects (body, envelope, due entry): a crash that
    /// keeps a prefix leaves something `repair` removes or the journal completes.
    fn write(&self, id: QueueId, env: &Envelope, body: &[u8]) -> Result<()> {
        let key = id.0.to_be_bytes();
        for (n, chunk) in body.chunks(CHUNK).enumerate() {
            self.body.insert(chunk_key(&key, n as u32), chunk)?;
        }
        if body.is_empty() {
            self.body.insert(chunk_key(&key, 0), &[])?;
        }
        let v = serde_json::to_vec(env).map_err(|source| Error::Corrupt { id, source })?;
        self.env.insert(key, v)?;
        if !env.held {
            self.due.insert(due_key(env.next_attempt_ms, id), &[])?;
        }
        Ok(())
    }

    /// Moves every fresh message into sled (the checkpoint hook). They leave memory only
    /// after all writes succeeded; a retry rewrites the same data.
    fn spill_all(&self, fresh: &Mutex<Fresh>) -> Result<()> {
        let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
        for (id, m) in &f.msgs {
            self.write(*id, &m.env, &m.body)?;
        }
        f.clear();
        Ok(())
    }

    /// Moves the oldest waiting fresh messages into sled while the memtable is over its
    /// bounds (see [`FRESH_WAITING_MAX`]). A failed write leaves the message in memory for the
    /// checkpoint to retry.
    fn spill_backlog(&self, f: &mut Fresh) {
        while f.due.len() > FRESH_WAITING_MAX || (f.bytes > FRESH_BYTES_MAX && !f.due.is_empty()) {
            let Some(&(t, id)) = f.due.first() else { break };
            let Some(m) = f.remove(id) else {
                f.due.remove(&(t, id));
                continue;
            };
            if let Err(e) = self.write(id, &m.env, &m.body) {
                tracing::warn!(queue_id = %id, error = %e, "cannot move a waiting message into sled yet");
                f.insert(id, m);
                break;
            }
        }
    }
}

/// Sizes for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub messages: u64,
    pub leased: u64,
}

/// Messages by state, for metrics: `ready` (due now, waiting for a runner), `deferred`
/// (waiting for their next attempt), `held`, `active` (being delivered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub ready: u64,
    pub deferred: u64,
    pub held: u64,
    pub active: u64,
    /// Arrival time of the oldest message, ms since the epoch.
    pub oldest_arrival_ms: Option<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.owns_commit {
            self.commit.stop();
        }
    }
}

fn due_key(at_ms: u64, id: QueueId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn split_due_key(k: &[u8]) -> Option<(u64, QueueId)> {
    let t = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let id = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
    Some((t, QueueId(id)))
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Records one attempt's per-recipient outcomes in the envelope (final states stay final).
fn apply_outcomes(id: QueueId, e: &mut Envelope, outcomes: &[(usize, Outcome)]) {
    for (idx, outcome) in outcomes {
        let Some(r) = e.recipients.get_mut(*idx) else {
            tracing::error!(queue_id = %id, index = idx, "outcome for a recipient that does not exist");
            continue;
        };
        if r.state != RcptState::Pending {
            continue;
        }
        r.attempts += 1;
        match outcome {
            Outcome::Delivered | Outcome::Relayed => {
                r.state = RcptState::Delivered;
                r.last_error = None;
            }
            Outcome::Deferred(why) => r.last_error = Some(why.clone()),
            Outcome::Failed(why) => {
                r.state = RcptState::Failed;
                r.last_error = Some(why.clone());
            }
        }
    }
    e.attempts += 1;
}

fn chunks_of(size: u64) -> u32 {
    (size as usize).div_ceil(CHUNK).max(1) as u32
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn decode(id: QueueId, bytes: &[u8]) -> Result<Envelope> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt { id, source })
}

fn tx_get_env(t: &TransactionalTree, id: QueueId) -> TxResult<Option<Envelope>> {
    match t.get(id.0.to_be_bytes())? {
        None => Ok(None),
        Some(v) => decode(id, &v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
    }
}

fn tx_put_env(t: &TransactionalTree, id: QueueId, env: &Envelope) -> TxResult<()> {
    let v = serde_json::to_vec(env)
        .map_err(|source| ConflictableTransactionError::Abort(Error::Corrupt { id, source }))?;
    t.insert(&id.0.to_be_bytes(), v)?;
    Ok(())
}

fn unwrap_tx<T>(r: std::result::Result<T, TransactionError<Error>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => Error::Storage(e),
    })
}

impl Queue {
    /// Opens (or creates) the queue in directory `path`. Messages that were being delivered
    /// when the process died are due again at once.
    pub fn open(path: impl AsRef<Path>) -> Result<Queue> {
        let (db, commit) = crate::durable::open_db(path.as_ref())?;
        Queue::build(db, commit, true)
    }

    /// Opens the queue's trees inside a database shared with other data (postrider keeps the
    /// mailbox store in the same one, so enqueues and deliveries share every flush).
    pub fn with_db(db: sled::Db, commit: GroupCommit) -> Result<Queue> {
        Queue::build(db, commit, false)
    }

    fn build(db: sled::Db, commit: GroupCommit, owns_commit: bool) -> Result<Queue> {
        let fresh = Arc::new(Mutex::new(Fresh::default()));
        let trees = Arc::new(Trees {
            env: db.open_tree("queue.env")?,
            body: db.open_tree("queue.body")?,
            due: db.open_tree("queue.due")?,
        });
        let (hook_fresh, hook_trees) = (fresh.clone(), trees.clone());
        commit.on_checkpoint(Box::new(move || {
            hook_trees
                .spill_all(&hook_fresh)
                .map_err(|e| std::io::Error::other(e.to_string()))
        }));
        let q = Queue {
            inner: Arc::new(Inner {
                env: db.open_tree("queue.env")?,
                body: db.open_tree("queue.body")?,
                due: db.open_tree("queue.due")?,
                inflight: db.open_tree("queue.inflight")?,
                leased: Mutex::new(HashSet::new()),
                meta: Mutex::new(()),
                hot: Arc::new(Mutex::new(HotBodies::default())),
                fresh,
                trees,
                db,
                commit,
                owns_commit,
                depth: Arc::new(AtomicU64::new(0)),
            }),
        };
        let n = q.repair()?;
        q.inner.depth.store(n, Ordering::Relaxed);
        q.sync()?;
        Ok(q)
    }

    /// Start-up scan (O(queue), once): removes what an enqueue interrupted by a crash left
    /// behind. Enqueue writes body, then envelope, then due entry, with plain inserts (see
    /// [`Queue::enqueue_with`]); a message whose due entry is missing was never acknowledged,
    /// and body chunks without an envelope belong to no message. Returns the message count.
    fn repair(&self) -> Result<u64> {
        let i = &self.inner;
        let mut n = 0;
        for kv in i.env.iter() {
            let (k, v) = kv?;
            let Ok(raw) = <[u8; 8]>::try_from(&k[..]) else {
                i.env.remove(&k)?;
                continue;
            };
            let id = QueueId(u64::from_be_bytes(raw));
            let complete = match decode(id, &v) {
                Ok(e) => e.held || i.due.contains_key(due_key(e.next_attempt_ms, id))?,
                Err(_) => false,
            };
            if complete {
                n += 1;
            } else {
                tracing::warn!(queue_id = %id, "removing a message whose enqueue was interrupted");
                i.env.remove(&k)?;
            }
        }
        let mut last: Option<[u8; 8]> = None;
        let mut orphan = false;
        for k in i.body.iter().keys() {
            let k = k?;
            let Some(prefix) = k.get(..8).and_then(|p| <[u8; 8]>::try_from(p).ok()) else {
                i.body.remove(&k)?;
                continue;
            };
            if last != Some(prefix) {
                orphan = !i.env.contains_key(prefix)?;
                last = Some(prefix);
            }
            if orphan {
                i.body.remove(&k)?;
            }
        }
        Ok(n)
    }

    /// A fresh, never reused id (sled's persistent id generator).
    pub fn new_id(&self) -> Result<QueueId> {
        Ok(QueueId(self.inner.db.generate_id()?))
    }

    /// Writes message `id` and calls `done` once it is durable (or failed). The write itself
    /// runs on the group-commit thread, batched with everybody else's (see
    /// [`GroupCommit::journal_commit`]); the caller never blocks.
    pub fn enqueue_with(
        &self,
        id: QueueId,
        envelope: &Envelope,
        body: Vec<u8>,
        done: Waiter,
    ) -> Result<()> {
        let i = &self.inner;
        let key = id.0.to_be_bytes();
        let env_bytes =
            serde_json::to_vec(envelope).map_err(|source| Error::Corrupt { id, source })?;
        let due_entry = (!envelope.held).then(|| due_key(envelope.next_attempt_ms, id));
        let body = Arc::new(body);
        {
            let mut hot = i.hot.lock().unwrap_or_else(|e| e.into_inner());
            if hot.bytes + body.len() <= HOT_BYTES {
                hot.bytes += body.len();
                hot.map.insert(id, body.clone());
            }
        }
        // The journal record (and, should the round checkpoint instead, sled's inserts), in
        // the order `repair` expects: body -> envelope -> due entry.
        let mut ins = Inserts::new();
        for (n, chunk) in body.chunks(CHUNK).enumerate() {
            ins.insert(&i.body, &chunk_key(&key, n as u32), chunk);
        }
        if body.is_empty() {
            ins.insert(&i.body, &chunk_key(&key, 0), &[]);
        }
        ins.insert(&i.env, &key, &env_bytes);
        if let Some(k) = due_entry {
            ins.insert(&i.due, &k, &[]);
        }
        // Once journaled, the message waits in memory (see the module doc).
        let (fresh, trees) = (i.fresh.clone(), i.trees.clone());
        let m = FreshMsg {
            env: envelope.clone(),
            body: body.clone(),
        };
        ins.on_journaled(Box::new(move || {
            let mut f = fresh.lock().unwrap_or_else(|e| e.into_inner());
            f.insert(id, m);
            trees.spill_backlog(&mut f);
        }));
        i.depth.fetch_add(1, Ordering::Relaxed);
        // On failure the message does not exist: drop its cached body. (Captures the cache,
        // not the queue: a waiter must never own the last handle to the flusher it runs on.)
        let hot = i.hot.clone();
        let depth = i.depth.clone();
        let done: Waiter = Box::new(move |r| {
            if r.is_err() {
                depth.fetch_sub(1, Ordering::Relaxed);
                let mut h = hot.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(b) = h.map.remove(&id) {
                    h.bytes -= b.len();
                }
            }
            done(r)
        });
        i.commit.journal_commit(ins, done);
        Ok(())
    }

    /// Blocking enqueue: returns once the message is on disk.
    pub fn enqueue(&self, id: QueueId, envelope: &Envelope, body: &[u8]) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue_with(
            id,
            envelope,
            body.to_vec(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv()
            .unwrap_or_else(|_| Err(Arc::new(std::io::Error::other("flusher stopped"))))?;
        Ok(())
    }

    /// Blocks until every write made before the call is durable.
    pub fn sync(&self) -> Result<()> {
        Ok(self.inner.commit.commit_blocking()?)
    }

    /// Group-commit statistics (flushes vs. acknowledged writes).
    pub fn flush_stats(&self) -> crate::durable::FlushStats {
        self.inner.commit.stats()
    }

    /// Earliest time any message is due, if any.
    pub fn next_due_ms(&self) -> Result<Option<u64>> {
        let stored = match self.inner.due.first()? {
            Some((k, _)) => split_due_key(&k).map(|(t, _)| t),
            None => None,
        };
        Ok(min_some(stored, self.fresh_next_due()))
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, Fresh> {
        self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Earliest due time among fresh messages nobody is delivering.
    fn fresh_next_due(&self) -> Option<u64> {
        self.fresh().due.first().map(|(t, _)| *t)
    }

    fn trees(&self) -> &Trees {
        &self.inner.trees
    }

    /// Moves message `id` from memory into sled if it is fresh, so that code working on the
    /// trees sees it. Rare (admin operations); the write is as durable as any other sled write
    /// (the caller syncs, or the next checkpoint does).
    fn spill_one(&self, id: QueueId) -> Result<()> {
        let mut f = self.fresh();
        if let Some(m) = f.remove(id)
            && let Err(e) = self.trees().write(id, &m.env, &m.body)
        {
            f.insert(id, m);
            return Err(e);
        }
        Ok(())
    }

    /// The earliest due time of a message nobody is delivering right now: what a runner
    /// sleeps until. Costs O(leased), like [`Queue::take_due`].
    pub fn next_unleased_due_ms(&self) -> Result<Option<u64>> {
        let leased = self.leased();
        let mut stored = None;
        for kv in self.inner.due.iter().keys() {
            let k = kv?;
            if let Some((t, id)) = split_due_key(&k)
                && !leased.contains(&id)
            {
                stored = Some(t);
                break;
            }
        }
        drop(leased);
        Ok(min_some(stored, self.fresh_next_due()))
    }

    /// Records, durably, that these leased messages are about to be tried by a slow transport
    /// (remote SMTP). If the process dies during the attempt, [`Queue::recover_in_flight`]
    /// finds them at start and pushes them back instead of retrying them at once, so a message
    /// that crashes the server cannot make it crash-loop (mox persists the next attempt before
    /// trying for the same reason). Costs one journal record per call.
    pub fn mark_in_flight(&self, ids: &[QueueId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // Through the journal (one shared write, ~0.3 ms), not a checkpoint: a checkpoint per
        // delivery round stalled every enqueue behind a sled flush and moved every fresh
        // message into sled. The markers reach sled's memory before this returns (the
        // journal's hand-off), so a settle's removal always comes after them; a replay after
        // a crash may bring back a marker whose message was settled meanwhile, which
        // `recover_in_flight` drops (no such message) or turns into one retry delay.
        let mut ins = Inserts::new();
        for id in ids {
            ins.insert(&self.inner.inflight, &id.0.to_be_bytes(), &[]);
        }
        self.inner.commit.journal_commit_blocking(ins)?;
        Ok(())
    }

    /// At start, before any delivery: every message that was in flight when the process died
    /// becomes due `backoff_ms` from now. Returns how many there were.
    pub fn recover_in_flight(&self, backoff_ms: u64) -> Result<usize> {
        let i = &self.inner;
        let ids: Vec<QueueId> = i
            .inflight
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| <[u8; 8]>::try_from(&k[..]).ok())
            .map(|raw| QueueId(u64::from_be_bytes(raw)))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let at = now_ms().saturating_add(backoff_ms);
        let meta = self.meta_lock();
        unwrap_tx(
            (&i.env, &i.due, &i.inflight).transaction(|(env, due, inflight)| {
                for id in &ids {
                    inflight.remove(&id.0.to_be_bytes())?;
                    let Some(mut e) = tx_get_env(env, *id)? else {
                        continue;
                    };
                    due.remove(&due_key(e.next_attempt_ms, *id))?;
                    e.next_attempt_ms = at;
                    if !e.held {
                        due.insert(&due_key(at, *id), &[])?;
                    }
                    tx_put_env(env, *id, &e)?;
                }
                Ok(())
            }),
        )?;
        drop(meta);
        for id in &ids {
            tracing::warn!(queue_id = %id, "was being delivered when the server stopped; retrying later");
        }
        self.sync()?;
        Ok(ids.len())
    }

    /// Records that a delay warning went out for the message (so it goes out once).
    pub fn mark_delay_warned(&self, id: QueueId) -> Result<()> {
        self.update(id, |e, _| {
            e.delay_warned = true;
            Ok(())
        })
    }

    fn leased(&self) -> std::sync::MutexGuard<'_, HashSet<QueueId>> {
        // A poisoned lock only means a thread panicked while holding it; the set is still valid.
        self.inner.leased.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leases up to `max` messages due at or before `now_ms`. Costs O(returned + leased) and
    /// writes nothing.
    pub fn take_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>> {
        let i = &self.inner;
        let _meta = self.meta_lock();
        let mut out = Vec::new();
        let mut leased = self.leased();
        for kv in i.due.iter().keys() {
            let k = kv?;
            let Some((t, id)) = split_due_key(&k) else {
                i.due.remove(&k)?;
                continue;
            };
            if t > now_ms || out.len() >= max {
                break;
            }
            if leased.contains(&id) {
                continue;
            }
            match i.env.get(id.0.to_be_bytes())? {
                Some(v) => {
                    let envelope = decode(id, &v)?;
                    if envelope.next_attempt_ms != t || envelope.held {
                        // A stale entry (an update interrupted by a crash): the envelope is
                        // the truth. Drop this key and make sure the right one exists.
                        i.due.remove(&k)?;
                        if !envelope.held {
                            i.due.insert(due_key(envelope.next_attempt_ms, id), &[])?;
                        }
                        continue;
                    }
                    leased.insert(id);
                    out.push(Lease { id, envelope });
                }
                // A due entry without a message (deleted meanwhile): drop it.
                None => {
                    i.due.remove(&k)?;
                }
            }
        }
        // Then fresh messages (they arrived after anything already in sled was due).
        if out.len() < max {
            let mut f = self.fresh();
            while out.len() < max {
                let Some(&(t, id)) = f.due.first() else { break };
                if t > now_ms {
                    break;
                }
                f.due.remove(&(t, id));
                let Some(m) = f.msgs.get(&id) else { continue };
                leased.insert(id);
                out.push(Lease {
                    id,
                    envelope: m.env.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Records per-recipient outcomes of a delivery attempt and ends the lease.
    ///
    /// Pending recipients that still remain make the message due again at `retry_at_ms`.
    /// When none remain the message is removed and its final envelope returned.
    pub fn settle(
        &self,
        id: QueueId,
        outcomes: &[(usize, Outcome)],
        retry_at_ms: u64,
    ) -> Result<Settled> {
        let mut r = self.settle_many(&[(id, outcomes.to_vec(), retry_at_ms)])?;
        Ok(r.pop().unwrap_or(Settled::Gone))
    }

    /// [`Queue::settle`] for a whole delivery round in one transaction. Outcomes for recipient
    /// indexes that do not exist are ignored (and logged).
    pub fn settle_many(&self, items: &[SettleItem]) -> Result<Vec<Settled>> {
        let res = self.settle_inner(items);
        // Leases end even when the write failed: the messages are then due again as before.
        let mut leased = self.leased();
        for (id, _, _) in items {
            leased.remove(id);
        }
        drop(leased);
        let res = res?;
        for ((id, _, _), r) in items.iter().zip(&res) {
            // Whatever happened, the next attempt (if any) is far off: free the memory.
            self.forget_body(*id);
            if matches!(r, Settled::Done(_)) {
                self.inner.depth.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(res)
    }

    /// Fresh messages are settled in memory; the rest in one sled transaction for the whole
    /// round, under the metadata lock.
    fn settle_inner(&self, items: &[SettleItem]) -> Result<Vec<Settled>> {
        let i = &self.inner;
        let _meta = self.meta_lock();
        let mut out: Vec<Option<Settled>> = vec![None; items.len()];
        {
            let mut f = self.fresh();
            for (n, (id, outcomes, retry_at_ms)) in items.iter().enumerate() {
                let Some(mut m) = f.remove(*id) else { continue };
                apply_outcomes(*id, &mut m.env, outcomes);
                if m.env.pending().next().is_none() {
                    // Nothing was ever written into sled for it: forgetting it is the whole
                    // settle. (The journal record is obsolete at the next checkpoint; a crash
                    // before that replays it, see the journal's module doc.)
                    out[n] = Some(Settled::Done(m.env));
                    continue;
                }
                // Deferred: it waits in sled like any older message.
                m.env.next_attempt_ms = *retry_at_ms;
                if let Err(e) = self.trees().write(*id, &m.env, &m.body) {
                    f.insert(*id, m);
                    return Err(e);
                }
                out[n] = Some(Settled::Requeued(m.env));
            }
        }
        if out.iter().any(Option::is_none) {
            let stored = unwrap_tx((&i.env, &i.body, &i.due, &i.inflight).transaction(
                |(env, bt, due, inflight)| {
                    let mut res = Vec::new();
                    for (n, (id, outcomes, retry_at_ms)) in items.iter().enumerate() {
                        if out[n].is_some() {
                            continue;
                        }
                        let (id, key) = (*id, id.0.to_be_bytes());
                        inflight.remove(&key)?;
                        let Some(mut e) = tx_get_env(env, id)? else {
                            res.push((n, Settled::Gone));
                            continue;
                        };
                        apply_outcomes(id, &mut e, outcomes);
                        due.remove(&due_key(e.next_attempt_ms, id))?;
                        if e.pending().next().is_none() {
                            env.remove(&key)?;
                            for c in 0..chunks_of(e.size) {
                                bt.remove(chunk_key(&key, c))?;
                            }
                            res.push((n, Settled::Done(e)));
                            continue;
                        }
                        e.next_attempt_ms = *retry_at_ms;
                        tx_put_env(env, id, &e)?;
                        if !e.held {
                            due.insert(&due_key(*retry_at_ms, id), &[])?;
                        }
                        res.push((n, Settled::Requeued(e)));
                    }
                    Ok(res)
                },
            ))?;
            for (n, r) in stored {
                out[n] = Some(r);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or(Settled::Gone))
            .collect())
    }

    fn meta_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_body(&self, id: QueueId) {
        let mut hot = self.inner.hot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = hot.map.remove(&id) {
            hot.bytes -= b.len();
        }
    }

    /// The body for delivery: from memory when the message was enqueued recently (the common
    /// case: it is delivered moments later), else from disk.
    pub fn body_shared(&self, id: QueueId) -> Result<Arc<Vec<u8>>> {
        let hot = self.inner.hot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = hot.map.get(&id) {
            return Ok(b.clone());
        }
        drop(hot);
        if let Some(m) = self.fresh().msgs.get(&id) {
            return Ok(m.body.clone());
        }
        Ok(Arc::new(
            read_chunked(&self.inner.body, &id.0.to_be_bytes())?.ok_or(Error::NotFound(id))?,
        ))
    }

    /// The message body, byte for byte as enqueued.
    pub fn body(&self, id: QueueId) -> Result<Vec<u8>> {
        Ok(self.body_shared(id)?.to_vec())
    }

    pub fn show(&self, id: QueueId) -> Result<Envelope> {
        if let Some(m) = self.fresh().msgs.get(&id) {
            return Ok(m.env.clone());
        }
        match self.inner.env.get(id.0.to_be_bytes())? {
            Some(v) => decode(id, &v),
            None => Err(Error::NotFound(id)),
        }
    }

    /// Whether a runner currently holds a lease on the message.
    pub fn is_leased(&self, id: QueueId) -> Result<bool> {
        Ok(self.leased().contains(&id))
    }

    /// Up to `limit` messages in id (= arrival) order.
    pub fn list(&self, limit: usize) -> Result<Vec<(QueueId, Envelope)>> {
        let mut out: Vec<(QueueId, Envelope)> = self
            .fresh()
            .msgs
            .iter()
            .map(|(id, m)| (*id, m.env.clone()))
            .collect();
        for kv in self.inner.env.iter().take(limit) {
            let (k, v) = kv?;
            let Ok(raw) = <[u8; 8]>::try_from(&k[..]) else {
                continue;
            };
            let id = QueueId(u64::from_be_bytes(raw));
            out.push((id, decode(id, &v)?));
        }
        out.sort_by_key(|(id, _)| *id);
        out.dedup_by_key(|(id, _)| *id);
        out.truncate(limit);
        Ok(out)
    }

    /// Stops handing the message out until [`Queue::release`].
    pub fn hold(&self, id: QueueId) -> Result<()> {
        self.update(id, |e, due| {
            if !e.held {
                e.held = true;
                due.remove(&due_key(e.next_attempt_ms, id))?;
            }
            Ok(())
        })
    }

    /// Releases a held message (or makes a deferred one due) right now.
    pub fn release(&self, id: QueueId) -> Result<()> {
        self.retry_now(id, true)
    }

    /// Makes a waiting message due now (`queue flush`). Held messages stay held unless
    /// `unhold`.
    pub fn retry_now(&self, id: QueueId, unhold: bool) -> Result<()> {
        self.update(id, |e, due| {
            if e.held && !unhold {
                return Ok(());
            }
            due.remove(&due_key(e.next_attempt_ms, id))?;
            e.held = false;
            e.next_attempt_ms = now_ms();
            due.insert(&due_key(e.next_attempt_ms, id), &[])?;
            Ok(())
        })
    }

    /// Removes a message and its body. A runner holding its lease gets [`Settled::Gone`].
    pub fn delete(&self, id: QueueId) -> Result<Envelope> {
        let i = &self.inner;
        let key = id.0.to_be_bytes();
        let meta = self.meta_lock();
        self.spill_one(id)?;
        let e = unwrap_tx((&i.env, &i.body, &i.due).transaction(|(env, bt, due)| {
            let Some(e) = tx_get_env(env, id)? else {
                return Err(ConflictableTransactionError::Abort(Error::NotFound(id)));
            };
            env.remove(&key)?;
            due.remove(&due_key(e.next_attempt_ms, id))?;
            for n in 0..chunks_of(e.size) {
                bt.remove(chunk_key(&key, n))?;
            }
            Ok(e)
        }))?;
        // A deleted message is no longer in flight (its attempt, if any, settles as Gone).
        i.inflight.remove(key)?;
        drop(meta);
        self.forget_body(id);
        i.depth.fetch_sub(1, Ordering::Relaxed);
        self.sync()?;
        Ok(e)
    }

    fn update(
        &self,
        id: QueueId,
        f: impl Fn(&mut Envelope, &TransactionalTree) -> TxResult<()>,
    ) -> Result<()> {
        let i = &self.inner;
        let meta = self.meta_lock();
        self.spill_one(id)?;
        unwrap_tx((&i.env, &i.due).transaction(|(env, due)| {
            let Some(mut e) = tx_get_env(env, id)? else {
                return Err(ConflictableTransactionError::Abort(Error::NotFound(id)));
            };
            f(&mut e, due)?;
            tx_put_env(env, id, &e)
        }))?;
        drop(meta);
        self.sync()
    }

    /// Counts by state: one pass over the due index (16 bytes per message), so it suits a
    /// metrics scrape, not a hot path.
    pub fn state_counts(&self, now_ms: u64) -> Result<StateCounts> {
        let leased = self.leased().clone();
        let mut c = StateCounts {
            active: leased.len() as u64,
            ..Default::default()
        };
        let mut indexed = 0u64;
        for kv in self.inner.due.iter().keys() {
            let k = kv?;
            let Some((t, id)) = split_due_key(&k) else {
                continue;
            };
            indexed += 1;
            if leased.contains(&id) {
                continue;
            }
            if t <= now_ms {
                c.ready += 1;
            } else {
                c.deferred += 1;
            }
        }
        {
            let f = self.fresh();
            for (id, m) in &f.msgs {
                if m.env.held {
                    continue;
                }
                indexed += 1;
                if leased.contains(id) {
                    continue;
                }
                if m.env.next_attempt_ms <= now_ms {
                    c.ready += 1;
                } else {
                    c.deferred += 1;
                }
            }
            c.oldest_arrival_ms = f.msgs.values().map(|m| m.env.arrival_ms).min();
        }
        c.held = self
            .inner
            .depth
            .load(Ordering::Relaxed)
            .saturating_sub(indexed);
        if let Some((k, v)) = self.inner.env.first()?
            && let Ok(raw) = <[u8; 8]>::try_from(&k[..])
        {
            let stored = decode(QueueId(u64::from_be_bytes(raw)), &v)?.arrival_ms;
            c.oldest_arrival_ms = min_some(c.oldest_arrival_ms, Some(stored));
        }
        Ok(c)
    }

    pub fn counts(&self) -> QueueCounts {
        QueueCounts {
            messages: self.inner.depth.load(Ordering::Relaxed),
            leased: self.leased().len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Recipient;

    /// Copies the files of `from` whose names start with one of `names` into `to`: a crash
    /// image taken piece by piece (sled's files as they were, the journal as it is now).
    fn copy_files(from: &Path, to: &Path, names: &[&str]) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if e.file_type().unwrap().is_file() && names.iter().any(|n| name.starts_with(n)) {
                std::fs::copy(e.path(), to.join(&name)).unwrap();
            }
        }
    }

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope::new(
            "a@example.org",
            rcpts.iter().map(|r| Recipient::new(*r)).collect(),
            5,
        )
    }

    #[test]
    fn enqueue_take_settle() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let id = q.new_id().unwrap();
        q.enqueue(id, &env(&["x@l", "y@l"]), b"hello").unwrap();
        assert_eq!(q.counts().messages, 1);
        let leases = q.take_due(now_ms() + 1, 10).unwrap();
        assert_eq!(leases.len(), 1);
        assert!(
            q.take_due(now_ms() + 1, 10).unwrap().is_empty(),
            "leased twice"
        );
        assert_eq!(q.body(id).unwrap(), b"hello");
        assert_eq!(q.body_shared(id).unwrap().as_slice(), b"hello");
        let later = now_ms() + 60_000;
        let s = q
            .settle(
                id,
                &[
                    (0, Outcome::Delivered),
                    (1, Outcome::Deferred("4.4.1 later".into())),
                ],
                later,
            )
            .unwrap();
        assert!(matches!(s, Settled::Requeued(_)));
        assert!(q.take_due(now_ms(), 10).unwrap().is_empty());
        assert_eq!(q.next_due_ms().unwrap(), Some(later));
        let l = q.take_due(later, 10).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].envelope.pending().count(), 1);
        let s = q
            .settle(id, &[(1, Outcome::Failed("5.1.1 no".into()))], 0)
            .unwrap();
        let Settled::Done(e) = s else {
            panic!("not done")
        };
        assert_eq!(e.recipients[1].state, RcptState::Failed);
        assert_eq!(q.counts().messages, 0);
        assert!(q.body(id).is_err());
    }

    #[test]
    fn survives_reopen_and_crash_mid_lease() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (a, b);
        {
            let q = Queue::open(dir.path()).unwrap();
            a = q.new_id().unwrap();
            b = q.new_id().unwrap();
            q.enqueue(a, &env(&["x@l"]), &big).unwrap();
            q.enqueue(b, &env(&["y@l"]), b"").unwrap();
            // Take both, as a runner would, then "crash": drop without settling.
            assert_eq!(q.take_due(now_ms() + 1, 10).unwrap().len(), 2);
            q.sync().unwrap();
        }
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.counts().messages, 2);
        assert_eq!(q.counts().leased, 0);
        let l = q.take_due(now_ms() + 1, 10).unwrap();
        assert_eq!(l.len(), 2, "crashed leases must come back");
        assert_eq!(q.body(a).unwrap(), big);
        assert_eq!(*q.body_shared(a).unwrap(), big, "from disk after reopen");
        assert_eq!(q.body(b).unwrap(), b"");
        assert!(a < b);
    }

    #[test]
    fn interrupted_enqueue_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (good, torn);
        {
            let q = Queue::open(dir.path()).unwrap();
            good = q.new_id().unwrap();
            q.enqueue(good, &env(&["x@l"]), b"kept").unwrap();
            // What a crash between the envelope and the due entry leaves behind.
            torn = q.new_id().unwrap();
            let key = torn.0.to_be_bytes();
            q.inner
                .body
                .insert(chunk_key(&key, 0), &b"torn"[..])
                .unwrap();
            q.inner
                .env
                .insert(key, serde_json::to_vec(&env(&["y@l"])).unwrap())
                .unwrap();
            // And an orphan body chunk.
            q.inner
                .body
                .insert(chunk_key(&999u64.to_be_bytes(), 0), &b"orphan"[..])
                .unwrap();
            q.sync().unwrap();
        }
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.counts().messages, 1);
        assert!(matches!(q.show(torn), Err(Error::NotFound(_))));
        assert!(q.body(torn).is_err());
        assert!(q.body(QueueId(999)).is_err());
        assert_eq!(q.body(good).unwrap(), b"kept");
    }

    #[test]
    fn stale_due_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let id = q.new_id().unwrap();
        let e = env(&["x@l"]);
        q.enqueue(id, &e, b"m").unwrap();
        // A leftover entry at another time (an update interrupted by a crash).
        q.inner.due.insert(due_key(1, id), &[]).unwrap();
        let l = q.take_due(now_ms() + 1, 10).unwrap();
        assert_eq!(l.len(), 1, "handed out once, not twice");
        let later = now_ms() + 60_000;
        q.settle(id, &[(0, Outcome::Deferred("4.0.0 later".into()))], later)
            .unwrap();
        assert!(
            q.take_due(now_ms() + 1, 10).unwrap().is_empty(),
            "no hot retry through the stale key"
        );
        assert_eq!(q.take_due(later, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_crash_during_an_attempt_in_flight_does_not_retry_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let now = now_ms();
        {
            let q = Queue::open(dir.path()).unwrap();
            let id = q.new_id().unwrap();
            q.enqueue(
                id,
                &Envelope::new("a@x", vec![Recipient::new("b@y")], 1),
                b"x",
            )
            .unwrap();
            let l = q.take_due(now_ms() + 10, 10).unwrap();
            assert_eq!(l.len(), 1);
            q.mark_in_flight(&[id]).unwrap();
            // ...and the process dies here, before settling.
        }
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.recover_in_flight(60_000).unwrap(), 1);
        assert!(
            q.take_due(now + 1_000, 10).unwrap().is_empty(),
            "no hot retry"
        );
        assert_eq!(q.recover_in_flight(60_000).unwrap(), 0, "recovered once");
        let l = q.take_due(now_ms() + 60_000, 10).unwrap();
        assert_eq!(l.len(), 1);
        // Settling after such a move keeps the index consistent.
        assert!(matches!(
            q.settle(l[0].id, &[(0, Outcome::Delivered)], 0).unwrap(),
            Settled::Done(_)
        ));
        assert_eq!(q.next_due_ms().unwrap(), None);
    }

    /// The in-flight marker is durable through the journal alone: a crash right after it, with
    /// no checkpoint since the open, still pushes the message back.
    #[test]
    fn an_in_flight_marker_survives_a_crash_without_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let copy_files = |names: &[&str]| copy_files(dir.path(), copy.path(), names);
        let now = now_ms();
        {
            let q = Queue::open(dir.path()).unwrap();
            copy_files(&["db", "conf", "snap."]);
            let before = q.flush_stats();
            let id = q.new_id().unwrap();
            q.enqueue(id, &env(&["b@remote"]), b"x").unwrap();
            assert_eq!(q.take_due(now_ms() + 10, 10).unwrap().len(), 1);
            q.mark_in_flight(&[id]).unwrap();
            assert_eq!(q.flush_stats().checkpoints, before.checkpoints);
            copy_files(&[crate::journal::FILE_NAME]);
        }
        let q = Queue::open(copy.path()).unwrap();
        assert_eq!(q.recover_in_flight(60_000).unwrap(), 1);
        assert!(
            q.take_due(now + 1_000, 10).unwrap().is_empty(),
            "no hot retry"
        );
    }

    #[test]
    fn hold_release_delete() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let id = q.new_id().unwrap();
        q.enqueue(id, &env(&["x@l"]), b"m").unwrap();
        q.hold(id).unwrap();
        assert!(q.take_due(u64::MAX, 10).unwrap().is_empty());
        assert!(q.show(id).unwrap().held);
        q.release(id).unwrap();
        assert_eq!(q.take_due(now_ms() + 1, 10).unwrap().len(), 1);
        q.delete(id).unwrap();
        assert!(matches!(
            q.settle(id, &[(0, Outcome::Delivered)], 0).unwrap(),
            Settled::Gone
        ));
        assert!(matches!(q.show(id), Err(Error::NotFound(_))));
        assert_eq!(q.counts().messages, 0);
    }

    /// A crash right after enqueues were acknowledged, before any checkpoint: sled's files as
    /// of the last checkpoint (copied while it is quiet) plus the journal as written. Every
    /// acknowledged message is there after the restart.
    #[test]
    fn acknowledged_enqueues_survive_without_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let copy_files = |names: &[&str]| copy_files(dir.path(), copy.path(), names);
        let body = vec![b'x'; 150_000]; // several chunks
        let mut ids = Vec::new();
        {
            let q = Queue::open(dir.path()).unwrap();
            copy_files(&["db", "conf", "snap."]);
            let before = q.flush_stats();
            for _ in 0..20 {
                let id = q.new_id().unwrap();
                q.enqueue(id, &env(&["x@l", "y@l"]), &body).unwrap();
                ids.push(id);
            }
            assert_eq!(q.flush_stats().checkpoints, before.checkpoints);
            copy_files(&[crate::journal::FILE_NAME]);
        }
        let q = Queue::open(copy.path()).unwrap();
        assert_eq!(q.counts().messages, 20);
        for id in ids {
            assert_eq!(q.body(id).unwrap(), body);
            assert_eq!(q.show(id).unwrap().recipients.len(), 2);
        }
    }

    /// The point of the memtable: a message delivered before the next checkpoint is never
    /// written into sled, and one still queued at a checkpoint is.
    #[test]
    fn fresh_messages_reach_sled_only_if_still_queued_at_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let (a, b) = (q.new_id().unwrap(), q.new_id().unwrap());
        q.enqueue(a, &env(&["x@l"]), b"first").unwrap();
        q.enqueue(b, &env(&["y@l"]), b"second").unwrap();
        let i = &q.inner;
        assert!(i.env.is_empty() && i.body.is_empty() && i.due.is_empty());
        assert_eq!(q.show(a).unwrap().recipients[0].address, "x@l");
        assert_eq!(q.list(10).unwrap().len(), 2);
        let leases = q.take_due(now_ms() + 1, 1).unwrap();
        assert_eq!(leases[0].id, a, "oldest first");
        let s = q.settle(a, &[(0, Outcome::Delivered)], 0).unwrap();
        assert!(matches!(s, Settled::Done(_)));
        q.sync().unwrap();
        assert!(i.env.get(a.0.to_be_bytes()).unwrap().is_none());
        assert_eq!(q.body(b).unwrap(), b"second");
        assert!(
            i.env.get(b.0.to_be_bytes()).unwrap().is_some(),
            "b was spilled"
        );
        assert!(q.fresh().msgs.is_empty());
        // Taken from sled now, like any older message.
        let leases = q.take_due(now_ms() + 1, 10).unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].id, b);
        assert!(matches!(
            q.settle(b, &[(0, Outcome::Delivered)], 0).unwrap(),
            Settled::Done(_)
        ));
        assert_eq!(q.counts().messages, 0);
        assert!(i.env.is_empty() && i.body.is_empty() && i.due.is_empty());
    }

    /// With no further traffic, the journal still gets its checkpoint within about a second,
    /// and what was in memory goes into sled.
    #[test]
    fn a_quiet_second_ends_in_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let before = q.flush_stats().checkpoints;
        let id = q.new_id().unwrap();
        q.enqueue(id, &env(&["x@l"]), b"body").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.flush_stats().checkpoints == before {
            assert!(std::time::Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(q.fresh().msgs.is_empty());
        assert!(q.inner.env.get(id.0.to_be_bytes()).unwrap().is_some());
    }

    /// When delivery falls behind, the oldest waiting messages go into sled as new ones
    /// arrive, so the memtable stays bounded and the checkpoint has little left to write.
    #[test]
    fn a_backlog_moves_into_sled_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let trees = Trees {
            env: db.open_tree("queue.env").unwrap(),
            body: db.open_tree("queue.body").unwrap(),
            due: db.open_tree("queue.due").unwrap(),
        };
        let mut f = Fresh::default();
        let n = FRESH_WAITING_MAX as u64 + 3;
        for k in 0..n {
            let mut e = env(&["x@l"]);
            e.next_attempt_ms = 1_000 + k;
            let body = Arc::new(b"body".to_vec());
            f.insert(QueueId(100 + k), FreshMsg { env: e, body });
            trees.spill_backlog(&mut f);
        }
        assert_eq!(f.due.len(), FRESH_WAITING_MAX);
        assert_eq!(f.bytes, FRESH_WAITING_MAX * 4);
        let moved: Vec<u64> = trees
            .env
            .iter()
            .keys()
            .map(|k| u64::from_be_bytes(k.unwrap()[..].try_into().unwrap()))
            .collect();
        assert_eq!(moved, vec![100, 101, 102]);
        assert_eq!(trees.due.len(), 3);
        assert!(!f.msgs.contains_key(&QueueId(100)));
    }

    /// A deferred fresh message waits in sled with its new state; admin operations work on
    /// fresh messages as on any other.
    #[test]
    fn fresh_messages_can_be_deferred_held_released_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let id = q.new_id().unwrap();
        q.enqueue(id, &env(&["x@l", "y@l"]), b"body").unwrap();
        q.take_due(now_ms() + 1, 10).unwrap();
        let later = now_ms() + 60_000;
        let s = q
            .settle(
                id,
                &[
                    (0, Outcome::Delivered),
                    (1, Outcome::Deferred("4.4.1".into())),
                ],
                later,
            )
            .unwrap();
        assert!(matches!(s, Settled::Requeued(_)));
        assert!(q.fresh().msgs.is_empty());
        assert_eq!(q.show(id).unwrap().attempts, 1);
        assert_eq!(q.next_due_ms().unwrap(), Some(later));
        assert!(q.take_due(now_ms() + 1, 10).unwrap().is_empty());

        let other = q.new_id().unwrap();
        q.enqueue(other, &env(&["z@l"]), b"other").unwrap();
        q.hold(other).unwrap();
        assert!(q.take_due(now_ms() + 1, 10).unwrap().is_empty());
        let c = q.state_counts(now_ms() + 1).unwrap();
        assert_eq!((c.held, c.deferred, c.ready), (1, 1, 0));
        q.release(other).unwrap();
        assert_eq!(q.take_due(now_ms() + 1, 10).unwrap()[0].id, other);

        let third = q.new_id().unwrap();
        q.enqueue(third, &env(&["w@l"]), b"third").unwrap();
        assert_eq!(q.delete(third).unwrap().recipients[0].address, "w@l");
        assert!(q.show(third).is_err());
        assert_eq!(q.counts().messages, 2);
    }

    /// A crash after a fresh message was delivered but before the next checkpoint brings it
    /// back once (at-least-once; local delivery's dedupe key makes it exactly-once there).
    #[test]
    fn a_fresh_message_delivered_before_a_crash_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let id;
        {
            let q = Queue::open(dir.path()).unwrap();
            id = q.new_id().unwrap();
            q.enqueue(id, &env(&["x@l"]), b"body").unwrap();
            q.take_due(now_ms() + 1, 10).unwrap();
            q.settle(id, &[(0, Outcome::Delivered)], 0).unwrap();
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
                }
            }
        }
        let q = Queue::open(copy.path()).unwrap();
        assert_eq!(q.counts().messages, 1);
        assert_eq!(q.body(id).unwrap(), b"body");
    }

    #[test]
    fn concurrent_enqueues_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let before = q.flush_stats();
        std::thread::scope(|s| {
            for _ in 0..8 {
                let q = q.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        let id = q.new_id().unwrap();
                        q.enqueue(id, &env(&["x@l"]), b"body").unwrap();
                    }
                });
            }
        });
        let after = q.flush_stats();
        assert_eq!(q.counts().messages, 400);
        assert_eq!(after.waiters - before.waiters, 400);
        assert!(after.flushes - before.flushes <= 400);
    }
}
