//! The history of retired jobs, on disk on every replica: what a job was
//! (spec), what it did (attempts with their output tails) and how it ended,
//! after it left hard state ([`crate::state`]'s retention).
//!
//! The jobs one write retires are appended, by id, to files of the
//! history's own ([`log`]: `history/<n>.hist` beside the database), in
//! chunks of at least 32 KiB (a chunk takes the next writes' jobs
//! while it is smaller). The index in memory says what each chunk holds
//! (its ids and finish times from first to last, its bytes, its pipeline
//! runs): finding a job, a run or a page reads it and then only the chunks
//! that can hold what is asked for.
//!
//! Chunks are appended by the store's writer before the transaction of
//! the apply that retired their jobs, which records how far the files go
//! ([`log::Recorded`], tree `history_log`), and leave whole, oldest first,
//! once their last job is past `--history-retention` (from the applying
//! command's own time) or while the history is over `--history-max-bytes`:
//! a job stays in the history at least its retention. The history is not
//! part of a Raft snapshot (it would make snapshots as big as the
//! history): a replica that installs a snapshot keeps the history it had
//! and records retirements from then on.
//!
//! Earlier layouts kept the history in sled: a record per job (`history`
//! and `history_index`, layout 2), then chunks (`history_chunks` and
//! `history_heads`, layouts 3 and 4). Either is moved into the files when
//! the store opens ([`migrate`]).

use std::sync::{Arc, Mutex, MutexGuard};

use gantry_proto::storage as st;
use gantry_scheduler::JobId;

use super::{Store, StoreError, records};
use crate::domain::JobRecord;

pub(super) mod log;
mod migrate;

pub(super) use migrate::migrate;

/// The tree of what sled records of the history's files.
pub(super) const RECORDED_TREE: &str = "history_log";
/// Its one key.
pub(super) const RECORDED_KEY: &str = "recorded";

/// The history's files, shared by the store and its writer thread: the
/// writer holds it while it commits a write, and the store reads it only
/// after the writer drained.
pub(super) type SharedLog = Arc<Mutex<log::HistoryLog>>;

/// The log, whoever held it last (the writer catches its own panics and
/// stops the store, so a poisoned lock holds a consistent log).
pub(super) fn lock(log: &SharedLog) -> MutexGuard<'_, log::HistoryLog> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What sled has recorded of the history's files (nothing yet: none).
pub(super) fn recorded(tree: &sled::Tree) -> Result<log::Recorded, StoreError> {
    match tree.get(RECORDED_KEY)? {
        Some(value) => log::Recorded::decode(&value),
        None => Ok(log::Recorded::default()),
    }
}

/// One page of history, newest first.
#[derive(Debug, Default)]
pub struct HistoryPage {
    /// The jobs, newest (finished last) first.
    pub jobs: Vec<JobRecord>,
    /// When there may be more: the (finished at, job id) of the last job
    /// of the page, where the next one starts (exclusive).
    pub next: Option<(u64, JobId)>,
}

/// What a chunk (or one piece of it) holds.
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

impl Head {
    /// What `jobs` (at least one) hold, and their pipeline runs, each once.
    fn of(jobs: &[st::JobRecord]) -> (Head, Vec<st::PipelineRun>) {
        let mut head = Head {
            min_id: u64::MAX,
            max_id: 0,
            first_finished_ms: u64::MAX,
            last_finished_ms: 0,
            bytes: 0,
            jobs: 0,
        };
        let mut runs = std::collections::BTreeSet::new();
        for job in jobs {
            head.min_id = head.min_id.min(job.id);
            head.max_id = head.max_id.max(job.id);
            head.first_finished_ms = head.first_finished_ms.min(job.updated_at_ms);
            head.last_finished_ms = head.last_finished_ms.max(job.updated_at_ms);
            head.bytes += log::record_bytes(job);
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

    /// Widens this head by `other`'s jobs.
    fn absorb(&mut self, other: &Head) {
        self.min_id = self.min_id.min(other.min_id);
        self.max_id = self.max_id.max(other.max_id);
        self.first_finished_ms = self.first_finished_ms.min(other.first_finished_ms);
        self.last_finished_ms = self.last_finished_ms.max(other.last_finished_ms);
        self.bytes += other.bytes;
        self.jobs += other.jobs;
    }

    /// As a piece stores it, with `runs`.
    fn to_piece(self, runs: Vec<st::PipelineRun>) -> st::HistoryPieceHead {
        st::HistoryPieceHead {
            min_id: self.min_id,
            max_id: self.max_id,
            first_finished_ms: self.first_finished_ms,
            last_finished_ms: self.last_finished_ms,
            bytes: self.bytes,
            jobs: self.jobs,
            runs,
        }
    }

    /// A piece's head.
    fn from_piece(head: &st::HistoryPieceHead) -> Head {
        Head {
            min_id: head.min_id,
            max_id: head.max_id,
            first_finished_ms: head.first_finished_ms,
            last_finished_ms: head.last_finished_ms,
            bytes: head.bytes,
            jobs: head.jobs,
        }
    }
}

fn decode_job(job: st::JobRecord) -> Result<JobRecord, StoreError> {
    records::job_from_storage(job).map_err(|source| StoreError::Record {
        tree: log::DIR_NAME,
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
        Ok(lock(&self.history).recorded().bytes)
    }

    /// Records in the history.
    pub fn history_len(&self) -> Result<usize, StoreError> {
        self.writer.drain()?;
        Ok(lock(&self.history)
            .chunks()
            .map(|(_, chunk)| chunk.head.jobs as usize)
            .sum())
    }

    /// A retired job, if the history still has it.
    pub fn history_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.writer.drain()?;
        let log = lock(&self.history);
        // A job asked for by id was more often retired lately.
        for (number, chunk) in log.chunks().rev() {
            if !(chunk.head.min_id..=chunk.head.max_id).contains(&id) {
                continue;
            }
            if let Some(job) = log.chunk_jobs(number)?.into_iter().find(|j| j.id == id) {
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
        let log = lock(&self.history);
        let mut candidates = Vec::new();
        for (seq, chunk) in log.chunks() {
            let head = &chunk.head;
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
            for job in log.chunk_jobs(seq)? {
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
        let log = lock(&self.history);
        let mut jobs = Vec::new();
        for (seq, chunk) in log.chunks() {
            if !chunk
                .runs
                .iter()
                .any(|r| r.name == pipeline && r.run == run)
            {
                continue;
            }
            for job in log.chunk_jobs(seq)? {
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
