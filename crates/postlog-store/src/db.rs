//! The SQLite schema and connection setup.

use std::path::Path;

use rusqlite::Connection;

use crate::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id)
);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
-- The metadata log. body is the record's CBOR (docs/PROTOCOL.md); checksum is the first
-- 8 bytes of BLAKE3(account_id LE64 || offset LE64 || body), so a record that is damaged
-- or moved is detected. A scrubbed record keeps its row (and time_ms) with kind = 255 and
-- an empty body. kind: 0 Store, 1 Send, 2 Tags, 3 Scrub, 4 TagSnapshot.
CREATE TABLE IF NOT EXISTS log (
    account_id INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    body BLOB NOT NULL,
    checksum BLOB NOT NULL,
    PRIMARY KEY (account_id, offset)
) WITHOUT ROWID;
-- Derived from the log: which messages an account holds, at which Store offset.
CREATE TABLE IF NOT EXISTS blobs (
    account_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (account_id, hash)
) WITHOUT ROWID;
-- Derived from the log: which (device, seq) Tag operations are recorded, for idempotency.
CREATE TABLE IF NOT EXISTS tag_ops (
    account_id INTEGER NOT NULL,
    device INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (account_id, device, seq)
) WITHOUT ROWID;
-- Derived from the log: every live record that refers to a message (Store, Send, Tags,
-- TagSnapshot), so that Delete and compaction find them without a scan. A scrubbed
-- record's row is deleted with it.
CREATE TABLE IF NOT EXISTS refs (
    account_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (account_id, hash, offset)
) WITHOUT ROWID;
-- Blob files of deleted messages, written in the Scrub's transaction and removed once the
-- file is unlinked (finished at the next start after a crash).
CREATE TABLE IF NOT EXISTS unlink_pending (
    account_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (account_id, hash)
) WITHOUT ROWID;
";

pub(crate) fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL with synchronous=FULL fsyncs the WAL on every commit: a committed record survives
    // power loss. (NORMAL, the WAL default, does not.)
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted content (scrubbed records, index rows of deleted messages) is overwritten
    // with zeros instead of lingering in free space; with a TRUNCATE checkpoint after each
    // scrub, no trace of a deleted message stays in the database files.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

pub fn checksum(account: i64, offset: u64, body: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&account.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(body);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Kind number stored for a scrubbed (emptied) record.
pub const KIND_SCRUBBED: i64 = 255;
