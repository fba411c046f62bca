//! Moving the stored state to a new generation (see [`super::base`]): an
//! installed Raft snapshot, or one this replica took of itself (a rebase,
//! which bounds the journal).
//!
//! Both link the snapshot file as the new base, fill the new generation's
//! event log and `meta` (the applied index among it), flush, and only then
//! switch the generation and flush again: a crash before the switch leaves
//! the previous generation whole (the new one's leftovers are dropped on
//! the next open), one after it the new one.

use std::path::Path;

use gantry_proto::storage as st;

use super::base::{self, Trees};
use super::{
    META_APPLIED_INDEX, META_BASE_NEXT_EVENT, META_EVENT_FLOOR, META_EVENTS_LOGGED,
    META_LEADER_TERM, META_NEXT_JOB_ID, META_RETENTION, SnapshotMark, StateSnapshot, Store,
    StoreError, encode, journal, records, run_key, state_from,
};
use crate::state::{RetentionPolicy, StateMachine};

/// The `meta` of a new generation.
struct BaseMeta<'a> {
    leader_term: u64,
    next_job_id: u64,
    event_floor: u64,
    retention: Option<&'a RetentionPolicy>,
    pipeline_runs: Vec<(&'a str, u32)>,
    /// One past the highest event index the state has given.
    next_event_index: u64,
    applied: u64,
}

impl Store {
    /// Installs a Raft snapshot's state at `index`, read from `file`: the
    /// file becomes the base of a new generation whose journal starts
    /// empty, so no job is written. Returns the state, built from the
    /// decoded `snapshot` (the file's contents).
    pub fn install(
        &mut self,
        file: &Path,
        mut snapshot: StateSnapshot,
        index: u64,
    ) -> Result<StateMachine, StoreError> {
        // The caller wrote what it held back (its history records stay:
        // the history is this replica's own, not in snapshots); anything
        // else held back is of the state being replaced. The writes sent
        // go to the trees being replaced: they land first.
        self.pending = None;
        self.writer.drain()?;
        let (events, next_event_index) = base::take_events(&mut snapshot);
        let next_event_index = next_event_index.max(snapshot.event_floor);
        let meta = BaseMeta {
            leader_term: snapshot.leader_term,
            next_job_id: snapshot.next_job_id,
            event_floor: snapshot.event_floor,
            retention: snapshot.retention.as_ref(),
            pipeline_runs: snapshot
                .pipeline_runs
                .iter()
                .map(|(name, run)| (name.as_str(), *run))
                .collect(),
            next_event_index,
            applied: index,
        };
        let events = events.iter().map(records::event_to_storage).collect();
        self.switch_generation(file, &meta, |trees| {
            Ok(Filled {
                bytes: journal::write_events(&trees.event_log, events)?,
                journal_next: 0,
            })
        })?;
        Ok(state_from(snapshot, next_event_index))
    }

    /// Makes the snapshot this replica took at `index` (`file`, taken with
    /// [`Store::take_snapshot`], which returned `mark`) the base of
    /// a new generation. Its journal starts with the journal writes made
    /// since the snapshot, carried over from `mark` on: the state may have
    /// moved on while the file was written (off the replica loop), and
    /// `state` is the state now. The journal then holds only what changed
    /// since the last snapshot. The events at or above the floor are
    /// copied into the new event log. A snapshot of another generation
    /// (an installed one came in between) is refused.
    pub fn rebase(
        &mut self,
        file: &Path,
        index: u64,
        mark: SnapshotMark,
        state: &StateMachine,
    ) -> Result<(), StoreError> {
        if mark.generation() != self.base.generation {
            return Err(StoreError::Snapshot(format!(
                "cannot make the snapshot at index {index} the base: it was taken of generation {}, the stored state is at generation {}",
                mark.generation(),
                self.base.generation
            )));
        }
        self.write_pending(state)?;
        // The stored state may name an earlier index than the snapshot's:
        // entries without a command (an election's empty entry, a
        // membership change) are not written.
        let applied = self.applied_index()?.max(index);
        let meta = BaseMeta {
            leader_term: state.leader_term(),
            next_job_id: state.next_job_id(),
            event_floor: state.event_floor(),
            retention: Some(state.retention()),
            pipeline_runs: state
                .pipeline_runs()
                .iter()
                .map(|(name, run)| (name.as_str(), *run))
                .collect(),
            next_event_index: state.next_event_index(),
            applied,
        };
        let floor = state.event_floor();
        let old = self.trees.clone();
        let base_events = std::mem::take(&mut self.base.events);
        self.switch_generation(file, &meta, |trees| {
            let events = copy_events(&old, &base_events, floor, &trees.event_log)?;
            let (carried, journal) =
                copy_journal(&old.journal, mark.journal_from(), &trees.journal)?;
            Ok(Filled {
                bytes: events + journal,
                journal_next: carried,
            })
        })?;
        Ok(())
    }

    /// Links `file` as the next generation's base, fills its event log and
    /// journal (`fill`) and `meta`, switches to it and drops the previous
    /// one.
    fn switch_generation(
        &mut self,
        file: &Path,
        meta: &BaseMeta,
        fill: impl FnOnce(&Trees) -> Result<Filled, StoreError>,
    ) -> Result<(), StoreError> {
        let generation = self.base.generation + 1;
        self.files.store(file, generation)?;
        let trees = Trees::open_empty(&self.db, generation)?;
        let filled = fill(&trees)?;
        let mut batch = sled::Batch::default();
        batch.insert(META_LEADER_TERM, &meta.leader_term.to_be_bytes());
        batch.insert(META_NEXT_JOB_ID, &meta.next_job_id.to_be_bytes());
        batch.insert(META_EVENT_FLOOR, &meta.event_floor.to_be_bytes());
        if let Some(policy) = meta.retention {
            batch.insert(META_RETENTION, encode(policy)?);
        }
        for (name, run) in &meta.pipeline_runs {
            batch.insert(run_key(name), &u64::from(*run).to_be_bytes());
        }
        // The base file's events are in the event log: not read from it.
        batch.insert(META_EVENTS_LOGGED, &1u64.to_be_bytes());
        batch.insert(META_BASE_NEXT_EVENT, &meta.next_event_index.to_be_bytes());
        batch.insert(META_APPLIED_INDEX, &meta.applied.to_be_bytes());
        trees.meta.apply_batch(batch)?;
        self.syncer.flush(&self.db)?;
        self.files.switch(generation)?;
        self.syncer.flush(&self.db)?;
        self.journal_bytes = filled.bytes;
        self.base_bytes = self.files.size(generation);
        self.trees = trees;
        self.journal_next = filled.journal_next;
        self.event_floor = meta.event_floor;
        self.base = base::Base {
            generation,
            events: Vec::new(),
            next_event_index: meta.next_event_index,
        };
        self.opened_base = None;
        self.files.drop_others(&self.db, generation)?;
        Ok(())
    }
}

/// What filling a new generation wrote.
struct Filled {
    /// Bytes in its event log and journal.
    bytes: u64,
    /// The key of its next journal write.
    journal_next: u64,
}

/// Copies the journal's writes from key `from` on into a new generation's
/// journal, in order, keyed from 0; returns how many and their bytes.
fn copy_journal(old: &sled::Tree, from: u64, new: &sled::Tree) -> Result<(u64, u64), StoreError> {
    let mut batch = sled::Batch::default();
    let (mut count, mut bytes) = (0u64, 0u64);
    for item in old.range(from.to_be_bytes()..) {
        let (_, value) = item?;
        bytes += value.len() as u64;
        batch.insert(&count.to_be_bytes(), value);
        count += 1;
    }
    new.apply_batch(batch)?;
    Ok((count, bytes))
}

/// Copies the events at or above `floor` into a new generation's event
/// log and returns the bytes written: an installed base's (`base_events`,
/// in memory) and the per-record tree's, in new values, then the event
/// log's values as they are (one wholly below the floor is left behind).
fn copy_events(
    old: &Trees,
    base_events: &[crate::domain::EventRecord],
    floor: u64,
    log: &sled::Tree,
) -> Result<u64, StoreError> {
    let mut loose: Vec<st::EventRecord> = Vec::new();
    journal::visit_loose_events(base_events, &old.events, floor, &mut |event| {
        loose.push(event);
        Ok(true)
    })?;
    let mut bytes = journal::write_events(log, loose)?;
    for item in journal::batches_from(&old.event_log, floor)? {
        let (key, value) = item?;
        bytes += value.len() as u64;
        log.insert(key, value)?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
