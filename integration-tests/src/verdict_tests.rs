//! The checker as data: each case is a ledger and a stored state, and the
//! violations it must (or must not) find.

use super::*;
use gantry_coordinator::domain::{AttemptOutcome, AttemptRecord, JobSpec};

fn run(job: JobId, attempt: u32, pid: i32, started: u64, end: End) -> Execution {
    let (ended, dead_by_ms, alive_at_end) = match end {
        End::Exit(at, rc) => (Some((at, rc)), None, false),
        End::Killed(at) => (None, Some(at), false),
        End::Alive => (None, None, true),
    };
    Execution {
        job,
        attempt,
        pid,
        ticks: 1,
        node: "n1".into(),
        started_ms: started,
        ended,
        dead_by_ms,
        alive_at_end,
    }
}

#[derive(Clone, Copy)]
enum End {
    Exit(u64, i32),
    Killed(u64),
    Alive,
}

/// A job with one attempt on `n1` (shared with the nemesis's tests).
pub(crate) fn record(id: JobId, state: JobState, attempt: u32) -> JobRecord {
    let mut job = JobRecord::for_test(id, JobSpec::for_test(&format!("j{id}")));
    job.state = state;
    job.attempts = vec![AttemptRecord {
        attempt,
        node: "n1".into(),
        gpus: vec![0],
        gpu_memory: 1,
        batch_size: 0,
        exclusive_gpu: false,
        assigned_at_ms: 0,
        started_at_ms: 0,
        ended_at_ms: 0,
        exit_code: None,
        signal: None,
        error: String::new(),
        outcome: state.is_terminal().then_some(AttemptOutcome::Succeeded),
        output_tail: String::new(),
        oom: false,
        forgiven: false,
        peak_gpu_memory: 0,
        preempted: String::new(),
    }];
    job
}

fn stored(name: &str, jobs: &[JobRecord]) -> Stored {
    Stored {
        replica: name.into(),
        applied: 10,
        jobs: jobs.iter().map(|j| (j.id, j.clone())).collect(),
        down_nodes: ["dead".to_string()].into(),
        terminal_entries: jobs
            .iter()
            .map(|j| (j.id, u32::from(j.state.is_terminal())))
            .collect(),
        left_terminal: BTreeSet::new(),
    }
}

/// The names of the violations found.
fn found(runs: &[Execution], jobs: &[JobRecord], cancels: &[(JobId, u64)]) -> Vec<String> {
    found_with(
        runs,
        &[stored("r1", jobs), stored("r2", jobs)],
        cancels,
        &[],
    )
}

fn found_with(
    runs: &[Execution],
    stored: &[Stored],
    cancels: &[(JobId, u64)],
    dead: &[&str],
) -> Vec<String> {
    let acknowledged = stored[0].jobs.keys().map(|id| (*id, 0)).collect();
    let cancels = cancels.iter().copied().collect();
    let dead: Vec<String> = dead.iter().map(|d| d.to_string()).collect();
    let verdict = check(&Ground {
        executions: runs,
        acknowledged: &acknowledged,
        cancels: &cancels,
        stored,
        dead_nodes: &dead,
        end_ms: 1_000,
    });
    verdict
        .violations
        .iter()
        .map(|v| {
            format!("{v:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// (name, ledger, stored jobs, acknowledged cancels, violations expected).
type Case = (
    &'static str,
    Vec<Execution>,
    Vec<JobRecord>,
    Vec<(JobId, u64)>,
    Vec<&'static str>,
);

#[test]
fn each_broken_promise_is_named() {
    use End::*;
    let done = record(1, JobState::Succeeded, 1);
    let cases: Vec<Case> = vec![
        (
            "one clean run",
            vec![run(1, 1, 10, 0, Exit(50, 0))],
            vec![done.clone()],
            vec![],
            vec![],
        ),
        (
            "a killed first attempt seen dead before the retry started",
            vec![run(1, 1, 10, 0, Killed(40)), run(1, 2, 11, 41, Exit(90, 0))],
            vec![record(1, JobState::Succeeded, 2)],
            vec![],
            vec![],
        ),
        (
            "an orphan still running when the retry started",
            vec![run(1, 1, 10, 0, Killed(60)), run(1, 2, 11, 41, Exit(90, 0))],
            vec![record(1, JobState::Succeeded, 2)],
            vec![],
            vec!["Overlap"],
        ),
        (
            "a process never seen to end overlaps anything later",
            vec![run(1, 1, 10, 0, Alive), run(1, 2, 11, 500, Exit(600, 0))],
            vec![record(1, JobState::Succeeded, 2)],
            vec![],
            vec!["Overlap", "Orphan"],
        ),
        (
            "the same attempt started twice, one after the other",
            vec![
                run(1, 1, 10, 0, Exit(10, 1)),
                run(1, 1, 11, 20, Exit(30, 0)),
            ],
            vec![done.clone()],
            vec![],
            vec!["AttemptStartedTwice"],
        ),
        (
            "completed twice (the orphan finished before the rerun)",
            vec![
                run(1, 1, 10, 0, Exit(10, 0)),
                run(1, 2, 11, 20, Exit(30, 0)),
            ],
            vec![record(1, JobState::Succeeded, 2)],
            vec![],
            vec!["CompletedTwice"],
        ),
        (
            "a start after the cancel was acknowledged",
            vec![run(1, 1, 10, 100, Exit(200, 0))],
            vec![record(1, JobState::Cancelled, 1)],
            vec![(1, 50)],
            vec!["StartedAfterCancel"],
        ),
        (
            "a start before the cancel is fine",
            vec![run(1, 1, 10, 10, Killed(60))],
            vec![record(1, JobState::Cancelled, 1)],
            vec![(1, 50)],
            vec![],
        ),
        (
            "running in storage, no process: a leaked reservation",
            vec![run(1, 1, 10, 0, Killed(40))],
            vec![record(1, JobState::Running, 1)],
            vec![],
            vec!["LeakedReservation"],
        ),
        (
            "running in storage and really running: not quiet",
            vec![run(1, 1, 10, 0, Alive)],
            vec![record(1, JobState::Running, 1)],
            vec![],
            vec!["NotTerminal"],
        ),
        (
            "stuck pending",
            vec![],
            vec![record(1, JobState::Pending, 1)],
            vec![],
            vec!["NotTerminal"],
        ),
        (
            "succeeded without a successful process",
            vec![run(1, 1, 10, 0, Exit(10, 1))],
            vec![done.clone()],
            vec![],
            vec!["SucceededWithoutRun"],
        ),
        (
            "a process of a job that ended",
            vec![run(1, 1, 10, 0, Exit(10, 0)), run(1, 2, 11, 20, Alive)],
            vec![done],
            vec![],
            vec!["Orphan"],
        ),
    ];
    for (name, runs, jobs, cancels, expected) in cases {
        assert_eq!(found(&runs, &jobs, &cancels), expected, "{name}");
    }
}

#[test]
fn replicas_must_agree_and_terminal_states_happen_once() {
    let ok = record(1, JobState::Succeeded, 1);
    let runs = vec![run(1, 1, 10, 0, End::Exit(50, 0))];
    let a = stored("r1", std::slice::from_ref(&ok));
    let mut b = stored("r2", &[record(1, JobState::Cancelled, 1)]);
    assert_eq!(
        found_with(&runs, &[a.clone(), b.clone()], &[], &[]),
        ["Disagree"]
    );
    b = stored("r2", std::slice::from_ref(&ok));
    b.terminal_entries.insert(1, 2);
    assert_eq!(
        found_with(&runs, &[a.clone(), b.clone()], &[], &[]),
        ["TerminalHistory"]
    );
    b = stored("r2", &[]);
    assert_eq!(found_with(&runs, &[a.clone(), b], &[], &[]), ["Missing"]);
    let mut c = stored("r2", &[ok]);
    c.applied = 9;
    assert_eq!(
        found_with(&runs, &[a.clone(), c], &[], &[]),
        ["NotConverged"]
    );
    // A dead agent's node must be Down everywhere.
    assert_eq!(
        found_with(&runs, std::slice::from_ref(&a), &[], &["dead"]),
        Vec::<String>::new()
    );
    assert_eq!(found_with(&runs, &[a], &[], &["alive"]), ["NodeNotDown"]);
}

#[test]
fn extra_work_counts_what_faults_added() {
    use End::*;
    let runs = vec![
        // Job 1 fails its first attempt by design, then succeeds: no extra.
        run(1, 1, 10, 0, Exit(10, 1)),
        run(1, 2, 11, 20, Exit(30, 0)),
        // Job 2: killed by a fault after 100 ms, rerun, and its orphan also
        // completed: two extra processes.
        run(2, 1, 20, 0, Killed(100)),
        run(2, 2, 21, 200, Exit(300, 0)),
        run(2, 2, 22, 250, Exit(400, 0)),
    ];
    let acknowledged = [(1, 1), (2, 0)].into();
    let verdict = check(&Ground {
        executions: &runs,
        acknowledged: &acknowledged,
        cancels: &BTreeMap::new(),
        stored: &[],
        dead_nodes: &[],
        end_ms: 1_000,
    });
    assert_eq!(
        verdict.extra,
        ExtraWork {
            started_more_than_once: 1,
            completed_more_than_once: 1,
            extra_executions: 2,
            extra_ms: 100 + 150,
        }
    );
    assert_eq!(verdict.double_runs(), 1, "{:?}", verdict.violations);
    // Messages name the job, attempts, pids and times.
    let text = verdict.violations[0].to_string();
    assert!(text.starts_with("job 2:"), "{text}");
    assert!(text.contains("pid 21") && text.contains("pid 22"), "{text}");
}
