//! Every bound of `limits` as a case: a submit one past the limit is refused
//! at conversion with one line naming the field and the limit, and one at
//! the limit passes.

use std::collections::HashMap;

use gantry_coordinator::convert::submit_request;
use gantry_coordinator::limits::*;
use gantry_proto as pb;
use prost::Message;

fn job() -> pb::JobSpec {
    pb::JobSpec {
        name: "j".into(),
        command: vec!["true".into()],
        resources: Some(pb::Resources {
            gpus: 1,
            gpu_memory_bytes: 1 << 30,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn submit(jobs: Vec<pb::JobSpec>, pipeline: &str) -> Result<usize, String> {
    let request = pb::SubmitRequest {
        jobs,
        submission_key: String::new(),
        pipeline: pipeline.into(),
        ..Default::default()
    };
    let len = request.encoded_len();
    submit_request(request, len)
        .map(|v| v.specs.len())
        .map_err(|e| e.to_string())
}

fn one(edit: impl FnOnce(&mut pb::JobSpec)) -> Result<usize, String> {
    let mut spec = job();
    edit(&mut spec);
    submit(vec![spec], "")
}

fn map(n: usize, key: impl Fn(usize) -> String, value: &str) -> HashMap<String, String> {
    (0..n).map(|i| (key(i), value.to_string())).collect()
}

fn labels(map: HashMap<String, String>) -> Option<pb::Constraints> {
    Some(pb::Constraints {
        labels: map,
        gpu_models: Vec::new(),
    })
}

fn tiers(n: usize) -> Option<pb::BatchSpec> {
    Some(pb::BatchSpec {
        tiers: (0..n)
            .map(|i| pb::BatchTier {
                min_free_bytes: ((n - i) as i64) << 30,
                size: 1,
            })
            .collect(),
        model: None,
        prefer: String::new(),
    })
}

fn named(n: usize, after: impl Fn(usize) -> Vec<String>) -> Vec<pb::JobSpec> {
    (0..n)
        .map(|i| pb::JobSpec {
            name: format!("j{i}"),
            after: after(i),
            ..job()
        })
        .collect()
}

type Case = (
    &'static str,
    Result<usize, String>,
    Result<usize, &'static str>,
);

#[test]
fn every_bound_is_refused_one_past_the_limit_and_accepted_at_it() {
    let long = |n: usize| "x".repeat(n);
    let cases: Vec<Case> = vec![
        (
            "preemption grace at the limit",
            one(|s| s.preemption_grace_ms = Some(MAX_PREEMPTION_GRACE_MS)),
            Ok(1),
        ),
        (
            "preemption grace past the limit",
            one(|s| s.preemption_grace_ms = Some(MAX_PREEMPTION_GRACE_MS + 1)),
            Err("jobs[0].preemption_grace: longer than 1 hour"),
        ),
        (
            "labels at the limit",
            one(|s| s.constraints = labels(map(MAX_LABELS, |i| format!("k{i}"), "v"))),
            Ok(1),
        ),
        (
            "labels past the limit",
            one(|s| s.constraints = labels(map(100_000, |i| format!("k{i}"), "v"))),
            Err("jobs[0].constraints.labels: 100000 entries, at most 64"),
        ),
        (
            "label key",
            one(|s| s.constraints = labels(map(1, |_| long(MAX_LABEL_KEY_BYTES + 1), "v"))),
            Err("jobs[0].constraints.labels.\"xxxx"),
        ),
        (
            "label value",
            one(|s| {
                s.constraints = labels(map(1, |_| "k".into(), &long(MAX_LABEL_VALUE_BYTES + 1)))
            }),
            Err("jobs[0].constraints.labels.k: 257 bytes, at most 256"),
        ),
        (
            "empty label key",
            one(|s| s.constraints = labels(map(1, |_| String::new(), "v"))),
            Err("jobs[0].constraints.labels: a label key must not be empty"),
        ),
        (
            "gpu models",
            one(|s| {
                s.constraints = Some(pb::Constraints {
                    labels: HashMap::new(),
                    gpu_models: vec!["H100".into(); MAX_GPU_MODELS + 1],
                })
            }),
            Err("jobs[0].constraints.gpu_model: 33 entries, at most 32"),
        ),
        (
            "gpu model name",
            one(|s| {
                s.constraints = Some(pb::Constraints {
                    labels: HashMap::new(),
                    gpu_models: vec![long(MAX_GPU_MODEL_BYTES + 1)],
                })
            }),
            Err("jobs[0].constraints.gpu_model[0]: 129 bytes, at most 128"),
        ),
        (
            "env count",
            one(|s| s.env = map(MAX_ENV_VARS + 1, |i| format!("V{i}"), "")),
            Err("jobs[0].env: 257 entries, at most 256"),
        ),
        (
            "env name",
            one(|s| s.env = map(1, |_| long(MAX_ENV_NAME_BYTES + 1), "")),
            Err("jobs[0].env.\"xxxx"),
        ),
        (
            "env bytes",
            one(|s| s.env = map(1, |_| "V".into(), &long(MAX_ENV_BYTES))),
            Err("jobs[0].env: 128KiB exceeds 128KiB"),
        ),
        (
            "args at the limit",
            one(|s| s.command.resize(MAX_COMMAND_ARGS, String::new())),
            Ok(1),
        ),
        (
            "a million empty args",
            one(|s| s.command.resize(1_000_000, String::new())),
            Err("jobs[0].command: 1000000 entries, at most 4096"),
        ),
        (
            "command bytes",
            one(|s| s.command.push(long(MAX_COMMAND_BYTES))),
            Err("jobs[0].command: 128KiB exceeds 128KiB"),
        ),
        (
            "locks",
            one(|s| {
                s.locks = (0..=MAX_LOCKS)
                    .map(|i| pb::LockRequest {
                        name: format!("l{i}"),
                        mode: String::new(),
                    })
                    .collect()
            }),
            Err("jobs[0].locks: 65 entries, at most 64"),
        ),
        (
            "snapshots",
            one(|s| {
                s.snapshot = (0..=MAX_SNAPSHOTS)
                    .map(|i| pb::Snapshot {
                        from: "/x".into(),
                        as_name: format!("s{i}"),
                    })
                    .collect()
            }),
            Err("jobs[0].snapshot: 65 entries, at most 64"),
        ),
        (
            "snapshot source path",
            one(|s| {
                s.snapshot = vec![pb::Snapshot {
                    from: format!("/{}", long(MAX_PATH_BYTES)),
                    as_name: "x".into(),
                }]
            }),
            Err("jobs[0].snapshot[0].from: 4097 bytes, at most 4096"),
        ),
        (
            "after count",
            submit(
                named(MAX_AFTER + 2, |i| {
                    if i == 0 {
                        (1..=MAX_AFTER + 1).map(|d| format!("j{d}")).collect()
                    } else {
                        Vec::new()
                    }
                }),
                "",
            ),
            Err("jobs[0].after: 257 entries, at most 256"),
        ),
        (
            "after listed twice",
            submit(named(2, |i| vec!["j1".into(); 2 - i]), ""),
            Err("jobs[0].after[1]: \"j1\" is listed twice"),
        ),
        (
            "after not a name",
            one(|s| s.after = vec!["no such".into()]),
            Err("jobs[0].after[0]: \"no such\" contains ' '"),
        ),
        (
            "batch tiers",
            one(|s| s.batch = tiers(MAX_BATCH_TIERS + 1)),
            Err("jobs[0].batch.tiers: 17 entries, at most 16"),
        ),
        (
            "batch tiers at the limit",
            one(|s| s.batch = tiers(MAX_BATCH_TIERS)),
            Ok(1),
        ),
        (
            "jobs per submit",
            submit(vec![job(); MAX_JOBS_PER_SUBMIT + 1], ""),
            Err("jobs: 10001 entries, at most 10000"),
        ),
        (
            "pipeline stages",
            submit(named(MAX_PIPELINE_STAGES + 1, |_| Vec::new()), "p"),
            Err("jobs: 10001 stages, at most 10000 in a pipeline run"),
        ),
        (
            "submission key",
            {
                let request = pb::SubmitRequest {
                    jobs: vec![job()],
                    submission_key: long(MAX_SUBMISSION_KEY_BYTES + 1),
                    pipeline: String::new(),
                    ..Default::default()
                };
                submit_request(request, 0)
                    .map(|v| v.specs.len())
                    .map_err(|e| e.to_string())
            },
            Err("submission_key: 257 bytes, at most 256"),
        ),
        (
            "a megabyte of kind is not echoed",
            one(|s| s.kind = long(1 << 20)),
            Err(
                "jobs[0].kind: unknown kind \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"... (1048576 bytes)",
            ),
        ),
        (
            "wrapping priority",
            one(|s| s.priority = i32::MIN),
            Err("jobs[0].priority: -2147483648 is outside -1000..=1000"),
        ),
        (
            "largest priority",
            one(|s| s.priority = i32::MAX),
            Err("jobs[0].priority: 2147483647 is outside -1000..=1000"),
        ),
        (
            "lowest priority",
            one(|s| s.priority = -MAX_PRIORITY),
            Ok(1),
        ),
        (
            "negative cpus",
            one(|s| {
                s.resources = Some(pb::Resources {
                    cpu_millis: i64::MIN,
                    ..Default::default()
                })
            }),
            Err("jobs[0].resources.cpus: must not be negative"),
        ),
        (
            "most negative memory",
            one(|s| {
                s.resources = Some(pb::Resources {
                    memory_bytes: i64::MIN,
                    ..Default::default()
                })
            }),
            Err("jobs[0].resources.memory: must not be negative"),
        ),
    ];
    for (what, got, expect) in cases {
        match (got, expect) {
            (Ok(n), Ok(m)) => assert_eq!(n, m, "{what}"),
            (Err(message), Err(prefix)) => {
                assert!(
                    message.starts_with(prefix),
                    "{what}: {message:?} should start with {prefix:?}"
                );
                assert!(!message.contains('\n'), "{what}: one line");
                assert!(message.len() < 300, "{what}: short: {message}");
            }
            (got, expect) => panic!("{what}: got {got:?}, expected {expect:?}"),
        }
    }
}

#[test]
fn after_edges_are_resolved_before_the_log() {
    let unknown: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let jobs: Vec<pb::JobSpec> = (0..10_000)
        .map(|_| pb::JobSpec {
            name: "same".into(),
            after: unknown.clone(),
            ..job()
        })
        .collect();
    assert_eq!(
        submit(jobs, ""),
        Err("jobs[0].after: no job named \"u0\" in this submission".into())
    );
    assert_eq!(
        submit(named(2, |i| vec![format!("j{}", 1 - i)]), ""),
        Err("jobs[0].after: dependency cycle through j0 -> j1 -> j0".into())
    );
}

/// A pipeline's `repeat:` and `run_dir:` on the wire: one line naming the
/// field for what the spec file's parser would also refuse, and for what
/// only a hand-made request can say.
#[test]
fn pipeline_repeat_and_run_dir_are_bounded() {
    let loop_of = |pipeline: &str, max_runs: u32, forever: bool, run_dir: &str| {
        let request = pb::SubmitRequest {
            jobs: vec![job()],
            pipeline: pipeline.into(),
            repeat: (max_runs > 0 || forever).then_some(pb::PipelineRepeat { max_runs, forever }),
            run_dir: run_dir.into(),
            ..Default::default()
        };
        submit_request(request, 0)
            .map(|v| format!("{:?} {:?}", v.run_policy.repeat, v.run_policy.run_dir))
            .map_err(|e| e.to_string())
    };
    type Case<'a> = (&'a str, Result<String, String>, Result<&'a str, &'a str>);
    let cases: Vec<Case> = vec![
        ("forever", loop_of("p", 0, true, ""), Ok("Forever \"\"")),
        (
            "max runs",
            loop_of("p", MAX_PIPELINE_RUNS, false, "/d/{run}"),
            Ok("MaxRuns(1000000) \"/d/{run}\""),
        ),
        (
            "too many runs",
            loop_of("p", MAX_PIPELINE_RUNS + 1, false, ""),
            Err("repeat.max_runs: 1000001 runs, at most 1000000 (or repeat: forever)"),
        ),
        (
            "both",
            loop_of("p", 3, true, ""),
            Err("repeat: max_runs and forever exclude each other"),
        ),
        (
            "not a pipeline",
            loop_of("", 0, true, ""),
            Err("repeat: only a pipeline repeats"),
        ),
        (
            "relative run_dir",
            loop_of("p", 0, true, "runs/{run}"),
            Err("run_dir: must be an absolute path"),
        ),
        (
            "run_dir without {run}",
            loop_of("p", 0, true, "/data/runs"),
            Err("run_dir: must contain {run}, or every run would share one directory"),
        ),
        (
            "long run_dir",
            loop_of(
                "p",
                0,
                true,
                &format!("/{{run}}{}", "x".repeat(MAX_PATH_BYTES)),
            ),
            Err("run_dir: 4102 bytes, at most 4096"),
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, want.map(String::from).map_err(String::from), "{what}");
    }
    // An empty repeat message (neither field) is refused, not read as once.
    let request = pb::SubmitRequest {
        jobs: vec![job()],
        pipeline: "p".into(),
        repeat: Some(pb::PipelineRepeat::default()),
        ..Default::default()
    };
    assert_eq!(
        submit_request(request, 0)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err("repeat.max_runs: must be at least 1".to_string())
    );
}
