//! The reference workload's loop (examples/zero/pipeline.yaml) on `gantry
//! dev` with fake GPUs: two rounds of selfplay -> export -> train ->
//! evaluate -> promote, every stage a Gantry job started by its input's
//! event, with the batch sizes Gantry chose, the model lock and evaluation
//! snapshots; the second round plays with what the first one promoted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gantry_integration_tests::{Sandbox, gantry_bin};
use gantry_zero::model::ModelFile;
use gantry_zero::promote::{LoopState, Match, PromotionRule, Rating, decide};
use gantry_zero::records::{GameRecord, Samples};
use serde_json::Value;

const STAGES: [&str; 5] = ["selfplay", "export", "train", "evaluate", "promote"];
/// A whole round of the example's configuration takes seconds; the margin
/// is for a loaded 2-core machine with debug builds.
const ROUND: Duration = Duration::from_secs(240);

fn zero_bin() -> anyhow::Result<PathBuf> {
    let bin = gantry_bin().with_file_name("gantry-zero");
    ensure!(
        bin.is_file(),
        "{} is missing: build it with cargo build -p gantry-zero",
        bin.display()
    );
    Ok(bin)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

fn one_file(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(prefix) {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one {prefix}* in {}: {other:?}", dir.display()),
    }
}

/// Submits one run of the pipeline and waits for its promote stage; returns
/// the jobs (JSON) by stage.
fn run_round(sandbox: &Sandbox, url: &str, spec: &Path) -> anyhow::Result<Vec<Value>> {
    let out = sandbox.gantry_json(url, &["submit", "-f", &spec.display().to_string()])?;
    let ids: Vec<u64> = out["job_ids"]
        .as_array()
        .context("job_ids")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    ensure!(ids.len() == STAGES.len(), "{out}");
    sandbox.wait_job_state(url, ids[4], "succeeded", ROUND)?;
    ids.iter().map(|&id| sandbox.job(url, id)).collect()
}

fn attempt(job: &Value) -> &Value {
    &job["attempts"][job["attempts"]
        .as_array()
        .map_or(0, |a| a.len().saturating_sub(1))]
}

/// Checks the jobs of one round: all succeeded, each stage started after
/// its input ended; returns (batch sizes by stage, lags in ms).
fn check_jobs(jobs: &[Value]) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let mut lags = Vec::new();
    for (index, job) in jobs.iter().enumerate() {
        ensure!(job["state"] == "succeeded", "{}: {job}", STAGES[index]);
        if index > 0 {
            let start = attempt(job)["started_at_ms"]
                .as_u64()
                .context("started_at_ms")?;
            let input_end = attempt(&jobs[index - 1])["ended_at_ms"]
                .as_u64()
                .context("ended_at_ms")?;
            ensure!(
                start >= input_end,
                "{} started before its input ended",
                STAGES[index]
            );
            lags.push(start - input_end);
        }
    }
    let batches = jobs
        .iter()
        .map(|j| attempt(j)["batch_size"].as_u64().unwrap_or(0))
        .collect();
    Ok((batches, lags))
}

#[test]
fn two_rounds_of_the_zero_loop_run_as_gantry_jobs() -> anyhow::Result<()> {
    let zero = zero_bin()?;
    let mut sandbox = Sandbox::new()?;
    let data = sandbox.path().join("zero-data");
    // Jobs find `gantry-zero` on the PATH, as the example expects.
    let bin_dir = zero.parent().context("bin dir")?.display().to_string();
    let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
    sandbox.set_daemon_env("PATH", &path);
    let (_, url) = sandbox.start_dev("dev", "1xH100-80GiB")?;
    sandbox.wait_nodes_ready(&url, 1, Duration::from_secs(30))?;

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/zero/pipeline.yaml");
    let text = std::fs::read_to_string(&example)?;
    let spec = sandbox.path().join("zero.yaml");
    std::fs::write(
        &spec,
        text.replace("/srv/zero", &data.display().to_string()),
    )?;

    let mut states = vec![LoopState::initial(32)];
    for round in 1..=2u32 {
        let jobs = run_round(&sandbox, &url, &spec)?;
        let (batches, lags) = check_jobs(&jobs)?;
        // Tiers for an 80 GiB GPU: selfplay 32, train 256, evaluate 20.
        assert_eq!(batches[0], 32, "selfplay batch: {}", jobs[0]);
        assert_eq!(batches[2], 256, "train batch: {}", jobs[2]);
        assert_eq!(batches[3], 20, "evaluate batch: {}", jobs[3]);
        eprintln!("round {round}: batches {batches:?}, stage-to-stage lags {lags:?} ms");
        let before = states.last().context("state")?.clone();
        let dir = data.join(format!("rounds/r{round:04}"));

        // Self-play: the games, played with Gantry's batch size and the
        // previous round's feedback and best model.
        let selfplay = read_json(&one_file(&dir, "selfplay-")?)?;
        assert_eq!(selfplay["batch_size"], 32);
        assert_eq!(selfplay["gantry"]["batch_size"], "32");
        assert_eq!(selfplay["batches"]["largest"], 32, "full batches of leaves");
        assert_eq!(selfplay["simulations"], before.simulations);
        assert_eq!(selfplay["model_round"], before.best_round);
        let games: Vec<PathBuf> = std::fs::read_dir(dir.join("games"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        assert_eq!(games.len(), 64, "no temporaries left: {games:?}");
        let mut positions = 0;
        for game in &games {
            let record: GameRecord = serde_json::from_slice(&std::fs::read(game)?)?;
            record.check().with_context(|| game.display().to_string())?;
            assert_eq!((record.round, record.batch_size), (round, 32));
            positions += 2 * record.moves.len();
        }

        // Export: every position and its mirror.
        let npz = std::fs::read(dir.join("train.npz"))?;
        let samples =
            Samples::from_arrays(&gantry_zero::npz::decode(&npz)?).map_err(anyhow::Error::msg)?;
        assert_eq!(samples.len(), positions);

        // Training: on this round and the ones before, from the best model.
        let training = read_json(&dir.join("training.json"))?;
        let window: Vec<u32> = (1..=round).collect();
        assert_eq!(training["trained_on"], serde_json::json!(window));
        assert_eq!(training["batch_size"], 256);
        assert_eq!(training["started_from_round"], before.best_round);

        // Evaluation: from snapshot copies in its work dir, not the live files.
        let evaluation = read_json(&dir.join("evaluation.json"))?;
        for read in evaluation["read_from"].as_array().context("read_from")? {
            let read = read.as_str().context("path")?;
            assert!(!read.starts_with(&data.display().to_string()), "{read}");
            assert!(read.contains("snapshot"), "{read}");
        }
        assert_eq!(evaluation["batch_size"], 20);
        let result: Match = serde_json::from_value(evaluation["result"].clone())?;
        assert_eq!(result.games(), 20);

        // Promotion: the rule applied to this evaluation, the history, the
        // next round's state; a promoted candidate is the best model.
        let decision = decide(&PromotionRule::default(), &before, result);
        let state: LoopState = serde_json::from_value(read_json(&data.join("state.json"))?)?;
        assert_eq!(state, decision.next);
        let ratings: Vec<Rating> = std::fs::read_to_string(data.join("ratings.jsonl"))?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(ratings.len(), round as usize);
        assert_eq!(ratings.last(), Some(&decision.rating));
        let best = ModelFile::parse(&std::fs::read(data.join("models/best.bin"))?)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(best.round, state.best_round);
        if decision.promoted {
            assert_eq!(
                std::fs::read(data.join("models/best.bin"))?,
                std::fs::read(data.join("models/candidate.bin"))?
            );
        }
        eprintln!(
            "round {round}: score {:.2}, promoted {}, policy vs random {}, stage seconds {:?}",
            result.score(),
            decision.promoted,
            evaluation["vs_random"]["candidate"],
            [
                &selfplay["seconds"],
                &training["seconds"],
                &evaluation["seconds"]
            ]
        );
        states.push(state);
    }
    // No temporary file is left anywhere in the data directory.
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            assert!(!name.starts_with('.'), "left behind: {}", path.display());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}
