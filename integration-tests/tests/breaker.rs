//! The node circuit breaker (issue 10, finding 6): one buggy job must not
//! quarantine the fleet, while a node that fails jobs which succeed
//! elsewhere is quarantined, shown wherever its state is, and `gantry
//! undrain` puts it back.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, http_get, parse_samples, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);
const NODES: [(&str, &str); 4] = [
    ("node-a", "127.0.0.2"),
    ("node-b", "127.0.0.3"),
    ("node-c", "127.0.0.4"),
    ("node-d", "127.0.0.5"),
];

/// A coordinator and four agents with one GPU each.
fn fleet(sandbox: &mut Sandbox) -> anyhow::Result<(String, String)> {
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    for (name, address) in NODES {
        sandbox.start_agent(name, &coordinator.url, "1xH100-80GiB", address, &[])?;
    }
    sandbox.wait_nodes_ready(&coordinator.url, NODES.len(), T)?;
    Ok((coordinator.url, coordinator.http))
}

fn submit_spec(sandbox: &Sandbox, url: &str, name: &str, yaml: &str) -> anyhow::Result<u64> {
    let path = sandbox.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    let submitted = sandbox.gantry_json(url, &["submit", "-f", &path.display().to_string()])?;
    submitted["job_ids"][0]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no job id in {submitted}"))
}

fn node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .and_then(|all| all.iter().find(|n| n["name"] == name))
        .unwrap_or(&Value::Null)
}

/// `gantry_node_quarantined` per node, from the leader's `/metrics`.
fn quarantined_gauge(http: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let text = http_get(http, "/metrics", None)?.body;
    let mut gauge: Vec<(String, f64)> = parse_samples(&text)
        .into_iter()
        .filter(|(name, _, _)| name == "gantry_node_quarantined")
        .map(|(_, labels, value)| (labels["node"].clone(), value))
        .collect();
    gauge.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(gauge)
}

#[test]
fn one_buggy_job_quarantines_no_node() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (url, http) = fleet(&mut sandbox)?;
    let buggy = submit_spec(
        &sandbox,
        &url,
        "buggy",
        "name: buggy\nshell: true\ncommand: [\"exit 1\"]\nretry: {max_attempts: 12, backoff: 10ms}\n",
    )?;
    let done = sandbox.wait_job_state(&url, buggy, "deadlettered", Duration::from_secs(90))?;
    let attempts = done["attempts"].as_array().map_or(0, Vec::len);
    assert_eq!(attempts, 12, "{done}");
    let mut used: Vec<&str> = done["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["node"].as_str())
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 2, "the retries moved between nodes: {done}");

    // The job's own fault: no node is quarantined, anywhere it would show.
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    for (name, _) in NODES {
        assert_eq!(node(&nodes, name)["quarantine"], Value::Null, "{nodes}");
    }
    let table = sandbox.gantry(&url, &["nodes"]);
    assert!(!table.stdout.contains("quarantined"), "{}", table.stdout);
    assert_eq!(
        quarantined_gauge(&http)?,
        NODES.map(|(n, _)| (n.to_string(), 0.0)).to_vec()
    );
    // A healthy job submitted after it runs at once (it waited 5 minutes
    // behind "no node takes new work (4 quarantined)").
    let healthy = sandbox.submit(&url, &["--", "true"])?;
    sandbox.wait_job_state(&url, healthy, "succeeded", T)?;
    Ok(())
}

#[test]
fn a_node_failing_jobs_that_succeed_elsewhere_is_quarantined_until_undrained() -> anyhow::Result<()>
{
    let mut sandbox = Sandbox::new()?;
    let (url, http) = fleet(&mut sandbox)?;
    // Only node-a takes work at first, so each job's first attempt runs there.
    for (name, _) in &NODES[1..] {
        let out = sandbox.gantry(&url, &["drain", name]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    // Fails on node-a only: a broken node, healthy jobs.
    let spec = |name: &str| {
        format!(
            "name: {name}\nshell: true\ncommand: ['test \"$GANTRY_NODE\" != node-a']\nretry: {{max_attempts: 3, backoff: 5s}}\n"
        )
    };
    let mut jobs = Vec::new();
    for name in ["j1", "j2", "j3"] {
        jobs.push(submit_spec(&sandbox, &url, name, &spec(name))?);
    }
    for &job in &jobs {
        wait_until(&format!("job {job} to fail on node-a"), T, || {
            let job = sandbox.job(&url, job).ok()?;
            (job["attempts"][0]["outcome"] == "failed").then_some(())
        })?;
    }
    // Three failures, but node-a is the last node taking work: kept.
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(node(&nodes, "node-a")["quarantine"], Value::Null, "{nodes}");

    for (name, _) in &NODES[1..] {
        let out = sandbox.gantry(&url, &["undrain", name]);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    for &job in &jobs {
        let done = sandbox.wait_job_state(&url, job, "succeeded", T)?;
        let last = done["attempts"].as_array().and_then(|a| a.last()).cloned();
        assert_ne!(last.map(|a| a["node"].clone()), Some("node-a".into()));
    }
    // Node-a is quarantined, and shows it.
    let nodes = wait_until("node-a to be quarantined", T, || {
        let nodes = sandbox.gantry_json(&url, &["nodes"]).ok()?;
        node(&nodes, "node-a")["quarantine"]
            .is_object()
            .then_some(nodes)
    })?;
    let quarantine = &node(&nodes, "node-a")["quarantine"];
    assert_eq!(quarantine["failures"], 3, "{quarantine}");
    // Tripped as soon as another node took work (the three failures of
    // distinct jobs were enough) or once the retries succeeded elsewhere.
    let reason = quarantine["reason"].as_str().unwrap_or_default();
    for job in &jobs {
        assert!(
            reason.contains(&format!("job {job} failed here")),
            "{quarantine}"
        );
    }
    for (name, _) in &NODES[1..] {
        assert_eq!(node(&nodes, name)["quarantine"], Value::Null, "{nodes}");
    }
    let table = sandbox.gantry(&url, &["nodes"]);
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("node-a"))
        .unwrap_or_default();
    assert!(
        row.contains("ready,quarantined until ") && row.contains(" (3 failures)"),
        "{}",
        table.stdout
    );
    let api = http_get(&http, "/v1/nodes", None)?.json()?;
    assert_eq!(node(&api, "node-a")["quarantine"], *quarantine, "{api}");
    let gauge = quarantined_gauge(&http)?;
    assert_eq!(
        gauge,
        [
            ("node-a".to_string(), 1.0),
            ("node-b".into(), 0.0),
            ("node-c".into(), 0.0),
            ("node-d".into(), 0.0)
        ]
    );

    // `gantry undrain` clears it everywhere.
    let out = sandbox.gantry(&url, &["undrain", "node-a"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    assert_eq!(node(&nodes, "node-a")["quarantine"], Value::Null, "{nodes}");
    assert!(
        !sandbox
            .gantry(&url, &["nodes"])
            .stdout
            .contains("quarantined")
    );
    assert!(quarantined_gauge(&http)?.iter().all(|(_, v)| *v == 0.0));
    Ok(())
}
