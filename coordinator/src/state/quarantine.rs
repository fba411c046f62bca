//! Applying the circuit breaker's commands: a quarantine is hard state, so it
//! survives a leader change, and is decided from the commands' own times.

use super::{ApplyError, Outcome, StateMachine};
use crate::breaker::{self, FleetNode};
use crate::domain::Quarantine;

impl StateMachine {
    /// `Command::Quarantine`: re-checks the fleet share at `at_ms` (two
    /// quarantines proposed together must not exceed it), then records it.
    pub(super) fn quarantine(
        &mut self,
        at_ms: u64,
        node: String,
        until_ms: u64,
        failures: u32,
        reason: String,
        policy: &breaker::BreakerPolicy,
    ) -> Result<Outcome, ApplyError> {
        let refuse = |reason: String| ApplyError::QuarantineRefused {
            node: node.clone(),
            reason,
        };
        let Some(record) = self.nodes.get(&node) else {
            return Err(ApplyError::NodeNotFound(node));
        };
        if until_ms <= at_ms {
            return Err(refuse(format!(
                "until_ms {until_ms} is not after at_ms {at_ms}"
            )));
        }
        let previous = record.quarantine.clone();
        breaker::admit(
            self.nodes.values().map(FleetNode::of),
            &node,
            at_ms,
            policy.max_share_percent,
        )
        .map_err(|refusal| refuse(refusal.to_string()))?;
        let trips = breaker::next_trips(previous.as_ref(), at_ms, policy.window_ms);
        let mut reason = reason;
        breaker::truncate(&mut reason, breaker::MAX_REASON_BYTES);
        if let Some(record) = self.nodes.get_mut(&node) {
            record.quarantine = Some(Quarantine {
                since_ms: at_ms,
                until_ms,
                failures,
                reason,
                trips,
            });
        }
        self.changes.nodes.insert(node);
        Ok(Outcome::Done)
    }

    /// `Command::ClearQuarantine`: placements again at once, the evidence
    /// before `at_ms` forgiven and the doubling reset.
    pub(super) fn clear_quarantine(
        &mut self,
        at_ms: u64,
        node: String,
    ) -> Result<Outcome, ApplyError> {
        let Some(record) = self.nodes.get_mut(&node) else {
            return Err(ApplyError::NodeNotFound(node));
        };
        // Recorded even if the node was never quarantined: the operator vouched
        // for it, so the evidence so far is forgiven.
        record.quarantine = Some(Quarantine {
            since_ms: at_ms,
            until_ms: at_ms,
            failures: 0,
            reason: String::new(),
            trips: 0,
        });
        self.changes.nodes.insert(node);
        Ok(Outcome::Done)
    }

    /// The node's quarantine in force at `now_ms`, if any.
    pub fn quarantined(&self, node: &str, now_ms: u64) -> Option<&Quarantine> {
        self.nodes
            .get(node)
            .and_then(|n| n.quarantine.as_ref())
            .filter(|q| q.is_active(now_ms))
    }
}
