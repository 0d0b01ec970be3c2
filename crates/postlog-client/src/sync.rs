//! The sync engine.
//!
//! A sync reads the Log from the durable cursor. Records are applied in batches by a
//! writer thread while the network keeps streaming; after each batch is durable in the
//! Maildir, the cursor is advanced to the first offset the batch did not cover. A oneshot
//! sync stops at `Live` (the Head when the server started answering); `watch` goes on and
//! applies each pushed record as it arrives, reconnecting with backoff.
//!
//! With a notmuch profile (feature `notmuch`, see `crate::notmuch`), each batch also
//! indexes its new files and sets notmuch tags, and local edits are found through
//! notmuch's revision. The write lock on the notmuch database is taken before any state
//! transaction and held for one batch at most.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use postlog_proto::tags::TagState;
use postlog_proto::{BlobHash, ErrorCode, LogEntry, LogOffset, Record};
use tokio::sync::mpsc;

use crate::maildir::NewMessage;
use crate::state::{State, StateError, desired_name, view};
use crate::{
    ClientError, Connection, Endpoint, LogItem, LogStream, Maildir, MaildirError, Profile,
    ProfileError,
};

/// Tag requests in flight at once when sending local changes.
const TAG_CONCURRENCY: usize = 64;
/// How often `watch` looks for flag changes made by mail readers.
pub const LOCAL_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A batch is flushed when it holds this many bytes of mail (its files are written by the
/// stager as they arrive; what waits for the last batch at the end of a sync is its barrier,
/// so smaller batches shorten that tail: 16 MiB measured ~0.09 s against 0.1–0.3 s for
/// 64 MiB, in a 10,000-message full sync)...
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// ...or this many messages.
const BATCH_MESSAGES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Maildir(#[from] MaildirError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "this replica's cursor ({cursor}) is ahead of the server's head ({head}): the server \
         lost records or this profile belongs to another server; log in again"
    )]
    CursorAhead { cursor: LogOffset, head: LogOffset },
    #[cfg(feature = "notmuch")]
    #[error(transparent)]
    Notmuch(#[from] crate::notmuch::NotmuchError),
    #[error(
        "this profile indexes mail in notmuch, but this postlog was built without the \
         `notmuch` feature (cargo build --release -p postlog --features notmuch)"
    )]
    NotmuchNotBuilt,
}

impl SyncError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Client(c) => c.is_retryable(),
            #[cfg(feature = "notmuch")]
            SyncError::Notmuch(n) => n.is_retryable(),
            // Another process (a second sync, `postlog tag`) held the local database for
            // longer than the busy timeout: try again rather than give up on watching.
            SyncError::State(StateError::Db(rusqlite::Error::SqliteFailure(e, _))) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }
}

/// Refuses a notmuch profile in a build without notmuch: syncing it without updating
/// notmuch would leave notmuch's tags behind, unnoticed by the next notmuch-enabled sync.
fn check_profile(profile: &Profile) -> Result<(), SyncError> {
    if profile.notmuch.is_some() && !cfg!(feature = "notmuch") {
        return Err(SyncError::NotmuchNotBuilt);
    }
    Ok(())
}

/// Live counters a progress display can read while a sync runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Head of the server when the sync started.
    pub head: AtomicU64,
    /// First offset of this sync.
    pub start: AtomicU64,
    /// Offsets received so far.
    pub received: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// notmuch messages read and written (0 and 0 when nothing changed).
    pub notmuch_read: AtomicU64,
    pub notmuch_written: AtomicU64,
    /// Messages sent from the outbox, and refused for good (moved to `outbox/failed/`).
    pub outbox_sent: AtomicU64,
    pub outbox_failed: AtomicU64,
}

#[cfg(feature = "notmuch")]
impl Progress {
    fn add_notmuch(&self, w: crate::notmuch::Work) {
        self.notmuch_read.fetch_add(w.read, Ordering::Relaxed);
        self.notmuch_written.fetch_add(w.written, Ordering::Relaxed);
    }
}

/// What a oneshot sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub new_messages: u64,
    pub bytes: u64,
    pub records: u64,
    pub cursor: LogOffset,
    pub elapsed: Duration,
    /// notmuch messages read and written by this sync (notmuch profiles only).
    pub notmuch_read: u64,
    pub notmuch_written: u64,
}

/// What a batch did to one message, for the notmuch index to follow.
#[derive(Clone, Debug)]
pub struct Touched {
    pub hash: BlobHash,
    /// Its file now (`cur/...` or `new/...`), if it has one.
    pub name: Option<String>,
    /// The file it was renamed from in this batch.
    pub renamed_from: Option<String>,
    /// The file was written by this batch (or by the crashed run this batch replays).
    pub new_file: bool,
    /// The replica's view of its tags after the batch (sorted).
    pub tags: Vec<String>,
    /// The message was deleted (a Scrub): `name` is the file that was removed.
    pub removed: bool,
}

/// Finds local tag changes: Maildir flags changed by mail readers, and (notmuch profiles)
/// tags edited in notmuch. Blocking. Returns the open state, so that the caller reads the
/// queues without opening the database again (each open and last close of `state.db`
/// costs file opens, the schema check and a WAL checkpoint).
fn find_local_changes(p: &Profile, progress: &Progress) -> Result<State, SyncError> {
    let mut state = State::open(&p.dir)?;
    let cursor = p.cursor()?;
    state.scan_maildir(&p.maildir, cursor.saturating_sub(1))?;
    #[cfg(feature = "notmuch")]
    if let Some(root) = &p.notmuch {
        let work = crate::notmuch::find_local_edits(root, &p.maildir, &mut state, cursor)?;
        progress.add_notmuch(work);
    }
    #[cfg(not(feature = "notmuch"))]
    let _ = progress;
    if p.delete_tagged == crate::DeleteTagged::Now {
        // A local `deleted` tag (notmuch, Maildir flag T) deletes the message now.
        let ops = state.pending()?;
        let tx = state.conn().transaction().map_err(StateError::from)?;
        for op in ops.iter().filter(|o| o.add.iter().any(|t| t == "deleted")) {
            State::queue_delete(&tx, &op.hash)?;
        }
        tx.commit().map_err(StateError::from)?;
    }
    Ok(state)
}

/// Sends the outbox (mail `postlog sendmail` queued while offline), then finds local tag
/// changes (Maildir flags changed by mail readers since the last scan, and tags edited in
/// notmuch), queues them durably, and sends every queued change to the server, then every
/// queued delete. Returns how many messages, changes and deletes were sent. A change for a
/// message the server no longer holds is dropped; an acknowledged one stays in the
/// replica's view until its record is applied. A deleted message leaves this replica when
/// its Scrub is applied, like on every other replica.
pub async fn push_local_changes(
    profile: &Profile,
    conn: &Connection,
    progress: &Arc<Progress>,
) -> Result<usize, SyncError> {
    let flushed = crate::outbox::Outbox::open(&profile.dir)?
        .flush(conn)
        .await
        .map_err(|e| match e {
            crate::outbox::FlushError::Client(c) => SyncError::Client(c),
            crate::outbox::FlushError::Local(p) => SyncError::Profile(p),
        })?;
    progress
        .outbox_sent
        .fetch_add(flushed.sent.len() as u64, Ordering::Relaxed);
    progress
        .outbox_failed
        .fetch_add(flushed.failed.len() as u64, Ordering::Relaxed);
    Ok(flushed.sent.len() + push_tag_changes(profile, conn, progress).await?)
}

async fn push_tag_changes(
    profile: &Profile,
    conn: &Connection,
    progress: &Arc<Progress>,
) -> Result<usize, SyncError> {
    let p = profile.clone();
    let prog = progress.clone();
    let (pending, deletes) = tokio::task::spawn_blocking(move || -> Result<_, SyncError> {
        let state = find_local_changes(&p, &prog)?;
        Ok((state.pending()?, state.pending_deletes()?))
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("scan task: {e}")))??;
    if pending.is_empty() && deletes.is_empty() {
        return Ok(0);
    }
    let mut acked = Vec::new();
    let mut done = Vec::new();
    let mut failed = None;
    let mut tasks = tokio::task::JoinSet::new();
    let mut iter = pending.into_iter();
    loop {
        while tasks.len() < TAG_CONCURRENCY {
            let Some(op) = iter.next() else { break };
            let conn = conn.clone();
            tasks.spawn(async move {
                let r = conn
                    .tag(&op.hash, &op.add, &op.remove, op.seen, op.seq)
                    .await;
                (op.seq, r)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (seq, r) = joined.map_err(|e| ClientError::Protocol(format!("tag task: {e}")))?;
        match r {
            Ok((offset, _)) => acked.push((seq, offset)),
            Err(ClientError::Server {
                code: Some(ErrorCode::NotFound),
                ..
            }) => done.push(seq),
            Err(e) => failed = Some(e),
        }
    }
    // Deletes after the tag changes; each is idempotent by hash.
    let mut deleted = Vec::new();
    for h in deletes {
        match conn.delete(&h).await {
            Ok(_) => deleted.push(h),
            Err(e) => failed = Some(e),
        }
    }
    let sent = acked.len() + done.len() + deleted.len();
    let p = profile.clone();
    tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut state = State::open(&p.dir)?;
        let cursor = p.cursor()?;
        let tx = state
            .conn()
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(StateError::from)?;
        for seq in done {
            State::forget_op(&tx, seq)?;
        }
        for (seq, offset) in acked {
            State::ack_op(&tx, seq, offset)?;
        }
        for h in &deleted {
            State::delete_done(&tx, h)?;
        }
        // A retry of an operation whose record was applied long ago.
        State::forget_applied(&tx, cursor)?;
        tx.commit().map_err(StateError::from)?;
        Ok(())
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("state task: {e}")))??;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(sent),
    }
}

/// Records of one batch (with the bytes of inline Store records) and the cursor the batch
/// completes.
struct Batch {
    entries: Vec<(LogEntry, Option<Bytes>)>,
    bytes: usize,
    cursor: LogOffset,
}

impl Batch {
    fn new(cursor: LogOffset) -> Self {
        Batch {
            entries: Vec::new(),
            bytes: 0,
            cursor,
        }
    }
    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.entries.len() >= BATCH_MESSAGES
    }
}

/// The writer: new message count and final durable cursor.
type WriterTask = tokio::task::JoinHandle<Result<(u64, LogOffset), SyncError>>;

/// A message to write into `tmp/` ahead of its batch: (batch number, hash, bytes).
type StageItem = (u64, BlobHash, Bytes);

/// The two ways into the writer: whole batches (at most 2 waiting, so the network runs at
/// most that far ahead of the disk) and, ahead of them, each message as it arrives.
struct Writer {
    batches: mpsc::Sender<Batch>,
    stage: std::sync::mpsc::Sender<StageItem>,
    task: WriterTask,
}

/// Applies batches on a blocking thread: Maildir first, then the cursor. A second thread
/// (the stager) writes each message's `tmp/` file as soon as it arrives, so that the
/// file writes overlap the network and a batch that is complete only needs its barrier,
/// renames and state commit.
fn spawn_writer(profile: Profile, progress: Arc<Progress>) -> Writer {
    let (batches, mut rx) = mpsc::channel::<Batch>(2);
    let (stage, stage_rx) = std::sync::mpsc::channel::<StageItem>();
    let task = tokio::task::spawn_blocking(move || {
        let maildir = Maildir::open(&profile.maildir)?;
        let stager = maildir.stager();
        let stager = std::thread::Builder::new()
            .name("postlog-stager".into())
            .spawn(move || {
                for (batch, hash, bytes) in stage_rx {
                    stager.stage(batch, &hash, &bytes);
                }
            })
            .map_err(|e| ClientError::Protocol(format!("stager thread: {e}")))?;
        let result = (|| {
            let mut state = State::open(&profile.dir)?;
            let mut cursor = profile.cursor()?;
            let mut added = 0u64;
            while let Some(batch) = rx.blocking_recv() {
                maildir.begin_batch();
                let n = write_batch(&profile, &maildir, &mut state, &batch, cursor, &progress);
                maildir.end_batch(batch.entries.iter().filter_map(|(e, b)| match e.record {
                    Record::Store { ref hash, .. } if b.is_some() => Some(hash),
                    _ => None,
                }));
                let n = n?;
                added += n;
                if batch.cursor > cursor {
                    profile.set_cursor(batch.cursor)?;
                    cursor = batch.cursor;
                }
                progress.messages.fetch_add(n, Ordering::Relaxed);
            }
            state.remember_maildir(&profile.maildir)?;
            Ok((added, cursor))
        })();
        // The stream stops at a closed batch channel; its end closes the stage channel.
        drop(rx);
        let _ = stager.join();
        maildir.discard_staged();
        result
    });
    Writer {
        batches,
        stage,
        task,
    }
}

/// Finds local edits (Maildir flags; with a notmuch profile, under the database's write
/// lock, notmuch's since its last pass), then applies one batch; with notmuch, follows it
/// there and commits notmuch before the state.
fn write_batch(
    profile: &Profile,
    maildir: &Maildir,
    state: &mut State,
    batch: &Batch,
    cursor: LogOffset,
    progress: &Progress,
) -> Result<u64, SyncError> {
    let device = profile.login.device;
    // Local edits first, so that names are current and the view has them (two `stat`s
    // when the Maildir did not change).
    let seen = cursor.saturating_sub(1);
    #[cfg(feature = "notmuch")]
    if let Some(root) = &profile.notmuch {
        use crate::notmuch::Notmuch;
        let mut nm = Notmuch::open(root, &profile.maildir)?;
        state.scan_maildir(&profile.maildir, seen)?;
        nm.find_edits(state, cursor)?;
        let mut nm = Some(nm);
        let n = apply_batch(maildir, state, batch, device, &mut |tx, touched| {
            if let Some(mut nm) = nm.take() {
                nm.apply(touched)?;
                let (rev, work) = nm.close()?;
                Notmuch::record(tx, &rev)?;
                progress.add_notmuch(work);
            }
            Ok(())
        })?;
        return Ok(n);
    }
    let _ = progress;
    state.scan_maildir(&profile.maildir, seen)?;
    apply_batch(maildir, state, batch, device, &mut |_, _| Ok(()))
}

/// Hook called once a batch's files are durable, before its state transaction commits.
type AfterFiles<'a> =
    dyn FnMut(&rusqlite::Transaction<'_>, &[Touched]) -> Result<(), SyncError> + 'a;

/// Applies one batch of records: the tag CRDT in the local state, new message files, and
/// renames of existing files whose flags changed. The files are durable before the state
/// transaction commits, and the caller saves the cursor only after both (see `state`).
/// This replica's own operations (`device`) leave the queue as their records are applied.
///
/// The `tmp/` files of the batch's messages are made durable on a second thread while this
/// one works out the state (which decides the files' names): on loopback, 100 new messages
/// spend ~6 ms in each.
fn apply_batch(
    maildir: &Maildir,
    state: &mut State,
    batch: &Batch,
    device: u64,
    after_files: &mut AfterFiles<'_>,
) -> Result<u64, SyncError> {
    let carried: Vec<(&BlobHash, &[u8])> = batch
        .entries
        .iter()
        .filter_map(|(e, b)| match (&e.record, b) {
            (Record::Store { hash, .. }, Some(b)) => Some((hash, b.as_ref())),
            _ => None,
        })
        .collect();
    let tx = state
        .conn()
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(StateError::from)?;
    let (planned, prepared) = match carried.is_empty() {
        // Tags only: no thread.
        true => (
            plan_batch(maildir, &tx, batch, device),
            maildir.prepare(carried),
        ),
        false => std::thread::scope(|s| {
            let preparing = s.spawn(|| maildir.prepare(carried));
            let planned = plan_batch(maildir, &tx, batch, device);
            let prepared = preparing.join().unwrap_or_else(|_| {
                Err(MaildirError {
                    path: maildir.root().join("tmp"),
                    source: std::io::Error::other("the thread writing tmp/ files panicked"),
                })
            });
            (planned, prepared)
        }),
    };
    let prepared = prepared?;
    let Planned {
        new_files,
        renamed,
        events,
    } = match planned {
        Ok(p) => p,
        Err(e) => {
            maildir.discard(prepared);
            return Err(e);
        }
    };
    if renamed && let Err(e) = maildir.sync_dirs() {
        maildir.discard(prepared);
        return Err(e.into());
    }
    let added = maildir.place(&new_files, prepared)? as u64;
    // This batch's own files and renames are no reason for the next scan to list them.
    State::remember_maildir_in(&tx, maildir.root())?;
    after_files(&tx, &events)?;
    tx.commit().map_err(StateError::from)?;
    Ok(added)
}

/// What a batch does to the Maildir, worked out in its state transaction.
struct Planned<'b> {
    /// Messages to place, with their names.
    new_files: Vec<NewMessage<'b>>,
    /// Existing files were renamed or removed (their directories need an fsync).
    renamed: bool,
    events: Vec<Touched>,
}

/// The state half of [`apply_batch`]: applies the records to the tag CRDT, removes deleted
/// messages' files and renames files whose flags changed; names the new files.
fn plan_batch<'b>(
    maildir: &Maildir,
    tx: &rusqlite::Transaction<'_>,
    batch: &'b Batch,
    device: u64,
) -> Result<Planned<'b>, SyncError> {
    // Each message the batch touches: its tag state and recorded file name.
    let mut touched: BTreeMap<BlobHash, (TagState, Option<String>)> = BTreeMap::new();
    let mut blobs: HashMap<BlobHash, &[u8]> = HashMap::new();
    // Deleted messages and the file each had.
    let mut removed: Vec<(BlobHash, Option<String>)> = Vec::new();
    for (entry, blob) in &batch.entries {
        let hash = match &entry.record {
            Record::Scrub { offsets } => {
                for o in offsets {
                    // Scrubbed Store record: the message is deleted. Tags records (a
                    // compaction) need nothing: their snapshot came first.
                    if let Some(h) = State::scrub_ref(tx, *o)? {
                        removed.push((h, State::name_of(tx, &h)?));
                        State::forget_message(tx, &h)?;
                        touched.remove(&h);
                        blobs.remove(&h);
                    }
                }
                continue;
            }
            // Send records are applied by the sending issue.
            Record::Send { .. } => continue,
            Record::Store { hash, .. }
            | Record::Tags { hash, .. }
            | Record::TagSnapshot { hash, .. } => hash,
        };
        State::record_ref(
            tx,
            entry.offset,
            hash,
            matches!(entry.record, Record::Store { .. }),
        )?;
        let (st, _) = match touched.entry(*hash) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let (name, st) = State::message_of(tx, hash)?;
                v.insert((st, name))
            }
        };
        match &entry.record {
            Record::Store { tags, .. } => {
                if let Some(b) = blob {
                    blobs.insert(*hash, b.as_ref());
                }
                st.apply_store(entry.offset, tags);
            }
            Record::Tags {
                add,
                remove,
                seen,
                device: by,
                seq,
                ..
            } => {
                st.apply_op(entry.offset, add, remove, *seen, *by);
                if *by == device {
                    State::forget_op(tx, *seq)?;
                }
            }
            Record::TagSnapshot { tags, .. } => st.apply_snapshot(tags),
            _ => {}
        }
    }
    State::forget_applied(tx, batch.cursor)?;
    // Local operations whose records are still to come, shown over the CRDT.
    let overlay = State::overlay(tx, batch.cursor)?;
    let mut new_files = Vec::new();
    let mut renamed = false;
    let mut events = Vec::with_capacity(touched.len() + removed.len());
    // Deleted files go first (durable with the renames, before the state commits), so that
    // the same bytes stored again in this batch are written afresh.
    for (hash, name) in removed {
        let Some(name) = name else { continue };
        let gone = maildir.remove(&hash, &name)?;
        renamed |= gone.is_some();
        // Also when the file is already gone: a replay after a crash that removed the
        // file but not yet the notmuch entry.
        events.push(Touched {
            hash,
            name: Some(gone.unwrap_or(name)),
            renamed_from: None,
            new_file: false,
            tags: Vec::new(),
            removed: true,
        });
    }
    for (hash, (st, recorded)) in &touched {
        let tags = view(st.tags(), overlay.get(hash));
        // The name to record: the recorded one unless this batch renames or writes the file.
        let mut name = recorded.clone();
        // A file gone from its recorded name was renamed by a mail reader during this
        // batch: the next scan turns that into an operation; renaming it now could undo it.
        let current = recorded.clone().filter(|n| maildir.exists(n));
        let mut event = Touched {
            hash: *hash,
            name: None,
            renamed_from: None,
            new_file: false,
            tags: Vec::new(),
            removed: false,
        };
        match current {
            Some(current) => {
                let want = desired_name(hash, &tags, Some(&current));
                if want != current && maildir.rename(&current, &want)? {
                    renamed = true;
                    name = Some(want.clone());
                    event.name = Some(want);
                    event.renamed_from = Some(current);
                } else {
                    event.name = Some(current);
                }
            }
            None => {
                if let Some(bytes) = blobs.get(hash) {
                    let file = desired_name(hash, &tags, None);
                    name = Some(file.clone());
                    new_files.push(NewMessage {
                        hash: *hash,
                        bytes,
                        name: file.clone(),
                    });
                    event.name = Some(file);
                    event.new_file = true;
                }
            }
        }
        State::put_message(tx, hash, name.as_deref(), st)?;
        event.tags = tags;
        events.push(event);
    }
    Ok(Planned {
        new_files,
        renamed,
        events,
    })
}

/// Reads log items into batches: with `until`, up to `Live` and at least to that offset
/// (records this sync itself caused, pushed after `Live`); without, forever (`watch`).
async fn stream_into(
    mut log: LogStream,
    from: LogOffset,
    writer: &Writer,
    progress: &Progress,
    until: Option<LogOffset>,
) -> Result<u64, SyncError> {
    let mut batch = Batch::new(from);
    let mut batches = 0u64;
    let mut records = 0u64;
    let mut live = false;
    loop {
        let item = log.next().await?;
        match item {
            LogItem::Entry(entry, blob) => {
                records += 1;
                progress.received.store(entry.offset + 1, Ordering::Relaxed);
                let blob = blob.map(Bytes::from);
                if let Some(bytes) = &blob {
                    progress
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    batch.bytes += bytes.len();
                    if let Record::Store { hash, .. } = &entry.record {
                        // A stopped stager is no error: the batch writes the file.
                        let _ = writer.stage.send((batches, *hash, bytes.clone()));
                    }
                }
                batch.cursor = entry.offset + 1;
                batch.entries.push((entry, blob));
            }
            LogItem::Live(head) => {
                batch.cursor = batch.cursor.max(head);
                live = true;
            }
        }
        // Once live, every pushed record is applied at once (push latency).
        if batch.full() || live {
            let cursor = batch.cursor;
            let done = std::mem::replace(&mut batch, Batch::new(cursor));
            batches += 1;
            if writer.batches.send(done).await.is_err() {
                // The writer stopped: its error is reported by the caller.
                return Ok(records);
            }
            if until.is_some_and(|u| live && cursor >= u) {
                return Ok(records);
            }
        }
    }
}

async fn finish_writer(writer: Writer) -> Result<(u64, LogOffset), SyncError> {
    let Writer {
        batches,
        stage,
        task,
    } = writer;
    drop((batches, stage));
    task.await
        .map_err(|e| SyncError::Client(ClientError::Protocol(format!("writer task: {e}"))))?
}

/// One sync up to the server's Head. Exit only when everything up to it is durable.
pub async fn sync_once(
    profile: &Profile,
    endpoint: &Endpoint,
    progress: Arc<Progress>,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    check_profile(profile)?;
    let cursor = profile.cursor()?;
    // The Log request goes with Auth; its records wait in the stream's receive window
    // while local changes are sent.
    let (conn, log) = endpoint.connect_with_log(&profile.login, cursor).await?;
    let mut head = conn.head_at_auth;
    if push_local_changes(profile, &conn, &progress).await? > 0 {
        // Our own changes are now records too: read them back like any other (they
        // follow `Live` on the same stream).
        head = conn.head().await?;
    }
    progress.head.store(head, Ordering::Relaxed);
    progress.start.store(cursor, Ordering::Relaxed);
    if cursor > head {
        return Err(SyncError::CursorAhead { cursor, head });
    }
    if cursor == head {
        conn.close();
        return Ok(SyncReport {
            cursor,
            elapsed: started.elapsed(),
            notmuch_read: progress.notmuch_read.load(Ordering::Relaxed),
            notmuch_written: progress.notmuch_written.load(Ordering::Relaxed),
            ..Default::default()
        });
    }
    let writer = spawn_writer(profile.clone(), progress.clone());
    let streamed = stream_into(log, cursor, &writer, &progress, Some(head)).await;
    let stream_end = started.elapsed();
    let written = finish_writer(writer).await;
    tracing::debug!(
        "sync: stream ended at {:.3} s, durable at {:.3} s",
        stream_end.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    conn.close();
    let records = streamed?;
    let (new_messages, cursor) = written?;
    Ok(SyncReport {
        new_messages,
        bytes: progress.bytes.load(Ordering::Relaxed),
        records,
        cursor,
        elapsed: started.elapsed(),
        notmuch_read: progress.notmuch_read.load(Ordering::Relaxed),
        notmuch_written: progress.notmuch_written.load(Ordering::Relaxed),
    })
}

/// Backoff between reconnection attempts.
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Syncs and keeps the Log stream open, applying pushed records as they arrive, until
/// `shutdown` resolves. Reconnects with exponential backoff after retryable failures
/// (network loss, server restart), always resuming from the durable cursor.
pub async fn watch(
    profile: &Profile,
    endpoint: &Endpoint,
    progress: Arc<Progress>,
    shutdown: impl std::future::Future<Output = ()>,
    on_status: impl Fn(&str),
) -> Result<(), SyncError> {
    check_profile(profile)?;
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_MIN;
    loop {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let cursor = profile.cursor()?;
            let (conn, log) = endpoint.connect_with_log(&profile.login, cursor).await?;
            if cursor > conn.head_at_auth {
                return Err(SyncError::CursorAhead {
                    cursor,
                    head: conn.head_at_auth,
                });
            }
            on_status(&format!(
                "connected, cursor {cursor}, head {}",
                conn.head_at_auth
            ));
            connected.store(true, Ordering::Relaxed);
            let writer = spawn_writer(profile.clone(), progress.clone());
            let local = async {
                loop {
                    push_local_changes(profile, &conn, &progress).await?;
                    tokio::time::sleep(LOCAL_SCAN_INTERVAL).await;
                }
            };
            let streamed = tokio::select! {
                r = stream_into(log, cursor, &writer, &progress, None) => r,
                r = local => r,
            };
            let written = finish_writer(writer).await;
            written?;
            streamed.map(|_| ())
        };
        let result = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = attempt => r,
        };
        match result {
            Ok(()) => backoff = RECONNECT_MIN,
            Err(e) if e.is_retryable() => {
                if connected.load(Ordering::Relaxed) {
                    // The connection worked before it failed: start backing off afresh.
                    backoff = RECONNECT_MIN;
                }
                on_status(&format!("{e}; reconnecting in {} ms", backoff.as_millis()));
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notmuch_profile_needs_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        let login = format!(
            "postlog://a@h:1/?device=1&secret={}&fp={}",
            "01".repeat(32),
            "cd".repeat(32)
        )
        .parse()
        .unwrap();
        let p = Profile::create_with(
            &dir.path().join("p"),
            login,
            None,
            Some(dir.path().to_owned()),
        )
        .unwrap();
        let r = check_profile(&p);
        if cfg!(feature = "notmuch") {
            assert!(r.is_ok());
        } else {
            assert!(matches!(r, Err(SyncError::NotmuchNotBuilt)));
        }
    }
}
