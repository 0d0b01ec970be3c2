//! The node's writer thread: group commit into PostgreSQL, blobs uploaded first.
//!
//! The same algorithm as the embedded store's writer (postlog-store `store.rs`), on this
//! schema. Per group, one transaction:
//! 1. lock the `heads` rows of every account in the group, in id order (a second node
//!    appending to the same account waits here; id order means two nodes never deadlock);
//! 2. run every job: idempotency checks, records, index rows; messages not held yet are
//!    listed for upload;
//! 3. upload those blobs (in parallel; each PUT acknowledged = durable);
//! 4. update `heads`, `NOTIFY postlog_heads` per account, COMMIT;
//! 5. delete the objects of deleted messages, then answer the jobs and publish the heads.
//!
//! A failed group fails its jobs only (the next group reconnects): unlike a failed fsync,
//! a PostgreSQL error leaves nothing half-written, and clients retry idempotently.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use postgres::{Client, GenericClient};
use postlog_proto::{BlobHash, LogOffset, Record};
use postlog_store::kit::{self, HeadWatcher};
use postlog_store::{
    AccountId, Appended, DeviceId, NewRecord, SERVER_DEVICE, StagedBlob, StoreError,
};

use crate::objects::Objects;
use crate::{R, col, relay, scrub};

/// Most appends committed in one transaction.
const MAX_GROUP: usize = 1024;

pub(crate) type Done = Box<dyn FnOnce(Result<Appended, StoreError>) + Send>;

pub(crate) struct Job {
    pub account: AccountId,
    pub record: NewRecord,
    pub done: Done,
}

/// State the writer, the listener and readers share.
pub(crate) struct Shared {
    /// Known Heads: written after commits (own and, through NOTIFY, other nodes').
    pub heads: Mutex<HashMap<AccountId, LogOffset>>,
    pub watcher: Mutex<Option<HeadWatcher>>,
    /// Revoked devices, kept current by the listener; `None` while it is not connected.
    pub revoked: Mutex<Option<std::collections::HashSet<DeviceId>>>,
    pub stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Records a Head (never moving one back) and tells the watcher.
    pub(crate) fn publish(&self, account: AccountId, head: LogOffset) {
        if let Ok(mut h) = self.heads.lock() {
            let e = h.entry(account).or_insert(head);
            if *e < head {
                *e = head;
            }
        }
        let w = self.watcher.lock().ok().and_then(|w| w.clone());
        if let Some(w) = w {
            w(account, head);
        }
    }
}

pub(crate) fn run(
    url: String,
    objects: Arc<Objects>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
) {
    let mut client: Option<Client> = None;
    // Deletions a crash (of this or another node) left between commit and object removal.
    if let Ok(mut c) = crate::pool::connect(&url) {
        finish_pending(&mut c, &objects);
        client = Some(c);
    }
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = crate::pool::connect(&url).ok();
        }
        let Some(c) = client.as_mut() else {
            for job in batch {
                (job.done)(Err(StoreError::Remote {
                    engine: "PostgreSQL",
                    why: "cannot connect".into(),
                }));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        };
        let mut dones = Vec::with_capacity(batch.len());
        let mut work = Vec::with_capacity(batch.len());
        for job in batch {
            dones.push(job.done);
            work.push((job.account, job.record));
        }
        let accounts: BTreeSet<AccountId> = work.iter().map(|(a, _)| *a).collect();
        let mut unlinks = Vec::new();
        match commit_group(c, &objects, work, &mut unlinks) {
            Ok((results, heads)) => {
                // The objects of deleted messages go before the answers, as the embedded
                // store's files do: a Delete is answered once the bytes are gone.
                for (account, hash) in unlinks {
                    if let Err(e) = unlink(c, &objects, account, &hash) {
                        tracing::error!(error = %e, "removing a deleted message's object failed; retried at the next start");
                    }
                }
                for (done, r) in dones.into_iter().zip(results) {
                    done(r);
                }
                for (account, head) in heads {
                    shared.publish(account, head);
                }
            }
            Err(e) => {
                let e = StoreError::from(e);
                tracing::error!(error = %e, "group commit failed");
                // The outcome of a failed COMMIT is unknown: forget the cached Heads.
                if let Ok(mut h) = shared.heads.lock() {
                    for a in &accounts {
                        h.remove(a);
                    }
                }
                let msg = e.to_string();
                for done in dones {
                    done(Err(StoreError::Remote {
                        engine: "PostgreSQL",
                        why: msg.clone(),
                    }));
                }
            }
        }
    }
}

type Outcome = (
    Vec<Result<Appended, StoreError>>,
    HashMap<AccountId, LogOffset>,
);

/// Messages a group places: account + hash -> the Store offset.
type Placed = HashMap<(AccountId, BlobHash), LogOffset>;

#[allow(clippy::too_many_lines)]
fn commit_group(
    c: &mut Client,
    objects: &Objects,
    work: Vec<(AccountId, NewRecord)>,
    unlinks: &mut Vec<(AccountId, BlobHash)>,
) -> R<Outcome> {
    let mut tx = c.transaction()?;
    let ids: Vec<AccountId> = work
        .iter()
        .map(|(a, _)| *a)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut heads: HashMap<AccountId, LogOffset> = HashMap::new();
    for row in tx.query(
        "SELECT account_id, head FROM heads WHERE account_id = ANY($1)
         ORDER BY account_id FOR UPDATE",
        &[&ids],
    )? {
        heads.insert(col(&row, 0)?, col::<i64>(&row, 1)? as u64);
    }
    let locked = heads.clone();
    let mut placed: Placed = HashMap::new();
    let mut uploads: Vec<(AccountId, BlobHash, std::path::PathBuf)> = Vec::new();
    let mut staged: Vec<StagedBlob> = Vec::new();
    let mut tag_ops: HashMap<(AccountId, DeviceId, u64), LogOffset> = HashMap::new();
    let mut sent: HashMap<(AccountId, BlobHash), LogOffset> = HashMap::new();
    let mut out = Vec::with_capacity(work.len());
    let now = kit::now_ms();
    let mut place = |account: AccountId, blob: StagedBlob| {
        uploads.push((account, blob.hash, blob.path().to_owned()));
        staged.push(blob);
    };
    for (account, record) in work {
        let Some(&head) = heads.get(&account) else {
            out.push(Err(StoreError::NoSuchAccount(account.to_string())));
            continue;
        };
        let appended = |hash, offset, new| Ok(Appended { hash, offset, new });
        match record {
            NewRecord::Store { blob, tags } => {
                let hash = blob.hash;
                if let Some(offset) = held_at(&mut tx, &placed, account, &hash)? {
                    out.push(appended(hash, offset, false));
                    continue;
                }
                let size = blob.size;
                place(account, blob);
                insert_message(&mut tx, account, head, now, hash, size, tags)?;
                placed.insert((account, hash), head);
                heads.insert(account, head + 1);
                out.push(appended(hash, head, true));
            }
            NewRecord::Tags {
                hash,
                add,
                remove,
                seen,
                device,
                seq,
            } => {
                if held_at(&mut tx, &placed, account, &hash)?.is_none() {
                    out.push(Err(StoreError::NoSuchMessage(hash)));
                    continue;
                }
                let existing = match tag_ops.get(&(account, device, seq)) {
                    Some(o) => Some(*o),
                    None => tx
                        .query_opt(
                            "SELECT log_offset FROM tag_ops
                             WHERE account_id = $1 AND device = $2 AND seq = $3",
                            &[&account, &(device as i64), &(seq as i64)],
                        )?
                        .map(|r| col::<i64>(&r, 0).map(|o| o as u64))
                        .transpose()?,
                };
                let rec = Record::Tags {
                    hash,
                    add,
                    remove,
                    seen,
                    device,
                    seq,
                };
                if let Some(offset) = existing {
                    let body: Option<Vec<u8>> = tx
                        .query_opt(
                            "SELECT body FROM log WHERE account_id = $1 AND log_offset = $2",
                            &[&account, &(offset as i64)],
                        )?
                        .map(|r| col(&r, 0))
                        .transpose()?;
                    let same = body.is_none_or(|b| b.is_empty() || b == rec.encode());
                    out.push(if same {
                        appended(hash, offset, false)
                    } else {
                        Err(StoreError::Invalid {
                            what: "tag operation",
                            why: format!(
                                "device {device} already used operation number {seq} for \
                                 another change: is this device's login in use on two \
                                 machines? Give each machine its own device \
                                 (postlog account add)"
                            ),
                        })
                    });
                    continue;
                }
                insert_record(&mut tx, account, head, now, &rec)?;
                tx.execute(
                    "INSERT INTO tag_ops (account_id, device, seq, log_offset) VALUES ($1, $2, $3, $4)",
                    &[&account, &(device as i64), &(seq as i64), &(head as i64)],
                )?;
                tag_ops.insert((account, device, seq), head);
                heads.insert(account, head + 1);
                out.push(appended(hash, head, true));
            }
            NewRecord::Send {
                blob,
                from,
                recipients,
            } => {
                let hash = blob.hash;
                let before = match sent.get(&(account, hash)) {
                    Some(o) => Some(*o),
                    None => relay::queued_offset(&mut tx, account, &hash)?,
                };
                if let Some(offset) = before {
                    out.push(appended(hash, offset, false));
                    continue;
                }
                let tags: Vec<String> = postlog_store::SENT_TAGS.map(String::from).to_vec();
                let mut head = head;
                let size = blob.size;
                if held_at(&mut tx, &placed, account, &hash)?.is_some() {
                    server_tags(
                        &mut tx,
                        &mut tag_ops,
                        account,
                        head,
                        now,
                        hash,
                        tags,
                        vec![],
                    )?;
                } else {
                    place(account, blob);
                    insert_message(&mut tx, account, head, now, hash, size, tags)?;
                    placed.insert((account, hash), head);
                }
                head += 1;
                let rec = Record::Send {
                    hash,
                    size: held_size(&mut tx, account, &hash)?.unwrap_or(size),
                    from: from.clone(),
                    recipients: recipients.clone(),
                };
                insert_record(&mut tx, account, head, now, &rec)?;
                relay::enqueue(&mut tx, account, &hash, head, &from, &recipients, now)?;
                sent.insert((account, hash), head);
                heads.insert(account, head + 1);
                out.push(appended(hash, head, true));
            }
            NewRecord::Relayed {
                hash,
                reports,
                bounce,
            } => {
                let mut head = head;
                let finished = relay::apply_report(&mut tx, account, &hash, &reports)?;
                let still_held = held_at(&mut tx, &placed, account, &hash)?.is_some();
                if let Some((blob, tags)) = bounce.filter(|_| still_held) {
                    let bounce_hash = blob.hash;
                    if held_at(&mut tx, &placed, account, &bounce_hash)?.is_none() {
                        let size = blob.size;
                        place(account, blob);
                        insert_message(&mut tx, account, head, now, bounce_hash, size, tags)?;
                        placed.insert((account, bounce_hash), head);
                        head += 1;
                    }
                }
                if let Some(any_failed) = finished
                    && held_at(&mut tx, &placed, account, &hash)?.is_some()
                {
                    let done = if any_failed {
                        postlog_store::BOUNCED_TAG
                    } else {
                        postlog_store::DELIVERED_TAG
                    };
                    server_tags(
                        &mut tx,
                        &mut tag_ops,
                        account,
                        head,
                        now,
                        hash,
                        vec![done.to_string()],
                        vec![postlog_store::SENT_TAGS[1].to_string()],
                    )?;
                    head += 1;
                }
                heads.insert(account, head);
                out.push(appended(hash, head, true));
            }
            NewRecord::Delete { hash } => {
                let r = scrub::delete(&mut tx, account, &hash, head, now, unlinks)?;
                placed.remove(&(account, hash));
                sent.remove(&(account, hash));
                out.push(Ok(scrub_outcome(hash, head, r, &mut heads, account)));
            }
            NewRecord::Expire {
                hash,
                tag,
                set_before_ms,
            } => {
                let st = scrub::history(&mut tx, account, &hash)?.state();
                let since = scrub::tag_set_since(&mut tx, account, &st, &tag)?;
                let r = if since.is_some_and(|t| t <= set_before_ms) {
                    placed.remove(&(account, hash));
                    sent.remove(&(account, hash));
                    scrub::delete(&mut tx, account, &hash, head, now, unlinks)?
                } else {
                    None
                };
                out.push(Ok(scrub_outcome(hash, head, r, &mut heads, account)));
            }
            NewRecord::Compact { hash } => {
                let r = scrub::compact(&mut tx, account, &hash, head, now)?;
                out.push(Ok(scrub_outcome(hash, head, r, &mut heads, account)));
            }
        }
    }
    // Blobs durable before the records that name them.
    objects.put_files(uploads)?;
    let update = tx.prepare("UPDATE heads SET head = $2 WHERE account_id = $1")?;
    let mut changed = HashMap::new();
    for (account, head) in &heads {
        if locked.get(account) != Some(head) {
            tx.execute(&update, &[account, &(*head as i64)])?;
            tx.execute(
                "SELECT pg_notify('postlog_heads', $1)",
                &[&format!("{account}:{head}")],
            )?;
            changed.insert(*account, *head);
        }
    }
    tx.commit()?;
    drop(staged); // removes the staged files
    Ok((out, changed))
}

/// The Store offset of a message the account holds (committed, or placed in this group).
fn held_at(
    c: &mut impl GenericClient,
    placed: &Placed,
    account: AccountId,
    hash: &BlobHash,
) -> R<Option<LogOffset>> {
    if let Some(o) = placed.get(&(account, *hash)) {
        return Ok(Some(*o));
    }
    c.query_opt(
        "SELECT log_offset FROM blobs WHERE account_id = $1 AND hash = $2",
        &[&account, &hash.0.as_slice()],
    )?
    .map(|r| col::<i64>(&r, 0).map(|o| o as u64))
    .transpose()
}

fn held_size(c: &mut impl GenericClient, account: AccountId, hash: &BlobHash) -> R<Option<u64>> {
    c.query_opt(
        "SELECT size FROM blobs WHERE account_id = $1 AND hash = $2",
        &[&account, &hash.0.as_slice()],
    )?
    .map(|r| col::<i64>(&r, 0).map(|s| s as u64))
    .transpose()
}

/// Inserts a record at `offset`, and its `refs` row when it names a message.
pub(crate) fn insert_record(
    c: &mut impl GenericClient,
    account: AccountId,
    offset: LogOffset,
    time_ms: u64,
    record: &Record,
) -> R<()> {
    let body = record.encode();
    let sum = kit::checksum(account, offset, &body);
    c.execute(
        "INSERT INTO log (account_id, log_offset, time_ms, kind, body, checksum)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &account,
            &(offset as i64),
            &(time_ms as i64),
            &kit::record_kind(record),
            &body,
            &sum.as_slice(),
        ],
    )?;
    if let Some(hash) = record.hash() {
        c.execute(
            "INSERT INTO refs (account_id, hash, log_offset) VALUES ($1, $2, $3)",
            &[&account, &hash.0.as_slice(), &(offset as i64)],
        )?;
    }
    Ok(())
}

fn insert_message(
    c: &mut impl GenericClient,
    account: AccountId,
    offset: LogOffset,
    now: u64,
    hash: BlobHash,
    size: u64,
    tags: Vec<String>,
) -> R<()> {
    insert_record(c, account, offset, now, &Record::Store { hash, size, tags })?;
    c.execute(
        "INSERT INTO blobs (account_id, hash, log_offset, size) VALUES ($1, $2, $3, $4)",
        &[
            &account,
            &hash.0.as_slice(),
            &(offset as i64),
            &(size as i64),
        ],
    )?;
    Ok(())
}

/// A Tags record of the server itself (device 0, `seq` = its own offset).
#[allow(clippy::too_many_arguments)]
fn server_tags(
    c: &mut impl GenericClient,
    tag_ops: &mut HashMap<(AccountId, DeviceId, u64), LogOffset>,
    account: AccountId,
    offset: LogOffset,
    now: u64,
    hash: BlobHash,
    add: Vec<String>,
    remove: Vec<String>,
) -> R<()> {
    let rec = Record::Tags {
        hash,
        add,
        remove,
        seen: offset.saturating_sub(1),
        device: SERVER_DEVICE,
        seq: offset,
    };
    insert_record(c, account, offset, now, &rec)?;
    c.execute(
        "INSERT INTO tag_ops (account_id, device, seq, log_offset) VALUES ($1, $2, $3, $4)",
        &[
            &account,
            &(SERVER_DEVICE as i64),
            &(offset as i64),
            &(offset as i64),
        ],
    )?;
    tag_ops.insert((account, SERVER_DEVICE, offset), offset);
    Ok(())
}

fn scrub_outcome(
    hash: BlobHash,
    head: LogOffset,
    r: Option<(LogOffset, LogOffset)>,
    heads: &mut HashMap<AccountId, LogOffset>,
    account: AccountId,
) -> Appended {
    match r {
        Some((offset, new_head)) => {
            heads.insert(account, new_head);
            Appended {
                hash,
                offset,
                new: true,
            }
        }
        None => Appended {
            hash,
            offset: head,
            new: false,
        },
    }
}

/// Removes a deleted (or never recorded) message's object, unless the account holds those
/// bytes; `true` if it was removed. Used for deletions and by the garbage collector;
/// under the account's lock, so a concurrent Store of those bytes on another node cannot
/// have its fresh upload removed.
pub(crate) fn unlink(
    c: &mut Client,
    objects: &Objects,
    account: AccountId,
    hash: &BlobHash,
) -> R<bool> {
    let mut tx = c.transaction()?;
    tx.execute(
        "SELECT head FROM heads WHERE account_id = $1 FOR UPDATE",
        &[&account],
    )?;
    let held = tx
        .query_opt(
            "SELECT 1 FROM blobs WHERE account_id = $1 AND hash = $2",
            &[&account, &hash.0.as_slice()],
        )?
        .is_some();
    if !held {
        objects.delete(account, hash)?;
    }
    tx.execute(
        "DELETE FROM unlink_pending WHERE account_id = $1 AND hash = $2",
        &[&account, &hash.0.as_slice()],
    )?;
    tx.commit()?;
    Ok(!held)
}

/// Finishes deletions a crash interrupted between the commit and the object removal.
pub(crate) fn finish_pending(c: &mut Client, objects: &Objects) {
    let pending = match c.query("SELECT account_id, hash FROM unlink_pending", &[]) {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "reading unlink_pending failed");
            return;
        }
    };
    for row in &pending {
        let (Ok(account), Ok(hash)) = (col::<AccountId>(row, 0), crate::hash_col(row, 1)) else {
            continue;
        };
        if let Err(e) = unlink(c, objects, account, &hash) {
            tracing::warn!(error = %e, "finishing a deletion failed; retried at the next start");
        }
    }
}
