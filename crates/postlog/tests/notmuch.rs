//! notmuch end to end (feature `notmuch`): replica A indexes its mail in a real notmuch
//! database (created by the `notmuch` CLI, edited with `notmuch tag`, flags synchronized
//! the way notmuch users have them), replica B keeps a plain Maildir; both talk to a real
//! server over QUIC. Tags go both ways, including ones with spaces and non-ASCII; offline
//! edits on both sides converge; a no-change sync reads and writes no notmuch message.
#![cfg(feature = "notmuch")]
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{cli, file_of, p, set, tags};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use postlog_proto::BlobHash;

/// A notmuch mail root with its own configuration file (never the user's).
struct Notmuch {
    root: PathBuf,
    config: PathBuf,
}

impl Notmuch {
    /// Creates an empty database the way a user would: a config file and `notmuch new`.
    fn create(dir: &Path) -> Notmuch {
        let root = dir.join("mail");
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.join("notmuch-config");
        std::fs::write(
            &config,
            format!(
                "[database]\npath={}\n[new]\ntags=unread;inbox;\n[search]\nexclude_tags=\n\
                 [maildir]\nsynchronize_flags=true\n",
                root.display()
            ),
        )
        .unwrap();
        let nm = Notmuch { root, config };
        nm.run(&["new", "--quiet"]);
        nm
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("notmuch")
            .args(args)
            .env("NOTMUCH_CONFIG", &self.config)
            .output()
            .expect("run notmuch (apt-get install notmuch)");
        assert!(
            out.status.success(),
            "notmuch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `notmuch tag` on test message `i` (Message-ID `<i.test@example.org>`).
    fn tag(&self, changes: &[&str], i: usize) {
        let id = format!("id:{i}.test@example.org");
        let mut args = vec!["tag"];
        args.extend_from_slice(changes);
        args.extend(["--", &id]);
        self.run(&args);
    }

    fn tags(&self, i: usize) -> BTreeSet<String> {
        self.run(&[
            "search",
            "--output=tags",
            &format!("id:{i}.test@example.org"),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    fn count(&self, query: &str) -> usize {
        self.run(&["count", query]).trim().parse().unwrap()
    }
}

/// Test message `i` with a PDF attachment (notmuch tags such mail `attachment` on index).
fn with_attachment(i: usize) -> Vec<u8> {
    format!(
        "From: Sender {i} <sender{i}@example.org>\r\nTo: ann@example.org\r\n\
         Subject: Test message {i}\r\nMessage-ID: <{i}.test@example.org>\r\n\
         Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
         Content-Type: text/plain\r\n\r\nSee attached.\r\n--b\r\n\
         Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n"
    )
    .into_bytes()
}

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    addr: std::net::SocketAddr,
    fp: String,
    url_a: postlog_client::LoginUrl,
    url_b: postlog_client::LoginUrl,
    server: common::ServerProcess,
    a: PathBuf,
    b: PathBuf,
    nm: Notmuch,
}

/// A server, an account with one device per replica, a notmuch database for A.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let fp = common::fingerprint_of(&data);
    let url_a = common::account_on(&data, addr, &fp, "ann");
    let url_b = common::account_on(&data, addr, &fp, "ann");
    let server = common::ServerProcess::spawn(&data, addr);
    common::connect_retry(&postlog_client::Endpoint::new(&fp).unwrap(), &url_a)
        .await
        .close();
    let nm = Notmuch::create(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    Setup {
        data,
        addr,
        fp,
        url_a,
        url_b,
        server,
        a,
        b,
        nm,
        _dir: dir,
    }
}

/// Stores `n` messages (`unread`, `inbox`) with up to 32 Stores in flight.
async fn store(s: &Setup, msgs: Vec<Vec<u8>>) -> Vec<BlobHash> {
    let conn =
        common::connect_retry(&postlog_client::Endpoint::new(&s.fp).unwrap(), &s.url_a).await;
    let hashes: Vec<BlobHash> = msgs.iter().map(|m| BlobHash::of(m)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for m in msgs {
        if tasks.len() >= 32 {
            tasks.join_next().await.unwrap().unwrap();
        }
        let conn = conn.clone();
        tasks.spawn(async move {
            conn.store(&m, &["inbox".into(), "unread".into()])
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    conn.close();
    hashes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notmuch_tags_sync_both_ways_and_converge_offline() {
    let mut s = setup().await;
    let mut msgs: Vec<Vec<u8>> = (0..9).map(|i| common::message(i, 2000)).collect();
    msgs.push(with_attachment(9));
    let hashes = store(&s, msgs).await;
    let (a, b, nm) = (s.a.clone(), s.b.clone(), &s.nm);
    cli(&[
        "login",
        &s.url_a.to_url(),
        "--profile",
        p(&a),
        "--notmuch",
        p(&nm.root),
    ]);
    cli(&["login", &s.url_b.to_url(), "--profile", p(&b)]);
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(out.contains("10 new messages"), "{out}");
    cli(&["sync", "--profile", p(&b)]);
    let (ma, mb) = (nm.root.join("postlog"), b.join("mail"));

    // Indexed directly (no `notmuch new`), with exactly the synced tags: notmuch's own
    // `attachment` tag is not added to the set.
    assert_eq!(nm.count("path:postlog/**"), 10);
    for i in 0..10 {
        assert_eq!(nm.tags(i), set(&["inbox", "unread"]), "message {i}");
    }
    assert_eq!(nm.count("attachment:a.pdf"), 1);
    assert_eq!(file_of(&ma, &hashes[0]), ("new".into(), hashes[0].to_hex()));

    // Tagged in notmuch on A (notmuch renames the file to the flag, as it does for its
    // users): B gets the tag and the Maildir flag.
    nm.tag(&["+flagged"], 0);
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    let h0 = hashes[0];
    assert_eq!(tags(&b, &h0), set(&["flagged", "inbox", "unread"]));
    assert_eq!(file_of(&mb, &h0), ("cur".into(), format!("{h0}:2,F")));
    assert_eq!(tags(&a, &h0), set(&["flagged", "inbox", "unread"]));

    // Read and flagged in B's mail reader: A's notmuch has `flagged` and no `unread`.
    let h1 = hashes[1];
    std::fs::rename(
        mb.join("new").join(h1.to_hex()),
        mb.join("cur").join(format!("{h1}:2,FS")),
    )
    .unwrap();
    cli(&["sync", "--profile", p(&b)]);
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(nm.tags(1), set(&["flagged", "inbox"]));
    assert_eq!(file_of(&ma, &h1), ("cur".into(), format!("{h1}:2,FS")));
    // notmuch follows the rename: the new name only.
    assert_eq!(nm.count("path:postlog/cur and id:1.test@example.org"), 1);
    assert_eq!(nm.count("path:postlog/new and id:1.test@example.org"), 0);

    // Tags with spaces and non-ASCII, both ways.
    let h2 = hashes[2];
    nm.tag(&["+to read later", "+caf\u{e9}", "-inbox"], 2);
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    assert_eq!(
        tags(&b, &h2),
        set(&["caf\u{e9}", "to read later", "unread"])
    );
    cli(&[
        "tag",
        "--profile",
        p(&b),
        "+\u{fc}ber wichtig \u{1f4ec}",
        "-caf\u{e9}",
        &h2.to_hex(),
    ]);
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(
        nm.tags(2),
        set(&["to read later", "unread", "\u{fc}ber wichtig \u{1f4ec}"])
    );
    assert_eq!(nm.tags(2), tags(&a, &h2));

    // Before going offline, both have `todo` on message 6.
    nm.tag(&["+todo"], 6);
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    assert!(tags(&b, &hashes[6]).contains("todo"));

    // Both offline, editing the same messages.
    s.server.kill9();
    // 3: A tags it in notmuch, B removes `inbox`.
    nm.tag(&["+todo"], 3);
    cli(&["tag", "--profile", p(&b), "-inbox", &hashes[3].to_hex()]);
    // 4: A reads it in notmuch, B flags it in its mail reader.
    nm.tag(&["-unread"], 4);
    std::fs::rename(
        mb.join("new").join(hashes[4].to_hex()),
        mb.join("cur").join(format!("{}:2,F", hashes[4])),
    )
    .unwrap();
    // 5: both add the same tag; 6: A removes `todo` while B adds it again (add wins).
    nm.tag(&["+shared tag"], 5);
    cli(&[
        "tag",
        "--profile",
        p(&b),
        "+shared tag",
        &hashes[5].to_hex(),
    ]);
    nm.tag(&["-todo"], 6);
    cli(&["tag", "--profile", p(&b), "+todo", &hashes[6].to_hex()]);
    // 7: A removes a tag B had not seen removed, B adds an unrelated one.
    nm.tag(&["-inbox", "+\u{65e5}\u{672c}"], 7);
    cli(&["tag", "--profile", p(&b), "+later", &hashes[7].to_hex()]);

    s.server = common::ServerProcess::spawn(&s.data, s.addr);
    common::connect_retry(&postlog_client::Endpoint::new(&s.fp).unwrap(), &s.url_a)
        .await
        .close();
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    for (i, h) in hashes.iter().enumerate() {
        let on_b = tags(&b, h);
        assert_eq!(nm.tags(i), on_b, "A's notmuch and B agree on message {i}");
        assert_eq!(tags(&a, h), on_b, "A's state and B agree on message {i}");
        assert_eq!(
            file_of(&ma, h).1.split_once(":2,").map(|x| x.1.to_string()),
            file_of(&mb, h).1.split_once(":2,").map(|x| x.1.to_string()),
            "Maildir flags agree on message {i}"
        );
    }
    assert_eq!(nm.tags(3), set(&["todo", "unread"]));
    assert_eq!(nm.tags(4), set(&["flagged", "inbox"]));
    assert_eq!(nm.tags(5), set(&["inbox", "shared tag", "unread"]));
    assert!(nm.tags(6).contains("todo"), "a concurrent add wins");
    assert_eq!(nm.tags(7), set(&["later", "unread", "\u{65e5}\u{672c}"]));

    // Nothing changed: A's sync touches no notmuch message, and queues nothing.
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(
        out.starts_with("0 new messages, 0.0 MB, 0 records")
            && out.contains("notmuch: 0 messages read, 0 written"),
        "{out}"
    );

    // Deletion: tagged `deleted` in notmuch, a message is left to the server's retention
    // rule (30 days by default); a delete from B removes message 0 from notmuch and A's
    // Maildir; with `delete_tagged = "now"`, tagging `deleted` deletes at the next sync.
    nm.tag(&["+deleted"], 8);
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    assert_eq!(nm.count("id:8.test@example.org"), 1);
    assert!(tags(&b, &hashes[8]).contains("deleted"));
    cli(&["delete", "--profile", p(&b), &hashes[0].to_hex()]);
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(nm.count("id:0.test@example.org"), 0);
    assert_eq!(nm.count("path:postlog/**"), 9);
    let toml = a.join("profile.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{text}delete_tagged = \"now\"\n")).unwrap();
    nm.tag(&["+deleted"], 1);
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(nm.count("id:1.test@example.org"), 0);
    cli(&["sync", "--profile", p(&b)]);
    for h in [&hashes[0], &hashes[1]] {
        assert!(
            !std::fs::read_dir(mb.join("cur"))
                .unwrap()
                .chain(std::fs::read_dir(mb.join("new")).unwrap())
                .any(|e| e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&h.to_hex())),
            "B still has {h}"
        );
    }
    let (status, out, err) = common::run_cli(&["verify", "--data", p(&s.data)], &[]);
    assert!(status.success(), "{out}{err}");
    s.server.terminate();
}

/// The work of a sync is counted in notmuch messages read and written (printed by
/// `postlog sync`): none when nothing changed, with 2,000 messages in the database. (The
/// same at 100,000 messages, with wall times, is a benchmark's job, not a test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_change_sync_reads_no_notmuch_message() {
    const N: usize = 2000;
    let s = setup().await;
    let hashes = store(&s, (0..N).map(|i| common::message(i, 600)).collect()).await;
    let (a, nm) = (s.a.clone(), &s.nm);
    cli(&[
        "login",
        &s.url_a.to_url(),
        "--profile",
        p(&a),
        "--notmuch",
        p(&nm.root),
    ]);
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(out.contains(&format!("{N} new messages")), "{out}");
    assert_eq!(nm.count("path:postlog/**"), N);
    assert_eq!(nm.count("tag:unread and tag:inbox"), N);

    // A no-change sync: one revision check, no message read or written.
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(
        out.contains("0 records") && out.contains("notmuch: 0 messages read, 0 written"),
        "{out}"
    );
    // Mail outside postlog's folder changing does not make it read anything either.
    let other = nm.root.join("other/cur");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("x:2,S"), common::message(N + 1, 600)).unwrap();
    nm.run(&["new", "--quiet"]);
    nm.run(&[
        "tag",
        "+elsewhere",
        "--",
        &format!("id:{}.test@example.org", N + 1),
    ]);
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(out.contains("notmuch: 0 messages read, 0 written"), "{out}");

    // One edit costs work for one message, not for the database.
    nm.tag(&["+one"], 7);
    let out = cli(&["sync", "--profile", p(&a)]);
    let work = out.split("notmuch: ").nth(1).unwrap();
    let read: u64 = work.split(' ').next().unwrap().parse().unwrap();
    assert!((1..=2).contains(&read), "{out}");
    assert!(out.contains("1 records"), "{out}");
    assert_eq!(tags(&a, &hashes[7]), set(&["inbox", "one", "unread"]));
    let out = cli(&["sync", "--profile", p(&a)]);
    assert!(out.contains("notmuch: 0 messages read, 0 written"), "{out}");
}

/// Polls `f` until it holds (pushes and the watch's local scan run on their own clock).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_notmuch_both_ways() {
    let mut s = setup().await;
    let hashes = store(&s, (0..3).map(|i| common::message(i, 1000)).collect()).await;
    let (a, b, nm) = (s.a.clone(), s.b.clone(), &s.nm);
    cli(&[
        "login",
        &s.url_a.to_url(),
        "--profile",
        p(&a),
        "--notmuch",
        p(&nm.root),
    ]);
    cli(&["login", &s.url_b.to_url(), "--profile", p(&b)]);
    cli(&["sync", "--profile", p(&b)]);
    let mut watch = Command::new(common::bin())
        .args(["sync", "--watch", "--profile", p(&a)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("A's watch indexes the mailbox", || {
        nm.count("path:postlog/**") == 3
    })
    .await;

    // New mail is pushed and indexed.
    store(&s, vec![common::message(3, 1000)]).await;
    eventually("a pushed message is indexed", || {
        nm.tags(3) == set(&["inbox", "unread"])
    })
    .await;
    // A tag from B arrives in A's notmuch.
    cli(&["tag", "--profile", p(&b), "+from b", &hashes[0].to_hex()]);
    eventually("B's tag reaches A's notmuch", || {
        nm.tags(0).contains("from b")
    })
    .await;
    // A tag made in notmuch while the watch runs reaches B.
    nm.tag(&["+from a", "-inbox"], 1);
    eventually("A's notmuch tag reaches B", || {
        cli(&["sync", "--profile", p(&b)]);
        tags(&b, &hashes[1]) == set(&["from a", "unread"])
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status();
    assert!(watch.wait().unwrap().success(), "watch exits cleanly");
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    for (i, h) in hashes.iter().enumerate() {
        assert_eq!(nm.tags(i), tags(&b, h), "message {i}");
    }
    s.server.terminate();
}
