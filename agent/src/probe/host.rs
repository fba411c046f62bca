//! CPU and memory probe (sysinfo) and data-volume probe (statvfs of the
//! data directory: whatever filesystem holds it, tmpfs and network mounts
//! included, which sysinfo's disk list leaves out).

use std::path::{Path, PathBuf};

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use super::fake::FakeState;
use crate::error::AgentError;

/// What the host has, for `Register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatic {
    /// Logical CPUs x 1000.
    pub cpu_millis: u64,
    /// Installed memory in bytes.
    pub memory_total_bytes: u64,
    /// Size of the volume holding the data directory.
    pub disk_total_bytes: u64,
}

/// How busy the host is, for heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSample {
    /// Average CPU use over all cores since the previous sample, percent.
    pub cpu_used_pct: u32,
    /// Memory in use in bytes.
    pub memory_used_bytes: u64,
    /// Used bytes of the data volume (or the `fake-state.json` override).
    pub disk_used_bytes: u64,
    /// Size of the data volume (or the `fake-state.json` override).
    pub disk_total_bytes: u64,
}

/// Reads the host through sysinfo. Holds its `System` between samples
/// because CPU usage is a difference between two refreshes.
#[derive(Debug)]
pub struct HostProbe {
    system: System,
    /// Canonicalised once.
    data_dir: PathBuf,
}

impl HostProbe {
    /// Creates the probe for the volume that holds `data_dir` (which must exist).
    pub fn new(data_dir: &Path) -> Result<Self, AgentError> {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(refresh)
            .map_err(|e| AgentError::Probe(format!("cannot read system information: {e}")))?;
        let data_dir = data_dir.canonicalize().map_err(|source| AgentError::Io {
            action: "cannot resolve data directory",
            path: data_dir.to_path_buf(),
            source,
        })?;
        Ok(Self { system, data_dir })
    }

    /// Totals for registration.
    pub fn statics(&mut self) -> HostStatic {
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let (disk_total_bytes, _) = self.disk();
        HostStatic {
            cpu_millis: self.system.cpus().len() as u64 * 1000,
            memory_total_bytes: self.system.total_memory(),
            disk_total_bytes: FakeState::load(&self.data_dir)
                .disk_total_bytes
                .unwrap_or(disk_total_bytes),
        }
    }

    /// Current usage; applies the disk overrides of `fake-state.json`.
    pub fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let (total, used) = self.disk();
        let fake = FakeState::load(&self.data_dir);
        HostSample {
            cpu_used_pct: self.system.global_cpu_usage().clamp(0.0, 100.0).round() as u32,
            memory_used_bytes: self.system.used_memory(),
            disk_used_bytes: fake.disk_used_bytes.unwrap_or(used),
            disk_total_bytes: fake.disk_total_bytes.unwrap_or(total),
        }
    }

    /// (total, used) of the volume holding the data directory (see
    /// [`volume`]); zeros when it cannot be read, which the coordinator
    /// treats as "unknown".
    fn disk(&mut self) -> (u64, u64) {
        match volume(&self.data_dir) {
            Ok(volume) => (volume.total, volume.total.saturating_sub(volume.available)),
            Err(error) => {
                tracing::debug!(%error, "cannot statvfs the data directory");
                (0, 0)
            }
        }
    }
}

/// Size and free space of the volume holding a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    /// Bytes in all.
    pub total: u64,
    /// Bytes an unprivileged writer (a job) can still write.
    pub available: u64,
}

/// Measures the volume holding `dir` with `statvfs`: whatever filesystem it
/// is (tmpfs and network mounts included).
pub fn volume(dir: &Path) -> std::io::Result<Volume> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let unit = stat.fragment_size();
    Ok(Volume {
        total: stat.blocks().saturating_mul(unit),
        available: stat.blocks_available().saturating_mul(unit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_plausible_host_figures() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HostProbe::new(dir.path()).unwrap();
        let statics = probe.statics();
        assert!(statics.cpu_millis >= 1000);
        assert!(statics.memory_total_bytes > 0);
        let sample = probe.sample();
        assert!(sample.cpu_used_pct <= 100);
        assert!(sample.memory_used_bytes <= statics.memory_total_bytes);
        assert!(sample.disk_used_bytes <= sample.disk_total_bytes);
    }

    #[test]
    fn fake_state_overrides_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(super::super::fake::FAKE_STATE_FILE),
            r#"{"disk_used_bytes": 90, "disk_total_bytes": 100}"#,
        )
        .unwrap();
        let mut probe = HostProbe::new(dir.path()).unwrap();
        let sample = probe.sample();
        assert_eq!((sample.disk_used_bytes, sample.disk_total_bytes), (90, 100));
        assert_eq!(probe.statics().disk_total_bytes, 100);
    }
}
