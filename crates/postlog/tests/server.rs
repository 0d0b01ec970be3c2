//! The server over real QUIC on loopback: concurrency, push, idempotency, isolation.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use postlog_client::{ClientError, Endpoint, LogItem};
use postlog_proto::{BlobHash, ErrorCode, Record};
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_stores_fetch_back_and_push_live() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::InProcess::start(dir.path()).await;
    let login = server.account("ann");
    let endpoint = Endpoint::new(&server.fingerprint).unwrap();
    let c1 = endpoint.connect(&login).await.unwrap();
    assert!(!c1.zero_rtt, "no session ticket yet");
    // The same endpoint resumes with 0-RTT: Auth and a Head ride in the first flight.
    let resumed = endpoint.connect(&login).await.unwrap();
    assert!(resumed.zero_rtt, "a resumed connection uses 0-RTT");
    assert_eq!(resumed.head().await.unwrap(), 0);
    resumed.close();
    let endpoint2 = Endpoint::new(&server.fingerprint).unwrap();
    let c2 = endpoint2.connect(&login).await.unwrap();

    // A Log stream opened before any Store sees every record live, in offset order.
    let mut log = c2.log(0, false).await.unwrap();
    assert!(matches!(log.next().await.unwrap(), LogItem::Live(0)));
    // The laptop changes networks: the client moves to a new local socket (QUIC connection
    // migration). The open Log stream and the connection carry on; nothing is lost.
    endpoint2.rebind().unwrap();
    const N: usize = 1000;
    let watcher = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N {
            match log.next().await.unwrap() {
                LogItem::Entry(e, None) => got.push(e),
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    });

    let messages: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..N)
            .map(|i| common::message(i, 200 + (i * 37) % 5000))
            .collect(),
    );
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let conn = if i % 2 == 0 { c1.clone() } else { c2.clone() };
        let messages = messages.clone();
        tasks.spawn(async move {
            let (hash, offset, new) = conn.store(&messages[i], &["inbox".into()]).await.unwrap();
            assert!(new);
            assert_eq!(hash, BlobHash::of(&messages[i]));
            (i, offset)
        });
    }
    let mut offset_of = std::collections::HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (i, offset) = r.unwrap();
        offset_of.insert(i, offset);
    }
    let offsets: HashSet<u64> = offset_of.values().copied().collect();
    assert_eq!(
        offsets,
        (0..N as u64).collect::<HashSet<_>>(),
        "offsets are gap-free"
    );
    assert_eq!(c1.head().await.unwrap(), N as u64);
    assert_eq!(c2.head().await.unwrap(), N as u64);

    // Fetch every message back, concurrently, byte-identical.
    for i in 0..N {
        let conn = if i % 2 == 0 { c2.clone() } else { c1.clone() };
        let messages = messages.clone();
        tasks.spawn(async move {
            let got = conn.fetch(&BlobHash::of(&messages[i])).await.unwrap();
            assert_eq!(got, messages[i]);
            (i, 0)
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    let live = watcher.await.unwrap();
    assert!(
        live.iter().enumerate().all(|(i, e)| e.offset == i as u64),
        "offset order"
    );
    let pushed: HashSet<BlobHash> = live
        .iter()
        .map(|e| match &e.record {
            Record::Store { hash, tags, .. } => {
                assert_eq!(tags, &["inbox".to_string()]);
                *hash
            }
            other => panic!("unexpected record {other:?}"),
        })
        .collect();
    assert_eq!(pushed, messages.iter().map(|m| BlobHash::of(m)).collect());

    // Storing the same bytes again appends nothing.
    let (_, offset, new) = c1.store(&messages[7], &[]).await.unwrap();
    assert_eq!((offset, new), (offset_of[&7], false));
    assert_eq!(c1.head().await.unwrap(), N as u64);

    // Accounts are isolated: another account's blob is "not found", exactly like a missing one.
    let bob = Endpoint::new(&server.fingerprint)
        .unwrap()
        .connect(&server.account("bob"))
        .await
        .unwrap();
    assert_eq!(bob.head_at_auth, 0);
    for hash in [BlobHash::of(&messages[0]), BlobHash([0; 32])] {
        match bob.fetch(&hash).await {
            Err(ClientError::Server {
                code: Some(ErrorCode::NotFound),
                ..
            }) => {}
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    // An inline Log replays records and their bytes.
    let mut log = bob.log(0, true).await.unwrap();
    assert!(matches!(log.next().await.unwrap(), LogItem::Live(0)));
    let mut log = c1.log(998, true).await.unwrap();
    for want in [998u64, 999] {
        match log.next().await.unwrap() {
            LogItem::Entry(e, Some(bytes)) => {
                assert_eq!(e.offset, want);
                assert_eq!(Some(BlobHash::of(&bytes)), e.record.hash());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(log.next().await.unwrap(), LogItem::Live(1000)));
    drop(log);
    // A Log request sent in the same flight as Auth (resumed: in 0-RTT data) is served
    // once Auth succeeds, from the offset asked.
    let ep = Endpoint::new(&server.fingerprint).unwrap();
    for resumed in [false, true] {
        let (conn, mut log) = ep.connect_with_log(&login, 999).await.unwrap();
        assert_eq!((conn.zero_rtt, conn.head_at_auth), (resumed, N as u64));
        match log.next().await.unwrap() {
            LogItem::Entry(e, Some(bytes)) => {
                assert_eq!(e.offset, 999);
                assert_eq!(Some(BlobHash::of(&bytes)), e.record.hash());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(log.next().await.unwrap(), LogItem::Live(1000)));
        conn.close();
    }

    // Revoking a device closes its open connections (and its secret stops working).
    let lost_laptop = server.account("ann");
    let c3 = Endpoint::new(&server.fingerprint)
        .unwrap()
        .connect(&lost_laptop)
        .await
        .unwrap();
    common::admin(dir.path())
        .revoke_device("ann", lost_laptop.device)
        .unwrap();
    let why = tokio::time::timeout(std::time::Duration::from_secs(10), c3.closed())
        .await
        .unwrap();
    assert!(why.to_string().contains("revoked"), "{why}");
    assert!(
        Endpoint::new(&server.fingerprint)
            .unwrap()
            .connect(&lost_laptop)
            .await
            .is_err()
    );
    // With a Log request in the first flight, the refusal is still an authentication error.
    let refused = Endpoint::new(&server.fingerprint)
        .unwrap()
        .connect_with_log(&lost_laptop, 0)
        .await;
    assert!(
        matches!(refused, Err(ClientError::Auth(_))),
        "{:?}",
        refused.map(|_| ())
    );
    assert_eq!(
        c1.head().await.unwrap(),
        N as u64,
        "other devices are unaffected"
    );
    server.stop().await;
    let report = common::verify(dir.path());
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.records, N as u64);
}
