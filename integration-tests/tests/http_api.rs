//! The HTTP API's writes and streams (issue 12): bad bodies get 400 naming
//! the field and store nothing, tokens and roles are those of gRPC, a
//! follower names the leader (its gRPC and HTTP addresses), events resume
//! after `Last-Event-ID` with nothing missed, logs stream, streams are
//! bounded per client, and `/v1/openapi.json` describes exactly the routes
//! served.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use gantry_integration_tests::{
    HttpResponse, Sandbox, http_get, http_request, http_send, read_http_head, wait_until,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn post(base: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    http_request(base, "POST", path, headers, body.as_bytes()).expect("POST")
}

fn json(response: &HttpResponse) -> Value {
    response.json().expect("JSON body")
}

fn job_count(http: &str, auth: &[(&str, &str)]) -> usize {
    let response = http_request(http, "GET", "/v1/jobs", auth, b"").expect("GET /v1/jobs");
    json(&response).as_array().map_or(usize::MAX, Vec::len)
}

fn ids(response: &HttpResponse) -> Vec<u64> {
    assert_eq!(response.status, 201, "{response:?}");
    json(response)["job_ids"]
        .as_array()
        .expect("job_ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

/// (case, content type header, body, field, words in the reason).
type BadBody = (
    &'static str,
    (&'static str, &'static str),
    String,
    &'static str,
    &'static str,
);

#[test]
fn bad_bodies_are_refused_naming_the_field_and_store_nothing() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let http = sandbox.start_coordinator("coordinator", 0, None)?.http;
    let big = format!(
        r#"{{"command": ["true"], "env": {{"BIG": "{}"}}}}"#,
        "x".repeat(10 << 20)
    );
    let json_type = ("Content-Type", "application/json");
    let yaml_type = ("Content-Type", "application/yaml");
    let cases: Vec<BadBody> = vec![
        (
            "not JSON",
            json_type,
            "{\"command\": [\"true\"".into(),
            "body",
            "not JSON",
        ),
        ("empty", json_type, String::new(), "body", "not JSON"),
        ("a number", json_type, "42".into(), "body", "expected a job"),
        (
            "wrong type",
            json_type,
            r#"{"command": ["true"], "priority": "high"}"#.into(),
            "job.priority",
            "invalid type",
        ),
        (
            "unknown field",
            json_type,
            r#"{"command": ["true"], "gpus": 1}"#.into(),
            "job.gpus",
            "unknown field `gpus`",
        ),
        (
            "negative gpu memory",
            json_type,
            r#"{"command": ["true"], "resources": {"gpus": 1, "gpu_memory": -1}}"#.into(),
            "job.resources.gpu_memory",
            "must not be negative",
        ),
        (
            "empty command",
            json_type,
            r#"{"command": []}"#.into(),
            "jobs[0].command",
            "must not be empty",
        ),
        (
            "unknown kind",
            json_type,
            r#"{"kind": "sleeping", "command": ["true"]}"#.into(),
            "jobs[0].kind",
            "unknown kind",
        ),
        (
            "after unknown",
            json_type,
            r#"[{"name": "a", "command": ["true"], "after": ["b"]}]"#.into(),
            "jobs[0].after",
            "no job named \"b\"",
        ),
        (
            "10 MB body",
            json_type,
            big,
            "body",
            "larger than the 4MiB limit",
        ),
        (
            "malformed YAML",
            yaml_type,
            "command: [true\n".into(),
            "body",
            "malformed YAML",
        ),
        (
            "YAML timeout zero",
            yaml_type,
            "command: [true]\ntimeout: 0s\n".into(),
            "job.timeout",
            "must be more than zero",
        ),
    ];
    for (case, content_type, body, field, words) in cases {
        let response = post(&http, "/v1/jobs", &[content_type], &body);
        assert_eq!(response.status, 400, "{case}: {response:?}");
        let answer = json(&response);
        assert_eq!(answer["field"].as_str(), Some(field), "{case}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(words),
            "{case}: {error:?} should say {words:?}"
        );
        assert!(error.len() < 2000, "{case}: bounded: {} bytes", error.len());
        assert_eq!(job_count(&http, &[]), 0, "{case}: nothing stored");
    }
    let response = http_request(&http, "POST", "/v1/jobs", &[], b"\xff\xfe")?;
    assert_eq!(
        json(&response)["field"].as_str(),
        Some("body"),
        "{response:?}"
    );
    let long_key = "k".repeat(300);
    let response = post(
        &http,
        "/v1/jobs",
        &[("Idempotency-Key", &long_key)],
        r#"{"command": ["true"]}"#,
    );
    assert_eq!(json(&response)["field"].as_str(), Some("submission_key"));
    assert_eq!(job_count(&http, &[]), 0);

    // Good bodies: one job, a keyed resubmission, a list, a pipeline, YAML.
    let one = ids(&post(&http, "/v1/jobs", &[], r#"{"command": ["true"]}"#));
    assert_eq!(one.len(), 1);
    let key = [("Idempotency-Key", "nightly-42")];
    let first = ids(&post(
        &http,
        "/v1/jobs",
        &key,
        r#"[{"command": "true"}, {"command": ["true"]}]"#,
    ));
    let again = ids(&post(
        &http,
        "/v1/jobs",
        &key,
        r#"[{"command": "true"}, {"command": ["true"]}]"#,
    ));
    assert_eq!(
        (first.len(), &first),
        (2, &again),
        "a key never creates jobs twice"
    );
    let pipeline = ids(&post(
        &http,
        "/v1/jobs",
        &[],
        r#"{"pipeline": "loop", "jobs": [{"name": "a", "command": ["true"]}, {"name": "b", "command": ["true"], "after": ["a"]}]}"#,
    ));
    assert_eq!(pipeline.len(), 2);
    let run = json(&http_get(&http, "/v1/pipelines/loop", None)?);
    assert_eq!(run["jobs"].as_array().map(Vec::len), Some(2), "{run}");
    let yaml = ids(&post(
        &http,
        "/v1/jobs",
        &[yaml_type],
        "command: [true]\n---\ncommand: [true]\n",
    ));
    assert_eq!(yaml.len(), 2);
    assert_eq!(job_count(&http, &[]), 7);

    // Cancel, the DLQ and drains answer with the gRPC API's errors.
    let cancel = post(&http, &format!("/v1/jobs/{}/cancel", one[0]), &[], "");
    assert_eq!(
        (cancel.status, json(&cancel)["state"].as_str()),
        (200, Some("cancelled"))
    );
    assert_eq!(post(&http, "/v1/jobs/999999/cancel", &[], "").status, 404);
    let bad_id = post(&http, "/v1/jobs/abc/cancel", &[], "");
    assert_eq!(
        (bad_id.status, json(&bad_id)["field"].as_str()),
        (400, Some("id"))
    );
    let not_dead = http_request(&http, "DELETE", &format!("/v1/dlq/{}", one[0]), &[], b"")?;
    assert_eq!(not_dead.status, 409, "{not_dead:?}");
    assert_eq!(post(&http, "/v1/nodes/nosuch/drain", &[], "").status, 404);
    let zero = post(&http, "/v1/nodes/nosuch/drain?deadline=0s", &[], "");
    assert_eq!(json(&zero)["field"].as_str(), Some("deadline"), "{zero:?}");
    let jobs = json(&http_get(
        &http,
        "/v1/jobs?kind=generic&pipeline=loop&limit=1",
        None,
    )?);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
    Ok(())
}

/// The token file of a coordinator: a user and an admin.
const TOKENS: &str = "- {name: alice, token: alice-secret-0123456789, role: user}\n\
                      - {name: ops, token: ops-secret-0123456789ab, role: admin}\n";

#[test]
fn tokens_and_roles_and_the_openapi_routes() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let tokens = sandbox.path().join("tokens.yaml");
    std::fs::write(&tokens, TOKENS)?;
    let tokens = tokens.display().to_string();
    let http = sandbox
        .start_coordinator_with("coordinator", &["--tokens", &tokens])?
        .http;
    let user = [("Authorization", "Bearer alice-secret-0123456789")];
    let admin = [("Authorization", "Bearer ops-secret-0123456789ab")];

    let none = post(&http, "/v1/jobs", &[], r#"{"command": ["true"]}"#);
    assert_eq!(none.status, 401, "{none:?}");
    assert!(none.header("www-authenticate").is_some());
    let wrong = post(
        &http,
        "/v1/jobs",
        &[("Authorization", "Bearer nope-nope-nope-nope")],
        "{}",
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");
    // A refusal beats a bad body, and reaches the client past 10 MB of it.
    let huge = format!(r#"{{"command": ["{}"]}}"#, "x".repeat(10 << 20));
    assert_eq!(post(&http, "/v1/jobs", &[], &huge).status, 401);
    assert_eq!(post(&http, "/v1/jobs", &user, "not json").status, 400);
    assert_eq!(job_count(&http, &admin), 0, "nothing stored");
    let drain = post(&http, "/v1/nodes/gpu-1/drain", &user, "");
    assert_eq!(drain.status, 403, "{drain:?}");
    assert!(
        json(&drain)["error"]
            .as_str()
            .is_some_and(|e| e.contains("admin"))
    );
    assert_eq!(
        post(&http, "/v1/nodes/gpu-1/undrain", &user, "").status,
        403
    );
    assert_eq!(
        post(&http, "/v1/nodes/gpu-1/gpus/0/reset", &user, "").status,
        403
    );
    // A user may drop its own dead-lettered jobs (ownership is checked per
    // job; `credentials.rs` covers the refusals): job 1 does not exist.
    let drop = http_request(&http, "DELETE", "/v1/dlq/1", &user, b"")?;
    assert_eq!(drop.status, 404, "{drop:?}");
    assert_eq!(
        ids(&post(&http, "/v1/jobs", &user, r#"{"command": ["true"]}"#)).len(),
        1
    );
    // An admin passes the role check and meets the real answer.
    assert_eq!(post(&http, "/v1/nodes/gpu-1/drain", &admin, "").status, 404);

    // The description is open; every documented (path, method) is served,
    // and every other method of a documented path is 405. With the unit
    // test (documented paths == the router's table) this pins the routes.
    let doc = json(&http_get(&http, "/v1/openapi.json", None)?);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 13, "{paths:?}");
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "999999")
            .replace("{name}", "nosuch")
            .replace("{gpu}", "0");
        for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
            let documented = item.get(method.to_lowercase()).is_some();
            let status = if concrete == "/v1/events" && method == "GET" {
                let stream = http_send(&http, method, &concrete, &admin, b"")?;
                read_http_head(&mut BufReader::new(stream))?.0
            } else {
                let response = http_request(&http, method, &concrete, &admin, b"")?;
                assert!(
                    !response.body.contains("no endpoint"),
                    "{method} {path}: {response:?}"
                );
                response.status
            };
            if documented {
                assert!(
                    status != 405 && status != 401,
                    "{method} {path} is documented: {status}"
                );
            } else {
                assert_eq!(status, 405, "{method} {path} is not documented");
            }
        }
    }
    Ok(())
}

/// One Server-Sent Event: (id, event type, data).
type Sse = (Option<u64>, String, String);

/// Opens `/v1/events...` and reads `count` events (comments skipped).
fn read_events(http: &str, path: &str, headers: &[(&str, &str)], count: usize) -> Vec<Sse> {
    let stream = http_send(http, "GET", path, headers, b"").expect("connect");
    let mut reader = BufReader::new(stream);
    let (status, head) = read_http_head(&mut reader).expect("head");
    assert_eq!(status, 200, "{path}: {head:?}");
    let mut events = Vec::new();
    let (mut id, mut kind, mut data) = (None, String::new(), String::new());
    while events.len() < count {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "stream ended"
        );
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !data.is_empty() {
                events.push((
                    id.take(),
                    std::mem::take(&mut kind),
                    std::mem::take(&mut data),
                ));
            }
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            kind = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    events
}

#[test]
fn events_resume_after_last_event_id_and_logs_stream() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (index, _) = sandbox.start_dev("dev", "1xH100-80GiB")?;
    let http = sandbox.proc(index).http.clone().expect("http");
    let job = |id: u64| json(&http_get(&http, &format!("/v1/jobs/{id}"), None).expect("job"));
    let wait_state = |id: u64, state: &str| {
        wait_until(&format!("job {id} {state}"), T, || {
            (job(id)["state"].as_str() == Some(state)).then_some(())
        })
    };
    let hello = ids(&post(
        &http,
        "/v1/jobs",
        &[],
        r#"{"command": ["echo", "hello http"]}"#,
    ))[0];
    let failing = r#"{"command": ["false"], "retry": {"max_attempts": 1}}"#;
    let dead = ids(&post(&http, "/v1/jobs", &[], failing))[0];
    let dropped = ids(&post(&http, "/v1/jobs", &[], failing))[0];
    wait_state(hello, "succeeded")?;
    wait_state(dead, "deadlettered")?;
    wait_state(dropped, "deadlettered")?;

    // Logs: the output, stderr empty, a bad stream named.
    let out = http_get(&http, &format!("/v1/jobs/{hello}/logs"), None)?;
    assert_eq!(
        (out.status, out.body.as_str()),
        (200, "hello http\n"),
        "{out:?}"
    );
    let followed = http_get(&http, &format!("/v1/jobs/{hello}/logs?follow=true"), None)?;
    assert_eq!(
        followed.body, "hello http\n",
        "an ended job's followed log ends"
    );
    let err = http_get(&http, &format!("/v1/jobs/{hello}/logs?stream=stderr"), None)?;
    assert_eq!((err.status, err.body.as_str()), (200, ""));
    let bad = http_get(&http, &format!("/v1/jobs/{hello}/logs?stream=both"), None)?;
    assert_eq!(
        (bad.status, json(&bad)["field"].as_str()),
        (400, Some("stream"))
    );

    // The DLQ: a retry with a corrected spec succeeds; a drop is gone.
    let retry = post(
        &http,
        &format!("/v1/dlq/{dead}/retry"),
        &[],
        r#"{"command": ["true"]}"#,
    );
    assert_eq!(retry.status, 200, "{retry:?}");
    wait_state(dead, "succeeded")?;
    let drop = http_request(&http, "DELETE", &format!("/v1/dlq/{dropped}"), &[], b"")?;
    assert_eq!(drop.status, 200, "{drop:?}");
    let dlq = json(&http_get(&http, "/v1/dlq", None)?);
    assert_eq!(dlq.as_array().map(Vec::len), Some(0), "{dlq}");

    // Drain with a deadline and undrain, seen in /v1/nodes.
    let nodes = json(&http_get(&http, "/v1/nodes", None)?);
    let node = nodes[0]["name"].as_str().expect("a node").to_string();
    let drained = post(
        &http,
        &format!("/v1/nodes/{node}/drain?deadline=1h"),
        &[],
        "",
    );
    assert_eq!(drained.status, 200, "{drained:?}");
    assert_eq!(
        json(&http_get(&http, "/v1/nodes", None)?)[0]["draining"],
        true
    );
    assert_eq!(
        post(&http, &format!("/v1/nodes/{node}/undrain"), &[], "").status,
        200
    );
    assert_eq!(
        json(&http_get(&http, "/v1/nodes", None)?)[0]["draining"],
        false
    );

    // Events: every one from 1, then a resume after the middle one gives
    // exactly the rest; ids are the events' indexes.
    let last = json(&http_get(&http, "/v1/status", None)?)["last_event_index"]
        .as_u64()
        .expect("last_event_index");
    assert!(last >= 8, "enough events: {last}");
    let all = read_events(&http, "/v1/events", &[], last as usize);
    let indexes: Vec<u64> = all.iter().filter_map(|e| e.0).collect();
    assert_eq!(indexes, (1..=last).collect::<Vec<_>>());
    for (id, kind, data) in &all {
        let event: Value = serde_json::from_str(data)?;
        assert_eq!((event["index"].as_u64(), kind.as_str()), (*id, "job"));
    }
    let middle = last / 2;
    let resumed = read_events(
        &http,
        "/v1/events?from=1",
        &[("Last-Event-ID", &middle.to_string())],
        (last - middle) as usize,
    );
    assert_eq!(
        resumed,
        all[middle as usize..].to_vec(),
        "resumed just after {middle}"
    );
    // A live event reaches an open stream; a job filter keeps to the job.
    let stream = std::thread::spawn({
        let http = http.clone();
        let from = (last + 1).to_string();
        move || read_events(&http, &format!("/v1/events?from={from}"), &[], 1)
    });
    let live = ids(&post(&http, "/v1/jobs", &[], r#"{"command": ["true"]}"#))[0];
    let first_live = stream.join().expect("reader");
    assert_eq!(first_live[0].0, Some(last + 1));
    let only = read_events(&http, &format!("/v1/events?job={hello}"), &[], 3);
    for (_, _, data) in &only {
        assert_eq!(
            serde_json::from_str::<Value>(data)?["job_id"].as_u64(),
            Some(hello)
        );
    }
    wait_state(live, "succeeded")?;

    // Jobs filtered by kind and pipeline on the server, the limit after
    // the filter; bad filters and pages past the bound are refused.
    let pipeline = ids(&post(
        &http,
        "/v1/jobs",
        &[],
        r#"{"pipeline": "loop", "jobs": [
            {"name": "a", "kind": "evaluation", "command": ["true"]},
            {"name": "b", "kind": "evaluation", "command": ["true"]},
            {"name": "c", "kind": "training", "command": ["true"]}]}"#,
    ));
    let evaluation = ids(&post(
        &http,
        "/v1/jobs",
        &[],
        r#"{"kind": "evaluation", "command": ["true"]}"#,
    ))[0];
    let listed = |path: &str| -> Vec<u64> {
        json(&http_get(&http, path, None).expect("jobs"))
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|j| j["id"].as_u64())
            .collect()
    };
    assert_eq!(
        listed("/v1/jobs?kind=evaluation&limit=2"),
        [evaluation, pipeline[1]]
    );
    assert_eq!(
        listed("/v1/jobs?kind=evaluation&pipeline=loop"),
        [pipeline[1], pipeline[0]]
    );
    assert_eq!(listed("/v1/jobs?pipeline=loop&limit=1"), [pipeline[2]]);
    assert_eq!(listed("/v1/jobs?pipeline=nothing"), Vec::<u64>::new());
    let long = "p".repeat(300);
    for (path, field, words) in [
        ("/v1/jobs?kind=bogus".to_string(), "kind", "unknown kind"),
        (
            format!("/v1/jobs?pipeline={long}"),
            "pipeline",
            "longer than",
        ),
        (
            "/v1/jobs?limit=20000".to_string(),
            "limit",
            "more than the 10000",
        ),
    ] {
        let bad = http_get(&http, &path, None)?;
        assert_eq!(
            (bad.status, json(&bad)["field"].as_str()),
            (400, Some(field)),
            "{bad:?}"
        );
        assert!(
            json(&bad)["error"]
                .as_str()
                .unwrap_or_default()
                .contains(words),
            "{bad:?}"
        );
    }
    let bad = http_get(&http, "/v1/events?from=x", None)?;
    assert_eq!(
        (bad.status, json(&bad)["field"].as_str()),
        (400, Some("from"))
    );
    Ok(())
}

#[test]
fn a_follower_answers_writes_with_the_leader() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    // leader_of counts replicas from 1.
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))? - 1;
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let index = set.procs[follower].expect("running");
    let http = sandbox.proc(index).http.clone().expect("http");
    // The leader knows it leads before the follower has heard from it (and
    // learned its HTTP address from its batches): until then the follower
    // refuses naming no leader. Wait for that, not for a fixed time.
    let response = wait_until("the follower to name the leader", T, || {
        let response = post(&http, "/v1/jobs", &[], r#"{"command": ["true"]}"#);
        let learning = response.status == 503 && json(&response)["leader_http"].is_null();
        (!learning).then_some(response)
    })?;
    assert_eq!(response.status, 503, "{response:?}");
    let named = json(&response)["leader"].as_str().map(String::from);
    assert_eq!(named.as_deref(), Some(set.urls[leader].as_str()));
    assert_eq!(response.header("gantry-leader"), named.as_deref());
    // The leader's HTTP API too, learned from its Raft batches: an HTTP
    // client given only this follower finds the leader.
    let leader_index = set.procs[leader].expect("running");
    let leader_http = sandbox.proc(leader_index).http.clone().expect("http");
    assert_eq!(
        json(&response)["leader_http"].as_str(),
        Some(leader_http.as_str()),
        "{response:?}"
    );
    assert_eq!(
        response.header("gantry-leader-http"),
        Some(leader_http.as_str())
    );
    let ready = json(&http_get(&http, "/readyz", None)?);
    assert_eq!(ready["leader_http"].as_str(), Some(leader_http.as_str()));
    // Streams are redirected the same way.
    let events = http_get(&http, "/v1/events", None)?;
    assert_eq!(
        (events.status, events.header("gantry-leader-http")),
        (503, Some(leader_http.as_str())),
        "{events:?}"
    );
    let cancel = post(&http, "/v1/jobs/1/cancel", &[], "");
    assert_eq!(cancel.status, 503, "{cancel:?}");
    let reset = post(&http, "/v1/nodes/node-a/gpus/0/reset", &[], "");
    assert_eq!(
        (reset.status, reset.header("gantry-leader-http")),
        (503, Some(leader_http.as_str())),
        "{reset:?}"
    );
    assert_eq!(
        json(&cancel)["leader_http"].as_str(),
        Some(leader_http.as_str())
    );
    // Followed there, the write is taken.
    let taken = post(&leader_http, "/v1/jobs", &[], r#"{"command": ["true"]}"#);
    assert_eq!(taken.status, 201, "{taken:?}");

    // After the leader goes, the follower names the new one (or, elected
    // itself, takes the write).
    sandbox.stop_replica(&mut set, leader + 1);
    let https: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .filter_map(|i| set.procs[i])
        .filter_map(|p| sandbox.proc(p).http.clone())
        .collect();
    wait_until("the new leader named or leading", T, || {
        let response = post(&http, "/v1/jobs", &[], r#"{"command": ["true"]}"#);
        if response.status == 201 {
            return Some(());
        }
        let named = json(&response)["leader_http"].as_str().map(String::from)?;
        https.contains(&named).then_some(())
    })?;
    Ok(())
}

#[test]
fn streams_are_bounded_per_client() -> anyhow::Result<()> {
    const ALICE: &str = "alice-secret-0123456789";
    const BOB: &str = "bob-secret-0123456789ab";
    let mut sandbox = Sandbox::new()?;
    let tokens = sandbox.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "- {{name: alice, token: {ALICE}, role: user}}\n- {{name: bob, token: {BOB}, role: user}}\n"
        ),
    )?;
    let tokens = tokens.display().to_string();
    let coordinator = sandbox.start_coordinator_with(
        "coordinator",
        &["--tokens", &tokens, "--max-streams-per-client", "2"],
    )?;
    let http = coordinator.http.clone();
    let alice = format!("Bearer {ALICE}");
    let bob = format!("Bearer {BOB}");
    let open = |auth: &str| -> anyhow::Result<(u16, BufReader<std::net::TcpStream>)> {
        let stream = http_send(&http, "GET", "/v1/events", &[("Authorization", auth)], b"")?;
        let mut reader = BufReader::new(stream);
        let (status, _) = read_http_head(&mut reader)?;
        Ok((status, reader))
    };
    let (first, held) = open(&alice)?;
    let (second, _held) = open(&alice)?;
    assert_eq!((first, second), (200, 200));
    // The third is refused, naming the limit; over HTTP and gRPC, events
    // and logs alike.
    let refused = http_request(
        &http,
        "GET",
        "/v1/events",
        &[("Authorization", &alice)],
        b"",
    )?;
    assert_eq!(refused.status, 429, "{refused:?}");
    let error = json(&refused)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("token 'alice' already holds 2")
            && error.contains("--max-streams-per-client"),
        "{error}"
    );
    let logs = http_request(
        &http,
        "GET",
        "/v1/jobs/1/logs?follow=true",
        &[("Authorization", &alice)],
        b"",
    )?;
    assert_eq!(logs.status, 429, "{logs:?}");
    let watch = sandbox.gantry(&coordinator.url, &["watch", "--token", ALICE]);
    assert_ne!(watch.code, 0, "{watch:?}");
    assert!(watch.stderr.contains("too many open streams"), "{watch:?}");
    // Another token is counted apart.
    assert_eq!(open(&bob)?.0, 200);
    // A closed stream frees its place.
    drop(held);
    wait_until("a place for alice again", T, || {
        let (status, reader) = open(&alice).ok()?;
        (status == 200).then_some(reader)
    })?;
    Ok(())
}
