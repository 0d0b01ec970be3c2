//! Postlog storage for several stateless server nodes: the logs, their indexes, accounts,
//! devices and the relay queue in PostgreSQL; blobs in S3-compatible object storage.
//!
//! [`PgStore`] implements the same [`Backend`](postlog_store::Backend) as the embedded
//! store, with the same contract (docs/DEPLOYMENT.md):
//! - Offsets are gap-free under concurrency from any number of nodes: an append locks its
//!   account's `heads` row (`FOR UPDATE`, accounts of a group in id order), so appends to
//!   one account serialise across nodes and commit in offset order.
//! - Order: blob object written (S3 PUT acknowledged) -> records committed -> acknowledge.
//!   A crash in between leaves at most an object no row names; [`PgStore::collect_garbage`]
//!   removes those.
//! - Push across nodes: each commit sends `NOTIFY postlog_heads, '<account>:<head>'`
//!   inside its transaction; every node LISTENs and wakes its Log streams.
//! - The SQL rules (records, checksums, tag state, account names) are postlog-store's
//!   [`kit`](postlog_store::kit), so a record means the same thing in both backends.
//!
//! Threads: all PostgreSQL work runs on threads this crate owns (a small pool for reads,
//! one writer per node, one listener), and S3 calls on its own tokio runtime, so the
//! blocking [`Backend`](postlog_store::Backend) calls are safe from any caller.

mod admin;
mod backend;
mod migrate;
mod objects;
mod pool;
mod relay;
mod schema;
mod scrub;
mod verify;
mod writer;

pub use backend::PgStore;
pub use migrate::{MigrateProgress, MigrateReport};

use postlog_store::StoreError;
use serde::{Deserialize, Serialize};

/// `[storage]` of the server's postlog.toml when `backend = "postgres"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PgSettings {
    /// A libpq connection string (`host=db.example port=5432 user=postlog dbname=postlog`)
    /// or URL (`postgresql://postlog@db.example/postlog`).
    pub postgres: String,
    /// PostgreSQL connections for reads on this node (the writer and the listener have one
    /// each besides).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    pub s3: S3Settings,
}

fn default_pool_size() -> usize {
    8
}

/// `[storage.s3]`: the bucket holding every blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// `https://s3.example.org` (path-style requests); empty for AWS itself.
    #[serde(default)]
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Prepended to every object key, e.g. `postlog/` to share a bucket.
    #[serde(default)]
    pub prefix: String,
    /// Allow a plain-http endpoint (loopback, tests). Off by default.
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// What went wrong inside this crate; converted to [`StoreError`] at the trait boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("PostgreSQL: {0}")]
    Pg(#[from] postgres::Error),
    #[error("object storage: {0}")]
    Objects(#[from] object_store::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(s) => s,
            Error::Pg(e) => StoreError::Remote {
                engine: "PostgreSQL",
                why: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.to_string()),
            },
            Error::Objects(e) => StoreError::Remote {
                engine: "object storage",
                why: e.to_string(),
            },
            Error::Other(why) => StoreError::Remote {
                engine: "storage",
                why,
            },
        }
    }
}

pub(crate) type R<T> = std::result::Result<T, Error>;

/// A column of a row, as a [`StoreError`] instead of a panic when the type is wrong.
pub(crate) fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> R<T> {
    Ok(row.try_get(i)?)
}

/// A 32-byte hash column.
pub(crate) fn hash_col(row: &postgres::Row, i: usize) -> R<postlog_proto::BlobHash> {
    let b: &[u8] = row.try_get(i)?;
    <[u8; 32]>::try_from(b)
        .map(postlog_proto::BlobHash)
        .map_err(|_| Error::Other(format!("a hash column holds {} bytes", b.len())))
}
