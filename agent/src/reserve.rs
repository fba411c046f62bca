//! Room kept on the agent's data volume for the records that must survive a
//! full disk.
//!
//! Jobs write their output into their attempt directories, on the agent's
//! data volume, so a job that writes without bound fills it. What must not
//! be lost then is the end of each attempt: the supervisor's `status.json`
//! is the only record of how the job ended, and without it the attempt
//! counts as lost and runs again elsewhere (a finished job run twice, its
//! result thrown away). So the agent keeps [`BYTES`] of real blocks in
//! `<data-dir>/disk-reserve`; a record write that fails with "no space left"
//! empties the reserve and tries once more. The agent refills it once the
//! volume has room again, and says so in its log; the full volume itself
//! shows in `gantry nodes` as disk pressure (the heartbeat's disk figures).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the reserve file in the data directory.
pub const FILE: &str = "disk-reserve";
/// Size of the reserve: room for thousands of `status.json` records.
pub const BYTES: u64 = 4 << 20;

/// The reserve of the agent whose data directory is `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The data directory of an attempt directory (`<data-dir>/jobs/<job>/<attempt>`).
fn data_dir_of(attempt_dir: &Path) -> Option<&Path> {
    attempt_dir.ancestors().nth(3)
}

/// What [`refill`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Full size already.
    Kept,
    /// It was used (or missing) and is full size again.
    Refilled,
    /// It was used and the volume has no room to refill it yet.
    Used,
}

/// Makes the reserve full size when it is not and the volume has room for it
/// twice over (so refilling never fills the volume itself).
pub fn refill(data_dir: &Path) -> std::io::Result<Reserve> {
    let file = path(data_dir);
    let len = std::fs::metadata(&file).map_or(0, |m| m.len());
    if len >= BYTES {
        return Ok(Reserve::Kept);
    }
    let free = crate::probe::host::volume(data_dir)?.available;
    if free < 2 * BYTES {
        return Ok(Reserve::Used);
    }
    // Real zeros, not `set_len`: a sparse file reserves nothing.
    let tmp = data_dir.join(format!(".{FILE}.tmp"));
    let written = (|| {
        let mut out = std::fs::File::create(&tmp)?;
        let zeros = vec![0u8; 64 << 10];
        for _ in 0..(BYTES / zeros.len() as u64) {
            out.write_all(&zeros)?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, &file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| Reserve::Refilled)
}

/// How often the agent checks (and refills) its reserve.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the reserve of `data_dir` full until `shutdown`, saying in the log
/// when the volume ran full (the reserve was used) and when it has room again.
pub async fn run(data_dir: PathBuf, shutdown: tokio_util::sync::CancellationToken) {
    let mut last: Option<Reserve> = None;
    loop {
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || refill(&dir)).await {
            Ok(Ok(now)) => {
                match (last, now) {
                    (Some(Reserve::Used), Reserve::Used) => {}
                    (_, Reserve::Used) => tracing::warn!(
                        data_dir = %data_dir.display(),
                        "the job-output volume is full: its disk reserve was used to record how jobs ended; jobs writing output may fail until space is freed"
                    ),
                    (Some(_), Reserve::Refilled) => tracing::info!(
                        data_dir = %data_dir.display(),
                        "the job-output volume has room again: disk reserve refilled"
                    ),
                    _ => {}
                }
                last = Some(now);
            }
            Ok(Err(error)) => {
                tracing::warn!(data_dir = %data_dir.display(), %error, "cannot refill the disk reserve");
            }
            Err(error) => tracing::error!(%error, "disk reserve task failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// Gives the reserve of the agent owning `attempt_dir` back to the volume;
/// returns whether there was anything to give.
pub fn release_for(attempt_dir: &Path) -> bool {
    let Some(data_dir) = data_dir_of(attempt_dir) else {
        return false;
    };
    let file = path(data_dir);
    match std::fs::metadata(&file) {
        Ok(meta) if meta.len() > 0 => std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(0))
            .is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refill_writes_real_blocks_once_and_release_gives_them_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(refill(dir.path()).expect("refill"), Reserve::Refilled);
        let meta = std::fs::metadata(path(dir.path())).expect("reserve");
        assert_eq!(meta.len(), BYTES);
        // Allocated, not sparse.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= BYTES, "{} blocks", meta.blocks());
        assert_eq!(refill(dir.path()).expect("again"), Reserve::Kept);

        let attempt = dir.path().join("jobs").join("7").join("1");
        std::fs::create_dir_all(&attempt).expect("attempt dir");
        assert!(release_for(&attempt));
        assert_eq!(
            std::fs::metadata(path(dir.path())).expect("reserve").len(),
            0
        );
        // Nothing left to give.
        assert!(!release_for(&attempt));
        assert_eq!(refill(dir.path()).expect("refill"), Reserve::Refilled);
    }

    #[test]
    fn release_outside_an_agent_layout_gives_nothing() {
        assert!(!release_for(Path::new("/")));
        assert!(!release_for(Path::new("relative")));
    }
}
