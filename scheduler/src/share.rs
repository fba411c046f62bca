//! Fair share, measured: a closed-loop simulation of a contended fleet in
//! which every queue always has work waiting. Jobs are placed by [`plan`]
//! pass after pass, run for their queue's duration and free their GPUs;
//! the GPU time each queue received over the window is what
//! `Policy::queue_weights` promises to divide by weight. Pure and
//! deterministic (time is a step counter): the scheduler's unit table and
//! `gantry-bench sched --fair-share` both run it.

use std::collections::{BTreeMap, VecDeque};

use crate::model::{ClusterSnapshot, GpuView, JobId, JobRequest, NodeView, Policy, Resources};
use crate::place::plan;

/// One queue's steady load.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueLoad {
    /// Queue name (`JobRequest::queue`).
    pub name: String,
    /// Its fair-share weight.
    pub weight: u32,
    /// GPUs per job.
    pub gpus_per_job: u32,
    /// How long each job runs, in steps.
    pub steps_per_job: u64,
}

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareConfig {
    /// Nodes in the fleet.
    pub nodes: usize,
    /// GPUs per node (80 GiB each).
    pub gpus_per_node: u32,
    /// The queues; each keeps at least a fleet's worth of jobs waiting.
    pub queues: Vec<QueueLoad>,
    /// Steps simulated; one scheduling pass per step.
    pub steps: u64,
    /// Steps at the start left out of the measurement (the fleet fills up
    /// in arrival order before shares can settle).
    pub warmup: u64,
}

/// GPU time per queue over the measured window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShareReport {
    /// GPU-steps each queue held over the window, by queue name.
    pub gpu_steps: BTreeMap<String, u64>,
    /// Placements made over the whole run.
    pub placements: u64,
}

impl ShareReport {
    /// Each queue's fraction of the GPU time given out.
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let total = self.gpu_steps.values().sum::<u64>().max(1) as f64;
        self.gpu_steps
            .iter()
            .map(|(q, &s)| (q.clone(), s as f64 / total))
            .collect()
    }
}

const GIB: u64 = 1 << 30;

/// A running job: where, until when, for which queue.
struct Running {
    node: usize,
    gpus: Vec<u32>,
    queue: usize,
    gpus_held: u64,
    until: u64,
}

/// Runs the simulation.
pub fn simulate(config: &ShareConfig) -> ShareReport {
    let mut snapshot = ClusterSnapshot {
        nodes: (0..config.nodes)
            .map(|i| NodeView {
                name: format!("n{i:05}"),
                heard_from: true,
                gpus: (0..config.gpus_per_node)
                    .map(|index| GpuView {
                        index,
                        model: "H100".into(),
                        total: 80 * GIB,
                        ..Default::default()
                    })
                    .collect(),
                cpu_millis_total: u64::MAX / 4,
                memory_total: u64::MAX / 4,
                ..Default::default()
            })
            .collect(),
        policy: Policy {
            queue_weights: config
                .queues
                .iter()
                .map(|q| (q.name.clone(), q.weight))
                .collect(),
            ..Policy::default()
        },
        ..Default::default()
    };
    let node_index: BTreeMap<String, usize> = snapshot
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let fleet_gpus = config.nodes as u64 * u64::from(config.gpus_per_node);
    let mut waiting: Vec<VecDeque<JobRequest>> = vec![VecDeque::new(); config.queues.len()];
    let mut running: BTreeMap<JobId, Running> = BTreeMap::new();
    let mut next_id: JobId = 1;
    let mut report = ShareReport::default();
    for step in 0..config.steps {
        // Jobs that end now free their GPUs.
        let ended: Vec<JobId> = running
            .iter()
            .filter(|(_, r)| r.until <= step)
            .map(|(&id, _)| id)
            .collect();
        for id in ended {
            let Some(r) = running.remove(&id) else {
                continue;
            };
            for gpu in snapshot.nodes[r.node]
                .gpus
                .iter_mut()
                .filter(|g| r.gpus.contains(&g.index))
            {
                gpu.reserved = 0;
                gpu.jobs = 0;
                gpu.exclusive = false;
            }
            let name = &config.queues[r.queue].name;
            if let Some(held) = snapshot.queue_usage.get_mut(name) {
                *held = held.saturating_sub(r.gpus_held);
            }
        }
        // Every queue keeps a fleet's worth of work waiting.
        for (q, load) in config.queues.iter().enumerate() {
            let per_job = u64::from(load.gpus_per_job.max(1));
            while (waiting[q].len() as u64) * per_job < fleet_gpus {
                waiting[q].push_back(JobRequest {
                    id: next_id,
                    submitted_at_ms: step,
                    queue: load.name.clone(),
                    exclusive_gpu: true,
                    resources: Resources {
                        gpus: load.gpus_per_job,
                        gpu_memory: Some(80 * GIB),
                        ..Default::default()
                    },
                    ..Default::default()
                });
                next_id += 1;
            }
        }
        let queue: Vec<JobRequest> = waiting.iter().flatten().cloned().collect();
        let queue_of: BTreeMap<JobId, usize> = waiting
            .iter()
            .enumerate()
            .flat_map(|(q, jobs)| jobs.iter().map(move |j| (j.id, q)))
            .collect();
        snapshot.now_ms = step;
        let out = plan(&snapshot, &queue);
        for p in &out.placements {
            let (Some(&q), Some(&node)) = (queue_of.get(&p.job), node_index.get(&p.node)) else {
                continue;
            };
            for gpu in snapshot.nodes[node]
                .gpus
                .iter_mut()
                .filter(|g| p.gpus.contains(&g.index))
            {
                gpu.reserved += p.gpu_memory;
                gpu.jobs += 1;
                gpu.exclusive |= p.exclusive_gpu;
            }
            let gpus_held = p.gpus.len().max(1) as u64;
            *snapshot
                .queue_usage
                .entry(config.queues[q].name.clone())
                .or_default() += gpus_held;
            running.insert(
                p.job,
                Running {
                    node,
                    gpus: p.gpus.clone(),
                    queue: q,
                    gpus_held,
                    until: step + config.queues[q].steps_per_job.max(1),
                },
            );
            report.placements += 1;
        }
        for jobs in &mut waiting {
            jobs.retain(|j| !running.contains_key(&j.id));
        }
        if step >= config.warmup {
            for load in &config.queues {
                let held = snapshot.queue_usage.get(&load.name).copied().unwrap_or(0);
                *report.gpu_steps.entry(load.name.clone()).or_default() += held;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, weight, GPUs per job, steps per job)
    type Row = (&'static str, u32, u32, u64);

    /// Runs a contended window and returns each queue's share of GPU time
    /// over its weight's share (1.0 = exactly fair).
    fn fairness(rows: &[Row]) -> Vec<(String, f64)> {
        let config = ShareConfig {
            nodes: 8,
            gpus_per_node: 8,
            queues: rows
                .iter()
                .map(|&(name, weight, gpus_per_job, steps_per_job)| QueueLoad {
                    name: name.into(),
                    weight,
                    gpus_per_job,
                    steps_per_job,
                })
                .collect(),
            steps: 3_000,
            warmup: 200,
        };
        let report = simulate(&config);
        assert!(report.placements > 0);
        let shares = report.shares();
        let weights: u32 = rows.iter().map(|r| r.1).sum();
        rows.iter()
            .map(|&(name, weight, ..)| {
                let fair = f64::from(weight) / f64::from(weights);
                (
                    name.to_string(),
                    shares.get(name).copied().unwrap_or(0.0) / fair,
                )
            })
            .collect()
    }

    /// Under contention, weights 1:3 give GPU time within 10% of 1:3,
    /// whatever the queues' job sizes and lengths.
    #[test]
    fn gpu_time_follows_weights() {
        let cases: &[&[Row]] = &[
            // Same jobs.
            &[("a", 1, 1, 10), ("b", 3, 1, 10)],
            // The light queue's jobs are bigger and longer: counting jobs
            // placed (not GPUs held) would give it far more than a quarter.
            &[("a", 1, 2, 30), ("b", 3, 1, 7)],
            // The heavy queue's jobs are bigger and longer.
            &[("a", 1, 1, 5), ("b", 3, 4, 23)],
            // Equal weights, unequal jobs.
            &[("a", 1, 1, 3), ("b", 1, 2, 40)],
            // Three queues.
            &[("a", 1, 1, 11), ("b", 2, 2, 13), ("c", 5, 1, 17)],
        ];
        for rows in cases {
            for (name, ratio) in fairness(rows) {
                assert!(
                    (0.9..=1.1).contains(&ratio),
                    "queue {name} got {ratio:.3} of its fair share in {rows:?}"
                );
            }
        }
    }

    #[test]
    fn same_config_same_report() {
        let config = ShareConfig {
            nodes: 3,
            gpus_per_node: 4,
            queues: vec![
                QueueLoad {
                    name: "a".into(),
                    weight: 1,
                    gpus_per_job: 1,
                    steps_per_job: 4,
                },
                QueueLoad {
                    name: "b".into(),
                    weight: 2,
                    gpus_per_job: 2,
                    steps_per_job: 3,
                },
            ],
            steps: 100,
            warmup: 10,
        };
        assert_eq!(simulate(&config), simulate(&config));
    }
}
