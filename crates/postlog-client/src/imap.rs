//! `postlog import imap`: copy every message of an existing IMAP account into the Postlog
//! account, and keep doing it (a bridge) while the old account still receives mail.
//!
//! One IMAP connection reads (EXAMINE, so nothing changes on the source; `BODY.PEEK[]`, so
//! `\Seen` is never set), many Store requests write: up to [`IMAP_STORE_CONCURRENCY`] are
//! in flight while the next messages stream in, in UID batches of [`IMAP_BATCH`].
//!
//! Tags: IMAP flags map to the same tags as Maildir flags (`\Seen` = no `unread`, `\Flagged`
//! `flagged`, `\Answered` `replied`, `\Draft` `draft`, `\Deleted` `deleted`); keywords become
//! tags as they are (when they are valid tags); each folder adds a tag (`inbox` for INBOX, else
//! the folder's name with its hierarchy delimiter turned into `/`, or what `folder_tags`
//! says). They go into the Store request as initial tags. A Store of bytes the account
//! already holds (the same message in a second folder, or mail that already arrived by
//! LMTP) changes nothing on the server, so the importer then sends a Tag request adding the
//! folder's tag and the flag and keyword tags (never `unread`: the first copy decides
//! that). The importer only ever adds tags.
//!
//! Resumable: per source account and folder, state.db keeps the folder's UIDVALIDITY and the
//! highest UID whose message (and tag change) the server acknowledged; a batch's UIDs are
//! checkpointed only once every Store and Tag request of that batch and of all earlier
//! batches is acknowledged, together with the tags those requests gave each message
//! (`imap_known`), so that re-reading a message sends no Tag request for tags it already
//! got. A new UIDVALIDITY re-reads the folder from the start (harmless: Store is idempotent
//! by hash). The next run fetches only UIDs above the checkpoint.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_imap::types::{Flag, NameAttribute};
use futures_util::TryStreamExt;
use postlog_proto::limits::MAX_MESSAGE_SIZE;
use postlog_proto::message::valid_tag;
use postlog_proto::{BlobHash, LogOffset};
use rusqlite::{OptionalExtension, params};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::state::{State, StateError};
use crate::{ClientError, Connection};

/// Store (and Tag) requests in flight at once.
pub const IMAP_STORE_CONCURRENCY: usize = 64;
/// Message bytes held by Store requests in flight at once (a message larger than this is
/// still sent, alone).
pub const IMAP_BYTES_IN_FLIGHT: u64 = 256 << 20;
/// UIDs per `UID FETCH` command, and per checkpoint.
pub const IMAP_BATCH: usize = 256;
/// How long connecting (TCP, TLS, greeting) may take.
pub const IMAP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the IMAP server's answer to a command, or for the next message of a
/// FETCH: a server that stops answering ends the import with an error instead of a hang.
pub const IMAP_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest IMAP folder name accepted from the server's LIST answer.
pub const MAX_FOLDER_NAME: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot reach the IMAP server {server}: {why}")]
    Unreachable { server: String, why: String },
    #[error(
        "TLS with the IMAP server {server} failed: {why}\n\
         (a private or self-signed certificate? pass its CA with --ca-file)"
    )]
    Tls { server: String, why: String },
    #[error("the IMAP server {server} refused the login for {user}: {why}")]
    Auth {
        server: String,
        user: String,
        why: String,
    },
    #[error("reading the CA file {path}: {why}")]
    CaFile { path: PathBuf, why: String },
    #[error("the IMAP server has no folder {folder:?}; it has: {available}")]
    NoSuchFolder { folder: String, available: String },
    #[error("IMAP: {0}")]
    Imap(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Postlog(#[from] ClientError),
}

impl From<rusqlite::Error> for ImapError {
    fn from(e: rusqlite::Error) -> Self {
        ImapError::State(e.into())
    }
}

impl From<async_imap::error::Error> for ImapError {
    fn from(e: async_imap::error::Error) -> Self {
        ImapError::Imap(e.to_string())
    }
}

/// How the connection to the IMAP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (port 993).
    Implicit,
    /// Plain connection upgraded with STARTTLS before login (port 143).
    StartTls,
    /// No TLS at all: the password crosses the network in the clear. For loopback only.
    Plain,
}

impl TlsMode {
    pub fn default_port(self) -> u16 {
        match self {
            TlsMode::Implicit => 993,
            TlsMode::StartTls | TlsMode::Plain => 143,
        }
    }
}

/// The IMAP account to copy from.
#[derive(Clone)]
pub struct ImapSource {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub tls: TlsMode,
    /// Extra trusted CA certificates (PEM), besides Mozilla's roots.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for ImapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapSource")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ImapSource {
    fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The key of this source's checkpoints in state.db: user and host, not port or TLS
    /// mode (the same account reached over 993 or 143). Were it another server after all,
    /// its UIDVALIDITY differs and the folder is read again, which is harmless.
    fn key(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }
}

/// What to copy and how to tag it. Folders are named as the server lists them, or decoded
/// from modified UTF-7 (`Entwürfe` for `Entw&APw-rfe`).
#[derive(Clone, Debug, Default)]
pub struct ImapOptions {
    /// Folders to copy; empty: every selectable folder.
    pub folders: Vec<String>,
    /// Folder name -> tag, overriding the default folder tag.
    pub folder_tags: HashMap<String, String>,
}

/// Counters for a progress display.
#[derive(Debug, Default)]
pub struct ImapProgress {
    /// New messages found on the server (known after the first pass over the folders).
    pub total: AtomicU64,
    /// Of those, acknowledged by the Postlog server.
    pub done: AtomicU64,
}

/// One folder's result.
#[derive(Debug, Default, Clone)]
pub struct FolderReport {
    pub folder: String,
    pub tag: String,
    /// Messages above the checkpoint when the run started.
    pub found: u64,
    /// Whether the folder's UIDVALIDITY changed, so it was read again from the start.
    pub rescanned: bool,
}

#[derive(Debug, Default)]
pub struct ImapReport {
    pub folders: Vec<FolderReport>,
    pub found: u64,
    /// New on the server.
    pub stored: u64,
    /// The server already had the bytes.
    pub already: u64,
    /// Of the `already` ones, how many got tags added by a Tag request.
    pub tagged: u64,
    /// Bytes of the new messages.
    pub bytes: u64,
    /// (folder, UID, why) of messages not copied (too large, refused by the server).
    pub skipped: Vec<(String, u32, String)>,
}

/// Decodes a mailbox name from IMAP's modified UTF-7 (RFC 3501 §5.1.3: `&` starts a
/// modified-base64 run of UTF-16, `-` ends it, `&-` is `&`). A name that is not valid
/// modified UTF-7 is returned as it is.
pub fn decode_mailbox_name(name: &str) -> String {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b',' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let Some(dash) = after.find('-') else {
            return name.to_string();
        };
        let run = &after[..dash];
        if run.is_empty() {
            out.push('&');
        } else {
            let (mut bits, mut nbits, mut units) = (0u32, 0u32, Vec::new());
            for c in run.bytes() {
                let Some(v) = sextet(c) else {
                    return name.to_string();
                };
                bits = (bits << 6) | v;
                nbits += 6;
                if nbits >= 16 {
                    nbits -= 16;
                    units.push((bits >> nbits) as u16);
                    bits &= (1 << nbits) - 1;
                }
            }
            match String::from_utf16(&units) {
                Ok(s) => out.push_str(&s),
                Err(_) => return name.to_string(),
            }
        }
        rest = &after[dash + 1..];
    }
    out.push_str(rest);
    out
}

/// The tag a folder's messages get, unless configured otherwise: `inbox` for INBOX, else
/// the folder's name (decoded from modified UTF-7) with its hierarchy delimiter as `/`.
pub fn default_folder_tag(folder: &str, delimiter: Option<&str>) -> String {
    if folder.eq_ignore_ascii_case("INBOX") {
        return "inbox".into();
    }
    let folder = &decode_mailbox_name(folder);
    match delimiter {
        Some(d) if !d.is_empty() && d != "/" => folder.replace(d, "/"),
        _ => folder.to_string(),
    }
}

/// The tags IMAP flags and keywords stand for, plus `unread` when `\Seen` is absent.
pub fn tags_of_flags<'a>(flags: impl IntoIterator<Item = Flag<'a>>) -> Vec<String> {
    let mut tags = Vec::new();
    let mut seen = false;
    for f in flags {
        let tag = match f {
            Flag::Seen => {
                seen = true;
                continue;
            }
            Flag::Flagged => "flagged".to_string(),
            Flag::Answered => "replied".to_string(),
            Flag::Draft => "draft".to_string(),
            Flag::Deleted => "deleted".to_string(),
            Flag::Recent | Flag::MayCreate => continue,
            Flag::Custom(k) => {
                // Unknown system flags (`\Something`) are not keywords.
                if k.starts_with('\\') || !valid_tag(&k) {
                    continue;
                }
                k.into_owned()
            }
        };
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    if !seen {
        tags.push("unread".to_string());
    }
    tags
}

/// Builds a compact UID set (`1:5,7,9:10`) from ascending UIDs.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------- connection

trait Io: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> Io for T {}

type Session = async_imap::Session<Box<dyn Io>>;

fn tls_connector(src: &ImapSource) -> Result<tokio_rustls::TlsConnector, ImapError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &src.ca_file {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let ca_err = |why: String| ImapError::CaFile {
            path: path.clone(),
            why,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no certificate in it".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| ca_err(e.to_string()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(postlog_net::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ImapError::Tls {
            server: src.server(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn tls_handshake(src: &ImapSource, tcp: TcpStream) -> Result<Box<dyn Io>, ImapError> {
    let tls_err = |why: String| ImapError::Tls {
        server: src.server(),
        why,
    };
    let connector = tls_connector(src)?;
    let name = rustls::pki_types::ServerName::try_from(src.host.clone())
        .map_err(|e| tls_err(format!("{:?} is not a valid server name: {e}", src.host)))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(e.to_string()))?;
    Ok(Box::new(tls))
}

/// Connects, sets up TLS as asked, and logs in.
async fn open_session(src: &ImapSource) -> Result<Session, ImapError> {
    match tokio::time::timeout(IMAP_CONNECT_TIMEOUT, connect(src)).await {
        Ok(r) => r,
        Err(_) => Err(ImapError::Unreachable {
            server: src.server(),
            why: format!("no answer within {} s", IMAP_CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

async fn connect(src: &ImapSource) -> Result<Session, ImapError> {
    let unreachable = |why: String| ImapError::Unreachable {
        server: src.server(),
        why,
    };
    let tcp = TcpStream::connect((src.host.as_str(), src.port))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = match src.tls {
        TlsMode::Implicit => tls_handshake(src, tcp).await?,
        TlsMode::Plain => Box::new(tcp),
        TlsMode::StartTls => {
            let mut client = async_imap::Client::new(tcp);
            greeting(&mut client, src).await?;
            client
                .run_command_and_check_ok("STARTTLS", None)
                .await
                .map_err(|e| ImapError::Tls {
                    server: src.server(),
                    why: format!("STARTTLS refused: {e}"),
                })?;
            tls_handshake(src, client.into_inner()).await?
        }
    };
    let mut client = async_imap::Client::new(stream);
    if src.tls != TlsMode::StartTls {
        greeting(&mut client, src).await?;
    }
    client
        .login(&src.user, &src.password)
        .await
        .map_err(|(e, _)| match e {
            async_imap::error::Error::No(why) | async_imap::error::Error::Bad(why) => {
                ImapError::Auth {
                    server: src.server(),
                    user: src.user.clone(),
                    why,
                }
            }
            e => ImapError::Imap(format!("login: {e}")),
        })
}

async fn greeting<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug>(
    client: &mut async_imap::Client<T>,
    src: &ImapSource,
) -> Result<(), ImapError> {
    match client.read_response().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ImapError::Unreachable {
            server: src.server(),
            why: "the server closed the connection before greeting".into(),
        }),
        Err(e) => Err(ImapError::Unreachable {
            server: src.server(),
            why: e.to_string(),
        }),
    }
}

/// `fut` (an IMAP command, or reading its next response) within [`IMAP_READ_TIMEOUT`].
async fn answer<T, E: Into<ImapError>>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(IMAP_READ_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ImapError::Imap(format!(
            "no answer from the IMAP server within {} s ({what})",
            IMAP_READ_TIMEOUT.as_secs()
        ))),
    }
}

// ---------------------------------------------------------------- checkpoints

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS imap_folders (
    source TEXT NOT NULL, folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL, last_uid INTEGER NOT NULL,
    PRIMARY KEY (source, folder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS imap_known (hash BLOB PRIMARY KEY, tags TEXT NOT NULL) WITHOUT ROWID;
";

/// The tags this profile's importer knows a message has on the server (it stored it with
/// them, or a Tag request of it added them); empty when it never saw the message.
fn known_tags(conn: &rusqlite::Connection, hash: &BlobHash) -> Result<Vec<String>, ImapError> {
    let tags: Option<String> = conn
        .query_row(
            "SELECT tags FROM imap_known WHERE hash = ?1",
            [hash.0.as_slice()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(tags
        .map(|t| t.split('\n').map(str::to_string).collect())
        .unwrap_or_default())
}

fn add_known(
    conn: &rusqlite::Connection,
    hash: &BlobHash,
    tags: &[String],
) -> Result<(), ImapError> {
    let mut all = known_tags(conn, hash)?;
    for t in tags {
        if !all.contains(t) {
            all.push(t.clone());
        }
    }
    conn.execute(
        "INSERT INTO imap_known (hash, tags) VALUES (?1, ?2)
         ON CONFLICT(hash) DO UPDATE SET tags = excluded.tags",
        params![hash.0.as_slice(), all.join("\n")],
    )?;
    Ok(())
}

/// A folder's checkpoint: (UIDVALIDITY, highest UID acknowledged).
pub fn checkpoint(
    conn: &rusqlite::Connection,
    source: &str,
    folder: &str,
) -> Result<Option<(u32, u32)>, ImapError> {
    conn.execute_batch(SCHEMA)?;
    Ok(conn
        .query_row(
            "SELECT uidvalidity, last_uid FROM imap_folders WHERE source = ?1 AND folder = ?2",
            params![source, folder],
            |r| Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u32)),
        )
        .optional()?)
}

fn set_checkpoint(
    conn: &rusqlite::Connection,
    source: &str,
    folder: &str,
    uidvalidity: u32,
    last_uid: u32,
) -> Result<(), ImapError> {
    conn.execute(
        "INSERT INTO imap_folders (source, folder, uidvalidity, last_uid) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(source, folder) DO UPDATE
         SET uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid",
        params![source, folder, uidvalidity as i64, last_uid as i64],
    )?;
    Ok(())
}

// ---------------------------------------------------------------- the import

struct Folder {
    name: String,
    tag: String,
    uidvalidity: u32,
    /// New UIDs, ascending.
    uids: Vec<u32>,
    rescanned: bool,
}

enum Done {
    Stored {
        batch: u64,
        new: bool,
        bytes: u64,
        hash: BlobHash,
        offset: LogOffset,
        /// The initial tags sent.
        tags: Vec<String>,
    },
    Tagged {
        batch: u64,
        seq: u64,
        hash: BlobHash,
        added: Vec<String>,
        result: Result<LogOffset, ClientError>,
    },
    Skipped {
        batch: u64,
        uid: u32,
        why: String,
    },
    Failed(ClientError),
}

/// The requests in flight and the batches they belong to.
#[derive(Default)]
struct InFlight {
    /// Each task returns the message bytes it held (0 for a Tag request) and its outcome.
    tasks: JoinSet<(u64, Done)>,
    batches: VecDeque<Batch>,
    bytes: u64,
}

/// A batch of one folder's UIDs: checkpointed at `last_uid` once `fetched` and nothing of it
/// (or of an earlier batch) is in flight.
struct Batch {
    id: u64,
    folder: usize,
    last_uid: u32,
    fetched: bool,
    in_flight: usize,
    /// Tags acknowledged on the server for messages of this batch, recorded in
    /// `imap_known` with the checkpoint.
    known: Vec<(BlobHash, Vec<String>)>,
}

/// Copies the chosen folders' new messages into the account behind `conn`; `profile_dir`
/// holds state.db (checkpoints, and the sequence numbers of this device's Tag requests).
pub async fn import_imap(
    conn: &Connection,
    profile_dir: &Path,
    src: &ImapSource,
    opts: &ImapOptions,
    progress: Arc<ImapProgress>,
) -> Result<ImapReport, ImapError> {
    let mut state = State::open(profile_dir)?;
    state.conn().execute_batch(SCHEMA)?;
    let mut session = open_session(src).await?;
    let result = run(conn, &mut state, &mut session, src, opts, progress).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), session.logout()).await;
    result
}

async fn run(
    conn: &Connection,
    state: &mut State,
    session: &mut Session,
    src: &ImapSource,
    opts: &ImapOptions,
    progress: Arc<ImapProgress>,
) -> Result<ImapReport, ImapError> {
    let key = src.key();
    // Pass 1: which folders, and which UIDs in them are new.
    let mut listed: Vec<(String, Option<String>)> = Vec::new();
    {
        let names: Vec<_> = answer("LIST", async {
            session
                .list(Some(""), Some("*"))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        for n in names {
            if n.attributes().iter().any(|a| match a {
                NameAttribute::NoSelect => true,
                NameAttribute::Extension(x) => x.eq_ignore_ascii_case("\\NonExistent"),
                _ => false,
            }) || n.name().len() > MAX_FOLDER_NAME
            {
                continue;
            }
            listed.push((n.name().to_string(), n.delimiter().map(str::to_string)));
        }
    }
    let chosen: Vec<(String, Option<String>)> = if opts.folders.is_empty() {
        listed
    } else {
        let mut out = Vec::new();
        for want in &opts.folders {
            let found = listed.iter().find(|(n, _)| {
                n == want
                    || decode_mailbox_name(n) == *want
                    || (want.eq_ignore_ascii_case("INBOX") && n.eq_ignore_ascii_case("INBOX"))
            });
            match found {
                Some(f) => out.push(f.clone()),
                None => {
                    let available: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(ImapError::NoSuchFolder {
                        folder: want.clone(),
                        available: available.join(", "),
                    });
                }
            }
        }
        out
    };
    let mut folders = Vec::new();
    for (name, delimiter) in chosen {
        let tag = opts
            .folder_tags
            .get(&name)
            .or_else(|| opts.folder_tags.get(&decode_mailbox_name(&name)))
            .cloned()
            .unwrap_or_else(|| default_folder_tag(&name, delimiter.as_deref()));
        if !valid_tag(&tag) {
            return Err(ImapError::Imap(format!(
                "folder {name:?} would get the invalid tag {tag:?}; choose one with --folder-tag"
            )));
        }
        let mailbox = answer("EXAMINE", session.examine(&name)).await?;
        let uidvalidity = mailbox.uid_validity.unwrap_or(0);
        let (from, rescanned) = match checkpoint(state.conn(), &key, &name)? {
            Some((v, last)) if v == uidvalidity => (last, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        let mut uids: Vec<u32> = if mailbox.exists == 0 {
            Vec::new()
        } else {
            // `n:*` always matches the highest UID, even below n: filter.
            answer(
                "UID SEARCH",
                session.uid_search(format!("UID {}:*", from.saturating_add(1))),
            )
            .await?
            .into_iter()
            .filter(|u| *u > from)
            .collect()
        };
        uids.sort_unstable();
        tracing::debug!(folder = %name, uidvalidity, from, new = uids.len(), "IMAP folder");
        folders.push(Folder {
            name,
            tag,
            uidvalidity,
            uids,
            rescanned,
        });
    }
    let total: u64 = folders.iter().map(|f| f.uids.len() as u64).sum();
    progress.total.store(total, Ordering::Relaxed);
    let mut report = ImapReport {
        found: total,
        folders: folders
            .iter()
            .map(|f| FolderReport {
                folder: f.name.clone(),
                tag: f.tag.clone(),
                found: f.uids.len() as u64,
                rescanned: f.rescanned,
            })
            .collect(),
        ..Default::default()
    };

    // Pass 2: fetch in batches; store many at once; checkpoint finished batches in order.
    let mut flight = InFlight::default();
    let mut next_batch = 0u64;
    let mut failure: Option<ImapError> = None;
    'folders: for (fi, folder) in folders.iter().enumerate() {
        if folder.uids.is_empty() {
            // Nothing new, but remember a changed UIDVALIDITY.
            if folder.rescanned || checkpoint(state.conn(), &key, &folder.name)?.is_none() {
                set_checkpoint(state.conn(), &key, &folder.name, folder.uidvalidity, 0)?;
            }
            continue;
        }
        answer("EXAMINE", session.examine(&folder.name)).await?;
        for chunk in folder.uids.chunks(IMAP_BATCH) {
            let batch_id = next_batch;
            next_batch += 1;
            flight.batches.push_back(Batch {
                id: batch_id,
                folder: fi,
                last_uid: chunk[chunk.len() - 1],
                fetched: false,
                in_flight: 0,
                known: Vec::new(),
            });
            let set = uid_set(chunk);
            let mut fetches = answer(
                "UID FETCH",
                session.uid_fetch(&set, "(UID FLAGS BODY.PEEK[])"),
            )
            .await?;
            loop {
                let fetched = match answer("UID FETCH", fetches.try_next()).await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break 'folders;
                    }
                };
                // Unilateral FETCH responses (flag changes) carry no body: not ours.
                let (Some(uid), Some(body)) = (fetched.uid, fetched.body()) else {
                    continue;
                };
                if chunk.binary_search(&uid).is_err() {
                    continue;
                }
                let tags = {
                    let mut t = vec![folder.tag.clone()];
                    for x in tags_of_flags(fetched.flags()) {
                        if !t.contains(&x) {
                            t.push(x);
                        }
                    }
                    t
                };
                let body = body.to_vec();
                drop(fetched);
                let size = body.len() as u64;
                while flight.tasks.len() >= IMAP_STORE_CONCURRENCY
                    || (flight.bytes > 0 && flight.bytes + size > IMAP_BYTES_IN_FLIGHT)
                {
                    if let Some(e) = handle(
                        &mut flight,
                        state,
                        conn,
                        &key,
                        &folders,
                        &mut report,
                        &progress,
                    )
                    .await?
                    {
                        failure = Some(e);
                        break 'folders;
                    }
                }
                if let Some(b) = flight.batches.back_mut() {
                    b.in_flight += 1;
                }
                flight.bytes += size;
                let conn = conn.clone();
                flight
                    .tasks
                    .spawn(async move { (size, store(&conn, batch_id, uid, body, tags).await) });
            }
            drop(fetches);
            if let Some(b) = flight.batches.back_mut() {
                b.fetched = true;
            }
            advance(&mut flight.batches, state, &key, &folders)?;
        }
    }
    // Drain what is in flight; on a failure, still record what was acknowledged.
    while !flight.tasks.is_empty() {
        match handle(
            &mut flight,
            state,
            conn,
            &key,
            &folders,
            &mut report,
            &progress,
        )
        .await
        {
            Ok(Some(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
            Ok(None) => {}
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    advance(&mut flight.batches, state, &key, &folders)?;
    Ok(report)
}

async fn store(conn: &Connection, batch: u64, uid: u32, body: Vec<u8>, tags: Vec<String>) -> Done {
    if body.is_empty() {
        return Done::Skipped {
            batch,
            uid,
            why: "empty message".into(),
        };
    }
    if body.len() as u64 > MAX_MESSAGE_SIZE {
        return Done::Skipped {
            batch,
            uid,
            why: format!(
                "{} bytes is over the {MAX_MESSAGE_SIZE}-byte limit",
                body.len()
            ),
        };
    }
    match conn.store(&body, &tags).await {
        Ok((hash, offset, new)) => Done::Stored {
            batch,
            new,
            bytes: body.len() as u64,
            hash,
            offset,
            tags,
        },
        Err(ClientError::Server {
            code: Some(c),
            message,
        }) if !c.is_retryable() => Done::Skipped {
            batch,
            uid,
            why: format!("refused by the server: {message}"),
        },
        Err(e) => Done::Failed(e),
    }
}

/// Waits for one task and accounts for it. Returns the Postlog error that must stop the
/// import, if the task failed.
#[allow(clippy::too_many_arguments)]
async fn handle(
    flight: &mut InFlight,
    state: &mut State,
    conn: &Connection,
    key: &str,
    folders: &[Folder],
    report: &mut ImapReport,
    progress: &ImapProgress,
) -> Result<Option<ImapError>, ImapError> {
    let Some(joined) = flight.tasks.join_next().await else {
        return Ok(None);
    };
    let (held, done) = joined.map_err(|e| ImapError::Imap(format!("store task: {e}")))?;
    flight.bytes -= held;
    let batches = &mut flight.batches;
    // Marks one request of batch `id` done; `known`: tags now acknowledged for a message.
    let finish =
        |batches: &mut VecDeque<Batch>, id: u64, known: Option<(BlobHash, Vec<String>)>| {
            if let Some(b) = batches.iter_mut().find(|b| b.id == id) {
                b.in_flight -= 1;
                b.known.extend(known);
            }
        };
    match done {
        Done::Stored {
            batch,
            new: true,
            bytes,
            hash,
            tags,
            ..
        } => {
            report.stored += 1;
            report.bytes += bytes;
            progress.done.fetch_add(1, Ordering::Relaxed);
            finish(batches, batch, Some((hash, tags)));
        }
        Done::Stored {
            batch,
            new: false,
            hash,
            offset,
            tags,
            ..
        } => {
            report.already += 1;
            progress.done.fetch_add(1, Ordering::Relaxed);
            // Never `unread` on a message already there: its first copy decided that. Tags
            // the importer added before (a resumed run, a folder read again after a
            // UIDVALIDITY change) or that the synced replica shows need no request, and a
            // tag removed in Postlog since is not added back.
            let known = known_tags(state.conn(), &hash)?;
            let have = State::tags_of(state.conn(), &hash)?.tags();
            let extra: Vec<String> = tags
                .into_iter()
                .filter(|t| t != "unread" && !known.contains(t) && !have.contains(t))
                .collect();
            if extra.is_empty() {
                finish(batches, batch, None);
            } else {
                // Queued durably first (a crash leaves it for the next `postlog sync` to
                // send), with a sequence number of this device that no other op uses.
                // IMMEDIATE: another postlog process may be numbering its own ops.
                let tx = state
                    .conn()
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let seq = State::queue_op(&tx, &hash, &extra, &[], offset)?;
                tx.commit()?;
                let conn = conn.clone();
                flight.tasks.spawn(async move {
                    let result = conn
                        .tag(&hash, &extra, &[], offset, seq)
                        .await
                        .map(|(o, _)| o);
                    (
                        0,
                        Done::Tagged {
                            batch,
                            seq,
                            hash,
                            added: extra,
                            result,
                        },
                    )
                });
            }
        }
        Done::Tagged {
            batch,
            seq,
            hash,
            added,
            result: Ok(offset),
        } => {
            State::ack_op(state.conn(), seq, offset)?;
            report.tagged += 1;
            finish(batches, batch, Some((hash, added)));
        }
        Done::Tagged { result: Err(e), .. } => return Ok(Some(e.into())),
        Done::Skipped { batch, uid, why } => {
            let folder = batches
                .iter()
                .find(|b| b.id == batch)
                .and_then(|b| folders.get(b.folder))
                .map(|f| f.name.clone())
                .unwrap_or_default();
            report.skipped.push((folder, uid, why));
            progress.done.fetch_add(1, Ordering::Relaxed);
            finish(batches, batch, None);
        }
        Done::Failed(e) => return Ok(Some(e.into())),
    }
    advance(&mut flight.batches, state, key, folders)?;
    Ok(None)
}

/// Checkpoints every leading batch that is complete.
fn advance(
    batches: &mut VecDeque<Batch>,
    state: &mut State,
    key: &str,
    folders: &[Folder],
) -> Result<(), ImapError> {
    let mut last: BTreeMap<usize, u32> = BTreeMap::new();
    let mut known = Vec::new();
    while let Some(b) = batches.front() {
        if !b.fetched || b.in_flight > 0 {
            break;
        }
        last.insert(b.folder, b.last_uid);
        if let Some(mut b) = batches.pop_front() {
            known.append(&mut b.known);
        }
    }
    if last.is_empty() {
        return Ok(());
    }
    let tx = state.conn().transaction()?;
    for (hash, tags) in &known {
        add_known(&tx, hash, tags)?;
    }
    for (fi, uid) in last {
        let f = &folders[fi];
        set_checkpoint(&tx, key, &f.name, f.uidvalidity, uid)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn flags_folders_and_uid_sets() {
        assert_eq!(tags_of_flags([Flag::Seen]), Vec::<String>::new());
        assert_eq!(
            tags_of_flags([
                Flag::Flagged,
                Flag::Answered,
                Flag::Recent,
                Flag::Custom(Cow::Borrowed("$Important")),
                Flag::Custom(Cow::Borrowed("\\Unknown")),
                Flag::Draft,
                Flag::Deleted,
            ]),
            vec![
                "flagged",
                "replied",
                "$Important",
                "draft",
                "deleted",
                "unread"
            ]
        );
        assert_eq!(default_folder_tag("INBOX", Some(".")), "inbox");
        assert_eq!(default_folder_tag("Inbox", Some("/")), "inbox");
        assert_eq!(default_folder_tag("Lists.rust", Some(".")), "Lists/rust");
        assert_eq!(default_folder_tag("Lists/rust", Some("/")), "Lists/rust");
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[9]), "9");
        assert_eq!(uid_set(&[]), "");
        // RFC 3501 §5.1.3's example, `&-`, a non-BMP character, and invalid runs kept as-is.
        assert_eq!(
            decode_mailbox_name("~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
            "~peter/mail/台北/日本語"
        );
        assert_eq!(decode_mailbox_name("Entw&APw-rfe"), "Entwürfe");
        assert_eq!(decode_mailbox_name("Tom &- Jerry"), "Tom & Jerry");
        assert_eq!(decode_mailbox_name("&2D3eAA-"), "\u{1F600}");
        assert_eq!(decode_mailbox_name("bad&run"), "bad&run");
        assert_eq!(decode_mailbox_name("bad&!!-"), "bad&!!-");
        assert_eq!(
            default_folder_tag("Lists.&AOk-t&AOk-", Some(".")),
            "Lists/été"
        );
    }

    #[test]
    fn checkpoints_cover_only_acknowledged_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::open(dir.path()).unwrap();
        state.conn().execute_batch(SCHEMA).unwrap();
        let folder = |name: &str, uidvalidity| Folder {
            name: name.into(),
            tag: name.to_lowercase(),
            uidvalidity,
            uids: Vec::new(),
            rescanned: false,
        };
        let folders = [folder("INBOX", 7), folder("Archive", 9)];
        let batch = |id, folder, last_uid, fetched, in_flight| Batch {
            id,
            folder,
            last_uid,
            fetched,
            in_flight,
            known: vec![(BlobHash([id as u8; 32]), vec![format!("t{id}")])],
        };
        let mut q: VecDeque<Batch> = [
            batch(0, 0, 256, true, 1),
            batch(1, 0, 400, true, 0),
            batch(2, 1, 50, false, 0),
        ]
        .into();
        let at = |state: &mut State, f: &str| checkpoint(state.conn(), "k", f).unwrap();
        // Batch 1 is done, but batch 0 still has a Store in flight: nothing is covered.
        advance(&mut q, &mut state, "k", &folders).unwrap();
        assert_eq!(at(&mut state, "INBOX"), None);
        q[0].in_flight = 0;
        advance(&mut q, &mut state, "k", &folders).unwrap();
        assert_eq!(at(&mut state, "INBOX"), Some((7, 400)));
        // Archive's batch is still being fetched.
        assert_eq!(at(&mut state, "Archive"), None);
        assert_eq!(q.len(), 1);
        q[0].fetched = true;
        advance(&mut q, &mut state, "k", &folders).unwrap();
        assert_eq!(at(&mut state, "Archive"), Some((9, 50)));
        assert!(q.is_empty());
        // The tags acknowledged in those batches are remembered with the checkpoints.
        let c = state.conn();
        assert_eq!(known_tags(c, &BlobHash([1; 32])).unwrap(), vec!["t1"]);
        add_known(c, &BlobHash([1; 32]), &["x".to_string(), "t1".to_string()]).unwrap();
        assert_eq!(known_tags(c, &BlobHash([1; 32])).unwrap(), vec!["t1", "x"]);
        assert!(known_tags(c, &BlobHash([5; 32])).unwrap().is_empty());
    }
}
