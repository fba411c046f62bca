//! Self-fencing: an agent the leader cannot hear stops its own jobs before
//! the leader declares its node Down and runs them elsewhere.
//!
//! The leader marks a node Down after [`down_threshold`] of silence (15
//! heartbeat intervals, never under 15 s) and then retries its jobs on other
//! nodes. An agent cut off from the leader (a partition, even one that still
//! lets it reach the followers) keeps its jobs running, so without a fence
//! the same job would run twice at once: the netns partition test saw it.
//!
//! The clock is *confirmed* contact: the send time of the newest heartbeat
//! the leader says it received (`Ping.heard_heartbeat_seq`, every 3 s) or of
//! the registration it answered. That heartbeat was sent no later than the
//! leader heard it, so `confirmed + threshold` is never later than the
//! leader's own Down deadline, whichever way packets are lost. Receiving
//! messages proves nothing: with one-way loss the agent still hears a leader
//! that no longer hears it. When [`fence_after`] (60% of the threshold) has
//! passed since the confirmed send time, every running attempt is stopped
//! with a short grace ([`fence_grace`], 10%), so the processes are gone well
//! before the Down threshold. The reports say `fenced`; the coordinator
//! retries those attempts as lost (not the job's fault).
//!
//! A process that starts (or restarts) counts its start as confirmed
//! contact: the previous process's last confirmation is not known, so a
//! restart while cut off adds the restart time to the window.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::executor::{Executor, StopReason};

/// Heartbeats remembered for confirmation (a ping confirms one of the last
/// few; older ones only matter if no newer one was confirmed).
const REMEMBERED: usize = 64;
/// How often the fence checks the clock.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The leader's Down threshold for a heartbeat `interval`.
pub fn down_threshold(interval: Duration) -> Duration {
    let scaled = interval.saturating_mul(gantry_proto::DOWN_INTERVALS as u32);
    scaled.max(Duration::from_millis(gantry_proto::DOWN_AFTER_MIN_MS))
}

/// Time without confirmed contact after which the agent stops its jobs.
pub fn fence_after(interval: Duration) -> Duration {
    down_threshold(interval).mul_f64(0.6)
}

/// Grace between SIGTERM and SIGKILL for a fenced job.
pub fn fence_grace(interval: Duration) -> Duration {
    down_threshold(interval).mul_f64(0.1)
}

/// Whether the agent must fence at `now`, last confirmed at `confirmed`.
pub fn fence_due(confirmed: Instant, now: Instant, interval: Duration) -> bool {
    now.saturating_duration_since(confirmed) >= fence_after(interval)
}

#[derive(Debug)]
struct State {
    /// Send time of the newest confirmed heartbeat or registration.
    confirmed: Instant,
    /// Heartbeat interval in force.
    interval: Duration,
    /// Recent heartbeats: seq and send time, oldest first.
    sent: VecDeque<(u64, Instant)>,
}

/// The link's record of confirmed contact with the leader, shared with the
/// fence task.
#[derive(Debug, Clone)]
pub struct Contact {
    state: Arc<Mutex<State>>,
}

impl Contact {
    /// Contact counted from `now` (process start).
    pub fn new(now: Instant, interval: Duration) -> Contact {
        Contact {
            state: Arc::new(Mutex::new(State {
                confirmed: now,
                interval,
                sent: VecDeque::new(),
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // values stay meaningful.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    /// A heartbeat `seq` was queued at `at`.
    pub fn sent(&self, seq: u64, at: Instant) {
        self.with(|s| {
            if s.sent.len() == REMEMBERED {
                s.sent.pop_front();
            }
            s.sent.push_back((seq, at));
        });
    }

    /// The leader answered a registration sent at `at`; heartbeats of earlier
    /// sessions can no longer be confirmed.
    pub fn registered(&self, at: Instant, interval: Duration) {
        self.with(|s| {
            s.confirmed = s.confirmed.max(at);
            s.interval = interval;
            s.sent.clear();
        });
    }

    /// The heartbeat interval changed.
    pub fn interval(&self, interval: Duration) {
        self.with(|s| s.interval = interval);
    }

    /// The leader says it received heartbeat `seq`.
    pub fn heard(&self, seq: u64) {
        self.with(|s| {
            if let Some(&(_, at)) = s.sent.iter().rev().find(|(sent, _)| *sent == seq) {
                s.confirmed = s.confirmed.max(at);
            }
        });
    }

    /// Whether the agent must fence at `now`, and the interval in force.
    pub fn due(&self, now: Instant) -> (bool, Duration) {
        self.with(|s| (fence_due(s.confirmed, now, s.interval), s.interval))
    }

    /// How long since the last confirmed contact.
    pub fn silence(&self, now: Instant) -> Duration {
        self.with(|s| now.saturating_duration_since(s.confirmed))
    }
}

/// Stops every running attempt whenever the fence is due, until `shutdown`.
pub async fn run(contact: Contact, executor: Executor, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let (due, interval) = contact.due(now);
        if !due {
            continue;
        }
        let running = executor.running();
        if running.is_empty() {
            continue;
        }
        tracing::warn!(
            silence_ms = contact.silence(now).as_millis() as u64,
            fence_after_ms = fence_after(interval).as_millis() as u64,
            jobs = running.len(),
            "the leader has not confirmed a heartbeat for too long: stopping every job before the node is declared Down and they run elsewhere"
        );
        for attempt in running {
            executor.stop(
                attempt.job_id,
                attempt.attempt,
                Some(fence_grace(interval)),
                StopReason::Fenced,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn thresholds_follow_the_interval_like_the_leader() {
        // (interval, Down threshold, fence after, grace)
        let table = [
            (S, 15 * S, 9 * S, S + S / 2),
            (S / 2, 15 * S, 9 * S, S + S / 2),
            (5 * S, 75 * S, 45 * S, 7 * S + S / 2),
        ];
        for (interval, down, after, grace) in table {
            assert_eq!(down_threshold(interval), down, "{interval:?}");
            assert_eq!(fence_after(interval), after, "{interval:?}");
            assert_eq!(fence_grace(interval), grace, "{interval:?}");
        }
    }

    #[test]
    fn the_fence_completes_well_before_the_leader_declares_down() {
        for ms in [100, 1_000, 2_500, 5_000, 30_000] {
            let interval = Duration::from_millis(ms);
            let done = fence_after(interval) + fence_grace(interval);
            // A quarter of the threshold is left for the kill to land and
            // for a ping's confirmation lag.
            assert!(
                done + down_threshold(interval) / 4 <= down_threshold(interval),
                "{interval:?}"
            );
        }
    }

    #[test]
    fn due_only_after_the_fence_time_without_confirmation() {
        let t0 = Instant::now();
        let table = [(0, false), (8_999, false), (9_000, true), (60_000, true)];
        for (after_ms, due) in table {
            let now = t0 + Duration::from_millis(after_ms);
            assert_eq!(fence_due(t0, now, S), due, "{after_ms} ms");
        }
    }

    #[test]
    fn a_confirmation_counts_from_the_send_time_of_the_heartbeat_heard() {
        let t0 = Instant::now();
        let contact = Contact::new(t0, S);
        contact.registered(t0 + S, S);
        for seq in 1..=10 {
            contact.sent(seq, t0 + S * (1 + seq as u32));
        }
        // Heard seq 3 (sent at t0 + 4 s): due 9 s after that.
        contact.heard(3);
        assert!(!contact.due(t0 + 12 * S).0);
        assert!(contact.due(t0 + 13 * S).0);
        // An older confirmation never moves the clock back.
        contact.heard(1);
        assert!(contact.due(t0 + 13 * S).0);
        // An unknown seq (another session's) confirms nothing.
        contact.heard(99);
        assert!(contact.due(t0 + 13 * S).0);
        contact.heard(10);
        assert!(!contact.due(t0 + 19 * S).0);
        assert!(contact.due(t0 + 20 * S).0);
    }

    #[test]
    fn a_new_registration_forgets_the_old_sessions_heartbeats() {
        let t0 = Instant::now();
        let contact = Contact::new(t0, S);
        contact.sent(7, t0 + 5 * S);
        contact.registered(t0 + 2 * S, S);
        // Seq 7 belonged to the session before: hearing "7" on the new one
        // is a different heartbeat that was never recorded.
        contact.heard(7);
        assert!(contact.due(t0 + 11 * S).0);
        assert_eq!(contact.silence(t0 + 11 * S), 9 * S);
    }

    #[test]
    fn the_memory_of_sent_heartbeats_is_bounded() {
        let t0 = Instant::now();
        let contact = Contact::new(t0, S);
        for seq in 0..(REMEMBERED as u64 * 3) {
            contact.sent(seq, t0);
        }
        assert_eq!(contact.with(|s| s.sent.len()), REMEMBERED);
    }
}
