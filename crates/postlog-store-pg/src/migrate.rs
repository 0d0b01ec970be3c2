//! `postlog migrate`: copies an embedded data directory into PostgreSQL + S3, keeping every
//! account id, device id, offset, record byte and checksum.
//!
//! Per account: every blob is read (verified against its hash) and uploaded first; then the
//! account's rows go in one transaction. An interrupted migration is run again: accounts
//! already copied whole are recognised (same id, name and Head) and skipped. Devices,
//! addresses and the relay queue follow, idempotently. The source must not be in use (its
//! lock is taken).

use std::path::Path;

use postlog_proto::BlobHash;
use postlog_store::{Export, ExportedDevice, ExportedQueueRow, ExportedRecord, StoreError};

use crate::{PgStore, R, col};

/// What a migration copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub accounts: u64,
    /// Accounts found already copied by an earlier run.
    pub skipped: u64,
    pub records: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub devices: u64,
}

/// Progress, for a progress bar: blobs uploaded so far of the account being copied.
#[derive(Clone, Debug)]
pub struct MigrateProgress {
    pub account: String,
    pub blobs_done: u64,
    pub blobs_total: u64,
}

impl PgStore {
    pub fn migrate_from(
        &self,
        src: &Path,
        progress: &dyn Fn(&MigrateProgress),
    ) -> Result<MigrateReport, StoreError> {
        let ex = Export::open(src)?;
        let mut report = MigrateReport::default();
        let accounts = ex.accounts()?;
        for (id, name, created_ms) in accounts {
            // Where the target stands for this account.
            let n = name.clone();
            let existing = self.run(move |c| {
                let by_name = c
                    .query_opt(
                        "SELECT a.id, h.head FROM accounts a LEFT JOIN heads h ON h.account_id = a.id
                         WHERE a.name = $1 OR a.id = $2",
                        &[&n, &id],
                    )?
                    .map(|r| Ok::<_, crate::Error>((col::<i64>(&r, 0)?, col::<Option<i64>>(&r, 1)?)))
                    .transpose()?;
                Ok(by_name)
            })?;
            let records = ex.head(id)?;
            match existing {
                None => {}
                Some((tid, Some(head))) if tid == id && head as u64 == records => {
                    report.skipped += 1;
                    continue;
                }
                Some(_) => {
                    return Err(StoreError::Invalid {
                        what: "migration target",
                        why: format!(
                            "the database already has an account {name:?} or id {id} that is not \
                             this directory's copy; migrate into an empty database"
                        ),
                    });
                }
            }
            let blobs = ex.blobs(id)?;
            let total = blobs.len() as u64;
            for (i, (hash, _, _)) in blobs.iter().enumerate() {
                let bytes = ex.read_blob(id, hash)?.ok_or_else(|| StoreError::Invalid {
                    what: "source data directory",
                    why: format!(
                        "account {name}: blob {hash} is indexed but missing (run postlog verify)"
                    ),
                })?;
                report.blob_bytes += bytes.len() as u64;
                self.objects.put_bytes(id, hash, bytes)?;
                progress(&MigrateProgress {
                    account: name.clone(),
                    blobs_done: i as u64 + 1,
                    blobs_total: total,
                });
            }
            report.blobs += total;
            let rows = AccountRows {
                id,
                name: name.clone(),
                created_ms,
                records: all_records(&ex, id)?,
                blobs,
                tag_ops: ex.tag_ops(id)?,
                refs: ex.refs(id)?,
            };
            let copied = self.run_once(move |c| copy_account(c, rows))?;
            report.records += copied;
            report.accounts += 1;
        }
        let rest = Rest {
            addresses: ex.addresses()?,
            devices: ex.devices()?,
            queue: ex.relay_queue()?,
        };
        report.devices = self.run_once(move |c| copy_rest(c, rest))?;
        Ok(report)
    }
}

fn all_records(ex: &Export, id: i64) -> Result<Vec<ExportedRecord>, StoreError> {
    let mut out: Vec<ExportedRecord> = Vec::new();
    loop {
        let from = out.last().map_or(0, |r| r.offset + 1);
        let rows = ex.records(id, from, 10_000)?;
        if rows.is_empty() {
            return Ok(out);
        }
        out.extend(rows);
    }
}

/// One account's rows, read from the source (which cannot cross threads) for the copy.
struct AccountRows {
    id: i64,
    name: String,
    created_ms: u64,
    records: Vec<ExportedRecord>,
    blobs: Vec<(BlobHash, u64, u64)>,
    tag_ops: Vec<(u64, u64, u64)>,
    refs: Vec<(BlobHash, u64)>,
}

struct Rest {
    addresses: Vec<(String, i64)>,
    devices: Vec<ExportedDevice>,
    queue: Vec<ExportedQueueRow>,
}

fn copy_account(c: &mut postgres::Client, a: AccountRows) -> R<u64> {
    let AccountRows {
        id,
        name,
        created_ms,
        records,
        blobs,
        tag_ops,
        refs,
    } = a;
    let mut tx = c.transaction()?;
    tx.execute(
        "INSERT INTO accounts (id, name, created_ms) VALUES ($1, $2, $3)",
        &[&id, &name, &(created_ms as i64)],
    )?;
    let ins = tx.prepare(
        "INSERT INTO log (account_id, log_offset, time_ms, kind, body, checksum)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )?;
    let mut head = 0u64;
    for r in &records {
        tx.execute(
            &ins,
            &[
                &id,
                &(r.offset as i64),
                &(r.time_ms as i64),
                &r.kind,
                &r.body,
                &r.checksum,
            ],
        )?;
        head = r.offset + 1;
    }
    tx.execute(
        "INSERT INTO heads (account_id, head) VALUES ($1, $2)",
        &[&id, &(head as i64)],
    )?;
    let ins = tx.prepare(
        "INSERT INTO blobs (account_id, hash, log_offset, size) VALUES ($1, $2, $3, $4)",
    )?;
    for (hash, offset, size) in &blobs {
        tx.execute(
            &ins,
            &[&id, &hash.0.as_slice(), &(*offset as i64), &(*size as i64)],
        )?;
    }
    let ins = tx.prepare(
        "INSERT INTO tag_ops (account_id, device, seq, log_offset) VALUES ($1, $2, $3, $4)",
    )?;
    for (device, seq, offset) in tag_ops {
        tx.execute(
            &ins,
            &[&id, &(device as i64), &(seq as i64), &(offset as i64)],
        )?;
    }
    let ins = tx.prepare("INSERT INTO refs (account_id, hash, log_offset) VALUES ($1, $2, $3)")?;
    for (hash, offset) in refs {
        tx.execute(&ins, &[&id, &hash.0.as_slice(), &(offset as i64)])?;
    }
    tx.commit()?;
    Ok(head)
}

/// Addresses, devices and the relay queue (idempotent), then the id sequences.
fn copy_rest(c: &mut postgres::Client, rest: Rest) -> R<u64> {
    let mut tx = c.transaction()?;
    for (address, account) in &rest.addresses {
        tx.execute(
            "INSERT INTO addresses (address, account_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&address, &account],
        )?;
    }
    let devices = rest.devices;
    for d in &devices {
        tx.execute(
            "INSERT INTO devices (id, account_id, name, secret_hash, created_ms, revoked)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &(d.id as i64),
                &d.account_id,
                &d.name,
                &d.secret_hash,
                &(d.created_ms as i64),
                &d.revoked,
            ],
        )?;
    }
    for q in rest.queue {
        tx.execute(
            "INSERT INTO relay_queue (account_id, hash, recipient, send_offset, sender, state,
                 attempts, next_ms, created_ms, reply)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            &[
                &q.account_id,
                &q.hash,
                &q.recipient,
                &q.send_offset,
                &q.sender,
                &q.state,
                &q.attempts,
                &q.next_ms,
                &q.created_ms,
                &q.reply,
            ],
        )?;
    }
    // New accounts and devices continue after the copied ids.
    tx.batch_execute(
        "SELECT setval(pg_get_serial_sequence('accounts', 'id'), COALESCE((SELECT MAX(id) FROM accounts), 0) + 1, false);
         SELECT setval(pg_get_serial_sequence('devices', 'id'), COALESCE((SELECT MAX(id) FROM devices), 0) + 1, false);",
    )?;
    tx.commit()?;
    Ok(devices.len() as u64)
}
