//! Postlog's benchmarks and what they share.
//!
//! - [`corpus`]: the deterministic, realistic mail corpus of the `postlog-sample` crate,
//!   re-exported. The store benchmark, the sync benchmark against IMAP peers and
//!   `postlog demo` all use it, so a seed and a count name the same mailbox everywhere.
//! - [`stats`]: latency percentiles as the benchmarks report them.
//!
//! The binaries live in `src/bin/`: `store-throughput` measures the server's Store path
//! (messages/s, MB/s, acknowledgement latency) over loopback QUIC. `README.md` in this
//! directory says how to run each one and what it measures.

pub use postlog_sample as corpus;
pub mod stats;

pub use postlog_sample::{generate, message, write_maildir};
pub use stats::LatencySummary;
