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

use gantry_scheduler::{JobId, LockHolders, LockMode, Placement};

use crate::command::Command;
use crate::dag::{DependencyError, resolve_after};
use crate::domain::{
    AttemptOutcome, AttemptRecord, EventRecord, JobRecord, JobSpec, JobState, NodeRecord,
};

/// How many times a job may be lost through no fault of its own before it
/// stays Lost (a guard against a job that kills every node it lands on).
const MAX_LOST_RETRIES: u32 = 10;
/// Back-off cap for retries.
const MAX_BACKOFF_MS: u64 = 10 * 60 * 1000;

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
}

/// Hard state of the cluster.
#[derive(Debug, Default)]
pub struct StateMachine {
    jobs: BTreeMap<JobId, JobRecord>,
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
    /// Learned GPU-memory estimates per job class (hard state).
    estimates: BTreeMap<String, u64>,
    /// Latest run number per pipeline name (derived from jobs).
    pipeline_runs: BTreeMap<String, u32>,
    /// Highest leader term of an applied plan.
    leader_term: u64,
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
        estimates: Vec<(String, u64)>,
        next_event_index: u64,
    ) -> StateMachine {
        let mut sm = StateMachine {
            next_job_id: jobs.iter().map(|j| j.id).max().unwrap_or(0) + 1,
            next_event_index: next_event_index.max(1),
            submissions: submissions.into_iter().collect(),
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            estimates: estimates.into_iter().collect(),
            ..StateMachine::default()
        };
        for job in jobs {
            for dep in &job.depends_on {
                sm.dependants.entry(*dep).or_default().push(job.id);
            }
            if !job.pipeline.is_empty() {
                let run = sm.pipeline_runs.entry(job.pipeline.clone()).or_default();
                *run = (*run).max(job.run);
            }
            let id = job.id;
            sm.jobs.insert(id, job);
            sm.index_job(id);
        }
        sm
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
        self.jobs.get(&id)
    }

    /// All jobs, by id.
    pub fn jobs(&self) -> impl DoubleEndedIterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Pending jobs, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &JobRecord> {
        self.pending.iter().filter_map(|id| self.jobs.get(id))
    }

    /// Jobs holding resources, by id.
    pub fn active(&self) -> impl Iterator<Item = &JobRecord> {
        self.active.iter().filter_map(|id| self.jobs.get(id))
    }

    /// Active jobs on one node.
    pub fn jobs_on(&self, node: &str) -> impl Iterator<Item = &JobRecord> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
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
        self.backing_off.iter().filter_map(|id| self.jobs.get(id))
    }

    /// Learned GPU-memory estimate of a job class.
    pub fn estimate(&self, class: &str) -> Option<u64> {
        self.estimates.get(class).copied()
    }

    /// All learned estimates.
    pub fn estimates(&self) -> &BTreeMap<String, u64> {
        &self.estimates
    }

    /// Jobs in the dead-letter queue.
    pub fn dead_lettered(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::DeadLettered)
    }

    /// The jobs of one pipeline run (`run` 0 = the latest).
    pub fn pipeline_jobs(&self, name: &str, run: u32) -> (u32, Vec<&JobRecord>) {
        let run = if run == 0 {
            self.pipeline_runs.get(name).copied().unwrap_or(0)
        } else {
            run
        };
        let jobs = self
            .jobs
            .values()
            .filter(|j| j.pipeline == name && j.run == run)
            .collect();
        (run, jobs)
    }

    /// Index of the next event to be written.
    pub fn next_event_index(&self) -> u64 {
        self.next_event_index
    }

    /// Applies one command. An `Err` changes nothing.
    pub fn apply(&mut self, command: Command) -> Result<Outcome, ApplyError> {
        match command {
            Command::Submit {
                at_ms,
                key,
                jobs,
                pipeline,
            } => self.submit(at_ms, key, jobs, pipeline),
            Command::Requeue { at_ms, job } => {
                let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
                if record.state != JobState::Failed {
                    return Ok(Outcome::Done); // already moved on (cancelled, retried)
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
        }
    }

    fn submit(
        &mut self,
        at_ms: u64,
        key: Option<String>,
        specs: Vec<JobSpec>,
        pipeline: Option<String>,
    ) -> Result<Outcome, ApplyError> {
        if let Some(ids) = key.as_ref().and_then(|k| self.submissions.get(k)) {
            return Ok(Outcome::Submitted(ids.clone()));
        }
        // Resolve `after:` names within the submission before changing anything.
        let edges = resolve_after(&specs, pipeline.is_some())?;
        let run = match &pipeline {
            Some(name) => {
                let run = self.pipeline_runs.entry(name.clone()).or_default();
                *run += 1;
                *run
            }
            None => 0,
        };
        let first = self.next_job_id;
        let ids: Vec<JobId> = (0..specs.len() as u64).map(|i| first + i).collect();
        self.next_job_id += specs.len() as u64;
        for ((spec, deps), id) in specs.into_iter().zip(edges).zip(&ids) {
            let depends_on: Vec<JobId> = deps.iter().map(|d| ids[*d]).collect();
            for dep in &depends_on {
                self.dependants.entry(*dep).or_default().push(*id);
            }
            let record = JobRecord {
                id: *id,
                spec,
                state: JobState::Pending,
                submitted_at_ms: at_ms,
                updated_at_ms: at_ms,
                attempts: Vec::new(),
                cancel_requested: false,
                depends_on,
                not_before_ms: 0,
                terminal_reason: String::new(),
                retry_base: 0,
                batch_cap: None,
                blocked_by: None,
                pipeline: pipeline.clone().unwrap_or_default(),
                run,
            };
            self.jobs.insert(*id, record);
            self.pending.insert(*id);
            self.event(at_ms, *id, "submitted".into());
        }
        if let Some(key) = key {
            self.submissions.insert(key.clone(), ids.clone());
            self.changes.submissions.push((key, ids.clone()));
        }
        Ok(Outcome::Submitted(ids))
    }

    /// Re-checks a placement against hard state: the job is pending, the node
    /// exists and is usable, every GPU exists, fits and respects exclusivity,
    /// and the locks are free.
    fn check_placement(&self, placement: &Placement) -> Result<(), String> {
        let job = self
            .jobs
            .get(&placement.job)
            .ok_or_else(|| format!("job {} not found", placement.job))?;
        if job.state != JobState::Pending || job.cancel_requested {
            return Err(format!("job {} is {}, not pending", job.id, job.state));
        }
        let node = self
            .nodes
            .get(&placement.node)
            .ok_or_else(|| format!("node {} not registered", placement.node))?;
        if node.down || node.draining {
            return Err(format!("node {} is down or draining", node.name));
        }
        if placement.gpus.len() != job.spec.resources.gpus as usize {
            return Err(format!(
                "job {} wants {} GPUs, plan gives {}",
                job.id,
                job.spec.resources.gpus,
                placement.gpus.len()
            ));
        }
        let distinct: BTreeSet<u32> = placement.gpus.iter().copied().collect();
        if distinct.len() != placement.gpus.len() {
            return Err(format!("job {} given the same GPU twice", job.id));
        }
        if let Some(asked) = job.spec.resources.gpu_memory
            && placement.gpu_memory < asked
        {
            return Err(format!("job {} reserves less than it asked", job.id));
        }
        for index in &placement.gpus {
            let gpu = node
                .gpus
                .iter()
                .find(|g| g.index == *index)
                .ok_or_else(|| format!("node {} has no GPU {index}", node.name))?;
            let usage = self.gpu_usage(&node.name, *index);
            if usage.reserved + placement.gpu_memory > gpu.total {
                return Err(format!(
                    "GPU {}/{index} would be overcommitted ({} + {} > {})",
                    node.name, usage.reserved, placement.gpu_memory, gpu.total
                ));
            }
            if usage.exclusive || (placement.exclusive_gpu && usage.jobs > 0) {
                return Err(format!(
                    "GPU {}/{index} is not free for this job",
                    node.name
                ));
            }
        }
        for lock in &job.spec.locks {
            if let Some(holders) = self.locks.get(&lock.name) {
                let busy = match lock.mode {
                    LockMode::Shared => holders.exclusive.is_some(),
                    LockMode::Exclusive => {
                        holders.exclusive.is_some() || !holders.shared.is_empty()
                    }
                };
                if busy {
                    return Err(format!("lock {} is held", lock.name));
                }
            }
        }
        Ok(())
    }

    fn assign(&mut self, at_ms: u64, placements: Vec<Placement>) -> Outcome {
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        for placement in placements {
            if let Err(reason) = self.check_placement(&placement) {
                refused.push((placement.job, reason));
                continue;
            }
            let Some(job) = self.jobs.get_mut(&placement.job) else {
                continue;
            };
            let attempt = job.attempts.len() as u32 + 1;
            job.attempts.push(AttemptRecord {
                attempt,
                node: placement.node.clone(),
                gpus: placement.gpus.clone(),
                gpu_memory: placement.gpu_memory,
                batch_size: placement.batch_size.unwrap_or(0),
                exclusive_gpu: placement.exclusive_gpu,
                assigned_at_ms: at_ms,
                started_at_ms: 0,
                ended_at_ms: 0,
                exit_code: None,
                signal: None,
                error: String::new(),
                outcome: None,
                output_tail: String::new(),
                oom: false,
                forgiven: false,
                peak_gpu_memory: 0,
                preempted: String::new(),
            });
            self.transition(at_ms, placement.job, JobState::Assigned, String::new());
            applied.push((placement.job, attempt));
        }
        Outcome::Assigned { applied, refused }
    }

    /// Looks up the current attempt of a job for a report from `node`.
    /// Returns `None` when the report is stale (another attempt, another node,
    /// or the attempt already ended).
    fn current(
        &self,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Option<&JobRecord>, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let current = record
            .current_attempt()
            .is_some_and(|a| a.attempt == attempt && a.node == node && a.ended_at_ms == 0);
        Ok((current && record.state.is_active()).then_some(record))
    }

    fn started(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Outcome, ApplyError> {
        let Some(record) = self.current(job, attempt, node)? else {
            return Ok(Outcome::Stale);
        };
        if record.state == JobState::Running {
            return Ok(Outcome::Done);
        }
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(JobRecord::current_attempt_mut)
        {
            a.started_at_ms = at_ms;
        }
        self.transition(at_ms, job, JobState::Running, String::new());
        Ok(Outcome::Done)
    }

    fn exited(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
        report: ExitReport,
    ) -> Result<Outcome, ApplyError> {
        let Some(record) = self.current(job, attempt, node)? else {
            // Duplicate or stale exit: already recorded or superseded.
            return Ok(Outcome::Done);
        };
        let cancel_requested = record.cancel_requested;
        let succeeded = report.code == Some(0) && report.signal.is_none();
        // A preempted attempt that did not succeed was stopped by us (or died
        // while being stopped): not the job's fault, whatever its status.
        let preempted_by = record
            .current_attempt()
            .map(|a| a.preempted.clone())
            .filter(|reason| !reason.is_empty() && !succeeded && !cancel_requested);
        let outcome = if succeeded {
            AttemptOutcome::Succeeded
        } else if preempted_by.is_some() {
            AttemptOutcome::Preempted
        } else if report.cancelled || cancel_requested {
            AttemptOutcome::Cancelled
        } else {
            AttemptOutcome::Failed
        };
        let failed = outcome == AttemptOutcome::Failed;
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(JobRecord::current_attempt_mut)
        {
            a.ended_at_ms = at_ms;
            a.exit_code = report.code;
            a.signal = report.signal;
            a.error = report.error.clone();
            a.outcome = Some(outcome);
            a.oom = failed && report.oom;
            a.peak_gpu_memory = report.peak_gpu_memory;
            if failed {
                a.output_tail = report.output_tail.clone();
            }
        }
        self.learn(job, report.oom && failed, report.peak_gpu_memory);
        if succeeded {
            self.transition(at_ms, job, JobState::Succeeded, String::new());
            return Ok(Outcome::Done);
        }
        if let Some(reason) = preempted_by {
            // Placed again at once; `failures()` and the lost count skip
            // Preempted attempts, so no attempt is used up.
            if let Some(j) = self.jobs.get_mut(&job) {
                j.not_before_ms = 0;
            }
            self.transition(
                at_ms,
                job,
                JobState::Pending,
                format!("{reason}; attempt {attempt} stopped, placing it again"),
            );
            return Ok(Outcome::Done);
        }
        if report.cancelled || cancel_requested {
            self.transition(at_ms, job, JobState::Cancelled, "cancelled by user".into());
            self.block_dependants(at_ms, job);
            return Ok(Outcome::Done);
        }
        let detail = match (report.code, report.signal) {
            (Some(c), _) if report.oom => format!("GPU out of memory, exit code {c}"),
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => report.error.clone(),
        };
        let Some(record) = self.jobs.get(&job) else {
            return Ok(Outcome::Done);
        };
        // An out-of-memory death is retried with half the batch while the
        // batch can still shrink; it does not count against max_attempts,
        // since the batch was Gantry's choice.
        let halved = if report.oom {
            halve_batch(record)
        } else {
            None
        };
        let failures = record.failures();
        let max_attempts = record.spec.retry.max_attempts;
        let backoff_ms = record.spec.retry.backoff_ms;
        if let Some(cap) = halved {
            if let Some(j) = self.jobs.get_mut(&job) {
                j.batch_cap = Some(cap);
                j.not_before_ms = at_ms;
                if let Some(a) = j.current_attempt_mut() {
                    a.forgiven = true;
                }
            }
            self.transition(
                at_ms,
                job,
                JobState::Failed,
                format!("attempt {attempt} failed ({detail}); retrying with batch {cap}"),
            );
        } else if failures < max_attempts {
            let delay = retry_delay(backoff_ms, failures, job, attempt);
            if let Some(j) = self.jobs.get_mut(&job) {
                j.not_before_ms = at_ms + delay;
            }
            self.transition(
                at_ms,
                job,
                JobState::Failed,
                format!(
                    "attempt {attempt} failed ({detail}); retry {} of {} in {}",
                    failures,
                    max_attempts.saturating_sub(1),
                    gantry_scheduler::units::format_duration_ms(delay)
                ),
            );
        } else {
            self.dead_letter(at_ms, job, format!("attempt {attempt} failed ({detail}); {failures} of {max_attempts} attempts failed"), JobState::Failed);
        }
        Ok(Outcome::Done)
    }

    /// Moves a job that ran out of attempts (through `via`, the state that
    /// records how its last attempt ended) into the dead-letter queue.
    fn dead_letter(&mut self, at_ms: u64, job: JobId, reason: String, via: JobState) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.terminal_reason = reason.clone();
        }
        self.transition(at_ms, job, via, reason.clone());
        self.transition(at_ms, job, JobState::DeadLettered, reason);
        self.block_dependants(at_ms, job);
    }

    /// Updates the job class's learned GPU-memory estimate: an OOM raises it
    /// above what was reserved; an observed peak above it raises it too.
    fn learn(&mut self, job: JobId, oom: bool, peak: u64) {
        let Some(record) = self.jobs.get(&job) else {
            return;
        };
        let Some(attempt) = record.current_attempt() else {
            return;
        };
        let class = record.class();
        let current = self.estimates.get(&class).copied().unwrap_or(0);
        let mut next = current;
        if oom && attempt.gpu_memory > 0 {
            // 25% above what was not enough.
            next = next.max(attempt.gpu_memory.saturating_add(attempt.gpu_memory / 4));
        }
        if peak > 0 {
            // 10% headroom over the highest use seen.
            next = next.max(peak.saturating_add(peak / 10));
        }
        if next != current {
            self.estimates.insert(class.clone(), next);
            self.changes.estimates.insert(class);
        }
    }

    fn attempt_lost(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        reason: String,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let is_current = record
            .current_attempt()
            .is_some_and(|a| a.attempt == attempt && a.ended_at_ms == 0);
        if !is_current || !record.state.is_active() {
            return Ok(Outcome::Done);
        }
        let cancel_requested = record.cancel_requested;
        let lost_before = record
            .attempts
            .iter()
            .filter(|a| a.outcome == Some(AttemptOutcome::Lost))
            .count() as u32;
        if let Some(a) = self
            .jobs
            .get_mut(&job)
            .and_then(JobRecord::current_attempt_mut)
        {
            a.ended_at_ms = at_ms;
            a.error = format!("lost: {reason}");
            a.outcome = Some(AttemptOutcome::Lost);
        }
        if cancel_requested {
            self.transition(
                at_ms,
                job,
                JobState::Cancelled,
                format!("cancelled; {reason}"),
            );
            self.block_dependants(at_ms, job);
        } else if lost_before < MAX_LOST_RETRIES {
            // The node was at fault: retry at once, without counting against the job.
            self.transition(
                at_ms,
                job,
                JobState::Lost,
                format!("attempt {attempt} lost ({reason})"),
            );
            self.transition(at_ms, job, JobState::Pending, "placing it again".into());
        } else {
            self.dead_letter(
                at_ms,
                job,
                format!("lost {} times; last: {reason}", lost_before + 1),
                JobState::Lost,
            );
        }
        Ok(Outcome::Done)
    }

    fn dlq_retry(
        &mut self,
        at_ms: u64,
        job: JobId,
        spec: Option<Box<JobSpec>>,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        if record.state != JobState::DeadLettered {
            return Err(ApplyError::NotDeadLettered {
                id: job,
                state: record.state,
            });
        }
        if let Some(spec) = &spec
            && spec.name != record.spec.name
        {
            return Err(ApplyError::SpecChange(format!(
                "name {:?} differs from the job's {:?}; dependants refer to it by name",
                spec.name, record.spec.name
            )));
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some(mut spec) = spec {
                // `after:` was resolved at submission; the edges stay as they are.
                spec.after = j.spec.after.clone();
                j.spec = *spec;
            }
            j.retry_base = j.attempts.len() as u32;
            j.not_before_ms = 0;
            j.batch_cap = None;
            j.terminal_reason.clear();
        }
        self.transition(
            at_ms,
            job,
            JobState::Pending,
            "retried from the dead-letter queue".into(),
        );
        self.unblock_dependants(at_ms, job);
        Ok(Outcome::Done)
    }

    /// Keeps a lost attempt whose node came back with it still running, if
    /// its replacement has not started and its reservation still fits.
    fn revive(
        &mut self,
        at_ms: u64,
        job: JobId,
        attempt: u32,
        node: &str,
    ) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        let Some(original) = record.attempts.iter().find(|a| a.attempt == attempt) else {
            return Ok(Outcome::Stale);
        };
        let replacement = record.current_attempt().filter(|a| a.attempt != attempt);
        let revivable = original.outcome == Some(AttemptOutcome::Lost)
            && original.node == node
            && !self.drain_due(node, at_ms)
            && !record.cancel_requested
            && match record.state {
                JobState::Pending => true,
                JobState::Assigned => replacement.is_some_and(|r| r.started_at_ms == 0),
                _ => false,
            };
        if !revivable || !self.reservation_fits(original, replacement) {
            return Ok(Outcome::Stale);
        }
        let withdrawn = replacement.map(|r| (r.node.clone(), r.attempt));
        // Release the replacement's hold before the original takes its own back.
        self.unindex_job(job);
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some((_, number)) = &withdrawn
                && let Some(r) = j.attempts.iter_mut().find(|a| a.attempt == *number)
            {
                r.outcome = Some(AttemptOutcome::Withdrawn);
                r.ended_at_ms = at_ms;
                r.error = format!("withdrawn: attempt {attempt} came back on {node}");
            }
            if let Some(o) = j.attempts.iter_mut().find(|a| a.attempt == attempt) {
                o.outcome = None;
                o.ended_at_ms = 0;
                o.error.clear();
            }
            // Withdrawn attempts must not be last with a live one before
            // them for `current_attempt` to find the original: it skips them.
            debug_assert!(j.current_attempt().is_some_and(|a| a.attempt == attempt));
        }
        self.index_job(job);
        self.transition(
            at_ms,
            job,
            JobState::Running,
            format!("attempt {attempt} came back on {node}; kept"),
        );
        Ok(Outcome::Revived { withdrawn })
    }

    /// Whether `attempt`'s reservation fits its GPUs once `replacing`'s (if
    /// on the same GPUs) is released.
    fn reservation_fits(&self, attempt: &AttemptRecord, replacing: Option<&AttemptRecord>) -> bool {
        let Some(node) = self.nodes.get(&attempt.node) else {
            return false;
        };
        attempt.gpus.iter().all(|index| {
            let Some(gpu) = node.gpus.iter().find(|g| g.index == *index) else {
                return false;
            };
            let mut usage = self.gpu_usage(&attempt.node, *index);
            if let Some(r) = replacing.filter(|r| r.node == attempt.node && r.gpus.contains(index))
            {
                usage.reserved -= r.gpu_memory;
                usage.jobs -= 1;
                if r.exclusive_gpu {
                    usage.exclusive = false;
                }
            }
            usage.reserved + attempt.gpu_memory <= gpu.total
                && !usage.exclusive
                && !(attempt.exclusive_gpu && usage.jobs > 0)
        })
    }

    /// Whether `node` is draining and its drain deadline has passed at `at_ms`.
    pub fn drain_due(&self, node: &str, at_ms: u64) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.draining && n.drain_deadline_ms.is_some_and(|d| d <= at_ms))
    }

    /// Active attempts on `node` that a passed drain deadline would preempt
    /// and that are not marked yet (nor being cancelled by a user).
    pub fn preemptible_on(&self, node: &str) -> Vec<(JobId, u32)> {
        self.jobs_on(node)
            .filter(|j| !j.cancel_requested)
            .filter_map(|j| {
                j.current_attempt()
                    .filter(|a| a.node == node && a.ended_at_ms == 0 && a.preempted.is_empty())
                    .map(|a| (j.id, a.attempt))
            })
            .collect()
    }

    /// Marks the attempts still on a drained node past its deadline as
    /// preempted. They keep their reservations and locks until their agent
    /// reports them ended (so a replacement never overlaps them); then the
    /// job goes back to Pending without using up an attempt.
    fn preempt_drained(&mut self, at_ms: u64, node: String) -> Result<Outcome, ApplyError> {
        if !self.nodes.contains_key(&node) {
            return Err(ApplyError::NodeNotFound(node));
        }
        if !self.drain_due(&node, at_ms) {
            // Undrained, or the deadline moved, since the leader looked.
            return Ok(Outcome::Preempted {
                node,
                stop: Vec::new(),
            });
        }
        let stop = self.preemptible_on(&node);
        let reason = format!("preempted: node {node} drained");
        for (job, attempt) in &stop {
            if let Some(a) = self
                .jobs
                .get_mut(job)
                .and_then(JobRecord::current_attempt_mut)
            {
                a.preempted = reason.clone();
            }
            self.changes.jobs.insert(*job);
            self.event(
                at_ms,
                *job,
                format!("{reason}: stopping attempt {attempt} (drain deadline passed)"),
            );
        }
        Ok(Outcome::Preempted { node, stop })
    }

    fn request_cancel(&mut self, at_ms: u64, job: JobId) -> Result<Outcome, ApplyError> {
        let record = self.jobs.get(&job).ok_or(ApplyError::JobNotFound(job))?;
        if record.state.is_terminal() {
            return Err(ApplyError::AlreadyTerminal {
                id: job,
                state: record.state,
            });
        }
        match record.state {
            JobState::Pending => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.cancel_requested = true;
                    j.terminal_reason = "cancelled by user".into();
                }
                self.transition(at_ms, job, JobState::Cancelled, "cancelled by user".into());
                self.block_dependants(at_ms, job);
                Ok(Outcome::CancelRequested {
                    state: JobState::Cancelled,
                    stop: None,
                })
            }
            state => {
                let stop = record
                    .current_attempt()
                    .map(|a| (a.node.clone(), a.attempt));
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.cancel_requested = true;
                    j.updated_at_ms = at_ms;
                }
                self.changes.jobs.insert(job);
                self.event(at_ms, job, "cancel requested".into());
                Ok(Outcome::CancelRequested { state, stop })
            }
        }
    }

    /// Marks every not-yet-finished dependant of `job` (transitively) Blocked.
    fn block_dependants(&mut self, at_ms: u64, job: JobId) {
        let cause = self
            .jobs
            .get(&job)
            .map(|j| {
                format!(
                    "job {job} ({}) {}: {}",
                    j.spec.name, j.state, j.terminal_reason
                )
            })
            .unwrap_or_default();
        let mut stack = vec![job];
        while let Some(parent) = stack.pop() {
            let Some(children) = self.dependants.get(&parent).cloned() else {
                continue;
            };
            for child in children {
                let blockable = self
                    .jobs
                    .get(&child)
                    .is_some_and(|j| j.state == JobState::Pending);
                if blockable {
                    let reason = format!("blocked: dependency {cause}");
                    if let Some(j) = self.jobs.get_mut(&child) {
                        j.terminal_reason = reason.clone();
                        j.blocked_by = Some(job);
                    }
                    self.transition(at_ms, child, JobState::Blocked, reason);
                    stack.push(child);
                }
            }
        }
    }

    /// Returns to Pending every job Blocked because of `job`.
    fn unblock_dependants(&mut self, at_ms: u64, job: JobId) {
        let blocked: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Blocked && j.blocked_by == Some(job))
            .map(|j| j.id)
            .collect();
        for child in blocked {
            if let Some(j) = self.jobs.get_mut(&child) {
                j.blocked_by = None;
                j.terminal_reason.clear();
            }
            self.transition(
                at_ms,
                child,
                JobState::Pending,
                format!("unblocked: job {job} retried"),
            );
        }
    }

    /// Moves a job to `state`, keeping the derived indexes and reservations in
    /// step (a reservation is released exactly once: when the job leaves the
    /// active set), and records an event.
    fn transition(&mut self, at_ms: u64, id: JobId, state: JobState, message: String) {
        if let Some(job) = self.jobs.get(&id) {
            // Illegal transitions are bugs: tests run with debug assertions.
            debug_assert!(
                job.state.can_become(state),
                "illegal transition of job {id}: {} -> {state}",
                job.state
            );
        }
        self.unindex_job(id);
        if let Some(job) = self.jobs.get_mut(&id) {
            job.state = state;
            job.updated_at_ms = at_ms;
        }
        self.index_job(id);
        self.changes.jobs.insert(id);
        self.event(at_ms, id, message);
    }

    fn event(&mut self, at_ms: u64, id: JobId, message: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let attempt = job.current_attempt();
        let event = EventRecord {
            index: self.next_event_index,
            at_ms,
            job_id: id,
            job_name: job.spec.name.clone(),
            kind: job.spec.kind,
            state: job.state,
            node: attempt.map(|a| a.node.clone()).unwrap_or_default(),
            attempt: attempt.map_or(0, |a| a.attempt),
            message,
            pipeline: job.pipeline.clone(),
        };
        self.next_event_index += 1;
        self.changes.jobs.insert(id);
        self.changes.events.push(event);
    }

    fn index_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.state == JobState::Pending {
            self.pending.insert(id);
        }
        if job.state == JobState::Failed {
            self.backing_off.insert(id);
        }
        if !job.state.is_active() {
            return;
        }
        let Some(attempt) = job.current_attempt() else {
            return;
        };
        self.active.insert(id);
        self.by_node
            .entry(attempt.node.clone())
            .or_default()
            .insert(id);
        for gpu in &attempt.gpus {
            let usage = self
                .gpu_usage
                .entry((attempt.node.clone(), *gpu))
                .or_default();
            usage.reserved += attempt.gpu_memory;
            usage.jobs += 1;
            usage.exclusive |= attempt.exclusive_gpu;
        }
        let host = self.host_usage.entry(attempt.node.clone()).or_default();
        host.cpu_millis += job.spec.resources.cpu_millis;
        host.memory += job.spec.resources.memory;
        host.disk += job.spec.resources.disk;
        for lock in &job.spec.locks {
            let holders = self.locks.entry(lock.name.clone()).or_default();
            match lock.mode {
                LockMode::Exclusive => {
                    debug_assert!(holders.exclusive.is_none() && holders.shared.is_empty());
                    holders.exclusive = Some(id);
                }
                LockMode::Shared => {
                    debug_assert!(holders.exclusive.is_none());
                    holders.shared.insert(id);
                }
            }
        }
    }

    fn unindex_job(&mut self, id: JobId) {
        self.pending.remove(&id);
        self.backing_off.remove(&id);
        if !self.active.remove(&id) {
            return;
        }
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(attempt) = job.current_attempt() else {
            return;
        };
        if let Some(set) = self.by_node.get_mut(&attempt.node) {
            set.remove(&id);
        }
        for gpu in &attempt.gpus {
            let key = (attempt.node.clone(), *gpu);
            if let Some(usage) = self.gpu_usage.get_mut(&key) {
                usage.reserved -= attempt.gpu_memory;
                usage.jobs -= 1;
                if attempt.exclusive_gpu {
                    usage.exclusive = false;
                }
                if usage.jobs == 0 {
                    debug_assert_eq!(usage.reserved, 0);
                    self.gpu_usage.remove(&key);
                }
            }
        }
        if let Some(host) = self.host_usage.get_mut(&attempt.node) {
            host.cpu_millis -= job.spec.resources.cpu_millis;
            host.memory -= job.spec.resources.memory;
            host.disk -= job.spec.resources.disk;
        }
        for lock in &job.spec.locks {
            if let Some(holders) = self.locks.get_mut(&lock.name) {
                if holders.exclusive == Some(id) {
                    holders.exclusive = None;
                }
                holders.shared.remove(&id);
                if holders.exclusive.is_none() && holders.shared.is_empty() {
                    self.locks.remove(&lock.name);
                }
            }
        }
    }

    /// The submission keys seen, for persistence checks.
    pub fn submission(&self, key: &str) -> Option<&Vec<JobId>> {
        self.submissions.get(key)
    }
}

/// Exponential back-off with deterministic jitter (+-20%, from the job and
/// attempt, so every replica computes the same delay).
fn retry_delay(backoff_ms: u64, failures: u32, job: JobId, attempt: u32) -> u64 {
    let base = backoff_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_MS);
    let mut x = job.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(attempt).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    let percent = 80 + x % 41;
    base / 100 * percent
}

/// Half the batch of the job's last attempt, if it can still shrink
/// (not below the smallest tier or the model's `min`).
fn halve_batch(record: &JobRecord) -> Option<u32> {
    let last = record.current_attempt()?.batch_size;
    let batch = record.spec.batch.as_ref()?;
    let floor = match &batch.model {
        Some(model) => model.min.max(1),
        None => batch.tiers.iter().map(|t| t.size).min().unwrap_or(1),
    };
    let half = last / 2;
    (last > 0 && half >= floor).then_some(half)
}
