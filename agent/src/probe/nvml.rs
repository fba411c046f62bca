//! Real GPUs through NVML, loaded at run time so that a machine without the
//! NVIDIA driver still builds and runs (and reports no GPUs).

use std::collections::HashMap;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;

use super::{GpuLive, GpuProbe, GpuReport, GpuSample, JobGpuUsage, JobGpus};
use crate::error::AgentError;
use crate::procgroup::{ProcStat, proc_stat};

/// Most parents walked up from a GPU process looking for a job's leader.
const MAX_ANCESTRY: usize = 64;

/// The job a GPU process belongs to, given jobs by leader pid (= process
/// group id): the job whose process group it is in, or failing that (it
/// moved to a group or session of its own), the job whose leader is one of
/// its ancestors. Orphans re-parented to init and out of the group are lost
/// to accounting; NVML then still counts them in the GPU's used memory.
fn owner<T>(
    pid: u32,
    leaders: &HashMap<u32, T>,
    stat: impl Fn(u32) -> Option<ProcStat>,
) -> Option<&T> {
    let first = stat(pid)?;
    if let Some(job) = leaders.get(&first.pgrp) {
        return Some(job);
    }
    let mut current = pid;
    let mut parent = first.ppid;
    for _ in 0..MAX_ANCESTRY {
        if let Some(job) = leaders.get(&current) {
            return Some(job);
        }
        if parent <= 1 {
            return None;
        }
        current = parent;
        parent = stat(current)?.ppid;
    }
    None
}

/// Reads GPUs through the NVIDIA driver. `None` inside means "no driver":
/// the probe then reports no GPUs rather than failing the agent.
pub struct NvmlGpuProbe {
    nvml: Option<Nvml>,
}

impl std::fmt::Debug for NvmlGpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpuProbe")
            .field("loaded", &self.nvml.is_some())
            .finish()
    }
}

impl NvmlGpuProbe {
    /// Loads NVML; fails with a readable reason when there is no driver.
    pub fn init() -> Result<Self, AgentError> {
        let nvml = Nvml::init().map_err(|e| {
            AgentError::Nvml(format!(
                "cannot load the NVIDIA driver library (libnvidia-ml): {e}; \
                 is an NVIDIA driver installed?"
            ))
        })?;
        Ok(Self { nvml: Some(nvml) })
    }

    /// Loads NVML, or, without a driver, logs one warning and reports no GPUs.
    pub fn init_or_empty() -> Self {
        Self::init().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no GPUs: nvml is not available");
            Self { nvml: None }
        })
    }

    fn device_count(&self) -> u32 {
        let Some(nvml) = &self.nvml else { return 0 };
        nvml.device_count().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "nvml cannot count devices");
            0
        })
    }
}

impl GpuProbe for NvmlGpuProbe {
    fn gpus(&mut self) -> Vec<GpuReport> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for index in 0..self.device_count() {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e, "nvml cannot open device");
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            out.push(GpuReport {
                index,
                model: device.name().unwrap_or_else(|_| "unknown".into()),
                uuid: device.uuid().unwrap_or_default(),
                total: memory.as_ref().map_or(0, |m| m.total),
                used: memory.as_ref().map_or(0, |m| m.used),
            });
        }
        out
    }

    fn sample(&mut self, jobs: &[JobGpus]) -> GpuSample {
        let Some(nvml) = &self.nvml else {
            return GpuSample::default();
        };
        // Processes are attributed to jobs by process group: every job runs in
        // its own group, so anything its leader forks counts towards it.
        let by_pgid: HashMap<u32, &JobGpus> = jobs
            .iter()
            .filter_map(|job| job.pgid.map(|pgid| (pgid, job)))
            .collect();
        let mut per_job_gpu: HashMap<(u64, u32, u32), u64> = HashMap::new();
        let mut gpus = Vec::new();
        for index in 0..self.device_count() {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            gpus.push(GpuLive {
                index,
                used_bytes: device.memory_info().map_or(0, |m| m.used),
                utilization_pct: device.utilization_rates().map_or(0, |u| u.gpu),
                temperature_c: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            });
            if by_pgid.is_empty() {
                continue;
            }
            for process in device.running_compute_processes().unwrap_or_default() {
                let UsedGpuMemory::Used(bytes) = process.used_gpu_memory else {
                    continue;
                };
                if let Some(job) = owner(process.pid, &by_pgid, proc_stat) {
                    *per_job_gpu
                        .entry((job.job_id, job.attempt, index))
                        .or_default() += bytes;
                }
            }
        }
        let mut per_job: HashMap<(u64, u32), u64> = HashMap::new();
        for ((job_id, attempt, _gpu), bytes) in per_job_gpu {
            let max = per_job.entry((job_id, attempt)).or_default();
            *max = (*max).max(bytes);
        }
        let mut jobs: Vec<JobGpuUsage> = per_job
            .into_iter()
            .map(|((job_id, attempt), gpu_memory_bytes)| JobGpuUsage {
                job_id,
                attempt,
                gpu_memory_bytes,
            })
            .collect();
        jobs.sort_by_key(|j| (j.job_id, j.attempt));
        GpuSample { gpus, jobs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_processes_belong_to_the_job_by_group_or_ancestry() {
        // pid -> (ppid, pgrp); job "A" leads group 100, "B" leads 200.
        let table: HashMap<u32, (u32, u32)> = [
            (100, (1, 100)),
            (101, (100, 100)), // in A's group
            (102, (101, 102)), // setpgid'd child of A's child
            (103, (102, 103)), // its child, in yet another group
            (300, (1, 300)),   // not ours
            (301, (300, 300)),
            (201, (1, 200)),   // orphan still in B's group
            (400, (400, 400)), // a loop in a corrupt table
        ]
        .into();
        let stat = |pid: u32| {
            table.get(&pid).map(|&(ppid, pgrp)| ProcStat {
                start_time: 0,
                state: 'S',
                ppid,
                pgrp,
            })
        };
        let leaders: HashMap<u32, &str> = [(100, "A"), (200, "B")].into();
        for (pid, expect) in [
            (100, Some("A")),
            (101, Some("A")),
            (102, Some("A")),
            (103, Some("A")),
            (201, Some("B")),
            (301, None),
            (400, None),
            (999, None),
        ] {
            assert_eq!(owner(pid, &leaders, stat).copied(), expect, "pid {pid}");
        }
    }

    /// Works on machines with and without a driver: never panics, and without
    /// a driver the error says what is missing.
    #[test]
    fn probe_without_driver_does_not_panic() {
        match NvmlGpuProbe::init() {
            Ok(mut probe) => {
                let gpus = probe.gpus();
                let sample = probe.sample(&[]);
                assert_eq!(sample.gpus.len(), gpus.len());
            }
            Err(e) => assert!(e.to_string().contains("NVIDIA driver"), "{e}"),
        }
        let mut empty = NvmlGpuProbe::init_or_empty();
        let _ = empty.gpus();
        let _ = empty.sample(&[]);
    }
}
