//! The apply-time re-check of a plan: every placement against hard state
//! (reservations, exclusivity, locks, host resources), so no plan can
//! overcommit a GPU whatever the scheduler decided.

use std::collections::BTreeSet;

use gantry_scheduler::{LockMode, Placement};

use super::preempt::hold_refusal;
use super::{Outcome, StateMachine};
use crate::domain::{AttemptRecord, JobState};

impl StateMachine {
    /// Re-checks a placement against hard state: the job is pending, the node
    /// exists and is usable, every GPU exists, is healthy, fits and respects
    /// exclusivity, and the locks are free.
    pub(super) fn check_placement(&self, placement: &Placement) -> Result<(), String> {
        let job = self
            .jobs
            .get(&placement.job)
            .ok_or_else(|| format!("job {} not found", placement.job))?;
        if job.state != JobState::Pending || job.cancel_requested {
            return Err(format!("job {} is {}, not pending", job.id, job.state));
        }
        let node = self
            .nodes
            .get(&placement.node)
            .ok_or_else(|| format!("node {} not registered", placement.node))?;
        if node.down || node.draining {
            return Err(format!("node {} is down or draining", node.name));
        }
        if placement.gpus.len() != job.spec.resources.gpus as usize {
            return Err(format!(
                "job {} wants {} GPUs, plan gives {}",
                job.id,
                job.spec.resources.gpus,
                placement.gpus.len()
            ));
        }
        let distinct: BTreeSet<u32> = placement.gpus.iter().copied().collect();
        if distinct.len() != placement.gpus.len() {
            return Err(format!("job {} given the same GPU twice", job.id));
        }
        if let Some(asked) = job.spec.resources.gpu_memory
            && placement.gpu_memory < asked
        {
            return Err(format!("job {} reserves less than it asked", job.id));
        }
        for index in &placement.gpus {
            let gpu = node
                .gpus
                .iter()
                .find(|g| g.index == *index)
                .ok_or_else(|| format!("node {} has no GPU {index}", node.name))?;
            if let Some(fault) = node.gpu_fault(*index) {
                return Err(format!("GPU {}/{index} is unhealthy ({fault})", node.name));
            }
            let usage = self.gpu_usage(&node.name, *index);
            if usage.reserved + placement.gpu_memory > gpu.total {
                return Err(format!(
                    "GPU {}/{index} would be overcommitted ({} + {} > {})",
                    node.name, usage.reserved, placement.gpu_memory, gpu.total
                ));
            }
            if usage.exclusive || (placement.exclusive_gpu && usage.jobs > 0) {
                return Err(format!(
                    "GPU {}/{index} is not free for this job",
                    node.name
                ));
            }
        }
        for lock in &job.spec.locks {
            if let Some(holders) = self.locks.get(&lock.name) {
                let busy = match lock.mode {
                    LockMode::Shared => holders.exclusive.is_some(),
                    LockMode::Exclusive => {
                        holders.exclusive.is_some() || !holders.shared.is_empty()
                    }
                };
                if busy {
                    return Err(format!("lock {} is held", lock.name));
                }
            }
        }
        Ok(())
    }

    pub(super) fn assign(&mut self, at_ms: u64, placements: Vec<Placement>) -> Outcome {
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        let holds = self.holds_at(at_ms);
        for placement in placements {
            if let Err(reason) = self.check_placement(&placement) {
                refused.push((placement.job, reason));
                continue;
            }
            if let Some(reason) = hold_refusal(&holds, &placement) {
                refused.push((placement.job, reason));
                continue;
            }
            let Some(job) = self.jobs.get_mut(&placement.job) else {
                continue;
            };
            let attempt = job.attempts.len() as u32 + 1;
            job.attempts.push(AttemptRecord {
                attempt,
                node: placement.node.clone(),
                gpus: placement.gpus.clone(),
                gpu_memory: placement.gpu_memory,
                batch_size: placement.batch_size.unwrap_or(0),
                exclusive_gpu: placement.exclusive_gpu,
                assigned_at_ms: at_ms,
                started_at_ms: 0,
                ended_at_ms: 0,
                exit_code: None,
                signal: None,
                error: String::new(),
                outcome: None,
                output_tail: String::new(),
                oom: false,
                forgiven: false,
                peak_gpu_memory: 0,
                preempted: String::new(),
            });
            self.transition(at_ms, placement.job, JobState::Assigned, String::new());
            applied.push((placement.job, attempt));
        }
        Outcome::Assigned { applied, refused }
    }

    /// Whether `attempt`'s reservation fits its GPUs once `replacing`'s (if
    /// on the same GPUs) is released.
    pub(super) fn reservation_fits(
        &self,
        attempt: &AttemptRecord,
        replacing: Option<&AttemptRecord>,
    ) -> bool {
        let Some(node) = self.nodes.get(&attempt.node) else {
            return false;
        };
        attempt.gpus.iter().all(|index| {
            let Some(gpu) = node.gpus.iter().find(|g| g.index == *index) else {
                return false;
            };
            let mut usage = self.gpu_usage(&attempt.node, *index);
            if let Some(r) = replacing.filter(|r| r.node == attempt.node && r.gpus.contains(index))
            {
                usage.reserved -= r.gpu_memory;
                usage.jobs -= 1;
                if r.exclusive_gpu {
                    usage.exclusive = false;
                }
            }
            usage.reserved + attempt.gpu_memory <= gpu.total
                && !usage.exclusive
                && !(attempt.exclusive_gpu && usage.jobs > 0)
        })
    }
}
