//! Submissions: a batch of jobs with its `after:` dependency graph
//! (resolved and checked in [`crate::dag`]), and the blocking and
//! unblocking of dependants when a job ends.

use gantry_scheduler::JobId;

use super::{ApplyError, Outcome, StateMachine};
use crate::dag::resolve_after;
use crate::domain::{JobRecord, JobSpec, JobState, Repeat, RunPolicy};

impl StateMachine {
    pub(super) fn submit(
        &mut self,
        at_ms: u64,
        key: Option<String>,
        specs: Vec<JobSpec>,
        pipeline: Option<String>,
        owner: Option<String>,
        mut run_policy: RunPolicy,
    ) -> Result<Outcome, ApplyError> {
        if let Some(ids) = key.as_ref().and_then(|k| self.submissions.get(k)) {
            return Ok(Outcome::Submitted(ids.clone()));
        }
        // Resolve `after:` names within the submission before changing anything.
        let edges = resolve_after(&specs, pipeline.is_some())?;
        let run = match &pipeline {
            Some(name) => {
                let run = self.pipeline_runs.entry(name.clone()).or_default();
                *run += 1;
                self.changes.pipelines.insert(name.clone());
                *run
            }
            None => 0,
        };
        if run_policy.repeat != Repeat::Once && run_policy.first_run == 0 {
            run_policy.first_run = run;
        }
        let first = self.next_job_id;
        let ids: Vec<JobId> = (0..specs.len() as u64).map(|i| first + i).collect();
        self.next_job_id += specs.len() as u64;
        for ((spec, deps), id) in specs.into_iter().zip(edges).zip(&ids) {
            let depends_on: Vec<JobId> = deps.iter().map(|d| ids[*d]).collect();
            for dep in &depends_on {
                self.dependants.entry(*dep).or_default().push(*id);
            }
            let record = JobRecord {
                id: *id,
                spec,
                state: JobState::Pending,
                submitted_at_ms: at_ms,
                updated_at_ms: at_ms,
                attempts: Vec::new(),
                cancel_requested: false,
                depends_on,
                not_before_ms: 0,
                terminal_reason: String::new(),
                retry_base: 0,
                batch_cap: None,
                blocked_by: None,
                pipeline: pipeline.clone().unwrap_or_default(),
                run,
                owner: owner.clone(),
                submit_event: self.next_event_index,
                preempted_by: Vec::new(),
                preempting: None,
                run_policy: run_policy.clone(),
            };
            self.jobs.insert(*id, record);
            self.pending.insert(*id);
            self.event(at_ms, *id, "submitted".into());
        }
        if let Some(key) = key {
            for id in &ids {
                self.keyed.insert(*id, key.clone());
            }
            self.submissions.insert(key.clone(), ids.clone());
            self.changes.submissions.push((key, ids.clone()));
        }
        if let Some(name) = &pipeline
            && run > 1
        {
            // The run before is no longer the latest: a loop holds it no more.
            self.release_run(name, run - 1);
        }
        Ok(Outcome::Submitted(ids))
    }

    /// Marks every not-yet-finished dependant of `job` (transitively) Blocked.
    pub(super) fn block_dependants(&mut self, at_ms: u64, job: JobId) {
        let cause = self
            .jobs
            .get(&job)
            .map(|j| {
                format!(
                    "job {job} ({}) {}: {}",
                    j.spec.name, j.state, j.terminal_reason
                )
            })
            .unwrap_or_default();
        let mut stack = vec![job];
        while let Some(parent) = stack.pop() {
            let Some(children) = self.dependants.get(&parent).cloned() else {
                continue;
            };
            for child in children {
                let blockable = self
                    .jobs
                    .get(&child)
                    .is_some_and(|j| j.state == JobState::Pending);
                if blockable {
                    let reason = format!("blocked: dependency {cause}");
                    if let Some(j) = self.jobs.get_mut(&child) {
                        j.terminal_reason = reason.clone();
                        j.blocked_by = Some(job);
                    }
                    self.transition(at_ms, child, JobState::Blocked, reason);
                    stack.push(child);
                }
            }
        }
    }

    /// Returns to Pending every job Blocked because of `job`.
    pub(super) fn unblock_dependants(&mut self, at_ms: u64, job: JobId) {
        let blocked: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Blocked && j.blocked_by == Some(job))
            .map(|j| j.id)
            .collect();
        for child in blocked {
            if let Some(j) = self.jobs.get_mut(&child) {
                j.blocked_by = None;
                j.terminal_reason.clear();
            }
            self.transition(
                at_ms,
                child,
                JobState::Pending,
                format!("unblocked: job {job} retried"),
            );
        }
    }
}
