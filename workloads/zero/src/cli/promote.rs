//! `gantry-zero promote`: applies the promotion rule to this round's
//! evaluation; replaces the best model atomically when the candidate won
//! enough, writes the rating, then the next round's state (the commit
//! point: a promote that dies before it is simply run again).

use std::path::PathBuf;

use anyhow::{Context, bail};
use gantry_zero::atomic;
use gantry_zero::promote::{PromotionRule, Rating, decide};

use super::data::{DataDir, MAX_MODEL_BYTES, parse_model, read_bounded, read_json, write_json};
use super::evaluate::EvaluationReport;

/// Flags of `promote`.
#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The shared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Score at or above which the candidate replaces the best model.
    #[arg(long, default_value_t = 0.55)]
    pub threshold: f64,
    /// Rounds without a promotion after which self-play searches harder.
    #[arg(long, default_value_t = 2)]
    pub stall_rounds: u32,
    /// The most simulations that feedback may ask for.
    #[arg(long, default_value_t = 800)]
    pub max_simulations: u32,
}

/// Most lines kept in `ratings.jsonl`.
const MAX_RATINGS: usize = 100_000;

/// Runs the stage.
pub fn run(args: &PromoteArgs) -> anyhow::Result<()> {
    let rule = PromotionRule {
        threshold: args.threshold,
        stall_rounds: args.stall_rounds,
        max_simulations: args.max_simulations,
    };
    rule.check()
        .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    let data = DataDir::open(&args.data)?;
    let state = data.state()?;
    let dir = data.round(state.round)?;
    let evaluation: EvaluationReport = read_json(&dir.join("evaluation.json"))?;
    if evaluation.round != state.round {
        bail!(
            "evaluation.json is for round {}, the loop is at round {}",
            evaluation.round,
            state.round
        );
    }
    let decision = decide(&rule, &state, evaluation.result);

    let ratings = history_with(&data, &decision.rating)?;
    if decision.promoted {
        replace_best(&data, &evaluation, state.round)?;
    }
    atomic::write(&data.ratings(), ratings.as_bytes())
        .with_context(|| format!("cannot write {}", data.ratings().display()))?;
    write_json(&data.state_path(), &decision.next)?;
    let r = &decision.rating;
    println!(
        "round {} promote: score {:.2} ({}-{}-{}) {} the {:.2} threshold: {}; Elo {:.0} (best {:.0}); \
         next round {} with {} simulations, {} exploratory moves",
        r.round,
        r.score,
        r.result.wins,
        r.result.losses,
        r.result.draws,
        if decision.promoted {
            "meets"
        } else {
            "is under"
        },
        rule.threshold,
        if decision.promoted {
            "promoted"
        } else {
            "kept the best model"
        },
        r.candidate_elo,
        decision.next.best_elo,
        decision.next.round,
        decision.next.simulations,
        decision.next.temperature_plies
    );
    Ok(())
}

/// `ratings.jsonl` with `rating` appended, any line of its round from an
/// earlier try replaced, and the oldest lines dropped past the bound.
fn history_with(data: &DataDir, rating: &Rating) -> anyhow::Result<String> {
    let mut ratings: Vec<Rating> = Vec::new();
    if data.ratings().exists() {
        let text = std::fs::read_to_string(data.ratings())
            .with_context(|| format!("cannot read {}", data.ratings().display()))?;
        for (index, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let old: Rating = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", data.ratings().display(), index + 1))?;
            if old.round != rating.round {
                ratings.push(old);
            }
        }
    }
    ratings.push(rating.clone());
    if ratings.len() > MAX_RATINGS {
        ratings.drain(..ratings.len() - MAX_RATINGS);
    }
    let mut text = String::new();
    for rating in &ratings {
        text.push_str(&serde_json::to_string(rating)?);
        text.push('\n');
    }
    Ok(text)
}

/// Replaces the best model with the candidate, if it is exactly the file
/// that was evaluated.
fn replace_best(data: &DataDir, evaluation: &EvaluationReport, round: u32) -> anyhow::Result<()> {
    let bytes = read_bounded(&data.candidate(), MAX_MODEL_BYTES)?;
    if crc32fast::hash(&bytes) != evaluation.candidate_crc32 {
        bail!(
            "{} changed since it was evaluated (CRC-32 differs); not promoting",
            data.candidate().display()
        );
    }
    let candidate = parse_model(&data.candidate(), &bytes)?;
    if candidate.round != round {
        bail!(
            "the candidate is from round {}, not {round}",
            candidate.round
        );
    }
    atomic::write(&data.best(), &bytes)
        .with_context(|| format!("cannot write {}", data.best().display()))
}
