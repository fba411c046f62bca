//! Logs: `--log-format json` writes one JSON object per line, every line
//! about a job carries the job's span (id, attempt, kind, node) on the agent
//! and the coordinator, every gRPC request has its own span, and `RUST_LOG`
//! chooses what is written.

use std::time::Duration;

use gantry_integration_tests::Sandbox;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(40);

/// Every line of a process's log as JSON (fails on the first that is not).
fn json_lines(sandbox: &Sandbox, name: &str) -> anyhow::Result<Vec<Value>> {
    sandbox
        .log(name)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{name}: not JSON ({e}): {line}"))
        })
        .collect()
}

/// The spans of a line named `name`.
fn spans<'a>(line: &'a Value, name: &str) -> Vec<&'a Value> {
    line["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == name)
        .collect()
}

fn is(value: &Value, id: u64) -> bool {
    *value == json!(id) || *value == json!(id.to_string())
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

#[test]
fn json_logs_carry_a_span_per_job_and_per_rpc() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    sandbox.set_log_filter("info,gantry_coordinator=debug");
    let coordinator = sandbox.start_coordinator_with("coordinator", &["--log-format", "json"])?;
    let url = coordinator.url.clone();
    sandbox.start_agent_with(
        "node-a",
        &url,
        "1xH100-80GiB",
        "127.0.0.2",
        &[],
        &["--log-format", "json"],
    )?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    let id = sandbox.submit(
        &url,
        &["--name", "hello", "--kind", "selfplay", "--", "echo", "hi"],
    )?;
    sandbox.wait_job_state(&url, id, "succeeded", T)?;

    // Agent: start and exit are logged inside the job's span.
    let agent = json_lines(&sandbox, "node-a")?;
    let about_job: Vec<&Value> = agent
        .iter()
        .filter(|l| spans(l, "job").iter().any(|s| is(&s["job_id"], id)))
        .collect();
    let messages: Vec<&str> = about_job.iter().map(|l| message(l)).collect();
    assert!(
        messages.contains(&"job started") && messages.iter().any(|m| m.contains("exited")),
        "{messages:?}"
    );
    for line in &about_job {
        let span = spans(line, "job")[0];
        assert_eq!(
            (&span["attempt"], &span["node"]),
            (&json!(1), &json!("node-a")),
            "{line}"
        );
        if message(line) != "coordinator asks to stop the attempt" {
            assert_eq!(span["kind"], "selfplay", "{line}");
        }
    }

    // Coordinator: transitions in the job's span, at debug because RUST_LOG
    // asks for it; a span per RPC with the method, the peer and the status.
    let coordinator_lines = json_lines(&sandbox, "coordinator")?;
    let transitions: Vec<&Value> = coordinator_lines
        .iter()
        .filter(|l| message(l) == "job transition")
        .filter(|l| spans(l, "job").iter().any(|s| is(&s["job_id"], id)))
        .collect();
    let states: Vec<&str> = transitions
        .iter()
        .filter_map(|l| l["fields"]["state"].as_str())
        .collect();
    assert_eq!(
        states,
        ["pending", "assigned", "running", "succeeded"],
        "{transitions:?}"
    );
    let submit = coordinator_lines
        .iter()
        .find(|l| {
            message(l) == "rpc done"
                && spans(l, "rpc")
                    .iter()
                    .any(|s| s["method"] == "/gantry.v1.Gantry/Submit")
        })
        .ok_or_else(|| anyhow::anyhow!("no rpc line for Submit"))?;
    let rpc = spans(submit, "rpc")[0];
    assert!(
        rpc["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{submit}"
    );
    assert_eq!(submit["fields"]["status"], "Ok", "{submit}");
    // RUST_LOG is honoured: debug only where it was asked for.
    let stray: Vec<&Value> = coordinator_lines
        .iter()
        .filter(|l| l["level"] == "DEBUG")
        .filter(|l| {
            !l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("gantry_coordinator"))
        })
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(agent.iter().all(|l| l["level"] != "DEBUG"), "agent at info");
    Ok(())
}
