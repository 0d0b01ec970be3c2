//! `tag-latency`: how soon one tag change reaches a watching client's disk.
//!
//! Run `postlog sync --watch --profile W` (a plain Maildir profile) first and let it catch
//! up. This binary connects with another device of the same account (`--tag-profile`),
//! picks a message W holds, and toggles its `flagged` tag `--changes` times, one Tag request
//! at a time. For each it polls W's Maildir until the file's flags show the change (`F`
//! added or removed by the watcher's rename). It reports, per change:
//! - ack: Tag sent -> durable acknowledgement;
//! - from ack: acknowledgement -> renamed file present;
//! - from start: Tag sent -> renamed file present.
//!
//! The Maildir is looked at every 50 µs, so times have about that resolution.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use postlog_bench::stats::{ms, print_table, signed_ms};
use postlog_client::{Endpoint, Profile};
use postlog_proto::BlobHash;

/// Measure tag-change latency: Tag through one profile, wait for the rename in a watcher.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Profile used to send the tag changes (a device of the watched account; its own
    /// queued changes are not touched: operation numbers start above any it used).
    #[arg(long)]
    tag_profile: PathBuf,
    /// Profile of the running `postlog sync --watch` (its Maildir is polled).
    #[arg(long)]
    watch_profile: PathBuf,
    /// Tag changes to make, one at a time.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Pause between changes, in milliseconds.
    #[arg(long, default_value_t = 20)]
    gap_ms: u64,
    /// Give up on a change after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
}

/// The watcher's file for `hex` in cur/, if any, and whether its flags hold F.
fn flagged(cur: &Path, hex: &str) -> Option<bool> {
    for e in std::fs::read_dir(cur).ok()?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(hex) {
            let flags = name.rsplit_once(":2,").map_or("", |(_, f)| f);
            return Some(flags.contains('F'));
        }
    }
    None
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.changes > 0, "--changes must be at least 1");
    let tagger = Profile::load(&args.tag_profile)?;
    let watch = Profile::load(&args.watch_profile)?;
    ensure!(
        tagger.login.account == watch.login.account,
        "the two profiles belong to different accounts"
    );
    let cur = watch.maildir.join("cur");
    // A message the watcher holds in cur/ (new/ files have no flags to rename).
    let hex = std::fs::read_dir(&cur)
        .with_context(|| format!("reading {}", cur.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() >= 64)
        .map(|n| n[..64].to_string())
        .context("the watcher's cur/ holds no message: sync some mail first")?;
    let hash: BlobHash = hex.parse().context("a cur/ file name without a hash")?;
    let endpoint = Endpoint::new(&tagger.login.fingerprint)?;
    let conn = endpoint
        .connect(&tagger.login)
        .await
        .with_context(|| format!("connecting to {}", tagger.login.server))?;
    // Operation numbers far above anything the tag profile's own sync has used.
    let seq0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as u64;
    let timeout = Duration::from_secs(args.timeout_s);
    let flag = vec!["flagged".to_string()];
    let (mut ack, mut from_ack, mut from_start) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.changes {
        let Some(now_flagged) = flagged(&cur, &hex) else {
            bail!("{hex} left {}", cur.display());
        };
        let want = !now_flagged;
        let (add, remove) = if want {
            (flag.clone(), vec![])
        } else {
            (vec![], flag.clone())
        };
        let seen = conn.head().await?.saturating_sub(1);
        let (cur2, hex2) = (cur.clone(), hex.clone());
        let poller = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            loop {
                if flagged(&cur2, &hex2) == Some(want) {
                    return Some(Instant::now());
                }
                if started.elapsed() > timeout {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let sent = Instant::now();
        conn.tag(&hash, &add, &remove, seen, seq0 + i as u64)
            .await?;
        let acked = Instant::now();
        let Some(present) = poller.await? else {
            bail!(
                "change {i} did not reach {} within {} s: is `postlog sync --watch` running?",
                cur.display(),
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
        "changes",
        &mut [
            ("tag sent -> ack", "ack", ack),
            ("ack -> file renamed", "from_ack", from_ack),
            ("tag sent -> file renamed", "from_start", from_start),
        ],
    );
    Ok(())
}
