//! Continuous pipelines (`repeat:`) on `gantry dev`: a bounded loop makes
//! its runs and tells each one where the one before it was; a dead-lettered
//! stage pauses the loop until `dlq retry`; a stop over HTTP ends it after
//! the current run; a loop that does not repeat, or has finished, cannot
//! be stopped.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use gantry_integration_tests::{Sandbox, http_request, wait_until};
use serde_json::Value;

const RUN: Duration = Duration::from_secs(60);

fn pipeline(sandbox: &Sandbox, url: &str, name: &str) -> anyhow::Result<Value> {
    sandbox.gantry_json(url, &["pipeline", name])
}

/// Waits until the latest run of `name` is `run` and the loop says `status`.
fn wait_loop(
    sandbox: &Sandbox,
    url: &str,
    name: &str,
    run: u32,
    status: &str,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    let view = wait_until(&format!("{name} run {run} {status}"), RUN, || {
        let view = pipeline(sandbox, url, name).ok()?;
        last = view.clone();
        (view["run"] == run && view["loop_status"] == status).then_some(view)
    });
    view.with_context(|| format!("last seen: {last}"))
}

fn all_succeeded(view: &Value) -> bool {
    view["jobs"]
        .as_array()
        .is_some_and(|jobs| jobs.iter().all(|j| j["state"] == "succeeded"))
}

fn submit(sandbox: &Sandbox, url: &str, text: &str) -> anyhow::Result<Value> {
    let path = sandbox.path().join("loop.yaml");
    std::fs::write(&path, text)?;
    sandbox.gantry_json(url, &["submit", "-f", &path.display().to_string()])
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| path.display().to_string())
}

#[test]
fn loops_repeat_pause_on_a_dead_letter_and_stop() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (index, url) = sandbox.start_dev("dev", "1xH100-80GiB")?;
    sandbox.wait_nodes_ready(&url, 1, Duration::from_secs(30))?;
    let http = sandbox.proc(index).http.clone().context("http")?;
    let runs = sandbox.path().join("runs");

    // A bounded loop: three runs, each told its run and the one before.
    submit(
        &sandbox,
        &url,
        &format!(
            r#"pipeline: nightly
repeat: {{max_runs: 3}}
run_dir: {runs}/{{run}}
jobs:
  - name: a
    shell: true
    command: 'mkdir -p "$GANTRY_RUN_DIR" && echo "$GANTRY_PIPELINE $GANTRY_PIPELINE_RUN ${{GANTRY_PREVIOUS_RUN:-none}} ${{GANTRY_PREVIOUS_RUN_DIR:-none}}" > "$GANTRY_RUN_DIR/a"'
  - name: b
    after: [a]
    shell: true
    command: 'cp "$GANTRY_RUN_DIR/a" "$GANTRY_RUN_DIR/b"'
"#,
            runs = runs.display()
        ),
    )?;
    let view = wait_loop(&sandbox, &url, "nightly", 3, "finished")?;
    let view = wait_until("run 3 to succeed", RUN, || {
        let v = pipeline(&sandbox, &url, "nightly").ok()?;
        all_succeeded(&v).then_some(v)
    })
    .with_context(|| format!("{view}"))?;
    ensure!(view["run"] == 3, "no fourth run: {view}");
    let states: Vec<&str> = view["runs"]
        .as_array()
        .context("runs")?
        .iter()
        .filter_map(|r| r["state"].as_str())
        .collect();
    ensure!(states == ["succeeded"; 3], "{view}");
    let runs_dir = runs.display().to_string();
    for run in 1..=3 {
        let expect = match run {
            1 => "nightly 1 none none\n".to_string(),
            _ => format!("nightly {run} {} {runs_dir}/{}\n", run - 1, run - 1),
        };
        ensure!(read(&runs.join(format!("{run}/b")))? == expect, "run {run}");
    }
    let out = sandbox.gantry(&url, &["pipeline", "stop", "nightly"]);
    ensure!(out.code != 0 && out.stderr.contains("finished"), "{out:?}");

    // A dead-lettered stage pauses the loop; `dlq retry` resumes it.
    let mark = sandbox.path().join("failed-once");
    let out = submit(
        &sandbox,
        &url,
        &format!(
            r#"pipeline: flaky
repeat: {{max_runs: 2}}
jobs:
  - name: only
    shell: true
    command: 'test -f {mark} || {{ touch {mark}; exit 3; }}'
"#,
            mark = mark.display()
        ),
    )?;
    let first = out["job_ids"][0].as_u64().context("id")?;
    sandbox.wait_job_state(&url, first, "deadlettered", RUN)?;
    let view = pipeline(&sandbox, &url, "flaky")?;
    ensure!(
        view["run"] == 1 && view["loop_status"] == "paused",
        "{view}"
    );
    sandbox.gantry_json(&url, &["dlq", "retry", &first.to_string()])?;
    wait_loop(&sandbox, &url, "flaky", 2, "finished")?;

    // A stop over HTTP while run 1 waits: run 1 finishes, none follows.
    let go = sandbox.path().join("go");
    submit(
        &sandbox,
        &url,
        &format!(
            r#"pipeline: held
repeat: forever
jobs:
  - name: wait
    shell: true
    command: 'while ! test -f {go}; do sleep 0.05; done'
"#,
            go = go.display()
        ),
    )?;
    let stop = http_request(&http, "POST", "/v1/pipelines/held/stop", &[], b"")?;
    ensure!(stop.status == 200, "{}: {}", stop.status, stop.body);
    let body: Value = serde_json::from_str(&stop.body)?;
    ensure!(body["last_run"] == 1 && body["stopped"] == true, "{body}");
    std::fs::write(&go, "")?;
    let view = wait_until("held run 1 to succeed", RUN, || {
        let v = pipeline(&sandbox, &url, "held").ok()?;
        all_succeeded(&v).then_some(v)
    })?;
    ensure!(
        view["run"] == 1 && view["loop_status"] == "stopped",
        "{view}"
    );

    // Nothing to stop: a pipeline that does not repeat, or none at all.
    submit(
        &sandbox,
        &url,
        "pipeline: once\njobs:\n  - {name: a, command: [true]}\n",
    )?;
    let once = http_request(&http, "POST", "/v1/pipelines/once/stop", &[], b"")?;
    ensure!(
        once.status == 409 && once.body.contains("does not repeat"),
        "{}: {}",
        once.status,
        once.body
    );
    let none = http_request(&http, "POST", "/v1/pipelines/nothing/stop", &[], b"")?;
    ensure!(none.status == 404, "{}: {}", none.status, none.body);
    Ok(())
}
