//! The leader's periodic sweep: silence (Suspect, then Down: committed),
//! drain deadlines, attempts a registration did not report, and back-off
//! requeues.

use gantry_scheduler::JobId;

use super::{Decisions, Sessions, Soft, Tunables};
use crate::command::Command;
use crate::health::{HealthConfig, HealthTracker};
use crate::state::{GangSettle, StateMachine};

/// The health tracker a newly elected leader starts from at `now`: the
/// silence clock of every node hard state knows (and that is not Down)
/// starts now, as Nomad's `initializeHeartbeatTimers` does, so a node that
/// died with the old leader goes Down one Down threshold after the election
/// and its jobs are retried, instead of staying Suspect for ever.
pub fn elected(state: &StateMachine, config: HealthConfig, now: u64) -> HealthTracker {
    let mut tracker = HealthTracker::new(config);
    tracker.start_clocks(
        state.nodes().filter(|n| !n.down).map(|n| n.name.clone()),
        now,
    );
    tracker
}

/// One sweep at `now`.
pub fn sweep(
    state: &StateMachine,
    health: &mut HealthTracker,
    soft: &mut Soft,
    sessions: &dyn Sessions,
    tunables: &Tunables,
    now: u64,
) -> Decisions {
    let mut out = Decisions::default();
    for node in health.tick(now) {
        if state.node(&node).is_some_and(|n| !n.down) {
            tracing::warn!(node = %node, "node is down; its jobs are lost and will be retried");
            out.propose.push(Command::SetNodeDown {
                at_ms: now,
                node,
                down: true,
            });
        }
    }
    out.extend(preempt_due(state, soft, sessions, tunables, now));
    let mut expired: Vec<(JobId, u32)> = soft
        .unconfirmed
        .iter()
        .filter(|(_, deadline)| **deadline <= now)
        .map(|(k, _)| *k)
        .collect();
    expired.sort_unstable();
    for (job, attempt) in expired {
        soft.unconfirmed.remove(&(job, attempt));
        let reason = "the agent no longer runs it".to_string();
        out.propose.push(Command::AttemptLost {
            at_ms: now,
            job,
            attempt,
            reason,
        });
    }
    let due: Vec<JobId> = state
        .backing_off()
        .filter(|j| j.not_before_ms <= now)
        .map(|j| j.id)
        .collect();
    for job in due {
        out.propose.push(Command::Requeue { at_ms: now, job });
    }
    out.extend(settle_gangs(state, soft, tunables, now));
    out
}

/// Proposes `GangStop` for every gang whose attempt broke and that has
/// something left to do ([`GangSettle`]), once per proposal timeout.
fn settle_gangs(state: &StateMachine, soft: &mut Soft, tunables: &Tunables, now: u64) -> Decisions {
    let mut out = Decisions::default();
    soft.gang_stops
        .retain(|_, at| now < at.saturating_add(tunables.proposal_timeout_ms));
    for gang in state.live_gangs() {
        if soft.gang_stops.contains_key(&gang) || GangSettle::of(state, gang).is_empty() {
            continue;
        }
        soft.gang_stops.insert(gang, now);
        out.propose.push(Command::GangStop { at_ms: now, gang });
    }
    out
}

/// Finds draining nodes past their deadline that still run attempts
/// not yet preempted, and proposes their preemption. Only nodes whose
/// agent is connected: a silent node's attempts are left to the Down
/// timeout (Lost, retried elsewhere), so no attempt is counted twice.
fn preempt_due(
    state: &StateMachine,
    soft: &mut Soft,
    sessions: &dyn Sessions,
    tunables: &Tunables,
    now: u64,
) -> Decisions {
    let mut out = Decisions::default();
    soft.preempting
        .retain(|_, since| now.saturating_sub(*since) <= tunables.proposal_timeout_ms);
    let due: Vec<String> = state
        .nodes()
        .filter(|n| n.draining && state.drain_due(&n.name, now))
        .filter(|n| !n.down && sessions.connected(&n.name))
        .filter(|n| !soft.preempting.contains_key(&n.name))
        .filter(|n| !state.preemptible_on(&n.name).is_empty())
        .map(|n| n.name.clone())
        .collect();
    for node in due {
        tracing::info!(node = %node, "drain deadline passed; preempting its attempts");
        soft.preempting.insert(node.clone(), now);
        out.propose
            .push(Command::PreemptDrained { at_ms: now, node });
    }
    out
}
