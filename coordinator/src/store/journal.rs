//! The store's journal: each write of the applied state as one value.
//!
//! The applied state used to be written record by record into sled trees
//! (`jobs`, `events`, `submissions`, ...), each write one transaction of a
//! couple of thousand inserts. sled's per-record tree updates (each insert
//! copies the leaf it lands in and, at a split, rewrites the parent) were
//! the writer thread's whole cost: 25 µs of CPU per job on each replica
//! (`gantry-bench ci`'s apply workload), four times the apply itself. A
//! write is now two values whatever its size:
//!
//! - a [`JournalBatch`](st::JournalBatch) in `journal@<generation>`, keyed
//!   by a sequence number: the jobs, nodes, submission keys and estimates
//!   it wrote or removed (the write's `meta`, the applied index among it,
//!   goes in the same transaction);
//! - an [`EventBatch`](st::EventBatch) in `event_log@<generation>`, keyed
//!   by the index of its first event.
//!
//! Loading lays the journal over the base (and over the per-record trees
//! of the versions before, still read) in key order. The journal is bounded
//! by the Raft snapshots: each one the replica takes becomes the base of a
//! new generation ([`Store::rebase`](super::Store::rebase)), whose journal
//! starts empty; the events at or above the floor are copied over.
//!
//! Events below the floor leave the event log a batch at a time, when the
//! whole batch is below it: reads filter by the floor, so what a reader or
//! a snapshot sees is exactly the events at or above it, on every replica,
//! whatever the batch boundaries.

use std::collections::BTreeMap;

use gantry_proto::storage as st;
use gantry_scheduler::JobId;
use prost::Message;

use super::records::{self, estimate_to_storage, job_to_storage, node_to_storage};
use super::{StoreError, key_u64};
use crate::domain::{EventRecord, JobRecord, NodeRecord};
use crate::state::{ChangeSet, Estimate, StateMachine};

/// The journal tree's name (per generation, see [`super::base`]).
pub(super) const JOURNAL: &str = "journal";
/// The event log tree's name (per generation).
pub(super) const EVENT_LOG: &str = "event_log";

/// Events per batch when the event log is rewritten (a rebase's copy of
/// events not already in batches).
const COPY_BATCH: usize = 4096;

/// The journal value of what `changes` wrote (`state` is the state after
/// them: records are read from it); `None` when it wrote no record.
pub(super) fn encode_changes(state: &StateMachine, changes: &ChangeSet) -> Option<Vec<u8>> {
    let batch = st::JournalBatch {
        jobs: changes
            .jobs
            .iter()
            .filter_map(|id| state.job(*id))
            .map(job_to_storage)
            .collect(),
        jobs_removed: changes.retired.iter().map(|job| job.id).collect(),
        nodes: changes
            .nodes
            .iter()
            .filter_map(|name| state.node(name))
            .map(node_to_storage)
            .collect(),
        submissions: changes
            .submissions
            .iter()
            .map(|(key, jobs)| st::Submission {
                key: key.clone(),
                jobs: jobs.clone(),
            })
            .collect(),
        submissions_removed: changes.submissions_removed.clone(),
        estimates: changes
            .estimates
            .iter()
            .filter_map(|class| {
                let estimate = state.estimates().get(class)?;
                Some(estimate_to_storage(class, estimate))
            })
            .collect(),
        // Evicted by the bound on learned classes.
        estimates_removed: changes
            .estimates
            .iter()
            .filter(|class| !state.estimates().contains_key(*class))
            .cloned()
            .collect(),
    };
    (batch != st::JournalBatch::default()).then(|| batch.encode_to_vec())
}

/// The event log value of `events` (ascending) and its key, the first
/// one's index; `None` when there are none.
pub(super) fn encode_events(events: &[EventRecord]) -> Option<(u64, Vec<u8>)> {
    let first = events.first()?.index;
    let batch = st::EventBatch {
        events: events.iter().map(records::event_to_storage).collect(),
    };
    Some((first, batch.encode_to_vec()))
}

/// The events of one event log value.
pub(super) fn decode_events(value: &[u8]) -> Result<Vec<st::EventRecord>, StoreError> {
    Ok(st::EventBatch::decode(value)
        .map_err(|error| record_error(EVENT_LOG, error))?
        .events)
}

/// The stored state's records while it is loaded: the base, then the
/// per-record trees, then the journal laid over them in order.
#[derive(Default)]
pub(super) struct Records {
    pub jobs: BTreeMap<JobId, JobRecord>,
    pub nodes: BTreeMap<String, NodeRecord>,
    pub submissions: BTreeMap<String, Vec<JobId>>,
    pub estimates: BTreeMap<String, Estimate>,
}

impl Records {
    /// Lays one journal value over the records: what it wrote replaces,
    /// then what it removed goes (the order the writes were made in).
    pub fn apply(&mut self, value: &[u8]) -> Result<(), StoreError> {
        let batch =
            st::JournalBatch::decode(value).map_err(|error| record_error(JOURNAL, error))?;
        let record = |source| StoreError::Record {
            tree: JOURNAL,
            source,
        };
        for job in batch.jobs {
            let job = records::job_from_storage(job).map_err(record)?;
            self.jobs.insert(job.id, job);
        }
        for id in batch.jobs_removed {
            self.jobs.remove(&id);
        }
        for node in batch.nodes {
            let node = records::node_from_storage(node).map_err(record)?;
            self.nodes.insert(node.name.clone(), node);
        }
        for submission in batch.submissions {
            self.submissions.insert(submission.key, submission.jobs);
        }
        for key in batch.submissions_removed {
            self.submissions.remove(&key);
        }
        for estimate in batch.estimates {
            let (class, estimate) = records::estimate_from_storage(estimate);
            self.estimates.insert(class, estimate);
        }
        for class in batch.estimates_removed {
            self.estimates.remove(&class);
        }
        Ok(())
    }
}

/// The keys of the event log's batches that lie wholly below `floor`: every
/// batch starting at or below it but the last of those (which may reach
/// past it; reads filter it).
pub(super) fn batches_below(log: &sled::Tree, floor: u64) -> Result<Vec<sled::IVec>, StoreError> {
    let mut keys = Vec::new();
    for item in log.range(..=floor.to_be_bytes()) {
        let (key, _) = item?;
        keys.push(key);
    }
    keys.pop();
    Ok(keys)
}

/// The event log's batches holding events at index `from` or above, in
/// order: the last batch starting at or below `from`, and every later one.
pub(super) fn batches_from(
    log: &sled::Tree,
    from: u64,
) -> Result<impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>, StoreError> {
    let start = match log.range(..=from.to_be_bytes()).next_back() {
        Some(item) => key_u64(&item?.0),
        None => 0,
    };
    Ok(log.range(start.to_be_bytes()..))
}

/// One past the highest event index in the event log (0 when it is empty).
pub(super) fn next_event_index(log: &sled::Tree) -> Result<u64, StoreError> {
    let Some((_, value)) = log.last()? else {
        return Ok(0);
    };
    Ok(decode_events(&value)?
        .last()
        .map_or(0, |event| event.index + 1))
}

/// Writes events (ascending, already at or above the floor) into an event
/// log as batches of [`COPY_BATCH`].
pub(super) fn write_events(
    log: &sled::Tree,
    events: impl IntoIterator<Item = st::EventRecord>,
) -> Result<(), StoreError> {
    let mut batch = Vec::with_capacity(COPY_BATCH);
    let flush = |batch: &mut Vec<st::EventRecord>| -> Result<(), StoreError> {
        if let Some(first) = batch.first().map(|event| event.index) {
            let value = st::EventBatch {
                events: std::mem::take(batch),
            }
            .encode_to_vec();
            log.insert(first.to_be_bytes(), value)?;
        }
        Ok(())
    };
    for event in events {
        batch.push(event);
        if batch.len() >= COPY_BATCH {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)
}

fn record_error(tree: &'static str, error: prost::DecodeError) -> StoreError {
    StoreError::Record {
        tree,
        source: error.into(),
    }
}
