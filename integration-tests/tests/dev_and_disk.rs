//! `gantry dev` end to end, and disk backpressure steering data producers.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, http_get, parse_samples, pid_alive, wait_until};

const T: Duration = Duration::from_secs(30);

#[test]
fn gantry_dev_runs_a_job_and_stops_cleanly_on_ctrl_c() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (dev, url) = sandbox.start_dev("dev", "2xH100-80GiB")?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    let id = sandbox.submit(
        &url,
        &[
            "--kind",
            "selfplay",
            "--gpus",
            "1",
            "--gpu-memory",
            "8GiB",
            "--batch-tiers",
            "32GiB:512,16GiB:256,128",
            "--",
            "sh",
            "-c",
            "echo batch {batch_size} $GANTRY_BATCH_SIZE on $CUDA_VISIBLE_DEVICES",
        ],
    )?;
    sandbox.wait_job_state(&url, id, "succeeded", T)?;
    let logs = sandbox.gantry(&url, &["logs", &id.to_string()]);
    // An empty 80 GiB GPU: the first tier.
    assert!(logs.stdout.starts_with("batch 512 512 on "), "{logs:?}");

    // A long job is running when Ctrl-C arrives: it must be stopped with the daemon.
    let pidfile = sandbox.path().join("long.pid");
    let script = format!("echo $$ > {}; sleep 1000", pidfile.display());
    let long = sandbox.submit(
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
    sandbox.wait_job_state(&url, long, "running", T)?;
    let pid: i32 = wait_until("pid file", T, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })?;
    let status = sandbox.interrupt(dev, T)?;
    assert!(
        status.success(),
        "gantry dev exits 0 on Ctrl-C: {status:?}\n{}",
        sandbox.log("dev")
    );
    wait_until("the job's process to stop", T, || {
        (!pid_alive(pid)).then_some(())
    })?;

    // Everything acknowledged is still there after a restart on the same data.
    let (_, url) = sandbox.start_dev("dev", "2xH100-80GiB")?;
    assert_eq!(sandbox.job(&url, id)?["state"], "succeeded");
    assert!(sandbox.job(&url, long).is_ok());
    Ok(())
}

#[test]
fn selfplay_avoids_a_node_whose_disk_is_above_the_watermark() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    // Both nodes fit; "full" has the better-fitting GPU, so only disk pressure keeps selfplay off it.
    std::fs::create_dir_all(sandbox.agent_dir("full"))?;
    std::fs::write(
        sandbox.agent_dir("full").join("fake-state.json"),
        r#"{"disk_used_bytes": 900, "disk_total_bytes": 1000}"#,
    )?;
    sandbox.start_agent("full", &url, "1xRTX4090-24GiB", "127.0.0.2", &[])?;
    sandbox.start_agent("roomy", &url, "1xH100-80GiB", "127.0.0.3", &[])?;
    sandbox.wait_nodes_ready(&url, 2, T)?;
    wait_until("disk pressure on full", T, || {
        let nodes = sandbox.gantry_json(&url, &["nodes"]).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == "full" && n["disk_pressure"] == true)
            .then_some(())
    })?;
    for _ in 0..3 {
        let id = sandbox.submit(
            &url,
            &[
                "--kind",
                "selfplay",
                "--gpus",
                "1",
                "--gpu-memory",
                "4GiB",
                "--",
                "true",
            ],
        )?;
        let job = sandbox.wait_job_state(&url, id, "succeeded", T)?;
        assert_eq!(job["attempts"][0]["node"], "roomy", "{job}");
    }
    // Training is a consumer: it may still use the pressured node.
    let id = sandbox.submit(
        &url,
        &[
            "--kind",
            "training",
            "--gpus",
            "1",
            "--gpu-memory",
            "20GiB",
            "--",
            "true",
        ],
    )?;
    sandbox.wait_job_state(&url, id, "succeeded", T)?;

    // With the roomy node drained, selfplay is held with the reason, not lost.
    let out = sandbox.gantry(&url, &["drain", "roomy"]);
    assert_eq!(out.code, 0, "{out:?}");
    let held = sandbox.submit(
        &url,
        &[
            "--kind",
            "selfplay",
            "--gpus",
            "1",
            "--gpu-memory",
            "4GiB",
            "--",
            "true",
        ],
    )?;
    let job = wait_until("a backpressure reason", T, || {
        let job = sandbox.job(&url, held).ok()?;
        job["reason"]
            .as_str()?
            .contains("disk backpressure")
            .then_some(job)
    })?;
    assert_eq!(job["state"], "pending");
    // The leader's metrics say the same: the node and the fleet pressured.
    let pressure = |http: &str| -> Option<(f64, f64)> {
        let body = http_get(http, "/metrics", None).ok()?.body;
        let samples = parse_samples(&body);
        let value = |name: &str| {
            samples
                .iter()
                .find(|(n, l, _)| n == name && l.get("node").is_none_or(|node| node == "full"))
                .map(|(_, _, v)| *v)
        };
        Some((
            value("gantry_node_disk_pressure")?,
            value("gantry_fleet_disk_pressure")?,
        ))
    };
    assert_eq!(pressure(&coordinator.http), Some((1.0, 1.0)));
    // Pressure clears below the low watermark and the job runs.
    std::fs::write(
        sandbox.agent_dir("full").join("fake-state.json"),
        r#"{"disk_used_bytes": 500, "disk_total_bytes": 1000}"#,
    )?;
    let job = sandbox.wait_job_state(&url, held, "succeeded", T)?;
    assert_eq!(job["attempts"][0]["node"], "full");
    assert_eq!(pressure(&coordinator.http), Some((0.0, 0.0)));
    Ok(())
}
