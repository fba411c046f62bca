//! The data directory the stages share (a local disk with `gantry dev`, a
//! shared file system or a node pinned by label on a fleet):
//!
//! ```text
//! state.json                  the round in progress and its self-play settings (promote writes it)
//! ratings.jsonl               one line per evaluated round (Elo history)
//! models/best.bin             the best model (promote replaces it)
//! models/candidate.bin        the latest trained model (train replaces it)
//! rounds/r0001/games/*.json   finished self-play games
//! rounds/r0001/selfplay-*.json, export.json, training.json, evaluation.json   stage reports
//! rounds/r0001/train.npz      training tensors
//! ```
//!
//! Every file is written whole or not at all ([`gantry_zero::atomic`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use gantry_zero::atomic;
use gantry_zero::checkpoint::Checkpoint;
use gantry_zero::promote::LoopState;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Simulations per self-play move before feedback changes them.
pub const INITIAL_SIMULATIONS: u32 = 32;

/// The shared data directory.
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The directory at `root` (created when missing).
    pub fn open(root: &Path) -> anyhow::Result<DataDir> {
        std::fs::create_dir_all(root.join("models"))
            .with_context(|| format!("--data: cannot create {}", root.display()))?;
        Ok(DataDir {
            root: root.to_path_buf(),
        })
    }

    /// `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The loop's state; before the first promotion, the initial one.
    pub fn state(&self) -> anyhow::Result<LoopState> {
        let path = self.state_path();
        if !path.exists() {
            return Ok(LoopState::initial(INITIAL_SIMULATIONS));
        }
        read_json(&path)
    }

    /// The best model's file.
    pub fn best(&self) -> PathBuf {
        self.root.join("models/best.bin")
    }

    /// The candidate's file.
    pub fn candidate(&self) -> PathBuf {
        self.root.join("models/candidate.bin")
    }

    /// `ratings.jsonl`.
    pub fn ratings(&self) -> PathBuf {
        self.root.join("ratings.jsonl")
    }

    /// A round's directory (created when missing).
    pub fn round(&self, round: u32) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("rounds").join(format!("r{round:04}"));
        std::fs::create_dir_all(dir.join("games"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

/// The largest JSON file read (games, reports, state, models are far smaller).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Reads a whole file of at most `limit` bytes, naming it in any error.
pub fn read_bounded(path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > limit {
        anyhow::bail!(
            "{}: {len} bytes, over the {limit}-byte limit",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads a JSON file, naming it in any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = read_bounded(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid", path.display()))
}

/// Writes a JSON file atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    atomic::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The largest model file read (a network of the default size is well
/// under 1 MiB; the largest one the `tch` build allows, 128 channels and 20
/// blocks, about 24 MiB).
pub const MAX_MODEL_BYTES: u64 = 64 << 20;

/// Reads and checks a model file (either kind).
pub fn read_model(path: &Path) -> anyhow::Result<Checkpoint> {
    let bytes = read_bounded(path, MAX_MODEL_BYTES)?;
    parse_model(path, &bytes)
}

/// Checks a model file's bytes, naming the file in any error.
pub fn parse_model(path: &Path, bytes: &[u8]) -> anyhow::Result<Checkpoint> {
    Checkpoint::parse(bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A name for this process's files that a retried attempt does not reuse:
/// Gantry's job id and attempt when it runs the stage, else the process id.
pub fn run_tag() -> String {
    match (
        std::env::var("GANTRY_JOB_ID"),
        std::env::var("GANTRY_ATTEMPT"),
    ) {
        (Ok(job), Ok(attempt)) => format!("job{job}-a{attempt}"),
        _ => format!("pid{}", std::process::id()),
    }
}

/// What Gantry told the job about itself, for the reports.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct GantryEnv {
    /// `GANTRY_JOB_ID`.
    pub job_id: Option<String>,
    /// `GANTRY_ATTEMPT`.
    pub attempt: Option<String>,
    /// `GANTRY_BATCH_SIZE` (chosen from the free memory of the GPU the job got).
    pub batch_size: Option<String>,
    /// `GANTRY_NODE`.
    pub node: Option<String>,
    /// `CUDA_VISIBLE_DEVICES`.
    pub gpus: Option<String>,
}

impl GantryEnv {
    /// Reads the variables.
    pub fn read() -> GantryEnv {
        let var = |name: &str| std::env::var(name).ok();
        GantryEnv {
            job_id: var("GANTRY_JOB_ID"),
            attempt: var("GANTRY_ATTEMPT"),
            batch_size: var("GANTRY_BATCH_SIZE"),
            node: var("GANTRY_NODE"),
            gpus: var("CUDA_VISIBLE_DEVICES"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_over_the_bound_are_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("game.json");
        std::fs::write(&path, b"0123456789").expect("write");
        let err = read_bounded(&path, 5).expect_err("refused");
        assert!(
            err.to_string().contains("10 bytes, over the 5-byte limit"),
            "{err}"
        );
        assert_eq!(read_bounded(&path, 10).expect("read"), b"0123456789");
        let missing = read_bounded(&dir.path().join("none"), 5).expect_err("missing");
        assert!(missing.to_string().starts_with("cannot read"), "{missing}");
    }
}
