//! The log read back at open: the segment files' records replayed into
//! the in-memory log, and a log still in sled moved to the files.

use raft::eraftpb::{Entry, HardState};

use super::super::RaftError;
use super::super::wal::{Place, Record, Wal};
use super::entries::{CACHE_BYTES, LogEntries};
use super::{HARD_STATE_KEY, LOG_TREE, be_u64, decode, read_message};
use crate::durable::Syncer;

/// The log as its records are read back at open ([`Wal::open`]).
pub(super) struct Replay {
    /// The compaction point: entries at or below it are skipped.
    truncated: u64,
    pub(super) log: LogEntries,
    /// The latest hard state record, if any.
    pub(super) hard_state: Option<HardState>,
    /// Whether an entry record was read.
    any_entry: bool,
}

impl Replay {
    pub(super) fn new(truncated: u64) -> Replay {
        Replay {
            truncated,
            log: LogEntries::new(truncated + 1, CACHE_BYTES),
            hard_state: None,
            any_entry: false,
        }
    }

    /// One record, in the order written (an entry with its place): an
    /// entry replaces any at or after its index and must follow the one
    /// before it; a reset drops those past its index.
    pub(super) fn record(&mut self, record: Record, place: Option<Place>) -> Result<(), RaftError> {
        match record {
            Record::HardState(hard_state) => self.hard_state = Some(hard_state),
            Record::Reset(index) => self.log.truncate_from(index + 1),
            Record::Entry(entry) => {
                self.any_entry = true;
                if entry.index <= self.truncated {
                    return Ok(());
                }
                let place = place.ok_or_else(|| {
                    RaftError::Inconsistent(format!("entry {} read without its place", entry.index))
                })?;
                self.log.truncate_from(entry.index);
                self.log.push(entry, place)?;
            }
        }
        Ok(())
    }
}

/// Moves a log kept in sled's `raft_log` tree (storage written before the
/// log had files) into the files, synced, then drops the tree. A crash
/// after the files were synced and before the tree was dropped finds the
/// entries in the files already and only drops the tree.
pub(super) fn migrate_sled_log(
    db: &sled::Db,
    syncer: &Syncer,
    old_log: &sled::Tree,
    meta: &sled::Tree,
    wal: &mut Wal,
    replay: &mut Replay,
) -> Result<(), RaftError> {
    if !replay.any_entry {
        let mut entries = Vec::new();
        for item in old_log.iter() {
            let (key, value) = item?;
            let entry = decode::<Entry>(&value, "raft_log")?;
            if key.len() != 8 || be_u64(&key) != entry.index {
                return Err(RaftError::Inconsistent(format!(
                    "raft log key {key:?} holds the entry of index {}",
                    entry.index
                )));
            }
            entries.push(entry);
        }
        let moved = entries.len();
        let places = wal.append_entries(&entries)?;
        for (entry, place) in entries.into_iter().zip(places) {
            replay.record(Record::Entry(entry), Some(place))?;
        }
        if replay.hard_state.is_none()
            && let Some(hard_state) = read_message::<HardState>(meta, HARD_STATE_KEY)?
        {
            wal.push_hard_state(&hard_state)?;
            replay.hard_state = Some(hard_state);
        }
        wal.sync()?;
        tracing::info!(entries = moved, "raft log moved from sled to its files");
    }
    db.drop_tree(LOG_TREE)?;
    syncer.flush(db)?;
    Ok(())
}
