//! Every named limit of an SMTP or LMTP session. Each has a test that crosses it.
//!
//! The session enforces the byte and count limits itself; the time limits need a clock, so
//! the driver (the server's listener) enforces them with these values.

use std::time::Duration;

/// Longest command line, CRLF included. RFC 5321 §4.5.3.1.4 allows 512 octets for a command
/// line plus what extensions add (SMTPUTF8 addresses, MAIL parameters): 2048 leaves room
/// for all of that. A longer line is answered `500 5.5.2` and discarded up to its LF.
pub const MAX_LINE_LEN: usize = 2048;
/// Longest address in MAIL FROM or RCPT TO, in bytes (RFC 5321 §4.5.3.1.3: 256 octets).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Default most recipients of one message (RFC 5321 §4.5.3.1.8 asks for at least 100).
/// The 1001st gets `452 4.5.3`, and the client sends the rest in another transaction.
pub const MAX_RECIPIENTS: usize = 1000;
/// Most rejected commands in one session before it is closed with `421 4.7.0`.
pub const MAX_ERRORS: usize = 20;
/// Longest HELO/EHLO/LHLO argument kept for the Received header; longer ones are cut.
pub const MAX_HELO_LEN: usize = 255;
/// Longest wait for the next command or the next chunk of DATA (RFC 5321 §4.5.3.2.7
/// asks for at least 5 minutes).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Longest session, from the greeting to the last reply. Long enough for a 64 MiB message
/// over a slow link, short enough that a slow-drip client cannot hold a slot for hours.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
