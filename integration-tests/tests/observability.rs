//! The operations surface over real processes: `/metrics` checked against
//! the cluster it describes (and by promtool), the JSON API and its errors,
//! followers pointing at the leader, and the status page in headless
//! Chromium with a screenshot.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use gantry_integration_tests::{Sandbox, find_tool, http_get, parse_samples, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);
const GIB: f64 = (1u64 << 30) as f64;

type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

fn scrape(http: &str) -> anyhow::Result<(String, Samples)> {
    let response = http_get(http, "/metrics", None)?;
    anyhow::ensure!(response.status == 200, "HTTP {}", response.status);
    anyhow::ensure!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "content type {:?}",
        response.header("content-type")
    );
    let samples = parse_samples(&response.body);
    Ok((response.body, samples))
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

fn sum(samples: &Samples, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| v)
        .sum()
}

fn promtool_check(text: &str) -> anyhow::Result<()> {
    let Some(promtool) = find_tool("promtool")? else {
        return Ok(());
    };
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Reserved GPU memory per (node, gpu) from the running jobs' assignments.
fn reservations_of_running_jobs(jobs: &Value) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for job in jobs.as_array().into_iter().flatten() {
        if job["state"] != "running" {
            continue;
        }
        let Some(attempt) = job["attempts"].as_array().and_then(|a| a.last()) else {
            continue;
        };
        let node = attempt["node"].as_str().unwrap_or_default().to_string();
        let per_gpu = attempt["gpu_memory_bytes"].as_f64().unwrap_or(0.0);
        for gpu in attempt["gpus"].as_array().into_iter().flatten() {
            *out.entry((node.clone(), gpu.to_string())).or_insert(0.0) += per_gpu;
        }
    }
    out
}

#[test]
fn metrics_agree_with_the_cluster_and_pass_promtool() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let http = coordinator.http.clone();
    sandbox.start_agent(
        "node-a",
        &url,
        "2xH100-80GiB",
        "127.0.0.2",
        &[("provider", "lambda")],
    )?;
    sandbox.start_agent(
        "node-b",
        &url,
        "1xA100-40GiB",
        "127.0.0.3",
        &[("provider", "hetzner")],
    )?;
    sandbox.wait_nodes_ready(&url, 2, T)?;
    let mut ids = Vec::new();
    for (kind, memory, gpus) in [
        ("training", "30GiB", "2"),
        ("selfplay", "12GiB", "1"),
        ("selfplay", "20GiB", "1"),
    ] {
        ids.push(sandbox.submit(
            &url,
            &[
                "--kind",
                kind,
                "--gpus",
                gpus,
                "--gpu-memory",
                memory,
                "--",
                "sleep",
                "300",
            ],
        )?);
    }
    // One job that cannot fit anywhere stays pending.
    sandbox.submit(
        &url,
        &[
            "--kind",
            "export",
            "--gpus",
            "1",
            "--gpu-memory",
            "79GiB",
            "--",
            "true",
        ],
    )?;
    for id in &ids {
        sandbox.wait_job_state(&url, *id, "running", T)?;
    }

    let jobs = sandbox.gantry_json(&url, &["jobs"])?;
    let expected = reservations_of_running_jobs(&jobs);
    let (text, samples) = wait_until("metrics to show the three reservations", T, || {
        let (text, samples) = scrape(&http).ok()?;
        (value(&samples, "gantry_jobs", &[("state", "running")]).is_some()
            && sum(&samples, "gantry_gpu_memory_reserved_bytes") == expected.values().sum::<f64>())
        .then_some((text, samples))
    })?;
    promtool_check(&text)?;
    check_dashboard(&samples)?;

    // Per GPU, reserved memory equals the sum of its running jobs' reservations.
    for (name, labels, v) in samples
        .iter()
        .filter(|(n, _, _)| n == "gantry_gpu_memory_reserved_bytes")
    {
        let key = (labels["node"].clone(), labels["gpu"].clone());
        assert_eq!(
            *v,
            expected.get(&key).copied().unwrap_or(0.0),
            "{name}{labels:?}"
        );
    }
    // training: 2 GPUs x 30GiB; selfplay: 12GiB and 20GiB.
    assert_eq!(expected.values().sum::<f64>(), 92.0 * GIB);
    assert_eq!(
        sum(&samples, "gantry_gpu_memory_total_bytes"),
        (2.0 * 80.0 + 40.0) * GIB
    );
    assert_eq!(
        value(&samples, "gantry_nodes", &[("state", "ready")]),
        Some(2.0)
    );
    assert_eq!(value(&samples, "gantry_agents_connected", &[]), Some(2.0));
    assert_eq!(
        value(
            &samples,
            "gantry_jobs",
            &[("state", "running"), ("kind", "selfplay")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "gantry_jobs",
            &[("state", "running"), ("kind", "training")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "gantry_jobs",
            &[("state", "pending"), ("kind", "export")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "gantry_node_info",
            &[("node", "node-b"), ("provider", "hetzner")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&samples, "gantry_raft_is_leader", &[]), Some(1.0));
    assert_eq!(value(&samples, "gantry_placements_total", &[]), Some(3.0));
    assert_eq!(
        value(
            &samples,
            "gantry_queue_wait_seconds_count",
            &[("kind", "selfplay")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&samples, "gantry_submit_seconds_count", &[]),
        Some(4.0)
    );
    assert!(value(&samples, "gantry_scheduling_pass_seconds_count", &[]).unwrap_or(0.0) >= 1.0);

    // Prometheus itself asks for OpenMetrics and gets it.
    let open = http_get(
        &http,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )?;
    assert!(
        open.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        open.headers
    );
    assert!(open.body.ends_with("# EOF\n"));

    // The JSON API is the CLI's JSON.
    let api_jobs = http_get(&http, "/v1/jobs?state=running", None)?.json()?;
    assert_eq!(api_jobs.as_array().map(Vec::len), Some(3));
    let nodes = http_get(&http, "/v1/nodes", None)?.json()?;
    assert_eq!(
        stable(&nodes),
        stable(&sandbox.gantry_json(&url, &["nodes"])?)
    );
    // The nodes view's free memory is the metric's, which is placement's own.
    let (_, samples) = scrape(&http)?;
    for node in nodes.as_array().into_iter().flatten() {
        for gpu in node["gpus"].as_array().into_iter().flatten() {
            let labels = [
                (
                    "node",
                    node["name"].as_str().unwrap_or_default().to_string(),
                ),
                ("gpu", gpu["index"].to_string()),
            ];
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                value(&samples, "gantry_gpu_memory_free_bytes", &labels),
                gpu["free_bytes"].as_f64(),
                "{labels:?}"
            );
        }
    }
    let job = http_get(&http, &format!("/v1/jobs/{}", ids[0]), None)?.json()?;
    assert_eq!(job["state"], "running");
    let status = http_get(&http, "/v1/status", None)?.json()?;
    assert_eq!(status["is_leader"], true);
    let ready = http_get(&http, "/readyz", None)?;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(http_get(&http, "/healthz", None)?.status, 200);
    Ok(())
}

/// A node listing without the live telemetry (RTT, last seen, disk, RAM)
/// that moves between two reads.
fn stable(nodes: &Value) -> Value {
    let mut out = nodes.clone();
    for node in out.as_array_mut().into_iter().flatten() {
        if let Some(node) = node.as_object_mut() {
            for field in [
                "rtt_ms",
                "last_seen_ms",
                "disk_used_bytes",
                "disk_total_bytes",
                "memory_used_bytes",
            ] {
                node.remove(field);
            }
        }
    }
    out
}

/// `grafana/gantry.json` imports cleanly: well-formed panels on the
/// declared data source, PromQL that promtool accepts, and only metric names
/// a leader really exposes.
fn check_dashboard(samples: &Samples) -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/gantry.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert!(dashboard["uid"].is_string() && dashboard["title"] == "Gantry");
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() >= 10, "too few panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(ids.insert(panel["id"].as_u64()), "duplicate id on {title}");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24),
            "{title}: gridPos {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default().to_string();
            assert!(!expr.is_empty(), "{title}: empty query");
            exprs.push((title.to_string(), expr));
        }
    }
    let exposed: std::collections::BTreeSet<&str> =
        samples.iter().map(|(name, _, _)| name.as_str()).collect();
    for (title, expr) in &exprs {
        let mut rest = expr.as_str();
        while let Some(start) = rest.find("gantry_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            assert!(
                exposed.contains(name),
                "panel {title:?} queries {name}, which /metrics does not expose"
            );
            rest = &tail[end..];
        }
    }
    // promtool parses every query as a recording rule.
    let Some(promtool) = find_tool("promtool")? else {
        return Ok(());
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(expr)?
        ));
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules)?;
    let out = Command::new(promtool)
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check rules on the dashboard's queries failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn bad_http_requests_get_clear_errors() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let http = coordinator.http.clone();
    for (path, status, field) in [
        ("/v1/jobs?limit=0", 400, "limit"),
        ("/v1/jobs?limit=many", 400, "limit"),
        ("/v1/jobs?state=sleeping", 400, "state"),
        ("/v1/jobs?colour=red", 400, "colour"),
        ("/v1/jobs/abc", 400, "id"),
        ("/v1/jobs/999", 404, "job 999"),
        ("/v1/nodes?x=1", 400, "x"),
        ("/v2/everything", 404, "/v2/everything"),
    ] {
        let response = http_get(&http, path, None)?;
        assert_eq!(response.status, status, "{path}: {}", response.body);
        let error = response.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains(field), "{path}: {error}");
    }
    // Nothing changed: still no jobs.
    let jobs = http_get(&http, "/v1/jobs", None)?.json()?;
    assert_eq!(jobs, Value::Array(Vec::new()));
    Ok(())
}

#[test]
fn followers_serve_their_raft_metrics_and_point_to_the_leader() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let set = sandbox.start_replicas(&[])?;
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let mut http_of = |id: usize| -> anyhow::Result<String> {
        let index = set.procs[id - 1].ok_or_else(|| anyhow::anyhow!("replica {id} stopped"))?;
        sandbox
            .proc(index)
            .http
            .clone()
            .ok_or_else(|| anyhow::anyhow!("replica {id} has no http"))
    };
    let mut sandbox_http = Vec::new();
    for id in 1..=3 {
        sandbox_http.push(http_of(id)?);
    }
    let follower = if leader == 1 { 2 } else { 1 };
    let leader_http = &sandbox_http[leader - 1];
    let follower_http = &sandbox_http[follower - 1];

    // Every replica becomes ready: it knows the leader and has applied its log.
    for http in &sandbox_http {
        wait_until("readyz", T, || {
            (http_get(http, "/readyz", None).ok()?.status == 200).then_some(())
        })?;
    }
    let (text, samples) = scrape(follower_http)?;
    promtool_check(&text)?;
    assert_eq!(value(&samples, "gantry_raft_is_leader", &[]), Some(0.0));
    assert_eq!(
        value(&samples, "gantry_raft_leader_id", &[]),
        Some(leader as f64)
    );
    assert_eq!(
        value(&samples, "gantry_cluster_metrics_available", &[]),
        Some(0.0)
    );
    assert!(!text.contains("gantry_jobs{"), "{text}");
    let (_, leader_samples) = scrape(leader_http)?;
    assert_eq!(
        value(&leader_samples, "gantry_raft_is_leader", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&leader_samples, "gantry_raft_term", &[]),
        value(&samples, "gantry_raft_term", &[])
    );

    // The rest of the API points at the leader.
    let refused = http_get(follower_http, "/v1/nodes", None)?;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let leader_url = &set.urls[leader - 1];
    assert_eq!(refused.header("gantry-leader"), Some(leader_url.as_str()));
    assert_eq!(refused.json()?["leader"], leader_url.as_str());
    let status = http_get(follower_http, "/v1/status", None)?.json()?;
    assert_eq!(status["is_leader"], false);
    assert_eq!(status["leader_id"], leader as u64);
    Ok(())
}

#[test]
fn the_status_page_shows_nodes_and_jobs_in_chromium() -> anyhow::Result<()> {
    let Some(chromium) = find_tool("chromium")? else {
        return Ok(());
    };
    let mut sandbox = Sandbox::new()?;
    let (dev, url) = sandbox.start_dev("dev", "2xH100-80GiB")?;
    let http = sandbox
        .proc(dev)
        .http
        .clone()
        .ok_or_else(|| anyhow::anyhow!("dev has no http"))?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    let node = sandbox.gantry_json(&url, &["nodes"])?[0]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id = sandbox.submit(
        &url,
        &[
            "--name",
            "page-test-selfplay",
            "--kind",
            "selfplay",
            "--gpus",
            "1",
            "--gpu-memory",
            "24GiB",
            "--",
            "sleep",
            "300",
        ],
    )?;
    sandbox.wait_job_state(&url, id, "running", T)?;

    let page = format!("{http}/");
    let browser = |extra: &[String]| -> anyhow::Result<std::process::Output> {
        let profile = tempfile::tempdir()?;
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,900",
            // Lets the page's fetches and rendering finish before the dump.
            "--virtual-time-budget=5000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra.iter().cloned());
        args.push(page.clone());
        Ok(Command::new(&chromium).args(&args).output()?)
    };
    let dom = wait_until("the page to render the node and the job", T, || {
        let out = browser(&["--dump-dom".to_string()]).ok()?;
        let dom = String::from_utf8_lossy(&out.stdout).to_string();
        (dom.contains(&format!("data-node=\"{node}\""))
            && dom.contains(&format!("data-job-id=\"{id}\"")))
        .then_some(dom)
    })?;
    assert!(dom.contains("page-test-selfplay"), "job name missing");
    assert!(dom.contains("H100-80GiB"), "GPU model missing");
    assert!(dom.contains(">running<"), "job state missing");
    assert!(dom.contains("free of 80GiB"), "GPU memory bar missing");

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots)?;
    let shot = shots.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = browser(&[format!("--screenshot={}", shot.display())])?;
    let png = std::fs::read(&shot).map_err(|e| {
        anyhow::anyhow!(
            "no screenshot at {}: {e}\n{}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 10_000, "screenshot suspiciously small");
    println!("status page screenshot: {}", shot.display());
    Ok(())
}
