//! `gantry-zero selfplay`: plays games of the best model against itself,
//! `--batch-size` of them at once, so that every simulation evaluates one
//! batch of that many leaves; writes each finished game atomically.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_zero::atomic;
use gantry_zero::checkpoint::{Checkpoint, ModelKind};
use gantry_zero::game::{Board, COLUMNS, Outcome};
use gantry_zero::mcts::{SearchConfig, Tree, choose_move, search};
use gantry_zero::model::{BatchLog, Counted};
use gantry_zero::promote::LoopState;
use gantry_zero::records::GameRecord;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use super::data::{DataDir, GantryEnv, read_model, run_tag, write_json};

/// Most games one job plays.
pub const MAX_GAMES: u32 = 100_000;
/// Largest batch of leaves.
pub const MAX_BATCH: usize = 65_536;

/// Flags of `selfplay`.
#[derive(Debug, clap::Args)]
pub struct SelfplayArgs {
    /// The shared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Games to play.
    #[arg(long, default_value_t = 64)]
    pub games: u32,
    /// Games played at once = leaves per evaluation batch (Gantry's `{batch_size}`).
    #[arg(long)]
    pub batch_size: usize,
    /// Simulations per move (default: the loop's feedback in state.json).
    #[arg(long)]
    pub simulations: Option<u32>,
    /// Seed (default: from the job id, attempt and round).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The model a new loop starts with, when there is no best model yet
    /// (default: resnet when built with the tch feature, else linear).
    #[arg(long)]
    pub model: Option<ModelKind>,
    /// Weight of a random rollout in a leaf's value, in [0, 1] (default:
    /// 1 for the linear model, 0.5 for the network).
    #[arg(long)]
    pub rollout_weight: Option<f32>,
}

/// Checks `--rollout-weight`.
pub fn check_rollout_weight(weight: Option<f32>) -> anyhow::Result<()> {
    match weight {
        Some(w) if !(0.0..=1.0).contains(&w) => bail!("--rollout-weight: {w} is not in [0, 1]"),
        _ => Ok(()),
    }
}

/// `selfplay-TAG.json` in the round's directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SelfplayReport {
    /// The round played.
    pub round: u32,
    /// Games written.
    pub games: u32,
    /// Results.
    pub first_wins: u32,
    /// Results.
    pub second_wins: u32,
    /// Results.
    pub draws: u32,
    /// Moves played.
    pub positions: u64,
    /// Simulations per move.
    pub simulations: u32,
    /// Exploratory opening moves.
    pub temperature_plies: u32,
    /// Games at once, and the most leaves per evaluation.
    pub batch_size: usize,
    /// Batches the evaluator saw.
    pub batches: BatchLog,
    /// The model that played (`linear` or `resnet`).
    pub model: ModelKind,
    /// Weight of the random rollout in a leaf's value.
    pub rollout_weight: f32,
    /// The round of the model that played (0: untrained).
    pub model_round: u32,
    /// Whether this job wrote the first (untrained) best model.
    pub created_best: bool,
    /// Wall time.
    pub seconds: f64,
    /// What Gantry told the job.
    pub gantry: GantryEnv,
}

struct Playing {
    board: Board,
    moves: Vec<u8>,
    visits: Vec<[u32; COLUMNS]>,
}

/// Runs the stage.
pub fn run(args: &SelfplayArgs) -> anyhow::Result<()> {
    if args.games == 0 || args.games > MAX_GAMES {
        bail!("--games: {} is not in 1..={MAX_GAMES}", args.games);
    }
    if args.batch_size == 0 || args.batch_size > MAX_BATCH {
        bail!(
            "--batch-size: {} is not in 1..={MAX_BATCH}",
            args.batch_size
        );
    }
    if args.simulations == Some(0) {
        bail!("--simulations: must be at least 1");
    }
    check_rollout_weight(args.rollout_weight)?;
    let started = Instant::now();
    let data = DataDir::open(&args.data)?;
    let state = data.state()?;
    let dir = data.round(state.round)?;
    let tag = run_tag();
    let seed = args
        .seed
        .unwrap_or_else(|| super::default_seed(&tag, state.round));
    let created_best = create_best(&data, args.model, seed)?;
    let best = read_model(&data.best())?;
    let kind = best.model.kind();
    if let Some(asked) = args.model.filter(|&asked| asked != kind) {
        bail!(
            "--model: {} asked, but {} holds a {} model",
            asked.name(),
            data.best().display(),
            kind.name()
        );
    }
    let simulations = args.simulations.unwrap_or(state.simulations);
    let rollout_weight = args
        .rollout_weight
        .unwrap_or_else(|| kind.default_rollout_weight());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut evaluator = Counted::new(best.model.evaluator(
        rollout_weight,
        SmallRng::seed_from_u64(seed.rotate_left(17)),
    ));
    let played = play(
        args,
        &state,
        simulations,
        &dir.join("games"),
        &tag,
        &mut rng,
        &mut evaluator,
    )?;
    let report = SelfplayReport {
        round: state.round,
        games: played.games,
        first_wins: played.results[0],
        second_wins: played.results[1],
        draws: played.results[2],
        positions: played.positions,
        simulations,
        temperature_plies: state.temperature_plies,
        batch_size: args.batch_size,
        batches: evaluator.batches.clone(),
        model: kind,
        rollout_weight,
        model_round: best.round,
        created_best,
        seconds: started.elapsed().as_secs_f64(),
        gantry: GantryEnv::read(),
    };
    write_json(&dir.join(format!("selfplay-{tag}.json")), &report)?;
    println!(
        "round {} selfplay: {} games (first {}, second {}, draws {}), {} positions in {:.1}s; \
         {} simulations/move; batch {} ({} evaluations, largest {}); {} model of round {}",
        report.round,
        report.games,
        report.first_wins,
        report.second_wins,
        report.draws,
        report.positions,
        report.seconds,
        simulations,
        report.batch_size,
        report.batches.batches,
        report.batches.largest,
        kind.name(),
        report.model_round,
    );
    Ok(())
}

/// The first round finds no best model: an untrained one of `kind` (the
/// build's default when not given) becomes it. Create-only, so it never
/// replaces a promoted model; whether this call created it.
fn create_best(data: &DataDir, kind: Option<ModelKind>, seed: u64) -> anyhow::Result<bool> {
    if data.best().exists() {
        return Ok(false);
    }
    let kind = kind.unwrap_or_else(ModelKind::built_default);
    let untrained = Checkpoint::untrained(kind, seed)
        .and_then(|c| c.encode())
        .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    atomic::create_new(&data.best(), &untrained)
        .with_context(|| format!("cannot write {}", data.best().display()))
}

/// Games written, by result (first, second, draw), and moves played.
struct Played {
    games: u32,
    results: [u32; 3],
    positions: u64,
}

/// Plays `args.games` games, `args.batch_size` at a time, writing each as
/// it ends.
fn play(
    args: &SelfplayArgs,
    state: &LoopState,
    simulations: u32,
    games_dir: &Path,
    tag: &str,
    rng: &mut SmallRng,
    evaluator: &mut Counted<'_>,
) -> anyhow::Result<Played> {
    let config = SearchConfig::default();
    let mut playing: Vec<Playing> = Vec::new();
    let (mut begun, mut written, mut positions) = (0u32, 0u32, 0u64);
    let mut results = [0u32; 3];
    while written < args.games {
        while playing.len() < args.batch_size && begun < args.games {
            playing.push(Playing {
                board: Board::new(),
                moves: Vec::new(),
                visits: Vec::new(),
            });
            begun += 1;
        }
        let mut trees: Vec<Tree> = playing
            .iter()
            .map(|g| Tree::new(g.board, config, Some(&mut *rng)))
            .collect();
        search(&mut trees, simulations, evaluator)?;
        for (game, tree) in playing.iter_mut().zip(&trees) {
            let visits = tree.visits();
            let explore = game.board.plies() < state.temperature_plies as usize;
            let column = choose_move(&visits, explore, rng).context("a search chose no move")?;
            game.board.play(column)?;
            game.moves.push(column as u8);
            game.visits.push(visits);
            positions += 1;
        }
        let (done, rest): (Vec<Playing>, Vec<Playing>) = playing
            .into_iter()
            .partition(|g| g.board.outcome().is_some());
        playing = rest;
        for game in done {
            let outcome = game
                .board
                .outcome()
                .context("a finished game has an outcome")?;
            results[match outcome {
                Outcome::FirstWins => 0,
                Outcome::SecondWins => 1,
                Outcome::Draw => 2,
            }] += 1;
            let record = GameRecord {
                moves: game.moves,
                visits: game.visits,
                outcome,
                round: state.round,
                simulations,
                batch_size: args.batch_size,
            };
            write_json(&games_dir.join(format!("{tag}-{written:05}.json")), &record)?;
            written += 1;
        }
    }
    Ok(Played {
        games: written,
        results,
        positions,
    })
}
