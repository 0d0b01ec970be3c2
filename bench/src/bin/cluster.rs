//! `cluster`: the PostgreSQL + S3 backend with 1, 2 and 3 nodes, side by side with the
//! embedded store in the same run (issue #9).
//!
//! Three measurements:
//!
//! 1. **Store throughput.** One row for the embedded store (one node) and one per node count
//!    on PostgreSQL + S3 (every node in this process, all on one fresh database and bucket
//!    prefix). `--messages` messages of the corpus are stored into one fresh account with
//!    `--concurrency` Store requests in flight, spread round-robin over one client connection
//!    per node. Latency runs from just before a request is sent to its durable ack.
//! 2. **Push latency.** On the same nodes, a fresh account: a watcher holds an open Log
//!    stream (`inline_blobs = false`) on the *last* node; a writer stores `--push` messages
//!    one at a time through node 1. Per message: the time from the Store's ack to the
//!    watcher receiving that record's Entry (negative when the Entry came first). With 2 or
//!    3 nodes that is the cross-node path: COMMIT with NOTIFY on node 1, LISTEN on the last
//!    node, its Log stream reading the record from PostgreSQL.
//! 3. **Idle watching connections.** `postlog serve` as a child process (embedded, then
//!    PostgreSQL + S3), `--idle` client connections spread over `--idle-accounts` accounts,
//!    each its own device, each authenticated with an open Log stream that has reached Live.
//!    The server's VmRSS (`/proc/<pid>/status`) before and after gives bytes per connection;
//!    its CPU time over `--idle-window-s` seconds with every connection idle gives what
//!    idle connections cost (and, on PostgreSQL, the CPU of the node's database backends).
//!    The client connections live in this process, so their memory is not counted.
//!
//! The PostgreSQL rows need the services of `scripts/test-services.sh` (`bench/cluster.sh`
//! starts them): the `POSTLOG_TEST_POSTGRES` superuser connection string (each row gets a new
//! database, dropped at the end unless `--keep-databases`) and `POSTLOG_TEST_S3_*` (each
//! row gets a new key prefix in the bucket; objects are left there).
//!
//! Everything (client, nodes, PostgreSQL, the object store) shares the machine's cores:
//! compare rows of one run, not runs on different machines.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use postlog_bench::LatencySummary;
use postlog_bench::stats::{ms, rank, signed_ms};
use postlog_client::{Connection, Endpoint, LogItem, LogStream, LoginUrl};
use postlog_server::storage::Admin;
use postlog_server::{Server, ServerConfig, StartOptions};
use postlog_store::DeviceCredentials;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

/// Store throughput, push latency and memory per idle connection: embedded store against
/// PostgreSQL + S3 with 1..=N nodes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Messages stored per throughput row (each row into a fresh account).
    #[arg(long, default_value_t = 3000)]
    messages: usize,
    /// Store requests in flight per throughput row, spread round-robin over the nodes.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// PostgreSQL rows for 1, 2, ... up to this many nodes.
    #[arg(long, default_value_t = 3)]
    max_nodes: usize,
    /// Messages stored one at a time per push row (0 skips push).
    #[arg(long, default_value_t = 200)]
    push: usize,
    /// Pause between two push messages, in milliseconds.
    #[arg(long, default_value_t = 10)]
    push_gap_ms: u64,
    /// Idle watching connections per backend (0 skips this part).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Accounts the idle connections are spread over (each connection is its own device).
    #[arg(long, default_value_t = 100)]
    idle_accounts: usize,
    /// Client UDP sockets (endpoints) the idle connections are spread over.
    #[arg(long, default_value_t = 10)]
    idle_endpoints: usize,
    /// Connection attempts (handshake, Auth, Log until Live) in flight while opening them.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds of idleness over which the server's CPU use is measured.
    #[arg(long, default_value_t = 15)]
    idle_window_s: u64,
    /// Backends to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "embedded,postgres"
    )]
    backends: Vec<Kind>,
    /// The `postlog` binary run for the idle part [default: next to this binary].
    #[arg(long)]
    postlog: Option<PathBuf>,
    /// Keep the PostgreSQL databases the run created (they are dropped by default).
    #[arg(long)]
    keep_databases: bool,
    /// Also write the results (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Corpus seed (postlog_bench::corpus).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Embedded,
    Postgres,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Postgres => "postgres",
        }
    }
}

/// Tags every stored message gets, as mail delivered to an inbox would.
const TAGS: [&str; 2] = ["inbox", "unread"];

/// Longest wait for a pushed Entry, or for a node to see another node's Head.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.messages > 0 && args.concurrency > 0,
        "--messages and --concurrency must be at least 1"
    );
    ensure!(
        args.idle_accounts > 0 && args.idle_endpoints > 0 && args.connect_concurrency > 0,
        "--idle-accounts, --idle-endpoints and --connect-concurrency must be at least 1"
    );
    ensure!(!args.backends.is_empty(), "--backends names no backend");
    let services = if args.backends.contains(&Kind::Postgres) {
        Some(Arc::new(Services::from_env()?))
    } else {
        None
    };
    let postlog = match &args.postlog {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("postlog"),
    };
    ensure!(
        args.idle == 0 || postlog.is_file(),
        "{} missing: build it (cargo build --release -p postlog) or pass --postlog",
        postlog.display()
    );
    let base = tempfile::tempdir().context("creating a temporary directory")?;
    let load_before = loadavg();

    let started = Instant::now();
    let corpus: Arc<Vec<Vec<u8>>> =
        Arc::new(postlog_bench::generate(args.seed, args.messages.max(args.push)).collect());
    let bytes: u64 = corpus[..args.messages].iter().map(|m| m.len() as u64).sum();
    eprintln!(
        "corpus: {} messages, {:.1} MB (seed {}), generated in {:.1} s",
        args.messages,
        bytes as f64 / 1e6,
        args.seed,
        started.elapsed().as_secs_f64()
    );

    let mut configs = Vec::new();
    if args.backends.contains(&Kind::Embedded) {
        configs.push((Kind::Embedded, 1));
    }
    if args.backends.contains(&Kind::Postgres) {
        configs.extend((1..=args.max_nodes).map(|n| (Kind::Postgres, n)));
    }

    let mut rows = Vec::new();
    let mut idle = Vec::new();
    // Dropping the measurements (on SIGINT or SIGTERM) kills a `postlog serve` child.
    let failure = tokio::select! {
        f = measure(&args, &configs, services.clone(), &postlog, base.path(), &corpus, bytes, &mut rows, &mut idle) => f,
        s = interrupted() => Some(anyhow!("interrupted by {s}")),
    };

    if let Some(s) = &services
        && !args.keep_databases
    {
        let created = std::mem::take(&mut *lock(&DATABASES));
        for db in &created {
            if let Err(e) = s.drop_database(db).await {
                eprintln!("warning: could not drop database {db}: {e:#}");
            }
        }
    }

    let report = report(&args, bytes, &rows, &idle, &load_before, &loadavg());
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs every row, filling `rows` and `idle`; returns the first failure.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &Args,
    configs: &[(Kind, usize)],
    services: Option<Arc<Services>>,
    postlog: &Path,
    base: &Path,
    corpus: &Arc<Vec<Vec<u8>>>,
    bytes: u64,
    rows: &mut Vec<Row>,
    idle: &mut Vec<IdleRow>,
) -> Option<anyhow::Error> {
    for (i, &(kind, nodes)) in configs.iter().enumerate() {
        eprintln!("== {} with {nodes} node(s)", kind.name());
        let dir = base.join(format!("row{i}"));
        match cluster_row(args, kind, nodes, services.clone(), &dir, corpus, bytes).await {
            Ok(row) => {
                eprintln!("   {}", row.line());
                rows.push(row);
            }
            Err(e) => return Some(e.context(format!("{} with {nodes} node(s)", kind.name()))),
        }
    }
    if args.idle == 0 {
        return None;
    }
    for &kind in &args.backends {
        eprintln!(
            "== {} idle connections on `postlog serve` ({})",
            args.idle,
            kind.name()
        );
        let dir = base.join(format!("idle-{}", kind.name()));
        match idle_row(args, kind, services.clone(), postlog, &dir).await {
            Ok(row) => idle.push(row),
            Err(e) => return Some(e.context(format!("idle connections, {}", kind.name()))),
        }
    }
    None
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => tokio::select! {
            _ = i.recv() => "SIGINT",
            _ = t.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// Databases this run created (dropped at the end unless --keep-databases).
static DATABASES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ------------------------------------------------------------------------ services

/// The PostgreSQL server and bucket of `scripts/test-services.sh`.
struct Services {
    /// Superuser connection string (without dbname, or with one that `dbname=` overrides).
    admin: String,
    endpoint: String,
    bucket: String,
    region: String,
    access_key: String,
    secret_key: String,
}

impl Services {
    fn from_env() -> anyhow::Result<Services> {
        let var = |name: &str| {
            std::env::var(name).with_context(|| {
                format!(
                    "{name} is not set: the postgres rows need the test services \
                     (bench/cluster.sh starts them; or scripts/test-services.sh start and \
                     source /tmp/postlog-services/env), or pass --backends embedded"
                )
            })
        };
        Ok(Services {
            admin: var("POSTLOG_TEST_POSTGRES")?,
            endpoint: var("POSTLOG_TEST_S3_ENDPOINT")?,
            bucket: var("POSTLOG_TEST_S3_BUCKET")?,
            region: var("POSTLOG_TEST_S3_REGION")?,
            access_key: var("POSTLOG_TEST_S3_ACCESS_KEY")?,
            secret_key: var("POSTLOG_TEST_S3_SECRET_KEY")?,
        })
    }

    /// Creates a new, empty database; returns its name.
    async fn create_database(&self) -> anyhow::Result<String> {
        let db = format!("postlog_bench_{:016x}", rand::random::<u64>());
        let (admin, sql) = (self.admin.clone(), format!("CREATE DATABASE {db}"));
        on_thread(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                .context("connecting to the test PostgreSQL")?;
            c.batch_execute(&sql).context("CREATE DATABASE")?;
            Ok(())
        })
        .await?;
        lock(&DATABASES).push(db.clone());
        Ok(db)
    }

    async fn drop_database(&self, db: &str) -> anyhow::Result<()> {
        let (admin, sql) = (
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        );
        on_thread(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)?;
            c.batch_execute(&sql)?;
            Ok(())
        })
        .await
    }

    /// The process ids of the database's server backends (one per client connection).
    async fn backend_pids(&self, db: &str) -> anyhow::Result<Vec<u32>> {
        let (admin, db) = (self.admin.clone(), db.to_owned());
        on_thread(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)?;
            let rows = c.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )?;
            Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
        })
        .await
    }

    /// Transactions committed in database `db` so far (`pg_stat_database.xact_commit`; the
    /// statistics lag the backends by about a second).
    async fn commits(&self, db: &str) -> anyhow::Result<i64> {
        let (admin, db) = (self.admin.clone(), db.to_owned());
        on_thread(move || {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)?;
            let row = c.query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&db],
            )?;
            Ok(row.get::<_, i64>(0))
        })
        .await
    }

    /// A `[storage]` section on database `db` and the key prefix `<db>/`, as
    /// crates/postlog/tests/common/mod.rs writes it (with the default pool size).
    fn storage_toml(&self, db: &str) -> String {
        format!(
            "[storage]\nbackend = \"postgres\"\npostgres = \"{} dbname={db}\"\n\
             [storage.s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\n\
             access_key = \"{}\"\nsecret_key = \"{}\"\nprefix = \"{db}/\"\nallow_http = true\n",
            self.admin, self.endpoint, self.bucket, self.region, self.access_key, self.secret_key,
        )
    }
}

/// Runs `f` on a new OS thread: the synchronous `postgres` client (and PgStore::open, which
/// Admin::open does) must not run on a thread of this process's tokio runtime.
async fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.map_err(|_| anyhow!("a helper thread panicked"))?
}

/// Adds `(account, device name)` devices through the data directory's configured backend.
async fn add_devices(
    data: &Path,
    wanted: Vec<(String, String)>,
) -> anyhow::Result<Vec<DeviceCredentials>> {
    let data = data.to_owned();
    on_thread(move || {
        let mut admin = Admin::open(&data)?;
        wanted
            .iter()
            .map(|(account, device)| {
                admin
                    .add_device(account, &[], device)
                    .with_context(|| format!("adding device {device} to {account}"))
            })
            .collect()
    })
    .await
}

fn login(c: &DeviceCredentials, addr: SocketAddr, fingerprint: &str) -> LoginUrl {
    LoginUrl {
        account: c.account.clone(),
        server: addr.to_string(),
        device: c.device,
        secret: c.secret,
        fingerprint: fingerprint.to_owned(),
    }
}

/// Writes `DATA/postlog.toml`: `top` (top-level keys and `[limits]`) and, on PostgreSQL, a
/// `[storage]` section on a new database. Returns the database's name.
async fn prepare_data(
    data: &Path,
    kind: Kind,
    services: Option<&Services>,
    top: &str,
) -> anyhow::Result<Option<String>> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let (storage, db) = match kind {
        Kind::Embedded => (String::new(), None),
        Kind::Postgres => {
            let s = services.context("no PostgreSQL services")?;
            let db = s.create_database().await?;
            (s.storage_toml(&db), Some(db))
        }
    };
    std::fs::write(data.join("postlog.toml"), format!("{top}\n{storage}"))?;
    Ok(db)
}

// ------------------------------------------------------------------------ in-process nodes

/// A server node running in this process.
struct Node {
    addr: SocketAddr,
    fingerprint: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(data: &Path) -> anyhow::Result<Node> {
        let d = data.to_owned();
        // Opening PostgreSQL + S3 blocks; quinn needs the runtime's context (which a
        // blocking-pool thread has).
        let server = tokio::task::spawn_blocking(move || {
            Server::start_with(
                &d,
                StartOptions {
                    listen: Some(([127, 0, 0, 1], 0).into()),
                    ..StartOptions::default()
                },
            )
        })
        .await?
        .with_context(|| format!("starting a node in {}", data.display()))?;
        let addr = server.local_addr()?;
        let fingerprint = server.fingerprint().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(Node {
            addr,
            fingerprint,
            stop: Some(stop),
            task,
        })
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

/// Starts `n` nodes on one storage: the first creates the certificate, key and reset key,
/// which the others get copied (docs/DEPLOYMENT.md §3).
async fn start_nodes(
    dir: &Path,
    kind: Kind,
    n: usize,
    services: Option<&Services>,
) -> anyhow::Result<Vec<Node>> {
    let first = dir.join("node1");
    prepare_data(&first, kind, services, "").await?;
    let mut nodes = vec![Node::start(&first).await?];
    for i in 2..=n {
        let d = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&d)?;
        for f in ["postlog.toml", "cert.pem", "key.pem", "reset.key"] {
            std::fs::copy(first.join(f), d.join(f))
                .with_context(|| format!("copying {f} to node {i}"))?;
        }
        nodes.push(Node::start(&d).await?);
    }
    ensure!(
        nodes.iter().all(|n| n.fingerprint == nodes[0].fingerprint),
        "the nodes present different certificates"
    );
    Ok(nodes)
}

// ------------------------------------------------------------------------ throughput + push

/// One node count's results.
struct Row {
    kind: Kind,
    nodes: usize,
    elapsed: Duration,
    ack: LatencySummary,
    /// Push: Store sent -> ack (ms), ack -> Entry on the watcher (ms, signed).
    push_ack: Vec<f64>,
    push: Vec<f64>,
}

impl Row {
    fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let mut s = format!(
            "store: {} msgs in {secs:.2} s, {:.0} msg/s, ack p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.ack.count,
            self.ack.count as f64 / secs,
            ms(self.ack.p50),
            ms(self.ack.p99),
            ms(self.ack.max)
        );
        if !self.push.is_empty() {
            let _ = write!(
                s,
                "; push ack -> Entry p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                pct(&self.push, 50),
                pct(&self.push, 99),
                pct(&self.push, 100)
            );
        }
        s
    }
}

async fn cluster_row(
    args: &Args,
    kind: Kind,
    n: usize,
    services: Option<Arc<Services>>,
    dir: &Path,
    corpus: &Arc<Vec<Vec<u8>>>,
    bytes: u64,
) -> anyhow::Result<Row> {
    let nodes = start_nodes(dir, kind, n, services.as_deref()).await?;
    let r = measure_row(args, kind, &nodes, dir, corpus, bytes).await;
    for node in nodes {
        node.stop().await;
    }
    r
}

async fn measure_row(
    args: &Args,
    kind: Kind,
    nodes: &[Node],
    dir: &Path,
    corpus: &Arc<Vec<Vec<u8>>>,
    bytes: u64,
) -> anyhow::Result<Row> {
    let fp = nodes[0].fingerprint.clone();
    let creds = add_devices(
        &dir.join("node1"),
        vec![
            ("store".into(), "bench".into()),
            ("push".into(), "writer".into()),
            ("push".into(), "watcher".into()),
        ],
    )
    .await?;
    let endpoint = Endpoint::new(&fp)?;

    // Throughput: one connection per node, requests round-robin over them.
    let mut conns = Vec::new();
    for node in nodes {
        conns.push(endpoint.connect(&login(&creds[0], node.addr, &fp)).await?);
    }
    let messages = &corpus[..args.messages];
    let (elapsed, mut latencies) =
        store_all(&conns, corpus, args.messages, args.concurrency).await?;
    for (i, c) in conns.iter().enumerate() {
        wait_for_head(c, messages.len() as u64)
            .await
            .with_context(|| format!("Head on node {}", i + 1))?;
        c.close();
    }
    let ack = LatencySummary::of(&mut latencies).context("no message was stored")?;
    eprintln!(
        "   stored {} msgs ({:.1} MB) in {:.2} s",
        ack.count,
        bytes as f64 / 1e6,
        elapsed.as_secs_f64()
    );

    // Push: writer on node 1, watcher on the last node.
    let (mut push_ack, mut push) = (Vec::new(), Vec::new());
    if args.push > 0 {
        let last = nodes.last().context("no node")?;
        let writer = endpoint
            .connect(&login(&creds[1], nodes[0].addr, &fp))
            .await?;
        let watcher = endpoint.connect(&login(&creds[2], last.addr, &fp)).await?;
        (push_ack, push) = push_all(
            &writer,
            &watcher,
            &corpus[..args.push],
            Duration::from_millis(args.push_gap_ms),
        )
        .await?;
        writer.close();
        watcher.close();
    }
    Ok(Row {
        kind,
        nodes: nodes.len(),
        elapsed,
        ack,
        push_ack,
        push,
    })
}

/// Stores `corpus[..count]` with `in_flight` requests outstanding, worker `w` on
/// `conns[w % conns.len()]`; returns the wall time and each request's time to its ack.
async fn store_all(
    conns: &[Connection],
    corpus: &Arc<Vec<Vec<u8>>>,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let tags: Arc<Vec<String>> = Arc::new(TAGS.iter().map(|t| t.to_string()).collect());
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for w in 0..in_flight {
        let conn = conns[w % conns.len()].clone();
        let (corpus, next, tags) = (corpus.clone(), next.clone(), tags.clone());
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(count / in_flight + 1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let sent = Instant::now();
                let (hash, _offset, new) = conn.store(&corpus[i], &tags).await?;
                latencies.push(sent.elapsed());
                if !new {
                    bail!("message {hash} was already stored: the account was not fresh");
                }
            }
        });
    }
    let mut latencies = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    Ok((started.elapsed(), latencies))
}

/// Waits until the node behind `conn` reports Head `want` (another node learns Heads through
/// NOTIFY, a moment after the commit).
async fn wait_for_head(conn: &Connection, want: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + PUSH_TIMEOUT;
    loop {
        let head = conn.head().await?;
        if head == want {
            return Ok(());
        }
        ensure!(
            head < want && Instant::now() < deadline,
            "Head {head}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stores `msgs` one at a time through `writer` while `watcher` (same account, fresh) has a
/// Log stream open; returns (Store sent -> ack, ack -> Entry received) per message, in ms.
async fn push_all(
    writer: &Connection,
    watcher: &Connection,
    msgs: &[Vec<u8>],
    gap: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut log = watcher.log(0, false).await?;
    match log.next().await? {
        LogItem::Live(0) => {}
        other => bail!("the push account is not fresh: {other:?}"),
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watching = tokio::spawn(async move {
        loop {
            match log.next().await {
                Ok(LogItem::Entry(e, _)) => {
                    if tx.send((e.offset, Instant::now())).is_err() {
                        return Ok(());
                    }
                }
                Ok(LogItem::Live(_)) => {}
                Err(e) => return Err(e),
            }
        }
    });
    let tags: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    let (mut acks, mut pushes) = (Vec::new(), Vec::new());
    for msg in msgs {
        let sent = Instant::now();
        let (_, offset, new) = writer.store(msg, &tags).await?;
        let acked = Instant::now();
        ensure!(new, "a push message was already stored");
        let arrived = loop {
            match tokio::time::timeout(PUSH_TIMEOUT, rx.recv()).await {
                Ok(Some((o, at))) if o == offset => break at,
                Ok(Some((o, _))) if o < offset => continue,
                Ok(Some((o, _))) => bail!("the watcher got offset {o} before {offset}"),
                Ok(None) => bail!(
                    "the watcher's Log stream ended: {:?}",
                    (&mut watching).await
                ),
                Err(_) => bail!(
                    "offset {offset} did not reach the watcher within {} s",
                    PUSH_TIMEOUT.as_secs()
                ),
            }
        };
        acks.push(ms(acked - sent));
        pushes.push(signed_ms(acked, arrived));
        tokio::time::sleep(gap).await;
    }
    watching.abort();
    Ok((acks, pushes))
}

// ------------------------------------------------------------------------ idle connections

struct IdleRow {
    kind: Kind,
    connections: usize,
    accounts: usize,
    rss_before: u64,
    /// VmRSS after each quarter of the connections was open.
    rss_steps: Vec<(usize, u64)>,
    open_time: Duration,
    /// Server CPU seconds per second while everything was idle.
    cpu: f64,
    /// The same for the database backends of the node (PostgreSQL only).
    db_cpu: Option<f64>,
    /// Transactions per second the node's database committed meanwhile.
    db_tps: Option<f64>,
}

impl IdleRow {
    fn rss_after(&self) -> u64 {
        self.rss_steps.last().map_or(self.rss_before, |s| s.1)
    }

    fn per_connection(&self) -> f64 {
        self.rss_after().saturating_sub(self.rss_before) as f64 / self.connections.max(1) as f64
    }

    /// Bytes per connection between the half-way step and the end (the marginal cost).
    fn marginal(&self) -> Option<f64> {
        let half = self.rss_steps.get(self.rss_steps.len().checked_sub(3)?)?;
        let last = self.rss_steps.last()?;
        let n = last.0.checked_sub(half.0).filter(|&n| n > 0)?;
        Some(last.1.saturating_sub(half.1) as f64 / n as f64)
    }
}

/// The `postlog serve` child; killed (and reaped) on drop.
struct ServerChild(Child);

impl ServerChild {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

async fn idle_row(
    args: &Args,
    kind: Kind,
    services: Option<Arc<Services>>,
    postlog: &Path,
    dir: &Path,
) -> anyhow::Result<IdleRow> {
    let k = args.idle;
    let accounts = args.idle_accounts.min(k);
    let per_account = k.div_ceil(accounts);
    let data = dir.join("data");
    let top = format!(
        "max_connections = {}\n[limits]\nmax_log_streams_per_account = {}\n",
        k + 64,
        per_account + 8
    );
    let db = prepare_data(&data, kind, services.as_deref(), &top).await?;
    idle_measure(
        args,
        kind,
        services.as_deref(),
        db.as_deref(),
        postlog,
        dir,
        &data,
    )
    .await
}

async fn idle_measure(
    args: &Args,
    kind: Kind,
    services: Option<&Services>,
    db: Option<&str>,
    postlog: &Path,
    dir: &Path,
    data: &Path,
) -> anyhow::Result<IdleRow> {
    let k = args.idle;
    let accounts = args.idle_accounts.min(k);

    // Accounts, devices and the certificate, before the server starts (not measured).
    let t = Instant::now();
    let wanted = (0..k)
        .map(|i| (format!("idle{}", i % accounts), format!("d{i}")))
        .collect();
    let creds = add_devices(data, wanted).await?;
    let d = data.to_owned();
    let fp = on_thread(move || {
        let cfg = ServerConfig::load_or_init(&d)?;
        Ok(postlog_server::tls::load_or_generate(&d, &cfg)?.fingerprint())
    })
    .await?;
    eprintln!(
        "   {k} devices in {accounts} accounts created in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
    let log_path = dir.join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = ServerChild(
        Command::new(postlog)
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", postlog.display()))?,
    );
    let pid = child.pid();
    let logins: Vec<LoginUrl> = creds.iter().map(|c| login(c, addr, &fp)).collect();

    let result = async {
        // The first connection waits for the server to answer; it is closed again, so the
        // baseline includes what any first connection sets up.
        let probe = Endpoint::new(&fp)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match probe.connect(&logins[0]).await {
                Ok(c) => {
                    c.close();
                    break;
                }
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow!(e).context("the server does not answer")),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_before = vm_rss(pid)?;
        let client_before = vm_rss(std::process::id())?;

        let endpoints: Vec<Endpoint> = (0..args.idle_endpoints)
            .map(|_| Endpoint::new(&fp))
            .collect::<Result<_, _>>()?;
        let logins = Arc::new(logins);
        let gate = Arc::new(Semaphore::new(args.connect_concurrency));
        let mut open: Vec<(Connection, LogStream)> = Vec::with_capacity(k);
        let mut rss_steps = Vec::new();
        // Time spent opening (the pauses before each RSS reading excluded).
        let mut open_time = Duration::ZERO;
        for quarter in 1..=4 {
            let started = Instant::now();
            let range = (k * (quarter - 1) / 4)..(k * quarter / 4);
            let mut tasks = JoinSet::new();
            for i in range {
                let (ep, logins, gate) = (
                    endpoints[i % endpoints.len()].clone(),
                    logins.clone(),
                    gate.clone(),
                );
                tasks.spawn(async move {
                    let _permit = gate.acquire_owned().await?;
                    open_watching(&ep, &logins[i]).await
                });
            }
            while let Some(r) = tasks.join_next().await {
                open.push(r??);
            }
            open_time += started.elapsed();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = vm_rss(pid)?;
            eprintln!(
                "   {} connections live after {:.1} s: server VmRSS {:.1} MiB",
                open.len(),
                open_time.as_secs_f64(),
                rss as f64 / MIB
            );
            rss_steps.push((open.len(), rss));
        }
        let client_after = vm_rss(std::process::id())?;
        eprintln!(
            "   client side (this process, not counted): VmRSS {:.0} -> {:.0} MiB",
            client_before as f64 / MIB,
            client_after as f64 / MIB
        );

        // Idle: nobody sends anything (but QUIC keep-alives and the server's own timers).
        let (pids, commits0) = match (services, db) {
            (Some(s), Some(db)) => (s.backend_pids(db).await?, Some(s.commits(db).await?)),
            _ => (Vec::new(), None),
        };
        let (cpu0, db0) = (
            cpu_seconds(pid)?,
            pids.iter()
                .filter_map(|&p| cpu_seconds(p).ok())
                .sum::<f64>(),
        );
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.idle_window_s)).await;
        let window = t0.elapsed().as_secs_f64();
        let (cpu1, db1) = (
            cpu_seconds(pid)?,
            pids.iter()
                .filter_map(|&p| cpu_seconds(p).ok())
                .sum::<f64>(),
        );
        let cpu = (cpu1 - cpu0) / window;
        let db_cpu = (!pids.is_empty()).then(|| (db1 - db0) / window);
        let db_tps = match (services, db, commits0) {
            (Some(s), Some(db), Some(c0)) => Some((s.commits(db).await? - c0) as f64 / window),
            _ => None,
        };
        eprintln!(
            "   idle {window:.0} s: server CPU {:.0}%{}",
            cpu * 100.0,
            db_cpu.map_or(String::new(), |d| format!(
                ", its {} PostgreSQL backends {:.0}% ({:.0} transactions/s)",
                pids.len(),
                d * 100.0,
                db_tps.unwrap_or(f64::NAN)
            ))
        );

        // Every connection still answers.
        let gate = Arc::new(Semaphore::new(256));
        let mut checks = JoinSet::new();
        for (conn, _) in &open {
            let (conn, gate) = (conn.clone(), gate.clone());
            checks.spawn(async move {
                let _permit = gate.acquire_owned().await?;
                conn.head().await?;
                Ok::<_, anyhow::Error>(())
            });
        }
        let mut dead = 0;
        while let Some(r) = checks.join_next().await {
            if !matches!(r, Ok(Ok(()))) {
                dead += 1;
            }
        }
        ensure!(
            dead == 0,
            "{dead} of {k} connections no longer answer after the idle window"
        );
        for (conn, _) in &open {
            conn.close();
        }
        drop(open);
        Ok(IdleRow {
            kind,
            connections: k,
            accounts,
            rss_before,
            rss_steps,
            open_time,
            cpu,
            db_cpu,
            db_tps,
        })
    }
    .await;
    child.terminate();
    if result.is_err() {
        eprintln!("   server log: {}", log_path.display());
        if let Ok(s) = std::fs::read_to_string(&log_path) {
            for line in s
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("   | {line}");
            }
        }
    }
    result
}

/// Connects, authenticates and opens a Log stream from the current Head, then waits for Live.
async fn open_watching(ep: &Endpoint, login: &LoginUrl) -> anyhow::Result<(Connection, LogStream)> {
    let mut attempt = 0;
    let conn = loop {
        attempt += 1;
        match ep.connect(login).await {
            Ok(c) => break c,
            Err(e) if e.is_retryable() && attempt < 3 => {
                eprintln!("   retrying a connection: {e}");
            }
            Err(e) => return Err(anyhow!(e).context(format!("connecting device {}", login.device))),
        }
    };
    let mut log = conn.log(conn.head_at_auth, false).await?;
    match log.next().await? {
        LogItem::Live(_) => Ok((conn, log)),
        other => bail!("expected Live on an idle account, got {other:?}"),
    }
}

/// A UDP port for a server process, below the ephemeral range so that no socket bound to
/// port 0 takes it first (`postlog_net::port_below_ephemeral`).
fn free_udp_port() -> anyhow::Result<u16> {
    postlog_net::port_below_ephemeral(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok())
        .context("no free UDP port below the ephemeral range")
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// A process's resident set size in bytes (VmRSS in /proc/<pid>/status).
fn vm_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// A process's user + system CPU time in seconds (all threads), from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i).context("short /proc stat")?.parse::<u64>()? as f64)
    };
    // utime and stime are fields 14 and 15 (indexes 11 and 12 here), in USER_HZ, which
    // Linux fixes at 100 for everything it reports to user space.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

// ------------------------------------------------------------------------ report

/// Nearest-rank percentile of unsorted samples (100: the maximum).
fn pct(v: &[f64], p: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { f64::NAN } else { rank(&s, p) }
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(
    args: &Args,
    bytes: u64,
    rows: &[Row],
    idle: &[IdleRow],
    load_before: &str,
    load_after: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Store: {} messages ({:.0} MB, seed {}) into one fresh account per row, {} requests in \
         flight round-robin over one connection per node. Push: {} messages one at a time \
         through node 1, watcher on the last node. Load average before {load_before}, \
         after {load_after}.\n",
        args.messages,
        bytes as f64 / 1e6,
        args.seed,
        args.concurrency,
        args.push
    );
    if !rows.is_empty() {
        let _ = writeln!(
            s,
            "| Backend | Nodes | Store msg/s | MB/s | Ack p50 | Ack p99 | Push: ack → Entry on last node, p50 | p99 | Push Store ack p50 |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for r in rows {
            let secs = r.elapsed.as_secs_f64();
            let (p50, p99, ack50) = if r.push.is_empty() {
                ("—".into(), "—".into(), "—".into())
            } else {
                (
                    format!("{:.2} ms", pct(&r.push, 50)),
                    format!("{:.2} ms", pct(&r.push, 99)),
                    format!("{:.1} ms", pct(&r.push_ack, 50)),
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} ms | {:.1} ms | {p50} | {p99} | {ack50} |",
                r.kind.name(),
                r.nodes,
                thousands(r.ack.count as f64 / secs),
                bytes as f64 / 1e6 / secs,
                ms(r.ack.p50),
                ms(r.ack.p99),
            );
        }
        s.push('\n');
    }
    if !idle.is_empty() {
        let _ = writeln!(
            s,
            "Idle watching connections on one `postlog serve` (each authenticated, one Log stream \
             open and Live, {} accounts, one device per connection); server VmRSS.\n",
            idle[0].accounts
        );
        let _ = writeln!(
            s,
            "| Backend | Connections | RSS before | RSS after | Per connection (marginal) | Connections per GiB | Opened in | Idle CPU: server | PostgreSQL (transactions/s) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for r in idle {
            let per = r.per_connection();
            let marginal = r
                .marginal()
                .map_or(String::new(), |m| format!(" ({:.1} KiB)", m / 1024.0));
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} MiB | {:.0} MiB | {:.1} KiB{marginal} | {} | {:.1} s | {:.0}% | {} |",
                r.kind.name(),
                thousands(r.connections as f64),
                r.rss_before as f64 / MIB,
                r.rss_after() as f64 / MIB,
                per / 1024.0,
                if per > 0.0 {
                    thousands(GIB / per)
                } else {
                    "—".into()
                },
                r.open_time.as_secs_f64(),
                r.cpu * 100.0,
                r.db_cpu.map_or("—".into(), |d| format!(
                    "{:.0}% ({})",
                    d * 100.0,
                    r.db_tps.map_or("?".into(), thousands)
                )),
            );
        }
    }
    s
}
