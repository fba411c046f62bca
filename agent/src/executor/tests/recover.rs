//! A restarted agent and its attempts: adoption, exits collected after the
//! fact, refused second starts, pid reuse. "Restart" is a second executor on
//! the same data directory after the first one detached (as an agent that
//! exits without `--stop-jobs-on-exit`); the SIGKILL case is the
//! integration test `agent_restart`.

use super::*;
use crate::attempt::{self, Claim, STARTED, STATUS, Started};
use crate::procgroup::ProcessId;

/// A job that appends `start PID` to `<data>/ledger`, waits for `gate` in
/// its work directory, then appends `end PID`.
fn ledger_job(h: &Harness, job_id: u64) -> Launch {
    let ledger = h.data_dir().join("ledger");
    sh(
        job_id,
        &format!(
            "echo start $$ >> {l}; while [ ! -e gate ]; do sleep 0.02; done; echo end $$ >> {l}",
            l = ledger.display()
        ),
    )
}

fn ledger(h: &Harness) -> Vec<String> {
    std::fs::read_to_string(h.data_dir().join("ledger"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Runs `job_id` until its `Started`, then lets the executor go away
/// leaving the job running; returns the job's pid.
async fn start_and_detach(h: &mut Harness, launch: Launch) -> u32 {
    h.run(launch);
    let JobEventKind::Started { pid } = h.next().await.kind else {
        panic!("expected Started")
    };
    tokio::time::timeout(WAIT, h.executor.shutdown(false))
        .await
        .expect("detach in time");
    assert!(pid_alive(pid), "the job outlives the agent");
    pid
}

async fn next_of(events: &mut mpsc::UnboundedReceiver<JobEvent>) -> JobEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no job event in time")
        .expect("event channel closed")
}

#[tokio::test]
async fn a_live_attempt_is_adopted_and_still_policed() {
    let mut h = harness();
    let job = ledger_job(&h, 50);
    let pid = start_and_detach(&mut h, job).await;
    let mut job = ledger_job(&h, 51);
    job.timeout = Some(Duration::from_millis(300));
    let timed_pid = start_and_detach_again(&mut h, job).await;

    let (b, mut events) = executor_on(h.data_dir());
    let recovered = b.recover().await.unwrap();
    assert_eq!(recovered.adopted, 2, "{recovered:?}");
    let running: Vec<(u64, u32)> = b.running().iter().map(|r| (r.job_id, r.attempt)).collect();
    assert_eq!(running, vec![(50, 1), (51, 1)]);
    let pgids: Vec<Option<u32>> = b.gpu_jobs().iter().map(|j| j.pgid).collect();
    assert_eq!(
        pgids,
        vec![Some(pid), Some(timed_pid)],
        "GPU watch sees them"
    );
    // The supervisor enforces the timeout whoever watches it.
    let event = next_of(&mut events).await;
    assert_eq!(event.job_id, 51);
    let JobEventKind::Exited(exit) = event.kind else {
        panic!("{event:?}")
    };
    assert!(!exit.cancelled && exit.signal.is_some(), "{exit:?}");
    // Logs of an adopted attempt are live (not eof).
    let chunk = b.read_log(&log(50, "stdout", 0, 0)).await.unwrap();
    assert!(!chunk.eof);
    // A cancel reaches the adopted job's whole group.
    assert!(b.stop(50, 1, None, StopReason::Cancelled));
    let event = next_of(&mut events).await;
    let JobEventKind::Exited(exit) = event.kind else {
        panic!("{event:?}")
    };
    assert!(exit.cancelled, "{exit:?}");
    assert!(!pid_alive(pid));
    let starts = ledger(&h).iter().filter(|l| l.starts_with("start")).count();
    assert_eq!(starts, 2, "each attempt started once: {:?}", ledger(&h));
}

/// [`start_and_detach`] for a harness whose executor already detached: a
/// fresh executor runs the job, then detaches too.
async fn start_and_detach_again(h: &mut Harness, launch: Launch) -> u32 {
    let (executor, events) = executor_on(h.data_dir());
    h.executor = executor;
    h.events = events;
    start_and_detach(h, launch).await
}

#[tokio::test]
async fn an_exit_while_away_is_collected_and_reported() {
    let mut h = harness();
    let job = ledger_job(&h, 52);
    let pid = start_and_detach(&mut h, job).await;
    std::fs::write(h.work_file(52, "gate"), "").unwrap();
    let dir = h.executor.attempt_dir(52, 1);
    wait_until("status written", || dir.join(STATUS).exists()).await;

    let (b, mut events) = executor_on(h.data_dir());
    let recovered = b.recover().await.unwrap();
    assert_eq!((recovered.adopted, recovered.reported), (0, 1));
    assert!(b.running().is_empty());
    let started = next_of(&mut events).await;
    assert_eq!(started.kind, JobEventKind::Started { pid });
    let JobEventKind::Exited(exit) = next_of(&mut events).await.kind else {
        panic!("expected Exited")
    };
    assert_eq!(
        (exit.code, exit.cancelled, exit.agent_shutdown),
        (Some(0), false, false)
    );
    assert_eq!(
        ledger(&h),
        vec![format!("start {pid}"), format!("end {pid}")]
    );

    // Acknowledged: a third agent process does not report it again.
    b.acknowledge(&[(52, 1)]);
    wait_until("acked", || dir.join(attempt::ACKED).exists()).await;
    let (c, mut events) = executor_on(h.data_dir());
    assert_eq!(c.recover().await.unwrap().acknowledged, 1);
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn an_attempt_is_never_started_twice() {
    let mut h = harness();
    let job = ledger_job(&h, 53);
    h.run(job.clone());
    // Same attempt while running: nothing new starts, its status answers.
    let JobEventKind::Started { pid } = h.next().await.kind else {
        panic!("expected Started")
    };
    assert_eq!(h.executor.launch(job.clone()), LaunchOutcome::Duplicate);
    assert_eq!(h.next().await.kind, JobEventKind::Started { pid });
    std::fs::write(h.work_file(53, "gate"), "").unwrap();
    assert_eq!(h.exit_of(53).await.code, Some(0));
    // After its end: the end is reported again.
    assert_eq!(h.executor.launch(job.clone()), LaunchOutcome::Duplicate);
    assert!(matches!(
        h.next().await.kind,
        JobEventKind::Exited(ExitReport { code: Some(0), .. })
    ));

    // A restarted agent knows it from disk.
    let (b, mut events) = executor_on(h.data_dir());
    b.recover().await.unwrap();
    while events.try_recv().is_ok() {}
    assert_eq!(b.launch(job.clone()), LaunchOutcome::Duplicate);
    assert!(matches!(
        next_of(&mut events).await.kind,
        JobEventKind::Exited(ExitReport { code: Some(0), .. })
    ));
    // Even forgotten (no memory of it at all), the record on disk refuses.
    let (c, mut events) = executor_on(h.data_dir());
    assert_eq!(c.launch(job), LaunchOutcome::Accepted);
    let event = next_of(&mut events).await;
    assert!(
        matches!(
            event.kind,
            JobEventKind::Started { .. } | JobEventKind::Exited(_)
        ),
        "{event:?}"
    );
    assert_eq!(
        ledger(&h),
        vec![format!("start {pid}"), format!("end {pid}")]
    );
}

#[tokio::test]
async fn a_reused_pid_is_not_adopted() {
    let h = harness();
    // Someone else's process, holding the pid the records name.
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let other_id = ProcessId::of(other.id()).unwrap();
    let reused = ProcessId {
        start_time: other_id.start_time + 1,
        ..other_id
    };
    let dir = h.executor.attempt_dir(54, 1);
    std::fs::create_dir_all(&dir).unwrap();
    let record = attempt::AttemptRecord {
        launch: sh(54, "true"),
        node_name: "node-a".into(),
        kill_grace_ms: 100,
        run_as: None,
        accepted_at_ms: 1,
    };
    attempt::write_json(&dir, attempt::RECORD, &record).unwrap();
    assert!(attempt::claim(&dir, &Claim::Supervisor { process: reused }).unwrap());
    let started = Started {
        process: reused,
        at_ms: 2,
    };
    attempt::write_json(&dir, STARTED, &started).unwrap();

    let (b, mut events) = executor_on(h.data_dir());
    let recovered = b.recover().await.unwrap();
    assert_eq!((recovered.adopted, recovered.reported), (0, 1));
    assert!(b.running().is_empty());
    assert!(matches!(
        next_of(&mut events).await.kind,
        JobEventKind::Started { .. }
    ));
    let JobEventKind::Exited(exit) = next_of(&mut events).await.kind else {
        panic!("expected Exited")
    };
    assert!(exit.agent_shutdown, "lost, retried elsewhere: {exit:?}");
    let tail = String::from_utf8_lossy(&exit.stderr_tail);
    assert!(
        tail.contains("ended without recording an exit status"),
        "{tail}"
    );
    assert!(pid_alive(other.id()), "the pid's new owner is left alone");
    other.kill().unwrap();
    other.wait().unwrap();
}

#[tokio::test]
async fn an_unclaimed_record_is_abandoned_and_a_late_supervisor_runs_nothing() {
    let h = harness();
    let dir = h.executor.attempt_dir(55, 1);
    std::fs::create_dir_all(&dir).unwrap();
    let marker = h.data_dir().join("ran");
    let record = attempt::AttemptRecord {
        launch: sh(55, &format!("touch {}", marker.display())),
        node_name: "node-a".into(),
        kill_grace_ms: 100,
        run_as: None,
        accepted_at_ms: 1,
    };
    attempt::write_json(&dir, attempt::RECORD, &record).unwrap();

    let (b, mut events) = executor_on(h.data_dir());
    assert_eq!(b.recover().await.unwrap().reported, 1);
    let JobEventKind::Exited(exit) = next_of(&mut events).await.kind else {
        panic!("expected Exited")
    };
    assert!(exit.agent_shutdown && exit.code.is_none(), "{exit:?}");
    // The supervisor the dead agent had forked finally runs: claim taken.
    let command = SupervisorCommand::for_test();
    let status = std::process::Command::new(&command.program)
        .args(&command.args)
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!marker.exists(), "the abandoned attempt never ran");
}

#[tokio::test]
async fn a_stop_survives_the_agent_going_away_half_way() {
    let mut h = harness();
    // Ignores SIGTERM: only the supervisor's SIGKILL after the grace ends it.
    let job = sh(
        56,
        "trap '' TERM; echo $$ > pidfile; while true; do sleep 0.05; done",
    );
    h.run(job);
    let JobEventKind::Started { pid } = h.next().await.kind else {
        panic!("expected Started")
    };
    assert!(h.executor.stop(
        56,
        1,
        Some(Duration::from_millis(500)),
        StopReason::Cancelled
    ));
    let dir = h.executor.attempt_dir(56, 1);
    wait_until("stop requested", || dir.join(attempt::STOP).exists()).await;
    tokio::time::timeout(WAIT, h.executor.shutdown(false))
        .await
        .expect("detach in time");
    // Nobody watches now; the supervisor still escalates.
    wait_until("job killed", || !pid_alive(pid)).await;
    wait_until("status written", || dir.join(STATUS).exists()).await;
    let (b, mut events) = executor_on(h.data_dir());
    assert_eq!(b.recover().await.unwrap().reported, 1);
    assert_eq!(
        next_of(&mut events).await.kind,
        JobEventKind::Started { pid }
    );
    let JobEventKind::Exited(exit) = next_of(&mut events).await.kind else {
        panic!("expected Exited")
    };
    assert!(exit.cancelled, "{exit:?}");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
}

#[tokio::test]
async fn acknowledged_attempts_past_their_retention_are_deleted() {
    let h = harness();
    let write = |job_id: u64, ended_at_ms: u64| {
        let dir = h.executor.attempt_dir(job_id, 1);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let record = attempt::AttemptRecord {
            launch: sh(job_id, "true"),
            node_name: "node-a".into(),
            kill_grace_ms: 100,
            run_as: None,
            accepted_at_ms: 1,
        };
        attempt::write_json(&dir, attempt::RECORD, &record).unwrap();
        let status = attempt::ExitStatus {
            code: Some(0),
            signal: None,
            stopped: None,
            spawn_error: None,
            lost: None,
            ended_at_ms,
        };
        attempt::write_json(&dir, STATUS, &status).unwrap();
        attempt::mark_acked(&dir).unwrap();
        dir
    };
    let old = write(57, now_ms() - 2 * ATTEMPT_RETENTION.as_millis() as u64);
    let recent = write(58, now_ms());
    let (b, mut events) = executor_on(h.data_dir());
    assert_eq!(b.recover().await.unwrap().acknowledged, 2);
    let job_dir = old.parent().unwrap();
    wait_until("old attempt and its job directory deleted", || {
        !job_dir.exists()
    })
    .await;
    assert!(recent.join("work").is_dir(), "kept for gantry logs");
    assert!(events.try_recv().is_err(), "nothing reported again");
    // Still remembered: a repeated assignment starts nothing.
    assert_eq!(b.launch(sh(57, "true")), LaunchOutcome::Duplicate);
}
