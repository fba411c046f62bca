#![allow(clippy::unwrap_used)]

use super::super::history::tests::{HOUR, fresh_with_a_node, hold, run_job, run_job_with};
use super::*;

/// The store's whole state as a snapshot (as JSON, submission keys
/// sorted: their order in memory is a hash map's), its events and next
/// event index.
fn stored(store: &Store, state: &StateMachine) -> (String, Vec<u64>, u64) {
    let events = store
        .events_since(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|event| event.index)
        .collect();
    let mut snapshot =
        crate::store::decode_snapshot(&store.snapshot_bytes(state).unwrap()).unwrap();
    snapshot.submissions.sort();
    (
        serde_json::to_string(&snapshot).unwrap(),
        events,
        state.next_event_index(),
    )
}

/// Takes a snapshot of `state` into `file`, as the replica loop does
/// (what was held back written first), and returns its mark.
fn snapshot_into(store: &mut Store, state: &StateMachine, file: &Path) -> SnapshotMark {
    store.write_pending(state).unwrap();
    let mut bytes = Vec::new();
    let mark = store.write_snapshot(state, &mut bytes).unwrap();
    std::fs::write(file, bytes).unwrap();
    mark
}

/// Reopens the store in `dir` and loads it.
fn reopen(store: Store, dir: &Path) -> (Store, StateMachine) {
    drop(store);
    let mut store = Store::open(dir).unwrap();
    let state = store.load().unwrap();
    (store, state)
}

/// A snapshot the replica took becomes the base: the journal starts
/// empty, the events move to the new event log, and the stored state
/// (reopened, with writes after the rebase laid over it) is unchanged.
#[test]
fn a_snapshot_taken_becomes_the_base_and_the_journal_starts_again() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    for at in [10, 20, 30] {
        run_job(&mut sm, &mut store, &mut index, at);
    }
    assert!(store.trees.journal.len() >= 9, "a write per entry");
    let journaled = store.journal_bytes;
    assert_eq!(journaled, journal::stored_bytes(&store.trees).unwrap());
    assert!(
        !store.rebase_due(),
        "{journaled} bytes are far below the minimum"
    );
    let before = stored(&store, &sm);
    assert!(before.1.len() >= 9, "events: {:?}", before.1);
    let generation = store.base.generation;

    let file = dir.path().join("taken.snap");
    let mark = snapshot_into(&mut store, &sm, &file);
    store.rebase(&file, index, mark, &sm).unwrap();
    // The Raft storage deletes its older snapshot files; the base is a link.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(store.base.generation, generation + 1);
    assert!(store.trees.journal.is_empty(), "the journal starts again");
    assert!(store.base.events.is_empty(), "the events are in the log");
    assert_eq!(store.applied_index().unwrap(), index);
    assert_eq!(stored(&store, &sm), before);
    assert!(store.journal_bytes < journaled, "only the events are left");
    assert_eq!(
        store.journal_bytes,
        journal::stored_bytes(&store.trees).unwrap(),
        "counted as copied"
    );
    assert_eq!(
        store.base_bytes,
        std::fs::metadata(store.files.path(store.base.generation))
            .unwrap()
            .len()
    );

    let (store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), before);
    let mut store = store;
    assert!(
        store.base.events.is_empty(),
        "not read back from the base file"
    );

    // Written after the rebase: laid over the base on load. The job run
    // two hours on retires the first three, and the event floor rises.
    let floor = sm.event_floor();
    let last = run_job(&mut sm, &mut store, &mut index, 2 * HOUR);
    assert!(sm.event_floor() > floor, "the floor rose");
    let after = stored(&store, &sm);
    assert!(after.1.iter().all(|&event| event >= sm.event_floor()));
    let (store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), after);
    assert!(loaded.job(last).is_some());
    assert_eq!(loaded.jobs().count(), 1, "the first three retired");
}

/// A snapshot whose file was written while more entries were applied
/// (the replica loop writes it off the loop): the rebase on it carries the
/// journal's writes made since it was taken into the new generation, so
/// the stored state, reopened, is the state now, not the snapshot's; the
/// new journal holds only those writes.
#[test]
fn a_rebase_carries_over_what_was_applied_while_the_snapshot_was_written() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    for at in [10, 20, 30] {
        run_job(&mut sm, &mut store, &mut index, at);
    }
    let file = dir.path().join("taken.snap");
    let mark = snapshot_into(&mut store, &sm, &file);
    let taken_at = index;
    let at_snapshot = stored(&store, &sm);

    // Applied meanwhile: two jobs run, one held back unwritten (the
    // rebase writes it), then a job two hours on retires the first ones
    // and raises the event floor.
    run_job(&mut sm, &mut store, &mut index, 40);
    run_job_with(hold, &mut sm, &mut store, &mut index, 50);
    let floor = sm.event_floor();
    let last = run_job(&mut sm, &mut store, &mut index, 2 * HOUR);
    assert!(sm.event_floor() > floor, "the floor rose");
    let now = stored(&store, &sm);
    assert_ne!(now, at_snapshot);

    store.rebase(&file, taken_at, mark, &sm).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        !store.trees.journal.is_empty(),
        "the writes since were carried"
    );
    assert_eq!(
        store.applied_index().unwrap(),
        index,
        "the stored state is now's"
    );
    assert_eq!(stored(&store, &sm), now);
    assert_eq!(
        store.journal_bytes,
        journal::stored_bytes(&store.trees).unwrap(),
        "counted as copied"
    );

    let (mut store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), now);
    assert!(loaded.job(last).is_some());
    // Writes after the rebase go after the carried ones.
    let mut sm = loaded;
    let newer = run_job(&mut sm, &mut store, &mut index, 2 * HOUR + 10);
    let after = stored(&store, &sm);
    let (store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), after);
    assert!(loaded.job(newer).is_some());
}

/// A snapshot taken on the loop and written later, off it, after more
/// writes (here the floor rose and the event log's first values left
/// sled): the file is the state as it was taken.
#[test]
fn a_snapshot_written_after_more_writes_is_the_state_it_was_taken_of() {
    let (_dir, mut store, mut sm, mut index) = fresh_with_a_node();
    for at in [10, 20, 30] {
        run_job(&mut sm, &mut store, &mut index, at);
    }
    store.write_pending(&sm).unwrap();
    let expected = store.snapshot_bytes(&sm).unwrap();
    let (taken, _) = store.take_snapshot(&sm).unwrap();
    let first_value = |store: &Store| store.trees.event_log.first().unwrap().unwrap().0;
    let first_before = first_value(&store);

    run_job(&mut sm, &mut store, &mut index, 2 * HOUR);
    store.write_pending(&sm).unwrap();
    store.drain().unwrap();
    assert_ne!(first_value(&store), first_before, "the first value left");

    let mut written = Vec::new();
    taken.write(&mut written).unwrap();
    assert_eq!(written, expected);
}

/// A snapshot's mark is of the generation it was taken in: once another
/// base came in between (a peer's snapshot installed, or another
/// rebase), a rebase on it is refused and changes nothing.
#[test]
fn a_rebase_on_a_snapshot_of_an_older_generation_is_refused() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    run_job(&mut sm, &mut store, &mut index, 10);
    let old = dir.path().join("old.snap");
    let stale = snapshot_into(&mut store, &sm, &old);
    run_job(&mut sm, &mut store, &mut index, 20);
    let newer = dir.path().join("newer.snap");
    let mark = snapshot_into(&mut store, &sm, &newer);
    store.rebase(&newer, index, mark, &sm).unwrap();
    let generation = store.base.generation;
    let before = stored(&store, &sm);

    let error = store.rebase(&old, index - 1, stale, &sm).unwrap_err();
    assert!(
        error.to_string().contains("generation"),
        "names the generations: {error}"
    );
    assert_eq!(store.base.generation, generation);
    assert_eq!(stored(&store, &sm), before);
}

/// Reads from inside a batch start at the index asked for, and never
/// return events below the floor, whatever the batches' bounds.
#[test]
fn events_are_read_from_inside_a_batch_and_never_below_the_floor() {
    let (_dir, mut store, mut sm, mut index) = fresh_with_a_node();
    // One write for all three jobs: their events share one batch.
    for at in [10, 20, 30] {
        run_job_with(hold, &mut sm, &mut store, &mut index, at);
    }
    store.write_pending(&sm).unwrap();
    let all: Vec<u64> = store
        .events_since(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.index)
        .collect();
    let middle = all[all.len() / 2];
    let two: Vec<u64> = store
        .events_since(middle, 2)
        .unwrap()
        .iter()
        .map(|e| e.index)
        .collect();
    assert_eq!(two, vec![middle, middle + 1]);

    // The floor rises into the batch: it stays stored, but is read from
    // the floor on.
    run_job(&mut sm, &mut store, &mut index, 2 * HOUR);
    let floor = sm.event_floor();
    assert!(floor > middle, "{floor} {middle}");
    let read = store.events_since(0, usize::MAX).unwrap();
    assert_eq!(read.first().map(|e| e.index), Some(floor));
    let snapshot = crate::store::decode_snapshot(&store.snapshot_bytes(&sm).unwrap()).unwrap();
    assert!(snapshot.events.iter().all(|e| e.index >= floor));
    assert_eq!(snapshot.events.len(), read.len());
}

/// A rebase that crashed before its switch left the next generation's
/// trees and base file: the open drops them, the previous generation is
/// whole, and the next rebase succeeds.
#[test]
fn a_rebase_that_crashed_before_its_switch_leaves_the_previous_state() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    run_job(&mut sm, &mut store, &mut index, 10);
    let before = stored(&store, &sm);
    let next = store.base.generation + 1;
    let trees = base::Trees::open(&store.db, next).unwrap();
    trees
        .journal
        .insert(0u64.to_be_bytes(), b"junk".to_vec())
        .unwrap();
    trees
        .meta
        .insert(META_APPLIED_INDEX, &99u64.to_be_bytes())
        .unwrap();
    let leftover = store.files.path(next);
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"partial").unwrap();
    drop(trees);

    let (mut store, loaded) = reopen(store, dir.path());
    assert!(!leftover.exists());
    assert_eq!(store.applied_index().unwrap(), index);
    assert_eq!(stored(&store, &loaded), before);

    let file = dir.path().join("taken.snap");
    let mark = snapshot_into(&mut store, &loaded, &file);
    store.rebase(&file, index, mark, &loaded).unwrap();
    let (store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), before);
    assert_eq!(store.base.generation, next);
}

/// The generation pointer names the layout: a data directory of the
/// versions before the journal (8 bytes) opens and is marked, so that
/// those versions refuse it from then on; one of a newer layout, or a
/// torn pointer, is refused.
#[test]
fn the_generation_pointer_carries_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = |store: &Store| store.db.open_tree("generation").unwrap();
    let store = Store::open(dir.path()).unwrap();
    let marked = root(&store).get("current").unwrap().unwrap();
    assert_eq!(marked.len(), 16, "a fresh directory is marked");
    assert_eq!(marked[8..], base::LAYOUT.to_be_bytes());

    root(&store).insert("current", &0u64.to_be_bytes()).unwrap();
    let store = reopen(store, dir.path()).0;
    assert_eq!(root(&store).get("current").unwrap().unwrap().len(), 16);

    let mut newer = 0u64.to_be_bytes().to_vec();
    newer.extend_from_slice(&(base::LAYOUT + 1).to_be_bytes());
    root(&store).insert("current", newer).unwrap();
    drop(store);
    let error = Store::open(dir.path()).err().unwrap().to_string();
    assert!(error.contains("newer version"), "{error}");

    let store = {
        // Put back, then torn.
        let db = crate::store::open_db(&dir.path().join("state")).unwrap();
        db.open_tree("generation")
            .unwrap()
            .insert("current", &[0u8; 5])
            .unwrap();
        db.flush().unwrap();
        drop(db);
        Store::open(dir.path())
    };
    let error = store.err().unwrap().to_string();
    assert!(error.contains("5 bytes"), "{error}");
}

/// 1,500 submits with long keys, held back: round `round`'s times and
/// keys.
fn hold_submits(sm: &mut StateMachine, store: &mut Store, index: &mut u64, round: u64) {
    for at in 0..1500u64 {
        hold(
            sm,
            store,
            index,
            crate::command::Command::Submit {
                at_ms: 100 + round * 10_000 + at,
                key: Some(format!("{round}-{at:06}-{}", "k".repeat(60))),
                jobs: vec![crate::domain::JobSpec::for_test("train")],
                pipeline: None,
                owner: None,
            },
        );
    }
}

/// A write of many nodes and submission keys is split into journal values
/// of at most `VALUE_BYTES` each, and sled keeps the leaves that hold them
/// inline (a node past a quarter of a 512 KiB segment is a file of its own
/// in `blobs`, which sled never fsyncs); reopened, the state is the same. The node records were one value before (230-450 KB
/// in `gantry-bench e2e`, 28 files a second on each replica).
#[test]
fn a_large_write_is_split_into_journal_values_sled_keeps_inline() {
    let (dir, mut store, mut sm, mut index) = fresh_with_a_node();
    let written = store.trees.journal.len();
    for node in 0..600 {
        let name = format!("node-{node:04}");
        hold(
            &mut sm,
            &mut store,
            &mut index,
            crate::command::Command::register_for_test(&name, 8, 80 << 30),
        );
    }
    hold_submits(&mut sm, &mut store, &mut index, 0);
    store.write_pending(&sm).unwrap();
    store.writer.drain().unwrap();
    let sizes: Vec<usize> = store
        .trees
        .journal
        .iter()
        .values()
        .skip(written)
        .map(|value| value.unwrap().len())
        .collect();
    let total: usize = sizes.iter().sum();
    assert!(total > 4 * journal::VALUE_BYTES, "{total} bytes written");
    assert!(
        sizes.iter().all(|&len| len <= journal::VALUE_BYTES),
        "{sizes:?}"
    );
    // sled keeps every leaf of them inline in its log (a leaf past a
    // quarter of a segment would be a file of its own in `blobs`), also
    // once leaves fill and split.
    for round in 1..=8 {
        hold_submits(&mut sm, &mut store, &mut index, round);
        store.write_pending(&sm).unwrap();
    }
    store.flush().unwrap();
    let blobs = std::fs::read_dir(dir.path().join("state").join("blobs"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "sled blob files");
    let before = stored(&store, &sm);
    let (store, loaded) = reopen(store, dir.path());
    assert_eq!(stored(&store, &loaded), before);
    assert_eq!(loaded.nodes().count(), 601);
}
