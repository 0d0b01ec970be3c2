//! The content-addressed blob store: staging incoming messages and placing them durably.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use postlog_proto::BlobHash;

use crate::{AccountId, Result, StoreError};

/// Where an account's blob with this hash lives.
pub fn blob_path(root: &Path, account: AccountId, hash: &BlobHash) -> PathBuf {
    let hex = hash.to_hex();
    root.join("blobs")
        .join(account.to_string())
        .join(&hex[..2])
        .join(hex)
}

/// An incoming message being written to `tmp/` and hashed as it arrives.
pub struct BlobWriter {
    /// Buffered: QUIC delivers ~1.2 KB chunks, and one write() per chunk costs more than
    /// the copy.
    file: std::io::BufWriter<File>,
    path: Option<PathBuf>,
    hasher: blake3::Hasher,
    size: u64,
    max: u64,
}

impl BlobWriter {
    pub fn create(tmp_dir: &Path, max: u64) -> Result<Self> {
        let name = format!("{:016x}.blob", rand::random::<u64>());
        let path = tmp_dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(BlobWriter {
            file: std::io::BufWriter::with_capacity(256 * 1024, file),
            path: Some(path),
            hasher: blake3::Hasher::new(),
            size: 0,
            max,
        })
    }

    /// Appends a chunk. Fails once the message grows past the size limit.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(StoreError::TooLarge {
                size: self.size,
                max: self.max,
            });
        }
        self.hasher.update(chunk);
        let path = self.path.as_deref().unwrap_or(Path::new("tmp"));
        self.file
            .write_all(chunk)
            .map_err(|e| StoreError::io(path, e))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ends the message: its bytes are written (not yet durable: the writer thread makes a
    /// whole group durable with one barrier before recording any of it).
    pub fn finish(mut self) -> Result<StagedBlob> {
        let path = self.path.take().unwrap_or_default();
        if let Err(e) = self.file.flush() {
            let _ = std::fs::remove_file(&path);
            return Err(StoreError::io(&path, e));
        }
        Ok(StagedBlob {
            hash: self.hasher.finalize().into(),
            size: self.size,
            tmp: Some(path),
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A message durable in `tmp/`, not yet in the store. Dropping it removes the file.
#[derive(Debug)]
pub struct StagedBlob {
    pub hash: BlobHash,
    pub size: u64,
    tmp: Option<PathBuf>,
}

impl StagedBlob {
    /// A second staged copy of the same bytes, for delivering one message into several
    /// accounts (each placement consumes its copy). A hard link when the filesystem has
    /// them (blobs are never modified in place, so sharing the inode is safe), else a copy.
    pub fn duplicate(&self) -> Result<StagedBlob> {
        let src = self.tmp.as_deref().unwrap_or(Path::new("tmp"));
        let dir = src.parent().unwrap_or(Path::new("."));
        let dest = dir.join(format!("{:016x}.blob", rand::random::<u64>()));
        if std::fs::hard_link(src, &dest).is_err() {
            std::fs::copy(src, &dest).map_err(|e| StoreError::io(&dest, e))?;
        }
        Ok(StagedBlob {
            hash: self.hash,
            size: self.size,
            tmp: Some(dest),
        })
    }

    /// The staged file (for a backend that uploads it elsewhere; dropping the
    /// `StagedBlob` still removes it).
    pub fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(Path::new("tmp"))
    }

    /// Moves the staged file to its final place. The caller fsyncs the directory.
    pub(crate) fn place(mut self, dest: &Path) -> Result<()> {
        let tmp = self.tmp.take().unwrap_or_default();
        match std::fs::rename(&tmp, dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tmp.exists() => {
                // The account's fan-out directory is missing (account creation interrupted).
                let dir = dest.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
                for d in dir.ancestors().skip(1).take(2) {
                    crate::fsync_dir(d)?;
                }
                std::fs::rename(&tmp, dest).map_err(|e| StoreError::io(dest, e))
            }
            r => r.map_err(|e| StoreError::io(dest, e)),
        }
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if let Some(p) = self.tmp.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads a blob and verifies it against its hash; a mismatch is [`StoreError::CorruptBlob`].
pub fn read_verified(path: &Path, hash: &BlobHash) -> Result<Option<Vec<u8>>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| StoreError::io(path, e))?;
    if BlobHash::of(&buf) != *hash {
        return Err(StoreError::CorruptBlob(*hash));
    }
    Ok(Some(buf))
}

/// Creates an account's 256 fan-out directories, durably.
pub(crate) fn create_account_dirs(root: &Path, account: AccountId) -> Result<()> {
    let base = root.join("blobs").join(account.to_string());
    for i in 0..=255u8 {
        let d = base.join(format!("{i:02x}"));
        std::fs::create_dir_all(&d).map_err(|e| StoreError::io(&d, e))?;
    }
    for i in 0..=255u8 {
        crate::fsync_dir(&base.join(format!("{i:02x}")))?;
    }
    crate::fsync_dir(&base)?;
    crate::fsync_dir(&root.join("blobs"))
}
