//! What the leader sends once a command has applied: assignments of an
//! applied plan, and every cancel path (a user's cancel, a stale or late
//! attempt, a drain deadline, a revived attempt's withdrawn replacement),
//! and what a user's cancel may be acknowledged as ([`cancel_progress`]).

use super::{Decisions, Soft, ToAgent, Tunables, assignment, cancel};
use crate::command::Command;
use crate::domain::{AttemptOutcome, JobRecord, JobState};
use crate::state::{Outcome, StateMachine};

/// How far a user's cancel has got: all that its acknowledgement may
/// promise (README, "Job lifecycle").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelProgress {
    /// Nothing of the job runs or can start any more: it ended (normally
    /// `Cancelled`; a job that ended otherwise before the cancel took
    /// effect keeps that state), and whatever attempt an agent was given
    /// was reported ended by that agent, or never reached it.
    Settled(JobState),
    /// The cancel is recorded (the coordinator never sends or places the
    /// job again), but this attempt may still start or run: its
    /// assignment may be on the wire, or its agent has not reported it
    /// ended (it is stopping it, or it is unreachable and the attempt was
    /// declared lost).
    Cancelling {
        /// The attempt's node.
        node: String,
        /// The attempt.
        attempt: u32,
    },
}

/// Where a cancel of `job` stands. An attempt is confirmed ended only by
/// its agent's report: an attempt declared lost (its node went Down), or a
/// replacement withdrawn after its assignment was sent, may still run.
pub fn cancel_progress(job: &JobRecord) -> CancelProgress {
    let current = job.current_attempt();
    let unconfirmed = match current {
        Some(a) if a.ended_at_ms == 0 || a.outcome == Some(AttemptOutcome::Lost) => Some(a),
        // Withdrawn replacements come after the attempt they replaced.
        Some(a) => job.attempts.iter().find(|w| w.attempt > a.attempt),
        None => None,
    };
    match unconfirmed {
        Some(a) => CancelProgress::Cancelling {
            node: a.node.clone(),
            attempt: a.attempt,
        },
        None if job.state.is_terminal() => CancelProgress::Settled(job.state),
        // Active without an attempt: not reached by a recorded cancel
        // (`request_cancel` ends such a job at once), kept honest anyway.
        None => CancelProgress::Cancelling {
            node: String::new(),
            attempt: 0,
        },
    }
}

/// Soft state every replica keeps in step with applied commands: a report
/// of an attempt confirms it (it is no longer waiting to be declared lost).
pub fn confirmed(soft: &mut Soft, command: &Command) {
    if let Command::JobStarted { job, attempt, .. } | Command::JobExited { job, attempt, .. } =
        command
    {
        soft.unconfirmed.remove(&(*job, *attempt));
    }
}

/// The leader's messages after `command` applied with `outcome`.
pub fn applied(
    state: &StateMachine,
    soft: &mut Soft,
    tunables: &Tunables,
    command: &Command,
    outcome: &Outcome,
) -> Decisions {
    let mut out = Decisions::default();
    match (command, outcome) {
        (Command::Assign { .. }, Outcome::Assigned { applied, .. }) => {
            for (job, _) in applied {
                if let Some((node, message)) = assignment(state, *job) {
                    out.to(&node, message);
                }
            }
        }
        (
            Command::JobStarted {
                job, attempt, node, ..
            },
            Outcome::Stale,
        ) => {
            tracing::info!(node = %node, job_id = job, attempt, "stale attempt started; telling the agent to stop it");
            out.to(node, cancel(tunables, *job, *attempt, ""));
        }
        (
            Command::RequestCancel { job, .. },
            Outcome::CancelRequested {
                stop: Some((node, attempt)),
                ..
            },
        ) => {
            out.to(node, cancel(tunables, *job, *attempt, ""));
        }
        (Command::PreemptDrained { .. }, Outcome::Preempted { node, stop }) => {
            soft.preempting.remove(node);
            for (job, attempt) in stop {
                let reason = format!("preempted: node {node} drained");
                tracing::info!(job_id = job, attempt, %reason, "drain deadline passed; telling the agent to stop the attempt");
                out.to(node, cancel(tunables, *job, *attempt, &reason));
            }
        }
        (
            Command::ReviveAttempt {
                job, attempt, node, ..
            },
            Outcome::Revived { withdrawn },
        ) => {
            tracing::info!(node = %node, job_id = job, attempt, "lost attempt came back; kept");
            if let Some((other, number)) = withdrawn {
                out.to(other, cancel(tunables, *job, *number, ""));
            }
        }
        (
            Command::ReviveAttempt {
                job, attempt, node, ..
            },
            Outcome::Stale,
        ) => {
            tracing::info!(node = %node, job_id = job, attempt, "lost attempt came back too late; stopping it");
            out.to(node, cancel(tunables, *job, *attempt, ""));
        }
        // Whatever it changed (a duplicate or a stale end changes
        // nothing), the end is in the log: the agent may stop re-sending it.
        (
            Command::JobExited {
                job, attempt, node, ..
            },
            _,
        ) => {
            out.to(
                node,
                ToAgent::EndRecorded {
                    job: *job,
                    attempt: *attempt,
                },
            );
        }
        _ => {}
    }
    out
}
