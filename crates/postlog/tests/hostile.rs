//! Hostile networks: real QUIC clients and an in-process server, with the impairment proxy
//! (`postlog-netsim`) between them. Under each scenario (50 ms RTT, 2% and 10% loss,
//! reordering with duplication, a 2-second blackout mid-transfer, connection migration
//! mid-transfer) two fresh replicas make a
//! full sync of 5,000 messages and then tag the same messages concurrently; both must end
//! complete (every hash, no duplicate, no tmp leftover) and in identical tag state, and the
//! server must hold exactly one record per tag change.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postlog_client::state::State;
use postlog_client::sync::{Progress, sync_once};
use postlog_client::{Endpoint, LoginUrl, Profile};
use postlog_netsim::{Impairment, UdpProxy};
use postlog_proto::{BlobHash, Record, Request, Response};
use tokio::task::JoinSet;

const MESSAGES: usize = 5_000;
/// Messages both replicas tag concurrently in each scenario.
const TAGGED: usize = 200;
const MS: Duration = Duration::from_millis(1);

struct Scenario {
    name: &'static str,
    impairment: Impairment,
    /// Black the link out for 2 s once about this many messages have passed the proxy.
    blackout_at: Option<u64>,
    /// Move both replicas to new local sockets (connection migration) at that point.
    rebind_at: Option<u64>,
}

fn scenarios() -> Vec<Scenario> {
    let base = |rtt: u64, seed: u64| Impairment {
        seed,
        ..Impairment::rtt(MS * rtt as u32)
    };
    vec![
        Scenario {
            name: "rtt-50ms",
            impairment: base(50, 1),
            blackout_at: None,
            rebind_at: None,
        },
        Scenario {
            name: "loss-2pct",
            impairment: Impairment {
                loss: 0.02,
                ..base(4, 2)
            },
            blackout_at: None,
            rebind_at: None,
        },
        Scenario {
            name: "loss-10pct",
            impairment: Impairment {
                loss: 0.10,
                ..base(4, 3)
            },
            blackout_at: None,
            rebind_at: None,
        },
        Scenario {
            name: "reorder-dup",
            impairment: Impairment {
                reorder: 0.05,
                reorder_delay: 5 * MS,
                jitter: MS,
                duplicate: 0.02,
                ..base(4, 4)
            },
            blackout_at: None,
            rebind_at: None,
        },
        Scenario {
            name: "blackout-2s",
            impairment: base(10, 5),
            blackout_at: Some(MESSAGES as u64 / 4),
            rebind_at: None,
        },
        Scenario {
            name: "migration",
            impairment: base(10, 6),
            blackout_at: None,
            rebind_at: Some(MESSAGES as u64 / 4),
        },
    ]
}

/// Every message file of a Maildir, checked against its name: (hashes, duplicates); and no
/// tmp/ leftovers.
fn maildir_contents(root: &Path) -> (HashSet<BlobHash>, u64) {
    let (out, dups) = common::maildir_contents(root);
    let tmp = std::fs::read_dir(root.join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "tmp leftovers in {}", root.display());
    (out, dups)
}

/// A oneshot sync, retried after retryable failures like `postlog sync` run again would be.
async fn sync(profile: &Profile, endpoint: &Endpoint) -> (Arc<Progress>, u32) {
    let mut retries = 0;
    let progress = Arc::new(Progress::default());
    loop {
        match sync_once(profile, endpoint, progress.clone()).await {
            Ok(_) => return (progress, retries),
            Err(e) if e.is_retryable() && retries < 3 => {
                println!("  sync of {} retried: {e}", profile.dir.display());
                retries += 1;
            }
            Err(e) => panic!("sync of {} failed: {e}", profile.dir.display()),
        }
    }
}

fn tags_of(profile: &Profile, hashes: &[BlobHash]) -> Vec<BTreeSet<String>> {
    let mut state = State::open(&profile.dir).unwrap();
    hashes
        .iter()
        .map(|h| {
            State::tags_of(state.conn(), h)
                .unwrap()
                .tags()
                .into_iter()
                .collect()
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_and_concurrent_tags_survive_impaired_networks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = common::InProcess::start(&data).await;
    let writer = server.account("ann");

    // 5,000 small messages, stored concurrently over a clean link.
    let started = Instant::now();
    let endpoint = Endpoint::new(&server.fingerprint).unwrap();
    let conn = endpoint.connect(&writer).await.unwrap();
    let messages: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..MESSAGES)
            .map(|i| common::message(i, 1000 + (i * 37) % 1000))
            .collect(),
    );
    let hashes: Vec<BlobHash> = messages.iter().map(|m| BlobHash::of(m)).collect();
    let mut tasks = JoinSet::new();
    for w in 0..64 {
        let (conn, messages) = (conn.clone(), messages.clone());
        tasks.spawn(async move {
            for i in (w..MESSAGES).step_by(64) {
                conn.store(&messages[i], &["inbox".into(), "unread".into()])
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut head = conn.head().await.unwrap();
    assert_eq!(head, MESSAGES as u64);
    println!(
        "stored {MESSAGES} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let all: HashSet<BlobHash> = hashes.iter().copied().collect();

    for (n, sc) in scenarios().into_iter().enumerate() {
        let t = Instant::now();
        let proxy = UdpProxy::start(server.addr, sc.impairment.clone())
            .await
            .unwrap();
        let through = |mut l: LoginUrl| {
            l.server = proxy.local_addr().to_string();
            l
        };
        let root = dir.path().join(sc.name);
        let a = Profile::create(&root.join("a"), through(server.account("ann")), None).unwrap();
        let b = Profile::create(&root.join("b"), through(server.account("ann")), None).unwrap();
        for p in [&a, &b] {
            // As `postlog login` does.
            postlog_client::Maildir::open(&p.maildir).unwrap();
        }
        let (ea, eb) = (
            Endpoint::new(&server.fingerprint).unwrap(),
            Endpoint::new(&server.fingerprint).unwrap(),
        );

        // 1. Full sync of both replicas at once (with a blackout mid-transfer if asked).
        let blackout = async {
            let at = sc.blackout_at.or(sc.rebind_at)?;
            // Watch the proxy's counters: the event comes once mail is flowing.
            while proxy.stats().bytes < at * 1500 {
                tokio::time::sleep(MS).await;
            }
            if sc.blackout_at.is_some() {
                proxy.blackout(Duration::from_secs(2));
            } else {
                // Both laptops change networks mid-transfer: the proxy sees new source
                // addresses (new upstream sockets), the server a migrating connection.
                ea.rebind().unwrap();
                eb.rebind().unwrap();
            }
            Some(proxy.stats().bytes)
        };
        let ((pa, ra), (pb, rb), blacked) = tokio::join!(sync(&a, &ea), sync(&b, &eb), blackout);
        if let Some(bytes) = blacked {
            assert!(
                bytes < (2 * MESSAGES * 1000) as u64,
                "the blackout or rebind came mid-transfer"
            );
        }
        let mut lost = 0;
        let mut duplicated = 0;
        for (p, progress) in [(&a, &pa), (&b, &pb)] {
            let (got, dups) = maildir_contents(&p.maildir);
            lost += all.difference(&got).count() as u64;
            duplicated += dups;
            assert_eq!(p.cursor().unwrap(), head);
            assert!(progress.messages.load(Ordering::Relaxed) <= MESSAGES as u64);
        }

        // 2. Both replicas tag the same messages concurrently. A removes `unread` and adds
        // `x`; B, not having seen A's `x`, removes it and adds `y` (and drops `inbox` from
        // even messages). Add wins over an unseen remove, so every replica must end with
        // {x, y} plus `inbox` on odd messages.
        let subset: Vec<BlobHash> = (0..TAGGED).map(|i| hashes[n * TAGGED + i]).collect();
        for (p, add, remove) in [(&a, "x", "unread"), (&b, "y", "x")] {
            let mut state = State::open(&p.dir).unwrap();
            // `seen` is the last offset applied: the cursor minus one (PROTOCOL.md 8.6).
            let seen = p.cursor().unwrap() - 1;
            for (i, h) in subset.iter().enumerate() {
                let mut rm = vec![remove.to_string()];
                if add == "y" && i % 2 == 0 {
                    rm.push("inbox".into());
                }
                State::queue_op(state.conn(), h, &[add.into()], &rm, seen).unwrap();
            }
        }
        let ((_, ra2), (_, rb2)) = tokio::join!(sync(&a, &ea), sync(&b, &eb));
        // Each now holds its own ops; one more round brings in the other's.
        let ((_, ra3), (_, rb3)) = tokio::join!(sync(&a, &ea), sync(&b, &eb));
        let new_head = conn.head().await.unwrap();
        let tag_records = new_head - head;
        head = new_head;
        duplicated += tag_records.saturating_sub(2 * TAGGED as u64);
        lost += (2 * TAGGED as u64).saturating_sub(tag_records);
        let (ta, tb) = (tags_of(&a, &subset), tags_of(&b, &subset));
        let mut diverged = 0;
        for i in 0..TAGGED {
            let want = if i % 2 == 0 {
                set(&["x", "y"])
            } else {
                set(&["inbox", "x", "y"])
            };
            if ta[i] != want || tb[i] != want {
                diverged += 1;
                println!("  diverged {}: a {:?} b {:?}", subset[i], ta[i], tb[i]);
            }
        }
        // Untouched messages are unchanged on both.
        let other = [hashes[(n * TAGGED + TAGGED) % MESSAGES]];
        for t in [tags_of(&a, &other), tags_of(&b, &other)] {
            if t[0] != set(&["inbox", "unread"]) {
                diverged += 1;
            }
        }
        let s = proxy.stats();
        let retries = ra + rb + ra2 + rb2 + ra3 + rb3;
        println!(
            "{:<12} {:>5.1} s  synced 2x{MESSAGES} msgs, {} tag ops, retries {retries}, lost {lost}, \
             duplicated {duplicated}, diverged {diverged}; proxy {s}",
            sc.name,
            t.elapsed().as_secs_f64(),
            2 * TAGGED
        );
        common::reliability(
            &format!("hostile::full_sync_and_concurrent_tags::{}", sc.name),
            &format!(
                "full sync of {MESSAGES} messages to 2 replicas + {} concurrent tag changes \
                 through the UDP proxy ({})",
                2 * TAGGED,
                describe(&sc)
            ),
            1,
            2 * MESSAGES as u64 + 2 * TAGGED as u64,
            lost,
            duplicated,
            diverged,
        );
        assert_eq!(
            (lost, duplicated, diverged),
            (0, 0, 0),
            "scenario {}",
            sc.name
        );
        match sc.name {
            "loss-2pct" | "loss-10pct" => assert!(s.lost > 0),
            "reorder-dup" => assert!(s.reordered > 0 && s.duplicated > 0),
            "blackout-2s" => assert!(s.blacked_out > 0),
            // Two replicas, each from a second socket after the rebind.
            "migration" => assert!(s.flows >= 4, "{s}"),
            _ => {}
        }
    }
    conn.close();
    server.stop().await;
    let report = common::verify(&data);
    assert!(report.is_ok(), "{:?}", report.problems);
}

fn describe(sc: &Scenario) -> String {
    let i = &sc.impairment;
    let mut parts = vec![format!("RTT {} ms", (i.delay * 2).as_millis())];
    if i.loss > 0.0 {
        parts.push(format!("{}% loss", i.loss * 100.0));
    }
    if i.reorder > 0.0 {
        parts.push(format!(
            "{}% held back {} ms, jitter {} ms, {}% duplicated",
            i.reorder * 100.0,
            i.reorder_delay.as_millis(),
            i.jitter.as_millis(),
            i.duplicate * 100.0
        ));
    }
    if sc.blackout_at.is_some() {
        parts.push("2 s blackout mid-transfer".into());
    }
    if sc.rebind_at.is_some() {
        parts.push("both clients rebind to new sockets mid-transfer".into());
    }
    format!("{}; seed {}", parts.join(", "), i.seed)
}

/// A bare quinn client endpoint that can send requests in 0-RTT data (as the library's
/// `Endpoint` does for Auth), so a test can put a mutating request in early data.
fn raw_endpoint(fingerprint: &str) -> quinn::Endpoint {
    let provider = postlog_net::crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(postlog_net::PinnedServer::new(
            fingerprint,
            provider,
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![postlog_proto::ALPN.to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

/// Opens a stream, writes one request and finishes the stream (in 0-RTT data if the
/// connection is still in its handshake).
async fn send_request(conn: &quinn::Connection, req: &Request) -> quinn::RecvStream {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&req.to_frame()).await.unwrap();
    send.finish().unwrap();
    recv
}

async fn read_response(recv: &mut quinn::RecvStream) -> Response {
    let f = tokio::time::timeout(Duration::from_secs(10), postlog_net::read_frame(recv))
        .await
        .expect("an answer")
        .expect("a frame");
    Response::decode(&f).unwrap()
}

/// Every record of the account (through a clean connection), with the tags it adds.
async fn log_tags(conn: &postlog_client::Connection) -> Vec<Vec<String>> {
    let head = conn.head().await.unwrap();
    let mut log = conn.log(0, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        match log.next().await.unwrap() {
            postlog_client::LogItem::Entry(e, _) => match e.record {
                Record::Tags { add, .. } => out.push(add),
                _ => out.push(Vec::new()),
            },
            postlog_client::LogItem::Live(h) => {
                assert_eq!(h, head);
                return out;
            }
        }
    }
}

/// 0-RTT profile (PROTOCOL.md section 11): a captured 0-RTT flight carrying a Tag, replayed
/// byte for byte from another address, never executes the Tag a second time, and a flight
/// whose original never reached the server executes nothing at all, because the replayer
/// cannot complete the handshake that mutating requests wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_zero_rtt_flights_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::InProcess::start(&dir.path().join("data")).await;
    let login = server.account("ann");
    let clean = Endpoint::new(&server.fingerprint)
        .unwrap()
        .connect(&login)
        .await
        .unwrap();
    let msg = common::message(1, 500);
    let (hash, _, _) = clean.store(&msg, &[]).await.unwrap();
    let proxy = UdpProxy::start(server.addr, Impairment::default())
        .await
        .unwrap();
    let ep = raw_endpoint(&server.fingerprint);
    let auth = Request::Auth {
        account: login.account.clone(),
        device: login.device,
        secret: login.secret,
    };
    // A first connection (full handshake) leaves session tickets behind.
    let first = ep
        .connect(proxy.local_addr(), postlog_net::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let mut r = send_request(&first, &auth).await;
    assert!(matches!(
        read_response(&mut r).await,
        Response::AuthOk { .. }
    ));
    let mut r = send_request(&first, &Request::Head).await;
    assert!(matches!(
        read_response(&mut r).await,
        Response::Head { head: 1 }
    ));
    first.close(0u32.into(), b"");

    // A resumed connection sends Auth and a Tag together, both in 0-RTT data; the proxy
    // records every datagram the client sends.
    proxy.record(true);
    let tag = |seq: u64, t: &str| Request::Tag {
        hash,
        add: vec![t.into()],
        remove: vec![],
        seen: 1,
        seq,
    };
    let (conn, accepted) = ep
        .connect(proxy.local_addr(), postlog_net::SERVER_NAME)
        .unwrap()
        .into_0rtt()
        .expect("a session ticket allows 0-RTT");
    let mut ra = send_request(&conn, &auth).await;
    let mut rt = send_request(&conn, &tag(1, "once")).await;
    assert!(accepted.await, "the server accepted the early data");
    assert!(matches!(
        read_response(&mut ra).await,
        Response::AuthOk { .. }
    ));
    match read_response(&mut rt).await {
        Response::Tagged { offset, new } => assert_eq!((offset, new), (1, true)),
        other => panic!("unexpected {other:?}"),
    }
    conn.close(0u32.into(), b"");
    ep.wait_idle().await;
    let flight = proxy.recorded();
    proxy.record(false);
    assert!(flight.len() >= 2, "captured {} datagrams", flight.len());

    // Replay 1: right away, from another address. Replay 2: later, when the server has
    // forgotten the connection (its single-use ticket is gone: 0-RTT is refused and the
    // early data discarded).
    let mut answered = 0;
    for pause in [Duration::ZERO, Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        let sock = postlog_netsim::replay(&flight, server.addr).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
        {
            answered += 1;
        }
    }
    assert_eq!(
        clean.head().await.unwrap(),
        2,
        "the replays appended nothing"
    );

    // Replay 3: the original flight never reaches the server (blacked out at the proxy), so
    // the ticket is fresh and the server accepts the replayed early data: Auth runs, the
    // Tag waits for a handshake the replayer cannot finish.
    proxy.record(true);
    proxy.blackout(Duration::from_secs(3600));
    let (lost, _) = ep
        .connect(proxy.local_addr(), postlog_net::SERVER_NAME)
        .unwrap()
        .into_0rtt()
        .expect("a second ticket");
    let (mut s0, _r0) = lost.open_bi().await.unwrap();
    s0.write_all(&auth.to_frame()).await.unwrap();
    s0.finish().unwrap();
    let (mut s1, _r1) = lost.open_bi().await.unwrap();
    s1.write_all(&tag(2, "blackholed").to_frame())
        .await
        .unwrap();
    s1.finish().unwrap();
    // The client's first flight (and its retransmissions) reach the proxy, not the server.
    while proxy.stats().blacked_out < 2 {
        tokio::time::sleep(MS).await;
    }
    let flight = proxy.recorded();
    lost.close(0u32.into(), b"");
    let sock = postlog_netsim::replay(&flight, server.addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let mut replies = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(1000), sock.recv_from(&mut buf)).await
    {
        replies += 1;
    }
    assert!(replies > 0, "the server answered the replayed handshake");
    assert_eq!(
        clean.head().await.unwrap(),
        2,
        "the replayed Tag did not run"
    );
    let tags = log_tags(&clean).await;
    assert_eq!(
        tags.iter()
            .filter(|t| t.contains(&"once".to_string()))
            .count(),
        1
    );
    assert!(!tags.iter().any(|t| t.contains(&"blackholed".to_string())));
    println!(
        "0-RTT replay: 3 replays ({} datagrams answered for the first two, {replies} for the \
         third), head stays 2",
        answered
    );
    common::reliability(
        "hostile::replayed_zero_rtt_flights_change_nothing",
        "a captured 0-RTT flight (Auth + Tag in early data) replayed byte for byte: at once, \
         after the server forgot it, and with the original blackholed",
        3,
        1,
        0,
        0,
        0,
    );
    clean.close();
    server.stop().await;
}

/// One Auth attempt from the loopback address `src` (Linux routes all of 127/8 to `lo`, so
/// each is a different source for the server): the answer and how long it took.
async fn try_auth(
    server: &common::InProcess,
    src: &str,
    account: &str,
    device: u64,
    secret: [u8; 32],
) -> (Response, Duration) {
    let provider = postlog_net::crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(postlog_net::PinnedServer::new(
            &server.fingerprint,
            provider,
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![postlog_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(format!("{src}:0").parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = ep
        .connect(server.addr, postlog_net::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let t = Instant::now();
    let mut r = send_request(
        &conn,
        &Request::Auth {
            account: account.into(),
            device,
            secret,
        },
    )
    .await;
    let reply = read_response(&mut r).await;
    let took = t.elapsed();
    if matches!(reply, Response::Error { .. }) {
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code,
                    postlog_proto::error::close::AUTH_FAILED.into()
                )
            }
            other => panic!("unexpected close {other:?}"),
        }
    }
    conn.close(0u32.into(), b"");
    (reply, took)
}

fn failed(r: &Response) -> bool {
    matches!(r, Response::Error { code: 4, .. })
}

/// Failed logins are delayed and limited per source address and per account, as
/// configured in `[auth]`; parallel guesses are no faster than sequential ones; a wrong
/// secret and an unknown account look the same; a correct secret from a new address works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_address_and_account() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let delay = Duration::from_millis(100);
    std::fs::write(
        data.join("postlog.toml"),
        "[auth]\nfailure_delay = \"100ms\"\naddress_burst = 3\naddress_refill = \"60s\"\n\
         account_burst = 8\naccount_refill = \"60s\"\nmax_wait = \"5s\"\n",
    )
    .unwrap();
    let server = common::InProcess::start(&data).await;
    let ann = server.account("ann");
    let bob = server.account("bob");
    let wrong = [7u8; 32];
    let mut attempts = 0u64;

    // Wrong secret and unknown account (or device): the same answer, after the same delay.
    let mut times = (Vec::new(), Vec::new());
    for i in 0..3 {
        let (r1, t1) = try_auth(&server, &format!("127.0.1.{i}"), "ann", ann.device, wrong).await;
        let (r2, t2) = try_auth(&server, &format!("127.0.2.{i}"), "nobody", 1, wrong).await;
        let (r3, _) = try_auth(&server, &format!("127.0.3.{i}"), "ann", 999, wrong).await;
        assert_eq!(format!("{r1:?}"), format!("{r2:?}"));
        assert_eq!(format!("{r1:?}"), format!("{r3:?}"));
        assert!(failed(&r1));
        times.0.push(t1);
        times.1.push(t2);
        attempts += 3;
    }
    times.0.sort();
    times.1.sort();
    let (m1, m2) = (times.0[1], times.1[1]);
    println!("median failure answer: wrong secret {m1:?}, unknown account {m2:?}");
    assert!(m1 >= delay && m2 >= delay);
    assert!(
        m1.abs_diff(m2) < Duration::from_millis(40),
        "{m1:?} vs {m2:?}"
    );

    // Three guesses in parallel from one address take as long as three in a row.
    let t = Instant::now();
    let (a, b, c) = tokio::join!(
        try_auth(&server, "127.0.4.1", "bob", bob.device, wrong),
        try_auth(&server, "127.0.4.1", "bob", bob.device, wrong),
        try_auth(&server, "127.0.4.1", "bob", bob.device, wrong),
    );
    let parallel = t.elapsed();
    assert!(failed(&a.0) && failed(&b.0) && failed(&c.0));
    let t = Instant::now();
    for _ in 0..3 {
        assert!(failed(
            &try_auth(&server, "127.0.4.2", "bob", bob.device, wrong)
                .await
                .0
        ));
    }
    let sequential = t.elapsed();
    attempts += 6;
    println!("3 failures: parallel {parallel:?}, sequential {sequential:?}");
    assert!(parallel >= 3 * delay, "{parallel:?}");
    assert!(sequential >= 3 * delay, "{sequential:?}");

    // 127.0.4.1 spent its burst (3): even its correct secret is refused now, without a
    // check; a new address with the correct secret works.
    let (r, _) = try_auth(&server, "127.0.4.1", "bob", bob.device, bob.secret).await;
    assert!(failed(&r), "an address over its limit is refused");
    let (r, _) = try_auth(&server, "127.0.4.3", "bob", bob.device, bob.secret).await;
    assert!(matches!(r, Response::AuthOk { .. }), "{r:?}");
    attempts += 2;

    // Account limit: ann has 6 failures; 2 more from 2 addresses spend her burst of 8.
    for i in 0..2 {
        let (r, _) = try_auth(&server, &format!("127.0.5.{i}"), "ann", ann.device, wrong).await;
        assert!(failed(&r));
    }
    // A guessing address (one failure on record, within its own limit) is now refused even
    // with the correct secret...
    let (r, _) = try_auth(&server, "127.0.5.0", "ann", ann.device, ann.secret).await;
    assert!(
        failed(&r),
        "a guessing address is refused while ann is over her limit"
    );
    // ...while the real user on a new address gets in, and bob is unaffected.
    let (r, _) = try_auth(&server, "127.0.6.1", "ann", ann.device, ann.secret).await;
    assert!(matches!(r, Response::AuthOk { .. }), "{r:?}");
    let (r, _) = try_auth(&server, "127.0.5.1", "bob", bob.device, bob.secret).await;
    assert!(matches!(r, Response::AuthOk { .. }), "{r:?}");
    attempts += 5;
    common::reliability(
        "hostile::failed_logins_are_throttled_per_address_and_account",
        "failed logins: wrong secret vs unknown account (same reply and delay), parallel vs \
         sequential guesses, address limit, account limit, correct secret from a new address",
        attempts,
        3,
        0,
        0,
        0,
    );
    server.stop().await;
}

/// A raw connection from 127.0.0.1 to `server`.
async fn raw_conn(server: &common::InProcess) -> quinn::Connection {
    raw_endpoint(&server.fingerprint)
        .connect(server.addr, postlog_net::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

fn error_code(r: &Response) -> Option<u16> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// Slow and silent peers over QUIC cannot hold server resources: every limit of `[limits]`
/// (set low here) and the per-connection stream credit is crossed, and the server keeps
/// serving a well-behaved client throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_quic_peers_are_cut_off_at_their_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("postlog.toml"),
        "[limits]\nrequest_timeout = \"1s\"\nauth_timeout = \"300ms\"\n\
         max_log_streams_per_account = 4\n",
    )
    .unwrap();
    let server = common::InProcess::start(&data).await;
    let login = server.account("ann");
    let good = Endpoint::new(&server.fingerprint)
        .unwrap()
        .connect(&login)
        .await
        .unwrap();
    let auth = Request::Auth {
        account: login.account.clone(),
        device: login.device,
        secret: login.secret,
    };
    let mut trials = 0;

    // 1. A connection that never sends Auth is closed after auth_timeout.
    let silent = raw_conn(&server).await;
    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), silent.closed())
        .await
        .expect("closed by the server")
    {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            c.error_code,
            postlog_proto::error::close::PROTOCOL_VIOLATION.into()
        ),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    trials += 1;

    // 2. Slowloris: an authenticated peer opens every stream it has credit for (255 after
    // Auth) and sends only part of a frame header, half trickling a byte later. Each
    // stream is answered "timed out" after request_timeout, and its credit comes back.
    let slow = raw_conn(&server).await;
    let mut r = send_request(&slow, &auth).await;
    assert!(matches!(
        read_response(&mut r).await,
        Response::AuthOk { .. }
    ));
    let mut streams = Vec::new();
    for i in 1..postlog_net::MAX_STREAMS_PER_CONNECTION {
        let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), slow.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i}"))
            .unwrap();
        // One byte of a four-byte frame header (a stream the server never hears of would
        // hold no server resources at all).
        send.write_all(&[0]).await.unwrap();
        streams.push((i, send, recv));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), slow.open_bi())
            .await
            .is_err(),
        "no credit for stream 257"
    );
    let t = Instant::now();
    // Half of them trickle a second byte: the limit is on the whole frame, not on gaps.
    for (i, send, _) in streams.iter_mut() {
        if *i % 2 == 0 {
            let _ = send.write_all(&[0]).await;
        }
    }
    let mut timed_out = 0;
    for (_, _, recv) in streams.iter_mut() {
        let r = read_response(recv).await;
        assert_eq!(error_code(&r), Some(1), "{r:?}");
        timed_out += 1;
    }
    println!(
        "{timed_out} stalled streams answered \"timed out\" in {:?}",
        t.elapsed()
    );
    drop(streams);
    // The credit came back: a new stream on the same connection is served.
    let mut r = tokio::time::timeout(Duration::from_secs(5), send_request(&slow, &Request::Head))
        .await
        .expect("credit returned");
    assert!(matches!(read_response(&mut r).await, Response::Head { .. }));
    trials += timed_out;

    // 3. A Store body that stops half way is cut off after request_timeout.
    let (mut send, mut recv) = slow.open_bi().await.unwrap();
    send.write_all(
        &Request::Store {
            size: 100,
            tags: vec![],
        }
        .to_frame(),
    )
    .await
    .unwrap();
    send.write_all(&[b'x'; 10]).await.unwrap();
    let r = read_response(&mut recv).await;
    assert_eq!(error_code(&r), Some(1), "{r:?}");
    trials += 1;

    // 4. Open Log streams per account: 4 over two connections; the fifth is Busy; when one
    // closes, a new one is served.
    let mut logs = Vec::new();
    let mut busy = None;
    for i in 0..5 {
        let c = if i % 2 == 0 {
            slow.clone()
        } else {
            raw_conn_authed(&server, &auth).await
        };
        let (mut send, mut recv) = c.open_bi().await.unwrap();
        send.write_all(
            &Request::Log {
                from: 0,
                inline_blobs: false,
            }
            .to_frame(),
        )
        .await
        .unwrap();
        let r = read_response(&mut recv).await;
        match r {
            Response::Live { .. } => logs.push((c, send, recv)),
            other => busy = Some(other),
        }
    }
    assert_eq!(logs.len(), 4);
    assert_eq!(busy.as_ref().and_then(error_code), Some(8), "{busy:?}");
    let (_, mut send, mut recv) = logs.remove(0);
    let _ = send.reset(0u32.into());
    let _ = recv.stop(0u32.into());
    drop((send, recv));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut r = good.log(0, false).await.unwrap();
        match r.next().await {
            Ok(postlog_client::LogItem::Live(_)) => break,
            Err(e) if Instant::now() < deadline => {
                // The server notices the cancelled stream within a round trip.
                assert!(e.to_string().contains("Busy"), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    trials += 2;

    // 5. Bytes after a read-only request are refused (STOP_SENDING), not buffered: 16 MiB
    // of junk after a Log request stop at once.
    drop(logs);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut send, recv) = loop {
        let (mut send, mut recv) = slow.open_bi().await.unwrap();
        send.write_all(
            &Request::Log {
                from: 0,
                inline_blobs: false,
            }
            .to_frame(),
        )
        .await
        .unwrap();
        match read_response(&mut recv).await {
            Response::Live { .. } => break (send, recv),
            // Log slots of the streams just dropped come back within a round trip.
            r if error_code(&r) == Some(8) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            r => panic!("unexpected {r:?}"),
        }
    };
    let junk = vec![0u8; 16 << 20];
    let w = tokio::time::timeout(Duration::from_secs(10), send.write_all(&junk))
        .await
        .expect("the write ends");
    assert!(matches!(w, Err(quinn::WriteError::Stopped(_))), "{w:?}");
    drop((send, recv));
    trials += 1;

    // A well-behaved client was served throughout.
    assert_eq!(good.head().await.unwrap(), 0);
    common::reliability(
        "hostile::slow_and_silent_quic_peers_are_cut_off_at_their_limits",
        "slow/silent QUIC peers: no Auth (auth_timeout), 255 stalled streams (request_timeout, \
         stream credit), stalled Store body, junk after Log (STOP_SENDING), 5th Log stream \
         of an account (Busy)",
        trials as u64,
        0,
        0,
        0,
        0,
    );
    good.close();
    server.stop().await;
}

async fn raw_conn_authed(server: &common::InProcess, auth: &Request) -> quinn::Connection {
    let c = raw_conn(server).await;
    let mut r = send_request(&c, auth).await;
    assert!(matches!(
        read_response(&mut r).await,
        Response::AuthOk { .. }
    ));
    c
}

/// A raw TCP client of the LMTP/SMTP listener, from the loopback address `src`.
async fn tcp_from(
    src: &str,
    to: std::net::SocketAddr,
) -> tokio::io::BufReader<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    tokio::io::BufReader::new(s.connect(to).await.unwrap())
}

/// The code of the next reply (the last line of a multi-line one); `None` at EOF.
async fn smtp_reply(c: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<u16> {
    use tokio::io::AsyncBufReadExt;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), c.read_line(&mut line))
            .await
            .expect("a reply or EOF")
            .ok()?;
        if n == 0 {
            return None;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).and_then(|c| c.parse().ok());
        }
    }
}

/// Slowloris over LMTP and SMTP: a silent client is cut off after `command_timeout`, a
/// client that trickles bytes after `session_timeout`, and one address cannot hold more than
/// `max_connections_per_ip` slots (other addresses still get in; the slots come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_lmtp_and_smtp_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("postlog.toml"),
        "[delivery]\nmax_connections_per_ip = 3\ncommand_timeout = \"1s\"\n\
         session_timeout = \"2500ms\"\n",
    )
    .unwrap();
    let (server, lmtp, smtp) = common::InProcess::start_with(
        &data,
        postlog_server::StartOptions {
            lmtp: Some("127.0.0.1:0".parse().unwrap()),
            smtp: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await;
    let (lmtp, smtp) = (lmtp.unwrap(), smtp.unwrap());
    let mut trials = 0u64;
    for (name, addr) in [("LMTP", lmtp), ("SMTP", smtp)] {
        // Silent after the greeting: 421 after command_timeout, then EOF.
        let t = Instant::now();
        let mut c = tcp_from("127.0.7.1", addr).await;
        assert_eq!(smtp_reply(&mut c).await, Some(220));
        assert_eq!(smtp_reply(&mut c).await, Some(421), "{name}");
        assert_eq!(smtp_reply(&mut c).await, None);
        let silent = t.elapsed();
        assert!(silent >= Duration::from_millis(1000), "{silent:?}");

        // Trickling a byte every 100 ms (never idle for command_timeout): 421 once the
        // session is 2.5 s old.
        let t = Instant::now();
        let mut c = tcp_from("127.0.7.2", addr).await;
        assert_eq!(smtp_reply(&mut c).await, Some(220));
        let (mut r, mut w) = c.into_inner().into_split();
        let trickle = tokio::spawn(async move {
            for b in b"NOOP\r\n".iter().cycle() {
                if w.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got),
        )
        .await
        .expect("the server closes the connection");
        trickle.abort();
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("421"), "{name}: {text}");
        let slow = t.elapsed();
        assert!(
            slow >= Duration::from_millis(2400) && slow < Duration::from_secs(8),
            "{slow:?}"
        );

        // Three silent connections from one address fill its slots: the fourth gets 421;
        // another address is served; after command_timeout the slots are free again.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = tcp_from("127.0.7.3", addr).await;
            assert_eq!(smtp_reply(&mut c).await, Some(220));
            held.push(c);
        }
        let mut c = tcp_from("127.0.7.3", addr).await;
        assert_eq!(
            smtp_reply(&mut c).await,
            Some(421),
            "{name}: 4th from one address"
        );
        let mut c = tcp_from("127.0.7.4", addr).await;
        assert_eq!(
            smtp_reply(&mut c).await,
            Some(220),
            "{name}: another address"
        );
        for c in &mut held {
            assert_eq!(smtp_reply(c).await, Some(421));
            assert_eq!(smtp_reply(c).await, None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut c = tcp_from("127.0.7.3", addr).await;
            match smtp_reply(&mut c).await {
                Some(220) => break,
                // The server frees a slot a moment after it closes the connection.
                Some(421) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        println!("{name}: silent cut off after {silent:?}, trickler after {slow:?}");
        trials += 7;
    }
    common::reliability(
        "hostile::slow_lmtp_and_smtp_clients_are_cut_off",
        "slowloris over LMTP and SMTP: silent client (command_timeout), trickling client \
         (session_timeout), connection slots per address",
        trials,
        0,
        0,
        0,
        0,
    );
    server.stop().await;
}
