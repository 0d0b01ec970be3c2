//! The client CLI end to end against a real server over QUIC on loopback: import, sync,
//! watch (push), crash-resume, and the failures a user meets.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postlog_client::{Endpoint, LoginUrl};
use postlog_proto::BlobHash;

fn cli(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = common::run_cli(args, &[]);
    (status.success(), out, err)
}

fn login(url: &LoginUrl, profile: &Path) {
    let (ok, _, err) = cli(&[
        "login",
        &url.to_url(),
        "--profile",
        profile.to_str().unwrap(),
    ]);
    assert!(ok, "login failed: {err}");
}

fn tmp_is_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

fn write_source_maildir(dir: &Path, n: usize, size: impl Fn(usize) -> usize) -> HashSet<BlobHash> {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let mut hashes = HashSet::new();
    for i in 0..n {
        let m = common::message(i, size(i));
        hashes.insert(BlobHash::of(&m));
        let name = if i % 10 == 0 {
            format!("new/{i}.src")
        } else {
            format!("cur/{i}.src:2,S")
        };
        std::fs::write(dir.join(name), m).unwrap();
    }
    hashes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_sync_and_watch_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::InProcess::start(&dir.path().join("data")).await;
    let url = server.account("ann");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    login(&url, &a);
    login(&url, &b);
    let src = dir.path().join("src");
    let hashes = write_source_maildir(&src, 1000, |i| 500 + (i * 7919) % 30_000);
    std::fs::write(src.join("cur/garbage:2,S"), b"\x00\x01 not mail").unwrap();
    // A Maildir++ subfolder is imported too.
    std::fs::create_dir_all(src.join(".Lists.rust/cur")).unwrap();
    let extra = common::message(5000, 800);
    std::fs::write(src.join(".Lists.rust/cur/1.x:2,S"), &extra).unwrap();

    let (ok, out, err) = cli(&[
        "import",
        "maildir",
        src.to_str().unwrap(),
        "--profile",
        a.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("1002 found, 1001 stored, 0 already there, 1 skipped"),
        "{out}"
    );
    assert!(
        err.contains("garbage"),
        "the garbage file is reported: {err}"
    );
    let (ok, out, _) = cli(&[
        "import",
        "maildir",
        src.to_str().unwrap(),
        "--profile",
        a.to_str().unwrap(),
    ]);
    assert!(
        ok && out.contains("0 stored, 1001 already there"),
        "second import is a no-op: {out}"
    );

    let (ok, out, err) = cli(&["sync", "--profile", b.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.starts_with("1001 new messages"), "{out}");
    let mut want = hashes.clone();
    want.insert(BlobHash::of(&extra));
    let mail = b.join("mail");
    assert_eq!(common::maildir_hashes(&mail), want);
    assert!(tmp_is_empty(&mail));
    // Unread imports land in new/, read ones in cur/ with the S flag.
    assert_eq!(std::fs::read_dir(mail.join("new")).unwrap().count(), 100);
    let (ok, out, _) = cli(&["sync", "--profile", b.to_str().unwrap()]);
    assert!(
        ok && out.starts_with("0 new messages, 0.0 MB, 0 records, cursor 1001"),
        "{out}"
    );
    let (ok, out, _) = cli(&["status", "--profile", b.to_str().unwrap()]);
    assert!(
        ok && out.contains("cursor:   1001")
            && out.contains("(1001 messages)")
            && out.contains("0 records behind"),
        "{out}"
    );

    // Push: new mail appears in B's Maildir with no further command.
    let mut watch = Command::new(common::bin())
        .args(["sync", "--watch", "--profile", b.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conn = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    for i in 0..5 {
        let m = common::message(9000 + i, 1000);
        conn.store(&m, &["inbox".into(), "unread".into()])
            .await
            .unwrap();
        want.insert(BlobHash::of(&m));
        let deadline = Instant::now() + Duration::from_secs(15);
        while !mail.join("new").join(BlobHash::of(&m).to_hex()).exists() {
            assert!(
                Instant::now() < deadline,
                "pushed message {i} did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // A delete is pushed the same way: the watching replica removes the file.
    let gone = BlobHash::of(&common::message(9000, 1000));
    assert!(conn.delete(&gone).await.unwrap().1);
    want.remove(&gone);
    let deadline = Instant::now() + Duration::from_secs(15);
    while mail.join("new").join(gone.to_hex()).exists() {
        assert!(Instant::now() < deadline, "the deleted message stayed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status();
    assert!(
        watch.wait().unwrap().success(),
        "watch exits cleanly on SIGTERM"
    );
    assert_eq!(common::maildir_hashes(&mail), want);
    server.stop().await;
}

/// Kill `postlog sync` with SIGKILL at many points of a large sync; every resumed sync ends
/// with exactly the server's messages, no duplicates and no tmp/ leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_sync_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::InProcess::start(&dir.path().join("data")).await;
    let url = server.account("ann");
    let conn = Endpoint::new(&url.fingerprint)
        .unwrap()
        .connect(&url)
        .await
        .unwrap();
    let mut want = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..3000 {
        let m = common::message(i, 2_000 + (i * 104_729) % 60_000);
        want.insert(BlobHash::of(&m));
        let conn = conn.clone();
        tasks.spawn(async move { conn.store(&m, &[]).await.unwrap() });
        if tasks.len() >= 32 {
            tasks.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    // How long a whole sync takes here, to spread the kills over it.
    let probe = dir.path().join("probe");
    login(&url, &probe);
    let started = Instant::now();
    assert!(cli(&["sync", "--profile", probe.to_str().unwrap()]).0);
    let full = started.elapsed();

    let c = dir.path().join("c");
    login(&url, &c);
    let mut kills = 0;
    for k in 1..=12u32 {
        let mut child = Command::new(common::bin())
            .args(["sync", "--profile", c.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full * k / 14);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let mail = c.join("mail");
        // Whatever is there after a kill is whole and named right (checked by maildir_hashes).
        let partial = common::maildir_hashes(&mail);
        assert!(partial.is_subset(&want));
    }
    let (ok, out, err) = cli(&["sync", "--profile", c.to_str().unwrap()]);
    assert!(ok, "{err}");
    let mail = c.join("mail");
    assert_eq!(
        common::maildir_hashes(&mail),
        want,
        "exactly the server's messages"
    );
    assert!(tmp_is_empty(&mail), "no tmp/ leftovers");
    assert_eq!(
        std::fs::read_to_string(c.join("cursor")).unwrap().trim(),
        "3000"
    );
    println!("client crash-resume: full sync {full:?}, {kills} kills, final: {out}");
    assert!(
        kills >= 4,
        "most kills must land mid-sync to test anything ({kills})"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_wrong_pin_secret_dead_server_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let fp = common::fingerprint_of(&data);
    let url = common::account_on(&data, addr, &fp, "ann");
    let mut server = common::ServerProcess::spawn(&data, addr);
    let endpoint = Endpoint::new(&fp).unwrap();
    common::connect_retry(&endpoint, &url).await.close();
    let profile = |n: &str| dir.path().join(n);
    let ps = |p: &PathBuf| p.to_str().unwrap().to_string();

    // Wrong pin: refused with a clear message, nothing saved.
    let mut bad = url.clone();
    bad.fingerprint = "00".repeat(32);
    let (ok, _, err) = cli(&["login", &bad.to_url(), "--profile", &ps(&profile("pin"))]);
    assert!(
        !ok && err.contains("does not match the pinned fingerprint"),
        "{err}"
    );
    assert!(!profile("pin").join("profile.toml").exists());

    // Wrong secret.
    let mut bad = url.clone();
    bad.secret = [0x55; 32];
    let (ok, _, err) = cli(&["login", &bad.to_url(), "--profile", &ps(&profile("secret"))]);
    assert!(!ok && err.contains("authentication failed"), "{err}");

    // A good profile with some mail.
    let p = profile("good");
    login(&url, &p);
    let conn = endpoint.connect(&url).await.unwrap();
    let mut want = HashSet::new();
    for i in 0..1500 {
        let m = common::message(i, 20_000 + i * 13);
        want.insert(BlobHash::of(&m));
        conn.store(&m, &[]).await.unwrap();
    }
    conn.close();

    // Server down: a clear error, a non-zero exit, the Maildir untouched.
    server.kill9();
    let mut cmd = Command::new(common::bin());
    cmd.args(["sync", "--profile", &ps(&p)])
        .env("POSTLOG_CONNECT_TIMEOUT", "1");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot reach the server"),
        "{stderr}"
    );
    assert!(common::maildir_hashes(&p.join("mail")).is_empty());

    // Server killed and restarted in the middle of a sync: the sync fails or finishes, and
    // the next sync ends with exactly the server's messages.
    server = common::ServerProcess::spawn(&data, addr);
    common::connect_retry(&endpoint, &url).await.close();
    let child = Command::new(common::bin())
        .args(["sync", "--profile", &ps(&p)])
        .env("POSTLOG_CONNECT_TIMEOUT", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(60));
    server.kill9();
    server = common::ServerProcess::spawn(&data, addr);
    let out = child.wait_with_output().unwrap();
    println!(
        "sync during a server restart: exit {:?}, {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    common::connect_retry(&endpoint, &url).await.close();
    let (ok, _, err) = cli(&["sync", "--profile", &ps(&p)]);
    assert!(ok, "{err}");
    assert_eq!(common::maildir_hashes(&p.join("mail")), want);
    assert!(tmp_is_empty(&p.join("mail")));
    server.terminate();
}

/// A finished command gives its connection back at once. Regression: the CONNECTION_CLOSE
/// frame was lost with the exiting process, so the server held every finished `sync`'s
/// connection (and any Log stream's slot) until its 60 s idle timeout. With room for one
/// connection, back-to-back commands each need the previous one's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_commands_give_their_connection_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("postlog.toml"), "max_connections = 1\n").unwrap();
    let server = common::InProcess::start(&data).await;
    let url = server.account("ann");
    let p = dir.path().join("p");
    login(&url, &p);
    for _ in 0..3 {
        // The server frees the slot when the close arrives, a moment after the previous
        // process exited: allow for that moment, far less than the idle timeout.
        let started = Instant::now();
        loop {
            let (ok, _, err) = cli(&["sync", "--profile", p.to_str().unwrap()]);
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sync still refused 10 s after the previous command ended: {err}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.stop().await;
}
