//! Backups and disaster recovery (issue 15, item 2): `gantry snapshot save`
//! from a follower of a busy cluster, every replica lost, `gantry
//! coordinator --restore` into a new single-voter cluster: every job
//! acknowledged before the save is there, the agent reconnects and its
//! running attempts are reconciled (kept, same attempt) as after a
//! failover, and new jobs get ids past the fence. A damaged file and a
//! non-empty data dir are refused with one line, changing nothing.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gantry_integration_tests::{Sandbox, free_port, run_gantry, wait_until};

const T: Duration = Duration::from_secs(60);

fn job_ids(value: &serde_json::Value) -> BTreeSet<u64> {
    value
        .as_array()
        .map(|jobs| jobs.iter().filter_map(|j| j["id"].as_u64()).collect())
        .unwrap_or_default()
}

#[test]
fn a_backup_of_a_busy_cluster_restores_into_a_new_one() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    // The restored coordinator's address, known to the agent from the start
    // (as a DNS name or a floating address would be).
    let port = free_port("127.0.0.1")?;
    let restored_url = format!("http://127.0.0.1:{port}");
    sandbox.start_agent(
        "node-a",
        &format!("{addrs},{restored_url}"),
        "2xH100-80GiB",
        "127.0.0.1",
        &[],
    )?;
    sandbox.wait_nodes_ready(&addrs, 1, T)?;

    // Two jobs run through the backup and the restore.
    let mut long = Vec::new();
    for _ in 0..2 {
        long.push(sandbox.submit(&addrs, &["--gpus", "0", "--", "sleep", "600"])?);
    }
    for id in &long {
        sandbox.wait_job_state(&addrs, *id, "running", T)?;
    }

    // A submit load runs while the backup is taken.
    let stop = AtomicBool::new(false);
    let acknowledged = Mutex::new(Vec::<u64>::new());
    let follower = set.urls[leader % 3].clone();
    let file = sandbox.path().join("backup.gantry");
    let file_arg = file.display().to_string();
    let (before, saved) = std::thread::scope(|scope| -> anyhow::Result<_> {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let out = run_gantry(
                    &addrs,
                    &[],
                    &["submit", "-o", "json", "--gpus", "0", "--", "true"],
                );
                if let Some(id) = out.json().ok().and_then(|v| v["job_ids"][0].as_u64()) {
                    acknowledged.lock().expect("lock").push(id);
                }
            }
        });
        wait_until("a few acknowledged submits", T, || {
            (acknowledged.lock().expect("lock").len() >= 5).then_some(())
        })?;
        let before: BTreeSet<u64> = acknowledged.lock().expect("lock").iter().copied().collect();
        let saved = sandbox.gantry(&follower, &["snapshot", "save", &file_arg]);
        // More submits after the save: acknowledged, then lost with the cluster.
        let after = acknowledged.lock().expect("lock").len();
        let _ = wait_until("submits after the save", T, || {
            (acknowledged.lock().expect("lock").len() >= after + 3).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        Ok((before, saved))
    })?;
    assert_eq!(saved.code, 0, "{saved:?}");
    assert!(saved.stdout.contains("saved"), "{saved:?}");

    // Disaster: every replica is lost.
    for index in set.procs.iter().flatten() {
        sandbox.proc(*index).kill9();
    }

    // A damaged copy and a used data dir are refused, changing nothing.
    let mut damaged = std::fs::read(&file)?;
    let last = damaged.len() - 2;
    damaged[last] ^= 0x20;
    let damaged_path = sandbox.path().join("damaged.gantry");
    std::fs::write(&damaged_path, damaged)?;
    let fresh = sandbox.path().join("never-made");
    let refuse = |backup: &std::path::Path, dir: &std::path::Path| {
        sandbox.gantry_bounded(
            &[
                "coordinator",
                "--restore",
                &backup.display().to_string(),
                "--data-dir",
                &dir.display().to_string(),
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "off",
            ],
            T,
        )
    };
    let out = refuse(&damaged_path, &fresh);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("checksum mismatch"), "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
    assert!(!fresh.exists(), "a refused restore creates nothing");
    let out = refuse(&file, &set.dirs[0]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not empty"), "{out:?}");

    // Restore into a new single-voter cluster on the address the agent knows.
    let restored = sandbox.start_coordinator_at("restored", port, &["--restore", &file_arg])?;
    let url = restored.url.clone();
    let jobs = job_ids(&sandbox.gantry_json(&url, &["jobs", "--limit", "0"])?);
    let missing: Vec<_> = before.difference(&jobs).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the save, missing: {missing:?}"
    );
    for id in &long {
        assert!(jobs.contains(id), "long job {id} missing");
    }

    // The agent reconnects; its running attempts are kept, as after a
    // failover (same attempt, still running, no second attempt).
    sandbox.wait_nodes_ready(&url, 1, T)?;
    for id in &long {
        let job = wait_until("the long job reconciled as running", T, || {
            let job = sandbox.job(&url, *id).ok()?;
            (job["state"] == "running").then_some(job)
        })?;
        let attempts = job["attempts"].as_array().map(Vec::len);
        assert_eq!(attempts, Some(1), "{job}");
    }
    // New jobs get ids past the fence, and run.
    let new = sandbox.submit(&url, &["--gpus", "0", "--", "true"])?;
    let highest = before.iter().chain(&long).max().copied().unwrap_or(0);
    assert!(
        new > highest + 1_000_000,
        "new id {new} must be past the fence after {highest}"
    );
    sandbox.wait_job_state(&url, new, "succeeded", T)?;
    Ok(())
}
