//! Job lifecycle over real processes: event-driven pipeline stages, retries,
//! the dead-letter queue, OOM-aware retries, snapshots, and the event stream.

use std::time::Duration;

use anyhow::Context;
use gantry_integration_tests::{Sandbox, wait_until};
use gantry_proto as pb;
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

fn start_cluster(sandbox: &mut Sandbox) -> anyhow::Result<String> {
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    sandbox.start_agent("node-a", &coordinator.url, "2xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&coordinator.url, 1, T)?;
    Ok(coordinator.url)
}

fn submit_file(sandbox: &Sandbox, url: &str, name: &str, text: &str) -> anyhow::Result<Vec<u64>> {
    let path = sandbox.path().join(name);
    std::fs::write(&path, text)?;
    let out = sandbox.gantry_json(url, &["submit", "-f", &path.display().to_string()])?;
    Ok(out["job_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect())
}

fn ms(job: &Value, attempt: usize, field: &str) -> u64 {
    job["attempts"][attempt][field].as_u64().unwrap_or(0)
}

#[test]
fn a_stage_starts_as_soon_as_its_input_succeeds_after_retries() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let url = start_cluster(&mut sandbox)?;
    let counter = sandbox.path().join("middle-attempts");
    let spec = format!(
        r#"
pipeline: loop
jobs:
  - name: selfplay
    kind: selfplay
    command: [echo, games]
  - name: train
    kind: training
    after: [selfplay]
    retry: {{max_attempts: 3, backoff: 200ms}}
    shell: true
    command: ["echo x >> {counter}; [ $(wc -l < {counter}) -ge 3 ]"]
  - name: evaluate
    kind: evaluation
    after: [train]
    command: [echo, evaluated]
"#,
        counter = counter.display()
    );
    let ids = submit_file(&sandbox, &url, "pipeline.yaml", &spec)?;
    assert_eq!(ids.len(), 3);
    let evaluate = sandbox.wait_job_state(&url, ids[2], "succeeded", T)?;
    let train = sandbox.job(&url, ids[1])?;
    let attempts = train["attempts"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(attempts, 3, "failed twice, then succeeded: {train}");
    assert_eq!(train["state"], "succeeded");
    let gap = ms(&evaluate, 0, "started_at_ms").saturating_sub(ms(&train, 2, "ended_at_ms"));
    assert!(
        gap < 1000,
        "stage three started {gap} ms after stage two succeeded"
    );

    let view = sandbox.gantry_json(&url, &["pipeline", "loop"])?;
    assert_eq!(view["run"], 1);
    let states: Vec<&str> = view["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["state"].as_str())
        .collect();
    assert_eq!(states, ["succeeded"; 3]);
    let human = sandbox.gantry(&url, &["pipeline", "loop"]);
    assert!(
        human.stdout.contains("evaluate") && human.stdout.contains("<- train"),
        "{}",
        human.stdout
    );

    // The loop runs again under a new run id.
    let again = submit_file(&sandbox, &url, "pipeline.yaml", &spec)?;
    sandbox.wait_job_state(&url, again[2], "succeeded", T)?;
    let view = sandbox.gantry_json(&url, &["pipeline", "loop"])?;
    assert_eq!(view["run"], 2);
    Ok(())
}

#[test]
fn a_dead_lettered_stage_blocks_its_dependants_until_dlq_retry() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let url = start_cluster(&mut sandbox)?;
    let input = sandbox.path().join("input.npz");
    let spec = format!(
        r#"
pipeline: export-loop
jobs:
  - name: export
    kind: export
    retry: {{max_attempts: 2, backoff: 100ms}}
    shell: true
    command: ["test -e {input} || {{ echo 'missing input shard' >&2; exit 4; }}"]
  - name: train
    kind: training
    after: [export]
    command: [echo, trained]
"#,
        input = input.display()
    );
    let ids = submit_file(&sandbox, &url, "pipeline.yaml", &spec)?;
    let export = sandbox.wait_job_state(&url, ids[0], "deadlettered", T)?;
    assert_eq!(export["attempts"].as_array().map(Vec::len), Some(2));
    let train = sandbox.wait_job_state(&url, ids[1], "blocked", T)?;
    let reason = train["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("export"), "the cause is named: {reason}");

    let dlq = sandbox.gantry_json(&url, &["dlq", "list"])?;
    assert_eq!(
        dlq.as_array()
            .map(|a| a.iter().map(|j| j["id"].clone()).collect::<Vec<_>>()),
        Some(vec![Value::from(ids[0])])
    );
    let show = sandbox.gantry(&url, &["dlq", "show", &ids[0].to_string()]);
    assert!(
        show.stdout.contains("missing input shard"),
        "stderr tail shown: {}",
        show.stdout
    );
    let not_in_dlq = sandbox.gantry(&url, &["dlq", "retry", &ids[1].to_string()]);
    assert_eq!(not_in_dlq.code, 1, "{not_in_dlq:?}");

    std::fs::write(&input, b"shard")?;
    let out = sandbox.gantry(&url, &["dlq", "retry", &ids[0].to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    sandbox.wait_job_state(&url, ids[1], "succeeded", T)?;
    assert_eq!(sandbox.job(&url, ids[0])?["state"], "succeeded");
    Ok(())
}

#[test]
fn an_out_of_memory_attempt_is_retried_with_half_the_batch() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let url = start_cluster(&mut sandbox)?;
    let spec = r#"
name: selfplay-oom
kind: selfplay
resources: {gpus: 1, gpu_memory: 8GiB}
batch:
  tiers: [{min_free: 32GiB, size: 512}, {min_free: 16GiB, size: 256}, {size: 128}]
shell: true
command: ["if [ {batch_size} -ge 512 ]; then echo 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB' >&2; exit 1; fi; echo ran with {batch_size}"]
"#;
    let ids = submit_file(&sandbox, &url, "oom.yaml", spec)?;
    let job = sandbox.wait_job_state(&url, ids[0], "succeeded", T)?;
    assert_eq!(job["attempts"][0]["batch_size"], 512, "{job}");
    assert_eq!(job["attempts"][0]["oom"], true, "{job}");
    assert_eq!(job["attempts"][1]["batch_size"], 256, "{job}");
    // The class now reserves more than the 8 GiB that was not enough.
    assert!(
        job["attempts"][1]["gpu_memory_bytes"].as_i64().unwrap_or(0) > 8 << 30,
        "{job}"
    );
    let logs = sandbox.gantry(&url, &["logs", &ids[0].to_string()]);
    assert_eq!(logs.stdout.trim(), "ran with 256");
    Ok(())
}

#[test]
fn a_watcher_that_reconnects_with_its_last_index_misses_nothing_across_a_restart()
-> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    sandbox.start_agent("node-a", &url, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let first = sandbox.submit(&url, &["--", "echo", "one"])?;
    sandbox.wait_job_state(&url, first, "succeeded", T)?;
    // Read part of the stream, then drop the connection.
    let seen: Vec<pb::Event> = runtime.block_on(read_events(&url, 1, 2))?;
    assert_eq!(seen.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2]);

    sandbox.proc(coordinator.index).kill9();
    sandbox.start_coordinator("coordinator-2", port, Some(coordinator.data_dir.clone()))?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    let second = sandbox.submit(&url, &["--", "echo", "two"])?;
    sandbox.wait_job_state(&url, second, "succeeded", T)?;

    let status = sandbox.gantry_json(&url, &["status"])?;
    let last = status["last_event_index"].as_u64().unwrap_or(0);
    let rest: Vec<pb::Event> = runtime.block_on(read_events(&url, 3, (last - 2) as usize))?;
    let all: Vec<u64> = seen.iter().chain(&rest).map(|e| e.index).collect();
    assert_eq!(
        all,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let states: Vec<(u64, String)> = seen
        .iter()
        .chain(&rest)
        .map(|e| (e.job_id, e.state.clone()))
        .collect();
    for job in [first, second] {
        assert!(
            states.contains(&(job, "succeeded".to_string())),
            "{states:?}"
        );
    }
    Ok(())
}

async fn read_events(url: &str, from: u64, count: usize) -> anyhow::Result<Vec<pb::Event>> {
    let mut client = pb::gantry_client::GantryClient::connect(url.to_string()).await?;
    let mut stream = client
        .watch_events(pb::WatchEventsRequest {
            from_index: from,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        let next = tokio::time::timeout(T, stream.message()).await??;
        match next {
            Some(event) => events.push(event),
            None => break,
        }
    }
    Ok(events)
}

#[test]
fn an_evaluation_reads_a_consistent_snapshot_while_training_replaces_the_model()
-> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let url = start_cluster(&mut sandbox)?;
    let models = sandbox.path().join("models");
    std::fs::create_dir_all(&models)?;
    let model = models.join("latest.pt");
    std::fs::write(&model, b"weights-v1")?;
    let gate = sandbox.path().join("gate");
    let spec = format!(
        r#"
name: eval
kind: evaluation
locks: [{{name: model/square8_2p, mode: shared}}]
snapshot: [{{from: {model}, as: model.pt}}]
shell: true
command: ["cat $GANTRY_SNAPSHOT_DIR/model.pt; echo; while [ ! -e {gate} ]; do sleep 0.05; done; cat $GANTRY_SNAPSHOT_DIR/model.pt"]
"#,
        model = model.display(),
        gate = gate.display()
    );
    let ids = submit_file(&sandbox, &url, "eval.yaml", &spec)?;
    sandbox.wait_job_state(&url, ids[0], "running", T)?;
    wait_until("the first read", T, || {
        let logs = sandbox.gantry(&url, &["logs", &ids[0].to_string()]);
        logs.stdout.contains("weights-v1").then_some(())
    })?;
    // Training replaces the model by rename, then rewrites it in place.
    let tmp = models.join("latest.pt.tmp");
    std::fs::write(&tmp, b"weights-v2")?;
    std::fs::rename(&tmp, &model)?;
    std::fs::write(&model, b"weights-v3")?;
    std::fs::write(&gate, b"")?;
    sandbox.wait_job_state(&url, ids[0], "succeeded", T)?;
    let logs = sandbox.gantry(&url, &["logs", &ids[0].to_string()]);
    assert_eq!(logs.stdout.trim(), "weights-v1\nweights-v1", "{logs:?}");
    Ok(())
}

/// Issue 10, finding 5a: a job cancelled while it waits in retry back-off is
/// cancelled at once and never placed again (it was requeued, placed and
/// refused in a loop, hundreds of Raft entries a second, for ever).
#[test]
fn a_job_cancelled_in_retry_back_off_is_cancelled_at_once() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let url = start_cluster(&mut sandbox)?;
    let spec = r#"
name: flaky
retry: {max_attempts: 3, backoff: 30s}
resources: {gpus: 1, gpu_memory: 10GiB}
shell: true
command: ["exit 1"]
"#;
    let ids = submit_file(&sandbox, &url, "flaky.yaml", spec)?;
    let id = ids.first().copied().context("no job id")?;
    sandbox.wait_job_state(&url, id, "failed", T)?;
    sandbox.gantry_json(&url, &["cancel", &id.to_string()])?;
    let job = sandbox.wait_job_state(&url, id, "cancelled", Duration::from_secs(10))?;
    let attempts = job["attempts"].as_array().map_or(0, Vec::len);
    assert_eq!(attempts, 1, "no attempt after the cancel: {job}");
    Ok(())
}
