//! Property tests: replicas that submit operations offline, in any interleaving, with
//! duplicates and retries, converge to identical tags, add wins, and no operation on one
//! tag affects another.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn merge_rule_examples() {
    // Initial tags, then a device that saw them removes `unread`.
    let mut m = TagState::default();
    m.apply_store(0, &s(&["inbox", "unread"]));
    m.apply_op(1, &[], &s(&["unread"]), 0, 7);
    assert_eq!(m.tags(), s(&["inbox"]));
    // Concurrent: device 1 adds `todo` at offset 2 (seen 1); device 2 removes `todo` having
    // seen only offset 1: the add it never saw wins.
    m.apply_op(2, &s(&["todo"]), &[], 1, 1);
    m.apply_op(3, &[], &s(&["todo"]), 1, 2);
    assert!(m.has("todo"));
    // A remove that saw the add removes it.
    m.apply_op(4, &[], &s(&["todo"]), 3, 2);
    assert!(!m.has("todo"));
    // A device's own offline add then remove (seen is older than both): the remove covers
    // the device's own earlier add.
    m.apply_op(5, &s(&["x"]), &[], 0, 9);
    m.apply_op(6, &[], &s(&["x"]), 0, 9);
    assert!(!m.has("x"));
    // Remove before add within one op.
    m.apply_op(7, &s(&["y"]), &s(&["y"]), 6, 3);
    assert!(m.has("y"));
    // Tags with spaces and non-ASCII are just strings.
    m.apply_op(8, &s(&["to read later", "\u{e9}t\u{e9}"]), &[], 7, 3);
    assert!(m.has("to read later") && m.has("\u{e9}t\u{e9}"));
}

/// One replica's operation, made against what it had seen.
#[derive(Clone, Debug)]
struct Op {
    device: u64,
    seq: u64,
    msg: usize,
    add: Vec<String>,
    remove: Vec<String>,
    seen: LogOffset,
}

#[derive(Clone, Debug)]
enum Step {
    /// Replica `r` makes a change on its current view (offline: queued, not sent).
    Edit {
        r: usize,
        msg: usize,
        add: Vec<usize>,
        remove: Vec<usize>,
    },
    /// Replica `r` sends its queue; the server appends each op it has not seen (by
    /// (device, seq)); `dup` resends the first op again (a retry after a lost answer).
    Send { r: usize, dup: bool, reverse: bool },
    /// Replica `r` pulls the log up to the server's head.
    Pull { r: usize },
}

const TAGS: [&str; 4] = ["unread", "flagged", "todo", "caf\u{e9} list"];
const MSGS: usize = 3;
const REPLICAS: usize = 3;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..REPLICAS, 0..MSGS, prop::collection::vec(0..TAGS.len(), 0..3), prop::collection::vec(0..TAGS.len(), 0..3))
            .prop_map(|(r, msg, add, remove)| Step::Edit { r, msg, add, remove }),
        2 => (0..REPLICAS, any::<bool>(), any::<bool>()).prop_map(|(r, dup, reverse)| Step::Send { r, dup, reverse }),
        2 => (0..REPLICAS).prop_map(|r| Step::Pull { r }),
    ]
}

enum Entry {
    Store { msg: usize, tags: Vec<String> },
    Op(Op),
}

struct Replica {
    applied: usize,
    state: Vec<TagState>,
    queue: Vec<Op>,
    next_seq: u64,
}

fn apply(state: &mut [TagState], offset: usize, e: &Entry) {
    match e {
        Entry::Store { msg, tags } => state[*msg].apply_store(offset as u64, tags),
        Entry::Op(op) => {
            state[op.msg].apply_op(offset as u64, &op.add, &op.remove, op.seen, op.device)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn replicas_converge_and_add_wins(steps in prop::collection::vec(step(), 1..60)) {
        // The server log starts with the three messages' Store records.
        let mut log: Vec<Entry> = (0..MSGS).map(|msg| Entry::Store { msg, tags: s(&["inbox", "unread"]) }).collect();
        let mut seen_ops: HashSet<(u64, u64)> = HashSet::new();
        let mut replicas: Vec<Replica> = (0..REPLICAS)
            .map(|_| Replica { applied: 0, state: vec![TagState::default(); MSGS], queue: vec![], next_seq: 1 })
            .collect();
        for step in steps {
            match step {
                Step::Edit { r, msg, add, remove } => {
                    let rep = &mut replicas[r];
                    if rep.applied <= msg {
                        continue; // a replica can only tag a message it has
                    }
                    let op = Op {
                        device: r as u64 + 1,
                        seq: rep.next_seq,
                        msg,
                        add: add.iter().map(|i| TAGS[*i].to_string()).collect(),
                        remove: remove.iter().map(|i| TAGS[*i].to_string()).collect(),
                        seen: rep.applied as u64 - 1,
                    };
                    rep.next_seq += 1;
                    rep.queue.push(op);
                }
                Step::Send { r, dup, reverse } => {
                    let mut q = std::mem::take(&mut replicas[r].queue);
                    if dup && !q.is_empty() {
                        q.push(q[0].clone());
                    }
                    // Requests of one device may arrive out of order (separate streams);
                    // what matters is that each is appended at most once.
                    if reverse {
                        q.reverse();
                    }
                    for op in q {
                        if seen_ops.insert((op.device, op.seq)) {
                            log.push(Entry::Op(op));
                        }
                    }
                }
                Step::Pull { r } => {
                    let rep = &mut replicas[r];
                    for (i, e) in log.iter().enumerate().skip(rep.applied) {
                        apply(&mut rep.state, i, e);
                    }
                    rep.applied = log.len();
                }
            }
        }
        // Everyone sends what is left and pulls everything.
        for rep in &mut replicas {
            for op in std::mem::take(&mut rep.queue) {
                if seen_ops.insert((op.device, op.seq)) {
                    log.push(Entry::Op(op));
                }
            }
        }
        let mut reference = vec![TagState::default(); MSGS];
        for (i, e) in log.iter().enumerate() {
            apply(&mut reference, i, e);
        }
        for rep in &mut replicas {
            for (i, e) in log.iter().enumerate().skip(rep.applied) {
                apply(&mut rep.state, i, e);
            }
            prop_assert_eq!(&rep.state, &reference, "replicas converge");
        }
        // Replaying the whole log once more changes nothing (crash before saving a cursor).
        let mut replayed = reference.clone();
        for (i, e) in log.iter().enumerate() {
            apply(&mut replayed, i, e);
        }
        prop_assert_eq!(&replayed, &reference);

        // Per tag, the result depends only on the ops on that tag: computing each tag alone
        // gives the same answer (no op on another tag is lost or interferes).
        for t in TAGS {
            let mut alone = vec![TagState::default(); MSGS];
            for (i, e) in log.iter().enumerate() {
                match e {
                    Entry::Store { msg, tags } => alone[*msg].apply_store(i as u64, &tags.iter().filter(|x| *x == t).cloned().collect::<Vec<_>>()),
                    Entry::Op(op) => {
                        let keep = |v: &Vec<String>| v.iter().filter(|x| *x == t).cloned().collect::<Vec<_>>();
                        alone[op.msg].apply_op(i as u64, &keep(&op.add), &keep(&op.remove), op.seen, op.device)
                    }
                }
            }
            for m in 0..MSGS {
                prop_assert_eq!(alone[m].has(t), reference[m].has(t));
            }
        }

        // Add wins: for the last op that adds tag t to a message, t is set at the end unless
        // a later op removed it having seen that add (or it was that device's own add).
        let mut last_add: BTreeMap<(usize, String), (usize, u64)> = BTreeMap::new();
        for (i, e) in log.iter().enumerate() {
            if let Entry::Op(op) = e {
                for t in &op.remove {
                    if let Some((o, dev)) = last_add.get(&(op.msg, t.clone())).copied()
                        && ((o as u64) <= op.seen || dev == op.device)
                    {
                        last_add.remove(&(op.msg, t.clone()));
                    }
                }
                for t in &op.add {
                    last_add.insert((op.msg, t.clone()), (i, op.device));
                }
            }
        }
        for ((m, t), _) in last_add {
            prop_assert!(reference[m].has(&t), "an unobserved add of {} on {} was lost", t, m);
        }

        // Compaction: at any point of the log, replacing each message's history by a
        // snapshot of its state gives the same end state, both for a replica that had
        // applied the history (the snapshot is a no-op for it) and for a fresh one that
        // starts from the snapshot and replays only what follows.
        for cut in [log.len() / 3, log.len() / 2, log.len() - 1] {
            let mut before = vec![TagState::default(); MSGS];
            for (i, e) in log.iter().enumerate().take(cut) {
                apply(&mut before, i, e);
            }
            let mut old = before.clone();
            let mut fresh = vec![TagState::default(); MSGS];
            for m in 0..MSGS {
                let snap = before[m].snapshot();
                old[m].apply_snapshot(&snap);
                prop_assert_eq!(&old[m], &before[m], "a snapshot changes nothing for a replica that has its history");
                fresh[m].apply_snapshot(&snap);
            }
            for (i, e) in log.iter().enumerate().skip(cut) {
                apply(&mut old, i, e);
                apply(&mut fresh, i, e);
            }
            prop_assert_eq!(&old, &reference);
            prop_assert_eq!(&fresh, &reference);
        }
    }
}
