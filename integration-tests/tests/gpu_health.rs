//! GPU health on real processes: a fault on a fake GPU (written into the
//! agent's `fake-state.json`, as NVML health would report it) moves the job
//! running on it to another GPU without using an attempt, shows the GPU
//! unhealthy in `gantry nodes`, `/v1/nodes` and `/metrics`, keeps it out of
//! placement until `gantry gpu reset` clears it; `gantry undrain` clears
//! every GPU, and a cleared fault still reported is acknowledged.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, http_get, http_request, parse_samples, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

/// Writes the agent's fake state: a roomy disk, and `faults` (GPU index ->
/// fault text).
fn fake_state(sandbox: &Sandbox, agent: &str, faults: &[(u32, &str)]) -> anyhow::Result<()> {
    let faults: serde_json::Map<String, Value> = faults
        .iter()
        .map(|(i, f)| (i.to_string(), Value::from(*f)))
        .collect();
    let state = serde_json::json!({
        "disk_used_bytes": 100u64 << 30,
        "disk_total_bytes": 1u64 << 40,
        "gpu_faults": faults,
    });
    // Written whole and renamed: the agent re-reads the file every beat.
    let dir = sandbox.agent_dir(agent);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join("fake-state.json.tmp");
    std::fs::write(&tmp, state.to_string())?;
    std::fs::rename(tmp, dir.join("fake-state.json"))?;
    Ok(())
}

fn gpu_of(job: &Value, attempt: usize) -> Option<u64> {
    job["attempts"][attempt]["gpus"][0].as_u64()
}

/// `gantry_gpu_healthy` of node-a's GPUs, by index.
fn healthy_gauge(http: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let text = http_get(http, "/metrics", None)?.body;
    let mut out: Vec<(String, f64)> = parse_samples(&text)
        .into_iter()
        .filter(|(name, labels, _)| name == "gantry_gpu_healthy" && labels["node"] == "node-a")
        .map(|(_, labels, value)| (labels["gpu"].clone(), value))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[test]
fn a_gpu_fault_moves_the_job_and_keeps_the_gpu_out_until_cleared() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let (url, http) = (coordinator.url.clone(), coordinator.http.clone());
    fake_state(&sandbox, "node-a", &[])?;
    sandbox.start_agent("node-a", &url, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;

    // One attempt allowed: a fault that used one would dead-letter it.
    let runs = sandbox.path().join("runs");
    let reasons = sandbox.path().join("reasons");
    let spec = sandbox.path().join("job.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"
name: trainer
resources: {{gpus: 1, gpu_memory: 80GiB}}
retry: {{max_attempts: 1}}
shell: true
command: ["echo run $GANTRY_ATTEMPT $CUDA_VISIBLE_DEVICES >> {runs}; trap 'cat $GANTRY_STOP_REASON_FILE >> {reasons}; exit 143' TERM; while true; do sleep 0.1; done"]
"#,
            runs = runs.display(),
            reasons = reasons.display(),
        ),
    )?;
    let submitted = sandbox.gantry_json(&url, &["submit", "-f", &spec.display().to_string()])?;
    let job = submitted["job_ids"][0].as_u64().expect("job id");
    let running = sandbox.wait_job_state(&url, job, "running", T)?;
    let sick = gpu_of(&running, 0).expect("a gpu");
    let other = 1 - sick;
    assert_eq!(
        healthy_gauge(&http)?,
        vec![("0".to_string(), 1.0), ("1".to_string(), 1.0)]
    );

    // The GPU the job runs on throws a critical XID.
    fake_state(&sandbox, "node-a", &[(sick as u32, "critical xid 79")])?;
    let moved = wait_until("the job to run again on the other gpu", T, || {
        let job = sandbox.job(&url, job).ok()?;
        (job["state"] == "running" && job["attempts"].as_array()?.len() == 2).then_some(job)
    })?;
    assert_eq!(moved["attempts"][0]["outcome"], "preempted", "{moved}");
    assert_eq!(gpu_of(&moved, 1), Some(other), "{moved}");
    let reason = std::fs::read_to_string(&reasons)?;
    assert!(
        reason.starts_with(&format!(
            "node fault: gpu {sick} of node node-a unhealthy (critical xid 79)"
        )),
        "{reason}"
    );
    wait_until("the second run to start", T, || {
        let text = std::fs::read_to_string(&runs).ok()?;
        text.contains(&format!("run 2 {other}")).then_some(())
    })?;

    // Shown everywhere.
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    let gpus = &nodes[0]["gpus"];
    assert_eq!(gpus[sick as usize]["healthy"], false, "{nodes}");
    assert_eq!(gpus[sick as usize]["fault"], "critical xid 79", "{nodes}");
    assert_eq!(gpus[other as usize]["healthy"], true, "{nodes}");
    let table = sandbox.gantry(&url, &["nodes"]);
    assert!(
        table
            .stdout
            .contains(&format!("gpu {sick} unhealthy: critical xid 79")),
        "{}",
        table.stdout
    );
    let api = http_get(&http, "/v1/nodes", None)?.json()?;
    assert_eq!(api[0]["gpus"][sick as usize]["healthy"], false, "{api}");
    let gauge = healthy_gauge(&http)?;
    assert_eq!(gauge[sick as usize].1, 0.0, "{gauge:?}");
    assert_eq!(gauge[other as usize].1, 1.0, "{gauge:?}");

    // Out of placement: a second job waits although the GPU is idle.
    let second = sandbox.submit(
        &url,
        &["--gpus", "1", "--gpu-memory", "80GiB", "--", "sleep", "60"],
    )?;
    wait_until("the second job to wait with a reason", T, || {
        let j = sandbox.job(&url, second).ok()?;
        (j["state"] == "pending" && !j["reason"].as_str()?.is_empty()).then_some(())
    })?;

    // A GPU the node does not have is refused; the repaired GPU, reset by
    // the operator, takes the waiting job.
    let out = sandbox.gantry(&url, &["gpu", "reset", "node-a", "7"]);
    assert_eq!(out.code, 1, "{} {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("has no gpu 7"), "{}", out.stderr);
    // The HTTP route says the same, and refuses an index that is no number.
    let missing = http_request(&http, "POST", "/v1/nodes/node-a/gpus/7/reset", &[], b"")?;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert!(missing.body.contains("has no gpu 7"), "{missing:?}");
    let bad = http_request(&http, "POST", "/v1/nodes/node-a/gpus/x/reset", &[], b"")?;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()?["field"], "gpu", "{bad:?}");
    fake_state(&sandbox, "node-a", &[])?;
    // Reset over HTTP (`gantry gpu reset` is the same call over gRPC).
    let reset = http_request(
        &http,
        "POST",
        &format!("/v1/nodes/node-a/gpus/{sick}/reset"),
        &[],
        b"",
    )?;
    assert_eq!(reset.status, 200, "{reset:?}");
    assert_eq!(reset.json()?["reset"], true, "{reset:?}");
    let placed = sandbox.wait_job_state(&url, second, "running", T)?;
    assert_eq!(gpu_of(&placed, 0), Some(sick), "{placed}");
    assert_eq!(
        healthy_gauge(&http)?,
        vec![("0".to_string(), 1.0), ("1".to_string(), 1.0)]
    );

    // The other GPU fails too: the first job has nowhere to go and waits;
    // an undrain clears it, and the fault, still reported, is acknowledged.
    fake_state(&sandbox, "node-a", &[(other as u32, "critical xid 48")])?;
    wait_until("the first job to wait", T, || {
        let j = sandbox.job(&url, job).ok()?;
        (j["state"] == "pending").then_some(())
    })?;
    let out = sandbox.gantry(&url, &["undrain", "node-a"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    wait_until("the first job to run a third time", T, || {
        let j = sandbox.job(&url, job).ok()?;
        (j["state"] == "running" && j["attempts"].as_array()?.len() == 3).then_some(())
    })?;
    assert_eq!(healthy_gauge(&http)?[other as usize].1, 1.0);
    for id in [job, second] {
        sandbox.gantry_json(&url, &["cancel", &id.to_string()])?;
        sandbox.wait_job_state(&url, id, "cancelled", T)?;
    }
    Ok(())
}
