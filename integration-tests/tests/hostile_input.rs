//! Hostile input, one table per front door: every refusal `gantry submit -f`
//! and the raw gRPC API make. Each case asserts the exit code (2, or
//! INVALID_ARGUMENT), one line naming the field, that nothing was stored
//! (job count and Raft commit index as before: a refusal never reaches the
//! log) and that the coordinator still takes a write afterwards.
//!
//! Add a case here with every new refusal. The gRPC table bypasses the CLI,
//! so it proves the coordinator's own checks (`coordinator::limits`).

use std::fmt::Write as _;
use std::time::Instant;

use gantry_integration_tests::{CliOutput, Sandbox, with_grpc_client};
use gantry_proto as pb;

/// What a refused request must leave as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    jobs: u64,
    commit_index: u64,
}

impl Mark {
    fn of(status: &pb::ClusterStatus) -> Mark {
        Mark {
            jobs: status.jobs_by_state.values().map(|n| u64::from(*n)).sum(),
            commit_index: status.commit_index,
        }
    }
}

fn cli_mark(sandbox: &Sandbox, url: &str) -> anyhow::Result<Mark> {
    let status = sandbox.gantry_json(url, &["status"])?;
    let jobs = status["jobs_by_state"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(|n| n.as_u64()).sum());
    let commit_index = status["commit_index"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no commit_index in {status}"))?;
    Ok(Mark { jobs, commit_index })
}

/// `n` lines, each from `line(i)`.
fn lines(n: usize, line: impl Fn(usize) -> String) -> String {
    let mut text = String::new();
    for i in 0..n {
        let _ = writeln!(text, "{}", line(i));
    }
    text
}

/// A flow list `[item0, item1, ...]`.
fn flow(n: usize, item: impl Fn(usize) -> String) -> String {
    let items: Vec<String> = (0..n).map(item).collect();
    format!("[{}]", items.join(", "))
}

/// The quadratic case: 10,000 jobs sharing one name, 30 unknown
/// `after:` names each.
fn shared_name_unknown_after_yaml() -> String {
    let unknown = flow(30, |i| format!("u{i}"));
    lines(10_000, |_| {
        format!("- {{name: same, command: [true], after: {unknown}}}")
    })
}

#[test]
fn cli_refusals_name_the_field_and_store_nothing() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let x = |n: usize| "x".repeat(n);

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "100,000 labels",
            format!(
                "command: [true]\nconstraints:\n  labels:\n{}",
                lines(100_000, |i| format!("    k{i}: v"))
            ),
            "jobs[0].constraints.labels: 100000 entries, at most 64",
        ),
        (
            "label key",
            format!(
                "command: [true]\nconstraints: {{labels: {{{}: v}}}}\n",
                x(200)
            ),
            "jobs[0].constraints.labels.\"xxx",
        ),
        (
            "label value",
            format!(
                "command: [true]\nconstraints: {{labels: {{k: {}}}}}\n",
                x(300)
            ),
            "jobs[0].constraints.labels.k: 300 bytes, at most 256",
        ),
        (
            "gpu models",
            format!(
                "command: [true]\nresources: {{gpus: 1}}\nconstraints: {{gpu_model: {}}}\n",
                flow(40, |i| format!("m{i}"))
            ),
            "jobs[0].constraints.gpu_model: 40 entries, at most 32",
        ),
        (
            "env count",
            format!(
                "command: [true]\nenv:\n{}",
                lines(300, |i| format!("  V{i}: x"))
            ),
            "jobs[0].env: 300 entries, at most 256",
        ),
        (
            "env name",
            format!("command: [true]\nenv: {{{}: x}}\n", "A".repeat(300)),
            "jobs[0].env.\"AAA",
        ),
        (
            "env bytes",
            format!("command: [true]\nenv: {{A: {}}}\n", x(200 << 10)),
            "jobs[0].env: 200KiB exceeds 128KiB",
        ),
        (
            "100,000 empty args",
            format!(
                "command: {}\n",
                flow(100_001, |i| if i == 0 {
                    "true".into()
                } else {
                    "''".into()
                })
            ),
            "jobs[0].command: 100001 entries, at most 4096",
        ),
        (
            "command bytes",
            format!("command: [true, {}]\n", x(200 << 10)),
            "jobs[0].command: 200KiB exceeds 128KiB",
        ),
        (
            "locks",
            format!(
                "command: [true]\nlocks: {}\n",
                flow(65, |i| format!("{{name: l{i}}}"))
            ),
            "jobs[0].locks: 65 entries, at most 64",
        ),
        (
            "snapshots",
            format!(
                "command: [true]\nsnapshot: {}\n",
                flow(65, |i| format!("{{from: /x, as: s{i}}}"))
            ),
            "jobs[0].snapshot: 65 entries, at most 64",
        ),
        (
            "snapshot path",
            format!(
                "command: [true]\nsnapshot: [{{from: /{}, as: m}}]\n",
                x(5000)
            ),
            "jobs[0].snapshot[0].from: 5001 bytes, at most 4096",
        ),
        (
            "after count",
            format!(
                "- {{name: a, command: [true], after: {}}}\n",
                flow(300, |i| format!("b{i}"))
            ),
            "jobs[0].after: 300 entries, at most 256",
        ),
        (
            "after twice",
            "- {name: a, command: [true], after: [b, b]}\n- {name: b, command: [true]}\n".into(),
            "jobs[0].after[1]: \"b\" is listed twice",
        ),
        (
            "batch tiers",
            format!(
                "command: [true]\nresources: {{gpus: 1, gpu_memory: 1GiB}}\nbatch: {{tiers: {}}}\n",
                flow(20, |i| format!("{{min_free: {}GiB, size: 1}}", 40 - i))
            ),
            "jobs[0].batch.tiers: 20 entries, at most 16",
        ),
        (
            "jobs per submit",
            lines(10_001, |_| "- {command: [true]}".into()),
            "jobs: 10001 entries, at most 10000",
        ),
        (
            "pipeline stages",
            format!(
                "pipeline: p\njobs:\n{}",
                lines(10_001, |i| format!("  - {{name: s{i}, command: [true]}}"))
            ),
            "jobs: 10001 stages, at most 10000",
        ),
        (
            "wrapping priority",
            "command: [true]\npriority: -2147483648\n".into(),
            "jobs[0].priority: -2147483648 is outside -1000..=1000",
        ),
        (
            "timeout 0s",
            "command: [true]\ntimeout: 0s\n".into(),
            "timeout: must be more than zero",
        ),
        (
            "backoff 0s",
            "command: [true]\nretry: {backoff: 0s}\n".into(),
            "retry.backoff: must be more than zero",
        ),
        (
            "a megabyte of kind",
            format!("kind: {}\ncommand: [true]\n", x(1 << 20)),
            "jobs[0].kind: unknown kind",
        ),
        (
            "10,000 shared names with unknown after",
            shared_name_unknown_after_yaml(),
            "jobs[0].after: no job named \"u0\"",
        ),
    ];
    let path = sandbox.path().join("hostile.yaml");
    let path_arg = path.display().to_string();
    let mut before = cli_mark(&sandbox, &url)?;
    for (what, text, expected) in cases {
        std::fs::write(&path, &text)?;
        let started = Instant::now();
        let out = sandbox.gantry(&url, &["submit", "-f", &path_arg]);
        if what.starts_with("10,000") {
            println!("cli {what}: refused in {:?}", started.elapsed());
        }
        before = assert_refused(&sandbox, &url, what, &out, expected, before)?;
    }

    // Flags get the same treatment.
    let flags: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "--timeout 0",
            vec!["--timeout", "0", "--", "true"],
            "--timeout: must be more than zero",
        ),
        (
            "--gpu-memory past i64",
            vec!["--gpus", "1", "--gpu-memory", "9300000TB", "--", "true"],
            "--gpu-memory: 9300000TB is too large",
        ),
        (
            "--priority wrapping",
            vec!["--priority=-2147483648", "--", "true"],
            "jobs[0].priority: -2147483648 is outside",
        ),
    ];
    for (what, args, expected) in flags {
        let mut all = vec!["submit"];
        all.extend(args);
        let out = sandbox.gantry(&url, &all);
        before = assert_refused(&sandbox, &url, what, &out, expected, before)?;
    }
    Ok(())
}

/// Checks one CLI refusal: exit code 2, one short line containing
/// `expected`, nothing stored; then that a write still goes through.
/// Returns the mark after that write.
fn assert_refused(
    sandbox: &Sandbox,
    url: &str,
    what: &str,
    out: &CliOutput,
    expected: &str,
    before: Mark,
) -> anyhow::Result<Mark> {
    let stderr = out.stderr.trim();
    assert_eq!(out.code, 2, "{what}: exit code 2 expected, got {out:?}");
    assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr:.300}");
    assert!(stderr.len() < 400, "{what}: short: {stderr:.400}");
    assert!(
        stderr.contains(expected),
        "{what}: {stderr:?} should contain {expected:?}"
    );
    assert_eq!(cli_mark(sandbox, url)?, before, "{what}: nothing stored");
    sandbox.submit(url, &["--", "true"])?;
    let after = cli_mark(sandbox, url)?;
    assert_eq!(after.jobs, before.jobs + 1, "{what}: still takes writes");
    Ok(after)
}

fn job() -> pb::JobSpec {
    pb::JobSpec {
        name: "j".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

fn request(jobs: Vec<pb::JobSpec>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        jobs,
        submission_key: String::new(),
        pipeline: String::new(),
        ..Default::default()
    }
}

fn with(edit: impl FnOnce(&mut pb::JobSpec)) -> pb::SubmitRequest {
    let mut spec = job();
    edit(&mut spec);
    request(vec![spec])
}

#[test]
fn grpc_refusals_name_the_field_and_store_nothing() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let x = |n: usize| "x".repeat(n);
    let unknown: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();

    let cases: Vec<(&str, pb::SubmitRequest, &str)> = vec![
        (
            "100,000 labels",
            with(|s| {
                s.constraints = Some(pb::Constraints {
                    labels: (0..100_000)
                        .map(|i| (format!("k{i}"), "v".into()))
                        .collect(),
                    gpu_models: Vec::new(),
                })
            }),
            "jobs[0].constraints.labels: 100000 entries, at most 64",
        ),
        (
            "label value",
            with(|s| {
                s.constraints = Some(pb::Constraints {
                    labels: [("k".to_string(), x(300))].into(),
                    gpu_models: Vec::new(),
                })
            }),
            "jobs[0].constraints.labels.k: 300 bytes, at most 256",
        ),
        (
            "a million empty args",
            with(|s| s.command.resize(1_000_000, String::new())),
            "jobs[0].command: 1000000 entries, at most 4096",
        ),
        (
            "env count",
            with(|s| s.env = (0..300).map(|i| (format!("V{i}"), String::new())).collect()),
            "jobs[0].env: 300 entries, at most 256",
        ),
        (
            "locks",
            with(|s| {
                s.locks = (0..100)
                    .map(|i| pb::LockRequest {
                        name: format!("l{i}"),
                        mode: String::new(),
                    })
                    .collect()
            }),
            "jobs[0].locks: 100 entries, at most 64",
        ),
        (
            "snapshots",
            with(|s| {
                s.snapshot = (0..100)
                    .map(|i| pb::Snapshot {
                        from: "/x".into(),
                        as_name: format!("s{i}"),
                    })
                    .collect()
            }),
            "jobs[0].snapshot: 100 entries, at most 64",
        ),
        (
            "after count",
            with(|s| s.after = (0..300).map(|i| format!("b{i}")).collect()),
            "jobs[0].after: 300 entries, at most 256",
        ),
        (
            "batch tiers",
            with(|s| {
                s.resources = Some(pb::Resources {
                    gpus: 1,
                    ..Default::default()
                });
                s.batch = Some(pb::BatchSpec {
                    tiers: (0..20)
                        .map(|i| pb::BatchTier {
                            min_free_bytes: (40 - i) << 30,
                            size: 1,
                        })
                        .collect(),
                    model: None,
                    prefer: String::new(),
                });
            }),
            "jobs[0].batch.tiers: 20 entries, at most 16",
        ),
        (
            "jobs per submit",
            request(vec![job(); 10_001]),
            "jobs: 10001 entries, at most 10000",
        ),
        (
            "pipeline stages",
            pb::SubmitRequest {
                pipeline: "p".into(),
                ..request(
                    (0..10_001)
                        .map(|i| pb::JobSpec {
                            name: format!("s{i}"),
                            ..job()
                        })
                        .collect(),
                )
            },
            "jobs: 10001 stages, at most 10000",
        ),
        (
            "submission key",
            pb::SubmitRequest {
                submission_key: x(300),
                ..request(vec![job()])
            },
            "submission_key: 300 bytes, at most 256",
        ),
        (
            "wrapping priority",
            with(|s| s.priority = i32::MIN),
            "jobs[0].priority: -2147483648 is outside -1000..=1000",
        ),
        (
            "zero timeout",
            with(|s| s.timeout_ms = Some(0)),
            "jobs[0].timeout: must be more than zero",
        ),
        (
            "a megabyte of kind",
            with(|s| s.kind = x(1 << 20)),
            "jobs[0].kind: unknown kind",
        ),
        (
            "a megabyte of lock mode",
            with(|s| {
                s.locks = vec![pb::LockRequest {
                    name: "l".into(),
                    mode: x(1 << 20),
                }]
            }),
            "jobs[0].locks[0].mode: unknown mode",
        ),
        (
            "10,000 shared names with unknown after",
            request(
                (0..10_000)
                    .map(|_| pb::JobSpec {
                        name: "same".into(),
                        after: unknown.clone(),
                        ..job()
                    })
                    .collect(),
            ),
            "jobs[0].after: no job named \"u0\"",
        ),
    ];

    with_grpc_client(&url, |mut client| async move {
        let mut before = Mark::of(&client.status(pb::StatusRequest {}).await?.into_inner());
        for (what, request, field) in cases {
            let started = Instant::now();
            let status = client.submit(request).await.expect_err(what);
            if what.starts_with("10,000") {
                println!("grpc {what}: refused in {:?}", started.elapsed());
            }
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            let message = status.message();
            assert!(message.starts_with(field), "{what}: {message:.300}");
            assert!(!message.contains('\n'), "{what}: one line");
            assert!(message.len() < 300, "{what}: short: {message:.300}");
            let now = Mark::of(&client.status(pb::StatusRequest {}).await?.into_inner());
            assert_eq!(now, before, "{what}: nothing stored");
            client.submit(request_of_one()).await?;
            let after = Mark::of(&client.status(pb::StatusRequest {}).await?.into_inner());
            assert_eq!(after.jobs, before.jobs + 1, "{what}: still takes writes");
            before = after;
        }
        anyhow::Ok(())
    })
}

fn request_of_one() -> pb::SubmitRequest {
    request(vec![job()])
}
