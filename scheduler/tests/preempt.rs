//! Priority preemption: the victim choice as tables (`victims`), and
//! against its oracle: fleets full of running jobs of mixed priorities,
//! ages and shapes, and pending jobs that can only run by preempting them.
//! The indexed pass visits nodes by the best victim set they could offer
//! and stops early; the full scan visits every node in index order. Both
//! must choose the same victims, on the same nodes, for the same jobs.

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

/// The victim choice, starvation protection and held capacity as tables.
mod victims {
    use gantry_scheduler::{
        ClusterSnapshot, GpuView, HoldReason, JobRequest, NodeView, Plan, Resources, RunningJob,
        plan,
    };

    const GIB: u64 = 1 << 30;
    const NOW: u64 = 10_000_000;

    /// A running job: (id, node, priority, preemptible, started, gpus).
    type Run = (u64, &'static str, i32, bool, u64, &'static [u32]);
    /// (case, nodes, running, pending (id, priority, gpus), expected).
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [Run],
        (u64, i32, u32),
        &'static str,
    );

    /// Nodes of 2 exclusive 80 GiB GPUs each, full with `running`; one
    /// pending job of `priority` wanting `gpus` GPUs.
    fn snapshot(nodes: &[&str], running: &[Run]) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot {
            now_ms: NOW,
            nodes: nodes
                .iter()
                .map(|name| NodeView {
                    name: name.to_string(),
                    heard_from: true,
                    gpus: (0..2)
                        .map(|index| GpuView {
                            index,
                            model: "H100".into(),
                            total: 80 * GIB,
                            ..Default::default()
                        })
                        .collect(),
                    cpu_millis_total: 64_000,
                    memory_total: 512 * GIB,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        for &(id, node, priority, preemptible, started, gpus) in running {
            let view = snapshot
                .nodes
                .iter_mut()
                .find(|n| n.name == node)
                .expect("node");
            for g in view.gpus.iter_mut().filter(|g| gpus.contains(&g.index)) {
                g.reserved = 80 * GIB;
                g.jobs += 1;
                g.exclusive = true;
            }
            snapshot.running.push(RunningJob {
                id,
                node: node.into(),
                priority,
                preemptible,
                started_at_ms: started,
                gpus: gpus.to_vec(),
                gpu_memory: 80 * GIB,
                exclusive_gpu: true,
                ..Default::default()
            });
        }
        snapshot
    }

    fn pending(id: u64, priority: i32, gpus: u32) -> JobRequest {
        JobRequest {
            id,
            priority,
            exclusive_gpu: true,
            resources: Resources {
                gpus,
                gpu_memory: Some(80 * GIB),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The preemptions of a plan as `job@node: victims`.
    fn render(plan: &Plan) -> String {
        plan.preemptions
            .iter()
            .map(|p| format!("{}@{}: {:?}", p.job, p.node, p.victims))
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[test]
    fn victim_choice() {
        let cases: &[Case] = &[
            (
                "the fewest jobs: one 2-GPU job rather than two 1-GPU jobs",
                &["a", "b"],
                &[
                    (1, "a", 0, true, 100, &[0]),
                    (2, "a", 0, true, 200, &[1]),
                    (3, "b", 5, true, 100, &[0, 1]),
                ],
                (9, 10, 2),
                "9@b: [3]",
            ),
            (
                "lowest priority first",
                &["a", "b"],
                &[
                    (1, "a", 3, true, 100, &[0, 1]),
                    (2, "b", 1, true, 100, &[0, 1]),
                ],
                (9, 10, 1),
                "9@b: [2]",
            ),
            (
                "then the most recently started (least work lost)",
                &["a"],
                &[(1, "a", 0, true, 100, &[0]), (2, "a", 0, true, 900, &[1])],
                (9, 10, 1),
                "9@a: [2]",
            ),
            (
                "lowest priority beats recency",
                &["a"],
                &[(1, "a", 0, true, 100, &[0]), (2, "a", 1, true, 900, &[1])],
                (9, 10, 1),
                "9@a: [1]",
            ),
            (
                "never a job that is not preemptible",
                &["a"],
                &[(1, "a", 0, false, 100, &[0]), (2, "a", 1, true, 900, &[1])],
                (9, 10, 1),
                "9@a: [2]",
            ),
            (
                "nothing preemptible: nothing stops",
                &["a"],
                &[(1, "a", 0, false, 100, &[0, 1])],
                (9, 10, 1),
                "",
            ),
            (
                "never equal or higher priority",
                &["a"],
                &[(1, "a", 10, true, 100, &[0]), (2, "a", 11, true, 900, &[1])],
                (9, 10, 1),
                "",
            ),
            (
                "two victims when one is not enough",
                &["a"],
                &[(1, "a", 0, true, 100, &[0]), (2, "a", 1, true, 900, &[1])],
                (9, 10, 2),
                "9@a: [1, 2]",
            ),
            (
                "a job that fits without preempting preempts nothing",
                &["a", "b"],
                &[(1, "a", 0, true, 100, &[0, 1])],
                (9, 10, 2),
                "",
            ),
        ];
        for (case, nodes, running, (id, priority, gpus), expected) in cases {
            let snapshot = snapshot(nodes, running);
            let out = plan(&snapshot, &[pending(*id, *priority, *gpus)]);
            assert_eq!(render(&out), *expected, "{case}");
            if !expected.is_empty() {
                assert!(
                    matches!(out.unplaced[0].reason, HoldReason::Preempting { .. }),
                    "{case}: {:?}",
                    out.unplaced
                );
            }
        }
    }

    #[test]
    fn no_cascade_and_one_node_per_pass() {
        let running: &[Run] = &[
            (1, "a", 0, true, 100, &[0, 1]),
            (2, "b", 0, true, 100, &[0, 1]),
        ];
        // Job 1 preempted job 9 earlier: 9 may not preempt 1 back.
        let mut nine = pending(9, 10, 1);
        nine.preempted_by = vec![1];
        let out = plan(&snapshot(&["a", "b"], running), &[nine]);
        assert_eq!(render(&out), "9@b: [2]");
        // Two preemptors in one pass never share a node or a victim.
        let out = plan(
            &snapshot(&["a", "b"], running),
            &[pending(8, 10, 2), pending(9, 10, 2)],
        );
        assert_eq!(render(&out), "8@a: [1]; 9@b: [2]");
    }

    #[test]
    fn starvation_protection() {
        let window = gantry_scheduler::PreemptionPolicy::default().window_ms;
        // (times preempted, expected)
        let cases: &[(&[u64], &str)] = &[
            (&[], "9@a: [1]"),
            (&[NOW - 10, NOW - 20], "9@a: [1]"),
            // Three times within the window: protected.
            (&[NOW - 10, NOW - 20, NOW - 30], ""),
            // The oldest left the window: fair game again.
            (&[NOW - 10, NOW - 20, NOW - window], "9@a: [1]"),
        ];
        for (times, expected) in cases {
            let mut snapshot = snapshot(&["a"], &[(1, "a", 0, true, 100, &[0, 1])]);
            snapshot.running[0].preempted_at_ms = times.to_vec();
            let out = plan(&snapshot, &[pending(9, 10, 1)]);
            assert_eq!(render(&out), *expected, "{times:?}");
        }
    }

    #[test]
    fn held_capacity_goes_to_its_preemptor_only() {
        // Node a is held for job 9; its victim has stopped, so a is free.
        let mut snapshot = snapshot(&["a"], &[]);
        snapshot.nodes[0].held_for = Some(9);
        let mut nine = pending(9, 10, 2);
        nine.held_node = Some("a".into());
        // Job 5 comes first in queue order (higher priority) but may not
        // take the held node.
        let out = plan(&snapshot, &[pending(5, 50, 1), nine]);
        let placed: Vec<(u64, &str)> = out
            .placements
            .iter()
            .map(|p| (p.job, p.node.as_str()))
            .collect();
        assert_eq!(placed, [(9, "a")]);
        assert_eq!(out.unplaced.len(), 1);
        assert_eq!(out.unplaced[0].job, 5);
        // While its victims still run, it waits there and preempts nothing more.
        let mut snapshot = snapshot_with_victim_running();
        snapshot.nodes[0].held_for = Some(9);
        let mut nine = pending(9, 10, 2);
        nine.held_node = Some("a".into());
        let out = plan(&snapshot, &[nine]);
        assert!(out.preemptions.is_empty());
        assert_eq!(
            out.unplaced[0].reason.to_string(),
            "waiting for the jobs it preempted on node a to stop; capacity held"
        );
    }

    fn snapshot_with_victim_running() -> ClusterSnapshot {
        snapshot(
            &["a", "b"],
            &[
                (1, "a", 0, true, 100, &[0, 1]),
                (2, "b", 0, true, 100, &[0, 1]),
            ],
        )
    }

    #[test]
    fn preemption_can_be_turned_off() {
        let mut snapshot = snapshot(&["a"], &[(1, "a", 0, true, 100, &[0, 1])]);
        snapshot.policy.preemption.enabled = false;
        assert_eq!(render(&plan(&snapshot, &[pending(9, 10, 1)])), "");
    }
}
