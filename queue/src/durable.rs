//! Group commit over sled: the one place that makes writes durable.
//!
//! Why this exists (measured on our machines, see the README):
//! - sled 0.34's `flush()` ends in `sync_file_range`, which persists neither file metadata nor the
//!   device's write cache, and values over ~128 KiB are written to blob files that sled never
//!   fsyncs. So after `flush()` we `fdatasync` the log file, fsync any new blob files and the
//!   directories ourselves.
//! - Concurrent `flush_async` calls can deadlock (sled issue #1308). So exactly one thread flushes;
//!   everybody else queues a waiter and is called back when a flush that started *after* their
//!   write has completed. Many writers share one flush (group commit), which is what lets the
//!   queue accept far more messages per second than the disk does fsyncs.
//! - A sled flush costs ~0.9 ms here; enqueues therefore go through the [`journal`] (one
//!   `fdatasync` of a preallocated file, ~0.2 ms) and sled is flushed ("checkpointed") only when
//!   somebody waits for it, once a second, or when the journal is full. What was journaled stays
//!   in its owner's memory until a checkpoint asks for it ([`GroupCommit::on_checkpoint`]).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::journal::{self, Inserts, Journal};

/// Callback run on the flusher thread once the write it follows is durable (or failed to be).
pub type Waiter = Box<dyn FnOnce(Durable) + Send + 'static>;

/// What a [`Waiter`] is told.
pub type Durable = Result<(), Arc<std::io::Error>>;

/// Handle to the flusher thread. Cloning shares the same thread.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Msg>,
    stats: Arc<Mutex<FlushStats>>,
    thread: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
}

enum Msg {
    /// Call back after the next checkpoint (sled flush + fsyncs): covers every write made
    /// before, whoever made it.
    Wait(Waiter),
    /// Make the inserts durable through the journal (then hand them off, see
    /// [`Inserts::on_journaled`]), or put them into sled and checkpoint when one is due anyway;
    /// then call back.
    Journal(Inserts, Waiter),
    /// Run before every checkpoint's sled flush.
    Hook(CheckpointHook),
    Stop,
}

/// Writes what its owner keeps in memory on behalf of the journal into sled (see
/// [`GroupCommit::on_checkpoint`]).
pub type CheckpointHook = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// A checkpoint at least this often while the journal holds anything: bounds the replay after
/// a crash and the journal's size.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Counters for metrics and benchmarks: how well writes are being batched.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushStats {
    /// Durable rounds performed: journal writes plus checkpoints.
    pub flushes: u64,
    /// Of those, checkpoints (sled flush + fsyncs).
    pub checkpoints: u64,
    /// Waiters acknowledged in total (>= flushes; the ratio is the batch size).
    pub waiters: u64,
}

/// The flusher thread's state.
struct Flusher {
    db: sled::Db,
    syncer: FileSyncer,
    journal: Journal,
    last_checkpoint: Instant,
    hooks: Vec<CheckpointHook>,
}

impl Flusher {
    /// Journaled data held in memory goes into sled, then the marker (every record so far is
    /// in sled or obsolete), then sled flush and the fsyncs sled leaves out; after it the
    /// journal is obsolete.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        // Counted from the attempt: a failing disk gets one try a second, not a busy loop.
        self.last_checkpoint = Instant::now();
        for h in &mut self.hooks {
            h()?;
        }
        self.journal
            .mark(&self.db)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.db
            .flush()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.syncer.sync()?;
        self.journal.checkpointed();
        Ok(())
    }

    /// One durable round for everything that queued up: `journaled` gets each item's own
    /// result. Returns the round's result (for plain waiters) and whether it checkpointed.
    fn round(
        &mut self,
        wait: bool,
        journaled: Vec<(Inserts, Waiter)>,
    ) -> (Durable, bool, Vec<(Waiter, Durable)>) {
        let mut answers = Vec::with_capacity(journaled.len());
        let due = self.journal.dirty() && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
        if !wait && !due && !journaled.is_empty() {
            let refs: Vec<&Inserts> = journaled.iter().map(|(i, _)| i).collect();
            match self.journal.write(&refs) {
                Ok(true) => {
                    for (ins, w) in journaled {
                        let r = ins.hand_off(&self.db).map_err(|e| {
                            Arc::new(std::io::Error::other(format!("queue write failed: {e}")))
                        });
                        answers.push((w, r));
                    }
                    return (Ok(()), false, answers);
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "journal write failed; checkpointing"),
            }
        }
        // The checkpoint covers these inserts: into sled with them first.
        let mut pending = Vec::with_capacity(journaled.len());
        for (ins, w) in journaled {
            match ins.apply(&self.db) {
                Ok(()) => pending.push(w),
                Err(e) => answers.push((
                    w,
                    Err(Arc::new(std::io::Error::other(format!(
                        "queue write failed: {e}"
                    )))),
                )),
            }
        }
        let res = self.checkpoint().map_err(Arc::new);
        answers.extend(pending.into_iter().map(|w| (w, res.clone())));
        (res, true, answers)
    }
}

impl GroupCommit {
    /// Replays the journal into `db` (whose files live in `dir`), checkpoints, and starts the
    /// flusher.
    pub fn start(db: sled::Db, dir: &Path) -> std::io::Result<Self> {
        let (journal, recovered) = journal::recover(&db, dir)?;
        let mut f = Flusher {
            syncer: FileSyncer::new(dir)?,
            db,
            journal,
            last_checkpoint: Instant::now(),
            hooks: Vec::new(),
        };
        f.checkpoint()?;
        if recovered.replayed > 0 {
            tracing::info!(replayed = recovered.replayed, "journal replayed");
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let stats = Arc::new(Mutex::new(FlushStats::default()));
        let st = stats.clone();
        let handle = thread::Builder::new()
            .name(format!(
                "group-commit-{}",
                dir.file_name().and_then(|s| s.to_str()).unwrap_or("db")
            ))
            .spawn(move || {
                let mut stop = false;
                while !stop {
                    let mut waiters: Vec<Waiter> = Vec::new();
                    let mut journaled: Vec<(Inserts, Waiter)> = Vec::new();
                    let mut wait = false;
                    let mut take = |m: Msg, stop: &mut bool, f: &mut Flusher| match m {
                        Msg::Wait(w) => {
                            wait = true;
                            waiters.push(w);
                        }
                        Msg::Journal(ins, w) => journaled.push((ins, w)),
                        Msg::Hook(h) => f.hooks.push(h),
                        Msg::Stop => {
                            wait = true;
                            *stop = true;
                        }
                    };
                    // While the journal holds anything, a quiet second ends in a checkpoint
                    // anyway: it bounds what a crash replays (and re-sends) and the memory
                    // journaled data occupies.
                    let next = if f.journal.dirty() {
                        let left = CHECKPOINT_EVERY.saturating_sub(f.last_checkpoint.elapsed());
                        rx.recv_timeout(left)
                    } else {
                        rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                    };
                    match next {
                        Ok(m) => take(m, &mut stop, &mut f),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            take(Msg::Wait(Box::new(|_| {})), &mut stop, &mut f)
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            take(Msg::Stop, &mut stop, &mut f)
                        }
                    }
                    // Everything that queued up meanwhile rides this round. No waiting for
                    // more: a lone writer pays no delay, and under load the queue refills
                    // while we write (measured: lingering bought nothing but latency).
                    while let Ok(m) = rx.try_recv() {
                        take(m, &mut stop, &mut f);
                    }
                    if !wait && journaled.is_empty() {
                        continue;
                    }
                    let acked = waiters.len() + journaled.len();
                    let (res, checkpointed, answers) = f.round(wait, journaled);
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "group commit failed");
                    }
                    if let Ok(mut s) = st.lock() {
                        s.flushes += 1;
                        s.checkpoints += checkpointed as u64;
                        s.waiters += acked as u64;
                    }
                    for (w, r) in answers {
                        w(r);
                    }
                    for w in waiters {
                        w(res.clone());
                    }
                }
            })?;
        Ok(GroupCommit {
            tx,
            stats,
            thread: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// Queues `waiter` to be called after the next checkpoint. Writes made before this call
    /// are covered by it.
    pub fn commit(&self, waiter: Waiter) {
        if let Err(mpsc::SendError(Msg::Wait(w))) = self.tx.send(Msg::Wait(waiter)) {
            w(Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            ))));
        }
    }

    /// Hands inserts to the flusher thread, which makes them durable in its next round
    /// (usually one journal `fdatasync`) and hands them off (see [`Inserts::on_journaled`]),
    /// then calls `waiter`. Why on the flusher: sled's writers block (spin, then park) while
    /// its I/O buffer rolls; whatever sled writes there are stay off the async worker threads.
    pub fn journal_commit(&self, inserts: Inserts, waiter: Waiter) {
        if let Err(mpsc::SendError(Msg::Journal(_, w))) =
            self.tx.send(Msg::Journal(inserts, waiter))
        {
            w(Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            ))));
        }
    }

    /// [`GroupCommit::journal_commit`], blocking the calling thread until the inserts are
    /// durable and handed off.
    pub fn journal_commit_blocking(&self, inserts: Inserts) -> Durable {
        let (tx, rx) = mpsc::sync_channel(1);
        self.journal_commit(
            inserts,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or_else(|_| {
            Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            )))
        })
    }

    /// Registers `hook` to run before every checkpoint's sled flush, on the flusher thread:
    /// it writes into sled whatever its owner holds in memory on behalf of journal records
    /// (see [`Inserts::on_journaled`]). A failing hook fails the checkpoint. Registered
    /// before any later message to the flusher is handled.
    pub fn on_checkpoint(&self, hook: CheckpointHook) {
        let _ = self.tx.send(Msg::Hook(hook));
    }

    /// Blocks the calling thread until everything written before the call is durable.
    pub fn commit_blocking(&self) -> Result<(), Arc<std::io::Error>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commit(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().unwrap_or_else(|_| {
            Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            )))
        })
    }

    /// Checkpoints once more, stops the thread and waits for it, so the database can be
    /// reopened.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        let handle = self.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    pub fn stats(&self) -> FlushStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// fsyncs what sled leaves unsynced: the log file, new blob files and the directories.
struct FileSyncer {
    dir: PathBuf,
    log: File,
    synced_blobs: HashSet<std::ffi::OsString>,
    /// Modification time of `blobs/` at the last scan, and when that scan began.
    blobs_mtime: Option<std::time::SystemTime>,
    scanned_at: std::time::SystemTime,
}

impl FileSyncer {
    fn new(dir: &Path) -> std::io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        // The files sled created at open must be reachable after a crash.
        File::open(dir)?.sync_all()?;
        Ok(FileSyncer {
            dir: dir.to_path_buf(),
            log,
            synced_blobs: HashSet::new(),
            blobs_mtime: None,
            scanned_at: std::time::UNIX_EPOCH,
        })
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blobs = self.dir.join("blobs");
        let mut new_blob = false;
        // One stat per flush; the directory is listed only when it may have changed. Inode
        // times are coarse (a few ms), so an unchanged mtime proves nothing unless it is well
        // before the previous scan began.
        let mtime = std::fs::metadata(&blobs).and_then(|m| m.modified()).ok();
        if let (Some(m), Some(prev)) = (mtime, self.blobs_mtime)
            && m == prev
            && m + Duration::from_millis(50) < self.scanned_at
        {
            return Ok(());
        }
        self.blobs_mtime = mtime;
        self.scanned_at = std::time::SystemTime::now();
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut present = HashSet::new();
            for e in entries.flatten() {
                let name = e.file_name();
                if !self.synced_blobs.contains(&name) {
                    // A blob may be removed by sled's GC between readdir and open: skip it.
                    if let Ok(f) = File::open(e.path()) {
                        f.sync_all()?;
                        new_blob = true;
                    }
                }
                present.insert(name);
            }
            self.synced_blobs = present;
        }
        if new_blob {
            File::open(&blobs)?.sync_all()?;
        }
        Ok(())
    }
}

/// Opens a sled database tuned for the queue and starts its flusher.
pub fn open_db(path: &Path) -> Result<(sled::Db, GroupCommit), crate::Error> {
    let db = sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        // sled's own background flush; ours (group commit) is what acknowledgements wait for.
        .flush_every_ms(Some(1000))
        .open()?;
    let commit = GroupCommit::start(db.clone(), path)?;
    Ok((db, commit))
}

/// Bodies are stored in chunks below sled's blob threshold so they land in the log file, which
/// we fsync, rather than in one blob file per value.
pub const CHUNK: usize = 64 * 1024;

/// Key of chunk `n` of the value stored under `prefix`.
pub fn chunk_key(prefix: &[u8], n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 4);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Reads a chunked value back; `None` when absent.
pub fn read_chunked(tree: &sled::Tree, prefix: &[u8]) -> sled::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut any = false;
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv?;
        if k.len() != prefix.len() + 4 {
            continue;
        }
        any = true;
        out.extend_from_slice(&v);
    }
    Ok(any.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round that must checkpoint anyway (somebody waits for one) puts journaled inserts
    /// straight into sled, decoded from their journal encoding, and drops their hook unrun.
    #[test]
    fn a_checkpoint_round_puts_journaled_inserts_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (journal, _) = journal::recover(&db, dir.path()).unwrap();
        let mut f = Flusher {
            syncer: FileSyncer::new(dir.path()).unwrap(),
            db: db.clone(),
            journal,
            last_checkpoint: Instant::now(),
            hooks: Vec::new(),
        };
        let t = db.open_tree("t").unwrap();
        let mut ins = Inserts::new();
        ins.insert(&t, b"k", &[7u8; 3000]);
        ins.insert(&t, b"k2", b"");
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        ins.on_journaled(Box::new(move || {
            r.store(true, std::sync::atomic::Ordering::SeqCst)
        }));
        let (res, checkpointed, answers) = f.round(true, vec![(ins, Box::new(|_| {}))]);
        assert!(res.is_ok() && checkpointed);
        assert!(answers.iter().all(|(_, r)| r.is_ok()));
        assert_eq!(t.get(b"k").unwrap().unwrap().len(), 3000);
        assert_eq!(t.get(b"k2").unwrap().unwrap().len(), 0);
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
