//! GPU health, applied: `Command::SetGpuHealth` marks a GPU unhealthy (out
//! of placement: the pass reads it into `GpuView::unhealthy`) and marks the
//! attempts using it preempted as a node fault (they keep their
//! reservations until their agent reports them ended, then go back to
//! Pending without using an attempt, as on a drain deadline), or clears it.

use gantry_scheduler::JobId;

use super::{ApplyError, Outcome, StateMachine};
use crate::domain::GpuFault;

impl StateMachine {
    pub(super) fn set_gpu_health(
        &mut self,
        at_ms: u64,
        node: String,
        gpu: Option<u32>,
        fault: Option<String>,
        seen_healthy: bool,
    ) -> Result<Outcome, ApplyError> {
        let record = self
            .nodes
            .get(&node)
            .ok_or_else(|| ApplyError::NodeNotFound(node.clone()))?;
        if let Some(gpu) = gpu
            && !record.gpus.iter().any(|g| g.index == gpu)
        {
            return Err(ApplyError::GpuNotFound { node, gpu });
        }
        match (gpu, fault) {
            (Some(gpu), Some(reason)) => Ok(self.gpu_fault(at_ms, node, gpu, reason)),
            (gpu, None) => {
                self.clear_gpu_faults(at_ms, &node, gpu, seen_healthy);
                Ok(Outcome::Done)
            }
            (None, Some(_)) => Err(ApplyError::GpuNotFound {
                node,
                gpu: u32::MAX,
            }),
        }
    }

    fn gpu_fault(&mut self, at_ms: u64, node: String, gpu: u32, reason: String) -> Outcome {
        let nothing = |node| Outcome::Preempted {
            node,
            stop: Vec::new(),
        };
        if let Some(known) = self.nodes.get(&node).and_then(|n| n.gpu_faults.get(&gpu)) {
            match known.cleared_at_ms {
                // Already unhealthy: the first fault stands.
                None => return nothing(node),
                // Cleared after this report was taken, or this very fault
                // was acknowledged by the operator's clear.
                Some(cleared) if cleared > at_ms || known.reason == reason => {
                    return nothing(node);
                }
                Some(_) => {}
            }
        }
        if let Some(record) = self.nodes.get_mut(&node) {
            record.gpu_faults.insert(
                gpu,
                GpuFault {
                    reason: reason.clone(),
                    since_ms: at_ms,
                    cleared_at_ms: None,
                },
            );
        }
        self.changes.nodes.insert(node.clone());
        tracing::warn!(node = %node, gpu, %reason, "gpu unhealthy: out of placement");
        let why = format!("node fault: gpu {gpu} of node {node} unhealthy ({reason})");
        let stop: Vec<(JobId, u32)> = self
            .preemptible_on(&node)
            .into_iter()
            .filter(|(job, _)| {
                self.jobs
                    .get(job)
                    .and_then(|job| job.current_attempt())
                    .is_some_and(|a| a.gpus.contains(&gpu))
            })
            .collect();
        self.mark_preempted(
            at_ms,
            &stop,
            &why,
            "(a node fault: it does not count against the job)",
        );
        Outcome::Preempted { node, stop }
    }

    /// An operator's clear: the faults in force on `gpu` (every GPU:
    /// `None`) are cleared and kept as acknowledged. `seen_healthy`: the
    /// agent reports the GPU healthy, so an acknowledged fault is forgotten
    /// (the same fault reported later marks the GPU again); a fault in
    /// force is left alone, only an operator clears it.
    fn clear_gpu_faults(&mut self, at_ms: u64, node: &str, gpu: Option<u32>, seen_healthy: bool) {
        let Some(record) = self.nodes.get_mut(node) else {
            return;
        };
        let before = record.gpu_faults.clone();
        record.gpu_faults.retain(|index, fault| {
            if gpu.is_some_and(|g| g != *index) {
                return true;
            }
            match (fault.is_active(), seen_healthy) {
                (true, false) => {
                    fault.cleared_at_ms = Some(at_ms);
                    true
                }
                (false, true) => false,
                _ => true,
            }
        });
        if record.gpu_faults != before {
            tracing::info!(node = %node, gpu = ?gpu, "gpu fault cleared");
            self.changes.nodes.insert(node.to_string());
        }
    }
}
