//! `gantry-bench soak`: does the coordinator stay flat while jobs keep
//! finishing? One `gantry coordinator` process (a single voter, no HTTP)
//! with retention scaled down for the run (`--job-retention`,
//! `--max-retained-jobs`, `--history-retention`, `--history-max-bytes`),
//! the simulated agents of `e2e` (each job starts and exits at once), and
//! `concurrency` submitters. Every `every` acknowledged jobs it samples the
//! coordinator's RSS (`VmRSS`), its data directory on disk (sled: hard
//! state, events, the Raft log and snapshot, the history), the history's
//! own size and the jobs in hard state (from `Status`), the event floor,
//! and the submit latency of the jobs since the last sample.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::e2e::{endpoint, gantry_client, start_fleet, status, submit_request, unix_ms};
use crate::heartbeats::status_bytes;
use crate::procs::{ProcGroup, free_ports, require_gantry, run_scenario};
use crate::stats::Latencies;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The `gantry` binary that runs the coordinator.
    pub gantry: PathBuf,
    /// Simulated agents (8 GPUs each).
    pub agents: usize,
    /// Jobs submitted in all.
    pub jobs: u64,
    /// A sample every this many acknowledged jobs.
    pub every: u64,
    /// Concurrent submitters.
    pub concurrency: usize,
    /// `--job-retention` (e.g. 5s).
    pub job_retention: String,
    /// `--max-retained-jobs`.
    pub max_retained_jobs: u64,
    /// `--history-retention` (e.g. 60s).
    pub history_retention: String,
    /// `--history-max-bytes` (e.g. 64MiB).
    pub history_max_bytes: String,
    /// `RUST_LOG` for the coordinator.
    pub log_level: String,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Jobs acknowledged so far.
    pub jobs: u64,
    /// Seconds since the first submit.
    pub elapsed_s: f64,
    /// Coordinator RSS, read once at the sample.
    pub rss_bytes: u64,
    /// The median and the highest of its RSS read every 50 ms since the
    /// previous sample: a single read lands on a snapshot's transient
    /// allocations (10-15 MiB, freed within a second) or not by chance.
    pub rss_median_bytes: u64,
    /// See `rss_median_bytes`.
    pub rss_peak_bytes: u64,
    /// Its data directory on disk.
    pub disk_bytes: u64,
    /// The history's records (None: the coordinator could not read it).
    pub history_bytes: Option<u64>,
    /// Jobs in hard state.
    pub jobs_in_state: u64,
    /// The event compaction floor.
    pub event_floor: u64,
    /// Submit latency since the previous sample, p50 and p99 (ms).
    pub submit_p50_ms: f64,
    /// See `submit_p50_ms`.
    pub submit_p99_ms: f64,
    /// Jobs per second since the previous sample.
    pub jobs_per_s: f64,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// What ran.
    pub config: SoakConfig,
    /// The samples, in order.
    pub samples: Vec<Sample>,
    /// Submits refused or timed out.
    pub errors: u64,
}

impl SoakReport {
    /// Growth of RSS from the first sample to the last, in percent.
    pub fn rss_growth_percent(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(first), Some(last)) if first.rss_bytes > 0 => {
                (last.rss_bytes as f64 / first.rss_bytes as f64 - 1.0) * 100.0
            }
            _ => 0.0,
        }
    }

    /// The largest distance of a sample's median RSS from the first
    /// sample's, in percent (flat within 10%: at most 10).
    pub fn rss_median_drift_percent(&self) -> f64 {
        let Some(first) = self.samples.first().filter(|s| s.rss_median_bytes > 0) else {
            return 0.0;
        };
        self.samples
            .iter()
            .map(|s| {
                (s.rss_median_bytes as f64 / first.rss_median_bytes as f64 - 1.0).abs() * 100.0
            })
            .fold(0.0, f64::max)
    }

    /// The report as one JSON record.
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": "soak",
            "jobs": self.config.jobs,
            "every": self.config.every,
            "agents": self.config.agents,
            "concurrency": self.config.concurrency,
            "job_retention": self.config.job_retention,
            "max_retained_jobs": self.config.max_retained_jobs,
            "history_retention": self.config.history_retention,
            "history_max_bytes": self.config.history_max_bytes,
            "errors": self.errors,
            "rss_growth_percent": self.rss_growth_percent(),
            "rss_median_drift_percent": self.rss_median_drift_percent(),
            "samples": self.samples.iter().map(|s| json!({
                "jobs": s.jobs,
                "elapsed_s": s.elapsed_s,
                "rss_bytes": s.rss_bytes,
                "rss_median_bytes": s.rss_median_bytes,
                "rss_peak_bytes": s.rss_peak_bytes,
                "disk_bytes": s.disk_bytes,
                "history_bytes": s.history_bytes,
                "jobs_in_state": s.jobs_in_state,
                "event_floor": s.event_floor,
                "submit_p50_ms": s.submit_p50_ms,
                "submit_p99_ms": s.submit_p99_ms,
                "jobs_per_s": s.jobs_per_s,
            })).collect::<Vec<_>>(),
        })
    }

    /// The report for people.
    pub fn human(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut out = format!(
            "soak: {} jobs, retention {} / {} jobs, history {} / {}; {} submit errors\n\
             {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8} {:>7}\n",
            self.config.jobs,
            self.config.job_retention,
            self.config.max_retained_jobs,
            self.config.history_retention,
            self.config.history_max_bytes,
            self.errors,
            "jobs",
            "t (s)",
            "RSS MiB",
            "med MiB",
            "peak MiB",
            "disk MiB",
            "hist MiB",
            "in state",
            "ev floor",
            "p50 ms",
            "p99 ms",
            "jobs/s",
        );
        for s in &self.samples {
            out.push_str(&format!(
                "{:>9} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>8} {:>9} {:>8.2} {:>8.2} {:>7.0}\n",
                s.jobs,
                s.elapsed_s,
                mib(s.rss_bytes),
                mib(s.rss_median_bytes),
                mib(s.rss_peak_bytes),
                mib(s.disk_bytes),
                s.history_bytes
                    .map_or_else(|| "?".into(), |b| format!("{:.1}", mib(b))),
                s.jobs_in_state,
                s.event_floor,
                s.submit_p50_ms,
                s.submit_p99_ms,
                s.jobs_per_s,
            ));
        }
        out.push_str(&format!(
            "RSS growth first -> last sample: {:+.1}%; median RSS at most {:.1}% from the first sample's\n",
            self.rss_growth_percent(),
            self.rss_median_drift_percent()
        ));
        out
    }
}

/// Runs the scenario.
pub fn run(config: &SoakConfig) -> anyhow::Result<SoakReport> {
    run_scenario("gantry-soak-", 40, async |procs| {
        scenario(config, procs).await
    })
}

async fn scenario(config: &SoakConfig, procs: &mut ProcGroup) -> anyhow::Result<SoakReport> {
    require_gantry(&config.gantry)?;
    let addr = free_ports(1)?[0];
    let url = format!("http://{addr}");
    let data = procs.path().join("coordinator");
    let max_retained = config.max_retained_jobs.to_string();
    let args: Vec<String> = [
        "coordinator",
        "--grpc-addr",
        &addr.to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--http-addr",
        "off",
        "--job-retention",
        &config.job_retention,
        "--max-retained-jobs",
        &max_retained,
        "--history-retention",
        &config.history_retention,
        "--history-max-bytes",
        &config.history_max_bytes,
    ]
    .map(String::from)
    .to_vec();
    let pid = procs.spawn_coordinator(&config.gantry, &args, &config.log_level)?;
    let urls = vec![url.clone()];
    let (_fleet, _agents) = start_fleet(&urls, config.agents, 0).await?;
    eprintln!("soak: coordinator up at {url}; {} agents", config.agents);

    let issued = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let client = gantry_client(endpoint(&url)?.connect().await?);
    let run_id = format!("soak-{}-{}", std::process::id(), unix_ms());
    let mut tasks = Vec::new();
    for task in 0..config.concurrency {
        let mut client = client.clone();
        let (issued, acked, errors, latencies) = (
            issued.clone(),
            acked.clone(),
            errors.clone(),
            latencies.clone(),
        );
        let (limit, run_id) = (config.jobs, run_id.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = issued.fetch_add(1, Ordering::Relaxed);
                if seq >= limit {
                    break;
                }
                let sent = Instant::now();
                let call = client.submit(submit_request(format!("{run_id}-{task}-{seq}")));
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(_)) => {
                        latencies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(sent.elapsed());
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last = (start, 0u64);
    let mut next = config.every.max(1);
    let mut rss_reads = Vec::new();
    while next <= config.jobs {
        let done = acked.load(Ordering::Relaxed);
        let finished = tasks.iter().all(|t| t.is_finished());
        rss_reads.push(status_bytes(&pid, "VmRSS:")?);
        if done < next && !finished {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let taken = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
        let submits = Latencies::new(taken);
        let now = Instant::now();
        let cluster = status(&url)
            .await
            .context("no status from the coordinator")?;
        samples.push(Sample {
            jobs: done,
            elapsed_s: now.duration_since(start).as_secs_f64(),
            rss_bytes: status_bytes(&pid, "VmRSS:")?,
            rss_median_bytes: median(&mut rss_reads),
            rss_peak_bytes: rss_reads.iter().copied().max().unwrap_or(0),
            disk_bytes: disk_usage(&data),
            history_bytes: cluster.history_bytes,
            jobs_in_state: cluster.jobs_by_state.values().map(|n| u64::from(*n)).sum(),
            event_floor: cluster.event_floor,
            submit_p50_ms: submits.ms(0.5),
            submit_p99_ms: submits.ms(0.99),
            jobs_per_s: (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64(),
        });
        eprintln!(
            "soak: {done} jobs, RSS {} MiB",
            samples.last().map_or(0, |s| s.rss_bytes >> 20)
        );
        last = (now, done);
        rss_reads.clear();
        if finished {
            break;
        }
        next += config.every.max(1);
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(SoakReport {
        config: config.clone(),
        samples,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// The median of `values` (0 when empty).
fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Bytes of the files under `dir` (files that vanish while counted, as
/// sled's do, are skipped).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
