//! The breaker's rules as tables, and a harness that drives a real state
//! machine with the scenarios of issue 10 (finding 6).

use super::*;
use crate::domain::{JobSpec, JobState, RetryPolicy};
use crate::state::Outcome;
use gantry_scheduler::Placement;

const GIB: u64 = 1 << 30;
const T0: u64 = 1_000_000;

/// How an attempt ended, in the scripts below.
#[derive(Debug, Clone, Copy)]
enum End {
    Ok,
    Exit(i32),
    Signal(i32),
    Oom,
    OverMemory,
    Spawn(&'static str),
    Lost,
    AgentShutdown,
    Preempted,
    Cancelled,
}

fn attempt(number: u32, node: &str, at_ms: u64, end: End) -> AttemptRecord {
    let mut a = AttemptRecord {
        attempt: number,
        node: node.into(),
        gpus: vec![0],
        gpu_memory: 10 * GIB,
        batch_size: 0,
        exclusive_gpu: false,
        assigned_at_ms: at_ms.saturating_sub(10),
        started_at_ms: at_ms.saturating_sub(5),
        ended_at_ms: at_ms,
        exit_code: None,
        signal: None,
        error: String::new(),
        outcome: Some(AttemptOutcome::Failed),
        output_tail: String::new(),
        oom: false,
        forgiven: false,
        peak_gpu_memory: 0,
        preempted: String::new(),
    };
    match end {
        End::Ok => {
            a.exit_code = Some(0);
            a.outcome = Some(AttemptOutcome::Succeeded);
        }
        End::Exit(code) => a.exit_code = Some(code),
        End::Signal(signal) => a.signal = Some(signal),
        End::Oom => {
            a.exit_code = Some(1);
            a.oom = true;
        }
        End::OverMemory => {
            a.signal = Some(9);
            a.error = OVER_MEMORY_ERROR.into();
        }
        End::Spawn(error) => a.error = format!("{SPAWN_FAILED}{error}"),
        End::Lost => {
            a.outcome = Some(AttemptOutcome::Lost);
            a.error = format!("lost: node {node} is down");
        }
        End::AgentShutdown => {
            a.outcome = Some(AttemptOutcome::Lost);
            a.error = format!("lost: the agent on {node} shut down");
        }
        End::Preempted => {
            a.outcome = Some(AttemptOutcome::Preempted);
            a.signal = Some(15);
            a.preempted = format!("preempted: node {node} drained");
        }
        End::Cancelled => {
            a.outcome = Some(AttemptOutcome::Cancelled);
            a.signal = Some(15);
        }
    }
    a
}

/// A script line: (time after T0 in seconds, job, node, how it ended).
type Line = (u64, JobId, &'static str, End);

fn jobs_of(script: &[Line]) -> BTreeMap<JobId, JobRecord> {
    let mut jobs: BTreeMap<JobId, JobRecord> = BTreeMap::new();
    for &(secs, id, node, end) in script {
        let record = jobs.entry(id).or_insert_with(|| JobRecord {
            state: JobState::Failed,
            ..JobRecord::for_test(id, JobSpec::for_test("j"))
        });
        let number = record.attempts.len() as u32 + 1;
        record
            .attempts
            .push(attempt(number, node, T0 + secs * 1000, end));
    }
    jobs
}

/// Points against `node` at `now_secs` after T0, with evidence before
/// `since_secs` already accounted for.
fn points(script: &[Line], node: &str, since_secs: u64, now_secs: u64) -> u32 {
    let jobs = jobs_of(script);
    let mut strikes = Vec::new();
    let mut last_success = 0;
    for record in jobs.values() {
        for a in record.attempts.iter().filter(|a| a.node == node) {
            match a.outcome {
                Some(AttemptOutcome::Succeeded) => last_success = last_success.max(a.ended_at_ms),
                Some(AttemptOutcome::Failed | AttemptOutcome::Lost) => strikes.push(Strike {
                    at_ms: a.ended_at_ms,
                    job: record.id,
                    attempt: a.attempt,
                }),
                _ => {}
            }
        }
    }
    blame(
        &strikes,
        |id| jobs.get(&id),
        last_success,
        T0 + since_secs * 1000,
        T0 + now_secs * 1000,
        WINDOW_MS,
    )
    .points
}

#[test]
fn blame_counts_only_evidence_against_the_node() {
    use End::*;
    // (what, script, points against "a" at 100 s, nothing accounted yet)
    let cases: &[(&str, &[Line], u32)] = &[
        ("nothing happened", &[], 0),
        (
            "one job failing the same way on every node is the job's fault",
            &[
                (1, 1, "a", Exit(1)),
                (2, 1, "b", Exit(1)),
                (3, 1, "c", Exit(1)),
                (4, 1, "d", Exit(1)),
                (5, 1, "a", Exit(1)),
                (6, 1, "b", Exit(1)),
            ],
            0,
        ),
        (
            "one job failing three times here counts once (distinct jobs)",
            &[
                (1, 1, "a", Exit(1)),
                (2, 1, "a", Exit(1)),
                (3, 1, "a", Exit(1)),
            ],
            1,
        ),
        (
            "three distinct jobs failing here, not tried elsewhere",
            &[
                (1, 1, "a", Exit(1)),
                (2, 2, "a", Exit(2)),
                (3, 3, "a", Signal(11)),
            ],
            3,
        ),
        (
            "a success here forgives plain failures before it",
            &[
                (1, 1, "a", Exit(1)),
                (2, 2, "a", Exit(2)),
                (3, 3, "a", Exit(3)),
                (4, 4, "a", Ok),
            ],
            0,
        ),
        (
            "a plain failure after the success still counts",
            &[(1, 1, "a", Exit(1)), (2, 4, "a", Ok), (3, 2, "a", Exit(1))],
            1,
        ),
        (
            "failed here and succeeded elsewhere is not forgiven by a success here",
            &[
                (1, 1, "a", Exit(1)),
                (2, 1, "b", Ok),
                (3, 2, "a", Exit(1)),
                (4, 2, "c", Ok),
                (5, 3, "a", Signal(9)),
                (6, 3, "d", Ok),
                (7, 4, "a", Ok),
            ],
            3,
        ),
        (
            "out of memory and GPU memory over-use are the job's sizing",
            &[(1, 1, "a", Oom), (2, 2, "a", OverMemory), (3, 3, "a", Oom)],
            0,
        ),
        (
            "failing the same way on two nodes and succeeding on a third: a flaky job's",
            &[(1, 1, "a", Exit(1)), (2, 1, "b", Exit(1)), (3, 1, "c", Ok)],
            0,
        ),
        (
            "an OOM elsewhere does not make a plain failure here the job's fault",
            &[(1, 1, "a", Exit(1)), (2, 1, "b", Oom)],
            1,
        ),
        (
            "failing differently elsewhere is not the same way",
            &[(1, 1, "a", Signal(11)), (2, 1, "b", Exit(1))],
            1,
        ),
        (
            "an agent that cannot start jobs: a point per job",
            &[
                (1, 1, "a", Spawn("permission denied")),
                (2, 2, "a", Spawn("permission denied")),
                (3, 2, "a", Spawn("permission denied")),
            ],
            2,
        ),
        (
            "a spawn error every node gives is the job's (a missing binary)",
            &[
                (1, 1, "a", Spawn("no such file")),
                (2, 1, "b", Spawn("no such file")),
            ],
            0,
        ),
        (
            "attempts lost together are one event",
            &[(1, 1, "a", Lost), (1, 2, "a", Lost), (2, 3, "a", Lost)],
            1,
        ),
        (
            "lost attempts apart are separate events",
            &[(1, 1, "a", Lost), (20, 2, "a", Lost), (40, 3, "a", Lost)],
            3,
        ),
        (
            "an agent shut down on purpose, a drain and a cancel are not evidence",
            &[
                (1, 1, "a", AgentShutdown),
                (2, 2, "a", Preempted),
                (3, 3, "a", Cancelled),
            ],
            0,
        ),
        (
            "evidence of every kind adds up",
            &[
                (1, 1, "a", Exit(1)),
                (2, 1, "b", Ok),
                (3, 2, "a", Spawn("gpu lost")),
                (4, 3, "a", Lost),
            ],
            3,
        ),
        (
            "evidence on other nodes is theirs",
            &[
                (1, 1, "b", Exit(1)),
                (2, 2, "c", Exit(1)),
                (3, 3, "d", Lost),
            ],
            0,
        ),
    ];
    for (what, script, want) in cases {
        assert_eq!(points(script, "a", 0, 100), *want, "{what}");
    }
}

#[test]
fn old_and_accounted_evidence_is_ignored() {
    use End::*;
    let script: &[Line] = &[
        (1, 1, "a", Exit(1)),
        (2, 2, "a", Exit(1)),
        (60, 3, "a", Exit(1)),
    ];
    // (evidence accounted before, now) -> points
    let window = WINDOW_MS / 1000;
    let cases: &[(u64, u64, u32)] = &[
        (0, 100, 3),
        (0, window, 3),
        (0, window + 1, 2),
        (0, window + 2, 1),
        (0, window + 60, 0),
        (2, 100, 2),
        (3, 100, 1),
        (61, 100, 0),
    ];
    for &(since, now, want) in cases {
        assert_eq!(
            points(script, "a", since, now),
            want,
            "since {since}s, now {now}s"
        );
    }
}

/// A fleet from letters: r ready, q quarantined, e quarantine over,
/// d draining, x down. The node asked about is the first.
fn admit_in(fleet: &str) -> Result<(), Refusal> {
    let names: Vec<String> = (0..fleet.len()).map(|i| format!("n{i}")).collect();
    let nodes = fleet.chars().zip(&names).map(|(c, name)| FleetNode {
        name,
        down: c == 'x',
        draining: c == 'd',
        quarantined_until_ms: match c {
            'q' => 2_000,
            'e' => 1_000,
            _ => 0,
        },
    });
    admit(nodes, "n0", 1_000, MAX_SHARE_PERCENT as u32)
}

#[test]
fn at_most_a_share_of_the_fleet_and_never_the_last_node() {
    use Refusal::*;
    let ten = format!("r{}", "r".repeat(9));
    let ten_one_out = format!("r{}q", "r".repeat(8));
    let twenty_one_out = format!("r{}q", "r".repeat(18));
    let twenty_two_out = format!("r{}qq", "r".repeat(17));
    let half_down = format!("r{}{}q", "x".repeat(10), "r".repeat(8));
    let cases: &[(&str, Result<(), Refusal>)] = &[
        ("r", Err(LastNode)),
        ("rx", Err(LastNode)),
        ("rd", Err(LastNode)),
        ("rq", Err(LastNode)),
        ("rr", Ok(())),
        ("re", Ok(())),
        ("rrrr", Ok(())),
        (
            "rqrr",
            Err(Share {
                quarantined: 1,
                max: 1,
            }),
        ),
        ("reerr", Ok(())),
        (&ten, Ok(())),
        (
            &ten_one_out,
            Err(Share {
                quarantined: 1,
                max: 1,
            }),
        ),
        (&twenty_one_out, Ok(())),
        (
            &twenty_two_out,
            Err(Share {
                quarantined: 2,
                max: 2,
            }),
        ),
        (
            &half_down,
            Err(Share {
                quarantined: 1,
                max: 1,
            }),
        ),
    ];
    for (fleet, want) in cases {
        assert_eq!(admit_in(fleet), *want, "fleet {fleet}");
    }
    // (nodes not down) -> most quarantined at once
    for (up, max) in [
        (0, 0),
        (1, 0),
        (2, 1),
        (9, 1),
        (10, 1),
        (19, 1),
        (20, 2),
        (105, 10),
    ] {
        assert_eq!(
            max_quarantined(up, MAX_SHARE_PERCENT as u32),
            max,
            "{up} nodes"
        );
    }
}

#[test]
fn repeated_trips_double_up_to_eight_times() {
    let q = |until_ms: u64, trips: u32| Quarantine {
        since_ms: 0,
        until_ms,
        failures: 3,
        reason: String::new(),
        trips,
    };
    // (previous quarantine, at) -> trips
    let cases: &[(Option<Quarantine>, u64, u32)] = &[
        (None, 5, 1),
        (Some(q(1_000, 1)), 1_000 + WINDOW_MS - 1, 2),
        (Some(q(1_000, 1)), 1_000 + WINDOW_MS, 1),
        (Some(q(1_000, 3)), 2_000, 4),
        (Some(q(1_000, 0)), 2_000, 1),
    ];
    for (previous, at, want) in cases {
        assert_eq!(
            next_trips(previous.as_ref(), *at, WINDOW_MS),
            *want,
            "{previous:?} at {at}"
        );
    }
    let policy = BreakerPolicy::default();
    let lengths: Vec<u64> = (1..=6)
        .map(|t| cool_down_ms(t, &policy) / COOL_DOWN_MS)
        .collect();
    assert_eq!(lengths, [1, 2, 4, 8, 8, 8]);
    let policy = BreakerPolicy {
        cool_down_ms: 1_000,
        max_doublings: 1,
        ..policy
    };
    let lengths: Vec<u64> = (1..=4).map(|t| cool_down_ms(t, &policy)).collect();
    assert_eq!(lengths, [1_000, 2_000, 2_000, 2_000]);
}

#[test]
fn reasons_are_bounded_on_a_character_boundary() {
    let mut text = "é".repeat(400);
    truncate(&mut text, 511);
    assert_eq!(text.len(), 510);
    let blame = Blame {
        points: 500,
        jobs: (0..500)
            .map(|j| (j, Evidence::SucceededElsewhere))
            .collect(),
        lost_bursts: 0,
    };
    assert!(blame.reason().len() <= MAX_REASON_BYTES);
    assert!(
        blame
            .reason()
            .starts_with("job 0 failed here, succeeded on another node; job 1")
    );
}

/// Drives a real state machine and the breaker as the leader does: every
/// applied command's jobs go to [`Breaker::observe`], and what it proposes is
/// recorded and applied.
struct Harness {
    sm: StateMachine,
    breaker: Breaker,
    now: u64,
    proposed: Vec<Command>,
    refused: Vec<ApplyError>,
}

use crate::state::ApplyError;

impl Harness {
    fn new(nodes: &[&str]) -> Harness {
        let mut h = Harness {
            sm: StateMachine::new(),
            breaker: Breaker::default(),
            now: T0,
            proposed: Vec::new(),
            refused: Vec::new(),
        };
        for &name in nodes {
            h.apply(Command::register_for_test(name, 1, 80 * GIB))
                .expect("register");
        }
        h
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, ApplyError> {
        let result = self.sm.apply(command);
        let changes = self.sm.take_changes();
        for proposal in self.breaker.observe(&changes.jobs, &self.sm, self.now) {
            self.proposed.push(proposal.clone());
            if let Err(error) = self.apply(proposal) {
                self.refused.push(error);
            }
        }
        result
    }

    fn submit(&mut self, name: &str, max_attempts: u32) -> JobId {
        let mut spec = JobSpec::for_test(name);
        spec.retry = RetryPolicy {
            max_attempts,
            backoff_ms: 1_000,
        };
        match self.apply(Command::Submit {
            at_ms: self.now,
            key: None,
            jobs: vec![spec],
            pipeline: None,
            owner: None,
        }) {
            Ok(Outcome::Submitted(ids)) => ids[0],
            other => panic!("submit: {other:?}"),
        }
    }

    /// Places the job's next attempt on `node` and ends it as `end` 1 s
    /// later.
    fn run(&mut self, job: JobId, node: &str, end: End) {
        self.now += 1_000;
        if self.sm.job(job).map(|j| j.state) == Some(JobState::Failed) {
            self.apply(Command::Requeue {
                at_ms: self.now,
                job,
            })
            .expect("requeue");
        }
        let placed = self
            .apply(Command::Assign {
                at_ms: self.now,
                placements: vec![Placement {
                    job,
                    node: node.into(),
                    gpus: vec![0],
                    gpu_memory: 10 * GIB,
                    batch_size: None,
                    exclusive_gpu: false,
                }],
                term: 1,
            })
            .expect("assign");
        let attempt = match placed {
            Outcome::Assigned { applied, refused } if refused.is_empty() => applied[0].1,
            other => panic!("job {job} on {node}: {other:?}"),
        };
        self.apply(Command::JobStarted {
            at_ms: self.now,
            job,
            attempt,
            node: node.into(),
        })
        .expect("start");
        self.now += 1_000;
        let (code, oom) = match end {
            End::Ok => (Some(0), false),
            End::Exit(code) => (Some(code), false),
            End::Oom => (Some(1), true),
            other => panic!("the harness runs exits only, not {other:?}"),
        };
        self.apply(Command::JobExited {
            at_ms: self.now,
            job,
            attempt,
            node: node.into(),
            code,
            signal: None,
            error: String::new(),
            cancelled: false,
            oom,
            output_tail: String::new(),
            peak_gpu_memory: 0,
        })
        .expect("exit");
    }

    fn quarantined(&self) -> Vec<String> {
        self.sm
            .nodes()
            .filter(|n| self.sm.quarantined(&n.name, self.now).is_some())
            .map(|n| n.name.clone())
            .collect()
    }
}

/// Issue 10, finding 6: one `sh -c 'exit 1'` job with 12 attempts on 4
/// nodes quarantined all 4. It must quarantine none, whatever the order.
#[test]
fn one_buggy_job_on_four_nodes_quarantines_nothing() {
    let nodes = ["a", "b", "c", "d"];
    let orders: [&[usize]; 2] = [
        &[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
        &[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
    ];
    for order in orders {
        let mut h = Harness::new(&nodes);
        let job = h.submit("buggy", 12);
        for &n in order {
            h.run(job, nodes[n], End::Exit(1));
        }
        assert_eq!(h.sm.job(job).map(|j| j.state), Some(JobState::DeadLettered));
        assert!(h.proposed.is_empty(), "{order:?}: {:?}", h.proposed);
        assert!(
            nodes
                .iter()
                .all(|n| h.breaker.recent_failures(n, h.now) == 0),
            "the job's fault ranks no node lower"
        );
    }
}

/// Issue 10, finding 6 on `gantry dev`: a pipeline stage failing twice and
/// an out-of-memory attempt must not quarantine the only node; nor does
/// anything else, since it is the last node taking work.
#[test]
fn the_only_node_of_gantry_dev_is_never_quarantined() {
    let mut h = Harness::new(&["dev"]);
    let stage = h.submit("stage", 3);
    let train = h.submit("train", 3);
    h.run(stage, "dev", End::Exit(1));
    h.run(stage, "dev", End::Exit(1));
    h.run(train, "dev", End::Oom);
    assert!(h.proposed.is_empty(), "{:?}", h.proposed);
    assert_eq!(h.breaker.recent_failures("dev", h.now), 1);
    // Even real evidence against it leaves the only node in service.
    for name in ["x", "y", "z"] {
        let job = h.submit(name, 1);
        h.run(job, "dev", End::Exit(7));
    }
    assert_eq!(h.breaker.recent_failures("dev", h.now), 4);
    assert!(h.proposed.is_empty(), "{:?}", h.proposed);
    assert!(h.quarantined().is_empty());
}

#[test]
fn a_node_failing_jobs_that_succeed_elsewhere_is_quarantined_within_the_share() {
    let mut h = Harness::new(&["a", "b", "c", "d"]);
    for name in ["j1", "j2", "j3"] {
        let job = h.submit(name, 2);
        h.run(job, "a", End::Exit(1));
        h.run(job, "b", End::Ok);
    }
    assert_eq!(h.quarantined(), ["a"]);
    let tripped_at = h.now;
    match h.proposed.as_slice() {
        [
            Command::Quarantine {
                at_ms,
                node,
                until_ms,
                failures: 3,
                reason,
                ..
            },
        ] => {
            assert_eq!((node.as_str(), *until_ms), ("a", at_ms + COOL_DOWN_MS));
            assert!(
                reason.contains("failed here, succeeded on another node"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A second node with as much evidence stays in service: 1 of 4 is the share.
    for name in ["k1", "k2", "k3"] {
        let job = h.submit(name, 2);
        h.run(job, "c", End::Exit(1));
        h.run(job, "d", End::Ok);
    }
    assert_eq!(h.quarantined(), ["a"]);
    assert_eq!(h.proposed.len(), 1, "{:?}", h.proposed);
    // The operator clears a (gantry undrain): c's next failure trips c.
    h.apply(Command::ClearQuarantine {
        at_ms: h.now,
        node: "a".into(),
    })
    .expect("clear");
    let job = h.submit("k4", 2);
    h.run(job, "c", End::Exit(1));
    assert_eq!(h.quarantined(), ["c"]);
    // a's evidence was forgiven with the clearing: one more failure is 1 point.
    let job = h.submit("j4", 2);
    h.run(job, "a", End::Exit(1));
    h.run(job, "b", End::Ok);
    assert_eq!(h.breaker.recent_failures("a", h.now), 1);
    assert_eq!(h.proposed.len(), 2, "{:?}", h.proposed);
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    assert!(tripped_at > T0);
}

#[test]
fn a_node_held_by_the_share_goes_once_the_share_frees() {
    let mut h = Harness::new(&["a", "b", "c", "d"]);
    for (name, broken, healthy) in [
        ("j1", "a", "b"),
        ("j2", "a", "b"),
        ("j3", "a", "b"),
        ("k1", "c", "d"),
        ("k2", "c", "d"),
        ("k3", "c", "d"),
    ] {
        let job = h.submit(name, 2);
        h.run(job, broken, End::Exit(1));
        h.run(job, healthy, End::Ok);
    }
    assert_eq!(h.quarantined(), ["a"]);
    let until = match h.proposed.as_slice() {
        [Command::Quarantine { until_ms, .. }] => *until_ms,
        other => panic!("{other:?}"),
    };
    assert!(
        h.breaker.recheck_held(&h.sm, h.now).is_empty(),
        "a is still out"
    );
    // Evidence ages: c's is 10 minutes old at most when a's 5 minutes end.
    match h.breaker.recheck_held(&h.sm, until).as_slice() {
        [
            Command::Quarantine {
                node, failures: 3, ..
            },
        ] => assert_eq!(node, "c"),
        other => panic!("{other:?}"),
    }
    assert!(
        h.breaker.recheck_held(&h.sm, until + 10_000).is_empty(),
        "proposed once, not again while in flight or once no longer held"
    );
}

#[test]
fn a_quarantine_over_needs_new_evidence_and_a_quick_retrip_doubles() {
    let mut h = Harness::new(&["a", "b", "c"]);
    let fail_here_succeed_there = |h: &mut Harness, name: &str| {
        let job = h.submit(name, 2);
        h.run(job, "a", End::Exit(1));
        h.run(job, "b", End::Ok);
    };
    for name in ["j1", "j2", "j3"] {
        fail_here_succeed_there(&mut h, name);
    }
    let first_until = match h.proposed.last() {
        Some(Command::Quarantine { until_ms, .. }) => *until_ms,
        other => panic!("{other:?}"),
    };
    // Over: the old evidence is accounted for, one new failure is not enough.
    h.now = first_until;
    fail_here_succeed_there(&mut h, "j4");
    assert!(h.quarantined().is_empty());
    assert_eq!(h.proposed.len(), 1);
    for name in ["j5", "j6"] {
        fail_here_succeed_there(&mut h, name);
    }
    match h.proposed.as_slice() {
        [
            _,
            Command::Quarantine {
                at_ms, until_ms, ..
            },
        ] => {
            assert_eq!(*until_ms, at_ms + 2 * COOL_DOWN_MS, "second trip in a row");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.sm.node("a")
            .and_then(|n| n.quarantine.as_ref())
            .map(|q| q.trips),
        Some(2)
    );
}

#[test]
fn apply_rechecks_the_share_and_the_times() {
    let mut h = Harness::new(&["a", "b", "c", "d"]);
    let quarantine = |node: &str, at_ms: u64, until_ms: u64| Command::Quarantine {
        at_ms,
        node: node.into(),
        until_ms,
        failures: 3,
        reason: "test".into(),
        policy: BreakerPolicy::default(),
    };
    assert_eq!(h.apply(quarantine("a", 10, 100)), Ok(Outcome::Done));
    // Proposed together by a leader that had not seen the first applied.
    assert!(matches!(
        h.apply(quarantine("b", 11, 100)),
        Err(ApplyError::QuarantineRefused { ref reason, .. })
            if reason.contains("1 nodes are quarantined already, at most 1")
    ));
    // Once a's is over, b may go.
    assert_eq!(h.apply(quarantine("b", 100, 200)), Ok(Outcome::Done));
    assert!(matches!(
        h.apply(quarantine("c", 300, 300)),
        Err(ApplyError::QuarantineRefused { ref reason, .. }) if reason.contains("not after")
    ));
    assert_eq!(
        h.apply(quarantine("ghost", 300, 400)),
        Err(ApplyError::NodeNotFound("ghost".into()))
    );
    assert_eq!(
        h.apply(Command::ClearQuarantine {
            at_ms: 1,
            node: "ghost".into()
        }),
        Err(ApplyError::NodeNotFound("ghost".into()))
    );
}

#[test]
fn a_configured_policy_decides_the_trip_and_apply_rechecks_with_it() {
    let policy = BreakerPolicy {
        trip_points: 4,
        cool_down_ms: 60_000,
        max_share_percent: 50,
        ..BreakerPolicy::default()
    };
    let mut h = Harness::new(&["a", "b", "c", "d"]);
    h.breaker = Breaker::new(policy);
    for (n, name) in ["j1", "j2", "j3", "j4"].into_iter().enumerate() {
        assert_eq!(h.quarantined().len(), 0, "{n} points trip nothing");
        let job = h.submit(name, 2);
        h.run(job, "a", End::Exit(1));
        h.run(job, "b", End::Ok);
    }
    assert_eq!(h.quarantined(), ["a"], "4 points trip it");
    match h.proposed.as_slice() {
        [
            Command::Quarantine {
                at_ms,
                until_ms,
                policy: carried,
                ..
            },
        ] => {
            assert_eq!(*until_ms, at_ms + 60_000);
            assert_eq!(*carried, policy);
        }
        other => panic!("{other:?}"),
    }
    // Half of four nodes may be out under this policy: c goes too, which
    // the default share (one of four) would refuse in apply.
    for name in ["k1", "k2", "k3", "k4"] {
        let job = h.submit(name, 2);
        h.run(job, "c", End::Exit(1));
        h.run(job, "d", End::Ok);
    }
    assert_eq!(h.quarantined(), ["a", "c"]);
    assert!(h.refused.is_empty(), "{:?}", h.refused);
    let mut strict = h.proposed[1].clone();
    if let Command::Quarantine { node, policy, .. } = &mut strict {
        *node = "d".into();
        *policy = BreakerPolicy::default();
    }
    assert!(matches!(
        h.apply(strict),
        Err(ApplyError::QuarantineRefused { ref reason, .. }) if reason.contains("at most 1")
    ));
}
