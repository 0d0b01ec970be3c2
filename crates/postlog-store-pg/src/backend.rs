//! [`PgStore`]: the [`Backend`] over PostgreSQL and object storage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postlog_proto::{BlobHash, LogEntry, LogOffset, Record};
use postlog_store::kit::{self, HeadWatcher, KIND_SCRUBBED};
use postlog_store::{
    AccountId, Backend, BlobWriter, DeviceCredentials, DeviceId, DeviceInfo, MessageSummary,
    NewRecord, QueuedSend, StoreError,
};

use crate::objects::Objects;
use crate::pool::Pool;
use crate::writer::{Done, Job, Shared};
use crate::{PgSettings, R, admin, col, relay, scrub};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One node's handle on the shared PostgreSQL database and bucket.
pub struct PgStore {
    tmp: PathBuf,
    /// This node's id (DATA/node-id), for its relay claims.
    node: i64,
    pool: Pool,
    pub(crate) objects: Arc<Objects>,
    writer: Mutex<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    settings: PgSettings,
}

impl PgStore {
    /// Connects, creates or upgrades the schema, checks the bucket, and starts this node's
    /// writer and listener. `data` is the node's own directory: only `tmp/` (staging of
    /// incoming messages) is used here.
    pub fn open(settings: &PgSettings, data: &Path) -> Result<PgStore> {
        let tmp = data.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| StoreError::Invalid {
            what: "data directory",
            why: format!("{}: {e}", tmp.display()),
        })?;
        let node = node_id(data)?;
        let pool = Pool::new(&settings.postgres, settings.pool_size)?;
        pool.run(crate::schema::migrate)?;
        let objects = Arc::new(Objects::new(&settings.s3)?);
        // A missing object answers "not found": that proves the endpoint, the bucket and
        // the credentials, with a clear error at start instead of at the first message.
        objects
            .get(0, &BlobHash([0; 32]))
            .map_err(|e| StoreError::Remote {
                engine: "object storage",
                why: format!(
                    "bucket {:?} at {:?} is not usable: {}",
                    settings.s3.bucket,
                    settings.s3.endpoint,
                    StoreError::from(e)
                ),
            })?;
        let shared = Arc::new(Shared {
            heads: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
            revoked: Mutex::new(None),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (url, o, s) = (settings.postgres.clone(), objects.clone(), shared.clone());
        std::thread::Builder::new()
            .name("postlog-pg-writer".into())
            .spawn(move || crate::writer::run(url, o, s, rx))
            .map_err(|e| StoreError::Invalid {
                what: "thread",
                why: e.to_string(),
            })?;
        let (url, s) = (settings.postgres.clone(), shared.clone());
        std::thread::Builder::new()
            .name("postlog-pg-listen".into())
            .spawn(move || listen(&url, &s))
            .map_err(|e| StoreError::Invalid {
                what: "thread",
                why: e.to_string(),
            })?;
        Ok(PgStore {
            tmp,
            node,
            pool,
            objects,
            writer: Mutex::new(tx),
            shared,
            settings: settings.clone(),
        })
    }

    /// What a node's server does at start, after a stop or a crash: removes the staged
    /// files left in `tmp/` (never acknowledged) and makes the relay attempts this node had
    /// claimed due again. Not done by administration commands (`account add`, `deliver`,
    /// `verify`, ...), which open the node's directory while its server may be running.
    pub fn recover_node(&self) -> Result<u64> {
        if let Ok(entries) = std::fs::read_dir(&self.tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let node = self.node;
        let released = self.run(move |c| relay::release(c, node, kit::now_ms()))?;
        if released > 0 {
            tracing::info!(
                released,
                "relay attempts this node did not finish are due again"
            );
        }
        Ok(released)
    }

    /// The settings this node was opened with.
    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// Runs `f` on a pooled connection (again on a fresh one if the connection was gone).
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl Fn(&mut postgres::Client) -> R<T> + Send + Sync + 'static,
    ) -> Result<T> {
        Ok(self.pool.run(f)?)
    }

    /// Runs `f` once: for work that must not repeat blindly (migration's transactions).
    pub(crate) fn run_once<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> R<T> + Send + 'static,
    ) -> Result<T> {
        Ok(self.pool.run_once(f)?)
    }

    /// Adds a device to `account`, creating the account when it does not exist.
    pub fn add_device(
        &self,
        account: &str,
        addresses: &[String],
        device_name: &str,
    ) -> Result<DeviceCredentials> {
        let secret: [u8; 32] = rand::random();
        let (a, ad, d) = (
            account.to_owned(),
            addresses.to_vec(),
            device_name.to_owned(),
        );
        self.run(move |c| admin::add_device(c, &a, &ad, &d, secret))
    }

    pub fn list_devices(&self, account: &str) -> Result<Vec<DeviceInfo>> {
        let a = account.to_owned();
        self.run(move |c| admin::list_devices(c, &a))
    }

    pub fn revoke_device(&self, account: &str, device: DeviceId) -> Result<bool> {
        let a = account.to_owned();
        self.run(move |c| admin::revoke_device(c, &a, device))
    }

    pub fn addresses(&self, account: &str) -> Result<Vec<String>> {
        let a = account.to_owned();
        self.run(move |c| admin::addresses(c, &a))
    }

    /// Removes objects that no row names and that are older than `min_age` (uploads of a
    /// group whose commit never happened). Returns how many were removed.
    pub fn collect_garbage(&self, min_age: Duration) -> Result<u64> {
        let listed = self.objects.list()?;
        let mut removed = 0;
        for l in listed {
            if l.age_ms < min_age.as_millis() as u64 {
                continue;
            }
            let o = self.objects.clone();
            let (account, hash) = (l.account, l.hash);
            let gone = self.run(move |c| crate::writer::unlink(c, &o, account, &hash))?;
            removed += u64::from(gone);
        }
        Ok(removed)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// This node's id: random, kept in `DATA/node-id` (written durably on first use).
fn node_id(data: &Path) -> Result<i64> {
    let path = data.join("node-id");
    let bad = |why: String| StoreError::Invalid {
        what: "node id",
        why: format!("{}: {why}", path.display()),
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<i64>().map_err(|e| bad(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = (rand::random::<u64>() >> 2) as i64 + 1;
            let tmp = data.join("node-id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| std::fs::File::open(data)?.sync_all())
                .map_err(|e| bad(e.to_string()))?;
            Ok(id)
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// LISTENs for other nodes' commits and publishes their Heads. After a reconnect every
/// known Head is read again, so a notification missed meanwhile costs nothing.
fn listen(url: &str, shared: &Shared) {
    let mut backoff = Duration::from_millis(100);
    while !shared.stop.load(Ordering::Relaxed) {
        let mut c = match crate::pool::connect(url) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "push listener cannot connect; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = c.batch_execute("LISTEN postlog_heads; LISTEN postlog_revoked") {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            std::thread::sleep(backoff);
            continue;
        }
        backoff = Duration::from_millis(100);
        refresh_heads(&mut c, shared);
        load_revoked(&mut c, shared);
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let next = c
                .notifications()
                .timeout_iter(Duration::from_millis(500))
                .next();
            match next {
                Ok(Some(n)) if n.channel() == "postlog_revoked" => {
                    if let (Ok(d), Ok(mut r)) =
                        (n.payload().parse::<DeviceId>(), shared.revoked.lock())
                        && let Some(set) = r.as_mut()
                    {
                        set.insert(d);
                    }
                }
                Ok(Some(n)) => {
                    if let Some((a, h)) = n.payload().split_once(':')
                        && let (Ok(a), Ok(h)) = (a.parse::<AccountId>(), h.parse::<LogOffset>())
                    {
                        shared.publish(a, h);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "push listener lost its connection; reconnecting");
                    forget_revoked(shared);
                    break;
                }
                Ok(None) if c.is_closed() => {
                    forget_revoked(shared);
                    break;
                }
                Ok(None) => {}
            }
        }
    }
}

/// Loads the revoked devices; from then on `postlog_revoked` notifications keep the set
/// current, and [`Backend::revoked_devices`] (the server's sweep, every 2 s) needs no
/// query.
fn load_revoked(c: &mut postgres::Client, shared: &Shared) {
    let loaded: R<std::collections::HashSet<DeviceId>> = c
        .query("SELECT id FROM devices WHERE revoked", &[])
        .map_err(Into::into)
        .and_then(|rows| {
            rows.iter()
                .map(|r| col::<i64>(r, 0).map(|d| d as u64))
                .collect()
        });
    match (loaded, shared.revoked.lock()) {
        (Ok(set), Ok(mut r)) => *r = Some(set),
        (Err(e), _) => tracing::warn!(error = %e, "loading revoked devices failed"),
        _ => {}
    }
}

/// Without the listener the set may miss a revocation: ask the database until it is back.
fn forget_revoked(shared: &Shared) {
    if let Ok(mut r) = shared.revoked.lock() {
        *r = None;
    }
}

fn refresh_heads(c: &mut postgres::Client, shared: &Shared) {
    let known: Vec<AccountId> = match shared.heads.lock() {
        Ok(h) => h.keys().copied().collect(),
        Err(_) => return,
    };
    if known.is_empty() {
        return;
    }
    if let Ok(rows) = c.query(
        "SELECT account_id, head FROM heads WHERE account_id = ANY($1)",
        &[&known],
    ) {
        for r in &rows {
            if let (Ok(a), Ok(h)) = (col::<i64>(r, 0), col::<i64>(r, 1)) {
                shared.publish(a, h as u64);
            }
        }
    }
}

impl Backend for PgStore {
    fn authenticate(
        &self,
        account: &str,
        device: DeviceId,
        secret: &[u8; 32],
    ) -> Result<Option<AccountId>> {
        let (a, s) = (account.to_owned(), *secret);
        self.run(move |c| admin::authenticate(c, &a, device, &s))
    }

    fn head(&self, account: AccountId) -> Result<LogOffset> {
        if let Some(h) = self
            .shared
            .heads
            .lock()
            .ok()
            .and_then(|h| h.get(&account).copied())
        {
            return Ok(h);
        }
        let h = self.run(move |c| {
            c.query_opt("SELECT head FROM heads WHERE account_id = $1", &[&account])?
                .map(|r| col::<i64>(&r, 0).map(|h| h as u64))
                .transpose()
                .map(|h| h.unwrap_or(0))
        })?;
        let mut heads = self
            .shared
            .heads
            .lock()
            .map_err(|_| StoreError::Stopped("heads lock".into()))?;
        let e = heads.entry(account).or_insert(h);
        *e = (*e).max(h);
        Ok(*e)
    }

    fn read_log(&self, account: AccountId, from: LogOffset, max: usize) -> Result<Vec<LogEntry>> {
        let head = self.head(account)?;
        self.run(move |c| {
            let rows = c.query(
                "SELECT log_offset, time_ms, body, checksum FROM log
                 WHERE account_id = $1 AND log_offset >= $2 AND log_offset < $3 AND kind <> $4
                 ORDER BY log_offset LIMIT $5",
                &[
                    &account,
                    &(from.min(i64::MAX as u64) as i64),
                    &(head as i64),
                    &KIND_SCRUBBED,
                    &(max.min(i64::MAX as usize) as i64),
                ],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let offset = col::<i64>(row, 0)? as u64;
                let record: Record = kit::decode_row(account, offset, col(row, 2)?, col(row, 3)?)?;
                out.push(LogEntry {
                    offset,
                    time_ms: col::<i64>(row, 1)? as u64,
                    record,
                });
            }
            Ok(out)
        })
    }

    fn blob_writer(&self, max_size: u64) -> Result<BlobWriter> {
        BlobWriter::create(&self.tmp, max_size)
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
        let h = *hash;
        let held = move |c: &mut postgres::Client| -> R<bool> {
            Ok(c.query_opt(
                "SELECT 1 FROM blobs WHERE account_id = $1 AND hash = $2",
                &[&account, &h.0.as_slice()],
            )?
            .is_some())
        };
        if !self.run(held)? {
            return Ok(None);
        }
        match self.objects.get(account, hash)? {
            Some(bytes) if BlobHash::of(&bytes) == *hash => Ok(Some(bytes)),
            Some(_) => Err(StoreError::CorruptBlob(*hash)),
            // Deleted meanwhile, or missing although a live record names it: damage.
            None if self.run(held)? => Err(StoreError::CorruptBlob(*hash)),
            None => Ok(None),
        }
    }

    fn read_blobs(&self, account: AccountId, hashes: &[BlobHash]) -> Result<Vec<Option<Vec<u8>>>> {
        let wanted: Vec<Vec<u8>> = hashes.iter().map(|h| h.0.to_vec()).collect();
        let held: std::collections::HashSet<BlobHash> = self.run(move |c| {
            c.query(
                "SELECT hash FROM blobs WHERE account_id = $1 AND hash = ANY($2)",
                &[&account, &wanted],
            )?
            .iter()
            .map(|r| crate::hash_col(r, 0))
            .collect()
        })?;
        let fetch: Vec<BlobHash> = hashes
            .iter()
            .filter(|h| held.contains(h))
            .copied()
            .collect();
        let mut got: HashMap<BlobHash, Option<Vec<u8>>> = self
            .objects
            .get_many(account, &fetch)?
            .into_iter()
            .collect();
        hashes
            .iter()
            .map(|h| match got.remove(h) {
                // Named twice in one batch: read again.
                None if held.contains(h) => self.read_blob(account, h),
                None => Ok(None),
                Some(Some(bytes)) if BlobHash::of(&bytes) == *h => Ok(Some(bytes)),
                Some(Some(_)) => Err(StoreError::CorruptBlob(*h)),
                // Missing from the bucket: deleted meanwhile, or damage (the one-message
                // path tells which).
                Some(None) => self.read_blob(account, h),
            })
            .collect()
    }

    fn set_head_watcher(&self, watcher: HeadWatcher) {
        if let Ok(mut w) = self.shared.watcher.lock() {
            *w = Some(watcher);
        }
    }

    fn revoked_devices(&self) -> Result<Vec<DeviceId>> {
        // Kept current by the listener (postlog_revoked); asked for while it reconnects.
        let cached = self
            .shared
            .revoked
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|set| set.iter().copied().collect()));
        match cached {
            Some(ids) => Ok(ids),
            None => self.run(admin::revoked_devices),
        }
    }

    fn resolve_address(&self, address: &str) -> Result<Option<AccountId>> {
        let a = address.to_owned();
        self.run(move |c| admin::resolve_address(c, &a))
    }

    fn account_by_name(&self, name: &str) -> Result<Option<AccountId>> {
        let n = name.to_owned();
        self.run(move |c| admin::account_id(c, &n))
    }

    fn relay_due(&self, now_ms: u64, max: usize) -> Result<Vec<QueuedSend>> {
        let node = self.node;
        self.run(move |c| relay::due(c, node, now_ms, max))
    }

    fn relay_next_due(&self) -> Result<Option<u64>> {
        self.run(relay::next_due)
    }

    fn accounts(&self) -> Result<Vec<(AccountId, String)>> {
        self.run(|c| {
            c.query("SELECT id, name FROM accounts ORDER BY id", &[])?
                .iter()
                .map(|r| Ok((col(r, 0)?, col(r, 1)?)))
                .collect()
        })
    }

    fn summaries(&self, account: AccountId) -> Result<Vec<MessageSummary>> {
        self.run(move |c| scrub::summaries(c, account))
    }
}
