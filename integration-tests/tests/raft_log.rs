//! The Raft log in segment files of its own (`raft-wal`): a replica
//! killed -9 whose newest segment ends in a record cut short (what a write
//! torn by a crash leaves, after the records it had synced) starts, reads its log up to the last whole
//! record, appends to a new segment and catches up from the leader; every
//! job is on every replica and their storages agree.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(60);

/// The segment files of the log in `data_dir`, oldest first.
fn segments(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(data_dir.join("raft-wal"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// A segment's header (magic and sequence number) before its records.
const SEGMENT_HEADER: usize = 16;

/// The offset after a segment's last record: records are `len: u32 |
/// crc32: u32 | body`, and a zero length is the preallocated rest.
fn records_end(bytes: &[u8]) -> usize {
    let mut at = SEGMENT_HEADER;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 {
            break;
        }
        at += 8 + len;
    }
    at
}

#[test]
fn a_replica_whose_log_ends_in_a_torn_record_restarts_and_catches_up() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let mut submitted = 0;
    for i in 0..10 {
        sandbox.submit(&addrs, &["--name", &format!("before-{i}"), "--", "true"])?;
        submitted += 1;
    }
    sandbox.wait_applied(&set.urls, T)?;
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let index = set.procs[follower - 1].take().expect("follower process");
    sandbox.proc(index).kill9();

    // What a write torn by the crash leaves after the last whole record
    // (the rest of a segment is preallocated zeros): a record's length
    // and checksum, and part of its body. Every record before it was
    // synced and acknowledged, and stays: damaging one of those (as an
    // earlier version of this test did, by flipping the last record's
    // last byte) loses an entry the leader counts as replicated, which no
    // Raft log survives; the leader's heartbeats then carry a commit index
    // past the follower's log, which it refuses, and it never catches up.
    let before = segments(&set.dirs[follower - 1])?;
    let newest = before.last().expect("a segment").clone();
    let bytes = std::fs::read(&newest)?;
    let end = records_end(&bytes);
    assert!(end > SEGMENT_HEADER, "a record in the newest segment");
    let mut torn = 100u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&0xdead_beef_u32.to_le_bytes());
    torn.extend_from_slice(&[0xab; 20]);
    let file = std::fs::OpenOptions::new().write(true).open(&newest)?;
    file.write_all_at(&torn, end as u64)?;
    drop(file);

    for i in 0..10 {
        sandbox.submit(
            &addrs,
            &["--name", &format!("while-down-{i}"), "--", "true"],
        )?;
        submitted += 1;
    }
    sandbox.start_replica(&mut set, follower)?;
    for i in 0..5 {
        sandbox.submit(&addrs, &["--name", &format!("after-{i}"), "--", "true"])?;
        submitted += 1;
    }
    sandbox.wait_applied(&set.urls, T)?;
    let after = segments(&set.dirs[follower - 1])?;
    assert!(
        after.len() > before.len() && after.contains(&newest),
        "the restarted replica appends to a new segment and keeps the old one: {before:?} -> {after:?}"
    );

    sandbox.stop_and_check_replicas(&mut set, submitted)?;
    Ok(())
}
