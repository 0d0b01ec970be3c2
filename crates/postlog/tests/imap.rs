//! `postlog import imap` against a real Dovecot on loopback (started here, with its own
//! config, users, Maildir and a certificate from a private CA) and a real Postlog server:
//! flags, keywords and folders become tags, a message in two folders gets both folder tags,
//! a second run copies nothing, new mail is picked up by the next run, and wrong passwords,
//! untrusted certificates and closed ports fail clearly without losing the checkpoint.
//!
//! Needs Dovecot (`apt-get install dovecot-imapd`, which `.ci/run` does) and root: Dovecot's
//! mail processes switch to its own `dovecot` user.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postlog_proto::BlobHash;

/// A private Dovecot: IMAP (STARTTLS) and IMAPS on free loopback ports, one user `ann`.
struct Dovecot {
    child: Child,
    imap: u16,
    imaps: u16,
}

const PASSWORD: &str = "correct horse";

impl Dovecot {
    fn start(dir: &Path, cert_pem: &str, key_pem: &str) -> Dovecot {
        let found = Command::new("sh")
            .args(["-c", "command -v dovecot"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "dovecot is not installed; this test needs a real IMAP server: \
             apt-get install -y dovecot-imapd (.ci/run installs it)"
        );
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test runs Dovecot, which must start as root (it switches to its own users)"
        );
        std::fs::write(dir.join("cert.pem"), cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), key_pem).unwrap();
        std::fs::write(
            dir.join("users"),
            format!("ann:{{PLAIN}}{PASSWORD}::::::\n"),
        )
        .unwrap();
        for d in ["run", "state"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (imap, imaps) = (common::free_tcp_port(), common::free_tcp_port());
        let d = dir.display();
        let conf = format!(
            "base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
auth_mechanisms = plain login
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={d}/home
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
}}
"
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dovecot");
        let dovecot = Dovecot { child, imap, imaps };
        // Ready when both listeners accept.
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in [imap, imaps] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "Dovecot did not start listening; its log:\n{}",
                    std::fs::read_to_string(dir.join("dovecot.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        dovecot
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM: the master stops its login, auth and imap processes too.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Writes a message into a Dovecot Maildir folder (`""` = INBOX, else `.Name`) the way an
/// MDA does (tmp/, then rename), with Maildir flags and keyword letters (`a` = keyword 0 of
/// the folder's dovecot-keywords). `flags = None` puts it in new/.
fn deliver(maildir: &Path, folder: &str, name: &str, bytes: &[u8], flags: Option<&str>) {
    let dir = if folder.is_empty() {
        maildir.to_owned()
    } else {
        maildir.join(format!(".{folder}"))
    };
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let tmp = dir.join("tmp").join(name);
    std::fs::write(&tmp, bytes).unwrap();
    let dest = match flags {
        None => dir.join("new").join(name),
        Some(f) => dir.join("cur").join(format!("{name}:2,{f}")),
    };
    std::fs::rename(&tmp, dest).unwrap();
}

fn chown_dovecot(path: &Path) {
    let ok = Command::new("chown")
        .args(["-R", "dovecot:dovecot"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown dovecot {}", path.display());
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = common::run_cli(args, &[]);
    (status.success(), out, err)
}

fn tags_of(
    profile: &Path,
    hashes: &BTreeMap<&str, BlobHash>,
) -> BTreeMap<String, BTreeSet<String>> {
    let (ok, out, err) = cli(&["sync", "--profile", profile.to_str().unwrap(), "-q"]);
    assert!(ok, "sync: {err}");
    let mut args = vec!["tag", "--profile", profile.to_str().unwrap()];
    let hex: Vec<String> = hashes.values().map(|h| h.to_string()).collect();
    args.extend(hex.iter().map(String::as_str));
    let (ok, out2, err) = cli(&args);
    assert!(ok, "tag: {err} {out}");
    let by_hash: BTreeMap<String, BTreeSet<String>> = out2
        .lines()
        .map(|l| {
            let (h, tags) = l.split_once('\t').unwrap_or((l, ""));
            (
                h.to_string(),
                tags.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect();
    hashes
        .iter()
        .map(|(name, h)| {
            (
                name.to_string(),
                by_hash.get(&h.to_string()).cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn set(tags: &[&str]) -> BTreeSet<String> {
    tags.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_dovecot_with_tags_resume_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Dovecot's mail processes (user dovecot) must reach the Maildir below this directory.
    Command::new("chmod").arg("755").arg(dir).status().unwrap();
    let (ca_pem, cert_pem, key_pem) = common::private_ca();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca = ca_file.to_str().unwrap();

    // The source account: five folders (one named in modified UTF-7), flags and keywords,
    // one message in two folders, and a bulk folder larger than one UID batch.
    let dv_dir = dir.join("dovecot");
    std::fs::create_dir_all(&dv_dir).unwrap();
    let md = dv_dir.join("home/Maildir");
    let m = |i: usize, size: usize| common::message(i, size);
    let mut hashes: BTreeMap<&str, BlobHash> = BTreeMap::new();
    let mut put = |key: &'static str, folder: &str, bytes: Vec<u8>, flags: Option<&str>| {
        deliver(&md, folder, key, &bytes, flags);
        hashes.insert(key, BlobHash::of(&bytes));
    };
    put("unseen", "", m(0, 2000), None);
    put("seen", "", m(1, 2000), Some("S"));
    put("flagged", "", m(2, 300_000), Some("FSa"));
    put("replied", "", m(3, 2000), Some("RSb"));
    put("draft", "", m(4, 2000), Some("DST"));
    put("both", "", m(5, 4000), Some("S"));
    deliver(&md, "Archive", "both-copy", &m(5, 4000), Some("S"));
    put("archived", "Archive", m(6, 2000), Some("S"));
    put("archived-unread", "Archive", m(7, 2000), Some(""));
    put("list", "Lists.rust", m(8, 2000), Some("S"));
    // A folder name in IMAP's modified UTF-7, as Dovecot keeps it on disk and lists it.
    put("umlaut", "Entw&APw-rfe", m(10, 2000), Some("DS"));
    std::fs::write(md.join("dovecot-keywords"), "0 $Important\n1 work\n").unwrap();
    let mut bulk = BTreeSet::new();
    for i in 0..600 {
        let b = m(1000 + i, 800 + i * 13);
        bulk.insert(BlobHash::of(&b));
        deliver(&md, "Bulk", &format!("bulk{i}"), &b, Some("S"));
    }
    chown_dovecot(&dv_dir.join("home"));
    let dovecot = Dovecot::start(&dv_dir, &cert_pem, &key_pem);

    let server = common::InProcess::start(&dir.join("data")).await;
    let url = server.account("ann");
    let (importer, reader) = (dir.join("importer"), dir.join("reader"));
    for p in [&importer, &reader] {
        let (ok, _, err) = cli(&["login", &url.to_url(), "--profile", p.to_str().unwrap()]);
        assert!(ok, "login: {err}");
    }
    let pw = dir.join("imap-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let (imaps, imap) = (dovecot.imaps.to_string(), dovecot.imap.to_string());
    let import_args = |profile: &Path, port: &str, tls: &str, pw: &Path, extra: &[&str]| {
        let mut args: Vec<String> = [
            "import",
            "imap",
            "--profile",
            profile.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--user",
            "ann",
            "--tls",
            tls,
            "--password-file",
            pw.to_str().unwrap(),
            "--folder-tag",
            "Lists.rust=rust",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let import = |port: &str, tls: &str, pw: &Path, extra: &[&str]| {
        let args = import_args(&importer, port, tls, pw, extra);
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // 1. First run, implicit TLS verified against the private CA.
    let (ok, out, err) = import(&imaps, "implicit", &pw, &["--ca-file", ca]);
    assert!(ok, "first import: {err}");
    assert!(
        out.starts_with("611 new in 5 folders, 610 stored, 1 already there (1 tagged), 0 skipped"),
        "{out}"
    );
    let want: BTreeMap<String, BTreeSet<String>> = [
        ("unseen", set(&["inbox", "unread"])),
        ("seen", set(&["inbox"])),
        ("flagged", set(&["inbox", "flagged", "$Important"])),
        ("replied", set(&["inbox", "replied", "work"])),
        ("draft", set(&["inbox", "draft", "deleted"])),
        ("both", set(&["inbox", "Archive"])),
        ("archived", set(&["Archive"])),
        ("archived-unread", set(&["Archive", "unread"])),
        ("list", set(&["rust"])),
        ("umlaut", set(&["Entwürfe", "draft"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(tags_of(&reader, &hashes), want);
    // Every message arrived, bytes intact (the reader's Maildir names are their hashes).
    let mut on_disk = BTreeSet::new();
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(reader.join("mail").join(sub)).unwrap() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let h = BlobHash::of(&bytes);
            assert!(e.file_name().to_string_lossy().starts_with(&h.to_string()));
            on_disk.insert(h);
        }
    }
    let mut all: BTreeSet<BlobHash> = hashes.values().copied().collect();
    all.extend(&bulk);
    assert_eq!(on_disk, all);
    // The source is unchanged: the unseen message did not become \Seen.
    let unseen_names: Vec<String> = ["new", "cur"]
        .iter()
        .flat_map(|s| std::fs::read_dir(md.join(s)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("unseen"))
        .collect();
    assert_eq!(unseen_names.len(), 1);
    assert!(!unseen_names[0].contains(":2,S"), "{unseen_names:?}");

    // 2. Second run, over STARTTLS: nothing new, nothing sent.
    let (ok, out, err) = import(&imap, "starttls", &pw, &["--ca-file", ca]);
    assert!(ok, "second import: {err}");
    assert!(
        out.starts_with("0 new in 5 folders, 0 stored, 0 already there"),
        "{out}"
    );
    let (ok, out, _) = cli(&["sync", "--profile", reader.to_str().unwrap()]);
    assert!(
        ok && out.starts_with("0 new messages, 0.0 MB, 0 records"),
        "{out}"
    );

    // 3. New mail in Dovecot: a new message in INBOX, and an old one filed into another
    //    folder too. The next run copies the first and adds the folder tag to the second.
    let fresh = m(9, 3000);
    deliver(&md, "", "fresh", &fresh, None);
    deliver(&md, "Lists.rust", "archived-copy", &m(6, 2000), Some("S"));
    chown_dovecot(&md);
    hashes.insert("fresh", BlobHash::of(&fresh));
    let (ok, out, err) = import(&imaps, "implicit", &pw, &["--ca-file", ca]);
    assert!(ok, "third import: {err}");
    assert!(
        out.starts_with("2 new in 5 folders, 1 stored, 1 already there (1 tagged), 0 skipped"),
        "{out}"
    );
    let mut want = want;
    want.insert("fresh".into(), set(&["inbox", "unread"]));
    want.insert("archived".into(), set(&["Archive", "rust"]));
    assert_eq!(tags_of(&reader, &hashes), want);

    // 4. A folder whose UIDVALIDITY changed (here: the checkpoint says another one) is read
    //    again from the start; Store is idempotent, and the importer remembers which tags
    //    it gave each message, so nothing at all is appended.
    let db = rusqlite::Connection::open(importer.join("state.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE imap_folders SET uidvalidity = uidvalidity + 1 WHERE folder = 'Archive'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let (ok, out, err) = import(&imaps, "implicit", &pw, &["--ca-file", ca]);
    assert!(ok, "import after a UIDVALIDITY change: {err}");
    assert!(
        out.starts_with("3 new in 5 folders, 0 stored, 3 already there (0 tagged)"),
        "{out}"
    );
    assert!(err.contains("Archive: UIDVALIDITY changed"), "{err}");
    let (ok, out, _) = cli(&["sync", "--profile", reader.to_str().unwrap()]);
    assert!(
        ok && out.starts_with("0 new messages, 0.0 MB, 0 records"),
        "{out}"
    );

    // 5. Failures are clear and lose nothing: wrong password, untrusted certificate, a
    //    closed port, plaintext without the explicit flag, an unknown folder.
    let bad = dir.join("bad-password");
    std::fs::write(&bad, "wrong\n").unwrap();
    let (ok, _, err) = import(&imaps, "implicit", &bad, &["--ca-file", ca]);
    assert!(!ok && err.contains("refused the login for ann"), "{err}");
    let (ok, _, err) = import(&imaps, "implicit", &pw, &[]);
    assert!(
        !ok && err.contains("TLS") && err.contains("--ca-file"),
        "{err}"
    );
    let closed = common::free_tcp_port().to_string();
    let (ok, _, err) = import(&closed, "implicit", &pw, &["--ca-file", ca]);
    assert!(!ok && err.contains("cannot reach the IMAP server"), "{err}");
    let (ok, _, err) = import(&imap, "plain", &pw, &[]);
    assert!(!ok && err.contains("--insecure-plaintext"), "{err}");
    let (ok, _, err) = import(
        &imaps,
        "implicit",
        &pw,
        &["--ca-file", ca, "--folder", "Nope"],
    );
    assert!(
        !ok && err.contains("no folder \"Nope\"") && err.contains("Lists.rust"),
        "{err}"
    );
    let (ok, out, err) = import(
        &imap,
        "starttls",
        &pw,
        &["--ca-file", ca, "--folder", "INBOX"],
    );
    assert!(ok, "after the failures: {err}");
    assert!(out.starts_with("0 new in 1 folders, 0 stored"), "{out}");
    let (ok, out, _) = cli(&["sync", "--profile", reader.to_str().unwrap()]);
    assert!(
        ok && out.starts_with("0 new messages, 0.0 MB, 0 records"),
        "{out}"
    );

    // 6. SIGKILL mid-import, into another account: the next run completes it, and every
    //    message is there once, with its tags.
    let bob = server.account("bob");
    let (importer2, reader2) = (dir.join("importer2"), dir.join("reader2"));
    for p in [&importer2, &reader2] {
        let url = server.account("bob");
        let (ok, _, err) = cli(&["login", &url.to_url(), "--profile", p.to_str().unwrap()]);
        assert!(ok, "login: {err}");
    }
    let args = import_args(&importer2, &imaps, "implicit", &pw, &["--ca-file", ca]);
    let mut child = Command::new(common::bin())
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = postlog_client::Endpoint::new(&bob.fingerprint).unwrap();
    let conn = common::connect_retry(&endpoint, &bob).await;
    // Kill it once the server holds part of the mail (or when it already finished).
    loop {
        if conn.head().await.unwrap() >= 200 || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = child.kill();
    child.wait().unwrap();
    let killed_at = conn.head().await.unwrap();
    conn.close();
    let (ok, out, err) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        ok,
        "import after SIGKILL (killed at head {killed_at}): {err}"
    );
    assert!(out.contains(" stored, "), "{out}");
    eprintln!("SIGKILL at head {killed_at}; then: {out}");
    assert_eq!(tags_of(&reader2, &hashes), want);
    let (mut on_disk, mut files) = (BTreeSet::new(), 0);
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(reader2.join("mail").join(sub)).unwrap() {
            on_disk.insert(BlobHash::of(&std::fs::read(e.unwrap().path()).unwrap()));
            files += 1;
        }
    }
    all.insert(BlobHash::of(&fresh));
    assert_eq!(on_disk, all);
    assert_eq!(files, all.len(), "one file per message");
    server.stop().await;
    drop(dovecot);
}
