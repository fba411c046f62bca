//! The data volume's reserve: client writes are refused, with
//! RESOURCE_EXHAUSTED and one line, while the volume holding the data dir
//! has less free space than the reserve (`--disk-reserve`), and accepted
//! again once space is freed. Reads go on.
//!
//! Why a reserve rather than waiting for the first failed write: a write
//! that fails inside the replica loop or the store is fatal to the replica
//! (it stops rather than acknowledge what it could not persist), and the
//! cluster's own bookkeeping must still fit: exit reports of running jobs,
//! placements, node health. Those are not refused; they use the reserve,
//! so work that runs is never lost to a full disk made by submissions.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::CoordinatorError;

/// Free space kept for the cluster's own writes, by default.
pub const DEFAULT_RESERVE_BYTES: u64 = 64 << 20;

/// Why a write is refused with `available` bytes free and `reserve` kept,
/// if it is.
pub fn refusal(dir: &str, available: u64, reserve: u64) -> Option<String> {
    (available < reserve).then(|| {
        format!(
            "data volume of {dir} is full: {} free, under the {} reserve; writes are refused until space is freed (reads still work)",
            gantry_scheduler::units::format_bytes(available),
            gantry_scheduler::units::format_bytes(reserve)
        )
    })
}

/// How long one measurement of the volume stands. Without it every client
/// write made a `statvfs` call; a volume does not fill the default reserve
/// in a second from client writes that are themselves bounded in size.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A measurement is reused only while it showed at least this many times
/// the reserve free.
pub const CACHED_ABOVE_RESERVES: u64 = 4;

/// The reserve of one data dir.
#[derive(Debug, Clone)]
pub struct DiskReserve {
    dir: PathBuf,
    reserve: u64,
    refresh: Duration,
    /// The last measurement (when, bytes available), shared by the clones
    /// every service holds; a std Mutex, held only to copy two words.
    last: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl DiskReserve {
    /// Keeps `reserve` bytes free on the volume of `dir` (0 = never refuse),
    /// measuring it at most once per [`REFRESH`].
    pub fn new(dir: PathBuf, reserve: u64) -> DiskReserve {
        DiskReserve::with_refresh(dir, reserve, REFRESH)
    }

    /// The same, measuring at most once per `refresh`.
    pub fn with_refresh(dir: PathBuf, reserve: u64, refresh: Duration) -> DiskReserve {
        DiskReserve {
            dir,
            reserve,
            refresh,
            last: Arc::default(),
        }
    }

    /// Refuses a client write while the volume is under the reserve. A
    /// volume that cannot be measured refuses too: never a default.
    pub fn check(&self) -> Result<(), CoordinatorError> {
        if self.reserve == 0 {
            return Ok(());
        }
        let dir = self.dir.display().to_string();
        let available = self.available(&dir)?;
        match refusal(&dir, available, self.reserve) {
            Some(reason) => Err(CoordinatorError::ResourceExhausted(reason)),
            None => Ok(()),
        }
    }

    /// Bytes available on the volume: the last measurement while it is
    /// fresh, else a new one. A failed measurement is not kept.
    fn available(&self, dir: &str) -> Result<u64, CoordinatorError> {
        let now = Instant::now();
        // The value is plain data: a panic elsewhere cannot leave it half made.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Reused only while it showed plenty of room: near the reserve every
        // write measures, so a volume filling up is refused at once rather
        // than up to one refresh period later.
        if let Some((at, bytes)) = *last
            && now.duration_since(at) < self.refresh
            && bytes >= self.reserve.saturating_mul(CACHED_ABOVE_RESERVES)
        {
            return Ok(bytes);
        }
        let stats = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| {
            CoordinatorError::ResourceExhausted(format!(
                "cannot measure the free space of {dir} ({e}); writes are refused"
            ))
        })?;
        let available = stats
            .blocks_available()
            .saturating_mul(stats.fragment_size());
        *last = Some((now, available));
        Ok(available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_only_under_the_reserve() {
        let mib = 1 << 20;
        let cases: &[(u64, u64, Option<&str>)] = &[
            (100 * mib, 64 * mib, None),
            (64 * mib, 64 * mib, None),
            (
                63 * mib,
                64 * mib,
                Some(
                    "data volume of /d is full: 63MiB free, under the 64MiB reserve; writes are refused until space is freed (reads still work)",
                ),
            ),
            (0, 1, Some("data volume of /d is full: 0B free")),
            (0, 0, None),
        ];
        for (available, reserve, want) in cases {
            let got = refusal("/d", *available, *reserve);
            match want {
                None => assert_eq!(got, None, "{available} {reserve}"),
                Some(text) => {
                    let got = got.expect("refused");
                    assert!(got.starts_with(text), "{got}");
                }
            }
        }
    }

    #[test]
    fn a_real_volume_is_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(DiskReserve::new(dir.path().into(), 1).check().is_ok());
        let error = DiskReserve::new(dir.path().into(), u64::MAX)
            .check()
            .expect_err("no volume is that large");
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::ResourceExhausted
        );
        let missing = DiskReserve::new(dir.path().join("gone"), 1).check();
        assert!(missing.is_err(), "an unmeasurable volume refuses");
    }

    /// A measurement stands for the refresh period (no `statvfs` per
    /// write), only that long, and only while it showed plenty of room.
    #[test]
    fn a_measurement_is_reused_while_fresh_and_roomy() {
        // (refresh, reserve as a share of the free space: 0 = 1 byte, reused)
        let cases = [
            (Duration::from_secs(3600), 0, true),
            (Duration::ZERO, 0, false),
            // Free space under 4x the reserve: measured at every write.
            (Duration::from_secs(3600), 3, false),
        ];
        for (refresh, share, reused) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let data = dir.path().join("data");
            std::fs::create_dir(&data).expect("mkdir");
            let stats = nix::sys::statvfs::statvfs(&data).expect("statvfs");
            let free = stats.blocks_available() * stats.fragment_size();
            let reserve_bytes = free.checked_div(share).unwrap_or(1);
            let reserve = DiskReserve::with_refresh(data.clone(), reserve_bytes, refresh);
            assert!(reserve.check().is_ok(), "{refresh:?} 1/{share}");
            std::fs::remove_dir(&data).expect("rmdir");
            // Gone, so only the kept measurement can answer.
            assert_eq!(
                reserve.clone().check().is_ok(),
                reused,
                "{refresh:?} 1/{share}"
            );
        }
    }
}
