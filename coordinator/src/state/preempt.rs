//! Priority preemption, applied: `Command::Preempt` re-checks the
//! scheduler's choice against hard state at the command's own time, marks
//! the victims' attempts preempted (they keep their reservations until
//! their agent reports them ended, then go back to Pending without using
//! an attempt, as on a drain deadline) and holds the node for the
//! preemptor.

use std::collections::HashMap;

use gantry_scheduler::{JobId, Placement};

use super::{Outcome, StateMachine};
use crate::domain::{JobRecord, JobState, MAX_PREEMPTIONS_KEPT, PreemptedBy, PreemptionHold};

impl StateMachine {
    /// Why `Command::Preempt` cannot apply at `at_ms`, if it cannot.
    pub fn preemption_refusal(
        &self,
        at_ms: u64,
        job: JobId,
        node: &str,
        victims: &[JobId],
    ) -> Option<String> {
        let Some(preemptor) = self.jobs.get(&job) else {
            return Some(format!("job {job} not found"));
        };
        if preemptor.state != JobState::Pending || preemptor.cancel_requested {
            return Some(format!("job {job} is no longer waiting"));
        }
        if preemptor
            .preempting
            .as_ref()
            .is_some_and(|h| h.until_ms > at_ms)
        {
            return Some(format!("job {job} already holds capacity"));
        }
        if victims.is_empty() {
            return Some("no victims".into());
        }
        for victim in victims {
            let Some(record) = self.jobs.get(victim) else {
                return Some(format!("victim {victim} not found"));
            };
            let running_here = record
                .current_attempt()
                .is_some_and(|a| a.node == node && a.ended_at_ms == 0 && a.preempted.is_empty());
            if !record.state.is_active() || !running_here || record.cancel_requested {
                return Some(format!("victim {victim} no longer runs on {node}"));
            }
            if !record.spec.preemptible() || record.spec.priority >= preemptor.spec.priority {
                return Some(format!("victim {victim} may not be preempted by job {job}"));
            }
            if preemptor.preempted_by.iter().any(|p| p.job == *victim) {
                return Some(format!("victim {victim} preempted job {job}: no cascades"));
            }
        }
        None
    }

    /// Applies `Command::Preempt`; a choice no longer valid changes nothing
    /// (`stop` empty).
    pub(super) fn preempt(
        &mut self,
        at_ms: u64,
        job: JobId,
        node: String,
        victims: Vec<JobId>,
        reason: String,
        until_ms: u64,
    ) -> Result<Outcome, super::ApplyError> {
        if let Some(refusal) = self.preemption_refusal(at_ms, job, &node, &victims) {
            tracing::info!(job_id = job, node = %node, %refusal, "preemption no longer valid; nothing stopped");
            return Ok(Outcome::Preempted {
                node,
                stop: Vec::new(),
            });
        }
        let priority = self.jobs.get(&job).map_or(0, |j| j.spec.priority);
        let why = format!("preempted by job {job} (priority {priority})");
        let mut stop = Vec::with_capacity(victims.len());
        for victim in &victims {
            let Some(record) = self.jobs.get_mut(victim) else {
                continue;
            };
            let Some(attempt) = record.current_attempt_mut() else {
                continue;
            };
            attempt.preempted = why.clone();
            let number = attempt.attempt;
            record.preempted_by.push(PreemptedBy { job, at_ms });
            trim(record);
            let grace = record.spec.preemption_grace_ms();
            stop.push((*victim, number));
            self.changes.jobs.insert(*victim);
            self.event(
                at_ms,
                *victim,
                format!(
                    "{why} on node {node}: stopping attempt {number} (SIGTERM, SIGKILL after {}s)",
                    grace.div_ceil(1000)
                ),
            );
        }
        let list: Vec<String> = victims.iter().map(|v| v.to_string()).collect();
        if let Some(record) = self.jobs.get_mut(&job) {
            record.preempting = Some(PreemptionHold {
                node: node.clone(),
                victims,
                at_ms,
                until_ms,
            });
        }
        self.changes.jobs.insert(job);
        self.event(
            at_ms,
            job,
            format!(
                "preempting job(s) {} on node {node} ({reason}); capacity held for it",
                list.join(", ")
            ),
        );
        Ok(Outcome::Preempted { node, stop })
    }
}

impl StateMachine {
    /// The nodes held for a preemptor at `at_ms`: node -> the waiting job
    /// that preempted there (pending, not cancelled, hold not expired). A
    /// hold ends when its job is placed (it is no longer pending) or at
    /// its `until_ms`.
    pub(super) fn holds_at(&self, at_ms: u64) -> HashMap<String, JobId> {
        self.pending
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.state == JobState::Pending && !j.cancel_requested)
            .filter_map(|j| {
                let hold = j.preempting.as_ref()?;
                (hold.until_ms > at_ms).then(|| (hold.node.clone(), j.id))
            })
            .collect()
    }
}

/// Why `placement` may not take capacity held for a preemptor, if it may
/// not: apply honours the hold whatever the plan, so no third job slips
/// into the capacity a preemption freed (the scheduler also keeps a held
/// node for its preemptor, but a plan made before the hold applied would
/// not know).
pub(super) fn hold_refusal(
    holds: &HashMap<String, JobId>,
    placement: &Placement,
) -> Option<String> {
    let holder = *holds.get(&placement.node)?;
    (holder != placement.job).then(|| {
        format!(
            "node {} is held for job {holder}, which preempted there",
            placement.node
        )
    })
}

/// Keeps the newest [`MAX_PREEMPTIONS_KEPT`] preemptions of a job.
fn trim(record: &mut JobRecord) {
    let excess = record
        .preempted_by
        .len()
        .saturating_sub(MAX_PREEMPTIONS_KEPT);
    record.preempted_by.drain(..excess);
}
