//! The outbound relay queue: one row per envelope recipient of every Send record.
//!
//! Rows are created in the transaction that appends the Send record, so a Send the server
//! acknowledged is always queued. The server's relay worker reads due rows
//! ([`Backend::relay_due`](crate::Backend::relay_due)) and reports each attempt back through
//! the writer as [`NewRecord::Relayed`](crate::NewRecord::Relayed), which updates the rows
//! and, in the same transaction, appends the bounce and the final delivery tags.

use rusqlite::{Connection, OptionalExtension, params};

use postlog_proto::{BlobHash, LogOffset};

use crate::{AccountId, Result};

pub(crate) const SCHEMA: &str = "
-- The relay queue: state 0 = pending (due at next_ms), 1 = delivered, 2 = failed for good
-- (a bounce was stored). Rows stay after delivery: they make Send idempotent by hash.
CREATE TABLE IF NOT EXISTS relay_queue (
    account_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    recipient TEXT NOT NULL,
    send_offset INTEGER NOT NULL,
    sender TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    reply TEXT NOT NULL,
    PRIMARY KEY (account_id, hash, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS relay_queue_due ON relay_queue (state, next_ms);
";

/// `relay_queue.state` values.
pub const PENDING: i64 = 0;
pub const DELIVERED: i64 = 1;
pub const FAILED: i64 = 2;

/// Tags of a message when it is sent; `queued` is replaced when the relay has finished.
pub const SENT_TAGS: [&str; 2] = ["sent", "queued"];
/// The tag a sent message gets when every recipient accepted it.
pub const DELIVERED_TAG: &str = "delivered";
/// The tag a sent message gets when at least one recipient failed for good (a bounce is
/// in the log).
pub const BOUNCED_TAG: &str = "bounced";

/// What one relay attempt did for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The relay accepted the message for this recipient.
    Delivered { reply: String },
    /// Refused for good (5xx, or the retry period ran out): a bounce reports it.
    Failed { code: u16, reason: String },
    /// Try again at `next_ms` (4xx, or the relay could not be reached).
    Retry { reason: String, next_ms: u64 },
}

impl Delivery {
    /// The queue row's new `(state, next_ms, reply)`.
    pub fn columns(&self) -> (i64, i64, String) {
        match self {
            Delivery::Delivered { reply } => (DELIVERED, 0, reply.clone()),
            Delivery::Failed { code, reason } => (FAILED, 0, format!("{code} {reason}")),
            Delivery::Retry { reason, next_ms } => (
                PENDING,
                (*next_ms).min(i64::MAX as u64) as i64,
                reason.clone(),
            ),
        }
    }
}

/// One recipient's outcome in a relay report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientReport {
    pub recipient: String,
    pub delivery: Delivery,
}

/// A sent message with recipients that are due for a relay attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedSend {
    pub account: AccountId,
    pub hash: BlobHash,
    pub send_offset: LogOffset,
    pub from: String,
    /// When the Send was appended (ms since the Unix epoch): the retry period counts from it.
    pub created_ms: u64,
    /// The due recipients and how many attempts each has had.
    pub recipients: Vec<(String, u32)>,
}

/// The offset of the Send record for these bytes, if the account has sent them before.
pub(crate) fn queued_offset(
    c: &Connection,
    account: AccountId,
    hash: &BlobHash,
) -> Result<Option<LogOffset>> {
    Ok(c.query_row(
        "SELECT send_offset FROM relay_queue WHERE account_id = ?1 AND hash = ?2 LIMIT 1",
        params![account, hash.0.as_slice()],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .map(|o| o as u64))
}

pub(crate) fn enqueue(
    c: &Connection,
    account: AccountId,
    hash: &BlobHash,
    send_offset: LogOffset,
    from: &str,
    recipients: &[String],
    now: u64,
) -> Result<()> {
    let mut stmt = c.prepare_cached(
        "INSERT OR IGNORE INTO relay_queue (account_id, hash, recipient, send_offset, sender,
             state, attempts, next_ms, created_ms, reply)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?6, '')",
    )?;
    for r in recipients {
        stmt.execute(params![
            account,
            hash.0.as_slice(),
            r,
            send_offset as i64,
            from,
            now as i64
        ])?;
    }
    Ok(())
}

/// How a message's relay ended, reported once, by the report that settled its last
/// pending recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Finished {
    pub any_failed: bool,
}

/// Records one attempt's outcomes (pending rows only: a report that arrives twice, e.g.
/// after a crash between relay and commit, changes nothing the second time).
pub(crate) fn apply_report(
    c: &Connection,
    account: AccountId,
    hash: &BlobHash,
    reports: &[RecipientReport],
) -> Result<Option<Finished>> {
    let pending_before = pending(c, account, hash)?;
    let mut stmt = c.prepare_cached(
        "UPDATE relay_queue SET state = ?4, attempts = attempts + 1, next_ms = ?5, reply = ?6
         WHERE account_id = ?1 AND hash = ?2 AND recipient = ?3 AND state = 0",
    )?;
    for r in reports {
        let (state, next, reply) = r.delivery.columns();
        stmt.execute(params![
            account,
            hash.0.as_slice(),
            r.recipient,
            state,
            next,
            reply
        ])?;
    }
    if pending_before == 0 || pending(c, account, hash)? > 0 {
        return Ok(None);
    }
    let failed: i64 = c.query_row(
        "SELECT COUNT(*) FROM relay_queue WHERE account_id = ?1 AND hash = ?2 AND state = ?3",
        params![account, hash.0.as_slice(), FAILED],
        |r| r.get(0),
    )?;
    Ok(Some(Finished {
        any_failed: failed > 0,
    }))
}

fn pending(c: &Connection, account: AccountId, hash: &BlobHash) -> Result<i64> {
    Ok(c.query_row(
        "SELECT COUNT(*) FROM relay_queue WHERE account_id = ?1 AND hash = ?2 AND state = 0",
        params![account, hash.0.as_slice()],
        |r| r.get(0),
    )?)
}

/// Sent messages with recipients due at `now`, oldest first, at most `max` messages.
pub(crate) fn due(c: &Connection, now: u64, max: usize) -> Result<Vec<QueuedSend>> {
    let mut stmt = c.prepare_cached(
        "SELECT account_id, hash, send_offset, sender, created_ms, recipient, attempts
         FROM relay_queue WHERE state = 0 AND next_ms <= ?1
         ORDER BY created_ms, account_id, hash, recipient",
    )?;
    let mut rows = stmt.query([now.min(i64::MAX as u64) as i64])?;
    let mut out: Vec<QueuedSend> = Vec::new();
    while let Some(row) = rows.next()? {
        let account: AccountId = row.get(0)?;
        let hash_bytes: Vec<u8> = row.get(1)?;
        let Ok(hash) = <[u8; 32]>::try_from(hash_bytes.as_slice()).map(BlobHash) else {
            tracing::error!(account, "relay queue row with a malformed hash skipped");
            continue;
        };
        let row = QueuedSend {
            account,
            hash,
            send_offset: row.get::<_, i64>(2)? as u64,
            from: row.get(3)?,
            created_ms: row.get::<_, i64>(4)? as u64,
            recipients: vec![(row.get(5)?, attempts(row.get(6)?))],
        };
        if !push_due(&mut out, max, row) {
            break;
        }
    }
    Ok(out)
}

/// A queue row's attempt count, as `QueuedSend` carries it.
pub fn attempts(column: i64) -> u32 {
    column.clamp(0, u32::MAX as i64) as u32
}

/// Adds one due queue row (one recipient; rows ordered by message) to `out`, grouping the
/// recipients of one message. `false` when the row would start message number `max + 1`:
/// the caller stops reading.
pub fn push_due(out: &mut Vec<QueuedSend>, max: usize, row: QueuedSend) -> bool {
    if let Some(q) = out.last_mut()
        && q.account == row.account
        && q.hash == row.hash
    {
        q.recipients.extend(row.recipients);
        return true;
    }
    if out.len() == max {
        return false;
    }
    out.push(row);
    true
}

/// When the next pending recipient is due, if any is pending.
pub(crate) fn next_due(c: &Connection) -> Result<Option<u64>> {
    Ok(c.query_row(
        "SELECT MIN(next_ms) FROM relay_queue WHERE state = 0",
        [],
        |r| r.get::<_, Option<i64>>(0),
    )?
    .map(|v| v.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Accounts, Backend, NewRecord, Store};
    use postlog_proto::Record;

    fn stage(store: &Store, bytes: &[u8]) -> crate::StagedBlob {
        let mut w = store.blob_writer(1 << 20).unwrap();
        w.write(bytes).unwrap();
        w.finish().unwrap()
    }

    fn send(store: &Store, account: AccountId, bytes: &[u8]) -> crate::Appended {
        store
            .append_blocking(
                account,
                NewRecord::Send {
                    blob: stage(store, bytes),
                    from: "ann@example.org".into(),
                    recipients: vec!["bob@x.org".into(), "cy@x.org".into()],
                },
            )
            .unwrap()
    }

    #[test]
    fn send_is_idempotent_queued_and_settled_by_reports() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = Accounts::open(dir.path())
            .unwrap()
            .add_device("ann", &["ann@example.org".into()], "laptop")
            .unwrap()
            .account_id;
        let first = send(&store, a, b"m1");
        assert_eq!(
            (first.offset, first.new),
            (1, true),
            "Store at 0, Send at 1"
        );
        let again = send(&store, a, b"m1");
        assert_eq!((again.offset, again.new), (1, false));
        assert_eq!(store.head(a).unwrap(), 2);
        let log = store.read_log(a, 0, 10).unwrap();
        assert!(
            matches!(&log[0].record, Record::Store { tags, .. } if tags == &["sent", "queued"])
        );
        assert!(matches!(&log[1].record, Record::Send { recipients, .. } if recipients.len() == 2));

        // Due now; nothing due in the past.
        let due = store.relay_due(u64::MAX / 2, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].recipients,
            [("bob@x.org".into(), 0), ("cy@x.org".into(), 0)]
        );
        assert!(store.relay_due(0, 10).unwrap().is_empty());

        // bob delivered, cy deferred: no tags yet.
        let hash = first.hash;
        let report = |recipient: &str, delivery: Delivery| RecipientReport {
            recipient: recipient.into(),
            delivery,
        };
        store
            .append_blocking(
                a,
                NewRecord::Relayed {
                    hash,
                    reports: vec![
                        report(
                            "bob@x.org",
                            Delivery::Delivered {
                                reply: "250 ok".into(),
                            },
                        ),
                        report(
                            "cy@x.org",
                            Delivery::Retry {
                                reason: "451 later".into(),
                                next_ms: 5,
                            },
                        ),
                    ],
                    bounce: None,
                },
            )
            .unwrap();
        assert_eq!(store.head(a).unwrap(), 2);
        assert_eq!(store.relay_next_due().unwrap(), Some(5));
        let due = store.relay_due(5, 10).unwrap();
        assert_eq!(due[0].recipients, [("cy@x.org".into(), 1)]);

        // cy fails for good: the bounce is stored and the sent message is tagged bounced.
        let failed = NewRecord::Relayed {
            hash,
            reports: vec![report(
                "cy@x.org",
                Delivery::Failed {
                    code: 550,
                    reason: "no such user".into(),
                },
            )],
            bounce: Some((stage(&store, b"bounce"), vec!["inbox".into()])),
        };
        store.append_blocking(a, failed).unwrap();
        assert_eq!(store.head(a).unwrap(), 4);
        let log = store.read_log(a, 2, 10).unwrap();
        assert!(matches!(&log[0].record, Record::Store { tags, .. } if tags == &["inbox"]));
        assert!(matches!(
            &log[1].record,
            Record::Tags { add, remove, device: 0, .. } if add == &["bounced"] && remove == &["queued"]
        ));
        assert_eq!(store.relay_next_due().unwrap(), None);

        // A report repeated after a crash changes nothing.
        let repeat = NewRecord::Relayed {
            hash,
            reports: vec![report(
                "cy@x.org",
                Delivery::Delivered {
                    reply: "250".into(),
                },
            )],
            bounce: None,
        };
        store.append_blocking(a, repeat).unwrap();
        assert_eq!(store.head(a).unwrap(), 4);

        // Sending bytes the account already holds tags them instead of storing them again.
        let held = store
            .append_blocking(
                a,
                NewRecord::Store {
                    blob: stage(&store, b"draft"),
                    tags: vec![],
                },
            )
            .unwrap();
        let s = send(&store, a, b"draft");
        assert_eq!((s.offset, s.new), (held.offset + 2, true));
        let log = store.read_log(a, held.offset + 1, 10).unwrap();
        assert!(
            matches!(&log[0].record, Record::Tags { add, device: 0, .. } if add == &["sent", "queued"])
        );
        assert!(matches!(&log[1].record, Record::Send { size: 5, .. }));
    }
}
