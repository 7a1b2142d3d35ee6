//! postrider: a high-throughput SMTP relay and mailbox server.
//!
//! # Layout (the data flow, in folder order)
//! - [`smtp`]: inbound SMTP. `proto` parses (pure), `session` decides (pure state machine),
//!   `listener` moves bytes (tokio + TLS) and enqueues durably.
//! - `postrider-queue` (the `queue/` crate): the durable queue with group commit.
//! - [`delivery`]: the runner that leases due work and the transports behind the `Delivery`
//!   trait (`local`: the mailbox store).
//! - [`store`]: accounts, aliases, mailboxes, messages: what POP3/IMAP will serve.
//! - [`pop3`]: the POP3 gateway over the store (same layering as SMTP).
//! - [`http`]: Prometheus metrics and the admin API; [`cli`] is its client.
//! - [`config`], [`tls`], [`metrics`], [`server`] (start-up and shutdown).

pub mod cli;
pub mod config;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod net;
pub mod pop3;
pub mod server;
pub mod smtp;
pub mod store;
pub mod tls;
