//! The local outbox: messages handed to `postlog sendmail` while the server could not be
//! reached, kept durably until a later connection sends them.
//!
//! `PROFILE/outbox/<hash>.env` holds the envelope (the sender on the first line, one
//! recipient per following line; empty means "from the headers"), `<hash>.eml` the
//! message. Each is written tmp -> fsync -> rename -> fsync dir, the envelope first, so an
//! `.eml` file always has its envelope. Send is idempotent by hash on the server, so
//! flushing an entry twice (a crash after the server's answer, before the removal) sends
//! it once; queueing the same bytes twice keeps one entry.

use std::path::{Path, PathBuf};

use postlog_proto::{BlobHash, ErrorCode};

use crate::connection::{ClientError, Connection};
use crate::profile::{ProfileError, write_atomic};

/// One queued message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub hash: BlobHash,
    pub from: String,
    pub recipients: Vec<String>,
}

/// What a flush did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Messages the server accepted.
    pub sent: Vec<BlobHash>,
    /// Messages the server refused for good, moved to `outbox/failed/`, with the reason.
    pub failed: Vec<(BlobHash, String)>,
}

/// `PROFILE/outbox`.
#[derive(Clone, Debug)]
pub struct Outbox {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Outbox {
    pub fn open(profile_dir: &Path) -> Result<Outbox, ProfileError> {
        let dir = profile_dir.join("outbox");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Outbox { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps a message durably until [`Outbox::flush`] sends it.
    pub fn put(
        &self,
        bytes: &[u8],
        from: &str,
        recipients: &[String],
    ) -> Result<BlobHash, ProfileError> {
        let hash = BlobHash::of(bytes);
        let mut env = String::from(from);
        for r in recipients {
            env.push('\n');
            env.push_str(r);
        }
        let stem = self.dir.join(hash.to_hex());
        write_atomic(&stem.with_extension("env"), env.as_bytes(), 0o600)?;
        write_atomic(&stem.with_extension("eml"), bytes, 0o600)?;
        Ok(hash)
    }

    /// The queued messages, oldest first.
    pub fn list(&self) -> Result<Vec<Queued>, ProfileError> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("eml") {
                continue;
            }
            let Some(hash) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<BlobHash>().ok())
            else {
                continue;
            };
            let env_path = path.with_extension("env");
            let env = match std::fs::read_to_string(&env_path) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io(&env_path)(e)),
            };
            let mut lines = env.lines();
            let from = lines.next().unwrap_or("").to_string();
            let recipients = lines.filter(|l| !l.is_empty()).map(String::from).collect();
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            found.push((
                modified,
                Queued {
                    hash,
                    from,
                    recipients,
                },
            ));
        }
        found.sort_by_key(|(t, q)| (*t, q.hash));
        Ok(found.into_iter().map(|(_, q)| q).collect())
    }

    fn read(&self, q: &Queued) -> Result<Vec<u8>, ProfileError> {
        let p = self.dir.join(q.hash.to_hex()).with_extension("eml");
        std::fs::read(&p).map_err(io(&p))
    }

    fn remove(&self, q: &Queued) -> Result<(), ProfileError> {
        let stem = self.dir.join(q.hash.to_hex());
        for ext in ["eml", "env"] {
            let p = stem.with_extension(ext);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// Moves a message the server refused for good out of the queue, to `outbox/failed/`.
    fn fail(&self, q: &Queued) -> Result<(), ProfileError> {
        let failed = self.dir.join("failed");
        std::fs::create_dir_all(&failed).map_err(io(&failed))?;
        for ext in ["eml", "env"] {
            let name = format!("{}.{ext}", q.hash.to_hex());
            let from = self.dir.join(&name);
            if from.exists() {
                std::fs::rename(&from, failed.join(&name)).map_err(io(&from))?;
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// Sends every queued message, oldest first. A retryable failure (connection lost,
    /// server busy) stops the flush and is returned, with everything unsent still queued;
    /// a message the server refuses for good is moved to `outbox/failed/` and reported.
    pub async fn flush(&self, conn: &Connection) -> Result<Flushed, FlushError> {
        let mut out = Flushed::default();
        for q in self.list()? {
            let bytes = self.read(&q)?;
            match conn.send(&bytes, &q.from, &q.recipients).await {
                Ok(_) => {
                    self.remove(&q)?;
                    out.sent.push(q.hash);
                }
                Err(e) if e.is_retryable() => return Err(FlushError::Client(e)),
                Err(e @ ClientError::Server { .. }) => {
                    tracing::warn!(hash = %q.hash, error = %e, "queued message refused");
                    self.fail(&q)?;
                    out.failed.push((q.hash, e.to_string()));
                }
                Err(e) => return Err(FlushError::Client(e)),
            }
        }
        Ok(out)
    }
}

/// Why a flush stopped.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Local(#[from] ProfileError),
}

/// The sysexits(3) code `postlog sendmail` exits with for a server's refusal.
pub fn exit_code_for(code: Option<ErrorCode>) -> u8 {
    match code {
        Some(ErrorCode::SenderNotAllowed) => 77, // EX_NOPERM
        Some(ErrorCode::NotMail | ErrorCode::BadRecipients | ErrorCode::TooLarge) => 65, // EX_DATAERR
        _ => 75, // EX_TEMPFAIL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_and_idempotent_requeue() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).unwrap();
        let h = o
            .put(b"From: a@b.c\n\nx\n", "", &["x@y.z".into(), "w@y.z".into()])
            .unwrap();
        o.put(b"From: a@b.c\n\nx\n", "", &["x@y.z".into(), "w@y.z".into()])
            .unwrap();
        let h2 = o.put(b"From: a@b.c\n\ny\n", "s@b.c", &[]).unwrap();
        let list = o.list().unwrap();
        assert_eq!(list.len(), 2);
        let first = list.iter().find(|q| q.hash == h).unwrap();
        assert_eq!(first.recipients, ["x@y.z", "w@y.z"]);
        assert_eq!(first.from, "");
        let second = list.iter().find(|q| q.hash == h2).unwrap();
        assert_eq!(
            (second.from.as_str(), second.recipients.len()),
            ("s@b.c", 0)
        );
        o.remove(first).unwrap();
        o.fail(second).unwrap();
        assert!(o.list().unwrap().is_empty());
        assert!(
            dir.path()
                .join("outbox/failed")
                .join(format!("{h2}.eml"))
                .exists()
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(o.dir()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "only failed/ remains: {names:?}");
    }
}
