//! The relay queue in PostgreSQL (see postlog-store's `relay` module for its meaning).
//!
//! With several nodes, each runs a relay worker. `due` therefore claims the rows it returns:
//! their `next_ms` moves `LEASE_MS` ahead, so no other node picks them up while this one
//! tries; the attempt's report then sets the real state. A node that dies mid-attempt
//! releases its claims when its server starts again ([`release`]; its id is in its data
//! directory);
//! a node that does not come back leaves them to be retried after the lease. Either way
//! at-least-once, as with one node.

use postgres::GenericClient;
use postlog_proto::{BlobHash, LogOffset};
use postlog_store::kit::{self, FAILED, PENDING};
use postlog_store::{AccountId, QueuedSend, RecipientReport};

use crate::{R, col, hash_col};

/// How long a claimed recipient stays reserved for the claiming node's attempt.
const LEASE_MS: i64 = 10 * 60 * 1000;

pub(crate) fn queued_offset(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
) -> R<Option<LogOffset>> {
    c.query_opt(
        "SELECT send_offset FROM relay_queue WHERE account_id = $1 AND hash = $2 LIMIT 1",
        &[&account, &hash.0.as_slice()],
    )?
    .map(|r| col::<i64>(&r, 0).map(|o| o as u64))
    .transpose()
}

pub(crate) fn enqueue(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
    send_offset: LogOffset,
    from: &str,
    recipients: &[String],
    now: u64,
) -> R<()> {
    let stmt = c.prepare(
        "INSERT INTO relay_queue (account_id, hash, recipient, send_offset, sender,
             state, attempts, next_ms, created_ms, reply)
         VALUES ($1, $2, $3, $4, $5, 0, 0, $6, $6, '') ON CONFLICT DO NOTHING",
    )?;
    for r in recipients {
        c.execute(
            &stmt,
            &[
                &account,
                &hash.0.as_slice(),
                r,
                &(send_offset as i64),
                &from,
                &(now as i64),
            ],
        )?;
    }
    Ok(())
}

fn pending(c: &mut impl GenericClient, account: AccountId, hash: &BlobHash) -> R<i64> {
    let row = c.query_one(
        "SELECT COUNT(*) FROM relay_queue WHERE account_id = $1 AND hash = $2 AND state = 0",
        &[&account, &hash.0.as_slice()],
    )?;
    col(&row, 0)
}

/// Records one attempt's outcomes; `Some(any_failed)` when it settled the last pending
/// recipient.
pub(crate) fn apply_report(
    c: &mut impl GenericClient,
    account: AccountId,
    hash: &BlobHash,
    reports: &[RecipientReport],
) -> R<Option<bool>> {
    let before = pending(c, account, hash)?;
    let stmt = c.prepare(
        "UPDATE relay_queue SET state = $4, attempts = attempts + 1, next_ms = $5, reply = $6,
             claimed_by = 0
         WHERE account_id = $1 AND hash = $2 AND recipient = $3 AND state = 0",
    )?;
    for r in reports {
        let (state, next, reply) = r.delivery.columns();
        c.execute(
            &stmt,
            &[
                &account,
                &hash.0.as_slice(),
                &r.recipient,
                &state,
                &next,
                &reply,
            ],
        )?;
    }
    if before == 0 || pending(c, account, hash)? > 0 {
        return Ok(None);
    }
    let failed: i64 = col(
        &c.query_one(
            "SELECT COUNT(*) FROM relay_queue WHERE account_id = $1 AND hash = $2 AND state = $3",
            &[&account, &hash.0.as_slice(), &FAILED],
        )?,
        0,
    )?;
    Ok(Some(failed > 0))
}

/// Claims and returns the sent messages with recipients due at `now` (at most `max`).
pub(crate) fn due(
    c: &mut impl GenericClient,
    node: i64,
    now: u64,
    max: usize,
) -> R<Vec<QueuedSend>> {
    let now = now.min(i64::MAX as u64 / 2) as i64;
    let mut tx = c.transaction()?;
    // SKIP LOCKED: rows another node is claiming right now are simply not ours.
    let rows = tx.query(
        "SELECT account_id, hash, send_offset, sender, created_ms, recipient, attempts
         FROM relay_queue WHERE state = $1 AND next_ms <= $2
         ORDER BY created_ms, account_id, hash, recipient
         FOR UPDATE SKIP LOCKED",
        &[&PENDING, &now],
    )?;
    let mut out: Vec<QueuedSend> = Vec::new();
    for row in &rows {
        let account: AccountId = col(row, 0)?;
        let Ok(hash) = hash_col(row, 1) else {
            tracing::error!(account, "relay queue row with a malformed hash skipped");
            continue;
        };
        let row = QueuedSend {
            account,
            hash,
            send_offset: col::<i64>(row, 2)? as u64,
            from: col(row, 3)?,
            created_ms: col::<i64>(row, 4)? as u64,
            recipients: vec![(col(row, 5)?, kit::attempts(col(row, 6)?))],
        };
        if !kit::push_due(&mut out, max, row) {
            break;
        }
    }
    let claim = tx.prepare(
        "UPDATE relay_queue SET next_ms = $4, claimed_by = $5
         WHERE account_id = $1 AND hash = $2 AND recipient = $3 AND state = 0",
    )?;
    for q in &out {
        for (r, _) in &q.recipients {
            tx.execute(
                &claim,
                &[
                    &q.account,
                    &q.hash.0.as_slice(),
                    r,
                    &(now + LEASE_MS),
                    &node,
                ],
            )?;
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Makes the rows this node had claimed due again: it was stopped or killed during the
/// attempt (no report came), so they are tried again now rather than after the lease.
pub(crate) fn release(c: &mut impl GenericClient, node: i64, now: u64) -> R<u64> {
    Ok(c.execute(
        "UPDATE relay_queue SET next_ms = $2, claimed_by = 0 WHERE state = 0 AND claimed_by = $1",
        &[&node, &(now.min(i64::MAX as u64) as i64)],
    )?)
}

pub(crate) fn next_due(c: &mut impl GenericClient) -> R<Option<u64>> {
    let row = c.query_one("SELECT MIN(next_ms) FROM relay_queue WHERE state = 0", &[])?;
    Ok(col::<Option<i64>>(&row, 0)?.map(|v| v.max(0) as u64))
}
