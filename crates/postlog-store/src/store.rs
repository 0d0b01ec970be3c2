//! The embedded backend: SQLite log + file blobs, with a group-committing writer thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use postlog_proto::{BlobHash, LogEntry, LogOffset, Record};
use rusqlite::{Connection, OptionalExtension, params};

use crate::accounts::{self, AccountId, DeviceId};
use crate::blobs::{self, BlobWriter, StagedBlob};
use crate::db::{self, KIND_SCRUBBED};
use crate::relay::{self, QueuedSend, RecipientReport};
use crate::scrub::{self, MessageSummary};
use crate::{Result, StoreError, now_ms};

/// Most appends committed in one transaction.
const MAX_GROUP: usize = 1024;
/// How soon the writer retries a WAL checkpoint that readers kept from completing.
const CHECKPOINT_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// A record to append.
#[derive(Debug)]
pub enum NewRecord {
    /// A message: placed in the blob store and recorded, unless the account already holds it.
    Store { blob: StagedBlob, tags: Vec<String> },
    /// A tag change by `device`, idempotent by `(device, seq)`; the account must hold the
    /// message.
    Tags {
        hash: BlobHash,
        add: Vec<String>,
        remove: Vec<String>,
        seen: LogOffset,
        device: DeviceId,
        seq: u64,
    },
    /// A message submitted for sending, idempotent by hash: the message is stored (tagged
    /// `sent` and `queued`) unless held already (then it gets those tags), then the Send
    /// record is appended and every recipient queued for relay, in one transaction. The
    /// outcome's offset is the Send record's.
    Send {
        blob: StagedBlob,
        from: String,
        recipients: Vec<String>,
    },
    /// The relay worker's report of one attempt for a sent message. Updates the queue; a
    /// `bounce` (with its tags) is stored as a new message; when the report settles the last
    /// pending recipient, the sent message's `queued` tag becomes `delivered` or `bounced`.
    Relayed {
        hash: BlobHash,
        reports: Vec<RecipientReport>,
        bounce: Option<(StagedBlob, Vec<String>)>,
    },
    /// Delete a message: scrub every live record that refers to it (one Scrub record) and
    /// remove its blob. Idempotent: `new` is false (offset = Head) when nothing live refers
    /// to it.
    Delete { hash: BlobHash },
    /// The retention rule: delete the message if `tag` has been set on it since before
    /// `set_before_ms` (checked again inside the writer's transaction, so a tag removed
    /// meanwhile saves it).
    Expire {
        hash: BlobHash,
        tag: String,
        set_before_ms: u64,
    },
    /// Replace the message's Tags records by one TagSnapshot record and scrub them.
    /// `new` is false when there was nothing to compact.
    Compact { hash: BlobHash },
}

/// The outcome of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub hash: BlobHash,
    pub offset: LogOffset,
    /// False when nothing was appended because the record already existed (idempotency).
    pub new: bool,
}

/// Called after every group commit with each touched account and its new Head.
pub type HeadWatcher = Arc<dyn Fn(AccountId, LogOffset) + Send + Sync>;

type Done = Box<dyn FnOnce(Result<Appended>) + Send>;

struct Job {
    account: AccountId,
    record: NewRecord,
    done: Done,
}

/// The storage interface the server is written against. All methods block; async callers
/// run them on a blocking thread. `append` reports through `done`, called from the writer.
pub trait Backend: Send + Sync + 'static {
    fn authenticate(
        &self,
        account: &str,
        device: DeviceId,
        secret: &[u8; 32],
    ) -> Result<Option<AccountId>>;
    fn head(&self, account: AccountId) -> Result<LogOffset>;
    /// Up to `max` live entries at offsets >= `from` (scrubbed offsets are skipped).
    fn read_log(&self, account: AccountId, from: LogOffset, max: usize) -> Result<Vec<LogEntry>>;
    fn blob_writer(&self, max_size: u64) -> Result<BlobWriter>;
    fn append(&self, account: AccountId, record: NewRecord, done: Done);
    /// Appends and waits for the outcome (a blocking convenience over `append`).
    fn append_blocking(&self, account: AccountId, record: NewRecord) -> Result<Appended> {
        let (tx, rx) = mpsc::channel();
        self.append(
            account,
            record,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Stopped("writer thread ended".into())))
    }
    /// The verified bytes of a message the account holds; `None` if it holds no such message.
    fn read_blob(&self, account: AccountId, hash: &BlobHash) -> Result<Option<Vec<u8>>>;
    /// [`read_blob`](Backend::read_blob) for several messages, in order. A backend whose
    /// reads have latency (object storage) fetches them concurrently.
    fn read_blobs(&self, account: AccountId, hashes: &[BlobHash]) -> Result<Vec<Option<Vec<u8>>>> {
        hashes.iter().map(|h| self.read_blob(account, h)).collect()
    }
    fn set_head_watcher(&self, watcher: HeadWatcher);
    /// Every revoked device. The server checks its open connections against this set once
    /// per interval (one call per node, not one per connection).
    fn revoked_devices(&self) -> Result<Vec<DeviceId>>;
    /// The account that receives mail for a mail address (exact, `+detail`, catch-all).
    fn resolve_address(&self, address: &str) -> Result<Option<AccountId>>;
    /// The account with this name, if any.
    fn account_by_name(&self, name: &str) -> Result<Option<AccountId>>;
    /// Sent messages with recipients due for a relay attempt at `now_ms` (at most `max`).
    fn relay_due(&self, now_ms: u64, max: usize) -> Result<Vec<QueuedSend>>;
    /// When the next queued recipient is due (ms since the Unix epoch), if any is pending.
    fn relay_next_due(&self) -> Result<Option<u64>>;
    /// Every account, with its name (for per-account policies such as retention).
    fn accounts(&self) -> Result<Vec<(AccountId, String)>>;
    /// Every message the account's live records refer to, with its tag state: one pass
    /// over the account's live records (the retention sweep).
    fn summaries(&self, account: AccountId) -> Result<Vec<MessageSummary>>;
}

/// The embedded store rooted at a data directory.
pub struct Store {
    /// Held for the life of the store: one server per data directory.
    _lock: std::fs::File,
    root: PathBuf,
    writer: Mutex<mpsc::Sender<Job>>,
    readers: Mutex<Vec<Connection>>,
    shared: Arc<Shared>,
}

struct Shared {
    heads: Mutex<HashMap<AccountId, LogOffset>>,
    watcher: Mutex<Option<HeadWatcher>>,
    stopped: Mutex<Option<String>>,
}

impl Store {
    /// Opens (creating if needed) the store in `root`. Removes staged blobs left by a crash:
    /// they were never acknowledged.
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["tmp", "blobs"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        }
        let lock = lock_exclusive(root)?;
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp)
            .map_err(|e| StoreError::io(&tmp, e))?
            .flatten()
        {
            let _ = std::fs::remove_file(entry.path());
        }
        let mut conn = db::open(&root.join("postlog.db"))?;
        conn.execute_batch(db::SCHEMA)?;
        conn.execute_batch(relay::SCHEMA)?;
        scrub::backfill_refs(&mut conn)?;
        // Deletions a crash interrupted after their commit: remove the blobs now.
        if scrub::finish_pending(&conn, root)? {
            scrub::checkpoint(&conn);
        }
        let shared = Arc::new(Shared {
            heads: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            stopped: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer_root = root.to_owned();
        std::thread::Builder::new()
            .name("postlog-log-writer".into())
            .spawn(move || writer_loop(conn, writer_root, rx, writer_shared))
            .map_err(|e| StoreError::io(root, e))?;
        Ok(Store {
            _lock: lock,
            root: root.to_owned(),
            writer: Mutex::new(tx),
            readers: Mutex::new(Vec::new()),
            shared,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.readers.lock().map_err(poisoned)?.pop();
        let conn = match conn {
            Some(c) => c,
            None => db::open(&self.root.join("postlog.db"))?,
        };
        let out = f(&conn);
        self.readers.lock().map_err(poisoned)?.push(conn);
        out
    }

    pub fn account_id(&self, name: &str) -> Result<AccountId> {
        self.with_reader(|c| accounts::account_id(c, name))
    }
}

/// Flushes every dirty page and inode of the filesystem holding `root` (syncfs(2)).
fn sync_filesystem(root: &Path) -> Result<()> {
    let dir = std::fs::File::open(root).map_err(|e| StoreError::io(root, e))?;
    rustix::fs::syncfs(&dir).map_err(|e| StoreError::io(root, e.into()))
}

/// Takes `postlog.lock` so that a second server on the same directory fails cleanly.
pub(crate) fn lock_exclusive(root: &Path) -> Result<std::fs::File> {
    let path = root.join("postlog.lock");
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| StoreError::Locked(root.to_owned()))?;
    Ok(f)
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Stopped("a storage lock was poisoned by a panic".into())
}

impl Backend for Store {
    fn authenticate(
        &self,
        account: &str,
        device: DeviceId,
        secret: &[u8; 32],
    ) -> Result<Option<AccountId>> {
        self.with_reader(|c| accounts::authenticate(c, account, device, secret))
    }

    fn head(&self, account: AccountId) -> Result<LogOffset> {
        if let Some(h) = self.shared.heads.lock().map_err(poisoned)?.get(&account) {
            return Ok(*h);
        }
        let h = self.with_reader(|c| head_from_db(c, account))?;
        // Only insert if the writer has not meanwhile recorded a newer head.
        let mut heads = self.shared.heads.lock().map_err(poisoned)?;
        Ok(*heads.entry(account).or_insert(h))
    }

    fn read_log(&self, account: AccountId, from: LogOffset, max: usize) -> Result<Vec<LogEntry>> {
        let head = self.head(account)?;
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT offset, time_ms, kind, body, checksum FROM log
                 WHERE account_id = ?1 AND offset >= ?2 AND offset < ?3 AND kind != ?4
                 ORDER BY offset LIMIT ?5",
            )?;
            let mut rows = stmt.query(params![
                account,
                from.min(i64::MAX as u64) as i64,
                head as i64,
                KIND_SCRUBBED,
                max as i64
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let offset = row.get::<_, i64>(0)? as u64;
                let body: Vec<u8> = row.get(3)?;
                let sum: Vec<u8> = row.get(4)?;
                let corrupt = |why: String| StoreError::CorruptRecord {
                    account: account.to_string(),
                    offset,
                    why,
                };
                if sum.as_slice() != db::checksum(account, offset, &body) {
                    return Err(corrupt("checksum mismatch".into()));
                }
                let record = Record::decode(&body).map_err(|e| corrupt(e.to_string()))?;
                out.push(LogEntry {
                    offset,
                    time_ms: row.get::<_, i64>(1)? as u64,
                    record,
                });
            }
            Ok(out)
        })
    }

    fn blob_writer(&self, max_size: u64) -> Result<BlobWriter> {
        BlobWriter::create(&self.root.join("tmp"), max_size)
    }

    fn append(&self, account: AccountId, record: NewRecord, done: Done) {
        let job = Job {
            account,
            record,
            done,
        };
        let sent = match self.writer.lock() {
            Ok(w) => w.send(job).map_err(|e| e.0),
            Err(_) => Err(job),
        };
        if let Err(job) = sent {
            (job.done)(Err(StoreError::Stopped("writer thread ended".into())));
        }
    }

    fn read_blob(&self, account: AccountId, hash: &BlobHash) -> Result<Option<Vec<u8>>> {
        let held = || -> Result<bool> {
            self.with_reader(|c| {
                Ok(
                    c.prepare_cached("SELECT 1 FROM blobs WHERE account_id = ?1 AND hash = ?2")?
                        .query_row(params![account, hash.0.as_slice()], |_| Ok(()))
                        .optional()?
                        .is_some(),
                )
            })
        };
        if !held()? {
            return Ok(None);
        }
        match blobs::read_verified(&blobs::blob_path(&self.root, account, hash), hash)? {
            Some(bytes) => Ok(Some(bytes)),
            // Deleted between the two reads (the writer unlinks after its commit), or
            // missing although a live record names it: that is damage.
            None if held()? => Err(StoreError::CorruptBlob(*hash)),
            None => Ok(None),
        }
    }

    fn revoked_devices(&self) -> Result<Vec<DeviceId>> {
        self.with_reader(|c| {
            Ok(
                c.prepare_cached("SELECT id FROM devices WHERE revoked != 0")?
                    .query_map([], |r| r.get::<_, i64>(0).map(|d| d as u64))?
                    .collect::<Result<_, _>>()?,
            )
        })
    }

    fn resolve_address(&self, address: &str) -> Result<Option<AccountId>> {
        self.with_reader(|c| accounts::resolve_address(c, address))
    }

    fn account_by_name(&self, name: &str) -> Result<Option<AccountId>> {
        match self.with_reader(|c| accounts::account_id(c, name)) {
            Ok(id) => Ok(Some(id)),
            Err(StoreError::NoSuchAccount(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn relay_due(&self, now_ms: u64, max: usize) -> Result<Vec<QueuedSend>> {
        self.with_reader(|c| relay::due(c, now_ms, max))
    }

    fn relay_next_due(&self) -> Result<Option<u64>> {
        self.with_reader(relay::next_due)
    }

    fn accounts(&self) -> Result<Vec<(AccountId, String)>> {
        self.with_reader(|c| {
            Ok(
                c.prepare_cached("SELECT id, name FROM accounts ORDER BY id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
            )
        })
    }

    fn summaries(&self, account: AccountId) -> Result<Vec<MessageSummary>> {
        self.with_reader(|c| scrub::summaries(c, account))
    }

    fn set_head_watcher(&self, watcher: HeadWatcher) {
        if let Ok(mut w) = self.shared.watcher.lock() {
            *w = Some(watcher);
        }
    }
}

pub(crate) fn head_from_db(c: &Connection, account: AccountId) -> Result<LogOffset> {
    let h: i64 = c.query_row(
        "SELECT COALESCE(MAX(offset) + 1, 0) FROM log WHERE account_id = ?1",
        [account],
        |r| r.get(0),
    )?;
    Ok(h as u64)
}

/// The single writer: takes every waiting append, commits them in one transaction after
/// making their blobs durable, then answers them all.
fn writer_loop(mut conn: Connection, root: PathBuf, rx: mpsc::Receiver<Job>, shared: Arc<Shared>) {
    // A checkpoint after a scrub that readers kept from completing: retried when idle.
    let mut checkpoint_owed = false;
    loop {
        let first = if checkpoint_owed {
            match rx.recv_timeout(CHECKPOINT_RETRY) {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    checkpoint_owed = !scrub::checkpoint(&conn);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(j) => j,
                Err(_) => break,
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let stopped = shared.stopped.lock().ok().and_then(|s| s.clone());
        if let Some(why) = stopped {
            for job in batch {
                (job.done)(Err(StoreError::Stopped(why.clone())));
            }
            continue;
        }
        let (dones, results, scrubbed) = commit_group(&mut conn, &root, batch, &shared);
        if scrubbed {
            checkpoint_owed = !scrub::checkpoint(&conn);
        }
        let watcher = shared.watcher.lock().ok().and_then(|w| w.clone());
        let mut touched: HashMap<AccountId, LogOffset> = HashMap::new();
        match results {
            Ok(results) => {
                if let Ok(heads) = shared.heads.lock() {
                    for (account, _) in &results {
                        if let Some(h) = heads.get(account) {
                            touched.insert(*account, *h);
                        }
                    }
                }
                for (done, (_, r)) in dones.into_iter().zip(results) {
                    done(r);
                }
                if let Some(w) = watcher {
                    for (account, head) in touched {
                        w(account, head);
                    }
                }
            }
            Err((e, fatal)) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, fatal, "group commit failed");
                if fatal && let Ok(mut s) = shared.stopped.lock() {
                    *s = Some(msg.clone());
                }
                for done in dones {
                    done(Err(StoreError::Stopped(msg.clone())));
                }
            }
        }
    }
}

/// Per job its account and outcome (a job can fail alone, e.g. a Tag of an unknown
/// message); `Err` when the whole group failed (`true`: fatal, writes stop).
type GroupResult = std::result::Result<Vec<(AccountId, Result<Appended>)>, (StoreError, bool)>;

/// Commits one group. The third value says whether it scrubbed anything (then the blobs
/// of deleted messages are already unlinked, and the caller checkpoints the WAL).
fn commit_group(
    conn: &mut Connection,
    root: &Path,
    batch: Vec<Job>,
    shared: &Shared,
) -> (Vec<Done>, GroupResult, bool) {
    let mut unlinks: Vec<(AccountId, BlobHash)> = Vec::new();
    let mut scrubbed = false;
    let mut dones = Vec::with_capacity(batch.len());
    let mut work = Vec::with_capacity(batch.len());
    for job in batch {
        dones.push(job.done);
        work.push((job.account, job.record));
    }
    let result = (|| -> GroupResult {
        let not_fatal = |e: StoreError| (e, false);
        let tx = conn.transaction().map_err(|e| not_fatal(e.into()))?;
        let mut heads: HashMap<AccountId, LogOffset> = HashMap::new();
        let mut placed: HashMap<(AccountId, BlobHash), LogOffset> = HashMap::new();
        let mut placed_any = false;
        let mut tag_ops: HashMap<(AccountId, DeviceId, u64), LogOffset> = HashMap::new();
        let mut sent: HashMap<(AccountId, BlobHash), LogOffset> = HashMap::new();
        let mut out = Vec::with_capacity(work.len());
        let now = now_ms();
        for (account, record) in work {
            let head = match heads.get(&account) {
                Some(h) => *h,
                None => head_from_db(&tx, account).map_err(not_fatal)?,
            };
            match record {
                NewRecord::Store { blob, tags } => {
                    let hash = blob.hash;
                    let existing: Option<i64> = match placed.get(&(account, hash)) {
                        Some(o) => Some(*o as i64),
                        None => tx
                            .query_row(
                                "SELECT offset FROM blobs WHERE account_id = ?1 AND hash = ?2",
                                params![account, hash.0.as_slice()],
                                |r| r.get(0),
                            )
                            .optional()
                            .map_err(|e| not_fatal(e.into()))?,
                    };
                    if let Some(offset) = existing {
                        out.push((
                            account,
                            Ok(Appended {
                                hash,
                                offset: offset as u64,
                                new: false,
                            }),
                        ));
                        heads.insert(account, head);
                        continue; // dropping `blob` removes the staged copy
                    }
                    let size = blob.size;
                    blob.place(&blobs::blob_path(root, account, &hash))
                        .map_err(not_fatal)?;
                    placed_any = true;
                    insert_message(&tx, account, head, now, hash, size, tags).map_err(not_fatal)?;
                    placed.insert((account, hash), head);
                    heads.insert(account, head + 1);
                    out.push((
                        account,
                        Ok(Appended {
                            hash,
                            offset: head,
                            new: true,
                        }),
                    ));
                }
                NewRecord::Tags {
                    hash,
                    add,
                    remove,
                    seen,
                    device,
                    seq,
                } => {
                    heads.insert(account, head);
                    if !held(&tx, &placed, account, &hash).map_err(not_fatal)? {
                        out.push((account, Err(StoreError::NoSuchMessage(hash))));
                        continue;
                    }
                    let existing: Option<u64> = match tag_ops.get(&(account, device, seq)) {
                        Some(o) => Some(*o),
                        None => tx
                            .query_row(
                                "SELECT offset FROM tag_ops WHERE account_id = ?1 AND device = ?2 AND seq = ?3",
                                params![account, device as i64, seq as i64],
                                |r| r.get::<_, i64>(0),
                            )
                            .optional()
                            .map_err(|e| not_fatal(e.into()))?
                            .map(|o| o as u64),
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
                        // A retry must be the same operation; a different one with a used
                        // (device, seq) means two replicas share one device's login.
                        let body: Option<Vec<u8>> = tx
                            .query_row(
                                "SELECT body FROM log WHERE account_id = ?1 AND offset = ?2",
                                params![account, offset as i64],
                                |r| r.get(0),
                            )
                            .optional()
                            .map_err(|e| not_fatal(e.into()))?;
                        // A scrubbed row (its message deleted, or the record compacted)
                        // was this operation: it had its effect.
                        let same = body.is_none_or(|b| b.is_empty() || b == rec.encode());
                        out.push((
                            account,
                            if same {
                                Ok(Appended {
                                    hash,
                                    offset,
                                    new: false,
                                })
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
                            },
                        ));
                        continue;
                    }
                    insert_record(&tx, account, head, now, &rec).map_err(not_fatal)?;
                    tx.execute(
                        "INSERT INTO tag_ops (account_id, device, seq, offset) VALUES (?1, ?2, ?3, ?4)",
                        params![account, device as i64, seq as i64, head as i64],
                    )
                    .map_err(|e| not_fatal(e.into()))?;
                    tag_ops.insert((account, device, seq), head);
                    heads.insert(account, head + 1);
                    out.push((
                        account,
                        Ok(Appended {
                            hash,
                            offset: head,
                            new: true,
                        }),
                    ));
                }
                NewRecord::Send {
                    blob,
                    from,
                    recipients,
                } => {
                    let hash = blob.hash;
                    heads.insert(account, head);
                    let before = match sent.get(&(account, hash)) {
                        Some(o) => Some(*o),
                        None => relay::queued_offset(&tx, account, &hash).map_err(not_fatal)?,
                    };
                    if let Some(offset) = before {
                        out.push((
                            account,
                            Ok(Appended {
                                hash,
                                offset,
                                new: false,
                            }),
                        ));
                        continue;
                    }
                    let tags: Vec<String> = relay::SENT_TAGS.map(String::from).to_vec();
                    let mut head = head;
                    if held(&tx, &placed, account, &hash).map_err(not_fatal)? {
                        server_tags(&tx, &mut tag_ops, account, head, now, hash, tags, vec![])
                            .map_err(not_fatal)?;
                    } else {
                        let size = blob.size;
                        blob.place(&blobs::blob_path(root, account, &hash))
                            .map_err(not_fatal)?;
                        placed_any = true;
                        insert_message(&tx, account, head, now, hash, size, tags)
                            .map_err(not_fatal)?;
                        placed.insert((account, hash), head);
                    }
                    head += 1;
                    let size = relay_size(&tx, account, &hash).map_err(not_fatal)?;
                    let rec = Record::Send {
                        hash,
                        size,
                        from: from.clone(),
                        recipients: recipients.clone(),
                    };
                    insert_record(&tx, account, head, now, &rec).map_err(not_fatal)?;
                    relay::enqueue(&tx, account, &hash, head, &from, &recipients, now)
                        .map_err(not_fatal)?;
                    sent.insert((account, hash), head);
                    heads.insert(account, head + 1);
                    out.push((
                        account,
                        Ok(Appended {
                            hash,
                            offset: head,
                            new: true,
                        }),
                    ));
                }
                NewRecord::Relayed {
                    hash,
                    reports,
                    bounce,
                } => {
                    let mut head = head;
                    let finished =
                        relay::apply_report(&tx, account, &hash, &reports).map_err(not_fatal)?;
                    // A message deleted while its attempt ran: its bounce (which quotes its
                    // header) is dropped with it.
                    let still_held = held(&tx, &placed, account, &hash).map_err(not_fatal)?;
                    if let Some((blob, tags)) = bounce.filter(|_| still_held) {
                        let bounce_hash = blob.hash;
                        if !held(&tx, &placed, account, &bounce_hash).map_err(not_fatal)? {
                            let size = blob.size;
                            blob.place(&blobs::blob_path(root, account, &bounce_hash))
                                .map_err(not_fatal)?;
                            placed_any = true;
                            insert_message(&tx, account, head, now, bounce_hash, size, tags)
                                .map_err(not_fatal)?;
                            placed.insert((account, bounce_hash), head);
                            head += 1;
                        }
                    }
                    if let Some(f) = finished
                        && held(&tx, &placed, account, &hash).map_err(not_fatal)?
                    {
                        let done = if f.any_failed {
                            relay::BOUNCED_TAG
                        } else {
                            relay::DELIVERED_TAG
                        };
                        server_tags(
                            &tx,
                            &mut tag_ops,
                            account,
                            head,
                            now,
                            hash,
                            vec![done.to_string()],
                            vec![relay::SENT_TAGS[1].to_string()],
                        )
                        .map_err(not_fatal)?;
                        head += 1;
                    }
                    heads.insert(account, head);
                    out.push((
                        account,
                        Ok(Appended {
                            hash,
                            offset: head,
                            new: true,
                        }),
                    ));
                }
                NewRecord::Delete { hash } => {
                    let r = scrub::delete(&tx, account, &hash, head, now, &mut unlinks)
                        .map_err(not_fatal)?;
                    placed.remove(&(account, hash));
                    sent.remove(&(account, hash));
                    scrubbed |= r.is_some();
                    out.push((
                        account,
                        Ok(scrub_outcome(hash, head, r, &mut heads, account)),
                    ));
                }
                NewRecord::Expire {
                    hash,
                    tag,
                    set_before_ms,
                } => {
                    let st = scrub::history(&tx, account, &hash)
                        .map_err(not_fatal)?
                        .state();
                    let since = scrub::tag_set_since(&tx, account, &st, &tag).map_err(not_fatal)?;
                    let r = if since.is_some_and(|t| t <= set_before_ms) {
                        placed.remove(&(account, hash));
                        sent.remove(&(account, hash));
                        scrub::delete(&tx, account, &hash, head, now, &mut unlinks)
                            .map_err(not_fatal)?
                    } else {
                        None
                    };
                    scrubbed |= r.is_some();
                    out.push((
                        account,
                        Ok(scrub_outcome(hash, head, r, &mut heads, account)),
                    ));
                }
                NewRecord::Compact { hash } => {
                    let r = scrub::compact(&tx, account, &hash, head, now).map_err(not_fatal)?;
                    scrubbed |= r.is_some();
                    out.push((
                        account,
                        Ok(scrub_outcome(hash, head, r, &mut heads, account)),
                    ));
                }
            }
        }
        // Blobs durable before the records that name them: one barrier for the whole group
        // (file data and the renames) instead of an fsync per file and per directory.
        if placed_any {
            sync_filesystem(root).map_err(|e| (e, true))?;
        }
        tx.commit().map_err(|e| (e.into(), true))?;
        if let Ok(mut h) = shared.heads.lock() {
            h.extend(heads);
        }
        Ok(out)
    })();
    if result.is_ok() {
        // The records are gone; now their blobs (a crash before this point leaves the
        // `unlink_pending` rows for the next start).
        scrub::unlink_deleted(conn, root, &unlinks);
    }
    let scrubbed = scrubbed && result.is_ok();
    (dones, result, scrubbed)
}

/// Whether the account holds the message (committed, or placed earlier in this group).
fn held(
    tx: &Connection,
    placed: &HashMap<(AccountId, BlobHash), LogOffset>,
    account: AccountId,
    hash: &BlobHash,
) -> Result<bool> {
    if placed.contains_key(&(account, *hash)) {
        return Ok(true);
    }
    Ok(tx
        .query_row(
            "SELECT 1 FROM blobs WHERE account_id = ?1 AND hash = ?2",
            params![account, hash.0.as_slice()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The size of a message the account holds (0 if it holds none).
fn relay_size(tx: &Connection, account: AccountId, hash: &BlobHash) -> Result<u64> {
    Ok(tx
        .query_row(
            "SELECT size FROM blobs WHERE account_id = ?1 AND hash = ?2",
            params![account, hash.0.as_slice()],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

/// Appends the Store record of a message just placed in the blob store, and indexes it.
fn insert_message(
    tx: &Connection,
    account: AccountId,
    offset: LogOffset,
    now: u64,
    hash: BlobHash,
    size: u64,
    tags: Vec<String>,
) -> Result<()> {
    insert_record(
        tx,
        account,
        offset,
        now,
        &Record::Store { hash, size, tags },
    )?;
    tx.execute(
        "INSERT INTO blobs (account_id, hash, offset, size) VALUES (?1, ?2, ?3, ?4)",
        params![account, hash.0.as_slice(), offset as i64, size as i64],
    )?;
    Ok(())
}

/// Appends a Tags record made by the server itself (device 0; its `seq` is the record's own
/// offset, its `seen` everything before it), e.g. the delivery state of a sent message.
#[allow(clippy::too_many_arguments)]
fn server_tags(
    tx: &Connection,
    tag_ops: &mut HashMap<(AccountId, DeviceId, u64), LogOffset>,
    account: AccountId,
    offset: LogOffset,
    now: u64,
    hash: BlobHash,
    add: Vec<String>,
    remove: Vec<String>,
) -> Result<()> {
    let rec = Record::Tags {
        hash,
        add,
        remove,
        seen: offset.saturating_sub(1),
        device: SERVER_DEVICE,
        seq: offset,
    };
    insert_record(tx, account, offset, now, &rec)?;
    tx.execute(
        "INSERT INTO tag_ops (account_id, device, seq, offset) VALUES (?1, ?2, ?3, ?4)",
        params![account, SERVER_DEVICE as i64, offset as i64, offset as i64],
    )?;
    tag_ops.insert((account, SERVER_DEVICE, offset), offset);
    Ok(())
}

/// The device id of Tags records the server appends on its own (devices count from 1).
pub const SERVER_DEVICE: DeviceId = 0;

/// The answer to a Delete, Expire or Compact: the offset of the last record it appended
/// (`new`), or the Head when it appended nothing.
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
        None => {
            heads.insert(account, head);
            Appended {
                hash,
                offset: head,
                new: false,
            }
        }
    }
}

/// Inserts a record at `offset`, and its `refs` row when it refers to a message. Every
/// record goes through here, so the hash -> offsets index stays complete.
pub(crate) fn insert_record(
    tx: &Connection,
    account: AccountId,
    offset: LogOffset,
    time_ms: u64,
    record: &Record,
) -> Result<()> {
    let body = record.encode();
    let kind = crate::kit::record_kind(record);
    tx.execute(
        "INSERT INTO log (account_id, offset, time_ms, kind, body, checksum)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            account,
            offset as i64,
            time_ms as i64,
            kind,
            body,
            db::checksum(account, offset, &body).as_slice()
        ],
    )?;
    if let Some(hash) = record.hash() {
        tx.prepare_cached("INSERT INTO refs (account_id, hash, offset) VALUES (?1, ?2, ?3)")?
            .execute(params![account, hash.0.as_slice(), offset as i64])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(store: &Store, bytes: &[u8]) -> StagedBlob {
        let mut w = store.blob_writer(1 << 20).unwrap();
        w.write(bytes).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn append_is_idempotent_and_isolated() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut accounts = crate::Accounts::open(dir.path()).unwrap();
        let a = accounts
            .add_device("ann", &["ann@example.org".into()], "laptop")
            .unwrap();
        let b = accounts.add_device("bob", &[], "phone").unwrap();
        let tags = vec!["inbox".to_string()];
        let r1 = store
            .append_blocking(
                a.account_id,
                NewRecord::Store {
                    blob: stage(&store, b"m1"),
                    tags: tags.clone(),
                },
            )
            .unwrap();
        let r2 = store
            .append_blocking(
                a.account_id,
                NewRecord::Store {
                    blob: stage(&store, b"m1"),
                    tags: tags.clone(),
                },
            )
            .unwrap();
        assert_eq!((r1.offset, r1.new), (0, true));
        assert_eq!((r2.offset, r2.new), (0, false));
        assert_eq!(store.head(a.account_id).unwrap(), 1);
        assert_eq!(
            store.read_blob(a.account_id, &r1.hash).unwrap().as_deref(),
            Some(&b"m1"[..])
        );
        // Another account cannot see it.
        assert_eq!(store.read_blob(b.account_id, &r1.hash).unwrap(), None);
        assert_eq!(store.head(b.account_id).unwrap(), 0);
        let log = store.read_log(a.account_id, 0, 10).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(
            log[0].record,
            Record::Store {
                hash: r1.hash,
                size: 2,
                tags
            }
        );
        // Authentication: right secret, wrong secret, wrong account, revoked.
        assert_eq!(
            store.authenticate("ann", a.device, &a.secret).unwrap(),
            Some(a.account_id)
        );
        assert_eq!(store.authenticate("ann", a.device, &[0; 32]).unwrap(), None);
        assert_eq!(
            store.authenticate("bob", a.device, &a.secret).unwrap(),
            None
        );
        assert!(accounts.revoke_device("ann", a.device).unwrap());
        assert!(!accounts.revoke_device("ann", 999).unwrap());
        assert_eq!(accounts.list_devices("ann").unwrap().len(), 1);
        assert!(
            Store::open(dir.path()).is_err(),
            "a second store on one directory"
        );
        assert_eq!(
            store.authenticate("ann", a.device, &a.secret).unwrap(),
            None
        );
        // Nothing left in tmp/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn addresses_resolve_exactly_by_detail_and_by_catch_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut accounts = crate::Accounts::open(dir.path()).unwrap();
        let ann = accounts
            .add_device("ann", &["Ann@Example.org".into()], "laptop")
            .unwrap()
            .account_id;
        let bob = accounts
            .add_device(
                "bob",
                &["bob@example.org".into(), "@bob.test".into()],
                "phone",
            )
            .unwrap()
            .account_id;
        for (address, want) in [
            ("ann@example.org", Some(ann)),
            ("ANN@EXAMPLE.ORG", Some(ann)),
            ("ann+lists@example.org", Some(ann)),
            ("bob@example.org", Some(bob)),
            ("anything@bob.test", Some(bob)),
            ("anything@Bob.Test", Some(bob)),
            ("nobody@example.org", None),
            ("+x@example.org", None),
            ("ann", None),
            ("@bob.test", None),
            ("ann@", None),
        ] {
            assert_eq!(store.resolve_address(address).unwrap(), want, "{address}");
            assert_eq!(
                accounts.resolve_address(address).unwrap(),
                want,
                "{address}"
            );
        }
        assert_eq!(store.account_by_name("bob").unwrap(), Some(bob));
        assert_eq!(store.account_by_name("carol").unwrap(), None);
        assert_eq!(
            accounts.addresses("bob").unwrap(),
            ["@bob.test", "bob@example.org"]
        );
        // An address belongs to one account; malformed ones are refused.
        for bad in ["bob@example.org", "no-at-sign", "a@", "a b@c"] {
            assert!(
                accounts.add_device("ann", &[bad.into()], "x").is_err(),
                "{bad}"
            );
        }
        // One staged message into two accounts: two copies, both placed.
        let blob = stage(&store, b"to both");
        let copy = blob.duplicate().unwrap();
        let a = store
            .append_blocking(ann, NewRecord::Store { blob, tags: vec![] })
            .unwrap();
        let b = store
            .append_blocking(
                bob,
                NewRecord::Store {
                    blob: copy,
                    tags: vec![],
                },
            )
            .unwrap();
        assert_eq!(a.hash, b.hash);
        assert_eq!(
            store.read_blob(bob, &b.hash).unwrap().as_deref(),
            Some(&b"to both"[..])
        );
        assert!(crate::verify(dir.path()).unwrap().is_ok());
    }

    #[test]
    fn corrupt_blob_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = crate::Accounts::open(dir.path())
            .unwrap()
            .add_device("ann", &[], "laptop")
            .unwrap();
        let r = store
            .append_blocking(
                a.account_id,
                NewRecord::Store {
                    blob: stage(&store, b"hello"),
                    tags: vec![],
                },
            )
            .unwrap();
        std::fs::write(
            blobs::blob_path(dir.path(), a.account_id, &r.hash),
            b"jello",
        )
        .unwrap();
        assert!(matches!(
            store.read_blob(a.account_id, &r.hash),
            Err(StoreError::CorruptBlob(_))
        ));
    }

    #[test]
    fn group_commit_orders_concurrent_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = crate::Accounts::open(dir.path())
            .unwrap()
            .add_device("ann", &[], "laptop")
            .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let blob = stage(&store, format!("msg {t} {i}").as_bytes());
                        store
                            .append_blocking(a.account_id, NewRecord::Store { blob, tags: vec![] })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = store.read_log(a.account_id, 0, 1000).unwrap();
        assert_eq!(log.len(), 200);
        assert!(log.iter().enumerate().all(|(i, e)| e.offset == i as u64));
        assert!(crate::verify(dir.path()).unwrap().is_ok());
    }

    /// Every file under `root`, read whole: the raw bytes a deleted message must be gone
    /// from.
    pub(crate) fn find_in_files(root: &Path, needles: &[&[u8]]) -> Vec<String> {
        let mut hits = Vec::new();
        let mut dirs = vec![root.to_owned()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let name = p.to_string_lossy().into_owned();
                if p.is_dir() {
                    dirs.push(p);
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap();
                for n in needles {
                    if name.contains(&*String::from_utf8_lossy(n))
                        || bytes.windows(n.len()).any(|w| w == *n)
                    {
                        hits.push(name.clone());
                    }
                }
            }
        }
        hits
    }

    #[test]
    fn delete_scrubs_every_trace_and_compaction_keeps_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = crate::Accounts::open(dir.path())
            .unwrap()
            .add_device("ann", &[], "laptop")
            .unwrap()
            .account_id;
        let body = b"Subject: x\r\n\r\nunique-body-7f3a9c\r\n";
        let store_msg = |bytes: &[u8], tags: &[&str]| {
            let blob = stage(&store, bytes);
            let tags = tags.iter().map(|t| t.to_string()).collect();
            store
                .append_blocking(a, NewRecord::Store { blob, tags })
                .unwrap()
        };
        let tag = |hash: BlobHash, add: &[&str], remove: &[&str], seen, seq| {
            store.append_blocking(
                a,
                NewRecord::Tags {
                    hash,
                    add: add.iter().map(|t| t.to_string()).collect(),
                    remove: remove.iter().map(|t| t.to_string()).collect(),
                    seen,
                    device: 7,
                    seq,
                },
            )
        };
        let m1 = store_msg(body, &["inbox", "unread"]);
        let m2 = store_msg(b"other", &["inbox"]);
        tag(m1.hash, &["flagged"], &["unread"], 1, 1).unwrap();
        tag(m2.hash, &["a"], &[], 2, 2).unwrap();
        tag(m2.hash, &["b"], &["inbox"], 3, 3).unwrap();
        tag(m2.hash, &["c"], &["a"], 3, 4).unwrap();
        // offsets: 0 m1, 1 m2, 2 tag m1, 3..=5 tags m2
        let d = store
            .append_blocking(a, NewRecord::Delete { hash: m1.hash })
            .unwrap();
        assert_eq!((d.offset, d.new), (6, true));
        let again = store
            .append_blocking(a, NewRecord::Delete { hash: m1.hash })
            .unwrap();
        assert_eq!((again.offset, again.new), (7, false), "idempotent");
        let log = store.read_log(a, 0, 100).unwrap();
        let offsets: Vec<u64> = log.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [1, 3, 4, 5, 6]);
        assert_eq!(
            log[4].record,
            Record::Scrub {
                offsets: vec![0, 2]
            }
        );
        assert_eq!(store.read_blob(a, &m1.hash).unwrap(), None);
        assert!(matches!(
            tag(m1.hash, &["x"], &[], 6, 5),
            Err(StoreError::NoSuchMessage(_))
        ));
        // A retry of the scrubbed tag operation is answered as done, not as a conflict.
        assert!(!tag(m1.hash, &["flagged"], &["unread"], 1, 1).is_ok_and(|r| r.new));
        let hex = m1.hash.to_hex();
        let hits = find_in_files(
            dir.path(),
            &[&m1.hash.0, hex.as_bytes(), b"unique-body-7f3a9c"],
        );
        assert!(hits.is_empty(), "traces of the deleted message in {hits:?}");
        assert!(crate::verify(dir.path()).unwrap().is_ok());

        // Compaction: one snapshot replaces the three Tags records; same tags.
        let before = scrub::history(
            &db::open(&dir.path().join("postlog.db")).unwrap(),
            a,
            &m2.hash,
        )
        .unwrap()
        .state();
        let c = store
            .append_blocking(a, NewRecord::Compact { hash: m2.hash })
            .unwrap();
        assert_eq!((c.offset, c.new), (8, true));
        let log = store.read_log(a, 7, 100).unwrap();
        assert!(matches!(log[0].record, Record::TagSnapshot { .. }));
        assert_eq!(
            log[1].record,
            Record::Scrub {
                offsets: vec![3, 4, 5]
            }
        );
        let conn = db::open(&dir.path().join("postlog.db")).unwrap();
        let after = scrub::history(&conn, a, &m2.hash).unwrap().state();
        assert_eq!(after, before);
        assert_eq!(after.tags(), ["b", "c"]);
        assert!(
            !store
                .append_blocking(a, NewRecord::Compact { hash: m2.hash })
                .unwrap()
                .new,
            "one snapshot is already compact"
        );
        // The same bytes stored again come back as a new message.
        let back = store_msg(body, &["inbox"]);
        assert_eq!((back.hash, back.offset, back.new), (m1.hash, 9, true));
        assert_eq!(
            store.read_blob(a, &m1.hash).unwrap().as_deref(),
            Some(&body[..])
        );
        // Retention: `b` was set just now, so an older cutoff keeps the message, a later
        // one deletes it.
        let keep = store
            .append_blocking(
                a,
                NewRecord::Expire {
                    hash: m2.hash,
                    tag: "b".into(),
                    set_before_ms: 1,
                },
            )
            .unwrap();
        assert!(!keep.new);
        let gone = store
            .append_blocking(
                a,
                NewRecord::Expire {
                    hash: m2.hash,
                    tag: "b".into(),
                    set_before_ms: u64::MAX,
                },
            )
            .unwrap();
        assert!(gone.new);
        assert_eq!(store.read_blob(a, &m2.hash).unwrap(), None);
        let r = crate::verify(dir.path()).unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
        // A crash between a scrub's commit and its unlink leaves the blob file and its
        // unlink_pending row: verify reports it, the next start removes it.
        let path = blobs::blob_path(dir.path(), a, &m2.hash);
        std::fs::write(&path, b"other").unwrap();
        conn.execute(
            "INSERT INTO unlink_pending (account_id, hash) VALUES (?1, ?2)",
            params![a, m2.hash.0.as_slice()],
        )
        .unwrap();
        let r = crate::verify(dir.path()).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!path.exists());
        assert!(crate::verify(dir.path()).unwrap().is_ok());
        // The refs index is rebuilt from the log for an older data directory.
        drop(store);
        conn.execute_batch("DELETE FROM refs; PRAGMA user_version = 0;")
            .unwrap();
        drop(conn);
        let store = Store::open(dir.path()).unwrap();
        assert!(crate::verify(dir.path()).unwrap().is_ok());
        drop(store);
    }

    /// Deleted keys do not survive in interior B-tree pages: SQLite's index B-trees (and
    /// WITHOUT ROWID tables) keep real entries in interior cells, and deleting one replaces
    /// the cell, which `secure_delete` zeroes. Enough messages for interior pages.
    #[test]
    fn deleted_hashes_leave_no_trace_in_large_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = crate::Accounts::open(dir.path())
            .unwrap()
            .add_device("ann", &[], "laptop")
            .unwrap()
            .account_id;
        // Enough messages for the blobs and refs indexes to need interior pages.
        let hashes: Vec<BlobHash> = (0..600)
            .map(|i| {
                let blob = stage(&store, format!("message {i}").as_bytes());
                store
                    .append_blocking(a, NewRecord::Store { blob, tags: vec![] })
                    .unwrap()
                    .hash
            })
            .collect();
        let deleted: Vec<BlobHash> = hashes.iter().step_by(2).copied().collect();
        for h in &deleted {
            assert!(
                store
                    .append_blocking(a, NewRecord::Delete { hash: *h })
                    .unwrap()
                    .new
            );
        }
        let needles: Vec<&[u8]> = deleted.iter().map(|h| &h.0[..]).collect();
        let hits = find_in_files(dir.path(), &needles);
        assert!(hits.is_empty(), "deleted hashes found in {hits:?}");
        // The live ones are still there (the search finds what it looks for).
        let live: Vec<&[u8]> = hashes.iter().skip(1).step_by(2).map(|h| &h.0[..]).collect();
        assert!(!find_in_files(dir.path(), &live).is_empty());
        assert!(crate::verify(dir.path()).unwrap().is_ok());
    }
}
