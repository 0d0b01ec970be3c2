//! Deletion and compaction inside the writer's transaction, and what follows the commit.
//!
//! A message's live records are found through the `refs` index (hash -> offsets), never by
//! a scan. Deleting it appends one Scrub record listing them (more than one only past
//! `MAX_SCRUB_OFFSETS`), empties their rows (kind 255, empty body, the offset stays as a
//! hole), drops its index rows and queues its blob file in `unlink_pending`. After the
//! commit the writer unlinks the file, clears the queue row and checkpoints the WAL with
//! TRUNCATE, so that (with `secure_delete`) no byte of the deleted records or of the hash
//! is left in the database files (docs/DURABILITY.md, "Deletion").

use std::collections::HashMap;
use std::path::Path;

use postlog_proto::limits::{MAX_SCRUB_OFFSETS, MAX_SNAPSHOT_DOTS};
use postlog_proto::tags::TagState;
use postlog_proto::{BlobHash, LogOffset, Record};
use rusqlite::{Connection, OptionalExtension, params};

use crate::accounts::AccountId;
use crate::db::{self, KIND_SCRUBBED};
use crate::{Result, StoreError, blobs};

/// A message's live records, in offset order.
pub struct History {
    pub records: Vec<(LogOffset, Record)>,
}

impl History {
    /// The message's tags as every replica computes them.
    pub fn state(&self) -> TagState {
        let mut st = TagState::default();
        for (offset, rec) in &self.records {
            apply(&mut st, *offset, rec);
        }
        st
    }

    /// A compaction of these records: the TagSnapshot to append and the offsets it
    /// replaces. `None` when there is nothing to gain (fewer than two Tags/TagSnapshot
    /// records) or a tag has more dots than a snapshot holds.
    pub fn compaction(&self, hash: &BlobHash) -> Option<(Record, Vec<LogOffset>)> {
        let old = self.tag_records();
        if old.len() < 2 {
            return None;
        }
        let st = self.state();
        if st.max_dots_per_tag() > MAX_SNAPSHOT_DOTS {
            return None;
        }
        let snap = Record::TagSnapshot {
            hash: *hash,
            tags: st.snapshot(),
        };
        Some((snap, old))
    }

    /// Offsets of the records a compaction replaces: Tags and earlier snapshots.
    pub fn tag_records(&self) -> Vec<LogOffset> {
        self.records
            .iter()
            .filter(|(_, r)| matches!(r, Record::Tags { .. } | Record::TagSnapshot { .. }))
            .map(|(o, _)| *o)
            .collect()
    }
}

/// Applies one record to a message's tag state (the same rule as every client).
pub fn apply(st: &mut TagState, offset: LogOffset, rec: &Record) {
    match rec {
        Record::Store { tags, .. } => st.apply_store(offset, tags),
        Record::Tags {
            add,
            remove,
            seen,
            device,
            ..
        } => st.apply_op(offset, add, remove, *seen, *device),
        Record::TagSnapshot { tags, .. } => st.apply_snapshot(tags),
        Record::Send { .. } | Record::Scrub { .. } => {}
    }
}

/// Reads and checks one record body.
pub fn decode_row(
    account: AccountId,
    offset: LogOffset,
    body: &[u8],
    sum: &[u8],
) -> Result<Record> {
    let corrupt = |why: String| StoreError::CorruptRecord {
        account: account.to_string(),
        offset,
        why,
    };
    if sum != db::checksum(account, offset, body) {
        return Err(corrupt("checksum mismatch".into()));
    }
    Record::decode(body).map_err(|e| corrupt(e.to_string()))
}

/// Every live record that refers to `hash`, through the `refs` index.
pub(crate) fn history(c: &Connection, account: AccountId, hash: &BlobHash) -> Result<History> {
    let mut stmt = c.prepare_cached(
        "SELECT l.offset, l.body, l.checksum FROM refs r
         JOIN log l ON l.account_id = r.account_id AND l.offset = r.offset
         WHERE r.account_id = ?1 AND r.hash = ?2 AND l.kind != ?3 ORDER BY r.offset",
    )?;
    let mut rows = stmt.query(params![account, hash.0.as_slice(), KIND_SCRUBBED])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let offset = row.get::<_, i64>(0)? as u64;
        let body: Vec<u8> = row.get(1)?;
        let sum: Vec<u8> = row.get(2)?;
        records.push((offset, decode_row(account, offset, &body, &sum)?));
    }
    Ok(History { records })
}

/// The time a record was appended (scrubbed rows keep theirs).
pub(crate) fn time_of(c: &Connection, account: AccountId, offset: LogOffset) -> Result<u64> {
    Ok(c.query_row(
        "SELECT time_ms FROM log WHERE account_id = ?1 AND offset = ?2",
        params![account, offset as i64],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .unwrap_or(0) as u64)
}

/// When `tag` was set on a message: the time of its oldest live dot (`None`: not set).
pub(crate) fn tag_set_since(
    c: &Connection,
    account: AccountId,
    st: &TagState,
    tag: &str,
) -> Result<Option<u64>> {
    let mut oldest = None;
    for (t, dot) in st.dots() {
        if t == tag {
            let at = time_of(c, account, dot.offset)?;
            oldest = Some(oldest.map_or(at, |o: u64| o.min(at)));
        }
    }
    Ok(oldest)
}

/// Empties the rows at `offsets` and appends Scrub records listing them, from `head` on.
/// Returns the new head.
fn scrub_offsets(
    tx: &Connection,
    account: AccountId,
    offsets: &[LogOffset],
    mut head: LogOffset,
    now: u64,
) -> Result<LogOffset> {
    let mut stmt = tx.prepare_cached(
        "UPDATE log SET kind = ?3, body = x'', checksum = ?4 WHERE account_id = ?1 AND offset = ?2",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM refs WHERE account_id = ?1 AND offset = ?2")?;
    for o in offsets {
        stmt.execute(params![
            account,
            *o as i64,
            KIND_SCRUBBED,
            db::checksum(account, *o, &[]).as_slice()
        ])?;
        del.execute(params![account, *o as i64])?;
    }
    for chunk in offsets.chunks(MAX_SCRUB_OFFSETS) {
        let rec = Record::Scrub {
            offsets: chunk.to_vec(),
        };
        crate::store::insert_record(tx, account, head, now, &rec)?;
        head += 1;
    }
    Ok(head)
}

/// Deletes a message inside the writer's transaction. `None` when nothing live refers to
/// it (nothing appended); otherwise the offset of the (last) Scrub record. The blob file
/// is queued in `unlink_pending` and in `unlinks`, to go after the commit.
pub(crate) fn delete(
    tx: &Connection,
    account: AccountId,
    hash: &BlobHash,
    head: LogOffset,
    now: u64,
    unlinks: &mut Vec<(AccountId, BlobHash)>,
) -> Result<Option<(LogOffset, LogOffset)>> {
    // The relay queue names the message and its recipients: a deleted message is not sent
    // (any more), and nothing of it stays in the database.
    tx.execute(
        "DELETE FROM relay_queue WHERE account_id = ?1 AND hash = ?2",
        params![account, hash.0.as_slice()],
    )?;
    let offsets: Vec<LogOffset> = tx
        .prepare_cached(
            "SELECT offset FROM refs WHERE account_id = ?1 AND hash = ?2 ORDER BY offset",
        )?
        .query_map(params![account, hash.0.as_slice()], |r| {
            r.get::<_, i64>(0).map(|o| o as u64)
        })?
        .collect::<Result<_, _>>()?;
    if offsets.is_empty() {
        return Ok(None);
    }
    let new_head = scrub_offsets(tx, account, &offsets, head, now)?;
    let had_blob = tx.execute(
        "DELETE FROM blobs WHERE account_id = ?1 AND hash = ?2",
        params![account, hash.0.as_slice()],
    )? > 0;
    if had_blob {
        tx.execute(
            "INSERT OR IGNORE INTO unlink_pending (account_id, hash) VALUES (?1, ?2)",
            params![account, hash.0.as_slice()],
        )?;
        unlinks.push((account, *hash));
    }
    Ok(Some((new_head - 1, new_head)))
}

/// Replaces a message's Tags records (and earlier snapshots) by one TagSnapshot, then
/// scrubs them. `None` when there is nothing to gain (fewer than two such records), or
/// when a tag has more dots than a snapshot holds.
pub(crate) fn compact(
    tx: &Connection,
    account: AccountId,
    hash: &BlobHash,
    head: LogOffset,
    now: u64,
) -> Result<Option<(LogOffset, LogOffset)>> {
    let Some((snap, old)) = history(tx, account, hash)?.compaction(hash) else {
        return Ok(None);
    };
    // The snapshot first: a replica that reads the Scrub has already replaced the state.
    crate::store::insert_record(tx, account, head, now, &snap)?;
    let new_head = scrub_offsets(tx, account, &old, head + 1, now)?;
    Ok(Some((new_head - 1, new_head)))
}

/// After the commit: removes the blob files of deleted messages (unless the same bytes
/// were stored again meanwhile) and their `unlink_pending` rows. Errors leave the row for
/// the next start.
pub(crate) fn unlink_deleted(conn: &Connection, root: &Path, unlinks: &[(AccountId, BlobHash)]) {
    for (account, hash) in unlinks {
        if let Err(e) = unlink_one(conn, root, *account, hash) {
            tracing::error!(error = %e, "removing a deleted message's blob failed; retried at the next start");
        }
    }
}

fn unlink_one(conn: &Connection, root: &Path, account: AccountId, hash: &BlobHash) -> Result<()> {
    let held = conn
        .query_row(
            "SELECT 1 FROM blobs WHERE account_id = ?1 AND hash = ?2",
            params![account, hash.0.as_slice()],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !held {
        let path = blobs::blob_path(root, account, hash);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&path, e)),
        }
        if let Some(dir) = path.parent() {
            crate::fsync_dir(dir)?;
        }
    }
    conn.execute(
        "DELETE FROM unlink_pending WHERE account_id = ?1 AND hash = ?2",
        params![account, hash.0.as_slice()],
    )?;
    Ok(())
}

/// Finishes deletions a crash interrupted between the commit and the unlink.
pub(crate) fn finish_pending(conn: &Connection, root: &Path) -> Result<bool> {
    let pending: Vec<(AccountId, Vec<u8>)> = conn
        .prepare("SELECT account_id, hash FROM unlink_pending")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut unlinks = Vec::new();
    for (a, h) in pending {
        match <[u8; 32]>::try_from(h) {
            Ok(h) => unlinks.push((a, BlobHash(h))),
            Err(_) => {
                conn.execute(
                    "DELETE FROM unlink_pending WHERE account_id = ?1 AND length(hash) != 32",
                    [a],
                )?;
            }
        }
    }
    unlink_deleted(conn, root, &unlinks);
    Ok(!unlinks.is_empty())
}

/// Moves every WAL frame into the database file and truncates the WAL to zero bytes, so
/// that old versions of scrubbed pages are gone from disk. `false` when readers kept it
/// from completing (the writer tries again later).
pub(crate) fn checkpoint(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(busy) => busy == 0,
        Err(e) => {
            tracing::warn!(error = %e, "WAL checkpoint after a scrub failed; retrying later");
            false
        }
    }
}

/// Fills the `refs` index from the log (a data directory from before it existed).
pub(crate) fn backfill_refs(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= 1 {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(
            "SELECT account_id, offset, body, checksum FROM log WHERE kind != ?1 AND kind != 3",
        )?;
        let mut rows = stmt.query([KIND_SCRUBBED])?;
        let mut ins = tx
            .prepare("INSERT OR IGNORE INTO refs (account_id, hash, offset) VALUES (?1, ?2, ?3)")?;
        while let Some(row) = rows.next()? {
            let account: AccountId = row.get(0)?;
            let offset = row.get::<_, i64>(1)? as u64;
            let body: Vec<u8> = row.get(2)?;
            let sum: Vec<u8> = row.get(3)?;
            if let Some(hash) = decode_row(account, offset, &body, &sum)?.hash() {
                ins.execute(params![account, hash.0.as_slice(), offset as i64])?;
            }
        }
    }
    tx.pragma_update(None, "user_version", 1)?;
    tx.commit()?;
    Ok(())
}

/// One message's state as the retention sweep sees it.
pub struct MessageSummary {
    pub hash: BlobHash,
    pub state: TagState,
    /// Live Tags and TagSnapshot records (what a compaction would replace).
    pub tag_records: usize,
}

/// Every message of an account with its tag state, from one pass over its live records.
pub(crate) fn summaries(c: &Connection, account: AccountId) -> Result<Vec<MessageSummary>> {
    let mut stmt = c.prepare(
        "SELECT offset, body, checksum FROM log WHERE account_id = ?1 AND kind != ?2 AND kind != 3
         ORDER BY offset",
    )?;
    let mut rows = stmt.query(params![account, KIND_SCRUBBED])?;
    let mut by_hash: HashMap<BlobHash, MessageSummary> = HashMap::new();
    while let Some(row) = rows.next()? {
        let offset = row.get::<_, i64>(0)? as u64;
        let body: Vec<u8> = row.get(1)?;
        let sum: Vec<u8> = row.get(2)?;
        let rec = decode_row(account, offset, &body, &sum)?;
        let Some(hash) = rec.hash() else { continue };
        let m = by_hash.entry(hash).or_insert_with(|| MessageSummary {
            hash,
            state: TagState::default(),
            tag_records: 0,
        });
        if matches!(rec, Record::Tags { .. } | Record::TagSnapshot { .. }) {
            m.tag_records += 1;
        }
        apply(&mut m.state, offset, &rec);
    }
    let mut out: Vec<_> = by_hash.into_values().collect();
    out.sort_by_key(|m| m.hash.0);
    Ok(out)
}
