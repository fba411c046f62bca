//! The binary encoding of the replicated log's commands: prost messages of
//! `proto/storage.proto`, converted to and from the domain's [`Command`]
//! here and nowhere else (the storage edge, as `convert` is the gRPC one).
//!
//! A command written by the JSON versions starts with `{`; a prost one
//! never does (its first byte is the tag of a length-delimited field of
//! `Command.kind`, `0x0A`..=`0xAA` and beyond, never `0x7B`, which would be
//! field 15 with the deprecated group wire type prost never writes), so
//! [`decode_command`] still reads a log the JSON version left.
//!
//! Adding a `Command` variant: a message (or a shared shape such as
//! `JobAt`) and the next number of `Command.kind` in the .proto, one arm
//! in [`command_to_storage`] and one in [`command_from_storage`]; the
//! round-trip test's table gets a case.

use gantry_proto::storage as st;
use gantry_scheduler::{
    BatchPolicy, BatchTier, Constraints, JobKind, LockMode, LockRequest, MemoryModel, Placement,
    Resources,
};
use prost::Message;

use crate::breaker::BreakerPolicy;
use crate::command::Command;
use crate::domain::{
    GangSpec, GpuRecord, JobSpec, OverusePolicy, Repeat, RetryPolicy, RunPolicy, SnapshotSpec,
};
use crate::state::RetentionPolicy;

/// A stored command that cannot be read. Fatal where it is met: a replica
/// must not skip what others applied.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not a prost `Command`.
    #[error("undecodable command: {0}")]
    Prost(#[from] prost::DecodeError),
    /// A JSON command (from before the binary log) that does not parse.
    #[error("undecodable JSON command: {0}")]
    Json(#[from] serde_json::Error),
    /// A message field this version requires is absent.
    #[error("command without its {0}")]
    Missing(&'static str),
    /// A fixed-size record of another size.
    #[error("{what} of {len} bytes")]
    Size {
        /// What the record is.
        what: &'static str,
        /// Its size.
        len: usize,
    },
    /// A name this version does not know.
    #[error("unknown {field} {value:?}")]
    Unknown {
        /// What the name is of.
        field: &'static str,
        /// The name.
        value: String,
    },
}

/// Encodes a command for the log (never empty: the oneof is always set).
pub fn encode_command(command: &Command) -> Vec<u8> {
    command_to_storage(command).encode_to_vec()
}

/// Decodes a command of the log, binary or (from the JSON versions) JSON.
pub fn decode_command(data: &[u8]) -> Result<Command, CodecError> {
    if data.first() == Some(&b'{') {
        return Ok(serde_json::from_slice(data)?);
    }
    command_from_storage(st::Command::decode(data)?)
}

fn command_to_storage(command: &Command) -> st::Command {
    use st::command::Kind;
    let kind = match command {
        Command::Submit {
            at_ms,
            key,
            jobs,
            pipeline,
            owner,
        } => Kind::Submit(st::Submit {
            at_ms: *at_ms,
            key: key.clone(),
            jobs: jobs.iter().map(spec_to_storage).collect(),
            pipeline: pipeline.clone(),
            owner: owner.clone(),
        }),
        Command::RegisterNode {
            at_ms,
            name,
            address,
            labels,
            gpus,
            cpu_millis,
            memory_total,
            disk_total,
        } => Kind::RegisterNode(st::RegisterNode {
            at_ms: *at_ms,
            name: name.clone(),
            address: address.clone(),
            labels: labels.clone(),
            gpus: gpus.iter().map(gpu_to_storage).collect(),
            cpu_millis: *cpu_millis,
            memory_total: *memory_total,
            disk_total: *disk_total,
        }),
        Command::Assign {
            at_ms,
            placements,
            term,
        } => Kind::Assign(st::Assign {
            at_ms: *at_ms,
            placements: placements
                .iter()
                .map(|p| st::Placement {
                    job: p.job,
                    node: p.node.clone(),
                    gpus: p.gpus.clone(),
                    gpu_memory: p.gpu_memory,
                    batch_size: p.batch_size,
                    exclusive_gpu: p.exclusive_gpu,
                })
                .collect(),
            term: *term,
        }),
        Command::JobStarted {
            at_ms,
            job,
            attempt,
            node,
        } => Kind::JobStarted(st::JobStarted {
            at_ms: *at_ms,
            job: *job,
            attempt: *attempt,
            node: node.clone(),
        }),
        Command::JobExited {
            at_ms,
            job,
            attempt,
            node,
            code,
            signal,
            error,
            cancelled,
            oom,
            output_tail,
            peak_gpu_memory,
        } => Kind::JobExited(st::JobExited {
            at_ms: *at_ms,
            job: *job,
            attempt: *attempt,
            node: node.clone(),
            code: *code,
            signal: *signal,
            error: error.clone(),
            cancelled: *cancelled,
            oom: *oom,
            output_tail: output_tail.clone(),
            peak_gpu_memory: *peak_gpu_memory,
        }),
        Command::Requeue { at_ms, job } => Kind::Requeue(job_at(*at_ms, *job)),
        Command::DlqRetry { at_ms, job, spec } => Kind::DlqRetry(st::DlqRetry {
            at_ms: *at_ms,
            job: *job,
            spec: spec.as_deref().map(spec_to_storage),
        }),
        Command::DlqDrop { at_ms, job } => Kind::DlqDrop(job_at(*at_ms, *job)),
        Command::ReviveAttempt {
            at_ms,
            job,
            attempt,
            node,
        } => Kind::ReviveAttempt(st::ReviveAttempt {
            at_ms: *at_ms,
            job: *job,
            attempt: *attempt,
            node: node.clone(),
        }),
        Command::RequestCancel { at_ms, job } => Kind::RequestCancel(job_at(*at_ms, *job)),
        Command::AttemptLost {
            at_ms,
            job,
            attempt,
            reason,
        } => Kind::AttemptLost(st::AttemptLost {
            at_ms: *at_ms,
            job: *job,
            attempt: *attempt,
            reason: reason.clone(),
        }),
        Command::SetNodeDown { at_ms, node, down } => Kind::SetNodeDown(st::SetNodeDown {
            at_ms: *at_ms,
            node: node.clone(),
            down: *down,
        }),
        Command::SetDrain {
            at_ms,
            node,
            draining,
            deadline_ms,
        } => Kind::SetDrain(st::SetDrain {
            at_ms: *at_ms,
            node: node.clone(),
            draining: *draining,
            deadline_ms: *deadline_ms,
        }),
        Command::PreemptDrained { at_ms, node } => Kind::PreemptDrained(node_at(*at_ms, node)),
        Command::Quarantine {
            at_ms,
            node,
            until_ms,
            failures,
            reason,
            policy,
        } => Kind::Quarantine(st::Quarantine {
            at_ms: *at_ms,
            node: node.clone(),
            until_ms: *until_ms,
            failures: *failures,
            reason: reason.clone(),
            policy: Some(st::BreakerPolicy {
                trip_points: policy.trip_points,
                window_ms: policy.window_ms,
                cool_down_ms: policy.cool_down_ms,
                max_doublings: policy.max_doublings,
                max_share_percent: policy.max_share_percent,
            }),
        }),
        Command::Preempt {
            at_ms,
            job,
            node,
            victims,
            reason,
            until_ms,
        } => Kind::Preempt(st::Preempt {
            at_ms: *at_ms,
            job: *job,
            node: node.clone(),
            victims: victims.clone(),
            reason: reason.clone(),
            until_ms: *until_ms,
        }),
        Command::ClearQuarantine { at_ms, node } => Kind::ClearQuarantine(node_at(*at_ms, node)),
        Command::SetRetention { at_ms, policy } => Kind::SetRetention(st::SetRetention {
            at_ms: *at_ms,
            job_retention_ms: policy.job_retention_ms,
            max_retained_jobs: policy.max_retained_jobs,
            history_retention_ms: policy.history_retention_ms,
            history_max_bytes: policy.history_max_bytes,
        }),
        Command::Retire { at_ms } => Kind::Retire(st::At { at_ms: *at_ms }),
        Command::SetGpuHealth {
            at_ms,
            node,
            gpu,
            fault,
            seen_healthy,
        } => Kind::SetGpuHealth(st::SetGpuHealth {
            at_ms: *at_ms,
            node: node.clone(),
            gpu: *gpu,
            fault: fault.clone(),
            seen_healthy: *seen_healthy,
        }),
        Command::SubmitLoop {
            at_ms,
            key,
            jobs,
            pipeline,
            owner,
            run_policy,
        } => Kind::SubmitLoop(st::SubmitLoop {
            at_ms: *at_ms,
            key: key.clone(),
            jobs: jobs.iter().map(spec_to_storage).collect(),
            pipeline: pipeline.clone(),
            owner: owner.clone(),
            run_policy: Some(run_policy_to_storage(run_policy)),
        }),
        Command::StopPipeline { at_ms, name } => Kind::StopPipeline(st::StopPipeline {
            at_ms: *at_ms,
            name: name.clone(),
        }),
        Command::GangStop { at_ms, gang } => Kind::GangStop(job_at(*at_ms, *gang)),
    };
    st::Command { kind: Some(kind) }
}

fn job_at(at_ms: u64, job: u64) -> st::JobAt {
    st::JobAt { at_ms, job }
}

fn node_at(at_ms: u64, node: &str) -> st::NodeAt {
    st::NodeAt {
        at_ms,
        node: node.to_string(),
    }
}

fn command_from_storage(command: st::Command) -> Result<Command, CodecError> {
    use st::command::Kind;
    Ok(match command.kind.ok_or(CodecError::Missing("kind"))? {
        Kind::Submit(c) => Command::Submit {
            at_ms: c.at_ms,
            key: c.key,
            jobs: c
                .jobs
                .into_iter()
                .map(spec_from_storage)
                .collect::<Result<_, _>>()?,
            pipeline: c.pipeline,
            owner: c.owner,
        },
        Kind::RegisterNode(c) => Command::RegisterNode {
            at_ms: c.at_ms,
            name: c.name,
            address: c.address,
            labels: c.labels,
            gpus: c.gpus.into_iter().map(gpu_from_storage).collect(),
            cpu_millis: c.cpu_millis,
            memory_total: c.memory_total,
            disk_total: c.disk_total,
        },
        Kind::Assign(c) => Command::Assign {
            at_ms: c.at_ms,
            placements: c
                .placements
                .into_iter()
                .map(|p| Placement {
                    job: p.job,
                    node: p.node,
                    gpus: p.gpus,
                    gpu_memory: p.gpu_memory,
                    batch_size: p.batch_size,
                    exclusive_gpu: p.exclusive_gpu,
                })
                .collect(),
            term: c.term,
        },
        Kind::JobStarted(c) => Command::JobStarted {
            at_ms: c.at_ms,
            job: c.job,
            attempt: c.attempt,
            node: c.node,
        },
        Kind::JobExited(c) => Command::JobExited {
            at_ms: c.at_ms,
            job: c.job,
            attempt: c.attempt,
            node: c.node,
            code: c.code,
            signal: c.signal,
            error: c.error,
            cancelled: c.cancelled,
            oom: c.oom,
            output_tail: c.output_tail,
            peak_gpu_memory: c.peak_gpu_memory,
        },
        Kind::Requeue(c) => Command::Requeue {
            at_ms: c.at_ms,
            job: c.job,
        },
        Kind::DlqRetry(c) => Command::DlqRetry {
            at_ms: c.at_ms,
            job: c.job,
            spec: c.spec.map(spec_from_storage).transpose()?.map(Box::new),
        },
        Kind::DlqDrop(c) => Command::DlqDrop {
            at_ms: c.at_ms,
            job: c.job,
        },
        Kind::ReviveAttempt(c) => Command::ReviveAttempt {
            at_ms: c.at_ms,
            job: c.job,
            attempt: c.attempt,
            node: c.node,
        },
        Kind::RequestCancel(c) => Command::RequestCancel {
            at_ms: c.at_ms,
            job: c.job,
        },
        Kind::AttemptLost(c) => Command::AttemptLost {
            at_ms: c.at_ms,
            job: c.job,
            attempt: c.attempt,
            reason: c.reason,
        },
        Kind::SetNodeDown(c) => Command::SetNodeDown {
            at_ms: c.at_ms,
            node: c.node,
            down: c.down,
        },
        Kind::SetDrain(c) => Command::SetDrain {
            at_ms: c.at_ms,
            node: c.node,
            draining: c.draining,
            deadline_ms: c.deadline_ms,
        },
        Kind::PreemptDrained(c) => Command::PreemptDrained {
            at_ms: c.at_ms,
            node: c.node,
        },
        Kind::Quarantine(c) => {
            let policy = c.policy.ok_or(CodecError::Missing("breaker policy"))?;
            Command::Quarantine {
                at_ms: c.at_ms,
                node: c.node,
                until_ms: c.until_ms,
                failures: c.failures,
                reason: c.reason,
                policy: BreakerPolicy {
                    trip_points: policy.trip_points,
                    window_ms: policy.window_ms,
                    cool_down_ms: policy.cool_down_ms,
                    max_doublings: policy.max_doublings,
                    max_share_percent: policy.max_share_percent,
                },
            }
        }
        Kind::Preempt(c) => Command::Preempt {
            at_ms: c.at_ms,
            job: c.job,
            node: c.node,
            victims: c.victims,
            reason: c.reason,
            until_ms: c.until_ms,
        },
        Kind::ClearQuarantine(c) => Command::ClearQuarantine {
            at_ms: c.at_ms,
            node: c.node,
        },
        Kind::SetRetention(c) => Command::SetRetention {
            at_ms: c.at_ms,
            policy: RetentionPolicy {
                job_retention_ms: c.job_retention_ms,
                max_retained_jobs: c.max_retained_jobs,
                history_retention_ms: c.history_retention_ms,
                history_max_bytes: c.history_max_bytes,
            },
        },
        Kind::Retire(c) => Command::Retire { at_ms: c.at_ms },
        Kind::SetGpuHealth(c) => Command::SetGpuHealth {
            at_ms: c.at_ms,
            node: c.node,
            gpu: c.gpu,
            fault: c.fault,
            seen_healthy: c.seen_healthy,
        },
        Kind::SubmitLoop(c) => Command::SubmitLoop {
            at_ms: c.at_ms,
            key: c.key,
            jobs: c
                .jobs
                .into_iter()
                .map(spec_from_storage)
                .collect::<Result<_, _>>()?,
            pipeline: c.pipeline,
            owner: c.owner,
            run_policy: run_policy_from_storage(
                c.run_policy.ok_or(CodecError::Missing("run policy"))?,
            )?,
        },
        Kind::StopPipeline(c) => Command::StopPipeline {
            at_ms: c.at_ms,
            name: c.name,
        },
        Kind::GangStop(c) => Command::GangStop {
            at_ms: c.at_ms,
            gang: c.job,
        },
    })
}

/// A node's GPU as stored (in a registration command and a node record).
pub(super) fn gpu_to_storage(gpu: &GpuRecord) -> st::GpuRecord {
    st::GpuRecord {
        index: gpu.index,
        model: gpu.model.clone(),
        total: gpu.total,
    }
}

/// A node's GPU from its storage message.
pub(super) fn gpu_from_storage(gpu: st::GpuRecord) -> GpuRecord {
    GpuRecord {
        index: gpu.index,
        model: gpu.model,
        total: gpu.total,
    }
}

pub(super) fn run_policy_to_storage(policy: &RunPolicy) -> st::RunPolicy {
    let (repeat, max_runs) = match policy.repeat {
        Repeat::Once => ("once", 0),
        Repeat::Forever => ("forever", 0),
        Repeat::MaxRuns(max) => ("max_runs", max),
    };
    st::RunPolicy {
        repeat: repeat.to_string(),
        max_runs,
        first_run: policy.first_run,
        run_dir: policy.run_dir.clone(),
        stopped: policy.stopped,
    }
}

pub(super) fn run_policy_from_storage(policy: st::RunPolicy) -> Result<RunPolicy, CodecError> {
    let repeat = match policy.repeat.as_str() {
        "once" => Repeat::Once,
        "forever" => Repeat::Forever,
        "max_runs" => Repeat::MaxRuns(policy.max_runs),
        _ => {
            return Err(CodecError::Unknown {
                field: "repeat",
                value: policy.repeat,
            });
        }
    };
    Ok(RunPolicy {
        repeat,
        first_run: policy.first_run,
        run_dir: policy.run_dir,
        stopped: policy.stopped,
    })
}

pub(super) fn spec_to_storage(spec: &JobSpec) -> st::JobSpec {
    let r = &spec.resources;
    st::JobSpec {
        name: spec.name.clone(),
        kind: spec.kind.as_str().to_string(),
        command: spec.command.clone(),
        env: spec.env.clone(),
        resources: Some(st::Resources {
            gpus: r.gpus,
            gpu_memory: r.gpu_memory,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            disk: r.disk,
        }),
        exclusive_gpu: spec.exclusive_gpu,
        batch: spec.batch.as_ref().map(|b| st::BatchPolicy {
            tiers: b
                .tiers
                .iter()
                .map(|t| st::BatchTier {
                    min_free: t.min_free,
                    size: t.size,
                })
                .collect(),
            model: b.model.as_ref().map(|m| st::MemoryModel {
                base: m.base,
                per_sample: m.per_sample,
                min: m.min,
                max: m.max,
                multiple_of: m.multiple_of,
            }),
            prefer_largest: b.prefer_largest,
        }),
        locks: spec
            .locks
            .iter()
            .map(|l| st::LockRequest {
                name: l.name.clone(),
                mode: l.mode.as_str().to_string(),
            })
            .collect(),
        constraint_labels: spec.constraints.labels.clone(),
        constraint_gpu_models: spec.constraints.gpu_models.clone(),
        priority: spec.priority,
        retry_max_attempts: spec.retry.max_attempts,
        retry_backoff_ms: spec.retry.backoff_ms,
        timeout_ms: spec.timeout_ms,
        after: spec.after.clone(),
        shell: spec.shell,
        queue: spec.queue.clone(),
        snapshots: spec
            .snapshots
            .iter()
            .map(|s| st::SnapshotSpec {
                from: s.from.clone(),
                as_name: s.as_name.clone(),
            })
            .collect(),
        gpu_memory_policy: spec.gpu_memory_policy.as_str().to_string(),
        gpu_memory_margin: spec.gpu_memory_margin,
        preemptible: spec.preemptible,
        preemption_grace_ms: spec.preemption_grace_ms,
        gang: spec.gang.as_ref().map(|g| st::GangSpec {
            nodes: g.nodes,
            same_label: g.same_label.clone(),
        }),
    }
}

pub(super) fn spec_from_storage(spec: st::JobSpec) -> Result<JobSpec, CodecError> {
    let r = spec.resources.ok_or(CodecError::Missing("job resources"))?;
    Ok(JobSpec {
        name: spec.name,
        kind: named("job kind", spec.kind, JobKind::parse)?,
        command: spec.command,
        env: spec.env,
        resources: Resources {
            gpus: r.gpus,
            gpu_memory: r.gpu_memory,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            disk: r.disk,
        },
        exclusive_gpu: spec.exclusive_gpu,
        batch: spec.batch.map(|b| BatchPolicy {
            tiers: b
                .tiers
                .into_iter()
                .map(|t| BatchTier {
                    min_free: t.min_free,
                    size: t.size,
                })
                .collect(),
            model: b.model.map(|m| MemoryModel {
                base: m.base,
                per_sample: m.per_sample,
                min: m.min,
                max: m.max,
                multiple_of: m.multiple_of,
            }),
            prefer_largest: b.prefer_largest,
        }),
        locks: spec
            .locks
            .into_iter()
            .map(|l| {
                Ok(LockRequest {
                    mode: named("lock mode", l.mode, LockMode::parse)?,
                    name: l.name,
                })
            })
            .collect::<Result<_, CodecError>>()?,
        constraints: Constraints {
            labels: spec.constraint_labels,
            gpu_models: spec.constraint_gpu_models,
        },
        priority: spec.priority,
        retry: RetryPolicy {
            max_attempts: spec.retry_max_attempts,
            backoff_ms: spec.retry_backoff_ms,
        },
        timeout_ms: spec.timeout_ms,
        after: spec.after,
        shell: spec.shell,
        queue: spec.queue,
        snapshots: spec
            .snapshots
            .into_iter()
            .map(|s| SnapshotSpec {
                from: s.from,
                as_name: s.as_name,
            })
            .collect(),
        gpu_memory_policy: named(
            "GPU memory policy",
            spec.gpu_memory_policy,
            OverusePolicy::parse,
        )?,
        gpu_memory_margin: spec.gpu_memory_margin,
        preemptible: spec.preemptible,
        preemption_grace_ms: spec.preemption_grace_ms,
        gang: spec.gang.map(|g| GangSpec {
            nodes: g.nodes,
            same_label: g.same_label,
        }),
    })
}

/// A domain enum from its stored name; an unknown name is an error.
pub(super) fn named<T>(
    field: &'static str,
    value: String,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, CodecError> {
    parse(&value).ok_or(CodecError::Unknown { field, value })
}

#[cfg(test)]
pub(super) mod tests;
