//! The local Maildir replica, written durably in batches.
//!
//! Every message file is named after its hash: `new/<hash>` (unread) or
//! `cur/<hash>:2,<flags>`. A batch is written into `tmp/` (files named `postlog.<hash>`),
//! made durable with one filesystem barrier (`syncfs`; a batch of a few files, such as one
//! pushed message, fsyncs each file instead, and so does a batch written while other
//! programs have much dirty data, from several threads: see `Barrier`), renamed into
//! place, and then the two
//! directories are fsynced. A crash leaves at most `tmp/postlog.*` files, removed on open.
//! The first half ([`Maildir::prepare`]) needs no names, so the sync engine runs it beside
//! the batch's state work; [`Maildir::place`] then renames.
//!
//! A [`Stager`] may write a message's `tmp/` file on another thread as soon as the message
//! arrives, before its batch is complete; the batch then finds the file written and only
//! makes it durable and renames it. Files the batch turns out not to need are removed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

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

/// A batch's `tmp/` files, complete and durable, claimed from the stager until
/// [`Maildir::place`] renames them (or [`Maildir::discard`] removes them).
#[must_use]
pub struct Prepared {
    hashes: Vec<BlobHash>,
}

pub struct Maildir {
    root: PathBuf,
    staging: Arc<Staging>,
}

/// `tmp/` files written ahead of their batch, by hash, shared by the [`Maildir`] (the
/// batch writer) and its [`Stager`].
#[derive(Default)]
struct Staging {
    files: Mutex<Staged>,
    /// Signalled whenever a file leaves [`Stage::Writing`].
    written: Condvar,
}

#[derive(Default)]
struct Staged {
    by_hash: HashMap<BlobHash, Stage>,
    /// Batches the writer has begun: the stager creates no file for them any more, so that
    /// every file of a batch is either taken by it or removed when it ends.
    batches_begun: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// The stager is writing `tmp/postlog.<hash>`.
    Writing,
    /// The file is complete in `tmp/` (written, not yet made durable).
    Written,
    /// The batch writer owns the file until its batch is renamed into place; the stager
    /// leaves it alone (writing it again could truncate a file being renamed).
    Claimed,
}

impl Staging {
    fn files(&self) -> MutexGuard<'_, Staged> {
        // The map stays consistent whatever a panicking holder did: every update is one
        // insert or remove.
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The map, once the stager is not writing `hash` (waits while it is).
    fn settled(&self, hash: &BlobHash) -> MutexGuard<'_, Staged> {
        self.written
            .wait_while(self.files(), |f| {
                f.by_hash.get(hash) == Some(&Stage::Writing)
            })
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes message files into a Maildir's `tmp/` ahead of their batch, from another
/// thread than the batch writer. Best effort: a file it fails to write is written (and
/// its error reported) by the batch.
pub struct Stager {
    tmp: PathBuf,
    staging: Arc<Staging>,
}

impl Stager {
    /// Writes the message's `tmp/` file unless it is there or being written already, or
    /// the writer has begun its batch (`batch`, counted from 0 since the Maildir was
    /// opened).
    pub fn stage(&self, batch: u64, hash: &BlobHash, bytes: &[u8]) {
        {
            let mut files = self.staging.files();
            if batch < files.batches_begun || files.by_hash.contains_key(hash) {
                return;
            }
            files.by_hash.insert(*hash, Stage::Writing);
        }
        let path = tmp_path(&self.tmp, hash);
        let written = write_file(&path, bytes, false).is_ok();
        {
            let mut files = self.staging.files();
            if written {
                files.by_hash.insert(*hash, Stage::Written);
            } else {
                let _ = std::fs::remove_file(&path);
                files.by_hash.remove(hash);
            }
        }
        self.staging.written.notify_all();
    }
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
            fsync_path(root)?;
            if let Some(parent) = root.parent() {
                fsync_path(parent)?;
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
            staging: Arc::default(),
        })
    }

    /// A [`Stager`] for this Maildir, to run on another thread.
    pub fn stager(&self) -> Stager {
        Stager {
            tmp: self.root.join("tmp"),
            staging: self.staging.clone(),
        }
    }

    /// Takes the `tmp/` file of a message for the current batch: `true` if the stager
    /// wrote it completely (waiting while it is being written), `false` if the caller must
    /// write it. Either way the stager leaves it alone until [`Maildir::release`].
    fn claim(&self, hash: &BlobHash) -> bool {
        let mut files = self.staging.settled(hash);
        let staged = files.by_hash.get(hash) == Some(&Stage::Written);
        files.by_hash.insert(*hash, Stage::Claimed);
        staged
    }

    /// Begins the next batch (call before its [`Maildir::write_batch`]): from now on the
    /// stager creates no file for it; the messages it has not staged yet, the batch writes.
    pub fn begin_batch(&self) {
        self.staging.files().batches_begun += 1;
    }

    /// Ends a batch: removes the staged files of `hashes` (the batch's messages) that the
    /// batch did not take (already held, or duplicates), waiting for any still being
    /// written, so that none is left behind.
    pub fn end_batch<'h>(&self, hashes: impl Iterator<Item = &'h BlobHash>) {
        let tmp = self.root.join("tmp");
        for h in hashes {
            let mut files = self.staging.settled(h);
            if files.by_hash.get(h) == Some(&Stage::Written) {
                let _ = std::fs::remove_file(tmp_path(&tmp, h));
                files.by_hash.remove(h);
            }
        }
    }

    /// Removes every staged file left (a stream that ended inside a batch). Call once the
    /// stager has stopped.
    pub fn discard_staged(&self) {
        let tmp = self.root.join("tmp");
        for (h, _) in self.staging.files().by_hash.drain() {
            let _ = std::fs::remove_file(tmp_path(&tmp, &h));
        }
    }

    /// Forgets the claims of a batch whose files are now in place.
    fn release(&self, hashes: &[BlobHash]) {
        let mut files = self.staging.files();
        for h in hashes {
            files.by_hash.remove(h);
        }
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
    /// added. [`Maildir::prepare`] and [`Maildir::place`] in one call.
    pub fn write_batch(&self, batch: &[NewMessage<'_>]) -> Result<usize> {
        let todo = batch.iter().filter(|m| !self.exists(&m.name));
        let prepared = self.prepare(todo.map(|m| (&m.hash, m.bytes)))?;
        self.place(batch, prepared)
    }

    /// Makes the `tmp/` file of every message of a batch durable before the batch knows
    /// the messages' names, so that it can run beside the batch's state work: takes the
    /// file the stager wrote (waiting while it writes) or writes it, then one barrier for
    /// all of them (a few files: an fsync each, cheaper than flushing the whole filesystem,
    /// which may hold other programs' dirty data). The files stay claimed from the stager
    /// until [`Maildir::place`] or [`Maildir::discard`]; on error none stays claimed.
    pub fn prepare<'m>(
        &self,
        messages: impl IntoIterator<Item = (&'m BlobHash, &'m [u8])>,
    ) -> Result<Prepared> {
        let tmp = self.root.join("tmp");
        let mut seen = HashSet::new();
        let todo: Vec<_> = messages
            .into_iter()
            .filter(|(h, _)| seen.insert(**h))
            .collect();
        let own: u64 = todo.iter().map(|(_, b)| b.len() as u64).sum();
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let barrier = choose_barrier(todo.len(), own, meminfo.as_deref());
        let per_file = barrier == Barrier::EachFile;
        let mut prepared = Prepared {
            hashes: Vec::with_capacity(todo.len()),
        };
        let written = todo.into_iter().try_for_each(|(hash, bytes)| {
            let t = tmp_path(&tmp, hash);
            prepared.hashes.push(*hash);
            if self.claim(hash) {
                if per_file {
                    fsync_path(&t)?;
                }
            } else {
                write_file(&t, bytes, per_file)?;
            }
            Ok(())
        });
        let durable = written.and_then(|()| match barrier {
            _ if prepared.hashes.is_empty() => Ok(()),
            Barrier::EachFile => Ok(()),
            Barrier::Threads => {
                let paths: Vec<PathBuf> =
                    prepared.hashes.iter().map(|h| tmp_path(&tmp, h)).collect();
                fsync_in_threads(&paths)
            }
            Barrier::Syncfs => {
                let dir = std::fs::File::open(&tmp).map_err(err(&tmp))?;
                rustix::fs::syncfs(&dir).map_err(|e| MaildirError {
                    path: tmp.clone(),
                    source: e.into(),
                })
            }
        });
        match durable {
            Ok(()) => Ok(prepared),
            Err(e) => {
                self.discard(prepared);
                Err(e)
            }
        }
    }

    /// Renames a batch's prepared files into place and fsyncs the directories; a message
    /// whose file already exists at its name is skipped. Prepared files the batch does not
    /// place (already held, duplicates, deleted again in the same batch) are removed.
    /// Returns how many files were added.
    pub fn place(&self, batch: &[NewMessage<'_>], prepared: Prepared) -> Result<usize> {
        let tmp = self.root.join("tmp");
        let mut ready: HashSet<BlobHash> = prepared.hashes.iter().copied().collect();
        let mut seen = HashSet::new();
        let mut claimed_here = Vec::new();
        let mut placed = 0;
        let mut rename_all = || {
            for m in batch {
                if !seen.insert(m.hash) {
                    continue;
                }
                let t = tmp_path(&tmp, &m.hash);
                if !ready.remove(&m.hash) {
                    if self.exists(&m.name) {
                        continue;
                    }
                    // Not prepared (the sync engine prepares every message it places):
                    // made durable here, on its own.
                    claimed_here.push(m.hash);
                    match self.claim(&m.hash) {
                        true => fsync_path(&t)?,
                        false => write_file(&t, m.bytes, true)?,
                    }
                }
                let dest = self.root.join(&m.name);
                match rename_new(&t, &dest).map_err(err(&dest))? {
                    true => placed += 1,
                    // Already there (a batch replayed after a crash): same name, same bytes.
                    false => {
                        let _ = std::fs::remove_file(&t);
                    }
                }
            }
            match placed {
                0 => Ok(()),
                _ => self.sync_dirs(),
            }
        };
        let done = rename_all();
        for h in &ready {
            let _ = std::fs::remove_file(tmp_path(&tmp, h));
        }
        // Only now: a claim released before the rename would let the stager rewrite
        // (truncate) a file being renamed into place.
        self.release(&prepared.hashes);
        self.release(&claimed_here);
        done.map(|()| placed)
    }

    /// Gives up a prepared batch (its state work failed): removes its files.
    pub fn discard(&self, prepared: Prepared) {
        let tmp = self.root.join("tmp");
        for h in &prepared.hashes {
            let _ = std::fs::remove_file(tmp_path(&tmp, h));
        }
        self.release(&prepared.hashes);
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

    /// Removes a deleted message's file: at `name`, or wherever a mail reader moved it.
    /// Returns the name it had, if there was a file. The caller makes it durable
    /// ([`Maildir::sync_dirs`]).
    pub fn remove(&self, hash: &BlobHash, name: &str) -> Result<Option<String>> {
        let found = match self.exists(name) {
            true => Some(name.to_owned()),
            // Renamed by a mail reader since the last scan: one listing, only in this case.
            false => self.scan()?.remove(hash),
        };
        if let Some(n) = &found {
            match std::fs::remove_file(self.root.join(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&self.root.join(n))(e)),
            }
        }
        Ok(found)
    }

    /// Makes renames and new files in `cur/` and `new/` durable.
    pub fn sync_dirs(&self) -> Result<()> {
        fsync_path(&self.root.join("new"))?;
        fsync_path(&self.root.join("cur"))
    }
}

/// Batches of at most this many files are made durable file by file (fsync each), larger
/// ones with one syncfs barrier.
const PER_FILE_FSYNC_MAX: usize = 4;

/// How a batch's `tmp/` files are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Barrier {
    /// An fsync per file as it is taken (a few files).
    EachFile,
    /// One `syncfs`: one flush for the whole batch, but it also writes every other
    /// program's dirty data on the file system.
    Syncfs,
    /// An fsync per file from [`FSYNC_THREADS`] threads, when other programs have much
    /// dirty data. Measured with 100 files of 50 KB: `syncfs` 6–7 ms with nothing else
    /// dirty and 580–680 ms with 1 GB of another program's data dirty; fsyncs from 8
    /// threads 15–23 ms either way (one thread: 25–55 ms).
    Threads,
}

/// Other programs' dirty and under-writeback data above which a batch is not made durable
/// with `syncfs` (the page cache's own background writeback starts at 10% of memory).
const OTHER_DIRTY_MAX: u64 = 64 * 1024 * 1024;
/// Threads that fsync a batch's files when `syncfs` would flush too much else.
const FSYNC_THREADS: usize = 8;

/// The barrier for a batch of `files` files of `own` bytes, given the text of
/// /proc/meminfo (`None`: unknown, `syncfs` as before).
fn choose_barrier(files: usize, own: u64, meminfo: Option<&str>) -> Barrier {
    if files <= PER_FILE_FSYNC_MAX {
        return Barrier::EachFile;
    }
    let kib = |key: &str| -> Option<u64> {
        let line = meminfo?.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    match (kib("Dirty:"), kib("Writeback:")) {
        (Some(d), Some(w)) if (d + w) * 1024 > own.saturating_add(OTHER_DIRTY_MAX) => {
            Barrier::Threads
        }
        _ => Barrier::Syncfs,
    }
}

/// Fsyncs every file in `paths`, from up to [`FSYNC_THREADS`] threads at once.
fn fsync_in_threads(paths: &[PathBuf]) -> Result<()> {
    let threads = paths.len().clamp(1, FSYNC_THREADS);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    paths
                        .iter()
                        .skip(i)
                        .step_by(threads)
                        .try_for_each(|p| fsync_path(p))
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| {
                Err(MaildirError {
                    path: paths.first().cloned().unwrap_or_default(),
                    source: std::io::Error::other("an fsync thread panicked"),
                })
            })
        })
    })
}

/// Where a message is written in `tmp/` before it is renamed into place.
fn tmp_path(tmp: &Path, hash: &BlobHash) -> PathBuf {
    tmp.join(format!("{TMP_PREFIX}{hash}"))
}

/// Renames `from` to `to` unless `to` exists: `false` if it does. One `renameat2` with
/// `RENAME_NOREPLACE` where the file system has it (ext4, XFS, Btrfs, tmpfs), instead of a
/// `stat` and a rename; elsewhere (`EINVAL`) the `stat` and the rename.
fn rename_new(from: &Path, to: &Path) -> std::io::Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            if to.exists() {
                return Ok(false);
            }
            std::fs::rename(from, to).map(|()| true)
        }
        Err(e) => Err(e.into()),
    }
}

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

/// fsync of a file or directory by path.
fn fsync_path(d: &Path) -> Result<()> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(err(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_files(root: &Path) -> usize {
        std::fs::read_dir(root.join("tmp")).unwrap().count()
    }

    #[test]
    fn staged_files_are_taken_by_their_batch_and_the_rest_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        let md = Maildir::open(&root).unwrap();
        let msgs: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("Subject: {i}\n\n{}", "x".repeat(i * 100)).into_bytes())
            .collect();
        let hashes: Vec<BlobHash> = msgs.iter().map(|m| BlobHash::of(m)).collect();
        // The stager has written the first 10 messages of batch 0 and races the batch
        // writer over the next 20; the batch needs only the first 20 of the 30.
        let stager = md.stager();
        for (m, h) in msgs.iter().zip(&hashes).take(10) {
            stager.stage(0, h, m);
        }
        assert_eq!(tmp_files(&root), 10);
        let ahead = std::thread::scope(|s| {
            let staging = s.spawn(|| {
                for (m, h) in msgs.iter().zip(&hashes).take(30).skip(10) {
                    stager.stage(0, h, m);
                }
            });
            md.begin_batch();
            let batch: Vec<NewMessage<'_>> = msgs
                .iter()
                .zip(&hashes)
                .take(20)
                .map(|(m, h)| NewMessage {
                    hash: *h,
                    bytes: m,
                    name: format!("new/{h}"),
                })
                .collect();
            let n = md.write_batch(&batch).unwrap();
            staging.join().unwrap();
            n
        });
        assert_eq!(ahead, 20);
        // Staged but not taken: removed when the batch ends.
        md.end_batch(hashes[..30].iter());
        assert_eq!(tmp_files(&root), 0);
        for (m, h) in msgs.iter().zip(&hashes).take(20) {
            assert_eq!(&std::fs::read(root.join(format!("new/{h}"))).unwrap(), m);
        }
        // A message of a batch already begun is not staged; one of a later batch is, and
        // its batch takes the file as it is (one pushed message: fsynced by itself).
        stager.stage(0, &hashes[30], &msgs[30]);
        assert_eq!(tmp_files(&root), 0);
        stager.stage(1, &hashes[31], &msgs[31]);
        stager.stage(1, &hashes[32], &msgs[32]);
        assert_eq!(tmp_files(&root), 2);
        md.begin_batch();
        let one = [NewMessage {
            hash: hashes[31],
            bytes: &msgs[31],
            name: format!("cur/{}:2,S", hashes[31]),
        }];
        assert_eq!(md.write_batch(&one).unwrap(), 1);
        assert_eq!(tmp_files(&root), 1);
        // A stream that ended inside a batch: what is left is removed.
        md.discard_staged();
        assert_eq!(tmp_files(&root), 0);
        assert_eq!(md.count().unwrap(), 21);
    }

    #[test]
    fn prepared_files_not_placed_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        let md = Maildir::open(&root).unwrap();
        let msgs: Vec<Vec<u8>> = (0..6)
            .map(|i| format!("Subject: {i}\n\nbody").into_bytes())
            .collect();
        let hashes: Vec<BlobHash> = msgs.iter().map(|m| BlobHash::of(m)).collect();
        let carried = || hashes.iter().zip(msgs.iter().map(|m| m.as_slice()));
        // Six files: one syncfs barrier. Two turn out not to be needed (deleted again in
        // the same batch, or held already): removed, not left in tmp/.
        let prepared = md.prepare(carried()).unwrap();
        assert_eq!(tmp_files(&root), 6);
        let place: Vec<NewMessage<'_>> = (0..4)
            .map(|i| NewMessage {
                hash: hashes[i],
                bytes: &msgs[i],
                name: format!("new/{}", hashes[i]),
            })
            .collect();
        assert_eq!(md.place(&place, prepared).unwrap(), 4);
        assert_eq!(tmp_files(&root), 0);
        // A batch whose state work failed leaves nothing either, and releases its claims:
        // the stager may write those messages again for a later batch.
        let prepared = md.prepare(carried()).unwrap();
        assert_eq!(tmp_files(&root), 6);
        md.discard(prepared);
        assert_eq!(tmp_files(&root), 0);
        md.stager().stage(0, &hashes[5], &msgs[5]);
        assert_eq!(tmp_files(&root), 1);
        assert_eq!(md.count().unwrap(), 4);
    }

    #[test]
    fn the_barrier_avoids_syncfs_when_others_have_much_dirty_data() {
        let info = |dirty_kib: u64, wb_kib: u64| {
            format!("MemTotal: 24000000 kB\nDirty:  {dirty_kib} kB\nWriteback: {wb_kib} kB\n")
        };
        let mib = 1024 * 1024;
        assert_eq!(choose_barrier(4, mib, None), Barrier::EachFile);
        assert_eq!(choose_barrier(100, 5 * mib, None), Barrier::Syncfs);
        assert_eq!(
            choose_barrier(100, 5 * mib, Some("garbage")),
            Barrier::Syncfs
        );
        // Only this batch's own 5 MiB (and a little more) dirty: one syncfs.
        assert_eq!(
            choose_barrier(100, 5 * mib, Some(&info(6 * 1024, 0))),
            Barrier::Syncfs
        );
        // A gigabyte of someone else's data waiting: fsync the batch's own files.
        assert_eq!(
            choose_barrier(100, 5 * mib, Some(&info(900 * 1024, 124 * 1024))),
            Barrier::Threads
        );
    }

    #[test]
    fn prepared_files_are_durable_through_the_threads_too() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..20)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, b"x").unwrap();
                p
            })
            .collect();
        fsync_in_threads(&paths).unwrap();
        let mut missing = paths.clone();
        missing.push(dir.path().join("gone"));
        assert!(
            fsync_in_threads(&missing).is_err(),
            "a missing file is an error"
        );
    }

    #[test]
    fn batch_is_idempotent_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        let md = Maildir::open(&root).unwrap();
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
        // A prepared file whose message is already in place (a batch replayed after a
        // crash): not counted, its tmp/ file removed, the file in place untouched.
        let prepared = md.prepare([(&ha, a.as_slice())]).unwrap();
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 1);
        assert_eq!(md.place(&batch[..1], prepared).unwrap(), 0);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert_eq!(std::fs::read(root.join(format!("new/{ha}"))).unwrap(), a);
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
