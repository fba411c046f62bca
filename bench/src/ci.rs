//! `gantry-bench ci`: the performance-regression check CI runs after the
//! tests. A shared CI machine is too noisy for absolute figures, so each
//! figure is a ratio of two workloads measured in the same process, in
//! turns, so that both see the same machine, each timed in the CPU time
//! of its thread (so time other processes hold the CPU is not counted):
//!
//! - `sched_index`: the scheduler's placements per CPU second over the
//!   naive first-fit planner's on the same fleet and queue
//!   ([`crate::sched`]).
//! - `apply_index`: jobs/s through the replica's apply path (each job
//!   submitted, assigned, started and exited: log entries encoded as the
//!   replica loop encodes them, decoded and applied by the coordinator's
//!   core, held back and written to sled merged by the store's writer
//!   thread, whose CPU time is counted) over jobs/s of a fixed
//!   baseline workload that does work of the same kind (JSON encoding,
//!   map updates and one sled batch per entry) with no Gantry code in it,
//!   the two alternating every 64 jobs.
//!
//! Each figure is the median of [`CiConfig::rounds`] turns. The baseline
//! file (`bench/baseline.json`) keeps the runs `--record` measured, their
//! spread and the drop each figure may show before the check fails
//! ([`max_drop`]). `GANTRY_BENCH_CI_SLOWDOWN=F` makes the measured Gantry
//! side F times slower (it spins F-1 times the CPU time it worked), to show
//! that a slowdown fails the check.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use gantry_coordinator::command::Command;
use gantry_coordinator::core::{Core, CoreConfig};
use gantry_coordinator::domain::{GpuRecord, JobSpec};
use gantry_coordinator::metrics::Metrics;
use gantry_coordinator::raft::ReplicatedStateMachine;
use gantry_coordinator::raft::batch;
use gantry_coordinator::state::Outcome;
use gantry_coordinator::store::Store;
use gantry_scheduler::naive::plan_first_fit;
use gantry_scheduler::{JobId, Placement, plan};
use serde_json::{Value, json};

use crate::sched::{SchedConfig, drive, workload_for};

/// The environment variable that injects a slowdown factor.
pub const SLOWDOWN_VAR: &str = "GANTRY_BENCH_CI_SLOWDOWN";

/// What one check measures.
#[derive(Debug, Clone)]
pub struct CiConfig {
    /// Turns of each workload; each figure is the median.
    pub rounds: usize,
    /// Jobs through the apply path per turn.
    pub apply_jobs: usize,
    /// The placement workload.
    pub sched: SchedConfig,
    /// The Gantry side runs this many times slower (1 = as built).
    pub slowdown: f64,
}

impl Default for CiConfig {
    fn default() -> Self {
        CiConfig {
            rounds: 7,
            apply_jobs: 8192,
            sched: SchedConfig {
                nodes: 1000,
                gpus_per_node: 8,
                jobs: 8000,
                seed: 1,
                pass_budget: 1000,
                naive_passes: 2,
                // No gangs: the workload the baseline was recorded on.
                gang_fraction: 0.0,
                urgent_fraction: 0.0,
            },
            slowdown: 1.0,
        }
    }
}

impl CiConfig {
    /// The default configuration with the slowdown of
    /// [`SLOWDOWN_VAR`], if set. A value that is not a number of at least
    /// 1 is an error, not ignored.
    pub fn from_env() -> Result<CiConfig> {
        let mut config = CiConfig::default();
        if let Ok(value) = std::env::var(SLOWDOWN_VAR) {
            config.slowdown = parse_slowdown(&value)?;
        }
        Ok(config)
    }
}

fn parse_slowdown(value: &str) -> Result<f64> {
    match value.trim().parse::<f64>() {
        Ok(factor) if factor.is_finite() && factor >= 1.0 => Ok(factor),
        _ => bail!("{SLOWDOWN_VAR}: {value:?} is not a factor of at least 1"),
    }
}

/// One measured figure (higher is better).
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Its name in the baseline file.
    pub name: &'static str,
    /// The median of the turns.
    pub value: f64,
    /// Each turn's value.
    pub turns: Vec<f64>,
}

/// What one run of the check measured.
pub struct Measured {
    /// The figures compared with the baseline.
    pub figures: Vec<Figure>,
    /// The apply workload's CPU per job, each part the median of the turns.
    pub apply_cpu: ApplyCpu,
}

/// Measures every figure once.
pub fn measure(config: &CiConfig) -> Result<Measured> {
    let mut sched = Vec::with_capacity(config.rounds);
    let mut apply = Vec::with_capacity(config.rounds);
    let mut cpu = Vec::with_capacity(config.rounds);
    let (snapshot, queue) = workload_for(&config.sched);
    for _ in 0..config.rounds.max(1) {
        let start = cpu_now()?;
        let naive = drive(
            snapshot.clone(),
            queue.clone(),
            plan_first_fit,
            config.sched.naive_passes,
        );
        let naive_cpu = cpu_now()? - start;
        let start = cpu_now()?;
        let indexed = drive(snapshot.clone(), queue.clone(), plan, usize::MAX);
        spin(cpu_now()? - start, config.slowdown)?;
        let indexed_cpu = cpu_now()? - start;
        sched.push(
            (indexed.placements as f64 / indexed_cpu.as_secs_f64().max(1e-9))
                / (naive.placements as f64 / naive_cpu.as_secs_f64().max(1e-9)).max(1e-9),
        );
        let turn = apply_turn(config.apply_jobs, config.slowdown)?;
        apply.push(turn.ratio);
        cpu.push(turn.cpu);
    }
    let part = |of: fn(&ApplyCpu) -> f64| median(&cpu.iter().map(of).collect::<Vec<_>>());
    Ok(Measured {
        figures: vec![
            Figure {
                name: "sched_index",
                value: median(&sched),
                turns: sched,
            },
            Figure {
                name: "apply_index",
                value: median(&apply),
                turns: apply,
            },
        ],
        apply_cpu: ApplyCpu {
            replica_us: part(|c| c.replica_us),
            writer_us: part(|c| c.writer_us),
            yardstick_us: part(|c| c.yardstick_us),
        },
    })
}

impl ApplyCpu {
    /// One line for people.
    pub fn human(&self) -> String {
        format!(
            "apply workload CPU per job: replica {:.1} µs + store writer {:.1} µs, yardstick {:.1} µs",
            self.replica_us, self.writer_us, self.yardstick_us
        )
    }
}

/// The CPU time this thread has run (`/proc/thread-self/schedstat`, in
/// ns): unlike wall time it does not count the time other processes of a
/// shared machine held the CPU.
pub(crate) fn cpu_now() -> Result<Duration> {
    let path = Path::new("/proc/thread-self/schedstat");
    let text = std::fs::read_to_string(path)
        .context("cannot read /proc/thread-self/schedstat (the check needs Linux)")?;
    schedstat_cpu(path, &text)
}

/// The CPU time in a `schedstat` file's text (its first field, in ns).
fn schedstat_cpu(path: &Path, text: &str) -> Result<Duration> {
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse::<u64>().ok())
        .with_context(|| format!("{}: {text:?}", path.display()))?;
    Ok(Duration::from_nanos(ns))
}

/// The name of the store's writer thread ([`gantry_coordinator::store`]).
const STORE_WRITER: &str = "gantry-store";

/// CPU time of this process's threads named `name`, from each one's
/// `/proc/self/task/TID/schedstat`.
fn threads_cpu(name: &str) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
        let path = task?.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue; // the thread has just exited
        };
        if comm.trim_end() != name {
            continue;
        }
        let path = path.join("schedstat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += schedstat_cpu(&path, &text)?;
    }
    Ok(total)
}

/// Busy-waits `(factor - 1) * worked` of CPU time (the injected slowdown).
fn spin(worked: Duration, factor: f64) -> Result<()> {
    if factor > 1.0 {
        let until = cpu_now()? + worked.mul_f64(factor - 1.0);
        while cpu_now()? < until {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Jobs submitted, assigned, started and exited per entry of the apply
/// workload (commands proposed in one round share an entry).
const PER_ENTRY: usize = 64;
/// Nodes of the apply workload, 8 GPUs of 80 GiB each.
const NODES: usize = 100;
const GIB: u64 = 1 << 30;

/// CPU time per job of the apply workload (not a figure of the check:
/// where the Gantry side's time goes, printed with it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApplyCpu {
    /// The replica's apply (decode, state machine, encoding the write).
    pub replica_us: f64,
    /// The store's writer thread (the sled commit).
    pub writer_us: f64,
    /// The yardstick.
    pub yardstick_us: f64,
}

/// One turn of `apply_index`.
struct ApplyTurn {
    /// The yardstick's CPU time over the Gantry side's.
    ratio: f64,
    cpu: ApplyCpu,
}

/// One turn of `apply_index`: `jobs` jobs through the yardstick and the
/// core's apply path, alternating every [`PER_ENTRY`] jobs so both see the
/// same machine; the ratio of their CPU times.
fn apply_turn(jobs: usize, slowdown: f64) -> Result<ApplyTurn> {
    let mut yardstick = Yardstick::new()?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    // No subscriber: events are sent and dropped, as with no watcher.
    let (events, _) = tokio::sync::broadcast::channel(16);
    let mut core = Core::new(
        CoreConfig::default(),
        store,
        events,
        Arc::new(Metrics::default()),
    )?;
    let mut replica = Replica {
        core: &mut core,
        index: 0,
    };
    let register: Vec<Command> = (0..NODES).map(register).collect();
    replica.apply(&register)?;
    replica.core.sync_store()?;
    let writer = threads_cpu(STORE_WRITER)?;
    let (mut base, mut gantry) = (Duration::ZERO, Duration::ZERO);
    for round in 0..jobs.div_ceil(PER_ENTRY) {
        let start = cpu_now()?;
        yardstick.round(round)?;
        let middle = cpu_now()?;
        replica.round(round)?;
        spin(cpu_now()? - middle, slowdown)?;
        let end = cpu_now()?;
        base += middle - start;
        gantry += end - middle;
    }
    // The store holds the rounds' changes back and its writer thread
    // commits them, as in a replica (a write every few rounds, at its
    // caps); that thread's CPU time is the Gantry side's too, up to the
    // last write committed.
    let synced = cpu_now()?;
    replica.core.sync_store()?;
    let written = threads_cpu(STORE_WRITER)? - writer;
    spin(cpu_now()? - synced + written, slowdown)?;
    gantry += cpu_now()? - synced + written;
    let per_job = |cpu: Duration| cpu.as_secs_f64() * 1e6 / jobs.max(1) as f64;
    Ok(ApplyTurn {
        ratio: base.as_secs_f64() / gantry.as_secs_f64().max(1e-9),
        cpu: ApplyCpu {
            replica_us: per_job(gantry.saturating_sub(written)),
            writer_us: per_job(written),
            yardstick_us: per_job(base),
        },
    })
}

/// The core as the replica loop drives it (a follower's: no leader
/// effects): entries encoded, decoded and applied in index order.
struct Replica<'a> {
    core: &'a mut Core,
    index: u64,
}

impl Replica<'_> {
    /// [`PER_ENTRY`] jobs submitted, assigned, started and exited: four
    /// entries.
    fn round(&mut self, round: usize) -> Result<()> {
        let at_ms = 1_700_000_000_000u64 + round as u64;
        let submits: Vec<Command> = (0..PER_ENTRY)
            .map(|i| Command::Submit {
                at_ms,
                key: Some(format!("ci-{round}-{i}")),
                jobs: vec![JobSpec::for_test(&format!("job-{i}"))],
                pipeline: None,
                owner: None,
            })
            .collect();
        let mut ids: Vec<JobId> = Vec::with_capacity(PER_ENTRY);
        for outcome in self.apply(&submits)? {
            match outcome {
                Outcome::Submitted(new) => ids.extend(new),
                other => bail!("a submit answered {other:?}"),
            }
        }
        let placements = ids
            .iter()
            .enumerate()
            .map(|(i, &job)| Placement {
                job,
                node: node_name(i % NODES),
                gpus: vec![(i / NODES) as u32 % 8],
                gpu_memory: 10 * GIB,
                batch_size: None,
                exclusive_gpu: false,
            })
            .collect();
        let assign = Command::Assign {
            at_ms,
            placements,
            term: 0,
        };
        let attempts = match self.apply(&[assign])?.pop() {
            Some(Outcome::Assigned { applied, refused }) if refused.is_empty() => applied,
            other => bail!("the assign answered {other:?}"),
        };
        let started: Vec<Command> = attempts
            .iter()
            .enumerate()
            .map(|(i, &(job, attempt))| Command::JobStarted {
                at_ms,
                job,
                attempt,
                node: node_name(i % NODES),
            })
            .collect();
        self.apply(&started)?;
        let exited: Vec<Command> = attempts
            .iter()
            .enumerate()
            .map(|(i, &(job, attempt))| Command::JobExited {
                at_ms,
                job,
                attempt,
                node: node_name(i % NODES),
                code: Some(0),
                signal: None,
                error: String::new(),
                cancelled: false,
                oom: false,
                output_tail: String::new(),
                peak_gpu_memory: 0,
            })
            .collect();
        self.apply(&exited)?;
        Ok(())
    }

    /// Applies `commands` as one entry and returns their outcomes; a
    /// refused command is an error (the workload only asks for what fits).
    fn apply(&mut self, commands: &[Command]) -> Result<Vec<Outcome>> {
        let encoded = commands
            .iter()
            .map(Core::encode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!(e))?;
        let entry = batch::encode(&encoded);
        self.index += 1;
        let decoded = batch::decode(&entry).map_err(|e| anyhow!(e))?;
        let outcomes = self
            .core
            .apply(self.index, &decoded)
            .map_err(|e| anyhow!(e))?;
        outcomes
            .into_iter()
            .map(|outcome| outcome.map_err(|e| anyhow!("refused: {e}")))
            .collect()
    }
}

fn node_name(i: usize) -> String {
    format!("ci-node-{i:03}")
}

fn register(i: usize) -> Command {
    Command::RegisterNode {
        at_ms: 1,
        name: node_name(i),
        address: "127.0.0.1".into(),
        labels: Default::default(),
        gpus: (0..8)
            .map(|index| GpuRecord {
                index,
                model: "H100".into(),
                total: 80 * GIB,
            })
            .collect(),
        cpu_millis: 128_000,
        memory_total: 1024 * GIB,
        disk_total: 4096 * GIB,
    }
}

/// The fixed yardstick of `apply_index`: per job, four records (one per
/// transition) JSON-encoded, kept in a map and written to sled in one
/// batch per [`PER_ENTRY`] jobs, as the apply path writes an entry. It
/// uses no Gantry code, so it changes only with the machine.
struct Yardstick {
    _dir: tempfile::TempDir,
    tree: sled::Tree,
    map: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Yardstick {
    fn new() -> Result<Yardstick> {
        let dir = tempfile::tempdir()?;
        let db = sled::Config::new().path(dir.path()).open()?;
        let tree = db.open_tree("jobs")?;
        Ok(Yardstick {
            _dir: dir,
            tree,
            map: Default::default(),
        })
    }

    fn round(&mut self, round: usize) -> Result<()> {
        for (step, state) in ["pending", "assigned", "running", "succeeded"]
            .iter()
            .enumerate()
        {
            let mut batch = sled::Batch::default();
            for i in 0..PER_ENTRY {
                let id = (round * PER_ENTRY + i) as u64;
                let record = json!({
                    "id": id,
                    "name": format!("job-{i}"),
                    "state": state,
                    "command": ["true"],
                    "resources": {"gpus": 1, "gpu_memory": 10 * GIB},
                    "node": node_name(i % NODES),
                    "attempt": step,
                    "at_ms": 1_700_000_000_000u64 + round as u64,
                });
                let bytes = serde_json::to_vec(&record)?;
                batch.insert(&id.to_be_bytes(), bytes.as_slice());
                self.map.insert(id, bytes);
            }
            self.tree.apply_batch(batch)?;
        }
        Ok(())
    }
}

/// The drop a figure may show before the check fails, from the spread of
/// its recorded runs ((max - min) / median): twice the spread plus 10
/// points, at least 25% (a 2-core CI machine shared with other jobs is
/// noisier than the one that recorded) and at most 60% (so that a 3x
/// slowdown, a 67% drop, always fails).
pub fn max_drop(runs: &[f64]) -> f64 {
    let mid = median(runs);
    if mid <= 0.0 {
        return 0.6;
    }
    let (low, high) = runs
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let spread = (high - low) / mid;
    (2.0 * spread + 0.10).clamp(0.25, 0.60)
}

/// The baseline file's record of `runs` (each run's figures, in order).
pub fn baseline_json(runs: &[Vec<Figure>], config: &CiConfig) -> Value {
    let mut figures = serde_json::Map::new();
    let names: Vec<&str> = runs
        .first()
        .map(|r| r.iter().map(|f| f.name).collect())
        .unwrap_or_default();
    for name in names {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.iter().find(|f| f.name == name).map(|f| f.value))
            .collect();
        let mid = median(&values);
        let (low, high) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        figures.insert(
            name.to_string(),
            json!({
                "baseline": round3(mid),
                "runs": values.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
                "spread": round3((high - low) / mid.max(1e-9)),
                "max_drop": round3(max_drop(&values)),
            }),
        );
    }
    json!({
        "about": "gantry-bench ci baseline: each figure is a ratio measured in one process \
                  (higher is better); baseline is the median of the recorded runs, spread \
                  (max-min)/median, max_drop = clamp(2*spread + 0.10, 0.25, 0.60). \
                  Re-record with `cargo run --release -p gantry-bench -- ci --record 5` \
                  on a quiet machine after a deliberate change.",
        "rounds_per_run": config.rounds,
        "apply_jobs": config.apply_jobs,
        "figures": figures,
    })
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Compares measured figures with the baseline file's. `Ok` holds one line
/// per figure; `Err` is the one line naming the first figure that dropped
/// too far (a figure missing from either side is an error too).
pub fn compare(baseline: &Value, measured: &[Figure]) -> Result<Vec<String>, String> {
    let figures = baseline
        .get("figures")
        .and_then(Value::as_object)
        .ok_or("baseline file: no \"figures\" object")?;
    let mut lines = Vec::new();
    for figure in measured {
        let entry = figures
            .get(figure.name)
            .ok_or_else(|| format!("baseline file: no figure {:?}", figure.name))?;
        let field = |key: &str| {
            entry
                .get(key)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("baseline file: {}.{key} is not a number", figure.name))
        };
        let base = field("baseline")?;
        let allowed = field("max_drop")?;
        let drop = if base > 0.0 {
            1.0 - figure.value / base
        } else {
            0.0
        };
        let line = format!(
            "{}: {:.3} against baseline {:.3} ({:+.1}%, allowed drop {:.0}%)",
            figure.name,
            figure.value,
            base,
            -drop * 100.0,
            allowed * 100.0
        );
        if drop > allowed {
            return Err(format!(
                "performance regression: {} is {:.3}, {:.0}% below its baseline {:.3} (allowed drop {:.0}%)",
                figure.name,
                figure.value,
                drop * 100.0,
                base,
                allowed * 100.0
            ));
        }
        lines.push(line);
    }
    Ok(lines)
}

/// `gantry-bench ci`: with `record`, measures that many runs and writes
/// the baseline file from them; else measures once and checks against it,
/// printing one line per figure, or the one line of the regression (then
/// `Ok(false)`).
pub fn run(baseline: &Path, record: Option<usize>) -> Result<bool> {
    let config = CiConfig::from_env()?;
    if config.slowdown > 1.0 {
        println!(
            "{SLOWDOWN_VAR}={}: the Gantry side runs that many times slower",
            config.slowdown
        );
    }
    if let Some(runs) = record {
        let mut recorded = Vec::with_capacity(runs);
        for run in 0..runs.max(1) {
            let measured = measure(&config)?;
            let values: Vec<String> = measured
                .figures
                .iter()
                .map(|f| format!("{} {:.3}", f.name, f.value))
                .collect();
            println!("run {}: {}", run + 1, values.join(", "));
            println!("  {}", measured.apply_cpu.human());
            recorded.push(measured.figures);
        }
        let file = baseline_json(&recorded, &config);
        std::fs::write(baseline, serde_json::to_string_pretty(&file)? + "\n")
            .with_context(|| format!("cannot write {}", baseline.display()))?;
        println!("recorded {runs} runs in {}", baseline.display());
        return Ok(true);
    }
    let file = read_baseline(baseline)?;
    let start = Instant::now();
    let measured = measure(&config)?;
    println!("{}", measured.apply_cpu.human());
    match compare(&file, &measured.figures) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            println!(
                "gantry-bench ci: no regression ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
            Ok(true)
        }
        Err(line) => {
            println!("{line}");
            Ok(false)
        }
    }
}

/// Reads the baseline file.
pub fn read_baseline(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the baseline file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the baseline file {} is not JSON", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn figure(name: &'static str, value: f64) -> Figure {
        Figure {
            name,
            value,
            turns: vec![value],
        }
    }

    #[test]
    fn a_drop_past_the_allowed_one_fails_naming_the_figure() {
        let baseline = json!({"figures": {
            "sched_index": {"baseline": 10.0, "max_drop": 0.3},
            "apply_index": {"baseline": 2.0, "max_drop": 0.25},
        }});
        let cases: &[(f64, f64, Option<&str>)] = &[
            (10.0, 2.0, None),
            (7.1, 1.6, None),
            (30.0, 9.0, None),
            (
                6.9,
                2.0,
                Some("sched_index is 6.900, 31% below its baseline 10.000"),
            ),
            (
                10.0,
                1.4,
                Some("apply_index is 1.400, 30% below its baseline 2.000"),
            ),
        ];
        for &(sched, apply, expect) in cases {
            let measured = [figure("sched_index", sched), figure("apply_index", apply)];
            match (compare(&baseline, &measured), expect) {
                (Ok(lines), None) => assert_eq!(lines.len(), 2),
                (Err(line), Some(fragment)) => {
                    assert!(line.starts_with("performance regression: "), "{line}");
                    assert!(line.contains(fragment), "{line}");
                }
                (got, _) => panic!("{sched} {apply}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_baseline_file_without_the_figure_is_an_error() {
        let cases = [
            (json!({}), "no \"figures\""),
            (json!({"figures": {}}), "no figure \"apply_index\""),
            (
                json!({"figures": {"apply_index": {"baseline": "x", "max_drop": 0.3}}}),
                "apply_index.baseline is not a number",
            ),
        ];
        for (baseline, fragment) in cases {
            let error = compare(&baseline, &[figure("apply_index", 1.0)]).unwrap_err();
            assert!(error.contains(fragment), "{error}");
        }
    }

    #[test]
    fn the_allowed_drop_follows_the_spread_within_bounds() {
        let cases: &[(&[f64], f64)] = &[
            (&[10.0, 10.0, 10.0, 10.0, 10.0], 0.25),
            (&[9.0, 10.0, 10.0, 11.0, 10.0], 0.50),
            (&[5.0, 10.0, 10.0, 15.0, 10.0], 0.60),
        ];
        for &(runs, expect) in cases {
            assert!((max_drop(runs) - expect).abs() < 1e-9, "{runs:?}");
        }
    }

    #[test]
    fn the_slowdown_factor_is_checked() {
        assert_eq!(parse_slowdown("3").unwrap(), 3.0);
        assert_eq!(parse_slowdown(" 1.5 ").unwrap(), 1.5);
        for bad in ["0.5", "x", "", "NaN", "inf"] {
            let error = parse_slowdown(bad).unwrap_err().to_string();
            assert!(error.contains(SLOWDOWN_VAR), "{error}");
        }
    }

    /// The recorded file round-trips through the check: every figure
    /// passes against a baseline recorded from itself.
    #[test]
    fn a_recorded_baseline_accepts_its_own_runs() {
        let runs: Vec<Vec<Figure>> = [4.0, 5.0, 6.0]
            .iter()
            .map(|&v| vec![figure("sched_index", v * 2.0), figure("apply_index", v)])
            .collect();
        let file = baseline_json(&runs, &CiConfig::default());
        assert_eq!(file["figures"]["apply_index"]["baseline"], 5.0);
        assert_eq!(file["figures"]["apply_index"]["spread"], 0.4);
        assert_eq!(file["figures"]["apply_index"]["max_drop"], 0.6);
        for run in &runs {
            compare(&file, run).unwrap();
        }
    }

    /// The apply workload runs through the real core (a small one here:
    /// its figure is measured by `gantry-bench ci`, never asserted).
    #[test]
    fn the_workloads_run() {
        let turn = apply_turn(PER_ENTRY * 2, 1.0).unwrap();
        assert!(turn.ratio > 0.0);
        assert!(turn.cpu.replica_us > 0.0 && turn.cpu.yardstick_us > 0.0);
    }
}
