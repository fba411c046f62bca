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
        /// The job's state. A terminal one (the attempt was declared lost,
        /// or a replacement withdrawn) means no report can settle it.
        state: JobState,
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
            state: job.state,
        },
        None if job.state.is_terminal() => CancelProgress::Settled(job.state),
        // Active without an attempt: not reached by a recorded cancel
        // (`request_cancel` ends such a job at once), kept honest anyway.
        None => CancelProgress::Cancelling {
            node: String::new(),
            attempt: 0,
            state: job.state,
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
        (Command::SetGpuHealth { gpu, .. }, Outcome::Preempted { node, stop }) => {
            for (job, attempt) in stop {
                let reason = state
                    .job(*job)
                    .and_then(|r| r.current_attempt())
                    .map(|a| a.preempted.clone())
                    .unwrap_or_default();
                tracing::info!(job_id = job, attempt, gpu = ?gpu, %reason, "gpu unhealthy; telling the agent to stop the attempt");
                out.to(node, cancel(tunables, *job, *attempt, &reason));
            }
        }
        (Command::GangStop { gang, .. }, Outcome::GangStopped { stop }) => {
            soft.gang_stops.remove(gang);
            for (node, job, attempt) in stop {
                let reason = state
                    .job(*job)
                    .and_then(|j| j.current_attempt())
                    .map(|a| a.preempted.clone())
                    .unwrap_or_default();
                tracing::info!(job_id = job, attempt, gang, %reason, "gang broken; telling the agent to stop the member");
                out.to(node, cancel(tunables, *job, *attempt, &reason));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttemptRecord, JobSpec};

    fn attempt(number: u32, node: &str, outcome: Option<AttemptOutcome>) -> AttemptRecord {
        AttemptRecord {
            attempt: number,
            node: node.into(),
            gpus: vec![0],
            gpu_memory: 0,
            batch_size: 0,
            exclusive_gpu: false,
            assigned_at_ms: 1,
            started_at_ms: 0,
            ended_at_ms: if outcome.is_some() { 2 } else { 0 },
            exit_code: None,
            signal: None,
            error: String::new(),
            outcome,
            output_tail: String::new(),
            oom: false,
            forgiven: false,
            peak_gpu_memory: 0,
            preempted: String::new(),
        }
    }

    /// What a cancel may be acknowledged as, by the job's state and its
    /// attempts.
    #[test]
    fn a_cancel_is_settled_only_when_every_attempt_an_agent_got_is_reported() {
        use AttemptOutcome::*;
        let cancelling = |node: &str, attempt, state| CancelProgress::Cancelling {
            node: node.into(),
            attempt,
            state,
        };
        let cases: Vec<(JobState, Vec<AttemptRecord>, CancelProgress)> = vec![
            // Never placed: nothing to wait for.
            (
                JobState::Cancelled,
                vec![],
                CancelProgress::Settled(JobState::Cancelled),
            ),
            // Back-off after a reported failure.
            (
                JobState::Cancelled,
                vec![attempt(1, "a", Some(Failed))],
                CancelProgress::Settled(JobState::Cancelled),
            ),
            // Assigned or running: its agent has not reported.
            (
                JobState::Assigned,
                vec![attempt(1, "a", None)],
                cancelling("a", 1, JobState::Assigned),
            ),
            (
                JobState::Running,
                vec![attempt(1, "a", None)],
                cancelling("a", 1, JobState::Running),
            ),
            // Stopped and reported by the agent.
            (
                JobState::Cancelled,
                vec![attempt(1, "a", Some(Cancelled))],
                CancelProgress::Settled(JobState::Cancelled),
            ),
            // It succeeded before the cancel took effect.
            (
                JobState::Succeeded,
                vec![attempt(1, "a", Some(Succeeded))],
                CancelProgress::Settled(JobState::Succeeded),
            ),
            // Declared lost (node Down): it may still run there.
            (
                JobState::Cancelled,
                vec![attempt(1, "a", Some(Lost))],
                cancelling("a", 1, JobState::Cancelled),
            ),
            // A withdrawn replacement after the current attempt: its
            // assignment may have reached its node.
            (
                JobState::Cancelled,
                vec![
                    attempt(1, "a", Some(Cancelled)),
                    attempt(2, "b", Some(Withdrawn)),
                ],
                cancelling("b", 2, JobState::Cancelled),
            ),
        ];
        for (state, attempts, want) in cases {
            let mut job = JobRecord::for_test(1, JobSpec::for_test("j"));
            job.state = state;
            job.attempts = attempts;
            assert_eq!(cancel_progress(&job), want, "{state:?} {:?}", job.attempts);
        }
    }
}
