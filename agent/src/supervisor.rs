//! The per-attempt supervisor: a small process of its own that runs one
//! attempt from spawn to exit status, so that the job outlives its agent
//! (the anchors: Slurm's `slurmstepd`, Nomad's task drivers that a
//! restarted client re-attaches to).
//!
//! The agent starts it by re-executing its own binary in a hidden mode
//! (`gantry supervise <attempt dir>`, see [`SupervisorCommand`]) after it has
//! written the attempt record. The supervisor:
//!
//! - leaves the agent's session (`setsid`): a Ctrl-C at the agent's terminal
//!   or the agent's death reaches neither it nor the job; its stdio goes to
//!   `supervisor.log`, never to a pipe of the agent;
//! - claims the attempt ([`attempt::claim`]) before anything else and exits
//!   without running anything when the claim is taken: one attempt number,
//!   at most one process;
//! - copies the snapshot, spawns the command as the leader of its own process
//!   group, records it in `started.json`;
//! - enforces the job's timeout itself, and on SIGTERM reads `stop.json`
//!   (the agent's stop request) and does the SIGTERM / grace / SIGKILL of the
//!   whole group itself, so a stop survives the agent dying half-way;
//! - after the leader exits, stops what the job left in its group, then
//!   writes `status.json` durably and exits.

use std::ffi::OsString;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::time::Instant;

use crate::attempt::{
    self, AttemptRecord, Claim, ExitStatus, RECORD, STARTED, STATUS, STOP, Started, StopFile,
};
use crate::error::AgentError;
use crate::executor::{StopReason, now_ms, substitute};
use crate::procgroup::{ProcessId, group_alive, proc_stat, signal_group};
use crate::snapshot;

/// The hidden subcommand of the `gantry` binary that runs a supervisor.
pub const SUBCOMMAND: &str = "supervise";
/// How often a stopping job's process group is checked for survivors.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// How the agent starts a supervisor: `program args... <attempt dir>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorCommand {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before the attempt directory.
    pub args: Vec<OsString>,
}

impl SupervisorCommand {
    /// This very binary in its hidden mode: `<current exe> supervise`.
    /// When the binary was replaced on disk while the agent runs, Linux
    /// reports the old path with " (deleted)": the new binary at that path
    /// is the one to run.
    pub fn this_binary() -> Result<Self, AgentError> {
        let exe = std::env::current_exe().map_err(|e| {
            AgentError::Config(format!(
                "cannot find the agent's own binary to start job supervisors: {e}"
            ))
        })?;
        let program = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        };
        Ok(Self {
            program,
            args: vec![SUBCOMMAND.into()],
        })
    }

    /// In this crate's unit tests: the test binary itself, running only
    /// [`tests::supervisor_entry`], which becomes the supervisor.
    #[cfg(test)]
    pub(crate) fn for_test() -> Self {
        Self {
            program: std::env::current_exe().expect("test binary path"),
            args: [
                "--exact",
                "supervisor::tests::supervisor_entry",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ]
            .into_iter()
            .map(OsString::from)
            .collect(),
        }
    }
}

/// Runs the attempt in `dir` to its end (the hidden `gantry supervise DIR`).
/// Exits non-zero only when it could not record an outcome; the agent then
/// reports the attempt lost.
pub async fn run(dir: &Path) -> ExitCode {
    match supervise(dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "supervisor failed");
            ExitCode::FAILURE
        }
    }
}

async fn supervise(dir: &Path) -> Result<(), String> {
    // Fails only if already a group leader, which the agent never makes it.
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!(error = %e, "cannot start a session of its own");
    }
    // Listening before the claim: a stop that comes later is never lost.
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
    let record: AttemptRecord = attempt::read_json(dir, RECORD)?
        .ok_or_else(|| format!("no {RECORD} in {}", dir.display()))?;
    let me = ProcessId::current().ok_or("cannot read this process's /proc stat")?;
    if !attempt::claim(dir, &Claim::Supervisor { process: me })? {
        tracing::warn!(dir = %dir.display(), "attempt already claimed: not starting it again");
        return Ok(());
    }
    let span = tracing::info_span!(
        "job",
        job_id = record.launch.job_id,
        attempt = record.launch.attempt,
        node = %record.node_name,
    );
    let _entered = span.enter();
    let status = run_attempt(dir, &record, &mut term).await;
    tracing::info!(code = ?status.code, signal = ?status.signal, stopped = ?status.stopped, "job exited");
    attempt::write_json(dir, STATUS, &status)
}

/// Runs the command and returns how it ended.
async fn run_attempt(dir: &Path, record: &AttemptRecord, term: &mut SignalStream) -> ExitStatus {
    let stderr_path = dir.join("stderr");
    let ended = |code, signal, stopped, spawn_error| ExitStatus {
        code,
        signal,
        stopped,
        spawn_error,
        lost: None,
        ended_at_ms: now_ms(),
    };
    let mut child = match spawn(record, dir, term).await {
        Ok(child) => child,
        Err(SpawnError::Failed(error)) => {
            tracing::warn!(%error, "job spawn failed");
            return ended(None, None, None, Some(error));
        }
        Err(SpawnError::Stopped(reason)) => {
            tracing::info!(?reason, "job stopped before it started");
            note(
                &stderr_path,
                &format!("stopped ({reason:?}) before the command started"),
            );
            return ended(None, None, Some(reason), None);
        }
    };
    let Some(pid) = child.id() else {
        return ended(
            None,
            None,
            None,
            Some("child exited before its pid could be read".into()),
        );
    };
    // Read even from a zombie: the start time is what tells it from a reuse.
    let started = Started {
        process: ProcessId {
            pid,
            start_time: proc_stat(pid).map_or(0, |s| s.start_time),
        },
        at_ms: now_ms(),
    };
    if let Err(error) = attempt::write_json(dir, STARTED, &started) {
        // Unrecorded, a restarted agent could neither find nor stop it.
        signal_group(pid, Signal::SIGKILL);
        let _ = child.wait().await;
        return ended(
            None,
            None,
            None,
            Some(format!("cannot record the job's start: {error}")),
        );
    }
    tracing::info!(pid, gpus = ?record.launch.gpus, batch_size = record.launch.batch_size, "job started");

    let grace = record.kill_grace();
    let deadline = record.launch.timeout.map(|t| Instant::now() + t);
    // Set once the job is being stopped: why, and when SIGKILL is due.
    let mut stopping: Option<(StopReason, Instant)> = None;
    let mut killed = false;
    let status = loop {
        let kill_at = stopping.map(|(_, at)| at);
        tokio::select! {
            status = child.wait() => break status,
            _ = term.recv(), if stopping.is_none() => {
                let (reason, grace, message) = stop_request(dir, grace);
                tracing::info!(?reason, grace_ms = grace.as_millis() as u64, %message, "stopping job");
                write_stop_reason(&dir.join("work"), &message);
                note(&stderr_path, &format!("stopping ({reason:?}): SIGTERM, SIGKILL after {grace:?}"));
                signal_group(pid, Signal::SIGTERM);
                stopping = Some((reason, Instant::now() + grace));
            }
            () = sleep_until(deadline), if stopping.is_none() => {
                tracing::warn!(timeout_ms = record.launch.timeout.map_or(0, |t| t.as_millis() as u64), "job timed out");
                let timed_out = format!("timed out after {:?}", record.launch.timeout.unwrap_or_default());
                write_stop_reason(&dir.join("work"), &timed_out);
                note(&stderr_path, &format!("{timed_out}: SIGTERM, SIGKILL after {grace:?}"));
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
    reap_group(pid, kill_at_or_now(stopping, grace), killed).await;
    let (code, signal) = match &status {
        Ok(status) => (status.code(), status.signal()),
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for job");
            (None, None)
        }
    };
    ended(code, signal, stopping.map(|(reason, _)| reason), None)
}

/// When leftovers get SIGKILL: the running stop's deadline, or now + grace.
fn kill_at_or_now(stopping: Option<(StopReason, Instant)>, grace: Duration) -> (Instant, bool) {
    match stopping {
        Some((_, at)) => (at, true),
        None => (Instant::now() + grace, false),
    }
}

/// The agent's stop request and the words for the job; a SIGTERM without
/// one (someone else stopping the supervisor) counts as an agent shutdown.
fn stop_request(dir: &Path, default_grace: Duration) -> (StopReason, Duration, String) {
    let (reason, grace, message) = match attempt::read_json::<StopFile>(dir, STOP) {
        Ok(Some(stop)) => (
            stop.reason,
            Duration::from_millis(stop.grace_ms),
            stop.message,
        ),
        Ok(None) => (StopReason::Shutdown, default_grace, String::new()),
        Err(error) => {
            tracing::warn!(%error, "unreadable stop request: stopping as a shutdown");
            (StopReason::Shutdown, default_grace, String::new())
        }
    };
    let message = if message.is_empty() {
        match reason {
            StopReason::Cancelled => "cancelled",
            StopReason::Stale => "stale attempt: a newer attempt owns the job",
            StopReason::Shutdown => "agent shutting down",
            StopReason::Timeout => "timed out",
            StopReason::OverMemory => "used more GPU memory than reserved",
            StopReason::Fenced => "fenced: the coordinator has not heard this node lately",
        }
        .to_string()
    } else {
        message
    };
    (reason, grace, message)
}

/// Name, in the job's work directory, of the file that says why the job is
/// being stopped (`GANTRY_STOP_REASON_FILE`): the environment cannot change
/// after start, so the supervisor writes it just before the SIGTERM.
pub(crate) const STOP_REASON_FILE: &str = ".gantry-stop-reason";

/// Most bytes of a stop reason written for the job.
const MAX_STOP_REASON_BYTES: usize = 1024;

/// Writes `text` to the job's stop-reason file. Created new (`O_EXCL`, so
/// a link the job put there is never followed: the write then fails and
/// is logged), readable by the job whatever user it runs as.
fn write_stop_reason(work: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut end = text.len().min(MAX_STOP_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(work.join(STOP_REASON_FILE))
        .and_then(|mut file| writeln!(file, "{}", &text[..end]));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the job's stop reason");
    }
}

/// Makes sure no process of group `pgid` survives its leader: SIGTERM
/// (unless a stop already sent it), wait until the group empties or the
/// kill time, then SIGKILL.
async fn reap_group(pgid: u32, (kill_at, termed): (Instant, bool), killed: bool) {
    if killed || !group_alive(pgid) {
        return;
    }
    if !termed {
        tracing::info!("job leader exited, stopping what it left behind");
        signal_group(pgid, Signal::SIGTERM);
    }
    while Instant::now() < kill_at {
        if !group_alive(pgid) {
            return;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
    signal_group(pgid, Signal::SIGKILL);
}

/// Why an attempt did not get as far as running its command.
enum SpawnError {
    /// Reported as `SpawnFailed { error }`.
    Failed(String),
    /// A stop request arrived before the command ran.
    Stopped(StopReason),
}

impl From<String> for SpawnError {
    fn from(error: String) -> Self {
        Self::Failed(error)
    }
}

/// Prepares the work directory, output files and snapshot, and spawns the
/// command. Errors name the path, program or snapshot entry involved; a stop
/// request (before or while copying the snapshot) abandons the attempt.
async fn spawn(
    record: &AttemptRecord,
    dir: &Path,
    term: &mut SignalStream,
) -> Result<tokio::process::Child, SpawnError> {
    // A stop written before this supervisor listened.
    if let Some(stop) = attempt::read_json::<StopFile>(dir, STOP)? {
        return Err(SpawnError::Stopped(stop.reason));
    }
    let launch = &record.launch;
    let work = dir.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let stdout = open_output(&dir.join("stdout"))?;
    let stderr = open_output(&dir.join("stderr"))?;

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
        copy_snapshot(record, dir, &work, term).await?;
    }
    if let Some(user) = record.run_as {
        // The job may write only its work directory (output files are
        // opened here and inherited).
        let work = work.clone();
        tokio::task::spawn_blocking(move || crate::jobfs::hand_over(&work, user))
            .await
            .map_err(|e| format!("chown task failed: {e}"))??;
    }
    let mut command = Command::new(&program);
    if let Some(user) = record.run_as {
        // std drops supplementary groups (setgroups) when root sets a uid.
        command.uid(user.uid).gid(user.gid);
    }
    command
        .args(&args)
        .current_dir(&work)
        .envs(&launch.env)
        .envs(job_env(record, &work))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // A group of its own: signals reach everything the job forks, and
        // never the supervisor.
        .process_group(0)
        // Last resort if the supervisor's runtime is torn down early.
        .kill_on_drop(true);
    command
        .spawn()
        .map_err(|e| SpawnError::Failed(format!("cannot start {program:?}: {e}")))
}

/// Variables Gantry sets; they override the spec's `env`.
fn job_env(record: &AttemptRecord, work: &Path) -> Vec<(String, String)> {
    let launch = &record.launch;
    let gpus: Vec<String> = launch.gpus.iter().map(u32::to_string).collect();
    let mut env = vec![
        ("CUDA_VISIBLE_DEVICES".into(), gpus.join(",")),
        ("GANTRY_JOB_ID".into(), launch.job_id.to_string()),
        ("GANTRY_ATTEMPT".into(), launch.attempt.to_string()),
        (
            "GANTRY_GPU_MEMORY_BYTES".into(),
            launch.gpu_memory_bytes.to_string(),
        ),
        ("GANTRY_NODE".into(), record.node_name.clone()),
        ("GANTRY_WORK_DIR".into(), work.display().to_string()),
        // Written by the supervisor just before it sends SIGTERM.
        (
            "GANTRY_STOP_REASON_FILE".into(),
            work.join(STOP_REASON_FILE).display().to_string(),
        ),
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

/// Copies the snapshot entries off the runtime (they may be large), while
/// still answering a stop: SIGTERM interrupts the copy.
async fn copy_snapshot(
    record: &AttemptRecord,
    dir: &Path,
    work: &Path,
    term: &mut SignalStream,
) -> Result<(), SpawnError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let task = {
        let (dir, work, entries) = (
            dir.to_path_buf(),
            work.to_path_buf(),
            record.launch.snapshot.clone(),
        );
        let cancel = Arc::clone(&cancel);
        let user = record.run_as;
        tokio::task::spawn_blocking(move || snapshot::prepare(&dir, &work, &entries, &cancel, user))
    };
    tokio::pin!(task);
    let started = Instant::now();
    tokio::select! {
        joined = &mut task => {
            let copied = joined.map_err(|e| format!("snapshot task failed: {e}"))??;
            tracing::info!(entries = record.launch.snapshot.len(), dir = %copied.display(), elapsed_ms = started.elapsed().as_millis() as u64, "snapshot copied");
            Ok(())
        }
        _ = term.recv() => {
            cancel.store(true, Ordering::Relaxed);
            // Returns at the next chunk: the copy checks the flag.
            let _ = task.await;
            let (reason, _, _) = stop_request(dir, record.kill_grace());
            Err(SpawnError::Stopped(reason))
        }
    }
}

/// Creates an output file for appending. Append mode so the `[gantry]`
/// notes (timeouts, stops) cannot overwrite the job's output. The claim
/// guarantees this attempt never ran under a supervisor; a file (or link)
/// there is left from an agent version without records, and is replaced.
fn open_output(path: &Path) -> Result<std::fs::File, String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove stale {}: {e}", path.display())),
    }
    // Never through a link, nor onto a name that reappeared meanwhile.
    std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .custom_flags(crate::jobfs::NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Appends a `[gantry]` note to a job's stderr, where users read it with
/// `gantry logs`.
pub(crate) fn note(path: &Path, message: &str) {
    use std::io::Write;
    let line = format!("[gantry] {message}\n");
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(crate::jobfs::NOFOLLOW)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot append note to stderr");
    }
}

/// Kills (SIGKILL) every job process group and supervisor recorded under
/// an agent's `data_dir` that still runs, identified by pid and start time;
/// returns how many attempts had something left. For harnesses that must
/// leave no process behind after an agent was killed (the test sandbox).
pub fn kill_leftovers(data_dir: &Path) -> usize {
    let Ok(keys) = attempt::list(data_dir) else {
        return 0;
    };
    let mut found = 0;
    for (job_id, attempt_no) in keys {
        let dir = attempt::attempt_dir(data_dir, job_id, attempt_no);
        let mut any = false;
        if let Ok(Some(started)) = attempt::read_json::<Started>(&dir, STARTED)
            && let Some(pgid) = attempt::leftover_group(&started)
        {
            signal_group(pgid, Signal::SIGKILL);
            any = true;
        }
        if let Ok(Some(Claim::Supervisor { process })) = attempt::read_json(&dir, attempt::CLAIM)
            && process.is_alive()
            && let Ok(pid) = i32::try_from(process.pid)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            any = true;
        }
        found += usize::from(any);
    }
    found
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
pub(crate) mod tests;
