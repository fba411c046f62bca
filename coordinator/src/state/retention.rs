//! Retention of finished work: which finished jobs leave hard state (into
//! the on-disk history, [`crate::store`]), and the compaction floor of the
//! event history.
//!
//! The decision is made inside `apply`, after every command that applied,
//! from the command's own `at_ms` and the [`RetentionPolicy`] held in hard
//! state (set by `Command::SetRetention`, proposed by a leader whose flags
//! differ): every replica applies the same commands in the same order, so
//! every replica retires the same jobs, whatever its own clock or flags.
//!
//! Only Succeeded and Cancelled jobs (a job dropped from the dead-letter
//! queue is Cancelled) are ever retired. A finished job that a job not yet
//! finished depends on (its `after:` edges) is held until every dependant
//! has finished: a pending dependant waits for its dependencies to be in
//! hard state, and a dependency missing would hold it for ever. The jobs of
//! a repeating pipeline's latest run are held while its loop goes on: the
//! next run is made from their records. Pending,
//! assigned, running, failed (in back-off), lost, blocked and dead-lettered
//! jobs are never retired.

use gantry_scheduler::JobId;
use serde::{Deserialize, Serialize};

use super::StateMachine;
use crate::domain::{JobRecord, JobState};

/// How long finished work is kept, in hard state and in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// A finished job leaves hard state this long after it finished
    /// (`--job-retention`).
    pub job_retention_ms: u64,
    /// Past this many finished jobs in hard state, the oldest leave first
    /// (`--max-retained-jobs`).
    pub max_retained_jobs: u64,
    /// A retired job leaves the history this long after it finished
    /// (`--history-retention`).
    pub history_retention_ms: u64,
    /// Past this many bytes of history, the oldest records leave first
    /// (`--history-max-bytes`).
    pub history_max_bytes: u64,
}

/// Default [`RetentionPolicy::job_retention_ms`]: one day, as Nomad's job
/// garbage collection and Kubernetes' TTL-after-finished.
pub const DEFAULT_JOB_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Default [`RetentionPolicy::max_retained_jobs`].
pub const DEFAULT_MAX_RETAINED_JOBS: u64 = 100_000;
/// Default [`RetentionPolicy::history_retention_ms`]: 30 days.
pub const DEFAULT_HISTORY_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;
/// Default [`RetentionPolicy::history_max_bytes`]: 1 GiB.
pub const DEFAULT_HISTORY_MAX_BYTES: u64 = 1 << 30;

/// At most this many jobs are retired by one apply, so that one command
/// never stalls the replica (the next command goes on where it stopped).
pub const RETIRE_BATCH: usize = 1_000;

/// Events kept per retained finished job, at most: past
/// `EVENTS_PER_RETAINED_JOB * max_retained_jobs` events, the floor rises
/// whatever jobs are still in hard state (a job held for months in the
/// dead-letter queue must not pin every event after it).
pub const EVENTS_PER_RETAINED_JOB: u64 = 4;

/// The floor rises by at most this many events per apply, so one command
/// never deletes an unbounded range (a store from before retention may
/// hold millions of events; the next commands go on).
pub const MAX_FLOOR_STEP: u64 = 10_000;

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            job_retention_ms: DEFAULT_JOB_RETENTION_MS,
            max_retained_jobs: DEFAULT_MAX_RETAINED_JOBS,
            history_retention_ms: DEFAULT_HISTORY_RETENTION_MS,
            history_max_bytes: DEFAULT_HISTORY_MAX_BYTES,
        }
    }
}

impl RetentionPolicy {
    /// Checks the bounds; the error names the flag and the reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.job_retention_ms < 1000 {
            return Err("--job-retention: must be at least 1s".into());
        }
        if self.max_retained_jobs == 0 {
            return Err("--max-retained-jobs: must be at least 1".into());
        }
        if self.history_retention_ms < 1000 {
            return Err("--history-retention: must be at least 1s".into());
        }
        if self.history_max_bytes < 1 << 20 {
            return Err("--history-max-bytes: must be at least 1MiB".into());
        }
        Ok(())
    }

    /// Most events kept in hard state.
    pub fn max_events(&self) -> u64 {
        self.max_retained_jobs
            .saturating_mul(EVENTS_PER_RETAINED_JOB)
    }
}

/// Whether a job in `state` may ever leave hard state.
pub fn retirable_state(state: JobState) -> bool {
    matches!(state, JobState::Succeeded | JobState::Cancelled)
}

/// Whether the oldest retirable job (finished at `finished_at_ms`) leaves
/// now, at `at_ms`, with `retained` finished jobs in hard state: when its
/// retention is over, or when more finished jobs are retained than allowed.
pub fn due(policy: &RetentionPolicy, finished_at_ms: u64, retained: u64, at_ms: u64) -> bool {
    finished_at_ms.saturating_add(policy.job_retention_ms) <= at_ms
        || retained > policy.max_retained_jobs
}

/// The event compaction floor after an apply: every event below it leaves
/// hard state. It never goes down; it rises to the submission event of the
/// oldest job still in hard state (every event before that one is about a
/// job already retired), and to keep at most [`RetentionPolicy::max_events`].
/// `oldest_submit_event` is `None` when no job is in hard state, and 0 for
/// a job stored before submission events were recorded (no rise). It rises
/// by at most [`MAX_FLOOR_STEP`] at a time.
pub fn event_floor(
    policy: &RetentionPolicy,
    floor: u64,
    oldest_submit_event: Option<u64>,
    next_event_index: u64,
) -> u64 {
    let by_jobs = oldest_submit_event.unwrap_or(next_event_index);
    let by_count = next_event_index.saturating_sub(policy.max_events());
    floor
        .max(by_jobs)
        .max(by_count)
        .min(next_event_index)
        .min(floor.saturating_add(MAX_FLOOR_STEP))
}

impl StateMachine {
    /// The retention policy in force (hard state).
    pub fn retention(&self) -> &RetentionPolicy {
        &self.retention
    }

    /// Sets the policy when restoring from storage.
    pub fn set_retention(&mut self, policy: RetentionPolicy) {
        self.retention = policy;
    }

    /// The lowest event index still stored (hard state).
    pub fn event_floor(&self) -> u64 {
        self.event_floor
    }

    /// Raises the floor when restoring from storage.
    pub fn set_event_floor(&mut self, floor: u64) {
        self.event_floor = self.event_floor.max(floor);
        self.next_event_index = self.next_event_index.max(floor);
    }

    /// Finished jobs in hard state (retirable now or held by a dependant).
    pub fn retained_finished(&self) -> u64 {
        (self.finished.len() + self.held.len()) as u64
    }

    /// Whether a finished job's retention is over at `now_ms` (the leader
    /// then proposes `Command::Retire`, so an idle cluster retires too).
    pub fn retirement_due(&self, now_ms: u64) -> bool {
        self.finished.first().is_some_and(|(finished_at, _)| {
            due(
                &self.retention,
                *finished_at,
                self.retained_finished(),
                now_ms,
            )
        })
    }

    /// Whether a finished job is held by a dependant not finished yet.
    pub fn is_held(&self, id: JobId) -> bool {
        self.held.contains(&id)
    }

    /// Files a finished job under `finished` or `held`, and releases the
    /// jobs it depends on that it alone held (called from `index_job`).
    pub(super) fn index_finished(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if !retirable_state(job.state) {
            return;
        }
        let key = (job.updated_at_ms, id);
        let deps = job.depends_on.clone();
        if self.unfinished_dependant(id) || self.loop_holds(id) {
            self.held.insert(id);
        } else {
            self.finished.insert(key);
        }
        for dep in deps {
            if self.held.contains(&dep) && !self.unfinished_dependant(dep) && !self.loop_holds(dep)
            {
                self.held.remove(&dep);
                if let Some(d) = self.jobs.get(&dep) {
                    self.finished.insert((d.updated_at_ms, dep));
                }
            }
        }
    }

    /// Takes a job out of `finished` and `held` (called from `unindex_job`).
    pub(super) fn unindex_finished(&mut self, id: JobId) {
        if let Some(job) = self.jobs.get(&id) {
            self.finished.remove(&(job.updated_at_ms, id));
        }
        self.held.remove(&id);
    }

    fn unfinished_dependant(&self, id: JobId) -> bool {
        self.dependants.get(&id).is_some_and(|children| {
            children.iter().any(|child| {
                self.jobs
                    .get(child)
                    .is_some_and(|j| !retirable_state(j.state))
            })
        })
    }

    /// Retires what is due at `at_ms` (at most [`RETIRE_BATCH`], oldest
    /// first) and raises the event floor. Run after every applied command.
    pub(super) fn retire_due(&mut self, at_ms: u64) {
        for _ in 0..RETIRE_BATCH {
            let Some(&(finished_at, id)) = self.finished.first() else {
                break;
            };
            if !due(
                &self.retention,
                finished_at,
                self.retained_finished(),
                at_ms,
            ) {
                break;
            }
            self.retire(id);
        }
        let oldest = self.jobs.values().next().map(|j| j.submit_event);
        let floor = event_floor(
            &self.retention,
            self.event_floor,
            oldest,
            self.next_event_index,
        );
        if floor != self.event_floor {
            let below = self
                .changes
                .event_floor
                .map_or(self.event_floor, |(from, _)| from);
            self.changes.event_floor = Some((below, floor));
            self.event_floor = floor;
        }
        self.changes.at_ms = at_ms;
    }

    /// Removes one finished job from hard state and every index; the
    /// record goes to the change set, for the store to move into history.
    fn retire(&mut self, id: JobId) {
        self.unindex_job(id);
        self.unindex_finished(id);
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.dependants.remove(&id);
        for dep in &job.depends_on {
            if let Some(children) = self.dependants.get_mut(dep) {
                children.retain(|c| *c != id);
                if children.is_empty() {
                    self.dependants.remove(dep);
                }
            }
        }
        self.forget_submission(&job);
        self.changes.jobs.remove(&id);
        self.changes.retired.push(*job);
    }

    /// Forgets a submission key once every job it named has been retired
    /// (a key outlives no job of its own: the submissions map is bounded by
    /// the jobs in hard state).
    fn forget_submission(&mut self, job: &JobRecord) {
        let Some(key) = self.keyed.remove(&job.id) else {
            return;
        };
        let live = self
            .submissions
            .get(&key)
            .is_some_and(|ids| ids.iter().any(|i| self.jobs.contains_key(i)));
        if !live {
            self.submissions.remove(&key);
            self.changes.submissions_removed.push(key);
        }
    }
}

#[cfg(test)]
mod tests;
