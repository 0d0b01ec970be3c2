//! Several stateless server nodes on one PostgreSQL database and one bucket (docs/DEPLOYMENT.md),
//! and `postlog migrate` from an embedded data directory. These need the PostgreSQL + S3
//! services, so they are `#[ignore]`d in the embedded pass; .ci/run's
//! `POSTLOG_TEST_BACKEND=postgres` pass runs them with `--include-ignored`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postlog_client::{Connection, Endpoint, LogItem, LoginUrl};
use postlog_proto::{BlobHash, LogOffset, Record};

const NEEDS: &str = "needs PostgreSQL + S3: scripts/test-services.sh start, source its env, \
                     POSTLOG_TEST_BACKEND=postgres cargo test --test cluster -- --include-ignored";

fn require_postgres() {
    assert!(common::on_postgres(), "{NEEDS}");
}

/// A further node's data directory: the first node's storage settings, certificate (clients
/// pin one fingerprint for the whole cluster) and stateless-reset key, if it has one yet.
fn node_dir(first: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["postlog.toml", "cert.pem", "key.pem", "reset.key"] {
        if f != "reset.key" || first.join(f).exists() {
            std::fs::copy(first.join(f), dir.join(f)).unwrap();
        }
    }
}

fn on(url: &LoginUrl, addr: SocketAddr) -> LoginUrl {
    LoginUrl {
        server: addr.to_string(),
        ..url.clone()
    }
}

/// Ends every server connection to the data directory's database (as a PostgreSQL restart
/// or failover would).
fn terminate_connections(data: &Path) {
    let toml = std::fs::read_to_string(data.join("postlog.toml")).unwrap();
    let db = toml
        .rsplit("dbname=")
        .next()
        .and_then(|rest| rest.split(['"', ' ']).next())
        .unwrap()
        .to_string();
    let admin = std::env::var("POSTLOG_TEST_POSTGRES").unwrap();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        let n = c
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .unwrap();
        assert!(
            n >= 3,
            "the nodes' writer, listener and pool connections ({n})"
        );
    })
    .join()
    .unwrap();
}

/// Every record of the account from offset 0, as one node serves it.
async fn whole_log(conn: &Connection) -> Vec<(LogOffset, Record)> {
    let mut s = conn.log(0, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        match s.next().await.unwrap() {
            LogItem::Entry(e, _) => out.push((e.offset, e.record)),
            LogItem::Live(_) => return out,
        }
    }
}

/// Client A imports 1,000 messages through node 1 while client B watches on node 2: B ends
/// with every message byte for byte, pushed across nodes, and both nodes serve the same
/// gap-free log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL + S3 (POSTLOG_TEST_BACKEND=postgres, --include-ignored)"]
async fn two_nodes_one_mailbox() {
    require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("node1"), dir.path().join("node2"));
    let node1 = common::InProcess::start(&d1).await;
    node_dir(&d1, &d2);
    let node2 = common::InProcess::start(&d2).await;
    assert_eq!(node1.fingerprint, node2.fingerprint);
    let url = node1.account("ann");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (profile, u) in [(&a, url.clone()), (&b, on(&url, node2.addr))] {
        common::cli(&["login", &u.to_url(), "--profile", common::p(profile)]);
    }
    let mut watch = Command::new(common::bin())
        .args(["sync", "--watch", "--profile", common::p(&b)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let src = dir.path().join("src");
    let mut want = HashSet::new();
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    for i in 0..1000 {
        let m = common::message(i, 600 + (i * 7919) % 20_000);
        want.insert(BlobHash::of(&m));
        std::fs::write(src.join(format!("cur/{i}.src:2,S")), m).unwrap();
    }
    let out = common::cli(&[
        "import",
        "maildir",
        common::p(&src),
        "--profile",
        common::p(&a),
        "--quiet",
    ]);
    assert!(out.contains("1000 stored"), "{out}");
    let mail = b.join("mail");
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::maildir_hashes(&mail).len() < want.len() {
        assert!(
            Instant::now() < deadline,
            "B did not receive everything through node 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status();
    assert!(watch.wait().unwrap().success());
    assert_eq!(
        common::maildir_hashes(&mail),
        want,
        "byte-identical (names are the hashes)"
    );

    let c1 = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let c2 = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&on(&url, node2.addr))
        .await
        .unwrap();
    let (l1, l2) = (whole_log(&c1).await, whole_log(&c2).await);
    assert_eq!(l1, l2, "both nodes serve the same log");
    assert_eq!(l1.len(), 1000);
    assert!(
        l1.iter().enumerate().all(|(i, (o, _))| *o == i as u64),
        "gap-free from 0"
    );
    assert_eq!(c1.head().await.unwrap(), 1000);
    assert_eq!(c2.head().await.unwrap(), 1000);

    // PostgreSQL drops every connection of both nodes (a restart, a failover): the nodes
    // reconnect, and push across nodes still works (the listener catches up on reconnect).
    let mut live = c2.log(1000, false).await.unwrap();
    assert!(matches!(live.next().await.unwrap(), LogItem::Live(1000)));
    terminate_connections(&d1);
    let m = common::message(5000, 900);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        match c1.store(&m, &[]).await {
            Ok(r) => break r,
            // The first requests may meet a dropped connection: a storage error, retried.
            Err(e) => {
                assert!(Instant::now() < deadline, "no reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(stored.1, 1000);
    let pushed = tokio::time::timeout(Duration::from_secs(15), live.next())
        .await
        .expect("pushed to node 2 after the reconnect")
        .unwrap();
    assert!(
        matches!(pushed, LogItem::Entry(ref e, _) if e.offset == 1000),
        "{pushed:?}"
    );
    drop(live);
    node1.stop().await;
    node2.stop().await;
    let report = common::verify(&d1);
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// Clients store on both nodes at once; node 1 is killed with SIGKILL in the middle. Every
/// acknowledged message is in the log exactly once, offsets are unique and gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL + S3 (POSTLOG_TEST_BACKEND=postgres, --include-ignored)"]
async fn kill9_one_node_during_concurrent_stores() {
    require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("node1"), dir.path().join("node2"));
    common::prepare_data(&d1);
    let fingerprint = common::fingerprint_of(&d1);
    node_dir(&d1, &d2);
    let addr = |_| -> SocketAddr {
        format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap()
    };
    let (a1, a2) = (addr(1), addr(2));
    let mut n1 = common::ServerProcess::spawn(&d1, a1);
    let _n2 = common::ServerProcess::spawn(&d2, a2);
    let url = common::account_on(&d1, a1, &fingerprint, "ann");
    let endpoint = Endpoint::new(&url.fingerprint).unwrap();
    let c1 = common::connect_retry(&endpoint, &url).await;
    let c2 = common::connect_retry(&endpoint, &on(&url, a2)).await;
    const N: usize = 300;
    let store_all = |c: Connection, base: usize| {
        tokio::spawn(async move {
            let mut acked: Vec<(BlobHash, LogOffset)> = Vec::new();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..N {
                let m = common::message(base + i, 1_000 + (i * 104_729) % 30_000);
                let c = c.clone();
                tasks.spawn(async move { c.store(&m, &[]).await });
                while tasks.len() >= 16 {
                    if let Ok((h, o, true)) = tasks.join_next().await.unwrap().unwrap() {
                        acked.push((h, o));
                    }
                }
            }
            while let Some(r) = tasks.join_next().await {
                if let Ok((h, o, true)) = r.unwrap() {
                    acked.push((h, o));
                }
            }
            acked
        })
    };
    let t1 = store_all(c1, 0);
    let t2 = store_all(c2.clone(), 100_000);
    // Kill node 1 once it is well into its share.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c2.head().await.unwrap() < 150 {
        assert!(Instant::now() < deadline, "stores do not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    n1.kill9();
    // The node comes back at once; its stateless reset (same reset.key) ends node 1's client
    // connection instead of leaving it to the idle timeout.
    let _n1 = common::ServerProcess::spawn(&d1, a1);
    let (acked1, acked2) = (t1.await.unwrap(), t2.await.unwrap());
    assert_eq!(acked2.len(), N, "node 2 acknowledged all its stores");
    assert!(
        acked1.len() < N,
        "node 1 died before the end ({} acked)",
        acked1.len()
    );
    let log = whole_log(&c2).await;
    let mut stored: HashMap<BlobHash, LogOffset> = HashMap::new();
    for (offset, r) in &log {
        if let Record::Store { hash, .. } = r {
            assert!(
                stored.insert(*hash, *offset).is_none(),
                "duplicate Store of {hash}"
            );
        }
    }
    assert!(
        log.iter().enumerate().all(|(i, (o, _))| *o == i as u64),
        "gap-free"
    );
    let mut offsets = BTreeMap::new();
    for (h, o) in acked1.iter().chain(&acked2) {
        assert_eq!(
            stored.get(h),
            Some(o),
            "acknowledged {h} at {o} is in the log there"
        );
        assert!(
            offsets.insert(*o, *h).is_none(),
            "offset {o} acknowledged twice"
        );
    }
    // The killed node serves the same log.
    let c1 = common::connect_retry(&endpoint, &url).await;
    assert_eq!(whole_log(&c1).await, log);
    drop((c1, c2));
    let report = common::verify(&d2);
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// `postlog migrate` copies an embedded data directory with every offset, record and blob;
/// devices keep their credentials; `postlog verify` passes; a second run copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL + S3 (POSTLOG_TEST_BACKEND=postgres, --include-ignored)"]
async fn migrate_embedded_directory() {
    require_postgres();
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("postlog.toml"),
        "[storage]\nbackend = \"embedded\"\n",
    )
    .unwrap();
    let server = common::InProcess::start(&old).await;
    let creds = common::admin(&old)
        .add_device("ann", &["ann@example.org".into()], "laptop")
        .unwrap();
    let url = LoginUrl {
        account: creds.account.clone(),
        server: server.addr.to_string(),
        device: creds.device,
        secret: creds.secret,
        fingerprint: server.fingerprint.clone(),
    };
    common::admin(&old).add_device("bob", &[], "phone").unwrap();
    let c = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let mut hashes = Vec::new();
    for i in 0..200 {
        let (h, _, _) = c
            .store(&common::message(i, 500 + i * 37), &["inbox".into()])
            .await
            .unwrap();
        hashes.push(h);
    }
    for (seq, h) in hashes.iter().take(50).enumerate() {
        c.tag(
            h,
            &["flagged".into()],
            &["inbox".into()],
            200,
            seq as u64 + 1,
        )
        .await
        .unwrap();
    }
    for h in &hashes[190..] {
        c.delete(h).await.unwrap();
    }
    let sent = b"From: ann@example.org\r\nTo: carl@example.net\r\nSubject: out\r\n\
                 Message-ID: <m1@example.org>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n";
    c.send(sent, "", &[]).await.unwrap();
    let old_log = whole_log(&c).await;
    let head = c.head().await.unwrap();
    drop(c);
    server.stop().await;

    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join("postlog.toml"), common::storage_toml()).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(old.join(f), new.join(f)).unwrap();
    }
    let migrate = || {
        common::cli(&[
            "migrate",
            "--from",
            common::p(&old),
            "--data",
            common::p(&new),
            "--quiet",
        ])
    };
    let out = migrate();
    assert!(
        out.contains("migrated 2 accounts (0 already there)"),
        "{out}"
    );
    let out = migrate();
    assert!(
        out.contains("migrated 0 accounts (2 already there)"),
        "{out}"
    );
    let out = common::cli(&["verify", "--data", common::p(&new)]);
    assert!(out.contains("ok"), "{out}");

    let node = common::InProcess::start(&new).await;
    assert_eq!(node.fingerprint, url.fingerprint);
    let c = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&on(&url, node.addr))
        .await
        .expect("the old device's credentials work on the migrated store");
    assert_eq!(c.head().await.unwrap(), head);
    assert_eq!(whole_log(&c).await, old_log, "every record at its offset");
    for h in &hashes[..190] {
        assert_eq!(BlobHash::of(&c.fetch(h).await.unwrap()), *h);
    }
    assert!(
        c.fetch(&hashes[195]).await.is_err(),
        "deleted stays deleted"
    );
    // New records continue the log; new devices continue the ids.
    let (_, offset, _) = c.store(&common::message(999, 700), &[]).await.unwrap();
    assert_eq!(offset, head);
    let later = common::admin(&new)
        .add_device("ann", &[], "tablet")
        .unwrap();
    assert!(
        later.device > creds.device + 1,
        "{} after {}",
        later.device,
        creds.device
    );
    node.stop().await;
}
