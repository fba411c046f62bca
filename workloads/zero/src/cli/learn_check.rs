//! `gantry-zero learn-check`: runs the loop from scratch for a few
//! generations in one process (the stages' own code and files, without
//! Gantry) and checks that it learns: the last trained model's greedy
//! policy (no search) beats a uniformly random player in at least
//! `--min-wins` of `--random-games` games, where the untrained model's does
//! not. Prints each generation's stage times, batch sizes and win rates,
//! and writes them to `learn-check.json` in the data directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_zero::checkpoint::ModelKind;
use gantry_zero::promote::Match;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use super::data::{DataDir, read_json, read_model, run_tag, write_json};
use super::evaluate::{EvaluateArgs, EvaluationReport, policy_vs_random};
use super::export::ExportArgs;
use super::promote::PromoteArgs;
use super::selfplay::{SelfplayArgs, SelfplayReport};
use super::train::{TrainArgs, TrainingReport};

/// Flags of `learn-check`.
#[derive(Debug, clap::Args)]
pub struct LearnCheckArgs {
    /// A new data directory for the loop (missing or empty).
    #[arg(long)]
    pub data: PathBuf,
    /// Generations (rounds of selfplay, export, train, evaluate, promote).
    #[arg(long, default_value_t = 2)]
    pub generations: u32,
    /// Self-play games per generation.
    #[arg(long, default_value_t = 128)]
    pub games: u32,
    /// Games played at once in self-play and evaluation (leaves per batch).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Simulations per move in self-play and evaluation.
    #[arg(long, default_value_t = 48)]
    pub simulations: u32,
    /// Positions per training step.
    #[arg(long, default_value_t = 128)]
    pub train_batch_size: usize,
    /// Passes over the window's positions per training.
    #[arg(long, default_value_t = 8)]
    pub epochs: u32,
    /// Games of the candidate against the previous best (search on both sides).
    #[arg(long, default_value_t = 20)]
    pub eval_games: u32,
    /// Games of each policy alone against a random player.
    #[arg(long, default_value_t = 100)]
    pub random_games: u32,
    /// Wins out of `--random-games` the trained policy needs (and the
    /// untrained one must not reach).
    #[arg(long, default_value_t = 90)]
    pub min_wins: u32,
    /// The model (default: resnet when built with the tch feature, else linear).
    #[arg(long)]
    pub model: Option<ModelKind>,
    /// Seed of every stage (each derives its own from it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Seconds each stage of a generation took.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StageSeconds {
    /// `selfplay`.
    pub selfplay: f64,
    /// `export`.
    pub export: f64,
    /// `train`.
    pub train: f64,
    /// `evaluate`.
    pub evaluate: f64,
    /// `promote`.
    pub promote: f64,
    /// The generation.
    pub total: f64,
}

/// One generation's numbers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Generation {
    /// The round.
    pub round: u32,
    /// Stage times.
    pub seconds: StageSeconds,
    /// Self-play positions played.
    pub positions: u64,
    /// Self-play evaluation batches: count and largest.
    pub selfplay_batches: (u64, usize),
    /// Positions trained on (this round and the window before it).
    pub trained_positions: usize,
    /// Policy loss before and after training.
    pub policy_loss: (f32, f32),
    /// Value loss before and after training.
    pub value_loss: (f32, f32),
    /// The candidate's score against the previous best (search on both sides).
    pub score_vs_best: f64,
    /// Whether it was promoted.
    pub promoted: bool,
    /// The candidate's policy alone against a random player.
    pub candidate_vs_random: Match,
    /// The previous best's policy alone against a random player.
    pub best_vs_random: Match,
}

/// `learn-check.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LearnCheckReport {
    /// The model.
    pub model: ModelKind,
    /// Each generation.
    pub generations: Vec<Generation>,
    /// The untrained policy against a random player.
    pub untrained_vs_random: Match,
    /// The last trained policy against a random player.
    pub trained_vs_random: Match,
    /// Wins needed.
    pub min_wins: u32,
    /// Whether the check passed.
    pub learned: bool,
    /// Wall time.
    pub seconds: f64,
}

/// Runs the check.
pub fn run(args: &LearnCheckArgs) -> anyhow::Result<()> {
    if args.generations == 0 || args.generations > 100 {
        bail!("--generations: {} is not in 1..=100", args.generations);
    }
    if args.min_wins > args.random_games {
        bail!(
            "--min-wins: {} is more than --random-games {}",
            args.min_wins,
            args.random_games
        );
    }
    if args.data.exists() && std::fs::read_dir(&args.data)?.next().is_some() {
        bail!(
            "--data: {} is not empty (learn-check starts a loop from scratch)",
            args.data.display()
        );
    }
    let started = Instant::now();
    let mut generations = Vec::new();
    let mut untrained = None;
    for g in 1..=args.generations {
        generations.push(generation(args, g, &mut untrained)?);
    }
    let data = DataDir::open(&args.data)?;
    let untrained = untrained.context("no untrained model was read")?;
    let trained = read_model(&data.candidate())?;
    let model = trained.model.kind();
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x5eed);
    let untrained_vs_random = policy_vs_random(&untrained, args.random_games, &mut rng)?;
    let trained_vs_random = policy_vs_random(&trained.model, args.random_games, &mut rng)?;
    let learned =
        trained_vs_random.wins >= args.min_wins && untrained_vs_random.wins < args.min_wins;
    let report = LearnCheckReport {
        model,
        generations,
        untrained_vs_random,
        trained_vs_random,
        min_wins: args.min_wins,
        learned,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_json(&args.data.join("learn-check.json"), &report)?;
    println!(
        "learn-check ({}): the untrained policy alone beats a random player in {}/{} games, \
         round {}'s trained policy in {}/{} (needed: {}, and the untrained under it); {:.1}s",
        model.name(),
        report.untrained_vs_random.wins,
        args.random_games,
        trained.round,
        report.trained_vs_random.wins,
        args.random_games,
        args.min_wins,
        report.seconds
    );
    if !learned {
        bail!("learn-check failed: the loop did not learn to beat a random player");
    }
    Ok(())
}

/// One generation: the five stages in order, timed.
fn generation(
    args: &LearnCheckArgs,
    g: u32,
    untrained: &mut Option<gantry_zero::checkpoint::Model>,
) -> anyhow::Result<Generation> {
    let data_path = args.data.clone();
    let seed = args.seed.wrapping_mul(1000).wrapping_add(u64::from(g));
    let mut seconds = StageSeconds::default();
    let begun = Instant::now();
    let time = |slot: &mut f64, run: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let at = Instant::now();
        run()?;
        *slot = at.elapsed().as_secs_f64();
        Ok(())
    };
    time(&mut seconds.selfplay, &|| {
        super::selfplay::run(&SelfplayArgs {
            data: data_path.clone(),
            games: args.games,
            batch_size: args.batch_size,
            simulations: Some(args.simulations),
            seed: Some(seed),
            model: args.model,
            rollout_weight: None,
        })
    })?;
    let data = DataDir::open(&args.data)?;
    if untrained.is_none() {
        // Round 1's self-play created the untrained best model.
        *untrained = Some(read_model(&data.best())?.model);
    }
    time(&mut seconds.export, &|| {
        super::export::run(&ExportArgs {
            data: data_path.clone(),
            round: None,
        })
    })?;
    time(&mut seconds.train, &|| {
        super::train::run(&TrainArgs {
            data: data_path.clone(),
            batch_size: args.train_batch_size,
            window: 4,
            epochs: args.epochs,
            learning_rate: None,
            seed: Some(seed),
        })
    })?;
    time(&mut seconds.evaluate, &|| {
        super::evaluate::run(&EvaluateArgs {
            data: data_path.clone(),
            candidate: Some(data.candidate()),
            best: Some(data.best()),
            games: args.eval_games,
            simulations: args.simulations,
            batch_size: args.batch_size,
            random_games: args.random_games,
            seed: Some(seed),
            rollout_weight: None,
        })
    })?;
    let round_dir = data.round(g)?;
    time(&mut seconds.promote, &|| {
        super::promote::run(&PromoteArgs {
            data: data_path.clone(),
            threshold: 0.55,
            stall_rounds: 2,
            max_simulations: 800,
        })
    })?;
    seconds.total = begun.elapsed().as_secs_f64();
    let state = data.state()?;
    if state.round != g + 1 {
        bail!("round {g}: promote left the loop at round {}", state.round);
    }
    let report = generation_report(&round_dir, g, seconds, state.best_round == g)?;
    let s = &report.seconds;
    println!(
        "generation {g}: {:.1}s (selfplay {:.1}, export {:.2}, train {:.1}, evaluate {:.1}, promote {:.2}); \
         vs previous best {:.2}{}; policy alone vs random {}/{}",
        s.total,
        s.selfplay,
        s.export,
        s.train,
        s.evaluate,
        s.promote,
        report.score_vs_best,
        if report.promoted { ", promoted" } else { "" },
        report.candidate_vs_random.wins,
        report.candidate_vs_random.games(),
    );
    Ok(report)
}

/// The numbers of round `g` from the reports its stages wrote.
fn generation_report(
    dir: &Path,
    g: u32,
    seconds: StageSeconds,
    promoted: bool,
) -> anyhow::Result<Generation> {
    let selfplay: SelfplayReport = read_json(&dir.join(format!("selfplay-{}.json", run_tag())))?;
    let training: TrainingReport = read_json(&dir.join("training.json"))?;
    let evaluation: EvaluationReport = read_json(&dir.join("evaluation.json"))?;
    Ok(Generation {
        round: g,
        seconds,
        positions: selfplay.positions,
        selfplay_batches: (selfplay.batches.batches, selfplay.batches.largest),
        trained_positions: training.samples,
        policy_loss: (training.before.policy, training.after.policy),
        value_loss: (training.before.value, training.after.value),
        score_vs_best: evaluation.score,
        promoted,
        candidate_vs_random: evaluation.vs_random.candidate,
        best_vs_random: evaluation.vs_random.best,
    })
}
