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

/// Bytes of one journal or event log value at most (but a single record
/// larger than that). sled writes a node whose encoding is past a quarter
/// of its 512 KiB segments (131,052 bytes) as a file of its own in
/// `blobs`, never fsynced, and deleted only once the segment pointing at
/// it is cleaned; and a leaf holds up to 17 values before it splits. With
/// values of 64 KiB every leaf consolidation wrote a blob of up to 1 MiB,
/// and `gantry-bench soak` saw the database grow about 65 MiB per
/// 250,000 jobs without end (691 MiB at 2,000,000 jobs, 1,057 blob files
/// at 600,000). At 7 KiB a full leaf (17 values, keys and lengths) stays
/// inline, the database stays near 70 MiB, and `e2e` measured more jobs/s
/// (11,210-11,398 against 10,156-10,541, alternating).
pub(super) const VALUE_BYTES: usize = 7 << 10;

/// The journal values of what `changes` wrote (`state` is the state after
/// them: records are read from it), each at most [`VALUE_BYTES`]: the
/// jobs, the nodes and the submission keys written are split across values
/// of their own, the removals and estimates go in the last. A loaded journal
/// lays the values over each other in order, so removals still come after
/// the writes of the same write.
pub(super) fn encode_changes(state: &StateMachine, changes: &ChangeSet) -> Vec<Vec<u8>> {
    let jobs: Vec<st::JobRecord> = changes
        .jobs
        .iter()
        .filter_map(|id| state.job(*id))
        .map(job_to_storage)
        .collect();
    let nodes: Vec<st::NodeRecord> = changes
        .nodes
        .iter()
        .filter_map(|name| state.node(name))
        .map(node_to_storage)
        .collect();
    let submissions: Vec<st::Submission> = changes
        .submissions
        .iter()
        .map(|(key, jobs)| st::Submission {
            key: key.clone(),
            jobs: jobs.clone(),
        })
        .collect();
    let mut values: Vec<Vec<u8>> = chunks(jobs)
        .map(|jobs| st::JournalBatch {
            jobs,
            ..Default::default()
        })
        .chain(chunks(nodes).map(|nodes| st::JournalBatch {
            nodes,
            ..Default::default()
        }))
        .chain(chunks(submissions).map(|submissions| st::JournalBatch {
            submissions,
            ..Default::default()
        }))
        .map(|batch| batch.encode_to_vec())
        .collect();
    let rest = st::JournalBatch {
        jobs_removed: changes.retired.iter().map(|job| job.id).collect(),
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
        ..Default::default()
    };
    if rest != st::JournalBatch::default() {
        values.push(rest.encode_to_vec());
    }
    values
}

/// The event log values of `events` (ascending), each keyed by its first
/// event's index and at most [`VALUE_BYTES`].
pub(super) fn encode_events(events: &[EventRecord]) -> Vec<(u64, Vec<u8>)> {
    let events = events.iter().map(records::event_to_storage).collect();
    chunks(events)
        .filter_map(|events| {
            let first = events.first()?.index;
            Some((first, st::EventBatch { events }.encode_to_vec()))
        })
        .collect()
}

/// `items` in runs of at most [`VALUE_BYTES`] encoded (a run holds at
/// least one item), in order.
pub(super) fn chunks<M: Message>(items: Vec<M>) -> impl Iterator<Item = Vec<M>> {
    runs_of(items, VALUE_BYTES)
}

/// `items` in runs of at most `max_bytes` encoded (a run holds at least
/// one item), in order.
pub(super) fn runs_of<M: Message>(items: Vec<M>, max_bytes: usize) -> impl Iterator<Item = Vec<M>> {
    let mut runs: Vec<Vec<M>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        // The field's tag and length prefix: a few bytes.
        let len = item.encoded_len() + 8;
        match runs.last_mut() {
            Some(run) if bytes + len <= max_bytes => run.push(item),
            _ => {
                runs.push(vec![item]);
                bytes = 0;
            }
        }
        bytes += len;
    }
    runs.into_iter()
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

/// Bytes of the values in a generation's journal and event log.
pub(super) fn stored_bytes(trees: &super::base::Trees) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for tree in [&trees.journal, &trees.event_log] {
        for item in tree.iter() {
            bytes += item?.1.len() as u64;
        }
    }
    Ok(bytes)
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
/// log, in values of at most [`VALUE_BYTES`]; returns the bytes written.
pub(super) fn write_events(
    log: &sled::Tree,
    events: Vec<st::EventRecord>,
) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for events in chunks(events) {
        if let Some(first) = events.first().map(|event| event.index) {
            let value = st::EventBatch { events }.encode_to_vec();
            bytes += value.len() as u64;
            log.insert(first.to_be_bytes(), value)?;
        }
    }
    Ok(bytes)
}

/// What a visitor of stored events says after each: go on or stop.
pub(super) type Visit<'a> = dyn FnMut(st::EventRecord) -> Result<bool, StoreError> + 'a;

/// Visits the stored events at index `from` or above that are not in the
/// event log, ascending: an installed base's kept in memory (`base`), then
/// those of the per-record tree of earlier versions (`legacy`). All of them
/// come before the event log's. Returns false once `visit` stopped.
pub(super) fn visit_loose_events(
    base: &[EventRecord],
    legacy: &sled::Tree,
    from: u64,
    visit: &mut Visit,
) -> Result<bool, StoreError> {
    let first = base.partition_point(|event| event.index < from);
    for event in &base[first..] {
        if !visit(records::event_to_storage(event))? {
            return Ok(false);
        }
    }
    for item in legacy.range(from.to_be_bytes()..) {
        let (_, value) = item?;
        let event = records::decode_event(&value).map_err(|source| StoreError::Record {
            tree: "events",
            source,
        })?;
        if !visit(records::event_to_storage(&event))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Visits the event log's events at index `from` or above, ascending (the
/// caller passes at least the floor: a batch reaching past it is stored
/// whole). Returns false once `visit` stopped.
pub(super) fn visit_logged_events(
    log: &sled::Tree,
    from: u64,
    visit: &mut Visit,
) -> Result<bool, StoreError> {
    for item in batches_from(log, from)? {
        if !visit_batch(&item?.1, from, visit)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Visits one event log value's events at index `from` or above,
/// ascending. Returns false once `visit` stopped.
pub(super) fn visit_batch(value: &[u8], from: u64, visit: &mut Visit) -> Result<bool, StoreError> {
    for event in decode_events(value)? {
        if event.index >= from && !visit(event)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A value of `tree` that does not decode.
pub(super) fn record_error(tree: &'static str, error: prost::DecodeError) -> StoreError {
    StoreError::Record {
        tree,
        source: error.into(),
    }
}
