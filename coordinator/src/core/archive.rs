//! Reads that reach past hard state into the history of retired jobs
//! (`store/history.rs`): one job, a pipeline run, `gantry jobs --since`,
//! and the event history with its compaction floor.

use gantry_proto as pb;
use gantry_scheduler::JobId;

use super::Core;
use crate::convert;
use std::collections::BTreeMap;

use crate::domain::{EventRecord, JobRecord, JobState, Repeat};
use crate::error::CoordinatorError;

/// Runs summarised by `gantry pipeline NAME`.
const RUNS_SHOWN: u32 = 20;

/// `repeat:` on the wire (`None` for a pipeline that does not repeat).
fn repeat_to_proto(repeat: Repeat) -> Option<pb::PipelineRepeat> {
    match repeat {
        Repeat::Once => None,
        Repeat::MaxRuns(max_runs) => Some(pb::PipelineRepeat {
            max_runs,
            forever: false,
        }),
        Repeat::Forever => Some(pb::PipelineRepeat {
            max_runs: 0,
            forever: true,
        }),
    }
}

/// One run's line: its state from its stages', its time from the first
/// submit to the last end.
fn run_summary(run: u32, jobs: &[&JobRecord]) -> pb::PipelineRunSummary {
    let states: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
    let state = if states.iter().all(|s| *s == JobState::Succeeded) {
        "succeeded"
    } else if states.contains(&JobState::Cancelled) {
        "cancelled"
    } else if states
        .iter()
        .any(|s| matches!(s, JobState::DeadLettered | JobState::Blocked))
    {
        "failed"
    } else {
        "running"
    };
    let ended_at_ms = if state == "running" {
        0
    } else {
        jobs.iter()
            .filter_map(|j| j.current_attempt().map(|a| a.ended_at_ms))
            .max()
            .unwrap_or(0)
    };
    pb::PipelineRunSummary {
        run,
        state: state.to_string(),
        stages: jobs.len() as u32,
        succeeded: states.iter().filter(|s| **s == JobState::Succeeded).count() as u32,
        submitted_at_ms: jobs.iter().map(|j| j.submitted_at_ms).min().unwrap_or(0),
        ended_at_ms,
    }
}

/// Most jobs in one page of `gantry jobs --since`.
pub const MAX_PAGE: usize = 1_000;

impl Core {
    fn job_view(&self, job: &JobRecord) -> pb::Job {
        convert::job_to_proto(job, self.hold_reasons.get(&job.id).map(String::as_str))
    }

    fn archived_view(job: &JobRecord) -> pb::Job {
        pb::Job {
            archived: true,
            ..convert::job_to_proto(job, None)
        }
    }

    /// One job: from hard state, else from the history (marked archived).
    pub(super) fn get_job(&self, id: JobId) -> Result<pb::Job, CoordinatorError> {
        if let Some(job) = self.state.job(id) {
            return Ok(pb::Job {
                gang_members: convert::gang_members_to_proto(&self.state, job),
                ..self.job_view(job)
            });
        }
        match self.store.history_job(id)? {
            Some(job) => Ok(Self::archived_view(&job)),
            None => Err(CoordinatorError::NotFound(format!(
                "job {id} not found (never submitted, or retired past the history's retention)"
            ))),
        }
    }

    /// Stored events from `from` (0 = the oldest kept); below the
    /// compaction floor an error naming it, never a silent skip.
    pub(super) fn events_since(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, CoordinatorError> {
        let floor = self.state.event_floor();
        let from = match from {
            0 => floor,
            from if from < floor => return Err(CoordinatorError::Compacted { from, floor }),
            from => from,
        };
        Ok(self.store.events_since(from, limit)?)
    }

    /// One run of a pipeline (`run` 0 = the latest): the jobs still in hard
    /// state and those in the history, by id.
    pub(super) fn pipeline(
        &self,
        name: &str,
        run: u32,
    ) -> Result<(u32, Vec<pb::Job>), CoordinatorError> {
        let (run, live) = self.state.pipeline_jobs(name, run);
        let mut jobs: Vec<pb::Job> = live.into_iter().map(|j| self.job_view(j)).collect();
        jobs.extend(
            self.store
                .history_run(name, run)?
                .iter()
                .map(Self::archived_view),
        );
        if jobs.is_empty() {
            return Err(CoordinatorError::NotFound(format!(
                "no pipeline {name:?} run {run}"
            )));
        }
        jobs.sort_by_key(|j| j.id);
        Ok((run, jobs))
    }

    /// `gantry pipeline NAME`: one run (`run` 0 = the latest) with its
    /// jobs, the loop's status and a summary of the latest runs.
    pub(super) fn pipeline_view(
        &self,
        name: &str,
        run: u32,
    ) -> Result<pb::PipelineView, CoordinatorError> {
        let (run, jobs) = self.pipeline(name, run)?;
        let latest = self.state.pipeline_runs().get(name).copied().unwrap_or(run);
        let first = latest.saturating_sub(RUNS_SHOWN - 1).max(1);
        // Retired jobs first (owned), then every job of the window by
        // reference: a view clones no record.
        let retired: Vec<JobRecord> = (first..=latest)
            .map(|r| self.store.history_run(name, r))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        let mut by_run: BTreeMap<u32, Vec<&JobRecord>> = BTreeMap::new();
        for job in self
            .state
            .jobs()
            .filter(|j| j.pipeline == name && j.run >= first)
            .chain(&retired)
        {
            by_run.entry(job.run).or_default().push(job);
        }
        let runs = by_run
            .iter()
            .map(|(r, jobs)| run_summary(*r, jobs))
            .collect();
        let (loop_status, repeat) = match self.state.pipeline_loop(name) {
            Some((_, policy, status)) => {
                (status.as_str().to_string(), repeat_to_proto(policy.repeat))
            }
            None => (String::new(), None),
        };
        Ok(pb::PipelineView {
            name: name.to_string(),
            run,
            jobs,
            loop_status,
            runs,
            repeat,
        })
    }

    /// `gantry jobs --since`: jobs updated at or after `since_ms`, newest
    /// first, hard state and history merged, one page of at most `limit`
    /// (at most [`MAX_PAGE`]); the token of the next page, "" when none.
    pub(super) fn job_history(
        &self,
        states: &[JobState],
        since_ms: u64,
        page_token: &str,
        limit: usize,
    ) -> Result<(Vec<pb::Job>, String), CoordinatorError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let before = parse_token(page_token)?;
        let wanted = |j: &JobRecord| states.is_empty() || states.contains(&j.state);
        let below = |j: &JobRecord| before.is_none_or(|b| (j.updated_at_ms, j.id) < b);
        let mut live: Vec<&JobRecord> = self
            .state
            .jobs()
            .filter(|j| j.updated_at_ms >= since_ms && wanted(j) && below(j))
            .collect();
        live.sort_by_key(|j| std::cmp::Reverse((j.updated_at_ms, j.id)));
        let archived = self.store.history_page(since_ms, before, limit, wanted)?;
        let mut more = live.len() > limit || archived.next.is_some();
        let mut merged: Vec<(bool, &JobRecord)> = live
            .into_iter()
            .map(|j| (false, j))
            .chain(archived.jobs.iter().map(|j| (true, j)))
            .collect();
        merged.sort_by_key(|(_, j)| std::cmp::Reverse((j.updated_at_ms, j.id)));
        if merged.len() > limit {
            merged.truncate(limit);
            more = true;
        }
        let next = match merged.last() {
            Some((_, last)) if more => format!("{}.{}", last.updated_at_ms, last.id),
            _ => String::new(),
        };
        let jobs = merged
            .into_iter()
            .map(|(archived, j)| {
                if archived {
                    Self::archived_view(j)
                } else {
                    self.job_view(j)
                }
            })
            .collect();
        Ok((jobs, next))
    }
}

/// A page token: `UPDATED_AT.ID` of the last job of the previous page.
fn parse_token(token: &str) -> Result<Option<(u64, JobId)>, CoordinatorError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || CoordinatorError::InvalidArgument {
        field: "page_token".into(),
        reason: format!(
            "{} is not a page token (pass the previous page's next_page_token)",
            convert::quote(token)
        ),
    };
    let (at, id) = token.split_once('.').ok_or_else(bad)?;
    Ok(Some((
        at.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    )))
}
