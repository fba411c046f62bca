//! The executor's side of an attempt's life: recording it and forking its
//! supervisor, following the supervisor (start, stop requests, GPU memory
//! policy, exit), and, when the agent starts, settling every attempt an
//! earlier agent process left on disk.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use super::*;
use crate::attempt::{self, AttemptRecord, Claim, ExitStatus, RECORD, Recovery, STATUS, Started};
use crate::error::AgentError;
use crate::procgroup::{ProcessId, group_alive, proc_stat, signal_group};
use crate::supervisor::{SupervisorCommand, note};

/// An attempt directory after [`settle`].
enum Settled {
    /// Its supervisor runs.
    Running {
        supervisor: ProcessId,
        started: Option<Started>,
    },
    /// It ended; the status is on disk.
    Ended {
        status: ExitStatus,
        started: Option<Started>,
        stderr_tail: Vec<u8>,
        acked: bool,
    },
}

impl Executor {
    /// Finds the attempts of an earlier agent process under the data
    /// directory: adopts those whose supervisor still runs (they are listed
    /// by [`Executor::running`], so the next `Register` reports them),
    /// reports those that ended meanwhile, and records as lost (stopping
    /// whatever is left of their process group) those whose supervisor is
    /// gone without a status or never started. Call it once, before
    /// registering. Errors only when the data directory cannot be listed.
    pub async fn recover(&self) -> Result<Recovered, AgentError> {
        let data_dir = self.inner.config.data_dir.clone();
        let grace = self.inner.config.kill_grace;
        let found = tokio::task::spawn_blocking(move || recover_dirs(&data_dir, grace))
            .await
            .map_err(|e| AgentError::Probe(format!("recovery task failed: {e}")))??;
        let mut recovered = Recovered::default();
        for (record, settled) in found {
            let launch = record.launch;
            let key = (launch.job_id, launch.attempt);
            let _entered = self.span(&launch).entered();
            match settled {
                Settled::Running {
                    supervisor,
                    started,
                } => {
                    tracing::info!(
                        supervisor = supervisor.pid,
                        pid = started.map(|s| s.process.pid),
                        "adopting a running attempt"
                    );
                    recovered.adopted += 1;
                    let (control, control_rx) = mpsc::unbounded_channel();
                    let state = EntryState::Active {
                        control,
                        started_at_ms: started.map_or(record.accepted_at_ms, |s| s.at_ms),
                        pgid: started.map(|s| s.process.pid),
                    };
                    self.jobs().insert(key, Entry::new(&launch, state));
                    let this = self.clone();
                    let dir = self.attempt_dir(key.0, key.1);
                    let span = self.span(&launch);
                    let watch = Watch {
                        child: None,
                        supervisor: Some(supervisor),
                        started,
                        stop_sent: false,
                    };
                    self.inner.tracker.spawn(
                        async move { this.watch(launch, dir, watch, control_rx).await }
                            .instrument(span),
                    );
                }
                Settled::Ended {
                    status,
                    started,
                    stderr_tail,
                    acked,
                } => {
                    let kept = if acked {
                        recovered.acknowledged += 1;
                        Kept::Acknowledged
                    } else {
                        recovered.reported += 1;
                        Kept::Unacknowledged
                    };
                    let state = EntryState::Finished {
                        at: Instant::now(),
                        ended_at_ms: status.ended_at_ms,
                        kept,
                    };
                    self.jobs().insert(key, Entry::new(&launch, state));
                    if !acked {
                        tracing::info!(
                            lost = status.lost.as_deref().unwrap_or(""),
                            "reporting an attempt that ended while the agent was away"
                        );
                        if let Some(started) = started {
                            self.emit(
                                key,
                                started.at_ms,
                                JobEventKind::Started {
                                    pid: started.process.pid,
                                },
                            );
                        }
                        self.emit(key, status.ended_at_ms, status.event_kind(stderr_tail, 0));
                    }
                }
            }
        }
        self.cleanup();
        Ok(recovered)
    }

    /// Records the attempt durably, then forks its supervisor and watches it.
    pub(super) async fn start(
        self,
        launch: Launch,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
    ) {
        let dir = self.attempt_dir(launch.job_id, launch.attempt);
        let record = AttemptRecord {
            launch: launch.clone(),
            node_name: self.inner.config.node_name.clone(),
            kill_grace_ms: u64::try_from(self.inner.config.kill_grace.as_millis())
                .unwrap_or(u64::MAX),
            run_as: self.inner.config.run_as,
            accepted_at_ms: now_ms(),
        };
        let record_once = |dir: PathBuf, record: AttemptRecord| {
            tokio::task::spawn_blocking(move || write_record(&dir, &record))
        };
        let mut written = record_once(dir.clone(), record.clone()).await;
        // The volume is full and the reserve spent: the node's condition,
        // not the job's. Wait for room (bounded) rather than fail the job;
        // a stop still ends it at once.
        let deadline = tokio::time::Instant::now() + VOLUME_FULL_WAIT;
        let mut told = false;
        while let Ok(Err(error)) = &written
            && attempt::is_volume_full(error)
            && tokio::time::Instant::now() < deadline
        {
            if !std::mem::replace(&mut told, true) {
                tracing::warn!(%error, wait_s = VOLUME_FULL_WAIT.as_secs(), "the job-output volume is full: waiting for room to record the attempt");
            }
            tokio::select! {
                () = self.inner.detach.cancelled() => return,
                control = control_rx.recv() => match control {
                    Some(Control::Stop(stop)) => {
                        return self.end_refused(&launch, &dir, stop.reason).await;
                    }
                    Some(_) => {}
                    None => tokio::time::sleep(VOLUME_FULL_RETRY).await,
                },
                () = tokio::time::sleep(VOLUME_FULL_RETRY) => {}
            }
            written = record_once(dir.clone(), record.clone()).await;
        }
        match written {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // Forgotten here but on disk (remembered no longer than
                // FINISHED_MEMORY): never a second start; report what it is.
                tracing::warn!(
                    "assignment for an attempt already recorded on this node: not starting it again"
                );
                let watch = Watch {
                    child: None,
                    supervisor: None,
                    started: None,
                    stop_sent: false,
                };
                self.watch(launch, dir, watch, control_rx).await;
                return;
            }
            Ok(Err(error)) => return self.end_unstarted(&launch, &dir, error).await,
            Err(e) => {
                return self
                    .end_unstarted(&launch, &dir, format!("record task failed: {e}"))
                    .await;
            }
        }
        if self.inner.detach.is_cancelled() {
            // Never forked: the next agent finds it unclaimed and reports it lost.
            return;
        }
        // A stop that came right behind the assignment (a cancel racing an
        // assignment already on the wire) refuses it: nothing is forked.
        // Nothing else can be queued before the attempt runs.
        if let Ok(Control::Stop(stop)) = control_rx.try_recv() {
            return self.end_refused(&launch, &dir, stop.reason).await;
        }
        match fork_supervisor(&self.inner.config.supervisor, &dir) {
            Ok((child, supervisor)) => {
                tracing::debug!(supervisor = supervisor.pid, "supervisor started");
                let watch = Watch {
                    child: Some(child),
                    supervisor: Some(supervisor),
                    started: None,
                    stop_sent: false,
                };
                self.watch(launch, dir, watch, control_rx).await;
            }
            Err(error) => self.end_unstarted(&launch, &dir, error).await,
        }
    }

    /// An attempt that failed before any supervisor ran it: recorded as a
    /// spawn failure (so a restarted agent reports the same) and reported.
    async fn end_unstarted(&self, launch: &Launch, dir: &Path, error: String) {
        tracing::warn!(%error, "job spawn failed");
        let status = ExitStatus {
            code: None,
            signal: None,
            stopped: None,
            spawn_error: Some(error.clone()),
            lost: None,
            ended_at_ms: now_ms(),
        };
        self.end_unforked(launch, dir, status, error).await;
    }

    /// An attempt stopped before its supervisor was forked: recorded as
    /// stopped (so a restarted agent reports the same) and reported, e.g.
    /// `cancelled` for a user's cancel; it never ran.
    async fn end_refused(&self, launch: &Launch, dir: &Path, reason: StopReason) {
        tracing::info!(?reason, "stopped before it started: not started");
        let status = ExitStatus {
            code: None,
            signal: None,
            stopped: Some(reason),
            spawn_error: None,
            lost: None,
            ended_at_ms: now_ms(),
        };
        let why = format!("stopped before it started ({reason:?})");
        self.end_unforked(launch, dir, status, why).await;
    }

    /// Claims an attempt no supervisor ran, writes its final status and
    /// reports it.
    async fn end_unforked(&self, launch: &Launch, dir: &Path, status: ExitStatus, reason: String) {
        let ended_at_ms = status.ended_at_ms;
        let kind = status.event_kind(Vec::new(), 0);
        let dir = dir.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            if !dir.join(RECORD).exists() {
                return Ok(());
            }
            // Claimed first: no supervisor may start it after this.
            attempt::claim(&dir, &Claim::Abandoned { reason })?;
            attempt::write_json(&dir, STATUS, &status)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot record the unstarted attempt's end"),
            Err(e) => tracing::warn!(error = %e, "unstarted attempt task failed"),
        }
        let key = (launch.job_id, launch.attempt);
        self.set_finished(key, ended_at_ms);
        self.emit(key, ended_at_ms, kind);
    }

    /// Watches an attempt's supervisor until it ends (or the agent exits
    /// leaving it running), forwarding stop requests and the GPU memory
    /// policy; then reports how the attempt ended.
    async fn watch(
        self,
        launch: Launch,
        dir: PathBuf,
        mut watch: Watch,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
    ) {
        let key = (launch.job_id, launch.attempt);
        if let Some(started) = &watch.started {
            self.set_started(key, started);
        }
        loop {
            if let Some(supervisor) = watch.supervisor
                && !self
                    .follow(&launch, &dir, supervisor, &mut watch, &mut control_rx)
                    .await
            {
                tracing::info!("agent exiting: the job keeps running under its supervisor");
                return;
            }
            let settled = {
                let (dir, grace) = (dir.clone(), self.inner.config.kill_grace);
                tokio::task::spawn_blocking(move || settle(&dir, grace)).await
            };
            let settled = match settled {
                Ok(settled) => settled,
                Err(e) => Err(format!("status task failed: {e}")),
            };
            match settled {
                Ok(Settled::Running {
                    supervisor,
                    started,
                }) if Some(supervisor) != watch.supervisor => {
                    // Only for a record found on disk: its supervisor runs.
                    tracing::info!(
                        supervisor = supervisor.pid,
                        "adopting the attempt's running supervisor"
                    );
                    if let Some(started) = &started {
                        self.set_started(key, started);
                    }
                    watch = Watch {
                        child: None,
                        supervisor: Some(supervisor),
                        started,
                        stop_sent: watch.stop_sent,
                    };
                }
                Ok(Settled::Running { .. }) => {
                    // Seen dead, read alive: a /proc read failed; look again.
                    tokio::time::sleep(WATCH_POLL).await;
                }
                Ok(Settled::Ended {
                    status,
                    started,
                    stderr_tail,
                    acked: _,
                }) => {
                    if watch.started.is_none()
                        && let Some(started) = started
                    {
                        // It ended before a poll saw it start.
                        self.report_started(key, &started);
                    }
                    let peak = self.set_finished(key, status.ended_at_ms);
                    tracing::info!(code = ?status.code, signal = ?status.signal, stopped = ?status.stopped, lost = status.lost.as_deref().unwrap_or(""), peak_gpu_memory_bytes = peak, "job exited");
                    self.emit(
                        key,
                        status.ended_at_ms,
                        status.event_kind(stderr_tail, peak),
                    );
                    return;
                }
                Err(error) => {
                    // Unreadable records: the attempt is reported lost, with why.
                    tracing::error!(%error, "cannot tell how the attempt ended: reporting it lost");
                    let peak = self.set_finished(key, now_ms());
                    let status = ExitStatus {
                        code: None,
                        signal: None,
                        stopped: None,
                        spawn_error: None,
                        lost: Some(error.clone()),
                        ended_at_ms: now_ms(),
                    };
                    self.emit(
                        key,
                        status.ended_at_ms,
                        status.event_kind(error.into_bytes(), peak),
                    );
                    return;
                }
            }
        }
    }

    /// Reports the job's process as started.
    fn report_started(&self, key: (u64, u32), started: &Started) {
        tracing::info!(pid = started.process.pid, "job started");
        self.set_started(key, started);
        let pid = started.process.pid;
        self.emit(key, started.at_ms, JobEventKind::Started { pid });
    }

    /// Follows a live supervisor until it is gone (returns true) or the
    /// agent exits leaving it running (false): reports the job's start,
    /// forwards stop requests, applies the GPU memory policy.
    async fn follow(
        &self,
        launch: &Launch,
        dir: &Path,
        supervisor: ProcessId,
        watch: &mut Watch,
        control_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) -> bool {
        let key = (launch.job_id, launch.attempt);
        let mut poll = tokio::time::interval(WATCH_POLL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.detach.cancelled() => return false,
                _ = wait_child(&mut watch.child) => return true,
                Some(control) = control_rx.recv() => match control {
                    Control::Stop(request) if !watch.stop_sent => {
                        watch.stop_sent = true;
                        request_stop(dir, supervisor, request).await;
                    }
                    Control::Stop(_) => {}
                    Control::OverMemory { used } => {
                        let sent = self.over_memory(launch, dir, supervisor, used, watch.stop_sent).await;
                        watch.stop_sent |= sent;
                    }
                },
                _ = poll.tick() => {
                    if watch.started.is_none()
                        && let Ok(Some(started)) = attempt::read_json::<Started>(dir, attempt::STARTED)
                    {
                        watch.started = Some(started);
                        self.report_started(key, &started);
                    }
                    if watch.child.is_none() && !supervisor.is_alive() {
                        return true;
                    }
                }
            }
        }
    }

    /// Applies the GPU memory policy of an attempt seen using `used` bytes;
    /// returns whether it asked the supervisor to stop the job.
    async fn over_memory(
        &self,
        launch: &Launch,
        dir: &Path,
        supervisor: ProcessId,
        used: u64,
        stop_sent: bool,
    ) -> bool {
        let stop = launch.gpu_memory_policy == GpuMemoryPolicy::Stop;
        if stop && stop_sent {
            return false;
        }
        let grace = self.inner.config.kill_grace;
        tracing::warn!(
            used,
            reserved = launch.gpu_memory_bytes,
            margin = launch.gpu_memory_margin_bytes,
            stopping = stop,
            "job over its GPU memory"
        );
        let consequence = if stop {
            format!("policy stop: SIGTERM, SIGKILL after {grace:?}")
        } else {
            "policy warn: the job keeps running".to_string()
        };
        let over = over_memory_message(launch, used);
        note(&dir.join("stderr"), &format!("{over}; {consequence}"));
        if !stop {
            return false;
        }
        let request = StopRequest {
            reason: StopReason::OverMemory,
            grace,
            message: over,
        };
        request_stop(dir, supervisor, request).await;
        true
    }
}

/// The supervisor an attempt's watch task follows.
struct Watch {
    /// Set when this agent forked it (it must be waited for).
    child: Option<tokio::process::Child>,
    /// Its identity; `None` = none known yet (the directory is read first).
    supervisor: Option<ProcessId>,
    /// The job's process once started (and reported, or known to the
    /// coordinator through `Register.running`).
    started: Option<Started>,
    /// Whether the supervisor was asked to stop: once per attempt.
    stop_sent: bool,
}

/// Waits for a forked supervisor to exit; forever when there is none.
async fn wait_child(child: &mut Option<tokio::process::Child>) {
    match child {
        Some(process) => {
            if let Err(e) = process.wait().await {
                tracing::warn!(error = %e, "cannot wait for the supervisor");
            }
            *child = None;
        }
        None => std::future::pending().await,
    }
}

/// Writes the stop request where the supervisor reads it, then signals the
/// supervisor. The file comes first: a supervisor that starts or restarts
/// its wait later still finds it.
async fn request_stop(dir: &Path, supervisor: ProcessId, request: StopRequest) {
    tracing::info!(reason = ?request.reason, grace_ms = request.grace.as_millis() as u64, "asking the supervisor to stop the job");
    let dir = dir.to_path_buf();
    let stop = attempt::StopFile {
        reason: request.reason,
        grace_ms: u64::try_from(request.grace.as_millis()).unwrap_or(u64::MAX),
        message: request.message,
    };
    let sent = tokio::task::spawn_blocking(move || {
        let written = attempt::write_json(&dir, attempt::STOP, &stop);
        if supervisor.is_alive() {
            let pid = Pid::from_raw(i32::try_from(supervisor.pid).unwrap_or(0));
            if pid.as_raw() > 1 {
                kill(pid, Signal::SIGTERM)
                    .map_err(|e| format!("cannot signal the supervisor: {e}"))?;
            }
        }
        written
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "stop request incomplete"),
        Err(e) => tracing::error!(error = %e, "stop task failed"),
    }
}

/// How long a new attempt waits for room on a full job-output volume
/// before it is reported as not started for that reason (`volume_full`:
/// the coordinator places it again without charging the job).
const VOLUME_FULL_WAIT: Duration = Duration::from_secs(30);
/// How often it tries again meanwhile.
const VOLUME_FULL_RETRY: Duration = Duration::from_secs(1);

/// Writes the attempt record unless one exists (returns false then).
fn write_record(dir: &Path, record: &AttemptRecord) -> Result<bool, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if dir.join(RECORD).exists() {
        return Ok(false);
    }
    attempt::write_json(dir, RECORD, record).map(|()| true)
}

/// Forks the supervisor of the attempt in `dir`, its stdio to
/// `supervisor.log` (no pipe to the agent: it must outlive it).
fn fork_supervisor(
    command: &SupervisorCommand,
    dir: &Path,
) -> Result<(tokio::process::Child, ProcessId), String> {
    let path = dir.join(attempt::SUPERVISOR_LOG);
    let log = std::fs::File::create(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let child = tokio::process::Command::new(&command.program)
        .args(&command.args)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // It outlives this agent process on purpose.
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start the supervisor {}: {e}",
                command.program.display()
            )
        })?;
    let pid = child
        .id()
        .ok_or("the supervisor exited before its pid could be read")?;
    // Our unreaped child, so its /proc entry exists even if it exited.
    let start_time = proc_stat(pid)
        .map(|s| s.start_time)
        .ok_or("cannot read the supervisor's /proc stat")?;
    Ok((child, ProcessId { pid, start_time }))
}

/// Brings an attempt directory to a settled state: running under a live
/// supervisor, or ended with a status on disk. A record nobody claimed is
/// claimed as abandoned; one whose supervisor is gone without a status is
/// recorded lost after what is left of its process group is stopped.
fn settle(dir: &Path, grace: Duration) -> Result<Settled, String> {
    // Twice at most: a lost claim race means a supervisor just claimed it.
    for _ in 0..3 {
        let disk = attempt::read(dir)?;
        match attempt::classify(&disk, ProcessId::is_alive) {
            Recovery::Adopt {
                supervisor,
                started,
            } => {
                return Ok(Settled::Running {
                    supervisor,
                    started,
                });
            }
            Recovery::Acknowledged { .. } | Recovery::Ended(_) => {
                let status = disk.status.ok_or("status vanished")?;
                return Ok(Settled::Ended {
                    status,
                    started: disk.started,
                    stderr_tail: read_tail(&dir.join("stderr"), STDERR_TAIL_BYTES),
                    acked: disk.acked,
                });
            }
            Recovery::Unclaimed => {
                let reason =
                    "the agent stopped before the attempt's supervisor started it; it never ran"
                        .to_string();
                attempt::claim(dir, &Claim::Abandoned { reason })?;
            }
            Recovery::Lost { reason, started } => {
                if let Some(started) = &started {
                    stop_leftovers(started, grace);
                }
                note(&dir.join("stderr"), &format!("lost: {reason}"));
                let status = ExitStatus {
                    code: None,
                    signal: None,
                    stopped: disk.stop.map(|s| s.reason),
                    spawn_error: None,
                    lost: Some(reason),
                    ended_at_ms: now_ms(),
                };
                attempt::write_json(dir, STATUS, &status)?;
            }
        }
    }
    Err(format!("{} keeps changing", dir.display()))
}

/// Stops what is left of a lost attempt's process group: SIGTERM, then
/// SIGKILL after `grace`. Its supervisor is gone, so nobody else will.
fn stop_leftovers(started: &Started, grace: Duration) {
    let Some(pgid) = attempt::leftover_group(started) else {
        return;
    };
    tracing::warn!(pgid, "stopping the processes a lost attempt left behind");
    signal_group(pgid, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        std::thread::sleep(GROUP_POLL);
    }
    signal_group(pgid, Signal::SIGKILL);
}

/// Settles every attempt directory under `data_dir` (see [`settle`]).
/// Directories that cannot be read are skipped with a warning.
fn recover_dirs(
    data_dir: &Path,
    grace: Duration,
) -> Result<Vec<(AttemptRecord, Settled)>, AgentError> {
    let keys = attempt::list(data_dir).map_err(|source| AgentError::Io {
        action: "cannot list attempts in",
        path: data_dir.join("jobs"),
        source,
    })?;
    let mut out = Vec::new();
    for (job_id, attempt) in keys {
        let dir = attempt_dir(data_dir, job_id, attempt);
        let found = attempt::read_json::<AttemptRecord>(&dir, RECORD)
            .and_then(|record| record.ok_or_else(|| format!("no {RECORD}")))
            .and_then(|record| Ok((record, settle(&dir, grace)?)));
        match found {
            Ok(found) => out.push(found),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "skipping an unreadable attempt directory");
            }
        }
    }
    Ok(out)
}
