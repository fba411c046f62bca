//! The nemesis: a three-replica set behind controllable proxies, agents with
//! fake GPUs, a steady load of ledger jobs ([`crate::ledger`]) with cancels
//! racing their assignment and their retry back-off ([`crate::load`]), and
//! seeded faults: agents killed with SIGKILL and restarted, the leader
//! killed and restarted, a replica cut off from the others, and an agent
//! killed together with the leader. Once the faults stop, a node dies
//! (agent and job processes) with the leader and stays dead (it must go
//! Down, its jobs run elsewhere), the cluster is let go quiet, and the
//! checker ([`crate::verdict`]) judges the ledger and every replica's
//! storage.
//!
//! Everything random comes from the seed (faults, job shapes, cancels), so
//! `GANTRY_NEMESIS_SEED` replays a run's choices; the timing of processes
//! is the machine's. Shared by `integration-tests/tests/nemesis.rs` (short)
//! and `gantry-bench chaos` (long).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use gantry_coordinator::domain::AttemptOutcome;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Sandbox;
use crate::check::{check_replicas, read_replicas};
use crate::ledger::{Execution, LedgerWatch};
use crate::load::{Load, LoadPlan};
use crate::verdict::{Ground, Stored, Verdict, Violation, check};

use cluster::Cluster;

mod cluster;

/// How long a recovery step may take before the run fails.
const RECOVERY: Duration = Duration::from_secs(40);

/// Milliseconds since the Unix epoch (the ledger's clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a nemesis run does.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// How long faults are injected.
    pub faults_for: Duration,
    /// Agents (nodes).
    pub agents: usize,
    /// Fake GPUs of each agent (`--fake-gpus`).
    pub fake_gpus: String,
    /// Jobs submitted per second while faults run.
    pub jobs_per_second: f64,
    /// Whether agents are killed (the fault class that the agent supervisor
    /// makes survivable).
    pub agent_kills: bool,
    /// How long the cluster gets to go quiet after the faults.
    pub settle: Duration,
    /// `RUST_LOG` of the daemons.
    pub log_filter: String,
    /// Print a line per fault to stderr.
    pub progress: bool,
}

impl NemesisConfig {
    /// The short run of the test suite: about 60 s of faults on 4 agents.
    pub fn short(seed: u64, agent_kills: bool) -> NemesisConfig {
        NemesisConfig {
            seed,
            faults_for: Duration::from_secs(60),
            agents: 4,
            fake_gpus: "2xH100-80GiB".into(),
            jobs_per_second: 1.5,
            agent_kills,
            settle: Duration::from_secs(90),
            log_filter: "info".into(),
            progress: true,
        }
    }
}

/// `GANTRY_NEMESIS_SEED`, or a fresh seed from the clock.
pub fn seed_from_env() -> anyhow::Result<u64> {
    match std::env::var("GANTRY_NEMESIS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("GANTRY_NEMESIS_SEED: {text:?} is not a number")),
        Err(_) => Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)),
    }
}

/// `GANTRY_NEMESIS_AGENT_KILLS` (`1`/`true` or `0`/`false`), else `default`.
pub fn agent_kills_from_env(default: bool) -> anyhow::Result<bool> {
    match std::env::var("GANTRY_NEMESIS_AGENT_KILLS") {
        Ok(text) => match text.trim() {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            other => {
                anyhow::bail!("GANTRY_NEMESIS_AGENT_KILLS: {other:?} is not 0, 1, true or false")
            }
        },
        Err(_) => Ok(default),
    }
}

/// A class of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL an agent, restart it 1-4 s later.
    AgentKill,
    /// SIGKILL the leader, restart it 1-3 s later.
    LeaderKill,
    /// Cut a replica's Raft links for 2-5 s.
    Partition,
    /// SIGKILL an agent, then the leader within a second; both restart.
    AgentAndLeaderKill,
}

impl FaultKind {
    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::AgentKill => "agent-kill",
            FaultKind::LeaderKill => "leader-kill",
            FaultKind::Partition => "partition",
            FaultKind::AgentAndLeaderKill => "agent-and-leader-kill",
        }
    }

    /// The classes a run draws from, with weights.
    fn weighted(agent_kills: bool) -> Vec<(FaultKind, u32)> {
        let mut classes = vec![(FaultKind::LeaderKill, 2), (FaultKind::Partition, 2)];
        if agent_kills {
            classes.push((FaultKind::AgentKill, 4));
            classes.push((FaultKind::AgentAndLeaderKill, 1));
        }
        classes
    }
}

/// An agent that was down: when it was killed, restarted and seen ready.
#[derive(Debug, Clone)]
pub struct Outage {
    /// Its node.
    pub node: String,
    /// When it was killed (ms).
    pub killed_ms: u64,
    /// When it was restarted (None: left dead).
    pub restarted_ms: Option<u64>,
    /// When the leader first showed it ready again after the restart.
    pub ready_ms: Option<u64>,
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Class.
    pub kind: FaultKind,
    /// When it began (ms).
    pub at_ms: u64,
    /// What it hit (replica id or node), for the log.
    pub target: String,
    /// The agent it took down, if any.
    pub outage: Option<Outage>,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct NemesisReport {
    /// Its seed.
    pub seed: u64,
    /// The fault classes it drew from.
    pub classes: Vec<FaultKind>,
    /// Every fault.
    pub faults: Vec<Fault>,
    /// Acknowledged jobs.
    pub jobs: usize,
    /// Acknowledged cancels.
    pub cancels: usize,
    /// Submits that failed for good.
    pub submit_errors: usize,
    /// Processes the ledger saw.
    pub executions: usize,
    /// Whether every job ended (and dead nodes went Down) within the settle time.
    pub quiet: bool,
    /// The checker's finding.
    pub verdict: Verdict,
    /// From an agent kill to each of its jobs running again (re-adopted or
    /// restarted).
    pub kill_to_running: Vec<Duration>,
    /// From an agent restart to its jobs re-adopted.
    pub restart_to_adopted: Vec<Duration>,
    /// Jobs running on a killed agent that were not re-adopted.
    pub not_adopted: usize,
    /// Ledger processes still running at the very end, killed by pid.
    pub orphans_killed: usize,
    /// Whole run.
    pub elapsed: Duration,
}

impl NemesisReport {
    /// Faults injected.
    pub fn fault_cycles(&self) -> usize {
        self.faults.len()
    }

    /// Every violation, one per line.
    pub fn violations_text(&self) -> String {
        self.verdict
            .violations
            .iter()
            .map(|v| format!("  - {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Stops the load and the watcher and kills leftover job processes, on
/// every exit path (declared before the sandbox, so it runs after the
/// sandbox stopped the agents).
struct Cleanup {
    stops: Vec<Arc<AtomicBool>>,
    threads: Vec<JoinHandle<()>>,
    watch: Arc<Mutex<LedgerWatch>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for stop in &self.stops {
            stop.store(true, Ordering::Relaxed);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Ok(mut watch) = self.watch.lock() {
            let _ = watch.poll(now_ms());
            watch.kill_survivors();
        }
    }
}

/// Runs the nemesis and judges the outcome. An `Err` means the harness
/// could not run (a process would not start, no leader came back); broken
/// promises are in the report's verdict.
pub fn run(config: &NemesisConfig) -> anyhow::Result<NemesisReport> {
    let began = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("gantry-nemesis-")
        .tempdir()?;
    let ledger = dir.path().join("ledger");
    let watch = Arc::new(Mutex::new(LedgerWatch::new(&ledger)?));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_load = Arc::new(AtomicBool::new(false));
    let mut cleanup = Cleanup {
        stops: vec![stop_load.clone(), stop.clone()],
        threads: Vec::new(),
        watch: watch.clone(),
    };
    let mut sandbox = Sandbox::new()?;
    sandbox.set_log_filter(&config.log_filter);
    let mut cluster = Cluster::start(&mut sandbox, config)?;
    cleanup
        .threads
        .push(spawn_watcher(watch.clone(), stop.clone()));
    let load = Arc::new(Mutex::new(Load::default()));
    let plan = LoadPlan {
        addrs: cluster.addrs.clone(),
        dir: dir.path().to_path_buf(),
        ledger,
        seed: config.seed,
        jobs_per_second: config.jobs_per_second,
        netns: None,
    };
    cleanup.threads.push(crate::load::spawn(
        plan,
        load.clone(),
        watch.clone(),
        stop_load.clone(),
    ));

    let mut rng = StdRng::seed_from_u64(config.seed);
    let classes = FaultKind::weighted(config.agent_kills);
    let mut faults = inject_for(&mut cluster, &mut sandbox, &mut rng, config, &classes)?;
    stop_load.store(true, Ordering::Relaxed);
    if let Some(submitter) = cleanup.threads.pop() {
        let _ = submitter.join();
    }
    let mut dead_nodes = Vec::new();
    if config.agent_kills {
        // A node that dies (agent and jobs) together with the leader must
        // still go Down, and its jobs run elsewhere.
        let fault = cluster.kill_agent_and_leader(&mut sandbox, &mut rng, Some(&watch))?;
        dead_nodes.extend(fault.outage.as_ref().map(|o| o.node.clone()));
        faults.push(fault);
    }

    let quiet = cluster.settle(&sandbox, &dead_nodes, config.settle);
    let judged = judge(&mut cluster, &mut sandbox, &watch, &load, &dead_nodes)?;
    let load = lock(&load)?.clone();
    let (kill_to_running, restart_to_adopted, not_adopted) =
        recovery(&faults, &judged.executions, judged.stored.first());
    drop(sandbox);
    drop(cleanup);
    Ok(NemesisReport {
        seed: config.seed,
        classes: classes.iter().map(|(k, _)| *k).collect(),
        faults,
        jobs: load.acked.len(),
        cancels: load.cancels.len(),
        submit_errors: load.submit_errors,
        executions: judged.executions.len(),
        quiet,
        verdict: judged.verdict,
        kill_to_running,
        restart_to_adopted,
        not_adopted,
        orphans_killed: judged.orphans_killed,
        elapsed: began.elapsed(),
    })
}

/// What the checker found, with what it read.
struct Judged {
    executions: Vec<Execution>,
    stored: Vec<Stored>,
    verdict: Verdict,
    orphans_killed: usize,
}

/// Notes the processes alive now that the cluster should be quiet, stops
/// it, reads every replica's storage, kills leftover job processes, and
/// runs the checkers.
fn judge(
    cluster: &mut Cluster,
    sandbox: &mut Sandbox,
    watch: &Mutex<LedgerWatch>,
    load: &Mutex<Load>,
    dead_nodes: &[String],
) -> anyhow::Result<Judged> {
    let end_ms = now_ms();
    {
        let mut watch = lock(watch)?;
        watch.poll(end_ms)?;
        watch.mark_survivors();
    }
    cluster.stop_all(sandbox)?;
    let replicas = read_replicas(&cluster.parts.set.dirs)?;
    let stored = replicas
        .iter()
        .map(Stored::read)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let orphans_killed = lock(watch)?.kill_survivors();
    let executions = lock(watch)?.executions().to_vec();
    let load = lock(load)?.clone();
    let mut verdict = check(&Ground {
        executions: &executions,
        acknowledged: &load.acked,
        cancels: &load.cancels,
        stored: &stored,
        dead_nodes,
        end_ms,
    });
    if let Err(error) = check_replicas(&replicas) {
        verdict
            .violations
            .push(Violation::Replicas(format!("{error:#}")));
    }
    Ok(Judged {
        executions,
        stored,
        verdict,
        orphans_killed,
    })
}

/// Injects seeded faults from `classes` for `config.faults_for`.
fn inject_for(
    cluster: &mut Cluster,
    sandbox: &mut Sandbox,
    rng: &mut StdRng,
    config: &NemesisConfig,
    classes: &[(FaultKind, u32)],
) -> anyhow::Result<Vec<Fault>> {
    let mut faults = Vec::new();
    let until = Instant::now() + config.faults_for;
    while Instant::now() < until {
        let kind = pick(rng, classes);
        let fault = cluster.inject(sandbox, rng, kind)?;
        if config.progress {
            eprintln!(
                "nemesis: {} {} at {}",
                kind.name(),
                fault.target,
                fault.at_ms
            );
        }
        faults.push(fault);
        pause(rng, 500, 2_000);
    }
    Ok(faults)
}

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow::anyhow!("a nemesis thread panicked"))
}

fn pick(rng: &mut StdRng, classes: &[(FaultKind, u32)]) -> FaultKind {
    let total: u32 = classes.iter().map(|(_, w)| w).sum();
    let mut at = rng.random_range(0..total);
    for (kind, weight) in classes {
        if at < *weight {
            return *kind;
        }
        at -= weight;
    }
    classes[0].0
}

/// Sleeps a seeded time: the nemesis's schedule, not a wait for state.
fn pause(rng: &mut StdRng, from_ms: u64, to_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.random_range(from_ms..to_ms)));
}

/// Reads the ledger every 50 ms, so a killed process is seen dead promptly.
fn spawn_watcher(watch: Arc<Mutex<LedgerWatch>>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut watch) = watch.lock()
                && let Err(error) = watch.poll(now_ms())
            {
                eprintln!("nemesis: ledger: {error:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// From the faults, the ledger and the stored jobs: for each process that
/// ran on an agent when it was killed, the time until its job ran again
/// (re-adopted: its agent was ready again and its exit was collected under
/// the same attempt; else the job's next process), and from the restart to
/// the re-adoption. Returns those and how many were not re-adopted.
fn recovery(
    faults: &[Fault],
    executions: &[Execution],
    stored: Option<&Stored>,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let (mut to_running, mut to_adopted, mut not_adopted) = (Vec::new(), Vec::new(), 0);
    let ms = |from: u64, to: u64| Duration::from_millis(to.saturating_sub(from));
    for outage in faults.iter().filter_map(|f| f.outage.as_ref()) {
        let killed = outage.killed_ms;
        let hit = executions
            .iter()
            .filter(|e| e.node == outage.node && e.started_ms <= killed && e.until_ms() > killed);
        for run in hit {
            let collected = stored
                .and_then(|s| s.jobs.get(&run.job))
                .and_then(|job| job.attempts.iter().find(|a| a.attempt == run.attempt))
                .is_some_and(|a| {
                    a.node == outage.node
                        && matches!(
                            a.outcome,
                            Some(
                                AttemptOutcome::Succeeded
                                    | AttemptOutcome::Failed
                                    | AttemptOutcome::Cancelled
                            )
                        )
                });
            match (collected, outage.restarted_ms, outage.ready_ms) {
                (true, Some(restarted), Some(ready)) => {
                    to_running.push(ms(killed, ready));
                    to_adopted.push(ms(restarted, ready));
                }
                _ => {
                    not_adopted += 1;
                    let next = executions
                        .iter()
                        .filter(|e| e.job == run.job && e.started_ms > killed)
                        .map(|e| e.started_ms)
                        .min();
                    to_running.extend(next.map(|at| ms(killed, at)));
                }
            }
        }
    }
    (to_running, to_adopted, not_adopted)
}

/// One line saying what a run does and how to replay it.
pub fn describe(config: &NemesisConfig) -> String {
    format!(
        "seed {} (GANTRY_NEMESIS_SEED={} reproduces the choices), {} agents x {}, {:?} of faults, {} jobs/s, agent kills {}",
        config.seed,
        config.seed,
        config.agents,
        config.fake_gpus,
        config.faults_for,
        config.jobs_per_second,
        if config.agent_kills {
            "on"
        } else {
            "off (GANTRY_NEMESIS_AGENT_KILLS=1 turns them on)"
        }
    )
}

#[cfg(test)]
mod tests;
