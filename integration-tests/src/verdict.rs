//! The nemesis's checker, in the spirit of Jepsen's: it reads ground truth
//! (the [`crate::ledger`] the jobs wrote, and every replica's storage once
//! the cluster is quiet and stopped) and names every violation of Gantry's
//! promise with the job, attempts, pids and times involved:
//!
//! - no two processes of one job ever ran at the same time (a killed
//!   process runs until the watcher first saw it dead), and no attempt
//!   number was started by two processes;
//! - no job ran to completion twice, and a cancelled job started nothing
//!   after its cancel was acknowledged;
//! - every acknowledged job reached exactly one terminal state, the same on
//!   every replica, and never left it;
//! - no reservation is held by a job that is not running (an Assigned or
//!   Running job with no live process), and no process runs for a job the
//!   coordinator does not think is running there (an orphan);
//! - no node whose agent is dead is left anything but Down.
//!
//! It also counts the extra work faults caused. The checks are a pure
//! function of [`Ground`], tested as data below.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use anyhow::Context;
use gantry_coordinator::domain::{JobRecord, JobState};
use gantry_coordinator::store::Store;
use gantry_scheduler::JobId;

use crate::check::ReplicaState;
use crate::ledger::Execution;

/// Events read back from a replica at most (the nemesis writes far fewer).
const MAX_EVENTS: usize = 10_000_000;

/// What the checker needs of one replica's storage.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// Its data directory, for messages.
    pub replica: String,
    /// Last applied Raft index.
    pub applied: u64,
    /// Every job.
    pub jobs: BTreeMap<JobId, JobRecord>,
    /// Nodes committed Down.
    pub down_nodes: BTreeSet<String>,
    /// How many times each job entered a terminal state (event history).
    pub terminal_entries: BTreeMap<JobId, u32>,
    /// Jobs whose history moves on after a terminal state.
    pub left_terminal: BTreeSet<JobId>,
}

impl Stored {
    /// Reads what the checker needs from a replica read by
    /// [`crate::check::read_replicas`] (the process must be stopped).
    pub fn read(replica: &ReplicaState) -> anyhow::Result<Stored> {
        let store =
            Store::open(&replica.dir).with_context(|| format!("open {}", replica.dir.display()))?;
        let events = store.events_since(0, MAX_EVENTS)?;
        let mut history: BTreeMap<JobId, Vec<JobState>> = BTreeMap::new();
        for event in events {
            history.entry(event.job_id).or_default().push(event.state);
        }
        let mut stored = Stored {
            replica: name_of(&replica.dir),
            applied: replica.applied,
            jobs: replica.jobs.iter().map(|j| (j.id, j.clone())).collect(),
            down_nodes: replica
                .state()
                .nodes()
                .filter(|n| n.down)
                .map(|n| n.name.clone())
                .collect(),
            ..Stored::default()
        };
        for (job, states) in history {
            let mut entries = 0;
            let mut previous: Option<JobState> = None;
            for state in states {
                if previous.is_some_and(|p| p.is_terminal() && p != state) {
                    stored.left_terminal.insert(job);
                }
                if state.is_terminal() && previous != Some(state) {
                    entries += 1;
                }
                previous = Some(state);
            }
            stored.terminal_entries.insert(job, entries);
        }
        Ok(stored)
    }
}

fn name_of(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into())
}

/// Everything the checker judges.
pub struct Ground<'a> {
    /// Every process the ledger saw.
    pub executions: &'a [Execution],
    /// Acknowledged jobs, with how many first attempts fail by design.
    pub acknowledged: &'a BTreeMap<JobId, u32>,
    /// Acknowledged cancels: job and when the acknowledgement came (ms).
    pub cancels: &'a BTreeMap<JobId, u64>,
    /// Every replica's storage, read after the cluster went quiet.
    pub stored: &'a [Stored],
    /// Nodes whose agent was dead at the end.
    pub dead_nodes: &'a [String],
    /// When the cluster went quiet (bounds the extra work of a process
    /// never seen to end).
    pub end_ms: u64,
}

/// One broken promise, with what proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two processes of one job ran at the same time.
    Overlap {
        /// Job.
        job: JobId,
        /// The one that started first.
        first: Box<Execution>,
        /// The other.
        second: Box<Execution>,
    },
    /// One attempt number was started by more than one process.
    AttemptStartedTwice {
        /// Job.
        job: JobId,
        /// Every process of that attempt.
        runs: Vec<Execution>,
    },
    /// A job ran to successful completion more than once.
    CompletedTwice {
        /// Job.
        job: JobId,
        /// Every successful run.
        runs: Vec<Execution>,
    },
    /// A process started after the job's cancel was acknowledged.
    StartedAfterCancel {
        /// Job.
        job: JobId,
        /// When the cancel was acknowledged.
        cancelled_ms: u64,
        /// The process.
        run: Box<Execution>,
    },
    /// An acknowledged job is missing from a replica.
    Missing {
        /// Job.
        job: JobId,
        /// Replica.
        replica: String,
    },
    /// The replicas did not reach the same applied index.
    NotConverged {
        /// (replica, applied index).
        applied: Vec<(String, u64)>,
    },
    /// Replicas disagree on a job's state.
    Disagree {
        /// Job.
        job: JobId,
        /// (replica, state).
        states: Vec<(String, JobState)>,
    },
    /// A job holds a reservation while no process of it runs.
    LeakedReservation {
        /// Job.
        job: JobId,
        /// Its state.
        state: JobState,
        /// (node, attempt) the reservation is for.
        holder: (String, u32),
    },
    /// A job did not reach a terminal state by the time the cluster should
    /// have been quiet.
    NotTerminal {
        /// Job.
        job: JobId,
        /// Its state.
        state: JobState,
        /// Attempts it had.
        attempts: usize,
        /// A cancel of it was recorded.
        cancel_requested: bool,
    },
    /// A job entered a terminal state other than exactly once, or left one.
    TerminalHistory {
        /// Job.
        job: JobId,
        /// Replica.
        replica: String,
        /// Entries into a terminal state.
        entries: u32,
        /// It moved on after a terminal state.
        left: bool,
    },
    /// A job is recorded succeeded but no process of it ran to success.
    SucceededWithoutRun {
        /// Job.
        job: JobId,
    },
    /// A process still ran at the end for a job that its coordinator does
    /// not think runs there.
    Orphan {
        /// The process.
        run: Box<Execution>,
        /// The job's state (None: unknown job).
        state: Option<JobState>,
    },
    /// A node whose agent is dead was not committed Down.
    NodeNotDown {
        /// Node.
        node: String,
        /// Replica.
        replica: String,
    },
    /// The replication checker ([`crate::check::check_replicas`]) failed.
    Replicas(String),
}

fn runs(runs: &[Execution]) -> String {
    runs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Violation::*;
        match self {
            Overlap { job, first, second } => write!(
                f,
                "job {job}: two processes at the same time: {first} | {second}"
            ),
            AttemptStartedTwice { job, runs: r } => {
                write!(f, "job {job}: one attempt started twice: {}", runs(r))
            }
            CompletedTwice { job, runs: r } => {
                write!(
                    f,
                    "job {job}: ran to completion {} times: {}",
                    r.len(),
                    runs(r)
                )
            }
            StartedAfterCancel {
                job,
                cancelled_ms,
                run,
            } => write!(
                f,
                "job {job}: started after its cancel was acknowledged at {cancelled_ms}: {run}"
            ),
            Missing { job, replica } => {
                write!(f, "job {job}: acknowledged but missing on {replica}")
            }
            NotConverged { applied } => write!(f, "replicas did not converge: {applied:?}"),
            Disagree { job, states } => write!(f, "job {job}: replicas disagree: {states:?}"),
            LeakedReservation { job, state, holder } => write!(
                f,
                "job {job}: {state} on {} attempt {} holds its reservation but no process of it runs",
                holder.0, holder.1
            ),
            NotTerminal {
                job,
                state,
                attempts,
                cancel_requested,
            } => write!(
                f,
                "job {job}: still {state} after {attempts} attempts{} when the cluster should be quiet",
                if *cancel_requested {
                    ", cancel requested,"
                } else {
                    ""
                }
            ),
            TerminalHistory {
                job,
                replica,
                entries,
                left,
            } => write!(
                f,
                "job {job}: on {replica} entered a terminal state {entries} times{}",
                if *left { " and left it" } else { "" }
            ),
            SucceededWithoutRun { job } => {
                write!(
                    f,
                    "job {job}: recorded succeeded, but no process of it exited 0"
                )
            }
            Orphan { run, state } => write!(
                f,
                "job {}: process still running at the end, job {}: {run}",
                run.job,
                state.map_or("unknown".to_string(), |s| s.to_string())
            ),
            NodeNotDown { node, replica } => {
                write!(f, "node {node}: agent dead but not Down on {replica}")
            }
            Replicas(error) => write!(f, "replicas: {error}"),
        }
    }
}

/// Work that ran because of faults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraWork {
    /// Jobs started more often than their designed failures explain.
    pub started_more_than_once: usize,
    /// Jobs that ran to successful completion more than once.
    pub completed_more_than_once: usize,
    /// Processes beyond one per designed failing attempt plus one run.
    pub extra_executions: usize,
    /// Their run time, ms (a process never seen to end counts to `end_ms`).
    pub extra_ms: u64,
}

/// The checker's finding.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Every violation.
    pub violations: Vec<Violation>,
    /// Extra work.
    pub extra: ExtraWork,
}

impl Verdict {
    /// Violations that are double runs (overlap, one attempt started twice,
    /// completed twice, started after cancel).
    pub fn double_runs(&self) -> usize {
        let jobs: BTreeSet<JobId> = self
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::Overlap { job, .. }
                | Violation::AttemptStartedTwice { job, .. }
                | Violation::CompletedTwice { job, .. }
                | Violation::StartedAfterCancel { job, .. } => Some(*job),
                _ => None,
            })
            .collect();
        jobs.len()
    }

    /// Leaked reservations.
    pub fn leaks(&self) -> usize {
        self.violations
            .iter()
            .filter(|v| matches!(v, Violation::LeakedReservation { .. }))
            .count()
    }
}

/// Checks `ground`; see the module documentation for what.
pub fn check(ground: &Ground) -> Verdict {
    let mut by_job: BTreeMap<JobId, Vec<&Execution>> = BTreeMap::new();
    for execution in ground.executions {
        by_job.entry(execution.job).or_default().push(execution);
    }
    let mut violations = Vec::new();
    for (job, runs) in &by_job {
        check_runs(
            *job,
            runs,
            ground.cancels.get(job).copied(),
            &mut violations,
        );
    }
    check_storage(ground, &by_job, &mut violations);
    Verdict {
        violations,
        extra: extra_work(ground, &by_job),
    }
}

fn check_runs(job: JobId, runs: &[&Execution], cancelled: Option<u64>, out: &mut Vec<Violation>) {
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.started_ms < b.until_ms() && b.started_ms < a.until_ms() {
                let (first, second) = if a.started_ms <= b.started_ms {
                    (a, b)
                } else {
                    (b, a)
                };
                out.push(Violation::Overlap {
                    job,
                    first: Box::new((*first).clone()),
                    second: Box::new((*second).clone()),
                });
            }
        }
    }
    let mut by_attempt: BTreeMap<u32, Vec<Execution>> = BTreeMap::new();
    for run in runs {
        by_attempt
            .entry(run.attempt)
            .or_default()
            .push((*run).clone());
    }
    for same in by_attempt.into_values().filter(|r| r.len() > 1) {
        out.push(Violation::AttemptStartedTwice { job, runs: same });
    }
    let succeeded: Vec<Execution> = runs
        .iter()
        .filter(|r| r.succeeded())
        .map(|r| (*r).clone())
        .collect();
    if succeeded.len() > 1 {
        out.push(Violation::CompletedTwice {
            job,
            runs: succeeded,
        });
    }
    if let Some(at) = cancelled {
        for run in runs.iter().filter(|r| r.started_ms > at) {
            out.push(Violation::StartedAfterCancel {
                job,
                cancelled_ms: at,
                run: Box::new((*run).clone()),
            });
        }
    }
}

fn check_storage(
    ground: &Ground,
    by_job: &BTreeMap<JobId, Vec<&Execution>>,
    out: &mut Vec<Violation>,
) {
    let Some(first) = ground.stored.first() else {
        return;
    };
    if ground.stored.iter().any(|s| s.applied != first.applied) {
        out.push(Violation::NotConverged {
            applied: ground
                .stored
                .iter()
                .map(|s| (s.replica.clone(), s.applied))
                .collect(),
        });
    }
    for job in ground.acknowledged.keys() {
        for stored in ground.stored {
            if !stored.jobs.contains_key(job) {
                out.push(Violation::Missing {
                    job: *job,
                    replica: stored.replica.clone(),
                });
            }
        }
    }
    let live = |job: JobId| {
        by_job
            .get(&job)
            .into_iter()
            .flatten()
            .filter(|r| r.alive_at_end)
    };
    for record in first.jobs.values() {
        let states: Vec<(String, JobState)> = ground
            .stored
            .iter()
            .filter_map(|s| Some((s.replica.clone(), s.jobs.get(&record.id)?.state)))
            .collect();
        if states.iter().any(|(_, s)| *s != record.state) {
            out.push(Violation::Disagree {
                job: record.id,
                states,
            });
        }
        let holder = record
            .current_attempt()
            .map(|a| (a.node.clone(), a.attempt));
        if record.state.is_active() && live(record.id).next().is_none() {
            out.push(Violation::LeakedReservation {
                job: record.id,
                state: record.state,
                holder: holder.clone().unwrap_or_default(),
            });
        } else if !record.state.is_terminal() {
            out.push(Violation::NotTerminal {
                job: record.id,
                state: record.state,
                attempts: record.attempts.len(),
                cancel_requested: record.cancel_requested,
            });
        }
        if record.state == JobState::Succeeded
            && !by_job
                .get(&record.id)
                .is_some_and(|r| r.iter().any(|r| r.succeeded()))
        {
            out.push(Violation::SucceededWithoutRun { job: record.id });
        }
        let holding = ground
            .stored
            .iter()
            .filter(|s| s.jobs.contains_key(&record.id));
        for stored in holding.filter(|_| record.state.is_terminal()) {
            let entries = stored
                .terminal_entries
                .get(&record.id)
                .copied()
                .unwrap_or(0);
            let left = stored.left_terminal.contains(&record.id);
            if entries != 1 || left {
                out.push(Violation::TerminalHistory {
                    job: record.id,
                    replica: stored.replica.clone(),
                    entries,
                    left,
                });
            }
        }
        for run in live(record.id) {
            let known = record.state.is_active()
                && holder.as_ref() == Some(&(run.node.clone(), run.attempt));
            if !known {
                out.push(Violation::Orphan {
                    run: Box::new((*run).clone()),
                    state: Some(record.state),
                });
            }
        }
    }
    for run in ground.executions.iter().filter(|r| r.alive_at_end) {
        if !first.jobs.contains_key(&run.job) {
            out.push(Violation::Orphan {
                run: Box::new(run.clone()),
                state: None,
            });
        }
    }
    for node in ground.dead_nodes {
        for stored in ground.stored {
            if !stored.down_nodes.contains(node) {
                out.push(Violation::NodeNotDown {
                    node: node.clone(),
                    replica: stored.replica.clone(),
                });
            }
        }
    }
}

/// Needed work per job: the first process of each attempt that fails by
/// design, and the first that succeeded (or, without a success, the last
/// one: a cancelled job's work is its user's choice). The rest is extra.
fn extra_work(ground: &Ground, by_job: &BTreeMap<JobId, Vec<&Execution>>) -> ExtraWork {
    let mut extra = ExtraWork::default();
    for (job, runs) in by_job {
        let failing = ground.acknowledged.get(job).copied().unwrap_or(0);
        let mut needed = BTreeSet::new();
        for attempt in 1..=failing {
            if let Some(i) = runs.iter().position(|r| r.attempt == attempt) {
                needed.insert(i);
            }
        }
        match runs.iter().position(|r| r.succeeded()) {
            Some(i) => needed.insert(i),
            None => needed.insert(runs.len() - 1),
        };
        if runs.len() > failing as usize + 1 {
            extra.started_more_than_once += 1;
        }
        if runs.iter().filter(|r| r.succeeded()).count() > 1 {
            extra.completed_more_than_once += 1;
        }
        for (_, run) in runs.iter().enumerate().filter(|(i, _)| !needed.contains(i)) {
            extra.extra_executions += 1;
            extra.extra_ms += run
                .until_ms()
                .min(ground.end_ms)
                .saturating_sub(run.started_ms);
        }
    }
    extra
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
pub(crate) mod tests;
