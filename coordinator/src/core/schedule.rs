//! Scheduling passes: the decision ([`decide::schedule::pass`]) and the
//! glue that proposes its plan and keeps its hold reasons.

use crate::decide;

use super::Core;

impl Core {
    /// One scheduling pass: snapshot -> plan -> commit -> dispatch.
    pub(super) fn schedule(&mut self, now: u64) {
        let started = std::time::Instant::now();
        self.plan_and_propose(now);
        self.metrics
            .scheduling_pass_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    pub(super) fn plan_and_propose(&mut self, now: u64) {
        self.dirty = false;
        self.last_pass_ms = now;
        let policy = self.policy();
        let pass = decide::schedule::pass(
            &self.state,
            &self.health,
            &self.sessions,
            &policy,
            &self.breaker,
            self.term,
            now,
        );
        if let Some(assign) = pass.assign {
            self.plan_in_flight = Some(now);
            self.propose(assign);
        }
        for preempt in pass.preempt {
            self.propose(preempt);
        }
        self.hold_reasons = pass.reasons;
    }
}
