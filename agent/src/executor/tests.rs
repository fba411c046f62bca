//! Executor tests: real processes, no coordinator. Waits are bounded polls.

mod recover;

use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};

use super::*;
use crate::config::FakeGpu;
use crate::probe::fake::FAKE_STATE_FILE;
use crate::probe::{FakeGpuProbe, SharedGpuProbe};
use crate::procgroup::pid_alive;

const WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

struct Harness {
    _dir: tempfile::TempDir,
    executor: Executor,
    events: mpsc::UnboundedReceiver<JobEvent>,
    /// Stops the GPU watch, when the harness runs one.
    _watch: Option<DropGuard>,
}

/// An executor (as one agent process) on `data_dir`.
fn executor_on(data_dir: &Path) -> (Executor, mpsc::UnboundedReceiver<JobEvent>) {
    let (tx, events) = mpsc::unbounded_channel();
    let executor = Executor::new(
        ExecutorConfig {
            node_name: "node-a".into(),
            data_dir: data_dir.to_path_buf(),
            kill_grace: Duration::from_secs(1),
            run_as: None,
            supervisor: SupervisorCommand::for_test(),
        },
        tx,
    );
    (executor, events)
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (executor, events) = executor_on(dir.path());
    Harness {
        _dir: dir,
        executor,
        events,
        _watch: None,
    }
}

/// A harness with two fake GPUs driven by `<data_dir>/fake-state.json` and a
/// GPU watch sampling them every 20 ms.
fn harness_with_gpus() -> Harness {
    let mut h = harness();
    let gpu = |n| FakeGpu {
        model: format!("H100-{n}"),
        total_bytes: 80 << 30,
    };
    let probe = FakeGpuProbe::new(
        vec![gpu(0), gpu(1)],
        Some(h.data_dir().join(FAKE_STATE_FILE)),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::gpu_watch::run(
        h.executor.clone(),
        SharedGpuProbe::new(Box::new(probe)),
        Duration::from_millis(20),
        shutdown.clone(),
    ));
    h._watch = Some(shutdown.drop_guard());
    h
}

fn launch(job_id: u64, command: &[&str]) -> Launch {
    Launch {
        job_id,
        attempt: 1,
        kind: "generic".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        shell: false,
        env: BTreeMap::new(),
        gpus: Vec::new(),
        gpu_memory_bytes: 0,
        batch_size: 0,
        timeout: None,
        snapshot: Vec::new(),
        gpu_memory_policy: GpuMemoryPolicy::Warn,
        gpu_memory_margin_bytes: 0,
    }
}

fn sh(job_id: u64, script: &str) -> Launch {
    launch(job_id, &["sh", "-c", script])
}

impl Drop for Harness {
    /// Jobs outlive executors now (they run under supervisors): a test that
    /// ends, or fails, with a job running must not leave it behind.
    fn drop(&mut self) {
        crate::supervisor::kill_leftovers(self._dir.path());
    }
}

impl Harness {
    fn run(&self, launch: Launch) {
        assert_eq!(self.executor.launch(launch), LaunchOutcome::Accepted);
    }

    async fn next(&mut self) -> JobEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no job event in time")
            .expect("event channel closed")
    }

    /// Waits for the `Exited` of `job_id`, skipping its `Started`.
    async fn exit_of(&mut self, job_id: u64) -> ExitReport {
        loop {
            let event = self.next().await;
            assert_eq!(event.job_id, job_id, "{event:?}");
            match event.kind {
                JobEventKind::Started { .. } => continue,
                JobEventKind::Exited(report) => return report,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn stdout(&self, job_id: u64) -> String {
        let chunk = self
            .executor
            .read_log(&log(job_id, "stdout", 0, 0))
            .await
            .unwrap();
        String::from_utf8(chunk.data).unwrap()
    }

    fn data_dir(&self) -> &Path {
        self._dir.path()
    }

    /// Sets a job's fake per-GPU memory use (written atomically).
    fn set_job_gpu_memory(&self, job_id: u64, bytes: u64) {
        let tmp = self.data_dir().join("fake-state.tmp");
        let text = format!(r#"{{"job_gpu_memory_bytes": {{"{job_id}": {bytes}}}}}"#);
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.data_dir().join(FAKE_STATE_FILE)).unwrap();
    }

    async fn stderr(&self, job_id: u64) -> String {
        let chunk = self
            .executor
            .read_log(&log(job_id, "stderr", 0, 0))
            .await
            .unwrap();
        String::from_utf8(chunk.data).unwrap()
    }

    fn work_file(&self, job_id: u64, name: &str) -> PathBuf {
        self.executor.attempt_dir(job_id, 1).join("work").join(name)
    }
}

fn log(job_id: u64, stream: &str, offset: u64, max_bytes: u32) -> LogRequest {
    LogRequest {
        job_id,
        attempt: 1,
        stream: stream.into(),
        offset,
        max_bytes,
    }
}

async fn wait_until(what: &str, mut predicate: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !predicate() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a job to write its grandchild's pid to `pidfile` in its work dir.
async fn read_pid(h: &Harness, job_id: u64) -> u32 {
    let path = h.work_file(job_id, "pidfile");
    let mut pid = None;
    wait_until("pidfile", || {
        pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    })
    .await;
    pid.unwrap()
}

#[test]
fn substitutes_batch_size_only_when_chosen() {
    let cmd: Vec<String> = ["run", "--bs={batch_size}", "{batch_size}{batch_size}"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(substitute(&cmd, 256), vec!["run", "--bs=256", "256256"]);
    assert_eq!(substitute(&cmd, 0), cmd);
}

#[tokio::test]
async fn runs_a_command_and_captures_stdout() {
    let mut h = harness();
    h.run(launch(1, &["echo", "hello", "world"]));
    let started = h.next().await;
    assert!(
        matches!(started.kind, JobEventKind::Started { pid } if pid > 1),
        "{started:?}"
    );
    let exit = h.exit_of(1).await;
    assert_eq!(
        (exit.code, exit.signal, exit.cancelled),
        (Some(0), None, false)
    );
    assert_eq!(h.stdout(1).await, "hello world\n");
    assert!(h.executor.running().is_empty());
}

#[tokio::test]
async fn reports_exit_code_and_stderr_tail() {
    let mut h = harness();
    h.run(sh(1, "echo CUDA out of memory >&2; exit 3"));
    let exit = h.exit_of(1).await;
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.stderr_tail, b"CUDA out of memory\n");
}

#[tokio::test]
async fn exports_batch_size_gpus_and_env() {
    let mut h = harness();
    let mut job = sh(
        7,
        "echo $GANTRY_BATCH_SIZE $CUDA_VISIBLE_DEVICES {batch_size} $GANTRY_JOB_ID $GANTRY_ATTEMPT \
         $GANTRY_GPU_MEMORY_BYTES $GANTRY_NODE $FOO $CUDA_DEVICE_ORDER; pwd",
    );
    job.batch_size = 256;
    job.gpus = vec![0, 2];
    job.gpu_memory_bytes = 1234;
    job.env.insert("FOO".into(), "bar".into());
    // The spec cannot forge Gantry's own variables.
    job.env.insert("GANTRY_JOB_ID".into(), "999".into());
    h.run(job);
    assert_eq!(h.exit_of(7).await.code, Some(0));
    let work = h.executor.attempt_dir(7, 1).join("work");
    assert_eq!(
        h.stdout(7).await,
        format!(
            "256 0,2 256 7 1 1234 node-a bar PCI_BUS_ID\n{}\n",
            work.canonicalize().unwrap().display()
        )
    );
}

#[tokio::test]
async fn without_batch_size_leaves_placeholder_and_no_gpus() {
    let mut h = harness();
    let mut job = launch(2, &["echo", "{batch_size}", "$CUDA_VISIBLE_DEVICES"]);
    job.shell = true;
    job.command.push("[${CUDA_VISIBLE_DEVICES-unset}]".into());
    job.command.push("[${GANTRY_BATCH_SIZE-unset}]".into());
    h.run(job);
    assert_eq!(h.exit_of(2).await.code, Some(0));
    assert_eq!(h.stdout(2).await, "{batch_size} [] [unset]\n");
}

#[tokio::test]
async fn shell_mode_joins_the_command() {
    let mut h = harness();
    let mut job = launch(
        3,
        &["echo", "bs={batch_size}", "&&", "echo", "$GANTRY_NODE"],
    );
    job.shell = true;
    job.batch_size = 64;
    h.run(job);
    assert_eq!(h.exit_of(3).await.code, Some(0));
    assert_eq!(h.stdout(3).await, "bs=64\nnode-a\n");
}

#[tokio::test]
async fn cancel_kills_the_whole_process_tree() {
    let mut h = harness();
    h.run(sh(4, "sleep 1000 & echo $! > pidfile; wait"));
    let grandchild = read_pid(&h, 4).await;
    assert!(pid_alive(grandchild));
    assert_eq!(h.executor.running().len(), 1);
    assert!(
        h.executor
            .stop(4, 1, Some(Duration::from_secs(5)), StopReason::Cancelled)
    );
    let exit = h.exit_of(4).await;
    assert!(exit.cancelled);
    assert_eq!(exit.signal, Some(libc_sigterm()));
    wait_until("grandchild gone", || !pid_alive(grandchild)).await;
    assert!(h.executor.running().is_empty());
    // Stopping something finished is a no-op.
    assert!(!h.executor.stop(4, 1, None, StopReason::Cancelled));
}

/// A cancel right behind its assignment (both on the wire when the agent
/// reads them) refuses the attempt: no process starts, and the end is
/// reported as cancelled and kept on disk for a restarted agent.
#[tokio::test]
async fn a_cancel_right_behind_the_assignment_starts_nothing() {
    let mut h = harness();
    h.run(sh(5, "echo ran > ran"));
    assert!(h.executor.stop(5, 1, None, StopReason::Cancelled));
    let event = h.next().await;
    let JobEventKind::Exited(exit) = event.kind else {
        panic!("expected an exit, got {event:?}");
    };
    assert!(exit.cancelled, "{exit:?}");
    assert_eq!((exit.code, exit.signal), (None, None));
    assert!(!h.work_file(5, "ran").exists(), "the job ran");
    let status = std::fs::read_to_string(h.executor.attempt_dir(5, 1).join("status.json"))
        .expect("status on disk");
    assert!(status.to_lowercase().contains("cancelled"), "{status}");
    assert!(h.executor.running().is_empty());
}

#[tokio::test]
async fn sigkill_after_grace_when_sigterm_is_ignored() {
    let mut h = harness();
    h.run(sh(5, "trap '' TERM; sleep 1000 & echo $! > pidfile; wait"));
    let grandchild = read_pid(&h, 5).await;
    assert!(h.executor.stop(
        5,
        0,
        Some(Duration::from_millis(200)),
        StopReason::Cancelled
    ));
    let exit = h.exit_of(5).await;
    assert!(exit.cancelled);
    assert_eq!(exit.signal, Some(9));
    wait_until("grandchild gone", || !pid_alive(grandchild)).await;
}

#[tokio::test]
async fn leftovers_of_a_finished_job_are_stopped() {
    let mut h = harness();
    h.run(sh(6, "sleep 1000 & echo $! > pidfile"));
    let exit = h.exit_of(6).await;
    assert_eq!(exit.code, Some(0));
    let grandchild = read_pid(&h, 6).await;
    wait_until("leftover gone", || !pid_alive(grandchild)).await;
}

#[tokio::test]
async fn spawn_failure_names_the_program() {
    let mut h = harness();
    h.run(launch(8, &["gantry-no-such-binary", "--flag"]));
    let event = h.next().await;
    match event.kind {
        JobEventKind::SpawnFailed { error } => {
            assert!(error.contains("gantry-no-such-binary"), "{error}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(h.executor.running().is_empty());

    h.run(launch(9, &[]));
    let event = h.next().await;
    assert_eq!(
        event.kind,
        JobEventKind::SpawnFailed {
            error: "empty command".into()
        }
    );
}

#[tokio::test]
async fn timeout_kills_the_job() {
    let mut h = harness();
    let mut job = launch(10, &["sleep", "1000"]);
    job.timeout = Some(Duration::from_millis(200));
    h.run(job);
    let exit = h.exit_of(10).await;
    assert!(!exit.cancelled);
    assert_eq!(exit.signal, Some(libc_sigterm()));
    let tail = String::from_utf8_lossy(&exit.stderr_tail);
    assert!(tail.contains("timed out"), "{tail}");
}

#[tokio::test]
async fn duplicates_are_ignored() {
    let mut h = harness();
    h.run(launch(11, &["true"]));
    assert_eq!(
        h.executor.launch(launch(11, &["true"])),
        LaunchOutcome::Duplicate
    );
    assert_eq!(h.exit_of(11).await.code, Some(0));
    assert_eq!(
        h.executor.launch(launch(11, &["true"])),
        LaunchOutcome::Duplicate
    );
    let mut next = launch(11, &["true"]);
    next.attempt = 2;
    assert_eq!(h.executor.launch(next), LaunchOutcome::Accepted);
}

#[tokio::test]
async fn log_reads_at_offsets_with_eof() {
    let mut h = harness();
    h.run(sh(12, "printf 0123456789; printf oops >&2"));
    assert_eq!(h.exit_of(12).await.code, Some(0));
    let read = |offset, max, stream: &'static str| {
        let executor = h.executor.clone();
        async move {
            executor
                .read_log(&log(12, stream, offset, max))
                .await
                .unwrap()
        }
    };
    let chunk = read(3, 4, "stdout").await;
    assert_eq!(
        (chunk.data.as_slice(), chunk.offset, chunk.eof),
        (&b"3456"[..], 3, false)
    );
    let chunk = read(6, 100, "stdout").await;
    assert_eq!((chunk.data.as_slice(), chunk.eof), (&b"6789"[..], true));
    let chunk = read(20, 100, "stdout").await;
    assert_eq!((chunk.data.len(), chunk.eof), (0, true));
    let chunk = read(0, 0, "stderr").await;
    assert_eq!((chunk.data.as_slice(), chunk.eof), (&b"oops"[..], true));

    let err = h
        .executor
        .read_log(&log(12, "bogus", 0, 10))
        .await
        .unwrap_err();
    assert!(err.contains("unknown stream"), "{err}");
    let err = h
        .executor
        .read_log(&log(404, "stdout", 0, 10))
        .await
        .unwrap_err();
    assert_eq!(err, "no output for job 404 attempt 1 on this node");
}

#[tokio::test]
async fn log_of_a_running_job_is_not_eof() {
    let mut h = harness();
    h.run(sh(13, "echo hi; exec sleep 1000"));
    wait_until("output", || {
        std::fs::read(h.executor.attempt_dir(13, 1).join("stdout")).is_ok_and(|d| d == b"hi\n")
    })
    .await;
    let chunk = h.executor.read_log(&log(13, "", 0, 0)).await.unwrap();
    assert_eq!((chunk.data.as_slice(), chunk.eof), (&b"hi\n"[..], false));
    // The supervisor records the start; the agent reads it within a poll.
    wait_until("process group known", || {
        h.executor
            .gpu_jobs()
            .first()
            .is_some_and(|j| j.pgid.is_some())
    })
    .await;
    assert_eq!(h.executor.gpu_jobs().len(), 1);
    h.executor.stop(13, 1, None, StopReason::Cancelled);
    assert!(h.exit_of(13).await.cancelled);
    let chunk = h.executor.read_log(&log(13, "", 3, 0)).await.unwrap();
    assert!(chunk.eof);
}

#[tokio::test]
async fn shutdown_stops_everything_and_refuses_new_work() {
    let mut h = harness();
    h.run(launch(14, &["sleep", "1000"]));
    h.run(sh(15, "sleep 1000"));
    wait_until("both running", || {
        h.executor.gpu_jobs().iter().all(|j| j.pgid.is_some())
    })
    .await;
    tokio::time::timeout(WAIT, h.executor.shutdown(true))
        .await
        .unwrap();
    assert!(h.executor.running().is_empty());
    let mut exits = 0;
    while let Ok(event) = h.events.try_recv() {
        if let JobEventKind::Exited(report) = event.kind {
            assert!(!report.cancelled, "shutdown is not a cancel");
            exits += 1;
        }
    }
    assert_eq!(exits, 2);
    assert_eq!(
        h.executor.launch(launch(16, &["true"])),
        LaunchOutcome::ShuttingDown
    );
}

fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

fn snap(from: &Path, as_name: &str) -> SnapshotEntry {
    SnapshotEntry {
        from: from.display().to_string(),
        as_name: as_name.into(),
    }
}

#[tokio::test]
async fn snapshot_copies_files_and_trees_for_the_job() {
    let mut h = harness();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("model.pt"), "weights\n").unwrap();
    std::fs::create_dir_all(src.path().join("tree/sub")).unwrap();
    std::fs::write(src.path().join("tree/sub/b"), "B\n").unwrap();
    let mut job = sh(
        20,
        r#"cat "$GANTRY_SNAPSHOT_DIR/model.pt" "$GANTRY_SNAPSHOT_DIR/data/tree/sub/b"; echo "$GANTRY_SNAPSHOT_DIR""#,
    );
    job.snapshot = vec![
        snap(&src.path().join("model.pt"), "model.pt"),
        snap(&src.path().join("tree"), "data/tree"),
    ];
    h.run(job);
    assert_eq!(h.exit_of(20).await.code, Some(0));
    let dir = h.executor.attempt_dir(20, 1).join("work/snapshot");
    assert_eq!(
        h.stdout(20).await,
        format!("weights\nB\n{}\n", dir.display())
    );
    // Jobs without snapshot entries get no variable.
    h.run(sh(21, "echo [${GANTRY_SNAPSHOT_DIR-unset}]"));
    assert_eq!(h.exit_of(21).await.code, Some(0));
    assert_eq!(h.stdout(21).await, "[unset]\n");
}

/// The job reads its snapshot, waits for the test to rewrite the source and
/// open the gate, and reads it again: both reads see the original.
async fn check_snapshot_survives(job_id: u64, rewrite: impl FnOnce(&Path)) {
    let mut h = harness();
    let src = tempfile::tempdir().unwrap();
    let model = src.path().join("model.pt");
    std::fs::write(&model, "original\n").unwrap();
    let mut job = sh(
        job_id,
        r#"cat "$GANTRY_SNAPSHOT_DIR/model.pt"; while [ ! -e gate ]; do sleep 0.05; done; cat "$GANTRY_SNAPSHOT_DIR/model.pt""#,
    );
    job.snapshot = vec![snap(&model, "model.pt")];
    h.run(job);
    let stdout = h.executor.attempt_dir(job_id, 1).join("stdout");
    wait_until("first read", || {
        std::fs::read(&stdout).is_ok_and(|d| d == b"original\n")
    })
    .await;
    rewrite(&model);
    assert_eq!(std::fs::read_to_string(&model).unwrap(), "rewritten!\n");
    std::fs::write(h.work_file(job_id, "gate"), "").unwrap();
    assert_eq!(h.exit_of(job_id).await.code, Some(0));
    assert_eq!(h.stdout(job_id).await, "original\noriginal\n");
}

#[tokio::test]
async fn snapshot_survives_a_rename_replace() {
    check_snapshot_survives(22, |model| {
        let tmp = model.with_extension("tmp");
        std::fs::write(&tmp, "rewritten!\n").unwrap();
        std::fs::rename(&tmp, model).unwrap();
    })
    .await;
}

#[tokio::test]
async fn snapshot_survives_an_in_place_rewrite() {
    check_snapshot_survives(23, |model| {
        use std::io::Write;
        // Same inode, truncated and rewritten: a hard link would show this.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(model)
            .unwrap();
        file.write_all(b"rewritten!\n").unwrap();
    })
    .await;
}

#[tokio::test]
async fn bad_snapshot_entries_fail_the_spawn_without_running() {
    let mut h = harness();
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("ok.pt");
    std::fs::write(&file, "x").unwrap();
    let missing = src.path().join("missing.pt");
    for (job_id, entries, expect) in [
        (
            30,
            vec![snap(&missing, "m.pt")],
            format!(
                "snapshot[0].from: {}: No such file or directory",
                missing.display()
            ),
        ),
        (
            31,
            vec![snap(&file, "ok.pt"), snap(&file, "../escape")],
            "snapshot[1]: as \"../escape\": must not contain \"..\"".to_string(),
        ),
        (
            32,
            vec![snap(&file, "/abs")],
            "snapshot[0]: as \"/abs\": must be a relative path".to_string(),
        ),
    ] {
        let mut job = sh(job_id, "touch ran");
        job.snapshot = entries;
        h.run(job);
        let event = h.next().await;
        assert_eq!(event.job_id, job_id);
        assert_eq!(event.kind, JobEventKind::SpawnFailed { error: expect });
        assert!(!h.work_file(job_id, "ran").exists(), "the command ran");
    }
    assert!(!h.executor.attempt_dir(31, 1).join("escape").exists());
    assert!(!Path::new("/abs").exists());
    assert!(h.executor.running().is_empty());
}

fn gpu_job(job_id: u64, policy: GpuMemoryPolicy) -> Launch {
    let mut job = sh(
        job_id,
        "echo started; while [ ! -e gate ]; do sleep 0.05; done",
    );
    job.gpus = vec![1];
    job.gpu_memory_bytes = GIB;
    job.gpu_memory_margin_bytes = 100 * MIB;
    job.gpu_memory_policy = policy;
    job
}

#[tokio::test]
async fn over_memory_under_policy_stop_kills_the_job() {
    let mut h = harness_with_gpus();
    h.run(gpu_job(40, GpuMemoryPolicy::Stop));
    assert!(matches!(h.next().await.kind, JobEventKind::Started { .. }));
    // At the limit (reservation + margin) is still fine.
    h.set_job_gpu_memory(40, GIB + 100 * MIB);
    wait_until("peak at the limit", || {
        h.executor.gpu_memory_peak(40, 1) == Some(GIB + 100 * MIB)
    })
    .await;
    h.set_job_gpu_memory(40, 5 * GIB);
    let exit = h.exit_of(40).await;
    assert!(exit.over_memory, "{exit:?}");
    assert!(!exit.cancelled && !exit.agent_shutdown);
    assert_eq!(exit.signal, Some(libc_sigterm()));
    assert!(exit.peak_gpu_memory_bytes >= 5 * GIB, "{exit:?}");
    let tail = String::from_utf8_lossy(&exit.stderr_tail);
    assert!(
        tail.contains("[gantry] GPU memory over reservation: using 5GiB on one GPU, reserved 1GiB + margin 100MiB; policy stop"),
        "{tail}"
    );
}

#[tokio::test]
async fn over_memory_under_policy_warn_notes_once_and_keeps_running() {
    let mut h = harness_with_gpus();
    h.run(gpu_job(41, GpuMemoryPolicy::Warn));
    assert!(matches!(h.next().await.kind, JobEventKind::Started { .. }));
    h.set_job_gpu_memory(41, 5 * GIB);
    let mut stderr = String::new();
    for _ in 0..2 {
        // Twice: the second wait spans more samples, which must not repeat the note.
        tokio::time::timeout(WAIT, async {
            loop {
                stderr = h.stderr(41).await;
                if stderr.contains("policy warn") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no over-memory note in time");
        h.set_job_gpu_memory(41, 7 * GIB);
        wait_until("new peak", || {
            h.executor.gpu_memory_peak(41, 1) == Some(7 * GIB)
        })
        .await;
    }
    assert_eq!(stderr.matches("[gantry]").count(), 1, "{stderr}");
    std::fs::write(h.work_file(41, "gate"), "").unwrap();
    let exit = h.exit_of(41).await;
    assert_eq!(exit.code, Some(0));
    assert!(!exit.over_memory);
    assert_eq!(exit.peak_gpu_memory_bytes, 7 * GIB);
}

#[tokio::test]
async fn jobs_without_a_reservation_are_measured_not_policed() {
    let mut h = harness_with_gpus();
    let mut job = gpu_job(42, GpuMemoryPolicy::Stop);
    job.gpu_memory_bytes = 0;
    h.run(job);
    assert!(matches!(h.next().await.kind, JobEventKind::Started { .. }));
    h.set_job_gpu_memory(42, 1 << 40);
    wait_until("peak", || {
        h.executor.gpu_memory_peak(42, 1) == Some(1 << 40)
    })
    .await;
    std::fs::write(h.work_file(42, "gate"), "").unwrap();
    let exit = h.exit_of(42).await;
    assert_eq!((exit.code, exit.over_memory), (Some(0), false));
    assert_eq!(exit.peak_gpu_memory_bytes, 1 << 40);
    assert!(!h.stderr(42).await.contains("[gantry]"));
}

/// A harness whose jobs run as `nobody`; `None` (test skipped) unless the
/// tests run as root. The data directory is opened to the job user.
fn harness_as_nobody() -> Option<Harness> {
    let user = crate::jobfs::nobody()?;
    let mut h = harness();
    let (tx, events) = mpsc::unbounded_channel();
    h.executor = Executor::new(
        ExecutorConfig {
            node_name: "node-a".into(),
            data_dir: h.data_dir().to_path_buf(),
            kill_grace: Duration::from_secs(1),
            run_as: Some(user),
            supervisor: SupervisorCommand::for_test(),
        },
        tx,
    );
    h.events = events;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(h)
}

fn owner(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().uid()
}

#[tokio::test]
async fn a_run_as_job_cannot_read_a_root_only_file_through_its_snapshot() {
    let Some(mut h) = harness_as_nobody() else {
        return;
    };
    let secret = h.data_dir().join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = h.data_dir().join("link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    for (job_id, from) in [(40, &secret), (41, &link)] {
        let mut job = sh(job_id, r#"cat "$GANTRY_SNAPSHOT_DIR/m""#);
        job.snapshot = vec![snap(from, "m")];
        h.run(job);
        let event = h.next().await;
        let expect = format!(
            "snapshot[0].from: {}: not readable by user nobody",
            from.display()
        );
        assert_eq!(event.kind, JobEventKind::SpawnFailed { error: expect });
    }
    // What nobody may read still works, and the job runs as nobody.
    let public = h.data_dir().join("public");
    std::fs::write(&public, "public\n").unwrap();
    let mut job = sh(42, r#"cat "$GANTRY_SNAPSHOT_DIR/m"; id -u"#);
    job.snapshot = vec![snap(&public, "m")];
    h.run(job);
    assert_eq!(h.exit_of(42).await.code, Some(0));
    assert_eq!(h.stdout(42).await, "public\n65534\n");
}

#[tokio::test]
async fn links_planted_in_a_stale_work_dir_give_the_job_nothing_of_roots() {
    let Some(mut h) = harness_as_nobody() else {
        return;
    };
    // An earlier run with the same ids left links in its work directory:
    // the snapshot directory itself and a file are links out, and a hard
    // link names a root-owned file.
    let outside = h.data_dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let victim = h.data_dir().join("victim");
    std::fs::write(&victim, "root's\n").unwrap();
    let work = h.executor.attempt_dir(43, 1).join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("snapshot")).unwrap();
    std::os::unix::fs::symlink(&victim, work.join("link")).unwrap();
    std::fs::hard_link(&victim, work.join("hard")).unwrap();
    let public = h.data_dir().join("public");
    std::fs::write(&public, "public\n").unwrap();
    let mut job = sh(43, r#"cat "$GANTRY_SNAPSHOT_DIR/m"; echo pwned >> hard"#);
    job.snapshot = vec![snap(&public, "m")];
    h.run(job);
    let report = h.exit_of(43).await;
    assert_ne!(report.code, Some(0), "wrote through the hard link");
    assert_eq!(h.stdout(43).await, "public\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    assert_eq!(owner(&victim), 0, "a hard-linked root file was handed over");
    assert_eq!(owner(&outside), 0);
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
}

#[tokio::test]
async fn output_files_are_never_written_or_served_through_a_link() {
    let mut h = harness();
    let victim = h.data_dir().join("victim");
    std::fs::write(&victim, "root's\n").unwrap();
    // A link where the attempt's stdout will be: replaced, not written.
    let dir = h.executor.attempt_dir(44, 1);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("stdout")).unwrap();
    h.run(sh(44, "echo out"));
    assert_eq!(h.exit_of(44).await.code, Some(0));
    assert_eq!(h.stdout(44).await, "out\n");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    // Output left by an earlier agent is served only if it is a file.
    let stale = h.executor.attempt_dir(45, 1);
    std::fs::create_dir_all(&stale).unwrap();
    std::os::unix::fs::symlink(&victim, stale.join("stdout")).unwrap();
    let err = h
        .executor
        .read_log(&log(45, "stdout", 0, 0))
        .await
        .unwrap_err();
    assert!(err.starts_with("cannot open"), "{err}");
}
