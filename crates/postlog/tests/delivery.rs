//! Mail in, end to end: the LMTP and SMTP listeners driven by a real client (Python's
//! smtplib) and by raw sockets, `postlog deliver`, SIGKILL during a stream of LMTP
//! deliveries, and push to a watching client's Maildir.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postlog_proto::Record;
use postlog_server::StartOptions;
use rand::{Rng, SeedableRng};

/// The message size limit the tests configure.
const LIMIT: u64 = 100_000;

fn add_account(data: &Path, name: &str, addresses: &[&str]) {
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    common::admin(data)
        .add_device(name, &addresses, "test")
        .unwrap();
}

fn write_config(data: &Path, extra: &str) {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(
        data.join("postlog.toml"),
        format!("max_message_size = {LIMIT}\n{extra}"),
    )
    .unwrap();
    common::prepare_data(data);
}

/// Every message of an account, read from a stopped server's data directory:
/// (Store record tags, bytes).
fn messages(data: &Path, account: &str) -> Vec<(Vec<String>, Vec<u8>)> {
    let config = postlog_server::ServerConfig::load_or_init(data).unwrap();
    let storage = postlog_server::storage::Storage::open(data, &config).unwrap();
    let store = storage.backend();
    let id = store.account_by_name(account).unwrap().unwrap();
    let mut out = Vec::new();
    for e in store.read_log(id, 0, 100_000).unwrap() {
        if let Record::Store { hash, tags, .. } = e.record {
            out.push((tags, store.read_blob(id, &hash).unwrap().unwrap()));
        }
    }
    out
}

fn message_id(m: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(m);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let end = text[start..].find('>')? + start;
    Some(text[start..end].to_string())
}

fn contains(m: &[u8], needle: &str) -> bool {
    m.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A raw SMTP/LMTP connection that reads replies line by line.
struct Raw {
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> std::io::Result<Raw> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        Ok(Raw {
            r: BufReader::new(s),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.r.get_mut().write_all(bytes)
    }

    /// The next reply's code (multi-line replies read whole).
    fn reply(&mut self) -> std::io::Result<u16> {
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("bad reply {line:?}")));
            }
        }
    }

    fn replies(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.reply().unwrap()).collect()
    }
}

fn mail(id: &str, body_len: usize) -> String {
    let mut m = format!(
        "From: Sender <sender@remote.test>\r\nTo: ann@example.org\r\nSubject: {id}\r\n\
         Message-ID: <{id}>\r\n\r\n"
    );
    while m.len() < body_len {
        m.push_str("A line of body text, long enough to look like mail.\r\n");
    }
    m
}

const SMTPLIB_SCRIPT: &str = r#"
import smtplib, ssl, sys
lmtp_port, smtp_port, sock = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
LIMIT = int(sys.argv[4])

def msg(mid, n=300):
    body = "Body line for a message sent by Python smtplib.\r\n" * (n // 40 + 1)
    return ("From: py@remote.test\r\nTo: ann@example.org\r\nSubject: %s\r\n"
            "Message-ID: <%s>\r\n\r\n%s" % (mid, mid, body))

# LMTP, three recipients, one unknown: per-recipient replies after DATA.
l = smtplib.LMTP("127.0.0.1", lmtp_port)
code, _ = l.ehlo("python.test")          # LMTP sends LHLO
assert code == 250, code
assert l.has_extn("pipelining")
assert l.mail("py@remote.test")[0] == 250
print("lmtp rcpt", l.rcpt("ann@example.org")[0], l.rcpt("nobody@example.org")[0],
      l.rcpt("BOB+lists@Example.org")[0])
first = l.data(msg("lmtp-multi@test").encode())[0]
second = l.getreply()[0]
print("lmtp data", first, second)
l.quit()

# LMTP over the Unix socket.
u = smtplib.LMTP(sock)
print("unix refused", u.sendmail("py@remote.test", ["ann@example.org"], msg("lmtp-unix@test")))
u.quit()

# SMTP with STARTTLS (self-signed certificate: no verification).
s = smtplib.SMTP("127.0.0.1", smtp_port)
s.ehlo("python.test")
assert s.has_extn("starttls") and s.has_extn("pipelining") and s.has_extn("size")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
print("starttls", s.starttls(context=ctx)[0], s.sock.version())
s.ehlo("python.test")
assert not s.has_extn("starttls")
print("tls refused", s.sendmail("py@remote.test", ["ann@example.org"], msg("smtp-tls@test")))

# Oversize: announced with SIZE (refused at MAIL), then unannounced (refused after DATA).
big = msg("too-big@test", LIMIT + 10)
try:
    s.sendmail("py@remote.test", ["ann@example.org"], big)
    print("size-announced accepted")
except smtplib.SMTPSenderRefused as e:
    print("size-announced", e.smtp_code)
s.rset()
assert s.mail("py@remote.test")[0] == 250
assert s.rcpt("ann@example.org")[0] == 250
print("size-unannounced", s.data(big.encode())[0])
# The session goes on after the 552.
print("after", s.sendmail("py@remote.test", ["ann@example.org"], msg("smtp-after@test")))
s.quit()
"#;

/// LMTP (TCP and Unix socket) and SMTP (STARTTLS) against Python's smtplib; pipelining
/// and SMTP smuggling over raw sockets; `postlog deliver` against a running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_with_real_and_raw_clients() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_config(&data, "[delivery]\nmax_connections_per_ip = 3\n");
    add_account(&data, "ann", &["Ann@Example.org"]);
    add_account(&data, "bob", &["bob@example.org", "@bob.test"]);
    let sock = data.join("lmtp.sock");
    let (server, lmtp, smtp) = common::InProcess::start_with(
        &data,
        StartOptions {
            lmtp: Some("127.0.0.1:0".parse().unwrap()),
            lmtp_unix: Some(sock.clone()),
            smtp: Some("127.0.0.1:0".parse().unwrap()),
            ..StartOptions::default()
        },
    )
    .await;
    let (lmtp, smtp) = (lmtp.unwrap(), smtp.unwrap());

    // The per-address connection limit (3 here): the 4th connection gets a 421.
    let mut held: Vec<Raw> = (0..3).map(|_| Raw::connect(lmtp).unwrap()).collect();
    assert_eq!(
        held.iter_mut()
            .map(|c| c.reply().unwrap())
            .collect::<Vec<_>>(),
        [220; 3]
    );
    assert_eq!(Raw::connect(smtp).unwrap().reply().unwrap(), 421);
    for c in &mut held {
        c.send(b"QUIT\r\n").unwrap();
        assert_eq!(c.reply().unwrap(), 221);
        let mut rest = Vec::new();
        c.r.read_to_end(&mut rest).unwrap();
    }
    drop(held);
    // Slots are freed as the sessions end, a moment after the client sees EOF.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Raw::connect(lmtp).unwrap().reply().unwrap() != 220 {
        assert!(Instant::now() < deadline, "connection slots were not freed");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Python's smtplib: a real client, in a blocking thread.
    let script = dir.path().join("smtplib_test.py");
    std::fs::write(&script, SMTPLIB_SCRIPT).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .args([
            lmtp.port().to_string(),
            smtp.port().to_string(),
            sock.display().to_string(),
            LIMIT.to_string(),
        ])
        .output()
        .expect("python3 runs (the tests need it: .ci/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("smtplib:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the smtplib script failed");
    for want in [
        "lmtp rcpt 250 550 250",
        "lmtp data 250 250",
        "unix refused {}",
        "starttls 220 TLSv1.3",
        "tls refused {}",
        "size-announced 552",
        "size-unannounced 552",
        "after {}",
    ] {
        assert!(stdout.lines().any(|l| l == want), "missing {want:?}");
    }

    // Pipelining: the whole transaction in one write, replies in order.
    let mut c = Raw::connect(lmtp).unwrap();
    c.send(
        b"LHLO raw.test\r\nMAIL FROM:<raw@remote.test>\r\nRCPT TO:<ann@example.org>\r\n\
RCPT TO:<nobody@example.org>\r\nRCPT TO:<anyone@bob.test>\r\nDATA\r\n",
    )
    .unwrap();
    assert_eq!(c.replies(7), [220, 250, 250, 250, 550, 250, 354]);
    let mut m = mail("pipelined@test", 2000).into_bytes();
    m.extend_from_slice(b".\r\nQUIT\r\n");
    c.send(&m).unwrap();
    assert_eq!(c.replies(3), [250, 250, 221]);

    // SMTP smuggling: a bare-LF dot never ends DATA; the "second message" after it is
    // message text, and the whole message is refused at the real end.
    let mut c = Raw::connect(smtp).unwrap();
    c.send(
        b"EHLO raw.test\r\nMAIL FROM:<raw@remote.test>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n",
    )
    .unwrap();
    assert_eq!(c.replies(5), [220, 250, 250, 250, 354]);
    c.send(
        b"Subject: first\r\nMessage-ID: <smuggle-carrier@test>\r\n\r\nhello\n.\n\
MAIL FROM:<evil@remote.test>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n\
Subject: smuggled\r\nMessage-ID: <smuggled@test>\r\n\r\nevil\r\n",
    )
    .unwrap();
    // Nothing ended yet: NOOP would be message text too. The real end:
    c.send(b".\r\nNOOP\r\nQUIT\r\n").unwrap();
    assert_eq!(c.replies(3), [554, 250, 221]);

    // `postlog deliver` while the server runs: through LMTP when it knows where.
    let deliver = |extra: &[&str], input: &str| {
        let mut cmd = Command::new(common::bin());
        cmd.args([
            "deliver",
            "--data",
            data.to_str().unwrap(),
            "--account",
            "ann",
        ])
        .args(extra)
        .env("POSTLOG_DELIVER_WAIT_MS", "300")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let lf = "From sender@remote.test Fri Nov 27 12:00:00 2026\nSubject: lf\nMessage-ID: \
              <deliver-lmtp@test>\n\n.leading dot\nbody\n";
    let (code, err) = deliver(&[], lf);
    if common::on_postgres() {
        // PostgreSQL + S3 has no directory lock: deliver stores directly beside the running
        // server (as another node would).
        assert_eq!(code, Some(0), "stored directly ({err})");
    } else {
        assert_eq!(
            code,
            Some(75),
            "no LMTP in postlog.toml: EX_TEMPFAIL ({err})"
        );
        assert!(err.contains("without an LMTP listener"), "{err}");
    }
    let (code, err) = deliver(&["--lmtp", &lmtp.to_string()], lf);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = deliver(&["--lmtp", sock.to_str().unwrap()], "\u{0}\u{1} garbage");
    assert_eq!(code, Some(65), "{err}");

    server.stop().await;
    let ann = messages(&data, "ann");
    let bob = messages(&data, "bob");
    let ids = |ms: &[(Vec<String>, Vec<u8>)]| -> HashSet<String> {
        ms.iter().filter_map(|(_, m)| message_id(m)).collect()
    };
    let want_ann: HashSet<String> = [
        "lmtp-multi@test",
        "lmtp-unix@test",
        "smtp-tls@test",
        "smtp-after@test",
        "pipelined@test",
        "deliver-lmtp@test",
    ]
    .map(String::from)
    .into();
    assert_eq!(ids(&ann), want_ann);
    assert_eq!(
        ids(&bob),
        ["lmtp-multi@test", "pipelined@test"]
            .map(String::from)
            .into()
    );
    for (tags, m) in ann.iter().chain(&bob) {
        assert_eq!(tags, &["inbox", "unread"], "initial tags");
        assert!(
            m.starts_with(b"Return-Path: <"),
            "{}",
            String::from_utf8_lossy(m)
        );
        assert!(contains(m, "\r\nReceived: from "), "a Received field");
        assert!(!contains(m, "smuggled"), "smuggled text stored");
    }
    let tls = &ann
        .iter()
        .find(|(_, m)| contains(m, "smtp-tls@test"))
        .unwrap()
        .1;
    assert!(
        contains(tls, "with ESMTPS"),
        "{}",
        String::from_utf8_lossy(tls)
    );
    // Multi-recipient: identical bytes (one Received, no per-recipient "for").
    let multi = |ms: &[(Vec<String>, Vec<u8>)]| {
        ms.iter()
            .find(|(_, m)| contains(m, "lmtp-multi@test"))
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(multi(&ann), multi(&bob));
    // deliver: mbox postmark gone, CRLF, the leading dot kept exactly.
    let d = &ann
        .iter()
        .find(|(_, m)| contains(m, "deliver-lmtp@test"))
        .unwrap()
        .1;
    assert!(!contains(d, "From sender@"));
    assert!(contains(d, "\r\n\r\n.leading dot\r\nbody\r\n"));
    assert!(!d.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    assert!(!sock.exists(), "the socket is removed on shutdown");
}

/// SIGKILL the server binary again and again during a stream of LMTP deliveries from
/// several senders: every message that got its 250 is stored after the restart.
/// Then `postlog deliver` without a server: direct, with its exit codes.
#[test]
fn sigkill_during_lmtp_deliveries_loses_nothing_acknowledged() {
    const SENDERS: usize = 4;
    const KILLS: usize = 6;
    let seed: u64 = std::env::var("POSTLOG_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    println!("seed {seed} (set POSTLOG_CRASH_SEED to reproduce another run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lmtp: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    write_config(&data, &format!("[lmtp]\nlisten = \"{lmtp}\"\n"));
    add_account(&data, "ann", &["ann@example.org"]);
    let quic: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut server = common::ServerProcess::spawn(&data, quic);

    let attempted = Arc::new(AtomicU64::new(0));
    let acked: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|w| {
            let (attempted, acked, stop) = (attempted.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn: Option<Raw> = None;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Raw::connect(lmtp).and_then(|mut c| {
                            c.reply()?;
                            c.send(b"LHLO sender.test\r\n")?;
                            c.reply()?;
                            Ok(c)
                        }) {
                            Ok(c) => conn.insert(c),
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        },
                    };
                    let id = format!("crash-{w}-{i}@test");
                    i += 1;
                    attempted.fetch_add(1, Ordering::Relaxed);
                    let sent = Instant::now();
                    let mut bytes = format!(
                        "MAIL FROM:<s{w}@remote.test>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n"
                    )
                    .into_bytes();
                    let ok = c.send(&bytes).is_ok()
                        && matches!(c.reply(), Ok(250))
                        && matches!(c.reply(), Ok(250))
                        && matches!(c.reply(), Ok(354));
                    bytes = mail(&id, 500 + (i * 997) % 20_000).into_bytes();
                    bytes.extend_from_slice(b".\r\n");
                    if ok && c.send(&bytes).is_ok() && matches!(c.reply(), Ok(250)) {
                        acked.lock().unwrap().insert(id, sent.elapsed());
                    } else {
                        conn = None;
                    }
                }
            })
        })
        .collect();
    let mut kills = 0;
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..450)));
        server.kill9();
        kills += 1;
        server = common::ServerProcess::spawn(&data, quic);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let elapsed = started.elapsed();
    assert!(server.terminate().success());

    let acked = acked.lock().unwrap().clone();
    let stored: Vec<String> = messages(&data, "ann")
        .iter()
        .filter_map(|(_, m)| message_id(m))
        .collect();
    let present: HashSet<&String> = stored.iter().collect();
    let lost = acked.keys().filter(|id| !present.contains(id)).count();
    let duplicates = stored.len() - present.len();
    let mut latencies: Vec<Duration> = acked.values().copied().collect();
    latencies.sort();
    let p99 = latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default();
    println!(
        "LMTP crash test: {kills} kills, attempted {}, acked {}, stored {}, lost {lost}, \
         duplicates {duplicates}; {:.0} acked deliveries/s with {SENDERS} senders across the \
         kills, p99 ack latency {p99:?}",
        attempted.load(Ordering::Relaxed),
        acked.len(),
        stored.len(),
        acked.len() as f64 / elapsed.as_secs_f64(),
    );
    common::reliability(
        "delivery::sigkill_during_lmtp_deliveries_loses_nothing_acknowledged",
        &format!(
            "kill -9 of the server during LMTP deliveries from {SENDERS} senders (seed {seed})"
        ),
        kills as u64,
        acked.len() as u64,
        lost as u64,
        duplicates as u64,
        0,
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(
        duplicates, 0,
        "no sender retried, so nothing is stored twice"
    );
    assert!(acked.len() >= 20, "too few deliveries to test anything");
    let (status, out, _) = common::run_cli(&["verify", "--data", data.to_str().unwrap()], &[]);
    assert!(status.success(), "verify: {out}");

    // `postlog deliver` with no server: it stores directly, and says why when it cannot.
    let deliver = |account: &str, input: &[u8]| {
        let mut child = Command::new(common::bin())
            .args([
                "deliver",
                "--data",
                data.to_str().unwrap(),
                "--account",
                account,
            ])
            .args(["-f", "sender@remote.test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let m = mail("deliver-direct@test", 1000);
    assert_eq!(deliver("ann", m.as_bytes()).0, Some(0));
    assert_eq!(
        deliver("ann", m.as_bytes()).0,
        Some(0),
        "again: different Received"
    );
    let (code, err) = deliver("nobody", m.as_bytes());
    assert_eq!(code, Some(67), "{err}");
    assert_eq!(deliver("ann", b"").0, Some(65));
    let big = mail("deliver-big@test", LIMIT as usize + 10);
    assert_eq!(deliver("ann", big.as_bytes()).0, Some(65));
    let missing = dir.path().join("nothing-here");
    let (status, _, err) = common::run_cli(
        &[
            "deliver",
            "--data",
            missing.to_str().unwrap(),
            "--account",
            "ann",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(75), "{err}");
    let direct: Vec<(Vec<String>, Vec<u8>)> = messages(&data, "ann")
        .into_iter()
        .filter(|(_, m)| contains(m, "deliver-direct@test"))
        .collect();
    assert_eq!(direct.len(), 2);
    assert!(
        direct[0]
            .1
            .starts_with(b"Return-Path: <sender@remote.test>\r\nReceived: from localhost")
    );
    assert_eq!(direct[0].0, ["inbox", "unread"]);
}

/// Mail accepted over LMTP lands in a watching client's Maildir with no other command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_mail_reaches_a_watching_maildir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, lmtp, _) = common::InProcess::start_with(
        &data,
        StartOptions {
            lmtp: Some("127.0.0.1:0".parse().unwrap()),
            ..StartOptions::default()
        },
    )
    .await;
    let lmtp = lmtp.unwrap();
    let url = server.account("ann");
    add_account(&data, "ann", &["ann@example.org"]);
    let profile = dir.path().join("profile");
    let (ok, _, err) = common::run_cli(
        &[
            "login",
            &url.to_url(),
            "--profile",
            profile.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok.success(), "{err}");
    let watch_log = dir.path().join("watch.log");
    let mut watch = Command::new(common::bin())
        .args(["sync", "--watch", "--profile", profile.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&watch_log).unwrap())
        .spawn()
        .unwrap();
    let new = profile.join("mail/new");
    let mut latencies = Vec::new();
    let lat = tokio::task::spawn_blocking(move || {
        let mut c = Raw::connect(lmtp).unwrap();
        c.send(b"LHLO t\r\n").unwrap();
        assert_eq!(c.replies(2), [220, 250]);
        for i in 0..5 {
            let id = format!("push-{i}@test");
            let mut m =
                b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n".to_vec();
            c.send(&m).unwrap();
            assert_eq!(c.replies(3), [250, 250, 354]);
            m = mail(&id, 3000).into_bytes();
            m.extend_from_slice(b".\r\n");
            c.send(&m).unwrap();
            assert_eq!(c.reply().unwrap(), 250);
            let acked = Instant::now();
            let deadline = acked + Duration::from_secs(20);
            loop {
                if let Some(found) = find_in_maildir(&new, &id) {
                    assert!(found.file_name().is_some());
                    latencies.push(acked.elapsed());
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "message {i} did not arrive; the watcher logged:\n{}",
                    std::fs::read_to_string(&watch_log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        latencies
    })
    .await
    .unwrap();
    println!("LMTP 250 -> watching client's Maildir: {lat:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &watch.id().to_string()])
        .status();
    assert!(watch.wait().unwrap().success());
    server.stop().await;
}

fn find_in_maildir(dir: &Path, id: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let mut bytes = Vec::new();
        std::fs::File::open(e.path())
            .ok()?
            .read_to_end(&mut bytes)
            .ok()?;
        if contains(&bytes, id) {
            return Some(e.path());
        }
    }
    None
}
