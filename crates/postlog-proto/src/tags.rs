//! The tag CRDT: an add-wins observed-remove set per message, ordered by the server's log.
//!
//! Every replica (server and clients) replays the same log in the same order, so it is
//! enough that applying a record is deterministic: replicas that applied the same offsets
//! hold identical tags. The merge rule (docs/PROTOCOL.md, "Tags"):
//!
//! - An add of tag `t` at log offset `o` by device `d` records a *dot* `(o, d)` for `t`.
//!   A Store record's initial tags are adds by device 0 (the server) at the Store's offset.
//! - A remove of `t` by device `d` that had applied the log up to `seen` drops exactly the
//!   dots of `t` it could have observed: those at offsets `<= seen`, and those made by `d`
//!   itself (its own earlier operations, even if made offline after `seen`).
//! - Within one operation, removes apply before adds (so `+t -t` leaves `t` set).
//! - A tag is set while it has at least one dot. A concurrent add (a dot the remover had not
//!   seen) survives the remove: add wins. Operations on different tags never interact.
//!
//! Replaying a suffix of the log a second time leaves the state unchanged, so a client that
//! crashed after applying records but before saving its cursor converges on replay.

use std::collections::{BTreeMap, BTreeSet};

use crate::LogOffset;

/// Who made a tag change, and where it is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub offset: LogOffset,
    /// 0 for the server (initial tags of a Store record).
    pub device: u64,
}

/// One message's tags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TagState {
    dots: BTreeMap<String, BTreeSet<Dot>>,
}

impl TagState {
    /// Applies a Store record's initial tags.
    pub fn apply_store(&mut self, offset: LogOffset, tags: &[String]) {
        for t in tags {
            self.dots
                .entry(t.clone())
                .or_default()
                .insert(Dot { offset, device: 0 });
        }
    }

    /// Applies a Tags record.
    pub fn apply_op(
        &mut self,
        offset: LogOffset,
        add: &[String],
        remove: &[String],
        seen: LogOffset,
        device: u64,
    ) {
        for t in remove {
            if let Some(dots) = self.dots.get_mut(t) {
                dots.retain(|d| !(d.offset <= seen || d.device == device));
                if dots.is_empty() {
                    self.dots.remove(t);
                }
            }
        }
        for t in add {
            self.dots
                .entry(t.clone())
                .or_default()
                .insert(Dot { offset, device });
        }
    }

    /// Applies a TagSnapshot record: the state becomes exactly the snapshot's dots.
    ///
    /// The server builds a snapshot at offset `s` from every live record of the message
    /// below `s`, so a replica that applied those records already holds these dots (the
    /// replay is deterministic) and is unchanged, and a replica that skipped them (they are
    /// scrubbed) gets the same dots. Later removes compare `seen` with the original dot
    /// offsets, which the snapshot keeps, so they act identically on both.
    pub fn apply_snapshot(&mut self, tags: &[(String, Vec<Dot>)]) {
        self.dots.clear();
        for (t, ds) in tags {
            if !ds.is_empty() {
                self.dots
                    .entry(t.clone())
                    .or_default()
                    .extend(ds.iter().copied());
            }
        }
    }

    /// The state as TagSnapshot contents: every set tag with its dots, sorted.
    pub fn snapshot(&self) -> Vec<(String, Vec<Dot>)> {
        self.dots
            .iter()
            .map(|(t, ds)| (t.clone(), ds.iter().copied().collect()))
            .collect()
    }

    /// The most dots any one tag has (a snapshot holds at most `MAX_SNAPSHOT_DOTS`).
    pub fn max_dots_per_tag(&self) -> usize {
        self.dots.values().map(BTreeSet::len).max().unwrap_or(0)
    }

    /// The tags that are set, sorted.
    pub fn tags(&self) -> Vec<String> {
        self.dots.keys().cloned().collect()
    }

    pub fn has(&self, tag: &str) -> bool {
        self.dots.contains_key(tag)
    }

    /// Every `(tag, dot)`: the whole state, for storing it.
    pub fn dots(&self) -> impl Iterator<Item = (&str, Dot)> {
        self.dots
            .iter()
            .flat_map(|(t, ds)| ds.iter().map(move |d| (t.as_str(), *d)))
    }

    /// Rebuilds a state from stored dots.
    pub fn from_dots(dots: impl IntoIterator<Item = (String, Dot)>) -> Self {
        let mut s = TagState::default();
        for (t, d) in dots {
            s.dots.entry(t).or_default().insert(d);
        }
        s
    }
}

#[cfg(test)]
mod tests;
