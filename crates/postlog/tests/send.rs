//! Sending end to end: `postlog sendmail` (also through a link named `sendmail`) -> the
//! server's Send -> its durable relay queue -> a real SMTP relay (aiosmtpd, Debian's
//! python3-aiosmtpd, tests/support/smtp_relay.py) on loopback, with STARTTLS (a private CA
//! in `ca_file`) and AUTH. Retries after 4xx and after
//! the relay was down, a bounce for a 5xx recipient, the offline outbox, and kill -9 of the
//! server while the queue holds mail. Every device sees what was sent, and its state.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postlog_client::LoginUrl;
use postlog_proto::BlobHash;

const PYTHON: &str = "/usr/bin/python3";

/// The test relay as a child process: STARTTLS with a certificate from a private CA, then
/// AUTH, as a provider's submission port.
struct Relay {
    port: u16,
    out: PathBuf,
    control: PathBuf,
    /// (certificate, key) files; the CA's PEM is `ca`.
    tls: (PathBuf, PathBuf),
    ca: PathBuf,
    child: Option<Child>,
}

const RELAY_USER: &str = "ann@example.org";
const RELAY_PASSWORD: &str = "s3cret+:/x";

impl Relay {
    fn new(dir: &Path) -> Relay {
        let (ca, cert, key) = common::private_ca();
        let r = Relay {
            port: common::free_tcp_port(),
            out: dir.join("relay-out"),
            control: dir.join("relay-control.json"),
            tls: (dir.join("relay-cert.pem"), dir.join("relay-key.pem")),
            ca: dir.join("relay-ca.pem"),
            child: None,
        };
        std::fs::write(&r.tls.0, cert).unwrap();
        std::fs::write(&r.tls.1, key).unwrap();
        std::fs::write(&r.ca, ca).unwrap();
        r.set("{}");
        r
    }

    fn start(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_relay.py");
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(self.port.to_string())
            .arg(&self.out)
            .arg(&self.control)
            .arg(&self.tls.0)
            .arg(&self.tls.1)
            .args([RELAY_USER, RELAY_PASSWORD])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the test relay (needs /usr/bin/python3 with aiosmtpd: apt-get install python3-aiosmtpd)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the test relay did not start (is python3-aiosmtpd installed?)"
        );
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn set(&self, json: &str) {
        std::fs::write(&self.control, json).unwrap();
    }

    /// Every transaction the relay accepted: (MAIL FROM, RCPT TOs, data).
    fn received(&self) -> Vec<(String, Vec<String>, String)> {
        let Ok(dir) = std::fs::read_dir(&self.out) else {
            return Vec::new();
        };
        let mut names: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
                let mut parts = text.splitn(3, '\n');
                let from = parts.next().unwrap().to_string();
                let rcpts = parts
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .map(String::from)
                    .collect();
                (from, rcpts, parts.next().unwrap_or("").to_string())
            })
            .collect()
    }

    /// The transactions that carried the message with this Message-ID.
    fn copies_of(&self, id: &str) -> Vec<(String, Vec<String>, String)> {
        let needle = format!("Message-ID: <{id}>");
        self.received()
            .into_iter()
            .filter(|(_, _, d)| d.contains(&needle))
            .collect()
    }

    /// Waits until the message with this Message-ID was relayed; returns its copies.
    fn wait_for(&self, id: &str) -> Vec<(String, Vec<String>, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.copies_of(id);
            if !c.is_empty() {
                // A duplicate would arrive right behind the first copy: give it a moment.
                std::thread::sleep(Duration::from_millis(300));
                return self.copies_of(id);
            }
            assert!(Instant::now() < deadline, "{id} was never relayed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mail(id: &str, to: &str, extra: &str) -> Vec<u8> {
    format!(
        "From: Ann <ann@example.org>\nTo: {to}\n{extra}Subject: message {id}\n\
         Message-ID: <{id}>\nDate: Fri, 27 Nov 2026 12:00:00 +0000\n\nHello from {id}.\n"
    )
    .into_bytes()
}

/// Runs sendmail (`program` is the postlog binary or a link named sendmail) with `stdin`;
/// returns (exit code, stderr).
fn sendmail(
    program: &Path,
    pre: &[&str],
    args: &[&str],
    profile: &Path,
    stdin: &[u8],
) -> (i32, String) {
    let mut child = Command::new(program)
        .args(pre)
        .args(args)
        .env("POSTLOG_PROFILE", profile)
        .env("POSTLOG_CONNECT_TIMEOUT", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every message file of a Maildir: hash prefix of the name -> bytes.
fn maildir(mail: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["cur", "new"] {
        for e in std::fs::read_dir(mail.join(sub)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            out.insert(name[..64].to_string(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendmail_relays_retries_bounces_and_survives_kills() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut relay = Relay::new(dir.path());
    // smtp:// = STARTTLS required; the password needs percent-encoding in the URL.
    std::fs::write(
        data.join("postlog.toml"),
        format!(
            "[relay]\nurl = \"smtp://ann%40example.org:s3cret%2B%3A%2Fx@localhost:{}\"\n\
             ca_file = \"{}\"\nretry_initial = \"200ms\"\nretry_max = \"500ms\"\n",
            relay.port,
            relay.ca.display()
        ),
    )
    .unwrap();
    let fingerprint = common::fingerprint_of(&data);
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let login = |device: &str, addresses: &[String]| {
        let c = common::admin(&data)
            .add_device("ann", addresses, device)
            .unwrap();
        LoginUrl {
            account: c.account,
            server: addr.to_string(),
            device: c.device,
            secret: c.secret,
            fingerprint: fingerprint.clone(),
        }
    };
    let url_a = login("A", &["ann@example.org".into()]);
    let url_b = login("B", &[]);
    let mut server = common::ServerProcess::spawn(&data, addr);
    let (pa, pb) = (dir.path().join("A"), dir.path().join("B"));
    for (url, p) in [(&url_a, &pa), (&url_b, &pb)] {
        common::cli(&["login", &url.to_string(), "--profile", p.to_str().unwrap()]);
    }
    let postlog = Path::new(common::bin());
    let link = dir.path().join("bin/sendmail");
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(postlog, &link).unwrap();
    let mut sent: Vec<(&str, BlobHash)> = Vec::new();

    // 1. Through a link named sendmail, as a mail reader calls it (-t -oi, profile from
    // POSTLOG_PROFILE). The relay defers the first attempt (451): delivered once, after a
    // retry, to To + Cc + Bcc, without the Bcc field.
    relay.set(r#"{"tempfail": 1}"#);
    relay.start();
    let m1 = mail(
        "m1@example.org",
        "Bob <bob@example.net>",
        "Cc: cy@example.net\nBcc: dee@example.net\n",
    );
    let (code, err) = sendmail(&link, &[], &["-t", "-oi", "-oem"], &pa, &m1);
    assert_eq!(code, 0, "{err}");
    sent.push(("m1", BlobHash::of(&m1)));
    let copies = relay.wait_for("m1@example.org");
    assert_eq!(copies.len(), 1, "delivered exactly once");
    let (from, mut rcpts, data1) = copies[0].clone();
    rcpts.sort();
    assert_eq!(from, "ann@example.org");
    assert_eq!(
        rcpts,
        ["bob@example.net", "cy@example.net", "dee@example.net"]
    );
    assert!(
        !data1.contains("Bcc:") && !data1.contains("dee@"),
        "{data1}"
    );
    assert!(data1.contains("Subject: message m1@example.org\r\n"));

    // 2. One recipient refused for good: the others still get it; a bounce follows.
    relay.set(r#"{"reject": ["nobody@example.net"]}"#);
    let m2 = mail("m2@example.org", "bob@example.net, nobody@example.net", "");
    let (code, err) = sendmail(postlog, &["sendmail"], &["-t", "-i"], &pa, &m2);
    assert_eq!(code, 0, "{err}");
    sent.push(("m2", BlobHash::of(&m2)));
    let copies = relay.wait_for("m2@example.org");
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].1, ["bob@example.net"]);

    // 3. The relay is down when the message is sent, up later: delivered once.
    relay.stop();
    let m3 = mail("m3@example.org", "bob@example.net", "");
    let (code, err) = sendmail(postlog, &["sendmail"], &["-i", "bob@example.net"], &pa, &m3);
    assert_eq!(code, 0, "{err}");
    sent.push(("m3", BlobHash::of(&m3)));
    std::thread::sleep(Duration::from_millis(800)); // a few refused connection attempts
    relay.start();
    assert_eq!(relay.wait_for("m3@example.org").len(), 1);

    // 4. The server is unreachable: sendmail exits 0 with the message in the outbox; the
    // same message again keeps one entry; the next sync sends it, once.
    server.kill9();
    let m4 = mail("m4@example.org", "bob@example.net", "");
    for _ in 0..2 {
        let (code, err) = sendmail(postlog, &["sendmail"], &["-t", "-i"], &pa, &m4);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("queued"), "{err}");
    }
    sent.push(("m4", BlobHash::of(&m4)));
    let outbox: Vec<_> = std::fs::read_dir(pa.join("outbox"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(outbox.len(), 1);
    server = common::ServerProcess::spawn(&data, addr);
    common::connect_retry(
        &postlog_client::Endpoint::new(&fingerprint).unwrap(),
        &url_a,
    )
    .await
    .close();
    common::cli(&["sync", "-q", "--profile", pa.to_str().unwrap()]);
    assert!(
        !std::fs::read_dir(pa.join("outbox"))
            .unwrap()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "eml")),
        "the sync sent the outbox"
    );
    assert_eq!(relay.wait_for("m4@example.org").len(), 1);

    // 5. kill -9 while the queue holds mail (relay down): all delivered after restart.
    relay.stop();
    let queued: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let id = format!("q{i}@example.org");
            let m = mail(&id, "cy@example.net", "");
            (id, m)
        })
        .collect();
    for (_, m) in &queued {
        let (code, err) = sendmail(postlog, &["sendmail"], &["-t", "-i"], &pa, m);
        assert_eq!(code, 0, "{err}");
    }
    server.kill9();
    relay.start();
    server = common::ServerProcess::spawn(&data, addr);
    let (mut lost, mut dup) = (0, 0);
    for (id, _) in &queued {
        match relay.wait_for(id).len() {
            0 => lost += 1,
            1 => {}
            _ => dup += 1,
        }
    }
    println!("kill -9 with 5 queued: lost {lost}, duplicated {dup}");
    common::reliability(
        "send::sendmail_relays_retries_bounces_and_survives_kills",
        "kill -9 of the server while 5 sent messages wait in the relay queue; all relayed \
         after restart",
        1,
        queued.len() as u64,
        lost as u64,
        dup as u64,
        0,
    );
    assert_eq!((lost, dup), (0, 0));

    // 6. What the server refuses is refused with sysexits codes, and never queued.
    let forged = b"From: mallory@evil.example\nTo: bob@example.net\n\nhi\n";
    let (code, err) = sendmail(postlog, &["sendmail"], &["-t", "-i"], &pa, forged);
    assert_eq!(code, 77, "EX_NOPERM: {err}");
    assert!(err.contains("not an address of this account"), "{err}");
    let (code, err) = sendmail(
        postlog,
        &["sendmail"],
        &["-t", "-i"],
        &pa,
        b"\x00\x01 garbage",
    );
    assert_eq!(code, 65, "EX_DATAERR: {err}");
    let (code, err) = sendmail(postlog, &["sendmail"], &["-i"], &pa, &m1);
    assert_eq!(code, 64, "EX_USAGE without recipients: {err}");
    let (code, err) = sendmail(postlog, &["sendmail"], &["-i", "not an address"], &pa, &m1);
    assert_eq!(code, 65, "{err}");

    // 7. Device B sees every sent message (tagged sent, and how it ended) and the bounce.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        common::cli(&["sync", "-q", "--profile", pb.to_str().unwrap()]);
        let settled = queued
            .iter()
            .all(|(_, m)| common::tags(&pb, &BlobHash::of(m)).contains("delivered"));
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery tags never arrived on B"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let files = maildir(&pb.join("mail"));
    for (name, h) in &sent {
        assert!(files.contains_key(&h.to_hex()), "{name} is in B's Maildir");
        let tags = common::tags(&pb, h);
        assert!(tags.contains("sent"), "{name}: {tags:?}");
        assert!(!tags.contains("queued"), "{name}: {tags:?}");
        let end = if *name == "m2" {
            "bounced"
        } else {
            "delivered"
        };
        assert!(tags.contains(end), "{name}: {tags:?}");
    }
    assert_eq!(
        files.get(&sent[0].1.to_hex()).unwrap(),
        &m1,
        "the account's copy keeps its Bcc"
    );
    let bounces: Vec<_> = files
        .iter()
        .filter(|(_, b)| {
            String::from_utf8_lossy(b).contains("Final-Recipient: rfc822; nobody@example.net")
        })
        .collect();
    assert_eq!(
        bounces.len(),
        1,
        "one bounce, for the refused recipient only"
    );
    let bounce_hash: BlobHash = bounces[0].0.parse().unwrap();
    assert!(common::tags(&pb, &bounce_hash).contains("bounce"));
    let text = String::from_utf8_lossy(bounces[0].1);
    assert!(
        text.contains("multipart/report") && !text.contains("bob@example.net>:"),
        "{text}"
    );

    // 8. Deleting a sent message takes its Send record and queue rows with it: nothing of
    // it stays in the server's data directory, and verify passes.
    let h = sent[1].1;
    common::cli(&["delete", "--profile", pa.to_str().unwrap(), &h.to_hex()]);
    server.terminate();
    let hits = common::traces(&data, &[&h.0, h.to_hex().as_bytes()]);
    assert!(
        hits.is_empty(),
        "the deleted sent message left traces in {hits:?}"
    );
    let (status, out, err) = common::run_cli(&["verify", "--data", data.to_str().unwrap()], &[]);
    assert!(status.success(), "verify: {out}{err}");
}
