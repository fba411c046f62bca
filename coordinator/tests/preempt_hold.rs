//! The capacity a preemption frees is held for its preemptor in apply, not
//! only in the scheduler: a plan that gives a held node to another job is
//! refused whatever the scheduler decided (a plan made before the hold
//! applied, or by a leader that did not see it).

use gantry_coordinator::Command;
use gantry_coordinator::domain::{JobSpec, JobState};
use gantry_coordinator::state::{Outcome, StateMachine};
use gantry_scheduler::Placement;

const GIB: u64 = 1 << 30;
const LOW: u64 = 1;
const HIGH: u64 = 2;
const OTHER: u64 = 3;

fn spec(name: &str, priority: i32) -> JobSpec {
    let mut spec = JobSpec::for_test(name);
    spec.priority = priority;
    spec.resources.gpu_memory = Some(80 * GIB);
    spec
}

fn place(job: u64) -> Placement {
    Placement {
        job,
        node: "n1".into(),
        gpus: vec![0],
        gpu_memory: 80 * GIB,
        batch_size: None,
        exclusive_gpu: false,
    }
}

fn assign(sm: &mut StateMachine, at_ms: u64, job: u64) -> Result<(), String> {
    match sm
        .apply(Command::Assign {
            at_ms,
            placements: vec![place(job)],
            term: 1,
        })
        .expect("assign")
    {
        Outcome::Assigned { applied, refused } => match refused.first() {
            Some((_, reason)) => Err(reason.clone()),
            None => {
                assert_eq!(applied.len(), 1);
                Ok(())
            }
        },
        other => panic!("unexpected {other:?}"),
    }
}

/// One GPU; LOW ran on it, HIGH preempted it (hold until 1000) and LOW's
/// attempt ended: the GPU is free, held for HIGH; OTHER waits too.
fn held() -> StateMachine {
    let mut sm = StateMachine::new();
    sm.apply(Command::register_for_test("n1", 1, 80 * GIB))
        .expect("register");
    sm.apply(Command::Submit {
        at_ms: 10,
        key: None,
        jobs: vec![spec("low", 0), spec("high", 10), spec("other", 5)],
        pipeline: None,
        owner: None,
    })
    .expect("submit");
    assign(&mut sm, 20, LOW).expect("low placed");
    sm.apply(Command::JobStarted {
        at_ms: 25,
        job: LOW,
        attempt: 1,
        node: "n1".into(),
    })
    .expect("started");
    let outcome = sm
        .apply(Command::Preempt {
            at_ms: 30,
            job: HIGH,
            node: "n1".into(),
            victims: vec![LOW],
            reason: "test".into(),
            until_ms: 1000,
        })
        .expect("preempt");
    assert!(
        matches!(&outcome, Outcome::Preempted { stop, .. } if stop.len() == 1),
        "{outcome:?}"
    );
    sm.apply(Command::JobExited {
        at_ms: 40,
        job: LOW,
        attempt: 1,
        node: "n1".into(),
        code: None,
        signal: Some(15),
        error: String::new(),
        cancelled: false,
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
    })
    .expect("exit");
    assert_eq!(sm.job(LOW).expect("low").state, JobState::Pending);
    sm
}

#[test]
fn a_held_node_takes_only_its_preemptor_in_apply() {
    // (case, steps before the assignment, job placed, at, held for whom if refused)
    type Case = (&'static str, Vec<Command>, u64, u64, Option<u64>);
    let cases: Vec<Case> = vec![
        ("a third job is refused", vec![], OTHER, 50, Some(HIGH)),
        ("the victim itself is refused", vec![], LOW, 50, Some(HIGH)),
        ("the preemptor takes it", vec![], HIGH, 50, None),
        ("the hold is over", vec![], OTHER, 1000, None),
        (
            "the preemptor was cancelled",
            vec![Command::RequestCancel {
                at_ms: 45,
                job: HIGH,
            }],
            OTHER,
            50,
            None,
        ),
    ];
    for (name, steps, job, at_ms, held_for) in cases {
        let mut sm = held();
        for step in steps {
            sm.apply(step).expect(name);
        }
        let result = assign(&mut sm, at_ms, job);
        match held_for {
            Some(holder) => {
                let reason = result.expect_err(name);
                assert_eq!(
                    reason,
                    format!("node n1 is held for job {holder}, which preempted there"),
                    "{name}"
                );
                assert_eq!(sm.job(job).expect("job").state, JobState::Pending, "{name}");
            }
            None => {
                result.expect(name);
                assert_eq!(
                    sm.job(job).expect("job").state,
                    JobState::Assigned,
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn once_the_preemptor_is_placed_the_hold_is_gone() {
    let mut sm = held();
    sm.apply(Command::register_for_test("n1", 2, 80 * GIB))
        .expect("a second gpu");
    assign(&mut sm, 50, HIGH).expect("high placed");
    let mut other = place(OTHER);
    other.gpus = vec![1];
    let outcome = sm
        .apply(Command::Assign {
            at_ms: 60,
            placements: vec![other],
            term: 1,
        })
        .expect("assign");
    assert!(
        matches!(&outcome, Outcome::Assigned { refused, .. } if refused.is_empty()),
        "{outcome:?}"
    );
}
