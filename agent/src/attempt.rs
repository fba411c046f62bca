//! The durable record of one attempt, in its directory
//! `<data_dir>/jobs/<job_id>/<attempt>/`, shared by the agent and the
//! attempt's [supervisor](crate::supervisor) process.
//!
//! Who writes what, in order:
//!
//! - `attempt.json` ([`AttemptRecord`]): the agent, before it forks the
//!   supervisor. Everything the supervisor needs to run the attempt and a
//!   restarted agent needs to report it.
//! - `supervisor.json` ([`Claim`]): created exactly once, atomically (a hard
//!   link, which fails if the name exists). The supervisor claims the attempt
//!   before it starts anything; a restarted agent that finds a record nobody
//!   claimed claims it as abandoned, so a supervisor that was slow to start
//!   finds the claim taken and exits. This file is why an attempt number is
//!   started by at most one process.
//! - `started.json` ([`Started`]): the supervisor, once the job's process
//!   (leader of its own process group) runs.
//! - `stop.json` ([`StopFile`]): the agent, when it wants the attempt stopped
//!   (cancel, stale attempt, drain, agent shutdown with `--stop-jobs-on-exit`,
//!   GPU memory policy `stop`); then it sends SIGTERM to the supervisor,
//!   which reads the file and does the SIGTERM/SIGKILL escalation itself.
//! - `status.json` ([`ExitStatus`]): the supervisor when the attempt ends, or
//!   the agent when the supervisor is gone without writing one (lost).
//! - `acked`: the agent, once the coordinator has the final event; from then
//!   on the directory is only kept for `gantry logs` until [`to_remove`]
//!   picks it.
//!
//! Every file but `acked` is written whole (write, fsync, rename, fsync the
//! directory), so a reader sees either nothing or all of it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RunAs;
use crate::executor::{ExitReport, JobEventKind, Launch, StopReason};
use crate::procgroup::{ProcessId, group_alive};

/// The attempt record (`attempt.json`).
pub(crate) const RECORD: &str = "attempt.json";
/// The claim (`supervisor.json`).
pub(crate) const CLAIM: &str = "supervisor.json";
/// The job process (`started.json`).
pub(crate) const STARTED: &str = "started.json";
/// A stop request (`stop.json`).
pub(crate) const STOP: &str = "stop.json";
/// The exit status (`status.json`).
pub(crate) const STATUS: &str = "status.json";
/// The coordinator has the final event.
pub(crate) const ACKED: &str = "acked";
/// The supervisor's own stdout and stderr.
pub(crate) const SUPERVISOR_LOG: &str = "supervisor.log";

/// What the agent writes before it forks the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AttemptRecord {
    /// The assignment.
    pub launch: Launch,
    /// Exported as `GANTRY_NODE`.
    pub node_name: String,
    /// SIGTERM -> SIGKILL grace for timeouts and stops without their own.
    pub kill_grace_ms: u64,
    /// The user the job runs as.
    pub run_as: Option<RunAs>,
    /// When the agent accepted the assignment, unix milliseconds.
    pub accepted_at_ms: u64,
}

impl AttemptRecord {
    /// The kill grace as a duration.
    pub fn kill_grace(&self) -> Duration {
        Duration::from_millis(self.kill_grace_ms)
    }
}

/// Who owns the attempt (`supervisor.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub(crate) enum Claim {
    /// This supervisor runs (or ran) it.
    Supervisor {
        /// The supervisor process.
        process: ProcessId,
    },
    /// An agent found it unclaimed after a restart: it never ran and never will.
    Abandoned {
        /// Why, for the report.
        reason: String,
    },
}

/// The job's process (`started.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Started {
    /// The job's first process; its pid is also its process group id.
    pub process: ProcessId,
    /// When it was spawned, unix milliseconds.
    pub at_ms: u64,
}

/// A stop request (`stop.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StopFile {
    /// Why; decides how the exit is reported.
    pub reason: StopReason,
    /// SIGTERM -> SIGKILL grace.
    pub grace_ms: u64,
    /// Why, for the job (the coordinator's words: `preempted by job 7
    /// (priority 10)`); empty: said from `reason`. The supervisor writes it
    /// to the job's stop-reason file before the SIGTERM.
    #[serde(default)]
    pub message: String,
}

/// How the attempt ended (`status.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitStatus {
    /// Exit code when the job exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Set when it was stopped on purpose.
    pub stopped: Option<StopReason>,
    /// Set when the command could not be started (reported `SpawnFailed`).
    pub spawn_error: Option<String>,
    /// Set when the agent wrote this because nobody supervised the attempt
    /// to its end (the supervisor died, or never started).
    pub lost: Option<String>,
    /// When it ended (or was found lost), unix milliseconds.
    pub ended_at_ms: u64,
}

impl ExitStatus {
    /// The event that reports this status. A lost attempt is reported like
    /// one stopped by an agent shutdown (not the job's fault: retried),
    /// unless it was being cancelled.
    pub fn event_kind(&self, stderr_tail: Vec<u8>, peak_gpu_memory_bytes: u64) -> JobEventKind {
        if let Some(error) = &self.spawn_error {
            return JobEventKind::SpawnFailed {
                error: error.clone(),
            };
        }
        JobEventKind::Exited(ExitReport {
            code: self.code,
            signal: self.signal,
            stderr_tail,
            cancelled: self.stopped.is_some_and(StopReason::cancelled),
            agent_shutdown: matches!(
                self.stopped,
                Some(StopReason::Shutdown | StopReason::Fenced)
            ) || (self.lost.is_some() && self.stopped.is_none()),
            fenced: self.stopped == Some(StopReason::Fenced),
            peak_gpu_memory_bytes,
            over_memory: self.stopped == Some(StopReason::OverMemory),
        })
    }
}

/// Everything found in one attempt directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OnDisk {
    /// `attempt.json`.
    pub record: AttemptRecord,
    /// `supervisor.json`.
    pub claim: Option<Claim>,
    /// `started.json`.
    pub started: Option<Started>,
    /// `stop.json`.
    pub stop: Option<StopFile>,
    /// `status.json`.
    pub status: Option<ExitStatus>,
    /// `acked` exists.
    pub acked: bool,
}

/// What a (re)started agent does with an attempt it finds on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Ended and the coordinator has the final event: only remembered (so a
    /// repeated assignment is refused) and kept for `gantry logs`.
    Acknowledged {
        /// When it ended.
        ended_at_ms: u64,
    },
    /// Ended, the final event not yet acknowledged: report it (again; the
    /// coordinator deduplicates).
    Ended(ExitStatus),
    /// Its supervisor still runs: adopt it and report it running.
    Adopt {
        /// The live supervisor.
        supervisor: ProcessId,
        /// The job's process, once started.
        started: Option<Started>,
    },
    /// Nobody supervises it and it has no status: stop whatever is left of
    /// its process group, record it lost with `reason`, report that.
    Lost {
        /// Why, for the job's stderr and the coordinator.
        reason: String,
        /// The job's process, when it had started (its group may outlive it).
        started: Option<Started>,
    },
    /// Nobody claimed it: its supervisor never started, or is starting right
    /// now. The agent claims it as abandoned, then it is [`Recovery::Lost`];
    /// if the claim fails, a supervisor won the race and it is read again.
    Unclaimed,
}

/// Decides what to do with an attempt from its files and whether a process
/// is alive (pid and start time, so a reused pid never counts).
pub(crate) fn classify(disk: &OnDisk, alive: impl Fn(&ProcessId) -> bool) -> Recovery {
    if let Some(status) = &disk.status {
        return if disk.acked {
            Recovery::Acknowledged {
                ended_at_ms: status.ended_at_ms,
            }
        } else {
            Recovery::Ended(status.clone())
        };
    }
    match &disk.claim {
        None => Recovery::Unclaimed,
        Some(Claim::Abandoned { reason }) => Recovery::Lost {
            reason: reason.clone(),
            started: None,
        },
        Some(Claim::Supervisor { process }) if alive(process) => Recovery::Adopt {
            supervisor: *process,
            started: disk.started,
        },
        Some(Claim::Supervisor { process }) => Recovery::Lost {
            reason: format!(
                "the attempt's supervisor (pid {}) ended without recording an exit status",
                process.pid
            ),
            started: disk.started,
        },
    }
}

/// The process group a started job left behind, when it still has members
/// and is still the job's: a pid is not reused while its group exists, so a
/// leader pid now held by another process means the group is gone.
pub(crate) fn leftover_group(started: &Started) -> Option<u32> {
    let pid = started.process.pid;
    match ProcessId::of(pid) {
        Some(process) if process != started.process => None,
        _ => group_alive(pid).then_some(pid),
    }
}

/// Which acknowledged attempts to delete: those ended more than `retention`
/// before `now_ms`, then the oldest until at most `max_kept` remain.
pub(crate) fn to_remove(
    acked: &[((u64, u32), u64)],
    now_ms: u64,
    retention: Duration,
    max_kept: usize,
) -> Vec<(u64, u32)> {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut by_age: Vec<&((u64, u32), u64)> = acked.iter().collect();
    by_age.sort_by_key(|(key, ended)| (*ended, *key));
    let excess = by_age.len().saturating_sub(max_kept);
    by_age
        .iter()
        .enumerate()
        .filter(|(i, (_, ended))| *i < excess || now_ms.saturating_sub(*ended) > retention_ms)
        .map(|(_, (key, _))| *key)
        .collect()
}

/// The directory of one attempt under `data_dir`.
pub fn attempt_dir(data_dir: &Path, job_id: u64, attempt: u32) -> PathBuf {
    data_dir
        .join("jobs")
        .join(job_id.to_string())
        .join(attempt.to_string())
}

/// Every `(job_id, attempt)` with a directory under `data_dir`.
pub(crate) fn list(data_dir: &Path) -> std::io::Result<Vec<(u64, u32)>> {
    let jobs = data_dir.join("jobs");
    let entries = match std::fs::read_dir(&jobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for job in entries {
        let job = job?;
        let Some(job_id) = job.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(attempts) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for attempt in attempts.flatten() {
            if let Some(attempt) = attempt.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push((job_id, attempt));
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads an attempt directory. Errors name the file; a directory without a
/// record is an error too (nothing was forked for it).
pub(crate) fn read(dir: &Path) -> Result<OnDisk, String> {
    let record = read_json(dir, RECORD)?.ok_or_else(|| format!("no {RECORD}"))?;
    Ok(OnDisk {
        record,
        claim: read_json(dir, CLAIM)?,
        started: read_json(dir, STARTED)?,
        stop: read_json(dir, STOP)?,
        status: read_json(dir, STATUS)?,
        acked: dir.join(ACKED).exists(),
    })
}

/// Reads one JSON file of the directory; `None` when it does not exist.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, String> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{} is corrupt: {e}", path.display()))
}

/// Writes `value` as `dir/name` durably: a temporary file written and
/// fsynced, renamed over the name, then the directory fsynced.
pub(crate) fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), String> {
    match write_json_once(dir, name, value) {
        // A full volume (a job's output filled it): the record matters more
        // than the reserve kept for it.
        Err(failure) if failure.storage_full && crate::reserve::release_for(dir) => {
            tracing::warn!(
                dir = %dir.display(),
                record = name,
                "the data volume is full: used the agent's disk reserve to write the record"
            );
            write_json_once(dir, name, value).map_err(|f| f.message)
        }
        result => result.map_err(|f| f.message),
    }
}

/// Whether a spawn error is the data volume being full (ENOSPC, or EDQUOT:
/// the quota of the agent's user): the I/O errors in spawn errors, the
/// agent's and the supervisor's, end with the OS's `(os error N)`.
pub fn is_volume_full(error: &str) -> bool {
    [nix::errno::Errno::ENOSPC, nix::errno::Errno::EDQUOT]
        .iter()
        .any(|errno| error.contains(&format!("(os error {})", *errno as i32)))
}

/// A failed write: what failed, and whether the volume was full.
struct WriteFailure {
    message: String,
    storage_full: bool,
}

impl WriteFailure {
    fn new(what: &str, path: &Path, error: std::io::Error) -> Self {
        WriteFailure {
            storage_full: error.kind() == std::io::ErrorKind::StorageFull,
            message: format!("cannot {what} {}: {error}", path.display()),
        }
    }
}

fn write_json_once<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), WriteFailure> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_synced(&tmp, value).and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(|e| WriteFailure::new("rename to final name", &tmp, e))
    });
    if written.is_err() {
        // A half-written temporary file holds blocks a full volume needs.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir).map_err(|message| WriteFailure {
        message,
        storage_full: false,
    })
}

/// Creates `dir/supervisor.json` with `claim` unless it exists; returns
/// whether this call created it. The content is complete before the name
/// appears (written to a temporary file, then hard-linked).
pub(crate) fn claim(dir: &Path, claim: &Claim) -> Result<bool, String> {
    let path = dir.join(CLAIM);
    let tmp = dir.join(format!(".{CLAIM}.{}.tmp", std::process::id()));
    write_synced(&tmp, claim).map_err(|f| {
        let _ = std::fs::remove_file(&tmp);
        f.message
    })?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(dir).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

/// Marks the final event acknowledged (an empty file; losing it only means
/// the event is reported once more).
pub(crate) fn mark_acked(dir: &Path) -> Result<(), String> {
    std::fs::File::create(dir.join(ACKED))
        .map(drop)
        .map_err(|e| format!("cannot create {}: {e}", dir.join(ACKED).display()))
}

fn write_synced<T: Serialize>(path: &Path, value: &T) -> Result<(), WriteFailure> {
    let bytes = serde_json::to_vec(value).map_err(|e| WriteFailure {
        message: format!("cannot encode {}: {e}", path.display()),
        storage_full: false,
    })?;
    let mut file = std::fs::File::create(path).map_err(|e| WriteFailure::new("create", path, e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| WriteFailure::new("write", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests;
