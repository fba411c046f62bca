//! Priority preemption against its oracle: fleets full of running jobs of
//! mixed priorities, ages and shapes, and pending jobs that can only run
//! by preempting them. The indexed pass visits nodes by the best victim
//! set they could offer and stops early; the full scan visits every node
//! in index order. Both must choose the same victims, on the same nodes,
//! for the same jobs.

use gantry_scheduler::place::{Search, plan_with};
use gantry_scheduler::{
    ClusterSnapshot, GpuView, JobRequest, NodeView, Policy, PreemptionPolicy, Resources,
    RunningJob, plan,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const NOW: u64 = 1_000;
const MODELS: [&str; 2] = ["H100", "A100"];

/// A running job as drawn: (node, first device, devices, GiB per GPU,
/// exclusive, priority, preemptible, started, times preempted recently,
/// CPUs).
type Run = (usize, u32, u32, u64, bool, i32, bool, u64, usize, u64);

fn arb_run() -> impl Strategy<Value = Run> {
    (
        (
            0..12usize,
            0..4u32,
            1..3u32,
            4..41u64,
            prop::bool::weighted(0.3),
        ),
        (
            0..4i32,
            prop::bool::weighted(0.85),
            // Some start after `NOW`: their work lost is zero.
            prop::sample::select(vec![0u64, 500, 900, 1_000, 1_200]),
            prop::sample::select(vec![0usize, 0, 0, 3]),
            0..9u64,
        ),
    )
        .prop_map(|((n, d, k, gib, x), (p, pre, start, times, cpus))| {
            (n, d, k, gib, x, p, pre, start, times, cpus)
        })
}

/// A pending job as drawn: (priority, GPUs, GiB per GPU, exclusive,
/// model wanted, CPUs, preempted by the running job of this position).
type Pending = (i32, u32, u64, bool, Option<usize>, u64, Option<usize>);

fn arb_pending() -> impl Strategy<Value = Pending> {
    (
        1..7i32,
        0..4u32,
        8..81u64,
        any::<bool>(),
        prop::option::weighted(0.2, 0..2usize),
        0..17u64,
        prop::option::weighted(0.15, 0..40usize),
    )
}

/// Nodes of 4 GPUs of 80 GiB (the model by node), 16 cores, and the
/// running jobs that fit on them in order (the others are dropped), with
/// the GPU and host reservations they hold.
fn fleet(nodes: usize, runs: &[Run], policy: PreemptionPolicy) -> ClusterSnapshot {
    let mut snapshot = ClusterSnapshot {
        now_ms: NOW,
        nodes: (0..nodes)
            .map(|i| NodeView {
                // Name order is not health order (RTT by position).
                name: format!("n{:02}", nodes - i),
                heard_from: true,
                gpus: (0..4)
                    .map(|index| GpuView {
                        index,
                        model: MODELS[i % 2].into(),
                        total: 80 * GIB,
                        ..Default::default()
                    })
                    .collect(),
                cpu_millis_total: 16_000,
                memory_total: 256 * GIB,
                rtt_ms: (i % 3) as f64,
                ..Default::default()
            })
            .collect(),
        policy: Policy {
            preemption: policy,
            ..Default::default()
        },
        ..Default::default()
    };
    for (id, &(n, first, k, gib, exclusive, priority, preemptible, started, times, cpus)) in
        runs.iter().enumerate()
    {
        let Some(node) = snapshot.nodes.get_mut(n % nodes.max(1)) else {
            continue;
        };
        let devices: Vec<u32> = (first..first + k).filter(|&d| d < 4).collect();
        let fits = devices.iter().all(|&d| {
            let g = &node.gpus[d as usize];
            !g.exclusive && (!exclusive || g.jobs == 0) && g.reserved + gib * GIB <= g.total
        }) && node.cpu_millis_reserved + cpus * 1000 <= node.cpu_millis_total;
        if !fits {
            continue;
        }
        for &d in &devices {
            let g = &mut node.gpus[d as usize];
            g.reserved += gib * GIB;
            g.jobs += 1;
            g.exclusive |= exclusive;
        }
        node.cpu_millis_reserved += cpus * 1000;
        snapshot.running.push(RunningJob {
            id: id as u64 + 1,
            node: node.name.clone(),
            priority,
            preemptible,
            started_at_ms: started,
            gpus: devices,
            gpu_memory: gib * GIB,
            exclusive_gpu: exclusive,
            cpu_millis: cpus * 1000,
            preempted_at_ms: vec![NOW - 1; times],
            ..Default::default()
        });
    }
    snapshot
}

fn queue(pending: &[Pending], running: &[RunningJob]) -> Vec<JobRequest> {
    pending
        .iter()
        .enumerate()
        .map(|(i, &(priority, gpus, gib, exclusive, model, cpus, by))| {
            let mut job = JobRequest {
                id: 1_000 + i as u64,
                priority,
                submitted_at_ms: i as u64,
                exclusive_gpu: exclusive,
                resources: Resources {
                    gpus,
                    gpu_memory: Some(gib * GIB),
                    cpu_millis: cpus * 1000,
                    ..Default::default()
                },
                preempted_by: by
                    .and_then(|r| running.get(r))
                    .map(|r| r.id)
                    .into_iter()
                    .collect(),
                ..Default::default()
            };
            if let Some(m) = model {
                job.constraints.gpu_models = vec![MODELS[m].into()];
            }
            job
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn victims_match_the_full_scan(
        nodes in 1..12usize,
        runs in prop::collection::vec(arb_run(), 0..60),
        pending in prop::collection::vec(arb_pending(), 1..10),
        max_per_pass in 1..6usize,
        max_tries_per_pass in 1..8usize,
    ) {
        let policy = PreemptionPolicy {
            max_per_pass,
            max_tries_per_pass,
            ..Default::default()
        };
        let snapshot = fleet(nodes, &runs, policy);
        let queue = queue(&pending, &snapshot.running);
        let got = plan(&snapshot, &queue);
        prop_assert_eq!(&plan_with(&snapshot, &queue, Search::FullScan), &got);
        // Node order in the snapshot does not matter either.
        let mut reversed = snapshot.clone();
        reversed.nodes.reverse();
        prop_assert_eq!(&plan(&reversed, &queue), &got);
    }
}

/// The generator reaches the cases the early stop is about: several
/// preemptions a pass, one-victim sets on nodes that tie on priority and
/// work lost.
#[test]
fn the_cases_preempt() {
    let runs: Vec<Run> = (0..32)
        .map(|i| (i % 8, (i / 8) as u32, 1, 40, false, 0, true, 900, 0, 1))
        .collect();
    let snapshot = fleet(8, &runs, PreemptionPolicy::default());
    let queue = queue(
        &[
            (5, 1, 80, true, None, 1, None),
            (5, 2, 80, true, None, 1, None),
        ],
        &snapshot.running,
    );
    let got = plan(&snapshot, &queue);
    assert_eq!(got.preemptions.len(), 2, "{got:?}");
    assert_eq!(plan_with(&snapshot, &queue, Search::FullScan), got);
}
