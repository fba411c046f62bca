//! The job executor: starts assigned attempts as process groups, watches them,
//! stops them on cancel, timeout or shutdown, and serves their output files.
//!
//! It knows nothing of gRPC: it takes a [`Launch`] and reports [`JobEvent`]s
//! on an mpsc channel, so it is tested without a coordinator.
//!
//! Files of an attempt live under `<data_dir>/jobs/<job_id>/<attempt>/`:
//! `stdout`, `stderr` and the working directory `work/` (with `snapshot/`
//! when the spec asks for [evaluation snapshots](crate::snapshot)).
//!
//! GPU memory policing: whoever samples the GPUs (the heartbeat, and
//! [`crate::gpu_watch`] every 500 ms) hands the per-job figures to
//! [`Executor::observe_gpu_usage`], which keeps each attempt's peak and, the
//! first time an attempt uses more than its reservation plus margin, tells its
//! supervisor, which applies the [`GpuMemoryPolicy`].

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use gantry_scheduler::units::format_bytes;

use crate::probe::{JobGpuUsage, JobGpus};
use crate::procgroup::{group_alive, signal_group};
use crate::snapshot::{self, SnapshotEntry};

/// Bytes of stderr sent with an exit event.
pub const STDERR_TAIL_BYTES: u64 = 64 * 1024;
/// Largest log chunk served per request.
pub const MAX_LOG_CHUNK: u32 = 1024 * 1024;
/// How long a finished attempt is remembered to refuse duplicate assignments.
const FINISHED_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// How often a stopping job's process group is checked for survivors.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// The current time in unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Settings the executor needs from the agent configuration.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Exported to jobs as `GANTRY_NODE`.
    pub node_name: String,
    /// Root of the jobs' directories.
    pub data_dir: PathBuf,
    /// SIGTERM -> SIGKILL grace for timeouts, shutdown and cancels without one.
    pub kill_grace: Duration,
    /// Jobs run as this user (their work directory is handed to it).
    pub run_as: Option<crate::config::RunAs>,
}

/// One attempt to run, already converted from the wire `Assignment`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Job id.
    pub job_id: u64,
    /// Attempt number (the fencing token).
    pub attempt: u32,
    /// Job kind (`selfplay`, `training`, ...), for logs.
    pub kind: String,
    /// argv; `{batch_size}` is substituted in every argument when `batch_size > 0`.
    pub command: Vec<String>,
    /// Run `command` joined with spaces through `/bin/sh -c`.
    pub shell: bool,
    /// Extra environment on top of the agent's own.
    pub env: BTreeMap<String, String>,
    /// GPU indices, exported as `CUDA_VISIBLE_DEVICES`.
    pub gpus: Vec<u32>,
    /// Reserved per-GPU memory, exported as `GANTRY_GPU_MEMORY_BYTES`.
    pub gpu_memory_bytes: u64,
    /// Chosen batch size; 0 = none.
    pub batch_size: u32,
    /// Wall-clock limit; `None` = unlimited.
    pub timeout: Option<Duration>,
    /// Files copied to `<work>/snapshot/` before the command runs.
    pub snapshot: Vec<SnapshotEntry>,
    /// What to do when the job uses more GPU memory than it reserved.
    pub gpu_memory_policy: GpuMemoryPolicy,
    /// Per-GPU bytes a job may use beyond `gpu_memory_bytes` before the
    /// policy applies.
    pub gpu_memory_margin_bytes: u64,
}

impl Launch {
    /// Per-GPU usage above which the policy applies; `None` when the job
    /// reserved no GPU memory (nothing to police against).
    pub fn gpu_memory_limit(&self) -> Option<u64> {
        (self.gpu_memory_bytes > 0).then(|| {
            self.gpu_memory_bytes
                .saturating_add(self.gpu_memory_margin_bytes)
        })
    }
}

/// What the agent does when a job uses more GPU memory than its reservation
/// plus margin (`JobSpec.gpu_memory_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuMemoryPolicy {
    /// Log a warning and note it in the job's stderr, once per attempt; the
    /// job keeps running.
    #[default]
    Warn,
    /// Stop the job like a timeout and report `over_memory`.
    Stop,
}

/// Something that happened to an attempt, for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// Job id.
    pub job_id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// When it happened, unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub kind: JobEventKind,
}

/// The kinds of [`JobEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEventKind {
    /// The process was spawned.
    Started {
        /// Its pid, also its process group id.
        pid: u32,
    },
    /// The process (and its group) ended.
    Exited(ExitReport),
    /// The process could not be started; no `Exited` follows.
    SpawnFailed {
        /// Why, naming the program or path involved.
        error: String,
    },
}

impl JobEventKind {
    /// Exits and spawn failures end an attempt; `Started` does not.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::Started { .. })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// The last [`STDERR_TAIL_BYTES`] of its stderr.
    pub stderr_tail: Vec<u8>,
    /// The agent killed it because it was cancelled (or stopped as stale).
    pub cancelled: bool,
    /// The agent stopped it because the agent itself is shutting down: not
    /// the job's fault, so the coordinator retries it as lost.
    pub agent_shutdown: bool,
    /// The most GPU memory the attempt was seen using on one GPU; 0 when
    /// never measured.
    pub peak_gpu_memory_bytes: u64,
    /// The agent stopped it for using more GPU memory than its reservation
    /// plus margin (policy `stop`).
    pub over_memory: bool,
}

/// Why the agent stops an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A user cancelled the job (`CancelJob`): reported with `cancelled = true`.
    Cancelled,
    /// The coordinator does not recognise the attempt (`Registered.stop`):
    /// reported with `cancelled = true`, since a newer attempt owns the job.
    Stale,
    /// The agent is shutting down: reported with `cancelled = false` so the
    /// coordinator retries the job elsewhere.
    Shutdown,
    /// The job ran past its timeout: reported with `cancelled = false`.
    Timeout,
    /// The job used more GPU memory than allowed under policy `stop`:
    /// reported with `cancelled = false, over_memory = true`.
    OverMemory,
}

impl StopReason {
    fn cancelled(self) -> bool {
        matches!(self, Self::Cancelled | Self::Stale)
    }
}

/// An attempt the agent has accepted and not yet seen end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningAttempt {
    /// Job id.
    pub job_id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// Spawn time (acceptance time while still spawning), unix milliseconds.
    pub started_at_ms: u64,
}

/// What [`Executor::launch`] did with an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchOutcome {
    /// Accepted: a `Started` or `SpawnFailed` event follows.
    Accepted,
    /// This job and attempt is already running or has run: ignored.
    Duplicate,
    /// The executor is shutting down: ignored.
    ShuttingDown,
}

/// A request for a piece of an attempt's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    /// Job id.
    pub job_id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// `"stdout"` (or `""`) or `"stderr"`.
    pub stream: String,
    /// Byte offset to read from.
    pub offset: u64,
    /// Most bytes wanted; 0 or more than [`MAX_LOG_CHUNK`] means [`MAX_LOG_CHUNK`].
    pub max_bytes: u32,
}

/// A piece of an attempt's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes read.
    pub data: Vec<u8>,
    /// Offset of `data` in the file.
    pub offset: u64,
    /// The attempt has ended and `data` reaches the end of the file.
    pub eof: bool,
}

struct StopRequest {
    reason: StopReason,
    grace: Duration,
}

/// What the executor tells a job's supervisor.
enum Control {
    Stop(StopRequest),
    /// The job was first seen above its GPU memory limit, using `used`
    /// bytes on one GPU. Sent at most once per attempt.
    OverMemory {
        used: u64,
    },
}

enum EntryState {
    Active {
        /// Why an unbounded channel: stop requests are rare and must never
        /// block the link loop (or the GPU watch) that sends them.
        control: mpsc::UnboundedSender<Control>,
        started_at_ms: u64,
        pgid: Option<u32>,
    },
    Finished {
        at: Instant,
    },
}

struct Entry {
    gpus: Vec<u32>,
    /// [`Launch::gpu_memory_limit`].
    gpu_memory_limit: Option<u64>,
    /// Highest per-GPU usage observed so far, reported at exit.
    peak_gpu_memory: u64,
    /// Whether the supervisor was told of over-use: once per attempt.
    over_memory_told: bool,
    state: EntryState,
}

struct Inner {
    config: ExecutorConfig,
    events: mpsc::UnboundedSender<JobEvent>,
    /// A std mutex: it is held only for map updates, never across an await.
    jobs: Mutex<HashMap<(u64, u32), Entry>>,
    /// Every job supervisor runs on it, so shutdown can wait for all of them.
    tracker: TaskTracker,
}

/// Runs attempts; cheap to clone (all clones share the same jobs).
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor reporting on `events`.
    pub fn new(config: ExecutorConfig, events: mpsc::UnboundedSender<JobEvent>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                events,
                jobs: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
            }),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<(u64, u32), Entry>> {
        // A panic while holding the lock leaves the map consistent (every
        // update is a single insert), so poisoning is safe to ignore.
        self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an attempt unless it is a duplicate. Must be called inside a
    /// tokio runtime; the work happens on a spawned supervisor task.
    pub fn launch(&self, launch: Launch) -> LaunchOutcome {
        let key = (launch.job_id, launch.attempt);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        {
            let mut jobs = self.jobs();
            if self.inner.tracker.is_closed() {
                return LaunchOutcome::ShuttingDown;
            }
            if jobs.contains_key(&key) {
                return LaunchOutcome::Duplicate;
            }
            if jobs.len() > 1024 {
                let now = Instant::now();
                jobs.retain(|_, entry| match entry.state {
                    EntryState::Finished { at } => now.duration_since(at) < FINISHED_MEMORY,
                    EntryState::Active { .. } => true,
                });
            }
            jobs.insert(
                key,
                Entry {
                    gpus: launch.gpus.clone(),
                    gpu_memory_limit: launch.gpu_memory_limit(),
                    peak_gpu_memory: 0,
                    over_memory_told: false,
                    state: EntryState::Active {
                        control: control_tx,
                        started_at_ms: now_ms(),
                        pgid: None,
                    },
                },
            );
        }
        // Every line about this attempt (start, exit, stop) carries it.
        let span = tracing::info_span!(
            "job",
            job_id = launch.job_id,
            attempt = launch.attempt,
            kind = %launch.kind,
            node = %self.inner.config.node_name,
        );
        let this = self.clone();
        self.inner
            .tracker
            .spawn(async move { this.supervise(launch, control_rx).await }.instrument(span));
        LaunchOutcome::Accepted
    }

    /// Stops an attempt (every running attempt of the job when `attempt` is 0):
    /// SIGTERM to its process group, SIGKILL after `grace` (the configured
    /// grace when `None`). Returns whether anything was running.
    pub fn stop(
        &self,
        job_id: u64,
        attempt: u32,
        grace: Option<Duration>,
        reason: StopReason,
    ) -> bool {
        let grace = grace.unwrap_or(self.inner.config.kill_grace);
        let jobs = self.jobs();
        let mut found = false;
        for ((id, att), entry) in jobs.iter() {
            if *id != job_id || (attempt != 0 && *att != attempt) {
                continue;
            }
            if let EntryState::Active { control, .. } = &entry.state {
                found |= control
                    .send(Control::Stop(StopRequest { reason, grace }))
                    .is_ok();
            }
        }
        found
    }

    /// Attempts accepted and not yet ended, for `Register.running`.
    pub fn running(&self) -> Vec<RunningAttempt> {
        let mut out: Vec<RunningAttempt> = self
            .jobs()
            .iter()
            .filter_map(|(&(job_id, attempt), entry)| match entry.state {
                EntryState::Active { started_at_ms, .. } => Some(RunningAttempt {
                    job_id,
                    attempt,
                    started_at_ms,
                }),
                EntryState::Finished { .. } => None,
            })
            .collect();
        out.sort_by_key(|r| (r.job_id, r.attempt));
        out
    }

    /// Running attempts with their GPUs and process groups, for GPU probes.
    pub fn gpu_jobs(&self) -> Vec<JobGpus> {
        let mut out: Vec<JobGpus> = self
            .jobs()
            .iter()
            .filter_map(|(&(job_id, attempt), entry)| match entry.state {
                EntryState::Active { pgid, .. } => Some(JobGpus {
                    job_id,
                    attempt,
                    pgid,
                    gpus: entry.gpus.clone(),
                }),
                EntryState::Finished { .. } => None,
            })
            .collect();
        out.sort_by_key(|j| (j.job_id, j.attempt));
        out
    }

    /// Takes in measured per-job GPU memory (from a heartbeat's or the GPU
    /// watch's sample): raises each started attempt's peak, and the first
    /// time an attempt is above its limit tells its supervisor, which applies
    /// the attempt's [`GpuMemoryPolicy`]. Figures for attempts not started
    /// yet (still copying a snapshot) or already ended are ignored.
    pub fn observe_gpu_usage(&self, usage: &[JobGpuUsage]) {
        let mut jobs = self.jobs();
        for measured in usage {
            let Some(entry) = jobs.get_mut(&(measured.job_id, measured.attempt)) else {
                continue;
            };
            let EntryState::Active {
                control,
                pgid: Some(_),
                ..
            } = &entry.state
            else {
                continue;
            };
            let used = measured.gpu_memory_bytes;
            entry.peak_gpu_memory = entry.peak_gpu_memory.max(used);
            if entry.over_memory_told || entry.gpu_memory_limit.is_none_or(|limit| used <= limit) {
                continue;
            }
            entry.over_memory_told = true;
            let _ = control.send(Control::OverMemory { used });
        }
    }

    /// The most GPU memory an attempt has been seen using on one GPU so far
    /// (0 = never measured); `None` for an attempt unknown here.
    pub fn gpu_memory_peak(&self, job_id: u64, attempt: u32) -> Option<u64> {
        self.jobs()
            .get(&(job_id, attempt))
            .map(|entry| entry.peak_gpu_memory)
    }

    /// Stops every running attempt with the configured grace, refuses new
    /// ones, and returns once every supervisor has finished.
    pub async fn shutdown(&self) {
        {
            // Closed under the lock so no launch slips in after the sweep.
            let jobs = self.jobs();
            self.inner.tracker.close();
            for entry in jobs.values() {
                if let EntryState::Active { control, .. } = &entry.state {
                    let _ = control.send(Control::Stop(StopRequest {
                        reason: StopReason::Shutdown,
                        grace: self.inner.config.kill_grace,
                    }));
                }
            }
        }
        self.inner.tracker.wait().await;
    }

    /// The directory of one attempt.
    pub fn attempt_dir(&self, job_id: u64, attempt: u32) -> PathBuf {
        attempt_dir(&self.inner.config.data_dir, job_id, attempt)
    }

    /// Reads a piece of an attempt's stdout or stderr. Errors are readable
    /// sentences for the user (unknown attempt, unknown stream, I/O).
    pub async fn read_log(&self, request: &LogRequest) -> Result<LogChunk, String> {
        let name = match request.stream.as_str() {
            "" | "stdout" => "stdout",
            "stderr" => "stderr",
            other => {
                return Err(format!(
                    "unknown stream {other:?}: expected stdout or stderr"
                ));
            }
        };
        let dir = self.attempt_dir(request.job_id, request.attempt);
        // Decided before reading: if the attempt had ended by now, the file
        // is complete and reaching its end means eof.
        let finished = match self.jobs().get(&(request.job_id, request.attempt)) {
            Some(entry) => matches!(entry.state, EntryState::Finished { .. }),
            // Output left by an earlier agent process: nothing writes to it.
            None if dir.is_dir() => true,
            None => {
                return Err(format!(
                    "no output for job {} attempt {} on this node",
                    request.job_id, request.attempt
                ));
            }
        };
        let path = dir.join(name);
        let max = match request.max_bytes {
            0 => MAX_LOG_CHUNK,
            n => n.min(MAX_LOG_CHUNK),
        };
        let mut file = match open_read(&path).await {
            Ok(file) => file,
            // Not created yet (the attempt is still being set up).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LogChunk {
                    data: Vec::new(),
                    offset: request.offset,
                    eof: finished,
                });
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let read = async {
            let len = file.metadata().await?.len();
            let mut data = Vec::new();
            if request.offset < len {
                file.seek(std::io::SeekFrom::Start(request.offset)).await?;
                (&mut file)
                    .take(u64::from(max))
                    .read_to_end(&mut data)
                    .await?;
            }
            Ok::<_, std::io::Error>((data, len))
        };
        let (data, len) = read
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let end = request.offset.saturating_add(data.len() as u64);
        Ok(LogChunk {
            eof: finished && end >= len,
            data,
            offset: request.offset,
        })
    }

    fn emit(&self, launch: &Launch, kind: JobEventKind) {
        let event = JobEvent {
            job_id: launch.job_id,
            attempt: launch.attempt,
            at_ms: now_ms(),
            kind,
        };
        // A closed channel means the agent is going away; nothing to tell.
        let _ = self.inner.events.send(event);
    }

    fn set_started(&self, launch: &Launch, pid: u32) {
        if let Some(Entry {
            state:
                EntryState::Active {
                    started_at_ms,
                    pgid,
                    ..
                },
            ..
        }) = self.jobs().get_mut(&(launch.job_id, launch.attempt))
        {
            *started_at_ms = now_ms();
            *pgid = Some(pid);
        }
    }

    /// Marks the attempt ended; returns its GPU memory peak.
    fn set_finished(&self, launch: &Launch) -> u64 {
        match self.jobs().get_mut(&(launch.job_id, launch.attempt)) {
            Some(entry) => {
                entry.state = EntryState::Finished { at: Instant::now() };
                entry.peak_gpu_memory
            }
            None => 0,
        }
    }

    /// Owns one attempt from spawn to the last process of its group.
    async fn supervise(self, launch: Launch, mut control_rx: mpsc::UnboundedReceiver<Control>) {
        let dir = self.attempt_dir(launch.job_id, launch.attempt);
        let stderr_path = dir.join("stderr");
        let mut child = match self.spawn(&launch, &dir, &mut control_rx).await {
            Ok(child) => child,
            Err(SpawnError::Failed(error)) => {
                tracing::warn!(%error, "job spawn failed");
                self.set_finished(&launch);
                self.emit(&launch, JobEventKind::SpawnFailed { error });
                return;
            }
            Err(SpawnError::Stopped(reason)) => {
                // Stopped before the command ran (while copying a snapshot):
                // an exit without a status, so a cancel is still a cancel and
                // a shutdown still a lost attempt.
                tracing::info!(?reason, "job stopped before it started");
                note(
                    &stderr_path,
                    &format!("stopped ({reason:?}) before the command started"),
                )
                .await;
                let stderr_tail = read_tail(&stderr_path, STDERR_TAIL_BYTES).await;
                self.set_finished(&launch);
                self.emit(
                    &launch,
                    JobEventKind::Exited(ExitReport {
                        code: None,
                        signal: None,
                        stderr_tail,
                        cancelled: reason.cancelled(),
                        agent_shutdown: reason == StopReason::Shutdown,
                        peak_gpu_memory_bytes: 0,
                        over_memory: false,
                    }),
                );
                return;
            }
        };
        let Some(pid) = child.id() else {
            // Only possible if the child was already reaped, which nothing did.
            self.set_finished(&launch);
            self.emit(
                &launch,
                JobEventKind::SpawnFailed {
                    error: "child exited before its pid could be read".into(),
                },
            );
            return;
        };
        tracing::info!(pid, gpus = ?launch.gpus, batch_size = launch.batch_size, "job started");
        self.set_started(&launch, pid);
        self.emit(&launch, JobEventKind::Started { pid });

        let deadline = launch.timeout.map(|t| Instant::now() + t);
        // Set once the agent decides to stop the job: why, and when SIGKILL is due.
        let mut stopping: Option<(StopReason, Instant)> = None;
        let mut killed = false;
        let status = loop {
            let kill_at = stopping.map(|(_, at)| at);
            tokio::select! {
                status = child.wait() => break status,
                Some(control) = control_rx.recv(), if stopping.is_none() => match control {
                    Control::Stop(request) => {
                        tracing::info!(reason = ?request.reason, grace_ms = request.grace.as_millis() as u64, "stopping job");
                        note(&stderr_path, &format!("stopping ({:?}): SIGTERM, SIGKILL after {:?}", request.reason, request.grace)).await;
                        signal_group(pid, Signal::SIGTERM);
                        stopping = Some((request.reason, Instant::now() + request.grace));
                    }
                    Control::OverMemory { used } => {
                        let over = over_memory_message(&launch, used);
                        if launch.gpu_memory_policy == GpuMemoryPolicy::Stop {
                            let grace = self.inner.config.kill_grace;
                            tracing::warn!(used, reserved = launch.gpu_memory_bytes, margin = launch.gpu_memory_margin_bytes, "job over its GPU memory: stopping it");
                            note(&stderr_path, &format!("{over}; policy stop: SIGTERM, SIGKILL after {grace:?}")).await;
                            signal_group(pid, Signal::SIGTERM);
                            stopping = Some((StopReason::OverMemory, Instant::now() + grace));
                        } else {
                            tracing::warn!(used, reserved = launch.gpu_memory_bytes, margin = launch.gpu_memory_margin_bytes, "job over its GPU memory");
                            note(&stderr_path, &format!("{over}; policy warn: the job keeps running")).await;
                        }
                    }
                },
                () = sleep_until(deadline), if stopping.is_none() => {
                    let grace = self.inner.config.kill_grace;
                    tracing::warn!(timeout_ms = launch.timeout.map_or(0, |t| t.as_millis() as u64), "job timed out");
                    note(&stderr_path, &format!("timed out after {:?}: SIGTERM, SIGKILL after {grace:?}", launch.timeout.unwrap_or_default())).await;
                    signal_group(pid, Signal::SIGTERM);
                    stopping = Some((StopReason::Timeout, Instant::now() + grace));
                }
                () = sleep_until(kill_at), if !killed => {
                    tracing::warn!("grace expired: SIGKILL");
                    signal_group(pid, Signal::SIGKILL);
                    killed = true;
                }
            }
        };
        // The leader is gone but what it forked may not be: a job's resources
        // are free only when its whole group is.
        self.reap_group(pid, stopping.map(|(_, at)| at), killed)
            .await;

        let (code, signal) = match &status {
            Ok(status) => (status.code(), status.signal()),
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for job");
                (None, None)
            }
        };
        let cancelled = stopping.is_some_and(|(reason, _)| reason.cancelled());
        let agent_shutdown = stopping.is_some_and(|(reason, _)| reason == StopReason::Shutdown);
        let over_memory = stopping.is_some_and(|(reason, _)| reason == StopReason::OverMemory);
        let stderr_tail = read_tail(&stderr_path, STDERR_TAIL_BYTES).await;
        let peak_gpu_memory_bytes = self.set_finished(&launch);
        tracing::info!(
            ?code,
            ?signal,
            cancelled,
            over_memory,
            peak_gpu_memory_bytes,
            "job exited"
        );
        self.emit(
            &launch,
            JobEventKind::Exited(ExitReport {
                code,
                signal,
                stderr_tail,
                cancelled,
                agent_shutdown,
                peak_gpu_memory_bytes,
                over_memory,
            }),
        );
    }

    /// Makes sure no process of group `pgid` survives its leader: SIGTERM
    /// (unless already sent), wait until the group empties or `kill_at`
    /// (now + grace when not stopping yet), then SIGKILL.
    async fn reap_group(&self, pgid: u32, kill_at: Option<Instant>, killed: bool) {
        if killed || !group_alive(pgid) {
            return;
        }
        let kill_at = match kill_at {
            Some(at) => at,
            None => {
                tracing::info!("job leader exited, stopping what it left behind");
                signal_group(pgid, Signal::SIGTERM);
                Instant::now() + self.inner.config.kill_grace
            }
        };
        while Instant::now() < kill_at {
            if !group_alive(pgid) {
                return;
            }
            tokio::time::sleep(GROUP_POLL).await;
        }
        signal_group(pgid, Signal::SIGKILL);
    }

    /// Prepares the attempt's directory, files and snapshot, and spawns the
    /// process. Errors name the path, program or snapshot entry involved; a
    /// stop request while copying the snapshot abandons the attempt.
    async fn spawn(
        &self,
        launch: &Launch,
        dir: &Path,
        control_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<tokio::process::Child, SpawnError> {
        let work = dir.join("work");
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        let stdout = open_output(&dir.join("stdout")).await?;
        let stderr = open_output(&dir.join("stderr")).await?;

        let argv = substitute(&launch.command, launch.batch_size);
        let (program, args) = if launch.shell {
            (
                "/bin/sh".to_string(),
                vec!["-c".to_string(), argv.join(" ")],
            )
        } else {
            match argv.split_first() {
                Some((program, args)) => (program.clone(), args.to_vec()),
                None => return Err(SpawnError::Failed("empty command".into())),
            }
        };
        if launch.shell && argv.iter().all(|a| a.trim().is_empty()) {
            return Err(SpawnError::Failed("empty command".into()));
        }
        // Last before the spawn: a bad command must not cost a long copy.
        if !launch.snapshot.is_empty() {
            copy_snapshot(launch, dir, &work, self.inner.config.run_as, control_rx).await?;
        }

        if let Some(user) = self.inner.config.run_as {
            // The job may write only its work directory (output files are
            // opened by the agent and inherited).
            let work = work.clone();
            tokio::task::spawn_blocking(move || crate::jobfs::hand_over(&work, user))
                .await
                .map_err(|e| format!("chown task failed: {e}"))??;
        }
        let mut command = Command::new(&program);
        if let Some(user) = self.inner.config.run_as {
            // std drops supplementary groups (setgroups) when root sets a uid.
            command.uid(user.uid).gid(user.gid);
        }
        command
            .args(&args)
            .current_dir(&work)
            .envs(&launch.env)
            .envs(self.job_env(launch, &work))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // A group of its own: signals reach everything the job forks, and
            // a Ctrl-C at the agent's terminal does not reach the job.
            .process_group(0)
            // Last resort if the runtime is torn down without a shutdown.
            .kill_on_drop(true);
        command
            .spawn()
            .map_err(|e| SpawnError::Failed(format!("cannot start {program:?}: {e}")))
    }

    /// Variables Gantry sets; they override the spec's `env`.
    fn job_env(&self, launch: &Launch, work: &Path) -> Vec<(String, String)> {
        let gpus: Vec<String> = launch.gpus.iter().map(u32::to_string).collect();
        let mut env = vec![
            ("CUDA_VISIBLE_DEVICES".into(), gpus.join(",")),
            ("GANTRY_JOB_ID".into(), launch.job_id.to_string()),
            ("GANTRY_ATTEMPT".into(), launch.attempt.to_string()),
            (
                "GANTRY_GPU_MEMORY_BYTES".into(),
                launch.gpu_memory_bytes.to_string(),
            ),
            ("GANTRY_NODE".into(), self.inner.config.node_name.clone()),
            ("GANTRY_WORK_DIR".into(), work.display().to_string()),
        ];
        if !launch.snapshot.is_empty() {
            env.push((
                "GANTRY_SNAPSHOT_DIR".into(),
                work.join(snapshot::SNAPSHOT_DIR).display().to_string(),
            ));
        }
        // CUDA numbers devices fastest-first by default, NVML by PCI bus; the
        // indices we hand out are NVML's, so make CUDA agree (unless the spec
        // deliberately says otherwise).
        if !launch.env.contains_key("CUDA_DEVICE_ORDER") {
            env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
        }
        if launch.batch_size > 0 {
            env.push(("GANTRY_BATCH_SIZE".into(), launch.batch_size.to_string()));
        }
        env
    }
}

/// Why an attempt did not get as far as running its command.
enum SpawnError {
    /// Reported as `SpawnFailed { error }`.
    Failed(String),
    /// A stop request arrived while preparing (copying the snapshot).
    Stopped(StopReason),
}

impl From<String> for SpawnError {
    fn from(error: String) -> Self {
        Self::Failed(error)
    }
}

/// Copies the launch's snapshot entries off the runtime (they may be large),
/// while still answering stop requests: a stop interrupts the copy.
async fn copy_snapshot(
    launch: &Launch,
    dir: &Path,
    work: &Path,
    user: Option<crate::config::RunAs>,
    control_rx: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<(), SpawnError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let task = {
        let (dir, work, entries) = (
            dir.to_path_buf(),
            work.to_path_buf(),
            launch.snapshot.clone(),
        );
        let cancel = Arc::clone(&cancel);
        tokio::task::spawn_blocking(move || snapshot::prepare(&dir, &work, &entries, &cancel, user))
    };
    tokio::pin!(task);
    let started = Instant::now();
    loop {
        tokio::select! {
            joined = &mut task => {
                let copied = joined.map_err(|e| format!("snapshot task failed: {e}"))??;
                tracing::info!(entries = launch.snapshot.len(), dir = %copied.display(), elapsed_ms = started.elapsed().as_millis() as u64, "snapshot copied");
                return Ok(());
            }
            Some(control) = control_rx.recv() => match control {
                Control::Stop(request) => {
                    cancel.store(true, Ordering::Relaxed);
                    // Returns at the next chunk: the copy checks the flag.
                    let _ = task.await;
                    return Err(SpawnError::Stopped(request.reason));
                }
                // Not started, so not measured (see `observe_gpu_usage`).
                Control::OverMemory { .. } => {}
            },
        }
    }
}

/// The `[gantry]` note for a job over its GPU memory limit.
fn over_memory_message(launch: &Launch, used: u64) -> String {
    format!(
        "GPU memory over reservation: using {} on one GPU, reserved {} + margin {}",
        format_bytes(used),
        format_bytes(launch.gpu_memory_bytes),
        format_bytes(launch.gpu_memory_margin_bytes)
    )
}

/// The directory of one attempt under `data_dir`.
pub fn attempt_dir(data_dir: &Path, job_id: u64, attempt: u32) -> PathBuf {
    data_dir
        .join("jobs")
        .join(job_id.to_string())
        .join(attempt.to_string())
}

/// Replaces `{batch_size}` in every argument when a batch size was chosen.
pub fn substitute(command: &[String], batch_size: u32) -> Vec<String> {
    if batch_size == 0 {
        return command.to_vec();
    }
    let size = batch_size.to_string();
    command
        .iter()
        .map(|arg| arg.replace("{batch_size}", &size))
        .collect()
}

/// Opens an output file for appending, starting it empty. Append mode so the
/// agent's own notes (timeouts, cancels) cannot overwrite the job's output.
async fn open_output(path: &Path) -> Result<std::fs::File, String> {
    // Left over from an earlier agent process with the same ids.
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove stale {}: {e}", path.display())),
    }
    // Never through a link, nor onto a name that reappeared meanwhile.
    let file = tokio::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .custom_flags(crate::jobfs::NOFOLLOW)
        .open(path)
        .await
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    Ok(file.into_std().await)
}

/// Appends an agent note to a job's stderr, where users read it with `gantry logs`.
async fn note(path: &Path, message: &str) {
    let line = format!("[gantry] {message}\n");
    let result = async {
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .custom_flags(crate::jobfs::NOFOLLOW)
            .open(path)
            .await?;
        file.write_all(line.as_bytes()).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot append note to stderr");
    }
}

/// The last `max` bytes of a file; empty when it cannot be read.
async fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let result = async {
        let mut file = open_read(path).await?;
        let len = file.metadata().await?.len();
        file.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))
            .await?;
        let mut data = Vec::new();
        file.take(max).read_to_end(&mut data).await?;
        Ok::<_, std::io::Error>(data)
    }
    .await;
    result.unwrap_or_default()
}

/// Opens an attempt's output file for reading, refusing a symlink there.
async fn open_read(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(crate::jobfs::NOFOLLOW)
        .open(path)
        .await
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
