//! Probes: what the node has (registration) and how busy it is (heartbeats).
//!
//! [`HostProbe`] reads CPU, memory and the data volume through sysinfo;
//! a [`GpuProbe`] reads GPUs, either [`NvmlGpuProbe`] (the real driver) or
//! [`FakeGpuProbe`] (tests, `gantry dev`). Probes are synchronous: callers on
//! the async runtime run them under `spawn_blocking`.

pub mod fake;
pub mod host;
pub mod nvml;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

pub use fake::{FakeGpuProbe, FakeState};
pub use host::{HostProbe, HostSample, HostStatic};
pub use nvml::NvmlGpuProbe;

/// One GPU as seen by a probe: identity, size and current NVML-used memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReport {
    /// NVML index (PCI bus order); the same index goes into `CUDA_VISIBLE_DEVICES`.
    pub index: u32,
    /// Model name, e.g. `NVIDIA H100 80GB HBM3` or a fake `H100-80GiB`.
    pub model: String,
    /// Stable device UUID (`GPU-...`; fake GPUs get `GPU-fake-<index>`).
    pub uuid: String,
    /// Total memory in bytes.
    pub total: u64,
    /// Used memory in bytes, all processes (NVML's view).
    pub used: u64,
}

impl fmt::Display for GpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use gantry_scheduler::units::format_bytes;
        write!(
            f,
            "gpu {} {} {} used {} of {}",
            self.index,
            self.model,
            self.uuid,
            format_bytes(self.used),
            format_bytes(self.total)
        )
    }
}

/// Live figures of one GPU for a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuLive {
    /// NVML index.
    pub index: u32,
    /// Used memory in bytes, all processes.
    pub used_bytes: u64,
    /// Kernel utilisation over the last sample period, percent.
    pub utilization_pct: u32,
    /// Core temperature, degrees Celsius.
    pub temperature_c: u32,
    /// Why the GPU is unhealthy, if it is ([`nvml::fault`] for real GPUs,
    /// `gpu_faults` in `fake-state.json` for fake ones); at most
    /// [`MAX_FAULT_CHARS`] characters.
    pub fault: Option<String>,
}

/// Longest fault text an agent reports for one GPU (the coordinator
/// truncates again: it never trusts an agent's bounds).
pub const MAX_FAULT_CHARS: usize = 200;

/// A running job as a GPU probe needs to know it, to attribute memory to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobGpus {
    /// Job id.
    pub job_id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// Process group id of the job (its leader's pid); `None` while spawning.
    pub pgid: Option<u32>,
    /// GPU indices assigned to the job.
    pub gpus: Vec<u32>,
}

/// GPU memory a job actually uses, as measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobGpuUsage {
    /// Job id.
    pub job_id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// The job's largest per-GPU usage in bytes, comparable with its per-GPU
    /// reservation (`gpu_memory_bytes`).
    pub gpu_memory_bytes: u64,
}

/// The result of one GPU sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSample {
    /// One entry per GPU.
    pub gpus: Vec<GpuLive>,
    /// One entry per running job that the probe could measure.
    pub jobs: Vec<JobGpuUsage>,
}

/// A source of GPU facts. Implementations must never panic for a missing
/// driver or a vanished device: they report what they can.
pub trait GpuProbe: Send {
    /// The GPUs with their static facts and current used memory.
    fn gpus(&mut self) -> Vec<GpuReport>;
    /// Live telemetry, attributing per-process memory to `jobs`.
    fn sample(&mut self, jobs: &[JobGpus]) -> GpuSample;
}

/// A GPU probe shared by the heartbeat and the GPU memory watch
/// ([`crate::gpu_watch`]). A std mutex: probes are synchronous and are only
/// locked under `spawn_blocking`.
#[derive(Clone)]
pub struct SharedGpuProbe(Arc<Mutex<Box<dyn GpuProbe>>>);

impl SharedGpuProbe {
    /// Shares `probe`.
    pub fn new(probe: Box<dyn GpuProbe>) -> Self {
        Self(Arc::new(Mutex::new(probe)))
    }

    /// Locks the probe; blocking, so call it off the async runtime.
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn GpuProbe>> {
        // A probe that panicked mid-sample keeps no state worth distrusting.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for SharedGpuProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedGpuProbe").finish_non_exhaustive()
    }
}

/// The host probe and the GPU probe together: what a heartbeat samples.
pub struct Probes {
    /// CPU, memory, disk.
    pub host: HostProbe,
    /// GPUs; also sampled by the GPU memory watch.
    pub gpu: SharedGpuProbe,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}
