//! Tags end to end: two replicas with Maildirs over real QUIC. Flags changed by a mail
//! reader (file renames) on one replica reach the other; `postlog tag` works online and
//! offline; concurrent edits converge by the documented rule (add wins).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{cli, file_of, p, set, tags};

use postlog_proto::BlobHash;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maildir_flags_and_tag_command_converge_across_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let fp = common::fingerprint_of(&data);
    let url = common::account_on(&data, addr, &fp, "ann");
    // Each replica is its own device (its own credentials and operation numbers).
    let url_b = common::account_on(&data, addr, &fp, "ann");
    let mut server = common::ServerProcess::spawn(&data, addr);
    let conn = common::connect_retry(&postlog_client::Endpoint::new(&fp).unwrap(), &url).await;
    let mut hashes = Vec::new();
    for i in 0..10 {
        let m = common::message(i, 3000);
        conn.store(&m, &["inbox".into(), "unread".into()])
            .await
            .unwrap();
        hashes.push(BlobHash::of(&m));
    }
    conn.close();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (prof, u) in [(&a, &url), (&b, &url_b)] {
        cli(&["login", &u.to_url(), "--profile", p(prof)]);
        cli(&["sync", "--profile", p(prof)]);
    }
    let (ma, mb) = (a.join("mail"), b.join("mail"));
    let h0 = hashes[0];
    assert_eq!(file_of(&mb, &h0), ("new".into(), h0.to_hex()));
    assert_eq!(tags(&b, &h0), set(&["inbox", "unread"]));

    // A mail reader on B reads and flags message 0: the rename becomes a Tag on sync...
    std::fs::rename(
        mb.join("new").join(h0.to_hex()),
        mb.join("cur").join(format!("{h0}:2,FS")),
    )
    .unwrap();
    cli(&["sync", "--profile", p(&b)]);
    assert_eq!(tags(&b, &h0), set(&["flagged", "inbox"]));
    // ...and A's file is renamed to the same flags by its next sync.
    cli(&["sync", "--profile", p(&a)]);
    assert_eq!(file_of(&ma, &h0), ("cur".into(), format!("{h0}:2,FS")));
    assert_eq!(tags(&a, &h0), set(&["flagged", "inbox"]));

    // `postlog tag` online, with tags that have spaces and non-ASCII.
    let h1 = hashes[1];
    let out = cli(&[
        "tag",
        "--profile",
        p(&a),
        "+to read later",
        "+caf\u{e9}",
        "-unread",
        &h1.to_hex(),
    ]);
    assert!(out.is_empty(), "{out}");
    assert_eq!(tags(&a, &h1), set(&["caf\u{e9}", "inbox", "to read later"]));
    assert_eq!(file_of(&ma, &h1), ("cur".into(), format!("{h1}:2,S")));
    cli(&["sync", "--profile", p(&b)]);
    assert_eq!(tags(&b, &h1), set(&["caf\u{e9}", "inbox", "to read later"]));
    assert_eq!(file_of(&mb, &h1), ("cur".into(), format!("{h1}:2,S")));

    // Both offline, editing the same messages.
    cli(&["tag", "--profile", p(&a), "+todo", &hashes[2].to_hex()]);
    cli(&["sync", "--profile", p(&b)]);
    server.kill9();
    let h2 = hashes[2];
    let h3 = hashes[3];
    // Message 2: A adds `todo` again while B removes the `todo` it has seen: add wins.
    let out = cli(&["tag", "--profile", p(&a), "+todo", &h2.to_hex()]);
    assert!(out.contains("queued"), "{out}");
    cli(&["tag", "--profile", p(&b), "-todo", &h2.to_hex()]);
    // Message 3: A reads it in its mail reader; B flags it (still unread there).
    std::fs::rename(
        ma.join("new").join(h3.to_hex()),
        ma.join("cur").join(format!("{h3}:2,S")),
    )
    .unwrap();
    std::fs::rename(
        mb.join("new").join(h3.to_hex()),
        mb.join("cur").join(format!("{h3}:2,F")),
    )
    .unwrap();
    server = common::ServerProcess::spawn(&data, addr);
    common::connect_retry(&postlog_client::Endpoint::new(&fp).unwrap(), &url)
        .await
        .close();
    cli(&["sync", "--profile", p(&a)]);
    cli(&["sync", "--profile", p(&b)]);
    cli(&["sync", "--profile", p(&a)]);
    for h in &hashes {
        assert_eq!(tags(&a, h), tags(&b, h), "replicas agree on {h}");
        assert_eq!(
            file_of(&ma, h).1.split_once(":2,").map(|x| x.1.to_string()),
            file_of(&mb, h).1.split_once(":2,").map(|x| x.1.to_string())
        );
    }
    assert!(
        tags(&a, &h2).contains("todo"),
        "a concurrent add wins over a remove"
    );
    assert_eq!(tags(&a, &h3), set(&["flagged", "inbox"]));
    assert_eq!(file_of(&mb, &h3), ("cur".into(), format!("{h3}:2,FS")));
    // A no-change sync now does nothing and queues nothing.
    let out = cli(&["sync", "--profile", p(&b)]);
    assert!(
        out.starts_with("0 new messages, 0.0 MB, 0 records"),
        "{out}"
    );
    server.terminate();
}
