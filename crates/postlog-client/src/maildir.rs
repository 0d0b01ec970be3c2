//! The local Maildir replica, written durably in batches.
//!
//! Every message file is named after its hash: `new/<hash>` (unread) or
//! `cur/<hash>:2,<flags>`. A batch is written into `tmp/` (files named `postlog.<hash>`),
//! made durable with one filesystem barrier (`syncfs`), renamed into place, and then the two
//! directories are fsynced. A crash leaves at most `tmp/postlog.*` files, removed on open.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use postlog_proto::BlobHash;

#[derive(Debug, thiserror::Error)]
#[error("Maildir {path}: {source}")]
pub struct MaildirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> MaildirError + '_ {
    move |source| MaildirError {
        path: path.to_owned(),
        source,
    }
}

type Result<T> = std::result::Result<T, MaildirError>;

/// Prefix of the files this client writes into `tmp/`.
const TMP_PREFIX: &str = "postlog.";

/// One message to write.
pub struct NewMessage<'a> {
    pub hash: BlobHash,
    pub bytes: &'a [u8],
    /// Maildir flags (sorted ASCII letters); `None` means unread and goes to `new/`.
    pub flags: Option<String>,
}

pub struct Maildir {
    root: PathBuf,
    known: Option<HashSet<BlobHash>>,
}

impl Maildir {
    /// Opens (creating) a Maildir and removes this client's leftover `tmp/` files.
    pub fn open(root: &Path) -> Result<Maildir> {
        let mut created = false;
        for sub in ["cur", "new", "tmp"] {
            let d = root.join(sub);
            if !d.is_dir() {
                std::fs::create_dir_all(&d).map_err(err(&d))?;
                created = true;
            }
        }
        if created {
            fsync_dir(root)?;
            if let Some(parent) = root.parent() {
                fsync_dir(parent)?;
            }
        }
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(err(&tmp))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Maildir {
            root: root.to_owned(),
            known: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The hashes of every message file in `cur/` and `new/` (names starting with a hash).
    pub fn scan(&self) -> Result<HashSet<BlobHash>> {
        let mut out = HashSet::new();
        for sub in ["cur", "new"] {
            let d = self.root.join(sub);
            for e in std::fs::read_dir(&d).map_err(err(&d))?.flatten() {
                if let Some(h) = hash_of_name(&e.file_name().to_string_lossy()) {
                    out.insert(h);
                }
            }
        }
        Ok(out)
    }

    /// Number of message files held.
    pub fn count(&self) -> Result<usize> {
        Ok(self.scan()?.len())
    }

    fn known(&mut self) -> Result<&mut HashSet<BlobHash>> {
        if self.known.is_none() {
            self.known = Some(self.scan()?);
        }
        Ok(self.known.get_or_insert_with(HashSet::new))
    }

    /// Writes a batch durably; messages already present are skipped (so a batch replayed
    /// after a crash adds nothing twice). Returns how many files were added.
    pub fn write_batch(&mut self, batch: &[NewMessage<'_>]) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let mut staged = Vec::new();
        let mut seen_in_batch = HashSet::new();
        for m in batch {
            if self.known()?.contains(&m.hash) || !seen_in_batch.insert(m.hash) {
                continue;
            }
            let t = tmp.join(format!("{TMP_PREFIX}{}", m.hash));
            std::fs::write(&t, m.bytes).map_err(err(&t))?;
            let dest = match &m.flags {
                None => self.root.join("new").join(m.hash.to_hex()),
                Some(f) => self.root.join("cur").join(format!("{}:2,{f}", m.hash)),
            };
            staged.push((t, dest, m.hash));
        }
        if staged.is_empty() {
            return Ok(0);
        }
        // One barrier for the whole batch instead of one fsync per file.
        let dir = std::fs::File::open(&tmp).map_err(err(&tmp))?;
        rustix::fs::syncfs(&dir).map_err(|e| MaildirError {
            path: tmp.clone(),
            source: e.into(),
        })?;
        for (t, dest, hash) in &staged {
            std::fs::rename(t, dest).map_err(err(dest))?;
            self.known()?.insert(*hash);
        }
        fsync_dir(&self.root.join("new"))?;
        fsync_dir(&self.root.join("cur"))?;
        Ok(staged.len())
    }
}

/// The hash a Maildir file name starts with, if it is one of ours.
pub fn hash_of_name(name: &str) -> Option<BlobHash> {
    name.get(..64)?.parse().ok()
}

fn fsync_dir(d: &Path) -> Result<()> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(err(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_idempotent_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        let mut md = Maildir::open(&root).unwrap();
        let a = b"Subject: a\n\nx".to_vec();
        let b = b"Subject: b\n\ny".to_vec();
        let batch = [
            NewMessage {
                hash: BlobHash::of(&a),
                bytes: &a,
                flags: None,
            },
            NewMessage {
                hash: BlobHash::of(&b),
                bytes: &b,
                flags: Some("S".into()),
            },
            NewMessage {
                hash: BlobHash::of(&b),
                bytes: &b,
                flags: Some("S".into()),
            },
        ];
        assert_eq!(md.write_batch(&batch).unwrap(), 2);
        assert_eq!(md.write_batch(&batch).unwrap(), 0);
        std::fs::write(root.join("tmp").join("postlog.leftover"), b"x").unwrap();
        let md = Maildir::open(&root).unwrap();
        assert_eq!(md.count().unwrap(), 2);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        let cur = root.join("cur").join(format!("{}:2,S", BlobHash::of(&b)));
        assert_eq!(std::fs::read(cur).unwrap(), b);
    }
}
