//! The node circuit breaker: a node is quarantined (takes no placements for
//! a while) only on evidence against the node, never for a job's own bugs,
//! and never more than a bounded share of the fleet at once.
//!
//! Evidence is read from hard state, the attempts of the jobs that ended on
//! the node ([`classify`]):
//! - a failure of a job that failed the same way (exit code, signal or
//!   error) on another node is the job's fault: nothing;
//! - an out-of-memory death (or a stop for GPU memory over-use) is the job's
//!   sizing: nothing;
//! - a failure of a job that succeeded on another node: one point;
//! - a job the agent could not start: one point (an agent error);
//! - lost attempts (node down, agent forgot them): one point per burst;
//! - any other failure: one point, forgiven by a later success on the node.
//!
//! A job counts once per node however often it failed there (distinct jobs),
//! evidence older than [`WINDOW_MS`] or older than the node's last
//! quarantine is ignored, and [`TRIP_POINTS`] points trip the breaker
//! ([`blame`], [`verdict`]). [`admit`] keeps the quarantined share of the
//! fleet at [`MAX_SHARE_PERCENT`] (at least one node in a fleet of two or
//! more) and never quarantines the last node taking work; the state machine
//! runs the same check when it applies `Command::Quarantine`.
//!
//! All of it is pure, with time as an argument. [`Breaker`] is the leader's
//! soft state around it: which attempts ended on which node lately. A new
//! leader starts without it (it only forgives early); the quarantines
//! themselves are hard state and survive it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use gantry_scheduler::JobId;

use crate::command::Command;
use crate::domain::{AttemptOutcome, AttemptRecord, JobRecord, NodeRecord, Quarantine};
use crate::state::StateMachine;

/// Evidence points that trip the breaker.
pub const TRIP_POINTS: u32 = 3;
/// Evidence older than this is forgotten.
pub const WINDOW_MS: u64 = 10 * 60 * 1000;
/// The first quarantine's length; doubled per trip in a row, at most 8x.
pub const COOL_DOWN_MS: u64 = 5 * 60 * 1000;
/// Doublings of [`COOL_DOWN_MS`] at most (8x).
pub const MAX_DOUBLINGS: u32 = 3;
/// Most of the fleet quarantined at once, in percent (rounded down, but at
/// least one node in a fleet of two or more).
pub const MAX_SHARE_PERCENT: usize = 10;
/// Attempts lost on one node within this time of each other are one event
/// (a node going down loses all its attempts at once).
pub const LOST_BURST_MS: u64 = 10_000;
/// Ended attempts remembered per node.
pub const MAX_STRIKES: usize = 64;
/// Longest quarantine reason kept.
pub const MAX_REASON_BYTES: usize = 512;
/// The error of an attempt the agent stopped for using more GPU memory than
/// it reserved (the job's sizing, like an out-of-memory death).
pub const OVER_MEMORY_ERROR: &str = "stopped: used more GPU memory than reserved";
/// The prefix of the error of an attempt the agent could not start.
pub const SPAWN_FAILED: &str = "spawn failed: ";
/// A proposed quarantine not applied within this time may be proposed again.
const PROPOSAL_TIMEOUT_MS: u64 = 5_000;
/// How often nodes held in service are judged again.
pub const HELD_RECHECK_MS: u64 = 1_000;

/// The breaker's numbers. The defaults are the constants above;
/// `--breaker-*` flags and `breaker:` in the settings file change them
/// (checked once at start, in ctl's `policy.rs`, within [`POLICY_BOUNDS`]).
/// A quarantine carries its leader's policy (`Command::Quarantine`), so
/// every replica re-checks the fleet share and the trip window in apply
/// with the same numbers whatever its own flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BreakerPolicy {
    /// Evidence points that trip the breaker.
    pub trip_points: u32,
    /// Evidence older than this is forgotten; a trip within this long of
    /// the last quarantine's end doubles the cool-down.
    pub window_ms: u64,
    /// The first quarantine's length.
    pub cool_down_ms: u64,
    /// Doublings of the cool-down at most.
    pub max_doublings: u32,
    /// Most of the fleet quarantined at once, in percent (rounded down, at
    /// least one node in a fleet of two or more).
    pub max_share_percent: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            trip_points: TRIP_POINTS,
            window_ms: WINDOW_MS,
            cool_down_ms: COOL_DOWN_MS,
            max_doublings: MAX_DOUBLINGS,
            max_share_percent: MAX_SHARE_PERCENT as u32,
        }
    }
}

/// The ranges a [`BreakerPolicy`] is checked against: trip points 1 to
/// 1,000, window and cool-down 1 s to 7 days, doublings 0 to 10, share 1 to
/// 100 percent (so `cool_down << doublings` cannot overflow).
pub const POLICY_BOUNDS: PolicyBounds = PolicyBounds {
    trip_points: (1, 1_000),
    duration_ms: (1_000, 7 * 24 * 3_600_000),
    max_doublings: 10,
    max_share_percent: (1, 100),
};

/// See [`POLICY_BOUNDS`].
#[derive(Debug, Clone, Copy)]
pub struct PolicyBounds {
    /// Least and most trip points.
    pub trip_points: (u32, u32),
    /// Shortest and longest window or cool-down.
    pub duration_ms: (u64, u64),
    /// Most doublings.
    pub max_doublings: u32,
    /// Least and most share, percent.
    pub max_share_percent: (u32, u32),
}

/// What one ended attempt says about the node it ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Evidence {
    /// Nothing: it succeeded, was cancelled, preempted or withdrawn, or its
    /// agent shut down on purpose.
    None,
    /// Out of memory or over its GPU memory: the job's sizing.
    Sizing,
    /// It failed the same way on another node: the job's fault.
    JobsFault,
    /// A plain failure followed by a success on the node.
    Forgiven,
    /// Failed here, not (yet) seen elsewhere.
    Failed,
    /// The agent could not start it.
    AgentError,
    /// Lost (node down, the agent forgot it).
    Lost,
    /// Failed here and succeeded on another node.
    SucceededElsewhere,
}

impl Evidence {
    /// Points against the node.
    pub fn points(self) -> u32 {
        match self {
            Evidence::Failed
            | Evidence::AgentError
            | Evidence::Lost
            | Evidence::SucceededElsewhere => 1,
            Evidence::None | Evidence::Sizing | Evidence::JobsFault | Evidence::Forgiven => 0,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Evidence::None => "no evidence",
            Evidence::Sizing => "out of memory (the job's sizing)",
            Evidence::JobsFault => "failed the same way elsewhere (the job's fault)",
            Evidence::Forgiven => "failed, then the node ran a job successfully",
            Evidence::Failed => "failed here",
            Evidence::AgentError => "the agent could not start it",
            Evidence::Lost => "lost",
            Evidence::SucceededElsewhere => "failed here, succeeded on another node",
        }
    }
}

/// How an attempt failed, to tell "the same way" apart.
#[derive(Debug, PartialEq, Eq)]
enum Signature<'a> {
    Exit(i32),
    Signal(i32),
    Error(&'a str),
}

fn signature(attempt: &AttemptRecord) -> Signature<'_> {
    match (attempt.exit_code, attempt.signal) {
        (_, Some(signal)) => Signature::Signal(signal),
        (Some(code), None) => Signature::Exit(code),
        (None, None) => Signature::Error(&attempt.error),
    }
}

fn is_sizing(attempt: &AttemptRecord) -> bool {
    attempt.oom || attempt.forgiven || attempt.error == OVER_MEMORY_ERROR
}

/// What an ended attempt of `job` says about its node, from the job's
/// attempts on every node (before the forgiveness of a later success,
/// which [`blame`] applies).
pub fn classify(job: &JobRecord, attempt: &AttemptRecord) -> Evidence {
    match attempt.outcome {
        // An agent stopped on purpose (`the agent on N shut down`) or an
        // attempt preempted by a drain says nothing about the node.
        Some(AttemptOutcome::Lost)
            if attempt.preempted.is_empty() && !attempt.error.ends_with(" shut down") =>
        {
            Evidence::Lost
        }
        Some(AttemptOutcome::Failed) if is_sizing(attempt) => Evidence::Sizing,
        Some(AttemptOutcome::Failed) => {
            let mut elsewhere = job.attempts.iter().filter(|a| a.node != attempt.node);
            let how = signature(attempt);
            if elsewhere.clone().any(|a| {
                a.outcome == Some(AttemptOutcome::Failed) && !is_sizing(a) && signature(a) == how
            }) {
                Evidence::JobsFault
            } else if elsewhere.any(|a| a.outcome == Some(AttemptOutcome::Succeeded)) {
                Evidence::SucceededElsewhere
            } else if attempt.error.starts_with(SPAWN_FAILED) {
                Evidence::AgentError
            } else {
                Evidence::Failed
            }
        }
        _ => Evidence::None,
    }
}

/// An attempt that ended on a node other than by succeeding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strike {
    /// When it ended.
    pub at_ms: u64,
    /// Its job.
    pub job: JobId,
    /// Its number.
    pub attempt: u32,
}

/// The evidence against one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blame {
    /// Points: [`TRIP_POINTS`] trip the breaker.
    pub points: u32,
    /// The strongest evidence per job, for the reason.
    pub jobs: BTreeMap<JobId, Evidence>,
    /// Bursts of lost attempts.
    pub lost_bursts: u32,
}

impl Blame {
    /// The evidence for people, bounded by [`MAX_REASON_BYTES`].
    pub fn reason(&self) -> String {
        let mut parts: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.points() > 0)
            .map(|(job, e)| format!("job {job} {}", e.describe()))
            .collect();
        if self.lost_bursts > 0 {
            parts.push(format!("attempts lost {} times", self.lost_bursts));
        }
        let mut reason = parts.join("; ");
        truncate(&mut reason, MAX_REASON_BYTES);
        reason
    }
}

/// Shortens `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The evidence against a node at `now_ms` from its strikes: strikes before
/// `since_ms` (its last quarantine or clearing) or older than `window_ms`
/// are ignored, a plain failure before `last_success_ms` is forgiven, each
/// job counts once, and lost attempts count once per burst.
pub fn blame<'a>(
    strikes: &[Strike],
    job: impl Fn(JobId) -> Option<&'a JobRecord>,
    last_success_ms: u64,
    since_ms: u64,
    now_ms: u64,
    window_ms: u64,
) -> Blame {
    let mut jobs: BTreeMap<JobId, Evidence> = BTreeMap::new();
    let mut lost = Vec::new();
    for strike in strikes {
        if strike.at_ms < since_ms || strike.at_ms.saturating_add(window_ms) <= now_ms {
            continue;
        }
        let Some(record) = job(strike.job) else {
            continue;
        };
        let Some(attempt) = record.attempts.iter().find(|a| a.attempt == strike.attempt) else {
            continue;
        };
        let evidence = match classify(record, attempt) {
            Evidence::Failed if strike.at_ms <= last_success_ms => Evidence::Forgiven,
            Evidence::Lost => {
                lost.push(strike.at_ms);
                continue;
            }
            other => other,
        };
        let slot = jobs.entry(strike.job).or_insert(Evidence::None);
        *slot = (*slot).max(evidence);
    }
    lost.sort_unstable();
    let mut lost_bursts = 0;
    let mut burst_start: Option<u64> = None;
    for at in lost {
        if burst_start.is_none_or(|start| at >= start.saturating_add(LOST_BURST_MS)) {
            lost_bursts += 1;
            burst_start = Some(at);
        }
    }
    let points = jobs.values().map(|e| e.points()).sum::<u32>() + lost_bursts;
    Blame {
        points,
        jobs,
        lost_bursts,
    }
}

/// What [`admit`] needs of a node.
#[derive(Debug, Clone, Copy)]
pub struct FleetNode<'a> {
    /// Name.
    pub name: &'a str,
    /// Down (committed).
    pub down: bool,
    /// Draining.
    pub draining: bool,
    /// Quarantined until (unix ms; 0 = never).
    pub quarantined_until_ms: u64,
}

impl<'a> FleetNode<'a> {
    /// The fleet view of a node record.
    pub fn of(node: &'a NodeRecord) -> FleetNode<'a> {
        FleetNode {
            name: &node.name,
            down: node.down,
            draining: node.draining,
            quarantined_until_ms: node.quarantine.as_ref().map_or(0, |q| q.until_ms),
        }
    }
}

/// Why a node with enough evidence against it stays in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No other node would take work.
    LastNode,
    /// The fleet's share of quarantined nodes is used up.
    Share {
        /// Quarantined now.
        quarantined: usize,
        /// At most this many at once.
        max: usize,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::LastNode => f.write_str("it is the last node taking work"),
            Refusal::Share { quarantined, max } => write!(
                f,
                "{quarantined} nodes are quarantined already, at most {max} at once"
            ),
        }
    }
}

/// Most nodes quarantined at once in a fleet of `up` nodes not down:
/// `share_percent` rounded down, at least one when there are two.
pub fn max_quarantined(up: usize, share_percent: u32) -> usize {
    if up < 2 {
        0
    } else {
        (up * share_percent as usize / 100).max(1)
    }
}

/// Whether `node` may be quarantined at `at_ms`: another node must still
/// take work (not down, draining or quarantined), and the quarantined share
/// of the nodes not down must stay within [`max_quarantined`].
pub fn admit<'a>(
    fleet: impl IntoIterator<Item = FleetNode<'a>>,
    node: &str,
    at_ms: u64,
    share_percent: u32,
) -> Result<(), Refusal> {
    let (mut up, mut quarantined, mut takers) = (0, 0, 0);
    for n in fleet {
        if n.down {
            continue;
        }
        up += 1;
        if n.name == node {
            continue;
        }
        if at_ms < n.quarantined_until_ms {
            quarantined += 1;
        } else if !n.draining {
            takers += 1;
        }
    }
    if takers == 0 {
        return Err(Refusal::LastNode);
    }
    let max = max_quarantined(up, share_percent);
    if quarantined >= max {
        return Err(Refusal::Share { quarantined, max });
    }
    Ok(())
}

/// The trip count of a quarantine starting at `at_ms` after `previous`: one
/// more when the previous one ended less than `window_ms` ago (and was not
/// cleared), else 1.
pub fn next_trips(previous: Option<&Quarantine>, at_ms: u64, window_ms: u64) -> u32 {
    match previous {
        Some(q) if q.trips > 0 && at_ms < q.until_ms.saturating_add(window_ms) => {
            q.trips.saturating_add(1)
        }
        _ => 1,
    }
}

/// How long the `trips`-th quarantine in a row lasts.
pub fn cool_down_ms(trips: u32, policy: &BreakerPolicy) -> u64 {
    policy
        .cool_down_ms
        .saturating_mul(1 << trips.saturating_sub(1).min(policy.max_doublings).min(20))
}

/// The breaker's decision about one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to do (not enough evidence, or quarantined already).
    Clear,
    /// Propose this `Command::Quarantine`.
    Trip(Command),
    /// Enough evidence, but the fleet cannot spare the node.
    Held(Refusal),
}

/// Decides about `node` at `now_ms` from the evidence against it and the
/// fleet. Pure.
pub fn verdict<'a>(
    node: &NodeRecord,
    blame: &Blame,
    fleet: impl IntoIterator<Item = FleetNode<'a>>,
    now_ms: u64,
    policy: &BreakerPolicy,
) -> Verdict {
    let previous = node.quarantine.as_ref();
    if previous.is_some_and(|q| q.is_active(now_ms)) || blame.points < policy.trip_points {
        return Verdict::Clear;
    }
    if let Err(refusal) = admit(fleet, &node.name, now_ms, policy.max_share_percent) {
        return Verdict::Held(refusal);
    }
    let trips = next_trips(previous, now_ms, policy.window_ms);
    Verdict::Trip(Command::Quarantine {
        at_ms: now_ms,
        node: node.name.clone(),
        until_ms: now_ms.saturating_add(cool_down_ms(trips, policy)),
        failures: blame.points,
        reason: blame.reason(),
        policy: *policy,
    })
}

/// One node's recent ended attempts (soft state).
#[derive(Debug, Default)]
struct NodeStrikes {
    /// Attempts that ended other than by succeeding, oldest first.
    strikes: VecDeque<Strike>,
    /// When a job last succeeded on the node.
    last_success_ms: u64,
    /// Points at the last evaluation, and when (for the health ranking).
    points: (u32, u64),
}

/// The leader's circuit breaker: remembers which attempts ended on which
/// node lately and proposes quarantines. Soft state: a new leader starts
/// empty; quarantines are hard state.
#[derive(Debug, Default)]
pub struct Breaker {
    nodes: HashMap<String, NodeStrikes>,
    /// Quarantines proposed and when (not proposed again until applied or
    /// timed out).
    proposed: HashMap<String, u64>,
    /// Nodes held in service by the fleet share or as the last node
    /// (logged once per episode, judged again by [`Breaker::recheck_held`]).
    held: BTreeSet<String>,
    /// When the held nodes were last judged again.
    held_checked_ms: u64,
    /// The numbers it judges by.
    policy: BreakerPolicy,
}

impl Breaker {
    /// A breaker judging by `policy` (`Breaker::default()`: the defaults).
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Takes in the jobs an applied command wrote and returns the
    /// quarantines to propose. Cheap for jobs with no ended attempt; a job
    /// with a newly ended one re-evaluates every node it ran on (a success
    /// here changes what a failure there means).
    pub fn observe(
        &mut self,
        jobs: &BTreeSet<JobId>,
        state: &StateMachine,
        now_ms: u64,
    ) -> Vec<Command> {
        let mut touched = BTreeSet::new();
        for &id in jobs {
            let Some(record) = state.job(id) else {
                continue;
            };
            if self.record(record, now_ms) {
                touched.extend(
                    record
                        .attempts
                        .iter()
                        .filter(|a| a.ended_at_ms > 0)
                        .map(|a| a.node.as_str()),
                );
            }
        }
        self.proposed
            .retain(|_, at| now_ms.saturating_sub(*at) <= PROPOSAL_TIMEOUT_MS);
        touched
            .into_iter()
            .filter_map(|node| self.evaluate(node, state, now_ms))
            .collect()
    }

    /// Judges the held nodes again (at most every [`HELD_RECHECK_MS`]): a
    /// quarantine that ended, or a node that came back, may have made room.
    pub fn recheck_held(&mut self, state: &StateMachine, now_ms: u64) -> Vec<Command> {
        if self.held.is_empty() || now_ms < self.held_checked_ms.saturating_add(HELD_RECHECK_MS) {
            return Vec::new();
        }
        self.held_checked_ms = now_ms;
        self.proposed
            .retain(|_, at| now_ms.saturating_sub(*at) <= PROPOSAL_TIMEOUT_MS);
        let held: Vec<String> = self.held.iter().cloned().collect();
        held.iter()
            .filter_map(|node| self.evaluate(node, state, now_ms))
            .collect()
    }

    /// Evidence points against `node` lately, for the health ranking.
    pub fn recent_failures(&self, node: &str, now_ms: u64) -> u32 {
        self.nodes
            .get(node)
            .filter(|n| n.points.1.saturating_add(self.policy.window_ms) > now_ms)
            .map_or(0, |n| n.points.0)
    }

    /// Notes the job's recently ended attempts; true when one is new.
    fn record(&mut self, record: &JobRecord, now_ms: u64) -> bool {
        let mut new = false;
        for a in &record.attempts {
            if a.ended_at_ms == 0 || a.ended_at_ms.saturating_add(self.policy.window_ms) <= now_ms {
                continue;
            }
            let strike = Strike {
                at_ms: a.ended_at_ms,
                job: record.id,
                attempt: a.attempt,
            };
            let seen = self.nodes.get(&a.node).is_some_and(|n| {
                (a.outcome == Some(AttemptOutcome::Succeeded) && n.last_success_ms >= a.ended_at_ms)
                    || n.strikes.contains(&strike)
            });
            if seen {
                continue;
            }
            match a.outcome {
                Some(AttemptOutcome::Succeeded) => {
                    let node = self.nodes.entry(a.node.clone()).or_default();
                    node.last_success_ms = a.ended_at_ms;
                }
                Some(AttemptOutcome::Failed | AttemptOutcome::Lost) => {
                    let node = self.nodes.entry(a.node.clone()).or_default();
                    if node.strikes.len() >= MAX_STRIKES {
                        node.strikes.pop_front();
                    }
                    node.strikes.push_back(strike);
                }
                _ => continue,
            }
            new = true;
        }
        new
    }

    fn evaluate(&mut self, name: &str, state: &StateMachine, now_ms: u64) -> Option<Command> {
        let (Some(node), Some(entry)) = (state.node(name), self.nodes.get_mut(name)) else {
            self.held.remove(name);
            return None;
        };
        let since = node.quarantine.as_ref().map_or(0, |q| q.since_ms);
        entry
            .strikes
            .retain(|s| s.at_ms >= since && s.at_ms.saturating_add(self.policy.window_ms) > now_ms);
        let blame = blame(
            entry.strikes.make_contiguous(),
            |id| state.job(id),
            entry.last_success_ms,
            since,
            now_ms,
            self.policy.window_ms,
        );
        entry.points = (blame.points, now_ms);
        if self.proposed.contains_key(name) {
            return None;
        }
        match verdict(
            node,
            &blame,
            state.nodes().map(FleetNode::of),
            now_ms,
            &self.policy,
        ) {
            Verdict::Clear => {
                self.held.remove(name);
                None
            }
            Verdict::Held(refusal) => {
                if self.held.insert(name.to_string()) {
                    tracing::warn!(node = %name, points = blame.points, evidence = %blame.reason(), %refusal, "node has failed enough to be quarantined but stays in service");
                }
                None
            }
            Verdict::Trip(command) => {
                self.held.remove(name);
                self.proposed.insert(name.to_string(), now_ms);
                tracing::warn!(node = %name, points = blame.points, evidence = %blame.reason(), "quarantining node");
                Some(command)
            }
        }
    }
}

#[cfg(test)]
mod tests;
