//! Durable hard state in sled. Trees: `jobs` (id -> record), `nodes`
//! (name -> record), `events` (index -> event), `submissions` (key -> ids),
//! `estimates` (job class -> learned GPU memory). A [`ChangeSet`] is written as one batch per tree and flushed before
//! the caller acknowledges anything.

use std::path::Path;

use gantry_scheduler::JobId;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::domain::{EventRecord, JobRecord, NodeRecord};
use crate::state::{ChangeSet, StateMachine};

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
}

/// The coordinator's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    nodes: sled::Tree,
    events: sled::Tree,
    submissions: sled::Tree,
    estimates: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("state"))
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Store {
            jobs: db.open_tree("jobs")?,
            nodes: db.open_tree("nodes")?,
            events: db.open_tree("events")?,
            submissions: db.open_tree("submissions")?,
            estimates: db.open_tree("estimates")?,
            db,
        })
    }

    /// Loads the whole state machine.
    pub fn load(&self) -> Result<StateMachine, StoreError> {
        let jobs: Vec<JobRecord> = decode_all(&self.jobs, "jobs")?;
        let nodes: Vec<NodeRecord> = decode_all(&self.nodes, "nodes")?;
        let mut submissions = Vec::new();
        for item in self.submissions.iter() {
            let (key, value) = item?;
            let ids: Vec<JobId> =
                serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                    tree: "submissions",
                    source,
                })?;
            submissions.push((String::from_utf8_lossy(&key).into_owned(), ids));
        }
        let mut estimates = Vec::new();
        for item in self.estimates.iter() {
            let (key, value) = item?;
            estimates.push((String::from_utf8_lossy(&key).into_owned(), key_u64(&value)));
        }
        let next_event_index = match self.events.last()? {
            Some((key, _)) => key_u64(&key) + 1,
            None => 1,
        };
        Ok(StateMachine::restore(
            jobs,
            nodes,
            submissions,
            estimates,
            next_event_index,
        ))
    }

    /// Writes what an apply changed, then flushes. Only after this returns
    /// may the change be acknowledged.
    pub fn persist(&self, state: &StateMachine, changes: &ChangeSet) -> Result<(), StoreError> {
        let mut jobs = sled::Batch::default();
        for id in &changes.jobs {
            if let Some(job) = state.job(*id) {
                jobs.insert(&id.to_be_bytes(), encode(job)?);
            }
        }
        let mut nodes = sled::Batch::default();
        for name in &changes.nodes {
            if let Some(node) = state.node(name) {
                nodes.insert(name.as_bytes(), encode(node)?);
            }
        }
        let mut events = sled::Batch::default();
        for event in &changes.events {
            events.insert(&event.index.to_be_bytes(), encode(event)?);
        }
        let mut submissions = sled::Batch::default();
        for (key, ids) in &changes.submissions {
            submissions.insert(key.as_bytes(), encode(ids)?);
        }
        let mut estimates = sled::Batch::default();
        for class in &changes.estimates {
            if let Some(bytes) = state.estimate(class) {
                estimates.insert(class.as_bytes(), &bytes.to_be_bytes());
            }
        }
        self.estimates.apply_batch(estimates)?;
        // Events last: a reader that sees an event can find the job it names.
        self.jobs.apply_batch(jobs)?;
        self.nodes.apply_batch(nodes)?;
        self.submissions.apply_batch(submissions)?;
        self.events.apply_batch(events)?;
        self.db.flush()?;
        Ok(())
    }

    /// Events with index >= `from`, at most `limit`.
    pub fn events_since(&self, from: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.events.range(from.to_be_bytes()..).take(limit) {
            let (_, value) = item?;
            out.push(
                serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                    tree: "events",
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Flushes everything; called on shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

fn decode_all<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in tree.iter() {
        let (_, value) = item?;
        out.push(
            serde_json::from_slice(&value)
                .map_err(|source| StoreError::Corrupt { tree: name, source })?,
        );
    }
    Ok(out)
}

fn key_u64(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = key.len().min(8);
    bytes[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(bytes)
}
