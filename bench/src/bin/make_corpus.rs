//! `make-corpus`: writes the benchmark corpus as a Maildir.
//!
//! `make-corpus --seed S --messages N --out DIR` writes messages `0..N` of corpus `S` with
//! [`postlog_bench::write_maildir`] (mostly `cur/<i>.bench:2,S`, the newest 2% in `new/`).
//! With `--from I` it writes messages `I..I+N` instead, all into `new/<i>.bench`: mail that
//! arrives after a mailbox of `I` messages (the sync benchmark's incremental batches).
//! Files are not fsynced. Prints the message count and the bytes written.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

/// Write the deterministic benchmark corpus as a Maildir.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Corpus seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of messages to write.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// First message index; when above 0, every message goes to `new/<i>.bench`.
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// The Maildir to write (created with `cur/`, `new/` and `tmp/`).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let bytes = if args.from == 0 {
        postlog_bench::write_maildir(&args.out, args.seed, args.messages)
            .with_context(|| format!("writing {}", args.out.display()))?
    } else {
        write_new(&args)?
    };
    println!(
        "{} messages, {} bytes ({:.1} MB), seed {}, from {}, in {:.1} s: {}",
        args.messages,
        bytes,
        bytes as f64 / 1e6,
        args.seed,
        args.from,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// Messages `from..from + messages` as `new/<i>.bench`.
fn write_new(args: &Args) -> anyhow::Result<u64> {
    for sub in ["cur", "new", "tmp"] {
        let d = args.out.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut total = 0;
    for i in args.from..args.from + args.messages {
        let bytes = postlog_bench::message(args.seed, i);
        let path = args.out.join("new").join(format!("{i}.bench"));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        total += bytes.len() as u64;
    }
    Ok(total)
}
