//! Server storage for Postlog: per-account metadata logs, a content-addressed blob store,
//! accounts and devices. Embedded, no external service.
//!
//! - [`Store`]: the embedded backend. The log, its indexes, accounts and devices live in one
//!   SQLite database (`postlog.db`, WAL, `synchronous=FULL`); blobs are files under
//!   `blobs/<account>/<2 hex>/<64 hex>`. One writer thread owns all log writes and commits
//!   them in groups (group commit): every waiting append shares one transaction and fsync.
//! - [`BlobWriter`] stages an incoming message in `tmp/` while hashing it; [`Store::append`]
//!   makes it durable, appends its record, and only then reports success.
//! - [`Backend`]: the storage trait the server is written against, so that other backends
//!   (PostgreSQL + object storage) can come later without touching the request handlers.
//! - [`verify`]: checks every record checksum and every blob hash.
//! - [`kit`]: the record, checksum, tag-state and account rules every backend shares (the
//!   PostgreSQL + S3 backend, `postlog-store-pg`, is built on them); [`Export`] reads an
//!   embedded data directory for `postlog migrate`.
//!
//! Durability order (docs/DURABILITY.md): blob written -> rename -> one syncfs barrier per
//! group -> record commit (WAL fsync) -> acknowledge. A failed barrier or commit stops writes.

mod accounts;
mod blobs;
mod db;
mod export;
pub mod kit;
mod relay;
mod scrub;
mod store;
mod verify;

pub use accounts::{AccountId, Accounts, DeviceCredentials, DeviceId, DeviceInfo};
pub use blobs::{BlobWriter, StagedBlob};
pub use export::{Export, ExportedDevice, ExportedQueueRow, ExportedRecord};
pub use relay::{BOUNCED_TAG, DELIVERED_TAG, Delivery, QueuedSend, RecipientReport, SENT_TAGS};
pub use scrub::MessageSummary;
pub use store::{Appended, Backend, HeadWatcher, NewRecord, SERVER_DEVICE, Store};
pub use verify::{VerifyReport, verify};

use std::path::PathBuf;

/// What went wrong in storage. `Fatal` errors stop all writes until restart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("storage stopped after a failed fsync or commit; restart the server to recover: {0}")]
    Stopped(String),
    #[error("{0} is in use by another postlog process (a running server)")]
    Locked(PathBuf),
    #[error("no such account: {0}")]
    NoSuchAccount(String),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("blob {0} failed verification against its hash")]
    CorruptBlob(postlog_proto::BlobHash),
    #[error("record at offset {offset} of account {account} is corrupt: {why}")]
    CorruptRecord {
        account: String,
        offset: u64,
        why: String,
    },
    #[error("no message {0} in this account")]
    NoSuchMessage(postlog_proto::BlobHash),
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// An external engine (PostgreSQL, object storage) failed or could not be reached.
    #[error("{engine}: {why}")]
    Remote { engine: &'static str, why: String },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub(crate) fn fsync_dir(path: &std::path::Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(path, e))
}
