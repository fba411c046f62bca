//! `gantry-zero export`: turns a round's games into training tensors
//! (`train.npz`: `x`, `pi`, `z`), written atomically.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use gantry_zero::records::{GameRecord, Samples, samples};
use gantry_zero::{atomic, npz};
use serde::{Deserialize, Serialize};

use super::data::{DataDir, read_json, write_json};

/// Most game files one export reads.
pub const MAX_GAME_FILES: usize = 1_000_000;

/// Flags of `export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The shared data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// The round (default: the loop's current one).
    #[arg(long)]
    pub round: Option<u32>,
}

/// `export.json` in the round's directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportReport {
    /// The round exported.
    pub round: u32,
    /// Games read.
    pub games: usize,
    /// Positions written (each game position and its mirror).
    pub positions: usize,
    /// Size of `train.npz`.
    pub bytes: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Runs the stage.
pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let data = DataDir::open(&args.data)?;
    let round = match args.round {
        Some(round) => round,
        None => data.state()?.round,
    };
    let dir = data.round(round)?;
    let games_dir = dir.join("games");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&games_dir)
        .with_context(|| format!("cannot list {}", games_dir.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A leading dot is a write in progress (or one a crash left).
        if name.ends_with(".json") && !name.starts_with('.') {
            files.push(path);
        }
        if files.len() > MAX_GAME_FILES {
            bail!("{}: more than {MAX_GAME_FILES} games", games_dir.display());
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("round {round}: no games in {}", games_dir.display());
    }
    let mut all = Samples::default();
    for file in &files {
        let game: GameRecord = read_json(file)?;
        all.extend(samples(&game).with_context(|| format!("{}", file.display()))?);
    }
    let bytes = npz::encode(&all.to_arrays())?;
    let path = dir.join("train.npz");
    atomic::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    let report = ExportReport {
        round,
        games: files.len(),
        positions: all.len(),
        bytes: bytes.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_json(&dir.join("export.json"), &report)?;
    println!(
        "round {round} export: {} games -> {} positions ({} bytes) in {}",
        report.games,
        report.positions,
        report.bytes,
        path.display()
    );
    Ok(())
}
