//! The state snapshot file: what a Raft snapshot and a backup carry.
//!
//! The file is the 8 bytes [`MAGIC`] followed by length-delimited
//! `SnapshotItem` messages of `proto/storage.proto` (one per job, node,
//! event, submission key, estimate and pipeline run, in that order), and
//! one `meta` item last: a file that ends before its meta item is refused
//! as truncated. It is written straight from the state machine and the
//! stored events, one item at a time, and read as a stream. A replica
//! takes it in two steps ([`Store::take_snapshot`]): the state's records
//! are encoded on its loop, the stored events' values only held (sled
//! values are shared and never change); then, off the loop,
//! [`TakenSnapshot::write`] writes the records and decodes the events into
//! their items.
//!
//! A file that starts with `{` is a [`StateSnapshot`] as JSON, from the
//! versions before the binary records, and is still read.

use std::io::{BufRead, BufReader, Read, Write};

use gantry_proto::storage as st;
use gantry_proto::storage::snapshot_item::Item;
use prost::Message;

use super::records::{
    self, estimate_to_storage, job_to_storage, node_to_storage, retention_to_storage,
};
use super::{StateSnapshot, Store, StoreError, journal};
use crate::state::StateMachine;

/// First bytes of a binary state snapshot.
pub const MAGIC: &[u8; 8] = b"GSTATEv2";

/// Largest item read (a job with many attempts' output tails is well
/// under it): a bigger length prefix is damage, not a record to allocate.
const MAX_ITEM_BYTES: u64 = 64 << 20;

/// Writes snapshot items into a stream through one reused buffer.
struct ItemWriter<'a> {
    out: &'a mut dyn Write,
    buf: Vec<u8>,
}

impl<'a> ItemWriter<'a> {
    /// Starts a snapshot: the magic bytes.
    fn start(out: &'a mut dyn Write) -> Result<ItemWriter<'a>, StoreError> {
        out.write_all(MAGIC).map_err(io_error)?;
        Ok(ItemWriter {
            out,
            buf: Vec::with_capacity(4096),
        })
    }

    fn item(&mut self, item: Item) -> Result<(), StoreError> {
        self.buf.clear();
        st::SnapshotItem { item: Some(item) }
            .encode_length_delimited(&mut self.buf)
            .map_err(|error| StoreError::Snapshot(error.to_string()))?;
        self.out.write_all(&self.buf).map_err(io_error)
    }

    /// An event stored as a binary `EventRecord`, copied as the item's
    /// bytes without decoding it (an embedded message is its bytes).
    fn finish(mut self, meta: st::SnapshotMeta) -> Result<(), StoreError> {
        self.item(Item::Meta(meta))?;
        self.out.flush().map_err(io_error)
    }
}

impl Store {
    /// The serialized state snapshot, in memory (a backup; a Raft snapshot
    /// streams into its file with [`write_snapshot`](Self::write_snapshot)).
    pub fn snapshot_bytes(&self, state: &StateMachine) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.write_snapshot(state, &mut out)?;
        Ok(out)
    }

    /// Where the stored state stands now, for a snapshot of the state as
    /// it is: the journal writes from here on are the changes after it.
    fn snapshot_mark(&self) -> SnapshotMark {
        SnapshotMark {
            generation: self.base.generation,
            journal_from: self.journal_next,
        }
    }

    /// Writes the state snapshot of `state` and the stored events into
    /// `out` ([`Store::take_snapshot`], then [`TakenSnapshot::write`]).
    /// Reads back (see [`read_snapshot`]) to exactly what
    /// [`Store::snapshot`] returns. Returns where the stored state stood
    /// (see [`Store::rebase`]).
    pub fn write_snapshot(
        &self,
        state: &StateMachine,
        out: &mut dyn Write,
    ) -> Result<SnapshotMark, StoreError> {
        let (taken, mark) = self.take_snapshot(state)?;
        taken.write(out)?;
        Ok(mark)
    }

    /// Takes a snapshot of `state` and the stored events, to be written
    /// later (on another thread) with [`TakenSnapshot::write`]: the
    /// state's records are encoded now, into memory, without cloning a job
    /// whole; the event log's values are held as they are and decoded only
    /// when written. Returns where the stored state stood (see
    /// [`Store::rebase`]).
    pub fn take_snapshot(
        &self,
        state: &StateMachine,
    ) -> Result<(TakenSnapshot, SnapshotMark), StoreError> {
        // The stored events are read: the writes sent land first.
        self.writer.drain()?;
        let mark = self.snapshot_mark();
        let mut head = Vec::new();
        let mut items = ItemWriter::start(&mut head)?;
        for job in state.jobs() {
            items.item(Item::Job(job_to_storage(job)))?;
        }
        for node in state.nodes() {
            items.item(Item::Node(node_to_storage(node)))?;
        }
        for (key, ids) in state.submissions() {
            items.item(Item::Submission(st::Submission {
                key: key.clone(),
                jobs: ids.clone(),
            }))?;
        }
        for (class, estimate) in state.estimates() {
            items.item(Item::Estimate(estimate_to_storage(class, estimate)))?;
        }
        for (name, run) in state.pipeline_runs() {
            items.item(Item::PipelineRun(st::PipelineRun {
                name: name.clone(),
                run: *run,
            }))?;
        }
        let floor = state.event_floor();
        let mut visit = |event| items.item(Item::Event(event)).map(|()| true);
        journal::visit_loose_events(&self.base.events, &self.trees.events, floor, &mut visit)?;
        let logged = journal::batches_from(&self.trees.event_log, floor)?
            .map(|item| item.map(|(_, value)| value))
            .collect::<sled::Result<Vec<_>>>()?;
        let taken = TakenSnapshot {
            head,
            logged,
            floor,
            meta: st::SnapshotMeta {
                leader_term: state.leader_term(),
                next_job_id: state.next_job_id(),
                event_floor: floor,
                retention: Some(retention_to_storage(state.retention())),
            },
        };
        Ok((taken, mark))
    }
}

/// Where the stored state stood when a snapshot of the state was
/// taken ([`Store::take_snapshot`]): its generation, and the key of the
/// next journal write. The journal's writes from that key on are exactly
/// the changes applied after the snapshot (each journal value holds whole
/// records as of its write), so a rebase on the snapshot carries them
/// into the new generation ([`Store::rebase`]), however many entries were
/// applied while the snapshot's file was being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMark {
    generation: u64,
    journal_from: u64,
}

impl SnapshotMark {
    /// The generation the snapshot was taken in.
    pub(super) fn generation(self) -> u64 {
        self.generation
    }

    /// The key of the first journal write after the snapshot.
    pub(super) fn journal_from(self) -> u64 {
        self.journal_from
    }
}

/// A snapshot taken ([`Store::take_snapshot`]) and not written yet.
pub struct TakenSnapshot {
    /// The magic bytes and every item but the logged events and the meta.
    head: Vec<u8>,
    /// The event log's values holding the events at or above the floor.
    logged: Vec<sled::IVec>,
    floor: u64,
    meta: st::SnapshotMeta,
}

impl TakenSnapshot {
    /// Writes the snapshot into `out`: the items encoded when it was
    /// taken, the logged events at or above the floor, the meta item.
    pub fn write(self, out: &mut dyn Write) -> Result<(), StoreError> {
        out.write_all(&self.head).map_err(io_error)?;
        let mut items = ItemWriter {
            out,
            buf: Vec::with_capacity(4096),
        };
        let mut visit = |event| items.item(Item::Event(event)).map(|()| true);
        for value in &self.logged {
            journal::visit_batch(value, self.floor, &mut visit)?;
        }
        items.finish(self.meta)
    }
}

/// Writes a decoded snapshot (a backup being restored) in the same format.
pub fn write_state_snapshot(
    snapshot: &StateSnapshot,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let mut items = ItemWriter::start(out)?;
    for job in &snapshot.jobs {
        items.item(Item::Job(job_to_storage(job)))?;
    }
    for node in &snapshot.nodes {
        items.item(Item::Node(node_to_storage(node)))?;
    }
    for (key, ids) in &snapshot.submissions {
        items.item(Item::Submission(st::Submission {
            key: key.clone(),
            jobs: ids.clone(),
        }))?;
    }
    for (class, estimate) in &snapshot.estimates {
        items.item(Item::Estimate(estimate_to_storage(class, estimate)))?;
    }
    for (name, run) in &snapshot.pipeline_runs {
        items.item(Item::PipelineRun(st::PipelineRun {
            name: name.clone(),
            run: *run,
        }))?;
    }
    for event in &snapshot.events {
        items.item(Item::Event(records::event_to_storage(event)))?;
    }
    items.finish(st::SnapshotMeta {
        leader_term: snapshot.leader_term,
        next_job_id: snapshot.next_job_id,
        event_floor: snapshot.event_floor,
        retention: snapshot.retention.as_ref().map(retention_to_storage),
    })
}

/// Reads a state snapshot, binary or (from the JSON versions) JSON, as a
/// stream. Anything but a whole snapshot is an error: a wrong start, an
/// item that does not decode, one after the meta item, or an end before it.
pub fn read_snapshot(input: impl Read) -> Result<StateSnapshot, StoreError> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let first = input.fill_buf().map_err(io_error)?.first().copied();
    if first == Some(b'{') {
        return serde_json::from_reader(input).map_err(|source| StoreError::Corrupt {
            tree: "snapshot",
            source,
        });
    }
    let mut magic = [0u8; MAGIC.len()];
    input
        .read_exact(&mut magic)
        .map_err(|_| StoreError::Snapshot("shorter than its magic bytes".into()))?;
    if &magic != MAGIC {
        return Err(StoreError::Snapshot(
            "not a state snapshot (wrong magic bytes)".into(),
        ));
    }
    let mut snapshot = StateSnapshot::default();
    let mut meta = None;
    let mut buf = Vec::new();
    let mut count = 0u64;
    while let Some(len) = read_length(&mut input)? {
        count += 1;
        if meta.is_some() {
            return Err(StoreError::Snapshot(format!(
                "item {count} comes after the meta item"
            )));
        }
        if len > MAX_ITEM_BYTES {
            return Err(StoreError::Snapshot(format!(
                "item {count} claims {len} bytes (at most {MAX_ITEM_BYTES})"
            )));
        }
        buf.resize(len as usize, 0);
        input
            .read_exact(&mut buf)
            .map_err(|_| StoreError::Snapshot(format!("item {count} is cut short")))?;
        let item = st::SnapshotItem::decode(&buf[..])
            .map_err(|error| item_error(count, error.into()))?
            .item
            .ok_or_else(|| StoreError::Snapshot(format!("item {count} is empty")))?;
        match item {
            Item::Job(job) => snapshot
                .jobs
                .push(records::job_from_storage(job).map_err(|e| item_error(count, e))?),
            Item::Node(node) => snapshot
                .nodes
                .push(records::node_from_storage(node).map_err(|e| item_error(count, e))?),
            Item::Event(event) => snapshot
                .events
                .push(records::event_from_storage(event).map_err(|e| item_error(count, e))?),
            Item::Submission(s) => snapshot.submissions.push((s.key, s.jobs)),
            Item::Estimate(e) => snapshot.estimates.push(records::estimate_from_storage(e)),
            Item::PipelineRun(r) => snapshot.pipeline_runs.push((r.name, r.run)),
            Item::Meta(m) => meta = Some(m),
        }
    }
    let meta = meta.ok_or_else(|| {
        StoreError::Snapshot(format!(
            "ends after {count} items without its meta item (truncated)"
        ))
    })?;
    snapshot.leader_term = meta.leader_term;
    snapshot.next_job_id = meta.next_job_id;
    snapshot.event_floor = meta.event_floor;
    snapshot.retention = meta.retention.map(records::retention_from_storage);
    Ok(snapshot)
}

/// Reads an in-memory snapshot (see [`read_snapshot`]).
pub fn decode_snapshot(bytes: &[u8]) -> Result<StateSnapshot, StoreError> {
    read_snapshot(bytes)
}

/// The next item's length prefix; `None` at the end of the input (between
/// items only: an end inside a prefix is an error).
fn read_length(input: &mut impl BufRead) -> Result<Option<u64>, StoreError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        match input.read(&mut byte).map_err(io_error)? {
            0 if shift == 0 => return Ok(None),
            0 => return Err(StoreError::Snapshot("ends inside a length prefix".into())),
            _ => {}
        }
        value |= u64::from(byte[0] & 0x7F) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(StoreError::Snapshot("a length prefix is too long".into()))
}

fn item_error(count: u64, source: super::codec::CodecError) -> StoreError {
    StoreError::Snapshot(format!("item {count} does not decode: {source}"))
}

/// A failed read or write of a snapshot.
fn io_error(error: std::io::Error) -> StoreError {
    StoreError::Snapshot(format!("i/o: {error}"))
}
