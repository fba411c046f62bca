//! The installed snapshot kept as the stored state's base.
//!
//! Installing a Raft snapshot used to write every job and event into sled
//! again, one record at a time (3.1 s for 100,000 jobs, nearly all of it in
//! sled's per-record tree updates). Now the snapshot file itself becomes
//! the base of the stored state: it is linked into `state-base/` and the
//! state trees start empty, holding only what changed since. A *generation*
//! names one base and its trees:
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
//! Loading reads the base and lays the trees over it: a record replaces
//! the base's, and [`TOMBSTONE`] removes one the base has (a retired job,
//! a removed submission key). Only records that exist in the base get a
//! tombstone, so the trees never hold more than the base and the changes
//! since. The base's events at or above the event floor stay in memory
//! (they are read by `watch --from` and written into the next snapshot),
//! and leave it as the floor rises.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use gantry_scheduler::JobId;

use super::{StateSnapshot, StoreError};
use crate::domain::EventRecord;

/// The value that marks a base record as removed. Never a valid record:
/// a prost message cannot start with `0xff` (field 31, wire type 7) and a
/// JSON one starts with `{` or `[`.
pub(super) const TOMBSTONE: &[u8] = &[0xff];

/// The state trees of one generation, in the order [`tree_name`] and
/// [`is_state_tree`] know them.
pub(super) const STATE_TREES: [&str; 6] = [
    "jobs",
    "nodes",
    "events",
    "submissions",
    "estimates",
    "meta",
];

/// The tree holding the current generation.
const ROOT_TREE: &str = "generation";
const ROOT_CURRENT: &str = "current";

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

/// What the store keeps of its base: enough to decide tombstones and to
/// serve the base's events.
#[derive(Debug, Clone, Default)]
pub(super) struct Base {
    /// The generation (0: no base).
    pub generation: u64,
    /// Every job below this id that is alive is in the base (ids are
    /// never reused, and a job retired before the base is never retired
    /// again): its retirement is a tombstone, any other job's a removal.
    pub next_job_id: u64,
    /// Submission keys in the base: their removal is a tombstone.
    pub submissions: HashSet<String>,
    /// Learned classes in the base: their eviction is a tombstone.
    pub estimates: HashSet<String>,
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
        Base {
            generation,
            next_job_id: snapshot.next_job_id,
            submissions: snapshot
                .submissions
                .iter()
                .map(|(k, _)| k.clone())
                .collect(),
            estimates: snapshot
                .estimates
                .iter()
                .map(|(class, _)| class.clone())
                .collect(),
            events,
            next_event_index,
        }
    }

    /// Drops the base events below a new event floor.
    pub fn raise_floor(&mut self, floor: u64) {
        let below = self.events.partition_point(|event| event.index < floor);
        self.events.drain(..below);
    }

    /// Whether removing job `id` must leave a tombstone.
    pub fn has_job(&self, id: JobId) -> bool {
        self.generation > 0 && id < self.next_job_id
    }
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

    /// The current generation (0 when none was ever switched to).
    pub fn current(&self) -> Result<u64, StoreError> {
        match self.root.get(ROOT_CURRENT)? {
            None => Ok(0),
            Some(value) => {
                let bytes: [u8; 8] =
                    value
                        .as_ref()
                        .try_into()
                        .map_err(|_| StoreError::BadValue {
                            tree: ROOT_TREE,
                            key: ROOT_CURRENT,
                            len: value.len(),
                        })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// The base file of `generation`.
    pub fn path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{generation}.snap"))
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
        self.root.insert(ROOT_CURRENT, &generation.to_be_bytes())?;
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

/// Lays a tree's records over the base's, in key order: a record replaces
/// the base's with the same key, a tombstone removes it.
pub(super) fn overlay<K: Ord, T>(
    base: impl IntoIterator<Item = (K, T)>,
    tree: &sled::Tree,
    key: impl Fn(&[u8]) -> K,
    decode: impl Fn(&[u8]) -> Result<T, StoreError>,
) -> Result<Vec<(K, T)>, StoreError> {
    let mut merged: BTreeMap<K, T> = base.into_iter().collect();
    for item in tree.iter() {
        let (k, value) = item?;
        if value.as_ref() == TOMBSTONE {
            merged.remove(&key(&k));
        } else {
            merged.insert(key(&k), decode(&value)?);
        }
    }
    Ok(merged.into_iter().collect())
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
        for other in [
            "history",
            "history_index",
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
        assert!(base.has_job(9) && !base.has_job(10));
        assert!(!Base::default().has_job(0), "generation 0 has no base");
    }
}
