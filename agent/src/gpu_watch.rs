//! The GPU memory watch: samples running jobs' GPU memory on its own interval
//! ([`GPU_WATCH_INTERVAL`]) and hands the figures to
//! [`Executor::observe_gpu_usage`], which keeps peaks and applies each job's
//! over-use policy.
//!
//! Why a task of its own rather than only the heartbeat: heartbeats stop while
//! the coordinator is unreachable and may be stretched for large fleets, but a
//! job eating a GPU it shares must be caught within a second regardless.
//! Heartbeats feed the executor too, so a peak is sampled at least every
//! heartbeat and at least every interval.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::probe::SharedGpuProbe;

/// How often the watch samples GPU memory.
pub const GPU_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Samples `gpu` for the executor's running jobs every `interval` until
/// `shutdown` is cancelled. Sampling runs under `spawn_blocking` (NVML calls
/// and the fake-state file read are synchronous).
pub async fn run(
    executor: Executor,
    gpu: SharedGpuProbe,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    // A slow sample delays the next one rather than causing a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let jobs = executor.gpu_jobs();
        // Only started jobs are measured (see `observe_gpu_usage`).
        if !jobs.iter().any(|j| j.pgid.is_some()) {
            continue;
        }
        let gpu = gpu.clone();
        let sampled = tokio::task::spawn_blocking(move || gpu.lock().sample(&jobs)).await;
        match sampled {
            Ok(sample) => executor.observe_gpu_usage(&sample.jobs),
            Err(e) => tracing::error!(error = %e, "gpu watch sample failed"),
        }
    }
}
