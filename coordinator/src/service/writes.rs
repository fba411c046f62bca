//! The client API's writes, shared by the gRPC service and the HTTP API:
//! one validation (in `convert`), one command each, the same errors.

use gantry_proto as pb;
use prost::Message;

use std::time::Duration;

use tokio::sync::broadcast;

use super::CoreHandle;
use crate::auth::{Caller, Role, may_change};
use crate::command::Command;
use crate::convert;
use crate::core::{Request, now_ms};
use crate::decide::effects::CancelProgress;
use crate::error::CoordinatorError;
use crate::state::Outcome;

/// How long a cancel waits for the job's agent to confirm the attempt
/// ended (the 5 s SIGTERM-to-SIGKILL grace and some) before answering
/// "cancelling".
const CANCEL_CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting cancel looks again without an event.
const CANCEL_RECHECK: Duration = Duration::from_millis(500);

impl CoreHandle {
    /// Validates a submission, proposes it and returns the job ids once
    /// committed (the ids it created before, for a submission key seen
    /// before). `owner` is the submitting token's name, recorded on every
    /// job (in the command, so every replica records the same one).
    pub async fn submit(
        &self,
        request: pb::SubmitRequest,
        owner: Option<String>,
    ) -> Result<Vec<u64>, CoordinatorError> {
        let received = std::time::Instant::now();
        let size = request.encoded_len();
        let convert::ValidSubmit {
            key,
            specs,
            pipeline,
            run_policy,
        } = convert::submit_request(request, size)?;
        let count = specs.len();
        self.require_leader()?;
        let command = match pipeline {
            Some(pipeline) if !run_policy.is_default() => Command::SubmitLoop {
                at_ms: now_ms(),
                key,
                jobs: specs,
                pipeline,
                owner,
                run_policy,
            },
            pipeline => Command::Submit {
                at_ms: now_ms(),
                key,
                jobs: specs,
                pipeline,
                owner,
            },
        };
        let job_ids = match self.propose(command).await? {
            Outcome::Submitted(ids) => ids,
            _ => Vec::new(),
        };
        self.metrics
            .submit_seconds
            .observe(received.elapsed().as_secs_f64());
        tracing::info!(
            jobs = count,
            first = job_ids.first().copied().unwrap_or(0),
            "submitted"
        );
        Ok(job_ids)
    }

    /// Cancels a job and waits (at most [`CANCEL_CONFIRM_WAIT`]) until the
    /// cancel is settled: nothing of the job runs or starts any more
    /// ([`crate::decide::effects::cancel_progress`]). An assignment may be
    /// on the wire when the cancel applies; acknowledging at once would let
    /// its attempt start after the acknowledgement.
    pub async fn cancel(
        &self,
        job: u64,
        caller: Option<&Caller>,
    ) -> Result<CancelProgress, CoordinatorError> {
        self.check_owner(caller, "cancel", job).await?;
        // Subscribed before proposing: the attempt's end cannot slip by.
        let mut events = self.events.subscribe();
        self.propose(Command::RequestCancel {
            at_ms: now_ms(),
            job,
        })
        .await?;
        let deadline = tokio::time::Instant::now() + CANCEL_CONFIRM_WAIT;
        loop {
            let progress = self
                .call(|reply| Request::CancelProgress { id: job, reply })
                .await?;
            let done = match &progress {
                CancelProgress::Settled(_) => true,
                // Ended with the attempt unconfirmed: nothing can settle it.
                CancelProgress::Cancelling { state, .. } => state.is_terminal(),
            };
            if done {
                return Ok(progress);
            }
            // The next event of this job, or a re-check: a lagged receiver
            // or an end without an event must not stall the wait.
            let next = async {
                loop {
                    match events.recv().await {
                        Ok(event) if event.job_id != job => {}
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            tokio::select! {
                () = next => {}
                () = tokio::time::sleep(CANCEL_RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => {
                    if let CancelProgress::Cancelling { node, attempt, .. } = &progress {
                        tracing::info!(job_id = job, %node, attempt, "cancel not confirmed by the agent in time");
                    }
                    return Ok(progress);
                }
            }
        }
    }

    /// Sends a dead-lettered job back to the queue, with a corrected spec
    /// when one is given (validated as a submit's job is).
    pub async fn dlq_retry(
        &self,
        job: u64,
        spec: Option<pb::JobSpec>,
        caller: Option<&Caller>,
    ) -> Result<(), CoordinatorError> {
        self.check_owner(caller, "retry", job).await?;
        let spec = match spec {
            Some(spec) => Some(Box::new(convert::job_spec(spec, "spec.")?)),
            None => None,
        };
        let command = Command::DlqRetry {
            at_ms: now_ms(),
            job,
            spec,
        };
        self.propose(command).await.map(|_| ())
    }

    /// Drops a dead-lettered job for good.
    pub async fn dlq_drop(
        &self,
        job: u64,
        caller: Option<&Caller>,
    ) -> Result<(), CoordinatorError> {
        self.check_owner(caller, "drop", job).await?;
        self.propose(Command::DlqDrop {
            at_ms: now_ms(),
            job,
        })
        .await
        .map(|_| ())
    }

    /// Ends a repeating pipeline's loop after its current run (admin or the
    /// pipeline's owner: the owner of its latest run's jobs). Returns the
    /// run that finishes last. A loop already stopped answers as the first
    /// stop did; one that does not repeat, or has finished, is refused.
    pub async fn stop_pipeline(
        &self,
        name: String,
        caller: Option<&Caller>,
    ) -> Result<u32, CoordinatorError> {
        if name.is_empty() || name.chars().count() > crate::limits::MAX_NAME_LEN {
            return Err(CoordinatorError::InvalidArgument {
                field: "name".into(),
                reason: format!(
                    "not a pipeline name (1 to {} characters)",
                    crate::limits::MAX_NAME_LEN
                ),
            });
        }
        self.require_leader()?;
        let view = self
            .call(|reply| Request::Pipeline {
                name: name.clone(),
                run: 0,
                reply,
            })
            .await?;
        match view.loop_status.as_str() {
            "" => {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "pipeline {name:?} does not repeat (no repeat: in its spec)"
                )));
            }
            "finished" | "ended" => {
                return Err(CoordinatorError::FailedPrecondition(format!(
                    "pipeline {name:?}'s loop has {} already (run {})",
                    view.loop_status, view.run
                )));
            }
            "stopped" => return Ok(view.run),
            _ => {}
        }
        if let Some(first) = view.jobs.first() {
            let owner = Some(first.owner.as_str()).filter(|o| !o.is_empty());
            may_change(caller, "stop the pipeline of", first.id, owner)?;
        }
        self.propose(Command::StopPipeline {
            at_ms: now_ms(),
            name,
        })
        .await?;
        Ok(view.run)
    }

    /// Refuses unless `caller` may `action` job `job` ([`may_change`]: a
    /// user changes only its own jobs; no caller means no tokens are
    /// configured). The owner never changes after the submit, so this check
    /// on the leader's state cannot go stale. gRPC and HTTP writes both
    /// come through here.
    async fn check_owner(
        &self,
        caller: Option<&Caller>,
        action: &str,
        job: u64,
    ) -> Result<(), CoordinatorError> {
        let Some(caller) = caller.filter(|c| c.role != Role::Admin) else {
            return Ok(());
        };
        self.require_leader()?;
        let record = self
            .call(|reply| Request::GetJob { id: job, reply })
            .await?;
        let owner = Some(record.owner.as_str()).filter(|o| !o.is_empty());
        may_change(Some(caller), action, job, owner)
    }

    /// Drains a node (`deadline_after_ms` > 0: its jobs are preempted that
    /// long from now) or returns it to service; an undrain also clears a
    /// circuit-breaker quarantine and the node's GPU faults.
    pub async fn set_drain(
        &self,
        node: String,
        drain: bool,
        deadline_after_ms: u64,
    ) -> Result<(), CoordinatorError> {
        if node.is_empty() {
            return Err(CoordinatorError::InvalidArgument {
                field: "node".into(),
                reason: "must not be empty".into(),
            });
        }
        // The leader turns the relative deadline into an absolute one here,
        // so the command (and every replica applying it) carries one time.
        let at_ms = now_ms();
        let deadline_ms =
            (drain && deadline_after_ms > 0).then(|| at_ms.saturating_add(deadline_after_ms));
        let command = Command::SetDrain {
            at_ms,
            node: node.clone(),
            draining: drain,
            deadline_ms,
        };
        self.propose(command).await?;
        if !drain {
            // An operator's undrain also vouches for the node against the
            // circuit breaker.
            self.propose(Command::ClearQuarantine {
                at_ms,
                node: node.clone(),
            })
            .await?;
            // And clears its GPU faults (the operator vouches for them).
            self.propose(crate::decide::gpu_health::clear(&node, None, at_ms))
                .await?;
        }
        Ok(())
    }

    /// Clears GPU `gpu` of `node`'s fault (`gantry gpu reset`): placements
    /// on it again; the same fault reported again is acknowledged.
    pub async fn reset_gpu(&self, node: String, gpu: u32) -> Result<(), CoordinatorError> {
        if node.is_empty() {
            return Err(CoordinatorError::InvalidArgument {
                field: "node".into(),
                reason: "must not be empty".into(),
            });
        }
        self.propose(crate::decide::gpu_health::clear(&node, Some(gpu), now_ms()))
            .await?;
        Ok(())
    }
}
