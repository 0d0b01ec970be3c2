//! Jepsen-style crash test: SIGKILL the real server binary at random moments while clients
//! Store, restart it, and count. Every acknowledged message must be present and fetchable
//! (lost = 0), `postlog verify` must pass, and nothing unacknowledged may be half-visible
//! (every Store record's blob is fetchable; no hash is recorded twice).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postlog_client::{Endpoint, LogItem};
use postlog_proto::{BlobHash, Record};
use rand::{Rng, SeedableRng};

const KILLS: usize = 20;
const WORKERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_stores_loses_nothing_acknowledged() {
    let seed: u64 = std::env::var("POSTLOG_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    println!("seed {seed} (set POSTLOG_CRASH_SEED to reproduce another run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let fingerprint = common::fingerprint_of(&data);
    let login = common::account_on(&data, addr, &fingerprint, "ann");
    // Each commit ends with a syncfs, which also writes out every dirty page of the file
    // system: right after a build (hundreds of MB just linked) that takes seconds, longer
    // than the kill intervals below, and no Store would ever be acknowledged. Flush first.
    let _ = std::process::Command::new("sync").status();
    let mut server = common::ServerProcess::spawn(&data, addr);
    let attempted = Arc::new(AtomicU64::new(0));
    let acked: Arc<Mutex<HashMap<BlobHash, u64>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<BlobHash>>> = Arc::default();
    // Wait until the first server serves and has committed one Store, so the kills hit
    // servers, not a loading binary, and the first commit's syncfs has written out what
    // `sync` above may have left (once, it took longer than every kill interval below).
    let first = common::connect_retry(&Endpoint::new(&fingerprint).unwrap(), &login).await;
    let msg = common::message(usize::MAX, 300);
    sent.lock().unwrap().insert(BlobHash::of(&msg));
    let (hash, offset, _) = first.store(&msg, &["inbox".into()]).await.unwrap();
    acked.lock().unwrap().insert(hash, offset);
    first.close();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (attempted, acked, sent, stop, login) = (
            attempted.clone(),
            acked.clone(),
            sent.clone(),
            stop.clone(),
            login.clone(),
        );
        let fp = fingerprint.clone();
        workers.push(tokio::spawn(async move {
            let endpoint = Endpoint::new(&fp).unwrap();
            let mut conn = None;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let c = match &conn {
                    Some(c) => c,
                    None => match endpoint.connect(&login).await {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let msg = common::message(w * 1_000_000 + i, 300 + (i * 131) % 20_000);
                i += 1;
                attempted.fetch_add(1, Ordering::Relaxed);
                sent.lock().unwrap().insert(BlobHash::of(&msg));
                match c.store(&msg, &["inbox".into()]).await {
                    Ok((hash, offset, _)) => {
                        acked.lock().unwrap().insert(hash, offset);
                    }
                    Err(_) => conn = None,
                }
            }
        }));
    }

    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(30..250))).await;
        server.kill9();
        if k % 5 == 4 {
            // Sometimes stay down a while: clients must cope with a dead server.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server = common::ServerProcess::spawn(&data, addr);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    server.kill9();
    let server = common::ServerProcess::spawn(&data, addr);

    // Check through the protocol: every acknowledged message is there, at its offset.
    let endpoint = Endpoint::new(&fingerprint).unwrap();
    let conn = common::connect_retry(&endpoint, &login).await;
    let head = conn.head().await.unwrap();
    let mut log = conn.log(0, true).await.unwrap();
    let mut in_log: HashMap<BlobHash, u64> = HashMap::new();
    let mut duplicates = 0;
    loop {
        match log.next().await.unwrap() {
            LogItem::Entry(e, Some(bytes)) => {
                let Record::Store { hash, .. } = e.record else {
                    panic!("unexpected record")
                };
                assert_eq!(
                    BlobHash::of(&bytes),
                    hash,
                    "blob of offset {} is whole",
                    e.offset
                );
                if in_log.insert(hash, e.offset).is_some() {
                    duplicates += 1;
                }
            }
            LogItem::Live(h) => {
                assert_eq!(h, head);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(log);
    let acked = acked.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(h, o)| in_log.get(h) != Some(o))
        .collect();
    let recovered = in_log.keys().filter(|h| !acked.contains_key(h)).count();
    let unknown = in_log.keys().filter(|h| !sent.contains(h)).count();
    println!(
        "crash test: kills {KILLS}, attempted {}, acknowledged {}, lost {}, recovered {} \
         (committed but unacknowledged), duplicates {duplicates}, head {head}",
        attempted.load(Ordering::Relaxed),
        acked.len(),
        lost.len(),
        recovered,
    );
    common::reliability(
        "crash::sigkill_during_stores_loses_nothing_acknowledged",
        &format!("kill -9 of the server during Stores from {WORKERS} clients (seed {seed})"),
        KILLS as u64,
        acked.len() as u64,
        lost.len() as u64,
        duplicates as u64,
        unknown as u64,
    );
    // At least one acknowledgement per server lifetime on average, or the test says nothing.
    assert!(
        acked.len() >= KILLS,
        "the test must acknowledge many messages to mean anything"
    );
    assert!(lost.is_empty(), "lost acknowledged messages: {lost:?}");
    assert_eq!(duplicates, 0);
    assert_eq!(unknown, 0);
    assert_eq!(
        head as usize,
        in_log.len(),
        "offsets gap-free, one record per message"
    );
    for h in acked.keys().take(50) {
        conn.fetch(h).await.unwrap();
    }
    conn.close();
    drop(server);

    let (status, out, err) = common::run_cli(&["verify", "--data", data.to_str().unwrap()], &[]);
    assert!(status.success(), "verify failed:\n{out}\n{err}");
    assert!(out.contains("ok"));
}
