//! Gantry agent: runs on every GPU node, reports the node to the
//! coordinator and runs the jobs it is assigned.
//!
//! # Layout
//!
//! - [`config`]: [`AgentConfig`], [`GpuSource`], the `--fake-gpus` parser.
//! - [`probe`]: what the node has and how busy it is: [`probe::HostProbe`]
//!   (sysinfo), [`probe::NvmlGpuProbe`] (NVML, loaded at run time) and
//!   [`probe::FakeGpuProbe`] with its test hook file `fake-state.json`.
//! - [`executor`]: records each attempt, forks its [`supervisor`], watches
//!   it, asks it to stop the attempt (cancel, stale, drain, GPU memory
//!   over-use, shutdown with `--stop-jobs-on-exit`), serves the output;
//!   reports events on a channel. Keeps each attempt's GPU memory peak. On
//!   start it adopts the attempts an earlier agent process left running.
//! - [`supervisor`]: the per-attempt process (`gantry supervise DIR`) that
//!   owns the job's process group, outlives the agent, enforces the timeout
//!   and the stop escalation, and writes the exit status durably.
//! - `attempt`: the attempt directory's durable files and the pure
//!   decisions on them (what a restarted agent does with each attempt, which
//!   old directories to delete).
//! - [`snapshot`]: evaluation snapshots, private copies (reflink, else bytes)
//!   of files a job reads while others may rewrite them, made before the
//!   command starts under `<work>/snapshot/` (`GANTRY_SNAPSHOT_DIR`).
//!   With `--run-as` the sources are read by a helper process running as
//!   the job's user ([`snapshot::as_user`], `gantry __snapshot-copy`).
//! - `jobfs`: what the agent does in directories a job can write (handing
//!   the work directory over, opening output files), never following a link.
//! - [`gpu_watch`]: samples running jobs' GPU memory every 500 ms, whatever
//!   the heartbeat does, and feeds the executor's peaks and over-use policy.
//! - [`outbox`]: job events waiting for, or kept for re-delivery to, the
//!   coordinator (at-least-once; the coordinator deduplicates).
//! - `link`: the `AgentLink.ConnectAgent` stream: register, heartbeat,
//!   dispatch, reconnect with back-off.
//! - `convert`: the only module that maps wire (prost) types.
//!
//! # Architecture invariants
//!
//! - The executor knows nothing of gRPC; the link knows nothing of processes.
//! - Jobs keep running while the coordinator is unreachable and while the
//!   agent itself is down or restarting; only the coordinator (a cancel, or
//!   `Registered.stop`), an agent shutdown with `--stop-jobs-on-exit`, the
//!   job's own timeout or its GPU memory policy (`stop`) stops them. Policing
//!   does not depend on the link: the GPU watch runs while disconnected.
//! - An attempt number is started by at most one process: the agent records
//!   an attempt before it forks its supervisor, never records it twice, and
//!   a supervisor runs the job only after claiming the attempt (a claim is
//!   created once; see `attempt`).
//! - A job's command never runs before its snapshot is complete, and a
//!   snapshot is a copy, never a link to the live file.
//! - Every task the agent spawns ends when its shutdown token is cancelled;
//!   with `stop_jobs_on_exit`, [`run`] returns only after every job's
//!   process group is gone; without, only the supervisors remain.

mod attempt;
pub mod config;
mod convert;
pub mod error;
pub mod executor;
pub mod fence;
pub mod gpu_watch;
mod jobfs;
mod link;
pub mod outbox;
pub mod probe;
mod procgroup;
pub mod reconnect;
pub mod reserve;
pub mod snapshot;
pub mod supervisor;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, FakeGpu, GpuSource, JoinToken, RunAs, parse_fake_gpus};
pub use error::AgentError;
pub use probe::GpuReport;
pub use procgroup::ProcessId;

use crate::executor::{Executor, ExecutorConfig};
use crate::probe::{FakeGpuProbe, GpuProbe, HostProbe, NvmlGpuProbe, Probes, SharedGpuProbe};

/// Runs the agent until `shutdown` is cancelled. First it adopts the jobs an
/// earlier agent process left running and reports those that ended
/// meanwhile. On shutdown, with `stop_jobs_on_exit` it stops every running
/// job (SIGTERM to its process group, SIGKILL after the grace) and sends
/// their exit events if still connected; without, it leaves them running
/// under their supervisors for the next agent process.
///
/// Errors only for what makes starting impossible: a bad configuration, an
/// unusable data directory, or a host probe that cannot read the system.
/// An unreachable coordinator is not an error: the agent keeps retrying.
pub async fn run(mut config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    config.validate()?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|source| AgentError::Io {
            action: "cannot create data directory",
            path: config.data_dir.clone(),
            source,
        })?;
    // Absolute, because jobs get paths under it (GANTRY_WORK_DIR) while
    // running in another working directory.
    config.data_dir = tokio::fs::canonicalize(&config.data_dir)
        .await
        .map_err(|source| AgentError::Io {
            action: "cannot resolve data directory",
            path: config.data_dir.clone(),
            source,
        })?;
    let host = {
        let data_dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || HostProbe::new(&data_dir))
            .await
            .map_err(|e| AgentError::Probe(format!("host probe task failed: {e}")))??
    };
    let gpu: Box<dyn GpuProbe> = match &config.gpus {
        GpuSource::Nvml => Box::new(
            tokio::task::spawn_blocking(NvmlGpuProbe::init_or_empty)
                .await
                .map_err(|e| AgentError::Nvml(format!("nvml probe task failed: {e}")))?,
        ),
        GpuSource::Fake(gpus) => Box::new(FakeGpuProbe::new(
            gpus.clone(),
            Some(config.data_dir.join(probe::fake::FAKE_STATE_FILE)),
        )),
    };
    tracing::info!(
        node = %config.node_name,
        data_dir = %config.data_dir.display(),
        coordinators = ?config.coordinators,
        run_as = ?config.run_as,
        "agent starting"
    );
    if nix::unistd::geteuid().is_root() && config.run_as.is_none() {
        tracing::warn!("the agent runs as root without --run-as: jobs will run as root");
    }

    let supervisor = match &config.supervisor {
        Some(command) => command.clone(),
        None => supervisor::SupervisorCommand::this_binary()?,
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let executor = Executor::new(
        ExecutorConfig {
            node_name: config.node_name.clone(),
            data_dir: config.data_dir.clone(),
            kill_grace: config.kill_grace,
            run_as: config.run_as,
            supervisor,
        },
        events_tx,
    );
    // Before the link: the first Register lists the adopted attempts.
    let recovered = executor.recover().await?;
    tracing::info!(
        adopted = recovered.adopted,
        reported = recovered.reported,
        acknowledged = recovered.acknowledged,
        "attempts of earlier agent processes recovered"
    );
    let stop_jobs = config.stop_jobs_on_exit;
    let config = Arc::new(config);
    let gpu = SharedGpuProbe::new(gpu);
    // Stopped after the jobs, like the link.
    let watch_shutdown = CancellationToken::new();
    let watch_task = tokio::spawn(gpu_watch::run(
        executor.clone(),
        gpu.clone(),
        gpu_watch::GPU_WATCH_INTERVAL,
        watch_shutdown.clone(),
    ));
    let _watch_guard = watch_shutdown.clone().drop_guard();
    let reserve_task = tokio::spawn(reserve::run(
        config.data_dir.clone(),
        watch_shutdown.clone(),
    ));
    let contact = fence::Contact::new(std::time::Instant::now(), config.heartbeat_interval);
    let fence_task = tokio::spawn(fence::run(
        contact.clone(),
        executor.clone(),
        watch_shutdown.clone(),
    ));
    let link = link::Link::new(
        config,
        executor.clone(),
        Probes { host, gpu },
        events_rx,
        contact,
    );
    // The link outlives the caller's token a little: it stops only after the
    // jobs, so their exit events can still reach the coordinator.
    let link_shutdown = CancellationToken::new();
    let link_task = tokio::spawn(link.run(link_shutdown.clone()));
    // If this future is dropped instead of shut down, the link still ends.
    let _link_guard = link_shutdown.clone().drop_guard();

    shutdown.cancelled().await;
    tracing::info!(
        running = executor.running().len(),
        stop_jobs,
        "agent stopping{}",
        if stop_jobs {
            ": stopping jobs"
        } else {
            ": jobs keep running for the next agent process"
        }
    );
    executor.shutdown(stop_jobs).await;
    watch_shutdown.cancel();
    if let Err(e) = watch_task.await {
        tracing::error!(error = %e, "gpu watch task failed");
    }
    if let Err(e) = reserve_task.await {
        tracing::error!(error = %e, "disk reserve task failed");
    }
    if let Err(e) = fence_task.await {
        tracing::error!(error = %e, "fence task failed");
    }
    link_shutdown.cancel();
    if let Err(e) = link_task.await {
        tracing::error!(error = %e, "link task failed");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// One-shot GPU probe for diagnostics (`gantry agent --probe`): what NVML
/// (or the fake source) reports, or a readable error when there is no driver.
pub fn probe_gpus(source: &GpuSource) -> Result<Vec<GpuReport>, AgentError> {
    match source {
        GpuSource::Nvml => Ok(NvmlGpuProbe::init()?.gpus()),
        GpuSource::Fake(gpus) => Ok(FakeGpuProbe::new(gpus.clone(), None).gpus()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_gpus_reports_fakes_and_never_panics_on_nvml() {
        let fakes = parse_fake_gpus("2xH100-80GiB").unwrap();
        let gpus = probe_gpus(&GpuSource::Fake(fakes)).unwrap();
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(gpus[0].model, "H100-80GiB");
        match probe_gpus(&GpuSource::Nvml) {
            Ok(gpus) => assert!(gpus.iter().all(|g| g.total >= g.used)),
            Err(e) => assert!(matches!(e, AgentError::Nvml(_)), "{e}"),
        }
    }

    #[tokio::test]
    async fn run_rejects_bad_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig::for_test("n", dir.path().into(), vec![]);
        let err = run(config, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("coordinator"), "{err}");
        let config =
            AgentConfig::for_test("", dir.path().into(), vec!["http://127.0.0.1:1".into()]);
        assert!(run(config, CancellationToken::new()).await.is_err());
    }
}
