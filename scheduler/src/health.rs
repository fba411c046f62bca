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
        // The numeric part of the order computed once per node, so the
        // sort compares integers and reads a node's name only on a tie.
        let mut keyed: Vec<(u32, i64, usize)> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.recent_failures, total_order(Self::rtt(n)), i))
            .collect();
        keyed.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| nodes[a.2].name.cmp(&nodes[b.2].name))
                .then(a.2.cmp(&b.2))
        });
        keyed.into_iter().map(|(_, _, i)| i).collect()
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

/// `x` as an integer in the order of `f64::total_cmp`.
fn total_order(x: f64) -> i64 {
    let bits = x.to_bits() as i64;
    bits ^ ((((bits >> 63) as u64) >> 1) as i64)
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
        // The integer key orders as `total_cmp` does.
        let xs = [-1.5, -0.0, 0.0, 1e-300, 2.0, f64::INFINITY, f64::NAN];
        for a in xs {
            for b in xs {
                assert_eq!(
                    total_order(a).cmp(&total_order(b)),
                    a.total_cmp(&b),
                    "{a} {b}"
                );
            }
        }
    }
}
