//! Issue 11: Raft snapshots are files sent in chunks. A follower that
//! missed a few MiB of job state catches up from a snapshot sent in 64 KiB
//! chunks, also after it was killed -9 part-way through a transfer; the
//! snapshot becomes its stored state's base, and killed -9 again after
//! more changes it restarts from that base; every replica's storage
//! agrees after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_coordinator::raft::fault::{SNAPSHOT_CHUNK_DELAY_ENV, SNAPSHOT_WRITE_DELAY_ENV};
use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, plain, wait_until};

const T: Duration = Duration::from_secs(60);

/// Files in `dir` whose name starts with `prefix` and ends with `suffix`.
fn files(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .map(|e| e.path())
        .collect()
}

/// A spec file of `count` jobs with about 100 KB of environment each.
fn big_jobs(dir: &Path, batch: usize, count: usize) -> anyhow::Result<String> {
    let pad = "x".repeat(100_000);
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "- name: big-{batch}-{i}\n  command: [\"true\"]\n  env: {{PAD: \"{pad}\"}}\n"
        ));
    }
    let path = dir.join(format!("big-{batch}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

#[test]
fn a_follower_catches_up_from_a_chunked_snapshot_after_a_kill_mid_transfer() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    // Senders wait 20 ms before each chunk (a debug-build fault hook): a
    // transfer of ~6 MiB in 64 KiB chunks takes about 2 s, long enough to
    // kill its receiver part-way through.
    sandbox.set_daemon_env(SNAPSHOT_CHUNK_DELAY_ENV, "20");
    let mut set = sandbox.start_replicas(&[
        "--raft-compact-after",
        "20",
        "--raft-snapshot-chunk",
        "64KiB",
    ])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let index = set.procs[follower - 1].take().expect("follower process");
    sandbox.proc(index).kill9();

    // A few MiB of state, then enough entries that the log is compacted
    // past everything the follower has.
    for batch in 0..2 {
        let spec = big_jobs(sandbox.path(), batch, 30)?;
        let out = sandbox.gantry(&addrs, &["submit", "-f", &spec]);
        assert_eq!(out.code, 0, "submit: {out:?}");
    }
    for i in 0..25 {
        sandbox.submit(&addrs, &["--name", &format!("small-{i}"), "--", "true"])?;
    }

    // The follower restarts; its first transfer is killed part-way.
    let snapshots = set.dirs[follower - 1].join("raft-snapshots");
    sandbox.start_replica(&mut set, follower)?;
    let partial = wait_until("a transfer under way", T, || {
        files(&snapshots, "recv-", ".tmp")
            .into_iter()
            .find(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    })?;
    let index = set.procs[follower - 1].take().expect("follower process");
    sandbox.proc(index).kill9();
    assert!(
        partial.exists(),
        "the killed transfer left its temporary file"
    );
    assert!(
        files(&snapshots, "snap-", ".snap").is_empty(),
        "nothing was installed from the killed transfer"
    );

    // Restarted again, it catches up by snapshot; the leftover is gone.
    sandbox.start_replica(&mut set, follower)?;
    let leader_url = set.urls[leader - 1].clone();
    let restarted = set.urls[follower - 1].clone();
    let caught_up = |sandbox: &Sandbox| -> anyhow::Result<()> {
        let target = sandbox.gantry_json(&leader_url, &["status"])?["commit_index"]
            .as_u64()
            .unwrap_or(0);
        wait_until("the follower to catch up", T, || {
            let status = sandbox.gantry_json(&restarted, &["status"]).ok()?;
            (status["applied_index"].as_u64()? >= target).then_some(())
        })
    };
    caught_up(&sandbox)?;
    assert!(!partial.exists(), "the leftover transfer was removed");
    // The installed snapshot is its stored state's base (nothing written
    // per record); killed -9 with changes over that base, it restarts
    // from the base and the trees and goes on.
    let bases = set.dirs[follower - 1].join("state-base");
    assert_eq!(files(&bases, "", ".snap").len(), 1, "one base: {bases:?}");
    for i in 0..5 {
        sandbox.submit(&addrs, &["--name", &format!("after-{i}"), "--", "true"])?;
    }
    caught_up(&sandbox)?;
    let index = set.procs[follower - 1].take().expect("follower process");
    sandbox.proc(index).kill9();
    sandbox.start_replica(&mut set, follower)?;
    for i in 5..10 {
        sandbox.submit(&addrs, &["--name", &format!("after-{i}"), "--", "true"])?;
    }
    caught_up(&sandbox)?;
    assert_eq!(files(&bases, "", ".snap").len(), 1, "one base: {bases:?}");
    let logs: Vec<String> = std::fs::read_dir(sandbox.path())?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("replica-{follower}-"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    assert!(
        logs.iter()
            .any(|log| log.contains("installed raft snapshot")),
        "the follower caught up by snapshot"
    );
    for id in 1..=3 {
        sandbox.stop_replica(&mut set, id);
    }
    let replicas = read_replicas(&set.dirs)?;
    assert_eq!(
        replicas[follower - 1].jobs.len(),
        95,
        "the follower has every job"
    );
    check_replicas(&replicas)?;
    Ok(())
}

/// The replica logs' lines (every replica's, every start's), colour codes
/// removed, that contain `text`.
fn log_lines(sandbox: &Sandbox, text: &str) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(sandbox.path())?.filter_map(Result::ok) {
        if !entry.file_name().to_string_lossy().starts_with("replica-") {
            continue;
        }
        if let Ok(log) = std::fs::read_to_string(entry.path()) {
            lines.extend(
                plain(&log)
                    .lines()
                    .filter(|l| l.contains(text))
                    .map(String::from),
            );
        }
    }
    Ok(lines)
}

/// A replica writes its snapshot's file off its loop and goes on applying
/// meanwhile (here each write waits 300 ms first, a debug-build fault
/// hook). What it applied in between is carried into the stored state's
/// new base, so kills -9 of every replica, some with a snapshot in flight,
/// lose nothing: after restarts every acknowledged job is on every
/// replica, and their storages agree.
#[test]
fn snapshots_written_off_the_loop_keep_what_was_applied_meanwhile_across_kills()
-> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    sandbox.set_daemon_env(SNAPSHOT_WRITE_DELAY_ENV, "300");
    let mut set = sandbox.start_replicas(&["--raft-compact-after", "8"])?;
    let addrs = set.addrs();
    let mut submitted = 0;
    for round in 0..3 {
        for i in 0..15 {
            sandbox.submit(&addrs, &["--name", &format!("r{round}-{i}"), "--", "true"])?;
            submitted += 1;
        }
        // Every replica killed -9 in turn, whatever it is doing (a
        // snapshot is in flight most of the time), and restarted.
        for id in 1..=3 {
            let index = set.procs[id - 1].take().expect("replica process");
            sandbox.proc(index).kill9();
            sandbox.start_replica(&mut set, id)?;
            wait_until("a leader", T, || sandbox.leader_of(&set))?;
        }
    }
    let taken = log_lines(&sandbox, "raft snapshot taken")?;
    let carried = taken
        .iter()
        .filter(|line| line.contains("applied_since=") && !line.contains("applied_since=0 "))
        .count();
    assert!(
        carried > 0,
        "no snapshot saw entries applied while it was written: {taken:#?}"
    );
    sandbox.wait_applied(&set.urls, T)?;
    sandbox.stop_and_check_replicas(&mut set, submitted)?;
    Ok(())
}
