//! Continuous pipelines (`repeat:`): the next run of a loop starts in the
//! apply of the command that made the latest run's last stage succeed, from
//! that command's own time, so every replica starts the same run with the
//! same ids, once (a duplicate exit report changes nothing). The next run is
//! made by the same `submit` a user's submit goes through (the `after:`
//! graph resolved again), from the run's own records: each job carries the
//! loop's [`RunPolicy`], and the jobs of the latest run are held in hard
//! state while the loop goes on (see `retention.rs`).
//!
//! A run that does not succeed (a stage dead-lettered, its dependants
//! blocked) starts nothing: `dlq retry` of the stage lets the run finish and
//! the loop go on. A stage dropped from the dead-letter queue, or cancelled,
//! ends the loop. `Command::StopPipeline` marks the latest run's jobs
//! stopped: that run finishes, no run follows.

use gantry_scheduler::JobId;

use super::StateMachine;
use crate::domain::{JobRecord, JobState, Repeat, RunPolicy};

/// Where a pipeline's loop stands, for `gantry pipeline NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopStatus {
    /// No `repeat:`: one run per submit.
    Once,
    /// The next run starts when this one succeeds.
    Repeating,
    /// A stage is dead-lettered: `dlq retry` resumes the loop.
    Paused,
    /// `gantry pipeline stop`: no run after this one.
    Stopped,
    /// `max_runs` reached.
    Finished,
    /// A stage was cancelled or dropped: the run cannot succeed.
    Ended,
}

impl LoopStatus {
    /// The word `gantry pipeline` shows ("" for a pipeline that does not repeat).
    pub fn as_str(self) -> &'static str {
        match self {
            LoopStatus::Once => "",
            LoopStatus::Repeating => "repeating",
            LoopStatus::Paused => "paused",
            LoopStatus::Stopped => "stopped",
            LoopStatus::Finished => "finished",
            LoopStatus::Ended => "ended",
        }
    }
}

/// The status of a loop whose latest run is `run`, with its stages in
/// `states` (a pure decision, tested as data).
pub fn loop_status(policy: &RunPolicy, run: u32, states: &[JobState]) -> LoopStatus {
    if policy.repeat == Repeat::Once {
        return LoopStatus::Once;
    }
    if policy.stopped {
        return LoopStatus::Stopped;
    }
    if !policy.continues_after(run) {
        return LoopStatus::Finished;
    }
    if states.contains(&JobState::Cancelled) {
        return LoopStatus::Ended;
    }
    if states
        .iter()
        .any(|s| matches!(s, JobState::DeadLettered | JobState::Blocked))
    {
        return LoopStatus::Paused;
    }
    LoopStatus::Repeating
}

impl StateMachine {
    /// The jobs of one pipeline run in hard state, by id (submit order).
    fn run_ids(&self, name: &str, run: u32) -> Vec<JobId> {
        self.jobs
            .values()
            .filter(|j| j.pipeline == name && j.run == run)
            .map(|j| j.id)
            .collect()
    }

    /// Called when `job` has just succeeded: if it was the last stage of
    /// the latest run of a loop that goes on, the next run starts now.
    pub(super) fn continue_loop(&mut self, at_ms: u64, job: JobId) {
        let Some(record) = self.jobs.get(&job) else {
            return;
        };
        if record.pipeline.is_empty() || record.run_policy.repeat == Repeat::Once {
            return;
        }
        let (name, run) = (record.pipeline.clone(), record.run);
        let (policy, owner) = (record.run_policy.clone(), record.owner.clone());
        // A newer run (submitted again by hand) carries the loop on.
        if self.pipeline_runs.get(&name) != Some(&run) {
            return;
        }
        let ids = self.run_ids(&name, run);
        let run_jobs: Vec<&JobRecord> = ids.iter().filter_map(|id| self.job(*id)).collect();
        if run_jobs.iter().any(|j| j.state != JobState::Succeeded) {
            return;
        }
        let specs = run_jobs.iter().map(|j| j.spec.clone()).collect();
        if !policy.continues_after(run) {
            let why = if policy.stopped {
                "stopped"
            } else {
                "max_runs reached"
            };
            self.event(
                at_ms,
                job,
                format!("pipeline {name} run {run} succeeded; loop ends ({why})"),
            );
            return;
        }
        match self.submit(at_ms, None, specs, Some(name.clone()), owner, policy) {
            Ok(_) => self.event(
                at_ms,
                job,
                format!(
                    "pipeline {name} run {run} succeeded; run {} started",
                    run + 1
                ),
            ),
            // The same specs were accepted for this run; recorded, not hidden.
            Err(e) => self.event(
                at_ms,
                job,
                format!("pipeline {name} run {run} succeeded; next run refused: {e}"),
            ),
        }
    }

    /// `gantry pipeline stop`: the latest run of `name` finishes, no run
    /// follows. Nothing to stop (no such pipeline, not repeating, already
    /// stopped) changes nothing.
    pub(super) fn stop_pipeline(&mut self, at_ms: u64, name: &str) {
        let Some(&run) = self.pipeline_runs.get(name) else {
            return;
        };
        let ids: Vec<JobId> = self
            .run_ids(name, run)
            .into_iter()
            .filter(|id| {
                self.jobs
                    .get(id)
                    .is_some_and(|j| j.run_policy.repeat != Repeat::Once && !j.run_policy.stopped)
            })
            .collect();
        let Some(&first) = ids.first() else {
            return;
        };
        for id in &ids {
            if let Some(j) = self.jobs.get_mut(id) {
                j.run_policy.stopped = true;
                self.changes.jobs.insert(*id);
            }
        }
        self.event(
            at_ms,
            first,
            format!("pipeline {name} stopped: no run starts after run {run}"),
        );
        self.release_run(name, run);
    }

    /// Whether finished job `id` is held in hard state by its loop: it is
    /// in the latest run of a pipeline whose loop goes on.
    pub(super) fn loop_holds(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|j| {
            !j.pipeline.is_empty()
                && j.run_policy.continues_after(j.run)
                && self.pipeline_runs.get(&j.pipeline) == Some(&j.run)
        })
    }

    /// Files the finished jobs of a run again for retention, once their
    /// loop holds them no more (a newer run, or a stop).
    pub(super) fn release_run(&mut self, name: &str, run: u32) {
        for id in self.run_ids(name, run) {
            if self.held.contains(&id) {
                self.unindex_finished(id);
                self.index_finished(id);
            }
        }
    }

    /// The loop status of a pipeline's latest run in hard state (`None`
    /// when none of its jobs is).
    pub fn pipeline_loop(&self, name: &str) -> Option<(u32, RunPolicy, LoopStatus)> {
        let run = *self.pipeline_runs.get(name)?;
        let jobs: Vec<&JobRecord> = self
            .run_ids(name, run)
            .iter()
            .filter_map(|id| self.job(*id))
            .collect();
        let policy = jobs.first()?.run_policy.clone();
        let states: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
        let status = loop_status(&policy, run, &states);
        Some((run, policy, status))
    }
}

#[cfg(test)]
mod tests;
