//! Deletion end to end (issue 7), over real QUIC against the `postlog` binary: a Delete
//! reaches every replica and leaves no trace in the server's data directory; a fresh
//! replica never sees the message; a delete queued offline, Delete racing Tag, the same
//! bytes stored again, the retention rule, compaction of a tag history, and SIGKILL during
//! scrubs all converge and pass `postlog verify`.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{cli, p};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use postlog_client::{Connection, Endpoint, LogItem, LoginUrl};
use postlog_proto::{BlobHash, LogOffset, Record};

/// The messages in a replica's Maildir, by the hash their file names start with.
fn maildir_hashes(profile: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(profile.join("mail").join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            out.insert(name[..64].to_string());
        }
    }
    out
}

fn tags(profile: &Path, h: &BlobHash) -> String {
    cli(&["tag", "--profile", p(profile), &h.to_hex()])
}

/// The live records from offset 0, up to `Live`.
async fn log_from_zero(conn: &Connection) -> Vec<(LogOffset, Record)> {
    let mut log = conn.log(0, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        match log.next().await.unwrap() {
            LogItem::Entry(e, _) => out.push((e.offset, e.record)),
            LogItem::Live(_) => return out,
        }
    }
}

/// Waits on a Log stream from `from` for a record that `want` accepts (the server's
/// retention timer appends it on its own).
async fn await_record(conn: &Connection, from: LogOffset, want: impl Fn(&Record) -> bool) {
    let mut log = conn.log(from, false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let LogItem::Entry(e, _) = log.next().await.unwrap()
                && want(&e.record)
            {
                return;
            }
        }
    })
    .await
    .expect("the server appended the record within 60 s");
}

/// PostgreSQL + S3: the bucket holds no object that no record names (a deleted message's
/// object was removed, not left for the collector), checked by `postlog gc` at any age.
fn bucket_has_no_orphans(data: &Path) {
    let (status, out, err) = common::run_cli(&["gc", "--data", p(data), "--min-age", "0s"], &[]);
    assert!(status.success(), "{err}");
    assert!(out.contains("removed 0 unreferenced objects"), "{out}");
}

fn verify(data: &Path) {
    let (status, out, err) = common::run_cli(&["verify", "--data", p(data)], &[]);
    assert!(status.success(), "verify failed:\n{out}\n{err}");
}

/// Logs a new device of `ann` into `profile` and syncs it.
fn replica(dir: &Path, name: &str, url: &LoginUrl) -> PathBuf {
    let prof = dir.join(name);
    cli(&["login", &url.to_url(), "--profile", p(&prof)]);
    cli(&["sync", "--profile", p(&prof)]);
    prof
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_reaches_every_replica_and_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Retention after 1 s, swept every second; tag histories of more than 4 records are
    // compacted.
    std::fs::write(
        data.join("postlog.toml"),
        "[retention]\ninterval_secs = 1\ncompact_after = 4\n\
         rules = [{ tag = \"deleted\", after_secs = 1 }]\n",
    )
    .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let fp = common::fingerprint_of(&data);
    let urls: Vec<LoginUrl> = (0..4)
        .map(|_| common::account_on(&data, addr, &fp, "ann"))
        .collect();
    let mut server = common::ServerProcess::spawn(&data, addr);
    let endpoint = Endpoint::new(&fp).unwrap();
    let conn = common::connect_retry(&endpoint, &urls[0]).await;
    let secret = b"zebra-quartz-7731 the unique body line";
    let mut m0 = common::message(0, 2000);
    m0.extend_from_slice(secret);
    let mut msgs = vec![m0.clone()];
    msgs.extend((1..6).map(|i| common::message(i, 2000)));
    let inbox = ["inbox".to_string(), "unread".to_string()];
    let mut h = Vec::new();
    for m in &msgs {
        h.push(conn.store(m, &inbox).await.unwrap().0);
    }
    let a = replica(dir.path(), "a", &urls[0]);
    let b = replica(dir.path(), "b", &urls[1]);
    cli(&[
        "tag",
        "--profile",
        p(&b),
        "+flagged",
        "-unread",
        &h[0].to_hex(),
    ]);
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(tags(&a, &h[0]), "flagged\ninbox\n");

    // Delete on A: gone from A at once, from B at its next sync, files and tags.
    cli(&["delete", "--profile", p(&a), &h[0].to_hex()]);
    assert!(!maildir_hashes(&a).contains(&h[0].to_hex()));
    cli(&["sync", "--profile", p(&b)]);
    assert!(!maildir_hashes(&b).contains(&h[0].to_hex()));
    let out = Command::new(common::bin())
        .args(["tag", "--profile", p(&b), &h[0].to_hex()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "B still knows the deleted message");
    // Nothing of it on the server's disk: not the blob file, not the hash (bytes or hex)
    // in any database file or WAL, not a line of its body.
    let hex = h[0].to_hex();
    let found = common::traces(&data, &[&h[0].0, hex.as_bytes(), secret]);
    assert!(found.is_empty(), "traces of the deleted message: {found:?}");
    if common::on_postgres() {
        // On PostgreSQL + S3 the bytes live in the bucket: the object is gone.
        bucket_has_no_orphans(&data);
    }
    // The Log from 0 has the Scrub and nothing of the message; so does a new replica.
    let log = log_from_zero(&conn).await;
    assert!(log.iter().all(|(_, r)| r.hash() != Some(h[0])));
    assert!(log.iter().any(|(_, r)| matches!(r, Record::Scrub { .. })));
    let c = replica(dir.path(), "c", &urls[2]);
    let live: BTreeSet<String> = h[1..].iter().map(|x| x.to_hex()).collect();
    assert_eq!(maildir_hashes(&c), live);
    assert!(!conn.delete(&h[0]).await.unwrap().1, "idempotent");
    verify(&data);

    // Delete racing Tag on the same message: either order converges.
    let conn2 = common::connect_retry(&endpoint, &urls[1]).await;
    let x = ["x".to_string()];
    let (tagged, deleted) = tokio::join!(conn2.tag(&h[1], &x, &[], 0, 1_000), conn.delete(&h[1]));
    assert!(deleted.unwrap().1);
    match tagged {
        Ok(_) => {}
        Err(postlog_client::ClientError::Server {
            code: Some(postlog_proto::ErrorCode::NotFound),
            ..
        }) => {}
        Err(e) => panic!("Tag racing Delete: {e}"),
    }
    // The same bytes stored again after the delete: a new message, without old tags.
    let (again, _, new) = conn.store(&m0, &inbox).await.unwrap();
    assert!(new && again == h[0]);
    for r in [&a, &b, &c] {
        cli(&["sync", "--profile", p(r)]);
        assert!(!maildir_hashes(r).contains(&h[1].to_hex()));
        assert!(maildir_hashes(r).contains(&h[0].to_hex()));
        assert_eq!(tags(r, &h[0]), "inbox\nunread\n");
    }
    verify(&data);

    // Retention: tagged `deleted` on B, gone everywhere once the rule's second passed.
    let head = conn.head().await.unwrap();
    cli(&["tag", "--profile", p(&b), "+deleted", &h[2].to_hex()]);
    await_record(&conn, head, |r| matches!(r, Record::Scrub { .. })).await;
    for r in [&a, &b, &c] {
        cli(&["sync", "--profile", p(r)]);
        assert!(!maildir_hashes(r).contains(&h[2].to_hex()));
    }

    // Compaction: five tag changes on message 3 from two replicas become one snapshot;
    // every replica, and one that starts from 0 afterwards, has the same tags, and a
    // remove made before the compaction acts the same way on all of them.
    let head = conn.head().await.unwrap();
    for (r, change) in [
        (&a, "+one"),
        (&b, "+two"),
        (&a, "-one"),
        (&c, "+three"),
        (&b, "-unread"),
    ] {
        cli(&["tag", "--profile", p(r), change, &h[3].to_hex()]);
    }
    await_record(&conn, head, |r| matches!(r, Record::TagSnapshot { .. })).await;
    // B removes `two` offline from a view older than the snapshot.
    server.kill9();
    cli(&["tag", "--profile", p(&b), "-two", &h[3].to_hex()]);
    // C deletes message 4 while the server is down: queued, sent at its next sync.
    let out = cli(&["delete", "--profile", p(&c), &h[4].to_hex()]);
    assert!(out.contains("queued"), "{out}");
    assert!(maildir_hashes(&c).contains(&h[4].to_hex()));
    server = common::ServerProcess::spawn(&data, addr);
    common::connect_retry(&endpoint, &urls[0]).await.close();
    // B sends its queued change first; D then starts from 0 after the compaction.
    cli(&["sync", "--profile", p(&b)]);
    let d = replica(dir.path(), "d", &urls[3]);
    for r in [&a, &c] {
        cli(&["sync", "--profile", p(r)]);
    }
    let want = "inbox\nthree\n";
    for r in [&a, &b, &c, &d] {
        assert_eq!(tags(r, &h[3]), want, "{r:?}");
    }
    verify(&data);

    // SIGKILL while scrubs run: restart, delete again (idempotent), and everything
    // converges to the live set.
    let conn = common::connect_retry(&endpoint, &urls[0]).await;
    let mut doomed = Vec::new();
    for i in 0..40 {
        let m = common::message(100 + i, 1500);
        doomed.push(conn.store(&m, &inbox).await.unwrap().0);
    }
    cli(&["sync", "--profile", p(&a)]);
    let deleter = {
        let conn = conn.clone();
        let doomed = doomed.clone();
        tokio::spawn(async move {
            let mut acked = 0;
            for hash in &doomed {
                if conn.delete(hash).await.is_err() {
                    break;
                }
                acked += 1;
            }
            acked
        })
    };
    // Kill once some deletes were acknowledged, others not yet.
    let mut log = conn.log(conn.head().await.unwrap(), false).await.unwrap();
    for _ in 0..5 {
        let _ = log.next().await;
    }
    server.kill9();
    // The restarted server resets the old connection, which ends the deleter.
    server = common::ServerProcess::spawn(&data, addr);
    let acked = deleter.await.unwrap();
    assert!(
        acked < doomed.len(),
        "the kill came after every delete ({acked})"
    );
    let conn = common::connect_retry(&endpoint, &urls[0]).await;
    for hash in &doomed {
        conn.delete(hash).await.unwrap();
    }
    let live: BTreeSet<String> = log_from_zero(&conn)
        .await
        .iter()
        .filter_map(|(_, r)| match r {
            Record::Store { hash, .. } => Some(hash.to_hex()),
            _ => None,
        })
        .collect();
    assert_eq!(live.len(), 3, "messages 0, 3, 5");
    for r in [&a, &b, &c, &d] {
        cli(&["sync", "--profile", p(r)]);
        assert_eq!(maildir_hashes(r), live, "{r:?}");
    }
    if common::on_postgres() {
        // The bytes live in the bucket there: no object is left that no record names.
        bucket_has_no_orphans(&data);
    } else {
        for hash in &doomed {
            let hex = hash.to_hex();
            assert!(common::traces(&data.join("blobs"), &[hex.as_bytes()]).is_empty());
        }
    }
    conn.close();
    server.terminate();
    verify(&data);
}
