//! What the leader sends once a command has applied: assignments of an
//! applied plan, and every cancel path (a user's cancel, a stale or late
//! attempt, a drain deadline, a revived attempt's withdrawn replacement).

use super::{Decisions, Soft, Tunables, assignment, cancel};
use crate::command::Command;
use crate::state::{Outcome, StateMachine};

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
        (Command::Preempt { job: by, .. }, Outcome::Preempted { node, stop }) => {
            for (job, attempt) in stop {
                let Some(record) = state.job(*job) else {
                    continue;
                };
                let reason = record
                    .current_attempt()
                    .map(|a| a.preempted.clone())
                    .unwrap_or_default();
                tracing::info!(job_id = job, attempt, preemptor = by, %reason, "preempted; telling the agent to stop the attempt");
                out.to(
                    node,
                    super::ToAgent::Cancel {
                        job: *job,
                        attempt: *attempt,
                        grace_ms: record.spec.preemption_grace_ms(),
                        reason,
                    },
                );
            }
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
        _ => {}
    }
    out
}
