#![allow(clippy::unwrap_used)]

use gantry_scheduler::Placement;

use super::*;
use crate::command::Command;
use crate::domain::{JobRecord, JobSpec, JobState};
use crate::state::{Outcome, RetentionPolicy, StateMachine};

pub(in crate::store) const HOUR: u64 = 3600 * 1000;

/// How a test applies one command as the next entry.
type Applier = fn(&mut StateMachine, &mut Store, &mut u64, Command) -> Outcome;

/// Applies `command` as the next entry and hands its changes to the
/// store, which holds them back.
pub(in crate::store) fn hold(
    sm: &mut StateMachine,
    store: &mut Store,
    index: &mut u64,
    command: Command,
) -> Outcome {
    let outcome = sm.apply(command).unwrap();
    *index += 1;
    let changes = sm.take_changes();
    store.persist_applied(sm, changes, *index).unwrap();
    outcome
}

/// Applies `command` as the next entry and writes it at once.
pub(in crate::store) fn apply(
    sm: &mut StateMachine,
    store: &mut Store,
    index: &mut u64,
    command: Command,
) -> Outcome {
    let outcome = hold(sm, store, index, command);
    store.write_pending(sm).unwrap();
    store.writer.drain().unwrap();
    outcome
}

/// A pipeline job runs and succeeds at `at`, each entry written.
pub(in crate::store) fn run_job(
    sm: &mut StateMachine,
    store: &mut Store,
    index: &mut u64,
    at: u64,
) -> JobId {
    run_job_with(apply, sm, store, index, at)
}

/// A pipeline job runs and succeeds at `at`, its entries applied by
/// `apply`.
pub(in crate::store) fn run_job_with(
    apply: Applier,
    sm: &mut StateMachine,
    store: &mut Store,
    index: &mut u64,
    at: u64,
) -> JobId {
    let Outcome::Submitted(ids) = apply(
        sm,
        store,
        index,
        Command::Submit {
            at_ms: at,
            key: Some(format!("key-{at}")),
            jobs: vec![JobSpec::for_test("train")],
            pipeline: Some("nightly".into()),
            owner: None,
        },
    ) else {
        panic!()
    };
    let job = ids[0];
    apply(
        sm,
        store,
        index,
        Command::Assign {
            at_ms: at,
            placements: vec![Placement {
                job,
                node: "n1".into(),
                gpus: vec![0],
                gpu_memory: 10 << 30,
                batch_size: None,
                exclusive_gpu: false,
            }],
            term: 1,
        },
    );
    apply(
        sm,
        store,
        index,
        Command::JobExited {
            at_ms: at + 1,
            job,
            attempt: 1,
            node: "n1".into(),
            code: Some(0),
            signal: None,
            error: String::new(),
            cancelled: false,
            oom: false,
            output_tail: "done".into(),
            peak_gpu_memory: 0,
        },
    );
    job
}

/// An empty store in a temporary directory and its state machine.
fn fresh() -> (tempfile::TempDir, Store, StateMachine, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let sm = store.load().unwrap();
    (dir, store, sm, 0)
}

/// Finished jobs retained for an hour, the rest as by default.
fn an_hour() -> RetentionPolicy {
    RetentionPolicy {
        job_retention_ms: HOUR,
        ..RetentionPolicy::default()
    }
}

/// [`fresh`], with finished jobs retained for an hour and node `n1`
/// (one GPU) registered, both written.
pub(in crate::store) fn fresh_with_a_node() -> (tempfile::TempDir, Store, StateMachine, u64) {
    let (dir, mut store, mut sm, mut index) = fresh();
    let policy = an_hour();
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::SetRetention { at_ms: 0, policy },
    );
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::register_for_test("n1", 1, 80 << 30),
    );
    (dir, store, sm, index)
}

#[test]
fn retired_jobs_move_to_history_and_leave_it_in_time() {
    let (_dir, mut store, mut sm, mut index) = fresh();
    let policy = RetentionPolicy {
        job_retention_ms: HOUR,
        max_retained_jobs: 100,
        history_retention_ms: 3 * HOUR,
        history_max_bytes: 1 << 20,
    };
    let tick = |sm: &mut StateMachine, store: &mut Store, index: &mut u64, at_ms| {
        apply(sm, store, index, Command::SetRetention { at_ms, policy });
    };
    tick(&mut sm, &mut store, &mut index, 0);
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::register_for_test("n1", 1, 80 << 30),
    );
    let first = run_job(&mut sm, &mut store, &mut index, 10);
    let second = run_job(&mut sm, &mut store, &mut index, 20);
    tick(&mut sm, &mut store, &mut index, 11 + HOUR);
    assert!(sm.job(first).is_none() && sm.job(second).is_some());

    // Hard state on disk agrees with memory; the job is in history.
    let loaded = store.load().unwrap();
    assert!(loaded.job(first).is_none());
    assert_eq!(loaded.next_job_id(), sm.next_job_id());
    assert_eq!(loaded.event_floor(), sm.event_floor());
    assert_eq!(loaded.retention(), &policy);
    assert!(
        loaded.submission("key-10").is_none(),
        "its key went with it"
    );
    assert!(loaded.submission("key-20").is_some());
    let archived = store.history_job(first).unwrap().unwrap();
    assert_eq!(archived.state, JobState::Succeeded);
    assert_eq!(archived.attempts[0].exit_code, Some(0));
    assert_eq!(
        store.history_run("nightly", 1).unwrap(),
        vec![archived.clone()]
    );
    assert!(store.history_run("nightly", 2).unwrap().is_empty());
    let page = store.history_page(0, None, 10, |_| true).unwrap();
    assert_eq!(page.jobs, vec![archived]);
    assert!(store.history_bytes().unwrap() > 0);
    let floor = sm.event_floor();
    assert!(floor > 1);
    let events = store.events_since(0, 100).unwrap();
    assert_eq!(events[0].index, floor, "events below the floor are gone");

    // Everything retired: ids and run numbers still go on.
    tick(&mut sm, &mut store, &mut index, 21 + HOUR);
    assert_eq!(sm.jobs().count(), 0);
    let loaded = store.load().unwrap();
    assert_eq!(loaded.next_job_id(), second + 1);
    assert_eq!(loaded.pipeline_runs().get("nightly"), Some(&2));
    assert_eq!(loaded.next_event_index(), sm.next_event_index());
    let page = store.history_page(0, None, 1, |_| true).unwrap();
    assert_eq!(page.jobs[0].id, second, "newest first");
    let rest = store.history_page(0, page.next, 1, |_| true).unwrap();
    assert_eq!(rest.jobs[0].id, first);
    assert_eq!(
        store
            .history_page(15, None, 10, |_| true)
            .unwrap()
            .jobs
            .len(),
        1
    );

    // Past the history's retention (from the command's time) both go.
    tick(&mut sm, &mut store, &mut index, 21 + 3 * HOUR);
    assert!(store.history_job(first).unwrap().is_none());
    assert!(store.history_job(second).unwrap().is_none());
    assert_eq!(store.history_bytes().unwrap(), 0);
    assert_eq!(store.history_len().unwrap(), 0);
}

/// A follower installs a leader's snapshot as its base (nothing
/// written per record), then applies more: base and new jobs retired
/// (a tombstone only for the base's), submission keys removed, the
/// event floor raised. Reopened at each step it loads the same state
/// and events; a crashed later install's leftovers are dropped.
#[test]
fn an_installed_base_with_changes_over_it_reopens_to_the_same_state() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let in_base = run_job(&mut sm, &mut store, &mut index, 10);
    let file = dir.path().join("leader.snap");
    let bytes = store.snapshot_bytes(&sm).unwrap();
    std::fs::write(&file, &bytes).unwrap();

    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = Store::open(follower_dir.path()).unwrap();
    let snapshot = crate::store::decode_snapshot(&bytes).unwrap();
    let mut state = follower.install(&file, snapshot, index).unwrap();
    assert_eq!(follower.snapshot_bytes(&state).unwrap(), bytes);
    assert!(
        follower.trees.jobs.is_empty() && follower.trees.journal.is_empty(),
        "no job is written"
    );
    drop(file);
    std::fs::remove_file(dir.path().join("leader.snap")).unwrap();

    let reopened = |store: Store, state: &StateMachine| {
        let expected = store.snapshot_bytes(state).unwrap();
        let events = store.events_since(0, usize::MAX).unwrap();
        drop(store);
        let mut store = Store::open(follower_dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(store.snapshot_bytes(&loaded).unwrap(), expected);
        assert_eq!(store.events_since(0, usize::MAX).unwrap(), events);
        assert_eq!(loaded.next_event_index(), state.next_event_index());
        store
    };
    let mut follower = reopened(follower, &state);
    // Retirement is decided in apply from the commands' times: this
    // submit retires the base's job.
    let floor = state.event_floor();
    let after = run_job(&mut state, &mut follower, &mut index, 2 * HOUR);
    assert!(state.job(in_base).is_none() && state.job(after).is_some());
    assert!(state.event_floor() > floor, "the floor rose");
    // The retirement is one journal write (with the new job's).
    let writes = |store: &Store| store.trees.journal.len();
    assert!(writes(&follower) >= 1, "the base's job");
    let mut follower = reopened(follower, &state);
    apply(
        &mut state,
        &mut follower,
        &mut index,
        Command::Retire {
            at_ms: 3 * HOUR + 2,
        },
    );
    assert!(state.job(after).is_none());
    assert!(
        !follower.trees.journal.is_empty(),
        "a job after the base is removed"
    );
    assert!(follower.history_job(after).unwrap().is_some());

    // An install that crashed before its switch left generation 2's
    // trees and file: the open drops them and keeps generation 1.
    follower
        .db
        .open_tree("jobs@2")
        .unwrap()
        .insert("x", "y")
        .unwrap();
    let leftover = follower_dir.path().join("state-base").join("2.snap");
    std::fs::write(&leftover, b"partial").unwrap();
    let follower = reopened(follower, &state);
    assert!(!leftover.exists());
    let names: Vec<_> = follower.db.tree_names();
    assert!(!names.iter().any(|n| n.as_ref() == b"jobs@2"));
    assert!(names.iter().any(|n| n.as_ref() == b"jobs@1"));
}

/// Applied entries are held back and merged: nothing reaches the
/// trees (nor the stored applied index) until they are written, and
/// then a job submitted, run and retired in between is only history.
/// Held-back entries lost in a crash leave the applied index where the
/// Raft log replays them from.
#[test]
fn held_back_entries_are_written_merged_or_replayed_after_a_crash() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let written = index;
    let journaled = store.trees.journal.len();
    let Outcome::Submitted(ids) = hold(
        &mut sm,
        &mut store,
        &mut index,
        Command::Submit {
            at_ms: 10,
            key: Some("k".into()),
            jobs: vec![JobSpec::for_test("train")],
            pipeline: None,
            owner: None,
        },
    ) else {
        panic!()
    };
    let job = ids[0];
    hold(
        &mut sm,
        &mut store,
        &mut index,
        Command::Retire { at_ms: 11 },
    );
    assert!(sm.job(job).is_some(), "still pending");
    assert_eq!(store.applied_index().unwrap(), written, "held back");
    assert_eq!(store.trees.journal.len(), journaled, "nothing written");

    // A crash now: the store is as it was; the Raft log replays.
    drop(store);
    let mut reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.applied_index().unwrap(), written);
    assert!(reopened.load().unwrap().job(job).is_none());
    let mut store = reopened;

    // Run and retire it, all held back, then write: only history.
    let mut sm2 = store.load().unwrap();
    let mut index = written;
    let replayed = run_job_with(hold, &mut sm2, &mut store, &mut index, 10);
    assert_eq!(replayed, job, "the same id when applied again");
    hold(
        &mut sm2,
        &mut store,
        &mut index,
        Command::Retire { at_ms: 12 + HOUR },
    );
    assert!(sm2.job(job).is_none(), "retired");
    assert!(store.history_job(job).unwrap().is_none(), "not written yet");
    store.write_pending(&sm2).unwrap();
    store.writer.drain().unwrap();
    assert_eq!(store.applied_index().unwrap(), index);
    let loaded = Store::load(&mut store).unwrap();
    assert!(loaded.job(job).is_none());
    assert_eq!(loaded.submissions().count(), 0, "the key left with its job");
    assert!(store.history_job(job).unwrap().is_some());
    let expected = store.snapshot_bytes(&sm2).unwrap();
    drop(store);
    let mut store = Store::open(dir.path()).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(store.snapshot_bytes(&loaded).unwrap(), expected);
}

#[test]
fn a_snapshot_install_keeps_the_history_and_its_size() {
    let (_dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let job = run_job(&mut sm, &mut store, &mut index, 10);
    apply(
        &mut sm,
        &mut store,
        &mut index,
        Command::Retire { at_ms: 11 + HOUR },
    );
    let bytes = store.history_bytes().unwrap();
    assert!(bytes > 0);
    let snapshot = crate::store::decode_snapshot(&store.snapshot_bytes(&sm).unwrap()).unwrap();
    assert_eq!(snapshot.next_job_id, job + 1);
    assert_eq!(snapshot.pipeline_runs, vec![("nightly".to_string(), 1)]);
    let file = _dir.path().join("installed.snap");
    std::fs::write(&file, store.snapshot_bytes(&sm).unwrap()).unwrap();
    let restored = store.install(&file, snapshot, index).unwrap();
    // The state built from the snapshot is the one stored.
    let loaded = store.load().unwrap();
    assert_eq!(
        store.snapshot_bytes(&restored).unwrap(),
        store.snapshot_bytes(&loaded).unwrap()
    );
    assert_eq!(restored.next_job_id(), job + 1);
    assert_eq!(restored.event_floor(), sm.event_floor());
    assert_eq!(restored.retention(), &an_hour());
    assert!(store.history_job(job).unwrap().is_some());
    assert_eq!(store.history_bytes().unwrap(), bytes);
}

/// Stores `job` in the history as the versions before chunks did (the
/// history a record per job): `value` under its id in `history`, and its
/// keys in `history_index`.
pub(in crate::store) fn put_old_record(db: &sled::Db, job: &JobRecord, value: Vec<u8>) {
    let history = db.open_tree("history").unwrap();
    let index = db.open_tree("history_index").unwrap();
    let mut entry = (value.len() as u64).to_be_bytes().to_vec();
    if !job.pipeline.is_empty() {
        let mut run_key = vec![b'p'];
        run_key.extend_from_slice(&(job.pipeline.len() as u16).to_be_bytes());
        run_key.extend_from_slice(job.pipeline.as_bytes());
        run_key.extend_from_slice(&job.run.to_be_bytes());
        run_key.extend_from_slice(&job.id.to_be_bytes());
        index.insert(run_key.as_slice(), &[]).unwrap();
        entry.extend_from_slice(&run_key);
    }
    history.insert(job.id.to_be_bytes(), value).unwrap();
    let mut time_key = vec![b't'];
    time_key.extend_from_slice(&job.updated_at_ms.to_be_bytes());
    time_key.extend_from_slice(&job.id.to_be_bytes());
    index.insert(time_key, entry).unwrap();
}
