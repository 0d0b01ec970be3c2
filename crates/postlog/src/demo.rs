//! `postlog demo`: the whole system on loopback, with no setup and nothing left behind.
//!
//! A server with an embedded data directory in a temporary folder; an account; a generated
//! sample Maildir imported by client A; client B syncing it all; a no-change sync; and a
//! watching client C receiving a new message by push. Prints what happened, with timings.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use postlog_client::sync::{self, Progress};
use postlog_client::{Endpoint, LoginUrl, Profile};
use postlog_proto::BlobHash;
use postlog_server::Server;

use crate::cli::DemoArgs;

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("postlog-demo.").tempdir()?;
    let root = tmp.path();
    let data = root.join("server");
    say(&format!(
        "working in {} (removed at the end)",
        root.display()
    ));

    let server = Server::start(&data, Some("127.0.0.1:0".parse()?))?;
    let addr = server.local_addr()?;
    let fingerprint = server.fingerprint().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    say(&format!(
        "server listening on {addr} (QUIC), certificate {}",
        &fingerprint[..16]
    ));

    let mut accounts = postlog_store::Accounts::open(&data)?;
    let mut device = |name: &str| -> anyhow::Result<LoginUrl> {
        let c = accounts.add_device("demo", &["demo@example.org".into()], name)?;
        Ok(LoginUrl {
            account: c.account,
            server: addr.to_string(),
            device: c.device,
            secret: c.secret,
            fingerprint: fingerprint.clone(),
        })
    };
    let (url_a, url_b, url_c) = (device("laptop")?, device("desktop")?, device("phone")?);
    say("account 'demo' with three devices: laptop (A), desktop (B), phone (C)");

    let sample = root.join("sample-maildir");
    let t = Instant::now();
    let bytes = postlog_sample::write_maildir(&sample, 42, a.messages)?;
    say(&format!(
        "generated a sample Maildir: {} messages, {:.1} MB, in {:.2} s",
        a.messages,
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    ));

    let endpoint = Endpoint::new(&fingerprint)?;
    let conn_a = endpoint.connect(&url_a).await?;
    let t = Instant::now();
    let progress = Arc::new(postlog_client::import::ImportProgress::default());
    let r = postlog_client::import::import_maildir(&conn_a, &sample, progress).await?;
    let secs = t.elapsed().as_secs_f64();
    say(&format!(
        "A imported {} messages ({:.1} MB) in {secs:.2} s: {:.0} messages/s, each acknowledged only once durable",
        r.stored,
        r.bytes as f64 / 1e6,
        r.stored as f64 / secs
    ));

    let profile_b = Profile::create(&root.join("b"), url_b, None)?;
    postlog_client::Maildir::open(&profile_b.maildir)?;
    let t = Instant::now();
    let report = sync::sync_once(&profile_b, &endpoint, Arc::new(Progress::default())).await?;
    say(&format!(
        "B synced {} messages ({:.1} MB) into its Maildir in {:.2} s ({:.0} MB/s), one Log request",
        report.new_messages,
        report.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        report.bytes as f64 / 1e6 / t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    let again = sync::sync_once(&profile_b, &endpoint, Arc::new(Progress::default())).await?;
    say(&format!(
        "B synced again with nothing new: {} messages, {:.1} ms (connect, authenticate, compare one number)",
        again.new_messages,
        t.elapsed().as_secs_f64() * 1e3
    ));

    let profile_c = Profile::create(&root.join("c"), url_c, None)?;
    postlog_client::Maildir::open(&profile_c.maildir)?;
    let maildir_c = profile_c.maildir.clone();
    let (watch_stop, watch_rx) = tokio::sync::oneshot::channel::<()>();
    let watch_progress = Arc::new(Progress::default());
    let wp = watch_progress.clone();
    let endpoint_c = Endpoint::new(&fingerprint)?;
    let watcher = tokio::spawn(async move {
        sync::watch(
            &profile_c,
            &endpoint_c,
            wp,
            async move {
                let _ = watch_rx.await;
            },
            |_| {},
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while watch_progress
        .messages
        .load(std::sync::atomic::Ordering::Relaxed)
        < r.stored
    {
        anyhow::ensure!(Instant::now() < deadline, "C did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say("C is watching (sync --watch) and has caught up");
    let mut latencies = Vec::new();
    for i in 0..5 {
        let msg = postlog_sample::message(7, 1_000_000 + i);
        let hash = BlobHash::of(&msg);
        let path = maildir_c.join("new").join(hash.to_hex());
        let t = Instant::now();
        conn_a
            .store(&msg, &["inbox".into(), "unread".into()])
            .await?;
        let acked = t.elapsed();
        while !path.exists() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(10), "push did not arrive");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push((acked, t.elapsed()));
    }
    for (i, (acked, arrived)) in latencies.iter().enumerate() {
        say(&format!(
            "push {}: A's Store acknowledged after {:.1} ms; the file was on C's disk after {:.1} ms",
            i + 1,
            acked.as_secs_f64() * 1e3,
            arrived.as_secs_f64() * 1e3
        ));
    }
    let _ = watch_stop.send(());
    watcher.await.context("watcher task")??;
    conn_a.close();
    let _ = stop_tx.send(());
    let _ = server_task.await;
    let v = postlog_store::verify(&data)?;
    say(&format!(
        "postlog verify: {} records, {} blobs, {}",
        v.records,
        v.blobs,
        if v.is_ok() { "ok" } else { "PROBLEMS" }
    ));
    say(
        "done; next: README.md shows a real setup (postlog serve, account add, login, sync --watch)",
    );
    Ok(if v.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn say(s: &str) {
    println!("postlog demo: {s}");
}
