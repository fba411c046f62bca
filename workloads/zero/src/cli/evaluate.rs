//! `gantry-zero evaluate`: plays the candidate against the best model with
//! alternating colours, both searching with their own priors, and each
//! one's policy alone (no search) against a uniformly random player. Reads
//! both models from the snapshot copies Gantry made before the job started
//! (`$GANTRY_SNAPSHOT_DIR`), never from the live files a training may be
//! rewriting.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_zero::checkpoint::{Model, ModelKind};
use gantry_zero::game::{Board, COLUMNS};
use gantry_zero::mcts::{SearchConfig, Tree, choose_move, search_split};
use gantry_zero::model::{BatchLog, Counted, Evaluator};
use gantry_zero::promote::Match;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::data::{
    DataDir, GantryEnv, MAX_MODEL_BYTES, parse_model, read_bounded, read_model, run_tag, write_json,
};
use super::selfplay::check_rollout_weight;

/// Flags of `evaluate`.
#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
    /// The shared data directory (the result is written there).
    #[arg(long)]
    pub data: PathBuf,
    /// The candidate model (default: `$GANTRY_SNAPSHOT_DIR/candidate.bin`).
    #[arg(long)]
    pub candidate: Option<PathBuf>,
    /// The best model (default: `$GANTRY_SNAPSHOT_DIR/best.bin`).
    #[arg(long)]
    pub best: Option<PathBuf>,
    /// Games against the best model (colours alternate).
    #[arg(long, default_value_t = 20)]
    pub games: u32,
    /// Simulations per move.
    #[arg(long, default_value_t = 32)]
    pub simulations: u32,
    /// Games played at once (Gantry's `{batch_size}`).
    #[arg(long)]
    pub batch_size: usize,
    /// Games of each model's policy alone against a random player.
    #[arg(long, default_value_t = 100)]
    pub random_games: u32,
    /// Seed (default: from the job id, attempt and round).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Weight of a random rollout in a leaf's value, in [0, 1] (default:
    /// 1 for the linear model, 0.5 for the network).
    #[arg(long)]
    pub rollout_weight: Option<f32>,
}

/// `evaluation.json` in the round's directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// The round evaluated.
    pub round: u32,
    /// The candidate's round (equal to `round`).
    pub candidate_round: u32,
    /// The best model's round.
    pub best_round: u32,
    /// CRC-32 of the candidate file evaluated (promote checks it promotes that file).
    pub candidate_crc32: u32,
    /// The candidate's games against the best model.
    pub result: Match,
    /// Its score (wins and half the draws, over games).
    pub score: f64,
    /// Each model's policy alone against a uniformly random player.
    pub vs_random: VsRandom,
    /// Simulations per move.
    pub simulations: u32,
    /// Games at once.
    pub batch_size: usize,
    /// Evaluations of both models together.
    pub batches: BatchLog,
    /// The candidate's model (`linear` or `resnet`).
    pub model: ModelKind,
    /// Weight of the random rollout in a leaf's value.
    pub rollout_weight: f32,
    /// Where the models were read from.
    pub read_from: Vec<PathBuf>,
    /// Wall time.
    pub seconds: f64,
    /// What Gantry told the job.
    pub gantry: GantryEnv,
}

/// Policy-only games against a random player.
#[derive(Debug, Serialize, Deserialize)]
pub struct VsRandom {
    /// The candidate's.
    pub candidate: Match,
    /// The best model's.
    pub best: Match,
}

fn snapshot_file(given: &Option<PathBuf>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.clone());
    }
    match std::env::var_os("GANTRY_SNAPSHOT_DIR") {
        Some(dir) => Ok(Path::new(&dir).join(name)),
        None => bail!(
            "{flag}: not given and GANTRY_SNAPSHOT_DIR is not set (run under Gantry with snapshot: entries)"
        ),
    }
}

/// Runs the stage.
pub fn run(args: &EvaluateArgs) -> anyhow::Result<()> {
    if args.games == 0 || args.games > 100_000 {
        bail!("--games: {} is not in 1..=100000", args.games);
    }
    if args.simulations == 0 || args.simulations > 100_000 {
        bail!("--simulations: {} is not in 1..=100000", args.simulations);
    }
    if args.batch_size == 0 || args.batch_size > super::selfplay::MAX_BATCH {
        bail!(
            "--batch-size: {} is not in 1..={}",
            args.batch_size,
            super::selfplay::MAX_BATCH
        );
    }
    if args.random_games > 100_000 {
        bail!("--random-games: {} is over 100000", args.random_games);
    }
    check_rollout_weight(args.rollout_weight)?;
    let started = Instant::now();
    let data = DataDir::open(&args.data)?;
    let state = data.state()?;
    let candidate_path = snapshot_file(&args.candidate, "candidate.bin", "--candidate")?;
    let best_path = snapshot_file(&args.best, "best.bin", "--best")?;
    let candidate_bytes = read_bounded(&candidate_path, MAX_MODEL_BYTES)?;
    // Parsed from the bytes whose CRC the report records.
    let candidate = parse_model(&candidate_path, &candidate_bytes)?;
    let best = read_model(&best_path)?;
    let kind = candidate.model.kind();
    let rollout_weight = args
        .rollout_weight
        .unwrap_or_else(|| kind.default_rollout_weight());
    if candidate.round != state.round {
        bail!(
            "the candidate is from round {}, the loop is at round {}: train has not run this round",
            candidate.round,
            state.round
        );
    }
    let seed = args
        .seed
        .unwrap_or_else(|| super::default_seed(&run_tag(), state.round));
    let mut rng = SmallRng::seed_from_u64(seed);
    let (result, batches) = play_match(
        &candidate.model,
        &best.model,
        args,
        rollout_weight,
        &mut rng,
    )?;
    let vs_random = VsRandom {
        candidate: policy_vs_random(&candidate.model, args.random_games, &mut rng)?,
        best: policy_vs_random(&best.model, args.random_games, &mut rng)?,
    };
    let report = EvaluationReport {
        round: state.round,
        candidate_round: candidate.round,
        best_round: best.round,
        candidate_crc32: crc32fast::hash(&candidate_bytes),
        score: result.score(),
        result,
        vs_random,
        simulations: args.simulations,
        batch_size: args.batch_size,
        batches,
        model: kind,
        rollout_weight,
        read_from: vec![candidate_path, best_path],
        seconds: started.elapsed().as_secs_f64(),
        gantry: GantryEnv::read(),
    };
    write_json(&data.round(state.round)?.join("evaluation.json"), &report)?;
    println!(
        "round {} evaluate: candidate {}-{}-{} (score {:.2}) against round {}'s model; \
         policy alone vs random: candidate {:.2}, best {:.2}; batch {}",
        report.round,
        result.wins,
        result.losses,
        result.draws,
        report.score,
        report.best_round,
        report.vs_random.candidate.score(),
        report.vs_random.best.score(),
        report.batch_size
    );
    Ok(())
}

/// Plays `args.games` games, `args.batch_size` at once; the candidate moves
/// first in the even ones.
fn play_match(
    candidate: &Model,
    best: &Model,
    args: &EvaluateArgs,
    rollout_weight: f32,
    rng: &mut SmallRng,
) -> anyhow::Result<(Match, BatchLog)> {
    let mut ours =
        Counted::new(candidate.evaluator(rollout_weight, SmallRng::seed_from_u64(rng.random())));
    let mut theirs =
        Counted::new(best.evaluator(rollout_weight, SmallRng::seed_from_u64(rng.random())));
    // No root noise: each side plays its best; the first two moves are
    // drawn from the visits so that the games differ.
    let config = SearchConfig {
        noise_weight: 0.0,
        ..SearchConfig::default()
    };
    let mut result = Match::default();
    let mut playing: Vec<(Board, usize)> = Vec::new();
    let mut begun = 0;
    while begun < args.games || !playing.is_empty() {
        while playing.len() < args.batch_size && begun < args.games {
            // (board, the candidate's player)
            playing.push((Board::new(), (begun % 2) as usize));
            begun += 1;
        }
        let mut trees: Vec<Tree> = playing
            .iter()
            .map(|(b, _)| Tree::new(*b, config, None))
            .collect();
        let owners: Vec<usize> = playing
            .iter()
            .map(|(b, ours)| usize::from(b.to_move() != *ours))
            .collect();
        search_split(
            &mut trees,
            &owners,
            args.simulations,
            &mut [&mut ours as &mut dyn Evaluator, &mut theirs],
        )?;
        for ((board, _), tree) in playing.iter_mut().zip(&trees) {
            let explore = board.plies() < 2;
            let column =
                choose_move(&tree.visits(), explore, rng).context("a search chose no move")?;
            board.play(column)?;
        }
        playing.retain(|(board, ours)| match board.outcome() {
            None => true,
            Some(outcome) => {
                result.record(outcome.value_for(*ours));
                false
            }
        });
    }
    let mut batches = ours.batches.clone();
    batches.add(&theirs.batches);
    Ok((result, batches))
}

/// The model's greedy policy (no search) against uniformly random moves,
/// colours alternating.
pub fn policy_vs_random(model: &Model, games: u32, rng: &mut SmallRng) -> anyhow::Result<Match> {
    let mut result = Match::default();
    for game in 0..games {
        let ours = (game % 2) as usize;
        let mut board = Board::new();
        let outcome = loop {
            if let Some(outcome) = board.outcome() {
                break outcome;
            }
            let column = if board.to_move() == ours {
                model.greedy_move(&board)?
            } else {
                let legal: Vec<usize> = (0..COLUMNS).filter(|&c| board.is_legal(c)).collect();
                legal.get(rng.random_range(0..legal.len().max(1))).copied()
            };
            board.play(column.context("no legal move in a game that goes on")?)?;
        };
        result.record(outcome.value_for(ours));
    }
    Ok(result)
}
