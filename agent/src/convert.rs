//! The one place where wire (prost) types meet the agent's own types.

use std::time::Duration;

use gantry_proto as pb;

use crate::executor::{
    GpuMemoryPolicy, JobEvent, JobEventKind, Launch, LogRequest, RunningAttempt,
};
use crate::probe::GpuReport;
use crate::snapshot::SnapshotEntry;

/// Bytes as the wire's `int64`, saturating (no real size comes near 2^63).
pub(crate) fn wire_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl From<pb::Assignment> for Launch {
    fn from(a: pb::Assignment) -> Self {
        let spec = a.spec.unwrap_or_default();
        Launch {
            job_id: a.job_id,
            attempt: a.attempt,
            kind: spec.kind,
            command: spec.command,
            shell: spec.shell,
            env: spec.env.into_iter().collect(),
            gpus: a.gpus,
            gpu_memory_bytes: u64::try_from(a.gpu_memory_bytes).unwrap_or(0),
            batch_size: a.batch_size,
            timeout: spec
                .timeout_ms
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            // Checked again when copied (`snapshot::prepare`): the coordinator
            // validates specs, but the agent does not trust the wire with paths.
            snapshot: spec
                .snapshot
                .into_iter()
                .map(|s| SnapshotEntry {
                    from: s.from,
                    as_name: s.as_name,
                })
                .collect(),
            gpu_memory_policy: gpu_memory_policy(&spec.gpu_memory_policy),
            gpu_memory_margin_bytes: u64::try_from(spec.gpu_memory_margin_bytes).unwrap_or(0),
        }
    }
}

/// `JobSpec.gpu_memory_policy`; an unknown word (a newer coordinator?) falls
/// back to the harmless `warn` rather than refusing the job.
fn gpu_memory_policy(word: &str) -> GpuMemoryPolicy {
    match word {
        "stop" => GpuMemoryPolicy::Stop,
        "" | "warn" => GpuMemoryPolicy::Warn,
        other => {
            tracing::warn!(policy = other, "unknown gpu_memory_policy: using warn");
            GpuMemoryPolicy::Warn
        }
    }
}

impl From<JobEvent> for pb::JobEvent {
    fn from(e: JobEvent) -> Self {
        use pb::job_event::Event;
        let event = match e.kind {
            JobEventKind::Started { pid } => Event::Started(pb::Started { pid }),
            JobEventKind::Exited(report) => Event::Exited(pb::Exited {
                code: report.code,
                signal: report.signal,
                stderr_tail: report.stderr_tail,
                cancelled: report.cancelled,
                agent_shutdown: report.agent_shutdown,
                peak_gpu_memory_bytes: wire_bytes(report.peak_gpu_memory_bytes),
                over_memory: report.over_memory,
                fenced: report.fenced,
            }),
            JobEventKind::SpawnFailed { error } => Event::SpawnFailed(pb::SpawnFailed {
                volume_full: crate::attempt::is_volume_full(&error),
                error,
            }),
        };
        pb::JobEvent {
            job_id: e.job_id,
            attempt: e.attempt,
            event: Some(event),
            at_ms: e.at_ms,
        }
    }
}

impl From<RunningAttempt> for pb::RunningJob {
    fn from(r: RunningAttempt) -> Self {
        pb::RunningJob {
            job_id: r.job_id,
            attempt: r.attempt,
            started_at_ms: r.started_at_ms,
        }
    }
}

impl From<GpuReport> for pb::GpuStatic {
    fn from(g: GpuReport) -> Self {
        pb::GpuStatic {
            index: g.index,
            model: g.model,
            total_bytes: wire_bytes(g.total),
            uuid: g.uuid,
        }
    }
}

impl From<pb::LogRead> for LogRequest {
    fn from(r: pb::LogRead) -> Self {
        LogRequest {
            job_id: r.job_id,
            attempt: r.attempt,
            stream: r.stream,
            offset: r.offset,
            max_bytes: r.max_bytes,
        }
    }
}

/// Wraps a payload in the agent's stream envelope.
pub(crate) fn agent_message(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_becomes_launch() {
        let assignment = pb::Assignment {
            job_id: 3,
            attempt: 2,
            spec: Some(pb::JobSpec {
                command: vec!["train".into(), "{batch_size}".into()],
                env: [("A".to_string(), "1".to_string())].into(),
                timeout_ms: Some(1500),
                shell: true,
                snapshot: vec![pb::Snapshot {
                    from: "/models/m.pt".into(),
                    as_name: "model.pt".into(),
                }],
                gpu_memory_policy: "stop".into(),
                gpu_memory_margin_bytes: 1024,
                ..Default::default()
            }),
            gpus: vec![1],
            gpu_memory_bytes: -5,
            batch_size: 128,
        };
        let launch = Launch::from(assignment);
        assert_eq!(launch.command, vec!["train", "{batch_size}"]);
        assert_eq!(launch.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(launch.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(launch.gpu_memory_bytes, 0, "negative sizes are clamped");
        assert!(launch.shell);
        assert_eq!(launch.snapshot[0].from, "/models/m.pt");
        assert_eq!(launch.snapshot[0].as_name, "model.pt");
        assert_eq!(launch.gpu_memory_policy, GpuMemoryPolicy::Stop);
        assert_eq!(launch.gpu_memory_margin_bytes, 1024);
        let no_timeout = Launch::from(pb::Assignment::default());
        assert_eq!(no_timeout.timeout, None);
        assert!(no_timeout.command.is_empty());
        assert!(no_timeout.snapshot.is_empty());
        assert_eq!(no_timeout.gpu_memory_policy, GpuMemoryPolicy::Warn);
    }

    #[test]
    fn policy_words() {
        for (word, policy) in [
            ("", GpuMemoryPolicy::Warn),
            ("warn", GpuMemoryPolicy::Warn),
            ("stop", GpuMemoryPolicy::Stop),
            ("explode", GpuMemoryPolicy::Warn),
        ] {
            assert_eq!(gpu_memory_policy(word), policy, "{word:?}");
        }
    }

    #[test]
    fn exit_report_carries_peak_and_over_memory() {
        use crate::executor::ExitReport;
        let event = pb::JobEvent::from(JobEvent {
            job_id: 1,
            attempt: 1,
            at_ms: 5,
            kind: JobEventKind::Exited(ExitReport {
                code: None,
                signal: Some(15),
                stderr_tail: Vec::new(),
                cancelled: false,
                agent_shutdown: false,
                peak_gpu_memory_bytes: 3 << 30,
                over_memory: true,
                fenced: false,
            }),
        });
        let Some(pb::job_event::Event::Exited(exit)) = event.event else {
            panic!("{event:?}");
        };
        assert_eq!(exit.peak_gpu_memory_bytes, 3 << 30);
        assert!(exit.over_memory && !exit.cancelled);
    }
}
