//! `hash-all`: BLAKE3 of every file under the given paths, timed.
//!
//! The hashing half of the sync benchmark's durable-copy limit: a Postlog client verifies
//! every message against its hash, so the work a full sync cannot avoid is "write the
//! files durably" plus "hash them". Files are read with one `read` each (from the page
//! cache when warm) and hashed on one thread, as the client does. Prints files, bytes,
//! seconds and GB/s; `--threads` spreads the files over more threads.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

/// BLAKE3-hash every regular file under PATHS and report the time.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Files or directories (walked recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Hashing threads (files are divided between them).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.threads > 0, "--threads must be at least 1");
    let mut files = Vec::new();
    for p in &args.paths {
        walk(p, &mut files)?;
    }
    files.sort();
    let started = Instant::now();
    let chunk = files.len().div_ceil(args.threads).max(1);
    let results: Vec<anyhow::Result<(u64, [u8; 32])>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| s.spawn(move || hash_files(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a hashing thread panicked")))
            })
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut bytes = 0;
    let mut digest = blake3::Hasher::new();
    for r in results {
        let (b, d) = r?;
        bytes += b;
        digest.update(&d);
    }
    println!(
        "hashed {} files, {} bytes ({:.1} MB) in {:.3} s, {:.2} GB/s, {} thread(s); digest of digests {}",
        files.len(),
        bytes,
        bytes as f64 / 1e6,
        secs,
        bytes as f64 / 1e9 / secs,
        args.threads,
        &digest.finalize().to_hex()[..16]
    );
    Ok(())
}

/// Hashes each file; returns the bytes read and a digest of the per-file hashes (so the
/// work cannot be optimised away and two runs can be compared).
fn hash_files(files: &[PathBuf]) -> anyhow::Result<(u64, [u8; 32])> {
    let mut bytes = 0;
    let mut all = blake3::Hasher::new();
    for f in files {
        let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        bytes += data.len() as u64;
        all.update(blake3::hash(&data).as_bytes());
    }
    Ok((bytes, *all.finalize().as_bytes()))
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if meta.is_file() {
        out.push(p.to_owned());
    } else if meta.is_dir() {
        for e in std::fs::read_dir(p).with_context(|| format!("listing {}", p.display()))? {
            walk(&e?.path(), out)?;
        }
    }
    Ok(())
}
