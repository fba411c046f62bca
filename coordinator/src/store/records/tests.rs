#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;
use crate::domain::{GpuRecord, JobSpec, Repeat, RunPolicy};
use crate::state::Estimate;
use crate::store::codec::tests::full_spec;
use crate::store::snapshot::MAGIC;
use crate::store::{StateSnapshot, Store, decode_snapshot, write_state_snapshot};

fn attempt(n: u32, outcome: Option<AttemptOutcome>) -> AttemptRecord {
    AttemptRecord {
        attempt: n,
        node: format!("node-{n}"),
        gpus: vec![0, 3],
        gpu_memory: 20 << 30,
        batch_size: 64,
        exclusive_gpu: true,
        assigned_at_ms: 10,
        started_at_ms: 11,
        ended_at_ms: 12,
        exit_code: Some(-1),
        signal: Some(9),
        error: "killed".into(),
        outcome,
        output_tail: "Traceback\n".into(),
        oom: true,
        forgiven: true,
        peak_gpu_memory: 19 << 30,
        preempted: "preempted: node a drained".into(),
    }
}

/// A job with every field away from its default.
fn full_job(state: JobState) -> JobRecord {
    let mut outcomes: Vec<Option<AttemptOutcome>> = OUTCOMES.into_iter().map(Some).collect();
    outcomes.push(None);
    JobRecord {
        id: 42,
        spec: full_spec(),
        state,
        submitted_at_ms: 1,
        updated_at_ms: 2,
        attempts: outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| attempt(i as u32 + 1, o))
            .collect(),
        cancel_requested: true,
        depends_on: vec![7, 8],
        not_before_ms: 3,
        terminal_reason: "dependency failed".into(),
        retry_base: 2,
        batch_cap: Some(32),
        blocked_by: Some(7),
        pipeline: "loop".into(),
        run: 5,
        owner: Some("alice".into()),
        submit_event: 99,
        preempted_by: vec![PreemptedBy { job: 50, at_ms: 4 }],
        preempting: Some(PreemptionHold {
            node: "n1".into(),
            victims: vec![1, 2],
            at_ms: 5,
            until_ms: 6,
        }),
        gang: Some(GangMember {
            first: 40,
            rank: 2,
            size: 4,
            port: 29_777,
        }),
        run_policy: RunPolicy {
            repeat: Repeat::MaxRuns(9),
            first_run: 3,
            run_dir: "/runs/{run}".into(),
            stopped: true,
        },
    }
}

/// Jobs to round-trip: every state with every field set, the minimal job,
/// and each optional field alone.
fn job_cases() -> Vec<(String, JobRecord)> {
    let mut cases: Vec<(String, JobRecord)> = JobState::ALL
        .into_iter()
        .map(|state| (format!("full, {state}"), full_job(state)))
        .collect();
    let minimal = JobRecord::for_test(0, JobSpec::for_test("min"));
    cases.push(("minimal, id 0".into(), minimal.clone()));
    let one = |name: &str, change: &dyn Fn(&mut JobRecord)| {
        let mut job = minimal.clone();
        change(&mut job);
        (name.to_string(), job)
    };
    cases.extend([
        one("batch cap only", &|j| j.batch_cap = Some(0)),
        one("blocked by only", &|j| j.blocked_by = Some(0)),
        one("owner only", &|j| j.owner = Some(String::new())),
        one("repeat forever", &|j| j.run_policy.repeat = Repeat::Forever),
        one("stopped once", &|j| j.run_policy.stopped = true),
        one("a running attempt", &|j| {
            j.attempts.push(AttemptRecord {
                exit_code: None,
                signal: None,
                ..attempt(1, None)
            })
        }),
        one("exit code 0", &|j| {
            j.attempts.push(AttemptRecord {
                exit_code: Some(0),
                signal: None,
                ..attempt(1, Some(AttemptOutcome::Succeeded))
            })
        }),
        one("gang rank 0 before a port", &|j| {
            j.gang = Some(GangMember {
                first: 0,
                rank: 0,
                size: 2,
                port: 0,
            })
        }),
        one("preemption hold of none", &|j| {
            j.preempting = Some(PreemptionHold {
                node: String::new(),
                victims: Vec::new(),
                at_ms: 0,
                until_ms: 0,
            })
        }),
    ]);
    cases
}

#[test]
fn jobs_round_trip_binary_and_read_as_json() {
    for (name, job) in job_cases() {
        let binary = encode_job(&job);
        assert!(!is_json(&binary), "{name}: binary looks like JSON");
        assert_eq!(decode_job(&binary).unwrap(), job, "{name}: binary");
        // As the JSON version stored it.
        let json = serde_json::to_vec(&job).unwrap();
        assert_eq!(decode_job(&json).unwrap(), job, "{name}: JSON");
        // An encoding is a function of the value (snapshots compare bytes).
        assert_eq!(encode_job(&decode_job(&binary).unwrap()), binary, "{name}");
    }
}

fn full_node() -> NodeRecord {
    NodeRecord {
        name: "gpu-7".into(),
        address: "10.0.0.7:7001".into(),
        labels: BTreeMap::from([("provider".into(), "a".into()), ("rack".into(), "".into())]),
        gpus: vec![
            GpuRecord {
                index: 0,
                model: "H100".into(),
                total: 80 << 30,
            },
            GpuRecord {
                index: 1,
                model: "H100".into(),
                total: 80 << 30,
            },
        ],
        cpu_millis: 64_000,
        memory_total: 512 << 30,
        disk_total: 4 << 40,
        draining: true,
        drain_deadline_ms: Some(9),
        registered_at_ms: 1,
        down: true,
        quarantine: Some(Quarantine {
            since_ms: 2,
            until_ms: 3,
            failures: 4,
            reason: "5 failures".into(),
            trips: 2,
        }),
        gpu_faults: BTreeMap::from([
            (
                0,
                GpuFault {
                    reason: "Xid 79".into(),
                    since_ms: 5,
                    cleared_at_ms: None,
                },
            ),
            (
                1,
                GpuFault {
                    reason: "ecc".into(),
                    since_ms: 6,
                    cleared_at_ms: Some(0),
                },
            ),
        ]),
    }
}

#[test]
fn nodes_round_trip_binary_and_read_as_json() {
    let full = full_node();
    let minimal = NodeRecord {
        name: String::new(),
        address: String::new(),
        labels: BTreeMap::new(),
        gpus: Vec::new(),
        cpu_millis: 0,
        memory_total: 0,
        disk_total: 0,
        draining: false,
        drain_deadline_ms: None,
        registered_at_ms: 0,
        down: false,
        quarantine: None,
        gpu_faults: BTreeMap::new(),
    };
    let cases = [
        ("full", full.clone()),
        ("minimal", minimal.clone()),
        (
            "deadline 0 only",
            NodeRecord {
                drain_deadline_ms: Some(0),
                ..minimal.clone()
            },
        ),
        (
            "cleared quarantine",
            NodeRecord {
                quarantine: Some(Quarantine {
                    since_ms: 0,
                    until_ms: 0,
                    failures: 0,
                    reason: String::new(),
                    trips: 0,
                }),
                ..minimal
            },
        ),
    ];
    for (name, node) in cases {
        let binary = encode_node(&node);
        assert!(!is_json(&binary), "{name}");
        assert_eq!(decode_node(&binary).unwrap(), node, "{name}: binary");
        let json = serde_json::to_vec(&node).unwrap();
        assert_eq!(decode_node(&json).unwrap(), node, "{name}: JSON");
    }
}

fn event(index: u64, state: JobState, kind: JobKind) -> EventRecord {
    EventRecord {
        index,
        at_ms: 1_700_000_000_000,
        job_id: 9,
        job_name: "eval".into(),
        kind,
        state,
        node: "n".into(),
        attempt: 2,
        message: "exit 1".into(),
        pipeline: "loop".into(),
    }
}

#[test]
fn events_and_job_ids_round_trip_binary_and_read_as_json() {
    let mut cases: Vec<EventRecord> = JobState::ALL
        .into_iter()
        .zip(JobKind::ALL.into_iter().cycle())
        .enumerate()
        .map(|(i, (state, kind))| event(i as u64 + 1, state, kind))
        .collect();
    cases.push(EventRecord {
        index: 0,
        job_name: String::new(),
        node: String::new(),
        message: String::new(),
        pipeline: String::new(),
        ..event(0, JobState::Pending, JobKind::Generic)
    });
    for event in cases {
        let binary = encode_event(&event);
        assert!(!is_json(&binary), "{event:?}");
        assert_eq!(decode_event(&binary).unwrap(), event);
        assert_eq!(
            decode_event(&serde_json::to_vec(&event).unwrap()).unwrap(),
            event
        );
    }
    for ids in [vec![], vec![0], vec![1, u64::MAX]] {
        assert_eq!(decode_job_ids(&encode_job_ids(&ids)).unwrap(), ids);
        assert_eq!(
            decode_job_ids(&serde_json::to_vec(&ids).unwrap()).unwrap(),
            ids
        );
    }
}

/// A stored name this version does not know, or a missing spec, is an
/// error naming it, never a default.
#[test]
fn unknown_names_and_missing_parts_are_errors() {
    let mut job = job_to_storage(&full_job(JobState::Running));
    job.state = "paused".into();
    let error = decode_job(&job.encode_to_vec()).unwrap_err().to_string();
    assert!(error.contains("unknown job state \"paused\""), "{error}");

    let mut job = job_to_storage(&full_job(JobState::Running));
    job.attempts[0].outcome = Some("vanished".into());
    let error = decode_job(&job.encode_to_vec()).unwrap_err().to_string();
    assert!(error.contains("unknown attempt outcome"), "{error}");

    let mut job = job_to_storage(&full_job(JobState::Running));
    job.spec = None;
    let error = decode_job(&job.encode_to_vec()).unwrap_err().to_string();
    assert!(error.contains("without its job spec"), "{error}");

    let mut job = job_to_storage(&full_job(JobState::Running));
    job.gang.as_mut().unwrap().port = 70_000;
    let error = decode_job(&job.encode_to_vec()).unwrap_err().to_string();
    assert!(error.contains("gang port"), "{error}");

    let mut event = event_to_storage(&event(1, JobState::Failed, JobKind::Export));
    event.kind = "mining".into();
    let error = decode_event(&event.encode_to_vec())
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown job kind"), "{error}");

    assert!(decode_job(b"{\"id\":").is_err(), "torn JSON");
    assert!(decode_job(&[0x0A, 0x05, 0x01]).is_err(), "torn binary");
}

fn snapshot_of_everything() -> StateSnapshot {
    StateSnapshot {
        jobs: job_cases().into_iter().map(|(_, j)| j).collect(),
        nodes: vec![full_node()],
        submissions: vec![("key-1".into(), vec![42, 0]), ("empty".into(), vec![])],
        estimates: vec![(
            "training/train".into(),
            Estimate {
                bytes: 12 << 30,
                used_ms: 99,
            },
        )],
        events: vec![
            event(3, JobState::Pending, JobKind::Training),
            event(4, JobState::DeadLettered, JobKind::Selfplay),
        ],
        leader_term: 7,
        next_job_id: 1000,
        event_floor: 3,
        retention: Some(RetentionPolicy {
            job_retention_ms: 1,
            max_retained_jobs: 2,
            history_retention_ms: 3,
            history_max_bytes: 4,
        }),
        pipeline_runs: vec![("loop".into(), 5)],
    }
}

fn binary_snapshot(snapshot: &StateSnapshot) -> Vec<u8> {
    let mut out = Vec::new();
    write_state_snapshot(snapshot, &mut out).unwrap();
    out
}

fn same(a: &StateSnapshot, b: &StateSnapshot) -> bool {
    serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap()
}

#[test]
fn snapshots_round_trip_and_json_ones_are_read() {
    let snapshot = snapshot_of_everything();
    let bytes = binary_snapshot(&snapshot);
    assert!(same(&decode_snapshot(&bytes).unwrap(), &snapshot));
    // A snapshot file or backup of a JSON version.
    let json = serde_json::to_vec(&snapshot).unwrap();
    assert!(same(&decode_snapshot(&json).unwrap(), &snapshot));
    // Without a retention policy (a version before retention).
    let old = StateSnapshot {
        retention: None,
        ..StateSnapshot::default()
    };
    assert!(same(
        &decode_snapshot(&binary_snapshot(&old)).unwrap(),
        &old
    ));
}

/// Anything but a whole snapshot is refused with what is wrong.
#[test]
fn damaged_snapshots_are_refused() {
    let bytes = binary_snapshot(&snapshot_of_everything());
    let mut item_after_meta = bytes.clone();
    item_after_meta.extend_from_slice(&bytes[MAGIC.len()..]);
    let mut huge = MAGIC.to_vec();
    prost::encoding::encode_varint(1 << 40, &mut huge);
    let mut flipped = bytes.clone();
    flipped[MAGIC.len() + 3] ^= 0xFF;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "shorter than its magic"),
        ("foreign", b"GSTATEv9rest".to_vec(), "wrong magic"),
        ("no items", MAGIC.to_vec(), "without its meta item"),
        ("cut short", bytes[..bytes.len() - 3].to_vec(), "cut short"),
        ("cut between items", bytes[..bytes.len() - 20].to_vec(), ""),
        ("an item after the meta", item_after_meta, "after the meta"),
        ("a huge length", huge, "claims"),
        ("a flipped byte", flipped, ""),
        (
            "torn JSON",
            b"{\"jobs\":[".to_vec(),
            "corrupt record in snapshot",
        ),
    ];
    for (name, data, fragment) in cases {
        let error = decode_snapshot(&data)
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(error.contains(fragment), "{name}: {error}");
    }
}

/// A data directory the JSON version wrote: every tree's records as JSON.
/// It opens, reads back, takes a binary snapshot, and records written
/// after are binary.
#[test]
fn a_data_directory_of_json_records_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let job = full_job(JobState::Running);
    let node = full_node();
    let event = event(1, JobState::Running, JobKind::Training);
    store
        .trees
        .jobs
        .insert(job.id.to_be_bytes(), serde_json::to_vec(&job).unwrap())
        .unwrap();
    store
        .trees
        .nodes
        .insert(node.name.as_bytes(), serde_json::to_vec(&node).unwrap())
        .unwrap();
    store
        .trees
        .events
        .insert(1u64.to_be_bytes(), serde_json::to_vec(&event).unwrap())
        .unwrap();
    store
        .trees
        .submissions
        .insert("k", serde_json::to_vec(&vec![job.id]).unwrap())
        .unwrap();
    // A JSON version's history, a record per job: moved into chunks when
    // the store is opened.
    crate::store::history::tests::put_old_record(
        &store.db,
        &job,
        serde_json::to_vec(&job).unwrap(),
    );
    drop(store);
    let mut store = Store::open(dir.path()).unwrap();

    let state = store.load().unwrap();
    assert_eq!(state.job(job.id), Some(&job));
    assert_eq!(state.node(&node.name), Some(&node));
    assert_eq!(state.submissions().count(), 1);
    assert_eq!(
        store.events_since(0, 10).unwrap(),
        std::slice::from_ref(&event)
    );
    assert_eq!(store.history_job(job.id).unwrap(), Some(job.clone()));

    // Its snapshot is binary, with the JSON event converted.
    let bytes = store.snapshot_bytes(&state).unwrap();
    assert!(bytes.starts_with(MAGIC));
    let decoded = decode_snapshot(&bytes).unwrap();
    assert!(same(&decoded, &store.snapshot(&state).unwrap()));
    assert_eq!(decoded.events, [event]);

    // Installed elsewhere, the binary file is the base and what is
    // written after is binary.
    let other_dir = tempfile::tempdir().unwrap();
    let file = other_dir.path().join("installed.snap");
    std::fs::write(&file, &bytes).unwrap();
    let mut other = Store::open(&other_dir.path().join("data")).unwrap();
    let mut restored = other.install(&file, decoded, 5).unwrap();
    assert_eq!(restored.job(job.id), Some(&job));
    assert_eq!(other.snapshot_bytes(&restored).unwrap(), bytes);
    restored
        .apply(crate::command::Command::Retire {
            at_ms: u64::MAX / 2,
        })
        .unwrap();
    let changes = restored.take_changes();
    other.persist_applied(&restored, changes, 6).unwrap();
    other.write_pending(&restored).unwrap();
    other.writer.drain().unwrap();
    for tree in [&other.trees.journal, &other.trees.event_log] {
        for item in tree.iter() {
            assert!(!is_json(&item.unwrap().1));
        }
    }
}

/// Binary events in the per-record tree of the versions before the
/// journal go into a snapshot, which decodes to the stored state.
#[test]
fn per_record_binary_events_go_into_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let events: Vec<EventRecord> = (1..=3)
        .map(|i| event(i, JobState::ALL[i as usize], JobKind::Export))
        .collect();
    for e in &events {
        store
            .trees
            .events
            .insert(e.index.to_be_bytes(), encode_event(e))
            .unwrap();
    }
    let state = store.load().unwrap();
    let decoded = decode_snapshot(&store.snapshot_bytes(&state).unwrap()).unwrap();
    assert_eq!(decoded.events, events);
}

#[test]
fn estimates_decode_with_and_without_their_last_use() {
    let estimate = Estimate {
        bytes: 12 << 30,
        used_ms: 1_700_000_000_000,
    };
    assert_eq!(
        decode_estimate(&encode_estimate(&estimate)).unwrap(),
        estimate
    );
    // The 8 bytes of the versions before the bound: used first.
    assert_eq!(
        decode_estimate(&(5u64 << 30).to_be_bytes()).unwrap(),
        Estimate {
            bytes: 5 << 30,
            used_ms: 0
        }
    );
    for torn in [&[][..], &[1, 2, 3], &[0; 9], &[0; 17]] {
        let error = decode_estimate(torn).unwrap_err().to_string();
        assert!(error.contains("learned estimate"), "{error}");
    }
    // A JSON snapshot of those versions holds the bytes alone.
    let old: Vec<(String, Estimate)> =
        serde_json::from_str(r#"[["training/train", 4096]]"#).unwrap();
    assert_eq!(
        old,
        [(
            "training/train".to_string(),
            Estimate {
                bytes: 4096,
                used_ms: 0
            }
        )]
    );
}

/// A job of a new class past the bound on learned classes evicts the
/// least recently used class, a class of the installed base included:
/// after a reopen it stays gone (a tombstone over the base), the new one
/// is there, and the count is the bound. A class's use is refreshed at
/// most once per interval.
#[test]
fn an_evicted_base_class_stays_gone_after_a_reopen() {
    use crate::command::Command;
    use crate::state::{MAX_ESTIMATES, Outcome, StateMachine, TOUCH_INTERVAL_MS};

    let base = StateSnapshot {
        estimates: (0..MAX_ESTIMATES)
            .map(|i| {
                let used_ms = 1_000 + i as u64;
                (format!("generic/c{i:05}"), Estimate { bytes: 1, used_ms })
            })
            .collect(),
        next_job_id: 1,
        event_floor: 1,
        ..StateSnapshot::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("base.snap");
    std::fs::write(&file, binary_snapshot(&base)).unwrap();
    let data = dir.path().join("data");
    let mut store = Store::open(&data).unwrap();
    let mut sm = store.install(&file, base, 5).unwrap();
    let mut index = 5;
    // Applies the next entry; the learned classes it wrote.
    let mut apply = |sm: &mut StateMachine, store: &mut Store, command| {
        let outcome = sm.apply(command).unwrap();
        index += 1;
        let changes = sm.take_changes();
        let written = changes.estimates.clone();
        store.persist_applied(sm, changes, index).unwrap();
        (outcome, written)
    };
    apply(
        &mut sm,
        &mut store,
        Command::register_for_test("n1", 1, 80 << 30),
    );
    // A job of class generic/fresh ends at `at_ms` reporting `peak`; the
    // classes its exit wrote.
    let mut run = |sm: &mut StateMachine, store: &mut Store, at_ms: u64, peak: u64| {
        let (Outcome::Submitted(ids), _) = apply(
            sm,
            store,
            Command::Submit {
                at_ms,
                key: None,
                jobs: vec![JobSpec::for_test("fresh")],
                pipeline: None,
                owner: None,
            },
        ) else {
            panic!("not submitted")
        };
        let job = ids[0];
        apply(sm, store, Command::assign_for_test(at_ms, job, "n1"));
        let mut exited = Command::exited_for_test(at_ms, job, 1, "n1", 0);
        if let Command::JobExited {
            peak_gpu_memory, ..
        } = &mut exited
        {
            *peak_gpu_memory = peak;
        }
        apply(sm, store, exited).1
    };
    let written = run(&mut sm, &mut store, 5_000, 2 << 30);
    assert_eq!(
        written.into_iter().collect::<Vec<_>>(),
        ["generic/c00000", "generic/fresh"],
        "the oldest class is evicted for the new one"
    );
    assert!(
        run(&mut sm, &mut store, 6_000, 1 << 30).is_empty(),
        "no rise, no refresh yet"
    );
    let later = 5_000 + TOUCH_INTERVAL_MS;
    assert_eq!(
        run(&mut sm, &mut store, later, 1 << 30).len(),
        1,
        "refreshed"
    );
    store.write_pending(&sm).unwrap();
    store.flush().unwrap();
    drop(store);

    let mut store = Store::open(&data).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.estimates().len(), MAX_ESTIMATES);
    assert_eq!(loaded.estimates().get("generic/c00000"), None);
    let fresh = Estimate {
        bytes: (2 << 30) + (2 << 30) / 10,
        used_ms: later,
    };
    assert_eq!(loaded.estimates().get("generic/fresh"), Some(&fresh));
    assert_eq!(loaded.estimates(), sm.estimates());
}
