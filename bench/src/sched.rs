//! `gantry-bench sched`: pure placement throughput. A synthetic fleet and
//! queue go through repeated scheduling passes (each bounded by a placement
//! budget, as the coordinator runs them); each pass is timed, its
//! placements applied to the snapshot the way the coordinator would, and
//! the placed jobs leave the queue and join the running jobs that later
//! passes may preempt (preemption is on, as in the coordinator; decided
//! preemptions are counted, not carried out). The same run is then
//! repeated with the naive first-fit baseline.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use gantry_scheduler::naive::plan_first_fit;
use gantry_scheduler::share::{QueueLoad, ShareConfig, ShareReport, simulate};
use gantry_scheduler::{
    ClusterSnapshot, HoldReason, JobId, JobRequest, Plan, Policy, Resources, RunningJob, plan,
};
use serde_json::{Value, json};

use crate::rng::Rng;
use crate::workload;

/// What to run.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Fleet size.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// Jobs in the queue.
    pub jobs: usize,
    /// Workload seed.
    pub seed: u64,
    /// `max_placements_per_pass`.
    pub pass_budget: usize,
    /// Passes given to the naive baseline (it is O(nodes) per job, so a
    /// full run would take minutes at 10,000 nodes).
    pub naive_passes: usize,
    /// About this fraction of the queue's jobs become members of gangs
    /// (`nodes: N`, N of 2, 4 or 8, 4 or 8 GPUs a node, one provider).
    pub gang_fraction: f64,
    /// About this fraction of the queue's single-node jobs are urgent
    /// (priority 20) and held back until a pass finds the fleet full:
    /// they then arrive at a full fleet, and the passes search for
    /// victims among the running jobs (preemption pressure).
    pub urgent_fraction: f64,
}

/// Figures of one planner over a run of passes.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Passes run.
    pub passes: usize,
    /// Jobs placed.
    pub placements: usize,
    /// Jobs still waiting at the end.
    pub waiting: usize,
    /// Time spent inside the planner.
    pub planning: Duration,
    /// CPU time the planner ran (`None` where the thread's CPU time cannot
    /// be read): on a shared machine, wall time also counts the time other
    /// processes held the CPU.
    pub planning_cpu: Option<Duration>,
    /// Each pass's duration, in order.
    pub pass_times: Vec<Duration>,
    /// Reserved / total GPU memory at the end.
    pub memory_utilisation: f64,
    /// GPUs holding at least one job at the end.
    pub gpus_busy: f64,
    /// Preemptions the passes decided (the bench does not carry them out:
    /// it measures the search).
    pub preemptions: usize,
    /// A digest of every plan of the run (placements, hold reasons,
    /// preemptions), computed outside the timed planner: two builds of the
    /// scheduler that plan alike give the same digest.
    pub plan_digest: u64,
}

impl RunReport {
    /// Placements per second of planner time.
    pub fn placements_per_s(&self) -> f64 {
        self.placements as f64 / self.planning.as_secs_f64().max(1e-9)
    }

    /// Placements per second of planner CPU time.
    pub fn placements_per_cpu_s(&self) -> Option<f64> {
        self.planning_cpu
            .map(|cpu| self.placements as f64 / cpu.as_secs_f64().max(1e-9))
    }

    /// The `q` quantile (nearest rank) of pass time, in ms.
    pub fn pass_ms(&self, q: f64) -> f64 {
        let mut times: Vec<Duration> = self.pass_times.clone();
        times.sort_unstable();
        if times.is_empty() {
            return 0.0;
        }
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
        times[rank - 1].as_secs_f64() * 1e3
    }

    fn to_json(&self) -> Value {
        json!({
            "passes": self.passes,
            "placements": self.placements,
            "waiting": self.waiting,
            "planning_s": self.planning.as_secs_f64(),
            "placements_per_s": self.placements_per_s(),
            "placements_per_cpu_s": self.placements_per_cpu_s(),
            "pass_p50_ms": self.pass_ms(0.5),
            "pass_p99_ms": self.pass_ms(0.99),
            "pass_max_ms": self.pass_ms(1.0),
            "gpu_memory_utilisation": self.memory_utilisation,
            "gpus_busy": self.gpus_busy,
            "preemptions": self.preemptions,
            "plan_digest": format!("{:016x}", self.plan_digest),
        })
    }
}

/// The scheduler against the naive baseline on one workload.
#[derive(Debug, Clone)]
pub struct SchedReport {
    /// What ran.
    pub config: SchedConfig,
    /// The indexed scheduler, until the queue stops draining.
    pub indexed: RunReport,
    /// The naive first-fit baseline, first `naive_passes` passes.
    pub naive: RunReport,
}

impl SchedReport {
    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        json!({
            "scenario": "sched",
            "nodes": c.nodes,
            "gpus_per_node": c.gpus_per_node,
            "jobs": c.jobs,
            "seed": c.seed,
            "gang_fraction": c.gang_fraction,
            "urgent_fraction": c.urgent_fraction,
            "pass_budget": c.pass_budget,
            "placements_per_s": self.indexed.placements_per_s(),
            "placements_per_cpu_s": self.indexed.placements_per_cpu_s(),
            "pass_p99_ms": self.indexed.pass_ms(0.99),
            "gpu_memory_utilisation": self.indexed.memory_utilisation,
            "indexed": self.indexed.to_json(),
            "naive_first_fit": self.naive.to_json(),
            "speedup": self.speedup(),
        })
    }

    /// Indexed placements/s over naive placements/s.
    pub fn speedup(&self) -> f64 {
        self.indexed.placements_per_s() / self.naive.placements_per_s().max(1e-9)
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let c = &self.config;
        let i = &self.indexed;
        let n = &self.naive;
        format!(
            "{:.0} placements/s\n\
             gantry-bench sched: {} nodes x {} GPUs, {} jobs ({:.0}% gang members, {:.0}% urgent late), seed {}, pass budget {}\n\
             indexed: {} placed in {} passes ({:.3} s planning, {}), {} waiting, {} preemptions decided, plan digest {:016x}\n\
             pass time: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
             GPU memory reserved: {:.1}%, GPUs busy: {:.1}%\n\
             naive first-fit ({} passes): {:.0} placements/s, pass p99 {:.1} ms, {} placed, memory reserved {:.1}%\n\
             index vs naive: {:.1}x placements/s",
            i.placements_per_s(),
            c.nodes,
            c.gpus_per_node,
            c.jobs,
            c.gang_fraction * 100.0,
            c.urgent_fraction * 100.0,
            c.seed,
            c.pass_budget,
            i.placements,
            i.passes,
            i.planning.as_secs_f64(),
            i.placements_per_cpu_s().map_or_else(
                || "CPU time unknown".to_string(),
                |r| format!("{r:.0} placements per CPU second")
            ),
            i.waiting,
            i.preemptions,
            i.plan_digest,
            i.pass_ms(0.5),
            i.pass_ms(0.99),
            i.pass_ms(1.0),
            i.memory_utilisation * 100.0,
            i.gpus_busy * 100.0,
            n.passes,
            n.placements_per_s(),
            n.pass_ms(0.99),
            n.placements,
            n.memory_utilisation * 100.0,
            self.speedup(),
        )
    }
}

/// Builds the workload and runs both planners on it.
pub fn run(config: &SchedConfig) -> SchedReport {
    let (snapshot, mut queue) = workload_for(config);
    let late = urgent(&mut queue, config.urgent_fraction, config.seed);
    let indexed = drive_with(
        snapshot.clone(),
        queue.clone(),
        late.clone(),
        plan,
        usize::MAX,
    );
    let naive = drive_with(snapshot, queue, late, plan_first_fit, config.naive_passes);
    SchedReport {
        config: config.clone(),
        indexed,
        naive,
    }
}

/// The seeded fleet and queue of a configuration.
pub fn workload_for(config: &SchedConfig) -> (ClusterSnapshot, Vec<JobRequest>) {
    let mut rng = Rng::new(config.seed);
    let policy = Policy {
        max_placements_per_pass: config.pass_budget,
        ..Default::default()
    };
    let snapshot = workload::fleet(config.nodes, config.gpus_per_node, policy, &mut rng);
    let mut queue = workload::jobs(config.jobs, &mut rng);
    if config.gang_fraction > 0.0 {
        workload::gangs(&mut queue, config.gang_fraction, &mut rng);
    }
    (snapshot, queue)
}

/// Takes about `fraction` of `queue`'s single-node jobs out of it, made
/// urgent (priority 20): the late wave of [`SchedConfig::urgent_fraction`].
fn urgent(queue: &mut Vec<JobRequest>, fraction: f64, seed: u64) -> Vec<JobRequest> {
    if fraction <= 0.0 {
        return Vec::new();
    }
    let mut rng = Rng::new(seed ^ 0x005e_ed0f_1a7e);
    let per_million = (fraction.clamp(0.0, 1.0) * 1e6) as u64;
    let mut late = Vec::new();
    queue.retain(|job| {
        if job.gang.is_none() && rng.below(1_000_000) < per_million {
            late.push(JobRequest {
                priority: 20,
                ..job.clone()
            });
            false
        } else {
            true
        }
    });
    late
}

type Planner = fn(&ClusterSnapshot, &[JobRequest]) -> Plan;

/// Runs passes until one places nothing or `max_passes` ran.
pub(crate) fn drive(
    snapshot: ClusterSnapshot,
    queue: Vec<JobRequest>,
    planner: Planner,
    max_passes: usize,
) -> RunReport {
    drive_with(snapshot, queue, Vec::new(), planner, max_passes)
}

/// [`drive`] with a late wave: `late` joins the queue after the first pass
/// that finds the fleet full (budget unused, a job without a fit).
fn drive_with(
    mut snapshot: ClusterSnapshot,
    mut queue: Vec<JobRequest>,
    mut late: Vec<JobRequest>,
    planner: Planner,
    max_passes: usize,
) -> RunReport {
    let nodes: HashMap<String, usize> = snapshot
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    let resources: HashMap<JobId, Resources> = queue
        .iter()
        .chain(&late)
        .map(|j| (j.id, j.resources.clone()))
        .collect();
    let mut report = RunReport {
        passes: 0,
        placements: 0,
        waiting: queue.len(),
        planning: Duration::ZERO,
        planning_cpu: Some(Duration::ZERO),
        pass_times: Vec::new(),
        memory_utilisation: 0.0,
        gpus_busy: 0.0,
        preemptions: 0,
        plan_digest: 0,
    };
    let jobs: HashMap<JobId, JobRequest> = queue
        .iter()
        .chain(&late)
        .map(|j| (j.id, j.clone()))
        .collect();
    while report.passes < max_passes && !queue.is_empty() {
        let cpu_start = crate::ci::cpu_now().ok();
        let start = Instant::now();
        let out = planner(&snapshot, &queue);
        let elapsed = start.elapsed();
        report.planning_cpu = match (report.planning_cpu, cpu_start, crate::ci::cpu_now().ok()) {
            (Some(total), Some(from), Some(to)) => Some(total + to.saturating_sub(from)),
            _ => None,
        };
        report.passes += 1;
        report.planning += elapsed;
        report.pass_times.push(elapsed);
        report.placements += out.placements.len();
        report.preemptions += out.preemptions.len();
        report.plan_digest = digest(report.plan_digest, &out);
        // The pass left budget unused and jobs without a fit: the fleet
        // is full.
        let full = out.placements.len() < snapshot.policy.max_placements_per_pass
            && out
                .unplaced
                .iter()
                .any(|u| matches!(u.reason, HoldReason::NoFit(_)));
        if full && !late.is_empty() {
            queue.append(&mut late);
        } else if out.placements.is_empty() {
            break;
        }
        apply(&mut snapshot, &out, &nodes, &resources);
        // Placed jobs run: later passes may look at them for preemption.
        for p in &out.placements {
            if let Some(job) = jobs.get(&p.job) {
                snapshot.running.push(RunningJob {
                    id: p.job,
                    node: p.node.clone(),
                    priority: job.priority,
                    preemptible: !job.kind.exclusive_gpu_by_default() && job.gang.is_none(),
                    started_at_ms: snapshot.now_ms,
                    gpus: p.gpus.clone(),
                    gpu_memory: p.gpu_memory,
                    exclusive_gpu: p.exclusive_gpu,
                    cpu_millis: job.resources.cpu_millis,
                    memory: job.resources.memory,
                    disk: job.resources.disk,
                    preempted_at_ms: Vec::new(),
                });
            }
        }
        let placed: HashSet<JobId> = out.placements.iter().map(|p| p.job).collect();
        queue.retain(|j| !placed.contains(&j.id));
    }
    report.waiting = queue.len();
    let (mut reserved, mut total, mut busy, mut gpus) = (0u128, 0u128, 0usize, 0usize);
    for g in snapshot.nodes.iter().flat_map(|n| &n.gpus) {
        reserved += u128::from(g.reserved);
        total += u128::from(g.total);
        busy += usize::from(g.jobs > 0);
        gpus += 1;
    }
    report.memory_utilisation = reserved as f64 / total.max(1) as f64;
    report.gpus_busy = busy as f64 / gpus.max(1) as f64;
    report
}

/// Folds `plan` into `seed`: every placement, hold reason (as shown) and
/// preemption, in order.
fn digest(seed: u64, plan: &Plan) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same across runs of one build.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    seed.hash(&mut h);
    for p in &plan.placements {
        (p.job, &p.node, &p.gpus, p.gpu_memory, p.batch_size).hash(&mut h);
        p.exclusive_gpu.hash(&mut h);
    }
    for u in &plan.unplaced {
        (u.job, u.reason.to_string()).hash(&mut h);
    }
    for p in &plan.preemptions {
        (p.job, &p.node, &p.victims, &p.reason).hash(&mut h);
    }
    h.finish()
}

/// Commits a plan to the snapshot the way the coordinator's apply step
/// does: reservations, job counts, exclusivity, host resources.
fn apply(
    snapshot: &mut ClusterSnapshot,
    out: &Plan,
    nodes: &HashMap<String, usize>,
    resources: &HashMap<JobId, Resources>,
) {
    for p in &out.placements {
        let Some(&n) = nodes.get(&p.node) else {
            continue;
        };
        let node = &mut snapshot.nodes[n];
        for g in node.gpus.iter_mut().filter(|g| p.gpus.contains(&g.index)) {
            g.reserved += p.gpu_memory;
            g.jobs += 1;
            g.exclusive |= p.exclusive_gpu;
        }
        if let Some(r) = resources.get(&p.job) {
            node.cpu_millis_reserved += r.cpu_millis;
            node.memory_reserved += r.memory;
            node.disk_reserved += r.disk;
        }
    }
}

/// The fair-share scenario: queues with weights, always contended.
#[derive(Debug, Clone)]
pub struct ShareBenchConfig {
    /// Fleet size.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// (queue, weight), in order.
    pub weights: Vec<(String, u32)>,
    /// Steps (scheduling passes) simulated.
    pub steps: u64,
}

/// What the fair-share scenario measured.
#[derive(Debug, Clone)]
pub struct ShareBenchReport {
    /// What ran.
    pub config: ShareBenchConfig,
    /// The queues as loaded (job sizes and lengths differ by queue).
    pub loads: Vec<QueueLoad>,
    /// The simulation's figures.
    pub report: ShareReport,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl ShareBenchReport {
    /// (queue, weight, fair share, measured share) per queue.
    pub fn rows(&self) -> Vec<(String, u32, f64, f64)> {
        let total: u32 = self.loads.iter().map(|l| l.weight).sum();
        let shares = self.report.shares();
        self.loads
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.weight,
                    f64::from(l.weight) / f64::from(total.max(1)),
                    shares.get(&l.name).copied().unwrap_or(0.0),
                )
            })
            .collect()
    }

    /// The largest relative gap between a queue's measured and fair share.
    pub fn worst_error(&self) -> f64 {
        self.rows()
            .iter()
            .map(|(_, _, fair, got)| (got / fair - 1.0).abs())
            .fold(0.0, f64::max)
    }

    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        let queues: Vec<Value> = self
            .rows()
            .into_iter()
            .zip(&self.loads)
            .map(|((name, weight, fair, got), load)| {
                json!({
                    "queue": name,
                    "weight": weight,
                    "gpus_per_job": load.gpus_per_job,
                    "steps_per_job": load.steps_per_job,
                    "fair_share": fair,
                    "measured_share": got,
                })
            })
            .collect();
        json!({
            "scenario": "sched-fair-share",
            "nodes": c.nodes,
            "gpus_per_node": c.gpus_per_node,
            "steps": c.steps,
            "placements": self.report.placements,
            "worst_relative_error": self.worst_error(),
            "queues": queues,
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "{:.1}% worst share error\n\
             gantry-bench sched --fair-share: {} nodes x {} GPUs, {} passes, {} placements, {:.1} s\n",
            self.worst_error() * 100.0,
            c.nodes,
            c.gpus_per_node,
            c.steps,
            self.report.placements,
            self.elapsed.as_secs_f64(),
        );
        for ((name, weight, fair, got), load) in self.rows().into_iter().zip(&self.loads) {
            out.push_str(&format!(
                "queue {name:?}: weight {weight}, jobs of {} GPU(s) x {} passes: GPU time {:.1}% (fair {:.1}%)\n",
                load.gpus_per_job,
                load.steps_per_job,
                got * 100.0,
                fair * 100.0
            ));
        }
        out.trim_end().to_string()
    }
}

/// Runs the fair-share scenario. Queues get different job shapes (1 or 2
/// GPUs, 10 to 31 passes long) so that fairness by jobs placed would
/// miss: the share is of GPU time.
pub fn run_share(config: &ShareBenchConfig) -> ShareBenchReport {
    let loads: Vec<QueueLoad> = config
        .weights
        .iter()
        .enumerate()
        .map(|(i, (name, weight))| QueueLoad {
            name: name.clone(),
            weight: *weight,
            gpus_per_job: 1 + (i as u32 % 2),
            steps_per_job: 10 + 7 * (i as u64 % 4),
        })
        .collect();
    let share = ShareConfig {
        nodes: config.nodes,
        gpus_per_node: config.gpus_per_node,
        queues: loads.clone(),
        steps: config.steps,
        warmup: config.steps / 10,
    };
    let start = Instant::now();
    let report = simulate(&share);
    ShareBenchReport {
        config: config.clone(),
        loads,
        report,
        elapsed: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_places_and_reports() {
        let config = SchedConfig {
            nodes: 50,
            gpus_per_node: 4,
            jobs: 500,
            seed: 3,
            pass_budget: 100,
            naive_passes: 2,
            gang_fraction: 0.1,
            urgent_fraction: 0.05,
        };
        let report = run(&config);
        assert!(report.indexed.placements > 0);
        assert!(report.indexed.passes >= 2);
        assert!(
            report.indexed.memory_utilisation > 0.0 && report.indexed.memory_utilisation <= 1.0
        );
        assert!(report.naive.passes <= 2);
        // Linux: the planner's CPU time is read per pass.
        assert!(
            report
                .indexed
                .placements_per_cpu_s()
                .is_some_and(|r| r > 0.0)
        );
        let human = report.human();
        let headline = human.lines().next().unwrap_or_default();
        assert!(headline.ends_with(" placements/s"), "{headline}");
        let record = report.to_json();
        assert_eq!(record["scenario"], "sched");
        assert_eq!(record["nodes"], 50);
        // Same seed, same workload, same plan outcome.
        assert_eq!(run(&config).indexed.placements, report.indexed.placements);
    }

    #[test]
    fn fair_share_reports_each_queue() {
        let report = run_share(&ShareBenchConfig {
            nodes: 4,
            gpus_per_node: 8,
            weights: vec![("a".into(), 1), ("b".into(), 3)],
            steps: 400,
        });
        let rows = report.rows();
        assert_eq!(rows.len(), 2);
        assert!(report.report.placements > 0);
        let record = report.to_json();
        assert_eq!(record["queues"][1]["weight"], 3);
        assert!(report.human().contains("queue \"b\": weight 3"));
    }
}
