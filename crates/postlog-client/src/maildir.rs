//! The local Maildir replica, written durably in batches.
//!
//! Every message file is named after its hash: `new/<hash>` (unread) or
//! `cur/<hash>:2,<flags>`. A batch is written into `tmp/` (files named `postlog.<hash>`),
//! made durable with one filesystem barrier (`syncfs`; a batch of a few files, such as one
//! pushed message, fsyncs each file instead), renamed into place, and then the two
//! directories are fsynced. A crash leaves at most `tmp/postlog.*` files, removed on open.

use std::collections::{HashMap, HashSet};
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

/// One message to write, at `name` (`new/<hash>` or `cur/<hash>:2,FLAGS`).
pub struct NewMessage<'a> {
    pub hash: BlobHash,
    pub bytes: &'a [u8],
    pub name: String,
}

pub struct Maildir {
    root: PathBuf,
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
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every message file in `cur/` and `new/` whose name starts with a hash, by hash
    /// (`cur/<name>` or `new/<name>`).
    pub fn scan(&self) -> Result<HashMap<BlobHash, String>> {
        let mut out = HashMap::new();
        for sub in ["cur", "new"] {
            let d = self.root.join(sub);
            for e in std::fs::read_dir(&d).map_err(err(&d))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(h) = hash_of_name(&name) {
                    out.insert(h, format!("{sub}/{name}"));
                }
            }
        }
        Ok(out)
    }

    /// Number of message files held.
    pub fn count(&self) -> Result<usize> {
        Ok(self.scan()?.len())
    }

    pub fn exists(&self, name: &str) -> bool {
        self.root.join(name).exists()
    }

    /// Writes a batch durably; a message whose file already exists at its name is skipped
    /// (so a batch replayed after a crash adds nothing twice). Returns how many files were
    /// added.
    pub fn write_batch(&mut self, batch: &[NewMessage<'_>]) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let mut staged = Vec::new();
        let mut seen_in_batch = HashSet::new();
        let todo: Vec<&NewMessage<'_>> = batch
            .iter()
            .filter(|m| seen_in_batch.insert(m.hash) && !self.exists(&m.name))
            .collect();
        // A few files (a pushed message in --watch) are cheaper to fsync one by one than to
        // flush the whole filesystem, which may hold other programs' dirty data; a large
        // batch gets one barrier for all its files instead of one fsync per file.
        let per_file = todo.len() <= PER_FILE_FSYNC_MAX;
        for m in todo {
            let t = tmp.join(format!("{TMP_PREFIX}{}", m.hash));
            write_file(&t, m.bytes, per_file)?;
            staged.push((t, self.root.join(&m.name)));
        }
        if staged.is_empty() {
            return Ok(0);
        }
        if !per_file {
            let dir = std::fs::File::open(&tmp).map_err(err(&tmp))?;
            rustix::fs::syncfs(&dir).map_err(|e| MaildirError {
                path: tmp.clone(),
                source: e.into(),
            })?;
        }
        for (t, dest) in &staged {
            std::fs::rename(t, dest).map_err(err(dest))?;
        }
        self.sync_dirs()?;
        Ok(staged.len())
    }

    /// Renames a message file (e.g. to new flags). `Ok(false)` if `from` is gone (a mail
    /// reader moved it meanwhile; the next scan sees where).
    pub fn rename(&self, from: &str, to: &str) -> Result<bool> {
        match std::fs::rename(self.root.join(from), self.root.join(to)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(MaildirError {
                path: self.root.join(from),
                source: e,
            }),
        }
    }

    /// Makes renames and new files in `cur/` and `new/` durable.
    pub fn sync_dirs(&self) -> Result<()> {
        fsync_dir(&self.root.join("new"))?;
        fsync_dir(&self.root.join("cur"))
    }
}

/// Batches of at most this many files are made durable file by file (fsync each), larger
/// ones with one syncfs barrier.
const PER_FILE_FSYNC_MAX: usize = 4;

/// Writes `bytes` to a new file at `path`, fsyncing it if `sync`.
fn write_file(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(err(path))?;
    f.write_all(bytes).map_err(err(path))?;
    if sync {
        f.sync_all().map_err(err(path))?;
    }
    Ok(())
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
        let (ha, hb) = (BlobHash::of(&a), BlobHash::of(&b));
        let batch = [
            NewMessage {
                hash: ha,
                bytes: &a,
                name: format!("new/{ha}"),
            },
            NewMessage {
                hash: hb,
                bytes: &b,
                name: format!("cur/{hb}:2,S"),
            },
            NewMessage {
                hash: hb,
                bytes: &b,
                name: format!("cur/{hb}:2,S"),
            },
        ];
        assert_eq!(md.write_batch(&batch).unwrap(), 2);
        assert_eq!(md.write_batch(&batch).unwrap(), 0);
        std::fs::write(root.join("tmp").join("postlog.leftover"), b"x").unwrap();
        let md = Maildir::open(&root).unwrap();
        assert_eq!(md.count().unwrap(), 2);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read(root.join(format!("cur/{hb}:2,S"))).unwrap(),
            b
        );
        assert!(
            md.rename(&format!("cur/{hb}:2,S"), &format!("cur/{hb}:2,FS"))
                .unwrap()
        );
        assert!(
            !md.rename(&format!("cur/{hb}:2,S"), &format!("cur/{hb}:2,F"))
                .unwrap()
        );
    }
}
