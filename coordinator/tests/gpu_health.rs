//! GPU health in the state machine, as a table: a committed fault makes the
//! GPU unhealthy and preempts the attempts on it as a node fault (no attempt
//! used up), apply refuses placements on it, an operator's clear makes it
//! placeable again and acknowledges the fault, and stale reports are
//! ignored.

use gantry_coordinator::Command;
use gantry_coordinator::domain::{JobSpec, JobState};
use gantry_coordinator::state::{ApplyError, Outcome, StateMachine};
use gantry_scheduler::Placement;

const GIB: u64 = 1 << 30;

/// Node n1 with two GPUs; job 1 runs on GPU 0, job 2 on GPU 1.
fn cluster() -> StateMachine {
    let mut sm = StateMachine::new();
    sm.apply(Command::register_for_test("n1", 2, 80 * GIB))
        .expect("register");
    sm.apply(Command::Submit {
        at_ms: 10,
        key: None,
        jobs: vec![JobSpec::for_test("a"), JobSpec::for_test("b")],
        pipeline: None,
        owner: None,
    })
    .expect("submit");
    let outcome = sm
        .apply(Command::Assign {
            at_ms: 20,
            placements: vec![place(1, 0), place(2, 1)],
            term: 1,
        })
        .expect("assign");
    assert!(
        matches!(&outcome, Outcome::Assigned { refused, .. } if refused.is_empty()),
        "{outcome:?}"
    );
    for job in [1, 2] {
        sm.apply(Command::JobStarted {
            at_ms: 25,
            job,
            attempt: 1,
            node: "n1".into(),
        })
        .expect("started");
    }
    sm
}

fn place(job: u64, gpu: u32) -> Placement {
    Placement {
        job,
        node: "n1".into(),
        gpus: vec![gpu],
        gpu_memory: 10 * GIB,
        batch_size: None,
        exclusive_gpu: false,
    }
}

fn health(at_ms: u64, gpu: Option<u32>, fault: Option<&str>, seen_healthy: bool) -> Command {
    Command::SetGpuHealth {
        at_ms,
        node: "n1".into(),
        gpu,
        fault: fault.map(str::to_string),
        seen_healthy,
    }
}

fn fault(at_ms: u64, gpu: u32, reason: &str) -> Command {
    health(at_ms, Some(gpu), Some(reason), false)
}

fn stopped(outcome: Outcome) -> Vec<(u64, u32)> {
    match outcome {
        Outcome::Preempted { stop, .. } => stop,
        other => panic!("unexpected {other:?}"),
    }
}

fn gpu_fault(sm: &StateMachine, gpu: u32) -> Option<String> {
    sm.node("n1")
        .and_then(|n| n.gpu_fault(gpu))
        .map(str::to_string)
}

#[test]
fn a_fault_preempts_the_attempts_on_that_gpu_as_a_node_fault() {
    let mut sm = cluster();
    let stop = stopped(sm.apply(fault(100, 0, "critical xid 79")).expect("fault"));
    assert_eq!(stop, vec![(1, 1)], "only the attempt on GPU 0");
    assert_eq!(gpu_fault(&sm, 0).as_deref(), Some("critical xid 79"));
    assert_eq!(gpu_fault(&sm, 1), None);
    let preempted = &sm.job(1).expect("job").attempts[0].preempted;
    assert!(
        preempted.starts_with("node fault: gpu 0 of node n1 unhealthy"),
        "{preempted}"
    );
    assert!(sm.job(2).expect("job").attempts[0].preempted.is_empty());
    // Reported again (every heartbeat until it applied): nothing new.
    assert!(stopped(sm.apply(fault(101, 0, "critical xid 79")).expect("again")).is_empty());
    // The job dies of the fault (or of the stop): back to Pending, and the
    // attempt does not count against it.
    sm.apply(Command::JobExited {
        at_ms: 110,
        job: 1,
        attempt: 1,
        node: "n1".into(),
        code: None,
        signal: Some(9),
        error: "killed".into(),
        cancelled: false,
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
    })
    .expect("exit");
    let job = sm.job(1).expect("job");
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.failures(), 0);
    // Apply refuses a plan that puts it back on the unhealthy GPU.
    let Outcome::Assigned { applied, refused } = sm
        .apply(Command::Assign {
            at_ms: 120,
            placements: vec![place(1, 0)],
            term: 1,
        })
        .expect("assign")
    else {
        panic!("not an assignment")
    };
    assert!(applied.is_empty());
    assert!(refused[0].1.contains("unhealthy"), "{refused:?}");
}

#[test]
fn health_changes_as_a_table() {
    // (steps after the cluster is up, GPU 0's fault after them, the attempts
    // the last step stops)
    type Case = (
        &'static str,
        Vec<Command>,
        Option<&'static str>,
        Vec<(u64, u32)>,
    );
    let cases: Vec<Case> = vec![
        (
            "fault reported",
            vec![fault(100, 0, "xid 79")],
            Some("xid 79"),
            vec![(1, 1)],
        ),
        (
            "operator clear: placeable again",
            vec![fault(100, 0, "xid 79"), health(200, None, None, false)],
            None,
            vec![],
        ),
        (
            "the same fault after a clear is acknowledged",
            vec![
                fault(100, 0, "xid 79"),
                health(200, Some(0), None, false),
                fault(300, 0, "xid 79"),
            ],
            None,
            vec![],
        ),
        (
            "a different fault after a clear marks it again",
            vec![
                fault(100, 0, "xid 79"),
                health(200, None, None, false),
                fault(300, 0, "3 uncorrected ecc error(s)"),
            ],
            Some("3 uncorrected ecc error(s)"),
            vec![],
        ),
        (
            "a report taken before the clear is stale",
            vec![
                fault(100, 0, "xid 79"),
                health(200, None, None, false),
                fault(150, 0, "xid 48"),
            ],
            None,
            vec![],
        ),
        (
            "seen healthy forgets an acknowledged fault: the same fault marks again",
            vec![
                fault(100, 0, "xid 79"),
                health(200, None, None, false),
                health(250, Some(0), None, true),
                fault(300, 0, "xid 79"),
            ],
            Some("xid 79"),
            vec![],
        ),
        (
            "seen healthy does not clear a fault in force",
            vec![fault(100, 0, "xid 79"), health(200, Some(0), None, true)],
            Some("xid 79"),
            vec![],
        ),
        (
            "a fault on the other GPU leaves GPU 0 alone",
            vec![fault(100, 1, "xid 79")],
            None,
            vec![(2, 1)],
        ),
    ];
    for (name, steps, want, want_stop) in cases {
        let mut sm = cluster();
        let mut last = Outcome::Done;
        for step in steps {
            last = sm.apply(step).expect(name);
        }
        assert_eq!(gpu_fault(&sm, 0).as_deref(), want, "{name}");
        let stop = match last {
            Outcome::Preempted { stop, .. } => stop,
            _ => Vec::new(),
        };
        assert_eq!(stop, want_stop, "{name}");
    }
}

#[test]
fn bad_targets_are_refused_and_change_nothing() {
    let mut sm = cluster();
    let before = format!("{:?}", sm.node("n1"));
    assert_eq!(
        sm.apply(fault(100, 7, "xid 79")),
        Err(ApplyError::GpuNotFound {
            node: "n1".into(),
            gpu: 7
        })
    );
    assert_eq!(
        sm.apply(Command::SetGpuHealth {
            at_ms: 100,
            node: "nope".into(),
            gpu: Some(0),
            fault: Some("xid 79".into()),
            seen_healthy: false,
        }),
        Err(ApplyError::NodeNotFound("nope".into()))
    );
    assert_eq!(format!("{:?}", sm.node("n1")), before);
    assert!(sm.job(1).expect("job").attempts[0].preempted.is_empty());
}

#[test]
fn a_fault_survives_re_registration() {
    let mut sm = cluster();
    sm.apply(fault(100, 0, "xid 79")).expect("fault");
    sm.apply(Command::register_for_test("n1", 2, 80 * GIB))
        .expect("register");
    assert_eq!(gpu_fault(&sm, 0).as_deref(), Some("xid 79"));
}
