//! The Postlog wire protocol, sans-IO.
//!
//! This crate knows the bytes and nothing else: no sockets, no tokio, no files, no clock.
//! Everything that reads peer or disk input lives here, so it can be fuzzed and tested
//! without I/O.
//!
//! - [`types`]: [`BlobHash`] (BLAKE3-256 of a message's bytes) and [`LogOffset`].
//! - [`message`]: [`Request`], [`Response`], [`Record`] and [`LogEntry`], with their CBOR
//!   encoding. One encoder and one decoder per type; `docs/PROTOCOL.md` specifies them in CDDL.
//! - [`frame`]: the length-prefixed framing of every control message on a QUIC stream.
//! - [`limits`]: every named limit on peer input.
//! - [`tags`]: the tag CRDT ([`tags::TagState`]): how Store and Tags records set a message's
//!   tags on every replica.
//! - [`error`]: [`ErrorCode`] (sent to peers) and [`DecodeError`] (what a decoder rejects).
//!
//! Message bodies (Store, Fetch, inline Log blobs) are not framed: a frame announces their
//! size and the raw bytes follow on the same stream.

pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod tags;
pub mod types;

pub use error::{DecodeError, ErrorCode};
pub use message::{LogEntry, Record, Request, Response};
pub use types::{BlobHash, LogOffset};

/// The ALPN protocol id. The trailing number is the protocol version: a server that
/// speaks versions 1 and 2 offers both ids and TLS picks the highest the client offers.
pub const ALPN: &[u8] = b"postlog/1";
