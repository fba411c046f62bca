//! Drain deadlines and their preemptions, and cancel requests.

use gantry_scheduler::JobId;

use super::{ApplyError, Outcome, StateMachine};
use crate::domain::JobState;

impl StateMachine {
    /// Whether `node` is draining and its drain deadline has passed at `at_ms`.
    pub fn drain_due(&self, node: &str, at_ms: u64) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.draining && n.drain_deadline_ms.is_some_and(|d| d <= at_ms))
    }

    /// Active attempts on `node` that a passed drain deadline would preempt
    /// and that are not marked yet (nor being cancelled by a user).
    pub fn preemptible_on(&self, node: &str) -> Vec<(JobId, u32)> {
        self.jobs_on(node)
            .filter(|j| !j.cancel_requested)
            .filter_map(|j| {
                j.current_attempt()
                    .filter(|a| a.node == node && a.ended_at_ms == 0 && a.preempted.is_empty())
                    .map(|a| (j.id, a.attempt))
            })
            .collect()
    }

    /// Marks the attempts still on a drained node past its deadline as
    /// preempted. They keep their reservations and locks until their agent
    /// reports them ended (so a replacement never overlaps them); then the
    /// job goes back to Pending without using up an attempt.
    pub(super) fn preempt_drained(
        &mut self,
        at_ms: u64,
        node: String,
    ) -> Result<Outcome, ApplyError> {
        if !self.nodes.contains_key(&node) {
            return Err(ApplyError::NodeNotFound(node));
        }
        if !self.drain_due(&node, at_ms) {
            // Undrained, or the deadline moved, since the leader looked.
            return Ok(Outcome::Preempted {
                node,
                stop: Vec::new(),
            });
        }
        let stop = self.preemptible_on(&node);
        let reason = format!("preempted: node {node} drained");
        self.mark_preempted(at_ms, &stop, &reason, "(drain deadline passed)");
        Ok(Outcome::Preempted { node, stop })
    }

    /// Marks the attempts of `stop` preempted for `reason` (they keep their
    /// reservations until their agent reports them ended, then go back to
    /// Pending without using an attempt), each with an event `reason:
    /// stopping attempt N detail`.
    pub(super) fn mark_preempted(
        &mut self,
        at_ms: u64,
        stop: &[(JobId, u32)],
        reason: &str,
        detail: &str,
    ) {
        for (job, attempt) in stop {
            if let Some(a) = self
                .jobs
                .get_mut(job)
                .and_then(|job| job.current_attempt_mut())
            {
                a.preempted = reason.to_string();
            }
            self.changes.jobs.insert(*job);
            self.event(
                at_ms,
                *job,
                format!("{reason}: stopping attempt {attempt} {detail}"),
            );
        }
    }

    pub(super) fn request_cancel(&mut self, at_ms: u64, job: JobId) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        if record.state.is_terminal() {
            return Err(ApplyError::AlreadyTerminal {
                id: job,
                state: record.state,
            });
        }
        match record.state {
            // Nothing runs: cancelled at once. A job in retry back-off
            // (Failed) included, or it would be requeued and placed.
            JobState::Pending | JobState::Failed | JobState::Lost => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.cancel_requested = true;
                    j.terminal_reason = "cancelled by user".into();
                }
                self.transition(at_ms, job, JobState::Cancelled, "cancelled by user".into());
                self.block_dependants(at_ms, job);
                Ok(Outcome::CancelRequested {
                    state: JobState::Cancelled,
                    stop: None,
                })
            }
            state => {
                let stop = record
                    .current_attempt()
                    .map(|a| (a.node.clone(), a.attempt));
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.cancel_requested = true;
                    j.updated_at_ms = at_ms;
                }
                self.changes.jobs.insert(job);
                self.event(at_ms, job, "cancel requested".into());
                Ok(Outcome::CancelRequested { state, stop })
            }
        }
    }
}
