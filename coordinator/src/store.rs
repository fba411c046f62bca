//! Durable hard state in sled. Per generation ([`base`]): the journal and
//! its event log ([`journal`]: each write of the applied state is a few
//! values, not a record per insert) and `meta` (applied index, leader
//! term, next job id, event floor, retention policy, latest run of each
//! pipeline). A write is one transaction across trees. The history of
//! retired jobs is in files of its own beside the database, appended
//! before the write's transaction records how far they go ([`history`]).
//! Records are prost messages ([`records`]); the per-record trees
//! of earlier versions (and their JSON records) are still read. A Raft
//! snapshot is a stream of records ([`snapshot`]); an installed one, and
//! every one the replica takes, becomes the base of a new generation
//! whose journal starts empty ([`generation`]).

use std::path::Path;

use gantry_scheduler::JobId;
use serde::Serialize;

use crate::domain::{EventRecord, JobRecord, NodeRecord};
use crate::state::{ChangeSet, Estimate, RetentionPolicy, StateMachine};

mod base;
pub mod codec;
mod generation;
mod history;
mod journal;
pub mod records;
pub mod snapshot;
mod writer;

pub use history::HistoryPage;
pub use snapshot::{
    SnapshotMark, TakenSnapshot, decode_snapshot, read_snapshot, write_state_snapshot,
};

/// Storage failures. These are fatal for the coordinator: it cannot
/// acknowledge work it cannot persist.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record did not decode.
    #[error("storage: corrupt record in {tree}: {source}")]
    Corrupt {
        /// Tree name.
        tree: &'static str,
        /// Decode error.
        source: serde_json::Error,
    },
    /// A record did not encode (a bug).
    #[error("storage: cannot encode record: {0}")]
    Encode(serde_json::Error),
    /// A stored binary record (or a JSON one of an earlier version) did
    /// not decode.
    #[error("storage: corrupt record in {tree}: {source}")]
    Record {
        /// Tree name.
        tree: &'static str,
        /// Decode error.
        source: codec::CodecError,
    },
    /// A state snapshot could not be written or read whole.
    #[error("state snapshot: {0}")]
    Snapshot(String),
    /// The writer thread failed to commit a write (or has stopped).
    #[error("storage: {0}")]
    Write(String),
    /// The data directory's layout is not one this version reads (a newer
    /// version's, or a torn generation pointer).
    #[error("storage: {0}")]
    Layout(String),
    /// The history's files could not be read, written or removed, or
    /// hold what the store never wrote.
    #[error("history: {0}")]
    History(String),
    /// A fixed-size value has the wrong size (it is never read as 0).
    #[error("storage: unreadable {tree}/{key}: {len} bytes, expected 8")]
    BadValue {
        /// Tree name.
        tree: &'static str,
        /// Key.
        key: &'static str,
        /// The size found.
        len: usize,
    },
}

/// The coordinator's sled database.
pub struct Store {
    db: sled::Db,
    /// The current generation's trees.
    trees: base::Trees,
    /// Key of the next journal write.
    journal_next: u64,
    /// The event floor as of the last write prepared: stored events below
    /// it are never read.
    event_floor: u64,
    /// Bytes in the generation's journal and event log (see
    /// [`rebase_due`](Self::rebase_due)).
    journal_bytes: u64,
    /// Size of the generation's base file (0: no base).
    base_bytes: u64,
    /// The history's files (shared with the writer, which appends).
    history: history::SharedLog,
    /// Where sled records how far the history's files go.
    history_recorded: sled::Tree,
    /// The base files and the current generation's pointer.
    files: base::BaseFiles,
    /// The current generation's base.
    base: base::Base,
    /// The base read by [`open`](Self::open), kept for [`load`](Self::load).
    opened_base: Option<StateSnapshot>,
    /// Applied changes held back (see [`persist_applied`](Self::persist_applied)).
    pending: Option<Pending>,
    /// Commits the writes, off the replica loop ([`writer`]).
    writer: writer::Writer,
    /// sled's flushes made durable ([`crate::durable`]).
    syncer: crate::durable::Syncer,
}

/// sled's page cache (its default is 1 GiB). The applied state lives in
/// memory in the `StateMachine`, and reads of sled are only at start and for
/// Raft catch-up, so a large cache buys nothing; at 100,000 jobs the default
/// alone took the coordinator past its 500 MiB RSS target. Since the
/// journal, what it would hold is mostly journal values written once and
/// never read: 16 MiB instead of 64 took 40 MiB off the RSS of `gantry-bench
/// soak` with the same jobs/s.
const SLED_CACHE_BYTES: u64 = 16 << 20;

/// Applied changes not written yet, merged across entries.
#[derive(Debug)]
struct Pending {
    /// What the entries changed, merged in order ([`ChangeSet::absorb`]).
    changes: ChangeSet,
    /// The last entry's index.
    index: u64,
    /// When the first of them was applied.
    since: std::time::Instant,
    /// Entries merged.
    entries: usize,
    /// Records they touched (jobs, events, retirements, submission keys),
    /// counted with repeats: a bound on the merge's work, not a size.
    records: usize,
}

/// How long applied changes may be held back before they are written
/// ([`Store::write_due`]). A job's transitions (submitted, assigned,
/// started, exited) usually fall within it and its record is written once.
pub const WRITE_BEHIND: std::time::Duration = std::time::Duration::from_millis(100);

/// Journal bytes below which no snapshot is asked for early
/// ([`Store::rebase_due`]).
const MIN_REBASE_BYTES: u64 = 64 << 20;

/// Entries held back at most before a write.
const WRITE_BEHIND_ENTRIES: usize = 1024;

/// Records touched by the held-back entries at most before a write. A
/// write's records are held several times over while sled commits them
/// (encoded, in the batch, in the transaction): with 16k records a write
/// took the coordinator 60 MiB past its RSS at 100,000 jobs
/// (`gantry-bench heartbeats`), with 2k it stays within a few MiB.
const WRITE_BEHIND_RECORDS: usize = 2 * 1024;

impl Store {
    /// Opens (or creates) the store in `dir`: the current generation's
    /// trees and base, with any other generation's dropped.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = open_db(&dir.join("state"))?;
        let syncer = crate::durable::Syncer::open(&dir.join("state")).map_err(sled::Error::Io)?;
        let files = base::BaseFiles::open(&db, dir)?;
        let generation = files.current()?;
        files.drop_others(&db, generation)?;
        files.mark_layout(&db, generation)?;
        let (mut base, mut opened_base) = (base::Base::default(), None);
        if generation > 0 {
            let mut snapshot = read_base(&files.path(generation))?;
            base = base::Base::take(generation, &mut snapshot);
            opened_base = Some(snapshot);
        }
        let trees = base::Trees::open(&db, generation)?;
        let journal_next = match trees.journal.last()? {
            Some((key, _)) => key_u64(&key) + 1,
            None => 0,
        };
        let journal_bytes = journal::stored_bytes(&trees)?;
        let base_bytes = files.size(generation);
        let history_recorded = db.open_tree(history::RECORDED_TREE)?;
        let mut history = history::log::HistoryLog::open(
            &dir.join(history::log::DIR_NAME),
            history::recorded(&history_recorded)?,
        )?;
        if let Some(moved) = history::migrate(&db, &mut history, &history_recorded)? {
            let bytes = history.recorded().bytes;
            tracing::info!(
                moved,
                bytes,
                "history moved from the database into its files"
            );
        }
        let history = std::sync::Arc::new(std::sync::Mutex::new(history));
        let mut store = Store {
            trees,
            journal_next,
            event_floor: 0,
            journal_bytes,
            base_bytes,
            history,
            history_recorded,
            files,
            base,
            opened_base,
            pending: None,
            writer: writer::Writer::start()?,
            syncer,
            db,
        };
        if store.meta_u64(META_EVENTS_LOGGED)? == 1 {
            store.base.events.clear();
        }
        store.base.next_event_index = store
            .base
            .next_event_index
            .max(store.meta_u64(META_BASE_NEXT_EVENT)?);
        // The base's events below the floor reached since it was installed.
        let floor = store.meta_u64(META_EVENT_FLOOR)?;
        store.base.raise_floor(floor);
        store.event_floor = floor;
        Ok(store)
    }

    /// Loads the whole state machine: the base, with the trees laid over
    /// it.
    pub fn load(&mut self) -> Result<StateMachine, StoreError> {
        let base = match self.opened_base.take() {
            Some(base) => base,
            None if self.base.generation > 0 => {
                let mut base = read_base(&self.files.path(self.base.generation))?;
                base.events.clear();
                base
            }
            None => StateSnapshot::default(),
        };
        let record = |tree| move |source| StoreError::Record { tree, source };
        let trees = &self.trees;
        let mut records = journal::Records {
            jobs: base::overlay(
                base.jobs.into_iter().map(|job| (job.id, job)),
                &trees.jobs,
                key_u64,
                |value| records::decode_job(value).map_err(record("jobs")),
            )?,
            nodes: base::overlay(
                base.nodes.into_iter().map(|node| (node.name.clone(), node)),
                &trees.nodes,
                key_string,
                |value| records::decode_node(value).map_err(record("nodes")),
            )?,
            submissions: base::overlay(
                base.submissions,
                &trees.submissions,
                key_string,
                |value| records::decode_job_ids(value).map_err(record("submissions")),
            )?,
            estimates: base::overlay(base.estimates, &trees.estimates, key_string, |value| {
                records::decode_estimate(value).map_err(record("estimates"))
            })?,
        };
        for item in trees.journal.iter() {
            records.apply(&item?.1)?;
        }
        let next_event_index = match trees.events.last()? {
            Some((key, _)) => key_u64(&key) + 1,
            None => 1,
        }
        .max(journal::next_event_index(&trees.event_log)?)
        .max(self.base.next_event_index)
        .max(self.event_floor);
        let journal::Records {
            jobs,
            nodes,
            submissions,
            estimates,
        } = records;
        let mut state = StateMachine::restore(
            jobs.into_values().collect(),
            nodes.into_values().collect(),
            submissions.into_iter().collect(),
            estimates.into_iter().collect(),
            next_event_index,
        );
        state.set_leader_term(self.meta_u64(META_LEADER_TERM)?);
        state.set_next_job_id(self.meta_u64(META_NEXT_JOB_ID)?);
        state.set_event_floor(self.meta_u64(META_EVENT_FLOOR)?);
        if let Some(value) = self.trees.meta.get(META_RETENTION)? {
            let policy = serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                tree: "meta",
                source,
            })?;
            state.set_retention(policy);
        }
        for item in self.trees.meta.scan_prefix(META_RUN_PREFIX) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[META_RUN_PREFIX.len()..]);
            state.set_pipeline_run(&name, key_u64(&value) as u32);
        }
        Ok(state)
    }

    /// The sled database, shared with the Raft log storage (the state
    /// trees are [`base::tree_name`]s; the log's are its own).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Index of the last Raft entry applied to the stored state (0 = none
    /// stored yet). A stored value that is not 8 bytes is an error, never
    /// 0: 0 would apply the whole log again on top of the stored state.
    pub fn applied_index(&self) -> Result<u64, StoreError> {
        self.writer.drain()?;
        self.meta_u64(META_APPLIED_INDEX)
    }

    fn meta_u64(&self, key: &'static str) -> Result<u64, StoreError> {
        meta_u64(&self.trees.meta, key)
    }

    /// Takes what an apply changed, with the Raft index it came from, to
    /// be written later, merged with the entries after it: the Raft log is
    /// the durable record and entries after the stored applied index are
    /// applied again on start, so holding writes back loses nothing, and a
    /// job that changes several times meanwhile is written once (or, if
    /// retired meanwhile, never). Written when [`WRITE_BEHIND`] has passed
    /// ([`write_due`](Self::write_due)), when many entries or records are
    /// held, or before the stored state is read
    /// ([`write_pending`](Self::write_pending)); `state` is the state after
    /// `index`.
    pub fn persist_applied(
        &mut self,
        state: &StateMachine,
        changes: ChangeSet,
        index: u64,
    ) -> Result<(), StoreError> {
        let records = changes.jobs.len()
            + changes.events.len()
            + changes.retired.len()
            + changes.submissions.len()
            + changes.submissions_removed.len();
        let pending = self.pending.get_or_insert_with(|| Pending {
            changes: ChangeSet::default(),
            index,
            since: std::time::Instant::now(),
            entries: 0,
            records: 0,
        });
        pending.changes.absorb(changes);
        pending.index = index;
        pending.entries += 1;
        pending.records += records;
        if pending.entries >= WRITE_BEHIND_ENTRIES || pending.records >= WRITE_BEHIND_RECORDS {
            self.write_pending(state)?;
        }
        Ok(())
    }

    /// Writes the changes held back, if any, with the last entry's index;
    /// `state` must be the state after that entry (the job records are
    /// read from it). Before any read of the stored state, a snapshot, an
    /// install or a shutdown.
    pub fn write_pending(&mut self, state: &StateMachine) -> Result<(), StoreError> {
        if let Some(pending) = self.pending.take() {
            let prepared = self.prepare(state, pending.changes, Some(pending.index))?;
            self.writer.send(prepared)?;
        }
        Ok(())
    }

    /// Waits until every write sent to the writer thread is committed
    /// (what the store's own reads do first).
    pub fn drain(&self) -> Result<(), StoreError> {
        self.writer.drain()
    }

    /// Writes the changes held back once [`WRITE_BEHIND`] has passed since
    /// the first of them; called by the replica loop every round.
    pub fn write_due(&mut self, state: &StateMachine) -> Result<(), StoreError> {
        if let Some(failure) = self.writer.failure() {
            return Err(StoreError::Write(failure));
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|pending| pending.since.elapsed() >= WRITE_BEHIND)
        {
            self.write_pending(state)?;
        }
        Ok(())
    }

    /// The whole stored state, for a Raft snapshot.
    pub fn snapshot(&self, state: &StateMachine) -> Result<StateSnapshot, StoreError> {
        Ok(StateSnapshot {
            jobs: state.jobs().cloned().collect(),
            nodes: state.nodes().cloned().collect(),
            submissions: state
                .submissions()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            estimates: state
                .estimates()
                .iter()
                .map(|(class, estimate)| (class.clone(), *estimate))
                .collect(),
            events: self.events_since(0, usize::MAX)?,
            leader_term: state.leader_term(),
            next_job_id: state.next_job_id(),
            event_floor: state.event_floor(),
            retention: Some(*state.retention()),
            pipeline_runs: state
                .pipeline_runs()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        })
    }

    /// Writes what an apply changed, then flushes. Only after this returns
    /// may the change be acknowledged.
    pub fn persist(&mut self, state: &StateMachine, changes: ChangeSet) -> Result<(), StoreError> {
        let prepared = self.prepare(state, changes, None)?;
        self.writer.send(prepared)?;
        self.writer.drain()?;
        self.syncer.flush(&self.db)?;
        Ok(())
    }

    /// Prepares a write of `changes` (and, with Raft, the index they end
    /// at) for the writer ([`writer`]), which commits it in one
    /// transaction across trees: after a crash either all of it is there
    /// or none, so the applied index never claims a change that was lost
    /// (the entry is then applied again from the Raft log). The records
    /// are encoded here, from `state`, and the base's tombstones decided.
    fn prepare(
        &mut self,
        state: &StateMachine,
        changes: ChangeSet,
        applied: Option<u64>,
    ) -> Result<writer::Prepared, StoreError> {
        let journal: Vec<(u64, Vec<u8>)> = journal::encode_changes(state, &changes)
            .into_iter()
            .map(|value| {
                let key = self.journal_next;
                self.journal_next += 1;
                (key, value)
            })
            .collect();
        if let Some((_, to)) = changes.event_floor {
            self.base.raise_floor(to);
            self.event_floor = self.event_floor.max(to);
        }
        let events = journal::encode_events(&changes.events);
        self.journal_bytes += journal
            .iter()
            .chain(&events)
            .map(|(_, value)| value.len() as u64)
            .sum::<u64>();
        let mut meta = sled::Batch::default();
        if changes.leader_term {
            meta.insert(META_LEADER_TERM, &state.leader_term().to_be_bytes());
        }
        if let Some(index) = applied {
            meta.insert(META_APPLIED_INDEX, &index.to_be_bytes());
        }
        if !changes.retired.is_empty() {
            // The highest job may be gone from `jobs`: ids are never reused.
            meta.insert(META_NEXT_JOB_ID, &state.next_job_id().to_be_bytes());
        }
        if changes.event_floor.is_some() {
            meta.insert(META_EVENT_FLOOR, &state.event_floor().to_be_bytes());
        }
        if changes.retention {
            meta.insert(META_RETENTION, encode(state.retention())?);
        }
        for name in &changes.pipelines {
            if let Some(run) = state.pipeline_runs().get(name) {
                meta.insert(run_key(name), &u64::from(*run).to_be_bytes());
            }
        }
        Ok(writer::Prepared {
            trees: self.write_trees(),
            journal,
            events,
            event_floor: changes.event_floor,
            meta,
            retired: changes.retired,
            policy: *state.retention(),
            at_ms: changes.at_ms,
        })
    }

    /// Whether the journal has outgrown a snapshot: its bytes (and the
    /// event log's) since the base are past [`MIN_REBASE_BYTES`] and past
    /// the base file's size. A snapshot then makes it the new base
    /// ([`rebase`](Self::rebase)) before the usual number of entries: the
    /// disk holds at most about twice the state, and each byte written to
    /// the journal pays for at most one byte of snapshot.
    pub fn rebase_due(&self) -> bool {
        self.journal_bytes > MIN_REBASE_BYTES.max(self.base_bytes)
    }

    /// Handles on the current generation's trees and the history's.
    fn write_trees(&self) -> writer::WriteTrees {
        writer::WriteTrees {
            state: self.trees.clone(),
            history: self.history.clone(),
            history_recorded: self.history_recorded.clone(),
        }
    }

    /// Events with index >= `from`, at most `limit`: the base's (all
    /// below the trees'), then the trees'.
    pub fn events_since(&self, from: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.writer.drain()?;
        let mut out: Vec<EventRecord> = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let mut visit = |event| {
            out.push(
                records::event_from_storage(event).map_err(|source| StoreError::Record {
                    tree: journal::EVENT_LOG,
                    source,
                })?,
            );
            Ok(out.len() < limit)
        };
        if journal::visit_loose_events(&self.base.events, &self.trees.events, from, &mut visit)? {
            journal::visit_logged_events(
                &self.trees.event_log,
                from.max(self.event_floor),
                &mut visit,
            )?;
        }
        Ok(out)
    }

    /// Flushes everything written (the writes sent first); called on
    /// shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.writer.drain()?;
        self.syncer.flush(&self.db)?;
        Ok(())
    }

    /// What makes this store's database's flushes durable, for the Raft
    /// log in the same database.
    pub fn syncer(&self) -> crate::durable::Syncer {
        self.syncer.clone()
    }
}

const META_APPLIED_INDEX: &str = "applied_index";
const META_LEADER_TERM: &str = "leader_term";
const META_NEXT_JOB_ID: &str = "next_job_id";
const META_EVENT_FLOOR: &str = "event_floor";
const META_RETENTION: &str = "retention";
/// Set (1) in a generation whose base's events were written into its event
/// log (every generation since the journal): the base file's events are
/// then not kept in memory.
const META_EVENTS_LOGGED: &str = "base_events_logged";
/// One past the highest event index given when the generation began.
const META_BASE_NEXT_EVENT: &str = "base_next_event_index";
/// `run/<pipeline>`: the latest run number of a pipeline (its jobs may
/// all be retired; run numbers are never reused).
const META_RUN_PREFIX: &str = "run/";

fn run_key(name: &str) -> Vec<u8> {
    let mut key = META_RUN_PREFIX.as_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// The whole hard state, as carried in a Raft snapshot.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct StateSnapshot {
    /// Every job.
    pub jobs: Vec<JobRecord>,
    /// Every node.
    pub nodes: Vec<NodeRecord>,
    /// Submission keys.
    pub submissions: Vec<(String, Vec<JobId>)>,
    /// Learned estimates.
    pub estimates: Vec<(String, Estimate)>,
    /// The event history.
    pub events: Vec<EventRecord>,
    /// Highest leader term of an applied plan.
    pub leader_term: u64,
    /// The next job id (the highest job may have been retired).
    #[serde(default)]
    pub next_job_id: u64,
    /// Events below this index have left hard state.
    #[serde(default)]
    pub event_floor: u64,
    /// The retention policy in force (`None`: the defaults, from a version
    /// without retention).
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// Latest run number of every pipeline.
    #[serde(default)]
    pub pipeline_runs: Vec<(String, u32)>,
}

/// How long opening waits for the database's file lock: a database this
/// process has just closed (`gantry coordinator --restore` installs the
/// backup, then the coordinator opens the same directory) holds its lock
/// until sled's background threads drop their last reference, a moment
/// after the close returned.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled at `path`, waiting up to [`LOCK_WAIT`] for its file lock; any
/// other error, or a lock still held after that (another process uses the
/// directory), is returned as it is.
pub(crate) fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(SLED_CACHE_BYTES)
            .open();
        match opened {
            // sled reports the held lock as an Other error with this text.
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// The state a snapshot holds (its events already moved into the base,
/// hence the next event index apart).
fn state_from(snapshot: StateSnapshot, next_event_index: u64) -> StateMachine {
    let mut state = StateMachine::restore(
        snapshot.jobs,
        snapshot.nodes,
        snapshot.submissions,
        snapshot.estimates,
        next_event_index,
    );
    state.set_leader_term(snapshot.leader_term);
    state.set_next_job_id(snapshot.next_job_id);
    state.set_event_floor(snapshot.event_floor);
    if let Some(policy) = snapshot.retention {
        state.set_retention(policy);
    }
    for (name, run) in &snapshot.pipeline_runs {
        state.set_pipeline_run(name, *run);
    }
    state
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

/// Reads a base snapshot file whole.
fn read_base(path: &Path) -> Result<StateSnapshot, StoreError> {
    let file = std::fs::File::open(path).map_err(|error| {
        StoreError::Snapshot(format!("cannot open the base {}: {error}", path.display()))
    })?;
    read_snapshot(file)
}

/// A u64 of `meta`: 0 when absent, an error (never 0) when not 8 bytes.
fn meta_u64(meta: &sled::Tree, key: &'static str) -> Result<u64, StoreError> {
    match meta.get(key)? {
        None => Ok(0),
        Some(value) if value.len() == 8 => Ok(key_u64(&value)),
        Some(value) => Err(StoreError::BadValue {
            tree: "meta",
            key,
            len: value.len(),
        }),
    }
}

fn key_string(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn key_u64(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = key.len().min(8);
    bytes[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A database closed a moment ago opens again (its lock is released
    /// by sled's background threads just after the close); one still open
    /// is refused, after the wait, with sled's lock error.
    #[test]
    fn a_closed_database_reopens_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..20 {
            drop(Store::open(dir.path()).expect("open"));
        }
        let held = Store::open(dir.path()).expect("open");
        let error = Store::open(dir.path()).err().expect("locked").to_string();
        assert!(error.contains("could not acquire lock"), "{error}");
        drop(held);
    }

    #[test]
    fn applied_index_is_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.applied_index().unwrap(), 0, "nothing stored yet");
        store
            .trees
            .meta
            .insert(META_APPLIED_INDEX, &42u64.to_be_bytes())
            .unwrap();
        assert_eq!(store.applied_index().unwrap(), 42);
        // A torn or foreign value is an error naming the key, not 0.
        store
            .trees
            .meta
            .insert(META_APPLIED_INDEX, &[0u8, 1])
            .unwrap();
        let error = store.applied_index().unwrap_err().to_string();
        assert!(
            error.contains("meta/applied_index") && error.contains("2 bytes"),
            "{error}"
        );
        assert!(store.load().is_ok(), "the leader term is unaffected");
        store
            .trees
            .meta
            .insert(META_LEADER_TERM, &[1u8; 9])
            .unwrap();
        assert!(store.load().is_err());
    }
}
