//! The client API's writes, shared by the gRPC service and the HTTP API:
//! one validation (in `convert`), one command each, the same errors.

use gantry_proto as pb;
use prost::Message;

use super::CoreHandle;
use crate::command::Command;
use crate::convert;
use crate::core::now_ms;
use crate::domain::JobState;
use crate::error::CoordinatorError;
use crate::state::Outcome;

impl CoreHandle {
    /// Validates a submission, proposes it and returns the job ids once
    /// committed (the ids it created before, for a submission key seen
    /// before).
    pub async fn submit(&self, request: pb::SubmitRequest) -> Result<Vec<u64>, CoordinatorError> {
        let received = std::time::Instant::now();
        let size = request.encoded_len();
        let convert::ValidSubmit {
            key,
            specs,
            pipeline,
        } = convert::submit_request(request, size)?;
        let count = specs.len();
        self.require_leader()?;
        let command = Command::Submit {
            at_ms: now_ms(),
            key,
            jobs: specs,
            pipeline,
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

    /// Asks for a job's cancellation; returns the job's state after it
    /// (Cancelled at once when nothing runs).
    pub async fn cancel(&self, job: u64) -> Result<JobState, CoordinatorError> {
        let outcome = self
            .propose(Command::RequestCancel {
                at_ms: now_ms(),
                job,
            })
            .await?;
        Ok(match outcome {
            Outcome::CancelRequested { state, .. } => state,
            _ => JobState::Cancelled,
        })
    }

    /// Sends a dead-lettered job back to the queue, with a corrected spec
    /// when one is given (validated as a submit's job is).
    pub async fn dlq_retry(
        &self,
        job: u64,
        spec: Option<pb::JobSpec>,
    ) -> Result<(), CoordinatorError> {
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
    pub async fn dlq_drop(&self, job: u64) -> Result<(), CoordinatorError> {
        self.propose(Command::DlqDrop {
            at_ms: now_ms(),
            job,
        })
        .await
        .map(|_| ())
    }

    /// Drains a node (`deadline_after_ms` > 0: its jobs are preempted that
    /// long from now) or returns it to service; an undrain also clears a
    /// circuit-breaker quarantine.
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
            self.propose(Command::ClearQuarantine { at_ms, node })
                .await?;
        }
        Ok(())
    }
}
