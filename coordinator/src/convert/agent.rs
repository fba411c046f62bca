//! The agent stream's messages: wire <-> the decision layer's domain values
//! ([`crate::decide`], [`crate::health::Heartbeat`]).

use gantry_proto as pb;

use super::{MAX_GPUS, invalid, labels, spec_to_proto};
use crate::decide::{Registration, RunningAttempt, ToAgent};
use crate::domain::GpuRecord;
use crate::error::CoordinatorError;
use crate::health::{GpuTelemetry, Heartbeat};

/// Most attempts one registration may report.
pub const MAX_REPORTED_ATTEMPTS: usize = 100_000;

/// An agent's registration, validated: a node name, at most [`MAX_GPUS`]
/// GPUs and [`MAX_REPORTED_ATTEMPTS`] reported attempts. Negative sizes are
/// read as 0 (an agent that cannot measure a figure reports nothing).
pub fn registration(register: pb::Register) -> Result<Registration, CoordinatorError> {
    if register.node.is_empty() {
        return Err(invalid("register.node".into(), "must not be empty"));
    }
    if register.gpus.len() > MAX_GPUS as usize {
        return Err(invalid(
            "register.gpus".into(),
            format!(
                "{} GPUs exceed the maximum of {MAX_GPUS}",
                register.gpus.len()
            ),
        ));
    }
    if register.running.len() > MAX_REPORTED_ATTEMPTS {
        return Err(invalid(
            "register.running".into(),
            format!(
                "{} attempts exceed the maximum of {MAX_REPORTED_ATTEMPTS}",
                register.running.len()
            ),
        ));
    }
    Ok(Registration {
        node: register.node,
        address: register.address,
        labels: labels(register.labels),
        gpus: register
            .gpus
            .iter()
            .map(|g| GpuRecord {
                index: g.index,
                model: g.model.clone(),
                total: g.total_bytes.max(0) as u64,
            })
            .collect(),
        cpu_millis: register.cpu_millis.max(0) as u64,
        memory_total: register.memory_total_bytes.max(0) as u64,
        disk_total: register.disk_total_bytes.max(0) as u64,
        running: register.running.iter().map(running_attempt).collect(),
    })
}

fn running_attempt(r: &pb::RunningJob) -> RunningAttempt {
    RunningAttempt {
        job: r.job_id,
        attempt: r.attempt,
        started_at_ms: r.started_at_ms,
    }
}

fn running_job(r: &RunningAttempt) -> pb::RunningJob {
    pb::RunningJob {
        job_id: r.job,
        attempt: r.attempt,
        started_at_ms: r.started_at_ms,
    }
}

/// A heartbeat's telemetry (negative figures read as 0).
pub fn heartbeat(hb: &pb::Heartbeat) -> Heartbeat {
    Heartbeat {
        gpus: hb
            .gpus
            .iter()
            .map(|gpu| {
                (
                    gpu.index,
                    GpuTelemetry {
                        used: gpu.used_bytes.max(0) as u64,
                        utilization_pct: gpu.utilization_pct,
                        temperature_c: gpu.temperature_c,
                    },
                )
            })
            .collect(),
        cpu_used_pct: hb.cpu_used_pct,
        memory_used: hb.memory_used_bytes.max(0) as u64,
        disk_used: hb.disk_used_bytes.max(0) as u64,
        disk_total: hb.disk_total_bytes.max(0) as u64,
        jobs: hb
            .jobs
            .iter()
            .map(|j| (j.job_id, j.gpu_memory_bytes.max(0) as u64))
            .collect(),
    }
}

/// A decision's message to an agent, on the wire.
pub fn to_agent(message: &ToAgent) -> pb::coordinator_message::Msg {
    use pb::coordinator_message::Msg;
    match message {
        ToAgent::Registered {
            heartbeat_interval_ms,
            stop,
        } => Msg::Registered(pb::Registered {
            heartbeat_interval_ms: (*heartbeat_interval_ms).min(u64::from(u32::MAX)) as u32,
            stop: stop.iter().map(running_job).collect(),
        }),
        ToAgent::Assign(a) => Msg::Assign(pb::Assignment {
            job_id: a.job,
            attempt: a.attempt,
            spec: Some(spec_to_proto(&a.spec)),
            gpus: a.gpus.clone(),
            gpu_memory_bytes: a.gpu_memory.min(i64::MAX as u64) as i64,
            batch_size: a.batch_size,
        }),
        ToAgent::Cancel {
            job,
            attempt,
            grace_ms,
            reason,
        } => Msg::Cancel(pb::CancelJob {
            job_id: *job,
            attempt: *attempt,
            grace_ms: *grace_ms,
            reason: reason.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_names_the_bad_field() {
        let cases: Vec<(pb::Register, &str)> = vec![
            (pb::Register::default(), "register.node"),
            (
                pb::Register {
                    node: "n1".into(),
                    gpus: vec![pb::GpuStatic::default(); 65],
                    ..Default::default()
                },
                "register.gpus",
            ),
        ];
        for (register, field) in cases {
            match registration(register) {
                Err(CoordinatorError::InvalidArgument { field: got, .. }) => {
                    assert_eq!(got, field)
                }
                other => panic!("{field}: expected an invalid argument, got {other:?}"),
            }
        }
    }

    #[test]
    fn registration_keeps_what_the_agent_runs() {
        let register = pb::Register {
            node: "n1".into(),
            disk_total_bytes: -1,
            running: vec![pb::RunningJob {
                job_id: 7,
                attempt: 2,
                started_at_ms: 1_000,
            }],
            ..Default::default()
        };
        let got = registration(register).expect("valid");
        assert_eq!(got.disk_total, 0);
        assert_eq!(
            got.running,
            vec![RunningAttempt {
                job: 7,
                attempt: 2,
                started_at_ms: 1_000
            }]
        );
    }
}
