//! Property tests over random fleets and job streams: the invariants a plan
//! must keep whatever the input.

use std::collections::{BTreeMap, BTreeSet};

use gantry_scheduler::disk::DiskPressureChecker;
use gantry_scheduler::filter::{GpuModelChecker, LabelChecker, NodeStateChecker};
use gantry_scheduler::naive::plan_first_fit;
use gantry_scheduler::place::{Search, plan_with};
use gantry_scheduler::{
    BatchPolicy, ClusterSnapshot, Constraints, DiskThresholds, GpuView, JobKind, JobRequest,
    LockHolders, LockMode, LockRequest, MemoryModel, NodeState, NodeView, Plan, Policy, Resources,
    plan,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const MODELS: [&str; 3] = ["H100-80GiB", "A100-40GB", "L4"];
const LOCKS: [&str; 2] = ["model/a", "model/b"];

fn arb_gpu() -> impl Strategy<Value = (usize, u64, u64, u64, u32, bool)> {
    // (model, total GiB, used-by-others GiB, reserved GiB, jobs, exclusive)
    (
        0..3usize,
        prop::sample::select(vec![24u64, 40, 80]),
        0..6u64,
        0..30u64,
        0..3u32,
        prop::bool::weighted(0.15),
    )
}

fn arb_node() -> impl Strategy<Value = NodeView> {
    (
        (
            0..10u8,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.9),
            0..2u8,
            prop::bool::weighted(0.1),
        ),
        prop::collection::vec(arb_gpu(), 0..5),
        (1..32u64, 1..64u64, 0..100u64, prop::bool::weighted(0.3)),
        (0..300u32, 0..3u32, any::<bool>()),
    )
        .prop_map(
            |(
                (state, draining, heard, zone, quarantined),
                gpus,
                (cpus, mem, disk_pct, pressure),
                (rtt, failures, mixed),
            )| {
                let state = match state {
                    0 => NodeState::Suspect,
                    1 => NodeState::Down,
                    _ => NodeState::Ready,
                };
                let first_model = gpus.first().map_or(0, |g| g.0);
                NodeView {
                    name: String::new(),
                    state,
                    draining,
                    heard_from: heard,
                    labels: [("zone".to_string(), ["a", "b"][zone as usize].to_string())].into(),
                    provider: ["lambda", "vast"][zone as usize].into(),
                    gpus: gpus
                        .into_iter()
                        .enumerate()
                        .map(|(i, (model, total, others, reserved, jobs, exclusive))| {
                            // Mostly one model per node, sometimes mixed.
                            let model = if mixed { model } else { first_model };
                            let reserved = if jobs == 0 { 0 } else { reserved.min(total) };
                            GpuView {
                                index: (i as u32) * 2, // sparse device numbers
                                model: MODELS[model].into(),
                                total: total * GIB,
                                nvml_used: (others + reserved / 2) * GIB,
                                gantry_used: (reserved / 2) * GIB,
                                reserved: reserved * GIB,
                                exclusive: exclusive && jobs > 0,
                                jobs,
                                unhealthy: false,
                            }
                        })
                        .collect(),
                    cpu_millis_total: cpus * 1000,
                    cpu_millis_reserved: 0,
                    memory_total: mem * GIB,
                    memory_reserved: 0,
                    disk_total: 1000 * GIB,
                    disk_used: disk_pct * 10 * GIB,
                    disk_reserved: 0,
                    disk_pressure: pressure,
                    rtt_ms: f64::from(rtt),
                    recent_failures: failures,
                    quarantined_until_ms: if quarantined { 2_000 } else { 0 },
                    held_for: None,
                }
            },
        )
}

fn users_rule(prefer_largest: bool) -> BatchPolicy {
    BatchPolicy {
        prefer_largest,
        ..BatchPolicy::users_rule_of_thumb()
    }
}

fn arb_job() -> impl Strategy<Value = JobRequest> {
    (
        (
            0..6usize,
            0..4u32,
            prop::option::weighted(0.7, 1..60u64),
            any::<bool>(),
            0..3i32,
            0..3u8,
        ),
        (
            0..4u8,
            any::<bool>(),
            prop::option::weighted(0.3, (0..2usize, any::<bool>())),
        ),
        (
            prop::option::weighted(0.15, 0..2u8),
            prop::option::weighted(0.2, 0..3usize),
            0..8u64,
            0..16u64,
        ),
    )
        .prop_map(
            |(
                (kind, gpus, mem, exclusive, priority, queue),
                (batch, prefer, lock),
                (zone, model, cpus, ram),
            )| {
                let kind = JobKind::ALL[kind];
                let batch = match batch {
                    1 => Some(users_rule(prefer)),
                    2 => Some(BatchPolicy {
                        model: Some(MemoryModel {
                            base: 2 * GIB,
                            per_sample: 128 << 20,
                            min: 16,
                            max: 512,
                            multiple_of: 16,
                        }),
                        prefer_largest: prefer,
                        ..Default::default()
                    }),
                    _ => None,
                };
                JobRequest {
                    id: 0,
                    kind,
                    priority,
                    submitted_at_ms: 0,
                    queue: ["", "alice", "bob"][queue as usize].into(),
                    resources: Resources {
                        gpus: gpus.min(3),
                        gpu_memory: mem.map(|m| m * GIB),
                        cpu_millis: cpus * 1000,
                        memory: ram * GIB,
                        disk: 0,
                    },
                    exclusive_gpu: exclusive || kind.exclusive_gpu_by_default(),
                    batch,
                    locks: lock
                        .map(|(l, x)| LockRequest {
                            name: LOCKS[l].into(),
                            mode: if x {
                                LockMode::Exclusive
                            } else {
                                LockMode::Shared
                            },
                        })
                        .into_iter()
                        .collect(),
                    constraints: Constraints {
                        labels: zone
                            .map(|z| ("zone".to_string(), ["a", "b"][z as usize].to_string()))
                            .into_iter()
                            .collect(),
                        gpu_models: model
                            .map(|m| {
                                vec![
                                    ["H100".to_string(), "a100".to_string(), "L4".to_string()][m]
                                        .clone(),
                                ]
                            })
                            .unwrap_or_default(),
                    },
                    preempted_by: Vec::new(),
                    held_node: None,
                    gang: None,
                }
            },
        )
}

fn arb_case() -> impl Strategy<Value = (ClusterSnapshot, Vec<JobRequest>)> {
    (
        prop::collection::vec(arb_node(), 0..12),
        prop::collection::vec(arb_job(), 0..40),
        (
            0..3u64,
            prop::option::weighted(0.2, 1..8usize),
            prop::bool::ANY,
            prop::sample::select(vec![0.3, 0.8, 1.1]),
            prop::bool::weighted(0.3),
        ),
        prop::option::weighted(0.3, (0..2usize, prop::option::of(0..20u64))),
    )
        .prop_map(
            |(mut nodes, mut jobs, (headroom, budget, fine, fleet, export_marks), lock)| {
                for (i, n) in nodes.iter_mut().enumerate() {
                    n.name = format!("node-{i:02}");
                }
                for (i, j) in jobs.iter_mut().enumerate() {
                    j.id = 100 + i as u64;
                    j.submitted_at_ms = (i as u64 * 7919) % 13;
                }
                let mut policy = Policy {
                    gpu_headroom: headroom * GIB / 2,
                    max_placements_per_pass: budget.unwrap_or(usize::MAX),
                    pack_granularity: if fine { 1 } else { GIB },
                    fleet_pressure_fraction: fleet,
                    ..Default::default()
                };
                if export_marks {
                    policy.disk_thresholds.insert(
                        JobKind::Export,
                        DiskThresholds {
                            high: 0.6,
                            low: 0.4,
                        },
                    );
                    policy.disk_thresholds.insert(
                        JobKind::Evaluation,
                        DiskThresholds {
                            high: 0.9,
                            low: 0.8,
                        },
                    );
                }
                let mut locks = BTreeMap::new();
                if let Some((l, holder)) = lock {
                    let mut h = LockHolders::default();
                    match holder {
                        Some(id) => h.exclusive = Some(id),
                        None => h.shared = [7, 8].into_iter().collect(),
                    }
                    locks.insert(LOCKS[l].to_string(), h);
                }
                (
                    ClusterSnapshot {
                        now_ms: 1_000,
                        nodes,
                        locks,
                        policy,
                        ..Default::default()
                    },
                    jobs,
                )
            },
        )
}

fn assert_invariants(snapshot: &ClusterSnapshot, queue: &[JobRequest], plan: &Plan) {
    // Every job exactly once.
    let mut seen = BTreeSet::new();
    for id in plan
        .placements
        .iter()
        .map(|p| p.job)
        .chain(plan.unplaced.iter().map(|u| u.job))
    {
        assert!(seen.insert(id), "job {id} appears twice");
    }
    assert_eq!(
        seen,
        queue.iter().map(|j| j.id).collect::<BTreeSet<_>>(),
        "a job is missing"
    );
    assert!(plan.placements.len() <= snapshot.policy.max_placements_per_pass);

    let jobs: BTreeMap<u64, &JobRequest> = queue.iter().map(|j| (j.id, j)).collect();
    let nodes: BTreeMap<&str, &NodeView> = snapshot
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let pressure = DiskPressureChecker::new(&snapshot.policy);
    let mut reserved: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    let mut holders: BTreeMap<(&str, u32), Vec<bool>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &plan.placements {
        let job = jobs[&p.job];
        let node = nodes[p.node.as_str()];
        assert!(
            NodeStateChecker::admits(node, snapshot.now_ms).is_ok(),
            "{} placed on ineligible {}",
            p.job,
            p.node
        );
        assert!(
            !pressure.blocks(node, job.kind),
            "{} ({}) placed on pressured {}",
            p.job,
            job.kind,
            p.node
        );
        assert!(LabelChecker::matches(node, &job.constraints.labels));
        assert_eq!(p.gpus.len(), job.resources.gpus as usize);
        assert_eq!(p.exclusive_gpu, job.exclusive_gpu);
        assert_eq!(
            p.batch_size.is_some(),
            job.batch.is_some() && job.resources.gpus > 0
        );
        let models: BTreeSet<&str> = p
            .gpus
            .iter()
            .map(|d| {
                let g = node
                    .gpus
                    .iter()
                    .find(|g| g.index == *d)
                    .expect("placed on a real device");
                assert!(GpuModelChecker::matches(
                    &g.model,
                    &job.constraints.gpu_models
                ));
                g.model.as_str()
            })
            .collect();
        assert!(models.len() <= 1, "multi-GPU job across models");
        assert_eq!(
            p.gpus.iter().collect::<BTreeSet<_>>().len(),
            p.gpus.len(),
            "a device twice"
        );
        for &d in &p.gpus {
            *reserved.entry((node.name.as_str(), d)).or_default() += p.gpu_memory;
            holders
                .entry((node.name.as_str(), d))
                .or_default()
                .push(p.exclusive_gpu);
        }
        *cpu.entry(node.name.as_str()).or_default() += job.resources.cpu_millis;
    }
    // No GPU's reservations exceed its effective capacity.
    for ((name, d), total) in &reserved {
        let g = nodes[name]
            .gpus
            .iter()
            .find(|g| g.index == *d)
            .expect("device");
        assert!(
            *total <= g.effective_free(snapshot.policy.gpu_headroom),
            "{name}/{d} overcommitted"
        );
        let h = &holders[&(*name, *d)];
        assert!(!g.exclusive, "{name}/{d} was held exclusively");
        if h.iter().any(|x| *x) {
            assert!(
                h.len() == 1 && g.jobs == 0,
                "{name}/{d} exclusive but shared"
            );
        }
    }
    for (name, used) in cpu {
        assert!(used <= nodes[name].cpu_millis_total);
    }
    // An exclusive lock has one holder.
    for lock in LOCKS {
        let held = snapshot.locks.get(lock);
        let mut exclusive: Vec<u64> = held.and_then(|h| h.exclusive).into_iter().collect();
        let mut shared: Vec<u64> = held
            .map(|h| h.shared.iter().copied().collect())
            .unwrap_or_default();
        for p in &plan.placements {
            for l in jobs[&p.job].locks.iter().filter(|l| l.name == lock) {
                match l.mode {
                    LockMode::Exclusive => exclusive.push(p.job),
                    LockMode::Shared => shared.push(p.job),
                }
            }
        }
        assert!(
            exclusive.len() <= 1,
            "{lock} has exclusive holders {exclusive:?}"
        );
        if !exclusive.is_empty() {
            let newly = plan.placements.iter().any(|p| p.job == exclusive[0]);
            assert!(
                !newly || shared.is_empty(),
                "{lock} exclusive {exclusive:?} beside shared {shared:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_keep_invariants((snapshot, queue) in arb_case()) {
        let got = plan(&snapshot, &queue);
        assert_invariants(&snapshot, &queue, &got);
        // Same input, same plan.
        prop_assert_eq!(&plan(&snapshot, &queue), &got);
        // Node order does not matter.
        let mut reversed = snapshot.clone();
        reversed.nodes.reverse();
        prop_assert_eq!(&plan(&reversed, &queue), &got);
        // The index agrees with a full scan.
        prop_assert_eq!(&plan_with(&snapshot, &queue, Search::FullScan), &got);
        // The baseline keeps the same invariants.
        assert_invariants(&snapshot, &queue, &plan_first_fit(&snapshot, &queue));
    }

    #[test]
    fn a_single_job_fits_iff_first_fit_finds_room((snapshot, queue) in arb_case()) {
        for job in queue.iter().take(8) {
            let one = std::slice::from_ref(job);
            let ours = plan(&snapshot, one).placements.len();
            let naive = plan_first_fit(&snapshot, one).placements.len();
            prop_assert_eq!(ours, naive, "job {:?}", job);
        }
    }
}
