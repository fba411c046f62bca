//! Continuous pipelines as data: scripts of commands (each at its own
//! time) against the state machine, and which runs exist afterwards, in
//! which states, and where the loop stands. Every script also runs on a
//! second replica that is restored from the first one's records halfway
//! (a failover), and both must end with the same jobs.

#![allow(clippy::unwrap_used)]

use gantry_scheduler::JobId;

use super::*;
use crate::command::Command;
use crate::domain::JobSpec;
use crate::state::{ApplyError, Outcome};

const GIB: u64 = 1 << 30;

/// One step of a script.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Submit pipeline `zero`: a chain of `stages` jobs, with `repeat`.
    Loop(usize, Repeat),
    /// Run every stage of run `run` to success, in order.
    Run(u32),
    /// Run stage `stage` of run `run`; it exits with `code` (a failure
    /// dead-letters it: one attempt).
    Stage(u32, usize, i32),
    /// `dlq retry` of a stage.
    Retry(u32, usize),
    /// `dlq drop` of a stage.
    Drop(u32, usize),
    /// `gantry pipeline stop zero`.
    Stop,
    /// A duplicate exit report of a stage's current attempt (an agent
    /// re-sending after a failover): changes nothing.
    DuplicateExit(u32, usize),
}

/// What must hold after the script.
#[derive(Debug)]
enum Want {
    /// The latest run of `zero`.
    Latest(u32),
    /// The stage states of one run.
    States(u32, Vec<JobState>),
    /// The loop's status.
    Status(LoopStatus),
}

struct World {
    sm: StateMachine,
    at_ms: u64,
}

impl World {
    fn new() -> World {
        let mut sm = StateMachine::new();
        sm.apply(Command::register_for_test("n1", 8, 80 * GIB))
            .unwrap();
        World { sm, at_ms: 10 }
    }

    fn apply(&mut self, command: Command) -> Result<Outcome, ApplyError> {
        let outcome = self.sm.apply(command);
        self.sm.take_changes();
        outcome
    }

    /// The id of stage `stage` of run `run` (the run's jobs are consecutive).
    fn stage(&self, run: u32, stage: usize) -> JobId {
        let (_, jobs) = self.sm.pipeline_jobs("zero", run);
        jobs.iter().map(|j| j.id).min().unwrap() + stage as u64
    }

    fn run_stage(&mut self, job: JobId, code: i32) {
        self.at_ms += 100;
        let at_ms = self.at_ms;
        let outcome = self
            .apply(Command::assign_for_test(at_ms, job, "n1"))
            .unwrap();
        let Outcome::Assigned { applied, refused } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(refused.is_empty(), "job {job}: {refused:?}");
        let attempt = applied[0].1;
        let node = "n1".to_string();
        self.apply(Command::JobStarted {
            at_ms,
            job,
            attempt,
            node: node.clone(),
        })
        .unwrap();
        self.apply(exit(at_ms + 50, job, attempt, code)).unwrap();
    }

    fn step(&mut self, step: Step) {
        self.at_ms += 10;
        let at_ms = self.at_ms;
        match step {
            Step::Loop(stages, repeat) => {
                let jobs = (0..stages)
                    .map(|i| JobSpec {
                        after: if i == 0 {
                            Vec::new()
                        } else {
                            vec![format!("s{}", i - 1)]
                        },
                        ..JobSpec::for_test(&format!("s{i}"))
                    })
                    .collect();
                self.apply(Command::SubmitLoop {
                    at_ms,
                    key: None,
                    jobs,
                    pipeline: "zero".into(),
                    owner: Some("ana".into()),
                    run_policy: RunPolicy {
                        repeat,
                        run_dir: "/data/runs/{run}".into(),
                        ..RunPolicy::default()
                    },
                })
                .unwrap();
            }
            Step::Run(run) => {
                let stages = self.sm.pipeline_jobs("zero", run).1.len();
                for stage in 0..stages {
                    self.run_stage(self.stage(run, stage), 0);
                }
            }
            Step::Stage(run, stage, code) => self.run_stage(self.stage(run, stage), code),
            Step::Retry(run, stage) => {
                let job = self.stage(run, stage);
                self.apply(Command::DlqRetry {
                    at_ms,
                    job,
                    spec: None,
                })
                .unwrap();
            }
            Step::Drop(run, stage) => {
                let job = self.stage(run, stage);
                self.apply(Command::DlqDrop { at_ms, job }).unwrap();
            }
            Step::Stop => {
                self.apply(Command::StopPipeline {
                    at_ms,
                    name: "zero".into(),
                })
                .unwrap();
            }
            Step::DuplicateExit(run, stage) => {
                let job = self.stage(run, stage);
                let record = self.sm.job(job).unwrap();
                let attempt = record.current_attempt().unwrap();
                let command = exit(attempt.ended_at_ms, job, attempt.attempt, 0);
                self.apply(command).unwrap();
            }
        }
    }

    /// A replica restored from this one's records (what a follower or a
    /// restarted coordinator holds).
    fn failover(&self) -> World {
        let jobs: Vec<JobRecord> = self.sm.jobs().cloned().collect();
        let nodes = self.sm.nodes().cloned().collect();
        let next_event = self.sm.next_event_index();
        let mut sm = StateMachine::restore(jobs, nodes, Vec::new(), Vec::new(), next_event);
        sm.set_next_job_id(self.sm.next_job_id());
        for (name, run) in self.sm.pipeline_runs() {
            sm.set_pipeline_run(name, *run);
        }
        World {
            sm,
            at_ms: self.at_ms,
        }
    }

    fn check(&self, want: &Want, script: &str) {
        match want {
            Want::Latest(run) => assert_eq!(
                self.sm.pipeline_runs().get("zero").copied(),
                Some(*run),
                "{script}: latest run"
            ),
            Want::States(run, states) => {
                let (_, jobs) = self.sm.pipeline_jobs("zero", *run);
                let got: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
                assert_eq!(&got, states, "{script}: run {run}");
            }
            Want::Status(status) => {
                let got = self.sm.pipeline_loop("zero").map(|(_, _, s)| s);
                assert_eq!(got, Some(*status), "{script}: loop status");
            }
        }
    }
}

fn exit(at_ms: u64, job: JobId, attempt: u32, code: i32) -> Command {
    Command::exited_for_test(at_ms, job, attempt, "n1", code)
}

/// Runs `steps` on one replica, and on a second restored from the first
/// after half of them; checks `wants` on both and that both hold the same
/// jobs.
fn check(script: &str, steps: &[Step], wants: &[Want]) {
    let mut leader = World::new();
    let half = steps.len() / 2;
    for step in &steps[..half] {
        leader.step(*step);
    }
    let mut follower = leader.failover();
    for step in &steps[half..] {
        leader.step(*step);
        follower.step(*step);
    }
    for want in wants {
        leader.check(want, script);
        follower.check(want, &format!("{script} (restored halfway)"));
    }
    let jobs = |w: &World| serde_json::to_string(&w.sm.jobs().collect::<Vec<_>>()).unwrap();
    assert_eq!(jobs(&leader), jobs(&follower), "{script}: replicas differ");
}

use JobState::{Blocked, Cancelled, DeadLettered, Pending, Succeeded};
use Step::*;

#[test]
fn the_next_run_starts_when_a_run_succeeds() {
    check(
        "forever",
        &[Loop(3, Repeat::Forever), Run(1), Run(2)],
        &[
            Want::Latest(3),
            Want::States(1, vec![Succeeded; 3]),
            Want::States(2, vec![Succeeded; 3]),
            Want::States(3, vec![Pending; 3]),
            Want::Status(LoopStatus::Repeating),
        ],
    );
}

#[test]
fn a_run_that_is_not_finished_starts_nothing() {
    check(
        "two of three stages",
        &[Loop(3, Repeat::Forever), Stage(1, 0, 0), Stage(1, 1, 0)],
        &[
            Want::Latest(1),
            Want::States(1, vec![Succeeded, Succeeded, Pending]),
        ],
    );
}

#[test]
fn max_runs_is_not_passed() {
    check(
        "max_runs 2",
        &[Loop(2, Repeat::MaxRuns(2)), Run(1), Run(2)],
        &[
            Want::Latest(2),
            Want::States(2, vec![Succeeded; 2]),
            Want::Status(LoopStatus::Finished),
        ],
    );
    check(
        "max_runs 1",
        &[Loop(2, Repeat::MaxRuns(1)), Run(1)],
        &[Want::Latest(1), Want::Status(LoopStatus::Finished)],
    );
}

#[test]
fn a_failed_run_starts_nothing_and_a_retry_resumes_the_loop() {
    check(
        "dead-lettered",
        &[Loop(3, Repeat::Forever), Stage(1, 0, 0), Stage(1, 1, 1)],
        &[
            Want::Latest(1),
            Want::States(1, vec![Succeeded, DeadLettered, Blocked]),
            Want::Status(LoopStatus::Paused),
        ],
    );
    check(
        "retried",
        &[
            Loop(3, Repeat::Forever),
            Stage(1, 0, 0),
            Stage(1, 1, 1),
            Retry(1, 1),
            Stage(1, 1, 0),
            Stage(1, 2, 0),
        ],
        &[
            Want::Latest(2),
            Want::States(1, vec![Succeeded; 3]),
            Want::States(2, vec![Pending; 3]),
            Want::Status(LoopStatus::Repeating),
        ],
    );
    check(
        "dropped",
        &[Loop(2, Repeat::Forever), Stage(1, 0, 1), Drop(1, 0)],
        &[
            Want::Latest(1),
            Want::States(1, vec![Cancelled, Blocked]),
            Want::Status(LoopStatus::Ended),
        ],
    );
}

#[test]
fn a_stopped_loop_finishes_its_run_and_starts_no_other() {
    check(
        "stop during run 2",
        &[
            Loop(2, Repeat::Forever),
            Run(1),
            Stage(2, 0, 0),
            Stop,
            Stage(2, 1, 0),
        ],
        &[
            Want::Latest(2),
            Want::States(2, vec![Succeeded; 2]),
            Want::Status(LoopStatus::Stopped),
        ],
    );
    check(
        "stop twice, then a dead-lettered stage retried",
        &[
            Loop(2, Repeat::Forever),
            Stage(1, 0, 1),
            Stop,
            Stop,
            Retry(1, 0),
            Run(1),
        ],
        &[Want::Latest(1), Want::Status(LoopStatus::Stopped)],
    );
}

#[test]
fn a_duplicate_exit_report_starts_no_second_run() {
    check(
        "duplicate exit of the last stage",
        &[
            Loop(2, Repeat::Forever),
            Run(1),
            DuplicateExit(1, 1),
            DuplicateExit(1, 1),
        ],
        &[Want::Latest(2), Want::States(2, vec![Pending; 2])],
    );
}

#[test]
fn the_next_run_is_made_as_a_submit_makes_one() {
    let mut world = World::new();
    world.step(Loop(3, Repeat::MaxRuns(5)));
    world.step(Run(1));
    let (_, first) = world.sm.pipeline_jobs("zero", 1);
    let (_, second) = world.sm.pipeline_jobs("zero", 2);
    let first: Vec<JobRecord> = first.into_iter().cloned().collect();
    assert_eq!(second.len(), 3);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.spec, b.spec);
        assert_eq!(a.owner, b.owner);
        assert_eq!(b.run_policy, a.run_policy, "first_run stays 1");
        // Its `after:` edges point into its own run.
        let in_run = |id: &JobId| second.iter().any(|j| j.id == *id);
        assert!(b.depends_on.iter().all(in_run), "{:?}", b.depends_on);
        assert_eq!(b.depends_on.len(), a.depends_on.len());
        // Submitted at the last stage's exit, by that command's time.
        assert_eq!(b.submitted_at_ms, first[2].attempts[0].ended_at_ms);
    }
    assert_eq!(first[0].run_policy.first_run, 1);
    // What its jobs are told of their run.
    let env = crate::decide::pipeline_env(second[0]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        env,
        vec![
            ("GANTRY_PIPELINE", "zero"),
            ("GANTRY_PIPELINE_RUN", "2"),
            ("GANTRY_PREVIOUS_RUN", "1"),
            ("GANTRY_RUN_DIR", "/data/runs/2"),
            ("GANTRY_PREVIOUS_RUN_DIR", "/data/runs/1"),
        ]
    );
}

#[test]
fn a_loops_latest_run_is_held_until_the_next_run_or_a_stop() {
    let mut world = World::new();
    world
        .apply(Command::SetRetention {
            at_ms: 0,
            policy: crate::state::RetentionPolicy {
                job_retention_ms: 1000,
                ..Default::default()
            },
        })
        .unwrap();
    // s0 -> s1 -> s2: with s1 finished, nothing but the loop holds s0.
    world.step(Loop(3, Repeat::Forever));
    world.step(Stage(1, 0, 0));
    world.step(Stage(1, 1, 0));
    world.at_ms += 10_000;
    world.apply(Command::Retire { at_ms: world.at_ms }).unwrap();
    let states = |w: &World| -> Vec<JobState> {
        w.sm.pipeline_jobs("zero", 1)
            .1
            .iter()
            .map(|j| j.state)
            .collect()
    };
    assert_eq!(states(&world), vec![Succeeded, Succeeded, Pending], "held");
    world.step(Stop);
    world.at_ms += 10_000;
    world.apply(Command::Retire { at_ms: world.at_ms }).unwrap();
    assert_eq!(
        states(&world),
        vec![Succeeded, Pending],
        "stopped: s0 retires, s1 is held by s2"
    );
}

#[test]
fn loop_status_as_data() {
    use JobState::*;
    let forever = RunPolicy {
        repeat: Repeat::Forever,
        first_run: 1,
        ..RunPolicy::default()
    };
    let two = RunPolicy {
        repeat: Repeat::MaxRuns(2),
        first_run: 1,
        ..RunPolicy::default()
    };
    let stopped = RunPolicy {
        stopped: true,
        ..forever.clone()
    };
    let later = RunPolicy {
        repeat: Repeat::MaxRuns(2),
        first_run: 5,
        ..RunPolicy::default()
    };
    let once = RunPolicy::default();
    let cases: Vec<(&str, &RunPolicy, u32, Vec<JobState>, LoopStatus)> = vec![
        ("once", &once, 1, vec![Running], LoopStatus::Once),
        (
            "forever",
            &forever,
            7,
            vec![Succeeded, Running],
            LoopStatus::Repeating,
        ),
        (
            "dead-lettered",
            &forever,
            2,
            vec![DeadLettered, Blocked],
            LoopStatus::Paused,
        ),
        (
            "dropped",
            &forever,
            2,
            vec![Cancelled, Blocked],
            LoopStatus::Ended,
        ),
        ("stopped", &stopped, 2, vec![Running], LoopStatus::Stopped),
        (
            "first of two",
            &two,
            1,
            vec![Running],
            LoopStatus::Repeating,
        ),
        (
            "second of two",
            &two,
            2,
            vec![Running],
            LoopStatus::Finished,
        ),
        (
            "from its first run",
            &later,
            5,
            vec![Running],
            LoopStatus::Repeating,
        ),
        (
            "last from its first run",
            &later,
            6,
            vec![Succeeded],
            LoopStatus::Finished,
        ),
    ];
    for (what, policy, run, states, expect) in cases {
        assert_eq!(loop_status(policy, run, &states), expect, "{what}");
    }
}

#[test]
fn a_stage_retried_with_a_corrected_spec_keeps_it_in_the_next_runs() {
    let mut world = World::new();
    world.step(Loop(2, Repeat::Forever));
    world.step(Stage(1, 0, 1));
    let job = world.stage(1, 0);
    let corrected = JobSpec {
        command: vec!["fixed".into()],
        ..world.sm.job(job).unwrap().spec.clone()
    };
    world
        .apply(Command::DlqRetry {
            at_ms: 1_000,
            job,
            spec: Some(Box::new(corrected)),
        })
        .unwrap();
    world.step(Run(1));
    let (run, jobs) = world.sm.pipeline_jobs("zero", 0);
    assert_eq!(run, 2);
    let commands: Vec<&[String]> = jobs.iter().map(|j| j.spec.command.as_slice()).collect();
    assert_eq!(
        commands,
        vec![&["fixed".to_string()][..], &["true".to_string()][..]]
    );
}
