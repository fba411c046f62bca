//! The state machine: hard state in memory, changed only by
//! [`StateMachine::apply`]. Each apply records what it touched in a
//! [`ChangeSet`] that the store persists before anyone is acknowledged.
//!
//! Invariants (checked by `debug_assert!` and by tests):
//! - a job is in `active` iff its state is Assigned or Running, and then its
//!   latest attempt's reservation is counted in `gpu_usage` exactly once;
//! - per GPU, the sum of reservations never exceeds its total memory, and an
//!   exclusive GPU has exactly one job;
//! - an exclusive named lock has one holder and no shared holders.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gantry_scheduler::{JobId, LockHolders};

mod preempt;
mod quarantine;

use crate::command::Command;
use crate::dag::DependencyError;
use crate::domain::{EventRecord, JobRecord, JobState, NodeRecord, RunPolicy};

mod attempts;
mod drain;
mod estimates;
mod gang;
mod gpu_health;
mod index;
mod pipeline_loop;
mod placement;
mod retention;
mod submit;

pub use estimates::{Estimate, MAX_ESTIMATES, TOUCH_INTERVAL_MS};
pub use gang::GangSettle;
pub use pipeline_loop::{LoopStatus, loop_status};
pub use retention::{RetentionPolicy, due as retirement_due, event_floor, retirable_state};

/// Hard-state bookkeeping of one GPU, derived from active jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuUsage {
    /// Sum of reservations.
    pub reserved: u64,
    /// Jobs holding it.
    pub jobs: u32,
    /// Held by an exclusive job.
    pub exclusive: bool,
}

/// Host resources reserved on a node, derived from active jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// CPU thousandths.
    pub cpu_millis: u64,
    /// RAM.
    pub memory: u64,
    /// Disk.
    pub disk: u64,
}

/// What one apply touched, for the store to persist.
#[derive(Debug, Default)]
pub struct ChangeSet {
    /// Jobs written.
    pub jobs: BTreeSet<JobId>,
    /// Nodes written.
    pub nodes: BTreeSet<String>,
    /// New events.
    pub events: Vec<EventRecord>,
    /// New submission keys.
    pub submissions: Vec<(String, Vec<JobId>)>,
    /// Learned estimates written.
    pub estimates: BTreeSet<String>,
    /// The leader term changed.
    pub leader_term: bool,
    /// Jobs retired from hard state, for the store to move into history.
    pub retired: Vec<JobRecord>,
    /// Submission keys forgotten (every job they named was retired).
    pub submissions_removed: Vec<String>,
    /// The event floor rose from the first to the second index.
    pub event_floor: Option<(u64, u64)>,
    /// Pipelines whose latest run number changed.
    pub pipelines: BTreeSet<String>,
    /// The retention policy changed.
    pub retention: bool,
    /// The applied command's own time (history pruning is decided from it).
    pub at_ms: u64,
}

impl ChangeSet {
    /// Adds the changes that come after these (the next command of an
    /// entry, or the next entry while the store holds writes back). Every
    /// field is named, so a new kind of change cannot be left out of the
    /// storage batch unnoticed.
    pub fn absorb(&mut self, from: ChangeSet) {
        let into = self;
        let ChangeSet {
            jobs,
            nodes,
            events,
            submissions,
            estimates,
            leader_term,
            retired,
            submissions_removed,
            event_floor,
            pipelines,
            retention,
            at_ms,
        } = from;
        into.jobs.extend(jobs);
        into.nodes.extend(nodes);
        into.events.extend(events);
        // The store writes keys before it removes them: a key added and
        // removed (or removed and added again) within one entry must end as
        // the later command left it.
        for (key, _) in &submissions {
            into.submissions_removed.retain(|removed| removed != key);
        }
        into.submissions.extend(submissions);
        into.submissions
            .retain(|(key, _)| !submissions_removed.contains(key));
        into.submissions_removed.extend(submissions_removed);
        into.estimates.extend(estimates);
        into.leader_term |= leader_term;
        // A retired job is removed after the jobs written are stored, and it
        // is no longer in state, so an earlier write of it is skipped.
        into.retired.extend(retired);
        if let Some((low, high)) = event_floor {
            // The store deletes the stored events below the floor; events of
            // this entry below it must not be written either.
            into.events.retain(|event| event.index >= high);
            into.event_floor = Some((into.event_floor.map_or(low, |(first, _)| first), high));
        }
        into.pipelines.extend(pipelines);
        into.retention |= retention;
        // History pruning is decided from the latest command's time.
        into.at_ms = into.at_ms.max(at_ms);
    }
}

/// What an apply produced, for the caller (reply to clients, messages to agents).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// New (or, for a repeated key, earlier) job ids.
    Submitted(Vec<JobId>),
    /// Placements that were applied, and refused ones with the reason.
    Assigned {
        /// Applied: (job, attempt).
        applied: Vec<(JobId, u32)>,
        /// Refused: (job, reason).
        refused: Vec<(JobId, String)>,
    },
    /// A cancel was recorded; `stop` names the running attempt to stop.
    CancelRequested {
        /// State after the request.
        state: JobState,
        /// (node, attempt) to tell to stop.
        stop: Option<(String, u32)>,
    },
    /// The report referred to an attempt that is not current: the agent must stop it.
    Stale,
    /// A lost attempt was revived; `withdrawn` names the replacement to stop.
    Revived {
        /// (node, attempt) of the withdrawn replacement, if it was assigned.
        withdrawn: Option<(String, u32)>,
    },
    /// Attempts on a drained node past its deadline were marked preempted;
    /// `stop` names those its agent must stop (empty: nothing was due).
    Preempted {
        /// The drained node.
        node: String,
        /// (job, attempt) to tell the node's agent to stop.
        stop: Vec<(JobId, u32)>,
    },
    /// A gang was settled (`Command::GangStop`); `stop` names the
    /// members' attempts their agents must stop.
    GangStopped {
        /// (node, job, attempt) to tell to stop.
        stop: Vec<(String, JobId, u32)>,
    },
    /// Applied with nothing to report.
    Done,
}

/// Refusals of `apply` that change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ApplyError {
    /// No such job.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// No such node.
    #[error("node {0:?} not found")]
    NodeNotFound(String),
    /// The job already ended.
    #[error("job {id} already ended ({state})")]
    AlreadyTerminal {
        /// Job.
        id: JobId,
        /// Its state.
        state: JobState,
    },
    /// The job is not in the dead-letter queue.
    #[error("job {id} is not in the dead-letter queue ({state})")]
    NotDeadLettered {
        /// Job.
        id: JobId,
        /// Its state.
        state: JobState,
    },
    /// A replacement spec for `dlq retry` changes what the job is.
    #[error("spec: {0}")]
    SpecChange(String),
    /// The `after:` graph of a submission is refused.
    #[error(transparent)]
    Dependency(#[from] DependencyError),
    /// A quarantine the fleet cannot afford, or with an end before its start.
    #[error("quarantine of node {node:?} refused: {reason}")]
    QuarantineRefused {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A GPU health change names a GPU the node does not have.
    #[error("node {node:?} has no gpu {gpu}")]
    GpuNotFound {
        /// The node.
        node: String,
        /// The GPU index.
        gpu: u32,
    },
}

/// Hard state of the cluster.
#[derive(Debug, Default)]
pub struct StateMachine {
    /// Boxed: a job record is about 800 bytes, and B-tree nodes hold their
    /// values inline and half full after in-order inserts, so unboxed the
    /// map cost about 1,500 bytes per job (heaptrack at 100,000 jobs).
    jobs: BTreeMap<JobId, Box<JobRecord>>,
    nodes: BTreeMap<String, NodeRecord>,
    submissions: HashMap<String, Vec<JobId>>,
    next_job_id: JobId,
    next_event_index: u64,
    // Derived indexes, rebuilt on load.
    pending: BTreeSet<JobId>,
    active: BTreeSet<JobId>,
    by_node: BTreeMap<String, BTreeSet<JobId>>,
    gpu_usage: HashMap<(String, u32), GpuUsage>,
    host_usage: HashMap<String, HostUsage>,
    locks: BTreeMap<String, LockHolders>,
    dependants: BTreeMap<JobId, Vec<JobId>>,
    /// Failed jobs waiting for their back-off.
    backing_off: BTreeSet<JobId>,
    /// Learned GPU-memory estimates per job class (hard state, bounded).
    estimates: estimates::Estimates,
    /// Latest run number per pipeline name (derived from jobs).
    pipeline_runs: BTreeMap<String, u32>,
    /// Highest leader term of an applied plan.
    leader_term: u64,
    /// Retention of finished work (hard state, see `state/retention.rs`).
    retention: RetentionPolicy,
    /// Events below this index have left hard state.
    event_floor: u64,
    /// Finished jobs no unfinished job depends on, oldest first (derived).
    finished: BTreeSet<(u64, JobId)>,
    /// Finished jobs held by a dependant not finished yet (derived).
    held: BTreeSet<JobId>,
    /// The submission key of each job submitted with one (derived).
    keyed: HashMap<JobId, String>,
    /// Gangs (rank-0 id) and their members not finished (derived).
    live_gangs: BTreeMap<JobId, u32>,
    changes: ChangeSet,
}

/// How an attempt ended, as reported by its agent.
#[derive(Debug, Clone, Default)]
pub struct ExitReport {
    /// Exit code.
    pub code: Option<i32>,
    /// Killing signal.
    pub signal: Option<i32>,
    /// Short error for people.
    pub error: String,
    /// Stopped because of a cancel.
    pub cancelled: bool,
    /// Died of GPU out-of-memory.
    pub oom: bool,
    /// Last 64 KiB of stderr.
    pub output_tail: String,
    /// Highest GPU memory seen.
    pub peak_gpu_memory: u64,
}

impl StateMachine {
    /// Rebuilds a state machine from stored records.
    pub fn restore(
        jobs: Vec<JobRecord>,
        nodes: Vec<NodeRecord>,
        submissions: Vec<(String, Vec<JobId>)>,
        estimates: Vec<(String, Estimate)>,
        next_event_index: u64,
    ) -> StateMachine {
        let mut sm = StateMachine {
            next_job_id: jobs.iter().map(|j| j.id).max().unwrap_or(0) + 1,
            next_event_index: next_event_index.max(1),
            event_floor: 1,
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            estimates: estimates::Estimates::restore(estimates),
            ..StateMachine::default()
        };
        for (key, ids) in submissions {
            for id in &ids {
                sm.keyed.insert(*id, key.clone());
            }
            sm.submissions.insert(key, ids);
        }
        // Every edge first: whether a finished job is held depends on its
        // dependants, which come after it.
        for job in &jobs {
            for dep in &job.depends_on {
                sm.dependants.entry(*dep).or_default().push(job.id);
            }
        }
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        for job in jobs {
            if !job.pipeline.is_empty() {
                let run = sm.pipeline_runs.entry(job.pipeline.clone()).or_default();
                *run = (*run).max(job.run);
            }
            sm.jobs.insert(job.id, Box::new(job));
        }
        for id in ids {
            sm.index_job(id);
        }
        sm
    }

    /// Raises the next job id when restoring (the highest job may have
    /// been retired).
    pub fn set_next_job_id(&mut self, next: JobId) {
        self.next_job_id = self.next_job_id.max(next);
    }

    /// The next job id to be given.
    pub fn next_job_id(&self) -> JobId {
        self.next_job_id
    }

    /// Raises a pipeline's latest run when restoring (its jobs may have
    /// been retired).
    pub fn set_pipeline_run(&mut self, name: &str, run: u32) {
        let latest = self.pipeline_runs.entry(name.to_string()).or_default();
        *latest = (*latest).max(run);
    }

    /// Latest run number of every pipeline.
    pub fn pipeline_runs(&self) -> &BTreeMap<String, u32> {
        &self.pipeline_runs
    }

    /// An empty state machine.
    pub fn new() -> StateMachine {
        StateMachine::restore(Vec::new(), Vec::new(), Vec::new(), Vec::new(), 1)
    }

    /// Takes the changes recorded since the last call.
    pub fn take_changes(&mut self) -> ChangeSet {
        std::mem::take(&mut self.changes)
    }

    /// A job by id.
    pub fn job(&self, id: JobId) -> Option<&JobRecord> {
        self.jobs.get(&id).map(|job| &**job)
    }

    /// All jobs, by id.
    pub fn jobs(&self) -> impl DoubleEndedIterator<Item = &JobRecord> {
        self.jobs.values().map(|job| &**job)
    }

    /// Pending jobs, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &JobRecord> {
        self.pending.iter().filter_map(|id| self.job(*id))
    }

    /// Jobs holding resources, by id.
    pub fn active(&self) -> impl Iterator<Item = &JobRecord> {
        self.active.iter().filter_map(|id| self.job(*id))
    }

    /// Active jobs on one node.
    pub fn jobs_on(&self, node: &str) -> impl Iterator<Item = &JobRecord> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.job(*id))
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// Reservation bookkeeping of a GPU.
    pub fn gpu_usage(&self, node: &str, gpu: u32) -> GpuUsage {
        self.gpu_usage
            .get(&(node.to_string(), gpu))
            .copied()
            .unwrap_or_default()
    }

    /// Host reservations of a node.
    pub fn host_usage(&self, node: &str) -> HostUsage {
        self.host_usage.get(node).copied().unwrap_or_default()
    }

    /// Named locks currently held.
    pub fn locks(&self) -> &BTreeMap<String, LockHolders> {
        &self.locks
    }

    /// Highest leader term of an applied plan (hard state).
    pub fn leader_term(&self) -> u64 {
        self.leader_term
    }

    /// Sets the leader term when restoring from storage.
    pub fn set_leader_term(&mut self, term: u64) {
        self.leader_term = term;
    }

    /// Submission keys, for snapshots.
    pub fn submissions(&self) -> impl Iterator<Item = (&String, &Vec<JobId>)> {
        self.submissions.iter()
    }

    /// Failed jobs waiting for their back-off.
    pub fn backing_off(&self) -> impl Iterator<Item = &JobRecord> {
        self.backing_off.iter().filter_map(|id| self.job(*id))
    }

    /// Learned GPU-memory estimate of a job class.
    pub fn estimate(&self, class: &str) -> Option<u64> {
        self.estimates.get(class).map(|e| e.bytes)
    }

    /// All learned estimates, by class.
    pub fn estimates(&self) -> &BTreeMap<String, Estimate> {
        self.estimates.all()
    }

    /// Jobs in the dead-letter queue.
    pub fn dead_lettered(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs
            .values()
            .map(|job| &**job)
            .filter(|j| j.state == JobState::DeadLettered)
    }

    /// The jobs of one pipeline run in hard state (`run` 0 = the latest;
    /// retired jobs of the run are in the store's history).
    pub fn pipeline_jobs(&self, name: &str, run: u32) -> (u32, Vec<&JobRecord>) {
        let run = if run == 0 {
            self.pipeline_runs.get(name).copied().unwrap_or(0)
        } else {
            run
        };
        let jobs = self
            .jobs
            .values()
            .map(|job| &**job)
            .filter(|j| j.pipeline == name && j.run == run)
            .collect();
        (run, jobs)
    }

    /// Index of the next event to be written.
    pub fn next_event_index(&self) -> u64 {
        self.next_event_index
    }

    /// Applies one command, then retires the finished jobs due at its
    /// time ([`retention`]). An `Err` changes nothing.
    pub fn apply(&mut self, command: Command) -> Result<Outcome, ApplyError> {
        let at_ms = command.at_ms();
        let outcome = self.apply_command(command)?;
        self.retire_due(at_ms);
        Ok(outcome)
    }

    fn apply_command(&mut self, command: Command) -> Result<Outcome, ApplyError> {
        match command {
            Command::Submit {
                at_ms,
                key,
                jobs,
                pipeline,
                owner,
            } => self.submit(at_ms, key, jobs, pipeline, owner, RunPolicy::default()),
            Command::SubmitLoop {
                at_ms,
                key,
                jobs,
                pipeline,
                owner,
                run_policy,
            } => self.submit(at_ms, key, jobs, Some(pipeline), owner, run_policy),
            Command::StopPipeline { at_ms, name } => {
                self.stop_pipeline(at_ms, &name);
                Ok(Outcome::Done)
            }
            Command::Requeue { at_ms, job } => {
                let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
                if record.state != JobState::Failed {
                    return Ok(Outcome::Done); // already moved on (cancelled, retried)
                }
                if record.cancel_requested {
                    // A cancel recorded during back-off (by a version that
                    // kept the job Failed) ends it here: a cancelled job is
                    // never placed again.
                    self.transition(at_ms, job, JobState::Cancelled, "cancelled by user".into());
                    self.block_dependants(at_ms, job);
                    return Ok(Outcome::Done);
                }
                self.transition(at_ms, job, JobState::Pending, "back-off over".into());
                Ok(Outcome::Done)
            }
            Command::DlqRetry { at_ms, job, spec } => self.dlq_retry(at_ms, job, spec),
            Command::DlqDrop { at_ms, job } => {
                let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
                if record.state != JobState::DeadLettered {
                    return Err(ApplyError::NotDeadLettered {
                        id: job,
                        state: record.state,
                    });
                }
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.terminal_reason = "dropped from the dead-letter queue".into();
                }
                self.transition(
                    at_ms,
                    job,
                    JobState::Cancelled,
                    "dropped from the dead-letter queue".into(),
                );
                Ok(Outcome::Done)
            }
            Command::ReviveAttempt {
                at_ms,
                job,
                attempt,
                node,
            } => self.revive(at_ms, job, attempt, &node),
            Command::RegisterNode {
                at_ms,
                name,
                address,
                labels,
                gpus,
                cpu_millis,
                memory_total,
                disk_total,
            } => {
                let record = match self.nodes.remove(&name) {
                    Some(old) => NodeRecord {
                        address,
                        labels,
                        gpus,
                        cpu_millis,
                        memory_total,
                        disk_total,
                        down: false,
                        ..old
                    },
                    None => NodeRecord {
                        name: name.clone(),
                        address,
                        labels,
                        gpus,
                        cpu_millis,
                        memory_total,
                        disk_total,
                        draining: false,
                        drain_deadline_ms: None,
                        registered_at_ms: at_ms,
                        down: false,
                        quarantine: None,
                        gpu_faults: BTreeMap::new(),
                    },
                };
                self.nodes.insert(name.clone(), record);
                self.changes.nodes.insert(name);
                Ok(Outcome::Done)
            }
            Command::Assign {
                at_ms,
                placements,
                term,
            } => {
                // A plan made by a deposed leader is refused whole: a newer
                // leader's plan has already been applied.
                if term < self.leader_term {
                    let reason = format!(
                        "plan of term {term} is older than term {}",
                        self.leader_term
                    );
                    let refused = placements
                        .into_iter()
                        .map(|p| (p.job, reason.clone()))
                        .collect();
                    return Ok(Outcome::Assigned {
                        applied: Vec::new(),
                        refused,
                    });
                }
                if term > self.leader_term {
                    self.leader_term = term;
                    self.changes.leader_term = true;
                }
                Ok(self.assign(at_ms, placements))
            }
            Command::JobStarted {
                at_ms,
                job,
                attempt,
                node,
            } => self.started(at_ms, job, attempt, &node),
            Command::JobExited {
                at_ms,
                job,
                attempt,
                node,
                code,
                signal,
                error,
                cancelled,
                oom,
                output_tail,
                peak_gpu_memory,
            } => self.exited(
                at_ms,
                job,
                attempt,
                &node,
                ExitReport {
                    code,
                    signal,
                    error,
                    cancelled,
                    oom,
                    output_tail,
                    peak_gpu_memory,
                },
            ),
            Command::RequestCancel { at_ms, job } => self.request_cancel(at_ms, job),
            Command::AttemptLost {
                at_ms,
                job,
                attempt,
                reason,
            } => self.attempt_lost(at_ms, job, attempt, reason),
            Command::SetNodeDown { at_ms, node, down } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.clone()))?;
                record.down = down;
                self.changes.nodes.insert(node.clone());
                if down {
                    let lost: Vec<(JobId, u32)> = self
                        .jobs_on(&node)
                        .filter_map(|j| j.current_attempt().map(|a| (j.id, a.attempt)))
                        .collect();
                    for (job, attempt) in lost {
                        self.attempt_lost(at_ms, job, attempt, format!("node {node} is down"))?;
                    }
                }
                Ok(Outcome::Done)
            }
            Command::SetDrain {
                node,
                draining,
                deadline_ms,
                ..
            } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| ApplyError::NodeNotFound(node.clone()))?;
                record.draining = draining;
                if !draining {
                    record.drain_deadline_ms = None;
                } else if deadline_ms.is_some() {
                    record.drain_deadline_ms = deadline_ms;
                }
                self.changes.nodes.insert(node);
                Ok(Outcome::Done)
            }
            Command::PreemptDrained { at_ms, node } => self.preempt_drained(at_ms, node),
            Command::Quarantine {
                at_ms,
                node,
                until_ms,
                failures,
                reason,
                policy,
            } => self.quarantine(at_ms, node, until_ms, failures, reason, &policy),
            Command::ClearQuarantine { at_ms, node } => self.clear_quarantine(at_ms, node),
            Command::SetRetention { policy, .. } => {
                self.retention = policy;
                self.changes.retention = true;
                Ok(Outcome::Done)
            }
            Command::Retire { .. } => Ok(Outcome::Done),
            Command::Preempt {
                at_ms,
                job,
                node,
                victims,
                reason,
                until_ms,
            } => self.preempt(at_ms, job, node, victims, reason, until_ms),
            Command::SetGpuHealth {
                at_ms,
                node,
                gpu,
                fault,
                seen_healthy,
            } => self.set_gpu_health(at_ms, node, gpu, fault, seen_healthy),
            Command::GangStop { at_ms, gang } => Ok(self.gang_stop(at_ms, gang)),
        }
    }

    /// The submission keys seen, for persistence checks.
    pub fn submission(&self, key: &str) -> Option<&Vec<JobId>> {
        self.submissions.get(key)
    }
}
