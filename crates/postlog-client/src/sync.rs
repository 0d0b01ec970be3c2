//! The sync engine.
//!
//! A sync reads the Log from the durable cursor. Records are applied in batches by a
//! writer thread while the network keeps streaming; after each batch is durable in the
//! Maildir, the cursor is advanced to the first offset the batch did not cover. A oneshot
//! sync stops at `Live` (the Head when the server started answering); `watch` goes on and
//! applies each pushed record as it arrives, reconnecting with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postlog_proto::{BlobHash, LogOffset, Record};
use tokio::sync::mpsc;

use crate::maildir::NewMessage;
use crate::{
    ClientError, Connection, Endpoint, LogItem, Maildir, MaildirError, Profile, ProfileError,
};

/// A batch is flushed when it holds this many bytes of mail...
const BATCH_BYTES: usize = 64 * 1024 * 1024;
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
    #[error(
        "this replica's cursor ({cursor}) is ahead of the server's head ({head}): the server \
         lost records or this profile belongs to another server; log in again"
    )]
    CursorAhead { cursor: LogOffset, head: LogOffset },
}

impl SyncError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SyncError::Client(c) if c.is_retryable())
    }
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
}

/// What a oneshot sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub new_messages: u64,
    pub bytes: u64,
    pub records: u64,
    pub cursor: LogOffset,
    pub elapsed: Duration,
}

/// Turns a record's tags into Maildir flags; `None` for plain unread mail (`new/`).
pub fn flags_for_tags(tags: &[String]) -> Option<String> {
    let has = |t: &str| tags.iter().any(|x| x == t);
    let mut flags = String::new();
    for (tag, flag) in [
        ("draft", 'D'),
        ("flagged", 'F'),
        ("passed", 'P'),
        ("replied", 'R'),
    ] {
        if has(tag) {
            flags.push(flag);
        }
    }
    if !has("unread") {
        flags.push('S');
    }
    if has("deleted") {
        flags.push('T');
    }
    if flags.is_empty() { None } else { Some(flags) }
}

/// Messages of one batch and the cursor the batch completes.
struct Batch {
    messages: Vec<(BlobHash, Vec<u8>, Option<String>)>,
    bytes: usize,
    cursor: LogOffset,
}

impl Batch {
    fn new(cursor: LogOffset) -> Self {
        Batch {
            messages: Vec::new(),
            bytes: 0,
            cursor,
        }
    }
    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.messages.len() >= BATCH_MESSAGES
    }
}

/// The writer task: new message count and final durable cursor.
type Writer = tokio::task::JoinHandle<Result<(u64, LogOffset), SyncError>>;

/// Applies batches on a blocking thread: Maildir first, then the cursor.
fn spawn_writer(profile: Profile, progress: Arc<Progress>) -> (mpsc::Sender<Batch>, Writer) {
    let (tx, mut rx) = mpsc::channel::<Batch>(2);
    let handle = tokio::task::spawn_blocking(move || {
        let mut maildir = Maildir::open(&profile.maildir)?;
        let mut cursor = profile.cursor()?;
        let mut added = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            let msgs: Vec<NewMessage<'_>> = batch
                .messages
                .iter()
                .map(|(hash, bytes, flags)| NewMessage {
                    hash: *hash,
                    bytes,
                    flags: flags.clone(),
                })
                .collect();
            let n = maildir.write_batch(&msgs)? as u64;
            added += n;
            if batch.cursor > cursor {
                profile.set_cursor(batch.cursor)?;
                cursor = batch.cursor;
            }
            progress.messages.fetch_add(n, Ordering::Relaxed);
        }
        Ok((added, cursor))
    });
    (tx, handle)
}

/// Reads log items into batches until `Live` (oneshot) or forever (`watch`).
async fn stream_into(
    conn: &Connection,
    from: LogOffset,
    tx: &mpsc::Sender<Batch>,
    progress: &Progress,
    watch: bool,
) -> Result<u64, SyncError> {
    let mut log = conn.log(from, true).await?;
    let mut batch = Batch::new(from);
    let mut records = 0u64;
    let mut live = false;
    loop {
        let item = log.next().await?;
        match item {
            LogItem::Entry(entry, blob) => {
                records += 1;
                progress.received.store(entry.offset + 1, Ordering::Relaxed);
                if let (Record::Store { hash, tags, .. }, Some(bytes)) = (&entry.record, blob) {
                    progress
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    batch.bytes += bytes.len();
                    batch.messages.push((*hash, bytes, flags_for_tags(tags)));
                }
                batch.cursor = entry.offset + 1;
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
            if tx.send(done).await.is_err() {
                // The writer stopped: its error is reported by the caller.
                return Ok(records);
            }
            if !watch && live {
                return Ok(records);
            }
        }
    }
}

async fn finish_writer(
    tx: mpsc::Sender<Batch>,
    writer: Writer,
) -> Result<(u64, LogOffset), SyncError> {
    drop(tx);
    writer
        .await
        .map_err(|e| SyncError::Client(ClientError::Protocol(format!("writer task: {e}"))))?
}

/// One sync up to the server's Head. Exit only when everything up to it is durable.
pub async fn sync_once(
    profile: &Profile,
    endpoint: &Endpoint,
    progress: Arc<Progress>,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let cursor = profile.cursor()?;
    let conn = endpoint.connect(&profile.login).await?;
    let head = conn.head_at_auth;
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
            ..Default::default()
        });
    }
    let (tx, writer) = spawn_writer(profile.clone(), progress.clone());
    let streamed = stream_into(&conn, cursor, &tx, &progress, false).await;
    let written = finish_writer(tx, writer).await;
    conn.close();
    let records = streamed?;
    let (new_messages, cursor) = written?;
    Ok(SyncReport {
        new_messages,
        bytes: progress.bytes.load(Ordering::Relaxed),
        records,
        cursor,
        elapsed: started.elapsed(),
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
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_MIN;
    loop {
        let connected = std::sync::atomic::AtomicBool::new(false);
        let attempt = async {
            let cursor = profile.cursor()?;
            let conn = endpoint.connect(&profile.login).await?;
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
            let (tx, writer) = spawn_writer(profile.clone(), progress.clone());
            let streamed = stream_into(&conn, cursor, &tx, &progress, true).await;
            let written = finish_writer(tx, writer).await;
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
    fn tags_map_to_maildir_flags() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(flags_for_tags(&t(&["inbox", "unread"])), None);
        assert_eq!(flags_for_tags(&t(&["inbox"])).as_deref(), Some("S"));
        assert_eq!(
            flags_for_tags(&t(&["unread", "flagged"])).as_deref(),
            Some("F")
        );
        assert_eq!(
            flags_for_tags(&t(&["replied", "deleted", "draft", "passed", "flagged"])).as_deref(),
            Some("DFPRST")
        );
    }
}
