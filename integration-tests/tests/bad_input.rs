//! Hostile input: every bad spec gets one clear line naming the field, a
//! non-zero exit (INVALID_ARGUMENT over gRPC), and nothing is stored.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, with_grpc_client};
use gantry_proto as pb;

fn assert_nothing_stored(sandbox: &Sandbox, url: &str) {
    let jobs = sandbox.gantry_json(url, &["jobs"]).expect("jobs");
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(0),
        "nothing stored: {jobs}"
    );
}

/// A one-stage pipeline with `repeat: {repeat}`.
fn loop_spec(repeat: &str) -> String {
    format!("pipeline: p\nrepeat: {repeat}\njobs:\n  - {{name: a, command: [true]}}\n")
}

#[test]
fn bad_specs_are_refused_with_the_field_named() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();

    let huge_env = format!(
        "command: [true]\nenv: {{BIG: \"{}\"}}\n",
        "x".repeat(10 << 20)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed yaml",
            "command: [true\n".into(),
            "malformed YAML",
        ),
        (
            "unknown kind",
            "kind: sleeping\ncommand: [true]\n".into(),
            "kind: unknown kind \"sleeping\"",
        ),
        (
            "negative gpu memory",
            "command: [true]\nresources: {gpus: 1, gpu_memory: -1}\n".into(),
            "resources.gpu_memory: must not be negative",
        ),
        (
            "absurd gpus",
            "command: [true]\nresources: {gpus: 10000}\n".into(),
            "resources.gpus: 10000 exceeds the maximum",
        ),
        (
            "empty command",
            "command: []\n".into(),
            "command: must not be empty",
        ),
        (
            "unknown field",
            "command: [true]\ngpus: 1\n".into(),
            "unknown field `gpus`",
        ),
        ("10 MB spec", huge_env, "larger than the 4MiB limit"),
        (
            "retry zero",
            "command: [true]\nretry: {max_attempts: 0}\n".into(),
            "retry.max_attempts",
        ),
        (
            "retry million",
            "command: [true]\nretry: {max_attempts: 1000000}\n".into(),
            "retry.max_attempts: 1000000 exceeds",
        ),
        (
            "after unknown",
            "- {name: a, command: [true], after: [b]}\n".into(),
            "after: no job named \"b\"",
        ),
        (
            "cycle",
            "- {name: a, command: [true], after: [b]}\n- {name: b, command: [true], after: [a]}\n"
                .into(),
            "cycle",
        ),
        (
            "reserved env",
            "command: [true]\nenv: {GANTRY_JOB_ID: 3}\n".into(),
            "env.GANTRY_JOB_ID",
        ),
        (
            "self edge",
            "- {name: a, command: [true], after: [a]}\n".into(),
            "cannot wait for itself",
        ),
        (
            "duplicate stage",
            "pipeline: p\njobs:\n  - {name: a, command: [true]}\n  - {name: a, command: [true]}\n"
                .into(),
            "\"a\" is used twice",
        ),
        (
            "snapshot escape",
            "command: [true]\nsnapshot: [{from: /models/x.pt, as: ../x.pt}]\n".into(),
            "snapshot[0].as",
        ),
        (
            "snapshot absolute target",
            "command: [true]\nsnapshot: [{from: /models/x.pt, as: /etc/passwd}]\n".into(),
            "snapshot[0].as",
        ),
        (
            "snapshot relative source",
            "command: [true]\nsnapshot: [{from: models/x.pt, as: x.pt}]\n".into(),
            "snapshot[0].from",
        ),
        (
            "bad memory policy",
            "command: [true]\ngpu_memory_policy: explode\n".into(),
            "gpu_memory_policy",
        ),
        (
            "gang of zero",
            "command: [true]\nnodes: 0\n".into(),
            "nodes: must be at least 1",
        ),
        (
            "gang too large",
            "command: [true]\nnodes: 300\n".into(),
            "nodes: 300 nodes, at most 256",
        ),
        (
            "gang options on one node",
            "command: [true]\ngang: {spread: true}\n".into(),
            "gang: applies only to a job of more than one node",
        ),
        (
            "gang spread and label",
            "command: [true]\nnodes: 2\ngang: {spread: true, same_label: region}\n".into(),
            "gang.spread: cannot be set together with gang.same_label",
        ),
        (
            "gang members past the submit limit",
            "- {name: a, command: [true], nodes: 256}\n".repeat(40),
            "jobs counting each gang member, at most 10000",
        ),
        (
            "repeat zero",
            loop_spec("{max_runs: 0}"),
            "repeat.max_runs: must be at least 1 (got 0)",
        ),
        (
            "repeat negative",
            loop_spec("{max_runs: -3}"),
            "repeat.max_runs: must be at least 1 (got -3)",
        ),
        (
            "repeat unknown key",
            loop_spec("{max_runs: 2, until: done}"),
            "repeat.until: unknown field `until`",
        ),
        (
            "repeat string",
            loop_spec("always"),
            "repeat: expected `forever` or {max_runs: N}, got \"always\"",
        ),
        (
            "repeat too large",
            loop_spec("{max_runs: 5000000}"),
            "repeat.max_runs: 5000000 runs, at most 1000000",
        ),
        (
            "repeat on a job",
            "command: [true]\nrepeat: forever\n".into(),
            "unknown field `repeat`",
        ),
        (
            "run_dir without {run}",
            format!("run_dir: /data/runs\n{}", loop_spec("forever")),
            "run_dir: must contain {run}",
        ),
    ];
    for (what, text, expected) in cases {
        let path = sandbox.path().join("spec.yaml");
        std::fs::write(&path, &text)?;
        let out = sandbox.gantry(&url, &["submit", "-f", &path.display().to_string()]);
        assert_eq!(out.code, 2, "{what}: exit code 2 expected, got {out:?}");
        let stderr = out.stderr.trim();
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr:?}");
        assert!(
            stderr.contains(expected),
            "{what}: {stderr:?} should contain {expected:?}"
        );
        assert_nothing_stored(&sandbox, &url);
    }

    // Flags get the same treatment.
    let out = sandbox.gantry(
        &url,
        &["submit", "--gpus", "1", "--gpu-memory", "-1", "--", "true"],
    );
    assert_eq!(out.code, 2, "{out:?}");
    let out = sandbox.gantry(&url, &["submit", "--gpus", "1"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("command"), "{out:?}");
    assert_nothing_stored(&sandbox, &url);
    Ok(())
}

#[test]
fn raw_grpc_bad_input_is_invalid_argument() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    with_grpc_client(&url, |mut client| async move {
        let job = |resources: pb::Resources, command: Vec<&str>| pb::JobSpec {
            command: command.into_iter().map(String::from).collect(),
            resources: Some(resources),
            ..Default::default()
        };
        let cases = vec![
            (
                "negative gpu memory",
                job(
                    pb::Resources {
                        gpus: 1,
                        gpu_memory_bytes: -1,
                        ..Default::default()
                    },
                    vec!["true"],
                ),
                "jobs[0].resources.gpu_memory",
            ),
            (
                "absurd gpus",
                job(
                    pb::Resources {
                        gpus: 10_000,
                        ..Default::default()
                    },
                    vec!["true"],
                ),
                "jobs[0].resources.gpus",
            ),
            (
                "empty command",
                job(pb::Resources::default(), vec![]),
                "jobs[0].command",
            ),
            (
                "unknown kind",
                pb::JobSpec {
                    kind: "nap".into(),
                    ..job(pb::Resources::default(), vec!["true"])
                },
                "jobs[0].kind",
            ),
            (
                "10 MB",
                pb::JobSpec {
                    command: vec!["x".repeat(10 << 20)],
                    ..Default::default()
                },
                "request",
            ),
        ];
        for (what, spec, field) in cases {
            let status = client
                .submit(pb::SubmitRequest {
                    jobs: vec![spec],
                    submission_key: String::new(),
                    pipeline: String::new(),
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            assert!(
                status.message().starts_with(field),
                "{what}: {:?}",
                status.message()
            );
        }
        let jobs = client
            .list_jobs(pb::ListJobsRequest::default())
            .await?
            .into_inner()
            .jobs;
        assert!(jobs.is_empty(), "nothing stored");

        // Idempotent submit: the same key gives the same ids, once.
        let spec = job(pb::Resources::default(), vec!["true"]);
        let request = pb::SubmitRequest {
            jobs: vec![spec],
            submission_key: "retry-me".into(),
            pipeline: String::new(),
            ..Default::default()
        };
        let first = client.submit(request.clone()).await?.into_inner().job_ids;
        let second = client.submit(request).await?.into_inner().job_ids;
        assert_eq!(first, second);
        let jobs = client
            .list_jobs(pb::ListJobsRequest::default())
            .await?
            .into_inner()
            .jobs;
        assert_eq!(jobs.len(), 1);
        anyhow::Ok(())
    })?;
    let _ = Duration::ZERO;
    Ok(())
}
