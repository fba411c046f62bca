//! The one place where wire types become typed domain values (validating
//! user input on the way) and back. Errors name the field and the reason.

use std::collections::{BTreeMap, BTreeSet};

use gantry_proto as pb;
use gantry_scheduler::units::format_bytes;
use gantry_scheduler::{
    BatchPolicy, BatchTier, Constraints, JobKind, LockMode, LockRequest, MemoryModel, Resources,
};

use crate::domain::{
    AttemptRecord, EventRecord, JobRecord, JobSpec, OverusePolicy, Quarantine, RetryPolicy,
    SnapshotSpec,
};
use crate::error::CoordinatorError;

/// Most jobs in one submission.
pub const MAX_JOBS_PER_SUBMIT: usize = 10_000;
/// Most bytes of one submit request.
pub const MAX_SUBMIT_BYTES: usize = 4 << 20;
const MAX_GPUS: u32 = 64;
const MAX_GPU_MEMORY: u64 = 4 << 40;
const MAX_CPU_MILLIS: u64 = 4096 * 1000;
const MAX_HOST_MEMORY: u64 = 256 << 40;
const MAX_DISK: u64 = 1 << 50;
const MAX_COMMAND_BYTES: usize = 128 << 10;
const MAX_ENV_BYTES: usize = 128 << 10;
const MAX_NAME_LEN: usize = 128;
const MAX_ATTEMPTS: u32 = 100;
const MAX_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;
const MAX_BACKOFF_MS: u64 = 24 * 3600 * 1000;
const MAX_PRIORITY: i32 = 1000;
const MAX_SNAPSHOTS: usize = 64;

fn invalid(field: String, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn non_negative(field: &str, prefix: &str, value: i64, max: u64) -> Result<u64, CoordinatorError> {
    if value < 0 {
        return Err(invalid(
            format!("{prefix}{field}"),
            format!("must not be negative (got {value})"),
        ));
    }
    let value = value as u64;
    if value > max {
        return Err(invalid(
            format!("{prefix}{field}"),
            format!(
                "{} exceeds the maximum of {}",
                format_bytes(value),
                format_bytes(max)
            ),
        ));
    }
    Ok(value)
}

fn check_name(field: String, name: &str) -> Result<(), CoordinatorError> {
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(invalid(
            field,
            format!("{name:?} contains {bad:?}; use letters, digits, '-', '_', '.', '/'"),
        ));
    }
    Ok(())
}

/// A validated submit request.
#[derive(Debug)]
pub struct ValidSubmit {
    /// Idempotency key.
    pub key: Option<String>,
    /// Typed specs.
    pub specs: Vec<JobSpec>,
    /// Pipeline name.
    pub pipeline: Option<String>,
}

/// Validates a submit request and returns typed specs.
pub fn submit_request(
    request: pb::SubmitRequest,
    encoded_len: usize,
) -> Result<ValidSubmit, CoordinatorError> {
    if encoded_len > MAX_SUBMIT_BYTES {
        return Err(invalid(
            "request".into(),
            format!(
                "{} exceeds the {} limit of one submit",
                format_bytes(encoded_len as u64),
                format_bytes(MAX_SUBMIT_BYTES as u64)
            ),
        ));
    }
    if request.jobs.is_empty() {
        return Err(invalid("jobs".into(), "no jobs in the request"));
    }
    if request.jobs.len() > MAX_JOBS_PER_SUBMIT {
        return Err(invalid(
            "jobs".into(),
            format!(
                "{} jobs exceed the maximum of {MAX_JOBS_PER_SUBMIT} per submit",
                request.jobs.len()
            ),
        ));
    }
    if request.submission_key.len() > 256 {
        return Err(invalid("submission_key".into(), "longer than 256 bytes"));
    }
    let key = (!request.submission_key.is_empty()).then_some(request.submission_key);
    let pipeline = if request.pipeline.is_empty() {
        None
    } else {
        check_name("pipeline".into(), &request.pipeline)?;
        Some(request.pipeline)
    };
    let specs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| job_spec(spec, &format!("jobs[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ValidSubmit {
        key,
        specs,
        pipeline,
    })
}

/// Validates one wire job spec. `prefix` is prepended to field names.
pub fn job_spec(spec: pb::JobSpec, prefix: &str) -> Result<JobSpec, CoordinatorError> {
    let kind = if spec.kind.is_empty() {
        JobKind::Generic
    } else {
        JobKind::parse(&spec.kind).ok_or_else(|| {
            let all: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
            invalid(
                format!("{prefix}kind"),
                format!(
                    "unknown kind {:?} (expected one of {})",
                    spec.kind,
                    all.join(", ")
                ),
            )
        })?
    };
    check_name(format!("{prefix}name"), &spec.name)?;
    let name = if spec.name.is_empty() {
        kind.as_str().to_string()
    } else {
        spec.name
    };

    if spec.command.is_empty() || spec.command[0].trim().is_empty() {
        return Err(invalid(format!("{prefix}command"), "must not be empty"));
    }
    let command_bytes: usize = spec.command.iter().map(|a| a.len()).sum();
    if command_bytes > MAX_COMMAND_BYTES {
        return Err(invalid(
            format!("{prefix}command"),
            format!(
                "{} exceeds {}",
                format_bytes(command_bytes as u64),
                format_bytes(MAX_COMMAND_BYTES as u64)
            ),
        ));
    }
    if let Some(i) = spec.command.iter().position(|a| a.contains('\0')) {
        return Err(invalid(
            format!("{prefix}command[{i}]"),
            "contains a NUL byte",
        ));
    }
    let env_bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(
            format!("{prefix}env"),
            format!(
                "{} exceeds {}",
                format_bytes(env_bytes as u64),
                format_bytes(MAX_ENV_BYTES as u64)
            ),
        ));
    }
    for (key, value) in &spec.env {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(invalid(
                format!("{prefix}env.{key}"),
                "not a valid variable name",
            ));
        }
        if key.starts_with("GANTRY_") || key == "CUDA_VISIBLE_DEVICES" {
            return Err(invalid(
                format!("{prefix}env.{key}"),
                "is set by Gantry and cannot be overridden",
            ));
        }
        if value.contains('\0') {
            return Err(invalid(format!("{prefix}env.{key}"), "contains a NUL byte"));
        }
    }

    let r = spec.resources.unwrap_or_default();
    if r.gpus > MAX_GPUS {
        return Err(invalid(
            format!("{prefix}resources.gpus"),
            format!("{} exceeds the maximum of {MAX_GPUS} GPUs per job", r.gpus),
        ));
    }
    let gpu_memory = non_negative(
        "resources.gpu_memory",
        prefix,
        r.gpu_memory_bytes,
        MAX_GPU_MEMORY,
    )?;
    if gpu_memory > 0 && r.gpus == 0 {
        return Err(invalid(
            format!("{prefix}resources.gpu_memory"),
            "set, but resources.gpus is 0",
        ));
    }
    if r.cpu_millis < 0 {
        return Err(invalid(
            format!("{prefix}resources.cpus"),
            format!(
                "must not be negative (got {})",
                r.cpu_millis as f64 / 1000.0
            ),
        ));
    }
    if r.cpu_millis as u64 > MAX_CPU_MILLIS {
        return Err(invalid(
            format!("{prefix}resources.cpus"),
            format!(
                "{} exceeds the maximum of {}",
                r.cpu_millis / 1000,
                MAX_CPU_MILLIS / 1000
            ),
        ));
    }
    let resources = Resources {
        gpus: r.gpus,
        gpu_memory: (gpu_memory > 0).then_some(gpu_memory),
        cpu_millis: r.cpu_millis as u64,
        memory: non_negative("resources.memory", prefix, r.memory_bytes, MAX_HOST_MEMORY)?,
        disk: non_negative("resources.disk", prefix, r.disk_bytes, MAX_DISK)?,
    };

    let batch = match spec.batch {
        None => None,
        Some(b) => Some(batch_policy(b, &resources, prefix)?),
    };

    let mut locks = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, lock) in spec.locks.into_iter().enumerate() {
        if lock.name.is_empty() {
            return Err(invalid(
                format!("{prefix}locks[{i}].name"),
                "must not be empty",
            ));
        }
        check_name(format!("{prefix}locks[{i}].name"), &lock.name)?;
        if !seen.insert(lock.name.clone()) {
            return Err(invalid(
                format!("{prefix}locks[{i}].name"),
                format!("{:?} is listed twice", lock.name),
            ));
        }
        let mode = if lock.mode.is_empty() {
            LockMode::Shared
        } else {
            LockMode::parse(&lock.mode).ok_or_else(|| {
                invalid(
                    format!("{prefix}locks[{i}].mode"),
                    format!(
                        "unknown mode {:?} (expected shared or exclusive)",
                        lock.mode
                    ),
                )
            })?
        };
        locks.push(LockRequest {
            name: lock.name,
            mode,
        });
    }

    let c = spec.constraints.unwrap_or_default();
    let constraints = Constraints {
        labels: c.labels.into_iter().collect(),
        gpu_models: c.gpu_models,
    };
    if !constraints.gpu_models.is_empty() && resources.gpus == 0 {
        return Err(invalid(
            format!("{prefix}constraints.gpu_model"),
            "set, but resources.gpus is 0",
        ));
    }

    if spec.priority.abs() > MAX_PRIORITY {
        return Err(invalid(
            format!("{prefix}priority"),
            format!(
                "{} is outside -{MAX_PRIORITY}..={MAX_PRIORITY}",
                spec.priority
            ),
        ));
    }
    let retry = match spec.retry {
        None => RetryPolicy::default(),
        Some(r) => {
            if r.max_attempts > MAX_ATTEMPTS {
                return Err(invalid(
                    format!("{prefix}retry.max_attempts"),
                    format!("{} exceeds the maximum of {MAX_ATTEMPTS}", r.max_attempts),
                ));
            }
            if r.backoff_ms > MAX_BACKOFF_MS {
                return Err(invalid(format!("{prefix}retry.backoff"), "longer than 24h"));
            }
            let default = RetryPolicy::default();
            RetryPolicy {
                max_attempts: if r.max_attempts == 0 {
                    default.max_attempts
                } else {
                    r.max_attempts
                },
                backoff_ms: if r.backoff_ms == 0 {
                    default.backoff_ms
                } else {
                    r.backoff_ms
                },
            }
        }
    };
    if spec.timeout_ms > MAX_TIMEOUT_MS {
        return Err(invalid(format!("{prefix}timeout"), "longer than 30 days"));
    }
    for (i, after) in spec.after.iter().enumerate() {
        if after.is_empty() {
            return Err(invalid(format!("{prefix}after[{i}]"), "must not be empty"));
        }
        if *after == name {
            return Err(invalid(
                format!("{prefix}after[{i}]"),
                format!("job {name:?} cannot wait for itself"),
            ));
        }
    }
    check_name(format!("{prefix}queue"), &spec.queue)?;
    let snapshots = snapshots(spec.snapshot, prefix)?;
    let gpu_memory_policy = match spec.gpu_memory_policy.as_str() {
        "" | "warn" => OverusePolicy::Warn,
        "stop" => OverusePolicy::Stop,
        other => {
            return Err(invalid(
                format!("{prefix}gpu_memory_policy"),
                format!("unknown policy {other:?} (expected warn or stop)"),
            ));
        }
    };
    let gpu_memory_margin = non_negative(
        "gpu_memory_margin",
        prefix,
        spec.gpu_memory_margin_bytes,
        MAX_GPU_MEMORY,
    )?;
    Ok(JobSpec {
        name,
        kind,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        resources,
        exclusive_gpu: spec.exclusive_gpu,
        batch,
        locks,
        constraints,
        priority: spec.priority,
        retry,
        timeout_ms: (spec.timeout_ms > 0).then_some(spec.timeout_ms),
        after: spec.after,
        shell: spec.shell,
        queue: spec.queue,
        snapshots,
        gpu_memory_policy,
        gpu_memory_margin,
    })
}

/// Validates snapshot entries: absolute sources, relative targets that cannot
/// escape the job's directory.
fn snapshots(
    entries: Vec<pb::Snapshot>,
    prefix: &str,
) -> Result<Vec<SnapshotSpec>, CoordinatorError> {
    if entries.len() > MAX_SNAPSHOTS {
        return Err(invalid(
            format!("{prefix}snapshot"),
            format!(
                "{} entries exceed the maximum of {MAX_SNAPSHOTS}",
                entries.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let field = format!("{prefix}snapshot[{i}]");
        if !entry.from.starts_with('/') {
            return Err(invalid(
                format!("{field}.from"),
                format!("{:?} must be an absolute path", entry.from),
            ));
        }
        if entry.from.contains('\0') || entry.as_name.contains('\0') {
            return Err(invalid(field, "contains a NUL byte"));
        }
        let name = entry.as_name.trim_end_matches('/');
        if name.is_empty() {
            return Err(invalid(format!("{field}.as"), "must not be empty"));
        }
        if name.starts_with('/') {
            return Err(invalid(
                format!("{field}.as"),
                format!("{name:?} must be relative to the snapshot directory"),
            ));
        }
        if name
            .split('/')
            .any(|part| part == ".." || part == "." || part.is_empty())
        {
            return Err(invalid(
                format!("{field}.as"),
                format!("{name:?} must not contain '..', '.' or empty parts"),
            ));
        }
        if !seen.insert(name.to_string()) {
            return Err(invalid(
                format!("{field}.as"),
                format!("{name:?} is used twice"),
            ));
        }
        out.push(SnapshotSpec {
            from: entry.from,
            as_name: name.to_string(),
        });
    }
    Ok(out)
}

fn batch_policy(
    b: pb::BatchSpec,
    resources: &Resources,
    prefix: &str,
) -> Result<BatchPolicy, CoordinatorError> {
    if resources.gpus == 0 {
        return Err(invalid(
            format!("{prefix}batch"),
            "needs resources.gpus of at least 1",
        ));
    }
    let prefer_largest = match b.prefer.as_str() {
        "" | "first" => false,
        "largest" => true,
        other => {
            return Err(invalid(
                format!("{prefix}batch.prefer"),
                format!("unknown preference {other:?} (expected first or largest)"),
            ));
        }
    };
    match (b.tiers.is_empty(), b.model) {
        (false, Some(_)) => Err(invalid(
            format!("{prefix}batch"),
            "give either tiers or model, not both",
        )),
        (true, None) => Err(invalid(format!("{prefix}batch"), "needs tiers or model")),
        (false, None) => {
            let mut tiers = Vec::new();
            let mut previous: Option<u64> = None;
            let count = b.tiers.len();
            for (i, t) in b.tiers.into_iter().enumerate() {
                let field = format!("{prefix}batch.tiers[{i}]");
                if t.size == 0 {
                    return Err(invalid(format!("{field}.size"), "must be at least 1"));
                }
                let min_free = non_negative(
                    "min_free",
                    &format!("{field}."),
                    t.min_free_bytes,
                    MAX_GPU_MEMORY,
                )?;
                let min_free = (min_free > 0).then_some(min_free);
                match min_free {
                    None if i + 1 != count => {
                        return Err(invalid(
                            format!("{field}.min_free"),
                            "only the last tier may omit min_free",
                        ));
                    }
                    None if resources.gpu_memory.is_none() => {
                        return Err(invalid(
                            format!("{field}.min_free"),
                            "a tier without min_free needs resources.gpu_memory",
                        ));
                    }
                    Some(m) if previous.is_some_and(|p| m >= p) => {
                        return Err(invalid(
                            format!("{field}.min_free"),
                            "tiers must be ordered by decreasing min_free",
                        ));
                    }
                    _ => {}
                }
                previous = min_free.or(previous);
                tiers.push(BatchTier {
                    min_free,
                    size: t.size,
                });
            }
            Ok(BatchPolicy {
                tiers,
                model: None,
                prefer_largest,
            })
        }
        (true, Some(m)) => {
            let field = format!("{prefix}batch.model");
            let base = non_negative("base", &format!("{field}."), m.base_bytes, MAX_GPU_MEMORY)?;
            let per_sample = non_negative(
                "per_sample",
                &format!("{field}."),
                m.per_sample_bytes,
                MAX_GPU_MEMORY,
            )?;
            if per_sample == 0 {
                return Err(invalid(format!("{field}.per_sample"), "must be positive"));
            }
            if m.min == 0 {
                return Err(invalid(format!("{field}.min"), "must be at least 1"));
            }
            if m.max < m.min {
                return Err(invalid(
                    format!("{field}.max"),
                    format!("{} is below min {}", m.max, m.min),
                ));
            }
            if m.multiple_of > m.max {
                return Err(invalid(format!("{field}.multiple_of"), "larger than max"));
            }
            Ok(BatchPolicy {
                tiers: Vec::new(),
                model: Some(MemoryModel {
                    base,
                    per_sample,
                    min: m.min,
                    max: m.max,
                    multiple_of: m.multiple_of,
                }),
                prefer_largest,
            })
        }
    }
}

/// A domain spec back to the wire.
pub fn spec_to_proto(spec: &JobSpec) -> pb::JobSpec {
    let r = &spec.resources;
    pb::JobSpec {
        name: spec.name.clone(),
        kind: spec.kind.as_str().to_string(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        resources: Some(pb::Resources {
            gpus: r.gpus,
            gpu_memory_bytes: r.gpu_memory.unwrap_or(0) as i64,
            cpu_millis: r.cpu_millis as i64,
            memory_bytes: r.memory as i64,
            disk_bytes: r.disk as i64,
        }),
        batch: spec.batch.as_ref().map(|b| pb::BatchSpec {
            tiers: b
                .tiers
                .iter()
                .map(|t| pb::BatchTier {
                    min_free_bytes: t.min_free.unwrap_or(0) as i64,
                    size: t.size,
                })
                .collect(),
            model: b.model.as_ref().map(|m| pb::BatchMemoryModel {
                base_bytes: m.base as i64,
                per_sample_bytes: m.per_sample as i64,
                min: m.min,
                max: m.max,
                multiple_of: m.multiple_of,
            }),
            prefer: if b.prefer_largest {
                "largest".into()
            } else {
                String::new()
            },
        }),
        locks: spec
            .locks
            .iter()
            .map(|l| pb::LockRequest {
                name: l.name.clone(),
                mode: l.mode.as_str().into(),
            })
            .collect(),
        constraints: Some(pb::Constraints {
            labels: spec.constraints.labels.clone().into_iter().collect(),
            gpu_models: spec.constraints.gpu_models.clone(),
        }),
        priority: spec.priority,
        retry: Some(pb::RetryPolicy {
            max_attempts: spec.retry.max_attempts,
            backoff_ms: spec.retry.backoff_ms,
        }),
        timeout_ms: spec.timeout_ms.unwrap_or(0),
        after: spec.after.clone(),
        shell: spec.shell,
        exclusive_gpu: spec.exclusive_gpu,
        queue: spec.queue.clone(),
        snapshot: spec
            .snapshots
            .iter()
            .map(|s| pb::Snapshot {
                from: s.from.clone(),
                as_name: s.as_name.clone(),
            })
            .collect(),
        gpu_memory_policy: spec.gpu_memory_policy.as_str().to_string(),
        gpu_memory_margin_bytes: spec.gpu_memory_margin as i64,
    }
}

fn attempt_to_proto(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        attempt: a.attempt,
        node: a.node.clone(),
        gpus: a.gpus.clone(),
        gpu_memory_bytes: a.gpu_memory as i64,
        batch_size: a.batch_size,
        assigned_at_ms: a.assigned_at_ms,
        started_at_ms: a.started_at_ms,
        ended_at_ms: a.ended_at_ms,
        exit_code: a.exit_code,
        signal: a.signal,
        error: a.error.clone(),
        output_tail: a.output_tail.clone(),
        oom: a.oom,
        peak_gpu_memory_bytes: a.peak_gpu_memory as i64,
        outcome: match a.outcome {
            None => String::new(),
            Some(outcome) => format!("{outcome:?}").to_lowercase(),
        },
    }
}

/// A job record to the wire; `reason` is the leader's latest hold reason.
pub fn job_to_proto(job: &JobRecord, reason: Option<&str>) -> pb::Job {
    let reason = match reason {
        Some(r) => r.to_string(),
        None => job.terminal_reason.clone(),
    };
    pb::Job {
        id: job.id,
        spec: Some(spec_to_proto(&job.spec)),
        state: job.state.as_str().to_string(),
        reason,
        submitted_at_ms: job.submitted_at_ms,
        updated_at_ms: job.updated_at_ms,
        attempts: job.attempts.iter().map(attempt_to_proto).collect(),
        cancel_requested: job.cancel_requested,
        pipeline: job.pipeline.clone(),
        run: job.run,
        depends_on: job.depends_on.clone(),
        batch_cap: job.batch_cap.unwrap_or(0),
    }
}

/// An event to the wire.
pub fn event_to_proto(e: &EventRecord) -> pb::Event {
    pb::Event {
        index: e.index,
        at_ms: e.at_ms,
        job_id: e.job_id,
        job_name: e.job_name.clone(),
        kind: e.kind.as_str().to_string(),
        state: e.state.as_str().to_string(),
        node: e.node.clone(),
        attempt: e.attempt,
        message: e.message.clone(),
        pipeline: e.pipeline.clone(),
    }
}

/// A node's quarantine fields on the wire (the rest of the `Node` left
/// default, for struct update): set only while it is in force at `now_ms`.
pub fn quarantine_to_proto(quarantine: Option<&Quarantine>, now_ms: u64) -> pb::Node {
    match quarantine.filter(|q| q.is_active(now_ms)) {
        Some(q) => pb::Node {
            quarantined_until_ms: q.until_ms,
            quarantine_failures: q.failures,
            quarantine_reason: q.reason.clone(),
            ..Default::default()
        },
        None => pb::Node::default(),
    }
}

/// Labels from the wire, sorted.
pub fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}
