//! `gantry-bench`: one subcommand per scenario. Each prints a human summary
//! whose first line is the headline figure, or with `--json` one JSON record.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gantry_bench::sched::{SchedConfig, run};

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
    /// End to end: gRPC submit, Raft commit, dispatch (not built yet).
    E2e,
    /// 10,000 simulated agents heartbeating (not built yet).
    Heartbeats,
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
    /// Print one JSON record instead of the human summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Scenario::Sched(args) => {
            let report = run(&SchedConfig {
                nodes: args.nodes,
                gpus_per_node: args.gpus_per_node,
                jobs: args.jobs,
                seed: args.seed,
                pass_budget: args.pass_budget.max(1),
                naive_passes: args.naive_passes,
            });
            if args.json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.human());
            }
            ExitCode::SUCCESS
        }
        Scenario::E2e | Scenario::Heartbeats => {
            eprintln!("gantry-bench: scenario not built yet");
            ExitCode::FAILURE
        }
    }
}
