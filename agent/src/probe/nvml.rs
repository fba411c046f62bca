//! Real GPUs through NVML, loaded at run time so that a machine without the
//! NVIDIA driver still builds and runs (and reports no GPUs).
//!
//! Health: each sample reads, per GPU, the volatile count of uncorrected
//! ECC errors, whether pages are pending retirement, the row remapper's
//! state (pending or failed remappings, Ampere and newer), and drains the
//! critical XID events NVML queued since the last sample; [`fault`] turns
//! them into the fault text a heartbeat carries. A critical XID is latched
//! for the agent's lifetime (as NVIDIA's device plugin does: the event is
//! gone once read, and the GPU needs a reset, which restarts the agent's
//! view); a query the driver does not offer counts as no evidence.

use std::collections::{BTreeMap, HashMap};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::error::nvml_try;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::{Device, Nvml};

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

/// What NVML reports about one GPU's health in one sample. `None` in a
/// field: the driver does not offer that query (counts as no evidence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthEvidence {
    /// The first critical XID latched for this GPU.
    pub xid: Option<u64>,
    /// Uncorrected ECC errors since the driver loaded (volatile counter).
    pub ecc_uncorrected: Option<u64>,
    /// Pages pending retirement (pre-Ampere: a reset retires them).
    pub pages_pending_retirement: Option<bool>,
    /// The row remapper's state (Ampere and newer).
    pub row_remap: Option<RowRemap>,
}

/// The row remapper's state of one GPU (`nvmlDeviceGetRemappedRows`):
/// Ampere and newer GPUs replace a failing memory row by a spare one at
/// the next reset instead of retiring pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowRemap {
    /// Rows remapped because of uncorrectable errors (informational).
    pub uncorrectable_rows: u32,
    /// A remapping waits for a GPU reset.
    pub pending: bool,
    /// A remapping failed in the past: the spares of a bank ran out, and
    /// NVIDIA's guidance is to replace the GPU.
    pub failed: bool,
}

/// The fault NVML's evidence shows on one GPU, if any, most serious first:
/// a latched critical XID, a failed row remapping, uncorrected ECC errors
/// since the driver loaded, a row remapping or pages pending retirement (a
/// reset is needed before they take effect). Bounded by
/// [`super::MAX_FAULT_CHARS`].
pub fn fault(evidence: &HealthEvidence) -> Option<String> {
    let row_remap = evidence.row_remap.unwrap_or_default();
    let text = if let Some(xid) = evidence.xid {
        format!("critical xid {xid}")
    } else if row_remap.failed {
        "row remapping failed (the gpu needs replacing)".to_string()
    } else if let Some(errors) = evidence.ecc_uncorrected.filter(|&n| n > 0) {
        format!("{errors} uncorrected ecc error(s) since the driver loaded")
    } else if row_remap.pending {
        format!(
            "row remapping pending, {} row(s) for uncorrectable errors (the gpu needs a reset)",
            row_remap.uncorrectable_rows
        )
    } else if evidence.pages_pending_retirement == Some(true) {
        "memory pages pending retirement (the gpu needs a reset)".to_string()
    } else {
        return None;
    };
    Some(text.chars().take(super::MAX_FAULT_CHARS).collect())
}

/// Reads the row remapper's state. nvml-wrapper 0.13 does not wrap
/// `nvmlDeviceGetRemappedRows`, so this is the agent's one FFI call,
/// through the function table nvml-wrapper already loaded. `None` when the
/// driver lacks the symbol or the GPU does not support it (pre-Ampere, MIG
/// with active instances).
#[allow(unsafe_code)]
fn row_remap(nvml: &Nvml, device: &Device<'_>) -> Option<RowRemap> {
    let lib = nvml.lib();
    // The table's entry is an `Err` when the driver lacks the symbol; the
    // generated wrapper would panic on it, so check first.
    if lib.nvmlDeviceGetRemappedRows.is_err() {
        return None;
    }
    let (mut correctable, mut uncorrectable, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: the symbol is loaded (checked above); `device.handle()` is a
    // valid handle for as long as `device` borrows `nvml`; the four
    // out-pointers point to live, writable `c_uint`s.
    let code = unsafe {
        lib.nvmlDeviceGetRemappedRows(
            device.handle(),
            &mut correctable,
            &mut uncorrectable,
            &mut pending,
            &mut failed,
        )
    };
    nvml_try(code).ok()?;
    Some(RowRemap {
        uncorrectable_rows: uncorrectable,
        pending: pending != 0,
        failed: failed != 0,
    })
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
                fault: fault(&HealthEvidence {
                    xid: self.xids.get(&index).copied(),
                    ecc_uncorrected: device
                        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                        .ok(),
                    pages_pending_retirement: device.are_pages_pending_retired().ok(),
                    row_remap: row_remap(nvml, &device),
                }),
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
        let none = HealthEvidence::default();
        let remap = |pending, failed| {
            Some(RowRemap {
                uncorrectable_rows: 3,
                pending,
                failed,
            })
        };
        for (evidence, expect) in [
            (none, None),
            (
                HealthEvidence {
                    ecc_uncorrected: Some(0),
                    pages_pending_retirement: Some(false),
                    row_remap: remap(false, false),
                    ..none
                },
                None,
            ),
            (
                HealthEvidence {
                    xid: Some(79),
                    ecc_uncorrected: Some(2),
                    pages_pending_retirement: Some(true),
                    row_remap: remap(true, true),
                },
                Some("critical xid 79"),
            ),
            (
                HealthEvidence {
                    ecc_uncorrected: Some(2),
                    row_remap: remap(true, true),
                    ..none
                },
                Some("row remapping failed (the gpu needs replacing)"),
            ),
            (
                HealthEvidence {
                    ecc_uncorrected: Some(2),
                    pages_pending_retirement: Some(true),
                    row_remap: remap(true, false),
                    ..none
                },
                Some("2 uncorrected ecc error(s) since the driver loaded"),
            ),
            (
                HealthEvidence {
                    ecc_uncorrected: Some(0),
                    pages_pending_retirement: Some(true),
                    row_remap: remap(true, false),
                    ..none
                },
                Some(
                    "row remapping pending, 3 row(s) for uncorrectable errors \
                     (the gpu needs a reset)",
                ),
            ),
            (
                HealthEvidence {
                    ecc_uncorrected: Some(0),
                    pages_pending_retirement: Some(true),
                    ..none
                },
                Some("memory pages pending retirement (the gpu needs a reset)"),
            ),
            (
                HealthEvidence {
                    pages_pending_retirement: Some(false),
                    ..none
                },
                None,
            ),
        ] {
            assert_eq!(fault(&evidence).as_deref(), expect, "{evidence:?}");
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
