//! Submissions: a batch of jobs with its `after:` dependency graph
//! (resolved and checked in [`crate::dag`]), and the blocking and
//! unblocking of dependants when a job ends.

use gantry_scheduler::JobId;

use super::{ApplyError, Outcome, StateMachine};
use crate::dag::resolve_after;
use crate::domain::{GangMember, JobRecord, JobSpec, JobState, Repeat, RunPolicy};

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
        // A gang spec becomes one job per member, with consecutive ids;
        // the submission answers with each spec's first (rank 0) id.
        let sizes: Vec<u64> = specs
            .iter()
            .map(|s| s.gang.as_ref().map_or(1, |g| u64::from(g.nodes)))
            .collect();
        let mut firsts = Vec::with_capacity(specs.len());
        let mut next = self.next_job_id;
        for size in &sizes {
            firsts.push(next);
            next += size;
        }
        let all: Vec<JobId> = (self.next_job_id..next).collect();
        self.next_job_id = next;
        for (i, (spec, deps)) in specs.into_iter().zip(edges).enumerate() {
            // A dependant of a gang waits for every member.
            let depends_on: Vec<JobId> = deps
                .iter()
                .flat_map(|d| (0..sizes[*d]).map(|r| firsts[*d] + r))
                .collect();
            let mut last = Some(spec);
            for rank in 0..sizes[i] {
                let id = firsts[i] + rank;
                let Some(mut spec) = (if rank + 1 < sizes[i] {
                    last.clone()
                } else {
                    last.take()
                }) else {
                    break;
                };
                if rank > 0 {
                    // The gang holds its locks once, through rank 0 (which
                    // lives exactly as long as the gang's attempt).
                    spec.locks.clear();
                }
                let gang = spec.gang.as_ref().map(|g| GangMember {
                    first: firsts[i],
                    rank: rank as u32,
                    size: g.nodes,
                    port: 0,
                });
                let deps = depends_on.clone();
                let record = self.submitted_record(at_ms, id, spec, deps, &pipeline, run, &owner);
                self.insert_submitted(
                    at_ms,
                    JobRecord {
                        gang,
                        run_policy: run_policy.clone(),
                        ..record
                    },
                );
            }
        }
        let ids = firsts;
        if let Some(key) = key {
            for id in &all {
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

    /// A submitted job's record, Pending (not in a gang, default run policy).
    #[allow(clippy::too_many_arguments)]
    fn submitted_record(
        &mut self,
        at_ms: u64,
        id: JobId,
        spec: JobSpec,
        depends_on: Vec<JobId>,
        pipeline: &Option<String>,
        run: u32,
        owner: &Option<String>,
    ) -> JobRecord {
        for dep in &depends_on {
            self.dependants.entry(*dep).or_default().push(id);
        }
        JobRecord {
            id,
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
            gang: None,
            run_policy: RunPolicy::default(),
        }
    }

    /// Stores one submitted job, Pending.
    fn insert_submitted(&mut self, at_ms: u64, record: JobRecord) {
        let id = record.id;
        self.index_gang(record.gang.clone(), JobState::Pending);
        self.jobs.insert(id, Box::new(record));
        self.pending.insert(id);
        self.event(at_ms, id, "submitted".into());
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
