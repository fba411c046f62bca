#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;

/// A spec with every field away from its default, so a field the codec
/// drops fails the round trip (the records' tests use it too).
pub(in crate::store) fn full_spec() -> JobSpec {
    JobSpec {
        name: "train".into(),
        kind: JobKind::Training,
        command: vec!["python".into(), "train.py".into()],
        env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "".into())]),
        resources: Resources {
            gpus: 2,
            gpu_memory: Some(40 << 30),
            cpu_millis: 4000,
            memory: 8 << 30,
            disk: 1 << 30,
        },
        exclusive_gpu: Some(false),
        batch: Some(BatchPolicy {
            tiers: vec![
                BatchTier {
                    min_free: Some(16 << 30),
                    size: 256,
                },
                BatchTier {
                    min_free: None,
                    size: 128,
                },
            ],
            model: Some(MemoryModel {
                base: 1 << 30,
                per_sample: 1 << 20,
                min: 8,
                max: 1024,
                multiple_of: 8,
            }),
            prefer_largest: true,
        }),
        locks: vec![LockRequest {
            name: "weights".into(),
            mode: LockMode::Exclusive,
        }],
        constraints: Constraints {
            labels: BTreeMap::from([("region".into(), "eu".into())]),
            gpu_models: vec!["H100".into()],
        },
        priority: -3,
        retry: RetryPolicy {
            max_attempts: 4,
            backoff_ms: 500,
        },
        timeout_ms: Some(60_000),
        after: vec!["selfplay".into()],
        shell: true,
        queue: "research".into(),
        snapshots: vec![SnapshotSpec {
            from: "/data/w".into(),
            as_name: "w".into(),
        }],
        gpu_memory_policy: OverusePolicy::Stop,
        gpu_memory_margin: 1 << 20,
        preemptible: Some(true),
        preemption_grace_ms: Some(5000),
        gang: Some(crate::domain::GangSpec {
            nodes: 4,
            same_label: Some("rack".into()),
        }),
    }
}

/// One command of every variant, each field away from its default.
fn every_command() -> Vec<Command> {
    vec![
        Command::Submit {
            at_ms: 1,
            key: Some("k".into()),
            jobs: vec![full_spec(), JobSpec::for_test("plain")],
            pipeline: Some("loop".into()),
            owner: Some("alice".into()),
        },
        Command::Submit {
            at_ms: 1,
            key: None,
            jobs: vec![JobSpec::for_test("plain")],
            pipeline: None,
            owner: None,
        },
        Command::RegisterNode {
            at_ms: 2,
            name: "n1".into(),
            address: "10.0.0.1:7000".into(),
            labels: BTreeMap::from([("rack".into(), "3".into())]),
            gpus: vec![GpuRecord {
                index: 1,
                model: "A100".into(),
                total: 80 << 30,
            }],
            cpu_millis: 64_000,
            memory_total: 512 << 30,
            disk_total: 2 << 40,
        },
        Command::Assign {
            at_ms: 3,
            placements: vec![Placement {
                job: 7,
                node: "n1".into(),
                gpus: vec![0, 3],
                gpu_memory: 10 << 30,
                batch_size: Some(256),
                exclusive_gpu: true,
            }],
            term: 9,
        },
        Command::JobStarted {
            at_ms: 4,
            job: 7,
            attempt: 2,
            node: "n1".into(),
        },
        Command::JobExited {
            at_ms: 5,
            job: 7,
            attempt: 2,
            node: "n1".into(),
            code: Some(-1),
            signal: Some(9),
            error: "killed".into(),
            cancelled: true,
            oom: true,
            output_tail: "CUDA out of memory".into(),
            peak_gpu_memory: 3 << 30,
        },
        Command::Requeue { at_ms: 6, job: 7 },
        Command::DlqRetry {
            at_ms: 7,
            job: 7,
            spec: Some(Box::new(full_spec())),
        },
        Command::DlqRetry {
            at_ms: 7,
            job: 8,
            spec: None,
        },
        Command::DlqDrop { at_ms: 8, job: 7 },
        Command::ReviveAttempt {
            at_ms: 9,
            job: 7,
            attempt: 1,
            node: "n2".into(),
        },
        Command::RequestCancel { at_ms: 10, job: 7 },
        Command::AttemptLost {
            at_ms: 11,
            job: 7,
            attempt: 3,
            reason: "node down".into(),
        },
        Command::SetNodeDown {
            at_ms: 12,
            node: "n1".into(),
            down: true,
        },
        Command::SetDrain {
            at_ms: 13,
            node: "n1".into(),
            draining: true,
            deadline_ms: Some(99),
        },
        Command::PreemptDrained {
            at_ms: 14,
            node: "n1".into(),
        },
        Command::Quarantine {
            at_ms: 15,
            node: "n1".into(),
            until_ms: 1000,
            failures: 5,
            reason: "xid 79".into(),
            policy: crate::breaker::BreakerPolicy {
                trip_points: 7,
                window_ms: 8,
                cool_down_ms: 9,
                max_doublings: 10,
                max_share_percent: 11,
            },
        },
        Command::Preempt {
            at_ms: 16,
            job: 7,
            node: "n1".into(),
            victims: vec![3, 4],
            reason: "priority".into(),
            until_ms: 2000,
        },
        Command::ClearQuarantine {
            at_ms: 17,
            node: "n1".into(),
        },
        Command::SetRetention {
            at_ms: 18,
            policy: RetentionPolicy {
                job_retention_ms: 1,
                max_retained_jobs: 2,
                history_retention_ms: 3,
                history_max_bytes: 4,
            },
        },
        Command::Retire { at_ms: 0 },
        Command::SetGpuHealth {
            at_ms: 19,
            node: "n1".into(),
            gpu: Some(2),
            fault: Some("xid 48".into()),
            seen_healthy: true,
        },
        Command::SetGpuHealth {
            at_ms: 19,
            node: "n1".into(),
            gpu: None,
            fault: None,
            seen_healthy: false,
        },
        Command::SubmitLoop {
            at_ms: 20,
            key: Some("k2".into()),
            jobs: vec![full_spec()],
            pipeline: "zero".into(),
            owner: Some("bob".into()),
            run_policy: RunPolicy {
                repeat: Repeat::MaxRuns(5),
                first_run: 3,
                run_dir: "/runs/{run}".into(),
                stopped: true,
            },
        },
        Command::SubmitLoop {
            at_ms: 20,
            key: None,
            jobs: vec![JobSpec::for_test("plain")],
            pipeline: "zero".into(),
            owner: None,
            run_policy: RunPolicy {
                repeat: Repeat::Forever,
                ..Default::default()
            },
        },
        Command::StopPipeline {
            at_ms: 21,
            name: "zero".into(),
        },
        Command::GangStop { at_ms: 22, gang: 7 },
    ]
}

#[test]
fn every_command_round_trips() {
    for command in every_command() {
        let bytes = encode_command(&command);
        assert!(!bytes.is_empty());
        assert_ne!(bytes[0], b'{', "{command:?}");
        assert_eq!(decode_command(&bytes).unwrap(), command);
    }
}

/// A log written by the JSON versions is still read (a data directory of
/// the previous release keeps working).
#[test]
fn json_commands_of_earlier_versions_decode() {
    for command in every_command() {
        let json = serde_json::to_vec(&command).unwrap();
        assert_eq!(decode_command(&json).unwrap(), command);
    }
}

/// The binary form is what makes the log cheaper: a submit is a fraction
/// of its JSON.
#[test]
fn a_submit_is_smaller_than_its_json() {
    let submit = &every_command()[1];
    let binary = encode_command(submit).len();
    let json = serde_json::to_vec(submit).unwrap().len();
    assert!(binary * 2 < json, "{binary} bytes against JSON's {json}");
}

#[test]
fn undecodable_commands_are_errors() {
    let mut unknown_kind = encode_command(&every_command()[1]);
    // Rewrite the spec's kind "generic" in place to a name no version knows.
    let at = unknown_kind
        .windows(7)
        .position(|w| w == b"generic")
        .unwrap();
    unknown_kind[at..at + 7].copy_from_slice(b"genetic");
    let cases: &[(&[u8], &str)] = &[
        (b"", "command without its kind"),
        (&[0xFF, 0xFF], "undecodable command"),
        (b"{\"Nope\":{}}", "undecodable JSON command"),
        (&[0x0A, 0x05, 0x08], "undecodable command"),
        (unknown_kind.as_slice(), "unknown job kind \"genetic\""),
    ];
    for (data, fragment) in cases {
        let error = decode_command(data).unwrap_err().to_string();
        assert!(error.contains(fragment), "{data:?}: {error}");
    }
}
