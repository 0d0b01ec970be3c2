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
        let mut expect = 0u64;
        while let Some(row) = rows.next()? {
            let offset = row.get::<_, i64>(0)? as u64;
            let kind: i64 = row.get(1)?;
            let body: Vec<u8> = row.get(2)?;
            let sum: Vec<u8> = row.get(3)?;
            let mut problem = |what: String| {
                report
                    .problems
                    .push(format!("account {name}, offset {offset}: {what}"))
            };
            if offset != expect {
                problem(format!("gap: expected offset {expect}"));
            }
            expect = offset + 1;
            report.records += 1;
            if sum.as_slice() != db::checksum(id, offset, &body) {
                problem("record checksum mismatch".into());
                continue;
            }
            if kind == KIND_SCRUBBED {
                report.scrubbed += 1;
                continue;
            }
            let record = match Record::decode(&body) {
                Ok(r) => r,
                Err(e) => {
                    problem(format!("record does not decode: {e}"));
                    continue;
                }
            };
            if let Record::Store { hash, size, .. } = record {
                check_blob(&conn, root, id, offset, &hash, size, &mut report, &name)?;
            }
        }
    }
    Ok(report)
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
