//! The naive baseline: first fit over a full scan of every node for every
//! job, in node-name order. It applies the same hard filters as the real
//! pass (the shared checkers of [`crate::filter`]) but no index and no
//! scoring, so it is
//! - the benchmark baseline `gantry-bench sched` compares against, and
//! - a test oracle: for a single job, it and [`crate::plan`] must agree on
//!   whether the job fits at all.

use crate::batch::{choose_batch, min_free_needed};
use crate::disk::{DiskPressureChecker, FleetPressure};
use crate::filter::{
    GpuModelChecker, GpuShareChecker, HostFree, LabelChecker, LockChecker, NodeStateChecker,
    ResourceChecker,
};
use crate::model::{ClusterSnapshot, HoldReason, JobRequest, NodeView, Placement, Plan, Unplaced};
use crate::order::queue_order;

/// Per-pass state of one GPU: (effective free, Gantry jobs, exclusive).
type GpuState = (u64, u32, bool);

/// Runs a pass with first-fit full-scan placement. Same queue order, locks,
/// budget and disk rules as [`crate::plan`]; reasons are terse.
pub fn plan_first_fit(snapshot: &ClusterSnapshot, queue: &[JobRequest]) -> Plan {
    let policy = &snapshot.policy;
    let mut nodes: Vec<&NodeView> = snapshot
        .nodes
        .iter()
        .filter(|n| NodeStateChecker::admits(n, snapshot.now_ms).is_ok())
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut host: Vec<HostFree> = nodes.iter().map(|n| HostFree::of(n)).collect();
    let mut gpus: Vec<Vec<GpuState>> = nodes
        .iter()
        .map(|n| {
            let mut order: Vec<usize> = (0..n.gpus.len()).collect();
            order.sort_by_key(|&i| n.gpus[i].index);
            order
                .into_iter()
                .map(|i| {
                    let g = &n.gpus[i];
                    // An unhealthy GPU admits no job, like an exclusively held one.
                    let closed = g.exclusive || g.unhealthy;
                    (g.effective_free(policy.gpu_headroom), g.jobs, closed)
                })
                .collect()
        })
        .collect();
    let fleet = FleetPressure::measure(&snapshot.nodes);
    let fleet_pressured = fleet.is_pressured(policy.fleet_pressure_fraction);
    let pressure = DiskPressureChecker::new(policy);
    let mut locks = LockChecker::new(&snapshot.locks);

    let mut out = Plan::default();
    for i in queue_order(queue, policy, &snapshot.queue_usage, fleet_pressured) {
        let job = &queue[i];
        let reason = if out.placements.len() >= policy.max_placements_per_pass {
            HoldReason::PassBudget
        } else if snapshot.nodes.is_empty() {
            HoldReason::NoNodes
        } else if let Some(reason) = locks.conflict(job) {
            reason
        } else if fleet_pressured && job.kind.produces_data() && !job.kind.consumes_data() {
            HoldReason::FleetDiskBackpressure {
                pressured: fleet.pressured,
                nodes: fleet.nodes,
            }
        } else {
            match first_fit(&nodes, &mut host, &mut gpus, &pressure, job) {
                Some(placement) => {
                    locks.grant(job);
                    out.placements.push(placement);
                    continue;
                }
                None => HoldReason::NoFit("no node fits (naive first-fit)".to_string()),
            }
        };
        out.unplaced.push(Unplaced {
            job: job.id,
            reason,
        });
    }
    out
}

fn first_fit(
    nodes: &[&NodeView],
    host: &mut [HostFree],
    gpus: &mut [Vec<GpuState>],
    pressure: &DiskPressureChecker<'_>,
    job: &JobRequest,
) -> Option<Placement> {
    let explicit = job.resources.gpu_memory;
    let want = job.resources.gpus as usize;
    let need = match (&job.batch, want) {
        (Some(policy), 1..) => min_free_needed(policy, explicit)?,
        _ => explicit.unwrap_or(0),
    };
    for (n, node) in nodes.iter().enumerate() {
        if !ResourceChecker::fits(&host[n], job)
            || !LabelChecker::matches(node, &job.constraints.labels)
            || pressure.blocks(node, job.kind)
        {
            continue;
        }
        let Some(chosen) = first_gpus(node, &gpus[n], job, need) else {
            continue;
        };
        let min_free = chosen.iter().map(|&i| gpus[n][i].0).min().unwrap_or(0);
        let batch = match (&job.batch, want) {
            (Some(policy), 1..) => Some(choose_batch(policy, min_free, explicit)?),
            _ => None,
        };
        let reserve = match want {
            0 => 0,
            _ => batch.map(|c| c.reserve).or(explicit).unwrap_or(0),
        };
        for &i in &chosen {
            let g = &mut gpus[n][i];
            g.0 = g.0.saturating_sub(reserve);
            g.1 += 1;
            g.2 |= job.exclusive_gpu;
        }
        host[n].take(job);
        let mut devices: Vec<u32> = node.gpus.iter().map(|g| g.index).collect();
        devices.sort_unstable();
        return Some(Placement {
            job: job.id,
            node: node.name.clone(),
            gpus: chosen.iter().map(|&i| devices[i]).collect(),
            gpu_memory: reserve,
            batch_size: batch.map(|c| c.size),
            exclusive_gpu: job.exclusive_gpu,
        });
    }
    None
}

/// The first `gpus` usable GPUs of one model (positions in device order).
fn first_gpus(
    node: &NodeView,
    state: &[GpuState],
    job: &JobRequest,
    need: u64,
) -> Option<Vec<usize>> {
    let want = job.resources.gpus as usize;
    if want == 0 {
        return Some(Vec::new());
    }
    let mut models: Vec<&str> = Vec::new();
    let mut by_index: Vec<&str> = Vec::with_capacity(node.gpus.len());
    let mut order: Vec<usize> = (0..node.gpus.len()).collect();
    order.sort_by_key(|&i| node.gpus[i].index);
    for &i in &order {
        by_index.push(node.gpus[i].model.as_str());
    }
    for m in &by_index {
        if !models.contains(m) {
            models.push(m);
        }
    }
    for model in models {
        if !GpuModelChecker::matches(model, &job.constraints.gpu_models) {
            continue;
        }
        let chosen: Vec<usize> = (0..state.len())
            .filter(|&i| {
                let (free, jobs, exclusive) = state[i];
                by_index[i] == model
                    && GpuShareChecker::admits(jobs, exclusive, job.exclusive_gpu)
                    && free >= need
            })
            .take(want)
            .collect();
        if chosen.len() == want {
            return Some(chosen);
        }
    }
    None
}
