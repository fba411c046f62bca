//! An agent's registration reconciled against hard state: which reported
//! attempts are current, lost-but-back or unknown, and which attempts hard
//! state places on the node that the agent did not report.

use gantry_scheduler::JobId;

use super::{Decisions, Registration, Soft, ToAgent, Tunables, assignment, cancel};
use crate::command::Command;
use crate::domain::{AttemptOutcome, JobState};
use crate::state::StateMachine;

/// The command that records a registration in hard state. The rest of the
/// registration ([`registered`]) is decided once it has applied.
pub fn register_command(registration: &Registration, now: u64) -> Command {
    Command::RegisterNode {
        at_ms: now,
        name: registration.node.clone(),
        address: registration.address.clone(),
        labels: registration.labels.clone(),
        gpus: registration.gpus.clone(),
        cpu_millis: registration.cpu_millis,
        memory_total: registration.memory_total,
        disk_total: registration.disk_total,
    }
}

/// Reconciles a registered agent's attempts against hard state (its
/// `RegisterNode` has applied). The first message to the node is always
/// `Registered`; re-sent assignments and cancels follow it.
pub fn registered(
    state: &StateMachine,
    soft: &mut Soft,
    tunables: &Tunables,
    registration: &Registration,
    heartbeat_interval_ms: u64,
    now: u64,
) -> Decisions {
    let name = registration.node.as_str();
    let mut out = Decisions::default();
    let mut stop = Vec::new();
    let reported = registration.reported();
    for running in &registration.running {
        let job = state.job(running.job);
        let current = job.is_some_and(|j| {
            j.state.is_active()
                && j.current_attempt().is_some_and(|a| {
                    a.attempt == running.attempt && a.node == name && a.ended_at_ms == 0
                })
        });
        let lost_here = job.is_some_and(|j| {
            j.attempts.iter().any(|a| {
                a.attempt == running.attempt
                    && a.node == name
                    && a.outcome == Some(AttemptOutcome::Lost)
            })
        });
        if current {
            if job.is_some_and(|j| j.state == JobState::Assigned) {
                out.propose.push(Command::JobStarted {
                    at_ms: running.started_at_ms.max(now),
                    job: running.job,
                    attempt: running.attempt,
                    node: name.to_string(),
                });
            }
        } else if lost_here {
            // Lost is not dead: kept if its replacement has not started
            // (decided when the revive applies; stopped otherwise).
            out.propose.push(Command::ReviveAttempt {
                at_ms: now,
                job: running.job,
                attempt: running.attempt,
                node: name.to_string(),
            });
        } else {
            tracing::info!(node = %name, job_id = running.job, attempt = running.attempt, "stopping an attempt hard state does not know");
            stop.push(*running);
        }
    }
    let active: Vec<(JobId, u32, JobState, bool, String)> = state
        .jobs_on(name)
        .filter_map(|j| {
            j.current_attempt().map(|a| {
                (
                    j.id,
                    a.attempt,
                    j.state,
                    j.cancel_requested,
                    a.preempted.clone(),
                )
            })
        })
        .collect();
    // Sent after Registered, which must be the stream's first message.
    let mut outgoing = Vec::new();
    for (job, attempt, job_state, cancelled, preempted) in active {
        let is_reported = reported.contains(&(job, attempt));
        if !preempted.is_empty() {
            // Preempted by a drain deadline: stop it, never (re)start it.
            if is_reported {
                outgoing.push(cancel(tunables, job, attempt, &preempted));
            } else if job_state == JobState::Assigned {
                out.propose.push(Command::AttemptLost {
                    at_ms: now,
                    job,
                    attempt,
                    reason: format!("{preempted}; the agent never started it"),
                });
            }
            if is_reported || job_state == JobState::Assigned {
                continue;
            }
        }
        match job_state {
            JobState::Assigned if !is_reported && cancelled => {
                // Cancelled before its agent got it: never sent again (a
                // cancelled job starts nothing); the attempt ends here.
                out.propose.push(Command::AttemptLost {
                    at_ms: now,
                    job,
                    attempt,
                    reason: "cancelled before its agent started it".into(),
                });
                continue;
            }
            JobState::Assigned if !is_reported => {
                // The same attempt number, to the same node: an agent that
                // has it answers with its status instead of starting it.
                outgoing.extend(assignment(state, job).map(|(_, message)| message));
            }
            JobState::Running if !is_reported => {
                // The grace runs from the first registration that did not
                // report it: a flapping agent cannot restart it.
                soft.unconfirmed
                    .entry((job, attempt))
                    .or_insert(now + tunables.unconfirmed_grace_ms);
            }
            _ if is_reported => {
                soft.unconfirmed.remove(&(job, attempt));
            }
            _ => {}
        }
        if cancelled && is_reported {
            outgoing.push(cancel(tunables, job, attempt, ""));
        }
    }
    out.to(
        name,
        ToAgent::Registered {
            heartbeat_interval_ms,
            stop,
        },
    );
    for message in outgoing {
        out.to(name, message);
    }
    out
}
