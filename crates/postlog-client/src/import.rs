//! `postlog import maildir`: store every message of an existing Maildir on the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::task::JoinSet;

use crate::{ClientError, Connection};

/// Messages stored concurrently (each on its own stream).
pub const IMPORT_CONCURRENCY: usize = 64;

/// A message file found in a Maildir, with the tags its location and flags imply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub tags: Vec<String>,
}

/// Finds every message file in `cur/` and `new/` of `root` and of its Maildir++
/// subfolders (`.Name/`). Top-level mail is tagged `inbox`; a subfolder's mail gets the
/// folder's name (dots become `/`) as a tag.
pub fn find_messages(root: &Path) -> std::io::Result<Vec<Found>> {
    let mut out = Vec::new();
    let mut folders = vec![(root.to_owned(), "inbox".to_string())];
    for e in std::fs::read_dir(root)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(folder) = name.strip_prefix('.')
            && !folder.is_empty()
            && !folder.starts_with('.')
            && e.path().join("cur").is_dir()
        {
            folders.push((e.path(), folder.replace('.', "/")));
        }
    }
    for (dir, folder_tag) in folders {
        for sub in ["new", "cur"] {
            let d = dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut files: Vec<_> = entries.flatten().collect();
            files.sort_by_key(|e| e.file_name());
            for e in files {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    continue;
                }
                let mut tags = vec![folder_tag.clone()];
                tags.extend(tags_for_name(&name, sub == "new"));
                out.push(Found {
                    path: e.path(),
                    tags,
                });
            }
        }
    }
    Ok(out)
}

/// Tags implied by a Maildir file name's flags (`:2,FRS`) and its directory.
pub fn tags_for_name(name: &str, in_new: bool) -> Vec<String> {
    let flags = name.rsplit_once(":2,").map(|(_, f)| f).unwrap_or("");
    let mut tags = Vec::new();
    if in_new || !flags.contains('S') {
        tags.push("unread".to_string());
    }
    for (flag, tag) in [
        ('F', "flagged"),
        ('R', "replied"),
        ('P', "passed"),
        ('D', "draft"),
        ('T', "deleted"),
    ] {
        if flags.contains(flag) {
            tags.push(tag.to_string());
        }
    }
    tags
}

/// Why a file is not a mail message, if it is not.
pub fn garbage_reason(bytes: &[u8], max: u64) -> Option<String> {
    if bytes.is_empty() {
        return Some("empty file".into());
    }
    if bytes.len() as u64 > max {
        return Some(format!(
            "{} bytes is over the {max}-byte limit",
            bytes.len()
        ));
    }
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let header_name = first.split(|b| *b == b':').next().unwrap_or(&[]);
    let is_header = first.contains(&b':')
        && !header_name.is_empty()
        && header_name
            .iter()
            .all(|b| (33..=126).contains(b) && *b != b':');
    if !(is_header || first.starts_with(b"From ")) {
        return Some("does not start with a mail header".into());
    }
    None
}

enum Outcome {
    Stored { new: bool, bytes: u64 },
    Skipped(String),
    Fatal(ClientError),
}

async fn import_one(conn: &Connection, f: &Found) -> Outcome {
    let bytes = match tokio::fs::read(&f.path).await {
        Ok(b) => b,
        Err(e) => return Outcome::Skipped(e.to_string()),
    };
    if let Some(why) = garbage_reason(&bytes, postlog_proto::limits::MAX_MESSAGE_SIZE) {
        return Outcome::Skipped(why);
    }
    match conn.store(&bytes, &f.tags).await {
        Ok((_, _, new)) => Outcome::Stored {
            new,
            bytes: bytes.len() as u64,
        },
        Err(ClientError::Server {
            code: Some(c),
            message,
        }) if !c.is_retryable() => Outcome::Skipped(format!("refused by the server: {message}")),
        Err(e) => Outcome::Fatal(e),
    }
}

#[derive(Debug, Default)]
pub struct ImportReport {
    pub found: u64,
    pub stored: u64,
    pub already: u64,
    pub bytes: u64,
    pub skipped: Vec<(PathBuf, String)>,
}

/// Counters for a progress display.
#[derive(Debug, Default)]
pub struct ImportProgress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

/// Stores every message found, `IMPORT_CONCURRENCY` at a time. Garbage files are skipped
/// and reported; a storage failure on the server stops the import with an error.
pub async fn import_maildir(
    conn: &Connection,
    root: &Path,
    progress: Arc<ImportProgress>,
) -> Result<ImportReport, ClientError> {
    let found = find_messages(root)
        .map_err(|e| ClientError::Protocol(format!("reading {}: {e}", root.display())))?;
    let mut report = ImportReport {
        found: found.len() as u64,
        ..Default::default()
    };
    progress.total.store(found.len() as u64, Ordering::Relaxed);
    let mut tasks: JoinSet<(PathBuf, Outcome)> = JoinSet::new();
    let mut iter = found.into_iter();
    loop {
        while tasks.len() < IMPORT_CONCURRENCY {
            let Some(f) = iter.next() else { break };
            let conn = conn.clone();
            tasks.spawn(async move {
                let outcome = import_one(&conn, &f).await;
                (f.path, outcome)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (path, outcome) =
            joined.map_err(|e| ClientError::Protocol(format!("import task: {e}")))?;
        progress.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Stored { new: true, bytes } => {
                report.stored += 1;
                report.bytes += bytes;
            }
            Outcome::Stored { new: false, .. } => report.already += 1,
            Outcome::Skipped(why) => report.skipped.push((path, why)),
            Outcome::Fatal(e) => return Err(e),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_garbage() {
        assert_eq!(tags_for_name("123.host:2,FS", false), vec!["flagged"]);
        assert_eq!(tags_for_name("123.host", true), vec!["unread"]);
        assert_eq!(
            tags_for_name("1:2,RT", false),
            vec!["unread", "replied", "deleted"]
        );
        assert!(garbage_reason(b"", 10).is_some());
        assert!(garbage_reason(b"\x00\x01binary", 100).is_some());
        assert!(garbage_reason(b"Subject: hi\n\nbody", 100).is_none());
        assert!(garbage_reason(b"From a@b Mon\nSubject: x\n\n", 100).is_none());
        assert!(garbage_reason(b"Subject: hi\n\nbody", 5).is_some());
    }
}
