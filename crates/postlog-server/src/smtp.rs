//! Mail in: the LMTP and SMTP listeners. Each connection drives a sans-IO
//! [`postlog_smtp::Session`]; this module only does the I/O, the lookups and the appends.
//!
//! A message is staged once ([`BlobWriter`], with `Return-Path` and `Received` prepended)
//! and appended as a Store record to every recipient account through the same
//! [`Backend::append`](postlog_store::Backend::append) the QUIC Store uses, so watching
//! clients get it pushed at once. The 250 goes out only after every append is durable.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postlog_smtp::received::{Trace, received, return_path};
use postlog_smtp::{Config, Event, Outcome, Protocol, Session, Verdict};
use postlog_store::{AccountId, BlobWriter, NewRecord, StoreError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::handlers::{append_to, blob_writer, finish_blob};
use crate::server::Shared;

/// Longest TLS handshake after STARTTLS.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server lets open sessions finish their current step.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Bytes read from the peer at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Room for the Return-Path and Received fields on top of the message size limit.
const TRACE_ROOM: u64 = 4096;

/// The bound, not yet running, listeners.
#[derive(Default)]
pub(crate) struct Listeners {
    pub lmtp: Option<std::net::TcpListener>,
    pub lmtp_unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    pub smtp: Option<std::net::TcpListener>,
    /// The rustls configuration for STARTTLS (the server's certificate).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Open LMTP/SMTP connections, in total and per peer address.
#[derive(Default)]
struct Slots {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A held connection slot; dropping it frees the slot.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(ip) = self.ip
                && let Some(n) = s.per_ip.get_mut(&ip)
            {
                *n -= 1;
                if *n == 0 {
                    s.per_ip.remove(&ip);
                }
            }
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    slots: Arc<Mutex<Slots>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn take_slot(&self, ip: Option<IpAddr>) -> Option<Slot> {
        let d = &self.shared.config.delivery;
        let mut s = self.slots.lock().ok()?;
        if s.total >= d.max_connections {
            return None;
        }
        if let Some(ip) = ip {
            let n = s.per_ip.entry(ip).or_insert(0);
            if *n >= d.max_connections_per_ip {
                return None;
            }
            *n += 1;
        }
        s.total += 1;
        Some(Slot {
            slots: self.slots.clone(),
            ip,
        })
    }

    fn session_config(&self, protocol: Protocol) -> Config {
        let cfg = &self.shared.config;
        let mut c = Config::new(protocol, cfg.mail_hostname(), cfg.max_message_size);
        c.max_recipients = cfg.delivery.max_recipients;
        c.starttls = protocol == Protocol::Smtp && self.tls.is_some();
        c
    }
}

/// Runs the listeners until `stop` turns true; then tells open sessions (421) and waits
/// briefly for them.
pub(crate) async fn run(shared: Arc<Shared>, listeners: Listeners, stop: watch::Receiver<bool>) {
    let ctx = Arc::new(Ctx {
        shared,
        slots: Arc::default(),
        tls: listeners.tls.map(tokio_rustls::TlsAcceptor::from),
        stop: stop.clone(),
    });
    let mut loops = JoinSet::new();
    for (listener, protocol) in [
        (listeners.lmtp, Protocol::Lmtp),
        (listeners.smtp, Protocol::Smtp),
    ] {
        let Some(l) = listener else { continue };
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                loops.spawn(accept_tcp(ctx.clone(), l, protocol));
            }
            Err(e) => tracing::error!(error = %e, ?protocol, "cannot use the listener"),
        }
    }
    if let Some((l, path)) = listeners.lmtp_unix {
        match tokio::net::UnixListener::from_std(l) {
            Ok(l) => {
                loops.spawn(accept_unix(ctx.clone(), l, path));
            }
            Err(e) => tracing::error!(error = %e, "cannot use the LMTP socket"),
        }
    }
    while loops.join_next().await.is_some() {}
}

async fn accept_tcp(ctx: Arc<Ctx>, listener: tokio::net::TcpListener, protocol: Protocol) {
    let mut sessions = JoinSet::new();
    let mut stop = ctx.stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = sessions.join_next(), if !sessions.is_empty() => continue,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, ?protocol, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        sessions.spawn(async move {
            let Some(slot) = ctx.take_slot(Some(peer.ip())) else {
                tracing::warn!(%peer, "LMTP/SMTP connection limit reached");
                let mut stream = stream;
                let host = ctx.shared.config.mail_hostname().to_owned();
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    stream.write_all(&postlog_smtp::busy_reply(&host)),
                )
                .await;
                return;
            };
            let peer_name = format!("[{}]", peer.ip());
            if let Err(e) = connection(&ctx, stream, protocol, &peer_name).await {
                tracing::debug!(%peer, error = %e, "session ended");
            }
            drop(slot);
        });
    }
    drain(sessions).await;
}

async fn accept_unix(ctx: Arc<Ctx>, listener: tokio::net::UnixListener, path: PathBuf) {
    let mut sessions = JoinSet::new();
    let mut stop = ctx.stop.clone();
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = sessions.join_next(), if !sessions.is_empty() => continue,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the LMTP socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        sessions.spawn(async move {
            let Some(slot) = ctx.take_slot(None) else {
                let mut stream = stream;
                let host = ctx.shared.config.mail_hostname().to_owned();
                let _ = stream.write_all(&postlog_smtp::busy_reply(&host)).await;
                return;
            };
            if let Err(e) = connection(&ctx, stream, Protocol::Lmtp, "localhost").await {
                tracing::debug!(error = %e, "LMTP socket session ended");
            }
            drop(slot);
        });
    }
    let _ = std::fs::remove_file(&path);
    drain(sessions).await;
}

async fn drain(mut sessions: JoinSet<()>) {
    let all = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        sessions.abort_all();
    }
}

/// How a stretch of a session ended.
enum Step {
    Closed,
    StartTls,
}

/// One connection: the plain part, and after STARTTLS the TLS part, with one session.
async fn connection<S>(
    ctx: &Ctx,
    mut stream: S,
    protocol: Protocol,
    peer: &str,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut session: Session<AccountId> = Session::new(ctx.session_config(protocol));
    let deadline = Instant::now() + ctx.shared.config.delivery.session_timeout();
    match drive(ctx, &mut stream, &mut session, peer, deadline).await? {
        Step::Closed => Ok(()),
        Step::StartTls => {
            let Some(acceptor) = ctx.tls.clone() else {
                return Ok(());
            };
            let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake")
                })??;
            let mut tls = tls;
            drive(ctx, &mut tls, &mut session, peer, deadline).await?;
            Ok(())
        }
    }
}

/// A message being received.
struct Incoming {
    /// `None` once staging failed (the message will get a 451).
    writer: Option<BlobWriter>,
}

/// Runs the session on `stream` until it closes, times out, or asks for STARTTLS.
async fn drive<S>(
    ctx: &Ctx,
    stream: &mut S,
    session: &mut Session<AccountId>,
    peer: &str,
    deadline: Instant,
) -> std::io::Result<Step>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stop = ctx.stop.clone();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut incoming: Option<Incoming> = None;
    loop {
        // Handle everything the input allows.
        let mut pos = 0;
        loop {
            let (used, event) = session.advance(&buf[pos..]);
            let step = match event {
                Event::NeedInput => None,
                Event::Data(bytes) => {
                    if let Some(w) = incoming.as_mut().and_then(|i| i.writer.as_mut())
                        && let Err(e) = w.write(bytes)
                    {
                        tracing::error!(error = %e, "staging an incoming message failed");
                        if let Some(i) = incoming.as_mut() {
                            i.writer = None;
                        }
                    }
                    pos += used;
                    continue;
                }
                Event::Recipient(address) => {
                    pos += used;
                    let verdict = lookup(ctx, protocol_of(session), &address).await;
                    session.recipient(verdict);
                    continue;
                }
                Event::MessageStart => {
                    pos += used;
                    incoming = Some(start_message(ctx, session, peer).await);
                    continue;
                }
                Event::MessageAbort => {
                    pos += used;
                    incoming = None;
                    continue;
                }
                Event::MessageEnd => {
                    pos += used;
                    // Replies to pipelined commands before this one go out first.
                    flush(stream, session).await?;
                    let outcomes = deliver(ctx, session, incoming.take()).await;
                    session.message_done(&outcomes);
                    continue;
                }
                Event::StartTls => Some(Step::StartTls),
                Event::Close => Some(Step::Closed),
            };
            pos += used;
            if let Some(step) = step {
                flush(stream, session).await?;
                if matches!(step, Step::Closed) {
                    let _ = stream.shutdown().await;
                }
                return Ok(step);
            }
            break;
        }
        buf.drain(..pos);
        flush(stream, session).await?;
        // Read more, within the idle and session time limits.
        let now = Instant::now();
        let wait = ctx
            .shared
            .config
            .delivery
            .command_timeout()
            .min(deadline.saturating_duration_since(now));
        let n = tokio::select! {
            r = tokio::time::timeout(wait, stream.read(&mut chunk)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    session.timeout();
                    flush(stream, session).await?;
                    return Ok(Step::Closed);
                }
            },
            _ = stopped(&mut stop) => {
                session.shutdown();
                flush(stream, session).await?;
                return Ok(Step::Closed);
            }
        };
        if n == 0 {
            return Ok(Step::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Resolves once the server stops (the watch guard is dropped here, not held across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn protocol_of(session: &Session<AccountId>) -> Protocol {
    session.protocol()
}

async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session<AccountId>,
) -> std::io::Result<()> {
    if session.has_output() {
        let out = session.take_output();
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
    Ok(())
}

/// Which account a recipient address belongs to. Over LMTP, which only a local MTA or
/// `postlog deliver` reaches, a bare account name (no `@`) is accepted too.
async fn lookup(ctx: &Ctx, protocol: Protocol, address: &str) -> Verdict<AccountId> {
    let store = ctx.shared.store.clone();
    let address = address.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        if address.contains('@') {
            store.resolve_address(&address)
        } else if protocol == Protocol::Lmtp {
            store.account_by_name(&address)
        } else {
            Ok(None)
        }
    })
    .await;
    match found {
        Ok(Ok(Some(id))) => Verdict::Accept(id),
        Ok(Ok(None)) => Verdict::Unknown,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "recipient lookup failed");
            Verdict::TempFail
        }
        Err(e) => {
            tracing::error!(error = %e, "recipient lookup task failed");
            Verdict::TempFail
        }
    }
}

/// Opens the staging file and writes the trace fields.
async fn start_message(ctx: &Ctx, session: &Session<AccountId>, peer: &str) -> Incoming {
    let cfg = &ctx.shared.config;
    let max = cfg.max_message_size + TRACE_ROOM;
    let mut writer = match blob_writer(&ctx.shared, max).await {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot stage an incoming message");
            return Incoming { writer: None };
        }
    };
    let id = format!("{:016x}", rand_id());
    let rcpts = session.recipients();
    let trace = Trace {
        helo: session.helo(),
        peer,
        by: cfg.mail_hostname(),
        with: session.with_keyword(),
        id: &id,
        recipient: (rcpts.len() == 1).then(|| rcpts[0].0.as_str()),
    };
    let mut head = return_path(session.mail_from().unwrap_or(""));
    head.push_str(&received(&trace, unix_now()));
    if let Err(e) = writer.write(head.as_bytes()) {
        tracing::error!(error = %e, "cannot stage an incoming message");
        return Incoming { writer: None };
    }
    tracing::debug!(%id, recipients = rcpts.len(), "receiving a message");
    Incoming {
        writer: Some(writer),
    }
}

/// Makes the message durable in every recipient account; one outcome per recipient.
async fn deliver(
    ctx: &Ctx,
    session: &Session<AccountId>,
    incoming: Option<Incoming>,
) -> Vec<Outcome> {
    let rcpts = session.recipients();
    let all = |o| vec![o; rcpts.len()];
    let Some(writer) = incoming.and_then(|i| i.writer) else {
        return all(Outcome::TempFail);
    };
    let blob = match finish_blob(writer).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "staging an incoming message failed");
            return all(Outcome::TempFail);
        }
    };
    let mut accounts: Vec<AccountId> = rcpts.iter().map(|(_, a)| *a).collect();
    accounts.sort_unstable();
    accounts.dedup();
    // One staged copy per account (hard links), all appended at once: one group commit.
    let mut jobs = Vec::with_capacity(accounts.len());
    let mut copies = Vec::with_capacity(accounts.len());
    for _ in 1..accounts.len() {
        match blob.duplicate() {
            Ok(c) => copies.push(c),
            Err(e) => {
                tracing::error!(error = %e, "staging an incoming message failed");
                return all(Outcome::TempFail);
            }
        }
    }
    copies.push(blob);
    let tags = ctx.shared.config.delivery.initial_tags.clone();
    for (account, blob) in accounts.iter().zip(copies) {
        let record = NewRecord::Store {
            blob,
            tags: tags.clone(),
        };
        jobs.push(append_to(&ctx.shared, *account, record));
    }
    let mut results: HashMap<AccountId, Outcome> = HashMap::new();
    for (account, job) in accounts.iter().zip(jobs) {
        let outcome = match job.await {
            Ok(a) => {
                tracing::info!(account, hash = %a.hash, offset = a.offset, new = a.new, "delivered");
                Outcome::Delivered
            }
            Err(e @ (StoreError::TooLarge { .. } | StoreError::Invalid { .. })) => {
                tracing::warn!(account, error = %e, "delivery refused");
                Outcome::PermFail
            }
            Err(e) => {
                tracing::error!(account, error = %e, "delivery failed");
                Outcome::TempFail
            }
        };
        results.insert(*account, outcome);
    }
    rcpts
        .iter()
        .map(|(_, a)| results.get(a).copied().unwrap_or(Outcome::TempFail))
        .collect()
}

fn rand_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Binds the configured listeners (before the server starts serving, so that a wrong
/// address fails `postlog serve` at once).
pub(crate) fn bind(
    data: &std::path::Path,
    lmtp: Option<SocketAddr>,
    lmtp_unix: Option<PathBuf>,
    smtp: Option<SocketAddr>,
) -> Result<Listeners, crate::ServerError> {
    let tcp = |addr: SocketAddr| -> Result<std::net::TcpListener, crate::ServerError> {
        let bind = |source| crate::ServerError::Bind { addr, source };
        let l = std::net::TcpListener::bind(addr).map_err(bind)?;
        l.set_nonblocking(true).map_err(bind)?;
        Ok(l)
    };
    let mut out = Listeners {
        lmtp: lmtp.map(tcp).transpose()?,
        smtp: smtp.map(tcp).transpose()?,
        ..Listeners::default()
    };
    if let Some(path) = lmtp_unix {
        let path = data.join(path);
        let err = |source| crate::ServerError::BindUnix {
            path: path.clone(),
            source,
        };
        // A socket left by a killed server: we hold the data directory's lock, so it is
        // not in use by another server of this directory.
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(err)?;
            }
        }
        let l = std::os::unix::net::UnixListener::bind(&path).map_err(err)?;
        l.set_nonblocking(true).map_err(err)?;
        out.lmtp_unix = Some((l, path));
    }
    Ok(out)
}
