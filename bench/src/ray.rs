//! `gantry-bench ray`: Ray's fractional-GPU task benchmark beside Gantry's
//! end-to-end run, in the same run on the same machine: Ray with 8 fake
//! GPUs (`ray.init(num_gpus=8)`) runs 10,000 tasks of `num_gpus=0.25`,
//! then `e2e` runs without failover, and Gantry's jobs/s is printed as a
//! ratio of Ray's tasks/s. Ray is found as `python3 -c 'import ray'` (or
//! the interpreter `--python` names); without it the run says so plainly
//! and reports Gantry's figure alone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::e2e::{E2eConfig, E2eReport};

/// The benchmark Ray runs: tasks submitted at once, then awaited; a
/// warm-up of 100 first (worker start-up is not the figure).
///
/// `max_calls=0` lets a worker run more than one task: Ray's default for a
/// task that asks for GPUs is one task per worker process (to free GPU
/// memory), which makes the run measure Python start-up (about 15 tasks/s
/// on the 2-core machine, 10,000 tasks in over ten minutes), while
/// Gantry's simulated agents start nothing. `num_cpus=0` makes the GPU
/// fraction the only resource asked for, as Gantry's jobs ask for GPUs
/// only (Ray's default of one CPU a task would allow 2 at once here, not
/// the 32 the fractions allow).
const RAY_SCRIPT: &str = r#"
import json, sys, time
import ray
tasks = int(sys.argv[1])
ray.init(num_gpus=8, include_dashboard=False, log_to_driver=False)
@ray.remote(num_gpus=0.25, num_cpus=0, max_calls=0)
def task():
    return 0
ray.get([task.remote() for _ in range(100)])
start = time.perf_counter()
ray.get([task.remote() for _ in range(tasks)])
seconds = time.perf_counter() - start
print(json.dumps({"tasks": tasks, "seconds": seconds, "version": ray.__version__}))
"#;

/// Ray's figure.
#[derive(Debug, Clone)]
pub struct RayFigures {
    /// Tasks run.
    pub tasks: u64,
    /// Submit of the first to the result of the last.
    pub time: Duration,
    /// `ray.__version__`.
    pub version: String,
}

impl RayFigures {
    /// Tasks per second.
    pub fn tasks_per_s(&self) -> f64 {
        self.tasks as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// Ray and Gantry, one after the other.
#[derive(Debug, Clone)]
pub struct RayReport {
    /// Ray's run, or why there was none.
    pub ray: Result<RayFigures, String>,
    /// Gantry's run.
    pub gantry: E2eReport,
}

impl RayReport {
    /// Gantry's jobs/s over Ray's tasks/s, when Ray ran.
    pub fn ratio(&self) -> Option<f64> {
        let ray = self.ray.as_ref().ok()?;
        Some(self.gantry.jobs_per_s() / ray.tasks_per_s().max(1e-9))
    }

    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": "ray",
            "gantry_jobs_per_s": self.gantry.jobs_per_s(),
            "ray_tasks_per_s": self.ray.as_ref().ok().map(RayFigures::tasks_per_s),
            "ray_version": self.ray.as_ref().ok().map(|r| r.version.clone()),
            "ray_unavailable": self.ray.as_ref().err(),
            "gantry_over_ray": self.ratio(),
            "gantry": self.gantry.to_json(),
        })
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let gantry = self.gantry.jobs_per_s();
        match &self.ray {
            Ok(ray) => format!(
                "Gantry {gantry:.0} jobs/s = {:.2}x Ray's {:.0} tasks/s\n\
                 ray {}: {} tasks of num_gpus=0.25 on 8 fake GPUs in {:.2} s\n\
                 gantry e2e (same run, no failover):\n{}",
                self.ratio().unwrap_or(0.0),
                ray.tasks_per_s(),
                ray.version,
                ray.tasks,
                ray.time.as_secs_f64(),
                self.gantry.human()
            ),
            Err(why) => format!(
                "Gantry {gantry:.0} jobs/s; Ray not measured: {why}\n\
                 gantry e2e (no failover):\n{}",
                self.gantry.human()
            ),
        }
    }
}

/// Runs Ray's benchmark with `python` (`tasks` tasks), then `e2e`.
pub fn run(python: &Path, tasks: u64, e2e: &E2eConfig) -> anyhow::Result<RayReport> {
    let ray = run_ray(python, tasks);
    if let Err(why) = &ray {
        eprintln!("ray: {why}");
    }
    let gantry = crate::e2e::run(e2e)?;
    Ok(RayReport { ray, gantry })
}

/// Ray's figure, or one line saying why there is none (Ray not
/// installed, or its run failed).
fn run_ray(python: &Path, tasks: u64) -> Result<RayFigures, String> {
    let probe = Command::new(python)
        .args(["-c", "import ray"])
        .output()
        .map_err(|e| format!("{} -c 'import ray' could not run ({e})", python.display()))?;
    if !probe.status.success() {
        return Err(format!(
            "{} -c 'import ray' failed (pip install ray, or --python a venv's python that has it)",
            python.display()
        ));
    }
    eprintln!("ray: running {tasks} tasks of num_gpus=0.25 on 8 fake GPUs");
    ray_figures(python, tasks).map_err(|e| format!("ray's run failed: {e:#}"))
}

/// How long Ray's run may take at most: a run that measures something
/// else (one worker process per task took over ten minutes) is stopped
/// and reported as failed instead of holding up the comparison.
const RAY_LIMIT: Duration = Duration::from_secs(300);

fn ray_figures(python: &Path, tasks: u64) -> anyhow::Result<RayFigures> {
    let child = Command::new(python)
        .args(["-c", RAY_SCRIPT, &tasks.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start python")?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(RAY_LIMIT) {
        Ok(out) => out.context("waiting for python")?,
        Err(_) => {
            // Ray's driver going away makes Ray stop its own processes.
            let _ = kill(pid, Signal::SIGKILL);
            bail!("not done after {} s; stopped", RAY_LIMIT.as_secs());
        }
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        bail!("exit {}: {}", out.status, tail.join(" | "));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no result line")?;
    let value: Value = serde_json::from_str(line).context("result line")?;
    let seconds = value["seconds"].as_f64().context("no seconds")?;
    Ok(RayFigures {
        tasks: value["tasks"].as_u64().context("no tasks")?,
        time: Duration::from_secs_f64(seconds.max(0.0)),
        version: value["version"].as_str().context("no version")?.to_string(),
    })
}
