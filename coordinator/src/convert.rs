//! The one place where wire types become typed domain values (validating
//! user input on the way) and back. Errors name the field and the reason;
//! every collection and string is checked against [`crate::limits`] before
//! anything is proposed to the Raft log.

use std::collections::{BTreeMap, BTreeSet};

use gantry_proto as pb;
use gantry_scheduler::units::format_bytes;
use gantry_scheduler::{
    BatchPolicy, BatchTier, Constraints, JobKind, LockMode, LockRequest, MemoryModel, Resources,
};

use crate::dag::resolve_after;
use crate::domain::{
    AttemptRecord, EventRecord, JobRecord, JobSpec, OverusePolicy, Quarantine, Repeat, RetryPolicy,
    RunPolicy, SnapshotSpec,
};
use crate::error::CoordinatorError;

pub mod agent;
pub mod members;
use crate::limits::*;

fn invalid(field: String, reason: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Refuses a collection of more than `max` entries.
fn at_most(field: impl FnOnce() -> String, len: usize, max: usize) -> Result<(), CoordinatorError> {
    if len > max {
        return Err(invalid(field(), format!("{len} entries, at most {max}")));
    }
    Ok(())
}

/// Refuses a string of more than `max` bytes.
fn bytes_at_most(
    field: impl FnOnce() -> String,
    text: &str,
    max: usize,
) -> Result<(), CoordinatorError> {
    if text.len() > max {
        return Err(invalid(
            field(),
            format!("{} bytes, at most {max}", text.len()),
        ));
    }
    Ok(())
}

/// User text quoted back in a message, cut at [`MAX_ECHO_CHARS`].
pub(crate) fn quote(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

fn non_negative(field: &str, prefix: &str, value: i64, max: u64) -> Result<u64, CoordinatorError> {
    let Ok(value) = u64::try_from(value) else {
        return Err(invalid(
            format!("{prefix}{field}"),
            format!("must not be negative (got {value})"),
        ));
    };
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

/// A name: bounded, in a safe alphabet. `field` is built only on refusal
/// (a 10,000-job submit checks 300,000 `after:` names).
fn check_name(field: impl FnOnce() -> String, name: &str) -> Result<(), CoordinatorError> {
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field(),
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return Err(invalid(
            field(),
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
    /// The pipeline's `repeat:` and `run_dir:` (default without them).
    pub run_policy: RunPolicy,
}

/// Validates a pipeline's `repeat:` and `run_dir:`.
fn run_policy(
    repeat: Option<pb::PipelineRepeat>,
    run_dir: String,
    pipeline: bool,
) -> Result<RunPolicy, CoordinatorError> {
    if !pipeline && repeat.is_some() {
        return Err(invalid("repeat".into(), "only a pipeline repeats"));
    }
    if !pipeline && !run_dir.is_empty() {
        return Err(invalid("run_dir".into(), "only a pipeline has runs"));
    }
    let repeat = match repeat {
        None => Repeat::Once,
        Some(r) if r.forever && r.max_runs > 0 => {
            return Err(invalid(
                "repeat".into(),
                "max_runs and forever exclude each other",
            ));
        }
        Some(r) if r.forever => Repeat::Forever,
        Some(r) if r.max_runs == 0 => {
            return Err(invalid("repeat.max_runs".into(), "must be at least 1"));
        }
        Some(r) if r.max_runs > MAX_PIPELINE_RUNS => {
            return Err(invalid(
                "repeat.max_runs".into(),
                format!(
                    "{} runs, at most {MAX_PIPELINE_RUNS} (or repeat: forever)",
                    r.max_runs
                ),
            ));
        }
        Some(r) => Repeat::MaxRuns(r.max_runs),
    };
    if !run_dir.is_empty() {
        bytes_at_most(|| "run_dir".into(), &run_dir, MAX_PATH_BYTES)?;
        if !run_dir.starts_with('/') {
            return Err(invalid("run_dir".into(), "must be an absolute path"));
        }
        if run_dir.contains('\0') {
            return Err(invalid("run_dir".into(), "contains a NUL byte"));
        }
        if !run_dir.contains("{run}") {
            return Err(invalid(
                "run_dir".into(),
                "must contain {run}, or every run would share one directory",
            ));
        }
    }
    Ok(RunPolicy {
        repeat,
        run_dir,
        ..RunPolicy::default()
    })
}

/// Validates a submit request and returns typed specs, including the
/// `after:` graph, so a bad submission never reaches the log.
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
    if request.pipeline.is_empty() {
        at_most(|| "jobs".into(), request.jobs.len(), MAX_JOBS_PER_SUBMIT)?;
    } else if request.jobs.len() > MAX_PIPELINE_STAGES {
        return Err(invalid(
            "jobs".into(),
            format!(
                "{} stages, at most {MAX_PIPELINE_STAGES} in a pipeline run",
                request.jobs.len()
            ),
        ));
    }
    bytes_at_most(
        || "submission_key".into(),
        &request.submission_key,
        MAX_SUBMISSION_KEY_BYTES,
    )?;
    let key = (!request.submission_key.is_empty()).then_some(request.submission_key);
    let pipeline = if request.pipeline.is_empty() {
        None
    } else {
        check_name(|| "pipeline".into(), &request.pipeline)?;
        Some(request.pipeline)
    };
    let run_policy = run_policy(request.repeat, request.run_dir, pipeline.is_some())?;
    let specs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| job_spec(spec, &format!("jobs[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    // A gang is one job per node in hard state: bound them all.
    let members: usize = specs
        .iter()
        .map(|s| s.gang.as_ref().map_or(1, |g| g.nodes as usize))
        .sum();
    if members > MAX_JOBS_PER_SUBMIT {
        return Err(invalid(
            "jobs".into(),
            format!("{members} jobs counting each gang member, at most {MAX_JOBS_PER_SUBMIT}"),
        ));
    }
    resolve_after(&specs, pipeline.is_some()).map_err(|e| invalid(e.field(), e.reason()))?;
    Ok(ValidSubmit {
        key,
        specs,
        pipeline,
        run_policy,
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
                    "unknown kind {} (expected one of {})",
                    quote(&spec.kind),
                    all.join(", ")
                ),
            )
        })?
    };
    check_name(|| format!("{prefix}name"), &spec.name)?;
    let name = if spec.name.is_empty() {
        kind.as_str().to_string()
    } else {
        spec.name
    };
    check_command(&spec.command, prefix)?;
    check_env(&spec.env, prefix)?;
    let resources = resources(spec.resources.unwrap_or_default(), prefix)?;
    let batch = match spec.batch {
        None => None,
        Some(b) => Some(batch_policy(b, &resources, prefix)?),
    };
    let locks = locks(spec.locks, prefix)?;
    let constraints = constraints(spec.constraints.unwrap_or_default(), prefix)?;
    if !constraints.gpu_models.is_empty() && resources.gpus == 0 {
        return Err(invalid(
            format!("{prefix}constraints.gpu_model"),
            "set, but resources.gpus is 0",
        ));
    }
    // A range check, not `abs()`: `i32::MIN.abs()` wraps to itself.
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(invalid(
            format!("{prefix}priority"),
            format!(
                "{} is outside -{MAX_PRIORITY}..={MAX_PRIORITY}",
                spec.priority
            ),
        ));
    }
    let retry = retry(spec.retry, prefix)?;
    let timeout_ms = match spec.timeout_ms {
        None => None,
        Some(0) => {
            return Err(invalid(
                format!("{prefix}timeout"),
                "must be more than zero; leave it unset for no time limit",
            ));
        }
        Some(ms) if ms > MAX_TIMEOUT_MS => {
            return Err(invalid(format!("{prefix}timeout"), "longer than 30 days"));
        }
        Some(ms) => Some(ms),
    };
    check_after(&spec.after, &name, prefix)?;
    check_name(|| format!("{prefix}queue"), &spec.queue)?;
    let snapshots = snapshots(spec.snapshot, prefix)?;
    let gpu_memory_policy = match spec.gpu_memory_policy.as_str() {
        "" | "warn" => OverusePolicy::Warn,
        "stop" => OverusePolicy::Stop,
        other => {
            return Err(invalid(
                format!("{prefix}gpu_memory_policy"),
                format!("unknown policy {} (expected warn or stop)", quote(other)),
            ));
        }
    };
    let gpu_memory_margin = non_negative(
        "gpu_memory_margin",
        prefix,
        spec.gpu_memory_margin_bytes,
        MAX_GPU_MEMORY,
    )?;
    if spec
        .preemption_grace_ms
        .is_some_and(|ms| ms > MAX_PREEMPTION_GRACE_MS)
    {
        return Err(invalid(
            format!("{prefix}preemption_grace"),
            "longer than 1 hour",
        ));
    }
    let gang = gang_spec(spec.nodes, &spec.gang_same_label, spec.gang_spread, prefix)?;
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
        timeout_ms,
        after: spec.after,
        shell: spec.shell,
        queue: spec.queue,
        snapshots,
        gpu_memory_policy,
        gpu_memory_margin,
        preemptible: spec.preemptible,
        preemption_grace_ms: spec.preemption_grace_ms,
        gang,
    })
}

/// `nodes`, `gang.same_label` and `gang.spread`: a gang of 2..=256 nodes
/// (0 and 1 are one node), in one `provider` unless told otherwise.
fn gang_spec(
    nodes: u32,
    same_label: &str,
    spread: bool,
    prefix: &str,
) -> Result<Option<crate::domain::GangSpec>, CoordinatorError> {
    if nodes > crate::limits::MAX_GANG_NODES {
        return Err(invalid(
            format!("{prefix}nodes"),
            format!("{nodes} nodes, at most {}", crate::limits::MAX_GANG_NODES),
        ));
    }
    if nodes <= 1 {
        if spread || !same_label.is_empty() {
            return Err(invalid(
                format!("{prefix}gang"),
                "applies only to a job of more than one node (nodes: N)",
            ));
        }
        return Ok(None);
    }
    if spread && !same_label.is_empty() {
        return Err(invalid(
            format!("{prefix}gang.spread"),
            "cannot be set together with gang.same_label",
        ));
    }
    if same_label.len() > MAX_LABEL_KEY_BYTES || same_label.trim() != same_label {
        return Err(invalid(
            format!("{prefix}gang.same_label"),
            format!(
                "a label key of at most {MAX_LABEL_KEY_BYTES} bytes without surrounding blanks, got {}",
                quote(same_label)
            ),
        ));
    }
    let same_label = match (spread, same_label) {
        (true, _) => None,
        (false, "") => Some("provider".to_string()),
        (false, label) => Some(label.to_string()),
    };
    Ok(Some(crate::domain::GangSpec { nodes, same_label }))
}

/// argv: not empty, bounded in count and bytes, no NUL.
fn check_command(command: &[String], prefix: &str) -> Result<(), CoordinatorError> {
    if command.is_empty() || command[0].trim().is_empty() {
        return Err(invalid(format!("{prefix}command"), "must not be empty"));
    }
    at_most(
        || format!("{prefix}command"),
        command.len(),
        MAX_COMMAND_ARGS,
    )?;
    let command_bytes: usize = command.iter().map(String::len).sum();
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
    if let Some(i) = command.iter().position(|a| a.contains('\0')) {
        return Err(invalid(
            format!("{prefix}command[{i}]"),
            "contains a NUL byte",
        ));
    }
    Ok(())
}

/// Extra environment: bounded, valid names, nothing Gantry sets itself.
fn check_env(
    env: &std::collections::HashMap<String, String>,
    prefix: &str,
) -> Result<(), CoordinatorError> {
    at_most(|| format!("{prefix}env"), env.len(), MAX_ENV_VARS)?;
    let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
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
    // Sorted, so the error names the same variable whatever the map's order.
    let sorted: BTreeMap<&String, &String> = env.iter().collect();
    for (key, value) in sorted {
        if key.len() > MAX_ENV_NAME_BYTES {
            return Err(invalid(
                format!("{prefix}env.{}", quote(key)),
                format!("name of {} bytes, at most {MAX_ENV_NAME_BYTES}", key.len()),
            ));
        }
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
    Ok(())
}

fn resources(r: pb::Resources, prefix: &str) -> Result<Resources, CoordinatorError> {
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
    let Ok(cpu_millis) = u64::try_from(r.cpu_millis) else {
        return Err(invalid(
            format!("{prefix}resources.cpus"),
            format!(
                "must not be negative (got {})",
                r.cpu_millis as f64 / 1000.0
            ),
        ));
    };
    if cpu_millis > MAX_CPU_MILLIS {
        return Err(invalid(
            format!("{prefix}resources.cpus"),
            format!(
                "{} exceeds the maximum of {}",
                cpu_millis / 1000,
                MAX_CPU_MILLIS / 1000
            ),
        ));
    }
    Ok(Resources {
        gpus: r.gpus,
        gpu_memory: (gpu_memory > 0).then_some(gpu_memory),
        cpu_millis,
        memory: non_negative("resources.memory", prefix, r.memory_bytes, MAX_HOST_MEMORY)?,
        disk: non_negative("resources.disk", prefix, r.disk_bytes, MAX_DISK)?,
    })
}

/// Named locks: bounded, valid names, each once.
fn locks(wire: Vec<pb::LockRequest>, prefix: &str) -> Result<Vec<LockRequest>, CoordinatorError> {
    at_most(|| format!("{prefix}locks"), wire.len(), MAX_LOCKS)?;
    let mut locks = Vec::with_capacity(wire.len());
    let mut seen = BTreeSet::new();
    for (i, lock) in wire.into_iter().enumerate() {
        if lock.name.is_empty() {
            return Err(invalid(
                format!("{prefix}locks[{i}].name"),
                "must not be empty",
            ));
        }
        check_name(|| format!("{prefix}locks[{i}].name"), &lock.name)?;
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
                        "unknown mode {} (expected shared or exclusive)",
                        quote(&lock.mode)
                    ),
                )
            })?
        };
        locks.push(LockRequest {
            name: lock.name,
            mode,
        });
    }
    Ok(locks)
}

/// Wanted labels and GPU models: bounded in count and length.
fn constraints(c: pb::Constraints, prefix: &str) -> Result<Constraints, CoordinatorError> {
    let field = format!("{prefix}constraints");
    at_most(|| format!("{field}.labels"), c.labels.len(), MAX_LABELS)?;
    let labels: BTreeMap<String, String> = c.labels.into_iter().collect();
    for (key, value) in &labels {
        if key.is_empty() {
            return Err(invalid(
                format!("{field}.labels"),
                "a label key must not be empty",
            ));
        }
        if key.len() > MAX_LABEL_KEY_BYTES {
            return Err(invalid(
                format!("{field}.labels.{}", quote(key)),
                format!("key of {} bytes, at most {MAX_LABEL_KEY_BYTES}", key.len()),
            ));
        }
        bytes_at_most(
            || format!("{field}.labels.{key}"),
            value,
            MAX_LABEL_VALUE_BYTES,
        )?;
    }
    at_most(
        || format!("{field}.gpu_model"),
        c.gpu_models.len(),
        MAX_GPU_MODELS,
    )?;
    for (i, model) in c.gpu_models.iter().enumerate() {
        if model.trim().is_empty() {
            return Err(invalid(
                format!("{field}.gpu_model[{i}]"),
                "must not be empty",
            ));
        }
        bytes_at_most(
            || format!("{field}.gpu_model[{i}]"),
            model,
            MAX_GPU_MODEL_BYTES,
        )?;
    }
    Ok(Constraints {
        labels,
        gpu_models: c.gpu_models,
    })
}

fn retry(wire: Option<pb::RetryPolicy>, prefix: &str) -> Result<RetryPolicy, CoordinatorError> {
    let default = RetryPolicy::default();
    let Some(r) = wire else {
        return Ok(default);
    };
    if r.max_attempts > MAX_ATTEMPTS {
        return Err(invalid(
            format!("{prefix}retry.max_attempts"),
            format!("{} exceeds the maximum of {MAX_ATTEMPTS}", r.max_attempts),
        ));
    }
    if r.backoff_ms > MAX_BACKOFF_MS {
        return Err(invalid(format!("{prefix}retry.backoff"), "longer than 24h"));
    }
    Ok(RetryPolicy {
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
    })
}

/// `after:` names of one job: bounded, each a valid name other than the
/// job's own, each once. Whether they exist is the submission's question
/// ([`resolve_after`]).
fn check_after(after: &[String], name: &str, prefix: &str) -> Result<(), CoordinatorError> {
    at_most(|| format!("{prefix}after"), after.len(), MAX_AFTER)?;
    let mut seen = std::collections::HashSet::with_capacity(after.len());
    for (i, dep) in after.iter().enumerate() {
        if dep.is_empty() {
            return Err(invalid(format!("{prefix}after[{i}]"), "must not be empty"));
        }
        check_name(|| format!("{prefix}after[{i}]"), dep)?;
        if dep == name {
            return Err(invalid(
                format!("{prefix}after[{i}]"),
                format!("job {name:?} cannot wait for itself"),
            ));
        }
        if !seen.insert(dep.as_str()) {
            return Err(invalid(
                format!("{prefix}after[{i}]"),
                format!("{dep:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Validates snapshot entries: absolute sources, relative targets that cannot
/// escape the job's directory.
fn snapshots(
    entries: Vec<pb::Snapshot>,
    prefix: &str,
) -> Result<Vec<SnapshotSpec>, CoordinatorError> {
    at_most(|| format!("{prefix}snapshot"), entries.len(), MAX_SNAPSHOTS)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let field = format!("{prefix}snapshot[{i}]");
        bytes_at_most(|| format!("{field}.from"), &entry.from, MAX_PATH_BYTES)?;
        bytes_at_most(|| format!("{field}.as"), &entry.as_name, MAX_PATH_BYTES)?;
        if !entry.from.starts_with('/') {
            return Err(invalid(
                format!("{field}.from"),
                format!("{} must be an absolute path", quote(&entry.from)),
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
                format!("{} must be relative to the snapshot directory", quote(name)),
            ));
        }
        if name
            .split('/')
            .any(|part| part == ".." || part == "." || part.is_empty())
        {
            return Err(invalid(
                format!("{field}.as"),
                format!("{} must not contain '..', '.' or empty parts", quote(name)),
            ));
        }
        if !seen.insert(name.to_string()) {
            return Err(invalid(
                format!("{field}.as"),
                format!("{} is used twice", quote(name)),
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
                format!(
                    "unknown preference {} (expected first or largest)",
                    quote(other)
                ),
            ));
        }
    };
    at_most(
        || format!("{prefix}batch.tiers"),
        b.tiers.len(),
        MAX_BATCH_TIERS,
    )?;
    match (b.tiers.is_empty(), b.model) {
        (false, Some(_)) => Err(invalid(
            format!("{prefix}batch"),
            "give either tiers or model, not both",
        )),
        (true, None) => Err(invalid(format!("{prefix}batch"), "needs tiers or model")),
        (false, None) => Ok(BatchPolicy {
            tiers: batch_tiers(b.tiers, resources, prefix)?,
            model: None,
            prefer_largest,
        }),
        (true, Some(m)) => Ok(BatchPolicy {
            tiers: Vec::new(),
            model: Some(batch_model(m, prefix)?),
            prefer_largest,
        }),
    }
}

fn batch_tiers(
    wire: Vec<pb::BatchTier>,
    resources: &Resources,
    prefix: &str,
) -> Result<Vec<BatchTier>, CoordinatorError> {
    let mut tiers = Vec::with_capacity(wire.len());
    let mut previous: Option<u64> = None;
    let count = wire.len();
    for (i, t) in wire.into_iter().enumerate() {
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
    Ok(tiers)
}

fn batch_model(m: pb::BatchMemoryModel, prefix: &str) -> Result<MemoryModel, CoordinatorError> {
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
    Ok(MemoryModel {
        base,
        per_sample,
        min: m.min,
        max: m.max,
        multiple_of: m.multiple_of,
    })
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
        timeout_ms: spec.timeout_ms,
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
        preemptible: spec.preemptible,
        preemption_grace_ms: spec.preemption_grace_ms,
        nodes: spec.gang.as_ref().map_or(0, |g| g.nodes),
        gang_same_label: spec
            .gang
            .as_ref()
            .and_then(|g| g.same_label.clone())
            .unwrap_or_default(),
        gang_spread: spec.gang.as_ref().is_some_and(|g| g.same_label.is_none()),
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
        owner: job.owner.clone().unwrap_or_default(),
        archived: false,
        preemptions: preemption_lines(job),
        gang: job.gang.as_ref().map_or(0, |g| g.first),
        gang_rank: job.gang.as_ref().map_or(0, |g| g.rank),
        gang_members: Vec::new(),
    }
}

/// Every member of `job`'s gang (rank, job, state, current node and
/// attempt), for `gantry job`; empty for a job not in a gang.
pub fn gang_members_to_proto(
    state: &crate::state::StateMachine,
    job: &JobRecord,
) -> Vec<pb::GangMember> {
    let Some(gang) = &job.gang else {
        return Vec::new();
    };
    gang.members()
        .zip(0..)
        .map(|(id, rank)| {
            let member = state.job(id);
            let attempt = member.and_then(JobRecord::current_attempt);
            pb::GangMember {
                rank,
                job_id: id,
                state: member.map_or("archived", |m| m.state.as_str()).to_string(),
                node: attempt.map(|a| a.node.clone()).unwrap_or_default(),
                attempt: attempt.map_or(0, |a| a.attempt),
            }
        })
        .collect()
}

/// Who preempted a job and when, and whom it preempted, for `gantry job`.
fn preemption_lines(job: &JobRecord) -> Vec<String> {
    let mut lines: Vec<String> = job
        .preempted_by
        .iter()
        .map(|p| format!("preempted by job {} at {} ms", p.job, p.at_ms))
        .collect();
    if let Some(hold) = &job.preempting {
        let victims: Vec<String> = hold.victims.iter().map(|v| v.to_string()).collect();
        lines.push(format!(
            "preempted job(s) {} on node {} at {} ms",
            victims.join(", "),
            hold.node,
            hold.at_ms
        ));
    }
    lines
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
