//! The reference workload's loop (examples/zero/pipeline.yaml, `repeat:
//! forever`) on `gantry dev` with fake GPUs: submitted once, two runs of
//! selfplay -> export -> train -> evaluate -> promote, every stage a Gantry
//! job started by its input's event, with the batch sizes Gantry chose, the
//! model lock and evaluation snapshots; the second run starts by itself when
//! the first succeeds and plays with what it promoted, and `gantry pipeline
//! stop` during it ends the loop after it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gantry_integration_tests::{Sandbox, gantry_bin, wait_until};
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

/// `gantry pipeline zero` (run `run`, 0 = the latest) as JSON.
fn pipeline(sandbox: &Sandbox, url: &str, run: u32) -> anyhow::Result<Value> {
    sandbox.gantry_json(url, &["pipeline", "zero", "--run", &run.to_string()])
}

/// Waits until every stage of run `run` succeeded (failing early on a
/// stage that cannot); returns the jobs (JSON) by stage.
fn wait_run(sandbox: &Sandbox, url: &str, run: u32) -> anyhow::Result<Vec<Value>> {
    let mut last = Value::Null;
    let done = wait_until(&format!("run {run} to succeed"), ROUND, || {
        let view = pipeline(sandbox, url, run).ok()?;
        last = view.clone();
        let jobs = view["jobs"].as_array()?.clone();
        let states: Vec<&str> = jobs.iter().filter_map(|j| j["state"].as_str()).collect();
        if states
            .iter()
            .any(|s| matches!(*s, "deadlettered" | "blocked" | "cancelled"))
        {
            return Some(Err(anyhow::anyhow!("run {run} failed: {view}")));
        }
        (states.len() == STAGES.len() && states.iter().all(|s| *s == "succeeded"))
            .then_some(Ok(jobs))
    });
    done.with_context(|| format!("last seen: {last}"))?
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

    // One submit: the loop makes the runs.
    let out = sandbox.gantry_json(&url, &["submit", "-f", &spec.display().to_string()])?;
    ensure!(
        out["job_ids"].as_array().map(Vec::len) == Some(STAGES.len()),
        "{out}"
    );
    let first = wait_run(&sandbox, &url, 1)?;
    // Run 2 was made in the apply of run 1's last exit: it exists now,
    // submitted at that exit's time, with no client involved.
    let second = pipeline(&sandbox, &url, 0)?;
    ensure!(second["run"] == 2, "the loop did not start run 2: {second}");
    let promote_end = attempt(&first[4])["ended_at_ms"].as_u64().context("end")?;
    for job in second["jobs"].as_array().context("jobs")? {
        ensure!(job["submitted_at_ms"] == promote_end, "{job}");
    }
    ensure!(second["loop_status"] == "repeating", "{second}");
    // Stop it while run 2 runs: run 2 is its last.
    let stop = sandbox.gantry_json(&url, &["pipeline", "stop", "zero"])?;
    ensure!(stop["last_run"] == 2, "{stop}");
    let runs = [first, wait_run(&sandbox, &url, 2)?];
    // No third run: it would have been made in the same apply as run 2's end.
    let view = pipeline(&sandbox, &url, 0)?;
    ensure!(view["run"] == 2, "a run after the stop: {view}");
    ensure!(view["loop_status"] == "stopped", "{view}");
    let table = sandbox.gantry(&url, &["pipeline", "zero"]);
    eprintln!("gantry pipeline zero:\n{}", table.stdout);
    for run in view["runs"].as_array().context("runs")? {
        let took =
            run["ended_at_ms"].as_u64().unwrap_or(0) - run["submitted_at_ms"].as_u64().unwrap_or(0);
        eprintln!("run {}: {} in {took} ms", run["run"], run["state"]);
    }
    let run2_start = attempt(&runs[1][0])["started_at_ms"]
        .as_u64()
        .context("start")?;
    eprintln!(
        "run 1's promote exit -> run 2's selfplay start: {} ms",
        run2_start - promote_end
    );

    let mut states = vec![LoopState::initial(32)];
    for round in 1..=2u32 {
        let jobs = &runs[round as usize - 1];
        let (batches, lags) = check_jobs(jobs)?;
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
        // next round's state (read back by the next round's self-play, and
        // in state.json after the last); a promoted candidate is the best
        // model.
        let decision = decide(&PromotionRule::default(), &before, result);
        let ratings: Vec<Rating> = std::fs::read_to_string(data.join("ratings.jsonl"))?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(ratings.len(), 2);
        assert_eq!(ratings.get(round as usize - 1), Some(&decision.rating));
        let state = decision.next.clone();
        if round == 2 {
            let stored: LoopState = serde_json::from_value(read_json(&data.join("state.json"))?)?;
            assert_eq!(stored, state);
            let best = ModelFile::parse(&std::fs::read(data.join("models/best.bin"))?)
                .map_err(anyhow::Error::msg)?;
            assert_eq!(best.round, state.best_round);
            if decision.promoted {
                assert_eq!(
                    std::fs::read(data.join("models/best.bin"))?,
                    std::fs::read(data.join("models/candidate.bin"))?
                );
            }
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
