//! Maintenance: `gantry drain NODE --deadline D` stops new placements at
//! once and, at the deadline, stops the node's jobs so they run elsewhere;
//! a job moved this way uses up no attempt, its exclusive lock moves with
//! it, and nothing is lost.

use std::time::Duration;

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

fn node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Waits until `id` runs attempt `attempt` on `node`.
fn wait_running_on(
    sandbox: &Sandbox,
    url: &str,
    id: u64,
    attempt: usize,
    node: &str,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    let result = wait_until(
        &format!("job {id} to run attempt {attempt} on {node}"),
        T,
        || {
            let job = sandbox.job(url, id).ok()?;
            last = job.clone();
            let attempts = job["attempts"].as_array()?;
            (job["state"] == "running"
                && attempts.len() == attempt
                && attempts[attempt - 1]["node"] == node)
                .then_some(job)
        },
    );
    anyhow::Context::with_context(result, || format!("last seen: {last}"))
}

#[test]
fn a_drained_node_hands_its_jobs_over_at_the_deadline_and_loses_none() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    sandbox.start_agent("node-a", &url, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;

    // A training job holding an exclusive lock, allowed one attempt only: if
    // moving it used up an attempt it would be dead-lettered.
    let marker = sandbox.path().join("runs");
    let spec = sandbox.path().join("train.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"
name: train
kind: training
resources: {{gpus: 1, gpu_memory: 8GiB}}
locks: [{{name: model/sq8, mode: exclusive}}]
retry: {{max_attempts: 1}}
shell: true
command: ["echo run >> {marker}; exec sleep 600"]
"#,
            marker = marker.display()
        ),
    )?;
    let submitted = sandbox.gantry_json(&url, &["submit", "-f", &spec.display().to_string()])?;
    let train = submitted["job_ids"][0].as_u64().expect("job id");
    wait_running_on(&sandbox, &url, train, 1, "node-a")?;

    sandbox.start_agent("node-b", &url, "2xH100-80GiB", "127.0.0.3", &[])?;
    sandbox.wait_nodes_ready(&url, 2, T)?;

    // Bad deadlines are refused by name, with the usage exit code.
    for bad in ["0", "0s", "-5m", "soon"] {
        let out = sandbox.gantry(&url, &["drain", "node-a", "--deadline", bad]);
        assert_eq!(out.code, 2, "--deadline {bad}: {}", out.stderr);
        assert!(out.stderr.contains("--deadline"), "{}", out.stderr);
    }
    let out = sandbox.gantry(&url, &["drain", "no-such-node", "--deadline", "1m"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // A long deadline first, then shortened: the later one wins.
    let out = sandbox.gantry(&url, &["drain", "node-a", "--deadline", "30m"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let table = sandbox.gantry(&url, &["nodes"]);
    assert!(
        table.stdout.contains("draining (deadline in 30m)"),
        "{}",
        table.stdout
    );
    // Draining stops new placements at once, long before the deadline.
    let other = sandbox.submit(&url, &["--gpus", "1", "--", "true"])?;
    let done = sandbox.wait_job_state(&url, other, "succeeded", T)?;
    assert_eq!(done["attempts"][0]["node"], "node-b", "{done}");
    assert_eq!(sandbox.job(&url, train)?["state"], "running");

    let out = sandbox.gantry(&url, &["drain", "node-a", "--deadline", "2s"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    let a = node(&nodes, "node-a");
    assert_eq!(a["draining"], true, "{a}");
    let deadline = a["drain_deadline_ms"].as_u64().unwrap_or(0);
    assert!(deadline > 0, "{a}");

    // At the deadline the job is stopped on A and placed on B, with no
    // attempt used up (one allowed) and the reason on the stopped attempt.
    let moved = wait_running_on(&sandbox, &url, train, 2, "node-b")?;
    let first = &moved["attempts"][0];
    assert_eq!(first["outcome"], "preempted", "{moved}");
    assert!(
        first["ended_at_ms"].as_u64().unwrap_or(0) >= deadline,
        "{moved}"
    );
    wait_until("the job to have run twice", T, || {
        let runs = std::fs::read_to_string(&marker).ok()?;
        (runs.lines().count() == 2).then_some(())
    })?;
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(node(&nodes, "node-a")["running_jobs"], 0, "{nodes}");

    // Undrained, A takes work again (a 2-GPU job fits only there now) and
    // its deadline is gone.
    let out = sandbox.gantry(&url, &["undrain", "node-a"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    let a = node(&nodes, "node-a");
    assert_eq!(
        (&a["draining"], &a["drain_deadline_ms"]),
        (&Value::Bool(false), &Value::Null)
    );
    let wide = sandbox.submit(&url, &["--gpus", "2", "--", "true"])?;
    let done = sandbox.wait_job_state(&url, wide, "succeeded", T)?;
    assert_eq!(done["attempts"][0]["node"], "node-a", "{done}");

    // `--wait` returns once B runs nothing; the job is back on A.
    let out = sandbox.gantry(&url, &["drain", "node-b", "--deadline", "1s", "--wait"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("runs no jobs"), "{}", out.stdout);
    let back = wait_running_on(&sandbox, &url, train, 3, "node-a")?;
    assert_eq!(back["attempts"][1]["outcome"], "preempted", "{back}");

    sandbox.gantry_json(&url, &["cancel", &train.to_string()])?;
    sandbox.wait_job_state(&url, train, "cancelled", T)?;

    // Nothing lost, no lock ever held twice, no GPU overcommitted.
    sandbox
        .proc(coordinator.index)
        .stop(Duration::from_secs(10));
    let replicas = read_replicas(std::slice::from_ref(&coordinator.data_dir))?;
    check_replicas(&replicas)?;
    for job in &replicas[0].jobs {
        assert!(
            matches!(
                job.state,
                gantry_coordinator::domain::JobState::Succeeded
                    | gantry_coordinator::domain::JobState::Cancelled
            ),
            "job {} ended {}",
            job.id,
            job.state
        );
        let lost = job
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(gantry_coordinator::domain::AttemptOutcome::Lost))
            .count();
        assert_eq!(lost, 0, "job {} lost an attempt", job.id);
    }
    assert_eq!(replicas[0].jobs.len(), 3);
    Ok(())
}
