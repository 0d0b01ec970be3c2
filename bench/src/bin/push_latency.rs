//! `push-latency`: how soon a stored message is on a watching client's disk.
//!
//! Run `postlog sync --watch --profile W` first and let it catch up. This binary connects
//! with another profile of the same account (`--store-profile`), stores `--messages` new
//! messages one at a time (tags `inbox`, `unread`, so the watcher writes `new/<hash>`), and
//! for each one polls W's Maildir until `new/<hex hash>` exists. It reports, per message:
//! - ack: Store sent → durable acknowledgement received;
//! - from ack: acknowledgement → file present (negative when the file landed first);
//! - from start: Store sent → file present.
//!
//! The file is looked for every 50 µs, so times have about that resolution.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use postlog_bench::stats::{ms, print_table, signed_ms};
use postlog_client::{Endpoint, Profile};

/// Measure push latency: Store through one profile, wait for the file in a watcher's Maildir.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Profile used to store the messages (a device of the watched account).
    #[arg(long)]
    store_profile: PathBuf,
    /// Profile of the running `postlog sync --watch` (its Maildir is polled).
    #[arg(long)]
    watch_profile: PathBuf,
    /// Messages to store, one at a time.
    #[arg(long, default_value_t = 50)]
    messages: usize,
    /// Corpus seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Index of the first corpus message to store (pick one the account does not hold).
    #[arg(long)]
    from: usize,
    /// Pause between messages, in milliseconds.
    #[arg(long, default_value_t = 20)]
    gap_ms: u64,
    /// Give up on a message after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
}

const TAGS: [&str; 2] = ["inbox", "unread"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.messages > 0, "--messages must be at least 1");
    let store = Profile::load(&args.store_profile)?;
    let watch = Profile::load(&args.watch_profile)?;
    ensure!(
        store.login.account == watch.login.account,
        "the two profiles belong to different accounts ({} and {})",
        store.login.account,
        watch.login.account
    );
    let endpoint = Endpoint::new(&store.login.fingerprint)?;
    let conn = endpoint
        .connect(&store.login)
        .await
        .with_context(|| format!("connecting to {}", store.login.server))?;
    let tags: Vec<String> = TAGS.iter().map(|t| t.to_string()).collect();
    let new_dir = watch.maildir.join("new");
    let timeout = Duration::from_secs(args.timeout_s);

    let (mut ack, mut from_ack, mut from_start) = (Vec::new(), Vec::new(), Vec::new());
    for i in args.from..args.from + args.messages {
        let msg = postlog_bench::message(args.seed, i);
        let hex = blake3::hash(&msg).to_hex().to_string();
        let path = new_dir.join(&hex);
        ensure!(
            !path.exists(),
            "{} already exists: pick another --from",
            path.display()
        );
        let poller = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            loop {
                if path.exists() {
                    return Some(Instant::now());
                }
                if started.elapsed() > timeout {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let sent = Instant::now();
        let (hash, _offset, new) = conn.store(&msg, &tags).await?;
        let acked = Instant::now();
        ensure!(
            new,
            "message {i} ({hash}) was already stored: pick another --from"
        );
        ensure!(
            hash.to_string() == hex,
            "server hash {hash} differs from {hex}"
        );
        let Some(present) = poller.await? else {
            bail!(
                "message {i} did not appear in {} within {} s: is `postlog sync --watch` running?",
                new_dir.display(),
                args.timeout_s
            );
        };
        ack.push(ms(acked - sent));
        from_start.push(ms(present - sent));
        from_ack.push(signed_ms(acked, present));
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    conn.close();

    print_table(
        "messages",
        &mut [
            ("store sent -> ack", "ack", ack),
            ("ack -> file present", "from_ack", from_ack),
            ("store sent -> file present", "from_start", from_start),
        ],
    );
    Ok(())
}
