//! The recovery measures as data.

use super::*;
use crate::verdict::tests::record;
use gantry_coordinator::domain::JobState;

fn run(job: u64, attempt: u32, node: &str, started: u64, ended: u64) -> Execution {
    Execution {
        job,
        attempt,
        pid: job as i32,
        ticks: 1,
        node: node.into(),
        started_ms: started,
        ended: Some((ended, 0)),
        dead_by_ms: None,
        alive_at_end: false,
    }
}

fn stored(jobs: &[(u64, &str, AttemptOutcome)]) -> Stored {
    let mut stored = Stored::default();
    for (id, node, outcome) in jobs {
        let mut job = record(*id, JobState::Succeeded, 1);
        job.attempts[0].node = node.to_string();
        job.attempts[0].outcome = Some(*outcome);
        stored.jobs.insert(*id, job);
    }
    stored
}

#[test]
fn recovery_tells_re_adopted_from_run_again() {
    let faults = [Fault {
        kind: FaultKind::AgentKill,
        at_ms: 1_000,
        target: "a".into(),
        outage: Some(Outage {
            node: "a".into(),
            killed_ms: 1_000,
            restarted_ms: Some(3_000),
            ready_ms: Some(3_500),
        }),
    }];
    let executions = [
        // Running on a at the kill; its exit was collected: re-adopted.
        run(1, 1, "a", 500, 6_000),
        // Running on a at the kill; lost and run again on b at 20 s.
        run(2, 1, "a", 600, 7_000),
        run(2, 2, "b", 20_000, 21_000),
        // Ended before the kill, or elsewhere: not affected.
        run(3, 1, "a", 100, 900),
        run(4, 1, "b", 500, 6_000),
    ];
    let stored = stored(&[
        (1, "a", AttemptOutcome::Succeeded),
        (2, "a", AttemptOutcome::Lost),
    ]);
    let (to_running, to_adopted, not_adopted) = recovery(&faults, &executions, Some(&stored));
    let ms = Duration::from_millis;
    assert_eq!(to_running, [ms(2_500), ms(19_000)]);
    assert_eq!(to_adopted, [ms(500)]);
    assert_eq!(not_adopted, 1);
}
