//! Deletion, compaction and tag history in PostgreSQL: postlog-store's `scrub` module on
//! this schema (the rules, the tag state and the record formats are the shared ones).

use std::collections::HashMap;

use postgres::GenericClient;
use postlog_proto::limits::MAX_SCRUB_OFFSETS;
use postlog_proto::tags::TagState;
use postlog_proto::{BlobHash, LogOffset, Record};
use postlog_store::kit::{self, History, KIND_SCRUBBED};
use postlog_store::{AccountId, MessageSummary};

use crate::writer::insert_record;
use crate::{R, col};

/// Every live record that refers to `hash`, through the `refs` index.
pub(crate) fn history(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
) -> R<History> {
    let rows = c.query(
        "SELECT l.log_offset, l.body, l.checksum FROM refs r
         JOIN log l ON l.account_id = r.account_id AND l.log_offset = r.log_offset
         WHERE r.account_id = $1 AND r.hash = $2 AND l.kind <> $3 ORDER BY r.log_offset",
        &[&account, &hash.0.as_slice(), &KIND_SCRUBBED],
    )?;
    let mut records = Vec::with_capacity(rows.len());
    for row in &rows {
        let offset = col::<i64>(row, 0)? as u64;
        let body: &[u8] = col(row, 1)?;
        let sum: &[u8] = col(row, 2)?;
        records.push((offset, kit::decode_row(account, offset, body, sum)?));
    }
    Ok(History { records })
}

/// When `tag` was set on a message: the append time of its oldest live dot.
pub(crate) fn tag_set_since(
    c: &mut impl GenericClient,
    account: AccountId,
    st: &TagState,
    tag: &str,
) -> R<Option<u64>> {
    let mut oldest = None;
    for (t, dot) in st.dots() {
        if t == tag {
            let at = c
                .query_opt(
                    "SELECT time_ms FROM log WHERE account_id = $1 AND log_offset = $2",
                    &[&account, &(dot.offset as i64)],
                )?
                .map(|r| col::<i64>(&r, 0))
                .transpose()?
                .unwrap_or(0) as u64;
            oldest = Some(oldest.map_or(at, |o: u64| o.min(at)));
        }
    }
    Ok(oldest)
}

/// Empties the rows at `offsets` and appends Scrub records listing them from `head` on.
fn scrub_offsets(
    c: &mut impl GenericClient,
    account: AccountId,
    offsets: &[LogOffset],
    mut head: LogOffset,
    now: u64,
) -> R<LogOffset> {
    let update = c.prepare(
        "UPDATE log SET kind = $3, body = ''::bytea, checksum = $4
         WHERE account_id = $1 AND log_offset = $2",
    )?;
    let del = c.prepare("DELETE FROM refs WHERE account_id = $1 AND log_offset = $2")?;
    for o in offsets {
        let sum = kit::checksum(account, *o, &[]);
        c.execute(
            &update,
            &[&account, &(*o as i64), &KIND_SCRUBBED, &sum.as_slice()],
        )?;
        c.execute(&del, &[&account, &(*o as i64)])?;
    }
    for chunk in offsets.chunks(MAX_SCRUB_OFFSETS) {
        let rec = Record::Scrub {
            offsets: chunk.to_vec(),
        };
        insert_record(c, account, head, now, &rec)?;
        head += 1;
    }
    Ok(head)
}

/// Deletes a message inside the writer's transaction (see the embedded store's `delete`).
/// The object is queued in `unlink_pending` and in `unlinks`, removed after the commit.
pub(crate) fn delete(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
    head: LogOffset,
    now: u64,
    unlinks: &mut Vec<(AccountId, BlobHash)>,
) -> R<Option<(LogOffset, LogOffset)>> {
    let h = hash.0.as_slice();
    c.execute(
        "DELETE FROM relay_queue WHERE account_id = $1 AND hash = $2",
        &[&account, &h],
    )?;
    let offsets: Vec<LogOffset> = c
        .query(
            "SELECT log_offset FROM refs WHERE account_id = $1 AND hash = $2 ORDER BY log_offset",
            &[&account, &h],
        )?
        .iter()
        .map(|r| col::<i64>(r, 0).map(|o| o as u64))
        .collect::<R<_>>()?;
    if offsets.is_empty() {
        return Ok(None);
    }
    let new_head = scrub_offsets(c, account, &offsets, head, now)?;
    let had_blob = c.execute(
        "DELETE FROM blobs WHERE account_id = $1 AND hash = $2",
        &[&account, &h],
    )? > 0;
    if had_blob {
        c.execute(
            "INSERT INTO unlink_pending (account_id, hash) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&account, &h],
        )?;
        unlinks.push((account, *hash));
    }
    Ok(Some((new_head - 1, new_head)))
}

/// Replaces a message's Tags records (and earlier snapshots) by one TagSnapshot.
pub(crate) fn compact(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
    head: LogOffset,
    now: u64,
) -> R<Option<(LogOffset, LogOffset)>> {
    let Some((snap, old)) = history(c, account, hash)?.compaction(hash) else {
        return Ok(None);
    };
    insert_record(c, account, head, now, &snap)?;
    let new_head = scrub_offsets(c, account, &old, head + 1, now)?;
    Ok(Some((new_head - 1, new_head)))
}

/// Every message of an account with its tag state, from one pass over its live records.
pub(crate) fn summaries(c: &mut impl GenericClient, account: AccountId) -> R<Vec<MessageSummary>> {
    let rows = c.query(
        "SELECT log_offset, body, checksum FROM log
         WHERE account_id = $1 AND kind <> $2 AND kind <> 3 ORDER BY log_offset",
        &[&account, &KIND_SCRUBBED],
    )?;
    let mut by_hash: HashMap<BlobHash, MessageSummary> = HashMap::new();
    for row in &rows {
        let offset = col::<i64>(row, 0)? as u64;
        let rec = kit::decode_row(account, offset, col(row, 1)?, col(row, 2)?)?;
        let Some(hash) = rec.hash() else { continue };
        let m = by_hash.entry(hash).or_insert_with(|| MessageSummary {
            hash,
            state: TagState::default(),
            tag_records: 0,
        });
        if matches!(rec, Record::Tags { .. } | Record::TagSnapshot { .. }) {
            m.tag_records += 1;
        }
        kit::apply(&mut m.state, offset, &rec);
    }
    let mut out: Vec<_> = by_hash.into_values().collect();
    out.sort_by_key(|m| m.hash.0);
    Ok(out)
}
