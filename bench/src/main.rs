//! `gantry-bench`: one subcommand per scenario. Each prints a human summary
//! whose first line is the headline figure, or with `--json` one JSON record.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gantry_bench::chaos::{ChaosConfig, ChaosReport};
use gantry_bench::e2e::{E2eConfig, E2eReport};
use gantry_bench::etcd::{EtcdConfig, EtcdReport};
use gantry_bench::heartbeats::{HeartbeatsConfig, HeartbeatsReport};
use gantry_bench::ray::RayReport;
use gantry_bench::sched::{
    SchedConfig, SchedReport, ShareBenchConfig, ShareBenchReport, run, run_share,
};
use gantry_bench::snapshot::{SnapshotConfig, SnapshotReport};
use gantry_bench::soak::{SoakConfig, SoakReport};

#[derive(Debug, Parser)]
#[command(name = "gantry-bench", about = "Gantry benchmarks and load generators")]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Pure placement throughput of the scheduler against a synthetic fleet.
    Sched(SchedArgs),
    /// End to end: three coordinator processes, simulated agents, gRPC
    /// submit load, then the leader killed.
    E2e(E2eArgs),
    /// Yardstick: a three-member etcd's put latency and throughput.
    Etcd(EtcdArgs),
    /// Heartbeat ingest: one coordinator process, a simulated fleet
    /// heartbeating on shared HTTP/2 connections; CPU, RSS, registration.
    Heartbeats(HeartbeatsArgs),
    /// Faults under load: agents and leaders killed, partitions, cancels
    /// racing; a checker counts double runs, leaks and recovery times.
    Chaos(ChaosArgs),
    /// Jobs finishing without end on one coordinator with retention scaled
    /// down: RSS, disk, history and submit latency every N jobs.
    Soak(SoakArgs),
    /// The performance-regression check CI runs: ratios measured in one
    /// process, compared with the baseline file; exits 3 on a drop past
    /// the allowed one (1 on an error).
    Ci(CiArgs),
    /// Ray's fractional-GPU task benchmark (8 fake GPUs, tasks of
    /// num_gpus=0.25) and `e2e` in the same run; Gantry's jobs/s as a
    /// ratio of Ray's tasks/s.
    Ray(RayArgs),
    /// A Raft snapshot of N active jobs: time to write and to install, as
    /// a file (now) and as one sled value (before), in this process.
    Snapshot(SnapshotArgs),
}

#[derive(Debug, Args)]
struct RayArgs {
    /// The Python that imports ray.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// Ray tasks.
    #[arg(long, default_value_t = 10_000)]
    tasks: u64,
    /// The `gantry` binary (default: the one next to this executable).
    #[arg(long)]
    gantry: Option<PathBuf>,
    /// Simulated agents (8 GPUs each) of Gantry's run.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Concurrent submitters of Gantry's run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of Gantry's submit load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CiArgs {
    /// The baseline file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/baseline.json"))]
    baseline: PathBuf,
    /// Measure this many runs and write the baseline file from them
    /// instead of checking.
    #[arg(long)]
    record: Option<usize>,
}

#[derive(Debug, Args)]
struct SnapshotArgs {
    /// Active (pending) jobs in the state.
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Measure in this process (`file`, the only way now); without it the
    /// measurement runs in a child process of its own.
    #[arg(long, hide = true)]
    only: Option<String>,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// The `gantry` binary (default: the one next to this executable).
    #[arg(long)]
    gantry: Option<PathBuf>,
    /// Simulated agents (8 GPUs each; jobs end as soon as they start).
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Jobs submitted in all.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: u64,
    /// A sample every this many jobs.
    #[arg(long, default_value_t = 100_000)]
    every: u64,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The coordinator's --job-retention for the run.
    #[arg(long, default_value = "10s")]
    job_retention: String,
    /// The coordinator's --max-retained-jobs for the run.
    #[arg(long, default_value_t = 10_000)]
    max_retained_jobs: u64,
    /// The coordinator's --history-retention for the run.
    #[arg(long, default_value = "2m")]
    history_retention: String,
    /// The coordinator's --history-max-bytes for the run.
    #[arg(long, default_value = "64MiB")]
    history_max_bytes: String,
    /// RUST_LOG for the coordinator.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ChaosArgs {
    /// How long faults are injected, e.g. 10m (the cluster then settles).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of every random choice (default: GANTRY_NEMESIS_SEED, else the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Agents, each with 2 fake H100s.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Jobs submitted per second.
    #[arg(long, default_value_t = 2.0)]
    jobs_per_second: f64,
    /// Leave agents alone (only leader kills, partitions and cancels).
    #[arg(long)]
    no_agent_kills: bool,
    /// RUST_LOG for the daemons.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SchedArgs {
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// Jobs in the queue.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Placements per scheduling pass (`max_placements_per_pass`).
    #[arg(long, default_value_t = 10_000)]
    pass_budget: usize,
    /// Passes given to the naive first-fit baseline.
    #[arg(long, default_value_t = 2)]
    naive_passes: usize,
    /// About this fraction of the jobs are gang members (`nodes: N`, 2 to
    /// 8 nodes in one provider), e.g. 0.1. The naive baseline places them
    /// one by one.
    #[arg(long, default_value_t = 0.0)]
    gang_fraction: f64,
    /// About this fraction of the single-node jobs are urgent (priority
    /// 20) and arrive once the fleet is full, so that passes search for
    /// preemption victims, e.g. 0.05.
    #[arg(long, default_value_t = 0.0)]
    urgent_fraction: f64,
    /// Run the fair-share scenario instead: queues QUEUE=WEIGHT,... always
    /// contended, e.g. a=1,b=3; reports the GPU time each received (use a
    /// smaller --nodes, e.g. 100: it runs --passes full passes).
    #[arg(long, value_parser = parse_weights)]
    fair_share: Option<Weights>,
    /// Passes of the fair-share scenario.
    #[arg(long, default_value_t = 2_000)]
    passes: u64,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// `--fair-share` parsed (a newtype: clap treats a bare `Vec` as many values).
#[derive(Debug, Clone)]
struct Weights(Vec<(String, u32)>);

fn parse_weights(text: &str) -> Result<Weights, String> {
    text.split(',')
        .map(|pair| {
            let (name, weight) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected QUEUE=WEIGHT"))?;
            match weight.trim().parse::<u32>() {
                Ok(w) if w >= 1 => Ok((name.trim().to_string(), w)),
                _ => Err(format!(
                    "{pair:?}: the weight must be a whole number of at least 1"
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Weights)
}

#[derive(Debug, Args)]
struct E2eArgs {
    /// The `gantry` binary (default: the one next to this executable).
    #[arg(long)]
    gantry: Option<PathBuf>,
    /// Simulated agents (8 GPUs each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Concurrent submitting tasks.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of submit load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Submit this many jobs instead of running for --duration.
    #[arg(long)]
    jobs: Option<u64>,
    /// Open loop: offer this many submits per second (for --duration, or
    /// --jobs submits), each timed from when it was due, instead of
    /// --concurrency closed-loop submitters.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Sequential submits measured before the load.
    #[arg(long, default_value_t = 200)]
    sequential: usize,
    /// RUST_LOG for the coordinators (info logs one line per submit).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Do not kill the leader at the end.
    #[arg(long)]
    no_failover: bool,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct HeartbeatsArgs {
    /// The `gantry` binary (default: the one next to this executable).
    #[arg(long)]
    gantry: Option<PathBuf>,
    /// Simulated agents (8 GPUs each).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Length of the measured steady window, e.g. 30s, 2m or 30.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Jobs submitted and kept running before the window (the RSS target
    /// is set at 100,000).
    #[arg(long, default_value_t = 0)]
    jobs: u64,
    /// Agent streams sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 250)]
    agents_per_connection: usize,
    /// The coordinator's --max-heartbeat-rate (default: its own, 10000).
    #[arg(long)]
    max_heartbeat_rate: Option<u32>,
    /// RUST_LOG for the coordinator.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// `30s`, `2m`, `500ms` or plain seconds.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?}: expected submits per second, above 0")),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 30s, 2m, 500ms"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?}: must be a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[derive(Debug, Args)]
struct EtcdArgs {
    /// The `etcd` binary (Debian: etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Sequential puts measured.
    #[arg(long, default_value_t = 1000)]
    puts: usize,
    /// Concurrent writers of the throughput phase (0 = skip it).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// `gantry` next to this executable.
fn default_gantry() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("gantry")))
        .unwrap_or_else(|| PathBuf::from("gantry"))
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

/// Prints a scenario's report (one JSON record with `--json`, else the human
/// summary) or its error; the report comes back for further checks.
fn print_report<R>(
    scenario: &str,
    json: bool,
    result: anyhow::Result<R>,
    to_json: impl Fn(&R) -> serde_json::Value,
    human: impl Fn(&R) -> String,
) -> Option<R> {
    match result {
        Ok(report) => {
            if json {
                println!("{}", to_json(&report));
            } else {
                println!("{}", human(&report));
            }
            Some(report)
        }
        Err(error) => {
            eprintln!("gantry-bench {scenario}: {error:#}");
            None
        }
    }
}

fn exit_code<R>(printed: Option<R>) -> ExitCode {
    if printed.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Scenario::Sched(SchedArgs {
            fair_share: Some(Weights(weights)),
            nodes,
            gpus_per_node,
            passes,
            json,
            ..
        }) => {
            let report = run_share(&ShareBenchConfig {
                nodes: nodes.max(1),
                gpus_per_node: gpus_per_node.max(1),
                weights,
                steps: passes.max(10),
            });
            exit_code(print_report(
                "sched",
                json,
                Ok(report),
                ShareBenchReport::to_json,
                ShareBenchReport::human,
            ))
        }
        Scenario::Sched(args) => {
            let report = run(&SchedConfig {
                nodes: args.nodes,
                gpus_per_node: args.gpus_per_node,
                jobs: args.jobs,
                seed: args.seed,
                pass_budget: args.pass_budget.max(1),
                naive_passes: args.naive_passes,
                gang_fraction: args.gang_fraction,
                urgent_fraction: args.urgent_fraction,
            });
            exit_code(print_report(
                "sched",
                args.json,
                Ok(report),
                SchedReport::to_json,
                SchedReport::human,
            ))
        }
        Scenario::E2e(args) => {
            let config = E2eConfig {
                gantry: args.gantry.unwrap_or_else(default_gantry),
                agents: args.agents.max(1),
                concurrency: args.concurrency.max(1),
                duration: seconds(args.duration),
                jobs: args.jobs,
                sequential: args.sequential,
                log_level: args.log_level,
                no_failover: args.no_failover,
                rate: args.rate,
            };
            let result = gantry_bench::e2e::run(&config);
            match print_report(
                "e2e",
                args.json,
                result,
                E2eReport::to_json,
                E2eReport::human,
            ) {
                Some(report) if report.lost > 0 => {
                    eprintln!("gantry-bench e2e: {} acknowledged jobs lost", report.lost);
                    ExitCode::FAILURE
                }
                Some(_) => ExitCode::SUCCESS,
                None => ExitCode::FAILURE,
            }
        }
        Scenario::Etcd(args) => {
            let config = EtcdConfig {
                etcd: args.etcd,
                puts: args.puts.max(1),
                concurrency: args.concurrency,
                duration: seconds(args.duration),
                value_size: args.value_size,
            };
            let result = gantry_bench::etcd::run(&config);
            exit_code(print_report(
                "etcd",
                args.json,
                result,
                EtcdReport::to_json,
                EtcdReport::human,
            ))
        }
        Scenario::Chaos(args) => {
            // The daemons are the `gantry` beside this executable, or GANTRY_BIN.
            let seed = match args.seed {
                Some(seed) => Ok(seed),
                None => gantry_integration_tests::nemesis::seed_from_env(),
            };
            let result = seed.and_then(|seed| {
                gantry_bench::chaos::run(&ChaosConfig {
                    duration: args.duration,
                    seed,
                    agents: args.agents.clamp(1, 64),
                    jobs_per_second: args.jobs_per_second.max(0.01),
                    agent_kills: !args.no_agent_kills,
                    log_level: args.log_level,
                })
            });
            match print_report(
                "chaos",
                args.json,
                result,
                ChaosReport::to_json,
                ChaosReport::human,
            ) {
                Some(report) if !report.run.verdict.violations.is_empty() => {
                    eprintln!(
                        "gantry-bench chaos: {} violations (seed {})",
                        report.run.verdict.violations.len(),
                        report.run.seed
                    );
                    ExitCode::FAILURE
                }
                Some(_) => ExitCode::SUCCESS,
                None => ExitCode::FAILURE,
            }
        }
        Scenario::Heartbeats(args) => {
            let config = HeartbeatsConfig {
                gantry: args.gantry.unwrap_or_else(default_gantry),
                agents: args.agents.max(1),
                duration: args.duration,
                jobs: args.jobs,
                agents_per_connection: args.agents_per_connection.max(1),
                max_heartbeat_rate: args.max_heartbeat_rate,
                log_level: args.log_level,
            };
            let result = gantry_bench::heartbeats::run(&config);
            let printed = print_report(
                "heartbeats",
                args.json,
                result,
                HeartbeatsReport::to_json,
                HeartbeatsReport::human,
            );
            exit_code(printed)
        }
        Scenario::Soak(args) => {
            let config = SoakConfig {
                gantry: args.gantry.unwrap_or_else(default_gantry),
                agents: args.agents.max(1),
                jobs: args.jobs,
                every: args.every.max(1),
                concurrency: args.concurrency.max(1),
                job_retention: args.job_retention,
                max_retained_jobs: args.max_retained_jobs,
                history_retention: args.history_retention,
                history_max_bytes: args.history_max_bytes,
                log_level: args.log_level,
            };
            let result = gantry_bench::soak::run(&config);
            exit_code(print_report(
                "soak",
                args.json,
                result,
                SoakReport::to_json,
                SoakReport::human,
            ))
        }
        Scenario::Ray(args) => {
            let e2e = E2eConfig {
                gantry: args.gantry.unwrap_or_else(default_gantry),
                agents: args.agents.max(1),
                concurrency: args.concurrency.max(1),
                duration: seconds(args.duration),
                jobs: None,
                sequential: 0,
                log_level: "warn".into(),
                no_failover: true,
                rate: None,
            };
            let result = gantry_bench::ray::run(&args.python, args.tasks.max(1), &e2e);
            exit_code(print_report(
                "ray",
                args.json,
                result,
                RayReport::to_json,
                RayReport::human,
            ))
        }
        Scenario::Ci(args) => match gantry_bench::ci::run(&args.baseline, args.record) {
            Ok(true) => ExitCode::SUCCESS,
            // A regression exits 3, so that CI tells it from an error (1).
            Ok(false) => ExitCode::from(3),
            Err(error) => {
                eprintln!("gantry-bench ci: {error:#}");
                ExitCode::FAILURE
            }
        },
        Scenario::Snapshot(args) => {
            let config = SnapshotConfig {
                jobs: args.jobs,
                only: args.only,
            };
            let result = gantry_bench::snapshot::run(&config);
            exit_code(print_report(
                "snapshot",
                args.json,
                result,
                SnapshotReport::to_json,
                SnapshotReport::human,
            ))
        }
    }
}
