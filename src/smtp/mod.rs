//! Inbound SMTP (RFC 5321 and extensions): pure parsing ([`proto`]), a pure session state
//! machine ([`session`]) and the tokio layer ([`listener`]).

pub mod client;
pub mod listener;
pub mod proto;
pub mod session;
