//! Synthetic fleets and job streams shaped like the users' pipeline: rented
//! GPUs of several models across providers, and a queue dominated by
//! selfplay with evaluation, training, export and the odd constrained job.

use gantry_scheduler::{
    BatchPolicy, ClusterSnapshot, Constraints, GangRequest, GpuView, JobKind, JobRequest,
    MemoryModel, NodeView, Policy, Resources, next_disk_pressure,
};

use crate::rng::Rng;

const GIB: u64 = 1 << 30;

/// GPU models of the fleet: (weight, model, memory GiB).
const MODELS: [(u32, (&str, u64)); 5] = [
    (30, ("H100-80GiB", 80)),
    (20, ("A100-80GB", 80)),
    (20, ("A100-40GB", 40)),
    (15, ("RTX4090-24GiB", 24)),
    (15, ("L4-24GiB", 24)),
];

const PROVIDERS: [(u32, &str); 4] = [
    (40, "lambda"),
    (30, "vast"),
    (20, "hetzner"),
    (10, "onprem"),
];

/// A fleet of `nodes` nodes with `gpus_per_node` GPUs of one model each.
/// Disk use is spread so a few percent of nodes are pressured.
pub fn fleet(nodes: usize, gpus_per_node: u32, policy: Policy, rng: &mut Rng) -> ClusterSnapshot {
    let nodes = (0..nodes)
        .map(|i| {
            let (model, gib) = *rng.weighted(&MODELS);
            let provider = *rng.weighted(&PROVIDERS);
            let disk_total = 4096 * GIB;
            let disk_used = (disk_total as f64 * (0.1 + 0.8 * rng.unit())) as u64;
            NodeView {
                name: format!("node-{i:05}"),
                heard_from: true,
                labels: [("region".to_string(), format!("r{}", rng.below(8)))].into(),
                provider: provider.to_string(),
                gpus: (0..gpus_per_node)
                    .map(|index| GpuView {
                        index,
                        model: model.to_string(),
                        total: gib * GIB,
                        // Drivers and the odd foreign process.
                        nvml_used: (rng.below(512) + 256) << 20,
                        ..Default::default()
                    })
                    .collect(),
                cpu_millis_total: 128_000,
                memory_total: 1024 * GIB,
                disk_total,
                disk_used,
                disk_pressure: next_disk_pressure(false, disk_used, disk_total, 0.85, 0.75),
                rtt_ms: 1.0 + 199.0 * rng.unit(),
                recent_failures: u32::from(rng.below(20) == 0),
                ..Default::default()
            }
        })
        .collect();
    ClusterSnapshot {
        now_ms: 1_700_000_000_000,
        nodes,
        policy,
        ..Default::default()
    }
}

fn users_rule() -> BatchPolicy {
    BatchPolicy::users_rule_of_thumb()
}

/// `count` jobs: 60% selfplay, 15% evaluation, 10% training (1-8 GPUs,
/// exclusive), 10% export, 5% generic with a provider constraint; a tenth
/// ask for a GPU model. Spread over four users' queues.
pub fn jobs(count: usize, rng: &mut Rng) -> Vec<JobRequest> {
    const QUEUES: [&str; 4] = ["alice", "bob", "carol", "dave"];
    (0..count)
        .map(|i| {
            let id = i as u64 + 1;
            let roll = rng.below(100);
            let mut job = JobRequest {
                id,
                submitted_at_ms: 1_700_000_000_000 + id,
                queue: QUEUES[rng.below(4) as usize].to_string(),
                priority: i32::from(rng.below(10) == 0) * 10,
                ..Default::default()
            };
            match roll {
                0..60 => {
                    job.kind = JobKind::Selfplay;
                    job.resources = res(1, Some([6, 8, 12][rng.below(3) as usize] * GIB), 4);
                    if rng.below(4) == 0 {
                        job.resources.gpu_memory = Some(12 * GIB);
                        job.batch = Some(users_rule());
                    }
                }
                60..75 => {
                    job.kind = JobKind::Evaluation;
                    job.resources = res(1, None, 4);
                    job.batch = Some(users_rule());
                }
                75..85 => {
                    job.kind = JobKind::Training;
                    job.exclusive_gpu = true;
                    let gpus = [1, 1, 2, 4, 8][rng.below(5) as usize];
                    job.resources = res(
                        gpus,
                        Some([20, 36, 60][rng.below(3) as usize] * GIB),
                        8 * u64::from(gpus),
                    );
                    if rng.below(3) == 0 {
                        job.resources.gpu_memory = None;
                        job.batch = Some(BatchPolicy {
                            model: Some(MemoryModel {
                                base: 10 * GIB,
                                per_sample: 96 << 20,
                                min: 64,
                                max: 512,
                                multiple_of: 32,
                            }),
                            prefer_largest: true,
                            ..Default::default()
                        });
                    }
                }
                85..95 => {
                    job.kind = JobKind::Export;
                    job.resources = res(1, Some(4 * GIB), 8);
                }
                _ => {
                    job.kind = JobKind::Generic;
                    job.resources = res(1, Some(10 * GIB), 2);
                    job.constraints
                        .labels
                        .insert("provider".into(), "lambda".into());
                }
            }
            if rng.below(10) == 0 {
                job.constraints = Constraints {
                    gpu_models: vec![
                        ["H100", "A100-80GB", "RTX4090"][rng.below(3) as usize].to_string(),
                    ],
                    ..job.constraints
                };
            }
            job
        })
        .collect()
}

/// Turns about `fraction` of `queue` into gang members: runs of 2, 4 or 8
/// consecutive jobs become one training gang (4 or 8 exclusive GPUs of
/// 60 GiB a node, one provider), as `nodes: N` submits them.
pub fn gangs(queue: &mut [JobRequest], fraction: f64, rng: &mut Rng) {
    // Gangs average 14/3 members: start one at this rate per job.
    let per_million = (fraction.clamp(0.0, 1.0) * 1e6 * 3.0 / 14.0) as u64;
    let mut i = 0;
    while i < queue.len() {
        if rng.below(1_000_000) >= per_million {
            i += 1;
            continue;
        }
        let size = [2usize, 4, 8][rng.below(3) as usize].min(queue.len() - i);
        let gpus = [4, 8][rng.below(2) as usize];
        let first = queue[i].id;
        for (rank, job) in queue[i..i + size].iter_mut().enumerate() {
            job.kind = JobKind::Training;
            job.exclusive_gpu = true;
            job.batch = None;
            job.constraints = Constraints::default();
            job.resources = res(gpus, Some(60 * GIB), 8 * u64::from(gpus));
            job.priority = 0;
            job.submitted_at_ms = queue_time(first);
            job.gang = Some(GangRequest {
                id: first,
                rank: rank as u32,
                size: size as u32,
                same_label: Some("provider".into()),
            });
        }
        i += size;
    }
}

fn queue_time(id: u64) -> u64 {
    1_700_000_000_000 + id
}

fn res(gpus: u32, gpu_memory: Option<u64>, cpus: u64) -> Resources {
    Resources {
        gpus,
        gpu_memory,
        cpu_millis: cpus * 1000,
        memory: cpus * 4 * GIB,
        disk: 0,
    }
}
