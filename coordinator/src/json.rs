//! JSON views of the API's objects, shared by `gantry -o json` and the
//! HTTP API so a script sees the same fields from either.

use gantry_proto as pb;
use serde_json::{Value, json};

/// A job as JSON.
pub fn job_json(job: &pb::Job) -> Value {
    let mut value = job_fields(job);
    if let Value::Object(map) = &mut value {
        map.extend(gang_fields(job));
    }
    value
}

/// A job's gang fields: `nodes`, `gang` (id, rank, same label) and
/// `gang_members` (filled for one job's view).
fn gang_fields(job: &pb::Job) -> serde_json::Map<String, Value> {
    let spec = job.spec.clone().unwrap_or_default();
    let mut map = serde_json::Map::new();
    map.insert("nodes".into(), json!(spec.nodes.max(1)));
    let same_label = (!spec.gang_spread).then(|| {
        if spec.gang_same_label.is_empty() {
            "provider".to_string()
        } else {
            spec.gang_same_label.clone()
        }
    });
    map.insert(
        "gang".into(),
        match job.gang {
            0 => Value::Null,
            id => json!({"id": id, "rank": job.gang_rank, "same_label": same_label}),
        },
    );
    let members: Vec<Value> = job
        .gang_members
        .iter()
        .map(|m| {
            json!({
                "rank": m.rank,
                "job_id": m.job_id,
                "state": m.state,
                "node": m.node,
                "attempt": m.attempt,
            })
        })
        .collect();
    map.insert("gang_members".into(), Value::Array(members));
    map
}

fn job_fields(job: &pb::Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let r = spec.resources.unwrap_or_default();
    json!({
        "id": job.id,
        "name": spec.name,
        "kind": spec.kind,
        "state": job.state,
        "reason": job.reason,
        "command": spec.command,
        "shell": spec.shell,
        "env": spec.env,
        "priority": spec.priority,
        "queue": spec.queue,
        "after": spec.after,
        "resources": {
            "gpus": r.gpus,
            "gpu_memory_bytes": r.gpu_memory_bytes,
            "cpu_millis": r.cpu_millis,
            "memory_bytes": r.memory_bytes,
            "disk_bytes": r.disk_bytes,
        },
        "submitted_at_ms": job.submitted_at_ms,
        "updated_at_ms": job.updated_at_ms,
        "cancel_requested": job.cancel_requested,
        "pipeline": job.pipeline,
        "run": job.run,
        "depends_on": job.depends_on,
        "batch_cap": job.batch_cap,
        "owner": job.owner,
        "archived": job.archived,
        "preemptible": spec.preemptible,
        "preemption_grace_ms": spec.preemption_grace_ms,
        "preemptions": job.preemptions,
        "attempts": job.attempts.iter().map(|a| json!({
            "attempt": a.attempt,
            "node": a.node,
            "gpus": a.gpus,
            "gpu_memory_bytes": a.gpu_memory_bytes,
            "batch_size": a.batch_size,
            "assigned_at_ms": a.assigned_at_ms,
            "started_at_ms": a.started_at_ms,
            "ended_at_ms": a.ended_at_ms,
            "exit_code": a.exit_code,
            "signal": a.signal,
            "error": a.error,
            "outcome": a.outcome,
            "oom": a.oom,
            "peak_gpu_memory_bytes": a.peak_gpu_memory_bytes,
            "output_tail": a.output_tail,
        })).collect::<Vec<_>>(),
    })
}

/// A node as JSON.
pub fn node_json(node: &pb::Node) -> Value {
    json!({
        "name": node.name,
        "address": node.address,
        "state": node.state,
        "draining": node.draining,
        "drain_deadline_ms": (node.drain_deadline_ms > 0).then_some(node.drain_deadline_ms),
        "quarantine": (node.quarantined_until_ms > 0).then(|| json!({
            "until_ms": node.quarantined_until_ms,
            "failures": node.quarantine_failures,
            "reason": node.quarantine_reason,
        })),
        "connected": node.connected,
        "labels": node.labels,
        "cpu_millis": node.cpu_millis,
        "memory_total_bytes": node.memory_total_bytes,
        "memory_used_bytes": node.memory_used_bytes,
        "disk_total_bytes": node.disk_total_bytes,
        "disk_used_bytes": node.disk_used_bytes,
        "disk_pressure": node.disk_pressure,
        "last_seen_ms": node.last_seen_ms,
        "rtt_ms": node.rtt_ms,
        "running_jobs": node.running_jobs,
        "gpus": node.gpus.iter().map(|g| json!({
            "index": g.index,
            "model": g.model,
            "total_bytes": g.total_bytes,
            "used_bytes": g.used_bytes,
            "reserved_bytes": g.reserved_bytes,
            "free_bytes": g.free_bytes,
            "utilization_pct": g.utilization_pct,
            "temperature_c": g.temperature_c,
            "healthy": g.fault.is_empty(),
            "fault": (!g.fault.is_empty()).then_some(g.fault.as_str()),
        })).collect::<Vec<_>>(),
    })
}

/// An event as JSON.
pub fn event_json(e: &pb::Event) -> Value {
    json!({
        "index": e.index,
        "at_ms": e.at_ms,
        "job_id": e.job_id,
        "job_name": e.job_name,
        "kind": e.kind,
        "state": e.state,
        "node": e.node,
        "attempt": e.attempt,
        "message": e.message,
        "pipeline": e.pipeline,
    })
}

/// Cluster status as JSON.
pub fn status_json(s: &pb::ClusterStatus) -> Value {
    json!({
        "coordinator_id": s.coordinator_id,
        "is_leader": s.is_leader,
        "leader_url": s.leader_url,
        "leader_id": s.leader_id,
        "raft_term": s.raft_term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "nodes_total": s.nodes_total,
        "nodes_ready": s.nodes_ready,
        "gpus_total": s.gpus_total,
        "gpu_memory_total_bytes": s.gpu_memory_total_bytes,
        "gpu_memory_reserved_bytes": s.gpu_memory_reserved_bytes,
        "jobs_by_state": s.jobs_by_state,
        "last_event_index": s.last_event_index,
        "version": s.version,
    })
}

/// A pipeline run with its loop and latest runs as JSON (`gantry pipeline
/// -o json`, `GET /v1/pipelines/{name}`).
pub fn pipeline_json(view: &pb::PipelineView) -> Value {
    json!({
        "name": view.name,
        "run": view.run,
        "jobs": view.jobs.iter().map(job_json).collect::<Vec<_>>(),
        "loop_status": view.loop_status,
        "repeat": view.repeat.as_ref().map(|r| if r.forever {
            json!("forever")
        } else {
            json!({ "max_runs": r.max_runs })
        }),
        "runs": view.runs.iter().map(|r| json!({
            "run": r.run,
            "state": r.state,
            "stages": r.stages,
            "succeeded": r.succeeded,
            "submitted_at_ms": r.submitted_at_ms,
            "ended_at_ms": r.ended_at_ms,
        })).collect::<Vec<_>>(),
    })
}
