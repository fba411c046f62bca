//! Soft state: the leader's view of node health and telemetry, rebuilt from
//! heartbeats and never persisted. Only transitions (a node going Down or
//! coming back) become commands.

use std::collections::{BTreeSet, HashMap};

use gantry_proto as pb;
use gantry_scheduler::{FailureRecord, JobId, NodeState, QuarantinePolicy, next_disk_pressure};

/// Latest telemetry of one GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuTelemetry {
    /// NVML used memory (all processes).
    pub used: u64,
    /// Utilisation, percent.
    pub utilization_pct: u32,
    /// Temperature, Celsius.
    pub temperature_c: u32,
}

/// What the leader knows of a node right now.
#[derive(Debug, Clone, Default)]
pub struct NodeHealth {
    /// Last heartbeat or registration.
    pub last_seen_ms: u64,
    /// Health state.
    pub state: NodeState,
    /// Per-GPU telemetry by index.
    pub gpus: HashMap<u32, GpuTelemetry>,
    /// CPU use, percent.
    pub cpu_used_pct: u32,
    /// RAM in use.
    pub memory_used: u64,
    /// Data volume use.
    pub disk_used: u64,
    /// Data volume size.
    pub disk_total: u64,
    /// Disk-pressure flag with hysteresis.
    pub disk_pressure: bool,
    /// GPU memory each running job uses, as the agent measured it.
    pub job_gpu_memory: HashMap<JobId, u64>,
    /// Attempts the agent said it runs at its last registration.
    pub reported_running: BTreeSet<(JobId, u32)>,
    /// Smoothed round-trip time.
    pub rtt_ms: f64,
    /// Circuit breaker over the node's recent job outcomes.
    pub failures: FailureRecord,
}

/// Thresholds of the health tracker.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Silence after which a node is Suspect.
    pub suspect_after_ms: u64,
    /// Silence after which a node is Down.
    pub down_after_ms: u64,
    /// Disk use fraction that turns pressure on.
    pub disk_high: f64,
    /// Disk use fraction that turns pressure off.
    pub disk_low: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            suspect_after_ms: 3_000,
            down_after_ms: 15_000,
            disk_high: 0.85,
            disk_low: 0.75,
        }
    }
}

/// The leader's health tracker: owns all soft state.
#[derive(Debug, Default)]
pub struct HealthTracker {
    config: HealthConfig,
    nodes: HashMap<String, NodeHealth>,
}

impl HealthTracker {
    /// A tracker with the given thresholds.
    pub fn new(config: HealthConfig) -> HealthTracker {
        HealthTracker {
            config,
            nodes: HashMap::new(),
        }
    }

    /// Health of a node the leader has heard from.
    pub fn get(&self, node: &str) -> Option<&NodeHealth> {
        self.nodes.get(node)
    }

    /// Records a registration.
    pub fn on_register(&mut self, node: &str, register: &pb::Register, now_ms: u64) {
        let health = self.nodes.entry(node.to_string()).or_default();
        health.last_seen_ms = now_ms;
        health.state = NodeState::Ready;
        health.reported_running = register
            .running
            .iter()
            .map(|r| (r.job_id, r.attempt))
            .collect();
        if health.disk_total == 0 {
            health.disk_total = register.disk_total_bytes.max(0) as u64;
        }
    }

    /// Records a heartbeat. Returns true when the node just came back from
    /// Suspect (so a scheduling pass is worth running).
    pub fn on_heartbeat(&mut self, node: &str, hb: &pb::Heartbeat, now_ms: u64) -> bool {
        let config = self.config;
        let health = self.nodes.entry(node.to_string()).or_default();
        let revived = health.state != NodeState::Ready;
        health.last_seen_ms = now_ms;
        health.state = NodeState::Ready;
        for gpu in &hb.gpus {
            health.gpus.insert(
                gpu.index,
                GpuTelemetry {
                    used: gpu.used_bytes.max(0) as u64,
                    utilization_pct: gpu.utilization_pct,
                    temperature_c: gpu.temperature_c,
                },
            );
        }
        health.cpu_used_pct = hb.cpu_used_pct;
        health.memory_used = hb.memory_used_bytes.max(0) as u64;
        health.disk_used = hb.disk_used_bytes.max(0) as u64;
        health.disk_total = hb.disk_total_bytes.max(0) as u64;
        health.disk_pressure = next_disk_pressure(
            health.disk_pressure,
            health.disk_used,
            health.disk_total,
            config.disk_high,
            config.disk_low,
        );
        health.job_gpu_memory = hb
            .jobs
            .iter()
            .map(|j| (j.job_id, j.gpu_memory_bytes.max(0) as u64))
            .collect();
        revived
    }

    /// Advances silence-based states. Returns nodes that just became Down.
    pub fn tick(&mut self, now_ms: u64) -> Vec<String> {
        let mut down = Vec::new();
        for (name, health) in &mut self.nodes {
            let silent = now_ms.saturating_sub(health.last_seen_ms);
            let state = if silent >= self.config.down_after_ms {
                NodeState::Down
            } else if silent >= self.config.suspect_after_ms {
                NodeState::Suspect
            } else {
                NodeState::Ready
            };
            if state == NodeState::Down && health.state != NodeState::Down {
                down.push(name.clone());
            }
            health.state = state;
        }
        down.sort();
        down
    }

    /// Records how a job ended on a node, for the circuit breaker. Returns
    /// true when this failure put the node in quarantine.
    pub fn on_job_outcome(
        &mut self,
        node: &str,
        failed: bool,
        now_ms: u64,
        policy: &QuarantinePolicy,
    ) -> bool {
        let Some(health) = self.nodes.get_mut(node) else {
            return false;
        };
        if failed {
            health.failures.record_failure(now_ms, policy)
        } else {
            health.failures.record_success();
            false
        }
    }

    /// Folds a round-trip sample into the node's moving average.
    pub fn on_rtt_sample(&mut self, node: &str, rtt_ms: f64) {
        if let Some(health) = self.nodes.get_mut(node) {
            // EWMA with alpha 0.2: smooth enough to ignore one slow beat.
            health.rtt_ms = if health.rtt_ms == 0.0 {
                rtt_ms
            } else {
                0.8 * health.rtt_ms + 0.2 * rtt_ms
            };
        }
    }

    /// Marks a node silent (its stream closed) without waiting for the timer
    /// to say so; it stays eligible for nothing until it heartbeats again.
    pub fn on_disconnect(&mut self, node: &str) {
        if let Some(health) = self.nodes.get_mut(node)
            && health.state == NodeState::Ready
        {
            health.state = NodeState::Suspect;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_makes_suspect_then_down_once() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        tracker.on_heartbeat("n1", &pb::Heartbeat::default(), 1_000);
        assert!(tracker.tick(2_000).is_empty());
        assert_eq!(tracker.get("n1").map(|h| h.state), Some(NodeState::Ready));
        assert!(tracker.tick(4_500).is_empty());
        assert_eq!(tracker.get("n1").map(|h| h.state), Some(NodeState::Suspect));
        assert_eq!(tracker.tick(16_000), vec!["n1".to_string()]);
        assert!(tracker.tick(17_000).is_empty(), "down is reported once");
        assert!(tracker.on_heartbeat("n1", &pb::Heartbeat::default(), 18_000));
    }
}
