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

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Callback run on the flusher thread once the write it follows is durable (or failed to be).
pub type Waiter = Box<dyn FnOnce(Result<(), Arc<std::io::Error>>) + Send + 'static>;

/// Handle to the flusher thread. Cloning shares the same thread.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Msg>,
    stats: Arc<Mutex<FlushStats>>,
    thread: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
}

/// Writes run on the flusher thread itself, right before the flush that makes them durable.
pub type Write = Box<dyn FnOnce() -> std::io::Result<()> + Send + 'static>;

enum Msg {
    Wait(Waiter),
    /// Perform the write, then wait like `Wait` (or fail at once if the write fails).
    WriteWait(Write, Waiter),
    Stop,
}

/// Runs a write on the flusher thread; a failed write is answered at once, outside the batch.
fn run_write(w: Write, waiter: Waiter, batch: &mut Vec<Waiter>) {
    match w() {
        Ok(()) => batch.push(waiter),
        Err(e) => waiter(Err(Arc::new(e))),
    }
}

/// Counters for metrics and benchmarks: how well writes are being batched.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushStats {
    /// Flush + fsync rounds performed.
    pub flushes: u64,
    /// Waiters acknowledged in total (>= flushes; the ratio is the batch size).
    pub waiters: u64,
}

impl GroupCommit {
    /// Starts the flusher for `db`, whose files live in `dir`.
    pub fn start(db: sled::Db, dir: &Path) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let stats = Arc::new(Mutex::new(FlushStats::default()));
        let mut syncer = FileSyncer::new(dir)?;
        let st = stats.clone();
        let handle = thread::Builder::new()
            .name(format!(
                "group-commit-{}",
                dir.file_name().and_then(|s| s.to_str()).unwrap_or("db")
            ))
            .spawn(move || {
                let mut stop = false;
                while !stop {
                    let mut batch = Vec::new();
                    match rx.recv() {
                        Ok(Msg::Wait(w)) => batch.push(w),
                        Ok(Msg::WriteWait(w, waiter)) => run_write(w, waiter, &mut batch),
                        Ok(Msg::Stop) | Err(_) => stop = true,
                    }
                    // Everything that queued up meanwhile rides this flush. No waiting for
                    // more: a lone writer pays no delay, and under load the queue refills
                    // while we flush (measured: lingering bought nothing but latency).
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            Msg::Wait(w) => batch.push(w),
                            Msg::WriteWait(w, waiter) => run_write(w, waiter, &mut batch),
                            Msg::Stop => stop = true,
                        }
                    }
                    let res = db
                        .flush()
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|_| syncer.sync())
                        .map_err(Arc::new);
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "group commit flush failed");
                    }
                    if let Ok(mut s) = st.lock() {
                        s.flushes += 1;
                        s.waiters += batch.len() as u64;
                    }
                    for w in batch {
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

    /// Queues `waiter` to be called after the next flush. Writes made before this call are
    /// covered by that flush.
    pub fn commit(&self, waiter: Waiter) {
        if let Err(mpsc::SendError(Msg::Wait(w))) = self.tx.send(Msg::Wait(waiter)) {
            w(Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            ))));
        }
    }

    /// Hands a write to the flusher thread, which performs it just before its next flush and
    /// then calls `waiter`. Why: sled's writers block (spin, then park) while the flusher rolls
    /// its I/O buffer; doing the hot-path writes on the flusher keeps that blocking off the
    /// async worker threads and removes contention between writers altogether.
    pub fn write_and_commit(&self, write: Write, waiter: Waiter) {
        if let Err(mpsc::SendError(Msg::WriteWait(_, w))) =
            self.tx.send(Msg::WriteWait(write, waiter))
        {
            w(Err(Arc::new(std::io::Error::other(
                "flusher thread has stopped",
            ))));
        }
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

    /// Flushes once more, stops the thread and waits for it, so the database can be reopened.
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
