//! Disk backpressure: per-node watermarks with hysteresis, per-kind
//! overrides, and fleet-level pressure.
//!
//! The node's pressure flag is a hard-state transition the coordinator
//! commits; it computes it with [`next_disk_pressure`] from each heartbeat.
//! A pass only reads the flag (and, for kinds with their own thresholds,
//! re-derives it with the flag as the hysteresis state).

use crate::model::{JobKind, NodeState, NodeView, Policy};

/// The next disk-pressure flag of a node, with hysteresis: pressure turns on
/// when use goes above `high` and stays on until use falls below `low`, so a
/// node hovering around one threshold does not flap. `total == 0` (no data
/// volume reported) is never pressured. A `low` above `high` is read as
/// `high`.
pub fn next_disk_pressure(previous: bool, used: u64, total: u64, high: f64, low: f64) -> bool {
    if total == 0 {
        return false;
    }
    let fraction = used as f64 / total as f64;
    if previous {
        fraction >= low.min(high)
    } else {
        fraction > high
    }
}

/// Decides whether a node's disk pressure keeps a job of some kind off it.
#[derive(Debug, Clone, Copy)]
pub struct DiskPressureChecker<'p> {
    policy: &'p Policy,
}

impl<'p> DiskPressureChecker<'p> {
    /// A checker for the pass's policy.
    pub fn new(policy: &'p Policy) -> Self {
        DiskPressureChecker { policy }
    }

    /// Whether backpressure applies to `kind` at all: data producers, and any
    /// kind given its own thresholds.
    pub fn applies_to(&self, kind: JobKind) -> bool {
        kind.produces_data() || self.policy.disk_thresholds.contains_key(&kind)
    }

    /// Whether a kind uses the node's own flag unchanged (no override), so a
    /// pass may split nodes into pressured and unpressured pools up front.
    pub fn uses_node_flag(&self, kind: JobKind) -> bool {
        kind.produces_data() && !self.policy.disk_thresholds.contains_key(&kind)
    }

    /// Whether `node` is pressured for a job of `kind`. Overrides re-run the
    /// hysteresis with the node's committed flag as the previous state.
    pub fn blocks(&self, node: &NodeView, kind: JobKind) -> bool {
        match self.policy.disk_thresholds.get(&kind) {
            Some(t) => next_disk_pressure(
                node.disk_pressure,
                node.disk_used,
                node.disk_total,
                t.high,
                t.low,
            ),
            None => kind.produces_data() && node.disk_pressure,
        }
    }
}

/// How much of the ready fleet is disk-pressured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetPressure {
    /// Ready nodes with the pressure flag set.
    pub pressured: usize,
    /// Ready nodes that report a data volume.
    pub nodes: usize,
}

impl FleetPressure {
    /// Counts pressure over ready nodes that report a data volume. Suspect,
    /// down and draining nodes are left out: their disks take no new work
    /// either way.
    pub fn measure<'a>(nodes: impl IntoIterator<Item = &'a NodeView>) -> Self {
        let mut out = FleetPressure::default();
        for node in nodes {
            out.count(
                node.state,
                node.draining,
                node.disk_total,
                node.disk_pressure,
            );
        }
        out
    }

    /// Counts one node, as [`FleetPressure::measure`] does, for callers that
    /// have its figures but no [`NodeView`].
    pub fn count(&mut self, state: NodeState, draining: bool, disk_total: u64, pressured: bool) {
        if state != NodeState::Ready || draining || disk_total == 0 {
            return;
        }
        self.nodes += 1;
        self.pressured += usize::from(pressured);
    }

    /// Whether at least `fraction` of the fleet is pressured.
    pub fn is_pressured(&self, fraction: f64) -> bool {
        self.nodes > 0 && self.pressured as f64 >= fraction * self.nodes as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DiskThresholds;

    #[test]
    fn hysteresis() {
        fn check(previous: bool, used: u64, total: u64, expected: bool) {
            assert_eq!(
                next_disk_pressure(previous, used, total, 0.85, 0.75),
                expected,
                "previous={previous} used={used}/{total}"
            );
        }
        check(false, 50, 100, false);
        check(false, 85, 100, false); // at the mark is not above it
        check(false, 86, 100, true);
        check(true, 80, 100, true); // between the marks: stays on
        check(false, 80, 100, false); // between the marks: stays off
        check(true, 75, 100, true);
        check(true, 74, 100, false);
        check(true, 99, 0, false); // no volume reported
        check(false, 100, 100, true);
    }

    #[test]
    fn inverted_marks_read_low_as_high() {
        assert!(!next_disk_pressure(true, 80, 100, 0.85, 0.95));
        assert!(next_disk_pressure(true, 90, 100, 0.85, 0.95));
    }

    #[test]
    fn checker_per_kind() {
        let mut policy = Policy::default();
        policy.disk_thresholds.insert(
            JobKind::Export,
            DiskThresholds {
                high: 0.95,
                low: 0.90,
            },
        );
        policy.disk_thresholds.insert(
            JobKind::Evaluation,
            DiskThresholds {
                high: 0.98,
                low: 0.97,
            },
        );
        let checker = DiskPressureChecker::new(&policy);
        let node = |pressure: bool, used: u64| NodeView {
            disk_pressure: pressure,
            disk_used: used,
            disk_total: 100,
            ..Default::default()
        };
        // (kind, flag, used%, blocked)
        let cases = [
            (JobKind::Selfplay, true, 88, true),
            (JobKind::Selfplay, false, 88, false),
            (JobKind::Export, true, 88, false), // own marks: 88% is fine
            (JobKind::Export, true, 92, true),  // flag on and above its low
            (JobKind::Export, false, 96, true),
            (JobKind::Training, true, 99, false), // consumers never blocked
            (JobKind::Evaluation, false, 99, true), // opted in via thresholds
            (JobKind::Generic, true, 99, false),
        ];
        for (kind, flag, used, expected) in cases {
            assert_eq!(
                checker.blocks(&node(flag, used), kind),
                expected,
                "{kind} flag={flag} used={used}%"
            );
        }
        assert!(checker.applies_to(JobKind::Evaluation));
        assert!(!checker.applies_to(JobKind::Training));
        assert!(checker.uses_node_flag(JobKind::Selfplay));
        assert!(!checker.uses_node_flag(JobKind::Export));
    }

    #[test]
    fn fleet_pressure() {
        let node = |state: NodeState, pressure: bool, total: u64| NodeView {
            state,
            disk_pressure: pressure,
            disk_total: total,
            ..Default::default()
        };
        let nodes = [
            node(NodeState::Ready, true, 100),
            node(NodeState::Ready, true, 100),
            node(NodeState::Ready, false, 100),
            node(NodeState::Down, false, 100),  // ignored
            node(NodeState::Ready, false, 0),   // no volume: ignored
            node(NodeState::Suspect, true, 10), // ignored
        ];
        let fleet = FleetPressure::measure(&nodes);
        assert_eq!(
            fleet,
            FleetPressure {
                pressured: 2,
                nodes: 3
            }
        );
        assert!(fleet.is_pressured(0.5));
        assert!(!fleet.is_pressured(0.8));
        assert!(!FleetPressure::default().is_pressured(0.0));
    }
}
