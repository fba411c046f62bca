//! The nemesis's steady job load, on its own thread: ledger jobs of seeded
//! length (mostly 0.5-5 s, some 8-20 s, so that a process orphaned by an
//! agent kill can outlive the coordinator's patience), one in ten failing
//! its first attempt by design (retry back-off of 2 s), and cancels racing
//! the assignment (sent right after the submit) and the back-off (sent as
//! soon as the ledger shows the failed first attempt).
//!
//! Every submit carries an idempotency key and is retried on "could not be
//! reached" (exit 3) with the same key, so a failover never duplicates a
//! job; a job counts as acknowledged once a submit returned its id, and a
//! cancel once `gantry cancel` exited 0 (settled: nothing of the job runs
//! or starts any more; exit 5, "cancelling", promises no such thing and is
//! not counted).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gantry_scheduler::JobId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ledger::{LedgerWatch, job_command};
use crate::nemesis::now_ms;
use crate::run_gantry_in;

/// How long one submit is retried with its key.
const SUBMIT_DEADLINE: Duration = Duration::from_secs(30);
/// Share of jobs cancelled right after their submit.
const CANCEL_AT_SUBMIT: f64 = 0.08;
/// Share of jobs that fail their first attempt.
const FAIL_FIRST: f64 = 0.1;
/// Share of those cancelled during their back-off.
const CANCEL_IN_BACKOFF: f64 = 0.5;

/// What to submit, where.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Every replica's URL, comma-separated.
    pub addrs: String,
    /// Where spec files go.
    pub dir: PathBuf,
    /// The ledger the jobs write.
    pub ledger: PathBuf,
    /// Seed (mixed with a constant, so load and faults draw apart).
    pub seed: u64,
    /// Mean submit rate.
    pub jobs_per_second: f64,
    /// Network namespace the client commands run in (`None`: this process's).
    pub netns: Option<String>,
}

/// What the load got acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Acknowledged jobs and how many first attempts fail by design.
    pub acked: BTreeMap<JobId, u32>,
    /// Acknowledged cancels and when (ms).
    pub cancels: BTreeMap<JobId, u64>,
    /// Submits that never got an answer.
    pub submit_errors: usize,
}

/// Starts the load; it runs until `stop`.
pub fn spawn(
    plan: LoadPlan,
    load: Arc<Mutex<Load>>,
    watch: Arc<Mutex<LedgerWatch>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x10ad_10ad_10ad_10ad);
        // Jobs to cancel once their first attempt has failed.
        let mut in_backoff: Vec<JobId> = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let sleep_ms = if rng.random_bool(0.15) {
                rng.random_range(8_000..20_000)
            } else {
                rng.random_range(500..5_000)
            };
            let failing = u32::from(rng.random_bool(FAIL_FIRST));
            let cancel_now = rng.random_bool(CANCEL_AT_SUBMIT);
            let cancel_later = failing > 0 && rng.random_bool(CANCEL_IN_BACKOFF);
            match submit(&plan, n, sleep_ms, failing, &stop) {
                Some(id) => {
                    if let Ok(mut load) = load.lock() {
                        load.acked.insert(id, failing);
                    }
                    if cancel_now {
                        cancel(&plan, id, &load);
                    } else if cancel_later {
                        in_backoff.push(id);
                    }
                }
                None => {
                    if let Ok(mut load) = load.lock() {
                        load.submit_errors += 1;
                    }
                }
            }
            let failed: Vec<JobId> = match watch.lock() {
                Ok(watch) => in_backoff
                    .iter()
                    .copied()
                    .filter(|id| {
                        watch
                            .executions()
                            .iter()
                            .any(|e| e.job == *id && e.ended.is_some_and(|(_, rc)| rc != 0))
                    })
                    .collect(),
                Err(_) => return,
            };
            in_backoff.retain(|id| !failed.contains(id));
            for id in failed {
                cancel(&plan, id, &load);
            }
            let mean = 1.0 / plan.jobs_per_second.max(0.01);
            std::thread::sleep(Duration::from_secs_f64(mean * rng.random_range(0.5..1.5)));
        }
    })
}

/// Submits job `n`; retries "could not be reached" with its key until the
/// deadline. Returns its id once acknowledged.
fn submit(
    plan: &LoadPlan,
    n: u64,
    sleep_ms: u64,
    failing: u32,
    stop: &AtomicBool,
) -> Option<JobId> {
    let command = serde_json::to_string(&job_command(&plan.ledger, sleep_ms, failing)).ok()?;
    let spec = plan.dir.join(format!("job-{n}.yaml"));
    let yaml = format!(
        "name: nemesis-{n}\nresources: {{gpus: 1, gpu_memory: 20GiB}}\n\
         retry: {{max_attempts: 3, backoff: 2s}}\ncommand: {command}\n"
    );
    std::fs::write(&spec, yaml).ok()?;
    let spec = spec.display().to_string();
    let key = format!("nemesis-{}-{n}", plan.seed);
    let deadline = Instant::now() + SUBMIT_DEADLINE;
    loop {
        let out = run_gantry_in(
            plan.netns.as_deref(),
            &plan.addrs,
            &[],
            &["submit", "-f", &spec, "--key", &key, "-o", "json"],
        );
        if out.code == 0 {
            return out.json().ok()?["job_ids"][0].as_u64();
        }
        if out.code != 3 || Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            eprintln!(
                "nemesis: submit {n} failed ({}): {}",
                out.code,
                out.stderr.trim()
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Cancels a job; records the acknowledgement time if it came.
fn cancel(plan: &LoadPlan, id: JobId, load: &Mutex<Load>) {
    let out = run_gantry_in(
        plan.netns.as_deref(),
        &plan.addrs,
        &[],
        &["cancel", &id.to_string()],
    );
    if out.code == 0
        && let Ok(mut load) = load.lock()
    {
        load.cancels.insert(id, now_ms());
    }
}
