//! Queue order: priority, then fair share across queues, then age.
//!
//! Within one priority level, queues (`JobRequest::queue`) share the GPUs by
//! weight (`Policy::queue_weights`, missing = 1), counting what each queue
//! already holds (`ClusterSnapshot::queue_usage`). Each job gets a finish
//! tag, as in weighted fair queuing: `(held + cost of this job and of the
//! queue's older jobs) / weight`, where a job's cost is its GPUs (at least
//! one, so CPU-only jobs still take turns), and jobs go in tag order. So
//! one user's 10,000 selfplay jobs sit behind another's single evaluation,
//! each queue stays first-in first-out, and a queue that already holds more
//! than its share waits while the others catch up: under contention the
//! GPUs held, hence GPU time, tend to the weights' ratio.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use crate::hash::FxBuild;
use crate::model::{JobRequest, Policy};

/// Fixed-point scale of the finish tags: weights up to 2^16 stay distinct.
const TAG_SCALE: u128 = 1 << 16;

/// Orders a queue for a pass. Returns indices into `queue`, first to place
/// first. `usage` is the GPUs each queue's running jobs hold. When
/// `favour_consumers` (the fleet is disk-pressured), consumer kinds (export,
/// training) go first within their priority level so the pressure drains.
/// Deterministic: ties end on the job id.
///
/// One sort: jobs grouped by (priority, class, queue), oldest first, which
/// is also each queue's order by finish tag (tags only grow along a
/// queue); each (priority, class) level is then a merge of its queues'
/// runs by (tag, age, id).
pub fn queue_order(
    queue: &[JobRequest],
    policy: &Policy,
    usage: &BTreeMap<String, u64>,
    favour_consumers: bool,
) -> Vec<usize> {
    let queues = QueueIds::of(queue, policy, usage);
    let class = |job: &JobRequest| u8::from(favour_consumers && !job.kind.consumes_data());

    // (priority, class, queue) packed high to low into one integer, so the
    // sort compares integers: priority descending, class, queue id.
    let mut by_queue: Vec<(u64, u64, u64, u32)> = queue
        .iter()
        .enumerate()
        .map(|(i, job)| {
            let priority = u64::from(u32::MAX - ((job.priority as u32) ^ 0x8000_0000));
            let group = (priority << 32) | (u64::from(class(job)) << 31) | u64::from(queues.of[i]);
            (group, job.submitted_at_ms, job.id, i as u32)
        })
        .collect();
    by_queue.sort_unstable();

    // Each job's finish tag, in `by_queue` order.
    let mut tags: Vec<u128> = Vec::with_capacity(queue.len());
    let mut group = None;
    let mut spent = 0u128;
    for &(g, _, _, i) in &by_queue {
        let (weight, held) = queues.figures[queues.of[i as usize] as usize];
        if group != Some(g) {
            group = Some(g);
            spent = u128::from(held);
        }
        spent += u128::from(queue[i as usize].resources.gpus.max(1));
        tags.push(spent * TAG_SCALE / weight);
    }

    // Merge each level's runs.
    let mut out = Vec::with_capacity(queue.len());
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut at = 0;
    while at < by_queue.len() {
        let level = by_queue[at].0 >> 31;
        runs.clear();
        let mut end = at;
        while end < by_queue.len() && by_queue[end].0 >> 31 == level {
            let start = end;
            while end < by_queue.len() && by_queue[end].0 == by_queue[start].0 {
                end += 1;
            }
            runs.push(start..end);
        }
        merge(&by_queue, &tags, &mut runs, &mut out);
        at = end;
    }
    out
}

/// A job's place within its level: (finish tag, submitted, id, queue index).
type MergeKey = (u128, u64, u64, u32);

/// Appends the queue indexes of `runs` (ranges of `by_queue`, each sorted
/// by finish tag, age, id) merged in that order.
fn merge(
    by_queue: &[(u64, u64, u64, u32)],
    tags: &[u128],
    runs: &mut [std::ops::Range<usize>],
    out: &mut Vec<usize>,
) {
    let key = |k: usize| (tags[k], by_queue[k].1, by_queue[k].2, by_queue[k].3);
    if let [run] = runs {
        out.extend(run.clone().map(|k| by_queue[k].3 as usize));
        return;
    }
    // Few queues per level: a heap of each run's head.
    let mut heads: BinaryHeap<Reverse<(MergeKey, usize)>> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.start < r.end)
        .map(|(r, run)| Reverse((key(run.start), r)))
        .collect();
    while let Some(Reverse((head, r))) = heads.pop() {
        out.push(head.3 as usize);
        let run = &mut runs[r];
        run.start += 1;
        if run.start < run.end {
            heads.push(Reverse((key(run.start), r)));
        }
    }
}

/// The queues of a pass as small integers, so sorts compare integers.
struct QueueIds {
    /// Each job's queue id.
    of: Vec<u32>,
    /// By queue id: (weight, GPUs held).
    figures: Vec<(u128, u64)>,
}

impl QueueIds {
    fn of(queue: &[JobRequest], policy: &Policy, usage: &BTreeMap<String, u64>) -> Self {
        let mut names: HashMap<&str, u32, FxBuild> = HashMap::default();
        let mut figures = Vec::new();
        // Jobs of one queue often come together: the last name is
        // compared before hashing.
        let mut last: Option<(&str, u32)> = None;
        // The first few names, by id.
        const FEW: usize = 8;
        let mut seen: Vec<&str> = Vec::with_capacity(FEW);
        let of = queue
            .iter()
            .map(|job| {
                let name = job.queue.as_str();
                if let Some((n, id)) = last
                    && n == name
                {
                    return id;
                }
                // A pass has a handful of queues: compare before hashing.
                if let Some(id) = seen.iter().position(|n| *n == name) {
                    last = Some((name, id as u32));
                    return id as u32;
                }
                let id = *names.entry(name).or_insert_with(|| {
                    if seen.len() < FEW {
                        seen.push(name);
                    }
                    let weight = policy.queue_weights.get(name).copied().unwrap_or(1);
                    let held = usage.get(name).copied().unwrap_or(0);
                    figures.push((u128::from(weight.max(1)), held));
                    figures.len() as u32 - 1
                });
                last = Some((name, id));
                id
            })
            .collect();
        QueueIds { of, figures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobKind;
    use proptest::prelude::Just;

    /// (id, priority, queue, submitted_at, kind)
    type Row = (u64, i32, &'static str, u64, JobKind);

    fn check(rows: &[Row], weights: &[(&str, u32)], favour_consumers: bool, expected: &[u64]) {
        check_held(rows, weights, &[], favour_consumers, expected);
    }

    fn check_held(
        rows: &[Row],
        weights: &[(&str, u32)],
        held: &[(&str, u64)],
        favour_consumers: bool,
        expected: &[u64],
    ) {
        let queue: Vec<JobRequest> = rows
            .iter()
            .map(|&(id, priority, queue, submitted_at_ms, kind)| JobRequest {
                id,
                priority,
                queue: queue.into(),
                submitted_at_ms,
                kind,
                ..Default::default()
            })
            .collect();
        let mut policy = Policy::default();
        for (name, weight) in weights {
            policy.queue_weights.insert(name.to_string(), *weight);
        }
        let usage = held.iter().map(|(q, n)| (q.to_string(), *n)).collect();
        let got: Vec<u64> = queue_order(&queue, &policy, &usage, favour_consumers)
            .into_iter()
            .map(|i| queue[i].id)
            .collect();
        assert_eq!(got, expected, "rows {rows:?}");
    }

    use JobKind::{Evaluation as E, Export as X, Selfplay as S, Training as T};

    /// The order as first written: every job's finish tag from a sort by
    /// queue, then a second sort of the whole queue by tag. The one-sort
    /// merge must give exactly this.
    fn two_sorts(
        queue: &[JobRequest],
        policy: &Policy,
        usage: &BTreeMap<String, u64>,
        favour_consumers: bool,
    ) -> Vec<usize> {
        let weight = |q: &str| u128::from(policy.queue_weights.get(q).copied().unwrap_or(1).max(1));
        let class = |job: &JobRequest| u8::from(favour_consumers && !job.kind.consumes_data());
        let mut by_queue: Vec<_> = queue
            .iter()
            .enumerate()
            .map(|(i, j)| {
                let q = j.queue.as_str();
                (Reverse(j.priority), class(j), q, j.submitted_at_ms, j.id, i)
            })
            .collect();
        by_queue.sort();
        let mut keyed = Vec::new();
        let mut group = None;
        let mut spent = 0u128;
        for &(priority, class, q, submitted, id, i) in &by_queue {
            if group != Some((priority, class, q)) {
                group = Some((priority, class, q));
                spent = u128::from(usage.get(q).copied().unwrap_or(0));
            }
            spent += u128::from(queue[i].resources.gpus.max(1));
            keyed.push((
                priority,
                class,
                spent * TAG_SCALE / weight(q),
                submitted,
                id,
                i,
            ));
        }
        keyed.sort();
        keyed.into_iter().map(|k| k.5).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn one_sort_and_merge_give_the_two_sorts_order(
            jobs in proptest::collection::vec(
                (0..4u64, -2..3i32, 0..5usize, 0..6u64, 0..4u32, 0..6usize),
                0..80,
            ),
            weights in proptest::collection::vec(
                proptest::prop_oneof![1..4u32, Just(0u32), Just(1u32 << 17), Just(u32::MAX)],
                5,
            ),
            held in proptest::collection::vec(0..6u64, 5),
            favour_consumers in proptest::bool::ANY,
        ) {
            const NAMES: [&str; 5] = ["", "alice", "bob", "carol", "dave"];
            let queue: Vec<JobRequest> = jobs
                .iter()
                .map(|&(id, priority, q, submitted_at_ms, gpus, kind)| JobRequest {
                    id,
                    priority,
                    queue: NAMES[q].into(),
                    submitted_at_ms,
                    kind: JobKind::ALL[kind],
                    resources: crate::model::Resources {
                        gpus,
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .collect();
            let mut policy = Policy::default();
            let mut usage = BTreeMap::new();
            for (q, name) in NAMES.iter().enumerate() {
                policy.queue_weights.insert(name.to_string(), weights[q]);
                usage.insert(name.to_string(), held[q]);
            }
            proptest::prop_assert_eq!(
                queue_order(&queue, &policy, &usage, favour_consumers),
                two_sorts(&queue, &policy, &usage, favour_consumers)
            );
        }
    }

    #[test]
    fn priority_then_age() {
        check(
            &[(1, 0, "", 10, S), (2, 5, "", 20, S), (3, 0, "", 5, S)],
            &[],
            false,
            &[2, 3, 1],
        );
        // Same age: the id decides.
        check(&[(9, 0, "", 10, S), (4, 0, "", 10, S)], &[], false, &[4, 9]);
    }

    #[test]
    fn queues_take_turns() {
        // alice floods with selfplay; bob's one evaluation goes second.
        let rows = [
            (1, 0, "alice", 1, S),
            (2, 0, "alice", 2, S),
            (3, 0, "alice", 3, S),
            (4, 0, "alice", 4, S),
            (5, 0, "bob", 50, E),
        ];
        check(&rows, &[], false, &[1, 5, 2, 3, 4]);
        // Weight 3 for alice: three of hers per round.
        check(&rows, &[("alice", 3)], false, &[1, 2, 3, 5, 4]);
        // Priority still wins over fairness.
        let mut urgent = rows;
        urgent[3].1 = 9;
        check(&urgent, &[], false, &[4, 1, 5, 2, 3]);
    }

    #[test]
    fn queues_holding_more_than_their_share_wait() {
        let rows = [
            (1, 0, "alice", 1, S),
            (2, 0, "alice", 2, S),
            (3, 0, "bob", 3, S),
            (4, 0, "bob", 4, S),
        ];
        // alice already holds 4 GPUs: bob's jobs go first.
        check_held(&rows, &[], &[("alice", 4)], false, &[3, 4, 1, 2]);
        // ... unless her weight covers them: 4 held / weight 4 = bob's 0 + 1.
        check_held(
            &rows,
            &[("alice", 4)],
            &[("alice", 3)],
            false,
            &[1, 3, 2, 4],
        );
        // Priority still wins over fairness.
        let mut urgent = rows;
        urgent[1].1 = 9;
        check_held(&urgent, &[], &[("alice", 100)], false, &[2, 3, 4, 1]);
    }

    #[test]
    fn consumers_first_under_fleet_pressure() {
        let rows = [
            (1, 0, "", 1, S),
            (2, 0, "", 2, X),
            (3, 0, "", 3, T),
            (4, 1, "", 4, S),
        ];
        check(&rows, &[], false, &[4, 1, 2, 3]);
        check(&rows, &[], true, &[4, 2, 3, 1]);
    }
}
