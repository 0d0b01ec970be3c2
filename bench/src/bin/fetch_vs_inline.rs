//! `fetch-vs-inline`: the two ways a full sync can get every message without a round trip
//! per message, measured side by side (issue #3's "measure both and choose").
//!
//! Starts a server in this process on loopback and stores the corpus into a fresh account
//! (not timed). Then, alternating, `--reps` times each:
//! - inline: one `Log{from: 0, inline_blobs: true}` stream, read up to `Live`; every
//!   Store record is followed by its bytes on the same stream;
//! - fetch K: `Log{from: 0, inline_blobs: false}` up to `Live` (records only), then one
//!   `Fetch` stream per message, K in flight at once, for each K in `--fetch-concurrency`.
//!
//! Both receive and BLAKE3-verify every message in memory; nothing is written to disk, so
//! the numbers compare the protocol paths alone (server reads and hashes, QUIC, client
//! hashing). Client and server share this process and the machine's cores.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use postlog_client::{Connection, Endpoint, LogItem, LoginUrl};
use postlog_proto::{BlobHash, Record};
use postlog_server::Server;
use postlog_store::Accounts;
use tokio::task::JoinSet;

/// Compare inline-blob Log streams with pipelined Fetch requests for a full download.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Messages in the account.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Repetitions of each method (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Fetch requests in flight, one method per value (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,64,200")]
    fetch_concurrency: Vec<usize>,
    /// Server data directory [default: a fresh temporary directory, removed afterwards].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Corpus seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.messages > 0 && args.reps > 0,
        "--messages and --reps must be at least 1"
    );
    let tmp;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a temporary data directory")?;
            tmp.path().to_owned()
        }
    };
    let corpus: Vec<Vec<u8>> = postlog_bench::generate(args.seed, args.messages).collect();
    let bytes: u64 = corpus.iter().map(|m| m.len() as u64).sum();
    let server =
        Server::start(&data, Some(([127, 0, 0, 1], 0).into())).context("starting the server")?;
    let addr = server.local_addr()?;
    let fingerprint = server.fingerprint().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let creds = Accounts::open(&data)?.add_device("fetch-vs-inline", &[], "bench")?;
    let login = LoginUrl {
        account: creds.account,
        server: addr.to_string(),
        device: creds.device,
        secret: creds.secret,
        fingerprint: fingerprint.clone(),
    };
    let endpoint = Endpoint::new(&fingerprint)?;
    let conn = endpoint.connect(&login).await?;
    let mut tasks = JoinSet::new();
    let corpus = Arc::new(corpus);
    for w in 0..64 {
        let (conn, corpus) = (conn.clone(), corpus.clone());
        tasks.spawn(async move {
            for m in corpus.iter().skip(w).step_by(64) {
                conn.store(m, &[]).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    conn.close();
    println!(
        "{} messages, {:.1} MB stored; {} repetitions each, median reported",
        args.messages,
        bytes as f64 / 1e6,
        args.reps
    );

    let mut methods: Vec<(String, Option<usize>)> = vec![("inline Log".into(), None)];
    for k in &args.fetch_concurrency {
        methods.push((format!("Log + Fetch x{k}"), Some(*k)));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); methods.len()];
    for _ in 0..args.reps {
        for (i, (_, k)) in methods.iter().enumerate() {
            // A fresh connection per run, as a fresh `postlog sync` would have.
            let conn = endpoint.connect(&login).await?;
            let started = Instant::now();
            let got = match k {
                None => inline(&conn).await?,
                Some(k) => fetch(&conn, *k).await?,
            };
            times[i].push(started.elapsed());
            conn.close();
            ensure!(got == bytes, "received {got} bytes, expected {bytes}");
        }
    }
    println!("{:<20} {:>9} {:>9}", "method", "seconds", "MB/s");
    for ((name, _), t) in methods.iter().zip(&mut times) {
        t.sort();
        let median = t[t.len() / 2].as_secs_f64();
        println!(
            "{name:<20} {median:>9.3} {:>9.1}",
            bytes as f64 / 1e6 / median
        );
    }
    let _ = stop.send(());
    serving.await?;
    Ok(())
}

/// Reads one inline Log stream to `Live`; returns the message bytes received (each verified
/// against its hash by the client library).
async fn inline(conn: &Connection) -> anyhow::Result<u64> {
    let mut log = conn.log(0, true).await?;
    let mut got = 0;
    loop {
        match log.next().await? {
            LogItem::Entry(_, Some(b)) => got += b.len() as u64,
            LogItem::Entry(_, None) => {}
            LogItem::Live(_) => return Ok(got),
        }
    }
}

/// Reads the records to `Live`, then fetches every message with `k` requests in flight.
async fn fetch(conn: &Connection, k: usize) -> anyhow::Result<u64> {
    let mut log = conn.log(0, false).await?;
    let mut hashes: Vec<BlobHash> = Vec::new();
    while let LogItem::Entry(e, _) = log.next().await? {
        if let Record::Store { hash, .. } = e.record {
            hashes.push(hash);
        }
    }
    drop(log);
    let hashes = Arc::new(hashes);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..k {
        let (conn, hashes, next) = (conn.clone(), hashes.clone(), next.clone());
        tasks.spawn(async move {
            let mut got = 0u64;
            while let Some(h) = hashes.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                got += conn.fetch(h).await?.len() as u64;
            }
            anyhow::Ok(got)
        });
    }
    let mut got = 0;
    while let Some(r) = tasks.join_next().await {
        got += r??;
    }
    Ok(got)
}
