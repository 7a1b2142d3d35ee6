//! Delivery: the runner that takes due work from the queue, and the [`Delivery`] trait behind
//! which each transport sits (local mailbox store, remote SMTP, test doubles).
//!
//! The queue knows nothing of transports; the runner routes each pending recipient (local
//! domain or not), hands batches to a transport, and reports per-recipient outcomes back to the
//! queue (KumoMTA's split of storage from dispatch, chasquid's courier trait).

pub mod dsn;
pub mod local;
pub mod mx;
pub mod remote;
pub mod runner;

use postrider_queue::{Envelope, Outcome, QueueId};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// One message's worth of work for a transport.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: QueueId,
    pub envelope: Envelope,
    /// Indexes into `envelope.recipients` this transport is asked to deliver.
    pub rcpts: Vec<usize>,
    pub body: Arc<Vec<u8>>,
}

/// Per-recipient outcomes for one job, in any order.
pub type JobResult = Vec<(usize, Outcome)>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A transport. Batches let a transport share costs (the local store syncs once per batch).
pub trait Delivery: Send + Sync {
    /// Delivers every job; returns one result per job, in the same order.
    fn deliver(&self, jobs: Vec<Job>) -> BoxFuture<Vec<JobResult>>;
}
