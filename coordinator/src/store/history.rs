//! The history of retired jobs, on disk on every replica: what a job was
//! (spec), what it did (attempts with their output tails) and how it ended,
//! after it left hard state ([`crate::state`]'s retention).
//!
//! The jobs one write retires are stored together, by id, in values of at
//! most 64 KiB (a larger job alone):
//! - `history_chunks`: sequence number (8 bytes, big-endian) -> a
//!   [`HistoryChunk`](st::HistoryChunk), the jobs' last records;
//! - `history_heads`: the same key -> a [`HistoryHead`](st::HistoryHead),
//!   what the chunk holds (its ids and finish times from first to last,
//!   its bytes, its pipeline runs). Finding a job, a run or a page reads
//!   the heads and then only the chunks that can hold what is asked for.
//!
//! The history was stored a record per job (`history`, and the keys of
//! `history_index`) until this layout: sled's per-record inserts and
//! deletes cost the writer as much as the whole journal once retirement
//! ran at every write, and the churn of small records kept sled's
//! segments (and the data directory) growing. A data directory with such
//! records has them moved into chunks when it is opened ([`migrate`]).
//!
//! Chunks are written in the same transaction as the apply that retired
//! their jobs (by the store's writer, [`write`]), and leave whole, oldest
//! first, once their last job is past `--history-retention` (from the
//! applying command's own time) or while the history is over
//! `--history-max-bytes` (`meta/history_bytes` keeps the total): a job
//! stays in the history at least its retention. The history is not part
//! of a Raft snapshot (it would make snapshots as big as the history): a
//! replica that installs a snapshot keeps the history it had and records
//! retirements from then on.

use gantry_proto::storage as st;
use gantry_scheduler::JobId;
use prost::Message;

use super::journal::record_error;
use super::{Store, StoreError, key_u64, records};
use crate::domain::JobRecord;

pub(super) mod write;

pub(super) use write::migrate;

/// The tree of chunks.
const CHUNKS: &str = "history_chunks";
/// The tree of heads.
const HEADS: &str = "history_heads";

/// One page of history, newest first.
#[derive(Debug, Default)]
pub struct HistoryPage {
    /// The jobs, newest (finished last) first.
    pub jobs: Vec<JobRecord>,
    /// When there may be more: the (finished at, job id) of the last job
    /// of the page, where the next one starts (exclusive).
    pub next: Option<(u64, JobId)>,
}

/// Handles on the history's trees (a sled tree is a handle).
#[derive(Clone)]
pub(super) struct HistoryTrees {
    pub chunks: sled::Tree,
    pub heads: sled::Tree,
}

impl HistoryTrees {
    pub fn open(db: &sled::Db) -> Result<HistoryTrees, StoreError> {
        Ok(HistoryTrees {
            chunks: db.open_tree(CHUNKS)?,
            heads: db.open_tree(HEADS)?,
        })
    }

    /// Every chunk's head, oldest chunk first, with its key and its
    /// stored value (whose runs [`Head::runs`] reads).
    fn heads(&self) -> impl Iterator<Item = Result<(u64, Head, sled::IVec), StoreError>> + '_ {
        self.heads.iter().map(stored_head)
    }

    /// [`heads`](Self::heads), newest chunk first: a job asked for by id
    /// was more often retired lately.
    fn heads_newest_first(
        &self,
    ) -> impl Iterator<Item = Result<(u64, Head, sled::IVec), StoreError>> + '_ {
        self.heads.iter().rev().map(stored_head)
    }

    /// The newest chunk's key and head.
    fn last_head(&self) -> Result<Option<(u64, Head)>, StoreError> {
        match self.heads.last()? {
            Some((key, value)) => Ok(Some((key_u64(&key), Head::decode(&value)?))),
            None => Ok(None),
        }
    }

    /// The jobs of chunk `seq` (none when it is gone), by id.
    fn chunk(&self, seq: u64) -> Result<Vec<st::JobRecord>, StoreError> {
        let Some(value) = self.chunks.get(seq.to_be_bytes())? else {
            return Ok(Vec::new());
        };
        st::HistoryChunk::decode(value.as_ref())
            .map(|chunk| chunk.jobs)
            .map_err(|error| record_error(CHUNKS, error))
    }
}

/// The key the next chunk gets, after `newest` (the newest chunk's key and
/// head, [`HistoryTrees::last_head`]).
fn seq_after(newest: Option<&(u64, Head)>) -> u64 {
    newest.map_or(0, |(seq, _)| seq + 1)
}

/// What a chunk holds: its head in `history_heads`, 48 bytes (these six
/// numbers, big-endian) and then its pipeline runs
/// ([`HistoryRuns`](st::HistoryRuns)), which only a run's lookup decodes:
/// a lookup by id or a page reads every head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub min_id: JobId,
    pub max_id: JobId,
    /// The jobs' finish times (their last update): earliest and latest.
    pub first_finished_ms: u64,
    pub last_finished_ms: u64,
    /// Bytes of the jobs' records, encoded.
    pub bytes: u64,
    pub jobs: u64,
}

/// The fixed part of a head.
const HEAD_BYTES: usize = 48;

impl Head {
    fn fields(&self) -> [u64; 6] {
        [
            self.min_id,
            self.max_id,
            self.first_finished_ms,
            self.last_finished_ms,
            self.bytes,
            self.jobs,
        ]
    }

    fn encode(&self, runs: Vec<st::PipelineRun>) -> Vec<u8> {
        let runs = st::HistoryRuns { runs }.encode_to_vec();
        let mut value = Vec::with_capacity(HEAD_BYTES + runs.len());
        for field in self.fields() {
            value.extend_from_slice(&field.to_be_bytes());
        }
        value.extend_from_slice(&runs);
        value
    }

    fn decode(value: &[u8]) -> Result<Head, StoreError> {
        if value.len() < HEAD_BYTES {
            return Err(StoreError::BadValue {
                tree: HEADS,
                key: "head",
                len: value.len(),
            });
        }
        let field = |n: usize| key_u64(&value[n * 8..n * 8 + 8]);
        Ok(Head {
            min_id: field(0),
            max_id: field(1),
            first_finished_ms: field(2),
            last_finished_ms: field(3),
            bytes: field(4),
            jobs: field(5),
        })
    }

    /// The pipeline runs of the head stored as `value`.
    fn runs(value: &[u8]) -> Result<Vec<st::PipelineRun>, StoreError> {
        st::HistoryRuns::decode(value.get(HEAD_BYTES..).unwrap_or_default())
            .map(|runs| runs.runs)
            .map_err(|error| record_error(HEADS, error))
    }
}

/// A head as stored, with its key and value.
fn stored_head(
    item: sled::Result<(sled::IVec, sled::IVec)>,
) -> Result<(u64, Head, sled::IVec), StoreError> {
    let (key, value) = item?;
    Ok((key_u64(&key), Head::decode(&value)?, value))
}

fn decode_job(job: st::JobRecord) -> Result<JobRecord, StoreError> {
    records::job_from_storage(job).map_err(|source| StoreError::Record {
        tree: CHUNKS,
        source,
    })
}

/// A job's place in the newest-first order of pages.
fn page_key(job: &st::JobRecord) -> (u64, JobId) {
    (job.updated_at_ms, job.id)
}

impl Store {
    /// Bytes of history stored (the records' encodings).
    pub fn history_bytes(&self) -> Result<u64, StoreError> {
        self.writer.drain()?;
        self.meta_u64(super::META_HISTORY_BYTES)
    }

    /// Records in the history.
    pub fn history_len(&self) -> Result<usize, StoreError> {
        self.writer.drain()?;
        let mut jobs = 0;
        for head in self.history.heads() {
            jobs += head?.1.jobs as usize;
        }
        Ok(jobs)
    }

    /// A retired job, if the history still has it.
    pub fn history_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.writer.drain()?;
        for head in self.history.heads_newest_first() {
            let (seq, head, _) = head?;
            if !(head.min_id..=head.max_id).contains(&id) {
                continue;
            }
            if let Some(job) = self.history.chunk(seq)?.into_iter().find(|j| j.id == id) {
                return decode_job(job).map(Some);
            }
        }
        Ok(None)
    }

    /// Retired jobs that finished at or after `since_ms` and before
    /// `before` (exclusive; `None` = from the newest), newest first, that
    /// `keep` accepts; at most `limit`.
    ///
    /// Chunks are read newest (last finish) first, and no further once
    /// `limit` jobs were found that every job of the chunks left finished
    /// before.
    pub fn history_page(
        &self,
        since_ms: u64,
        before: Option<(u64, JobId)>,
        limit: usize,
        keep: impl Fn(&JobRecord) -> bool,
    ) -> Result<HistoryPage, StoreError> {
        self.writer.drain()?;
        let mut candidates = Vec::new();
        for head in self.history.heads() {
            let (seq, head, _) = head?;
            let after_since = head.last_finished_ms >= since_ms;
            let before_end = before.is_none_or(|(at, _)| head.first_finished_ms <= at);
            if after_since && before_end {
                candidates.push((head.last_finished_ms, seq));
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let mut page = HistoryPage::default();
        let mut more = false;
        for &(last_finished, seq) in &candidates {
            // The page is full and every job left finished before its last.
            if let Some(last) = limit.checked_sub(1).and_then(|n| page.jobs.get(n))
                && last_finished < last.updated_at_ms
            {
                more = true;
                break;
            }
            for job in self.history.chunk(seq)? {
                let key = page_key(&job);
                if key.0 < since_ms || before.is_some_and(|b| key >= b) {
                    continue;
                }
                let job = decode_job(job)?;
                if keep(&job) {
                    page.jobs.push(job);
                }
            }
            page.jobs
                .sort_unstable_by_key(|j| std::cmp::Reverse((j.updated_at_ms, j.id)));
            if page.jobs.len() > limit {
                page.jobs.truncate(limit);
                more = true;
            }
        }
        if more {
            page.next = page.jobs.last().map(|j| (j.updated_at_ms, j.id));
        }
        Ok(page)
    }

    /// The retired jobs of one pipeline run, by id.
    pub fn history_run(&self, pipeline: &str, run: u32) -> Result<Vec<JobRecord>, StoreError> {
        self.writer.drain()?;
        let mut jobs = Vec::new();
        for head in self.history.heads() {
            let (seq, _, value) = head?;
            if !Head::runs(&value)?
                .iter()
                .any(|r| r.name == pipeline && r.run == run)
            {
                continue;
            }
            for job in self.history.chunk(seq)? {
                if job.pipeline == pipeline && job.run == run {
                    jobs.push(decode_job(job)?);
                }
            }
        }
        jobs.sort_unstable_by_key(|j| j.id);
        Ok(jobs)
    }
}

#[cfg(test)]
pub(super) mod tests;

#[cfg(test)]
mod chunk_tests;
