//! The job executor: records each assigned attempt durably, starts a
//! [supervisor](crate::supervisor) process for it, watches the supervisor,
//! asks it to stop the attempt (cancel, stale attempt, drain, GPU memory
//! policy, shutdown with `--stop-jobs-on-exit`), and serves the output files.
//! On start ([`Executor::recover`]) it adopts the attempts whose supervisors
//! outlived the previous agent process and reports those that ended meanwhile.
//!
//! It knows nothing of gRPC: it takes a [`Launch`] and reports [`JobEvent`]s
//! on an mpsc channel, so it is tested without a coordinator.
//!
//! Files of an attempt live under `<data_dir>/jobs/<job_id>/<attempt>/`:
//! the record files of [`crate::attempt`], `stdout`, `stderr` and the working
//! directory `work/` (with `snapshot/` when the spec asks for
//! [evaluation snapshots](crate::snapshot)).
//!
//! GPU memory policing: whoever samples the GPUs (the heartbeat, and
//! [`crate::gpu_watch`] every 500 ms) hands the per-job figures to
//! [`Executor::observe_gpu_usage`], which keeps each attempt's peak and, the
//! first time an attempt uses more than its reservation plus margin, applies
//! the [`GpuMemoryPolicy`] (a note, or a stop request to the supervisor).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use gantry_scheduler::units::format_bytes;

pub use crate::attempt::attempt_dir;
use crate::attempt::{self, ExitStatus, STATUS, Started};
use crate::probe::{JobGpuUsage, JobGpus};
use crate::snapshot::SnapshotEntry;
use crate::supervisor::SupervisorCommand;

/// Bytes of stderr sent with an exit event.
pub const STDERR_TAIL_BYTES: u64 = 64 * 1024;
/// Largest log chunk served per request.
pub const MAX_LOG_CHUNK: u32 = 1024 * 1024;
/// How long a finished attempt is remembered to refuse duplicate assignments.
const FINISHED_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// How often a supervisor is checked for the job's start and for its own
/// life (a supervisor this agent did not fork cannot be waited for).
const WATCH_POLL: Duration = Duration::from_millis(50);
/// How often a lost attempt's leftover process group is checked while it is
/// being stopped.
const GROUP_POLL: Duration = Duration::from_millis(20);
/// How long an acknowledged attempt's directory is kept for `gantry logs`.
pub const ATTEMPT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Most acknowledged attempt directories kept; the oldest go first.
pub const MAX_KEPT_ATTEMPTS: usize = 1024;

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
    /// How to start an attempt's supervisor process.
    pub supervisor: SupervisorCommand,
}

/// One attempt to run, already converted from the wire `Assignment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(with = "snapshot_entries")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    /// The agent stopped it because the leader had not confirmed a
    /// heartbeat for too long ([`crate::fence`]); sent with
    /// `agent_shutdown`, so the coordinator retries it as lost.
    pub fenced: bool,
}

/// Why the agent stops an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The leader has not confirmed a heartbeat for too long: the node is
    /// about to be declared Down and the job run elsewhere, so it must not
    /// be running here ([`crate::fence`]). Reported like a shutdown, with
    /// `fenced = true`.
    Fenced,
}

impl StopReason {
    /// Reported with `cancelled = true`.
    pub(crate) fn cancelled(self) -> bool {
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
    /// This job and attempt is already running or has run: nothing is
    /// started; its current status (`Started`, or how it ended) is reported
    /// again.
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

/// A stop the agent asks of an attempt's supervisor.
struct StopRequest {
    reason: StopReason,
    grace: Duration,
    /// Why, in the coordinator's words (empty: said from `reason`).
    message: String,
}

/// What the executor tells an attempt's watch task.
enum Control {
    Stop(StopRequest),
    /// The job was first seen above its GPU memory limit, using `used`
    /// bytes on one GPU. Sent at most once per attempt.
    OverMemory {
        used: u64,
    },
}

/// What became of a finished attempt's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// The coordinator may not have the final event yet.
    Unacknowledged,
    /// Kept for `gantry logs` until [`attempt::to_remove`] picks it.
    Acknowledged,
    /// Deleted.
    Removed,
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
        ended_at_ms: u64,
        kept: Kept,
    },
}

struct Entry {
    gpus: Vec<u32>,
    /// [`Launch::gpu_memory_limit`].
    gpu_memory_limit: Option<u64>,
    /// Highest per-GPU usage observed so far, reported at exit. Not
    /// persisted: an adopted attempt's peak counts from its adoption.
    peak_gpu_memory: u64,
    /// Whether the over-use policy was applied: once per attempt.
    over_memory_told: bool,
    state: EntryState,
}

impl Entry {
    fn new(launch: &Launch, state: EntryState) -> Self {
        Self {
            gpus: launch.gpus.clone(),
            gpu_memory_limit: launch.gpu_memory_limit(),
            peak_gpu_memory: 0,
            over_memory_told: false,
            state,
        }
    }
}

struct Inner {
    config: ExecutorConfig,
    events: mpsc::UnboundedSender<JobEvent>,
    /// A std mutex: it is held only for map updates, never across an await.
    jobs: Mutex<HashMap<(u64, u32), Entry>>,
    /// Every watch task runs on it, so shutdown can wait for all of them.
    tracker: TaskTracker,
    /// Cancelled when the agent exits leaving its jobs running: the watch
    /// tasks end, the supervisors and their jobs do not.
    detach: CancellationToken,
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

/// What a restarted agent found of its attempts ([`Executor::recover`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Attempts whose supervisor still runs: adopted.
    pub adopted: usize,
    /// Attempts that ended (or were found lost) and are reported now.
    pub reported: usize,
    /// Attempts already reported and acknowledged.
    pub acknowledged: usize,
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
                detach: CancellationToken::new(),
            }),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<(u64, u32), Entry>> {
        // A panic while holding the lock leaves the map consistent (every
        // update is a single insert), so poisoning is safe to ignore.
        self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn span(&self, launch: &Launch) -> tracing::Span {
        tracing::info_span!(
            "job",
            job_id = launch.job_id,
            attempt = launch.attempt,
            kind = %launch.kind,
            node = %self.inner.config.node_name,
        )
    }

    /// Starts an attempt unless this agent already has it (running or
    /// ended): then nothing is started and its status is reported again.
    /// Must be called inside a tokio runtime; the work happens on a spawned
    /// task.
    pub fn launch(&self, launch: Launch) -> LaunchOutcome {
        let key = (launch.job_id, launch.attempt);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let duplicate = {
            let mut jobs = self.jobs();
            if self.inner.tracker.is_closed() {
                return LaunchOutcome::ShuttingDown;
            }
            let duplicate = jobs.contains_key(&key);
            if !duplicate {
                if jobs.len() > 1024 {
                    let now = Instant::now();
                    jobs.retain(|_, entry| match entry.state {
                        EntryState::Finished { at, .. } => now.duration_since(at) < FINISHED_MEMORY,
                        EntryState::Active { .. } => true,
                    });
                }
                let state = EntryState::Active {
                    control: control_tx,
                    started_at_ms: now_ms(),
                    pgid: None,
                };
                jobs.insert(key, Entry::new(&launch, state));
            }
            duplicate
        };
        if duplicate {
            self.answer_duplicate(key);
            return LaunchOutcome::Duplicate;
        }
        // Every line about this attempt (start, exit, stop) carries it.
        let span = self.span(&launch);
        let this = self.clone();
        self.inner
            .tracker
            .spawn(async move { this.start(launch, control_rx).await }.instrument(span));
        LaunchOutcome::Accepted
    }

    /// Reports an attempt's current status again: `Started` while it runs,
    /// its end once ended (read back from its directory). Nothing while it
    /// is still being set up: `Started` follows anyway.
    fn answer_duplicate(&self, key: (u64, u32)) {
        enum Now {
            Starting,
            Running { pid: u32, at_ms: u64 },
            Ended { kept: Kept, peak: u64 },
        }
        let now = match self.jobs().get(&key) {
            None => return,
            Some(entry) => match entry.state {
                EntryState::Active { pgid: None, .. } => Now::Starting,
                EntryState::Active {
                    pgid: Some(pid),
                    started_at_ms,
                    ..
                } => Now::Running {
                    pid,
                    at_ms: started_at_ms,
                },
                EntryState::Finished { kept, .. } => Now::Ended {
                    kept,
                    peak: entry.peak_gpu_memory,
                },
            },
        };
        let peak = match now {
            Now::Starting => {
                tracing::debug!(
                    job_id = key.0,
                    attempt = key.1,
                    "duplicate assignment: still starting"
                );
                return;
            }
            Now::Running { pid, at_ms } => {
                tracing::info!(
                    job_id = key.0,
                    attempt = key.1,
                    "duplicate assignment of a running attempt: reporting it started"
                );
                self.emit(key, at_ms, JobEventKind::Started { pid });
                return;
            }
            Now::Ended {
                kept: Kept::Removed,
                ..
            } => {
                tracing::info!(
                    job_id = key.0,
                    attempt = key.1,
                    "duplicate assignment of an attempt that ended long ago: not started again"
                );
                return;
            }
            Now::Ended { peak, .. } => peak,
        };
        let this = self.clone();
        let dir = self.attempt_dir(key.0, key.1);
        tokio::spawn(async move {
            let read = tokio::task::spawn_blocking(move || {
                let status = attempt::read_json::<ExitStatus>(&dir, STATUS)?
                    .ok_or_else(|| format!("no {STATUS} in {}", dir.display()))?;
                Ok::<_, String>((status, read_tail(&dir.join("stderr"), STDERR_TAIL_BYTES)))
            })
            .await;
            match read {
                Ok(Ok((status, tail))) => {
                    tracing::info!(
                        job_id = key.0,
                        attempt = key.1,
                        "duplicate assignment of an ended attempt: reporting its end again"
                    );
                    this.emit(key, status.ended_at_ms, status.event_kind(tail, peak));
                }
                Ok(Err(error)) => {
                    tracing::error!(job_id = key.0, attempt = key.1, %error, "cannot read an ended attempt's status")
                }
                Err(e) => tracing::error!(error = %e, "status read task failed"),
            }
        });
    }

    /// Stops an attempt (every running attempt of the job when `attempt` is 0):
    /// its supervisor sends SIGTERM to the process group, SIGKILL after
    /// `grace` (the configured grace when `None`). Returns whether anything
    /// was running.
    pub fn stop(
        &self,
        job_id: u64,
        attempt: u32,
        grace: Option<Duration>,
        reason: StopReason,
    ) -> bool {
        self.stop_because(job_id, attempt, grace, reason, String::new())
    }

    /// [`Executor::stop`] with the coordinator's words for the job
    /// (`GANTRY_STOP_REASON_FILE`).
    pub fn stop_because(
        &self,
        job_id: u64,
        attempt: u32,
        grace: Option<Duration>,
        reason: StopReason,
        message: String,
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
                    .send(Control::Stop(StopRequest {
                        reason,
                        grace,
                        message: message.clone(),
                    }))
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
    /// time an attempt is above its limit applies the attempt's
    /// [`GpuMemoryPolicy`]. Figures for attempts not started yet (still
    /// copying a snapshot) or already ended are ignored.
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

    /// Refuses new attempts and returns once every watch task has ended.
    /// With `stop_jobs`, every running attempt is stopped first (with the
    /// configured grace) and reported as stopped by an agent shutdown;
    /// without, the jobs keep running under their supervisors for the next
    /// agent process to adopt.
    pub async fn shutdown(&self, stop_jobs: bool) {
        {
            // Closed under the lock so no launch slips in after the sweep.
            let jobs = self.jobs();
            self.inner.tracker.close();
            if stop_jobs {
                for entry in jobs.values() {
                    if let EntryState::Active { control, .. } = &entry.state {
                        let _ = control.send(Control::Stop(StopRequest {
                            reason: StopReason::Shutdown,
                            grace: self.inner.config.kill_grace,
                            message: String::new(),
                        }));
                    }
                }
            } else {
                self.inner.detach.cancel();
            }
        }
        self.inner.tracker.wait().await;
    }

    /// The coordinator has the final events of these attempts: marks their
    /// directories so a restarted agent does not report them again, and
    /// deletes the directories [`attempt::to_remove`] picks.
    pub fn acknowledge(&self, keys: &[(u64, u32)]) {
        let mut dirs = Vec::new();
        {
            let mut jobs = self.jobs();
            for key in keys {
                if let Some(Entry {
                    state: EntryState::Finished { kept, .. },
                    ..
                }) = jobs.get_mut(key)
                    && *kept == Kept::Unacknowledged
                {
                    *kept = Kept::Acknowledged;
                    dirs.push(self.attempt_dir(key.0, key.1));
                }
            }
        }
        if dirs.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let marked = tokio::task::spawn_blocking(move || {
                for dir in dirs {
                    if let Err(error) = attempt::mark_acked(&dir) {
                        tracing::warn!(%error, "cannot mark an attempt acknowledged");
                    }
                }
            })
            .await;
            if let Err(e) = marked {
                tracing::error!(error = %e, "acknowledge task failed");
            }
            this.cleanup();
        });
    }

    /// Deletes the acknowledged attempt directories past their retention.
    fn cleanup(&self) {
        let remove = {
            let mut jobs = self.jobs();
            let acked: Vec<((u64, u32), u64)> = jobs
                .iter()
                .filter_map(|(key, entry)| match entry.state {
                    EntryState::Finished {
                        kept: Kept::Acknowledged,
                        ended_at_ms,
                        ..
                    } => Some((*key, ended_at_ms)),
                    _ => None,
                })
                .collect();
            let remove = attempt::to_remove(&acked, now_ms(), ATTEMPT_RETENTION, MAX_KEPT_ATTEMPTS);
            for key in &remove {
                if let Some(Entry {
                    state: EntryState::Finished { kept, .. },
                    ..
                }) = jobs.get_mut(key)
                {
                    *kept = Kept::Removed;
                }
            }
            remove
        };
        if remove.is_empty() {
            return;
        }
        let data_dir = self.inner.config.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            for (job_id, attempt) in remove {
                let dir = attempt_dir(&data_dir, job_id, attempt);
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot delete an old attempt directory");
                }
                // The job's directory goes with its last attempt.
                if let Some(job_dir) = dir.parent() {
                    let _ = std::fs::remove_dir(job_dir);
                }
            }
        });
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

    fn emit(&self, (job_id, attempt): (u64, u32), at_ms: u64, kind: JobEventKind) {
        let event = JobEvent {
            job_id,
            attempt,
            at_ms,
            kind,
        };
        // A closed channel means the agent is going away; nothing to tell.
        let _ = self.inner.events.send(event);
    }

    fn set_started(&self, key: (u64, u32), started: &Started) {
        if let Some(Entry {
            state:
                EntryState::Active {
                    started_at_ms,
                    pgid,
                    ..
                },
            ..
        }) = self.jobs().get_mut(&key)
        {
            *started_at_ms = started.at_ms;
            *pgid = Some(started.process.pid);
        }
    }

    /// Marks the attempt ended; returns its GPU memory peak.
    fn set_finished(&self, key: (u64, u32), ended_at_ms: u64) -> u64 {
        match self.jobs().get_mut(&key) {
            Some(entry) => {
                entry.state = EntryState::Finished {
                    at: Instant::now(),
                    ended_at_ms,
                    kept: Kept::Unacknowledged,
                };
                entry.peak_gpu_memory
            }
            None => 0,
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

/// The last `max` bytes of a file; empty when it cannot be read.
fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(crate::jobfs::NOFOLLOW)
            .open(path)?;
        let len = file.metadata()?.len();
        file.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))?;
        let mut data = Vec::new();
        file.take(max).read_to_end(&mut data)?;
        Ok::<_, std::io::Error>(data)
    })();
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

/// Serde for [`Launch::snapshot`] (the entry type has no serde of its own).
mod snapshot_entries {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::snapshot::SnapshotEntry;

    pub(super) fn serialize<S: Serializer>(
        entries: &[SnapshotEntry],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.from.as_str(), e.as_name.as_str()))
            .collect();
        pairs.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<SnapshotEntry>, D::Error> {
        let pairs = Vec::<(String, String)>::deserialize(deserializer)?;
        Ok(pairs
            .into_iter()
            .map(|(from, as_name)| SnapshotEntry { from, as_name })
            .collect())
    }
}

mod watch;

#[cfg(test)]
mod tests;
