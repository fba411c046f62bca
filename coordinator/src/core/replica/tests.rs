#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use tokio::sync::broadcast;

use super::*;
use crate::core::CoreConfig;
use crate::domain::{JobSpec, JobState};
use crate::metrics::Metrics;
use crate::raft::batch;
use crate::store::Store;

fn core(dir: &Path) -> Core {
    let store = Store::open(dir).unwrap();
    let (events, _) = broadcast::channel(16);
    Core::new(
        CoreConfig::default(),
        store,
        events,
        Arc::new(Metrics::default()),
    )
    .unwrap()
}

fn submit(name: &str) -> Command {
    Command::Submit {
        at_ms: 1,
        key: None,
        jobs: vec![JobSpec::for_test(name)],
        pipeline: None,
        owner: None,
    }
}

/// Commands proposed in one round share an entry: each is applied in
/// order, on the state the ones before it left, and has its own typed
/// outcome (a refusal included); the entry is written in one batch with
/// its index (once the store writes what it holds back).
#[test]
fn commands_sharing_an_entry_each_get_their_own_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(dir.path());
    let commands = [
        submit("a"),
        Command::RequestCancel { at_ms: 2, job: 99 },
        submit("b"),
        Command::RequestCancel { at_ms: 3, job: 1 },
    ];
    let encoded: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| <Core as ReplicatedStateMachine>::encode(c).unwrap())
        .collect();
    let entry = batch::encode(&encoded);
    let outcomes = core.apply(7, &batch::decode(&entry).unwrap()).unwrap();
    assert_eq!(
        outcomes,
        [
            Ok(Outcome::Submitted(vec![1])),
            Err(ApplyError::JobNotFound(99)),
            Ok(Outcome::Submitted(vec![2])),
            Ok(Outcome::CancelRequested {
                state: JobState::Cancelled,
                stop: None,
            }),
        ]
    );
    // Held back for the next entries, then written with the index.
    assert_eq!(core.applied_index().unwrap(), 0);
    core.store.write_pending(&core.state).unwrap();
    assert_eq!(core.applied_index().unwrap(), 7);
    let stored = core.store.load().unwrap();
    let states: Vec<_> = stored.jobs().map(|j| (j.id, j.state)).collect();
    assert_eq!(
        states,
        [(1, JobState::Cancelled), (2, JobState::Pending)],
        "every command's changes are stored with the entry"
    );
}

/// A command that does not decode stops the replica (the loop treats
/// `Err` as fatal) before any command of its entry is applied: a replica
/// that skipped it would diverge from those that can read it.
#[test]
fn an_undecodable_command_is_fatal_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(dir.path());
    let good = <Core as ReplicatedStateMachine>::encode(&submit("a")).unwrap();
    let error = core.apply(3, &[&good, b"not json"]).unwrap_err();
    assert!(
        error.contains("entry 3: command 1 does not decode"),
        "{error}"
    );
    assert_eq!(core.state.jobs().count(), 0, "nothing of the entry applied");
    assert_eq!(core.applied_index().unwrap(), 0);
}

#[test]
fn snapshots_are_checked_before_install() {
    let dir = tempfile::tempdir().unwrap();
    let mut core = core(dir.path());
    let file = dir.path().join("snap");
    std::fs::write(&file, b"not json").unwrap();
    assert!(
        core.check_snapshot(&file)
            .unwrap_err()
            .contains("undecodable snapshot")
    );
    let mut taken = Vec::new();
    core.snapshot().unwrap()(&mut taken).unwrap();
    std::fs::write(&file, &taken).unwrap();
    core.check_snapshot(&file).unwrap();
}
