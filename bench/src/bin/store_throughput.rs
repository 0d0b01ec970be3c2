//! `store-throughput`: how fast the server takes mail in through Store.
//!
//! Starts a server in this process on loopback, generates the corpus in memory (not timed),
//! then for each concurrency level stores every message into a fresh account over one QUIC
//! connection, with that many Store requests (streams) in flight at once. Prints one line
//! per level: throughput and the latency from sending a request to its durable ack.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use postlog_bench::LatencySummary;
use postlog_client::{Connection, Endpoint, LoginUrl};
use postlog_server::Server;
use postlog_store::Accounts;
use tokio::task::JoinSet;

/// Measure Store throughput and acknowledgement latency over loopback QUIC.
///
/// Client and server share this process (and the machine's cores). Every message is new to
/// its account, so each Store writes, fsyncs and commits a blob: the numbers include the
/// full durable write path.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Messages stored at each concurrency level.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Store requests in flight at once, one run per value (comma-separated). The server
    /// allows 256 concurrent streams per connection; more wait for a free one.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Server data directory [default: a fresh temporary directory, removed afterwards].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Corpus seed (postlog_bench::corpus).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// One concurrency level's results.
struct Run {
    elapsed: Duration,
    latency: LatencySummary,
}

/// Tags every stored message gets, as mail delivered to an inbox would.
const TAGS: [&str; 2] = ["inbox", "unread"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.messages > 0, "--messages must be at least 1");
    ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|&c| c > 0),
        "--concurrency takes positive numbers, e.g. 1,16"
    );

    let tmp;
    let data = match &args.data {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary data directory")?;
            tmp.path().to_owned()
        }
    };

    let started = Instant::now();
    let corpus: Arc<Vec<Vec<u8>>> =
        Arc::new(postlog_bench::generate(args.seed, args.messages).collect());
    let bytes: u64 = corpus.iter().map(|m| m.len() as u64).sum();
    println!(
        "corpus: {} messages, {:.1} MB (seed {}), generated in {:.1} s; data in {}",
        corpus.len(),
        bytes as f64 / 1e6,
        args.seed,
        started.elapsed().as_secs_f64(),
        data.display()
    );

    let server =
        Server::start(&data, Some(([127, 0, 0, 1], 0).into())).context("starting the server")?;
    let addr = server.local_addr()?;
    let fingerprint = server.fingerprint().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let endpoint = Endpoint::new(&fingerprint)?;
    let mut accounts = Accounts::open(&data)?;
    // Account names unique across runs, so a reused --data directory still gets new mail.
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();

    println!(
        "{:>11} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8}",
        "concurrency", "messages", "seconds", "msg/s", "MB/s", "p50 ms", "p99 ms", "max ms"
    );
    for (i, &in_flight) in args.concurrency.iter().enumerate() {
        let account = format!("bench-{run_id}-{i}-c{in_flight}");
        let creds = accounts.add_device(&account, &[], "bench")?;
        let login = LoginUrl {
            account: creds.account,
            server: addr.to_string(),
            device: creds.device,
            secret: creds.secret,
            fingerprint: fingerprint.clone(),
        };
        let conn = endpoint
            .connect(&login)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let run = store_all(&conn, &corpus, in_flight).await?;
        let head = conn.head().await?;
        conn.close();
        ensure!(
            head == corpus.len() as u64,
            "account {account} has Head {head} after storing {} messages",
            corpus.len()
        );
        let secs = run.elapsed.as_secs_f64();
        println!(
            "{:>11} {:>9} {:>8.2} {:>9.0} {:>8.1} {:>8.2} {:>8.2} {:>8.2}",
            in_flight,
            run.latency.count,
            secs,
            run.latency.count as f64 / secs,
            bytes as f64 / 1e6 / secs,
            ms(run.latency.p50),
            ms(run.latency.p99),
            ms(run.latency.max),
        );
    }

    let _ = stop.send(());
    serving.await?;
    Ok(())
}

/// Stores every message of `corpus` with `in_flight` requests outstanding at any time,
/// each on its own stream, and records each request's time to its ack.
async fn store_all(
    conn: &Connection,
    corpus: &Arc<Vec<Vec<u8>>>,
    in_flight: usize,
) -> anyhow::Result<Run> {
    let next = Arc::new(AtomicUsize::new(0));
    let tags: Arc<Vec<String>> = Arc::new(TAGS.iter().map(|t| t.to_string()).collect());
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..in_flight {
        let (conn, corpus, next, tags) = (conn.clone(), corpus.clone(), next.clone(), tags.clone());
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(corpus.len() / in_flight + 1);
            while let Some(msg) = corpus.get(next.fetch_add(1, Ordering::Relaxed)) {
                let sent = Instant::now();
                let (hash, _offset, new) = conn.store(msg, &tags).await?;
                latencies.push(sent.elapsed());
                if !new {
                    bail!("message {hash} was already stored: the account was not fresh");
                }
            }
            Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(corpus.len());
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed();
    let latency = LatencySummary::of(&mut latencies).context("no message was stored")?;
    Ok(Run { elapsed, latency })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
