//! Table-style tests of the state machine: every command, its refusals, and
//! the reservation invariants.

use gantry_coordinator::Command;
use gantry_coordinator::dag::DependencyError;
use gantry_coordinator::domain::{JobSpec, JobState, RetryPolicy};
use gantry_coordinator::state::{ApplyError, Outcome, StateMachine};
use gantry_coordinator::store::Store;
use gantry_scheduler::{LockMode, LockRequest, Placement};

const GIB: u64 = 1 << 30;

fn spec(name: &str) -> JobSpec {
    JobSpec::for_test(name)
}

fn register(sm: &mut StateMachine, name: &str, gpus: u32, total: u64) {
    sm.apply(Command::register_for_test(name, gpus, total))
        .expect("register");
}

fn submit(sm: &mut StateMachine, specs: Vec<JobSpec>) -> Vec<u64> {
    match sm
        .apply(Command::Submit {
            at_ms: 10,
            key: None,
            jobs: specs,
            pipeline: None,
            owner: None,
        })
        .expect("submit")
    {
        Outcome::Submitted(ids) => ids,
        other => panic!("unexpected {other:?}"),
    }
}

fn place(job: u64, node: &str, gpu: u32, memory: u64, exclusive: bool) -> Placement {
    Placement {
        job,
        node: node.into(),
        gpus: vec![gpu],
        gpu_memory: memory,
        batch_size: None,
        exclusive_gpu: exclusive,
    }
}

/// (applied (job, attempt), refused (job, reason)).
type AssignResult = (Vec<(u64, u32)>, Vec<(u64, String)>);

fn assign(sm: &mut StateMachine, placements: Vec<Placement>) -> AssignResult {
    match sm
        .apply(Command::Assign {
            at_ms: 20,
            placements,
            term: 1,
        })
        .expect("assign")
    {
        Outcome::Assigned { applied, refused } => (applied, refused),
        other => panic!("unexpected {other:?}"),
    }
}

fn exit(sm: &mut StateMachine, job: u64, attempt: u32, node: &str, code: i32) {
    sm.apply(Command::JobExited {
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
        at_ms: 30,
        job,
        attempt,
        node: node.into(),
        code: Some(code),
        signal: None,
        error: String::new(),
        cancelled: false,
    })
    .expect("exit");
}

fn state(sm: &StateMachine, id: u64) -> JobState {
    sm.job(id).expect("job").state
}

#[test]
fn assign_rechecks_capacity_so_a_plan_cannot_overcommit() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 24 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b"), spec("c")]);
    // 10 + 10 fits in 24; the third would make 30.
    let (applied, refused) = assign(
        &mut sm,
        ids.iter()
            .map(|id| place(*id, "n1", 0, 10 * GIB, false))
            .collect(),
    );
    assert_eq!(applied, vec![(ids[0], 1), (ids[1], 1)]);
    assert_eq!(refused.len(), 1);
    assert!(refused[0].1.contains("overcommitted"), "{refused:?}");
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 20 * GIB);
    assert_eq!(state(&sm, ids[2]), JobState::Pending);
}

#[test]
fn refusals_cover_every_hard_rule() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 2, 80 * GIB);
    let mut locked = spec("writer");
    locked.locks = vec![LockRequest {
        name: "model/x".into(),
        mode: LockMode::Exclusive,
    }];
    let mut reader = spec("reader");
    reader.locks = vec![LockRequest {
        name: "model/x".into(),
        mode: LockMode::Shared,
    }];
    let ids = submit(
        &mut sm,
        vec![
            spec("excl"),
            spec("share"),
            locked,
            reader,
            spec("two"),
            spec("x"),
        ],
    );
    let (applied, _) = assign(
        &mut sm,
        vec![
            place(ids[0], "n1", 0, 10 * GIB, true),
            place(ids[2], "n1", 1, 10 * GIB, false),
        ],
    );
    assert_eq!(applied.len(), 2);
    let cases: Vec<(Placement, &str)> = vec![
        (place(ids[1], "n1", 0, 10 * GIB, false), "not free"),
        (place(ids[3], "n1", 1, 10 * GIB, false), "lock model/x"),
        (place(ids[4], "n2", 0, 10 * GIB, false), "not registered"),
        (place(ids[4], "n1", 7, 10 * GIB, false), "no GPU 7"),
        (place(ids[4], "n1", 1, 5 * GIB, false), "less than it asked"),
        (place(ids[0], "n1", 1, 10 * GIB, false), "not pending"),
        (
            Placement {
                gpus: vec![],
                ..place(ids[5], "n1", 1, 10 * GIB, false)
            },
            "wants 1 GPUs",
        ),
    ];
    for (placement, expected) in cases {
        let (applied, refused) = assign(&mut sm, vec![placement.clone()]);
        assert!(applied.is_empty(), "{placement:?} applied");
        assert!(
            refused[0].1.contains(expected),
            "{placement:?}: {:?} should contain {expected:?}",
            refused[0].1
        );
    }
    // Exactly one holder of the exclusive lock.
    assert_eq!(
        sm.locks().get("model/x").and_then(|h| h.exclusive),
        Some(ids[2])
    );
}

#[test]
fn success_releases_the_reservation_exactly_once() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a")]);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::JobStarted {
        at_ms: 25,
        job: ids[0],
        attempt: 1,
        node: "n1".into(),
    })
    .expect("start");
    assert_eq!(state(&sm, ids[0]), JobState::Running);
    exit(&mut sm, ids[0], 1, "n1", 0);
    assert_eq!(state(&sm, ids[0]), JobState::Succeeded);
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
    // A duplicate exit (resent after a reconnect) changes nothing.
    exit(&mut sm, ids[0], 1, "n1", 1);
    assert_eq!(state(&sm, ids[0]), JobState::Succeeded);
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
}

#[test]
fn failures_retry_with_backoff_then_fail_and_block_dependants() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let mut flaky = spec("flaky");
    flaky.retry = RetryPolicy {
        max_attempts: 2,
        backoff_ms: 1000,
    };
    let mut next = spec("next");
    next.after = vec!["flaky".into()];
    let ids = submit(&mut sm, vec![flaky, next]);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    exit(&mut sm, ids[0], 1, "n1", 3);
    let job = sm.job(ids[0]).expect("job");
    assert_eq!(job.state, JobState::Failed, "waiting for its back-off");
    // 1000 ms with +-20% jitter.
    assert!(
        (30 + 800..=30 + 1200).contains(&job.not_before_ms),
        "{}",
        job.not_before_ms
    );
    assert_eq!(
        sm.gpu_usage("n1", 0).reserved,
        0,
        "a failed attempt holds nothing"
    );
    assert_eq!(sm.backing_off().count(), 1);
    sm.apply(Command::Requeue {
        at_ms: 2000,
        job: ids[0],
    })
    .expect("requeue");
    assert_eq!(state(&sm, ids[0]), JobState::Pending);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    exit(&mut sm, ids[0], 2, "n1", 3);
    assert_eq!(state(&sm, ids[0]), JobState::DeadLettered);
    assert_eq!(sm.dead_lettered().count(), 1);
    assert_eq!(state(&sm, ids[1]), JobState::Blocked);
    assert!(
        sm.job(ids[1])
            .expect("job")
            .terminal_reason
            .contains("flaky")
    );

    // dlq retry brings it back and unblocks the dependant; its failure count restarts.
    sm.apply(Command::DlqRetry {
        at_ms: 3000,
        job: ids[0],
        spec: None,
    })
    .expect("retry");
    assert_eq!(state(&sm, ids[0]), JobState::Pending);
    assert_eq!(state(&sm, ids[1]), JobState::Pending);
    assert_eq!(sm.job(ids[0]).expect("job").failures(), 0);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    exit(&mut sm, ids[0], 3, "n1", 0);
    assert_eq!(state(&sm, ids[0]), JobState::Succeeded);
    let refused = sm.apply(Command::DlqRetry {
        at_ms: 4000,
        job: ids[0],
        spec: None,
    });
    assert!(
        matches!(refused, Err(ApplyError::NotDeadLettered { .. })),
        "{refused:?}"
    );
}

fn oom_exit(sm: &mut StateMachine, job: u64, attempt: u32) {
    sm.apply(Command::JobExited {
        at_ms: 30,
        job,
        attempt,
        node: "n1".into(),
        code: Some(1),
        signal: None,
        error: "CUDA out of memory".into(),
        cancelled: false,
        oom: true,
        output_tail: "RuntimeError: CUDA out of memory".into(),
        peak_gpu_memory: 0,
    })
    .expect("exit");
}

#[test]
fn out_of_memory_halves_the_batch_and_raises_the_class_estimate() {
    use gantry_scheduler::{BatchPolicy, BatchTier};
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let mut job = spec("selfplay-sq8");
    job.batch = Some(BatchPolicy {
        tiers: vec![
            BatchTier {
                min_free: Some(32 * GIB),
                size: 512,
            },
            BatchTier {
                min_free: None,
                size: 128,
            },
        ],
        ..Default::default()
    });
    let ids = submit(&mut sm, vec![job]);
    let mut placement = place(ids[0], "n1", 0, 10 * GIB, false);
    placement.batch_size = Some(512);
    assign(&mut sm, vec![placement.clone()]);
    oom_exit(&mut sm, ids[0], 1);
    let record = sm.job(ids[0]).expect("job");
    assert_eq!(record.state, JobState::Failed);
    assert_eq!(record.batch_cap, Some(256));
    assert_eq!(
        record.failures(),
        0,
        "an OOM retry does not use up max_attempts"
    );
    assert_eq!(
        sm.estimate("generic/selfplay-sq8"),
        Some(10 * GIB + 10 * GIB / 4)
    );
    sm.apply(Command::Requeue {
        at_ms: 40,
        job: ids[0],
    })
    .expect("requeue");
    placement.batch_size = Some(128);
    assign(&mut sm, vec![placement]);
    // At the smallest tier the batch cannot shrink: it counts as a failure.
    oom_exit(&mut sm, ids[0], 2);
    assert_eq!(state(&sm, ids[0]), JobState::DeadLettered);
    let last = sm
        .job(ids[0])
        .expect("job")
        .current_attempt()
        .cloned()
        .expect("attempt");
    assert!(last.oom && last.output_tail.contains("CUDA out of memory"));
}

fn reregister(sm: &mut StateMachine, name: &str) {
    register(sm, name, 1, 80 * GIB);
}

#[test]
fn a_lost_attempt_that_comes_back_before_its_replacement_starts_is_kept() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    register(&mut sm, "n2", 1, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b")]);
    assign(
        &mut sm,
        vec![
            place(ids[0], "n1", 0, 10 * GIB, false),
            place(ids[1], "n1", 0, 10 * GIB, false),
        ],
    );
    sm.apply(Command::JobStarted {
        at_ms: 25,
        job: ids[0],
        attempt: 1,
        node: "n1".into(),
    })
    .expect("start");
    sm.apply(Command::SetNodeDown {
        at_ms: 40,
        node: "n1".into(),
        down: true,
    })
    .expect("down");
    // a: replacement assigned on n2 but not started; b: not re-placed yet.
    assign(&mut sm, vec![place(ids[0], "n2", 0, 10 * GIB, false)]);
    reregister(&mut sm, "n1");
    let revived = sm
        .apply(Command::ReviveAttempt {
            at_ms: 51,
            job: ids[0],
            attempt: 1,
            node: "n1".into(),
        })
        .expect("revive");
    assert_eq!(
        revived,
        Outcome::Revived {
            withdrawn: Some(("n2".into(), 2))
        }
    );
    assert_eq!(state(&sm, ids[0]), JobState::Running);
    assert_eq!(
        sm.job(ids[0])
            .and_then(|j| j.current_attempt())
            .map(|a| a.attempt),
        Some(1)
    );
    assert_eq!(
        sm.gpu_usage("n2", 0).reserved,
        0,
        "the replacement's reservation is released"
    );
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 10 * GIB);
    let revived = sm
        .apply(Command::ReviveAttempt {
            at_ms: 52,
            job: ids[1],
            attempt: 1,
            node: "n1".into(),
        })
        .expect("revive");
    assert_eq!(revived, Outcome::Revived { withdrawn: None });
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 20 * GIB);
    // Exits of the revived attempt are recorded; the withdrawn one's are stale.
    exit(&mut sm, ids[0], 2, "n2", 0);
    assert_eq!(state(&sm, ids[0]), JobState::Running);
    exit(&mut sm, ids[0], 1, "n1", 0);
    assert_eq!(state(&sm, ids[0]), JobState::Succeeded);

    // Once the replacement has started, the old attempt is not revived.
    let ids = submit(&mut sm, vec![spec("c")]);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::SetNodeDown {
        at_ms: 60,
        node: "n1".into(),
        down: true,
    })
    .expect("down");
    assign(&mut sm, vec![place(ids[0], "n2", 0, 10 * GIB, false)]);
    sm.apply(Command::JobStarted {
        at_ms: 65,
        job: ids[0],
        attempt: 2,
        node: "n2".into(),
    })
    .expect("start");
    let stale = sm
        .apply(Command::ReviveAttempt {
            at_ms: 70,
            job: ids[0],
            attempt: 1,
            node: "n1".into(),
        })
        .expect("revive");
    assert_eq!(stale, Outcome::Stale);
}

#[test]
fn node_down_loses_jobs_for_retry_and_fences_the_old_attempt() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    register(&mut sm, "n2", 1, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a")]);
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::SetNodeDown {
        at_ms: 40,
        node: "n1".into(),
        down: true,
    })
    .expect("down");
    assert_eq!(
        state(&sm, ids[0]),
        JobState::Pending,
        "lost jobs are retried"
    );
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
    assign(&mut sm, vec![place(ids[0], "n2", 0, 10 * GIB, false)]);
    // The old attempt reporting in is stale: the agent must stop it.
    let outcome = sm
        .apply(Command::JobStarted {
            at_ms: 50,
            job: ids[0],
            attempt: 1,
            node: "n1".into(),
        })
        .expect("apply");
    assert_eq!(outcome, Outcome::Stale);
    exit(&mut sm, ids[0], 1, "n1", 0);
    assert_eq!(
        state(&sm, ids[0]),
        JobState::Assigned,
        "a stale exit changes nothing"
    );
    let attempts = &sm.job(ids[0]).expect("job").attempts;
    assert_eq!(attempts.len(), 2);
    assert!(attempts[0].error.contains("down"));
}

#[test]
fn cancel_pending_is_immediate_and_running_waits_for_the_agent() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b")]);
    let outcome = sm
        .apply(Command::RequestCancel {
            at_ms: 15,
            job: ids[1],
        })
        .expect("cancel");
    assert_eq!(
        outcome,
        Outcome::CancelRequested {
            state: JobState::Cancelled,
            stop: None
        }
    );
    assign(&mut sm, vec![place(ids[0], "n1", 0, 10 * GIB, false)]);
    let outcome = sm
        .apply(Command::RequestCancel {
            at_ms: 25,
            job: ids[0],
        })
        .expect("cancel");
    assert_eq!(
        outcome,
        Outcome::CancelRequested {
            state: JobState::Assigned,
            stop: Some(("n1".into(), 1))
        }
    );
    sm.apply(Command::JobExited {
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
        at_ms: 30,
        job: ids[0],
        attempt: 1,
        node: "n1".into(),
        code: None,
        signal: Some(15),
        error: String::new(),
        cancelled: true,
    })
    .expect("exit");
    assert_eq!(state(&sm, ids[0]), JobState::Cancelled);
    let again = sm.apply(Command::RequestCancel {
        at_ms: 35,
        job: ids[0],
    });
    assert!(
        matches!(again, Err(ApplyError::AlreadyTerminal { .. })),
        "{again:?}"
    );
}

/// Found by the Python client's tests: a job that catches the cancel's
/// SIGTERM and exits 0 was recorded Succeeded (and its dependants ran).
#[test]
fn a_cancelled_job_that_exits_zero_is_cancelled_and_blocks_its_dependants() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let mut then = spec("b");
    then.after = vec!["a".into()];
    let ids = submit(&mut sm, vec![spec("a"), then]);
    let (first, dependant) = (ids[0], ids[1]);
    assign(&mut sm, vec![place(first, "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::RequestCancel {
        at_ms: 25,
        job: first,
    })
    .expect("cancel");
    exit(&mut sm, first, 1, "n1", 0);
    let record = sm.job(first).expect("job");
    assert_eq!(record.state, JobState::Cancelled);
    assert_eq!(record.attempts[0].exit_code, Some(0));
    assert_eq!(
        record.attempts[0].outcome,
        Some(gantry_coordinator::domain::AttemptOutcome::Cancelled)
    );
    assert_ne!(state(&sm, dependant), JobState::Pending);
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
}

#[test]
fn submissions_are_idempotent_and_dags_are_validated_without_side_effects() {
    let mut sm = StateMachine::new();
    let first = sm
        .apply(Command::Submit {
            pipeline: None,
            owner: None,
            at_ms: 1,
            key: Some("k".into()),
            jobs: vec![spec("a")],
        })
        .expect("submit");
    let second = sm
        .apply(Command::Submit {
            pipeline: None,
            owner: None,
            at_ms: 2,
            key: Some("k".into()),
            jobs: vec![spec("a"), spec("b")],
        })
        .expect("submit");
    assert_eq!(first, second);
    assert_eq!(sm.jobs().count(), 1);

    let mut a = spec("a");
    a.after = vec!["c".into()];
    let mut b = spec("b");
    b.after = vec!["a".into()];
    let mut c = spec("c");
    c.after = vec!["b".into()];
    let cycle = sm.apply(Command::Submit {
        pipeline: None,
        owner: None,
        at_ms: 3,
        key: None,
        jobs: vec![a, b, c],
    });
    assert!(
        matches!(&cycle, Err(ApplyError::Dependency(DependencyError::Cycle { path, .. })) if path.contains("a") && path.contains("c")),
        "{cycle:?}"
    );
    let mut orphan = spec("x");
    orphan.after = vec!["nope".into()];
    let unknown = sm.apply(Command::Submit {
        pipeline: None,
        owner: None,
        at_ms: 4,
        key: None,
        jobs: vec![orphan],
    });
    assert!(
        matches!(
            unknown,
            Err(ApplyError::Dependency(
                DependencyError::UnknownDependency { .. }
            ))
        ),
        "{unknown:?}"
    );
    let mut dup = spec("a");
    dup.after = vec![];
    let mut user = spec("u");
    user.after = vec!["a".into()];
    let duplicate = sm.apply(Command::Submit {
        pipeline: None,
        owner: None,
        at_ms: 5,
        key: None,
        jobs: vec![spec("a"), dup, user],
    });
    assert!(
        matches!(
            duplicate,
            Err(ApplyError::Dependency(
                DependencyError::DuplicateName { .. }
            ))
        ),
        "{duplicate:?}"
    );
    assert_eq!(sm.jobs().count(), 1, "refused submits store nothing");
}

#[test]
fn the_store_round_trips_the_state_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let mut sm = store.load().expect("load");
    register(&mut sm, "n1", 2, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b")]);
    assign(&mut sm, vec![place(ids[0], "n1", 1, 10 * GIB, false)]);
    let changes = sm.take_changes();
    store.persist(&sm, changes).expect("persist");
    drop(store);

    let mut store = Store::open(dir.path()).expect("reopen");
    let loaded = store.load().expect("load");
    let jobs: Vec<_> = loaded.jobs().cloned().collect();
    assert_eq!(jobs, sm.jobs().cloned().collect::<Vec<_>>());
    assert_eq!(
        loaded.gpu_usage("n1", 1).reserved,
        10 * GIB,
        "derived reservations rebuilt"
    );
    assert_eq!(loaded.next_event_index(), sm.next_event_index());
    let events = store.events_since(1, 100).expect("events");
    assert_eq!(events.len() as u64, sm.next_event_index() - 1);
    assert!(events.windows(2).all(|w| w[0].index + 1 == w[1].index));
}

#[test]
fn snapshot_bytes_decode_to_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let mut sm = store.load().expect("load");
    let empty = store.snapshot_bytes(&sm).expect("empty snapshot");
    let decoded = gantry_coordinator::store::decode_snapshot(&empty).expect("decodes");
    assert!(decoded.jobs.is_empty() && decoded.events.is_empty());
    register(&mut sm, "n1", 2, 80 * GIB);
    register(&mut sm, "n2", 1, 40 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b")]);
    assign(&mut sm, vec![place(ids[0], "n1", 1, 10 * GIB, false)]);
    let changes = sm.take_changes();
    store.persist(&sm, changes).expect("persist");
    let bytes = store.snapshot_bytes(&sm).expect("snapshot bytes");
    let streamed =
        serde_json::to_value(gantry_coordinator::store::decode_snapshot(&bytes).expect("decodes"))
            .expect("value");
    let whole = serde_json::to_value(store.snapshot(&sm).expect("snapshot")).expect("value");
    assert_eq!(streamed, whole);
    assert!(!whole["events"].as_array().expect("events").is_empty());
}

#[test]
fn a_plan_from_a_deposed_leader_is_refused() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let ids = submit(&mut sm, vec![spec("a"), spec("b")]);
    let newer = sm
        .apply(Command::Assign {
            at_ms: 20,
            placements: vec![place(ids[0], "n1", 0, 10 * GIB, false)],
            term: 5,
        })
        .expect("assign");
    assert!(
        matches!(newer, Outcome::Assigned { ref applied, .. } if applied.len() == 1),
        "{newer:?}"
    );
    let late = sm
        .apply(Command::Assign {
            at_ms: 21,
            placements: vec![place(ids[1], "n1", 0, 10 * GIB, false)],
            term: 4,
        })
        .expect("assign");
    match late {
        Outcome::Assigned { applied, refused } => {
            assert!(applied.is_empty());
            assert!(refused[0].1.contains("older than term 5"), "{refused:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sm.job(ids[1]).map(|j| j.state), Some(JobState::Pending));
}

fn set_drain(sm: &mut StateMachine, node: &str, draining: bool, deadline_ms: Option<u64>) {
    sm.apply(Command::SetDrain {
        at_ms: 40,
        node: node.into(),
        draining,
        deadline_ms,
    })
    .expect("drain");
}

fn preempt(sm: &mut StateMachine, node: &str, at_ms: u64) -> Vec<(u64, u32)> {
    match sm
        .apply(Command::PreemptDrained {
            at_ms,
            node: node.into(),
        })
        .expect("preempt")
    {
        Outcome::Preempted { stop, .. } => stop,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn drain_deadlines_are_set_replaced_kept_and_cleared() {
    // Each case: a sequence of (draining, deadline) drains -> (draining, deadline).
    type Case = (&'static [(bool, Option<u64>)], (bool, Option<u64>));
    let cases: &[Case] = &[
        (&[(true, None)], (true, None)),
        (&[(true, Some(100))], (true, Some(100))),
        (&[(true, Some(100)), (true, Some(50))], (true, Some(50))),
        (&[(true, Some(100)), (true, None)], (true, Some(100))),
        (&[(true, Some(100)), (false, None)], (false, None)),
        (&[(true, Some(100)), (false, Some(7))], (false, None)),
        (&[(false, Some(100))], (false, None)),
    ];
    for (steps, (draining, deadline)) in cases {
        let mut sm = StateMachine::new();
        register(&mut sm, "n1", 1, 80 * GIB);
        for (d, at) in *steps {
            set_drain(&mut sm, "n1", *d, *at);
        }
        let node = sm.node("n1").expect("node");
        assert_eq!(
            (node.draining, node.drain_deadline_ms),
            (*draining, *deadline),
            "{steps:?}"
        );
    }
    let mut sm = StateMachine::new();
    let unknown = sm.apply(Command::SetDrain {
        at_ms: 1,
        node: "ghost".into(),
        draining: true,
        deadline_ms: Some(5),
    });
    assert_eq!(unknown, Err(ApplyError::NodeNotFound("ghost".into())));
    let unknown = sm.apply(Command::PreemptDrained {
        at_ms: 1,
        node: "ghost".into(),
    });
    assert_eq!(unknown, Err(ApplyError::NodeNotFound("ghost".into())));
}

#[test]
fn a_drain_deadline_preempts_without_using_an_attempt_and_moves_the_lock() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    register(&mut sm, "n2", 1, 80 * GIB);
    let mut writer = spec("train");
    writer.retry = RetryPolicy {
        max_attempts: 1,
        backoff_ms: 1000,
    };
    writer.locks = vec![LockRequest {
        name: "model/x".into(),
        mode: LockMode::Exclusive,
    }];
    let ids = submit(&mut sm, vec![writer]);
    let job = ids[0];
    assign(&mut sm, vec![place(job, "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::JobStarted {
        at_ms: 25,
        job,
        attempt: 1,
        node: "n1".into(),
    })
    .expect("start");
    set_drain(&mut sm, "n1", true, Some(100));

    // Deterministic: whether it is due depends on the command's time only.
    assert_eq!(preempt(&mut sm, "n1", 99), vec![]);
    assert_eq!(preempt(&mut sm, "n1", 100), vec![(job, 1)]);
    // Marked once: a second check finds nothing left to stop.
    assert_eq!(preempt(&mut sm, "n1", 150), vec![]);
    // Until the attempt ends it keeps its reservation and its lock.
    assert_eq!(state(&sm, job), JobState::Running);
    assert_eq!(sm.locks()["model/x"].exclusive, Some(job));
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 10 * GIB);

    sm.apply(Command::JobExited {
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
        at_ms: 160,
        job,
        attempt: 1,
        node: "n1".into(),
        code: None,
        signal: Some(15),
        error: String::new(),
        cancelled: true,
    })
    .expect("exit");
    let record = sm.job(job).expect("job");
    assert_eq!(record.state, JobState::Pending);
    assert_eq!(record.failures(), 0, "max_attempts 1 and still retried");
    assert_eq!(record.not_before_ms, 0, "placed again at once");
    assert_eq!(
        record.attempts[0].outcome,
        Some(gantry_coordinator::domain::AttemptOutcome::Preempted)
    );
    assert!(sm.locks().get("model/x").is_none(), "lock released");
    assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
    let changes = sm.take_changes();
    assert!(
        changes
            .events
            .iter()
            .any(|e| e.message.starts_with("preempted: node n1 drained")),
        "{:?}",
        changes.events
    );

    // Never back onto the draining node; fine elsewhere, as attempt 2.
    let (applied, refused) = assign(&mut sm, vec![place(job, "n1", 0, 10 * GIB, false)]);
    assert!(applied.is_empty() && refused[0].1.contains("draining"));
    let (applied, _) = assign(&mut sm, vec![place(job, "n2", 0, 10 * GIB, false)]);
    assert_eq!(applied, vec![(job, 2)]);
    assert_eq!(sm.locks()["model/x"].exclusive, Some(job));

    // Undrained before the leader's check applies: nothing is preempted.
    let ids = submit(&mut sm, vec![spec("late")]);
    set_drain(&mut sm, "n2", true, Some(200));
    set_drain(&mut sm, "n2", false, None);
    assert_eq!(preempt(&mut sm, "n2", 300), vec![]);
    assert_eq!(sm.job(ids[0]).map(|j| j.state), Some(JobState::Pending));
}

#[test]
fn a_preempted_attempt_ends_once_however_it_ends() {
    // (how it ends, final state, lost attempts counted)
    enum End {
        Exit(Option<i32>, bool),
        UserCancelThenExit,
        Lost,
    }
    let cases = [
        (End::Exit(Some(0), false), JobState::Succeeded, 0),
        (End::Exit(None, true), JobState::Pending, 0),
        (End::Exit(Some(143), false), JobState::Pending, 0),
        (End::UserCancelThenExit, JobState::Cancelled, 0),
        // The agent went silent: the Lost handling applies, counted once.
        (End::Lost, JobState::Pending, 1),
    ];
    for (end, expect, lost) in cases {
        let mut sm = StateMachine::new();
        register(&mut sm, "n1", 1, 80 * GIB);
        let job = submit(&mut sm, vec![spec("a")])[0];
        assign(&mut sm, vec![place(job, "n1", 0, 10 * GIB, false)]);
        set_drain(&mut sm, "n1", true, Some(50));
        assert_eq!(preempt(&mut sm, "n1", 60), vec![(job, 1)]);
        let exit = |code: Option<i32>, cancelled: bool| Command::JobExited {
            oom: false,
            output_tail: String::new(),
            peak_gpu_memory: 0,
            at_ms: 70,
            job,
            attempt: 1,
            node: "n1".into(),
            code,
            signal: None,
            error: String::new(),
            cancelled,
        };
        match end {
            End::Exit(code, cancelled) => {
                sm.apply(exit(code, cancelled)).expect("exit");
            }
            End::UserCancelThenExit => {
                sm.apply(Command::RequestCancel { at_ms: 65, job })
                    .expect("cancel");
                sm.apply(exit(None, true)).expect("exit");
            }
            End::Lost => {
                sm.apply(Command::SetNodeDown {
                    at_ms: 70,
                    node: "n1".into(),
                    down: true,
                })
                .expect("down");
                // A late exit report of the same attempt changes nothing.
                sm.apply(exit(None, true)).expect("exit");
            }
        }
        let record = sm.job(job).expect("job");
        assert_eq!(record.state, expect);
        assert_eq!(record.failures(), 0);
        let counted = record
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(gantry_coordinator::domain::AttemptOutcome::Lost))
            .count();
        assert_eq!(counted, lost);
        assert_eq!(sm.gpu_usage("n1", 0).reserved, 0);
    }
}

#[test]
fn a_lost_attempt_is_not_revived_on_a_node_past_its_drain_deadline() {
    let mut sm = StateMachine::new();
    register(&mut sm, "n1", 1, 80 * GIB);
    let job = submit(&mut sm, vec![spec("a")])[0];
    assign(&mut sm, vec![place(job, "n1", 0, 10 * GIB, false)]);
    sm.apply(Command::AttemptLost {
        at_ms: 30,
        job,
        attempt: 1,
        reason: "silent".into(),
    })
    .expect("lost");
    set_drain(&mut sm, "n1", true, Some(50));
    let revive = Command::ReviveAttempt {
        at_ms: 60,
        job,
        attempt: 1,
        node: "n1".into(),
    };
    assert_eq!(sm.apply(revive), Ok(Outcome::Stale));
    assert_eq!(state(&sm, job), JobState::Pending);
}
