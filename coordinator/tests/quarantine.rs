//! A circuit-breaker quarantine is hard state: it survives apply, a restart
//! (the store), and a Raft snapshot installed on another replica, so a new
//! leader keeps it; `ClearQuarantine` ends it everywhere.

use gantry_coordinator::Command;
use gantry_coordinator::domain::Quarantine;
use gantry_coordinator::state::{ApplyError, StateMachine};
use gantry_coordinator::store::{StateSnapshot, Store};

const GIB: u64 = 1 << 30;

fn register(sm: &mut StateMachine, name: &str) {
    sm.apply(Command::register_for_test(name, 1, 80 * GIB))
        .expect("register");
}

/// Opens a store just dropped: sled's flusher thread may hold the file
/// lock for a moment after the last handle is gone.
fn reopen(path: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(path) {
            Ok(store) => return store,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("reopen: {error}; trying again");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("reopen: {error}"),
        }
    }
}

fn quarantine(at_ms: u64, node: &str, until_ms: u64) -> Command {
    Command::Quarantine {
        at_ms,
        node: node.into(),
        until_ms,
        failures: 3,
        reason: "job 1 failed here, succeeded on another node".into(),
        policy: Default::default(),
    }
}

fn quarantined(sm: &StateMachine, now_ms: u64) -> Vec<(String, u64, u32)> {
    sm.nodes()
        .filter_map(|n| {
            sm.quarantined(&n.name, now_ms)
                .map(|q| (n.name.clone(), q.until_ms, q.failures))
        })
        .collect()
}

#[test]
fn a_quarantine_survives_restart_and_snapshot_and_is_cleared_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let mut sm = store.load().expect("load");
    for name in ["a", "b", "c"] {
        register(&mut sm, name);
    }
    sm.apply(quarantine(1_000, "a", 301_000))
        .expect("quarantine");
    // Every replica decides from the command's own times: over at until_ms.
    assert_eq!(quarantined(&sm, 1_000), [("a".to_string(), 301_000, 3)]);
    assert_eq!(quarantined(&sm, 300_999).len(), 1);
    assert!(quarantined(&sm, 301_000).is_empty());
    let changes = sm.take_changes();
    assert!(changes.nodes.contains("a"), "the node record is written");
    store.persist_applied(&sm, changes, 7).expect("persist");
    store.write_pending(&sm).expect("write");
    drop(store);

    // A restart loads it.
    let mut store = reopen(dir.path());
    let loaded = store.load().expect("load");
    assert_eq!(
        loaded.node("a").and_then(|n| n.quarantine.clone()),
        Some(Quarantine {
            since_ms: 1_000,
            until_ms: 301_000,
            failures: 3,
            reason: "job 1 failed here, succeeded on another node".into(),
            trips: 1,
        })
    );

    // A snapshot installed on another replica (a new leader) has it.
    let bytes = store.snapshot_bytes(&loaded).expect("snapshot");
    let snapshot = gantry_coordinator::store::decode_snapshot(&bytes).expect("decode");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let file = other_dir.path().join("installed.snap");
    std::fs::write(&file, &bytes).expect("write the snapshot file");
    let mut other = Store::open(&other_dir.path().join("data")).expect("open other");
    let mut follower = other.install(&file, snapshot, 7).expect("install");
    assert_eq!(quarantined(&follower, 2_000), quarantined(&loaded, 2_000));

    // Apply re-checks the share: 1 of 3 nodes is quarantined already.
    assert!(matches!(
        follower.apply(quarantine(2_000, "b", 302_000)),
        Err(ApplyError::QuarantineRefused { .. })
    ));
    follower
        .apply(Command::ClearQuarantine {
            at_ms: 3_000,
            node: "a".into(),
        })
        .expect("clear");
    assert!(quarantined(&follower, 3_000).is_empty());
    let cleared = follower.node("a").and_then(|n| n.quarantine.clone());
    assert_eq!(
        cleared.map(|q| (q.since_ms, q.until_ms, q.trips)),
        Some((3_000, 3_000, 0)),
        "cleared: evidence before 3 s forgiven, doubling reset"
    );
    follower
        .apply(quarantine(4_000, "b", 304_000))
        .expect("b may go now");
    assert_eq!(
        quarantined(&follower, 4_000),
        [("b".to_string(), 304_000, 3)]
    );
}

#[test]
fn an_old_node_record_without_a_quarantine_still_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    let mut sm = store.load().expect("load");
    register(&mut sm, "a");
    let snapshot = store.snapshot(&sm).expect("snapshot");
    let mut value = serde_json::to_value(&snapshot).expect("value");
    value["nodes"][0]
        .as_object_mut()
        .expect("node object")
        .remove("quarantine");
    let snapshot: StateSnapshot = serde_json::from_value(value).expect("decodes without it");
    assert_eq!(snapshot.nodes[0].quarantine, None);
}
