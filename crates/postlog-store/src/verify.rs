//! `postlog verify`: checks every record and every blob of a data directory.

use std::path::Path;

use postlog_proto::{BlobHash, Record};
use rusqlite::OpenFlags;

use crate::blobs::blob_path;
use crate::db::{self, KIND_SCRUBBED};
use crate::{Result, StoreError};

/// What verification found. `problems` empty means the data directory is sound.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub accounts: u64,
    pub records: u64,
    pub scrubbed: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The checks every log row gets, in offset order, in every backend's verify: offsets
/// gap-free from 0, checksum, scrubbed rows counted, the body decodes.
#[derive(Debug, Default)]
pub struct RowCheck {
    /// The offset the next row should have (after the last row: the log's length).
    pub expect: u64,
}

impl RowCheck {
    /// Checks one row, recording problems and counts in `report`. The record if the row is
    /// live and sound (then the caller checks what it refers to).
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &mut self,
        report: &mut VerifyReport,
        name: &str,
        account: i64,
        offset: u64,
        kind: i64,
        body: &[u8],
        sum: &[u8],
    ) -> Option<Record> {
        let mut problem = |what: String| {
            report
                .problems
                .push(format!("account {name}, offset {offset}: {what}"))
        };
        if offset != self.expect {
            problem(format!("gap: expected offset {}", self.expect));
        }
        self.expect = offset + 1;
        report.records += 1;
        if sum != db::checksum(account, offset, body) {
            problem("record checksum mismatch".into());
            return None;
        }
        if kind == KIND_SCRUBBED {
            report.scrubbed += 1;
            return None;
        }
        match Record::decode(body) {
            Ok(r) => Some(r),
            Err(e) => {
                problem(format!("record does not decode: {e}"));
                None
            }
        }
    }
}

/// Reads every record (offsets gap-free from 0, checksum, decodable) and every blob a
/// Store record names (present, hash matches, indexed), and runs SQLite's integrity check.
pub fn verify(root: &Path) -> Result<VerifyReport> {
    let path = root.join("postlog.db");
    if !path.exists() {
        return Err(StoreError::io(&path, std::io::ErrorKind::NotFound.into()));
    }
    let conn = rusqlite::Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut report = VerifyReport::default();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if integrity != "ok" {
        report
            .problems
            .push(format!("SQLite integrity check: {integrity}"));
    }
    let accounts: Vec<(i64, String)> = conn
        .prepare("SELECT id, name FROM accounts ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (id, name) in accounts {
        report.accounts += 1;
        let mut stmt = conn.prepare(
            "SELECT offset, kind, body, checksum FROM log WHERE account_id = ?1 ORDER BY offset",
        )?;
        let mut rows = stmt.query([id])?;
        let mut rows_seen = RowCheck::default();
        let mut live_refs = 0u64;
        while let Some(row) = rows.next()? {
            let offset = row.get::<_, i64>(0)? as u64;
            let kind: i64 = row.get(1)?;
            let body: Vec<u8> = row.get(2)?;
            let sum: Vec<u8> = row.get(3)?;
            let Some(record) = rows_seen.check(&mut report, &name, id, offset, kind, &body, &sum)
            else {
                continue;
            };
            let mut problem = |what: String| {
                report
                    .problems
                    .push(format!("account {name}, offset {offset}: {what}"))
            };
            if let Some(hash) = record.hash() {
                live_refs += 1;
                let indexed = rusqlite::OptionalExtension::optional(conn.query_row(
                    "SELECT 1 FROM refs WHERE account_id = ?1 AND hash = ?2 AND offset = ?3",
                    rusqlite::params![id, hash.0.as_slice(), offset as i64],
                    |_| Ok(()),
                ))?;
                if indexed.is_none() {
                    problem(format!("message {hash} is missing from the refs index"));
                }
            }
            match record {
                Record::Store { hash, size, .. } => {
                    check_blob(&conn, root, id, offset, &hash, size, &mut report, &name)?;
                }
                Record::Send { hash, .. }
                | Record::Tags { hash, .. }
                | Record::TagSnapshot { hash, .. } => {
                    // A live record whose message was deleted (its Store scrubbed).
                    let held: Option<i64> = rusqlite::OptionalExtension::optional(conn.query_row(
                        "SELECT offset FROM blobs WHERE account_id = ?1 AND hash = ?2",
                        rusqlite::params![id, hash.0.as_slice()],
                        |r| r.get(0),
                    ))?;
                    if held.is_none() {
                        problem(format!("live record of message {hash}, which has no blob"));
                    }
                }
                Record::Scrub { .. } => {}
            }
        }
        check_deletions(&conn, root, id, &name, live_refs, &mut report)?;
    }
    Ok(report)
}

/// The indexes agree with the live records: every `blobs` row names a live Store record of
/// its message (so no blob is held for scrubbed records only), `refs` has exactly one row
/// per live record that names a message, and no deleted message's blob is still on disk.
fn check_deletions(
    conn: &rusqlite::Connection,
    root: &Path,
    account: i64,
    name: &str,
    live_refs: u64,
    report: &mut VerifyReport,
) -> Result<()> {
    let mut stmt = conn.prepare(
        "SELECT b.hash, b.offset, l.kind, l.body FROM blobs b
         LEFT JOIN log l ON l.account_id = b.account_id AND l.offset = b.offset
         WHERE b.account_id = ?1",
    )?;
    let mut rows = stmt.query([account])?;
    while let Some(row) = rows.next()? {
        let hash: Vec<u8> = row.get(0)?;
        let offset: i64 = row.get(1)?;
        let kind: Option<i64> = row.get(2)?;
        let body: Option<Vec<u8>> = row.get(3)?;
        let names_it = kind.is_some_and(|k| k != KIND_SCRUBBED)
            && body
                .and_then(|b| Record::decode(&b).ok())
                .and_then(|r| match r {
                    Record::Store { hash, .. } => Some(hash.0.to_vec()),
                    _ => None,
                })
                .is_some_and(|h| h == hash);
        if !names_it {
            report.problems.push(format!(
                "account {name}: a blob is indexed at offset {offset}, which holds no live \
                 Store record of it (referenced by a scrubbed record only)"
            ));
        }
    }
    let refs: i64 = conn.query_row(
        "SELECT COUNT(*) FROM refs WHERE account_id = ?1",
        [account],
        |r| r.get(0),
    )?;
    if refs as u64 != live_refs {
        report.problems.push(format!(
            "account {name}: the refs index has {refs} rows for {live_refs} live records"
        ));
    }
    let mut stmt = conn.prepare("SELECT hash FROM unlink_pending WHERE account_id = ?1")?;
    let mut rows = stmt.query([account])?;
    while let Some(row) = rows.next()? {
        let hash: Vec<u8> = row.get(0)?;
        let Ok(hash) = <[u8; 32]>::try_from(hash) else {
            continue;
        };
        let hash = BlobHash(hash);
        let indexed = rusqlite::OptionalExtension::optional(conn.query_row(
            "SELECT 1 FROM blobs WHERE account_id = ?1 AND hash = ?2",
            rusqlite::params![account, hash.0.as_slice()],
            |_| Ok(()),
        ))?;
        if indexed.is_none() && blob_path(root, account, &hash).exists() {
            report.problems.push(format!(
                "account {name}: the blob of a deleted message is still on disk (the \
                 server removes it at its next start)"
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_blob(
    conn: &rusqlite::Connection,
    root: &Path,
    account: i64,
    offset: u64,
    hash: &BlobHash,
    size: u64,
    report: &mut VerifyReport,
    name: &str,
) -> Result<()> {
    let indexed: Option<i64> = rusqlite::OptionalExtension::optional(conn.query_row(
        "SELECT offset FROM blobs WHERE account_id = ?1 AND hash = ?2",
        rusqlite::params![account, hash.0.as_slice()],
        |r| r.get(0),
    ))?;
    let at = format!("account {name}, offset {offset}, blob {hash}");
    if indexed != Some(offset as i64) {
        report
            .problems
            .push(format!("{at}: index says {indexed:?}"));
    }
    match std::fs::read(blob_path(root, account, hash)) {
        Ok(bytes) => {
            report.blobs += 1;
            report.blob_bytes += bytes.len() as u64;
            if BlobHash::of(&bytes) != *hash {
                report
                    .problems
                    .push(format!("{at}: content does not match its hash"));
            } else if bytes.len() as u64 != size {
                report
                    .problems
                    .push(format!("{at}: size {} != recorded {size}", bytes.len()));
            }
        }
        Err(e) => report.problems.push(format!("{at}: unreadable: {e}")),
    }
    Ok(())
}
