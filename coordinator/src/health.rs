//! Soft state: the leader's view of node health and telemetry, rebuilt from
//! heartbeats and never persisted. Only transitions (a node going Down or
//! coming back) become commands.

use std::collections::{BTreeSet, HashMap};

use gantry_scheduler::{JobId, NodeState, next_disk_pressure};

/// Latest telemetry of one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuTelemetry {
    /// NVML used memory (all processes).
    pub used: u64,
    /// Utilisation, percent.
    pub utilization_pct: u32,
    /// Temperature, Celsius.
    pub temperature_c: u32,
}

/// One heartbeat's telemetry, converted from the wire in
/// [`crate::convert::agent`] (the tracker sees no prost types).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    /// Per-GPU telemetry by index.
    pub gpus: Vec<(u32, GpuTelemetry)>,
    /// CPU use, percent.
    pub cpu_used_pct: u32,
    /// RAM in use.
    pub memory_used: u64,
    /// Data volume use.
    pub disk_used: u64,
    /// Data volume size.
    pub disk_total: u64,
    /// GPU memory each running job uses, as the agent measured it.
    pub jobs: Vec<(JobId, u64)>,
    /// The GPUs the agent reports unhealthy, with the fault (bounded by
    /// `limits::MAX_GPU_FAULT_CHARS`); [`crate::decide::gpu_health`]
    /// decides what to commit.
    pub faults: Vec<(u32, String)>,
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
}

/// Thresholds of the health tracker.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Silence after which a node is Suspect, at the base 1 s interval; the
    /// floor of the scaled threshold ([`HealthConfig::thresholds`]).
    pub suspect_after_ms: u64,
    /// Silence after which a node is Down, at the base 1 s interval; the
    /// floor of the scaled threshold.
    pub down_after_ms: u64,
    /// Disk use fraction that turns pressure on.
    pub disk_high: f64,
    /// Disk use fraction that turns pressure off.
    pub disk_low: f64,
}

/// Heartbeat intervals of silence after which a node is Suspect.
pub const SUSPECT_INTERVALS: u64 = 3;
/// Heartbeat intervals of silence after which a node is Down (shared with
/// the agent, which fences itself before it).
pub const DOWN_INTERVALS: u64 = gantry_proto::DOWN_INTERVALS;
/// A stretched interval is rounded up to a multiple of this, so a growing
/// fleet changes it (and every agent is told) in steps, not at each node.
pub const INTERVAL_STEP_MS: u64 = 100;

/// The heartbeat interval for a fleet: `max(base, nodes / max_rate)`,
/// rounded up to [`INTERVAL_STEP_MS`]. It only ever stretches past the base
/// with fleet size and never goes below it: a slower beat is the price of a
/// bigger fleet, a faster one is never asked for (a stale GPU-memory view
/// causes OOMs, and the base is what the thresholds were made for).
/// A `max_rate` of 0 is read as 1.
pub fn heartbeat_interval_ms(nodes: u64, max_rate: u64, base_ms: u64) -> u64 {
    let needed = nodes.saturating_mul(1_000).div_ceil(max_rate.max(1));
    let stepped = needed
        .div_ceil(INTERVAL_STEP_MS)
        .saturating_mul(INTERVAL_STEP_MS);
    stepped.max(base_ms)
}

impl HealthConfig {
    /// Suspect and Down thresholds at a heartbeat interval: 3 and 15
    /// intervals of silence, never less than the configured floors (3 s and
    /// 15 s by default). Scaled so that a stretched fleet does not flap: a
    /// node beating every 5 s is not Suspect after 3 s.
    pub fn thresholds(&self, interval_ms: u64) -> (u64, u64) {
        (
            self.suspect_after_ms
                .max(interval_ms.saturating_mul(SUSPECT_INTERVALS)),
            self.down_after_ms
                .max(interval_ms.saturating_mul(DOWN_INTERVALS)),
        )
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            suspect_after_ms: 3_000,
            down_after_ms: gantry_proto::DOWN_AFTER_MIN_MS,
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
    /// Nodes known from hard state that this leader has not heard from
    /// yet, and when their silence clock started (its election).
    unheard: HashMap<String, u64>,
    /// The heartbeat interval agents were told (0 = the base; thresholds are
    /// then the configured floors).
    interval_ms: u64,
    /// After the interval shrank: the previous interval and until when it
    /// still sets the thresholds (agents may not have heard of the shorter
    /// one yet; a node last seen just before the change must not look
    /// silent for three of the new, shorter intervals).
    shrunk_from: Option<(u64, u64)>,
}

impl HealthTracker {
    /// A tracker with the given thresholds.
    pub fn new(config: HealthConfig) -> HealthTracker {
        HealthTracker {
            config,
            nodes: HashMap::new(),
            unheard: HashMap::new(),
            interval_ms: 0,
            shrunk_from: None,
        }
    }

    /// Sets the heartbeat interval the agents are told, which scales the
    /// thresholds. When it shrinks, the old interval keeps setting them
    /// until one old Down threshold has passed.
    pub fn set_interval(&mut self, interval_ms: u64, now_ms: u64) {
        if interval_ms < self.interval_ms {
            let (_, old_down) = self.config.thresholds(self.interval_ms);
            self.shrunk_from = Some((self.interval_ms, now_ms.saturating_add(old_down)));
        }
        self.interval_ms = interval_ms;
    }

    /// Suspect and Down thresholds in force at `now_ms`.
    pub fn thresholds(&self, now_ms: u64) -> (u64, u64) {
        let interval = match self.shrunk_from {
            Some((old, until)) if now_ms < until => old.max(self.interval_ms),
            _ => self.interval_ms,
        };
        self.config.thresholds(interval)
    }

    /// Starts the silence clock of nodes this leader has not heard from
    /// (a new leader's, for every node in hard state): one that stays
    /// silent for the Down threshold is reported by [`HealthTracker::tick`].
    pub fn start_clocks(&mut self, nodes: impl IntoIterator<Item = String>, now_ms: u64) {
        for node in nodes {
            if !self.nodes.contains_key(&node) {
                self.unheard.entry(node).or_insert(now_ms);
            }
        }
    }

    /// Health of a node the leader has heard from.
    pub fn get(&self, node: &str) -> Option<&NodeHealth> {
        self.nodes.get(node)
    }

    /// Records a registration: the attempts the agent reports running and
    /// the data-volume size it registered with.
    pub fn on_register(
        &mut self,
        node: &str,
        running: BTreeSet<(JobId, u32)>,
        disk_total: u64,
        now_ms: u64,
    ) {
        self.unheard.remove(node);
        let health = self.nodes.entry(node.to_string()).or_default();
        health.last_seen_ms = now_ms;
        health.state = NodeState::Ready;
        health.reported_running = running;
        if health.disk_total == 0 {
            health.disk_total = disk_total;
        }
    }

    /// Records a heartbeat. Returns true when the node just came back from
    /// Suspect (so a scheduling pass is worth running).
    pub fn on_heartbeat(&mut self, node: &str, hb: &Heartbeat, now_ms: u64) -> bool {
        let config = self.config;
        self.unheard.remove(node);
        let health = self.nodes.entry(node.to_string()).or_default();
        let revived = health.state != NodeState::Ready;
        health.last_seen_ms = now_ms;
        health.state = NodeState::Ready;
        for (index, gpu) in &hb.gpus {
            health.gpus.insert(*index, *gpu);
        }
        health.cpu_used_pct = hb.cpu_used_pct;
        health.memory_used = hb.memory_used;
        health.disk_used = hb.disk_used;
        health.disk_total = hb.disk_total;
        health.disk_pressure = next_disk_pressure(
            health.disk_pressure,
            health.disk_used,
            health.disk_total,
            config.disk_high,
            config.disk_low,
        );
        health.job_gpu_memory = hb.jobs.iter().copied().collect();
        revived
    }

    /// Advances silence-based states. Returns nodes that just became Down.
    pub fn tick(&mut self, now_ms: u64) -> Vec<String> {
        let (suspect_after_ms, down_after_ms) = self.thresholds(now_ms);
        if self.shrunk_from.is_some_and(|(_, until)| now_ms >= until) {
            self.shrunk_from = None;
        }
        let mut down = Vec::new();
        for (name, health) in &mut self.nodes {
            let silent = now_ms.saturating_sub(health.last_seen_ms);
            let state = if silent >= down_after_ms {
                NodeState::Down
            } else if silent >= suspect_after_ms {
                NodeState::Suspect
            } else {
                NodeState::Ready
            };
            if state == NodeState::Down && health.state != NodeState::Down {
                down.push(name.clone());
            }
            health.state = state;
        }
        // Never heard from since the election: Down once silent as long.
        self.unheard.retain(|name, since| {
            let silent = now_ms.saturating_sub(*since) >= down_after_ms;
            if silent {
                down.push(name.clone());
            }
            !silent
        });
        down.sort();
        down
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
        tracker.on_heartbeat("n1", &Heartbeat::default(), 1_000);
        assert!(tracker.tick(2_000).is_empty());
        assert_eq!(tracker.get("n1").map(|h| h.state), Some(NodeState::Ready));
        assert!(tracker.tick(4_500).is_empty());
        assert_eq!(tracker.get("n1").map(|h| h.state), Some(NodeState::Suspect));
        assert_eq!(tracker.tick(16_000), vec!["n1".to_string()]);
        assert!(tracker.tick(17_000).is_empty(), "down is reported once");
        assert!(tracker.on_heartbeat("n1", &Heartbeat::default(), 18_000));
    }

    #[test]
    fn a_node_unheard_since_the_election_goes_down_once_at_the_threshold() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        tracker.start_clocks(["n1".to_string(), "n2".to_string()], 1_000);
        tracker.on_heartbeat("n2", &Heartbeat::default(), 2_000);
        assert!(tracker.tick(15_999).is_empty());
        assert!(
            tracker.get("n1").is_none(),
            "unheard nodes have no telemetry"
        );
        tracker.on_heartbeat("n2", &Heartbeat::default(), 16_000);
        assert_eq!(tracker.tick(16_000), vec!["n1".to_string()]);
        assert!(tracker.tick(17_000).is_empty(), "down is reported once");
    }

    #[test]
    fn interval_stretches_with_fleet_size_never_below_the_base() {
        // (nodes, max heartbeats/s, base ms) -> interval ms
        let cases: &[(u64, u64, u64, u64)] = &[
            (0, 10_000, 1_000, 1_000),
            (1, 10_000, 1_000, 1_000),
            (10_000, 10_000, 1_000, 1_000),
            (10_001, 10_000, 1_000, 1_100),
            (15_000, 10_000, 1_000, 1_500),
            (20_000, 10_000, 1_000, 2_000),
            (100_000, 10_000, 1_000, 10_000),
            (5_000, 1_000, 1_000, 5_000),
            (5_050, 1_000, 1_000, 5_100),
            (1, 0, 1_000, 1_000),
            (3, 0, 1_000, 3_000),
            (500, 1_000, 1_000, 1_000),
            (u64::MAX, 1, 1_000, u64::MAX),
        ];
        for &(nodes, rate, base, want) in cases {
            assert_eq!(
                heartbeat_interval_ms(nodes, rate, base),
                want,
                "nodes {nodes}, rate {rate}, base {base}"
            );
        }
    }

    #[test]
    fn thresholds_scale_with_the_interval_above_their_floors() {
        let config = HealthConfig::default();
        // interval ms -> (suspect ms, down ms)
        let cases: &[(u64, (u64, u64))] = &[
            (0, (3_000, 15_000)),
            (500, (3_000, 15_000)),
            (1_000, (3_000, 15_000)),
            (1_100, (3_300, 16_500)),
            (2_000, (6_000, 30_000)),
            (10_000, (30_000, 150_000)),
        ];
        for &(interval, want) in cases {
            assert_eq!(config.thresholds(interval), want, "interval {interval}");
        }
    }

    /// Node states after a heartbeat at 0 and a tick at each time.
    fn states_at(tracker: &mut HealthTracker, times: &[u64]) -> Vec<(u64, NodeState)> {
        tracker.on_heartbeat("n1", &Heartbeat::default(), 0);
        times
            .iter()
            .map(|&t| {
                tracker.tick(t);
                (t, tracker.get("n1").map(|h| h.state).unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn a_stretched_fleet_does_not_flap() {
        use NodeState::{Down, Ready, Suspect};
        let mut tracker = HealthTracker::new(HealthConfig::default());
        tracker.set_interval(5_000, 0);
        assert_eq!(
            states_at(&mut tracker, &[4_999, 14_999, 15_000, 74_999, 75_000]),
            vec![
                (4_999, Ready),
                (14_999, Ready),
                (15_000, Suspect),
                (74_999, Suspect),
                (75_000, Down)
            ]
        );
    }

    #[test]
    fn a_shrunk_interval_keeps_the_old_thresholds_for_a_while() {
        use NodeState::{Ready, Suspect};
        let mut tracker = HealthTracker::new(HealthConfig::default());
        tracker.set_interval(5_000, 0);
        tracker.set_interval(1_000, 0);
        assert_eq!(tracker.thresholds(0), (15_000, 75_000));
        assert_eq!(tracker.thresholds(74_999), (15_000, 75_000));
        assert_eq!(tracker.thresholds(75_000), (3_000, 15_000));
        assert_eq!(
            states_at(&mut tracker, &[10_000]),
            vec![(10_000, Ready)],
            "silent 10 s, under the old suspect threshold"
        );
        tracker.on_heartbeat("n1", &Heartbeat::default(), 80_000);
        tracker.tick(83_000);
        assert_eq!(tracker.get("n1").map(|h| h.state), Some(Suspect));
    }
}
