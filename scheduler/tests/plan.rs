//! Table-driven tests of a scheduling pass: every case is a small fleet, a
//! queue and the plan rendered as text, checked through one helper. Each
//! case also checks that the full-scan oracle gives the same plan as the
//! index.

use gantry_scheduler::place::{Search, plan_with};
use gantry_scheduler::units::format_bytes;
use gantry_scheduler::{
    BatchPolicy, BatchTier, ClusterSnapshot, Constraints, DiskThresholds, GpuView, JobKind,
    JobRequest, LockHolders, LockMode, LockRequest, MemoryModel, NodeState, NodeView, Plan, Policy,
    Resources, plan,
};

const GIB: u64 = 1 << 30;

fn gpu(index: u32, model: &str, free_gib: u64) -> GpuView {
    GpuView {
        index,
        model: model.into(),
        total: free_gib * GIB,
        ..Default::default()
    }
}

fn node(name: &str, gpus: Vec<GpuView>) -> NodeView {
    NodeView {
        name: name.into(),
        heard_from: true,
        gpus,
        cpu_millis_total: 64_000,
        memory_total: 512 * GIB,
        disk_total: 2048 * GIB,
        rtt_ms: 10.0,
        ..Default::default()
    }
}

fn job(id: u64, kind: JobKind, gpus: u32, gpu_gib: u64) -> JobRequest {
    JobRequest {
        id,
        kind,
        submitted_at_ms: id,
        exclusive_gpu: kind.exclusive_gpu_by_default(),
        resources: Resources {
            gpus,
            gpu_memory: (gpu_gib > 0).then_some(gpu_gib * GIB),
            cpu_millis: 1000,
            memory: GIB,
            disk: 0,
        },
        ..Default::default()
    }
}

fn fleet(nodes: Vec<NodeView>) -> ClusterSnapshot {
    ClusterSnapshot {
        now_ms: 1_000_000,
        nodes,
        ..Default::default()
    }
}

fn users_rule() -> BatchPolicy {
    BatchPolicy::users_rule_of_thumb()
}

fn render(plan: &Plan) -> String {
    let mut lines = Vec::new();
    for p in &plan.placements {
        let batch = p
            .batch_size
            .map_or(String::new(), |b| format!(" batch {b}"));
        let x = if p.exclusive_gpu { " exclusive" } else { "" };
        lines.push(format!(
            "{} -> {} {:?} {}{batch}{x}",
            p.job,
            p.node,
            p.gpus,
            format_bytes(p.gpu_memory)
        ));
    }
    for u in &plan.unplaced {
        lines.push(format!("{} waits: {}", u.job, u.reason));
    }
    lines.join("\n")
}

/// Runs a pass and compares its rendering with `expected` (one line per
/// job, leading blanks ignored). The full-scan oracle must agree.
#[track_caller]
fn check(snapshot: &ClusterSnapshot, queue: &[JobRequest], expected: &str) {
    let got = plan(snapshot, queue);
    let expected: Vec<&str> = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(render(&got), expected.join("\n"));
    assert_eq!(
        plan_with(snapshot, queue, Search::FullScan),
        got,
        "full scan disagrees with the index"
    );
}

#[test]
fn node_state_filters() {
    let mut nodes = vec![
        NodeView {
            state: NodeState::Suspect,
            ..node("a", vec![gpu(0, "H100", 80)])
        },
        NodeView {
            state: NodeState::Down,
            ..node("b", vec![gpu(0, "H100", 80)])
        },
        NodeView {
            draining: true,
            ..node("c", vec![gpu(0, "H100", 80)])
        },
        NodeView {
            heard_from: false,
            ..node("d", vec![gpu(0, "H100", 80)])
        },
        NodeView {
            quarantined_until_ms: 2_000_000,
            ..node("e", vec![gpu(0, "H100", 80)])
        },
    ];
    let queue = [job(1, JobKind::Selfplay, 1, 8)];
    check(
        &fleet(nodes.clone()),
        &queue,
        "1 waits: no node takes new work (1 suspect, 1 down, 1 draining, 1 not heard from yet, 1 quarantined)",
    );
    // Quarantine over: node e takes it.
    nodes[4].quarantined_until_ms = 1_000_000;
    check(&fleet(nodes), &queue, "1 -> e [0] 8GiB");
    check(&fleet(vec![]), &queue, "1 waits: no nodes registered");
}

#[test]
fn label_and_model_filters() {
    let mut a = node("a", vec![gpu(0, "H100-80GiB", 80)]);
    a.labels.insert("zone".into(), "west".into());
    let mut b = node("b", vec![gpu(0, "A100-40GB", 40)]);
    b.provider = "lambda".into();
    let snapshot = fleet(vec![a, b]);
    let with = |id: u64, labels: &[(&str, &str)], models: &[&str], gib: u64| JobRequest {
        constraints: Constraints {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            gpu_models: models.iter().map(|m| m.to_string()).collect(),
        },
        ..job(id, JobKind::Evaluation, 1, gib)
    };
    check(
        &snapshot,
        &[with(1, &[("zone", "west")], &[], 8)],
        "1 -> a [0] 8GiB",
    );
    check(
        &snapshot,
        &[with(1, &[("provider", "lambda")], &[], 8)],
        "1 -> b [0] 8GiB",
    );
    check(
        &snapshot,
        &[with(1, &[("zone", "east")], &[], 8)],
        "1 waits: no eligible node has labels zone=east",
    );
    // A reason names a few wanted labels, however many the job lists.
    let many: Vec<(String, String)> = (0..100_000)
        .map(|i| (format!("k{i:06}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    check(
        &snapshot,
        &[with(1, &many, &[], 8)],
        "1 waits: no eligible node has labels k000000=v, k000001=v, k000002=v and 99997 more",
    );
    check(&snapshot, &[with(1, &[], &["a100"], 8)], "1 -> b [0] 8GiB");
    check(
        &snapshot,
        &[with(1, &[], &["H100"], 90)],
        "1 waits: no node with 90GiB free on an H100 (best: a, 80GiB)",
    );
    check(
        &snapshot,
        &[with(1, &[], &["RTX4090"], 8)],
        "1 waits: no eligible node has 1 RTX4090 GPU(s)",
    );
    check(
        &snapshot,
        &[with(1, &[], &[], 90)],
        "1 waits: no node with 90GiB free on a GPU (best: a, 80GiB)",
    );
}

#[test]
fn effective_free_memory() {
    // 80 total, 20 reserved by Gantry, NVML sees 30 used of which Gantry's
    // jobs use 10: 20 used by others. Headroom 2: 80 - 20 - 20 - 2 = 38.
    let mut n = node("a", vec![gpu(0, "H100", 80)]);
    n.gpus[0].reserved = 20 * GIB;
    n.gpus[0].nvml_used = 30 * GIB;
    n.gpus[0].gantry_used = 10 * GIB;
    n.gpus[0].jobs = 1;
    let mut snapshot = fleet(vec![n]);
    snapshot.policy.gpu_headroom = 2 * GIB;
    check(
        &snapshot,
        &[job(1, JobKind::Selfplay, 1, 38)],
        "1 -> a [0] 38GiB",
    );
    check(
        &snapshot,
        &[job(1, JobKind::Selfplay, 1, 39)],
        "1 waits: no node with 39GiB free on a GPU (best: a, 38GiB)",
    );
}

#[test]
fn gpu_count_and_one_node() {
    let snapshot = fleet(vec![
        node("a", vec![gpu(0, "H100", 80), gpu(1, "A100", 80)]),
        node("b", vec![gpu(0, "H100", 80)]),
        node(
            "c",
            vec![gpu(0, "A100", 40), gpu(1, "A100", 80), gpu(2, "A100", 40)],
        ),
    ]);
    // Two GPUs of one model on one node: only c qualifies; best fit takes
    // its two 40s.
    check(
        &snapshot,
        &[job(1, JobKind::Training, 2, 30)],
        "1 -> c [0, 2] 30GiB exclusive",
    );
    check(
        &snapshot,
        &[job(1, JobKind::Training, 2, 50)],
        "1 waits: no node with 2 idle GPUs with 50GiB free each (best: c, 40GiB)",
    );
    check(
        &snapshot,
        &[job(1, JobKind::Training, 4, 10)],
        "1 waits: no eligible node has 4 GPU(s)",
    );
    // Two 2-GPU jobs: the second takes a's? No: a's GPUs differ in model.
    check(
        &snapshot,
        &[
            job(1, JobKind::Training, 2, 30),
            job(2, JobKind::Training, 2, 30),
        ],
        "1 -> c [0, 2] 30GiB exclusive
         2 waits: no eligible node has 2 idle GPU(s)",
    );
}

#[test]
fn host_resources() {
    let mut n = node("a", vec![gpu(0, "H100", 80)]);
    n.cpu_millis_total = 4000;
    n.disk_total = 100 * GIB;
    n.disk_used = 50 * GIB;
    let snapshot = fleet(vec![n]);
    let big = |id: u64, cpu: u64, disk: u64| {
        let mut j = job(id, JobKind::Evaluation, 1, 8);
        j.resources.cpu_millis = cpu;
        j.resources.disk = disk * GIB;
        j
    };
    check(&snapshot, &[big(1, 4000, 50)], "1 -> a [0] 8GiB");
    check(
        &snapshot,
        &[big(1, 4500, 0)],
        "1 waits: no node with the GPUs free also has 4.5 CPUs and 1GiB RAM free",
    );
    check(
        &snapshot,
        &[big(1, 3000, 10), big(2, 2000, 10)],
        "1 -> a [0] 8GiB
         2 waits: no node with the GPUs free also has 2 CPUs, 1GiB RAM and 10GiB disk free",
    );
    let mut cpu_only = big(1, 1000, 0);
    cpu_only.resources.gpus = 0;
    check(&snapshot, &[cpu_only], "1 -> a [] 0B");

    // A node left with less CPU than any queued job asks leaves the
    // index's sets mid-pass; the reason of a job that then waits still
    // names host resources (the relaxed search scans the nodes).
    let mut a = node("a", vec![gpu(0, "H100", 80), gpu(1, "H100", 80)]);
    a.cpu_millis_total = 2000;
    let mut b = node("b", vec![gpu(0, "H100", 80), gpu(1, "H100", 80)]);
    b.cpu_millis_total = 2000;
    let snapshot = fleet(vec![a, b]);
    let mut pair = big(4, 2000, 0);
    pair.resources.gpus = 2;
    check(
        &snapshot,
        &[big(1, 2000, 0), big(2, 2000, 0), big(3, 2000, 0), pair],
        "1 -> a [0] 8GiB
         2 -> b [0] 8GiB
         3 waits: no node with the GPUs free also has 2 CPUs and 1GiB RAM free
         4 waits: no node with the GPUs free also has 2 CPUs and 1GiB RAM free",
    );
}

#[test]
fn disk_backpressure() {
    let pressured = |name: &str| NodeView {
        disk_pressure: true,
        disk_used: 1800 * GIB,
        ..node(name, vec![gpu(0, "H100", 80)])
    };
    let mut snapshot = fleet(vec![pressured("a"), pressured("b"), node("c", vec![])]);
    // Fleet pressure off so the per-node rule is what is tested.
    snapshot.policy.fleet_pressure_fraction = 1.1;
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 8),
            job(2, JobKind::Training, 1, 8),
        ],
        "2 -> a [0] 8GiB exclusive
         1 waits: disk backpressure on 2/2 eligible nodes",
    );
    // Export with its own, higher thresholds may use a node at 88%.
    snapshot.policy.disk_thresholds.insert(
        JobKind::Export,
        DiskThresholds {
            high: 0.95,
            low: 0.90,
        },
    );
    check(
        &snapshot,
        &[job(1, JobKind::Export, 1, 8)],
        "1 -> a [0] 8GiB",
    );
    snapshot.nodes[0].disk_used = 1900 * GIB;
    check(
        &snapshot,
        &[job(1, JobKind::Export, 1, 8)],
        "1 -> b [0] 8GiB",
    );
}

#[test]
fn fleet_backpressure_favours_consumers() {
    let mut snapshot = fleet(vec![
        NodeView {
            disk_pressure: true,
            ..node("a", vec![gpu(0, "H100", 80)])
        },
        node("b", vec![gpu(0, "H100", 24)]),
    ]);
    snapshot.policy.fleet_pressure_fraction = 0.5;
    // Selfplay is held everywhere; the export (submitted last) goes first
    // and takes the only unpressured GPU; training may use the pressured one.
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 8),
            job(2, JobKind::Training, 1, 30),
            job(3, JobKind::Export, 1, 8),
        ],
        "2 -> a [0] 30GiB exclusive
         3 -> b [0] 8GiB
         1 waits: disk backpressure across the fleet (1/2 nodes pressured)",
    );
}

#[test]
fn named_locks() {
    let mut snapshot = fleet(vec![node("a", vec![gpu(0, "H100", 80)])]);
    snapshot.locks.insert(
        "model/x".into(),
        LockHolders {
            exclusive: Some(812),
            shared: Default::default(),
        },
    );
    let locking = |id: u64, name: &str, mode: LockMode| JobRequest {
        locks: vec![LockRequest {
            name: name.into(),
            mode,
        }],
        ..job(id, JobKind::Evaluation, 1, 8)
    };
    check(
        &snapshot,
        &[
            locking(1, "model/x", LockMode::Shared),
            locking(2, "model/y", LockMode::Exclusive),
            locking(3, "model/y", LockMode::Exclusive),
            locking(4, "model/y", LockMode::Shared),
            locking(5, "model/z", LockMode::Shared),
            locking(6, "model/z", LockMode::Shared),
        ],
        "2 -> a [0] 8GiB
         5 -> a [0] 8GiB
         6 -> a [0] 8GiB
         1 waits: lock model/x held by job 812
         3 waits: lock model/y held by job 2
         4 waits: lock model/y held by job 2",
    );
}

/// Unhealthy GPUs are never chosen, whatever the job: shared, exclusive,
/// multi-GPU, or one that would otherwise best fit there.
#[test]
fn unhealthy_gpus_are_never_chosen() {
    let mut a = node("a", vec![gpu(0, "H100", 80), gpu(1, "H100", 80)]);
    a.gpus[0].unhealthy = true;
    // Best fit would be b's partly used GPU 0; it is unhealthy.
    let mut b = node("b", vec![gpu(0, "H100", 80), gpu(1, "H100", 80)]);
    b.gpus[0].jobs = 1;
    b.gpus[0].reserved = 70 * GIB;
    b.gpus[0].unhealthy = true;
    let snapshot = fleet(vec![a, b]);
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 8),
            job(2, JobKind::Training, 1, 8),
            job(3, JobKind::Training, 2, 8),
        ],
        "1 -> a [1] 8GiB
         2 -> b [1] 8GiB exclusive
         3 waits: no eligible node has 2 idle GPU(s)",
    );
    // With every GPU unhealthy nothing is placed.
    let mut sick = node("c", vec![gpu(0, "H100", 80)]);
    sick.gpus[0].unhealthy = true;
    let out = plan(&fleet(vec![sick]), &[job(1, JobKind::Selfplay, 1, 8)]);
    assert!(out.placements.is_empty(), "{out:?}");
}

#[test]
fn exclusive_and_shared_gpus() {
    let mut held = node("a", vec![gpu(0, "H100", 80), gpu(1, "H100", 80)]);
    held.gpus[0].jobs = 1;
    held.gpus[0].exclusive = true;
    held.gpus[1].jobs = 1;
    held.gpus[1].reserved = 8 * GIB;
    let snapshot = fleet(vec![held, node("b", vec![gpu(0, "H100", 80)])]);
    // Selfplay shares a's GPU 1 (partly used first); training needs an idle
    // GPU: b's. Another training finds none.
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 8),
            job(2, JobKind::Training, 1, 8),
            job(3, JobKind::Training, 1, 8),
        ],
        "1 -> a [1] 8GiB
         2 -> b [0] 8GiB exclusive
         3 waits: no eligible node has 1 idle GPU(s)",
    );
}

#[test]
fn bin_packing() {
    let mut partly = node("p", vec![gpu(0, "H100", 80)]);
    partly.gpus[0].jobs = 1;
    partly.gpus[0].reserved = 20 * GIB;
    let snapshot = fleet(vec![
        node("big", vec![gpu(0, "H100", 80)]),
        node("small", vec![gpu(0, "L4", 24)]),
        partly,
    ]);
    // Small jobs: partly used GPU first, then the smallest empty GPU that
    // fits; the 80 GiB empty GPU stays whole for training.
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 30),
            job(2, JobKind::Selfplay, 1, 30),
            job(3, JobKind::Selfplay, 1, 20),
            job(4, JobKind::Training, 1, 70),
        ],
        "1 -> p [0] 30GiB
         2 -> p [0] 30GiB
         3 -> small [0] 20GiB
         4 -> big [0] 70GiB exclusive",
    );
}

#[test]
fn health_breaks_ties() {
    let with = |name: &str, rtt: f64, failures: u32, free_mib: u64| {
        let mut n = node(name, vec![gpu(0, "H100", 0)]);
        n.gpus[0].total = free_mib << 20;
        n.rtt_ms = rtt;
        n.recent_failures = failures;
        n
    };
    let one = [job(1, JobKind::Selfplay, 1, 8)];
    // Equal fits: lower RTT wins.
    check(
        &fleet(vec![with("a", 50.0, 0, 81920), with("b", 5.0, 0, 81920)]),
        &one,
        "1 -> b [0] 8GiB",
    );
    // Fewer failures beat lower RTT.
    check(
        &fleet(vec![with("a", 50.0, 0, 81920), with("b", 5.0, 2, 81920)]),
        &one,
        "1 -> a [0] 8GiB",
    );
    // Same health: the name decides.
    check(
        &fleet(vec![with("b", 5.0, 0, 81920), with("a", 5.0, 0, 81920)]),
        &one,
        "1 -> a [0] 8GiB",
    );
    // Within the packing granularity (1 GiB) free memory counts as equal...
    check(
        &fleet(vec![with("a", 50.0, 0, 81920), with("b", 5.0, 0, 82000)]),
        &one,
        "1 -> b [0] 8GiB",
    );
    // ...beyond it, the tighter fit wins over health.
    check(
        &fleet(vec![with("a", 50.0, 0, 40960), with("b", 5.0, 0, 81920)]),
        &one,
        "1 -> a [0] 8GiB",
    );
}

/// The users' rule of thumb: GPUs with 80, 40, 24 and 20 GiB free get
/// batch 512, 512, 256, 256 (one job per GPU).
#[test]
fn users_rule_through_plan() {
    let snapshot = fleet(vec![
        node("n80", vec![gpu(0, "H100", 80)]),
        node("n40", vec![gpu(0, "A100", 40)]),
        node("n24", vec![gpu(0, "RTX4090", 24)]),
        node("n20", vec![gpu(0, "A4500", 20)]),
    ]);
    let queue: Vec<JobRequest> = (1..=4)
        .map(|id| JobRequest {
            batch: Some(users_rule()),
            ..job(id, JobKind::Training, 1, 12)
        })
        .collect();
    check(
        &snapshot,
        &queue,
        "1 -> n20 [0] 12GiB batch 256 exclusive
         2 -> n24 [0] 12GiB batch 256 exclusive
         3 -> n40 [0] 12GiB batch 512 exclusive
         4 -> n80 [0] 12GiB batch 512 exclusive",
    );
}

#[test]
fn batch_rules() {
    let snapshot = fleet(vec![
        node("n80", vec![gpu(0, "H100", 80)]),
        node("n20", vec![gpu(0, "A4500", 20)]),
    ]);
    let tiers = |id: u64, prefer_largest: bool, gib: u64| JobRequest {
        batch: Some(BatchPolicy {
            prefer_largest,
            ..users_rule()
        }),
        ..job(id, JobKind::Selfplay, 1, gib)
    };
    // Without gpu_memory the tier's min_free is reserved.
    check(
        &snapshot,
        &[tiers(1, false, 0)],
        "1 -> n20 [0] 16GiB batch 256",
    );
    // prefer_largest: the GPU that gives 512.
    check(
        &snapshot,
        &[tiers(1, true, 0)],
        "1 -> n80 [0] 32GiB batch 512",
    );
    check(
        &snapshot,
        &[tiers(1, true, 12)],
        "1 -> n80 [0] 12GiB batch 512",
    );
    // A catch-all tier without gpu_memory can never be reserved.
    let catch_all = JobRequest {
        batch: Some(BatchPolicy {
            tiers: vec![BatchTier {
                min_free: None,
                size: 64,
            }],
            ..Default::default()
        }),
        ..job(1, JobKind::Selfplay, 1, 0)
    };
    check(
        &snapshot,
        &[catch_all],
        "1 waits: its batch rule fits on no GPU: a tier without min_free needs an explicit gpu_memory",
    );
    // Memory model: the largest batch that fits, reserving what it needs.
    let model = |id: u64, prefer_largest: bool| JobRequest {
        batch: Some(BatchPolicy {
            model: Some(MemoryModel {
                base: 4 * GIB,
                per_sample: 64 << 20,
                min: 32,
                max: 2048,
                multiple_of: 32,
            }),
            prefer_largest,
            ..Default::default()
        }),
        ..job(id, JobKind::Selfplay, 1, 0)
    };
    check(
        &snapshot,
        &[model(1, false)],
        "1 -> n20 [0] 20GiB batch 256",
    );
    check(
        &snapshot,
        &[model(1, true)],
        "1 -> n80 [0] 80GiB batch 1216",
    );
}

#[test]
fn queue_fairness_through_plan() {
    let snapshot = fleet(vec![node("a", vec![gpu(0, "H100", 16)])]);
    let q = |id: u64, queue: &str, kind: JobKind| JobRequest {
        queue: queue.into(),
        ..job(id, kind, 1, 8)
    };
    // Room for two jobs: alice's flood does not starve bob's evaluation.
    check(
        &snapshot,
        &[
            q(1, "alice", JobKind::Selfplay),
            q(2, "alice", JobKind::Selfplay),
            q(3, "alice", JobKind::Selfplay),
            q(4, "bob", JobKind::Evaluation),
        ],
        "1 -> a [0] 8GiB
         4 -> a [0] 8GiB
         2 waits: no node with 8GiB free on a GPU (best: a, 0B)
         3 waits: no node with 8GiB free on a GPU (best: a, 0B)",
    );
}

#[test]
fn pass_budget() {
    let mut snapshot = fleet(vec![node("a", vec![gpu(0, "H100", 80)])]);
    snapshot.policy = Policy {
        max_placements_per_pass: 1,
        ..Default::default()
    };
    check(
        &snapshot,
        &[
            job(1, JobKind::Selfplay, 1, 8),
            job(2, JobKind::Selfplay, 1, 8),
        ],
        "1 -> a [0] 8GiB
         2 waits: waiting for the next scheduling pass",
    );
}

#[test]
fn rare_labels_scan_their_postings() {
    // 20 nodes, one with the rare label: the posting-list path must agree
    // with the index path (check() compares with the full scan).
    let mut nodes: Vec<NodeView> = (0..20)
        .map(|i| node(&format!("n{i:02}"), vec![gpu(0, "H100", 80)]))
        .collect();
    nodes[13].labels.insert("pool".into(), "rare".into());
    let mut rare = job(1, JobKind::Evaluation, 1, 8);
    rare.constraints.labels.insert("pool".into(), "rare".into());
    check(&fleet(nodes), &[rare], "1 -> n13 [0] 8GiB");
}
