//! The history's writes: the jobs a write retired, as new chunks, and the
//! oldest chunks past the history's retention or size; and the move of a
//! history stored a record per job into chunks.

use std::collections::BTreeSet;

use gantry_proto::storage as st;
use prost::Message;
use sled::Transactional;

use super::{Head, HistoryTrees, seq_after};
use crate::domain::JobRecord;
use crate::state::RetentionPolicy;
use crate::store::{StoreError, journal, key_u64, records, writer};

/// At most this many chunks leave the history in one write (about 4 MiB).
const PRUNE_CHUNKS: usize = 64;

/// The newest chunk takes the next write's jobs while its records are
/// under this many bytes (half a value).
const MERGE_BELOW: u64 = 32 << 10;

/// Records moved into chunks per transaction by [`migrate`].
const MIGRATE_BATCH: usize = 1_000;

/// The trees of the layout before chunks: `history` (job id -> record)
/// and `history_index` (`t` + finished at + id -> size and `p` key, and
/// `p` + pipeline run + id).
const OLD_RECORDS: &str = "history";
const OLD_INDEX: &str = "history_index";

/// The history's part of one store write.
#[derive(Default)]
pub(in crate::store) struct HistoryWrite {
    pub chunks: sled::Batch,
    pub heads: sled::Batch,
}

impl HistoryWrite {
    /// `jobs` as new chunks from key `seq` on, by id, each at most the
    /// journal's value size.
    fn add(&mut self, mut jobs: Vec<st::JobRecord>, mut seq: u64) {
        jobs.sort_unstable_by_key(|job| job.id);
        for jobs in journal::chunks(jobs) {
            let (head, runs) = head_of(&jobs);
            let key = seq.to_be_bytes();
            self.chunks
                .insert(&key, st::HistoryChunk { jobs }.encode_to_vec());
            self.heads.insert(&key, head.encode(runs));
            seq += 1;
        }
    }
}

/// What a chunk of `jobs` (at least one) holds.
fn head_of(jobs: &[st::JobRecord]) -> (Head, Vec<st::PipelineRun>) {
    let mut head = Head {
        min_id: u64::MAX,
        max_id: 0,
        first_finished_ms: u64::MAX,
        last_finished_ms: 0,
        bytes: 0,
        jobs: 0,
    };
    let mut runs = BTreeSet::new();
    for job in jobs {
        head.min_id = head.min_id.min(job.id);
        head.max_id = head.max_id.max(job.id);
        head.first_finished_ms = head.first_finished_ms.min(job.updated_at_ms);
        head.last_finished_ms = head.last_finished_ms.max(job.updated_at_ms);
        head.bytes += record_bytes(job);
        head.jobs += 1;
        if !job.pipeline.is_empty() {
            runs.insert((job.pipeline.as_str(), job.run));
        }
    }
    let runs = runs
        .into_iter()
        .map(|(name, run)| st::PipelineRun {
            name: name.to_string(),
            run,
        })
        .collect();
    (head, runs)
}

/// What a job counts for in the history's size.
fn record_bytes(job: &st::JobRecord) -> u64 {
    job.encoded_len() as u64
}

/// The history's writes of one store write: the oldest chunks whose last
/// job is past the history's retention as of `at_ms`, or while the
/// history with the jobs `retired` is over its size cap; and those jobs.
/// They join the newest chunk while it is under half the value size, so
/// that chunks stay large when few jobs retire at a time (a lookup reads
/// every head). `bytes` is the history's size before; the size after is
/// returned with the writes.
pub(in crate::store) fn plan(
    trees: &HistoryTrees,
    policy: &RetentionPolicy,
    retired: &[JobRecord],
    at_ms: u64,
    bytes: u64,
) -> Result<(HistoryWrite, u64), StoreError> {
    let mut write = HistoryWrite::default();
    let mut jobs: Vec<st::JobRecord> = retired.iter().map(records::job_to_storage).collect();
    let mut bytes = bytes + jobs.iter().map(record_bytes).sum::<u64>();
    let mut pruned_through = None;
    for head in trees.heads().take(PRUNE_CHUNKS) {
        let (seq, head, _) = head?;
        let expired = head
            .last_finished_ms
            .saturating_add(policy.history_retention_ms)
            <= at_ms;
        if !expired && bytes <= policy.history_max_bytes {
            break;
        }
        write.chunks.remove(&seq.to_be_bytes());
        write.heads.remove(&seq.to_be_bytes());
        bytes = bytes.saturating_sub(head.bytes);
        pruned_through = Some(seq);
    }
    if jobs.is_empty() {
        return Ok((write, bytes));
    }
    let newest = trees.last_head()?;
    let mut seq = seq_after(newest.as_ref());
    if let Some((last, head)) = newest
        && head.bytes < MERGE_BELOW
        && pruned_through.is_none_or(|pruned| pruned < last)
    {
        jobs.extend(trees.chunk(last)?);
        seq = last;
    }
    write.add(jobs, seq);
    Ok((write, bytes))
}

/// Moves a history stored a record per job (the layout before chunks)
/// into chunks, oldest first, [`MIGRATE_BATCH`] records a transaction: a
/// crash in between leaves each record in one place or the other, and the
/// next open goes on. Then drops the old trees. Returns the records moved
/// (`None`: there was no such history).
pub(in crate::store) fn migrate(
    db: &sled::Db,
    trees: &HistoryTrees,
) -> Result<Option<usize>, StoreError> {
    if !db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == OLD_INDEX.as_bytes())
    {
        return Ok(None);
    }
    let old = db.open_tree(OLD_RECORDS)?;
    let index = db.open_tree(OLD_INDEX)?;
    let mut moved = 0;
    loop {
        let keys = index
            .range(b"t".to_vec()..b"u".to_vec())
            .take(MIGRATE_BATCH)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            break;
        }
        let (mut old_removed, mut index_removed) = (sled::Batch::default(), sled::Batch::default());
        let mut jobs = Vec::with_capacity(keys.len());
        for (key, value) in &keys {
            let id = key_u64(key.get(9..17).unwrap_or_default());
            index_removed.remove(key.as_ref());
            if let Some(run_key) = value.get(8..).filter(|k| !k.is_empty()) {
                index_removed.remove(run_key);
            }
            old_removed.remove(&id.to_be_bytes());
            if let Some(record) = old.get(id.to_be_bytes())? {
                let job = records::decode_job(&record).map_err(|source| StoreError::Record {
                    tree: OLD_RECORDS,
                    source,
                })?;
                jobs.push(records::job_to_storage(&job));
            }
        }
        moved += jobs.len();
        let mut write = HistoryWrite::default();
        write.add(jobs, seq_after(trees.last_head()?.as_ref()));
        (&old, &index, &trees.chunks, &trees.heads)
            .transaction(|(old, index, chunks, heads)| {
                old.apply_batch(&old_removed)?;
                index.apply_batch(&index_removed)?;
                chunks.apply_batch(&write.chunks)?;
                heads.apply_batch(&write.heads)?;
                Ok(())
            })
            .map_err(writer::transaction_failed)?;
    }
    drop((old, index));
    // Records without an index key (none were written so) go with them.
    db.drop_tree(OLD_RECORDS)?;
    db.drop_tree(OLD_INDEX)?;
    db.flush()?;
    Ok(Some(moved))
}

/// The bytes of every chunk's records (what `meta/history_bytes` keeps).
pub(in crate::store) fn stored_bytes(trees: &HistoryTrees) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for head in trees.heads() {
        bytes += head?.1.bytes;
    }
    Ok(bytes)
}
