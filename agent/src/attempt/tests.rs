//! The attempt directory's decisions, as data.

use super::*;
use std::os::unix::process::CommandExt;

use crate::executor::GpuMemoryPolicy;

fn record() -> AttemptRecord {
    AttemptRecord {
        launch: Launch {
            job_id: 7,
            attempt: 2,
            kind: "generic".into(),
            command: vec!["true".into()],
            shell: false,
            env: Default::default(),
            gpus: vec![0],
            gpu_memory_bytes: 1,
            batch_size: 0,
            timeout: Some(Duration::from_secs(3)),
            snapshot: vec![crate::snapshot::SnapshotEntry {
                from: "/m".into(),
                as_name: "m".into(),
            }],
            gpu_memory_policy: GpuMemoryPolicy::Stop,
            gpu_memory_margin_bytes: 0,
        },
        node_name: "n".into(),
        kill_grace_ms: 1000,
        run_as: None,
        accepted_at_ms: 1,
    }
}

const SUP: ProcessId = ProcessId {
    pid: 100,
    start_time: 5,
};
const JOB: Started = Started {
    process: ProcessId {
        pid: 101,
        start_time: 6,
    },
    at_ms: 2,
};

fn status(lost: Option<&str>) -> ExitStatus {
    ExitStatus {
        code: Some(0),
        signal: None,
        stopped: None,
        spawn_error: None,
        lost: lost.map(String::from),
        ended_at_ms: 9,
    }
}

#[test]
fn classify_each_state_of_an_attempt_directory() {
    let disk = |claim: Option<Claim>,
                started: Option<Started>,
                status: Option<ExitStatus>,
                acked| OnDisk {
        record: record(),
        claim,
        started,
        stop: None,
        status,
        acked,
    };
    let supervised = || Some(Claim::Supervisor { process: SUP });
    let lost_reason = "the attempt's supervisor (pid 100) ended without recording an exit status";
    // (what is on disk, whether the supervisor lives, expected decision)
    let cases = [
        (disk(None, None, None, false), true, Recovery::Unclaimed),
        (
            disk(supervised(), None, None, false),
            true,
            Recovery::Adopt {
                supervisor: SUP,
                started: None,
            },
        ),
        (
            disk(supervised(), Some(JOB), None, false),
            true,
            Recovery::Adopt {
                supervisor: SUP,
                started: Some(JOB),
            },
        ),
        // Dead, or its pid reused (same check: pid and start time).
        (
            disk(supervised(), Some(JOB), None, false),
            false,
            Recovery::Lost {
                reason: lost_reason.into(),
                started: Some(JOB),
            },
        ),
        (
            disk(
                Some(Claim::Abandoned {
                    reason: "gone".into(),
                }),
                None,
                None,
                false,
            ),
            false,
            Recovery::Lost {
                reason: "gone".into(),
                started: None,
            },
        ),
        // A status wins over everything, alive or not.
        (
            disk(supervised(), Some(JOB), Some(status(None)), false),
            true,
            Recovery::Ended(status(None)),
        ),
        (
            disk(None, None, Some(status(Some("x"))), false),
            false,
            Recovery::Ended(status(Some("x"))),
        ),
        (
            disk(supervised(), Some(JOB), Some(status(None)), true),
            false,
            Recovery::Acknowledged { ended_at_ms: 9 },
        ),
    ];
    for (i, (disk, alive, expected)) in cases.into_iter().enumerate() {
        let got = classify(&disk, |p| {
            assert_eq!(*p, SUP, "only the claimed supervisor is checked");
            alive
        });
        assert_eq!(got, expected, "case {i}");
    }
}

#[test]
fn lost_attempts_report_as_agent_shutdown_unless_cancelled() {
    let lost = status(Some("gone"));
    let JobEventKind::Exited(exit) = lost.event_kind(Vec::new(), 3) else {
        panic!()
    };
    assert!(exit.agent_shutdown && !exit.cancelled);
    assert_eq!(exit.peak_gpu_memory_bytes, 3);
    let cancelled = ExitStatus {
        stopped: Some(StopReason::Cancelled),
        ..status(Some("gone"))
    };
    let JobEventKind::Exited(exit) = cancelled.event_kind(Vec::new(), 0) else {
        panic!()
    };
    assert!(exit.cancelled && !exit.agent_shutdown);
    let failed = ExitStatus {
        spawn_error: Some("no such file".into()),
        ..status(None)
    };
    assert_eq!(
        failed.event_kind(Vec::new(), 0),
        JobEventKind::SpawnFailed {
            error: "no such file".into()
        }
    );
}

#[test]
fn old_acknowledged_attempts_are_removed_oldest_first() {
    const H: u64 = 3_600_000;
    let day = Duration::from_secs(24 * 3600);
    let now = 100 * H;
    // (acknowledged attempts with end times, max kept, expected removals)
    type Case<'a> = (&'a [((u64, u32), u64)], usize, &'a [(u64, u32)]);
    let cases: [Case; 4] = [
        (&[], 10, &[]),
        (&[((1, 1), now - H), ((2, 1), now - 25 * H)], 10, &[(2, 1)]),
        (
            &[
                ((3, 1), now - 3 * H),
                ((1, 1), now - H),
                ((2, 1), now - 2 * H),
            ],
            1,
            &[(3, 1), (2, 1)],
        ),
        (&[((1, 1), now), ((1, 2), now)], 1, &[(1, 1)]),
    ];
    for (i, (acked, max_kept, expected)) in cases.into_iter().enumerate() {
        assert_eq!(to_remove(acked, now, day, max_kept), expected, "case {i}");
    }
}

#[test]
fn files_round_trip_and_a_claim_is_made_once() {
    let dir = tempfile::tempdir().unwrap();
    write_json(dir.path(), RECORD, &record()).unwrap();
    let disk = read(dir.path()).unwrap();
    assert_eq!(disk.record, record());
    assert_eq!((disk.claim, disk.status, disk.acked), (None, None, false));

    let first = Claim::Supervisor { process: SUP };
    assert!(claim(dir.path(), &first).unwrap());
    let second = Claim::Abandoned {
        reason: "late".into(),
    };
    assert!(!claim(dir.path(), &second).unwrap(), "taken");
    assert_eq!(read(dir.path()).unwrap().claim, Some(first));
    mark_acked(dir.path()).unwrap();
    assert!(read(dir.path()).unwrap().acked);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");

    std::fs::write(dir.path().join(STATUS), "{").unwrap();
    let err = read(dir.path()).unwrap_err();
    assert!(err.contains("status.json is corrupt"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(read(empty.path()).unwrap_err(), "no attempt.json");
}

#[test]
fn a_leftover_group_is_only_the_jobs_own() {
    // A live group led by the recorded process: ours.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let me = ProcessId::of(child.id()).unwrap();
    let ours = Started {
        process: me,
        at_ms: 0,
    };
    assert_eq!(leftover_group(&ours), Some(me.pid));
    // Same pid, other start time: a reuse, never signalled.
    let reused = Started {
        process: ProcessId {
            start_time: me.start_time + 1,
            ..me
        },
        at_ms: 0,
    };
    assert_eq!(leftover_group(&reused), None);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(leftover_group(&ours), None, "group gone");
}

#[test]
fn a_full_volume_is_told_from_other_spawn_errors() {
    let full = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
    let quota = std::io::Error::from_raw_os_error(nix::errno::Errno::EDQUOT as i32);
    let denied = std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32);
    let cases = [
        (
            format!("cannot write /d/jobs/7/1/.attempt.json.tmp: {full}"),
            true,
        ),
        (format!("cannot create /d/jobs/7/1/stdout: {quota}"), true),
        (format!("cannot create /d/jobs/7/1: {denied}"), false),
        ("No such file or directory: sh".to_string(), false),
        // Another number that merely starts the same is not ENOSPC.
        ("cannot read x: oops (os error 281)".to_string(), false),
    ];
    for (error, want) in cases {
        assert_eq!(is_volume_full(&error), want, "{error}");
    }
}
