//! Gang placement (`nodes: N`) as tables: all members at once on distinct
//! nodes or none, the provider (label) constraint, the closest-fit reason,
//! determinism, and all-or-nothing at 10,000 nodes. Each case also checks
//! that the full-scan oracle gives the same plan as the index.

use std::collections::BTreeSet;

use gantry_scheduler::place::{Search, plan_with};
use gantry_scheduler::units::format_bytes;
use gantry_scheduler::{
    ClusterSnapshot, GangRequest, GpuView, JobKind, JobRequest, LockMode, LockRequest, NodeView,
    Plan, Resources, plan,
};

const GIB: u64 = 1 << 30;

fn node(name: &str, provider: &str, gpus: u32, free_gib: u64) -> NodeView {
    NodeView {
        name: name.into(),
        provider: provider.into(),
        heard_from: true,
        gpus: (0..gpus)
            .map(|index| GpuView {
                index,
                model: "H100".into(),
                total: free_gib * GIB,
                ..Default::default()
            })
            .collect(),
        cpu_millis_total: 64_000,
        memory_total: 512 * GIB,
        disk_total: 2048 * GIB,
        rtt_ms: 10.0,
        ..Default::default()
    }
}

fn single(id: u64, gpus: u32, gib: u64) -> JobRequest {
    JobRequest {
        id,
        kind: JobKind::Training,
        submitted_at_ms: id,
        exclusive_gpu: true,
        resources: Resources {
            gpus,
            gpu_memory: Some(gib * GIB),
            cpu_millis: 1000,
            memory: GIB,
            disk: 0,
        },
        ..Default::default()
    }
}

/// The `size` members of a gang whose rank 0 is job `first`.
fn gang(first: u64, size: u32, gpus: u32, gib: u64, same_label: Option<&str>) -> Vec<JobRequest> {
    (0..size)
        .map(|rank| JobRequest {
            gang: Some(GangRequest {
                id: first,
                rank,
                size,
                same_label: same_label.map(str::to_string),
            }),
            submitted_at_ms: first,
            ..single(first + u64::from(rank), gpus, gib)
        })
        .collect()
}

fn fleet(nodes: Vec<NodeView>) -> ClusterSnapshot {
    ClusterSnapshot {
        now_ms: 1_000_000,
        nodes,
        ..Default::default()
    }
}

fn render(plan: &Plan) -> String {
    let mut lines = Vec::new();
    for p in &plan.placements {
        lines.push(format!(
            "{} -> {} {:?} {}",
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
fn members_go_to_distinct_nodes_all_at_once() {
    // One node could hold both members' GPUs; a gang still takes two nodes.
    let nodes = vec![node("a", "", 8, 80), node("b", "", 8, 80)];
    check(
        &fleet(nodes),
        &gang(1, 2, 2, 40, None),
        "1 -> a [0, 1] 40GiB
         2 -> b [0, 1] 40GiB",
    );
}

#[test]
fn a_gang_that_does_not_fit_takes_nothing() {
    // Two nodes for a gang of three: nothing is placed, and the single job
    // after it still gets the best node (nothing was reserved for the gang).
    let nodes = vec![node("a", "", 1, 80), node("b", "", 1, 80)];
    let mut queue = gang(1, 3, 1, 40, None);
    queue.push(single(4, 1, 40));
    check(
        &fleet(nodes),
        &queue,
        "4 -> a [0] 40GiB
         1 waits: gang of 3 needs 3 nodes with 1 GPUs x 40GiB free; 2 have
         2 waits: gang of 3 needs 3 nodes with 1 GPUs x 40GiB free; 2 have
         3 waits: gang of 3 needs 3 nodes with 1 GPUs x 40GiB free; 2 have",
    );
}

#[test]
fn one_provider_per_gang_and_the_closest_fit_is_named() {
    let nodes = vec![
        node("h1", "hetzner", 2, 80),
        node("l1", "lambda", 2, 80),
        node("l2", "lambda", 2, 80),
        node("l3", "lambda", 2, 80),
        node("v1", "vast", 2, 80),
        node("v2", "vast", 2, 80),
    ];
    // Four nodes exist, but no provider has four.
    check(
        &fleet(nodes.clone()),
        &gang(1, 4, 2, 40, Some("provider")),
        "1 waits: gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider; best provider lambda has 3
         2 waits: gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider; best provider lambda has 3
         3 waits: gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider; best provider lambda has 3
         4 waits: gang of 4 needs 4 nodes with 2 GPUs x 40GiB free in one provider; best provider lambda has 3",
    );
    // Three fit in lambda (the first provider by name that takes them all).
    check(
        &fleet(nodes.clone()),
        &gang(1, 3, 2, 40, Some("provider")),
        "1 -> l1 [0, 1] 40GiB
         2 -> l2 [0, 1] 40GiB
         3 -> l3 [0, 1] 40GiB",
    );
    // Without the constraint the gang spreads over providers.
    check(
        &fleet(nodes),
        &gang(1, 4, 2, 40, None),
        "1 -> h1 [0, 1] 40GiB
         2 -> l1 [0, 1] 40GiB
         3 -> l2 [0, 1] 40GiB
         4 -> l3 [0, 1] 40GiB",
    );
}

#[test]
fn a_region_label_constrains_like_a_provider() {
    let mut nodes = vec![
        node("a", "lambda", 1, 80),
        node("b", "vast", 1, 80),
        node("c", "lambda", 1, 80),
    ];
    nodes[0].labels.insert("region".into(), "eu".into());
    nodes[1].labels.insert("region".into(), "eu".into());
    nodes[2].labels.insert("region".into(), "us".into());
    check(
        &fleet(nodes),
        &gang(1, 2, 1, 40, Some("region")),
        "1 -> a [0] 40GiB
         2 -> b [0] 40GiB",
    );
}

#[test]
fn no_member_fits_anywhere_says_why() {
    let nodes = vec![node("a", "lambda", 1, 16), node("b", "lambda", 1, 16)];
    check(
        &fleet(nodes),
        &gang(1, 2, 1, 40, Some("provider")),
        "1 waits: gang of 2 needs 2 nodes with 1 GPUs x 40GiB free in one provider; best provider lambda has 0 (no node with 40GiB free on an idle GPU (best: a, 16GiB))
         2 waits: gang of 2 needs 2 nodes with 1 GPUs x 40GiB free in one provider; best provider lambda has 0 (no node with 40GiB free on an idle GPU (best: a, 16GiB))",
    );
}

#[test]
fn a_gang_waits_for_all_its_members_and_rank_0_holds_the_locks() {
    let nodes = vec![node("a", "", 1, 80), node("b", "", 1, 80)];
    // Rank 1 is not pending (in back-off, say): rank 0 waits.
    let queue = gang(1, 2, 1, 40, None);
    check(
        &fleet(nodes.clone()),
        &queue[..1],
        "1 waits: gang of 2: waiting for every member to be pending (1 are)",
    );
    // A lock held elsewhere holds the whole gang.
    let mut queue = gang(1, 2, 1, 40, None);
    queue[0].locks.push(LockRequest {
        name: "model/x".into(),
        mode: LockMode::Exclusive,
    });
    let mut snapshot = fleet(nodes);
    snapshot
        .locks
        .entry("model/x".into())
        .or_default()
        .exclusive = Some(9);
    check(
        &snapshot,
        &queue,
        "1 waits: lock model/x held by job 9
         2 waits: lock model/x held by job 9",
    );
}

#[test]
fn placement_is_deterministic_whatever_the_node_order() {
    let mut nodes: Vec<NodeView> = (0..20)
        .map(|i| node(&format!("n{i:02}"), ["lambda", "vast"][i % 2], 4, 80))
        .collect();
    let mut queue = gang(1, 4, 2, 40, Some("provider"));
    queue.extend(gang(5, 3, 4, 80, None));
    queue.push(single(8, 1, 10));
    let first = plan(&fleet(nodes.clone()), &queue);
    nodes.reverse();
    queue.reverse();
    assert_eq!(plan(&fleet(nodes), &queue), first);
    assert_eq!(first.placements.len(), 8);
}

/// 10,000 nodes x 8 GPUs: every gang is placed whole on distinct nodes in
/// one provider, or not at all; a gang larger than any provider waits.
#[test]
fn all_or_nothing_at_ten_thousand_nodes() {
    let providers = ["hetzner", "lambda", "onprem", "vast"];
    let nodes: Vec<NodeView> = (0..10_000)
        .map(|i| {
            let mut n = node(&format!("n{i:05}"), providers[i % 4], 8, 80);
            // Most GPUs busy: a 3-GPU member fits only where 3 are idle.
            for g in n.gpus.iter_mut().skip(2 + i % 6) {
                g.reserved = 80 * GIB;
                g.jobs = 1;
                g.exclusive = true;
            }
            n
        })
        .collect();
    let mut queue = Vec::new();
    let mut next = 1;
    let mut sizes = Vec::new();
    for k in 0..200u32 {
        let size = [2, 4, 8, 16, 64][(k % 5) as usize];
        queue.extend(gang(next, size, 3, 40, Some("provider")));
        sizes.push((next, size));
        next += u64::from(size);
    }
    // Seven idle GPUs: only on nodes i % 6 == 5, about 833 in each of
    // lambda and vast; a gang of 1,000 fits in no provider.
    queue.extend(gang(next, 1000, 7, 80, Some("provider")));
    let big = next;
    let snapshot = fleet(nodes);
    let out = plan(&snapshot, &queue);
    let provider_of = |name: &str| {
        let i: usize = name[1..].parse().unwrap();
        providers[i % 4]
    };
    for (first, size) in sizes {
        let placed: Vec<_> = out
            .placements
            .iter()
            .filter(|p| (first..first + u64::from(size)).contains(&p.job))
            .collect();
        assert!(
            placed.is_empty() || placed.len() == size as usize,
            "gang {first} partly placed"
        );
        let distinct: BTreeSet<&str> = placed.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(distinct.len(), placed.len(), "gang {first} shares a node");
        let provs: BTreeSet<&str> = placed.iter().map(|p| provider_of(&p.node)).collect();
        assert!(provs.len() <= 1, "gang {first} spans {provs:?}");
        assert!(!placed.is_empty(), "gang {first} should fit");
    }
    assert!(out.placements.iter().all(|p| p.job < big));
    let waits: Vec<_> = out.unplaced.iter().filter(|u| u.job >= big).collect();
    assert_eq!(waits.len(), 1000);
    assert!(
        waits[0].reason.to_string().starts_with(
            "gang of 1000 needs 1000 nodes with 7 GPUs x 80GiB free in one provider; best provider "
        ),
        "{}",
        waits[0].reason
    );
    // No node holds more than 8 GPUs' worth and every member is whole.
    assert_eq!(out.placements.len() + out.unplaced.len(), queue.len());
}
