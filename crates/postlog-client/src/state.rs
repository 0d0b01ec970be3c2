//! The replica's local state (`PROFILE/state.db`, SQLite): every message's tag CRDT state,
//! the Maildir file name last written or seen for it, and the queue of local tag changes not
//! yet acknowledged by the server.
//!
//! Maildir flags are how mail readers change tags: a sync compares each file's flags with
//! the name recorded here, turns a difference into a Tag operation (queued durably, then
//! sent), and records the new name. Remote changes go the other way: records are applied
//! to the CRDT and files are renamed to the flags of the resulting tags.
//!
//! A queued operation stays in `pending` after the server acknowledged it (with the offset
//! of its record, `acked`) until the replica has applied that record: until then the
//! replica's *view* of a message ([`view`]) is its CRDT tags with the operations not yet
//! applied laid over them, so a local edit never flickers away between its ack and its
//! record.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use postlog_proto::tags::{Dot, TagState};
use postlog_proto::{BlobHash, LogOffset};
use rusqlite::{Connection, OptionalExtension, params};

use crate::maildir::hash_of_name;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("local state database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("local state database: {0}")]
    Corrupt(&'static str),
    #[error("Maildir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T, E = StateError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

const SCHEMA: &str = "
-- One row per message this replica knows: its Maildir file name (NULL while it has no
-- file) and its tag CRDT state (`encode_dots`). One B-tree keyed by hash, the only one:
-- random keys cost a leaf write per message and batch (profiles made before kept the dots
-- in a table of their own, `dots`: merged on open, `migrate_dots`).
CREATE TABLE IF NOT EXISTS messages (
    hash BLOB PRIMARY KEY, name TEXT, dots BLOB NOT NULL DEFAULT x''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY, hash BLOB NOT NULL, add_tags TEXT NOT NULL,
    remove_tags TEXT NOT NULL, seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Which message each applied record (Store, Tags, TagSnapshot) referred to, so that a
-- Scrub, which carries only offsets, can be applied. store = 1 for a Store record.
-- A message's rows are removed by the Scrub that deletes it (it lists every live record of
-- the message); rows a Scrub never lists (a Tags record of a message deleted since) only
-- ever answer 'not a Store'. No index by hash: it was one more random-key B-tree written
-- for every message (profiles made before have one, `refs_by_hash`: dropped on open).
CREATE TABLE IF NOT EXISTS refs (
    offset INTEGER PRIMARY KEY, hash BLOB NOT NULL, store INTEGER NOT NULL
);
DROP INDEX IF EXISTS refs_by_hash;
-- Messages this replica asked to delete, until the server has answered.
CREATE TABLE IF NOT EXISTS pending_deletes (hash BLOB PRIMARY KEY) WITHOUT ROWID;
";

/// The tags Maildir flags stand for.
pub const FLAG_TAGS: [(char, &str); 5] = [
    ('D', "draft"),
    ('F', "flagged"),
    ('P', "passed"),
    ('R', "replied"),
    ('T', "deleted"),
];

/// The flag letters (sorted) for a set of tags: `S` unless `unread`, and the flag tags.
pub fn flags_of_tags(tags: &[String]) -> String {
    let has = |t: &str| tags.iter().any(|x| x == t);
    let mut f: Vec<char> = FLAG_TAGS
        .iter()
        .filter(|(_, t)| has(t))
        .map(|(c, _)| *c)
        .collect();
    if !has("unread") {
        f.push('S');
    }
    f.sort_unstable();
    f.into_iter().collect()
}

/// The flag-tags a Maildir file name stands for (`sub` is `cur` or `new`).
pub fn tags_of_name(sub: &str, name: &str) -> BTreeSet<String> {
    let flags = if sub == "new" {
        ""
    } else {
        name.rsplit_once(":2,").map(|(_, f)| f).unwrap_or("")
    };
    let mut out: BTreeSet<String> = FLAG_TAGS
        .iter()
        .filter(|(c, _)| flags.contains(*c))
        .map(|(_, t)| t.to_string())
        .collect();
    if sub == "new" || !flags.contains('S') {
        out.insert("unread".into());
    }
    out
}

/// Where a message with these tags belongs, given where its file is now (`None`: new file).
/// Plain unread mail stays in (or goes to) `new/`; mail a reader moved to `cur/` stays there.
pub fn desired_name(hash: &BlobHash, tags: &[String], current: Option<&str>) -> String {
    let flags = flags_of_tags(tags);
    let in_cur = current.is_some_and(|c| c.starts_with("cur/"));
    if flags.is_empty() && !in_cur {
        format!("new/{hash}")
    } else {
        format!("cur/{hash}:2,{flags}")
    }
}

/// Operations not yet applied to the CRDT, by message, in queue order: (add, remove).
pub type Overlay = HashMap<BlobHash, Vec<(Vec<String>, Vec<String>)>>;

/// What this replica shows for a message: its CRDT tags with the local operations the
/// CRDT does not cover yet applied over them, in order.
pub fn view(crdt: Vec<String>, ops: Option<&Vec<(Vec<String>, Vec<String>)>>) -> Vec<String> {
    let mut tags: BTreeSet<String> = crdt.into_iter().collect();
    for (add, remove) in ops.into_iter().flatten() {
        for t in remove {
            tags.remove(t);
        }
        tags.extend(add.iter().cloned());
    }
    tags.into_iter().collect()
}

/// A queued local tag change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingOp {
    pub seq: u64,
    pub hash: BlobHash,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub seen: LogOffset,
}

pub struct State {
    conn: Connection,
}

/// SQLite's page cache per connection, in KiB (allocated as pages are read).
const CACHE_KIB: i64 = 64 * 1024;
/// Pages in the WAL that trigger a checkpoint (64 MiB at the 4 KiB page size).
const WAL_CHECKPOINT_PAGES: i64 = 16 * 1024;
/// How long [`State::open`] retries while another connection sets the database up.
const OPEN_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn join(v: &[String]) -> String {
    v.join("\n")
}

fn split(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('\n').map(str::to_owned).collect()
    }
}

impl State {
    pub fn open(profile_dir: &Path) -> Result<State> {
        // Setting up a fresh database (WAL mode, schema) needs an exclusive lock that
        // SQLite does not wait for when two connections race for it (it answers "database
        // is locked" at once rather than risk a deadlock): retry for a while.
        let started = std::time::Instant::now();
        loop {
            match State::open_once(profile_dir) {
                Err(StateError::Db(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && started.elapsed() < OPEN_BUSY_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    fn open_once(profile_dir: &Path) -> Result<State> {
        let mut conn = Connection::open(profile_dir.join("state.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Each new message adds a row to `messages`, keyed by its BLAKE3 hash: random
        // keys, so once the tree outgrows SQLite's page cache (2 MiB by default) every
        // insert re-reads a leaf, and each batch's commit writes about one leaf per message
        // to the WAL, which the default checkpoint (every 1,000 pages, ~4 MB) then writes
        // again. The cache holds a 100,000-message state and the WAL is checkpointed every
        // `WAL_CHECKPOINT_PAGES`, so a leaf dirtied by many batches reaches the database
        // file once per checkpoint.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
        // SQLite's checkpoint-on-close stays on (a few ms at the end of a sync that wrote):
        // a WAL left behind is read back by every later open, and the no-change sync,
        // which opens this database, measured ~1.5 ms slower with one.
        conn.execute_batch(SCHEMA)?;
        // Added after the first release of the schema. Checked again under the write lock:
        // two processes (or a watcher's writer and its local-change pass) may open a fresh
        // profile at once, and the second ALTER would fail ("duplicate column name").
        const HAS_ACKED: &str = "SELECT acked FROM pending LIMIT 0";
        if conn.prepare(HAS_ACKED).is_err() {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if tx.prepare(HAS_ACKED).is_err() {
                tx.execute_batch("ALTER TABLE pending ADD COLUMN acked INTEGER")?;
            }
            tx.commit()?;
        }
        const HAS_DOTS: &str = "SELECT dots FROM messages LIMIT 0";
        if conn.prepare(HAS_DOTS).is_err() {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if tx.prepare(HAS_DOTS).is_err() {
                migrate_dots(&tx)?;
            }
            tx.commit()?;
        }
        Ok(State { conn })
    }

    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// A message's tag state.
    pub fn tags_of(conn: &Connection, hash: &BlobHash) -> Result<TagState> {
        let dots: Option<Vec<u8>> = conn
            .prepare_cached("SELECT dots FROM messages WHERE hash = ?1")?
            .query_row([hash.0.as_slice()], |r| r.get(0))
            .optional()?;
        decode_dots(dots.as_deref().unwrap_or_default())
    }

    pub fn put_tags(conn: &Connection, hash: &BlobHash, state: &TagState) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO messages (hash, dots) VALUES (?1, ?2)
             ON CONFLICT(hash) DO UPDATE SET dots = excluded.dots",
        )?
        .execute(params![hash.0.as_slice(), encode_dots(state)])?;
        Ok(())
    }

    /// A message's recorded file name (`None`: no file here) and tag state, in one lookup.
    pub fn message_of(conn: &Connection, hash: &BlobHash) -> Result<(Option<String>, TagState)> {
        let row: Option<(Option<String>, Option<Vec<u8>>)> = conn
            .prepare_cached("SELECT name, dots FROM messages WHERE hash = ?1")?
            .query_row([hash.0.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (name, dots) = row.unwrap_or_default();
        Ok((name, decode_dots(dots.as_deref().unwrap_or_default())?))
    }

    /// Writes a message's file name and tag state in one statement (the sync engine's
    /// per-message write; [`State::set_name`] and [`State::put_tags`] each write one column).
    pub fn put_message(
        conn: &Connection,
        hash: &BlobHash,
        name: Option<&str>,
        state: &TagState,
    ) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO messages (hash, name, dots) VALUES (?1, ?2, ?3)
             ON CONFLICT(hash) DO UPDATE SET name = excluded.name, dots = excluded.dots",
        )?
        .execute(params![hash.0.as_slice(), name, encode_dots(state)])?;
        Ok(())
    }

    /// The file name recorded for a message (`None` if it has no file here).
    pub fn name_of(conn: &Connection, hash: &BlobHash) -> Result<Option<String>> {
        Ok(conn
            .prepare_cached("SELECT name FROM messages WHERE hash = ?1")?
            .query_row([hash.0.as_slice()], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten())
    }

    pub fn set_name(conn: &Connection, hash: &BlobHash, name: &str) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO messages (hash, name) VALUES (?1, ?2)
             ON CONFLICT(hash) DO UPDATE SET name = excluded.name",
        )?
        .execute(params![hash.0.as_slice(), name])?;
        Ok(())
    }

    /// Messages with a file here.
    pub fn count_messages(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM messages WHERE name IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Queues a local tag change durably and returns its sequence number.
    pub fn queue_op(
        conn: &Connection,
        hash: &BlobHash,
        add: &[String],
        remove: &[String],
        seen: LogOffset,
    ) -> Result<u64> {
        let next: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        conn.execute(
            "INSERT INTO pending (seq, hash, add_tags, remove_tags, seen) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![next, hash.0.as_slice(), join(add), join(remove), seen as i64],
        )?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('next_seq', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(next + 1).to_string()],
        )?;
        Ok(next as u64)
    }

    /// Queues a local change unless it repeats the message's last queued, unsent one (a
    /// change found again after a crash between queueing it and recording that it was
    /// seen). Returns whether it was queued.
    pub fn queue_op_once(
        conn: &Connection,
        hash: &BlobHash,
        add: &[String],
        remove: &[String],
        seen: LogOffset,
    ) -> Result<bool> {
        let last: Option<(String, String)> = conn
            .query_row(
                "SELECT add_tags, remove_tags FROM pending WHERE hash = ?1 AND acked IS NULL
                 ORDER BY seq DESC LIMIT 1",
                [hash.0.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if last.is_some_and(|(a, r)| a == join(add) && r == join(remove)) {
            return Ok(false);
        }
        State::queue_op(conn, hash, add, remove, seen)?;
        Ok(true)
    }

    /// Queued changes the server has not acknowledged yet, in order.
    pub fn pending(&self) -> Result<Vec<PendingOp>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, hash, add_tags, remove_tags, seen FROM pending WHERE acked IS NULL
             ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            let hash: Vec<u8> = r.get(1)?;
            Ok(PendingOp {
                seq: r.get::<_, i64>(0)? as u64,
                hash: BlobHash(hash.try_into().unwrap_or([0; 32])),
                add: split(&r.get::<_, String>(2)?),
                remove: split(&r.get::<_, String>(3)?),
                seen: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn op_done(&self, seq: u64) -> Result<()> {
        State::forget_op(&self.conn, seq)
    }

    /// Drops operation `seq` from the queue (its record was applied, or it was refused).
    pub fn forget_op(conn: &Connection, seq: u64) -> Result<()> {
        conn.execute("DELETE FROM pending WHERE seq = ?1", [seq as i64])?;
        Ok(())
    }

    /// The server acknowledged operation `seq` as the record at `offset`: it is no longer
    /// sent, but stays in the view until the record is applied ([`State::forget_applied`]).
    pub fn ack_op(conn: &Connection, seq: u64, offset: LogOffset) -> Result<()> {
        conn.execute(
            "UPDATE pending SET acked = ?2 WHERE seq = ?1",
            params![seq as i64, offset as i64],
        )?;
        Ok(())
    }

    /// Drops acknowledged operations whose records lie below `cursor` (applied).
    pub fn forget_applied(conn: &Connection, cursor: LogOffset) -> Result<()> {
        conn.execute(
            "DELETE FROM pending WHERE acked IS NOT NULL AND acked < ?1",
            [cursor as i64],
        )?;
        Ok(())
    }

    /// Every operation whose record is not applied once the CRDT covers offsets below
    /// `cursor`: unacknowledged ones, and acknowledged ones at `cursor` or later.
    pub fn overlay(conn: &Connection, cursor: LogOffset) -> Result<Overlay> {
        let mut stmt = conn.prepare_cached(
            "SELECT hash, add_tags, remove_tags FROM pending
             WHERE acked IS NULL OR acked >= ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([cursor as i64], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Overlay::new();
        for row in rows {
            let (h, add, remove) = row?;
            if let Ok(h) = <[u8; 32]>::try_from(h) {
                out.entry(BlobHash(h))
                    .or_default()
                    .push((split(&add), split(&remove)));
            }
        }
        Ok(out)
    }

    /// Records that the record at `offset` refers to `hash` (`store`: it is its Store).
    pub fn record_ref(
        conn: &Connection,
        offset: LogOffset,
        hash: &BlobHash,
        store: bool,
    ) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO refs (offset, hash, store) VALUES (?1, ?2, ?3)
             ON CONFLICT(offset) DO UPDATE SET hash = excluded.hash, store = excluded.store",
        )?
        .execute(params![offset as i64, hash.0.as_slice(), store])?;
        Ok(())
    }

    /// A scrubbed offset: forgets it, and returns the message it referred to if it was that
    /// message's Store record (the message is deleted). `None` for a compacted Tags record
    /// or an offset this replica never applied.
    pub fn scrub_ref(conn: &Connection, offset: LogOffset) -> Result<Option<BlobHash>> {
        let r: Option<(Vec<u8>, bool)> = conn
            .query_row(
                "DELETE FROM refs WHERE offset = ?1 RETURNING hash, store",
                [offset as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match r {
            Some((h, true)) => <[u8; 32]>::try_from(h).ok().map(BlobHash),
            _ => None,
        })
    }

    /// Forgets every local trace of a deleted message: its name, tag state, queued tag
    /// changes and queued delete. (Its `refs` rows go with the Scrub that deletes it.)
    pub fn forget_message(conn: &Connection, hash: &BlobHash) -> Result<()> {
        let h = hash.0.as_slice();
        conn.execute("DELETE FROM messages WHERE hash = ?1", [h])?;
        conn.execute("DELETE FROM pending WHERE hash = ?1", [h])?;
        conn.execute("DELETE FROM pending_deletes WHERE hash = ?1", [h])?;
        Ok(())
    }

    /// Queues a delete durably (sent at the next sync).
    pub fn queue_delete(conn: &Connection, hash: &BlobHash) -> Result<()> {
        conn.execute(
            "INSERT OR IGNORE INTO pending_deletes (hash) VALUES (?1)",
            [hash.0.as_slice()],
        )?;
        Ok(())
    }

    /// Deletes not yet answered by the server.
    pub fn pending_deletes(&self) -> Result<Vec<BlobHash>> {
        let mut stmt = self.conn.prepare("SELECT hash FROM pending_deletes")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for h in rows {
            if let Ok(h) = <[u8; 32]>::try_from(h?) {
                out.push(BlobHash(h));
            }
        }
        Ok(out)
    }

    /// The server answered the delete of `hash`.
    pub fn delete_done(conn: &Connection, hash: &BlobHash) -> Result<()> {
        conn.execute(
            "DELETE FROM pending_deletes WHERE hash = ?1",
            [hash.0.as_slice()],
        )?;
        Ok(())
    }

    /// Every message's recorded file name.
    pub fn names(conn: &Connection) -> Result<Vec<(BlobHash, String)>> {
        let mut stmt = conn.prepare("SELECT hash, name FROM messages WHERE name IS NOT NULL")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (h, name) = row?;
            if let Ok(h) = <[u8; 32]>::try_from(h) {
                out.push((BlobHash(h), name));
            }
        }
        Ok(out)
    }

    pub fn meta_in(conn: &Connection, key: &str) -> Result<Option<String>> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta_in(conn: &Connection, key: &str, value: &str) -> Result<()> {
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        State::meta_in(&self.conn, key)
    }

    /// Finds local flag changes (made by a mail reader renaming files) and queues them as
    /// tag operations. Costs two `stat`s when neither `cur/` nor `new/` changed since the
    /// last scan; otherwise one directory listing. Returns how many ops were queued.
    pub fn scan_maildir(&mut self, maildir: &Path, seen: LogOffset) -> Result<usize> {
        let stamp = dir_stamp(maildir)?;
        if self.meta("maildir_stamp")?.as_deref() == Some(stamp.as_str()) {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut queued = 0;
        for sub in ["cur", "new"] {
            let d = maildir.join(sub);
            for e in std::fs::read_dir(&d).map_err(io(&d))?.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(hash) = hash_of_name(&file) else {
                    continue;
                };
                let name = format!("{sub}/{file}");
                let Some(recorded) = State::name_of(&tx, &hash)? else {
                    continue;
                };
                if recorded == name {
                    continue;
                }
                let (rsub, rfile) = recorded.split_once('/').unwrap_or(("cur", &recorded));
                let before = tags_of_name(rsub, rfile);
                let after = tags_of_name(sub, &file);
                let add: Vec<String> = after.difference(&before).cloned().collect();
                let remove: Vec<String> = before.difference(&after).cloned().collect();
                if !add.is_empty() || !remove.is_empty() {
                    State::queue_op(&tx, &hash, &add, &remove, seen)?;
                    queued += 1;
                }
                State::set_name(&tx, &hash, &name)?;
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('maildir_stamp', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [&stamp],
        )?;
        tx.commit()?;
        Ok(queued)
    }

    /// Records the Maildir's current modification stamp (after this client's own renames),
    /// so that the next scan is skipped unless a mail reader changed something.
    pub fn remember_maildir(&self, maildir: &Path) -> Result<()> {
        let stamp = dir_stamp(maildir)?;
        // Usually the last batch's transaction recorded this very stamp: then no write
        // (and no fsync) at all.
        if self.meta("maildir_stamp")?.as_deref() != Some(stamp.as_str()) {
            State::set_meta_in(&self.conn, "maildir_stamp", &stamp)?;
        }
        Ok(())
    }

    /// [`State::remember_maildir`] within a transaction.
    pub fn remember_maildir_in(conn: &Connection, maildir: &Path) -> Result<()> {
        State::set_meta_in(conn, "maildir_stamp", &dir_stamp(maildir)?)
    }
}

/// A tag state as stored in `messages.dots`: per dot, the tag's length (u16 LE), the tag
/// (UTF-8), the dot's offset and device (u64 LE each). Empty for no tags.
fn encode_dots(state: &TagState) -> Vec<u8> {
    let mut out = Vec::new();
    for (tag, dot) in state.dots() {
        // Tags are far shorter (the protocol's limit is `MAX_TAG_LEN`, 256 bytes); a
        // longer one would be cut (at a character) rather than stored unreadable.
        let t = &tag.as_bytes()[..tag.floor_char_boundary(u16::MAX as usize)];
        out.extend_from_slice(&(t.len() as u16).to_le_bytes());
        out.extend_from_slice(t);
        out.extend_from_slice(&dot.offset.to_le_bytes());
        out.extend_from_slice(&dot.device.to_le_bytes());
    }
    out
}

fn decode_dots(mut b: &[u8]) -> Result<TagState> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if b.len() < n {
            return Err(StateError::Corrupt("a message's tag state is cut short"));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u64_of(b: &mut &[u8]) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(take(b, 8)?);
        Ok(u64::from_le_bytes(a))
    }
    let mut dots = Vec::new();
    while !b.is_empty() {
        let mut n = [0u8; 2];
        n.copy_from_slice(take(&mut b, 2)?);
        let tag = std::str::from_utf8(take(&mut b, u16::from_le_bytes(n) as usize)?)
            .map_err(|_| StateError::Corrupt("a tag in the tag state is not UTF-8"))?
            .to_owned();
        let offset = u64_of(&mut b)?;
        let device = u64_of(&mut b)?;
        dots.push((tag, Dot { offset, device }));
    }
    Ok(TagState::from_dots(dots))
}

/// Moves a profile from the first schema (a `messages` table of names only and a `dots`
/// table with one row per dot) to the current one, in the caller's transaction. The Store
/// records such a profile applied before it kept `refs` are recognised the way it did:
/// by their initial tags' dots (device 0 at the record's offset).
fn migrate_dots(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    tx.execute_batch(
        "CREATE TABLE messages_v2 (
             hash BLOB PRIMARY KEY, name TEXT, dots BLOB NOT NULL DEFAULT x''
         ) WITHOUT ROWID;
         INSERT INTO messages_v2 (hash, name) SELECT hash, name FROM messages;
         INSERT OR IGNORE INTO refs (offset, hash, store)
             SELECT offset, hash, 1 FROM dots WHERE device = 0;",
    )?;
    {
        let mut read = tx.prepare("SELECT hash, tag, offset, device FROM dots ORDER BY hash")?;
        let mut rows = read.query([])?;
        let put = |hash: &[u8], dots: Vec<(String, Dot)>| -> Result<()> {
            tx.prepare_cached(
                "INSERT INTO messages_v2 (hash, dots) VALUES (?1, ?2)
                 ON CONFLICT(hash) DO UPDATE SET dots = excluded.dots",
            )?
            .execute(params![hash, encode_dots(&TagState::from_dots(dots))])?;
            Ok(())
        };
        // The message being gathered: its hash and dots (rows come sorted by hash).
        type Gathered = (Vec<u8>, Vec<(String, Dot)>);
        let mut current: Option<Gathered> = None;
        while let Some(r) = rows.next()? {
            let hash: Vec<u8> = r.get(0)?;
            let dot = (
                r.get::<_, String>(1)?,
                Dot {
                    offset: r.get::<_, i64>(2)? as u64,
                    device: r.get::<_, i64>(3)? as u64,
                },
            );
            match &mut current {
                Some((h, dots)) if *h == hash => dots.push(dot),
                _ => {
                    if let Some((h, dots)) = current.replace((hash, vec![dot])) {
                        put(&h, dots)?;
                    }
                }
            }
        }
        if let Some((h, dots)) = current {
            put(&h, dots)?;
        }
    }
    tx.execute_batch(
        "DROP TABLE dots;
         DROP TABLE messages;
         ALTER TABLE messages_v2 RENAME TO messages;",
    )?;
    Ok(())
}

/// The modification times of `cur/` and `new/`, which change whenever a file is added,
/// renamed or removed in them.
fn dir_stamp(maildir: &Path) -> Result<String> {
    let mut out = String::new();
    for sub in ["cur", "new"] {
        let d = maildir.join(sub);
        let m = std::fs::metadata(&d).map_err(io(&d))?;
        let t = m.modified().map_err(io(&d))?;
        let ns = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        out.push_str(&format!("{ns};"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (CI, session 6): `sync --watch` on a fresh profile opened the state from
    /// two threads at once and one failed with "duplicate column name: acked".
    #[test]
    fn first_opens_at_once_both_succeed() {
        for _ in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                let opens: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            State::open(dir.path()).map(|_| ())
                        })
                    })
                    .collect();
                for o in opens {
                    o.join().unwrap().unwrap();
                }
            });
        }
    }

    /// A profile made before `refs_by_hash` was dropped loses the index on open and keeps
    /// its rows: a scrubbed Store offset still names its message.
    #[test]
    fn old_refs_index_is_dropped_and_refs_still_answer() {
        let dir = tempfile::tempdir().unwrap();
        let h = BlobHash([7; 32]);
        {
            let mut st = State::open(dir.path()).unwrap();
            let c = st.conn();
            c.execute_batch("CREATE INDEX refs_by_hash ON refs (hash)")
                .unwrap();
            State::record_ref(c, 5, &h, true).unwrap();
            State::record_ref(c, 6, &h, false).unwrap();
        }
        let mut st = State::open(dir.path()).unwrap();
        let c = st.conn();
        let indexes: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'refs_by_hash'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        assert_eq!(State::scrub_ref(c, 6).unwrap(), None);
        assert_eq!(State::scrub_ref(c, 5).unwrap(), Some(h));
        assert_eq!(State::scrub_ref(c, 5).unwrap(), None);
    }

    /// A profile of the first schema (names in `messages`, one `dots` row per dot, Store
    /// records known only by their device-0 dots) opens with the same names, tags and
    /// deletable Store offsets.
    #[test]
    fn first_schema_profile_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (BlobHash([1; 32]), BlobHash([2; 32]), BlobHash([3; 32]));
        {
            let db = Connection::open(dir.path().join("state.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE messages (hash BLOB PRIMARY KEY, name TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE dots (
                     hash BLOB NOT NULL, tag TEXT NOT NULL, offset INTEGER NOT NULL,
                     device INTEGER NOT NULL, PRIMARY KEY (hash, tag, offset, device)
                 ) WITHOUT ROWID;
                 CREATE TABLE pending (
                     seq INTEGER PRIMARY KEY, hash BLOB NOT NULL, add_tags TEXT NOT NULL,
                     remove_tags TEXT NOT NULL, seen INTEGER NOT NULL
                 );",
            )
            .unwrap();
            for (h, name) in [(&a, "cur/a:2,S"), (&b, "new/b")] {
                db.execute(
                    "INSERT INTO messages VALUES (?1, ?2)",
                    params![h.0.as_slice(), name],
                )
                .unwrap();
            }
            // a: Store at 0 (inbox), then "seen" by device 7 at 4. b: Store at 1 without
            // tags. c: tags only (no file here).
            for (h, tag, offset, device) in [
                (&a, "inbox", 0, 0),
                (&a, "seen", 4, 7),
                (&c, "todo", 2, 0),
                (&c, "todo", 3, 9),
            ] {
                db.execute(
                    "INSERT INTO dots VALUES (?1, ?2, ?3, ?4)",
                    params![h.0.as_slice(), tag, offset, device],
                )
                .unwrap();
            }
        }
        let mut st = State::open(dir.path()).unwrap();
        assert_eq!(st.count_messages().unwrap(), 2);
        let c_ = st.conn();
        assert_eq!(
            State::name_of(c_, &a).unwrap().as_deref(),
            Some("cur/a:2,S")
        );
        assert_eq!(State::name_of(c_, &c).unwrap(), None);
        assert_eq!(
            State::tags_of(c_, &a).unwrap().tags(),
            t(&["inbox", "seen"])
        );
        assert_eq!(State::tags_of(c_, &b).unwrap().tags(), Vec::<String>::new());
        let mut dots_c: Vec<_> = State::tags_of(c_, &c)
            .unwrap()
            .dots()
            .map(|(_, d)| d)
            .collect();
        dots_c.sort();
        assert_eq!(
            dots_c,
            [
                Dot {
                    offset: 2,
                    device: 0
                },
                Dot {
                    offset: 3,
                    device: 9
                }
            ]
        );
        assert_eq!(State::scrub_ref(c_, 0).unwrap(), Some(a));
        assert_eq!(State::scrub_ref(c_, 4).unwrap(), None);
        let names: Vec<_> = State::names(c_)
            .unwrap()
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        assert_eq!(names, [a, b]);
        State::forget_message(c_, &a).unwrap();
        assert_eq!(State::tags_of(c_, &a).unwrap().tags(), Vec::<String>::new());
        drop(st);
        // Opening again finds nothing to migrate.
        let mut st = State::open(dir.path()).unwrap();
        assert_eq!(
            State::name_of(st.conn(), &b).unwrap().as_deref(),
            Some("new/b")
        );
    }

    proptest::proptest! {
        #[test]
        fn dots_round_trip(dots in proptest::collection::vec(
            ("\\PC{0,20}", 0u64..u64::MAX, 0u64..u64::MAX), 0..12)
        ) {
            let state = TagState::from_dots(
                dots.into_iter().map(|(t, offset, device)| (t, Dot { offset, device })),
            );
            let back = decode_dots(&encode_dots(&state)).unwrap();
            proptest::prop_assert_eq!(back.snapshot(), state.snapshot());
        }

        #[test]
        fn garbage_dots_are_an_error_not_a_panic(b in proptest::collection::vec(0u8.., 0..64)) {
            let _ = decode_dots(&b);
        }
    }

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_and_names() {
        let h = BlobHash([1; 32]);
        assert_eq!(flags_of_tags(&t(&["inbox", "unread"])), "");
        assert_eq!(flags_of_tags(&t(&["flagged", "replied"])), "FRS");
        assert_eq!(desired_name(&h, &t(&["unread"]), None), format!("new/{h}"));
        assert_eq!(
            desired_name(&h, &t(&["unread"]), Some("cur/x")),
            format!("cur/{h}:2,")
        );
        assert_eq!(
            desired_name(&h, &t(&["inbox"]), Some("new/x")),
            format!("cur/{h}:2,S")
        );
        assert_eq!(tags_of_name("new", "abc"), ["unread".to_string()].into());
        assert_eq!(
            tags_of_name("cur", "abc:2,FST"),
            ["deleted".to_string(), "flagged".to_string()].into()
        );
    }

    #[test]
    fn put_message_writes_name_and_tags_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::open(dir.path()).unwrap();
        let (h, g) = (BlobHash([3; 32]), BlobHash([4; 32]));
        let c = st.conn();
        assert_eq!(State::message_of(c, &h).unwrap().0, None);
        let mut tags = TagState::default();
        tags.apply_store(7, &t(&["inbox", "unread"]));
        State::put_message(c, &h, Some("new/x"), &tags).unwrap();
        // A message with tags but no file here.
        State::put_message(c, &g, None, &tags).unwrap();
        let (name, got) = State::message_of(c, &h).unwrap();
        assert_eq!(
            (name.as_deref(), got.tags()),
            (Some("new/x"), t(&["inbox", "unread"]))
        );
        assert_eq!(State::message_of(c, &g).unwrap().0, None);
        assert_eq!(st.count_messages().unwrap(), 1);
        // A second write replaces both columns.
        tags.apply_op(8, &[], &t(&["unread"]), 7, 1);
        State::put_message(st.conn(), &h, Some("cur/x:2,S"), &tags).unwrap();
        let (name, got) = State::message_of(st.conn(), &h).unwrap();
        assert_eq!(
            (name.as_deref(), got.tags()),
            (Some("cur/x:2,S"), t(&["inbox"]))
        );
    }

    #[test]
    fn scan_turns_renames_into_ops() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("mail");
        for s in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(md.join(s)).unwrap();
        }
        let h = BlobHash([7; 32]);
        std::fs::write(md.join(format!("new/{h}")), b"x").unwrap();
        let mut st = State::open(dir.path()).unwrap();
        State::set_name(st.conn(), &h, &format!("new/{h}")).unwrap();
        assert_eq!(st.scan_maildir(&md, 5).unwrap(), 0);
        // A mail reader reads and flags it.
        std::fs::rename(
            md.join(format!("new/{h}")),
            md.join(format!("cur/{h}:2,FS")),
        )
        .unwrap();
        assert_eq!(st.scan_maildir(&md, 5).unwrap(), 1);
        let ops = st.pending().unwrap();
        assert_eq!(
            ops,
            vec![PendingOp {
                seq: 1,
                hash: h,
                add: t(&["flagged"]),
                remove: t(&["unread"]),
                seen: 5
            }]
        );
        // Nothing changed since: no second op (and the scan is skipped by the stamp).
        assert_eq!(st.scan_maildir(&md, 6).unwrap(), 0);
        st.op_done(1).unwrap();
        assert!(st.pending().unwrap().is_empty());
    }

    #[test]
    fn acknowledged_ops_stay_in_the_view_until_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::open(dir.path()).unwrap();
        let (h, g) = (BlobHash([1; 32]), BlobHash([2; 32]));
        let c = st.conn();
        assert!(State::queue_op_once(c, &h, &t(&["a"]), &[], 3).unwrap());
        // The same change again (found again after a crash) is not queued twice...
        assert!(!State::queue_op_once(c, &h, &t(&["a"]), &[], 3).unwrap());
        assert!(State::queue_op_once(c, &h, &[], &t(&["a"]), 3).unwrap());
        // ...but a change back to it is.
        assert!(State::queue_op_once(c, &h, &t(&["a"]), &[], 3).unwrap());
        assert!(State::queue_op_once(c, &g, &t(&["b"]), &t(&["c"]), 3).unwrap());
        let crdt = t(&["c", "x"]);
        let o = State::overlay(c, 10).unwrap();
        assert_eq!(view(crdt.clone(), o.get(&h)), t(&["a", "c", "x"]));
        assert_eq!(view(crdt.clone(), o.get(&g)), t(&["b", "x"]));
        // Acknowledged at offset 12: not sent again, still shown until offset 12 applies.
        State::ack_op(st.conn(), 4, 12).unwrap();
        assert_eq!(st.pending().unwrap().len(), 3);
        let o = State::overlay(st.conn(), 12).unwrap();
        assert_eq!(view(crdt.clone(), o.get(&g)), t(&["b", "x"]));
        let o = State::overlay(st.conn(), 13).unwrap();
        assert_eq!(view(crdt.clone(), o.get(&g)), crdt);
        State::forget_applied(st.conn(), 13).unwrap();
        State::forget_op(st.conn(), 1).unwrap();
        let left: Vec<u64> = st.pending().unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(left, vec![2, 3]);
    }
}
