//! Node health: the ranking a pass uses to break ties between equal fits.
//! (The circuit breaker that quarantines nodes lives in the coordinator,
//! which has the evidence; a pass only reads `NodeView::quarantined_until_ms`.)

use std::cmp::Ordering;

use crate::model::NodeView;

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
