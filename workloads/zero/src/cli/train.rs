//! `gantry-zero train`: fits the model on a window of recent rounds and
//! writes the candidate atomically. The pipeline gives this stage the
//! exclusive lock on the model (`locks:`), so no evaluation snapshots or
//! promotion runs while the candidate is rewritten.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_zero::checkpoint::{Checkpoint, ModelKind};
use gantry_zero::records::Samples;
use gantry_zero::train::{Losses, TrainConfig};
use gantry_zero::{atomic, npz};
use serde::{Deserialize, Serialize};

use super::data::{DataDir, GantryEnv, read_bounded, read_model, run_tag, write_json};

/// Flags of `train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The shared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Positions per gradient step (Gantry's `{batch_size}`).
    #[arg(long)]
    pub batch_size: usize,
    /// Rounds of data trained on: this one and the ones before it.
    #[arg(long, default_value_t = 4)]
    pub window: u32,
    /// Passes over the data.
    #[arg(long, default_value_t = 20)]
    pub epochs: u32,
    /// Step size (default: 0.1 for the linear model's gradient descent,
    /// 0.002 for the network's Adam).
    #[arg(long)]
    pub learning_rate: Option<f32>,
    /// Seed of the shuffle (default: from the job id and round).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `training.json` in the round's directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct TrainingReport {
    /// The round trained.
    pub round: u32,
    /// Rounds whose tensors were used.
    pub trained_on: Vec<u32>,
    /// Positions.
    pub samples: usize,
    /// Gradient steps.
    pub steps: u64,
    /// Positions per step.
    pub batch_size: usize,
    /// Passes.
    pub epochs: u32,
    /// Losses of the starting model (the best one).
    pub before: Losses,
    /// Losses of the candidate.
    pub after: Losses,
    /// The model trained (`linear` or `resnet`).
    pub model: ModelKind,
    /// Step size.
    pub learning_rate: f32,
    /// The round of the model training started from.
    pub started_from_round: u32,
    /// Wall time.
    pub seconds: f64,
    /// What Gantry told the job.
    pub gantry: GantryEnv,
}

/// Runs the stage.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.batch_size > super::selfplay::MAX_BATCH {
        bail!(
            "--batch-size: {} is not in 1..={}",
            args.batch_size,
            super::selfplay::MAX_BATCH
        );
    }
    if args.window == 0 || args.window > 1000 {
        bail!("--window: {} is not in 1..=1000", args.window);
    }
    if args.epochs == 0 || args.epochs > 10_000 {
        bail!("--epochs: {} is not in 1..=10000", args.epochs);
    }
    if let Some(rate) = args.learning_rate.filter(|r| !(*r > 0.0 && *r <= 10.0)) {
        bail!("--learning-rate: {rate} is not in (0, 10]");
    }
    let started = Instant::now();
    let data = DataDir::open(&args.data)?;
    let state = data.state()?;
    let round = state.round;
    let (all, trained_on) = load_window(&data, round, args.window)?;
    let best = read_model(&data.best())?;
    let kind = best.model.kind();
    let learning_rate = args
        .learning_rate
        .unwrap_or_else(|| kind.default_learning_rate());
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate,
        weight_decay: 1e-4,
        seed: args
            .seed
            .unwrap_or_else(|| super::default_seed(&run_tag(), round)),
    };
    // Training starts from the best model's weights (read fresh from its
    // file, so the best model itself is untouched).
    let started_from_round = best.round;
    let mut model = best.model;
    let report = model.train(&all, &config)?;
    let candidate = Checkpoint {
        round,
        trained_on: trained_on.clone(),
        samples: all.len(),
        model,
    };
    let bytes = candidate.encode()?;
    atomic::write(&data.candidate(), &bytes)
        .with_context(|| format!("cannot write {}", data.candidate().display()))?;
    let out = TrainingReport {
        round,
        trained_on,
        samples: report.samples,
        steps: report.steps,
        batch_size: args.batch_size,
        epochs: args.epochs,
        before: report.before,
        after: report.after,
        model: kind,
        learning_rate,
        started_from_round,
        seconds: started.elapsed().as_secs_f64(),
        gantry: GantryEnv::read(),
    };
    write_json(&data.round(round)?.join("training.json"), &out)?;
    println!(
        "round {round} train: {} positions from rounds {:?}, {} steps of {}; policy loss {:.3} -> {:.3}, \
         value loss {:.3} -> {:.3}; {} model started from round {}'s in {:.1}s",
        out.samples,
        out.trained_on,
        out.steps,
        out.batch_size,
        out.before.policy,
        out.after.policy,
        out.before.value,
        out.after.value,
        kind.name(),
        out.started_from_round,
        out.seconds
    );
    Ok(())
}

/// The tensors of `round` and up to `window - 1` rounds before it (older
/// rounds without tensors are skipped; this round's must exist).
fn load_window(data: &DataDir, round: u32, window: u32) -> anyhow::Result<(Samples, Vec<u32>)> {
    let mut all = Samples::default();
    let mut trained_on = Vec::new();
    for r in round.saturating_sub(window - 1).max(1)..=round {
        let path = data.round(r)?.join("train.npz");
        if !path.exists() {
            if r == round {
                bail!(
                    "round {round} has no tensors at {}: export has not run",
                    path.display()
                );
            }
            continue;
        }
        let bytes = read_bounded(&path, npz::MAX_BYTES as u64)?;
        let arrays = npz::decode(&bytes).with_context(|| format!("{}", path.display()))?;
        let samples = Samples::from_arrays(&arrays)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        all.extend(samples);
        trained_on.push(r);
    }
    Ok((all, trained_on))
}
