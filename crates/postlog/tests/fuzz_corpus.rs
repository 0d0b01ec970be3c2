//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the
//! fuzz targets run (`fuzz/src/lib.rs`, included below), so plain `cargo test` keeps every
//! seed and every committed finding passing without cargo-fuzz or a nightly toolchain.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/lib.rs"]
mod checks;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Runs `target`'s check on every file of its corpus directory; fails on a missing or empty
/// directory (so the test cannot pass vacuously) and names every input that panicked.
fn replay(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz check named {target} in fuzz/src/lib.rs"));
    let dir = corpus_root().join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    files.retain(|p| p.is_file());
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    let mut failed = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    // Written to stderr directly rather than with eprintln!, which the test harness would
    // capture: the count shows in every CI log, not only on failure.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz corpus {target}: replayed {} inputs, {} failed",
        files.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{target}: {} corpus inputs failed (reproduce with `cargo fuzz run {target} FILE`):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*
        const REPLAYED: &[&str] = &[$(stringify!($target)),*];
    };
}

replay_tests!(
    wire_request,
    wire_response,
    record,
    frame,
    login_url,
    maildir_name,
    server_config,
    smtp_session,
    mail_submission,
);

/// A new fuzz target needs a test above and a corpus directory; a stray corpus directory
/// means a renamed or removed target.
#[test]
fn every_target_has_a_replay_test_and_a_corpus() {
    let mut targets: Vec<&str> = checks::TARGETS.iter().map(|(name, _)| *name).collect();
    targets.sort_unstable();
    let mut replayed = REPLAYED.to_vec();
    replayed.sort_unstable();
    assert_eq!(
        replayed, targets,
        "replay tests vs. fuzz/src/lib.rs TARGETS"
    );
    let root = corpus_root();
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("corpus root {} is missing: {e}", root.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort_unstable();
    assert_eq!(dirs, targets, "fuzz/corpus/ directories vs. fuzz targets");
}
