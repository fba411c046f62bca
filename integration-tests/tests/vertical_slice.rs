//! The vertical slice over real processes: one coordinator, two agents with
//! different fake GPUs on 127.0.0.x.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, pid_alive, wait_until};

const T: Duration = Duration::from_secs(30);

#[test]
fn places_by_gpu_memory_streams_logs_cancels_trees_and_explains_waits() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    sandbox.start_agent(
        "small",
        &url,
        "1xRTX4090-24GiB",
        "127.0.0.2",
        &[("provider", "vast")],
    )?;
    sandbox.start_agent(
        "big",
        &url,
        "1xH100-80GiB",
        "127.0.0.3",
        &[("provider", "lambda")],
    )?;
    sandbox.wait_nodes_ready(&url, 2, T)?;

    // 40 GiB fits only the H100 node.
    let big = sandbox.submit(
        &url,
        &[
            "--kind",
            "evaluation",
            "--gpus",
            "1",
            "--gpu-memory",
            "40GiB",
            "--",
            "sh",
            "-c",
            "echo hello from $GANTRY_JOB_ID on gpu $CUDA_VISIBLE_DEVICES",
        ],
    )?;
    let job = sandbox.wait_job_state(&url, big, "succeeded", T)?;
    assert_eq!(job["attempts"][0]["node"], "big", "{job}");
    let logs = sandbox.gantry(&url, &["logs", &big.to_string()]);
    assert_eq!(logs.code, 0, "{logs:?}");
    assert_eq!(logs.stdout.trim(), format!("hello from {big} on gpu 0"));

    // More than any node has: waits with a reason, never fails or overcommits.
    let huge = sandbox.submit(
        &url,
        &["--gpus", "1", "--gpu-memory", "100GiB", "--", "true"],
    )?;
    let job = wait_until("a hold reason", T, || {
        let job = sandbox.job(&url, huge).ok()?;
        (!job["reason"].as_str().unwrap_or("").is_empty()).then_some(job)
    })?;
    assert_eq!(job["state"], "pending");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("100GiB"), "reason names the ask: {reason}");
    assert!(
        reason.contains("big") && reason.contains("80GiB"),
        "reason names the best node: {reason}"
    );
    let human = sandbox.gantry(&url, &["job", &huge.to_string()]);
    assert!(human.stdout.contains("reason:"), "{}", human.stdout);

    // Cancel kills the whole process tree.
    let pidfile = sandbox.path().join("grandchild.pid");
    let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
    let tree = sandbox.submit(
        &url,
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
    sandbox.wait_job_state(&url, tree, "running", T)?;
    let grandchild: i32 = wait_until("the pid file", T, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })?;
    assert!(pid_alive(grandchild));
    let out = sandbox.gantry(&url, &["cancel", &tree.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    sandbox.wait_job_state(&url, tree, "cancelled", T)?;
    wait_until("the grandchild to die", T, || {
        (!pid_alive(grandchild)).then_some(())
    })?;

    // Cancelling again is a clear failure, not a silent success.
    let again = sandbox.gantry(&url, &["cancel", &tree.to_string()]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("already ended"), "{}", again.stderr);

    // GPU memory was never overcommitted on either node while all this ran.
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    for node in nodes.as_array().into_iter().flatten() {
        for gpu in node["gpus"].as_array().into_iter().flatten() {
            assert!(
                gpu["reserved_bytes"].as_i64() <= gpu["total_bytes"].as_i64(),
                "{node}"
            );
        }
    }
    // The huge job is still pending (not failed), and nothing ran on the small node
    // that did not fit it.
    assert_eq!(sandbox.job(&url, huge)?["state"], "pending");
    let jobs = sandbox.gantry_json(&url, &["jobs"])?;
    for job in jobs.as_array().into_iter().flatten() {
        for attempt in job["attempts"].as_array().into_iter().flatten() {
            if attempt["node"] == "small" {
                assert!(
                    attempt["gpu_memory_bytes"].as_i64().unwrap_or(0) <= 24 << 30,
                    "{job}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn coordinator_restart_keeps_jobs_and_agents_reconnect() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    sandbox.start_agent("node-a", &url, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;

    let gate = sandbox.path().join("gate");
    let finished = sandbox.submit(
        &url,
        &["--gpus", "1", "--gpu-memory", "10GiB", "--", "echo", "done"],
    )?;
    sandbox.wait_job_state(&url, finished, "succeeded", T)?;
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo survived",
        gate.display()
    );
    let running = sandbox.submit(
        &url,
        &[
            "--gpus",
            "1",
            "--gpu-memory",
            "10GiB",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )?;
    sandbox.wait_job_state(&url, running, "running", T)?;
    let waiting = sandbox.submit(
        &url,
        &["--gpus", "1", "--gpu-memory", "200GiB", "--", "true"],
    )?;

    sandbox.proc(coordinator.index).kill9();
    // The job finishes while the coordinator is away; its exit must be recorded.
    std::fs::write(&gate, b"go")?;
    let restarted =
        sandbox.start_coordinator("coordinator-2", port, Some(coordinator.data_dir.clone()))?;
    assert_eq!(restarted.url, url);

    sandbox.wait_nodes_ready(&url, 1, T)?;
    assert_eq!(sandbox.job(&url, finished)?["state"], "succeeded");
    assert_eq!(sandbox.job(&url, waiting)?["state"], "pending");
    let job = sandbox.wait_job_state(&url, running, "succeeded", T)?;
    assert_eq!(
        job["attempts"].as_array().map(Vec::len),
        Some(1),
        "not re-run: {job}"
    );
    let logs = sandbox.gantry(&url, &["logs", &running.to_string()]);
    assert_eq!(logs.stdout.trim(), "survived");
    Ok(())
}

#[test]
fn a_coordinator_stops_on_sigterm_with_agents_and_watchers_connected() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    sandbox.start_agent("node-a", &url, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    // Streams that never end on their own: an agent link and an event watch.
    let watch = sandbox.start_client("watch", &url, &["watch"])?;
    let id = sandbox.submit(&url, &["--", "sleep", "300"])?;
    sandbox.wait_job_state(&url, id, "running", T)?;
    wait_until("the watch to see the job", T, || {
        sandbox.proc(watch).is_running().then_some(())
    })?;
    // SIGINT and SIGTERM take the same path; the open streams are closed
    // after a short grace instead of holding the coordinator up forever.
    let status = sandbox.interrupt(coordinator.index, Duration::from_secs(15))?;
    assert!(status.success(), "coordinator exit: {status:?}");
    assert!(
        sandbox
            .log("coordinator")
            .contains("coordinator core stopped; storage flushed"),
        "{}",
        sandbox.log("coordinator")
    );
    // Nothing acknowledged was lost: a restart on the same data has the job.
    let restarted =
        sandbox.start_coordinator("coordinator-2", 0, Some(coordinator.data_dir.clone()))?;
    let job = sandbox.job(&restarted.url, id)?;
    assert!(job["state"].is_string(), "{job}");
    Ok(())
}
