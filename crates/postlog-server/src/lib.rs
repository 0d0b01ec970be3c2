//! The Postlog server: a QUIC endpoint serving accounts' logs and blobs.
//!
//! - [`config`]: the one TOML file (`DATA/postlog.toml`), created with comments on first start.
//! - [`tls`]: the server certificate (self-signed on first start) and rustls/quinn config.
//! - [`Server`]: binds the endpoint and serves connections; each connection authenticates on
//!   its first stream, then every other stream carries one request ([`handlers`]).
//! - [`push::Heads`]: per-account Head watch channels; the store's writer publishes each
//!   group commit, and every open Log stream of that account wakes and sends the new records.
//! - `smtp`: the LMTP (TCP, Unix socket) and SMTP (STARTTLS) listeners. Each connection
//!   drives a sans-IO `postlog_smtp::Session`; messages are appended as Store records
//!   through the same `Backend` as QUIC Stores, so watching clients get them pushed.
//! - `relay`: the outbound relay worker. A Send request queues the message (store); this
//!   task relays due messages over SMTP (lettre), retries with backoff, and records each
//!   attempt, bounces (RFC 3464) and the final `delivered`/`bounced` tags through the store.
//!
//! - [`throttle`]: sans-IO bookkeeping of failed logins per address prefix and per account
//!   (`[auth]` in postlog.toml); `server` asks it before checking a secret and for when to
//!   answer a failure.
//!
//! Architecture invariant: handlers never touch files or SQLite directly; they go through
//! [`postlog_store::Backend`], on blocking threads.

pub mod config;
mod handlers;
pub mod push;
mod relay;
mod retention;
mod server;
mod smtp;
pub mod storage;
pub mod throttle;
pub mod tls;

pub use config::ServerConfig;
pub use server::{LOCK_WAIT, Server, ServerError, StartOptions};
pub use smtp::TLS_HANDSHAKE_TIMEOUT;
