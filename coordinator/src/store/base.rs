//! The installed snapshot kept as the stored state's base.
//!
//! Installing a Raft snapshot used to write every job and event into sled
//! again, one record at a time (3.1 s for 100,000 jobs, nearly all of it in
//! sled's per-record tree updates). Now the snapshot file itself becomes
//! the base of the stored state: it is linked into `state-base/` and the
//! state trees start empty, holding only what changed since. The same
//! happens to every snapshot the replica takes of itself (a *rebase*,
//! which bounds the journal, see [`super::journal`]). A *generation* names
//! one base and its trees:
//!
//! - generation 0 has no base file and uses the plain tree names (`jobs`,
//!   `nodes`, ...): a replica that never installed a snapshot, and every
//!   data directory written before generations existed;
//! - generation `g > 0` has the base file `state-base/<g>.snap` and the
//!   trees `jobs@g`, `nodes@g`, ...
//!
//! The current generation is one key of the `generation` tree. An install
//! links the file, writes the new generation's `meta` (the applied index
//! among it), flushes, and only then switches that key and flushes again:
//! a crash before the switch leaves the previous generation whole (its
//! leftovers are dropped on the next open), one after it the new one.
//!
//! Loading reads the base and lays the trees over it: the per-record trees
//! of the versions before the journal, where a record replaces the base's
//! and [`TOMBSTONE`] removes one the base has, then the journal. An
//! installed base's events at or above the event floor stay in memory
//! (they are read by `watch --from` and written into the next snapshot)
//! until the next rebase writes them into the event log, and leave it as
//! the floor rises.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{StateSnapshot, StoreError};
use crate::domain::EventRecord;

/// The value that marks a base record as removed. Never a valid record:
/// a prost message cannot start with `0xff` (field 31, wire type 7) and a
/// JSON one starts with `{` or `[`.
pub(super) const TOMBSTONE: &[u8] = &[0xff];

/// The state trees of one generation: the per-record trees of the versions
/// before the journal (read, never written), the journal and event log
/// ([`super::journal`]) and `meta`.
pub(super) const STATE_TREES: [&str; 8] = [
    "jobs",
    "nodes",
    "events",
    "submissions",
    "estimates",
    "meta",
    "journal",
    "event_log",
];

/// The tree holding the current generation.
const ROOT_TREE: &str = "generation";
const ROOT_CURRENT: &str = "current";

/// The storage layout this version writes: 5, the history in files of its
/// own (`history`, [`super::history::log`]; an earlier version would find
/// none). 4: the Raft log in files of its own (`raft-wal`,
/// [`crate::raft::wal`]; an earlier version would find no log in the
/// database and a stale hard state). 3: the history in chunks; 2: the
/// journal, with a history a record per job; 1: per-record trees, whose
/// pointer was 8 bytes. A layout 2, 3 or 4 data directory's history is
/// moved into its files when opened ([`super::history::migrate`]), a
/// layout 3 one's Raft log into its files when the Raft storage opens.
pub(super) const LAYOUT: u64 = 5;

/// The name of state tree `tree` in `generation`.
pub(super) fn tree_name(tree: &str, generation: u64) -> String {
    if generation == 0 {
        tree.to_string()
    } else {
        format!("{tree}@{generation}")
    }
}

/// The generation a state tree's name belongs to; `None` for a tree that
/// is not a state tree (history, the Raft log, the member book, ...).
fn generation_of(name: &str) -> Option<u64> {
    match name.split_once('@') {
        None => STATE_TREES.contains(&name).then_some(0),
        Some((tree, generation)) => STATE_TREES
            .contains(&tree)
            .then(|| generation.parse().ok())
            .flatten(),
    }
}

/// What the store keeps of its base: its generation and the events of an
/// installed snapshot.
#[derive(Debug, Clone, Default)]
pub(super) struct Base {
    /// The generation (0: no base).
    pub generation: u64,
    /// The base's events at or above the event floor, ascending.
    pub events: Vec<EventRecord>,
    /// One past the base's highest event index (the next index when every
    /// base event is below the floor and the trees hold none).
    pub next_event_index: u64,
}

impl Base {
    /// The base a snapshot is for `generation`; the snapshot's events move
    /// into it (those below the floor are dropped).
    pub fn take(generation: u64, snapshot: &mut StateSnapshot) -> Base {
        let (events, next_event_index) = take_events(snapshot);
        Base {
            generation,
            events,
            next_event_index,
        }
    }

    /// Drops the base events below a new event floor.
    pub fn raise_floor(&mut self, floor: u64) {
        let below = self.events.partition_point(|event| event.index < floor);
        self.events.drain(..below);
    }
}

/// The state trees of one generation (a sled tree is a handle).
#[derive(Clone)]
pub(super) struct Trees {
    /// Per-record trees of the versions before the journal: read on load,
    /// never written (`events` loses what falls below the floor).
    pub jobs: sled::Tree,
    pub nodes: sled::Tree,
    pub events: sled::Tree,
    pub submissions: sled::Tree,
    pub estimates: sled::Tree,
    /// Applied index, leader term, next job id, event floor, retention,
    /// pipeline runs, history size.
    pub meta: sled::Tree,
    /// See [`super::journal`].
    pub journal: sled::Tree,
    pub event_log: sled::Tree,
}

impl Trees {
    /// Opens (creating) `generation`'s trees.
    pub fn open(db: &sled::Db, generation: u64) -> Result<Trees, StoreError> {
        let tree = |name| db.open_tree(tree_name(name, generation));
        Ok(Trees {
            jobs: tree("jobs")?,
            nodes: tree("nodes")?,
            events: tree("events")?,
            submissions: tree("submissions")?,
            estimates: tree("estimates")?,
            meta: tree("meta")?,
            journal: tree(super::journal::JOURNAL)?,
            event_log: tree(super::journal::EVENT_LOG)?,
        })
    }

    /// Opens `generation`'s trees empty: what an install or a rebase that
    /// crashed before its switch left in them goes.
    pub fn open_empty(db: &sled::Db, generation: u64) -> Result<Trees, StoreError> {
        let trees = Trees::open(db, generation)?;
        for tree in [
            &trees.jobs,
            &trees.nodes,
            &trees.events,
            &trees.submissions,
            &trees.estimates,
            &trees.meta,
            &trees.journal,
            &trees.event_log,
        ] {
            if !tree.is_empty() {
                tree.clear()?;
            }
        }
        Ok(trees)
    }
}

/// Moves a snapshot's events out of it: those at or above its floor,
/// ascending, and one past the highest index among all of them (1 when it
/// has none).
pub(super) fn take_events(snapshot: &mut StateSnapshot) -> (Vec<EventRecord>, u64) {
    let next_event_index = snapshot
        .events
        .iter()
        .map(|e| e.index + 1)
        .max()
        .unwrap_or(1);
    let floor = snapshot.event_floor;
    let mut events = std::mem::take(&mut snapshot.events);
    events.retain(|event| event.index >= floor);
    events.sort_by_key(|event| event.index);
    (events, next_event_index)
}

/// Where base files live, and the current generation's pointer.
#[derive(Debug, Clone)]
pub(super) struct BaseFiles {
    dir: PathBuf,
    root: sled::Tree,
}

impl BaseFiles {
    /// Opens the pointer in `db` and the base directory under `data_dir`.
    pub fn open(db: &sled::Db, data_dir: &Path) -> Result<BaseFiles, StoreError> {
        Ok(BaseFiles {
            dir: data_dir.join("state-base"),
            root: db.open_tree(ROOT_TREE)?,
        })
    }

    /// The current generation (0 when none was ever switched to). The
    /// pointer is 16 bytes, the generation then the layout
    /// ([`LAYOUT`]); the 8 bytes of the versions before the journal are
    /// layout 1. A layout past this version's is refused: that data
    /// directory was written by a newer version.
    pub fn current(&self) -> Result<u64, StoreError> {
        let Some(value) = self.root.get(ROOT_CURRENT)? else {
            return Ok(0);
        };
        let word = |at: usize| {
            value
                .get(at..at + 8)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes)
        };
        match (value.len(), word(0), word(8)) {
            (8, Some(generation), _) => Ok(generation),
            (16, Some(generation), Some(layout)) if layout <= LAYOUT => Ok(generation),
            (16, _, Some(layout)) => Err(StoreError::Layout(format!(
                "the data directory has storage layout {layout}, written by a newer version (this one reads up to {LAYOUT})"
            ))),
            (len, _, _) => Err(StoreError::Layout(format!(
                "unreadable {ROOT_TREE}/{ROOT_CURRENT}: {len} bytes, expected 8 or 16"
            ))),
        }
    }

    /// Marks the data directory as of this version's layout, flushed, so
    /// that an earlier version refuses to open it instead of loading it
    /// without what it cannot read: one before the journal reads the
    /// pointer as exactly 8 bytes, one of an earlier layout refuses a
    /// layout past its own.
    pub fn mark_layout(&self, db: &sled::Db, generation: u64) -> Result<(), StoreError> {
        let marked = self.root.get(ROOT_CURRENT)?.is_some_and(|value| {
            value.len() == 16 && value.get(8..16) == Some(&LAYOUT.to_be_bytes()[..])
        });
        if !marked {
            self.switch(generation)?;
            db.flush()?;
        }
        Ok(())
    }

    /// The base file of `generation`.
    pub fn path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{generation}.snap"))
    }

    /// The size of `generation`'s base file (0 for generation 0, or when
    /// it cannot be read: the open that follows reports that).
    pub fn size(&self, generation: u64) -> u64 {
        if generation == 0 {
            return 0;
        }
        std::fs::metadata(self.path(generation)).map_or(0, |m| m.len())
    }

    /// Makes `file` the base file of `generation`, durably: a hard link
    /// when the file system allows one (no copy of the bytes), else a copy,
    /// synced; then the directory is synced.
    pub fn store(&self, file: &Path, generation: u64) -> Result<(), StoreError> {
        let io = |what: &str, error: std::io::Error| {
            StoreError::Snapshot(format!("cannot {what} the base snapshot: {error}"))
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("create the directory of", e))?;
        let target = self.path(generation);
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io("replace", error)),
        }
        if std::fs::hard_link(file, &target).is_err() {
            std::fs::copy(file, &target).map_err(|e| io("copy", e))?;
            std::fs::File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("sync", e))?;
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the directory of", e))
    }

    /// Switches the current generation (the caller flushes).
    pub fn switch(&self, generation: u64) -> Result<(), StoreError> {
        let mut value = generation.to_be_bytes().to_vec();
        value.extend_from_slice(&LAYOUT.to_be_bytes());
        self.root.insert(ROOT_CURRENT, value)?;
        Ok(())
    }

    /// Drops every state tree and base file that is not `current`'s: the
    /// previous generation after an install, or a crashed install's
    /// leftovers. Failing to remove a file only leaves it behind.
    pub fn drop_others(&self, db: &sled::Db, current: u64) -> Result<(), StoreError> {
        for name in db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if generation_of(&name).is_some_and(|g| g != current) {
                db.drop_tree(name.as_bytes())?;
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        let keep = self.path(current);
        for entry in entries.flatten() {
            let path = entry.path();
            if path == keep {
                continue;
            }
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove an old base snapshot");
            }
        }
        Ok(())
    }
}

/// Lays a per-record tree's records over the base's, in key order: a
/// record replaces the base's with the same key, a tombstone removes it.
pub(super) fn overlay<K: Ord, T>(
    base: impl IntoIterator<Item = (K, T)>,
    tree: &sled::Tree,
    key: impl Fn(&[u8]) -> K,
    decode: impl Fn(&[u8]) -> Result<T, StoreError>,
) -> Result<BTreeMap<K, T>, StoreError> {
    let mut merged: BTreeMap<K, T> = base.into_iter().collect();
    for item in tree.iter() {
        let (k, value) = item?;
        if value.as_ref() == TOMBSTONE {
            merged.remove(&key(&k));
        } else {
            merged.insert(key(&k), decode(&value)?);
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tree_names_and_their_generations() {
        assert_eq!(tree_name("jobs", 0), "jobs");
        assert_eq!(tree_name("jobs", 3), "jobs@3");
        assert_eq!(generation_of("jobs"), Some(0));
        assert_eq!(generation_of("meta@12"), Some(12));
        assert_eq!(generation_of("journal@3"), Some(3));
        assert_eq!(generation_of("event_log"), Some(0));
        for other in [
            "history",
            "history_index",
            "history_chunks",
            "history_heads",
            "history_log",
            "generation",
            "raft_log",
            "jobs@x",
            "x@1",
        ] {
            assert_eq!(generation_of(other), None, "{other}");
        }
    }

    #[test]
    fn the_base_keeps_events_at_or_above_the_floor_and_drops_them_as_it_rises() {
        let event = |index| EventRecord {
            index,
            at_ms: 0,
            job_id: 1,
            job_name: String::new(),
            kind: gantry_scheduler::JobKind::Selfplay,
            state: crate::domain::JobState::Pending,
            node: String::new(),
            attempt: 0,
            message: String::new(),
            pipeline: String::new(),
        };
        let mut snapshot = StateSnapshot {
            events: vec![event(4), event(2), event(3), event(5)],
            event_floor: 3,
            next_job_id: 10,
            ..StateSnapshot::default()
        };
        let mut base = Base::take(1, &mut snapshot);
        assert!(snapshot.events.is_empty(), "moved into the base");
        assert_eq!(base.next_event_index, 6);
        let indexes = |b: &Base| b.events.iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(indexes(&base), vec![3, 4, 5]);
        base.raise_floor(5);
        assert_eq!(indexes(&base), vec![5]);
    }
}
