//! GPU health reports: what the leader commits when a heartbeat says a GPU
//! is unhealthy, or healthy again. The fault is hard state
//! (`NodeRecord::gpu_faults`, applied in `state/gpu_health.rs`) so it
//! survives a failover; the agent's report is only evidence.
//!
//! A heartbeat from a replaced agent session never gets here (the core
//! drops a stale session's messages); a report taken before an operator's
//! clear but applied after it is ignored in apply (its `at_ms` is older).

use crate::command::Command;
use crate::health::Heartbeat;
use crate::state::StateMachine;

/// The commands a heartbeat of `node` calls for at `now`: a GPU reported
/// unhealthy that hard state has as healthy is marked (unless an operator
/// cleared this very fault: acknowledged); a GPU reported healthy whose
/// acknowledged fault is still recorded forgets it. A GPU unhealthy in hard
/// state stays so, whatever the agent says, until an operator clears it;
/// GPUs hard state does not know are ignored.
pub fn heartbeat(state: &StateMachine, node: &str, beat: &Heartbeat, now: u64) -> Vec<Command> {
    let Some(record) = state.node(node) else {
        return Vec::new();
    };
    let mut propose = Vec::new();
    for gpu in &record.gpus {
        let known = record.gpu_faults.get(&gpu.index);
        let reported = beat.faults.iter().find(|(index, _)| *index == gpu.index);
        match (reported, known) {
            (Some((_, reason)), known) => {
                let marked = known.is_some_and(|k| k.is_active() || k.reason == *reason);
                if !marked {
                    propose.push(Command::SetGpuHealth {
                        at_ms: now,
                        node: node.to_string(),
                        gpu: Some(gpu.index),
                        fault: Some(reason.clone()),
                        seen_healthy: false,
                    });
                }
            }
            (None, Some(known))
                if !known.is_active() && beat.gpus.iter().any(|(i, _)| *i == gpu.index) =>
            {
                propose.push(Command::SetGpuHealth {
                    at_ms: now,
                    node: node.to_string(),
                    gpu: Some(gpu.index),
                    fault: None,
                    seen_healthy: true,
                });
            }
            (None, _) => {}
        }
    }
    propose
}

/// An operator's clear of `node`'s GPU faults (`gpu` `None`: every GPU).
pub fn clear(node: &str, gpu: Option<u32>, now: u64) -> Command {
    Command::SetGpuHealth {
        at_ms: now,
        node: node.to_string(),
        gpu,
        fault: None,
        seen_healthy: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::GpuTelemetry;

    fn beat(healthy: &[u32], faults: &[(u32, &str)]) -> Heartbeat {
        Heartbeat {
            gpus: healthy
                .iter()
                .chain(faults.iter().map(|(i, _)| i))
                .map(|&i| (i, GpuTelemetry::default()))
                .collect(),
            faults: faults.iter().map(|&(i, f)| (i, f.to_string())).collect(),
            ..Default::default()
        }
    }

    fn set(at_ms: u64, gpu: Option<u32>, fault: Option<&str>, seen_healthy: bool) -> Command {
        Command::SetGpuHealth {
            at_ms,
            node: "n1".into(),
            gpu,
            fault: fault.map(str::to_string),
            seen_healthy,
        }
    }

    /// (hard-state history of GPU health commands, the heartbeat, what the
    /// leader proposes at 1000)
    #[test]
    fn heartbeats_as_a_table() {
        let cases: Vec<(&str, Vec<Command>, Heartbeat, Vec<Command>)> = vec![
            ("all healthy", vec![], beat(&[0, 1], &[]), vec![]),
            (
                "a new fault is committed",
                vec![],
                beat(&[0], &[(1, "xid 79")]),
                vec![set(1000, Some(1), Some("xid 79"), false)],
            ),
            (
                "a fault already committed is not proposed again",
                vec![set(10, Some(1), Some("xid 79"), false)],
                beat(&[0], &[(1, "xid 48")]),
                vec![],
            ),
            (
                "a fault the operator cleared is acknowledged",
                vec![
                    set(10, Some(1), Some("xid 79"), false),
                    set(20, None, None, false),
                ],
                beat(&[0], &[(1, "xid 79")]),
                vec![],
            ),
            (
                "another fault after a clear is committed",
                vec![
                    set(10, Some(1), Some("xid 79"), false),
                    set(20, None, None, false),
                ],
                beat(&[0], &[(1, "2 uncorrected ecc error(s)")]),
                vec![set(
                    1000,
                    Some(1),
                    Some("2 uncorrected ecc error(s)"),
                    false,
                )],
            ),
            (
                "healthy after a clear forgets the acknowledged fault",
                vec![
                    set(10, Some(1), Some("xid 79"), false),
                    set(20, None, None, false),
                ],
                beat(&[0, 1], &[]),
                vec![set(1000, Some(1), None, true)],
            ),
            (
                "healthy while the fault is in force changes nothing",
                vec![set(10, Some(1), Some("xid 79"), false)],
                beat(&[0, 1], &[]),
                vec![],
            ),
            (
                "a GPU hard state does not know is ignored",
                vec![],
                beat(&[0, 1], &[(9, "xid 79")]),
                vec![],
            ),
        ];
        for (name, history, heartbeat, want) in cases {
            let mut state = StateMachine::new();
            state
                .apply(Command::register_for_test("n1", 2, 80 << 30))
                .expect("register");
            for command in history {
                state.apply(command).expect(name);
            }
            assert_eq!(
                super::heartbeat(&state, "n1", &heartbeat, 1000),
                want,
                "{name}"
            );
            assert!(
                super::heartbeat(&state, "unknown", &heartbeat, 1000).is_empty(),
                "{name}: unknown node"
            );
        }
    }
}
