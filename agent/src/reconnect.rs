//! Where and when the agent's link reconnects after a session ended: a decision
//! over what the session reported, which coordinators failed recently and
//! the time (an argument), so its tables need no network.
//!
//! A failover should cost an election, not a back-off. When the leader
//! dies, the followers keep naming it until they elect another, and the
//! exponential back-off that suits a coordinator that is down for long
//! (200 ms doubling to 2 s) kept agents away for seconds after the new
//! leader was there (the last of 100 agents was back 4.2-4.7 s after a
//! failover in `gantry-bench e2e`). So, for a while after losing a leader
//! it was registered with, the agent polls the list at a short jittered
//! interval instead, and ignores hints naming a coordinator it just failed
//! to reach.

use std::time::{Duration, Instant};

/// First reconnect delay; doubles per failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Delay between tries while failing over: drawn from [half, this].
pub const FAILOVER_POLL: Duration = Duration::from_millis(250);
/// How long after losing a registered session the agent polls rather than
/// backs off: longer than an election with a few retries (elections take
/// 1-2 s at the default ticks), short enough that a coordinator set that is
/// down for long is not polled at 4-8 Hz by every agent.
pub const FAILOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long a coordinator that could not be connected to is not followed
/// when another names it as the leader (a stale hint).
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);
/// Most coordinators remembered as unreachable (hints can name any URL).
const MAX_SUSPECTS: usize = 16;

/// What a session that ended reported.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    /// The coordinator it was with.
    pub url: &'a str,
    /// Whether it had registered (the coordinator led, then the link broke).
    pub registered: bool,
    /// Whether a connection was made at all.
    pub connected: bool,
    /// The leader a "not leader" answer named.
    pub leader: Option<&'a str>,
}

/// Exponential back-off with "equal jitter": a delay in [d/2, d], d doubling.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// A back-off at its first delay.
    pub fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }

    /// Back to the first delay (after a session that registered).
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The next delay, jittered; the one after it is twice as long, up to
    /// [`BACKOFF_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        jittered(base)
    }
}

/// A delay in [d/2, d].
fn jittered(d: Duration) -> Duration {
    let half = u64::try_from(d.as_millis() / 2).unwrap_or(u64::MAX);
    Duration::from_millis(half + rand::random_range(0..=half))
}

/// The link's reconnect state across sessions (the simulated agents of
/// `gantry-bench e2e` use it too).
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    /// Whether the last decision followed a hint at once: a second hint in
    /// a row waits, so two stale replicas cannot ping-pong.
    followed_hint: bool,
    /// When the last registered session ended.
    lost_leader_at: Option<Instant>,
    /// Coordinators that could not be connected to, and when.
    suspects: Vec<(String, Instant)>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconnect {
    /// Nothing lost yet: the first failures back off.
    pub fn new() -> Self {
        Self {
            backoff: Backoff::new(),
            followed_hint: false,
            lost_leader_at: None,
            suspects: Vec::new(),
        }
    }

    /// The coordinator to try next (`None`: the next of the list) and how
    /// long to wait first.
    pub fn after(&mut self, ended: Ended<'_>, now: Instant) -> (Option<String>, Duration) {
        if ended.registered {
            self.backoff.reset();
            self.lost_leader_at = Some(now);
        }
        self.suspects
            .retain(|(_, at)| now.saturating_duration_since(*at) < SUSPECT_FOR);
        if !ended.connected {
            self.suspects.retain(|(url, _)| url != ended.url);
            if self.suspects.len() >= MAX_SUSPECTS {
                self.suspects.remove(0);
            }
            self.suspects.push((ended.url.to_string(), now));
        }
        let hint = ended
            .leader
            .filter(|l| *l != ended.url && !self.suspects.iter().any(|(url, _)| url == l))
            .map(str::to_string);
        if hint.is_some() && !self.followed_hint {
            self.followed_hint = true;
            return (hint, Duration::ZERO);
        }
        self.followed_hint = false;
        let failing_over = self
            .lost_leader_at
            .is_some_and(|at| now.saturating_duration_since(at) < FAILOVER_WINDOW);
        let delay = if failing_over {
            jittered(FAILOVER_POLL)
        } else {
            self.backoff.next_delay()
        };
        (hint, delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "http://a:1";
    const B: &str = "http://b:1";
    const C: &str = "http://c:1";

    fn ended<'a>(
        url: &'a str,
        registered: bool,
        connected: bool,
        leader: Option<&'a str>,
    ) -> Ended<'a> {
        Ended {
            url,
            registered,
            connected,
            leader,
        }
    }

    #[derive(Debug, PartialEq)]
    enum Wait {
        Now,
        Poll,
        Backoff(Duration),
    }

    fn classify(delay: Duration, backoff_base: Duration) -> Wait {
        if delay.is_zero() {
            Wait::Now
        } else if delay <= FAILOVER_POLL && delay >= FAILOVER_POLL / 2 && backoff_base.is_zero() {
            Wait::Poll
        } else {
            assert!(
                delay >= backoff_base / 2 && delay <= backoff_base,
                "{delay:?} not in the back-off range of {backoff_base:?}"
            );
            Wait::Backoff(backoff_base)
        }
    }

    /// Each row: the session that ended, seconds since the start, and what
    /// follows (the coordinator, and a wait: `Duration::ZERO` in the
    /// back-off column means a failover poll).
    #[test]
    fn reconnect_table() {
        struct Row {
            why: &'static str,
            ended: Ended<'static>,
            at_ms: u64,
            next: Option<&'static str>,
            wait: Wait,
            backoff_base: Duration,
        }
        let ms = Duration::from_millis;
        let rows = [
            Row {
                why: "never registered, B unreachable: back off",
                ended: ended(B, false, false, None),
                at_ms: 0,
                next: None,
                wait: Wait::Backoff(BACKOFF_MIN),
                backoff_base: BACKOFF_MIN,
            },
            Row {
                why: "still never registered: the back-off grows",
                ended: ended(C, false, true, None),
                at_ms: 300,
                next: None,
                wait: Wait::Backoff(ms(400)),
                backoff_base: ms(400),
            },
            Row {
                why: "a hint to another coordinator is followed at once",
                ended: ended(C, false, true, Some(A)),
                at_ms: 800,
                next: Some(A),
                wait: Wait::Now,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "registered with A, then A died: poll the list",
                ended: ended(A, true, true, None),
                at_ms: 10_000,
                next: None,
                wait: Wait::Poll,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "B still names the dead A: follow it once",
                ended: ended(B, false, true, Some(A)),
                at_ms: 10_200,
                next: Some(A),
                wait: Wait::Now,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "A cannot be reached: remembered, poll on",
                ended: ended(A, false, false, None),
                at_ms: 10_210,
                next: None,
                wait: Wait::Poll,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "C names the unreachable A: the stale hint is ignored",
                ended: ended(C, false, true, Some(A)),
                at_ms: 10_400,
                next: None,
                wait: Wait::Poll,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "B names the new leader C: followed at once",
                ended: ended(B, false, true, Some(C)),
                at_ms: 11_000,
                next: Some(C),
                wait: Wait::Now,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "A named again after the suspicion expired: followed (after a poll: a second hint in a row)",
                ended: ended(B, false, true, Some(A)),
                at_ms: 13_300,
                next: Some(A),
                wait: Wait::Poll,
                backoff_base: Duration::ZERO,
            },
            Row {
                why: "past the failover window: back off again, from the start",
                ended: ended(A, false, false, None),
                at_ms: 15_100,
                next: None,
                wait: Wait::Backoff(BACKOFF_MIN),
                backoff_base: BACKOFF_MIN,
            },
        ];
        let start = Instant::now();
        let mut reconnect = Reconnect::new();
        for row in rows {
            let (next, delay) = reconnect.after(row.ended, start + ms(row.at_ms));
            assert_eq!(next.as_deref(), row.next, "{}", row.why);
            assert_eq!(classify(delay, row.backoff_base), row.wait, "{}", row.why);
        }
    }

    #[test]
    fn a_second_hint_in_a_row_waits() {
        let now = Instant::now();
        let mut reconnect = Reconnect::new();
        assert_eq!(
            reconnect.after(ended(A, false, true, Some(B)), now),
            (Some(B.to_string()), Duration::ZERO)
        );
        let (next, delay) = reconnect.after(ended(B, false, true, Some(A)), now);
        assert_eq!(next.as_deref(), Some(A));
        assert!(!delay.is_zero());
    }

    #[test]
    fn suspects_are_bounded() {
        let now = Instant::now();
        let mut reconnect = Reconnect::new();
        for i in 0..100 {
            let url = format!("http://x{i}:1");
            reconnect.after(ended(&url, false, false, None), now);
        }
        assert_eq!(reconnect.suspects.len(), MAX_SUSPECTS);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        for _ in 0..10 {
            assert!(backoff.next_delay() <= BACKOFF_MAX);
        }
        let capped = backoff.next_delay();
        assert!(capped >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN);
    }
}
