//! Three coordinator replicas (raft-rs over gRPC) on 127.0.0.11..13 with
//! agents: the leader is killed while a client submits; nothing acknowledged
//! is lost or duplicated, running jobs keep running and their exits are
//! recorded; the killed replica catches up; a minority refuses writes.

use std::collections::BTreeSet;
use std::time::Duration;

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(40);

#[test]
fn leader_failover_loses_no_acknowledged_job_and_a_minority_refuses_writes() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    // Snapshots every 20 entries, so the restarted replica must catch up by snapshot.
    let mut set = sandbox.start_replicas(&["--raft-compact-after", "20"])?;
    let addrs = set.addrs();
    let first_leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    sandbox.start_agent("node-a", &addrs, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.start_agent("node-b", &addrs, "1xH100-80GiB", "127.0.0.3", &[])?;
    sandbox.wait_nodes_ready(&addrs, 2, T)?;

    // A job that is running across the failover.
    let gate = sandbox.path().join("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo survived",
        gate.display()
    );
    let long = sandbox.submit(
        &addrs,
        &[
            "--gpus",
            "1",
            "--gpu-memory",
            "8GiB",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )?;
    sandbox.wait_job_state(&addrs, long, "running", T)?;

    // Submit in a loop; kill -9 the leader part-way through.
    let mut acknowledged = Vec::new();
    for i in 0..24 {
        if i == 8 {
            let index = set.procs[first_leader - 1].take().expect("leader process");
            sandbox.proc(index).kill9();
        }
        let key = format!("loop-{i}");
        let name = format!("loop-{i}");
        let out = sandbox.gantry(
            &addrs,
            &[
                "submit", "-o", "json", "--key", &key, "--name", &name, "--", "true",
            ],
        );
        if out.code == 0 {
            let id = out.json()?["job_ids"][0].as_u64().expect("id");
            acknowledged.push((name, id));
        } else {
            // Unacknowledged (e.g. mid-election): retrying with the same key is safe.
            let retry = sandbox.gantry(
                &addrs,
                &[
                    "submit", "-o", "json", "--key", &key, "--name", &name, "--", "true",
                ],
            );
            if retry.code == 0 {
                let id = retry.json()?["job_ids"][0].as_u64().expect("id");
                acknowledged.push((name, id));
            }
        }
    }
    assert!(
        acknowledged.len() >= 20,
        "most submissions go through a failover: {}",
        acknowledged.len()
    );
    let new_leader = wait_until("a new leader", T, || sandbox.leader_of(&set))?;
    assert_ne!(new_leader, first_leader);

    // Every acknowledged submission exists exactly once.
    let jobs = sandbox.gantry_json(&addrs, &["jobs", "--limit", "1000"])?;
    let jobs = jobs.as_array().cloned().unwrap_or_default();
    for (name, id) in &acknowledged {
        let matching: Vec<_> = jobs.iter().filter(|j| j["name"] == name.as_str()).collect();
        assert_eq!(matching.len(), 1, "{name} exactly once: {matching:?}");
        assert_eq!(matching[0]["id"].as_u64(), Some(*id));
    }
    let ids: BTreeSet<u64> = jobs.iter().filter_map(|j| j["id"].as_u64()).collect();
    assert_eq!(ids.len(), jobs.len(), "no id twice");

    // The job running across the failover finishes once, and its exit is recorded.
    std::fs::write(&gate, b"go")?;
    let job = sandbox.wait_job_state(&addrs, long, "succeeded", T)?;
    assert_eq!(
        job["attempts"].as_array().map(Vec::len),
        Some(1),
        "not re-run: {job}"
    );
    for (_, id) in &acknowledged {
        sandbox.wait_job_state(&addrs, *id, "succeeded", T)?;
    }

    // The killed replica restarts on its data and catches up.
    sandbox.start_replica(&mut set, first_leader)?;
    let leader_url = set.urls[new_leader - 1].clone();
    let target = sandbox.gantry_json(&leader_url, &["status"])?["commit_index"]
        .as_u64()
        .unwrap_or(0);
    let restarted = set.urls[first_leader - 1].clone();
    wait_until("the restarted replica to catch up", T, || {
        let status = sandbox.gantry_json(&restarted, &["status"]).ok()?;
        (status["applied_index"].as_u64()? >= target).then_some(())
    })?;
    let by_snapshot = std::fs::read_dir(sandbox.path())?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("replica-{first_leader}-"))
        })
        .any(|e| {
            std::fs::read_to_string(e.path())
                .is_ok_and(|log| log.contains("installed raft snapshot"))
        });
    assert!(by_snapshot, "the restarted replica caught up by snapshot");

    // With two of three replicas gone, the survivor refuses writes clearly.
    for id in 1..=3 {
        if id == first_leader {
            continue;
        }
        if let Some(index) = set.procs[id - 1].take() {
            sandbox.proc(index).kill9();
            break;
        }
    }
    let survivors: Vec<usize> = (1..=3).filter(|id| set.procs[id - 1].is_some()).collect();
    assert_eq!(survivors.len(), 2);
    let victim = survivors[0];
    if let Some(index) = set.procs[victim - 1].take() {
        sandbox.proc(index).kill9();
    }
    let lone = set.urls[survivors[1] - 1].clone();
    let out = sandbox.gantry(&lone, &["submit", "--", "true"]);
    assert_eq!(out.code, 3, "a minority refuses writes: {out:?}");
    assert!(
        out.stderr.contains("lead"),
        "the refusal says why: {}",
        out.stderr
    );

    // Every replica's history: no overcommitted GPU, no doubled exclusive
    // lock, identical state wherever the applied index is equal.
    for id in 1..=3 {
        sandbox.stop_replica(&mut set, id);
    }
    check_replicas(&read_replicas(&set.dirs)?)?;
    Ok(())
}
