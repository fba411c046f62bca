//! Real GPUs through NVML, loaded at run time so that a machine without the
//! NVIDIA driver still builds and runs (and reports no GPUs).
//!
//! Health: each sample reads, per GPU, the volatile count of uncorrected
//! ECC errors and whether pages are pending retirement, and drains the
//! critical XID events NVML queued since the last sample; [`fault`] turns
//! them into the fault text a heartbeat carries. A critical XID is latched
//! for the agent's lifetime (as NVIDIA's device plugin does: the event is
//! gone once read, and the GPU needs a reset, which restarts the agent's
//! view); a query the driver does not offer counts as no evidence.

use std::collections::{BTreeMap, HashMap};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

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

/// Critical XIDs that are an application's fault, not the GPU's (the list
/// NVIDIA's k8s device plugin skips): 13 graphics engine exception, 31 GPU
/// memory page fault, 43 GPU stopped processing, 45 preemptive cleanup,
/// 68 video processor exception, 109 context switch timeout.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Most XID events drained per sample, so a storm cannot stall a heartbeat.
const MAX_EVENTS_PER_SAMPLE: usize = 64;

/// The fault NVML's evidence shows on one GPU, if any: a latched critical
/// XID, uncorrected ECC errors since the driver loaded, or pages pending
/// retirement (a reset is needed before they are retired). `None` for a
/// query the driver does not offer. Bounded by [`super::MAX_FAULT_CHARS`].
pub fn fault(
    xid: Option<u64>,
    ecc_uncorrected: Option<u64>,
    pending_retirement: Option<bool>,
) -> Option<String> {
    let text = if let Some(xid) = xid {
        format!("critical xid {xid}")
    } else if let Some(errors) = ecc_uncorrected.filter(|&n| n > 0) {
        format!("{errors} uncorrected ecc error(s) since the driver loaded")
    } else if pending_retirement == Some(true) {
        "memory pages pending retirement (the gpu needs a reset)".to_string()
    } else {
        return None;
    };
    Some(text.chars().take(super::MAX_FAULT_CHARS).collect())
}

/// Reads GPUs through the NVIDIA driver. `None` inside means "no driver":
/// the probe then reports no GPUs rather than failing the agent.
pub struct NvmlGpuProbe {
    /// Leaked once per process: the XID event set borrows the library for
    /// its lifetime, and the library is needed for the process's lifetime.
    nvml: Option<&'static Nvml>,
    /// Critical XID events of every GPU that offers them.
    events: Option<EventSet<'static>>,
    /// The first critical XID seen per GPU index (latched).
    xids: BTreeMap<u32, u64>,
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
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let events = xid_events(nvml);
        Ok(Self {
            nvml: Some(nvml),
            events,
            xids: BTreeMap::new(),
        })
    }

    /// Loads NVML, or, without a driver, logs one warning and reports no GPUs.
    pub fn init_or_empty() -> Self {
        Self::init().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no GPUs: nvml is not available");
            Self {
                nvml: None,
                events: None,
                xids: BTreeMap::new(),
            }
        })
    }

    /// Reads the critical XID events queued since the last call (never
    /// waiting) and latches the first GPU-side one per GPU.
    fn drain_xids(&mut self) {
        let Some(events) = &self.events else { return };
        for _ in 0..MAX_EVENTS_PER_SAMPLE {
            let event = match events.wait(0) {
                Ok(event) => event,
                Err(NvmlError::Timeout) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "nvml xid events cannot be read");
                    return;
                }
            };
            let xid = match event.event_data {
                Some(XidError::Value(v)) => v,
                // 999: the driver could not tell which; treat it as critical.
                Some(XidError::Unknown) => 999,
                None => continue,
            };
            if APPLICATION_XIDS.contains(&xid) {
                continue;
            }
            let Ok(index) = event.device.index() else {
                continue;
            };
            tracing::error!(gpu = index, xid, "critical xid: the gpu is unhealthy");
            self.xids.entry(index).or_insert(xid);
        }
    }

    fn device_count(&self) -> u32 {
        let Some(nvml) = self.nvml else { return 0 };
        nvml.device_count().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "nvml cannot count devices");
            0
        })
    }
}

impl GpuProbe for NvmlGpuProbe {
    fn gpus(&mut self) -> Vec<GpuReport> {
        let Some(nvml) = self.nvml else {
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
        self.drain_xids();
        let Some(nvml) = self.nvml else {
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
                fault: fault(
                    self.xids.get(&index).copied(),
                    device
                        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                        .ok(),
                    device.are_pages_pending_retired().ok(),
                ),
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

/// An event set with every GPU that offers critical XID events registered;
/// `None` when none does (or NVML cannot make one): no XID evidence then.
fn xid_events(nvml: &'static Nvml) -> Option<EventSet<'static>> {
    let mut set = Some(nvml.create_event_set().ok()?);
    let mut registered = 0;
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        let Some(current) = set.take().filter(|_| supported) else {
            set = set.or_else(|| nvml.create_event_set().ok());
            continue;
        };
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, current) {
            Ok(back) => {
                set = Some(back);
                registered += 1;
            }
            Err(e) => {
                // The failed registration released the set: start another.
                tracing::warn!(gpu = index, error = %e, "nvml cannot watch xid events");
                set = nvml.create_event_set().ok();
            }
        }
    }
    set.filter(|_| registered > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_from_nvml_evidence() {
        for (xid, ecc, pending, expect) in [
            (None, None, None, None),
            (None, Some(0), Some(false), None),
            (Some(79), Some(2), Some(true), Some("critical xid 79")),
            (
                None,
                Some(2),
                Some(true),
                Some("2 uncorrected ecc error(s) since the driver loaded"),
            ),
            (
                None,
                Some(0),
                Some(true),
                Some("memory pages pending retirement (the gpu needs a reset)"),
            ),
            (None, None, Some(false), None),
        ] {
            assert_eq!(
                fault(xid, ecc, pending).as_deref(),
                expect,
                "{xid:?} {ecc:?} {pending:?}"
            );
        }
    }

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
