//! postrider's durable message queue.
//!
//! The queue knows nothing of SMTP or of how mail is delivered: it stores an envelope (sender,
//! recipients with per-recipient state, DSN parameters, times) and a body, keeps a time-ordered
//! index of due work, and hands out leases on due messages to a delivery runner that reports
//! per-recipient outcomes back.
//!
//! # Layout
//! - [`durable`]: group commit (one flusher thread, fsync of what sled leaves unsynced).
//! - [`journal`]: the enqueue journal that lets most group commits be one `fdatasync`.
//! - [`spool`]: the [`Queue`] itself: fresh messages in memory, sled trees, enqueue, leases,
//!   admin operations.
//! - [`schedule`]: the pure retry policy (next attempt time with jitter).
//!
//! The storage engine (sled 0.34) is hidden behind [`Queue`]'s API so it can be swapped.

pub mod durable;
pub mod journal;
pub mod schedule;
pub mod spool;

pub use spool::{Queue, QueueCounts, StateCounts};

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// Queue id: a persistent, monotonic 64-bit number, shown as 16 upper-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueId(pub u64);

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl std::str::FromStr for QueueId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        u64::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| Error::BadId(s.to_string()))
    }
}

/// RFC 3461 §4.3 RET parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Hdrs,
}

/// Per-recipient delivery state. A recipient with `Pending` state and a `last_error` has been
/// deferred at least once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward path as given in RCPT TO (without angle brackets).
    pub address: String,
    /// RFC 3461 ORCPT (`addr-type;xtext`), kept verbatim for the DSN.
    #[serde(default)]
    pub orcpt: Option<String>,
    /// RFC 3461 NOTIFY values (`NEVER` or any of `SUCCESS`, `FAILURE`, `DELAY`); empty = default.
    #[serde(default)]
    pub notify: Vec<String>,
    pub state: RcptState,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Self {
        Recipient {
            address: address.into(),
            orcpt: None,
            notify: Vec::new(),
            state: RcptState::Pending,
            attempts: 0,
            last_error: None,
        }
    }
}

/// Everything about a message except its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse path without brackets; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// RFC 3461 RET.
    #[serde(default)]
    pub ret: Option<Ret>,
    /// RFC 3461 ENVID (xtext, kept verbatim).
    #[serde(default)]
    pub envid: Option<String>,
    /// Arrival time, ms since the Unix epoch.
    pub arrival_ms: u64,
    /// Next time the runner should look at the message, ms since the epoch.
    pub next_attempt_ms: u64,
    /// Delivery rounds made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Held messages are never handed out until released.
    #[serde(default)]
    pub held: bool,
    /// Body size in octets.
    pub size: u64,
    /// The client declared SMTPUTF8 (RFC 6531): a next hop without it cannot take the message
    /// when an address or header needs UTF-8.
    #[serde(default)]
    pub smtputf8: bool,
    /// RFC 6152 BODY parameter as declared (`7BIT`, `8BITMIME`), passed on to the next hop.
    #[serde(default)]
    pub body_type: Option<String>,
    /// A delay warning DSN has been sent (it is sent once).
    #[serde(default)]
    pub delay_warned: bool,
    /// Free-form facts for logs and `queue show` (client address, HELO, authenticated user...).
    #[serde(default)]
    pub info: std::collections::BTreeMap<String, String>,
}

impl Envelope {
    pub fn new(sender: impl Into<String>, recipients: Vec<Recipient>, size: u64) -> Self {
        let now = now_ms();
        Envelope {
            sender: sender.into(),
            recipients,
            ret: None,
            envid: None,
            arrival_ms: now,
            next_attempt_ms: now,
            attempts: 0,
            held: false,
            size,
            smtputf8: false,
            body_type: None,
            delay_warned: false,
            info: Default::default(),
        }
    }

    /// Recipients still waiting for delivery.
    pub fn pending(&self) -> impl Iterator<Item = (usize, &Recipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
    }
}

/// A message handed to a delivery runner. Until it is settled, nobody else gets it; after a
/// crash it is due again (leases are not persisted).
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: QueueId,
    pub envelope: Envelope,
}

/// What happened to one recipient in a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered into a mailbox, or accepted by a next hop that takes over the DSN duties.
    Delivered,
    /// Accepted by a next hop that does not support DSN (RFC 3461 §4.1): a sender who asked
    /// for NOTIFY=SUCCESS gets a "relayed" DSN from us. The queue treats it as `Delivered`.
    Relayed,
    /// Temporary failure: try again at the next attempt time.
    Deferred(String),
    /// Permanent failure: the recipient is done (a bounce is the caller's business).
    Failed(String),
}

/// Result of settling a lease.
#[derive(Debug, Clone)]
pub enum Settled {
    /// Every recipient reached a final state; the message was removed. The envelope is returned
    /// so the caller can bounce failed recipients.
    Done(Envelope),
    /// Some recipients are still pending; the message is due again at `next_attempt_ms`.
    Requeued(Envelope),
    /// The message was deleted while it was being delivered.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("queue flush failed: {0}")]
    Flush(#[from] std::sync::Arc<std::io::Error>),
    #[error("queue I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt envelope for {id}: {source}")]
    Corrupt {
        id: QueueId,
        source: serde_json::Error,
    },
    #[error("no such message: {0}")]
    NotFound(QueueId),
    #[error("not a queue id: {0:?}")]
    BadId(String),
    #[error("recipient index {index} out of range for {id}")]
    BadRecipient { id: QueueId, index: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
