//! One request per stream: decode, execute, answer.

use std::sync::Arc;

use postlog_net::{FrameError, read_frame};
use postlog_proto::{BlobHash, ErrorCode, LogOffset, Record, Request, Response};
use postlog_store::{AccountId, Appended, BlobWriter, DeviceId, NewRecord, StagedBlob, StoreError};
use quinn::{RecvStream, SendStream};
use tokio::sync::{oneshot, watch};

use crate::server::Shared;

/// Most log entries read from storage per step of a Log stream.
const LOG_BATCH: usize = 512;
/// Most bytes of inline messages read per step of a Log stream.
const LOG_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes of inline messages the first step of a Log stream reads; each later step may read
/// twice as much as the one before, up to [`LOG_BATCH_BYTES`]. A step is read (and every
/// message verified) before its first byte is sent, so a small first step starts the
/// stream sooner: 100 new messages (~5 MB) used to wait for all of them.
const LOG_FIRST_STEP_BYTES: u64 = 256 * 1024;

/// Log entries, each with its message's verified bytes for an inline Log.
type LogStep = Vec<(postlog_proto::LogEntry, Option<Vec<u8>>)>;

/// Reads one step of a Log stream on a blocking thread: the entries from `from` and, if
/// `inline`, their messages. `true` when there may be more below the Head it read to.
fn spawn_read(
    conn: &Arc<Conn>,
    from: LogOffset,
    inline: bool,
    max_bytes: u64,
) -> tokio::task::JoinHandle<std::result::Result<(LogStep, bool), StoreError>> {
    let c = conn.clone();
    tokio::task::spawn_blocking(move || {
        let store = &c.shared.store;
        let entries = store.read_log(c.account, from, LOG_BATCH)?;
        let mut more = entries.len() == LOG_BATCH;
        // The entries this step sends (up to `max_bytes` of messages), and their
        // messages, read in one call (concurrently, where the backend can).
        let mut take = entries.len();
        let mut bytes = 0u64;
        let mut wanted = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            if bytes >= max_bytes {
                more = true;
                take = i;
                break;
            }
            if let (Record::Store { hash, size, .. }, true) = (&entry.record, inline) {
                bytes += size;
                wanted.push(*hash);
            }
        }
        let mut blobs = if wanted.is_empty() {
            Vec::new()
        } else {
            store.read_blobs(c.account, &wanted)?
        }
        .into_iter();
        let mut out = Vec::with_capacity(take);
        for entry in entries.into_iter().take(take) {
            let blob = match (&entry.record, inline) {
                (Record::Store { .. }, true) => match blobs.next().flatten() {
                    Some(b) => Some(b),
                    // Deleted since the log was read: the entry is skipped like the
                    // scrubbed record it now is, and its Scrub follows.
                    None => continue,
                },
                _ => None,
            };
            out.push((entry, blob));
        }
        Ok((out, more))
    })
}

/// An authenticated connection.
pub(crate) struct Conn {
    pub shared: Arc<Shared>,
    pub account: AccountId,
    pub device: DeviceId,
    /// True once the TLS handshake is complete (no longer replayable 0-RTT data).
    pub handshake: watch::Receiver<bool>,
}

/// A failed request: the code and message sent to the client.
struct Fail(ErrorCode, String);

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooLarge { .. } => Fail(ErrorCode::TooLarge, e.to_string()),
            StoreError::NoSuchMessage(_) => Fail(ErrorCode::NotFound, e.to_string()),
            StoreError::Invalid { .. } => Fail(ErrorCode::Invalid, e.to_string()),
            StoreError::CorruptBlob(_) | StoreError::CorruptRecord { .. } => {
                tracing::error!(error = %e, "corrupt blob refused");
                Fail(ErrorCode::Corrupt, e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "storage error");
                Fail(ErrorCode::Internal, "storage error; try again later".into())
            }
        }
    }
}

impl From<quinn::WriteError> for Fail {
    fn from(e: quinn::WriteError) -> Self {
        Fail(ErrorCode::Internal, format!("write: {e}"))
    }
}

impl From<tokio::task::JoinError> for Fail {
    fn from(e: tokio::task::JoinError) -> Self {
        Fail(ErrorCode::Internal, format!("task failed: {e}"))
    }
}

type Result<T = ()> = std::result::Result<T, Fail>;

pub(crate) async fn serve_stream(conn: Arc<Conn>, mut send: SendStream, mut recv: RecvStream) {
    let outcome = async {
        // A peer that opens a stream and sends nothing, or trickles, holds it only this long.
        let timeout = conn.shared.limits.request_timeout;
        let frame = tokio::time::timeout(timeout, read_frame(&mut recv))
            .await
            .map_err(|_| timed_out(timeout))?
            .map_err(|e| match e {
                FrameError::End => Fail(ErrorCode::Malformed, "empty stream".into()),
                FrameError::Decode(d) => Fail(d.code(), d.to_string()),
                FrameError::Read(r) => Fail(ErrorCode::Malformed, r.to_string()),
            })?;
        let request = Request::decode(&frame).map_err(|e| Fail(e.code(), e.to_string()))?;
        if request.is_mutating() {
            wait_for_handshake(&conn).await?;
        } else {
            // Nothing may follow a read-only request: stop the peer's side, so that bytes it
            // sends anyway are discarded instead of buffered for the life of a Log stream.
            let _ = recv.stop(0u32.into());
        }
        match request {
            Request::Auth { .. } => Err(Fail(ErrorCode::Invalid, "already authenticated".into())),
            Request::Head => {
                let head = blocking(&conn, |s, a| s.store.head(a)).await?;
                send.write_all(&Response::Head { head }.to_frame()).await?;
                Ok(())
            }
            Request::Fetch { hash } => fetch(&conn, &mut send, hash).await,
            Request::Store { size, tags } => store(&conn, &mut send, &mut recv, size, tags).await,
            Request::Log { from, inline_blobs } => log(&conn, &mut send, from, inline_blobs).await,
            Request::Send {
                size,
                from,
                recipients,
            } => submit(&conn, &mut send, &mut recv, size, from, recipients).await,
            Request::Tag {
                hash,
                add,
                remove,
                seen,
                seq,
            } => {
                let record = NewRecord::Tags {
                    hash,
                    add,
                    remove,
                    seen,
                    device: conn.device,
                    seq,
                };
                let appended = append(&conn, record).await?;
                let reply = Response::Tagged {
                    offset: appended.offset,
                    new: appended.new,
                };
                send.write_all(&reply.to_frame()).await?;
                Ok(())
            }
            Request::Delete { hash } => {
                let appended = append(&conn, NewRecord::Delete { hash }).await?;
                let reply = Response::Deleted {
                    offset: appended.offset,
                    new: appended.new,
                };
                send.write_all(&reply.to_frame()).await?;
                Ok(())
            }
        }
    }
    .await;
    match outcome {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(Fail(code, message)) => {
            tracing::debug!(?code, %message, "request failed");
            let _ = recv.stop(code.code().into());
            let _ = send
                .write_all(&Response::error(code, message).to_frame())
                .await;
            let _ = send.finish();
        }
    }
}

fn timed_out(after: std::time::Duration) -> Fail {
    Fail(
        ErrorCode::Malformed,
        format!("timed out: nothing received for {} ms", after.as_millis()),
    )
}

/// Counts an account's open Log streams; the slot is given back when dropped.
struct LogSlot {
    conn: Arc<Conn>,
}

impl LogSlot {
    fn take(conn: &Arc<Conn>) -> Result<LogSlot> {
        let max = conn.shared.limits.max_log_streams_per_account;
        let mut open = crate::server::lock(&conn.shared.log_streams);
        let n = open.entry(conn.account).or_insert(0);
        if *n >= max {
            return Err(Fail(
                ErrorCode::Busy,
                format!("this account already has {max} open Log streams"),
            ));
        }
        *n += 1;
        Ok(LogSlot { conn: conn.clone() })
    }
}

impl Drop for LogSlot {
    fn drop(&mut self) {
        let mut open = crate::server::lock(&self.conn.shared.log_streams);
        if let Some(n) = open.get_mut(&self.conn.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.conn.account);
            }
        }
    }
}

async fn wait_for_handshake(conn: &Conn) -> Result {
    let mut h = conn.handshake.clone();
    h.wait_for(|done| *done).await.map(|_| ()).map_err(|_| {
        Fail(
            ErrorCode::Internal,
            "connection closed during handshake".into(),
        )
    })
}

/// Runs a storage call on a blocking thread.
async fn blocking<T: Send + 'static>(
    conn: &Arc<Conn>,
    f: impl FnOnce(&Shared, AccountId) -> std::result::Result<T, StoreError> + Send + 'static,
) -> Result<T> {
    let c = conn.clone();
    Ok(tokio::task::spawn_blocking(move || f(&c.shared, c.account)).await??)
}

/// Hands a record to the store's writer and waits until it is durable.
async fn append(conn: &Conn, record: NewRecord) -> Result<Appended> {
    Ok(append_to(&conn.shared, conn.account, record).await?)
}

/// Appends `record` to `account`'s log and waits until it is durable (or failed). Shared
/// by every way mail comes in: QUIC Store, LMTP and SMTP.
pub(crate) async fn append_to(
    shared: &Shared,
    account: AccountId,
    record: NewRecord,
) -> std::result::Result<Appended, StoreError> {
    let (tx, rx) = oneshot::channel::<std::result::Result<Appended, StoreError>>();
    shared.store.append(
        account,
        record,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await
        .unwrap_or_else(|_| Err(StoreError::Stopped("storage writer stopped".into())))
}

/// A new staging file for an incoming message of at most `max` bytes.
pub(crate) async fn blob_writer(
    shared: &Arc<Shared>,
    max: u64,
) -> std::result::Result<BlobWriter, StoreError> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || s.store.blob_writer(max))
        .await
        .unwrap_or_else(|e| Err(StoreError::Stopped(format!("task failed: {e}"))))
}

/// Ends a staged message (flushes it; the writer thread makes it durable).
pub(crate) async fn finish_blob(writer: BlobWriter) -> std::result::Result<StagedBlob, StoreError> {
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap_or_else(|e| Err(StoreError::Stopped(format!("task failed: {e}"))))
}

async fn fetch(conn: &Arc<Conn>, send: &mut SendStream, hash: BlobHash) -> Result {
    let bytes = blocking(conn, move |s, a| s.store.read_blob(a, &hash)).await?;
    let Some(bytes) = bytes else {
        return Err(Fail(ErrorCode::NotFound, format!("no message {hash}")));
    };
    let frame = Response::Blob {
        size: bytes.len() as u64,
    }
    .to_frame();
    send.write_all_chunks(&mut [frame.into(), bytes.into()])
        .await?;
    Ok(())
}

/// Most bytes of a Send kept in memory to parse its header section.
const MAX_SEND_HEADER: usize = 1024 * 1024;

/// Receives exactly `size` message bytes into a staged blob. Keeps the first `keep` bytes
/// in memory too (for parsing).
async fn receive(
    conn: &Arc<Conn>,
    recv: &mut RecvStream,
    size: u64,
    keep: usize,
) -> Result<(StagedBlob, Vec<u8>)> {
    let max = conn.shared.config.max_message_size;
    if size > max {
        return Err(Fail(
            ErrorCode::TooLarge,
            format!("{size} bytes exceeds the limit of {max}"),
        ));
    }
    let mut writer = blob_writer(&conn.shared, max).await?;
    let mut head = Vec::new();
    let timeout = conn.shared.limits.request_timeout;
    loop {
        let chunk = tokio::time::timeout(timeout, recv.read_chunk(64 * 1024, true))
            .await
            .map_err(|_| timed_out(timeout))?;
        match chunk {
            Ok(Some(chunk)) => {
                if writer.size() + chunk.bytes.len() as u64 > size {
                    return Err(Fail(
                        ErrorCode::SizeMismatch,
                        format!("more than the announced {size} bytes"),
                    ));
                }
                let room = keep.saturating_sub(head.len()).min(chunk.bytes.len());
                head.extend_from_slice(&chunk.bytes[..room]);
                writer.write(&chunk.bytes)?;
            }
            Ok(None) => break,
            Err(e) => return Err(Fail(ErrorCode::Malformed, format!("read: {e}"))),
        }
    }
    if writer.size() != size {
        return Err(Fail(
            ErrorCode::SizeMismatch,
            format!("stream ended after {} of {size} bytes", writer.size()),
        ));
    }
    Ok((finish_blob(writer).await?, head))
}

async fn store(
    conn: &Arc<Conn>,
    send: &mut SendStream,
    recv: &mut RecvStream,
    size: u64,
    tags: Vec<String>,
) -> Result {
    let (blob, _) = receive(conn, recv, size, 0).await?;
    let appended = append(conn, NewRecord::Store { blob, tags }).await?;
    let reply = Response::Stored {
        hash: appended.hash,
        offset: appended.offset,
        new: appended.new,
    };
    send.write_all(&reply.to_frame()).await?;
    Ok(())
}

/// Send: checks the message and its sender, then stores it, appends the Send record and
/// queues it for the relay (one transaction), and wakes the relay worker.
async fn submit(
    conn: &Arc<Conn>,
    send: &mut SendStream,
    recv: &mut RecvStream,
    size: u64,
    from: String,
    recipients: Vec<String>,
) -> Result {
    let (blob, head) = receive(conn, recv, size, MAX_SEND_HEADER).await?;
    if postlog_mail::header_section(&head).is_some_and(|n| n == head.len())
        && head.len() == MAX_SEND_HEADER
    {
        return Err(Fail(
            ErrorCode::NotMail,
            format!("the header section is longer than {MAX_SEND_HEADER} bytes"),
        ));
    }
    let sub = postlog_mail::submission(&head, &from, &recipients).map_err(|e| {
        let code = match e {
            postlog_mail::MailError::NotMail(_) => ErrorCode::NotMail,
            postlog_mail::MailError::BadSender(_) => ErrorCode::SenderNotAllowed,
            _ => ErrorCode::BadRecipients,
        };
        Fail(code, e.to_string())
    })?;
    // The envelope sender and the From (or, if present, Sender) address must be the
    // account's own: an address, a +detail of one, or in a catch-all domain of it.
    let mut check: Vec<String> = vec![sub.from.clone()];
    match &sub.header_sender {
        Some(s) => check.push(s.clone()),
        None => check.extend(sub.header_from.iter().cloned()),
    }
    let account = conn.account;
    let foreign = blocking(conn, move |s, _| {
        for a in check {
            if s.store.resolve_address(&a)? != Some(account) {
                return Ok(Some(a));
            }
        }
        Ok(None)
    })
    .await?;
    if let Some(a) = foreign {
        return Err(Fail(
            ErrorCode::SenderNotAllowed,
            format!("{a} is not an address of this account (postlog account add --address)"),
        ));
    }
    let record = NewRecord::Send {
        blob,
        from: sub.from,
        recipients: sub.recipients,
    };
    let appended = append(conn, record).await?;
    if appended.new {
        conn.shared.relay_wake.notify_one();
    }
    let reply = Response::Sent {
        hash: appended.hash,
        offset: appended.offset,
        new: appended.new,
    };
    send.write_all(&reply.to_frame()).await?;
    Ok(())
}

/// Streams records from `from`, then `Live`, then every new record as it is committed.
/// Ends only when the client stops the stream or the connection closes.
async fn log(conn: &Arc<Conn>, send: &mut SendStream, mut from: LogOffset, inline: bool) -> Result {
    let _slot = LogSlot::take(conn)?;
    let c = conn.clone();
    let mut heads = tokio::task::spawn_blocking(move || {
        c.shared.heads.subscribe(c.shared.store.as_ref(), c.account)
    })
    .await??;
    let mut live_sent = false;
    loop {
        let head = *heads.borrow_and_update();
        // Each step reads up to LOG_BATCH records and, for an inline Log, their messages
        // (from LOG_FIRST_STEP_BYTES doubling up to LOG_BATCH_BYTES) in one blocking call;
        // the next step is read while this one is written to the stream.
        let mut step_bytes = LOG_FIRST_STEP_BYTES;
        let mut next = (from < head).then(|| spawn_read(conn, from, inline, step_bytes));
        while let Some(step) = next.take() {
            let (items, more) = step.await??;
            let after = items.last().map(|(e, _)| e.offset + 1).unwrap_or(from);
            let resume = if more { after } else { after.max(head) };
            if resume < head {
                step_bytes = (step_bytes * 2).min(LOG_BATCH_BYTES);
                next = Some(spawn_read(conn, resume, inline, step_bytes));
            }
            for (entry, blob) in items {
                // Handed to quinn as owned buffers: the message is not copied again.
                let frame = bytes::Bytes::from(Response::Entry(entry).to_frame());
                match blob {
                    Some(b) => send.write_all_chunks(&mut [frame, b.into()]).await?,
                    None => send.write_chunk(frame).await?,
                }
            }
            // Without `more`, everything below `head` was read; the rest were scrubbed holes.
            from = resume;
        }
        if !live_sent {
            send.write_all(&Response::Live { head }.to_frame()).await?;
            live_sent = true;
        }
        tokio::select! {
            changed = heads.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = send.stopped() => return Ok(()),
        }
    }
}
