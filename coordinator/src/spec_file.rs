//! The job spec schema of `gantry submit -f` and `POST /v1/jobs` -> wire job
//! specs. A file holds one job (a mapping), several (a sequence, or
//! `---`-separated documents), or a pipeline (`pipeline: NAME` + `jobs:
//! [...]`). Structural errors are caught here with the field path; semantic
//! checks happen once, in [`crate::convert`]. It lives in the coordinator
//! so the CLI and the HTTP API parse one schema with one set of messages.

use std::collections::BTreeMap;
use std::fmt;

use gantry_proto as pb;
use gantry_scheduler::units::{parse_bytes, parse_duration_ms};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::limits::MAX_PIPELINE_RUNS;
use crate::yaml_depth::{MAX_YAML_DEPTH, check_depth};

/// Largest spec file (or HTTP submit body) accepted.
pub const MAX_SPEC_FILE_BYTES: u64 = 4 << 20;

/// A size: plain bytes or a string with a unit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Size(pub i64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 12GiB, 512MiB or a byte count")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                if v < 0 {
                    return Err(E::custom(format!("must not be negative (got {v})")));
                }
                Ok(Size(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                i64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Size, E> {
                if v < 0.0 {
                    return Err(E::custom(format!("must not be negative (got {v})")));
                }
                Err(E::custom(format!(
                    "{v} is not a whole number of bytes; use a unit such as 1.5GiB"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                let bytes = parse_bytes(v).map_err(E::custom)?;
                i64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A size flag (`--gpu-memory 12GiB`) as the wire's signed bytes: what does
/// not fit is refused, not wrapped to a negative number.
pub fn parse_wire_bytes(text: &str) -> Result<i64, String> {
    let bytes = parse_bytes(text).map_err(|e| e.to_string())?;
    i64::try_from(bytes).map_err(|_| format!("{} is too large", text.trim()))
}

/// A duration: `500ms`, `30s`, `6h`, or plain seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DurationMs(pub u64);

/// Reads [`DurationMs`]: plain numbers are seconds, strings have a unit.
struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = DurationMs;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 500ms, 30s or 6h")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationMs, E> {
        if v < 0 {
            return Err(E::custom(format!("must not be negative (got {v})")));
        }
        self.visit_u64(v as u64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationMs, E> {
        v.checked_mul(1000)
            .map(DurationMs)
            .ok_or_else(|| E::custom("too large"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationMs, E> {
        parse_duration_ms(v).map(DurationMs).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for DurationMs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<DurationMs, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// Why a zero time limit is refused: on the wire 0 means "none", so `0s`
/// would silently mean no limit at all (as `drain --deadline 0` is refused).
const ZERO_TIMEOUT: &str = "must be more than zero; omit it or write `none` for no time limit";

/// `timeout:`: a positive duration, or `none` for no time limit (`Timeout(None)`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timeout(pub Option<u64>);

impl Timeout {
    fn positive<E: de::Error>(duration: DurationMs) -> Result<Timeout, E> {
        match duration.0 {
            0 => Err(E::custom(ZERO_TIMEOUT)),
            ms => Ok(Timeout(Some(ms))),
        }
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Timeout, D::Error> {
        struct TimeoutVisitor;
        impl Visitor<'_> for TimeoutVisitor {
            type Value = Timeout;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30m or 6h, or none")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timeout, E> {
                Timeout::positive(DurationVisitor.visit_i64(v)?)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timeout, E> {
                Timeout::positive(DurationVisitor.visit_u64(v)?)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timeout, E> {
                if v.trim() == "none" {
                    return Ok(Timeout(None));
                }
                Timeout::positive(DurationVisitor.visit_str(v)?)
            }
        }
        deserializer.deserialize_any(TimeoutVisitor)
    }
}

/// `--timeout`: as `timeout:` in a spec file; milliseconds, `None` for `none`.
pub fn parse_timeout(text: &str) -> Result<Option<u64>, String> {
    if text.trim() == "none" {
        return Ok(None);
    }
    match parse_duration_ms(text) {
        Err(e) => Err(format!("--timeout: {e} (e.g. 30m, 6h, or none)")),
        Ok(0) => Err(format!("--timeout: {ZERO_TIMEOUT}")),
        Ok(ms) => Ok(Some(ms)),
    }
}

/// CPU count: `4`, `0.5`, or `500m` (millicores).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpus(pub i64);

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cpus, D::Error> {
        struct CpuVisitor;
        impl Visitor<'_> for CpuVisitor {
            type Value = Cpus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of cores such as 4 or 0.5, or millicores such as 500m")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cpus, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cpus, E> {
                self.visit_f64(v as f64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cpus, E> {
                if v < 0.0 || !v.is_finite() {
                    return Err(E::custom(format!("must not be negative (got {v})")));
                }
                if v > 1e6 {
                    return Err(E::custom(format!("{v} cores is absurd")));
                }
                Ok(Cpus((v * 1000.0).round() as i64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cpus, E> {
                if let Some(millis) = v.strip_suffix('m') {
                    return millis
                        .trim()
                        .parse::<i64>()
                        .map(Cpus)
                        .map_err(|_| E::custom(format!("cannot parse {v:?} as millicores")));
                }
                let cores: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| E::custom(format!("cannot parse {v:?} as a number of cores")))?;
                self.visit_f64(cores)
            }
        }
        deserializer.deserialize_any(CpuVisitor)
    }
}

/// `command:` as a list (argv) or a single string (split on whitespace).
#[derive(Debug, Clone, Default)]
pub struct CommandLine(pub Vec<String>);

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CommandLine, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Line(String),
            Argv(Vec<ArgString>),
        }
        match Form::deserialize(deserializer).map_err(|_| {
            de::Error::custom("expected a list of arguments or a command line string")
        })? {
            Form::Line(line) => Ok(CommandLine(
                line.split_whitespace().map(String::from).collect(),
            )),
            Form::Argv(args) => Ok(CommandLine(args.into_iter().map(|a| a.0).collect())),
        }
    }
}

/// An argument or env value: strings, numbers and booleans are all accepted as text.
#[derive(Debug, Clone, Default)]
pub struct ArgString(pub String);

impl<'de> Deserialize<'de> for ArgString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ArgString, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            S(String),
            I(i64),
            U(u64),
            F(f64),
            B(bool),
        }
        Ok(ArgString(
            match Scalar::deserialize(deserializer)
                .map_err(|_| de::Error::custom("expected a string, number or boolean"))?
            {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::U(u) => u.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            },
        ))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    #[serde(default)]
    gpus: Option<i64>,
    #[serde(default)]
    gpu_memory: Option<Size>,
    #[serde(default)]
    cpus: Option<Cpus>,
    #[serde(default)]
    memory: Option<Size>,
    #[serde(default)]
    disk: Option<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    #[serde(default)]
    min_free: Option<Size>,
    size: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    #[serde(default)]
    base: Size,
    per_sample: Size,
    #[serde(default = "one")]
    min: u32,
    max: u32,
    #[serde(default)]
    multiple_of: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchFile {
    #[serde(default)]
    tiers: Vec<TierFile>,
    #[serde(default)]
    model: Option<ModelFile>,
    #[serde(default)]
    prefer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    name: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintsFile {
    #[serde(default)]
    labels: BTreeMap<String, ArgString>,
    #[serde(default)]
    gpu_model: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    #[serde(default)]
    max_attempts: Option<i64>,
    #[serde(default)]
    backoff: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    command: Option<CommandLine>,
    #[serde(default)]
    env: BTreeMap<String, ArgString>,
    #[serde(default)]
    resources: Option<ResourcesFile>,
    #[serde(default)]
    batch: Option<BatchFile>,
    #[serde(default)]
    locks: Vec<LockFile>,
    #[serde(default)]
    constraints: Option<ConstraintsFile>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    retry: Option<RetryFile>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    shell: bool,
    #[serde(default)]
    exclusive_gpu: Option<bool>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    snapshot: Vec<SnapshotFile>,
    #[serde(default)]
    gpu_memory_policy: Option<String>,
    #[serde(default)]
    gpu_memory_margin: Option<Size>,
    #[serde(default)]
    preemptible: Option<bool>,
    #[serde(default)]
    preemption_grace: Option<DurationMs>,
    #[serde(default)]
    nodes: Option<i64>,
    #[serde(default)]
    gang: Option<GangFile>,
}

/// `gang: {same_label: region}` or `gang: {spread: true}` (with `nodes: N`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GangFile {
    #[serde(default)]
    same_label: Option<String>,
    #[serde(default)]
    spread: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotFile {
    from: String,
    #[serde(rename = "as")]
    as_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    pipeline: String,
    #[serde(default)]
    repeat: Option<RepeatFile>,
    #[serde(default)]
    run_dir: Option<String>,
    jobs: Vec<serde_yaml_ng::Value>,
}

/// `repeat: forever` or `repeat: {max_runs: N}`.
#[derive(Debug)]
struct RepeatFile(pb::PipelineRepeat);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepeatMap {
    max_runs: MaxRuns,
}

/// `max_runs:`: 1 to [`MAX_PIPELINE_RUNS`].
#[derive(Debug)]
struct MaxRuns(u32);

impl<'de> Deserialize<'de> for MaxRuns {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MaxRuns, D::Error> {
        struct MaxRunsVisitor;
        impl Visitor<'_> for MaxRunsVisitor {
            type Value = MaxRuns;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a number of runs from 1 to {MAX_PIPELINE_RUNS}")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxRuns, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("must be at least 1 (got {v})"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxRuns, E> {
                match u32::try_from(v) {
                    Ok(0) => Err(E::custom("must be at least 1 (got 0)")),
                    Ok(n) if n <= MAX_PIPELINE_RUNS => Ok(MaxRuns(n)),
                    _ => Err(E::custom(format!(
                        "{v} runs, at most {MAX_PIPELINE_RUNS} (or repeat: forever)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(MaxRunsVisitor)
    }
}

impl<'de> Deserialize<'de> for RepeatFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RepeatFile, D::Error> {
        struct RepeatVisitor;
        impl<'de> Visitor<'de> for RepeatVisitor {
            type Value = RepeatFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`forever` or {max_runs: N}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RepeatFile, E> {
                if v.trim() == "forever" {
                    return Ok(RepeatFile(pb::PipelineRepeat {
                        max_runs: 0,
                        forever: true,
                    }));
                }
                Err(E::custom(format!(
                    "expected `forever` or {{max_runs: N}}, got {:?}",
                    printable(v, 64)
                )))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RepeatFile, A::Error> {
                let repeat = RepeatMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RepeatFile(pb::PipelineRepeat {
                    max_runs: repeat.max_runs.0,
                    forever: false,
                }))
            }
        }
        deserializer.deserialize_any(RepeatVisitor)
    }
}

/// A spec error: where (the file or document, when there is one), which
/// field (`jobs[1].resources.gpus`, `job.timeout`; empty for the whole
/// text) and why. Shown as one line: `job.yaml: job.timeout: must be ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The file or document (`job.yaml`, `job.yaml: document 2`); empty
    /// for an HTTP body.
    pub source: String,
    /// The field path within it; empty when the error is about the whole.
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

impl SpecError {
    /// Every part is bounded and shown safely: a field path holds user map
    /// keys and a parser's reason quotes user text (`unknown field `...``),
    /// and either may be megabytes long or hold terminal escapes.
    fn new(source: &str, field: impl AsRef<str>, reason: impl AsRef<str>) -> SpecError {
        SpecError {
            source: printable(source, MAX_SPEC_ERROR_PART),
            field: printable(field.as_ref(), MAX_SPEC_ERROR_PART),
            reason: printable(reason.as_ref(), MAX_SPEC_ERROR_PART),
        }
    }
}

/// Longest part (source, field, reason) of a [`SpecError`], in characters.
const MAX_SPEC_ERROR_PART: usize = 512;

/// `text` with control characters escaped (`\u{1b}`), cut after `max`
/// characters with a note of the full length.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push_str(&format!("... ({} bytes)", text.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in [&self.source, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for SpecError {}

/// A field path below `prefix` (`jobs[0]` + `retry.backoff`).
fn join(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => field.to_string(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// One job from its parsed value; `prefix` names it in errors (`job`,
/// `jobs[2]`).
fn job_from_value(
    value: serde_yaml_ng::Value,
    source: &str,
    prefix: &str,
) -> Result<pb::JobSpec, SpecError> {
    let file: JobFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        SpecError::new(source, join(prefix, &path), e.into_inner().to_string())
    })?;
    to_proto(file).map_err(|(field, reason)| SpecError::new(source, join(prefix, field), reason))
}

/// A job file's checks the parser cannot make; an error is (field, reason).
fn to_proto(file: JobFile) -> Result<pb::JobSpec, (&'static str, String)> {
    let Some(command) = file.command else {
        return Err((
            "command",
            "missing field `command` (the program and its arguments)".into(),
        ));
    };
    let r = file.resources.unwrap_or_default();
    let gpus = match r.gpus {
        None => 0,
        Some(n) if n < 0 => {
            return Err(("resources.gpus", format!("must not be negative (got {n})")));
        }
        Some(n) => u32::try_from(n).map_err(|_| ("resources.gpus", format!("{n} is absurd")))?,
    };
    let nodes = match file.nodes {
        None => 0,
        Some(n) if n < 1 => {
            return Err(("nodes", format!("must be at least 1 (got {n})")));
        }
        Some(n) => u32::try_from(n).map_err(|_| ("nodes", format!("{n} is absurd")))?,
    };
    let gang = file.gang.unwrap_or_default();
    let retry = match file.retry {
        None => None,
        Some(retry) => {
            let max_attempts = match retry.max_attempts {
                None => 0,
                Some(n) if n < 1 => {
                    return Err((
                        "retry.max_attempts",
                        format!("must be at least 1 (got {n})"),
                    ));
                }
                Some(n) => u32::try_from(n)
                    .map_err(|_| ("retry.max_attempts", format!("{n} is absurd")))?,
            };
            if retry.backoff == Some(DurationMs(0)) {
                // On the wire 0 means the default back-off, not none.
                return Err((
                    "retry.backoff",
                    "must be more than zero (omit it for the default of 10s)".into(),
                ));
            }
            Some(pb::RetryPolicy {
                max_attempts,
                backoff_ms: retry.backoff.map_or(0, |d| d.0),
            })
        }
    };
    let constraints = file.constraints.unwrap_or_default();
    Ok(pb::JobSpec {
        name: file.name.unwrap_or_default(),
        kind: file.kind.unwrap_or_default(),
        command: command.0,
        env: file.env.into_iter().map(|(k, v)| (k, v.0)).collect(),
        resources: Some(pb::Resources {
            gpus,
            gpu_memory_bytes: r.gpu_memory.map_or(0, |s| s.0),
            cpu_millis: r.cpus.map_or(0, |c| c.0),
            memory_bytes: r.memory.map_or(0, |s| s.0),
            disk_bytes: r.disk.map_or(0, |s| s.0),
        }),
        batch: file.batch.map(|b| pb::BatchSpec {
            tiers: b
                .tiers
                .into_iter()
                .map(|t| pb::BatchTier {
                    min_free_bytes: t.min_free.map_or(0, |s| s.0),
                    size: t.size,
                })
                .collect(),
            model: b.model.map(|m| pb::BatchMemoryModel {
                base_bytes: m.base.0,
                per_sample_bytes: m.per_sample.0,
                min: m.min,
                max: m.max,
                multiple_of: m.multiple_of,
            }),
            prefer: b.prefer.unwrap_or_default(),
        }),
        locks: file
            .locks
            .into_iter()
            .map(|l| pb::LockRequest {
                name: l.name,
                mode: l.mode.unwrap_or_default(),
            })
            .collect(),
        constraints: Some(pb::Constraints {
            labels: constraints
                .labels
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            gpu_models: match constraints.gpu_model {
                None => Vec::new(),
                Some(OneOrMany::One(m)) => vec![m],
                Some(OneOrMany::Many(m)) => m,
            },
        }),
        priority: file.priority.unwrap_or(0),
        retry,
        timeout_ms: file.timeout.and_then(|t| t.0),
        after: file.after,
        shell: file.shell,
        exclusive_gpu: file.exclusive_gpu,
        queue: file.queue.unwrap_or_default(),
        snapshot: file
            .snapshot
            .into_iter()
            .map(|s| pb::Snapshot {
                from: s.from,
                as_name: s.as_name,
            })
            .collect(),
        gpu_memory_policy: file.gpu_memory_policy.unwrap_or_default(),
        gpu_memory_margin_bytes: file.gpu_memory_margin.map_or(0, |s| s.0),
        preemptible: file.preemptible,
        preemption_grace_ms: file.preemption_grace.map(|d| d.0),
        nodes,
        gang_same_label: gang.same_label.unwrap_or_default(),
        gang_spread: gang.spread,
    })
}

/// The jobs of a spec file, and the pipeline they form, if the file is one.
#[derive(Debug)]
pub struct ParsedSpec {
    /// `pipeline:` name.
    pub pipeline: Option<String>,
    /// Jobs in file order.
    pub jobs: Vec<pb::JobSpec>,
    /// The pipeline's `repeat:` (`None`: one run per submit).
    pub repeat: Option<pb::PipelineRepeat>,
    /// The pipeline's `run_dir:` ("" = none).
    pub run_dir: String,
}

/// Parses the text of a spec file (YAML: one or more documents) into wire
/// specs; refuses nesting deeper than [`MAX_YAML_DEPTH`] before the parser
/// sees the text. `source` names the file in errors.
pub fn parse_spec_text(text: &str, source: &str) -> Result<ParsedSpec, SpecError> {
    check_depth(text, MAX_YAML_DEPTH, source).map_err(|reason| SpecError::new("", "", reason))?;
    let mut values = Vec::new();
    for (doc_index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|e| SpecError::new(source, "", format!("malformed YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        values.push((doc_index, value));
    }
    let many_docs = values.len() > 1;
    let mut parsed = ParsedSpec {
        pipeline: None,
        jobs: Vec::new(),
        repeat: None,
        run_dir: String::new(),
    };
    for (doc_index, value) in values {
        let doc_label = if many_docs {
            format!("{source}: document {}", doc_index + 1)
        } else {
            source.to_string()
        };
        let document = spec_from_value(value, &doc_label)?;
        if many_docs && document.pipeline.is_some() {
            return Err(SpecError::new(
                &doc_label,
                "",
                "a pipeline must be the only document in its file",
            ));
        }
        parsed.pipeline = document.pipeline;
        parsed.repeat = document.repeat;
        parsed.run_dir = document.run_dir;
        parsed.jobs.extend(document.jobs);
    }
    if parsed.jobs.is_empty() {
        return Err(SpecError::new(source, "", "no jobs in the file"));
    }
    Ok(parsed)
}

/// Parses one document (a job, a list of jobs, or a pipeline) already read
/// by a YAML or JSON parser. This is the schema of `gantry submit -f` and of
/// the HTTP API's `POST /v1/jobs`; `source` names the document in errors
/// (empty for an HTTP body).
pub fn spec_from_value(value: serde_yaml_ng::Value, source: &str) -> Result<ParsedSpec, SpecError> {
    let mut jobs = Vec::new();
    let mut pipeline_name = None;
    let (mut repeat, mut run_dir) = (None, String::new());
    match value {
        serde_yaml_ng::Value::Sequence(items) => {
            for (i, item) in items.into_iter().enumerate() {
                jobs.push(job_from_value(item, source, &format!("jobs[{i}]"))?);
            }
        }
        serde_yaml_ng::Value::Mapping(ref map) if map.contains_key("pipeline") => {
            let pipeline: PipelineFile =
                serde_path_to_error::deserialize(value.clone()).map_err(|e| {
                    let path = e.path().to_string();
                    let path = if path == "." { String::new() } else { path };
                    SpecError::new(source, path, e.into_inner().to_string())
                })?;
            if pipeline.jobs.is_empty() {
                return Err(SpecError::new(
                    source,
                    "jobs",
                    "a pipeline needs at least one job",
                ));
            }
            for (i, item) in pipeline.jobs.into_iter().enumerate() {
                let mut job = job_from_value(item, source, &format!("jobs[{i}]"))?;
                if job.queue.is_empty() {
                    job.queue = pipeline.pipeline.clone();
                }
                jobs.push(job);
            }
            pipeline_name = Some(pipeline.pipeline);
            repeat = pipeline.repeat.map(|r| r.0);
            run_dir = pipeline.run_dir.unwrap_or_default();
        }
        serde_yaml_ng::Value::Mapping(_) => jobs.push(job_from_value(value, source, "job")?),
        other => {
            return Err(SpecError::new(
                source,
                "",
                format!(
                    "expected a job (mapping), a list of jobs, or a pipeline, got {}",
                    yaml_type(&other)
                ),
            ));
        }
    }
    Ok(ParsedSpec {
        pipeline: pipeline_name,
        jobs,
        repeat,
        run_dir,
    })
}

fn yaml_type(value: &serde_yaml_ng::Value) -> &'static str {
    match value {
        serde_yaml_ng::Value::Null => "nothing",
        serde_yaml_ng::Value::Bool(_) => "a boolean",
        serde_yaml_ng::Value::Number(_) => "a number",
        serde_yaml_ng::Value::String(_) => "a string",
        serde_yaml_ng::Value::Sequence(_) => "a list",
        serde_yaml_ng::Value::Mapping(_) => "a mapping",
        serde_yaml_ng::Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<pb::JobSpec>, String> {
        parse_spec_text(text, "job.yaml")
            .map(|p| p.jobs)
            .map_err(|e| e.to_string())
    }

    fn check_err(text: &str, expect: &str) {
        let err = parse(text).expect_err(text);
        assert!(
            err.contains(expect),
            "error {err:?} should contain {expect:?}"
        );
        assert!(!err.contains('\n'), "one line: {err:?}");
    }

    #[test]
    fn the_design_example_parses() {
        let text = r#"
name: selfplay-sq8-2p
kind: selfplay
command: [python, -m, app.training.selfplay, --batch-size, "{batch_size}"]
env: {BOARD: square8}
resources: {gpus: 1, gpu_memory: 12GiB, cpus: 4, memory: 16GiB, disk: 20GiB}
batch:
  tiers: [{min_free: 32GiB, size: 512}, {min_free: 16GiB, size: 256}, {size: 128}]
locks: [{name: model/square8_2p, mode: shared}]
constraints: {labels: {provider: lambda}, gpu_model: [H100, A100-80GB]}
priority: 50
retry: {max_attempts: 3, backoff: 30s}
timeout: 6h
after: [export-sq8-2p]
"#;
        let jobs = parse(text).expect("parses");
        assert_eq!(jobs.len(), 1);
        let job = &jobs[0];
        assert_eq!(job.kind, "selfplay");
        assert_eq!(job.command[4], "{batch_size}");
        let r = job.resources.as_ref().expect("resources");
        assert_eq!(
            (r.gpus, r.gpu_memory_bytes, r.cpu_millis),
            (1, 12 << 30, 4000)
        );
        assert_eq!(job.batch.as_ref().map(|b| b.tiers.len()), Some(3));
        assert_eq!(
            job.retry.as_ref().map(|r| (r.max_attempts, r.backoff_ms)),
            Some((3, 30_000))
        );
        assert_eq!(job.timeout_ms, Some(6 * 3600 * 1000));
    }

    #[test]
    fn gang_fields() {
        let jobs = parse("command: [a]\nnodes: 4\ngang: {same_label: region}\n").expect("parses");
        assert_eq!(
            (
                jobs[0].nodes,
                jobs[0].gang_same_label.as_str(),
                jobs[0].gang_spread
            ),
            (4, "region", false)
        );
        let jobs = parse("command: [a]\nnodes: 2\ngang: {spread: true}\n").expect("parses");
        assert_eq!((jobs[0].nodes, jobs[0].gang_spread), (2, true));
        for (text, field) in [
            ("command: [a]\nnodes: 0\n", "nodes"),
            ("command: [a]\nnodes: -3\n", "nodes"),
            ("command: [a]\nnodes: many\n", "nodes"),
            ("command: [a]\nnodes: 2\ngang: {same: x}\n", "gang"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn preemption_fields() {
        let jobs =
            parse("command: [a]\npreemptible: false\npreemption_grace: 2m\n").expect("parses");
        assert_eq!(
            (jobs[0].preemptible, jobs[0].preemption_grace_ms),
            (Some(false), Some(120_000))
        );
        let jobs = parse("command: [a]\n").expect("parses");
        assert_eq!(
            (jobs[0].preemptible, jobs[0].preemption_grace_ms),
            (None, None)
        );
        let err = parse("command: [a]\npreemption_grace: soon\n").expect_err("bad");
        assert!(err.contains("preemption_grace"), "{err}");
    }

    #[test]
    fn timeouts() {
        let cases: Vec<(&str, Option<u64>)> = vec![
            ("timeout: none", None),
            ("timeout: 90", Some(90_000)),
            ("timeout: 1.5h", Some(5_400_000)),
            ("timeout: 500ms", Some(500)),
            ("retry: {max_attempts: 2}", None),
        ];
        for (line, expect) in cases {
            let jobs = parse(&format!("command: [a]\n{line}\n")).expect(line);
            assert_eq!(jobs[0].timeout_ms, expect, "{line}");
        }
        assert_eq!(parse_wire_bytes("1KiB"), Ok(1024));
        assert_eq!(
            parse_wire_bytes("9300000TB"),
            Err("9300000TB is too large".into())
        );
        let flags: Vec<(&str, Result<Option<u64>, &str>)> = vec![
            ("none", Ok(None)),
            ("6h", Ok(Some(6 * 3_600_000))),
            ("0s", Err("--timeout: must be more than zero")),
            ("0", Err("--timeout: must be more than zero")),
            ("soon", Err("--timeout: ")),
        ];
        for (text, expect) in flags {
            match (parse_timeout(text), expect) {
                (Ok(ms), Ok(want)) => assert_eq!(ms, want, "{text}"),
                (Err(e), Err(prefix)) => assert!(e.starts_with(prefix), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn several_jobs_per_file() {
        assert_eq!(
            parse("- {command: [a]}\n- {command: [b]}\n").map(|j| j.len()),
            Ok(2)
        );
        assert_eq!(
            parse("command: [a]\n---\ncommand: [b]\n---\n").map(|j| j.len()),
            Ok(2)
        );
        let pipeline = parse("pipeline: loop\njobs:\n  - {name: a, command: [a]}\n  - {name: b, command: [b], after: [a]}\n").expect("pipeline");
        assert_eq!(pipeline.len(), 2);
        assert_eq!(pipeline[1].queue, "loop");
    }

    #[test]
    fn bad_input_names_the_field() {
        check_err("command: [a\n", "malformed YAML");
        check_err("command: [a]\ngpu: 1\n", "unknown field `gpu`");
        check_err(
            "command: [a]\nresources: {gpu_memory: -1}\n",
            "resources.gpu_memory: must not be negative",
        );
        check_err(
            "command: [a]\nresources: {gpu_memory: 12 parsecs}\n",
            "resources.gpu_memory",
        );
        check_err(
            "command: [a]\nresources: {gpus: -2}\n",
            "resources.gpus: must not be negative",
        );
        check_err(
            "command: [a]\nretry: {max_attempts: 0}\n",
            "retry.max_attempts: must be at least 1",
        );
        check_err("command: [a]\ntimeout: soon\n", "timeout");
        check_err(
            "command: [a]\ntimeout: 0s\n",
            "job.timeout: must be more than zero; omit it or write `none`",
        );
        check_err(
            "command: [a]\ntimeout: 0\n",
            "job.timeout: must be more than zero",
        );
        check_err(
            "command: [a]\ntimeout: -5\n",
            "job.timeout: must not be negative",
        );
        check_err(
            "command: [a]\nretry: {backoff: 0s}\n",
            "job.retry.backoff: must be more than zero",
        );
        check_err("kind: selfplay\n", "missing field `command`");
        check_err("42\n", "expected a job");
        check_err("", "no jobs");
        check_err("- {command: [a]}\n- {command: [b], bogus: 1}\n", "jobs[1]");
    }

    #[test]
    fn repeat_is_forever_or_a_bounded_number_of_runs() {
        let pipeline = |repeat: &str| {
            format!("pipeline: loop\nrepeat: {repeat}\njobs:\n  - {{name: a, command: [a]}}\n")
        };
        let parse_repeat = |repeat: &str| {
            parse_spec_text(&pipeline(repeat), "loop.yaml")
                .map(|p| p.repeat.map(|r| (r.max_runs, r.forever)))
                .map_err(|e| e.to_string())
        };
        type Expect = Result<Option<(u32, bool)>, &'static str>;
        let cases: Vec<(&str, Expect)> = vec![
            ("forever", Ok(Some((0, true)))),
            ("{max_runs: 3}", Ok(Some((3, false)))),
            ("{max_runs: 1000000}", Ok(Some((1_000_000, false)))),
            (
                "{max_runs: 0}",
                Err("loop.yaml: repeat.max_runs: must be at least 1 (got 0)"),
            ),
            (
                "{max_runs: -2}",
                Err("loop.yaml: repeat.max_runs: must be at least 1 (got -2)"),
            ),
            (
                "{max_runs: 1000001}",
                Err(
                    "loop.yaml: repeat.max_runs: 1000001 runs, at most 1000000 (or repeat: forever)",
                ),
            ),
            (
                "{max_runs: 99999999999999999999}",
                Err("loop.yaml: malformed YAML: repeat.max_runs: "),
            ),
            (
                "{max_runs: 2, every: 1h}",
                Err("loop.yaml: repeat.every: unknown field `every`, expected `max_runs`"),
            ),
            ("{}", Err("loop.yaml: repeat: missing field `max_runs`")),
            (
                "sometimes",
                Err("loop.yaml: repeat: expected `forever` or {max_runs: N}, got \"sometimes\""),
            ),
            (
                "3",
                Err(
                    "loop.yaml: repeat: invalid type: integer `3`, expected `forever` or {max_runs: N}",
                ),
            ),
            (
                "[forever]",
                Err("loop.yaml: repeat: invalid type: sequence"),
            ),
        ];
        for (repeat, expect) in cases {
            match (parse_repeat(repeat), expect) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{repeat}"),
                (Err(e), Err(prefix)) => {
                    assert!(e.starts_with(prefix), "{repeat}: {e}");
                    assert!(!e.contains('\n') && e.len() < 300, "{repeat}: {e}");
                }
                (got, want) => panic!("{repeat}: got {got:?}, expected {want:?}"),
            }
        }
        let once = parse_spec_text(&pipeline("forever").replace("repeat: forever\n", ""), "")
            .expect("no repeat");
        assert_eq!((once.repeat, once.run_dir.as_str()), (None, ""));
        let dir = parse_spec_text(
            &format!("run_dir: /srv/runs/{{run}}\n{}", pipeline("forever")),
            "",
        )
        .expect("run_dir");
        assert_eq!(dir.run_dir, "/srv/runs/{run}");
        check_err("command: [a]\nrepeat: forever\n", "unknown field `repeat`");
    }

    #[test]
    fn json_and_yaml_name_the_same_fields_and_errors_are_bounded() {
        let cases = [
            (
                r#"{"command": ["a"], "retry": {"max_attempts": 0}}"#,
                "job.retry.max_attempts",
            ),
            (
                r#"[{"command": ["a"]}, {"command": ["b"], "bogus": 1}]"#,
                "jobs[1].bogus",
            ),
            (r#"{"pipeline": "p", "jobs": []}"#, "jobs"),
            (r#"{"command": ["a"], "timeout": "0s"}"#, "job.timeout"),
        ];
        for (json, field) in cases {
            let value: serde_json::Value = serde_json::from_str(json).expect("json");
            let value = serde_yaml_ng::to_value(&value).expect("value");
            let from_json = spec_from_value(value, "").expect_err(json);
            let from_yaml = parse_spec_text(json, "").expect_err(json);
            assert_eq!(from_json.field, field, "{json}");
            assert_eq!(from_json, from_yaml, "{json}");
        }
        // A megabyte of unknown field name, with a terminal escape in it.
        let key = format!("\u{1b}[2J{}", "k".repeat(1 << 20));
        let json = serde_json::json!({"command": ["a"], key: 1});
        let value = serde_yaml_ng::to_value(&json).expect("value");
        let error = spec_from_value(value, "")
            .expect_err("unknown field")
            .to_string();
        assert!(
            error.len() < 2 * MAX_SPEC_ERROR_PART + 100,
            "{}",
            error.len()
        );
        assert!(
            !error.contains('\u{1b}') && error.contains("\\u{1b}"),
            "{error:.80}"
        );
    }
}
