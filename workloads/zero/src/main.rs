//! The `gantry-zero` binary: one subcommand per stage of the loop.

mod cli;

use clap::{Parser, Subcommand};

/// An AlphaZero-style Connect Four loop whose stages run as Gantry jobs.
#[derive(Debug, Parser)]
#[command(name = "gantry-zero", version)]
struct Args {
    #[command(subcommand)]
    stage: Stage,
}

#[derive(Debug, Subcommand)]
enum Stage {
    /// Play games of the best model against itself; write each finished game.
    Selfplay(cli::selfplay::SelfplayArgs),
    /// Turn a round's games into training tensors (NPZ).
    Export(cli::export::ExportArgs),
    /// Train the candidate on recent rounds' tensors.
    Train(cli::train::TrainArgs),
    /// Play the candidate against the best model (from snapshot copies).
    Evaluate(cli::evaluate::EvaluateArgs),
    /// Replace the best model if the candidate won enough; rate it; set the next round.
    Promote(cli::promote::PromoteArgs),
    /// Run the loop from scratch for a few generations and check that it learns.
    LearnCheck(cli::learn_check::LearnCheckArgs),
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match &args.stage {
        Stage::Selfplay(a) => cli::selfplay::run(a),
        Stage::Export(a) => cli::export::run(a),
        Stage::Train(a) => cli::train::run(a),
        Stage::Evaluate(a) => cli::evaluate::run(a),
        Stage::Promote(a) => cli::promote::run(a),
        Stage::LearnCheck(a) => cli::learn_check::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
