//! Scheduling passes: the pending queue and a `ClusterSnapshot` built from
//! hard and soft state go to the pure `scheduler` crate; its plan is
//! proposed as one `Command::Assign`.

use std::collections::HashMap;

use gantry_scheduler::{ClusterSnapshot, GpuView, JobRequest, NodeView};

use super::Core;
use crate::command::Command;
use crate::domain::JobState;

impl Core {
    /// One scheduling pass: snapshot -> plan -> commit -> dispatch.
    pub(super) fn schedule(&mut self, now: u64) {
        let started = std::time::Instant::now();
        self.plan_and_propose(now);
        self.metrics
            .scheduling_pass_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    pub(super) fn plan_and_propose(&mut self, now: u64) {
        self.dirty = false;
        self.last_pass_ms = now;
        let mut reasons = HashMap::new();
        let mut queue = Vec::new();
        for job in self.state.pending() {
            if job.not_before_ms > now {
                reasons.insert(
                    job.id,
                    format!(
                        "retry back-off: next attempt in {}s",
                        (job.not_before_ms - now).div_ceil(1000)
                    ),
                );
                continue;
            }
            if let Some(dep) = job.depends_on.iter().find(|d| {
                self.state
                    .job(**d)
                    .is_none_or(|j| j.state != JobState::Succeeded)
            }) {
                let name = self
                    .state
                    .job(*dep)
                    .map(|j| j.spec.name.clone())
                    .unwrap_or_default();
                reasons.insert(job.id, format!("waiting for job {dep} ({name}) to succeed"));
                continue;
            }
            queue.push(JobRequest {
                id: job.id,
                kind: job.spec.kind,
                priority: job.spec.priority,
                submitted_at_ms: job.submitted_at_ms,
                queue: job.spec.queue.clone(),
                resources: learned_resources(job, self.state.estimate(&job.class())),
                exclusive_gpu: job.spec.exclusive_gpu(),
                batch: capped_batch(job),
                locks: job.spec.locks.clone(),
                constraints: job.spec.constraints.clone(),
            });
        }
        if queue.is_empty() {
            self.hold_reasons = reasons;
            return;
        }
        let snapshot = self.snapshot(now);
        let plan = gantry_scheduler::plan(&snapshot, &queue);
        for unplaced in plan.unplaced {
            reasons.insert(unplaced.job, unplaced.reason.to_string());
        }
        // Jobs being placed keep no stale reason; the plan applies shortly.
        for placement in &plan.placements {
            reasons.remove(&placement.job);
        }
        if !plan.placements.is_empty() {
            self.plan_in_flight = Some(now);
            self.propose(Command::Assign {
                at_ms: now,
                placements: plan.placements,
                term: self.term,
            });
        }
        self.hold_reasons = reasons;
    }

    pub(super) fn snapshot(&self, now: u64) -> ClusterSnapshot {
        let nodes = self
            .state
            .nodes()
            .map(|node| {
                let health = self.health.get(&node.name);
                let state = self.node_state(node);
                // What Gantry's own jobs use on each GPU, from the agent's per-job figures.
                let mut gantry_used: HashMap<u32, u64> = HashMap::new();
                if let Some(h) = health {
                    for job in self.state.jobs_on(&node.name) {
                        if let (Some(used), Some(attempt)) =
                            (h.job_gpu_memory.get(&job.id), job.current_attempt())
                            && !attempt.gpus.is_empty()
                        {
                            for gpu in &attempt.gpus {
                                *gantry_used.entry(*gpu).or_default() +=
                                    used / attempt.gpus.len() as u64;
                            }
                        }
                    }
                }
                let host = self.state.host_usage(&node.name);
                NodeView {
                    name: node.name.clone(),
                    state,
                    draining: node.draining,
                    heard_from: health.is_some(),
                    labels: node.labels.clone(),
                    gpus: node
                        .gpus
                        .iter()
                        .map(|g| {
                            let usage = self.state.gpu_usage(&node.name, g.index);
                            GpuView {
                                index: g.index,
                                model: g.model.clone(),
                                total: g.total,
                                nvml_used: health
                                    .and_then(|h| h.gpus.get(&g.index))
                                    .map_or(0, |t| t.used),
                                gantry_used: gantry_used.get(&g.index).copied().unwrap_or(0),
                                reserved: usage.reserved,
                                exclusive: usage.exclusive,
                                jobs: usage.jobs,
                            }
                        })
                        .collect(),
                    cpu_millis_total: node.cpu_millis,
                    cpu_millis_reserved: host.cpu_millis,
                    memory_total: node.memory_total,
                    memory_reserved: host.memory,
                    disk_total: self.disk_total(node),
                    disk_used: health.map_or(0, |h| h.disk_used),
                    disk_reserved: host.disk,
                    disk_pressure: health.is_some_and(|h| h.disk_pressure),
                    rtt_ms: health.map_or(0.0, |h| h.rtt_ms),
                    provider: node.labels.get("provider").cloned().unwrap_or_default(),
                    recent_failures: health.map_or(0, |h| h.failures.recent_failures()),
                    quarantined_until_ms: health.map_or(0, |h| h.failures.quarantined_until_ms),
                }
            })
            .collect();
        ClusterSnapshot {
            now_ms: now,
            nodes,
            locks: self.state.locks().clone(),
            policy: self.policy(),
        }
    }
}

/// The job's resources with its class's learned GPU-memory estimate applied:
/// a class that ran out of memory (or was seen using more) reserves more.
fn learned_resources(
    job: &crate::domain::JobRecord,
    estimate: Option<u64>,
) -> gantry_scheduler::Resources {
    let mut resources = job.spec.resources.clone();
    if let (Some(estimate), true) = (estimate, resources.gpus > 0) {
        // Only an explicit reservation is raised: a tier-sized one is chosen per GPU.
        if let Some(asked) = resources.gpu_memory {
            resources.gpu_memory = Some(asked.max(estimate));
        }
    }
    resources
}

/// The job's batch policy limited to its out-of-memory cap: tiers above the
/// cap become the cap, a memory model's `max` drops to it.
fn capped_batch(job: &crate::domain::JobRecord) -> Option<gantry_scheduler::BatchPolicy> {
    let mut batch = job.spec.batch.clone()?;
    let Some(cap) = job.batch_cap else {
        return Some(batch);
    };
    for tier in &mut batch.tiers {
        tier.size = tier.size.min(cap);
    }
    if let Some(model) = &mut batch.model {
        model.max = model.max.min(cap).max(model.min);
    }
    Some(batch)
}
