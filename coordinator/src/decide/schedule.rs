//! The input and output of a scheduling pass: which pending jobs are
//! offered to the pure `scheduler` crate (and why the others wait), the
//! `ClusterSnapshot` built from hard state and soft state, and the plan as
//! one `Command::Assign`.

use std::collections::{BTreeMap, HashMap};

use gantry_scheduler::{ClusterSnapshot, GpuView, JobId, JobRequest, NodeState, NodeView, Policy};

use super::Sessions;
use crate::breaker::Breaker;
use crate::command::Command;
use crate::domain::{JobState, NodeRecord};
use crate::health::HealthTracker;
use crate::state::StateMachine;

/// What one pass decided.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pass {
    /// The plan to propose (`None`: nothing placed).
    pub assign: Option<Command>,
    /// Why each job left waiting waits.
    pub reasons: HashMap<JobId, String>,
    /// Preemptions to propose (`Command::Preempt`), one per preemptor.
    pub preempt: Vec<Command>,
}

/// How long capacity stays held for a preemptor past its victims' grace
/// (their agents must report them ended; a stuck stop must not pin a node).
pub const HOLD_SLACK_MS: u64 = 60_000;

/// One scheduling pass at `now` by the leader of `term`.
pub fn pass(
    state: &StateMachine,
    tracker: &HealthTracker,
    sessions: &dyn Sessions,
    policy: &Policy,
    breaker: &Breaker,
    term: u64,
    now: u64,
) -> Pass {
    let (queue, mut reasons) = queue(state, now);
    if queue.is_empty() {
        return Pass {
            assign: None,
            reasons,
            preempt: Vec::new(),
        };
    }
    let mut snapshot = snapshot(state, tracker, sessions, policy, breaker, now);
    add_preemption_view(state, &queue, &mut snapshot, now);
    let plan = gantry_scheduler::plan(&snapshot, &queue);
    let preempt = plan
        .preemptions
        .iter()
        .map(|p| {
            let grace = p
                .victims
                .iter()
                .filter_map(|v| state.job(*v))
                .map(|v| v.spec.preemption_grace_ms())
                .max()
                .unwrap_or(0);
            Command::Preempt {
                at_ms: now,
                job: p.job,
                node: p.node.clone(),
                victims: p.victims.clone(),
                reason: p.reason.clone(),
                until_ms: now + grace + HOLD_SLACK_MS,
            }
        })
        .collect();
    for unplaced in plan.unplaced {
        reasons.insert(unplaced.job, unplaced.reason.to_string());
    }
    // Jobs being placed keep no stale reason; the plan applies shortly.
    for placement in &plan.placements {
        reasons.remove(&placement.job);
    }
    let assign = (!plan.placements.is_empty()).then_some(Command::Assign {
        at_ms: now,
        placements: plan.placements,
        term,
    });
    Pass {
        assign,
        reasons,
        preempt,
    }
}

/// What preemption reads: the running jobs a job of the queue could
/// preempt (only those below the queue's highest priority, so a pass with
/// nothing urgent builds nothing), and the nodes held for preemptors.
fn add_preemption_view(
    state: &StateMachine,
    queue: &[JobRequest],
    snapshot: &mut ClusterSnapshot,
    now: u64,
) {
    let mut held: HashMap<&str, JobId> = HashMap::new();
    for job in queue.iter().filter_map(|j| state.job(j.id)) {
        if let Some(hold) = job.preempting.as_ref().filter(|h| h.until_ms > now) {
            held.insert(hold.node.as_str(), job.id);
        }
    }
    for node in &mut snapshot.nodes {
        node.held_for = held.get(node.name.as_str()).copied();
    }
    let Some(top) = queue.iter().map(|j| j.priority).max() else {
        return;
    };
    for job in state.active() {
        // A gang member is never a victim: stopping one stops its gang.
        if job.spec.priority >= top
            || !job.spec.preemptible()
            || job.cancel_requested
            || job.gang.is_some()
        {
            continue;
        }
        let Some(attempt) = job
            .current_attempt()
            .filter(|a| a.ended_at_ms == 0 && a.preempted.is_empty())
        else {
            continue;
        };
        let r = &job.spec.resources;
        snapshot.running.push(gantry_scheduler::RunningJob {
            id: job.id,
            node: attempt.node.clone(),
            priority: job.spec.priority,
            preemptible: true,
            started_at_ms: attempt.assigned_at_ms,
            gpus: attempt.gpus.clone(),
            gpu_memory: attempt.gpu_memory,
            exclusive_gpu: attempt.exclusive_gpu,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            disk: r.disk,
            preempted_at_ms: job.preempted_by.iter().map(|p| p.at_ms).collect(),
        });
    }
}

/// The pending jobs a pass offers the scheduler, and why each other
/// pending job waits (back-off, dependencies). A job whose cancel was
/// requested is never offered: its placement could only be refused at
/// apply, pass after pass.
fn queue(state: &StateMachine, now: u64) -> (Vec<JobRequest>, HashMap<JobId, String>) {
    let mut reasons = HashMap::new();
    let mut queue = Vec::new();
    for job in state.pending() {
        if job.cancel_requested {
            continue;
        }
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
            state
                .job(**d)
                .is_none_or(|j| j.state != JobState::Succeeded)
        }) {
            let name = state
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
            resources: learned_resources(job, state.estimate(&job.class())),
            exclusive_gpu: job.spec.exclusive_gpu(),
            batch: capped_batch(job),
            locks: job.spec.locks.clone(),
            constraints: job.spec.constraints.clone(),
            preempted_by: job.preempted_by.iter().map(|p| p.job).collect(),
            held_node: job
                .preempting
                .as_ref()
                .filter(|h| h.until_ms > now)
                .map(|h| h.node.clone()),
            gang: job.gang.as_ref().map(|g| gantry_scheduler::GangRequest {
                id: g.first,
                rank: g.rank,
                size: g.size,
                same_label: job.spec.gang.as_ref().and_then(|s| s.same_label.clone()),
            }),
        });
    }
    (queue, reasons)
}

/// The cluster as the scheduler sees it.
pub fn snapshot(
    state: &StateMachine,
    tracker: &HealthTracker,
    sessions: &dyn Sessions,
    policy: &Policy,
    breaker: &Breaker,
    now: u64,
) -> ClusterSnapshot {
    let nodes = state
        .nodes()
        .map(|node| {
            let health = tracker.get(&node.name);
            let host = state.host_usage(&node.name);
            NodeView {
                name: node.name.clone(),
                state: node_state(node, tracker, sessions),
                draining: node.draining,
                heard_from: health.is_some(),
                labels: node.labels.clone(),
                gpus: gpu_views(state, tracker, node),
                cpu_millis_total: node.cpu_millis,
                cpu_millis_reserved: host.cpu_millis,
                memory_total: node.memory_total,
                memory_reserved: host.memory,
                disk_total: disk_total(node, tracker),
                disk_used: health.map_or(0, |h| h.disk_used),
                disk_reserved: host.disk,
                disk_pressure: health.is_some_and(|h| h.disk_pressure),
                rtt_ms: health.map_or(0.0, |h| h.rtt_ms),
                provider: node.labels.get("provider").cloned().unwrap_or_default(),
                recent_failures: breaker.recent_failures(&node.name, now),
                quarantined_until_ms: node.quarantine.as_ref().map_or(0, |q| q.until_ms),
                ..Default::default()
            }
        })
        .collect();
    ClusterSnapshot {
        now_ms: now,
        nodes,
        locks: state.locks().clone(),
        policy: policy.clone(),
        queue_usage: queue_usage(state),
        ..Default::default()
    }
}

/// GPUs each fair-share queue's active jobs hold (a CPU-only job counts
/// one, as in the scheduler's queue order): what the weights are weighed
/// against.
pub fn queue_usage(state: &StateMachine) -> BTreeMap<String, u64> {
    let mut usage: BTreeMap<String, u64> = BTreeMap::new();
    for job in state.active() {
        let gpus = job.current_attempt().map_or(0, |a| a.gpus.len() as u64);
        match usage.get_mut(&job.spec.queue) {
            Some(held) => *held += gpus.max(1),
            None => {
                usage.insert(job.spec.queue.clone(), gpus.max(1));
            }
        }
    }
    usage
}

/// A node's GPUs as the scheduler sees them: hard-state reservations, the
/// driver's figures and what Gantry's own jobs use of them (so
/// [`GpuView::effective_free`] is what placement and `/metrics` call free).
pub fn gpu_views(state: &StateMachine, tracker: &HealthTracker, node: &NodeRecord) -> Vec<GpuView> {
    let health = tracker.get(&node.name);
    // What Gantry's own jobs use on each GPU, from the agent's per-job figures.
    let mut gantry_used: HashMap<u32, u64> = HashMap::new();
    if let Some(h) = health {
        for job in state.jobs_on(&node.name) {
            if let (Some(used), Some(attempt)) =
                (h.job_gpu_memory.get(&job.id), job.current_attempt())
                && !attempt.gpus.is_empty()
            {
                for gpu in &attempt.gpus {
                    *gantry_used.entry(*gpu).or_default() += used / attempt.gpus.len() as u64;
                }
            }
        }
    }
    node.gpus
        .iter()
        .map(|g| {
            let usage = state.gpu_usage(&node.name, g.index);
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
                // A committed fault (hard state), not the agent's last word.
                unhealthy: node.gpu_fault(g.index).is_some(),
            }
        })
        .collect()
}

/// Effective free memory of every registered GPU by node and index: what
/// placement sees as free ([`GpuView::effective_free`]), for `/metrics`.
pub fn gpu_free(
    state: &StateMachine,
    tracker: &HealthTracker,
    headroom: u64,
) -> BTreeMap<String, BTreeMap<u32, u64>> {
    state
        .nodes()
        .map(|node| {
            let free = gpu_views(state, tracker, node)
                .into_iter()
                .map(|g| (g.index, g.effective_free(headroom)))
                .collect();
            (node.name.clone(), free)
        })
        .collect()
}

/// A registered node's state as placement and `gantry nodes` see it:
/// committed Down wins; otherwise the health tracker's view while its
/// agent is connected; a silent or disconnected node is never Ready.
pub fn node_state(
    node: &NodeRecord,
    tracker: &HealthTracker,
    sessions: &dyn Sessions,
) -> NodeState {
    match tracker.get(&node.name) {
        _ if node.down => NodeState::Down,
        Some(h) if sessions.connected(&node.name) => h.state,
        Some(h) if h.state == NodeState::Down => NodeState::Down,
        _ => NodeState::Suspect,
    }
}

/// A node's data-volume size: the agent's latest report, or what it
/// registered with.
pub fn disk_total(node: &NodeRecord, tracker: &HealthTracker) -> u64 {
    tracker
        .get(&node.name)
        .map_or(node.disk_total, |h| h.disk_total.max(node.disk_total))
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

#[cfg(test)]
mod tests {
    use gantry_scheduler::Placement;

    use super::*;
    use crate::domain::{GpuRecord, JobSpec};
    use crate::health::{GpuTelemetry, HealthConfig, Heartbeat};

    const GIB: u64 = 1 << 30;

    /// A 20 GiB GPU with a 14 GiB reservation.
    fn reserved_gpu() -> StateMachine {
        let mut state = StateMachine::new();
        let commands = [
            Command::RegisterNode {
                at_ms: 1,
                name: "n1".into(),
                address: String::new(),
                labels: Default::default(),
                gpus: vec![GpuRecord {
                    index: 0,
                    model: "A10".into(),
                    total: 20 * GIB,
                }],
                cpu_millis: 8_000,
                memory_total: 64 * GIB,
                disk_total: 1 << 40,
            },
            Command::Submit {
                at_ms: 2,
                key: None,
                jobs: vec![JobSpec::for_test("a")],
                pipeline: None,
                owner: None,
            },
            Command::Assign {
                at_ms: 3,
                placements: vec![Placement {
                    job: 1,
                    node: "n1".into(),
                    gpus: vec![0],
                    gpu_memory: 14 * GIB,
                    batch_size: None,
                    exclusive_gpu: false,
                }],
                term: 1,
            },
        ];
        for command in commands {
            state.apply(command).expect("applies");
        }
        state
    }

    /// Finding 10: `/metrics` free memory is what placement sees as free.
    #[test]
    fn gpu_free_is_placements_effective_free() {
        // (NVML used, of which the job uses, headroom) -> free
        let cases: &[(u64, u64, u64, u64)] = &[
            // 6 GiB foreign use: 20 - 14 - 6 = 0 (not 20 - max(6, 14) = 6).
            (6 * GIB, 0, 0, 0),
            // The job's own use is not counted twice: 20 - 14 - 2 = 4.
            (6 * GIB, 4 * GIB, 0, 4 * GIB),
            (6 * GIB, 4 * GIB, GIB, 3 * GIB),
            (0, 0, 0, 6 * GIB),
        ];
        let state = reserved_gpu();
        for &(used, job_used, headroom, want) in cases {
            let mut tracker = HealthTracker::new(HealthConfig::default());
            let beat = Heartbeat {
                gpus: vec![(
                    0,
                    GpuTelemetry {
                        used,
                        ..Default::default()
                    },
                )],
                jobs: vec![(1, job_used)],
                ..Default::default()
            };
            tracker.on_heartbeat("n1", &beat, 10);
            let free = gpu_free(&state, &tracker, headroom);
            assert_eq!(
                free.get("n1").and_then(|gpus| gpus.get(&0)),
                Some(&want),
                "used {used}, job uses {job_used}, headroom {headroom}"
            );
        }
    }
}
