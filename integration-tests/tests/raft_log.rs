//! The Raft log in segment files of its own (`raft-wal`): a replica
//! killed -9 whose newest segment ends in a record cut short (what a write
//! torn by a crash leaves) starts, reads its log up to the last whole
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

    // The last written byte of its newest segment flipped: the last
    // record fails its checksum, as a torn write's does (the rest of a
    // segment is preallocated zeros).
    let before = segments(&set.dirs[follower - 1])?;
    let newest = before.last().expect("a segment").clone();
    let bytes = std::fs::read(&newest)?;
    let last = bytes
        .iter()
        .rposition(|byte| *byte != 0)
        .expect("a record in the newest segment");
    let file = std::fs::OpenOptions::new().write(true).open(&newest)?;
    file.write_all_at(&[bytes[last] ^ 0xff], last as u64)?;
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
