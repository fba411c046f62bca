//! Job events waiting for (or kept for re-delivery to) the coordinator.
//!
//! A coordinator can receive an event and lose it before committing it (a
//! leader crash). So delivery is at-least-once and the coordinator
//! deduplicates by (job, attempt, kind):
//!
//! - Every event is sent on the live connection as soon as it happens, or,
//!   while disconnected, right after the next successful `Register`/`Registered`
//!   exchange, in the order the events happened.
//! - `Started` events are dropped once written to a stream: if that stream
//!   broke, the next `Register.running` carries the same fact, and if the
//!   attempt has ended since, its `Exited` supersedes it.
//! - Terminal events (`Exited`, `SpawnFailed`) are kept after their first
//!   send and re-sent after every later successful registration, until
//!   [`RESEND_WINDOW`] has passed since that first send. An event that was
//!   never sent never expires (an agent cut off for an hour still reports
//!   what finished meanwhile). A coordinator that committed a terminal
//!   event says so (`EndRecorded`): it is dropped then ([`Outbox::recorded`]);
//!   the window is the contract with coordinators that do not.
//! - At most [`MAX_RETAINED`] events are kept; past that the oldest
//!   already-sent ones go first, then the oldest unsent (with a warning).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::executor::JobEvent;

/// How long a terminal event is re-sent on reconnects after it was first sent.
pub const RESEND_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Upper bound on retained events.
pub const MAX_RETAINED: usize = 10_000;

#[derive(Debug)]
struct Entry {
    event: JobEvent,
    /// When it was first written to a registered stream; `None` = never.
    first_sent: Option<Instant>,
}

/// The agent's outgoing job events (see the module docs for the policy).
#[derive(Debug, Default)]
pub struct Outbox {
    entries: VecDeque<Entry>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an event that was not sent (no live connection).
    pub fn push_unsent(&mut self, event: JobEvent) {
        self.push(Entry {
            event,
            first_sent: None,
        });
    }

    /// Records an event that was just written to the live connection.
    pub fn push_sent(&mut self, event: JobEvent, now: Instant) {
        if event.kind.is_terminal() {
            self.push(Entry {
                event,
                first_sent: Some(now),
            });
        }
    }

    /// Drops the terminal events whose re-send window has passed and
    /// returns their `(job_id, attempt)`: the agent counts them as
    /// acknowledged by the coordinator (the link has no acknowledgements;
    /// this window is the delivery contract).
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, u32)> {
        let mut expired = Vec::new();
        self.entries.retain(|entry| {
            let keep = entry
                .first_sent
                .is_none_or(|at| now.saturating_duration_since(at) < RESEND_WINDOW);
            if !keep && entry.event.kind.is_terminal() {
                expired.push((entry.event.job_id, entry.event.attempt));
            }
            keep
        });
        expired
    }

    /// The coordinator committed the terminal event of `key` (job,
    /// attempt): it is never sent again. Returns whether one was retained.
    pub fn recorded(&mut self, key: (u64, u32)) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|e| !(e.event.kind.is_terminal() && (e.event.job_id, e.event.attempt) == key));
        self.entries.len() < before
    }

    /// The events to send after a successful registration, in order; marks
    /// them sent at `now`, drops sent `Started` events. Call [`Outbox::expire`]
    /// first, or expired events are sent once more.
    pub fn on_registered(&mut self, now: Instant) -> Vec<JobEvent> {
        let out = self.entries.iter().map(|e| e.event.clone()).collect();
        self.entries.retain_mut(|entry| {
            entry.first_sent.get_or_insert(now);
            entry.event.kind.is_terminal()
        });
        out
    }

    /// Number of retained events.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, entry: Entry) {
        // A terminal event reported again (a repeated assignment is answered
        // with it) is kept once, with its first send time.
        let (job_id, attempt) = (entry.event.job_id, entry.event.attempt);
        if entry.event.kind.is_terminal()
            && self.entries.iter().any(|e| {
                e.event.job_id == job_id && e.event.attempt == attempt && e.event.kind.is_terminal()
            })
        {
            return;
        }
        if self.entries.len() >= MAX_RETAINED {
            let victim = self
                .entries
                .iter()
                .position(|e| e.first_sent.is_some())
                .unwrap_or(0);
            if let Some(dropped) = self.entries.remove(victim)
                && dropped.first_sent.is_none()
            {
                tracing::warn!(
                    job_id = dropped.event.job_id,
                    attempt = dropped.event.attempt,
                    "outbox full: dropping an unsent job event"
                );
            }
        }
        self.entries.push_back(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::{ExitReport, JobEventKind};

    fn started(job_id: u64) -> JobEvent {
        JobEvent {
            job_id,
            attempt: 1,
            at_ms: 0,
            kind: JobEventKind::Started { pid: 10 },
        }
    }

    fn exited(job_id: u64) -> JobEvent {
        JobEvent {
            job_id,
            attempt: 1,
            at_ms: 0,
            kind: JobEventKind::Exited(ExitReport {
                code: Some(0),
                signal: None,
                stderr_tail: Vec::new(),
                cancelled: false,
                agent_shutdown: false,
                peak_gpu_memory_bytes: 0,
                over_memory: false,
                fenced: false,
            }),
        }
    }

    fn ids(events: &[JobEvent]) -> Vec<(u64, bool)> {
        events
            .iter()
            .map(|e| (e.job_id, e.kind.is_terminal()))
            .collect()
    }

    #[test]
    fn unsent_events_go_out_in_order_then_only_terminal_ones_stay() {
        let mut outbox = Outbox::new();
        let t0 = Instant::now();
        outbox.push_unsent(started(1));
        outbox.push_unsent(exited(1));
        outbox.push_unsent(started(2));
        assert_eq!(
            ids(&outbox.on_registered(t0)),
            vec![(1, false), (1, true), (2, false)]
        );
        // Reconnect: only the exit is re-sent.
        assert_eq!(
            ids(&outbox.on_registered(t0 + Duration::from_secs(1))),
            vec![(1, true)]
        );
    }

    #[test]
    fn sent_terminal_events_expire_after_the_window_unsent_never() {
        let mut outbox = Outbox::new();
        let t0 = Instant::now();
        outbox.push_sent(started(1), t0);
        outbox.push_sent(exited(1), t0);
        assert_eq!(outbox.len(), 1, "a sent start is not retained");
        let later = t0 + RESEND_WINDOW + Duration::from_secs(1);
        outbox.push_unsent(exited(2));
        assert_eq!(outbox.expire(later), vec![(1, 1)], "acknowledged");
        assert_eq!(ids(&outbox.on_registered(later)), vec![(2, true)]);
        // Now 2 counts as sent at `later` and is re-sent until its own window ends.
        assert_eq!(
            ids(&outbox.on_registered(later + Duration::from_secs(5))),
            vec![(2, true)]
        );
        assert_eq!(outbox.expire(later + RESEND_WINDOW), vec![(2, 1)]);
        assert!(outbox.on_registered(later + RESEND_WINDOW).is_empty());
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_recorded_end_is_not_sent_again() {
        let mut outbox = Outbox::new();
        let t0 = Instant::now();
        outbox.push_sent(exited(1), t0);
        outbox.push_sent(exited(2), t0);
        outbox.push_unsent(started(3));
        assert!(outbox.recorded((1, 1)));
        assert!(!outbox.recorded((1, 1)), "already gone");
        assert!(!outbox.recorded((3, 1)), "a start is not an end");
        assert_eq!(ids(&outbox.on_registered(t0)), vec![(2, true), (3, false)]);
        assert_eq!(outbox.expire(t0 + RESEND_WINDOW), vec![(2, 1)]);
    }

    #[test]
    fn a_terminal_event_reported_again_is_kept_once() {
        let mut outbox = Outbox::new();
        let t0 = Instant::now();
        outbox.push_sent(exited(1), t0);
        outbox.push_sent(exited(1), t0 + Duration::from_secs(1));
        outbox.push_unsent(exited(1));
        assert_eq!(outbox.len(), 1);
        assert_eq!(
            outbox.expire(t0 + RESEND_WINDOW),
            vec![(1, 1)],
            "first send counts"
        );
    }

    #[test]
    fn full_outbox_drops_sent_events_first() {
        let mut outbox = Outbox::new();
        let t0 = Instant::now();
        outbox.push_unsent(exited(0));
        for job in 1..MAX_RETAINED as u64 {
            outbox.push_sent(exited(job), t0);
        }
        outbox.push_unsent(exited(99_999));
        assert_eq!(outbox.len(), MAX_RETAINED);
        let events = outbox.on_registered(t0);
        assert_eq!(events[0].job_id, 0, "unsent event kept");
        assert_eq!(events[1].job_id, 2, "oldest sent event dropped");
        assert_eq!(events.last().map(|e| e.job_id), Some(99_999));
    }
}
