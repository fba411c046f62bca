//! Simulated GPUs and the test hook file `fake-state.json`.
//!
//! # `<data_dir>/fake-state.json`
//!
//! Re-read by the agent on every heartbeat, so tests can change what the
//! agent reports while it runs. Every key is optional and an absent file means
//! "no overrides":
//!
//! ```json
//! {
//!   "gpu_used_bytes":       {"0": 10737418240},
//!   "disk_used_bytes":      123,
//!   "disk_total_bytes":     456,
//!   "job_gpu_memory_bytes": {"42": 1234},
//!   "gpu_faults":           {"1": "xid 79: GPU has fallen off the bus"}
//! }
//! ```
//!
//! - `gpu_used_bytes`: GPU index -> bytes used by processes Gantry did not
//!   start. Added to that fake GPU's NVML-used memory.
//! - `job_gpu_memory_bytes`: job id -> bytes the job "uses" on each of its
//!   GPUs while it runs. Added to the used memory of every GPU the job holds
//!   and reported as the job's usage (`JobUsage`).
//! - `disk_used_bytes` / `disk_total_bytes`: replace the real figures of the
//!   data volume in heartbeats (how tests simulate a full disk). They apply
//!   whatever the GPU source, since disk pressure is not a GPU matter.
//! - `gpu_faults`: GPU index -> the fault the agent reports for that fake
//!   GPU (as NVML health would: see [`super::nvml::fault`]); the GPU is
//!   healthy again in the agent's reports once its key is removed.
//!
//! A file that does not parse is ignored with a warning (once per distinct
//! error), so a test writing the file non-atomically cannot crash the agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::{GpuLive, GpuProbe, GpuReport, GpuSample, JobGpuUsage, JobGpus};
use crate::config::FakeGpu;

/// File name of the test hook, inside the agent's data directory.
pub const FAKE_STATE_FILE: &str = "fake-state.json";

/// The parsed contents of `fake-state.json` (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeState {
    /// GPU index (as a string key) -> bytes used by foreign processes.
    pub gpu_used_bytes: BTreeMap<String, u64>,
    /// Overrides the data volume's used bytes.
    pub disk_used_bytes: Option<u64>,
    /// Overrides the data volume's total bytes.
    pub disk_total_bytes: Option<u64>,
    /// Job id (as a string key) -> bytes the job uses per GPU.
    pub job_gpu_memory_bytes: BTreeMap<String, u64>,
    /// GPU index (as a string key) -> the fault reported for it.
    pub gpu_faults: BTreeMap<String, String>,
}

/// The last parse error reported, so a broken file warns once, not every second.
static LAST_WARNING: Mutex<Option<String>> = Mutex::new(None);

impl FakeState {
    /// Reads `<data_dir>/fake-state.json`; absent or unreadable means defaults.
    pub fn load(data_dir: &Path) -> Self {
        Self::load_file(&data_dir.join(FAKE_STATE_FILE))
    }

    /// Reads the given file; absent or unreadable means defaults.
    pub fn load_file(path: &Path) -> Self {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => {
                warn_once(format!("cannot read {}: {e}", path.display()));
                return Self::default();
            }
        };
        match serde_json::from_str(&text) {
            Ok(state) => state,
            Err(e) => {
                warn_once(format!("ignoring malformed {}: {e}", path.display()));
                Self::default()
            }
        }
    }

    fn gpu_used(&self, index: u32) -> u64 {
        self.gpu_used_bytes
            .get(&index.to_string())
            .copied()
            .unwrap_or(0)
    }

    fn gpu_fault(&self, index: u32) -> Option<String> {
        self.gpu_faults
            .get(&index.to_string())
            .map(|fault| fault.chars().take(super::MAX_FAULT_CHARS).collect())
    }

    fn job_used(&self, job_id: u64) -> Option<u64> {
        self.job_gpu_memory_bytes.get(&job_id.to_string()).copied()
    }
}

fn warn_once(message: String) {
    let mut last = LAST_WARNING.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() != Some(message.as_str()) {
        tracing::warn!("{message}");
        *last = Some(message);
    }
}

/// GPUs that exist only in configuration, with usage driven by `fake-state.json`.
#[derive(Debug, Clone)]
pub struct FakeGpuProbe {
    gpus: Vec<FakeGpu>,
    /// `None` = no hook file (e.g. `gantry agent --probe`): nothing is used.
    state_file: Option<PathBuf>,
}

impl FakeGpuProbe {
    /// Fake GPUs whose usage is read from `state_file` on every sample.
    pub fn new(gpus: Vec<FakeGpu>, state_file: Option<PathBuf>) -> Self {
        Self { gpus, state_file }
    }

    fn state(&self) -> FakeState {
        self.state_file
            .as_deref()
            .map(FakeState::load_file)
            .unwrap_or_default()
    }

    fn used(&self, state: &FakeState, index: u32, jobs: &[JobGpus]) -> u64 {
        let by_jobs: u64 = jobs
            .iter()
            .filter(|job| job.gpus.contains(&index))
            .filter_map(|job| state.job_used(job.job_id))
            .sum();
        state.gpu_used(index).saturating_add(by_jobs)
    }
}

fn index_of(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl GpuProbe for FakeGpuProbe {
    fn gpus(&mut self) -> Vec<GpuReport> {
        let state = self.state();
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| {
                let index = index_of(i);
                GpuReport {
                    index,
                    model: gpu.model.clone(),
                    uuid: format!("GPU-fake-{index}"),
                    total: gpu.total_bytes,
                    used: self.used(&state, index, &[]).min(gpu.total_bytes),
                }
            })
            .collect()
    }

    fn sample(&mut self, jobs: &[JobGpus]) -> GpuSample {
        let state = self.state();
        let gpus = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, gpu)| {
                let index = index_of(i);
                GpuLive {
                    index,
                    used_bytes: self.used(&state, index, jobs).min(gpu.total_bytes),
                    utilization_pct: 0,
                    temperature_c: 0,
                    fault: state.gpu_fault(index),
                }
            })
            .collect();
        let jobs = jobs
            .iter()
            .filter_map(|job| {
                state.job_used(job.job_id).map(|bytes| JobGpuUsage {
                    job_id: job.job_id,
                    attempt: job.attempt,
                    gpu_memory_bytes: bytes,
                })
            })
            .collect();
        GpuSample { gpus, jobs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(dir: &Path) -> FakeGpuProbe {
        let gpu = |gib: u64| FakeGpu {
            model: format!("H100-{gib}GiB"),
            total_bytes: gib << 30,
        };
        FakeGpuProbe::new(vec![gpu(80), gpu(80)], Some(dir.join(FAKE_STATE_FILE)))
    }

    #[test]
    fn absent_file_means_idle_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = probe(dir.path());
        let gpus = probe.gpus();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].uuid, "GPU-fake-1");
        assert!(gpus.iter().all(|g| g.used == 0 && g.total == 80 << 30));
        assert_eq!(FakeState::load(dir.path()), FakeState::default());
    }

    #[test]
    fn state_file_drives_usage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FAKE_STATE_FILE),
            r#"{"gpu_used_bytes": {"0": 1000}, "job_gpu_memory_bytes": {"7": 50}, "disk_used_bytes": 9,
                "gpu_faults": {"1": "xid 79"}}"#,
        )
        .unwrap();
        let mut probe = probe(dir.path());
        let jobs = [
            JobGpus {
                job_id: 7,
                attempt: 2,
                pgid: Some(1),
                gpus: vec![0, 1],
            },
            JobGpus {
                job_id: 8,
                attempt: 1,
                pgid: Some(2),
                gpus: vec![1],
            },
        ];
        let sample = probe.sample(&jobs);
        let used: Vec<u64> = sample.gpus.iter().map(|g| g.used_bytes).collect();
        assert_eq!(used, vec![1050, 50]);
        let faults: Vec<Option<&str>> = sample.gpus.iter().map(|g| g.fault.as_deref()).collect();
        assert_eq!(faults, vec![None, Some("xid 79")]);
        assert_eq!(
            sample.jobs,
            vec![JobGpuUsage {
                job_id: 7,
                attempt: 2,
                gpu_memory_bytes: 50
            }]
        );
        assert_eq!(FakeState::load(dir.path()).disk_used_bytes, Some(9));
    }

    #[test]
    fn malformed_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FAKE_STATE_FILE), "{not json").unwrap();
        assert_eq!(FakeState::load(dir.path()), FakeState::default());
        assert_eq!(probe(dir.path()).sample(&[]).gpus[0].used_bytes, 0);
    }
}
