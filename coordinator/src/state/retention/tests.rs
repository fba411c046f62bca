//! Retention as data: scripts of commands at given times, and which jobs
//! are still in hard state (and which went to the change set's `retired`)
//! afterwards.

#![allow(clippy::unwrap_used)]

use gantry_scheduler::JobId;

use super::*;
use crate::command::Command;
use crate::domain::{JobSpec, RetryPolicy};
use crate::state::Outcome;

const GIB: u64 = 1 << 30;
const HOUR: u64 = 3600 * 1000;

/// One step of a script, at a time in ms.
#[derive(Clone, Copy)]
enum Step {
    /// Submit one job (max attempts 1) after the listed job names (same
    /// submission when `after` is not empty: use `SubmitGraph`).
    Submit(&'static str),
    /// Submit a job that may fail twice.
    SubmitRetrying(&'static str),
    /// Submit `child` after `parent` in one submission.
    SubmitGraph(&'static str, &'static str),
    /// Place and start the job.
    Start(&'static str),
    /// Its attempt exits with this code.
    Exit(&'static str, i32),
    /// A user cancels it.
    Cancel(&'static str),
    /// `dlq drop`.
    Drop(&'static str),
    /// Any command at this time (retirement runs after every command).
    Tick,
}

struct World {
    sm: StateMachine,
    names: Vec<(&'static str, JobId)>,
    retired: Vec<JobId>,
}

impl World {
    fn new(policy: RetentionPolicy) -> World {
        let mut sm = StateMachine::new();
        sm.apply(Command::SetRetention { at_ms: 0, policy })
            .unwrap();
        sm.apply(Command::register_for_test("n1", 8, 80 * GIB))
            .unwrap();
        World {
            sm,
            names: Vec::new(),
            retired: Vec::new(),
        }
    }

    fn id(&self, name: &str) -> JobId {
        self.names.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn submit(&mut self, at_ms: u64, specs: Vec<JobSpec>) {
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let outcome = self.apply(Command::Submit {
            at_ms,
            key: None,
            jobs: specs,
            pipeline: None,
            owner: None,
        });
        let Outcome::Submitted(ids) = outcome else {
            panic!("{outcome:?}")
        };
        for (name, id) in names.into_iter().zip(ids) {
            let name: &'static str = Box::leak(name.into_boxed_str());
            self.names.push((name, id));
        }
    }

    fn apply(&mut self, command: Command) -> Outcome {
        let outcome = self.sm.apply(command).unwrap();
        let changes = self.sm.take_changes();
        self.retired.extend(changes.retired.iter().map(|j| j.id));
        outcome
    }

    fn step(&mut self, at_ms: u64, step: Step) {
        match step {
            Step::Submit(name) => self.submit(at_ms, vec![JobSpec::for_test(name)]),
            Step::SubmitRetrying(name) => {
                let mut spec = JobSpec::for_test(name);
                spec.retry = RetryPolicy {
                    max_attempts: 3,
                    backoff_ms: 1000,
                };
                self.submit(at_ms, vec![spec]);
            }
            Step::SubmitGraph(parent, child) => {
                let mut second = JobSpec::for_test(child);
                second.after = vec![parent.into()];
                self.submit(at_ms, vec![JobSpec::for_test(parent), second]);
            }
            Step::Start(name) => {
                let job = self.id(name);
                let outcome = self.apply(Command::assign_for_test(at_ms, job, "n1"));
                let Outcome::Assigned { applied, refused } = outcome else {
                    panic!("{outcome:?}")
                };
                assert!(refused.is_empty(), "{refused:?}");
                let attempt = applied[0].1;
                self.apply(Command::JobStarted {
                    at_ms,
                    job,
                    attempt,
                    node: "n1".into(),
                });
            }
            Step::Exit(name, code) => {
                let job = self.id(name);
                let attempt = self.sm.job(job).unwrap().current_attempt().unwrap().attempt;
                self.apply(Command::exited_for_test(at_ms, job, attempt, "n1", code));
            }
            Step::Cancel(name) => {
                let job = self.id(name);
                self.apply(Command::RequestCancel { at_ms, job });
            }
            Step::Drop(name) => {
                let job = self.id(name);
                self.apply(Command::DlqDrop { at_ms, job });
            }
            Step::Tick => {
                let policy = *self.sm.retention();
                self.apply(Command::SetRetention { at_ms, policy });
            }
        }
    }

    fn in_state(&self, name: &str) -> bool {
        self.sm.job(self.id(name)).is_some()
    }
}

fn policy(retention_ms: u64, max_jobs: u64) -> RetentionPolicy {
    RetentionPolicy {
        job_retention_ms: retention_ms,
        max_retained_jobs: max_jobs,
        ..RetentionPolicy::default()
    }
}

/// A case: policy, the script, the jobs still in hard state at the end and
/// the jobs retired, in the order they were retired.
struct Case {
    name: &'static str,
    policy: RetentionPolicy,
    script: &'static [(u64, Step)],
    kept: &'static [&'static str],
    retired: &'static [&'static str],
}

fn check(case: &Case) {
    let mut world = World::new(case.policy);
    for (at, step) in case.script {
        world.step(*at, *step);
    }
    for name in case.kept {
        assert!(
            world.in_state(name),
            "{}: {name} should still be in hard state",
            case.name
        );
    }
    let retired: Vec<JobId> = case.retired.iter().map(|n| world.id(n)).collect();
    assert_eq!(world.retired, retired, "{}: retired jobs", case.name);
    for name in case.retired {
        assert!(!world.in_state(name), "{}: {name} retired", case.name);
    }
    assert_eq!(
        world.sm.retained_finished(),
        world.sm.jobs().filter(|j| retirable_state(j.state)).count() as u64,
        "{}: every finished job is indexed once",
        case.name
    );
}

use Step::*;

#[test]
fn retirement_table() {
    let cases = [
        Case {
            name: "succeeded: kept until its retention is over, to the millisecond",
            policy: policy(HOUR, 100),
            script: &[
                (1, Submit("a")),
                (2, Start("a")),
                (10, Exit("a", 0)),
                (10 + HOUR - 1, Tick),
            ],
            kept: &["a"],
            retired: &[],
        },
        Case {
            name: "succeeded: retired at finish + retention",
            policy: policy(HOUR, 100),
            script: &[
                (1, Submit("a")),
                (2, Start("a")),
                (10, Exit("a", 0)),
                (10 + HOUR, Tick),
            ],
            kept: &[],
            retired: &["a"],
        },
        Case {
            name: "cancelled while pending: retired",
            policy: policy(HOUR, 100),
            script: &[(1, Submit("a")), (5, Cancel("a")), (5 + HOUR, Tick)],
            kept: &[],
            retired: &["a"],
        },
        Case {
            name: "never retired: pending, running, failed in back-off, dead-lettered",
            policy: policy(HOUR, 1),
            script: &[
                (1, Submit("pending")),
                (1, Submit("running")),
                (1, SubmitRetrying("backoff")),
                (1, Submit("dlq")),
                (2, Start("running")),
                (2, Start("backoff")),
                (2, Start("dlq")),
                (3, Exit("backoff", 1)),
                (3, Exit("dlq", 1)),
                (100 * HOUR, Tick),
            ],
            kept: &["pending", "running", "backoff", "dlq"],
            retired: &[],
        },
        Case {
            name: "dropped from the dead-letter queue: retired",
            policy: policy(HOUR, 100),
            script: &[
                (1, Submit("a")),
                (2, Start("a")),
                (3, Exit("a", 1)),
                (4, Drop("a")),
                (4 + HOUR, Tick),
            ],
            kept: &[],
            retired: &["a"],
        },
        Case {
            name: "blocked dependant never retired, nor the cancelled job it depends on",
            policy: policy(HOUR, 1),
            script: &[
                (1, SubmitGraph("parent", "child")),
                (2, Cancel("parent")),
                (100 * HOUR, Tick),
            ],
            kept: &["parent", "child"],
            retired: &[],
        },
        Case {
            name: "a succeeded job a pending dependant waits on is held",
            policy: policy(HOUR, 1),
            script: &[
                (1, SubmitGraph("parent", "child")),
                (2, Start("parent")),
                (3, Exit("parent", 0)),
                (100 * HOUR, Tick),
            ],
            kept: &["parent", "child"],
            retired: &[],
        },
        Case {
            name: "held until the dependant finished, then both retired oldest first",
            policy: policy(HOUR, 100),
            script: &[
                (1, SubmitGraph("parent", "child")),
                (2, Start("parent")),
                (3, Exit("parent", 0)),
                (4, Start("child")),
                (5, Exit("child", 0)),
                (5 + HOUR, Tick),
            ],
            kept: &[],
            retired: &["parent", "child"],
        },
        Case {
            name: "held while the dependant runs, even past retention",
            policy: policy(HOUR, 100),
            script: &[
                (1, SubmitGraph("parent", "child")),
                (2, Start("parent")),
                (3, Exit("parent", 0)),
                (4, Start("child")),
                (3 + 2 * HOUR, Tick),
            ],
            kept: &["parent", "child"],
            retired: &[],
        },
        Case {
            name: "count cap: oldest finished first (by finish time, not id)",
            policy: policy(100 * HOUR, 2),
            script: &[
                (1, Submit("a")),
                (1, Submit("b")),
                (1, Submit("c")),
                (1, Submit("d")),
                (2, Start("a")),
                (2, Start("b")),
                (2, Start("c")),
                (2, Start("d")),
                (10, Exit("b", 0)),
                (20, Exit("c", 0)),
                (30, Exit("a", 0)),
                (40, Exit("d", 0)),
            ],
            kept: &["a", "d"],
            retired: &["b", "c"],
        },
        Case {
            name: "count cap counts held jobs but retires only free ones",
            policy: policy(100 * HOUR, 1),
            script: &[
                (1, SubmitGraph("parent", "child")),
                (1, Submit("free")),
                (2, Start("parent")),
                (2, Start("free")),
                (3, Exit("parent", 0)),
                (4, Exit("free", 0)),
            ],
            kept: &["parent", "child"],
            retired: &["free"],
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn due_is_a_pure_function_of_times_and_counts() {
    let p = policy(1000, 10);
    // (finished at, retained, now, due)
    let table = [
        (0, 1, 999, false),
        (0, 1, 1000, true),
        (5000, 10, 5500, false),
        (5000, 11, 5500, true),
        (u64::MAX, 1, u64::MAX - 1, false),
    ];
    for (finished, retained, now, expected) in table {
        assert_eq!(
            due(&p, finished, retained, now),
            expected,
            "finished {finished}, retained {retained}, now {now}"
        );
    }
}

#[test]
fn event_floor_table() {
    let p = policy(1000, 10); // at most 40 events
    // (floor, oldest job's submit event, next event index, new floor)
    let table = [
        (1, Some(1), 5, 1),        // nothing retired
        (1, Some(7), 9, 7),        // jobs before the oldest were retired
        (8, Some(7), 9, 8),        // never goes down
        (1, None, 9, 9),           // nothing left: everything below next
        (1, Some(0), 9, 1),        // an old record without its event: no rise
        (1, Some(2), 100, 60),     // count cap: at most 40 events
        (50, Some(200), 100, 100), // never past the next index
        (1, None, 50_000, 10_001), // at most MAX_FLOOR_STEP at a time
    ];
    for (floor, oldest, next, expected) in table {
        assert_eq!(
            event_floor(&p, floor, oldest, next),
            expected,
            "floor {floor}, oldest {oldest:?}, next {next}"
        );
    }
}

#[test]
fn floor_rises_when_the_oldest_job_is_retired() {
    let mut world = World::new(policy(HOUR, 100));
    world.step(1, Submit("a"));
    world.step(2, Submit("b"));
    world.step(3, Start("a"));
    world.step(4, Exit("a", 0));
    assert_eq!(world.sm.event_floor(), 1, "nothing retired yet");
    world.step(4 + HOUR, Tick);
    let b = world.sm.job(world.id("b")).unwrap();
    assert_eq!(world.sm.event_floor(), b.submit_event);
    assert!(b.submit_event > 1);
}

#[test]
fn policy_validation_names_the_flag() {
    let bad = [
        (policy(999, 1), "--job-retention"),
        (policy(1000, 0), "--max-retained-jobs"),
        (
            RetentionPolicy {
                history_retention_ms: 0,
                ..RetentionPolicy::default()
            },
            "--history-retention",
        ),
        (
            RetentionPolicy {
                history_max_bytes: 1000,
                ..RetentionPolicy::default()
            },
            "--history-max-bytes",
        ),
    ];
    for (policy, flag) in bad {
        let error = policy.validate().unwrap_err();
        assert!(error.starts_with(flag), "{error}");
    }
    assert!(RetentionPolicy::default().validate().is_ok());
}

#[test]
fn every_replica_retires_the_same_jobs() {
    // Two state machines, same commands: the same jobs retire in the same
    // order (nothing in apply reads a clock).
    let script: &[(u64, Step)] = &[
        (1, Submit("a")),
        (1, Submit("b")),
        (1, Submit("c")),
        (2, Start("a")),
        (2, Start("b")),
        (3, Exit("b", 0)),
        (4, Exit("a", 0)),
        (5, Cancel("c")),
        (3 + HOUR, Tick),
    ];
    let run = || {
        let mut world = World::new(policy(HOUR, 100));
        for (at, step) in script {
            world.step(*at, *step);
        }
        let jobs: Vec<_> = world.sm.jobs().cloned().collect();
        (world.retired, jobs, world.sm.event_floor())
    };
    let first = run();
    assert_eq!(first, run());
    assert_eq!(first.0, vec![2], "only b is due at 3 + 1h");
}

#[test]
fn an_idle_cluster_learns_that_retirement_is_due() {
    let mut world = World::new(policy(HOUR, 100));
    world.step(1, Submit("a"));
    world.step(2, Start("a"));
    world.step(3, Exit("a", 0));
    assert!(!world.sm.retirement_due(2 + HOUR));
    assert!(world.sm.retirement_due(3 + HOUR));
    world.apply(Command::Retire { at_ms: 3 + HOUR });
    assert!(!world.in_state("a"));
    assert!(!world.sm.retirement_due(3 + HOUR));
}
