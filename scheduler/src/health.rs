//! Node health: the quarantine circuit breaker the coordinator keeps per
//! node, and the health ranking a pass uses to break ties between equal fits.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::model::{NodeView, QuarantinePolicy};

/// Number of recent job outcomes remembered per node.
pub const RECENT_WINDOW: u32 = 16;

/// A node's recent job outcomes and its circuit breaker. Pure: time is an
/// argument. The coordinator keeps one per node (soft state is enough: a new
/// leader starting with clean records only forgives a node early), calls
/// [`record_failure`](Self::record_failure) / [`record_success`](Self::record_success)
/// on job ends, and copies [`recent_failures`](Self::recent_failures) and
/// [`quarantined_until_ms`](Self::quarantined_until_ms) into the node's
/// `NodeView`.
///
/// Breaker states: closed (placements flow), open (quarantined until
/// `quarantined_until_ms`), half-open (cool-down over: placements flow, but
/// the next failure re-opens it at once, for twice as long, up to 8x).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
    /// The last [`RECENT_WINDOW`] outcomes, newest in bit 0; 1 = failure.
    pub outcomes: u32,
    /// How many outcomes `outcomes` holds (up to [`RECENT_WINDOW`]).
    pub outcome_count: u32,
    /// Trips since the last success (drives the cool-down doubling).
    pub trips: u32,
    /// Quarantined until this time (unix ms); 0 = never tripped.
    pub quarantined_until_ms: u64,
}

impl FailureRecord {
    /// Records a job that ended in failure on this node at `now_ms`. Returns
    /// `true` when this failure tripped the breaker (a transition worth an
    /// event and a log line).
    pub fn record_failure(&mut self, now_ms: u64, policy: &QuarantinePolicy) -> bool {
        self.push(true);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures < policy.trip_after.max(1) {
            return false;
        }
        self.trips = self.trips.saturating_add(1);
        let factor = 1u64 << (self.trips - 1).min(3);
        self.quarantined_until_ms =
            now_ms.saturating_add(policy.cool_down_ms.saturating_mul(factor));
        // Half-open after the cool-down: one more failure re-trips.
        self.consecutive_failures = policy.trip_after.max(1) - 1;
        true
    }

    /// Records a job that succeeded on this node: closes the breaker.
    pub fn record_success(&mut self) {
        self.push(false);
        self.consecutive_failures = 0;
        self.trips = 0;
    }

    /// Whether the node takes no placements at `now_ms`.
    pub fn is_quarantined(&self, now_ms: u64) -> bool {
        now_ms < self.quarantined_until_ms
    }

    /// Failures among the last [`RECENT_WINDOW`] outcomes, for
    /// `NodeView::recent_failures`.
    pub fn recent_failures(&self) -> u32 {
        self.outcomes.count_ones()
    }

    fn push(&mut self, failed: bool) {
        let mask = (1u32 << RECENT_WINDOW) - 1;
        self.outcomes = ((self.outcomes << 1) | u32::from(failed)) & mask;
        self.outcome_count = (self.outcome_count + 1).min(RECENT_WINDOW);
    }
}

/// Ranks nodes by health: fewer recent failures first, then lower RTT, then
/// name (the deterministic tie-break). A pass numbers its nodes in this
/// order, so "lower rank" is "healthier" everywhere in the index.
#[derive(Debug, Clone, Copy, Default)]
pub struct HealthScorer;

impl HealthScorer {
    /// Compares two nodes: `Less` means `a` is healthier.
    pub fn compare(a: &NodeView, b: &NodeView) -> Ordering {
        a.recent_failures
            .cmp(&b.recent_failures)
            .then_with(|| Self::rtt(a).total_cmp(&Self::rtt(b)))
            .then_with(|| a.name.cmp(&b.name))
    }

    /// Sorts node indices healthiest first.
    pub fn rank(nodes: &[&NodeView]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_unstable_by(|&a, &b| Self::compare(nodes[a], nodes[b]));
        order
    }

    /// RTT with unknown (NaN, negative) read as very slow, so a node that
    /// never reported an RTT is not preferred over one that did.
    fn rtt(node: &NodeView) -> f64 {
        if node.rtt_ms.is_nan() || node.rtt_ms < 0.0 {
            f64::INFINITY
        } else {
            node.rtt_ms
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> QuarantinePolicy {
        QuarantinePolicy {
            trip_after: 3,
            cool_down_ms: 1000,
        }
    }

    /// Plays a script of outcomes (`F` fail, `S` success) at 1 ms steps from
    /// t=10_000 and returns (trips seen, quarantined_until, recent failures).
    fn check(script: &str, expected: (u32, u64, u32)) {
        let mut record = FailureRecord::default();
        let mut tripped = 0;
        for (i, step) in script.chars().enumerate() {
            let now = 10_000 + i as u64;
            match step {
                'F' => tripped += u32::from(record.record_failure(now, &policy())),
                'S' => record.record_success(),
                _ => unreachable!("script uses F and S"),
            }
        }
        assert_eq!(
            (
                tripped,
                record.quarantined_until_ms,
                record.recent_failures()
            ),
            expected,
            "script {script}"
        );
    }

    #[test]
    fn breaker() {
        check("", (0, 0, 0));
        check("FF", (0, 0, 2));
        check("FFS", (0, 0, 2));
        check("FFF", (1, 10_002 + 1000, 3));
        check("FFSFF", (0, 0, 4));
        // half-open: the next failure re-trips, for twice as long.
        check("FFFF", (2, 10_003 + 2000, 4));
        // doubling stops at 8x.
        check("FFFFFFFF", (6, 10_007 + 8000, 8));
        // a success resets the doubling.
        check("FFFSFFF", (2, 10_006 + 1000, 6));
        // the window forgets old failures.
        check("FFSSSSSSSSSSSSSSSS", (0, 0, 0));
    }

    #[test]
    fn quarantine_is_time_bound() {
        let mut record = FailureRecord::default();
        for _ in 0..3 {
            record.record_failure(500, &policy());
        }
        assert!(record.is_quarantined(500));
        assert!(record.is_quarantined(1499));
        assert!(!record.is_quarantined(1500));
    }

    #[test]
    fn health_rank() {
        let node = |name: &str, failures: u32, rtt: f64| NodeView {
            name: name.into(),
            recent_failures: failures,
            rtt_ms: rtt,
            ..Default::default()
        };
        let nodes = [
            node("d", 0, 5.0),
            node("a", 1, 1.0),
            node("c", 0, 2.0),
            node("b", 0, 2.0),
            node("e", 0, f64::NAN),
        ];
        let refs: Vec<&NodeView> = nodes.iter().collect();
        let names: Vec<&str> = HealthScorer::rank(&refs)
            .into_iter()
            .map(|i| nodes[i].name.as_str())
            .collect();
        assert_eq!(names, ["b", "c", "d", "e", "a"]);
    }
}
