//! `durable-copy`: the machine's durable-copy limit for a Maildir.
//!
//! Copies every message file of `--from` (a Maildir: `cur/` and `new/`) into a fresh
//! Maildir `--to` the cheapest durable way: write them all into `tmp/`, one filesystem
//! barrier (`syncfs`), rename each into `cur/`, fsync `cur/`. That is what any client that
//! makes a whole mailbox durable has to do at least; a full sync is compared against it.
//! Prints the time of each phase and the total. The source is read through the page cache
//! (the time spent reading is reported separately so it can be subtracted).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

/// Copy a Maildir's messages into a fresh Maildir with one durability barrier.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Source Maildir.
    #[arg(long)]
    from: PathBuf,
    /// Destination Maildir (must not exist yet).
    #[arg(long)]
    to: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.to.exists(),
        "{} exists: the copy must go to a fresh directory",
        args.to.display()
    );
    let mut sources = Vec::new();
    for sub in ["cur", "new"] {
        let d = args.from.join(sub);
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                sources.push((e.path(), e.file_name()));
            }
        }
    }
    sources.sort();

    let started = Instant::now();
    let (tmp, cur) = (args.to.join("tmp"), args.to.join("cur"));
    for d in [&tmp, &cur, &args.to.join("new")] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut reading = Duration::ZERO;
    let mut bytes = 0u64;
    for (src, name) in &sources {
        let t = Instant::now();
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        reading += t.elapsed();
        bytes += data.len() as u64;
        let dst = tmp.join(name);
        std::fs::write(&dst, &data).with_context(|| format!("writing {}", dst.display()))?;
    }
    let written = started.elapsed();

    let dir = std::fs::File::open(&tmp).with_context(|| format!("opening {}", tmp.display()))?;
    rustix::fs::syncfs(&dir).context("syncfs")?;
    let synced = started.elapsed();

    for (_, name) in &sources {
        let from = tmp.join(name);
        std::fs::rename(&from, cur.join(name))
            .with_context(|| format!("renaming {}", from.display()))?;
    }
    fsync_dir(&cur)?;
    fsync_dir(&tmp)?;
    fsync_dir(&args.to)?;
    // A relative `--to` with one component has the parent "" (the current directory).
    match args.to.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_dir(p)?,
        _ => fsync_dir(Path::new("."))?,
    }
    let total = started.elapsed();

    let s = |d: Duration| d.as_secs_f64();
    println!(
        "copied {} files, {} bytes ({:.1} MB) in {:.3} s ({:.1} MB/s): write {:.3} s \
         (of which reading the source {:.3} s), syncfs {:.3} s, rename + dir fsync {:.3} s",
        sources.len(),
        bytes,
        bytes as f64 / 1e6,
        s(total),
        bytes as f64 / 1e6 / s(total),
        s(written),
        s(reading),
        s(synced - written),
        s(total - synced),
    );
    Ok(())
}

fn fsync_dir(d: &Path) -> anyhow::Result<()> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", d.display()))
}
