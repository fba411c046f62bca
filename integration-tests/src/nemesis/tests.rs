//! The recovery measures as data.

use super::*;
use gantry_coordinator::domain::{AttemptRecord, JobRecord, JobSpec, JobState};

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
        let mut record = JobRecord {
            id: *id,
            spec: JobSpec::for_test("j"),
            state: JobState::Succeeded,
            submitted_at_ms: 0,
            updated_at_ms: 0,
            attempts: vec![],
            cancel_requested: false,
            depends_on: vec![],
            not_before_ms: 0,
            terminal_reason: String::new(),
            retry_base: 0,
            batch_cap: None,
            blocked_by: None,
            pipeline: String::new(),
            run: 0,
        };
        record.attempts.push(AttemptRecord {
            attempt: 1,
            node: node.to_string(),
            gpus: vec![0],
            gpu_memory: 1,
            batch_size: 0,
            exclusive_gpu: false,
            assigned_at_ms: 0,
            started_at_ms: 0,
            ended_at_ms: 0,
            exit_code: Some(0),
            signal: None,
            error: String::new(),
            outcome: Some(*outcome),
            output_tail: String::new(),
            oom: false,
            forgiven: false,
            peak_gpu_memory: 0,
            preempted: String::new(),
        });
        stored.jobs.insert(*id, record);
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
