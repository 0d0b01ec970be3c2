//! notmuch integration (feature `notmuch`): synced mail is indexed in the user's notmuch
//! database, and every notmuch tag is synced both ways.
//!
//! The profile's Maildir lies inside the notmuch mail root (by default `ROOT/postlog`).
//!
//! - **Remote changes.** After a batch's files are durable, each new file is indexed
//!   directly (`index_file`; no `notmuch new` scan), a renamed file is re-pointed (its new
//!   name indexed, then the old one removed) and the message's notmuch tags are set to the
//!   replica's view of its tags ([`crate::state::view`]), exactly.
//! - **Local changes.** The database revision (and its UUID) is recorded after every pass.
//!   The next pass asks notmuch for `lastmod:REV+1..NOW` messages under the Maildir only, so
//!   finding edits costs one revision check when nothing changed, and is proportional to
//!   what changed otherwise, never to the size of the database. If the UUID changed (a new
//!   database) or the revision went back (a restored one), every postlog message is
//!   compared once instead, and files missing from the index are indexed.
//! - **The base of a diff.** Every postlog message in notmuch carries two properties:
//!   `postlog.hash` (the blob; one value per postlog file of the notmuch message) and
//!   `postlog.tags` (the tags postlog last wrote or saw there). A local edit is the
//!   difference between the message's tags and that base; it is queued as a Tag operation
//!   and the base is moved to the tags. Tags postlog writes itself move the base with them
//!   (in one atomic notmuch transaction), so they never come back as edits, and a crash
//!   between notmuch's commit and postlog's cannot turn postlog's own writes into edits.
//!   Queued operations are committed before notmuch's changes (which commit when the
//!   database is closed): a crash between the two finds the same edits again, and
//!   [`State::queue_op_once`] drops the repeat.
//! - **notmuch's automatic tags.** Indexing adds `attachment`, `signed` and `encrypted`
//!   where they apply. Postlog removes them again: the notmuch tags of a postlog message are
//!   exactly its synced tags. Keeping them as local-only tags would break that equality,
//!   and sending them as edits would append one Tag record per message and per notmuch
//!   device on a first sync. `attachment:`, `mimetype:` and `property:index.*` searches
//!   still find what those tags marked.
//! - **Duplicates.** notmuch keys messages by Message-ID, postlog by content. Two postlog
//!   messages with one Message-ID (or a postlog message and another file under the mail
//!   root) share one set of notmuch tags: the last one written wins, and a local edit to
//!   that notmuch message is sent for each postlog message in it.
//! - Tags notmuch holds but the protocol cannot carry (control characters, over
//!   `MAX_TAG_LEN` bytes) are left alone: neither sent nor removed.
//!
//! `notmuch::Database` is not `Send`: a [`Notmuch`] is opened, used and closed on one
//! blocking thread. It is opened read-write (Xapian's single-writer lock) only while there
//! is work, and the lock is always taken before a state transaction, never inside one.
//!
//! libnotmuch is GPL-3.0-or-later: a binary built with this feature is distributed under
//! the GPL.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notmuch::{AtomicOperation, Database, DatabaseMode, Message, Status};
use postlog_proto::limits::MAX_TAGS;
use postlog_proto::message::valid_tag;
use postlog_proto::{BlobHash, LogOffset};

use crate::profile::notmuch_folder;
use crate::state::{Overlay, State, StateError, view};
use crate::sync::Touched;

/// Message property: the hash of a postlog file of the message (one value per file).
pub const HASH_PROPERTY: &str = "postlog.hash";
/// Message property: the tags postlog last wrote or saw, one per line.
pub const BASE_PROPERTY: &str = "postlog.tags";
/// State meta key: `UUID REVISION` of the database after the last pass.
const REVISION_KEY: &str = "notmuch_rev";
/// libnotmuch itself waits for another writer (`notmuch new`, `notmuch tag`) to release
/// the database's write lock. Should a build of it report the lock as an error instead,
/// opening is retried for this long before failing with a retryable error.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);
const LOCK_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum NotmuchError {
    #[error("notmuch database at {root}: {source}")]
    Db {
        root: PathBuf,
        source: notmuch::Error,
    },
    #[error(
        "the notmuch database at {0} stayed locked by another program (notmuch new?) for \
         {LOCK_WAIT:?}; try again"
    )]
    Locked(PathBuf),
    #[error(
        "the Maildir {maildir} is not inside the notmuch mail root {root}, or a path is not \
         UTF-8"
    )]
    Outside { maildir: PathBuf, root: PathBuf },
    #[error(transparent)]
    State(#[from] StateError),
}

impl NotmuchError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, NotmuchError::Locked(_))
    }
}

type Result<T, E = NotmuchError> = std::result::Result<T, E>;

/// Work done in notmuch: messages read (looked up, returned by a query) and messages
/// written (indexed, re-pointed, tags or properties changed). A no-change sync does none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub read: u64,
    pub written: u64,
}

fn opened(root: &Path, mode: DatabaseMode) -> Result<Database, notmuch::Error> {
    // The notmuch crate panics on a path that is not UTF-8.
    if root.to_str().is_none() {
        return Err(notmuch::Error::NotmuchError(Status::PathError));
    }
    // An empty configuration path: libnotmuch reads no config file, so the user's
    // configuration (hooks, new.tags, a different mail root) cannot change what it does.
    Database::open_with_config(Some(root), mode, Some(""), None)
}

fn is_lock_error(e: &notmuch::Error) -> bool {
    matches!(e, notmuch::Error::NotmuchVerboseError(Status::XapianException, m)
        if m.to_ascii_lowercase().contains("lock"))
}

fn db_err(root: &Path) -> impl Fn(notmuch::Error) -> NotmuchError + '_ {
    move |source| NotmuchError::Db {
        root: root.to_owned(),
        source,
    }
}

/// Checks that `root` holds a notmuch database (for `postlog login --notmuch`).
pub fn check(root: &Path) -> Result<()> {
    let db = opened(root, DatabaseMode::ReadOnly).map_err(db_err(root))?;
    db.close().map_err(db_err(root))
}

/// The mail root notmuch itself would use: from `$NOTMUCH_CONFIG` or `~/.notmuch-config`
/// (`database.mail_root`, else `database.path`), `$NOTMUCH_DATABASE`, else `$HOME/mail`.
pub fn default_root() -> Result<PathBuf> {
    let guess = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join("mail"))
        .unwrap_or_else(|| PathBuf::from("mail"));
    let db = Database::open_with_config(None::<&Path>, DatabaseMode::ReadOnly, None::<&Path>, None)
        .map_err(db_err(&guess))?;
    let root = db
        .config(notmuch::ConfigKey::MailRoot)
        .or_else(|| db.config(notmuch::ConfigKey::DatabasePath))
        .map(PathBuf::from)
        .unwrap_or(guess);
    let _ = db.close();
    Ok(root)
}

/// notmuch's revision number (a `c_ulong`: 32 bits on some targets).
#[allow(clippy::unnecessary_cast)]
fn revision_number(r: &notmuch::Revision) -> u64 {
    r.revision as u64
}

fn revision_of(db: &Database) -> String {
    let r = db.revision();
    format!("{} {}", r.uuid, r.revision)
}

fn parse_revision(s: &str) -> Option<(&str, u64)> {
    let (uuid, rev) = s.split_once(' ')?;
    Some((uuid, rev.parse().ok()?))
}

fn hashes_of(msg: &Message) -> Vec<BlobHash> {
    msg.properties(HASH_PROPERTY, true)
        .filter_map(|(_, v)| v.parse().ok())
        .collect()
}

fn base_of(msg: &Message) -> Option<BTreeSet<String>> {
    msg.properties(BASE_PROPERTY, true).next().map(|(_, v)| {
        v.split('\n')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// A message's tags that the protocol can carry.
fn valid_tags(msg: &Message) -> BTreeSet<String> {
    msg.tags().filter(|t| valid_tag(t)).collect()
}

/// Queues `add`/`remove` as Tag operations of at most `MAX_TAGS` tags per list. Returns
/// the operations queued (for the view), none if they repeat the last queued one.
fn queue(
    conn: &rusqlite::Connection,
    hash: &BlobHash,
    add: &[String],
    remove: &[String],
    seen: LogOffset,
) -> Result<Vec<(Vec<String>, Vec<String>)>> {
    let mut ops = Vec::new();
    let (mut a, mut r) = (add.chunks(MAX_TAGS), remove.chunks(MAX_TAGS));
    loop {
        let (ca, cr) = (a.next().unwrap_or(&[]), r.next().unwrap_or(&[]));
        if ca.is_empty() && cr.is_empty() {
            break;
        }
        ops.push((ca.to_vec(), cr.to_vec()));
    }
    let mut queued = Vec::new();
    for (ca, cr) in ops {
        if State::queue_op_once(conn, hash, &ca, &cr, seen)? {
            queued.push((ca, cr));
        }
    }
    Ok(queued)
}

/// An open database, read-write, and the work done through it.
pub struct Notmuch {
    db: Database,
    root: PathBuf,
    maildir: PathBuf,
    /// The Maildir relative to the root, for `path:` queries.
    folder: String,
    pub work: Work,
}

impl Notmuch {
    /// Opens the database read-write (waiting for another writer to finish).
    pub fn open(root: &Path, maildir: &Path) -> Result<Notmuch> {
        let folder = notmuch_folder(root, maildir).ok_or_else(|| NotmuchError::Outside {
            maildir: maildir.to_owned(),
            root: root.to_owned(),
        })?;
        let started = Instant::now();
        let db = loop {
            match opened(root, DatabaseMode::ReadWrite) {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) => {
                    if started.elapsed() > LOCK_WAIT {
                        return Err(NotmuchError::Locked(root.to_owned()));
                    }
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(e) => return Err(db_err(root)(e)),
            }
        };
        Ok(Notmuch {
            db,
            root: root.to_owned(),
            maildir: maildir.to_owned(),
            folder,
            work: Work::default(),
        })
    }

    fn err(&self) -> impl FnOnce(notmuch::Error) -> NotmuchError + '_ {
        db_err(&self.root)
    }

    /// Commits and closes; returns the revision to record (`REVISION_KEY`) and the work.
    pub fn close(self) -> Result<(String, Work)> {
        let rev = revision_of(&self.db);
        self.db.close().map_err(db_err(&self.root))?;
        Ok((rev, self.work))
    }

    /// Records the revision a pass ended at.
    pub fn record(conn: &rusqlite::Connection, revision: &str) -> Result<()> {
        Ok(State::set_meta_in(conn, REVISION_KEY, revision)?)
    }

    /// Indexes a file; `None` if notmuch refuses it as not being mail (any bytes can be a
    /// postlog message: such a message is simply not in notmuch).
    fn index(&mut self, path: &Path) -> Result<Option<Message>> {
        self.work.written += 1;
        match self.db.index_file(path, None) {
            Ok(m) => Ok(Some(m)),
            Err(notmuch::Error::NotmuchError(Status::FileNotEmail)) => {
                tracing::warn!("{}: not indexed by notmuch (not an email)", path.display());
                Ok(None)
            }
            Err(e) => Err(self.err()(e)),
        }
    }

    /// The message of a postlog file, indexing the file if notmuch does not know it.
    fn message_of(
        &mut self,
        hash: &BlobHash,
        name: &str,
        reindex: bool,
    ) -> Result<Option<Message>> {
        let path = self.maildir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let found = if reindex {
            None
        } else {
            self.db
                .find_message_by_filename(&path)
                .map_err(self.err())?
        };
        let msg = match found {
            Some(m) => m,
            None => match self.index(&path)? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        self.work.read += 1;
        let hex = hash.to_hex();
        if !msg.properties(HASH_PROPERTY, true).any(|(_, v)| v == hex) {
            msg.add_property(HASH_PROPERTY, &hex).map_err(self.err())?;
        }
        Ok(Some(msg))
    }

    /// Makes a message's notmuch tags exactly `tags` (plus any it has that the protocol
    /// cannot carry) and its base `tags`, in one atomic transaction; writes nothing if
    /// both already are.
    fn set_tags(&mut self, msg: &Message, tags: &[String]) -> Result<()> {
        let now: BTreeSet<String> = msg.tags().collect();
        let mut want: BTreeSet<String> = tags.iter().cloned().collect();
        want.extend(now.iter().filter(|t| !valid_tag(t)).cloned());
        let base_ok = base_of(msg).is_some_and(|b| b.iter().eq(tags.iter()));
        if now == want && base_ok {
            return Ok(());
        }
        self.work.written += 1;
        let e = db_err(&self.root);
        let _atomic = AtomicOperation::new(&self.db).map_err(&e)?;
        if now != want {
            msg.freeze().map_err(&e)?;
            msg.remove_all_tags().map_err(&e)?;
            for t in &want {
                msg.add_tag(t).map_err(&e)?;
            }
            msg.thaw().map_err(&e)?;
        }
        if !base_ok {
            msg.remove_all_properties(Some(BASE_PROPERTY)).map_err(&e)?;
            msg.add_property(BASE_PROPERTY, &tags.join("\n"))
                .map_err(&e)?;
        }
        Ok(())
    }

    /// Finds the local edits made in notmuch since the last pass and queues them (`seen`:
    /// the cursor minus one), committing the queue; then moves the bases (and, where the
    /// replica's view differs, the tags) in notmuch, uncommitted until [`Notmuch::close`].
    /// `cursor` is the replica's durable cursor (which records the view covers).
    pub fn find_edits(&mut self, state: &mut State, cursor: LogOffset) -> Result<()> {
        let seen = cursor.saturating_sub(1);
        let now = self.db.revision();
        let recorded = State::meta_in(state.conn(), REVISION_KEY)?;
        let since = recorded
            .as_deref()
            .and_then(parse_revision)
            .filter(|(uuid, rev)| *uuid == now.uuid && *rev <= revision_number(&now))
            .map(|(_, rev)| rev);
        if since == Some(revision_number(&now)) {
            return Ok(());
        }
        // (message id, its postlog hashes), in the order found.
        let mut changed: Vec<(String, Vec<BlobHash>)> = Vec::new();
        match since {
            Some(rev) => {
                let q = format!(
                    "lastmod:{}..{} and path:\"{}/**\"",
                    rev + 1,
                    now.revision,
                    self.folder.replace('"', "\"\"")
                );
                let query = self.db.create_query(&q).map_err(self.err())?;
                for msg in query.search_messages().map_err(self.err())? {
                    self.work.read += 1;
                    let hashes = hashes_of(&msg);
                    if !hashes.is_empty() {
                        changed.push((msg.id().into_owned(), hashes));
                    }
                }
            }
            None => {
                // A new or restored database: compare every postlog message once.
                let mut by_id: HashMap<String, usize> = HashMap::new();
                for (hash, name) in State::names(state.conn())? {
                    let Some(msg) = self.message_of(&hash, &name, false)? else {
                        continue;
                    };
                    let id = msg.id().into_owned();
                    match by_id.get(&id) {
                        Some(&i) => changed[i].1.push(hash),
                        None => {
                            by_id.insert(id.clone(), changed.len());
                            changed.push((id, vec![hash]));
                        }
                    }
                }
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut overlay: Overlay = State::overlay(state.conn(), cursor)?;
        let mut writes: Vec<(String, Vec<String>)> = Vec::new();
        let tx = state.conn().transaction().map_err(StateError::from)?;
        for (id, hashes) in changed {
            let Some(msg) = self.db.find_message(&id).map_err(self.err())? else {
                continue;
            };
            let hashes: Vec<BlobHash> = hashes
                .into_iter()
                .filter(|h| State::name_of(&tx, h).is_ok_and(|n| n.is_some()))
                .collect();
            let Some(first) = hashes.first().copied() else {
                continue;
            };
            let tags = valid_tags(&msg);
            let base = base_of(&msg);
            if let Some(base) = &base {
                let add: Vec<String> = tags.difference(base).cloned().collect();
                let remove: Vec<String> = base.difference(&tags).cloned().collect();
                if !add.is_empty() || !remove.is_empty() {
                    for h in &hashes {
                        let queued = queue(&tx, h, &add, &remove, seen)?;
                        overlay.entry(*h).or_default().extend(queued);
                    }
                }
            }
            // Without a base (indexed by someone else), the replica's view wins.
            let target = view(State::tags_of(&tx, &first)?.tags(), overlay.get(&first));
            let tags_ok = target.iter().eq(tags.iter());
            let base_ok = base.is_some_and(|b| b.iter().eq(target.iter()));
            if !tags_ok || !base_ok {
                writes.push((id, target));
            }
        }
        tx.commit().map_err(StateError::from)?;
        for (id, target) in writes {
            if let Some(msg) = self.db.find_message(&id).map_err(self.err())? {
                self.set_tags(&msg, &target)?;
            }
        }
        Ok(())
    }

    /// Follows a batch: indexes new files, re-points renamed ones, sets tags and bases.
    pub fn apply(&mut self, touched: &[Touched]) -> Result<()> {
        for t in touched {
            let Some(name) = &t.name else { continue };
            if t.removed {
                // The file is gone; this drops the message (its last file) from the index.
                self.db
                    .remove_message(self.maildir.join(name))
                    .map_err(self.err())?;
                continue;
            }
            let reindex = t.new_file || t.renamed_from.is_some();
            let Some(msg) = self.message_of(&t.hash, name, reindex)? else {
                continue;
            };
            self.set_tags(&msg, &t.tags)?;
            if let Some(old) = &t.renamed_from {
                // After indexing the new name, so the message (and its properties) stays;
                // and after the last write through `msg`, whose cached document still
                // holds the old name.
                drop(msg);
                self.db
                    .remove_message(self.maildir.join(old))
                    .map_err(self.err())?;
            }
        }
        Ok(())
    }
}

/// A pass for local edits outside a batch (before sending local changes): free when the
/// database's revision is the recorded one (a read-only open, no lock taken).
pub fn find_local_edits(
    root: &Path,
    maildir: &Path,
    state: &mut State,
    cursor: LogOffset,
) -> Result<Work> {
    {
        let db = opened(root, DatabaseMode::ReadOnly).map_err(db_err(root))?;
        let recorded = State::meta_in(state.conn(), REVISION_KEY)?;
        let same = recorded.as_deref() == Some(revision_of(&db).as_str());
        let _ = db.close();
        if same {
            return Ok(Work::default());
        }
    }
    let mut nm = Notmuch::open(root, maildir)?;
    nm.find_edits(state, cursor)?;
    let (rev, work) = nm.close()?;
    Notmuch::record(state.conn(), &rev)?;
    Ok(work)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postlog_proto::tags::TagState;

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        maildir: PathBuf,
        state: State,
        hash: BlobHash,
    }

    /// A notmuch database, a Maildir in it holding one postlog message with a PDF
    /// attachment, indexed by `apply` with the tags `inbox`, `unread`.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail").canonicalize_or_create();
        let maildir = root.join("postlog");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        Database::create(&root).unwrap().close().unwrap();
        let bytes = b"From: a@example.org\r\nMessage-ID: <m@example.org>\r\n\
            Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
            Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\n\
            Content-Disposition: attachment; filename=a.pdf\r\n\r\nxx\r\n--b--\r\n";
        let hash = BlobHash::of(bytes);
        let name = format!("new/{hash}");
        std::fs::write(maildir.join(&name), bytes).unwrap();
        let mut state = State::open(dir.path()).unwrap();
        let mut st = TagState::default();
        st.apply_store(0, &t(&["inbox", "unread"]));
        State::set_name(state.conn(), &hash, &name).unwrap();
        State::put_tags(state.conn(), &hash, &st).unwrap();
        let mut nm = Notmuch::open(&root, &maildir).unwrap();
        nm.apply(&[Touched {
            hash,
            name: Some(name),
            renamed_from: None,
            new_file: true,
            tags: t(&["inbox", "unread"]),
            removed: false,
        }])
        .unwrap();
        let (rev, work) = nm.close().unwrap();
        Notmuch::record(state.conn(), &rev).unwrap();
        assert_eq!(
            work,
            Work {
                read: 1,
                written: 2
            }
        );
        Fixture {
            _dir: dir,
            root,
            maildir,
            state,
            hash,
        }
    }

    trait CanonicalizeOrCreate {
        fn canonicalize_or_create(&self) -> PathBuf;
    }
    impl CanonicalizeOrCreate for PathBuf {
        fn canonicalize_or_create(&self) -> PathBuf {
            std::fs::create_dir_all(self).unwrap();
            self.canonicalize().unwrap()
        }
    }

    /// Edits the message as a user would (another writer of the database).
    fn user_edit(root: &Path, f: impl FnOnce(&Message)) {
        let db = opened(root, DatabaseMode::ReadWrite).unwrap();
        let msg = db.find_message("m@example.org").unwrap().unwrap();
        f(&msg);
        db.close().unwrap();
    }

    fn tags_in_notmuch(root: &Path) -> Vec<String> {
        let db = opened(root, DatabaseMode::ReadOnly).unwrap();
        let msg = db.find_message("m@example.org").unwrap().unwrap();
        msg.tags().collect()
    }

    #[test]
    fn indexing_sets_exactly_the_synced_tags() {
        let f = fixture();
        // notmuch's own `attachment` tag is removed again.
        assert_eq!(tags_in_notmuch(&f.root), t(&["inbox", "unread"]));
    }

    #[test]
    fn local_edits_are_found_once_through_the_revision() {
        let mut f = fixture();
        let w = find_local_edits(&f.root, &f.maildir, &mut f.state, 1).unwrap();
        assert_eq!(w, Work::default(), "nothing changed: nothing read");
        user_edit(&f.root, |m| {
            m.add_tag("to read later").unwrap();
            m.add_tag("caf\u{e9}").unwrap();
            m.remove_tag("inbox").unwrap();
        });
        let w = find_local_edits(&f.root, &f.maildir, &mut f.state, 5).unwrap();
        assert_eq!(
            w,
            Work {
                read: 1,
                written: 1
            },
            "read it, moved its base"
        );
        let ops = f.state.pending().unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(
            (ops[0].hash, &ops[0].add, &ops[0].remove, ops[0].seen),
            (
                f.hash,
                &t(&["caf\u{e9}", "to read later"]),
                &t(&["inbox"]),
                4
            )
        );
        // Postlog's own base write is not an edit; nothing is queued twice.
        let w = find_local_edits(&f.root, &f.maildir, &mut f.state, 5).unwrap();
        assert_eq!(w.written, 0);
        assert_eq!(f.state.pending().unwrap().len(), 1);
        // The view keeps the edit while the CRDT does not have it yet.
        assert_eq!(
            tags_in_notmuch(&f.root),
            t(&["caf\u{e9}", "to read later", "unread"])
        );
    }

    #[test]
    fn an_edit_found_again_after_a_crash_is_queued_once() {
        let mut f = fixture();
        let before = State::meta_in(f.state.conn(), REVISION_KEY)
            .unwrap()
            .unwrap();
        user_edit(&f.root, |m| m.add_tag("x").unwrap());
        find_local_edits(&f.root, &f.maildir, &mut f.state, 1).unwrap();
        // As if the crash hit after the queue committed but before notmuch did: the base
        // is back where it was and the recorded revision too.
        user_edit(&f.root, |m| {
            m.remove_all_properties(Some(BASE_PROPERTY)).unwrap();
            m.add_property(BASE_PROPERTY, "inbox\nunread").unwrap();
        });
        Notmuch::record(f.state.conn(), &before).unwrap();
        find_local_edits(&f.root, &f.maildir, &mut f.state, 1).unwrap();
        assert_eq!(f.state.pending().unwrap().len(), 1);
    }

    #[test]
    fn a_new_database_is_compared_once_and_the_replica_wins() {
        let mut f = fixture();
        // The user rebuilds the index from scratch: new UUID, no postlog properties, and
        // `notmuch new`'s tags.
        std::fs::remove_dir_all(f.root.join(".notmuch")).unwrap();
        let db = Database::create(&f.root).unwrap();
        let m = db
            .index_file(f.maildir.join(format!("new/{}", f.hash)), None)
            .unwrap();
        m.add_tag("new").unwrap();
        db.close().unwrap();
        let w = find_local_edits(&f.root, &f.maildir, &mut f.state, 1).unwrap();
        assert!(f.state.pending().unwrap().is_empty());
        assert_eq!(tags_in_notmuch(&f.root), t(&["inbox", "unread"]));
        assert_eq!(w.read, 1);
        let w = find_local_edits(&f.root, &f.maildir, &mut f.state, 1).unwrap();
        assert_eq!(w, Work::default());
    }

    #[test]
    fn a_renamed_file_stays_one_message() {
        let mut f = fixture();
        let old = format!("new/{}", f.hash);
        let new = format!("cur/{}:2,FS", f.hash);
        std::fs::rename(f.maildir.join(&old), f.maildir.join(&new)).unwrap();
        let mut nm = Notmuch::open(&f.root, &f.maildir).unwrap();
        nm.apply(&[Touched {
            hash: f.hash,
            name: Some(new.clone()),
            renamed_from: Some(old.clone()),
            new_file: false,
            tags: t(&["flagged"]),
            removed: false,
        }])
        .unwrap();
        let (rev, _) = nm.close().unwrap();
        Notmuch::record(f.state.conn(), &rev).unwrap();
        let db = opened(&f.root, DatabaseMode::ReadOnly).unwrap();
        let msg = db.find_message("m@example.org").unwrap().unwrap();
        assert_eq!(msg.count_files(), 1);
        assert_eq!(msg.tags().collect::<Vec<_>>(), t(&["flagged"]));
        assert_eq!(hashes_of(&msg), vec![f.hash]);
        assert!(
            db.find_message_by_filename(&f.maildir.join(&old))
                .unwrap()
                .is_none()
        );
        let _ = f.state.conn();
    }
}
