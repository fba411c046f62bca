//! Attempts: started, exited (retries with back-off, out-of-memory
//! halving, learned estimates, the dead-letter queue), lost and revived.

use gantry_scheduler::JobId;

use super::{ApplyError, ExitReport, Outcome, StateMachine};
use crate::domain::{AttemptOutcome, JobRecord, JobSpec, JobState};

/// How many times a job may be lost through no fault of its own before it
/// stays Lost (a guard against a job that kills every node it lands on).
const MAX_LOST_RETRIES: u32 = 10;

/// Back-off cap for retries.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;

impl StateMachine {
    /// Looks up the current attempt of a job for a report from `node`.
    /// Returns `None` when the report is stale (another attempt, another node,
    /// or the attempt already ended).
    pub(super) fn current(
        &self,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Option<&JobRecord>, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let current = record
            .current_attempt()
            .is_some_and(|a| a.attempt == attempt && a.node == node && a.ended_at_ms == 0);
        Ok((current && record.state.is_active()).then_some(record))
    }

    pub(super) fn started(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Outcome, ApplyError> {
        let Some(record) = self.current(job, attempt, node)? else {
            return Ok(Outcome::Stale);
        };
        if record.state == JobState::Running {
            return Ok(Outcome::Done);
        }
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(|job| job.current_attempt_mut())
        {
            a.started_at_ms = at_ms;
        }
        self.transition(at_ms, job, JobState::Running, String::new());
        Ok(Outcome::Done)
    }

    pub(super) fn exited(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
        report: ExitReport,
    ) -> Result<Outcome, ApplyError> {
        let Some(record) = self.current(job, attempt, node)? else {
            // Duplicate or stale exit: already recorded or superseded.
            return Ok(Outcome::Done);
        };
        let cancel_requested = record.cancel_requested;
        // A job its user cancelled ends Cancelled even if it exits 0 (a
        // training loop that checkpoints on SIGTERM and returns normally):
        // its dependants must not run, as with Slurm's CANCELLED. The exit
        // code is still recorded on the attempt.
        let succeeded = report.code == Some(0) && report.signal.is_none() && !cancel_requested;
        // A preempted attempt that did not succeed was stopped by us (or died
        // while being stopped): not the job's fault, whatever its status.
        let preempted_by = record
            .current_attempt()
            .map(|a| a.preempted.clone())
            .filter(|reason| !reason.is_empty() && !succeeded && !cancel_requested);
        let outcome = if succeeded {
            AttemptOutcome::Succeeded
        } else if preempted_by.is_some() {
            AttemptOutcome::Preempted
        } else if report.cancelled || cancel_requested {
            AttemptOutcome::Cancelled
        } else {
            AttemptOutcome::Failed
        };
        let failed = outcome == AttemptOutcome::Failed;
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(|job| job.current_attempt_mut())
        {
            a.ended_at_ms = at_ms;
            a.exit_code = report.code;
            a.signal = report.signal;
            a.error = report.error.clone();
            a.outcome = Some(outcome);
            a.oom = failed && report.oom;
            a.peak_gpu_memory = report.peak_gpu_memory;
            if failed {
                a.output_tail = report.output_tail.clone();
            }
        }
        self.learn(at_ms, job, report.oom && failed, report.peak_gpu_memory);
        if succeeded {
            self.transition(at_ms, job, JobState::Succeeded, String::new());
            self.continue_loop(at_ms, job);
            return Ok(Outcome::Done);
        }
        if let Some(reason) = preempted_by {
            // Placed again at once; `failures()` and the lost count skip
            // Preempted attempts, so no attempt is used up.
            if let Some(j) = self.jobs.get_mut(&job) {
                j.not_before_ms = 0;
            }
            self.transition(
                at_ms,
                job,
                JobState::Pending,
                format!("{reason}; attempt {attempt} stopped, placing it again"),
            );
            return Ok(Outcome::Done);
        }
        if report.cancelled || cancel_requested {
            self.transition(at_ms, job, JobState::Cancelled, "cancelled by user".into());
            self.block_dependants(at_ms, job);
            return Ok(Outcome::Done);
        }
        let detail = match (report.code, report.signal) {
            (Some(c), _) if report.oom => format!("GPU out of memory, exit code {c}"),
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => report.error.clone(),
        };
        let Some(record) = self.jobs.get(&job) else {
            return Ok(Outcome::Done);
        };
        // An out-of-memory death is retried with half the batch while the
        // batch can still shrink; it does not count against max_attempts,
        // since the batch was Gantry's choice.
        let halved = if report.oom {
            halve_batch(record)
        } else {
            None
        };
        let failures = record.failures();
        let max_attempts = record.spec.retry.max_attempts;
        let backoff_ms = record.spec.retry.backoff_ms;
        if let Some(cap) = halved {
            if let Some(j) = self.jobs.get_mut(&job) {
                j.batch_cap = Some(cap);
                j.not_before_ms = at_ms;
                if let Some(a) = j.current_attempt_mut() {
                    a.forgiven = true;
                }
            }
            self.transition(
                at_ms,
                job,
                JobState::Failed,
                format!("attempt {attempt} failed ({detail}); retrying with batch {cap}"),
            );
        } else if failures < max_attempts {
            let delay = retry_delay(backoff_ms, failures, job, attempt);
            if let Some(j) = self.jobs.get_mut(&job) {
                j.not_before_ms = at_ms + delay;
            }
            self.transition(
                at_ms,
                job,
                JobState::Failed,
                format!(
                    "attempt {attempt} failed ({detail}); retry {} of {} in {}",
                    failures,
                    max_attempts.saturating_sub(1),
                    gantry_scheduler::units::format_duration_ms(delay)
                ),
            );
        } else {
            self.dead_letter(at_ms, job, format!("attempt {attempt} failed ({detail}); {failures} of {max_attempts} attempts failed"), JobState::Failed);
        }
        Ok(Outcome::Done)
    }

    /// Moves a job that ran out of attempts (through `via`, the state that
    /// records how its last attempt ended) into the dead-letter queue.
    pub(super) fn dead_letter(&mut self, at_ms: u64, job: JobId, reason: String, via: JobState) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.terminal_reason = reason.clone();
        }
        self.transition(at_ms, job, via, reason.clone());
        self.transition(at_ms, job, JobState::DeadLettered, reason);
        self.block_dependants(at_ms, job);
    }

    pub(super) fn attempt_lost(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        reason: String,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let is_current = record
            .current_attempt()
            .is_some_and(|a| a.attempt == attempt && a.ended_at_ms == 0);
        if !is_current || !record.state.is_active() {
            return Ok(Outcome::Done);
        }
        let cancel_requested = record.cancel_requested;
        let lost_before = record
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Lost))
            .count() as u32;
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(|job| job.current_attempt_mut())
        {
            a.ended_at_ms = at_ms;
            a.error = format!("lost: {reason}");
            a.outcome = Some(AttemptOutcome::Lost);
        }
        if cancel_requested {
            self.transition(
                at_ms,
                job,
                JobState::Cancelled,
                format!("cancelled; {reason}"),
            );
            self.block_dependants(at_ms, job);
        } else if lost_before < MAX_LOST_RETRIES {
            // The node was at fault: retry at once, without counting against the job.
            self.transition(
                at_ms,
                job,
                JobState::Lost,
                format!("attempt {attempt} lost ({reason})"),
            );
            self.transition(at_ms, job, JobState::Pending, "placing it again".into());
        } else {
            self.dead_letter(
                at_ms,
                job,
                format!("lost {} times; last: {reason}", lost_before + 1),
                JobState::Lost,
            );
        }
        Ok(Outcome::Done)
    }

    pub(super) fn dlq_retry(
        &mut self,
        at_ms: u64,
        job: JobId,
        spec: Option<Box<JobSpec>>,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        if record.state != JobState::DeadLettered {
            return Err(ApplyError::NotDeadLettered {
                id: job,
                state: record.state,
            });
        }
        if let Some(spec) = &spec
            && spec.name != record.spec.name
        {
            return Err(ApplyError::SpecChange(format!(
                "name {:?} differs from the job's {:?}; dependants refer to it by name",
                spec.name, record.spec.name
            )));
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some(mut spec) = spec {
                // `after:` was resolved at submission; the edges stay as they are.
                spec.after = j.spec.after.clone();
                j.spec = *spec;
            }
            j.retry_base = j.attempts.len() as u32;
            j.not_before_ms = 0;
            j.batch_cap = None;
            j.terminal_reason.clear();
        }
        self.transition(
            at_ms,
            job,
            JobState::Pending,
            "retried from the dead-letter queue".into(),
        );
        self.unblock_dependants(at_ms, job);
        Ok(Outcome::Done)
    }

    /// Keeps a lost attempt whose node came back with it still running, if
    /// its replacement has not started and its reservation still fits.
    pub(super) fn revive(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let Some(original) = record.attempts.iter().find(|a| a.attempt == attempt) else {
            return Ok(Outcome::Stale);
        };
        let replacement = record.current_attempt().filter(|a| a.attempt != attempt);
        let revivable = original.outcome == Some(AttemptOutcome::Lost)
            && original.node == node
            && !self.drain_due(node, at_ms)
            && !record.cancel_requested
            // A gang member is never revived alone: its gang was stopped
            // and placed again as a whole.
            && record.gang.is_none()
            && match record.state {
                JobState::Pending => true,
                JobState::Assigned => replacement.is_some_and(|r| r.started_at_ms == 0),
                _ => false,
            };
        if !revivable || !self.reservation_fits(original, replacement) {
            return Ok(Outcome::Stale);
        }
        let withdrawn = replacement.map(|r| (r.node.clone(), r.attempt));
        // Release the replacement's hold before the original takes its own back.
        self.unindex_job(job);
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some((_, number)) = &withdrawn
                && let Some(r) = j.attempts.iter_mut().find(|a| a.attempt == *number)
            {
                r.outcome = Some(AttemptOutcome::Withdrawn);
                r.ended_at_ms = at_ms;
                r.error = format!("withdrawn: attempt {attempt} came back on {node}");
            }
            if let Some(o) = j.attempts.iter_mut().find(|a| a.attempt == attempt) {
                o.outcome = None;
                o.ended_at_ms = 0;
                o.error.clear();
            }
            // Withdrawn attempts must not be last with a live one before
            // them for `current_attempt` to find the original: it skips them.
            debug_assert!(j.current_attempt().is_some_and(|a| a.attempt == attempt));
        }
        self.index_job(job);
        self.transition(
            at_ms,
            job,
            JobState::Running,
            format!("attempt {attempt} came back on {node}; kept"),
        );
        Ok(Outcome::Revived { withdrawn })
    }
}

/// Exponential back-off with deterministic jitter (+-20%, from the job and
/// attempt, so every replica computes the same delay).
fn retry_delay(backoff_ms: u64, failures: u32, job: JobId, attempt: u32) -> u64 {
    let base = backoff_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_MS);
    let mut x = job.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(attempt).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    let percent = 80 + x % 41;
    base / 100 * percent
}

/// Half the batch of the job's last attempt, if it can still shrink
/// (not below the smallest tier or the model's `min`).
fn halve_batch(record: &JobRecord) -> Option<u32> {
    let last = record.current_attempt()?.batch_size;
    let batch = record.spec.batch.as_ref()?;
    let floor = match &batch.model {
        Some(model) => model.min.max(1),
        None => batch.tiers.iter().map(|t| t.size).min().unwrap_or(1),
    };
    let half = last / 2;
    (last > 0 && half >= floor).then_some(half)
}
