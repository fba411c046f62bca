//! Gangs after placement: a gang is one attempt of all its members. When
//! one member ends other than by succeeding (it failed, was lost with its
//! node, was preempted or cancelled), `Command::GangStop` stops the others,
//! and the gang is placed again as a whole once every member is Pending:
//! members that had succeeded run again, members that were stopped go
//! back to Pending without using an attempt (like a drain preemption), the
//! failed member through its own retry and back-off. A member that ends
//! for good (dead-lettered, blocked, cancelled) takes the gang with it:
//! the others are blocked by it (`gantry dlq retry` of it unblocks them)
//! or cancelled.
//!
//! What must happen is read from hard state alone ([`GangSettle::of`]),
//! so the leader's sweep proposes `GangStop` only when there is something
//! to do, and apply re-checks it at the command's time: a duplicate or a
//! late one changes nothing.

use gantry_scheduler::JobId;

use super::{Outcome, StateMachine};
use crate::domain::{GangMember, JobRecord, JobState};

/// What settling a gang does now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GangSettle {
    /// Why, for people: the member that broke the gang and how.
    pub reason: String,
    /// Running members to stop (their attempts are marked preempted).
    pub stop: Vec<JobId>,
    /// Members that succeeded in a broken attempt: they run again.
    pub reopen: Vec<JobId>,
    /// Members waiting to run again in a gang that ended for good: they
    /// end too (blocked by, or cancelled with, the member that ended).
    pub end: Vec<JobId>,
    /// The member that ended for good, and how.
    pub ended: Option<(JobId, JobState)>,
}

impl GangSettle {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty() && self.reopen.is_empty() && self.end.is_empty()
    }

    /// What settling the gang whose rank 0 is `first` does in `state`.
    pub fn of(state: &StateMachine, first: JobId) -> GangSettle {
        let Some(gang) = state.job(first).and_then(|j| j.gang.clone()) else {
            return GangSettle::default();
        };
        let members: Vec<&JobRecord> = gang.members().filter_map(|id| state.job(id)).collect();
        let waiting = |j: &&JobRecord| {
            matches!(
                j.state,
                JobState::Pending | JobState::Failed | JobState::Lost
            )
        };
        let ended = members.iter().find(|j| {
            matches!(
                j.state,
                JobState::Cancelled | JobState::Blocked | JobState::DeadLettered
            )
        });
        // The attempt the gang is on: the most attempts any member has.
        let latest = members.iter().map(|j| j.attempts.len()).max().unwrap_or(0);
        let broken_by = members
            .iter()
            .find(|j| {
                !(j.state.is_active() || j.state == JobState::Succeeded)
                    || j.attempts.len() != latest
            })
            .or(ended);
        let Some(cause) = broken_by else {
            return GangSettle::default();
        };
        let mut out = GangSettle {
            reason: format!(
                "gang {first}: member rank {} (job {}) is {}",
                cause.gang.as_ref().map_or(0, |g| g.rank),
                cause.id,
                cause.state
            ),
            ..GangSettle::default()
        };
        for j in &members {
            let unmarked = j
                .current_attempt()
                .is_some_and(|a| a.ended_at_ms == 0 && a.preempted.is_empty());
            if j.state.is_active() && unmarked && !j.cancel_requested {
                out.stop.push(j.id);
            }
        }
        let rerun = members.iter().any(waiting);
        match ended {
            Some(e) => {
                out.ended = Some((e.id, e.state));
                out.end = members
                    .iter()
                    .filter(|j| waiting(j))
                    .map(|j| j.id)
                    .collect();
            }
            None if rerun => {
                out.reopen = members
                    .iter()
                    .filter(|j| j.state == JobState::Succeeded)
                    .map(|j| j.id)
                    .collect();
            }
            None => {}
        }
        out
    }
}

impl StateMachine {
    /// Gangs with a member not finished (derived; the leader's sweep
    /// checks these).
    pub fn live_gangs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.live_gangs.keys().copied()
    }

    /// Counts a gang member in `live_gangs` (from `index_job`).
    pub(super) fn index_gang(&mut self, gang: Option<GangMember>, state: JobState) {
        if let Some(g) = gang.filter(|_| !state.is_terminal()) {
            *self.live_gangs.entry(g.first).or_default() += 1;
        }
    }

    /// Takes a gang member out of `live_gangs` (from `unindex_job`).
    pub(super) fn unindex_gang(&mut self, gang: Option<GangMember>, state: JobState) {
        if let Some(g) = gang.filter(|_| !state.is_terminal())
            && let Some(n) = self.live_gangs.get_mut(&g.first)
        {
            *n -= 1;
            if *n == 0 {
                self.live_gangs.remove(&g.first);
            }
        }
    }

    /// `Command::GangStop`: settles the gang as [`GangSettle::of`] says at
    /// `at_ms`; the outcome names the attempts its agents must stop.
    pub(super) fn gang_stop(&mut self, at_ms: u64, first: JobId) -> Outcome {
        let settle = GangSettle::of(self, first);
        let mut stop = Vec::new();
        for id in &settle.stop {
            if let Some(a) = self
                .jobs
                .get_mut(id)
                .and_then(|job| job.current_attempt_mut())
            {
                a.preempted = settle.reason.clone();
                stop.push((a.node.clone(), *id, a.attempt));
            }
            self.changes.jobs.insert(*id);
            self.event(
                at_ms,
                *id,
                format!("{}: stopping this member", settle.reason),
            );
        }
        for id in &settle.reopen {
            self.transition(
                at_ms,
                *id,
                JobState::Pending,
                format!("{}: running the gang again", settle.reason),
            );
        }
        if let Some((cause, how)) = settle.ended {
            for id in &settle.end {
                self.end_member(at_ms, *id, cause, how, &settle.reason);
            }
        }
        Outcome::GangStopped { stop }
    }

    /// Ends a waiting member of a gang whose member `cause` ended for good
    /// (`how`): cancelled with it, or blocked by it.
    fn end_member(&mut self, at_ms: u64, id: JobId, cause: JobId, how: JobState, reason: &str) {
        let Some(state) = self.jobs.get(&id).map(|j| j.state) else {
            return;
        };
        if how == JobState::Cancelled {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.cancel_requested = true;
                j.terminal_reason = reason.to_string();
            }
            self.transition(at_ms, id, JobState::Cancelled, reason.to_string());
        } else {
            if state != JobState::Pending {
                self.transition(at_ms, id, JobState::Pending, reason.to_string());
            }
            if let Some(j) = self.jobs.get_mut(&id) {
                j.terminal_reason = format!("blocked: {reason}");
                j.blocked_by = Some(cause);
            }
            self.transition(at_ms, id, JobState::Blocked, format!("blocked: {reason}"));
        }
        self.block_dependants(at_ms, id);
    }
}
