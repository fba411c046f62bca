//! `gantry-bench snapshot`: how long a Raft snapshot of N active jobs
//! takes to write and to install, in this process, through the
//! coordinator's own code (issue 11).
//!
//! The state: N pending jobs (a realistic spec each), applied as the
//! replica loop applies them (`Submit` commands of 1,000 jobs, one entry
//! each). Then, side by side:
//! - **file** (what a replica does now): the core takes its snapshot (the
//!   state's records encoded into memory: what the replica loop waits
//!   for, reported as `take`), and its writer streams it into a file
//!   through `SnapshotDir::write` (buffered, SHA-256, fsync, rename,
//!   directory fsync), as the snapshot thread does; a fresh replica
//!   checks the file (`check_snapshot`) and restores from it (`restore`),
//!   as a follower does before and after raft-rs installs it: the file
//!   becomes the stored state's base, nothing is written per record;
//! - **reopen**: that replica restarted: its store opened and loaded (the
//!   base decoded, the trees laid over it).
//!
//! For each step the peak RSS growth over the RSS before it is reported
//! (the kernel's high-water mark, reset through `/proc/self/clear_refs`).
//! The measurement runs in a child process (`--only file`), so that the
//! building of the state does not leave memory in the allocator that
//! would hide the steps' peaks. (The way before issue 11, the snapshot as
//! one sled value, is gone from the code; its figures are in the README.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_coordinator::command::Command;
use gantry_coordinator::core::{Core, CoreConfig};
use gantry_coordinator::domain::JobSpec;
use gantry_coordinator::metrics::Metrics;
use gantry_coordinator::raft::ReplicatedStateMachine;
use gantry_coordinator::raft::snapfile::SnapshotDir;
use gantry_coordinator::store::Store;
use serde_json::{Value, json};

use crate::heartbeats::status_bytes;

/// What to measure.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// Active (pending) jobs in the state.
    pub jobs: u64,
    /// Only this way, in this process (`"file"` or `"blob"`); `None` runs
    /// each in a child process.
    pub only: Option<String>,
}

/// One way of snapshotting: times and peak RSS growth.
#[derive(Debug, Clone, Default)]
pub struct Way {
    /// Taking the snapshot, what the replica loop waits for: the state's
    /// records encoded into memory, the stored events' values held.
    pub take: Duration,
    /// Taking the snapshot and writing it (the rest on the snapshot
    /// thread): serialised and stored durably.
    pub write: Duration,
    /// Installing it on a fresh replica (check, decode, replace the state).
    pub install: Duration,
    /// Opening and loading the installed replica's store again.
    pub reopen: Duration,
    /// Peak RSS growth while writing, bytes.
    pub write_peak: u64,
    /// Peak RSS growth while installing, bytes.
    pub install_peak: u64,
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The configuration.
    pub config: SnapshotConfig,
    /// Size of the snapshot.
    pub bytes: u64,
    /// Applying the jobs.
    pub build: Duration,
    /// Snapshots as files, streamed, installed as the store's base.
    pub file: Way,
    /// RSS with the state built, before any snapshot.
    pub rss_base: u64,
}

impl SnapshotReport {
    /// One JSON record.
    pub fn to_json(&self) -> Value {
        let way = |w: &Way| {
            json!({
                "take_s": w.take.as_secs_f64(),
                "write_s": w.write.as_secs_f64(),
                "install_s": w.install.as_secs_f64(),
                "reopen_s": w.reopen.as_secs_f64(),
                "write_peak_rss_mib": mib(w.write_peak),
                "install_peak_rss_mib": mib(w.install_peak),
            })
        };
        json!({
            "scenario": "snapshot",
            "jobs": self.config.jobs,
            "snapshot_mib": mib(self.bytes),
            "snapshot_bytes": self.bytes,
            "build_s": self.build.as_secs_f64(),
            "rss_base_mib": mib(self.rss_base),
            "file": way(&self.file),
        })
    }

    /// The human summary; the first line is the headline.
    pub fn human(&self) -> String {
        let mut out = format!(
            "snapshot of {} active jobs ({:.1} MiB): write {:.3} s, install {:.3} s (goal: under 1 s each)\n",
            self.config.jobs,
            mib(self.bytes),
            self.file.write.as_secs_f64(),
            self.file.install.as_secs_f64(),
        );
        out.push_str(&format!(
            "gantry-bench snapshot: state built in {:.1} s; RSS with it {:.0} MiB\n",
            self.build.as_secs_f64(),
            mib(self.rss_base)
        ));
        let w = &self.file;
        out.push_str(&format!(
            "write {:.3} s, of which {:.3} s on the replica loop (peak RSS +{:.0} MiB); \
             install {:.3} s (peak RSS +{:.0} MiB); \
             the installed replica reopened and loaded in {:.3} s\n",
            w.write.as_secs_f64(),
            w.take.as_secs_f64(),
            mib(w.write_peak),
            w.install.as_secs_f64(),
            mib(w.install_peak),
            w.reopen.as_secs_f64(),
        ));
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Runs the scenario: each way in a child process (this executable with
/// `--only`), or with `only` set, that way here.
pub fn run(config: &SnapshotConfig) -> anyhow::Result<SnapshotReport> {
    if let Some(way) = &config.only {
        return run_here(config, way);
    }
    child(config, "file")
}

/// Runs one way in a child process and reads its JSON record back.
fn child(config: &SnapshotConfig, way: &str) -> anyhow::Result<SnapshotReport> {
    let exe = std::env::current_exe()?;
    let output = std::process::Command::new(exe)
        .args([
            "snapshot",
            "--jobs",
            &config.jobs.to_string(),
            "--only",
            way,
            "--json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "the {way} run failed: {}",
        output.status
    );
    let record: Value = serde_json::from_slice(&output.stdout)?;
    let seconds = |v: &Value| Duration::from_secs_f64(v.as_f64().unwrap_or(0.0));
    let bytes = |v: &Value| (v.as_f64().unwrap_or(0.0) * (1u64 << 20) as f64) as u64;
    let way_of = |v: &Value| Way {
        take: seconds(&v["take_s"]),
        write: seconds(&v["write_s"]),
        install: seconds(&v["install_s"]),
        reopen: seconds(&v["reopen_s"]),
        write_peak: bytes(&v["write_peak_rss_mib"]),
        install_peak: bytes(&v["install_peak_rss_mib"]),
    };
    Ok(SnapshotReport {
        config: config.clone(),
        bytes: record["snapshot_bytes"].as_u64().unwrap_or(0),
        build: seconds(&record["build_s"]),
        file: way_of(&record["file"]),
        rss_base: bytes(&record["rss_base_mib"]),
    })
}

/// Builds the state, then measures one way in this process.
fn run_here(config: &SnapshotConfig, way: &str) -> anyhow::Result<SnapshotReport> {
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let (core, index) = build(&dir.path().join("source"), config.jobs)?;
    let build = started.elapsed();
    let rss_base = rss()?;
    let (bytes, measured) = match way {
        "file" => file_way(dir.path(), core, index, config.jobs)?,
        other => anyhow::bail!("--only {other:?}: expected file"),
    };
    Ok(SnapshotReport {
        config: config.clone(),
        bytes,
        build,
        file: measured,
        rss_base,
    })
}

/// Now: the core takes the snapshot (on the loop) and its writer streams
/// it into a file (off the loop); a fresh replica checks and restores from
/// it as a follower does.
fn file_way(
    dir: &std::path::Path,
    mut core: Core,
    index: u64,
    jobs: u64,
) -> anyhow::Result<(u64, Way)> {
    let files = SnapshotDir::open(&dir.join("snaps"), u64::MAX)?;
    // On the loop: the core takes the snapshot; then, on the snapshot
    // thread, its writer fills the file.
    let (take, take_peak, writer) = measure(|| core.snapshot().map_err(anyhow::Error::msg))?;
    let mut writer = Some(writer);
    let (file_write, file_peak, (descriptor, path)) = measure(|| {
        let writer = writer
            .take()
            .ok_or_else(|| anyhow::anyhow!("the snapshot was written already"))?;
        Ok(files.write(index, 1, writer)?)
    })?;
    let (write, write_peak) = (take + file_write, take_peak.max(file_peak));
    drop(core);
    let target = dir.join("file-target");
    let mut fresh = new_core(&target)?;
    let (install, install_peak, ()) = measure(|| {
        fresh.check_snapshot(&path).map_err(anyhow::Error::msg)?;
        fresh.restore(index, &path).map_err(anyhow::Error::msg)
    })?;
    anyhow::ensure!(
        fresh.applied_index().map_err(anyhow::Error::msg)? == index,
        "the installed snapshot is not at index {index}"
    );
    drop(fresh);
    let (reopen, _, loaded) = measure(|| Ok(Store::open(&target)?.load()?))?;
    anyhow::ensure!(
        loaded.jobs().count() as u64 == jobs,
        "the reopened replica has {} jobs, not {jobs}",
        loaded.jobs().count()
    );
    Ok((
        descriptor.size,
        Way {
            take,
            write,
            install,
            reopen,
            write_peak,
            install_peak,
        },
    ))
}

/// A core on a new store in `dir`.
fn new_core(dir: &std::path::Path) -> anyhow::Result<Core> {
    let store = Store::open(dir)?;
    let (events, _) = tokio::sync::broadcast::channel(16);
    Ok(Core::new(
        CoreConfig::default(),
        store,
        events,
        Arc::new(Metrics::default()),
    )?)
}

/// Applies `jobs` pending jobs as the replica loop would; returns the core
/// and the last index applied.
fn build(dir: &std::path::Path, jobs: u64) -> anyhow::Result<(Core, u64)> {
    const PER_COMMAND: u64 = 1_000;
    let mut core = new_core(dir)?;
    let mut index = 0;
    let mut made = 0;
    while made < jobs {
        let count = PER_COMMAND.min(jobs - made);
        let specs = (made..made + count).map(spec).collect();
        let command = Command::Submit {
            at_ms: 1_700_000_000_000 + made,
            key: None,
            jobs: specs,
            pipeline: None,
            owner: None,
        };
        let encoded =
            <Core as ReplicatedStateMachine>::encode(&command).map_err(anyhow::Error::msg)?;
        index += 1;
        let outcomes = core
            .apply(index, &[encoded.as_slice()])
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            outcomes.iter().all(Result::is_ok),
            "a submit was refused: {outcomes:?}"
        );
        made += count;
    }
    Ok((core, index))
}

/// A job as a training run submits it: a command line, a few variables.
fn spec(i: u64) -> JobSpec {
    let mut spec = JobSpec::for_test(&format!("selfplay-{i:07}"));
    spec.command = vec![
        "python3".into(),
        "-m".into(),
        "selfplay.worker".into(),
        format!("--seed={i}"),
        "--games=64".into(),
    ];
    spec.env
        .insert("RUN_ID".into(), format!("run-{}", i / 10_000));
    spec.env.insert(
        "CHECKPOINT".into(),
        format!("s3://ckpt/run/{}.pt", i / 1_000),
    );
    spec
}

/// Runs `step`, returning its time and the peak RSS growth over the RSS
/// before it.
fn measure<T>(step: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(Duration, u64, T)> {
    reset_peak();
    let before = rss()?;
    let started = Instant::now();
    let value = step()?;
    let took = started.elapsed();
    let peak = status_bytes("self", "VmHWM:")?;
    Ok((took, peak.saturating_sub(before), value))
}

fn rss() -> anyhow::Result<u64> {
    status_bytes("self", "VmRSS:")
}

/// Resets the kernel's RSS high-water mark of this process (Linux 4.0+);
/// without it the peaks are over the whole run, which only overstates.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", b"5");
}
