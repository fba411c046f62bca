//! A scheduling pass: order the queue, filter nodes, pick GPUs, record reasons.

use std::collections::BTreeMap;

use crate::batch::{BatchChoice, choose_batch};
use crate::model::{
    ClusterSnapshot, HoldReason, JobRequest, LockHolders, LockMode, NodeState, NodeView, Placement,
    Plan, Unplaced,
};
use crate::units::format_bytes;

/// Runs one scheduling pass over `queue` against `snapshot`. Deterministic:
/// the same input gives the same plan.
pub fn plan(snapshot: &ClusterSnapshot, queue: &[JobRequest]) -> Plan {
    let mut nodes = snapshot.nodes.clone();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut locks = snapshot.locks.clone();
    let mut order: Vec<&JobRequest> = queue.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));

    let mut plan = Plan::default();
    for job in order {
        if plan.placements.len() >= snapshot.policy.max_placements_per_pass {
            plan.unplaced.push(Unplaced {
                job: job.id,
                reason: HoldReason::PassBudget,
            });
            continue;
        }
        match place_job(snapshot, &mut nodes, &locks, job) {
            Ok(placement) => {
                for lock in &job.locks {
                    let holders = locks.entry(lock.name.clone()).or_default();
                    match lock.mode {
                        LockMode::Exclusive => holders.exclusive = Some(job.id),
                        LockMode::Shared => {
                            holders.shared.insert(job.id);
                        }
                    }
                }
                plan.placements.push(placement);
            }
            Err(reason) => plan.unplaced.push(Unplaced {
                job: job.id,
                reason,
            }),
        }
    }
    plan
}

fn lock_conflict(locks: &BTreeMap<String, LockHolders>, job: &JobRequest) -> Option<HoldReason> {
    for request in &job.locks {
        let Some(holders) = locks.get(&request.name) else {
            continue;
        };
        let holder = match request.mode {
            LockMode::Shared => holders.exclusive,
            LockMode::Exclusive => holders
                .exclusive
                .or_else(|| holders.shared.iter().next().copied()),
        };
        if let Some(holder) = holder {
            return Some(HoldReason::LockHeld {
                lock: request.name.clone(),
                holder,
            });
        }
    }
    None
}

fn gpu_model_matches(model: &str, wanted: &[String]) -> bool {
    wanted.is_empty()
        || wanted.iter().any(|w| {
            model
                .to_ascii_lowercase()
                .starts_with(&w.to_ascii_lowercase())
        })
}

fn node_eligible(snapshot: &ClusterSnapshot, node: &NodeView, job: &JobRequest) -> bool {
    node.state == NodeState::Ready
        && !node.draining
        && node.heard_from
        && node.quarantined_until_ms <= snapshot.now_ms
        && job
            .constraints
            .labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        && node
            .cpu_millis_total
            .saturating_sub(node.cpu_millis_reserved)
            >= job.resources.cpu_millis
        && node.memory_total.saturating_sub(node.memory_reserved) >= job.resources.memory
        && node
            .disk_total
            .saturating_sub(node.disk_used)
            .saturating_sub(node.disk_reserved)
            >= job.resources.disk
}

struct Candidate {
    node: usize,
    gpus: Vec<u32>,
    choice: Option<BatchChoice>,
    reserve: u64,
    leftover: u64,
}

fn place_job(
    snapshot: &ClusterSnapshot,
    nodes: &mut [NodeView],
    locks: &BTreeMap<String, LockHolders>,
    job: &JobRequest,
) -> Result<Placement, HoldReason> {
    if nodes.is_empty() {
        return Err(HoldReason::NoNodes);
    }
    if let Some(conflict) = lock_conflict(locks, job) {
        return Err(conflict);
    }
    let headroom = snapshot.policy.gpu_headroom;
    let need = job.resources.gpus as usize;
    let mut best: Option<Candidate> = None;
    let mut best_miss: Option<(u64, &str)> = None;
    let mut eligible = 0usize;
    let mut pressured = 0usize;
    for (i, node) in nodes.iter().enumerate() {
        if !node_eligible(snapshot, node, job) {
            continue;
        }
        let mut usable: Vec<(u64, u32)> = node
            .gpus
            .iter()
            .filter(|g| gpu_model_matches(&g.model, &job.constraints.gpu_models))
            .filter(|g| !g.exclusive && (!job.exclusive_gpu || g.jobs == 0))
            .map(|g| (g.effective_free(headroom), g.index))
            .collect();
        if usable.len() < need {
            continue;
        }
        // Smallest free first: bin-pack into partly used GPUs.
        usable.sort();
        let fit = if need == 0 {
            Some((Vec::new(), None, 0, 0))
        } else {
            let mut found = None;
            for window_start in 0..=usable.len() - need {
                let window = &usable[window_start..window_start + need];
                let free = window[0].0;
                let choice = match &job.batch {
                    Some(policy) => choose_batch(policy, free, job.resources.gpu_memory),
                    None => job
                        .resources
                        .gpu_memory
                        .filter(|m| *m <= free)
                        .map(|m| BatchChoice {
                            size: 0,
                            reserve: m,
                        }),
                };
                let choice = match (choice, &job.batch, job.resources.gpu_memory) {
                    (Some(c), _, _) => Some(c),
                    // No memory ask and no batch policy: reserve nothing but the GPU.
                    (None, None, None) => Some(BatchChoice {
                        size: 0,
                        reserve: 0,
                    }),
                    _ => None,
                };
                match choice {
                    Some(c) => {
                        let gpus = window.iter().map(|(_, idx)| *idx).collect();
                        found = Some((
                            gpus,
                            job.batch.as_ref().map(|_| c),
                            c.reserve,
                            free - c.reserve,
                        ));
                        break;
                    }
                    None => {
                        if best_miss.is_none_or(|(f, _)| free > f) {
                            best_miss = Some((usable[usable.len() - 1].0, node.name.as_str()));
                        }
                    }
                }
            }
            found
        };
        let Some((gpus, choice, reserve, leftover)) = fit else {
            continue;
        };
        eligible += 1;
        if job.kind.produces_data() && node.disk_pressure {
            pressured += 1;
            continue;
        }
        let better = match &best {
            None => true,
            Some(b) => {
                let prefer_largest = job.batch.as_ref().is_some_and(|p| p.prefer_largest);
                let (size_a, size_b) =
                    (choice.map_or(0, |c| c.size), b.choice.map_or(0, |c| c.size));
                if prefer_largest && size_a != size_b {
                    size_a > size_b
                } else {
                    leftover < b.leftover
                }
            }
        };
        if better {
            best = Some(Candidate {
                node: i,
                gpus,
                choice,
                reserve,
                leftover,
            });
        }
    }
    let Some(best) = best else {
        if pressured > 0 && pressured == eligible {
            return Err(HoldReason::DiskBackpressure {
                pressured,
                eligible,
            });
        }
        let mem = job
            .resources
            .gpu_memory
            .map(format_bytes)
            .unwrap_or_else(|| "its batch tier".into());
        let models = if job.constraints.gpu_models.is_empty() {
            String::new()
        } else {
            format!(" on {}", job.constraints.gpu_models.join("/"))
        };
        let text = match best_miss {
            Some((free, name)) if need > 0 => format!(
                "no node with {need} GPU(s) with {mem} free{models} (best: {name}, {} free)",
                format_bytes(free)
            ),
            _ if need > 0 => format!("no eligible node with {need} free GPU(s) with {mem}{models}"),
            _ => "no eligible node with the requested CPU, memory and disk".to_string(),
        };
        return Err(HoldReason::NoFit(text));
    };
    let node = &mut nodes[best.node];
    for gpu in node
        .gpus
        .iter_mut()
        .filter(|g| best.gpus.contains(&g.index))
    {
        gpu.reserved += best.reserve;
        gpu.jobs += 1;
        gpu.exclusive |= job.exclusive_gpu;
    }
    node.cpu_millis_reserved += job.resources.cpu_millis;
    node.memory_reserved += job.resources.memory;
    node.disk_reserved += job.resources.disk;
    Ok(Placement {
        job: job.id,
        node: node.name.clone(),
        gpus: best.gpus,
        gpu_memory: best.reserve,
        batch_size: best.choice.map(|c| c.size),
        exclusive_gpu: job.exclusive_gpu,
    })
}
