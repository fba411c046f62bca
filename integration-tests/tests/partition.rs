//! A network partition between replicas (proxies the test controls): the
//! isolated leader steps down and refuses writes, the majority elects a new
//! leader and keeps running jobs, the old leader catches up after healing,
//! and the invariant checker finds identical state at equal applied index
//! and no overcommitted GPU or doubly held exclusive lock in any history.

use std::time::Duration;

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(40);

fn status(sandbox: &Sandbox, url: &str) -> Option<serde_json::Value> {
    sandbox.gantry_json(url, &["status"]).ok()
}

#[test]
fn an_isolated_leader_steps_down_and_the_majority_carries_on() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut parts = sandbox.start_partitionable_replicas()?;
    let addrs = parts.set.addrs();
    let old = wait_until("a leader", T, || sandbox.leader_of(&parts.set))?;
    sandbox.start_agent("node-a", &addrs, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.start_agent("node-b", &addrs, "1xH100-80GiB", "127.0.0.3", &[])?;
    sandbox.wait_nodes_ready(&addrs, 2, T)?;
    let lock = "locks: [{name: model/sq8, mode: exclusive}]";
    let spec = sandbox.path().join("train.yaml");
    std::fs::write(
        &spec,
        format!(
            "kind: training\nresources: {{gpus: 1, gpu_memory: 60GiB}}\n{lock}\ncommand: [sleep, '0.2']\n"
        ),
    )?;
    let spec = spec.display().to_string();
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(
            sandbox.gantry_json(&addrs, &["submit", "-f", &spec])?["job_ids"][0]
                .as_u64()
                .expect("id"),
        );
    }

    parts.isolate(old);
    let old_url = parts.set.urls[old - 1].clone();
    let new = wait_until("a leader on the majority side", T, || {
        (1..=3).filter(|id| *id != old).find(|id| {
            status(&sandbox, &parts.set.urls[id - 1]).is_some_and(|s| s["is_leader"] == true)
        })
    })?;
    wait_until("the isolated leader to step down", T, || {
        status(&sandbox, &old_url)
            .is_some_and(|s| s["is_leader"] == false)
            .then_some(())
    })?;
    // The minority refuses writes with a clear error.
    let out = sandbox.gantry(&old_url, &["submit", "--", "true"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("lead") || out.stderr.contains("reach"),
        "{}",
        out.stderr
    );

    // The majority keeps placing and running work.
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(
            sandbox.gantry_json(&addrs, &["submit", "-f", &spec])?["job_ids"][0]
                .as_u64()
                .expect("id"),
        );
    }
    for id in before.iter().chain(&after) {
        sandbox.wait_job_state(&addrs, *id, "succeeded", T)?;
    }

    // Healed, the old leader catches up as a follower.
    parts.heal();
    let new_url = parts.set.urls[new - 1].clone();
    wait_until("all replicas at the same applied index", T, || {
        let target = status(&sandbox, &new_url)?["applied_index"].as_u64()?;
        (1..=3)
            .all(|id| {
                status(&sandbox, &parts.set.urls[id - 1]).and_then(|s| s["applied_index"].as_u64())
                    == Some(target)
            })
            .then_some(())
    })?;

    for id in 1..=3 {
        sandbox.stop_replica(&mut parts.set, id);
    }
    let replicas = read_replicas(&parts.set.dirs)?;
    assert!(
        replicas.iter().all(|r| r.applied == replicas[0].applied),
        "converged before stopping"
    );
    check_replicas(&replicas)?;
    assert_eq!(replicas[0].jobs.len(), 6);
    Ok(())
}
