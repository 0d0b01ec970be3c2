//! SMTP and LMTP server sessions without I/O, for Postlog's mail listeners.
//!
//! - [`Session`]: the state machine of one connection. It takes bytes as they arrive and
//!   returns [`Event`]s (a recipient to look up, message bytes to store, a message to make
//!   durable, STARTTLS, close) and queues the replies. It never blocks, reads a clock or
//!   touches a socket: the server's listener drives it, and tests and the fuzzer feed it
//!   bytes directly.
//! - [`received`]: the `Return-Path` and `Received` header fields added on delivery.
//! - [`limits`]: every named limit (line length, address length, recipients, errors, and
//!   the time limits the driver enforces).
//!
//! Rules it keeps (docs/DELIVERY.md):
//! - Only CRLF `.` CRLF ends DATA. A bare LF or bare CR never ends it and never starts a
//!   line; a message containing either is read to its real end and rejected whole with
//!   `554 5.6.0` (no SMTP smuggling: what follows a bare-LF dot is never taken as a
//!   command). Command lines must end in CRLF too.
//! - Dot-unstuffing per RFC 5321 §4.5.2; the message handed out is exactly the bytes the
//!   client meant, CRLF line endings included.
//! - PIPELINING: commands are answered strictly in order; replies collect in the output
//!   until the driver writes them.
//! - LMTP (RFC 2033): one reply per accepted recipient after DATA.

pub mod limits;
pub mod received;

mod command;
mod session;

pub use session::{Config, Event, Outcome, Protocol, Session, Verdict, busy_reply};

#[cfg(test)]
mod tests;
