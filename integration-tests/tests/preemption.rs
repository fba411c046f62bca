//! Priority preemption on real processes: a high-priority job that fits
//! nowhere stops a running low-priority one, which gets SIGTERM and
//! checkpoints within its grace, goes back to pending without using an
//! attempt, and runs again once the GPU frees; `gantry job` says who
//! preempted whom.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(40);

#[test]
fn a_high_priority_job_preempts_a_low_priority_one_which_runs_again() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    sandbox.start_agent("node-a", &url, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;

    // The victim: one attempt allowed (a preemption that used one would
    // dead-letter it); on SIGTERM it writes a checkpoint and exits 143.
    let runs = sandbox.path().join("runs");
    let checkpoints = sandbox.path().join("checkpoints");
    let low_spec = sandbox.path().join("low.yaml");
    std::fs::write(
        &low_spec,
        format!(
            r#"
name: low
resources: {{gpus: 1, gpu_memory: 80GiB}}
priority: 0
preemption_grace: 20s
retry: {{max_attempts: 1}}
shell: true
command: ["echo run $GANTRY_ATTEMPT >> {runs}; trap 'echo checkpoint $GANTRY_ATTEMPT \"$(cat $GANTRY_STOP_REASON_FILE)\" >> {checkpoints}; exit 143' TERM; while true; do sleep 0.1; done"]
"#,
            runs = runs.display(),
            checkpoints = checkpoints.display(),
        ),
    )?;
    let submitted =
        sandbox.gantry_json(&url, &["submit", "-f", &low_spec.display().to_string()])?;
    let low = submitted["job_ids"][0].as_u64().expect("job id");
    sandbox.wait_job_state(&url, low, "running", T)?;
    wait_until("the low job to start", T, || {
        std::fs::read_to_string(&runs)
            .ok()
            .filter(|r| !r.is_empty())
    })?;

    // The preemptor fits nowhere else.
    let high = sandbox.submit(
        &url,
        &[
            "--gpus",
            "1",
            "--gpu-memory",
            "80GiB",
            "--priority",
            "10",
            "--",
            "sleep",
            "2",
        ],
    )?;

    // The victim checkpoints on SIGTERM, knowing why (the reason file the
    // agent wrote before the signal), its attempt ends preempted, and the
    // preemptor runs on the freed GPU.
    let checkpoint = wait_until("the low job to checkpoint", T, || {
        let text = std::fs::read_to_string(&checkpoints).ok()?;
        text.contains("checkpoint 1").then_some(text)
    })?;
    assert!(
        checkpoint.contains(&format!("checkpoint 1 preempted by job {high} ")),
        "{checkpoint}"
    );
    let done = sandbox.wait_job_state(&url, high, "succeeded", T)?;
    assert_eq!(done["attempts"][0]["node"], "node-a", "{done}");
    assert!(
        done["preemptions"][0]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("preempted job(s) {low} on node node-a"))),
        "{done}"
    );

    // The victim runs again, attempt 2, though it was allowed only one:
    // the preemption used none.
    let again = wait_until("the low job to run again", T, || {
        let job = sandbox.job(&url, low).ok()?;
        (job["state"] == "running" && job["attempts"].as_array()?.len() == 2).then_some(job)
    })?;
    assert_eq!(again["attempts"][0]["outcome"], "preempted", "{again}");
    assert!(
        again["preemptions"][0]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("preempted by job {high} at "))),
        "{again}"
    );
    wait_until("the second run to start", T, || {
        let text = std::fs::read_to_string(&runs).ok()?;
        text.contains("run 2").then_some(())
    })?;
    let shown = sandbox.gantry(&url, &["job", &low.to_string()]);
    assert!(
        shown.stdout.contains(&format!("preempted by job {high}")),
        "{}",
        shown.stdout
    );
    sandbox.gantry_json(&url, &["cancel", &low.to_string()])?;
    sandbox.wait_job_state(&url, low, "cancelled", T)?;
    Ok(())
}
