#![allow(clippy::unwrap_used)]

use protobuf::Message as _;
use raft::Storage as _;

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("e{index}").into_bytes().into(),
        ..Default::default()
    }
}

fn open_temp() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    (dir, db)
}

fn open_storage(dir: &tempfile::TempDir, db: &sled::Db) -> Result<SledRaftStorage, RaftError> {
    open_with_segments(dir, db, super::super::wal::DEFAULT_SEGMENT_BYTES)
}

/// Segments of `segment_bytes`: small ones roll over within a test.
fn open_with_segments(
    dir: &tempfile::TempDir,
    db: &sled::Db,
    segment_bytes: u64,
) -> Result<SledRaftStorage, RaftError> {
    let files = SnapshotDir::open(&dir.path().join("snaps"), 1 << 20).unwrap();
    // The real syncer: the storage's flushes are fdatasynced in tests too.
    let syncer = crate::durable::Syncer::open(dir.path()).unwrap();
    SledRaftStorage::open_sized(db, files, &dir.path().join("wal"), segment_bytes, syncer)
}

fn fill(data: &'static [u8]) -> impl FnMut(&mut dyn Write) -> Result<(), String> {
    move |out| out.write_all(data).map_err(|e| e.to_string())
}

fn snapshot_bytes(storage: &SledRaftStorage) -> Vec<u8> {
    std::fs::read(storage.snapshot_file().unwrap()).unwrap()
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.index).collect()
}

#[test]
fn fresh_storage_is_empty_and_initialises_voters() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    assert!(storage.is_fresh());
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 1);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 0);
    assert_eq!(storage.term(0).unwrap(), 0);
    storage.initialize(vec![1, 2, 3]).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert!(!storage.is_fresh());
    assert_eq!(
        storage.initial_state().unwrap().conf_state.voters,
        vec![1, 2, 3]
    );
}

#[test]
fn entries_terms_and_indexes() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage
        .append(&[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)])
        .unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 1);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 4);
    for (index, term) in [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)] {
        assert_eq!(storage.term(index).unwrap(), term, "term of {index}");
    }
    assert!(matches!(
        storage.term(5),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    assert_eq!(
        indexes(&storage.entries(1, 5, None, ctx()).unwrap()),
        [1, 2, 3, 4]
    );
    assert_eq!(
        indexes(&storage.entries(2, 4, None, ctx()).unwrap()),
        [2, 3]
    );
    // A size limit still returns at least one entry.
    assert_eq!(indexes(&storage.entries(2, 5, 0, ctx()).unwrap()), [2]);
    let one = u64::from(entry(2, 1).compute_size());
    assert_eq!(
        indexes(&storage.entries(2, 5, one * 2, ctx()).unwrap()),
        [2, 3]
    );
    assert!(storage.entries(1, 6, None, ctx()).is_err());
}

#[test]
fn append_replaces_a_conflicting_suffix_and_refuses_gaps() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage
        .append(&[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)])
        .unwrap();
    storage.append(&[entry(3, 2)]).unwrap();
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 3);
    assert_eq!(storage.term(3).unwrap(), 2);
    assert_eq!(
        indexes(&storage.entries(1, 4, None, ctx()).unwrap()),
        [1, 2, 3]
    );
    let error = storage.append(&[entry(6, 2)]).unwrap_err();
    assert!(error.to_string().contains("gap"), "{error}");
    // Survives a reopen, and the removed entry 4 is gone for good.
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 3);
    assert_eq!(storage.term(3).unwrap(), 2);
}

#[test]
fn hard_state_persists() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.append(&[entry(1, 3), entry(2, 3)]).unwrap();
    let hs = HardState {
        term: 3,
        vote: 2,
        commit: 1,
        ..Default::default()
    };
    storage.set_hard_state(&hs).unwrap();
    storage.set_commit(2).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    let state = storage.initial_state().unwrap().hard_state;
    assert_eq!((state.term, state.vote, state.commit), (3, 2, 2));
}

/// Compaction moves the log's start at once and drops its entries from
/// memory; the segment files it passed go a step at a time, once the
/// compaction point is synced, the one being written never. Reopened, the
/// log starts where it was compacted, even with every old segment still
/// there (a replica stopped before its steps ran).
#[test]
fn compaction_moves_the_start_and_removes_the_segments_it_passed() {
    let (dir, db) = open_temp();
    let mut storage = open_with_segments(&dir, &db, 8192).unwrap();
    storage.initialize(vec![1]).unwrap();
    let count = 300;
    for index in 1..=count {
        let mut entry = entry(index, 1);
        entry.data = vec![7u8; 100].into();
        storage.append(&[entry]).unwrap();
        storage.flush().unwrap();
    }
    storage.set_commit(count).unwrap();
    let segments = storage.segment_files();
    assert!(segments >= 3, "{segments} segments");
    let through = 250;
    storage
        .create_snapshot(through, &mut fill(b"state"), 0)
        .unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), through + 1);
    assert!(matches!(
        raft::Storage::entries(&storage, through, count, None, ctx()),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(storage.segment_files(), segments, "none removed yet");

    // Stopped here: the old segments are read again and skipped.
    storage.flush().unwrap();
    drop(storage);
    let mut storage = open_with_segments(&dir, &db, 8192).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), through + 1);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), count);
    while storage.compact_step().unwrap() {}
    let left = storage.segment_files();
    assert!(left < segments, "{left} of {segments} segments left");
    assert_eq!(
        indexes(
            &storage
                .entries(through + 1, count + 1, None, ctx())
                .unwrap()
        ),
        (through + 1..=count).collect::<Vec<_>>()
    );
    storage.append(&[entry(count + 1, 1)]).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = open_with_segments(&dir, &db, 8192).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), through + 1);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), count + 1);
}

#[test]
fn snapshot_compacts_keeping_a_tail() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.initialize(vec![1]).unwrap();
    let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 6)).collect();
    storage.append(&entries).unwrap();
    storage.set_commit(10).unwrap();
    assert!(matches!(
        storage.snapshot(0, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
    storage
        .create_snapshot(8, &mut fill(b"state@8"), 3)
        .unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 6);
    assert_eq!(storage.term(5).unwrap(), 1);
    assert_eq!(storage.term(8).unwrap(), 2);
    assert!(matches!(
        storage.term(4),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        storage.entries(5, 11, None, ctx()),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(
        indexes(&storage.entries(6, 11, None, ctx()).unwrap()),
        [6, 7, 8, 9, 10]
    );
    let snapshot = storage.snapshot(0, 2).unwrap();
    assert_eq!(snapshot.get_metadata().index, 8);
    assert_eq!(snapshot.get_metadata().term, 2);
    assert_eq!(snapshot.get_metadata().get_conf_state().voters, vec![1]);
    assert_eq!(
        Descriptor::decode(&snapshot.data).unwrap().size,
        b"state@8".len() as u64
    );
    assert_eq!(snapshot_bytes(&storage), b"state@8");
    // Reopens with the same shape.
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 6);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 10);
    assert_eq!(storage.snapshot_index_term(), (8, 2));
}

#[test]
fn installing_a_snapshot_replaces_the_log() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.initialize(vec![1, 2, 3]).unwrap();
    storage
        .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
        .unwrap();
    storage.set_commit(2).unwrap();
    let descriptor = storage
        .write_snapshot_file(20, 4, &mut fill(b"state@20"))
        .unwrap();
    let snapshot = snapshot_message(&descriptor, 20, 4, vec![1, 2, 3]);
    storage.apply_snapshot(&snapshot).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 21);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 20);
    assert_eq!(storage.term(20).unwrap(), 4);
    assert_eq!(storage.hard_state().commit, 20);
    assert_eq!(storage.hard_state().term, 4);
    storage.append(&[entry(21, 4)]).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 21);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 21);
    assert_eq!(snapshot_bytes(&storage), b"state@20");
}

/// An installed snapshot drops the log past it at once, in memory and
/// (by a reset record) in the files; reopened, the entries appended
/// after it follow the snapshot. A crash after the snapshot's metadata
/// was synced and before the log's records were leaves the old entries
/// past it (Raft overwrites them) and lifts the commit index and term to
/// the snapshot's.
#[test]
fn installing_a_snapshot_drops_the_log_past_it_across_crashes() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.initialize(vec![1, 2, 3]).unwrap();
    let entries: Vec<Entry> = (1..=30).map(|i| entry(i, 1)).collect();
    storage.append(&entries).unwrap();
    storage.set_commit(5).unwrap();
    storage.flush().unwrap();
    let install = |storage: &mut SledRaftStorage, index: u64, term: u64| {
        let descriptor = storage
            .write_snapshot_file(index, term, &mut fill(b"state"))
            .unwrap();
        let snapshot = snapshot_message(&descriptor, index, term, vec![1, 2, 3]);
        storage.apply_snapshot(&snapshot).unwrap();
    };
    install(&mut storage, 12, 2);
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 13);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 12);
    storage.append(&[entry(13, 2)]).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let mut storage = open_storage(&dir, &db).unwrap();
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 13);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 13);
    assert_eq!(storage.term(13).unwrap(), 2);

    // Killed after the metadata's sync, before the log's: the reset and
    // hard state are never written out.
    install(&mut storage, 20, 3);
    std::mem::forget(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(storage.snapshot_index_term(), (20, 3));
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 21);
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 20);
    let hard_state = storage.hard_state();
    assert_eq!((hard_state.term, hard_state.commit), (3, 20));
}

/// A crash in the middle of writing a snapshot (the application failed,
/// or the process died leaving a truncated temporary file) leaves the
/// previous snapshot the stored one, readable and whole after a restart.
#[test]
fn a_crash_mid_write_leaves_the_previous_snapshot_usable() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.initialize(vec![1]).unwrap();
    let entries: Vec<Entry> = (1..=30).map(|i| entry(i, 1)).collect();
    storage.append(&entries).unwrap();
    storage.set_commit(30).unwrap();
    storage
        .create_snapshot(10, &mut fill(b"state@10"), 2)
        .unwrap();
    // The application fails half-way through the next one.
    let error = storage
        .create_snapshot(
            20,
            &mut |out| {
                out.write_all(b"state@2").map_err(|e| e.to_string())?;
                Err("killed".into())
            },
            2,
        )
        .unwrap_err();
    assert!(error.to_string().contains("killed"), "{error}");
    assert_eq!(storage.snapshot_index_term(), (10, 1));
    assert_eq!(raft::Storage::first_index(&storage).unwrap(), 9);
    // The process dies writing the one after: a truncated temporary file.
    let snaps = dir.path().join("snaps");
    std::fs::write(snaps.join(format!("snap-{:020}-{:020}.tmp", 25, 1)), b"sta").unwrap();
    storage.flush().unwrap();
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(storage.snapshot_index_term(), (10, 1));
    assert_eq!(storage.snapshot(0, 2).unwrap().get_metadata().index, 10);
    assert_eq!(snapshot_bytes(&storage), b"state@10");
    // The leftover is gone; only the usable snapshot remains.
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 1);
}

/// A snapshot stored whole in `snapshot_data` (before snapshots were
/// files) moves to a file on open; a missing file is refused.
#[test]
fn a_snapshot_stored_whole_moves_to_a_file_and_a_missing_file_is_refused() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.initialize(vec![1]).unwrap();
    storage.append(&[entry(1, 1), entry(2, 1)]).unwrap();
    storage.set_commit(2).unwrap();
    storage.create_snapshot(2, &mut fill(b"new"), 0).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let meta = db.open_tree(META_TREE).unwrap();
    meta.insert(SNAPSHOT_DATA_KEY, &b"{\"whole\":\"state\"}"[..])
        .unwrap();
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(snapshot_bytes(&storage), b"{\"whole\":\"state\"}");
    assert!(Descriptor::is_descriptor(
        &meta.get(SNAPSHOT_DATA_KEY).unwrap().unwrap()
    ));
    std::fs::remove_file(storage.snapshot_file().unwrap()).unwrap();
    drop(storage);
    let error = open_storage(&dir, &db).err().unwrap();
    assert!(
        error.to_string().contains("the snapshot at index 2"),
        "{error}"
    );
}

#[test]
fn refuses_a_log_with_a_gap_or_a_commit_beyond_it() {
    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage
        .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
        .unwrap();
    storage.set_commit(3).unwrap();
    storage.flush().unwrap();
    drop(storage);
    // Entry 5 after 3, as a damaged file would hold it.
    let mut wal = Wal::open(&dir.path().join("wal"), 1 << 20, &mut |_, _| Ok(())).unwrap();
    wal.push_entry(&entry(5, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let error = open_storage(&dir, &db).err().unwrap();
    assert!(error.to_string().contains("gap"), "{error}");

    let (dir, db) = open_temp();
    let mut storage = open_storage(&dir, &db).unwrap();
    storage.append(&[entry(1, 1), entry(2, 1)]).unwrap();
    storage.set_commit(1).unwrap();
    storage.flush().unwrap();
    drop(storage);
    let mut wal = Wal::open(&dir.path().join("wal"), 1 << 20, &mut |_, _| Ok(())).unwrap();
    wal.push_hard_state(&HardState {
        commit: 3,
        ..Default::default()
    })
    .unwrap();
    wal.sync().unwrap();
    drop(wal);
    let error = open_storage(&dir, &db).err().unwrap();
    assert!(
        error
            .to_string()
            .contains("commit index 3 is beyond the last log index 2"),
        "{error}"
    );
}

/// A log kept in sled's `raft_log` tree (storage written before the log
/// had files) moves into the files at open, with the hard state, and the
/// tree is dropped; the next open reads the files alone.
#[test]
fn a_log_in_sled_moves_to_the_files() {
    let (dir, db) = open_temp();
    let log = db.open_tree(LOG_TREE).unwrap();
    let meta = db.open_tree(META_TREE).unwrap();
    for index in 1..=4u64 {
        log.insert(
            index.to_be_bytes(),
            entry(index, 2).write_to_bytes().unwrap(),
        )
        .unwrap();
    }
    let hard_state = HardState {
        term: 2,
        vote: 1,
        commit: 3,
        ..Default::default()
    };
    meta.insert(HARD_STATE_KEY, hard_state.write_to_bytes().unwrap())
        .unwrap();
    drop((log, meta));
    let storage = open_storage(&dir, &db).unwrap();
    assert!(
        !db.tree_names()
            .iter()
            .any(|name| name == LOG_TREE.as_bytes())
    );
    assert_eq!(raft::Storage::last_index(&storage).unwrap(), 4);
    assert_eq!(storage.hard_state(), &hard_state);
    drop(storage);
    let storage = open_storage(&dir, &db).unwrap();
    assert_eq!(
        indexes(&storage.entries(1, 5, None, ctx()).unwrap()),
        [1, 2, 3, 4]
    );
    assert_eq!(storage.term(4).unwrap(), 2);
    assert_eq!(storage.hard_state(), &hard_state);
}
