//! The binary encoding of hard state's records: jobs, nodes, events and
//! submission keys as prost messages of `proto/storage.proto`, converted
//! to and from the domain's types here and nowhere else (the storage edge;
//! commands are in [`super::codec`]).
//!
//! A record written by the JSON versions starts with `{` (a job id list
//! with `[`); a prost one never does (its first byte is the tag of a field
//! of number 1..=15 with a varint or length-delimited wire type, or of a
//! field past 15, whose first tag byte has the high bit set), so every
//! `decode_*` here still reads a data directory the JSON version left.
//!
//! Adding a field to a record: the next free number in its message (the
//! `records` range 110-119 while several branches change the .proto at
//! once), one line in each conversion, a case in the round-trip tests.

use gantry_proto::storage as st;
use gantry_scheduler::{JobId, JobKind};
use prost::Message;

use super::codec::{
    CodecError, gpu_from_storage, gpu_to_storage, named, run_policy_from_storage,
    run_policy_to_storage, spec_from_storage, spec_to_storage,
};
use crate::domain::{
    AttemptOutcome, AttemptRecord, EventRecord, GangMember, GpuFault, JobRecord, JobState,
    NodeRecord, PreemptedBy, PreemptionHold, Quarantine,
};
use crate::state::{Estimate, RetentionPolicy};

/// Whether a stored value is JSON from before the binary records.
fn is_json(data: &[u8]) -> bool {
    matches!(data.first(), Some(b'{') | Some(b'['))
}

/// A job as stored.
pub fn encode_job(job: &JobRecord) -> Vec<u8> {
    job_to_storage(job).encode_to_vec()
}

/// A stored value, binary (the message `M`, converted by `from`) or, from
/// the JSON versions, JSON.
fn decode_stored<M: Message + Default, T: serde::de::DeserializeOwned>(
    data: &[u8],
    from: fn(M) -> Result<T, CodecError>,
) -> Result<T, CodecError> {
    if is_json(data) {
        return Ok(serde_json::from_slice(data)?);
    }
    from(M::decode(data)?)
}

/// A stored job, binary or (from the JSON versions) JSON.
pub fn decode_job(data: &[u8]) -> Result<JobRecord, CodecError> {
    decode_stored(data, job_from_storage)
}

/// A node as stored.
pub fn encode_node(node: &NodeRecord) -> Vec<u8> {
    node_to_storage(node).encode_to_vec()
}

/// A stored node, binary or JSON.
pub fn decode_node(data: &[u8]) -> Result<NodeRecord, CodecError> {
    decode_stored(data, node_from_storage)
}

/// An event as stored.
pub fn encode_event(event: &EventRecord) -> Vec<u8> {
    event_to_storage(event).encode_to_vec()
}

/// A stored event, binary or JSON.
pub fn decode_event(data: &[u8]) -> Result<EventRecord, CodecError> {
    decode_stored(data, event_from_storage)
}

/// A submission key's job ids as stored.
pub fn encode_job_ids(ids: &[JobId]) -> Vec<u8> {
    st::JobIds { ids: ids.to_vec() }.encode_to_vec()
}

/// Stored job ids, binary or JSON (an empty list is empty bytes).
pub fn decode_job_ids(data: &[u8]) -> Result<Vec<JobId>, CodecError> {
    decode_stored(data, |ids: st::JobIds| Ok(ids.ids))
}

/// A learned estimate as stored: its bytes, then its last use (16 bytes,
/// big-endian).
pub fn encode_estimate(estimate: &Estimate) -> Vec<u8> {
    let mut value = estimate.bytes.to_be_bytes().to_vec();
    value.extend_from_slice(&estimate.used_ms.to_be_bytes());
    value
}

/// A stored estimate: 16 bytes, or the 8 (bytes only, no last use) of the
/// versions before learned classes were bounded.
pub fn decode_estimate(data: &[u8]) -> Result<Estimate, CodecError> {
    let word = |at: usize| {
        data.get(at..at + 8)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
    };
    match (data.len(), word(0), word(8)) {
        (8, Some(bytes), _) => Ok(Estimate { bytes, used_ms: 0 }),
        (16, Some(bytes), Some(used_ms)) => Ok(Estimate { bytes, used_ms }),
        (len, _, _) => Err(CodecError::Size {
            what: "learned estimate",
            len,
        }),
    }
}

/// A learned estimate as its storage message (snapshots, the journal).
pub fn estimate_to_storage(class: &str, estimate: &Estimate) -> st::Estimate {
    st::Estimate {
        class: class.to_string(),
        bytes: estimate.bytes,
        used_ms: estimate.used_ms,
    }
}

/// [`estimate_to_storage`] back: the class and its estimate.
pub fn estimate_from_storage(estimate: st::Estimate) -> (String, Estimate) {
    (
        estimate.class,
        Estimate {
            bytes: estimate.bytes,
            used_ms: estimate.used_ms,
        },
    )
}

/// The retention policy as stored (meta) and in snapshots.
pub fn retention_to_storage(policy: &RetentionPolicy) -> st::RetentionPolicy {
    st::RetentionPolicy {
        job_retention_ms: policy.job_retention_ms,
        max_retained_jobs: policy.max_retained_jobs,
        history_retention_ms: policy.history_retention_ms,
        history_max_bytes: policy.history_max_bytes,
    }
}

/// [`retention_to_storage`] back.
pub fn retention_from_storage(policy: st::RetentionPolicy) -> RetentionPolicy {
    RetentionPolicy {
        job_retention_ms: policy.job_retention_ms,
        max_retained_jobs: policy.max_retained_jobs,
        history_retention_ms: policy.history_retention_ms,
        history_max_bytes: policy.history_max_bytes,
    }
}

/// A job as its storage message.
pub fn job_to_storage(job: &JobRecord) -> st::JobRecord {
    st::JobRecord {
        id: job.id,
        spec: Some(spec_to_storage(&job.spec)),
        state: job.state.as_str().to_string(),
        submitted_at_ms: job.submitted_at_ms,
        updated_at_ms: job.updated_at_ms,
        attempts: job.attempts.iter().map(attempt_to_storage).collect(),
        cancel_requested: job.cancel_requested,
        depends_on: job.depends_on.clone(),
        not_before_ms: job.not_before_ms,
        terminal_reason: job.terminal_reason.clone(),
        retry_base: job.retry_base,
        batch_cap: job.batch_cap,
        blocked_by: job.blocked_by,
        pipeline: job.pipeline.clone(),
        run: job.run,
        owner: job.owner.clone(),
        submit_event: job.submit_event,
        preempted_by: job
            .preempted_by
            .iter()
            .map(|p| st::PreemptedBy {
                job: p.job,
                at_ms: p.at_ms,
            })
            .collect(),
        preempting: job.preempting.as_ref().map(|h| st::PreemptionHold {
            node: h.node.clone(),
            victims: h.victims.clone(),
            at_ms: h.at_ms,
            until_ms: h.until_ms,
        }),
        gang: job.gang.as_ref().map(|g| st::GangMember {
            first: g.first,
            rank: g.rank,
            size: g.size,
            port: u32::from(g.port),
        }),
        run_policy: (!job.run_policy.is_default()).then(|| run_policy_to_storage(&job.run_policy)),
    }
}

/// A job from its storage message.
pub fn job_from_storage(job: st::JobRecord) -> Result<JobRecord, CodecError> {
    Ok(JobRecord {
        id: job.id,
        spec: spec_from_storage(job.spec.ok_or(CodecError::Missing("job spec"))?)?,
        state: named("job state", job.state, JobState::parse)?,
        submitted_at_ms: job.submitted_at_ms,
        updated_at_ms: job.updated_at_ms,
        attempts: job
            .attempts
            .into_iter()
            .map(attempt_from_storage)
            .collect::<Result<_, _>>()?,
        cancel_requested: job.cancel_requested,
        depends_on: job.depends_on,
        not_before_ms: job.not_before_ms,
        terminal_reason: job.terminal_reason,
        retry_base: job.retry_base,
        batch_cap: job.batch_cap,
        blocked_by: job.blocked_by,
        pipeline: job.pipeline,
        run: job.run,
        owner: job.owner,
        submit_event: job.submit_event,
        preempted_by: job
            .preempted_by
            .into_iter()
            .map(|p| PreemptedBy {
                job: p.job,
                at_ms: p.at_ms,
            })
            .collect(),
        preempting: job.preempting.map(|h| PreemptionHold {
            node: h.node,
            victims: h.victims,
            at_ms: h.at_ms,
            until_ms: h.until_ms,
        }),
        gang: job
            .gang
            .map(|g| {
                Ok::<_, CodecError>(GangMember {
                    first: g.first,
                    rank: g.rank,
                    size: g.size,
                    port: u16::try_from(g.port).map_err(|_| CodecError::Unknown {
                        field: "gang port",
                        value: g.port.to_string(),
                    })?,
                })
            })
            .transpose()?,
        run_policy: job
            .run_policy
            .map(run_policy_from_storage)
            .transpose()?
            .unwrap_or_default(),
    })
}

fn attempt_to_storage(a: &AttemptRecord) -> st::AttemptRecord {
    st::AttemptRecord {
        attempt: a.attempt,
        node: a.node.clone(),
        gpus: a.gpus.clone(),
        gpu_memory: a.gpu_memory,
        batch_size: a.batch_size,
        exclusive_gpu: a.exclusive_gpu,
        assigned_at_ms: a.assigned_at_ms,
        started_at_ms: a.started_at_ms,
        ended_at_ms: a.ended_at_ms,
        exit_code: a.exit_code,
        signal: a.signal,
        error: a.error.clone(),
        outcome: a.outcome.map(|o| outcome_name(o).to_string()),
        output_tail: a.output_tail.clone(),
        oom: a.oom,
        forgiven: a.forgiven,
        peak_gpu_memory: a.peak_gpu_memory,
        preempted: a.preempted.clone(),
    }
}

fn attempt_from_storage(a: st::AttemptRecord) -> Result<AttemptRecord, CodecError> {
    Ok(AttemptRecord {
        attempt: a.attempt,
        node: a.node,
        gpus: a.gpus,
        gpu_memory: a.gpu_memory,
        batch_size: a.batch_size,
        exclusive_gpu: a.exclusive_gpu,
        assigned_at_ms: a.assigned_at_ms,
        started_at_ms: a.started_at_ms,
        ended_at_ms: a.ended_at_ms,
        exit_code: a.exit_code,
        signal: a.signal,
        error: a.error,
        outcome: a
            .outcome
            .map(|name| named("attempt outcome", name, outcome_parse))
            .transpose()?,
        output_tail: a.output_tail,
        oom: a.oom,
        forgiven: a.forgiven,
        peak_gpu_memory: a.peak_gpu_memory,
        preempted: a.preempted,
    })
}

/// Every outcome, for [`outcome_parse`] and the tests.
const OUTCOMES: [AttemptOutcome; 6] = [
    AttemptOutcome::Succeeded,
    AttemptOutcome::Failed,
    AttemptOutcome::Lost,
    AttemptOutcome::Cancelled,
    AttemptOutcome::Withdrawn,
    AttemptOutcome::Preempted,
];

/// The lowercase name of an outcome (as its JSON).
fn outcome_name(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Succeeded => "succeeded",
        AttemptOutcome::Failed => "failed",
        AttemptOutcome::Lost => "lost",
        AttemptOutcome::Cancelled => "cancelled",
        AttemptOutcome::Withdrawn => "withdrawn",
        AttemptOutcome::Preempted => "preempted",
    }
}

fn outcome_parse(name: &str) -> Option<AttemptOutcome> {
    OUTCOMES.into_iter().find(|o| outcome_name(*o) == name)
}

/// A node as its storage message.
pub fn node_to_storage(node: &NodeRecord) -> st::NodeRecord {
    st::NodeRecord {
        name: node.name.clone(),
        address: node.address.clone(),
        labels: node.labels.clone(),
        gpus: node.gpus.iter().map(gpu_to_storage).collect(),
        cpu_millis: node.cpu_millis,
        memory_total: node.memory_total,
        disk_total: node.disk_total,
        draining: node.draining,
        drain_deadline_ms: node.drain_deadline_ms,
        registered_at_ms: node.registered_at_ms,
        down: node.down,
        quarantine: node.quarantine.as_ref().map(|q| st::QuarantineRecord {
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            failures: q.failures,
            reason: q.reason.clone(),
            trips: q.trips,
        }),
        gpu_faults: node
            .gpu_faults
            .iter()
            .map(|(gpu, f)| {
                (
                    *gpu,
                    st::GpuFault {
                        reason: f.reason.clone(),
                        since_ms: f.since_ms,
                        cleared_at_ms: f.cleared_at_ms,
                    },
                )
            })
            .collect(),
    }
}

/// A node from its storage message.
pub fn node_from_storage(node: st::NodeRecord) -> Result<NodeRecord, CodecError> {
    Ok(NodeRecord {
        name: node.name,
        address: node.address,
        labels: node.labels,
        gpus: node.gpus.into_iter().map(gpu_from_storage).collect(),
        cpu_millis: node.cpu_millis,
        memory_total: node.memory_total,
        disk_total: node.disk_total,
        draining: node.draining,
        drain_deadline_ms: node.drain_deadline_ms,
        registered_at_ms: node.registered_at_ms,
        down: node.down,
        quarantine: node.quarantine.map(|q| Quarantine {
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            failures: q.failures,
            reason: q.reason,
            trips: q.trips,
        }),
        gpu_faults: node
            .gpu_faults
            .into_iter()
            .map(|(gpu, f)| {
                (
                    gpu,
                    GpuFault {
                        reason: f.reason,
                        since_ms: f.since_ms,
                        cleared_at_ms: f.cleared_at_ms,
                    },
                )
            })
            .collect(),
    })
}

/// An event as its storage message.
pub fn event_to_storage(event: &EventRecord) -> st::EventRecord {
    st::EventRecord {
        index: event.index,
        at_ms: event.at_ms,
        job_id: event.job_id,
        job_name: event.job_name.clone(),
        kind: event.kind.as_str().to_string(),
        state: event.state.as_str().to_string(),
        node: event.node.clone(),
        attempt: event.attempt,
        message: event.message.clone(),
        pipeline: event.pipeline.clone(),
    }
}

/// An event from its storage message.
pub fn event_from_storage(event: st::EventRecord) -> Result<EventRecord, CodecError> {
    Ok(EventRecord {
        index: event.index,
        at_ms: event.at_ms,
        job_id: event.job_id,
        job_name: event.job_name,
        kind: named("job kind", event.kind, JobKind::parse)?,
        state: named("job state", event.state, JobState::parse)?,
        node: event.node,
        attempt: event.attempt,
        message: event.message,
        pipeline: event.pipeline,
    })
}

#[cfg(test)]
mod tests;
