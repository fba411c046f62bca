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
use std::collections::{BTreeMap, HashMap};

use crate::hash::FxBuild;
use crate::model::{JobRequest, Policy};

/// Fixed-point scale of the finish tags: weights up to 2^16 stay distinct.
const TAG_SCALE: u128 = 1 << 16;

/// Orders a queue for a pass. Returns indices into `queue`, first to place
/// first. `usage` is the GPUs each queue's running jobs hold. When
/// `favour_consumers` (the fleet is disk-pressured), consumer kinds (export,
/// training) go first within their priority level so the pressure drains.
/// Deterministic: ties end on the job id.
pub fn queue_order(
    queue: &[JobRequest],
    policy: &Policy,
    usage: &BTreeMap<String, u64>,
    favour_consumers: bool,
) -> Vec<usize> {
    // Queue names become small integers once, so the sorts compare integers.
    // Each carries (id, weight, GPUs held).
    let mut names: HashMap<&str, (u32, u128, u64), FxBuild> = HashMap::default();
    let ids: Vec<(u32, u128, u64)> = queue
        .iter()
        .map(|job| {
            let next = names.len() as u32;
            *names.entry(job.queue.as_str()).or_insert_with(|| {
                let weight = policy.queue_weights.get(&job.queue).copied().unwrap_or(1);
                let held = usage.get(&job.queue).copied().unwrap_or(0);
                (next, u128::from(weight.max(1)), held)
            })
        })
        .collect();
    let class = |job: &JobRequest| u8::from(favour_consumers && !job.kind.consumes_data());

    // First sort: group by (priority, class, queue), oldest first in each,
    // to add up every job's cost in its queue.
    let mut by_queue: Vec<(Reverse<i32>, u8, u32, u64, u64, usize)> = queue
        .iter()
        .enumerate()
        .map(|(i, job)| {
            (
                Reverse(job.priority),
                class(job),
                ids[i].0,
                job.submitted_at_ms,
                job.id,
                i,
            )
        })
        .collect();
    by_queue.sort_unstable();

    // Second sort: (priority, class, finish tag, age, id).
    let mut keyed: Vec<(Reverse<i32>, u8, u128, u64, u64, usize)> = Vec::with_capacity(queue.len());
    let mut group: Option<(Reverse<i32>, u8, u32)> = None;
    let mut spent = 0u128;
    for &(priority, class, queue_id, submitted, id, i) in &by_queue {
        let (_, weight, held) = ids[i];
        if group != Some((priority, class, queue_id)) {
            group = Some((priority, class, queue_id));
            spent = u128::from(held);
        }
        spent += u128::from(queue[i].resources.gpus.max(1));
        keyed.push((
            priority,
            class,
            spent * TAG_SCALE / weight,
            submitted,
            id,
            i,
        ));
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|k| k.5).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobKind;

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
