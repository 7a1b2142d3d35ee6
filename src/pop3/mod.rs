//! POP3 gateway over the mailbox store (RFC 1939, 2449, 2595, 3206, 5034): pure parsing
//! ([`proto`]), a pure session state machine ([`session`]) and the tokio layer ([`listener`]).
//! The maildrop is the account's INBOX; deletions happen only at QUIT (UPDATE state).

pub mod listener;
pub mod proto;
pub mod session;
