//! The agent stream's messages: wire <-> the decision layer's domain values
//! ([`crate::decide`], [`crate::health::Heartbeat`]).

use gantry_proto as pb;

use super::{MAX_GPUS, invalid, labels, spec_to_proto};
use crate::command::Command;
use crate::decide::{Registration, RunningAttempt, ToAgent};
use crate::domain::GpuRecord;
use crate::error::CoordinatorError;
use crate::health::{GpuTelemetry, Heartbeat};
use crate::limits;

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
        faults: hb
            .gpus
            .iter()
            .filter(|gpu| !gpu.fault.is_empty())
            .map(|gpu| {
                let fault = gpu
                    .fault
                    .chars()
                    .take(limits::MAX_GPU_FAULT_CHARS)
                    .collect();
                (gpu.index, fault)
            })
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
        ToAgent::EndRecorded { job, attempt } => Msg::EndRecorded(pb::EndRecorded {
            job_id: *job,
            attempt: *attempt,
        }),
    }
}

/// The command an agent's job event proposes (`None`: an empty event).
/// Validated here: negative figures read as 0; an exit during the agent's
/// own shutdown (not a cancel), or a spawn that failed because the node's
/// job-output volume is full, is a lost attempt, not the job's failure; a
/// failure whose stderr shows one of `oom_signatures` is out of memory.
pub fn job_event(
    node: &str,
    event: pb::JobEvent,
    now: u64,
    oom_signatures: &[String],
) -> Option<Command> {
    let at_ms = if event.at_ms > 0 { event.at_ms } else { now };
    let (job, attempt) = (event.job_id, event.attempt);
    let command = match event.event {
        Some(pb::job_event::Event::Started(_)) => Command::JobStarted {
            at_ms,
            job,
            attempt,
            node: node.to_string(),
        },
        Some(pb::job_event::Event::Exited(exit)) if exit.agent_shutdown && !exit.cancelled => {
            Command::AttemptLost {
                at_ms,
                job,
                attempt,
                reason: if exit.fenced {
                    format!(
                        "the agent on {node} stopped it: the leader had not confirmed its heartbeats for too long (self-fencing)"
                    )
                } else {
                    format!("the agent on {node} shut down")
                },
            }
        }
        Some(pb::job_event::Event::Exited(exit)) => {
            let tail = String::from_utf8_lossy(&exit.stderr_tail);
            let failed = !(exit.code == Some(0) && exit.signal.is_none());
            let oom = failed && oom_signatures.iter().any(|sig| tail.contains(sig.as_str()));
            let error = if exit.over_memory {
                crate::breaker::OVER_MEMORY_ERROR.to_string()
            } else {
                last_lines(&tail, 512)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string()
            };
            Command::JobExited {
                at_ms,
                job,
                attempt,
                node: node.to_string(),
                code: exit.code,
                signal: exit.signal,
                error,
                cancelled: exit.cancelled,
                oom,
                output_tail: last_lines(&tail, OUTPUT_TAIL_BYTES),
                peak_gpu_memory: exit.peak_gpu_memory_bytes.max(0) as u64,
            }
        }
        // The node's full volume, not the job's fault: placed again
        // without using one of its attempts.
        Some(pb::job_event::Event::SpawnFailed(failed)) if failed.volume_full => {
            Command::AttemptLost {
                at_ms,
                job,
                attempt,
                reason: format!(
                    "the job-output volume of {node} is full: {}",
                    last_lines(&failed.error, 512)
                ),
            }
        }
        Some(pb::job_event::Event::SpawnFailed(failed)) => Command::JobExited {
            at_ms,
            job,
            attempt,
            node: node.to_string(),
            code: None,
            signal: None,
            error: format!("spawn failed: {}", failed.error),
            cancelled: false,
            oom: false,
            output_tail: String::new(),
            peak_gpu_memory: 0,
        },
        None => return None,
    };
    Some(command)
}

/// How much of a failed attempt's stderr is kept (and shown by `dlq show`).
const OUTPUT_TAIL_BYTES: usize = 64 << 10;

/// The last `max` bytes of `text`, cut at a line start where possible.
fn last_lines(text: &str, max: usize) -> String {
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    match tail.find('\n') {
        Some(i) => tail[i + 1..].to_string(),
        None => tail.to_string(),
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

    fn exit(code: Option<i32>, stderr: &str, shutdown: bool) -> pb::JobEvent {
        pb::JobEvent {
            job_id: 3,
            attempt: 1,
            at_ms: 0,
            event: Some(pb::job_event::Event::Exited(pb::Exited {
                code,
                stderr_tail: stderr.as_bytes().to_vec(),
                agent_shutdown: shutdown,
                ..Default::default()
            })),
        }
    }

    /// A line per event: what it proposes.
    fn summary(command: Option<Command>) -> String {
        match command {
            None => "nothing".into(),
            Some(Command::JobStarted { at_ms, .. }) => format!("started at {at_ms}"),
            Some(Command::AttemptLost { reason, .. }) => format!("lost: {reason}"),
            Some(Command::JobExited {
                code, error, oom, ..
            }) => format!("exited {code:?} oom {oom}: {error}"),
            Some(other) => format!("{other:?}"),
        }
    }

    #[test]
    fn job_events_become_commands() {
        let started = pb::JobEvent {
            job_id: 3,
            attempt: 1,
            at_ms: 0,
            event: Some(pb::job_event::Event::Started(Default::default())),
        };
        let spawn_failed = pb::JobEvent {
            event: Some(pb::job_event::Event::SpawnFailed(pb::SpawnFailed {
                error: "no such file".into(),
                volume_full: false,
            })),
            ..Default::default()
        };
        let volume_full = pb::JobEvent {
            event: Some(pb::job_event::Event::SpawnFailed(pb::SpawnFailed {
                error: "cannot write x: No space left on device (os error 28)".into(),
                volume_full: true,
            })),
            ..Default::default()
        };
        let cases: Vec<(pb::JobEvent, &str)> = vec![
            (started, "started at 77"),
            (exit(None, "", true), "lost: the agent on n1 shut down"),
            (exit(Some(0), "", false), "exited Some(0) oom false: "),
            (
                exit(Some(1), "step 3\nCUDA out of memory\n", false),
                "exited Some(1) oom true: CUDA out of memory",
            ),
            (
                exit(Some(0), "CUDA out of memory", false),
                "exited Some(0) oom false: CUDA out of memory",
            ),
            (
                spawn_failed,
                "exited None oom false: spawn failed: no such file",
            ),
            (
                volume_full,
                "lost: the job-output volume of n1 is full: cannot write x: No space left on device (os error 28)",
            ),
            (pb::JobEvent::default(), "nothing"),
        ];
        let signatures = ["CUDA out of memory".to_string()];
        for (event, want) in cases {
            let got = summary(job_event("n1", event.clone(), 77, &signatures));
            assert_eq!(got, want, "{event:?}");
        }
    }
}
