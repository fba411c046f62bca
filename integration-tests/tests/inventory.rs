//! The fleet inventory: listed nodes that never registered show as missing;
//! with --strict-inventory an unlisted agent is refused and logged.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(30);

#[test]
fn missing_nodes_show_and_a_strict_inventory_refuses_strangers() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let hosts = sandbox.path().join("hosts.yaml");
    std::fs::write(
        &hosts,
        "hosts:\n  - {name: listed, address: 127.0.0.2, provider: lambda, gpus: {model: H100-80GiB, count: 1, memory: 80GiB}}\n  - {name: absent, address: 127.0.0.3, provider: vast, region: eu, gpus: {model: RTX4090-24GiB, count: 2, memory: 24GiB}}\n",
    )?;
    let hosts = hosts.display().to_string();
    let coordinator = sandbox.start_coordinator_with(
        "coordinator",
        &["--inventory", &hosts, "--strict-inventory"],
    )?;
    let url = coordinator.url.clone();
    sandbox.start_agent("listed", &url, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.start_agent("stranger", &url, "1xH100-80GiB", "127.0.0.4", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    wait_until("the refusal to be logged", T, || {
        sandbox
            .log("coordinator")
            .contains("agent refused: not in the inventory")
            .then_some(())
    })?;
    let nodes = sandbox.gantry_json(&url, &["nodes"])?;
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let state = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["state"].clone())
    };
    assert_eq!(state("listed"), Some("ready".into()));
    assert_eq!(state("absent"), Some("missing".into()));
    assert_eq!(state("stranger"), None, "an unlisted agent never joins");
    let absent = nodes
        .iter()
        .find(|n| n["name"] == "absent")
        .expect("absent");
    assert_eq!(absent["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(absent["labels"]["provider"], "vast");

    // A bad inventory is refused before the coordinator starts.
    let bad = sandbox.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "hosts:\n  - {name: a, address: x, provider: p, gpus: {model: H100, count: 0, memory: 80GiB}}\n",
    )?;
    let out = sandbox.gantry(&url, &["inventory", "check", &bad.display().to_string()]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("hosts[0].gpus.count"), "{}", out.stderr);
    Ok(())
}
