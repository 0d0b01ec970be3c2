//! Reading a whole embedded data directory, row by row, for `postlog migrate` (which copies
//! it into another backend keeping every offset, checksum and id).

use std::path::{Path, PathBuf};

use postlog_proto::{BlobHash, LogOffset};
use rusqlite::{OpenFlags, params};

use crate::{AccountId, DeviceId, Result, StoreError};

/// A read-only view of an embedded data directory. Holds the directory's lock, so no
/// server can write while it is copied.
pub struct Export {
    _lock: std::fs::File,
    root: PathBuf,
    conn: rusqlite::Connection,
}

/// One log row exactly as stored (a scrubbed row has kind 255 and an empty body).
#[derive(Clone, Debug)]
pub struct ExportedRecord {
    pub offset: LogOffset,
    pub time_ms: u64,
    pub kind: i64,
    pub body: Vec<u8>,
    pub checksum: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct ExportedDevice {
    pub id: DeviceId,
    pub account_id: AccountId,
    pub name: String,
    pub secret_hash: Vec<u8>,
    pub created_ms: u64,
    pub revoked: bool,
}

/// One `relay_queue` row (see the relay module).
#[derive(Clone, Debug)]
pub struct ExportedQueueRow {
    pub account_id: AccountId,
    pub hash: Vec<u8>,
    pub recipient: String,
    pub send_offset: i64,
    pub sender: String,
    pub state: i64,
    pub attempts: i64,
    pub next_ms: i64,
    pub created_ms: i64,
    pub reply: String,
}

fn hash_of(bytes: Vec<u8>) -> Result<BlobHash> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(BlobHash)
        .map_err(|_| StoreError::Invalid {
            what: "hash column",
            why: format!("{} bytes instead of 32", bytes.len()),
        })
}

impl Export {
    /// Opens `root` read-only; fails with [`StoreError::Locked`] while a server runs on it.
    pub fn open(root: &Path) -> Result<Export> {
        let path = root.join("postlog.db");
        if !path.exists() {
            return Err(StoreError::io(&path, std::io::ErrorKind::NotFound.into()));
        }
        let lock = crate::store::lock_exclusive(root)?;
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(Export {
            _lock: lock,
            root: root.to_owned(),
            conn,
        })
    }

    /// `(id, name, created_ms)` of every account.
    pub fn accounts(&self) -> Result<Vec<(AccountId, String, u64)>> {
        Ok(self
            .conn
            .prepare("SELECT id, name, created_ms FROM accounts ORDER BY id")?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<_, _>>()?)
    }

    /// `(address, account id)` of every recorded address.
    pub fn addresses(&self) -> Result<Vec<(String, AccountId)>> {
        Ok(self
            .conn
            .prepare("SELECT address, account_id FROM addresses ORDER BY address")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    pub fn devices(&self) -> Result<Vec<ExportedDevice>> {
        Ok(self
            .conn
            .prepare(
                "SELECT id, account_id, name, secret_hash, created_ms, revoked FROM devices
                 ORDER BY id",
            )?
            .query_map([], |r| {
                Ok(ExportedDevice {
                    id: r.get::<_, i64>(0)? as u64,
                    account_id: r.get(1)?,
                    name: r.get(2)?,
                    secret_hash: r.get(3)?,
                    created_ms: r.get::<_, i64>(4)? as u64,
                    revoked: r.get::<_, i64>(5)? != 0,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The account's Head: the number of offsets its log has assigned.
    pub fn head(&self, account: AccountId) -> Result<LogOffset> {
        crate::store::head_from_db(&self.conn, account)
    }

    /// Up to `max` rows of the account's log from `from` on, scrubbed rows included.
    pub fn records(
        &self,
        account: AccountId,
        from: LogOffset,
        max: usize,
    ) -> Result<Vec<ExportedRecord>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT offset, time_ms, kind, body, checksum FROM log
                 WHERE account_id = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
            )?
            .query_map(params![account, from as i64, max as i64], |r| {
                Ok(ExportedRecord {
                    offset: r.get::<_, i64>(0)? as u64,
                    time_ms: r.get::<_, i64>(1)? as u64,
                    kind: r.get(2)?,
                    body: r.get(3)?,
                    checksum: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// `(hash, Store offset, size)` of every message the account holds.
    pub fn blobs(&self, account: AccountId) -> Result<Vec<(BlobHash, LogOffset, u64)>> {
        let rows: Vec<(Vec<u8>, i64, i64)> = self
            .conn
            .prepare("SELECT hash, offset, size FROM blobs WHERE account_id = ?1 ORDER BY offset")?
            .query_map([account], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(h, o, s)| Ok((hash_of(h)?, o as u64, s as u64)))
            .collect()
    }

    /// `(device, seq, offset)` of every recorded Tag operation.
    pub fn tag_ops(&self, account: AccountId) -> Result<Vec<(DeviceId, u64, LogOffset)>> {
        Ok(self
            .conn
            .prepare("SELECT device, seq, offset FROM tag_ops WHERE account_id = ?1")?
            .query_map([account], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<Result<_, _>>()?)
    }

    /// `(hash, offset)` of every live record that names a message.
    pub fn refs(&self, account: AccountId) -> Result<Vec<(BlobHash, LogOffset)>> {
        let rows: Vec<(Vec<u8>, i64)> = self
            .conn
            .prepare("SELECT hash, offset FROM refs WHERE account_id = ?1")?
            .query_map([account], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(h, o)| Ok((hash_of(h)?, o as u64)))
            .collect()
    }

    /// Deleted messages whose blob files were not removed yet.
    pub fn unlink_pending(&self) -> Result<Vec<(AccountId, Vec<u8>)>> {
        Ok(self
            .conn
            .prepare("SELECT account_id, hash FROM unlink_pending")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    pub fn relay_queue(&self) -> Result<Vec<ExportedQueueRow>> {
        Ok(self
            .conn
            .prepare(
                "SELECT account_id, hash, recipient, send_offset, sender, state, attempts,
                        next_ms, created_ms, reply FROM relay_queue",
            )?
            .query_map([], |r| {
                Ok(ExportedQueueRow {
                    account_id: r.get(0)?,
                    hash: r.get(1)?,
                    recipient: r.get(2)?,
                    send_offset: r.get(3)?,
                    sender: r.get(4)?,
                    state: r.get(5)?,
                    attempts: r.get(6)?,
                    next_ms: r.get(7)?,
                    created_ms: r.get(8)?,
                    reply: r.get(9)?,
                })
            })?
            .collect::<Result<_, _>>()?)
    }

    /// The verified bytes of a blob the directory holds.
    pub fn read_blob(&self, account: AccountId, hash: &BlobHash) -> Result<Option<Vec<u8>>> {
        crate::blobs::read_verified(&crate::blobs::blob_path(&self.root, account, hash), hash)
    }
}
