//! A fault-injection hook for tests of what happens when the replica loop
//! thread dies (issue 16: the replica must turn unhealthy and the process
//! exit non-zero).
//!
//! Only in debug builds (`cfg(debug_assertions)`), which is what the
//! integration tests run: a release binary has no hook at all. In a debug
//! build it is armed only when the process starts with the environment
//! variable [`PANIC_FILE_ENV`] naming a file; the driver then panics on the
//! first tick after that file exists. Nothing reachable from the network
//! can arm or trigger it: it takes both the environment of the process and
//! write access to its file system.

/// Environment variable naming the trigger file.
pub const PANIC_FILE_ENV: &str = "GANTRY_FAULT_RAFT_PANIC_FILE";

/// The armed hook (a no-op in release builds).
#[derive(Debug, Default)]
pub(crate) struct FaultHook {
    #[cfg(debug_assertions)]
    panic_file: Option<std::path::PathBuf>,
}

impl FaultHook {
    /// Reads [`PANIC_FILE_ENV`] (debug builds only).
    pub(crate) fn from_env() -> FaultHook {
        #[cfg(debug_assertions)]
        let panic_file = std::env::var_os(PANIC_FILE_ENV).map(std::path::PathBuf::from);
        #[cfg(debug_assertions)]
        if let Some(path) = &panic_file {
            tracing::warn!(file = %path.display(), "fault injection armed: the raft thread panics once this file exists");
        }
        FaultHook {
            #[cfg(debug_assertions)]
            panic_file,
        }
    }

    /// Panics when the trigger file exists.
    pub(crate) fn check(&self) {
        #[cfg(debug_assertions)]
        if let Some(path) = &self.panic_file
            && path.exists()
        {
            panic!("fault injection: {} exists", path.display());
        }
    }
}

/// Environment variable: milliseconds the sender of a snapshot waits
/// before each chunk (debug builds only), so that a test can kill the
/// receiver part-way through a transfer.
pub const SNAPSHOT_CHUNK_DELAY_ENV: &str = "GANTRY_FAULT_SNAPSHOT_CHUNK_DELAY_MS";

/// The delay before each snapshot chunk ([`SNAPSHOT_CHUNK_DELAY_ENV`];
/// always `None` in release builds).
pub(crate) fn snapshot_chunk_delay() -> Option<std::time::Duration> {
    #[cfg(debug_assertions)]
    {
        let millis = std::env::var(SNAPSHOT_CHUNK_DELAY_ENV).ok()?.parse().ok()?;
        Some(std::time::Duration::from_millis(millis))
    }
    #[cfg(not(debug_assertions))]
    None
}

/// Environment variable: milliseconds a replica's snapshot writer thread
/// waits before it writes the file (debug builds only), so that a test can
/// apply entries, install a peer's snapshot or stop the replica while a
/// snapshot is in flight.
pub const SNAPSHOT_WRITE_DELAY_ENV: &str = "GANTRY_FAULT_SNAPSHOT_WRITE_DELAY_MS";

/// Sleeps for [`SNAPSHOT_WRITE_DELAY_ENV`] (never in release builds).
pub(crate) fn snapshot_write_delay() {
    #[cfg(debug_assertions)]
    if let Some(millis) = std::env::var(SNAPSHOT_WRITE_DELAY_ENV)
        .ok()
        .and_then(|value| value.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(millis));
    }
}
