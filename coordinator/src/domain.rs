//! Typed hard-state records: validated job specs, jobs with their attempts,
//! nodes and events. These are what the state machine stores; the wire
//! types live in `gantry_proto` and are converted in [`crate::convert`].

use std::collections::BTreeMap;
use std::fmt;

use gantry_scheduler::{BatchPolicy, Constraints, JobId, JobKind, LockRequest, Resources};
use serde::{Deserialize, Serialize};

/// Retry policy of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts that may fail before the job is given up (>= 1).
    pub max_attempts: u32,
    /// Wait before the next attempt, doubled per failure.
    pub backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            backoff_ms: 10_000,
        }
    }
}

/// A validated job specification. Only [`crate::convert`] builds these from
/// user input, so every value here has passed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human name (unique within a submission when `after` refers to it).
    pub name: String,
    /// Pipeline role.
    pub kind: JobKind,
    /// argv, or a shell line when `shell` is set.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Resource request.
    pub resources: Resources,
    /// Explicit exclusive-GPU choice; `None` = the kind's default.
    pub exclusive_gpu: Option<bool>,
    /// Batch-size rule.
    pub batch: Option<BatchPolicy>,
    /// Named locks.
    pub locks: Vec<LockRequest>,
    /// Placement constraints.
    pub constraints: Constraints,
    /// Higher runs first.
    pub priority: i32,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Wall-clock limit per attempt.
    pub timeout_ms: Option<u64>,
    /// Names of jobs of the same submission that must succeed first.
    pub after: Vec<String>,
    /// Run through `/bin/sh -c`.
    pub shell: bool,
    /// Fair-share queue.
    pub queue: String,
    /// Files copied into the job's work directory before it starts.
    #[serde(default)]
    pub snapshots: Vec<SnapshotSpec>,
    /// What the agent does when the job exceeds its GPU memory reservation.
    #[serde(default)]
    pub gpu_memory_policy: OverusePolicy,
    /// Tolerance above the reservation before the policy applies.
    #[serde(default)]
    pub gpu_memory_margin: u64,
    /// Whether higher-priority jobs may preempt it (`None`: all kinds but
    /// training).
    #[serde(default)]
    pub preemptible: Option<bool>,
    /// SIGTERM to SIGKILL when preempted (`None`: [`DEFAULT_PREEMPTION_GRACE_MS`]).
    #[serde(default)]
    pub preemption_grace_ms: Option<u64>,
    /// `nodes: N` with N > 1: the job is a gang of N members, one per node,
    /// placed all at once or not at all (`None`: one node).
    #[serde(default)]
    pub gang: Option<GangSpec>,
}

/// A gang's shape: how many nodes, and which label they must share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangSpec {
    /// Members (nodes), 2..=[`crate::limits::MAX_GANG_NODES`].
    pub nodes: u32,
    /// Every member on nodes with one value of this label (default
    /// `provider`); `None` (`gang: {spread: true}`): anywhere.
    pub same_label: Option<String>,
}

/// First port of the range `MASTER_PORT` is chosen from (torchrun's
/// default), on the rank-0 member's node.
pub const GANG_PORT_BASE: u16 = 29_500;
/// Ports in that range: at most this many gangs may have rank 0 on one
/// node at once (more are refused at apply).
pub const GANG_PORTS: u16 = 500;

/// The node label through which an agent's `--master-port-range` reaches
/// the coordinator: registration carries the node's labels, so every
/// replica reads the same committed range when it chooses a gang's
/// `MASTER_PORT` at apply (no new field through Raft and storage). The
/// value is `LOW-HIGH`, inclusive; a node without it uses
/// [`GANG_PORT_BASE`]..+[`GANG_PORTS`].
pub const MASTER_PORTS_LABEL: &str = "gantry-master-port-range";

/// Parses a `MASTER_PORT` range `LOW-HIGH` (inclusive, ports 1 to 65535,
/// LOW <= HIGH); the error says what is wrong, for the caller to prefix
/// with the flag or label it came from.
pub fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let shown = crate::spec_file::printable(text, 64);
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{shown:?} is not LOW-HIGH (e.g. 29500-29999)"))?;
    let port = |part: &str| -> Result<u16, String> {
        match part.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "{shown:?}: {:?} is not a port (1 to 65535)",
                crate::spec_file::printable(part, 16)
            )),
            Ok(p) => Ok(p),
        }
    };
    let (low, high) = (port(low)?, port(high)?);
    if low > high {
        return Err(format!("{shown:?}: {low} is above {high}"));
    }
    Ok(low..=high)
}

/// The range a node's gangs take `MASTER_PORT` from: its
/// [`MASTER_PORTS_LABEL`], else the default range.
pub fn master_ports(
    labels: &BTreeMap<String, String>,
) -> Result<std::ops::RangeInclusive<u16>, String> {
    match labels.get(MASTER_PORTS_LABEL) {
        None => Ok(GANG_PORT_BASE..=GANG_PORT_BASE + (GANG_PORTS - 1)),
        Some(text) => {
            parse_port_range(text).map_err(|e| format!("label {MASTER_PORTS_LABEL}: {e}"))
        }
    }
}

/// A job's place in its gang (hard state, set at submission).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangMember {
    /// The gang's id: its rank-0 member's job id (members have
    /// consecutive ids from it).
    pub first: JobId,
    /// This member's rank.
    pub rank: u32,
    /// Members in the gang.
    pub size: u32,
    /// `MASTER_PORT` of the current attempt (0 before the first), chosen
    /// at apply when the gang is placed: the lowest port of rank 0's node's
    /// range ([`master_ports`]) no other active gang with rank 0 on the same
    /// node uses.
    pub port: u16,
}

impl GangMember {
    /// The ids of every member of this gang, rank order.
    pub fn members(&self) -> impl Iterator<Item = JobId> {
        let first = self.first;
        (0..u64::from(self.size)).map(move |r| first + r)
    }
}

/// Default of `JobSpec::preemption_grace_ms`: time to checkpoint.
pub const DEFAULT_PREEMPTION_GRACE_MS: u64 = 30_000;

/// One file or directory snapshotted into a job's private work directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSpec {
    /// Absolute source path on the node.
    pub from: String,
    /// Relative name inside the snapshot directory.
    pub as_name: String,
}

/// What to do when a job uses more GPU memory than it reserved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverusePolicy {
    /// Log and report it.
    #[default]
    Warn,
    /// Stop the job.
    Stop,
}

impl OverusePolicy {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            OverusePolicy::Warn => "warn",
            OverusePolicy::Stop => "stop",
        }
    }

    /// The policy of a lowercase name.
    pub fn parse(name: &str) -> Option<OverusePolicy> {
        [OverusePolicy::Warn, OverusePolicy::Stop]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

impl JobSpec {
    /// A minimal valid spec for tests: `true` on one GPU with 10 GiB, the
    /// defaults for everything else.
    pub fn for_test(name: &str) -> JobSpec {
        JobSpec {
            name: name.into(),
            kind: JobKind::Generic,
            command: vec!["true".into()],
            env: BTreeMap::new(),
            resources: Resources {
                gpus: 1,
                gpu_memory: Some(10 << 30),
                ..Default::default()
            },
            exclusive_gpu: None,
            batch: None,
            locks: Vec::new(),
            constraints: Constraints::default(),
            priority: 0,
            retry: RetryPolicy::default(),
            timeout_ms: None,
            after: Vec::new(),
            shell: false,
            queue: String::new(),
            snapshots: Vec::new(),
            gpu_memory_policy: OverusePolicy::default(),
            gpu_memory_margin: 0,
            preemptible: None,
            preemption_grace_ms: None,
            gang: None,
        }
    }

    /// Whether higher-priority jobs may preempt it: as the spec says, else
    /// every kind but training (a lost training step is expensive).
    pub fn preemptible(&self) -> bool {
        self.preemptible
            .unwrap_or(self.kind != gantry_scheduler::JobKind::Training)
    }

    /// SIGTERM to SIGKILL when it is preempted.
    pub fn preemption_grace_ms(&self) -> u64 {
        self.preemption_grace_ms
            .unwrap_or(DEFAULT_PREEMPTION_GRACE_MS)
    }

    /// Whether this job needs its GPUs to itself.
    pub fn exclusive_gpu(&self) -> bool {
        self.exclusive_gpu
            .unwrap_or_else(|| self.kind.exclusive_gpu_by_default())
    }
}

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for placement (the leader keeps the reason).
    Pending,
    /// Placed; the agent has been told.
    Assigned,
    /// The agent started it.
    Running,
    /// Exited 0.
    Succeeded,
    /// An attempt failed; the next one waits for its back-off.
    Failed,
    /// An attempt's node went away; the job is being placed again.
    Lost,
    /// Cancelled by a user.
    Cancelled,
    /// A job it depends on did not succeed; `dlq retry` of that job unblocks it.
    Blocked,
    /// Attempts exhausted: in the dead-letter queue with its last error.
    DeadLettered,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 9] = [
        JobState::Pending,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Lost,
        JobState::Cancelled,
        JobState::Blocked,
        JobState::DeadLettered,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Lost => "lost",
            JobState::Cancelled => "cancelled",
            JobState::Blocked => "blocked",
            JobState::DeadLettered => "deadlettered",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// No further transitions happen from a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Cancelled | JobState::Blocked | JobState::DeadLettered
        )
    }

    /// The legal transitions, in one place. Blocked and DeadLettered jobs
    /// come back to Pending only through `dlq retry`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        match self {
            // Running: a lost attempt revived when its node returns in time.
            Pending => matches!(next, Assigned | Running | Cancelled | Blocked),
            // Pending: the attempt was preempted (its node's drain deadline
            // passed) and ended; the job is placed again without a retry.
            Assigned | Running => {
                matches!(
                    next,
                    Pending | Running | Succeeded | Failed | Lost | Cancelled
                )
            }
            Failed => matches!(next, Pending | DeadLettered | Cancelled),
            Lost => matches!(next, Pending | DeadLettered | Cancelled),
            Blocked | DeadLettered => matches!(next, Pending | Cancelled),
            // Pending: a gang member whose gang's attempt broke after it
            // succeeded runs again with the gang (`state/gang.rs`).
            Succeeded => next == Pending,
            Cancelled => false,
        }
    }

    /// Holds resources on a node.
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Assigned | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt at running a job: where, with what, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based attempt number; also the fencing token.
    pub attempt: u32,
    /// Node it was placed on.
    pub node: String,
    /// GPU indices.
    pub gpus: Vec<u32>,
    /// Memory reserved on each GPU.
    pub gpu_memory: u64,
    /// Batch size (0 = none).
    pub batch_size: u32,
    /// Whether the GPUs are held exclusively.
    pub exclusive_gpu: bool,
    /// When placed.
    pub assigned_at_ms: u64,
    /// When the agent started it (0 = not yet).
    pub started_at_ms: u64,
    /// When it ended (0 = not yet).
    pub ended_at_ms: u64,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// Why it ended badly, for people.
    pub error: String,
    /// How it ended (`None` while it runs).
    pub outcome: Option<AttemptOutcome>,
    /// The last 64 KiB of its stderr, when it failed.
    #[serde(default)]
    pub output_tail: String,
    /// It died of GPU out-of-memory.
    #[serde(default)]
    pub oom: bool,
    /// Its failure does not count against `max_attempts` (an out-of-memory
    /// death retried with a smaller batch: the batch was Gantry's choice).
    #[serde(default)]
    pub forgiven: bool,
    /// Highest GPU memory it was seen using, per GPU (0 = unknown).
    #[serde(default)]
    pub peak_gpu_memory: u64,
    /// Why the leader asked its agent to stop it so the job moves elsewhere
    /// ("" = not preempted), e.g. "preempted: node a drained". When it then
    /// ends (other than by succeeding) the job goes back to Pending without
    /// using up an attempt.
    #[serde(default)]
    pub preempted: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, was killed, timed out or could not start: the job's fault.
    Failed,
    /// Its node went away: not the job's fault.
    Lost,
    /// Stopped by a cancel.
    Cancelled,
    /// Replaced before it ran, because the attempt it replaced came back.
    Withdrawn,
    /// Stopped by the leader because its node's drain deadline passed: not
    /// the job's fault, and not counted against `max_attempts`.
    Preempted,
}

/// A job and its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// What to run.
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// Submission time.
    pub submitted_at_ms: u64,
    /// Time of the last transition.
    pub updated_at_ms: u64,
    /// Attempts, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// A user asked to cancel; the agent is stopping it.
    pub cancel_requested: bool,
    /// Jobs that must succeed first.
    pub depends_on: Vec<JobId>,
    /// Earliest time of the next placement (retry back-off).
    pub not_before_ms: u64,
    /// Why a terminal job ended, or a blocked job is blocked.
    pub terminal_reason: String,
    /// Failures are counted from this attempt index (raised by `dlq retry`).
    #[serde(default)]
    pub retry_base: u32,
    /// Largest batch allowed, after out-of-memory retries halved it.
    #[serde(default)]
    pub batch_cap: Option<u32>,
    /// The job whose failure blocks this one.
    #[serde(default)]
    pub blocked_by: Option<JobId>,
    /// Pipeline name, if submitted as part of one.
    #[serde(default)]
    pub pipeline: String,
    /// Run number of that pipeline (1 = first submission).
    #[serde(default)]
    pub run: u32,
    /// Name of the token that submitted it (`None` without `--tokens`);
    /// a `user` token may change only its own jobs.
    #[serde(default)]
    pub owner: Option<String>,
    /// Index of its "submitted" event (0 = stored before it was kept):
    /// every event below the oldest job's is about a retired job.
    #[serde(default)]
    pub submit_event: u64,
    /// Who preempted it and when, oldest first (at most
    /// [`MAX_PREEMPTIONS_KEPT`]): for `gantry job`, starvation protection
    /// and no cascades.
    #[serde(default)]
    pub preempted_by: Vec<PreemptedBy>,
    /// Its latest preemption of other jobs: the capacity held for it on
    /// that node until it starts or `until_ms`.
    #[serde(default)]
    pub preempting: Option<PreemptionHold>,
    /// Its place in a gang (`nodes: N`), if it is a member of one.
    #[serde(default)]
    pub gang: Option<GangMember>,
    /// Its pipeline's `repeat:` and `run_dir:`, and whether the loop was
    /// stopped: every job of a run carries them, so the next run is made
    /// from the run's own records (see `state/pipeline_loop.rs`).
    #[serde(default, skip_serializing_if = "RunPolicy::is_default")]
    pub run_policy: RunPolicy,
}

/// `repeat:` of a pipeline: how many runs its loop makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Repeat {
    /// One run per submit (no `repeat:`).
    #[default]
    Once,
    /// Runs until this many runs of the loop have been made.
    MaxRuns(u32),
    /// Runs until `gantry pipeline stop`.
    Forever,
}

/// How a pipeline run goes on: the loop and its run directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPolicy {
    /// `repeat:` of the pipeline.
    #[serde(default)]
    pub repeat: Repeat,
    /// Run number of the loop's first run (a loop counts `max_runs` from
    /// the submit that started it, not from the pipeline's first run ever).
    #[serde(default)]
    pub first_run: u32,
    /// `run_dir:` template (`{run}` replaced by the run number); "" = none.
    #[serde(default)]
    pub run_dir: String,
    /// `gantry pipeline stop`: no run starts after this one.
    #[serde(default)]
    pub stopped: bool,
}

impl RunPolicy {
    /// Nothing to carry (serialised records of other jobs stay as they were).
    pub fn is_default(&self) -> bool {
        *self == RunPolicy::default()
    }

    /// The run directory of run `run`, if the pipeline names one.
    pub fn run_dir_of(&self, run: u32) -> Option<String> {
        (!self.run_dir.is_empty()).then(|| self.run_dir.replace("{run}", &run.to_string()))
    }

    /// Whether a loop with this policy starts the run after `run` when
    /// `run` succeeds.
    pub fn continues_after(&self, run: u32) -> bool {
        if self.stopped {
            return false;
        }
        match self.repeat {
            Repeat::Once => false,
            Repeat::Forever => run < u32::MAX,
            Repeat::MaxRuns(max) => {
                u64::from(run) + 1 < u64::from(self.first_run.max(1)) + u64::from(max)
            }
        }
    }
}

/// Preemptions remembered per job.
pub const MAX_PREEMPTIONS_KEPT: usize = 16;

/// One preemption of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptedBy {
    /// The preemptor.
    pub job: JobId,
    /// When.
    pub at_ms: u64,
}

/// A job's preemption of others, and the capacity held for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptionHold {
    /// Where.
    pub node: String,
    /// The jobs stopped for it.
    pub victims: Vec<JobId>,
    /// When.
    pub at_ms: u64,
    /// The hold lapses at this time even if it has not started (its
    /// victims' grace plus slack), so a stuck stop cannot pin a node.
    pub until_ms: u64,
}

impl JobRecord {
    /// A job for tests: `spec`, Pending, no attempts, every other field
    /// empty.
    pub fn for_test(id: JobId, spec: JobSpec) -> JobRecord {
        JobRecord {
            id,
            spec,
            state: JobState::Pending,
            submitted_at_ms: 0,
            updated_at_ms: 0,
            attempts: Vec::new(),
            cancel_requested: false,
            depends_on: Vec::new(),
            not_before_ms: 0,
            terminal_reason: String::new(),
            retry_base: 0,
            batch_cap: None,
            blocked_by: None,
            pipeline: String::new(),
            run: 0,
            owner: None,
            submit_event: 0,
            preempted_by: Vec::new(),
            preempting: None,
            gang: None,
            run_policy: RunPolicy::default(),
        }
    }

    /// The attempt that owns the job now: the latest not withdrawn.
    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts
            .iter()
            .rev()
            .find(|a| a.outcome != Some(AttemptOutcome::Withdrawn))
    }

    /// Mutable [`JobRecord::current_attempt`].
    pub fn current_attempt_mut(&mut self) -> Option<&mut AttemptRecord> {
        self.attempts
            .iter_mut()
            .rev()
            .find(|a| a.outcome != Some(AttemptOutcome::Withdrawn))
    }

    /// Failed attempts since the last `dlq retry`.
    pub fn failures(&self) -> u32 {
        self.attempts
            .iter()
            .skip(self.retry_base as usize)
            .filter(|a| a.outcome == Some(AttemptOutcome::Failed) && !a.forgiven)
            .count() as u32
    }

    /// The class whose learned GPU-memory estimate this job uses and feeds.
    pub fn class(&self) -> String {
        format!("{}/{}", self.spec.kind, self.spec.name)
    }
}

/// A registered node (hard state: membership and the drain flag; health and
/// telemetry are soft state in the leader).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique name.
    pub name: String,
    /// Advertised address.
    pub address: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Static GPU inventory.
    pub gpus: Vec<GpuRecord>,
    /// CPU capacity, thousandths of a core.
    pub cpu_millis: u64,
    /// RAM capacity.
    pub memory_total: u64,
    /// Data volume capacity.
    pub disk_total: u64,
    /// Operator drain flag.
    pub draining: bool,
    /// When a draining node's remaining attempts are stopped so their jobs
    /// move elsewhere (unix ms, computed by the leader when the drain was
    /// proposed, so every replica agrees). `None`: no deadline.
    #[serde(default)]
    pub drain_deadline_ms: Option<u64>,
    /// First registration.
    pub registered_at_ms: u64,
    /// Down as committed by the health tracker.
    pub down: bool,
    /// The circuit breaker's last quarantine of this node (also kept once
    /// over or cleared: its `since_ms` is the evidence horizon and its
    /// `trips` drive the doubling). See [`crate::breaker`].
    #[serde(default)]
    pub quarantine: Option<Quarantine>,
    /// GPU faults by GPU index (at most one per GPU of the node), set by
    /// `Command::SetGpuHealth`; an active one keeps the GPU out of
    /// placement. See [`crate::decide::gpu_health`].
    #[serde(default)]
    pub gpu_faults: BTreeMap<u32, GpuFault>,
}

impl NodeRecord {
    /// The fault that makes GPU `index` unhealthy, if one is in force.
    pub fn gpu_fault(&self, index: u32) -> Option<&str> {
        self.gpu_faults
            .get(&index)
            .filter(|f| f.is_active())
            .map(|f| f.reason.as_str())
    }
}

/// A GPU's fault as committed: hard state, so an unhealthy GPU stays out of
/// placement across a failover. An operator's clear keeps the record
/// (acknowledged: the same fault reported again does not mark the GPU
/// again) until the agent reports the GPU healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFault {
    /// What the agent reported (bounded by `limits::MAX_GPU_FAULT_CHARS`).
    pub reason: String,
    /// When it was committed (the command's `at_ms`).
    pub since_ms: u64,
    /// When an operator cleared it (`None`: in force).
    pub cleared_at_ms: Option<u64>,
}

impl GpuFault {
    /// Whether the GPU is unhealthy because of it.
    pub fn is_active(&self) -> bool {
        self.cleared_at_ms.is_none()
    }
}

/// A circuit-breaker quarantine: hard state, set by `Command::Quarantine`
/// and cleared by `Command::ClearQuarantine`, with times from the commands
/// themselves so every replica agrees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// When it was tripped or cleared (the command's `at_ms`): evidence
    /// older than this is already accounted for.
    pub since_ms: u64,
    /// No placements before this time (unix ms); `since_ms` once cleared.
    pub until_ms: u64,
    /// Evidence points against the node when it tripped.
    pub failures: u32,
    /// The evidence, for people.
    pub reason: String,
    /// Trips in a row, each within a window of the last one's end (the
    /// length doubles per trip, at most 8x); 0 once cleared.
    pub trips: u32,
}

impl Quarantine {
    /// Whether the node takes no placements at `now_ms`.
    pub fn is_active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }
}

/// A GPU's static description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// Device index.
    pub index: u32,
    /// Model name.
    pub model: String,
    /// Total memory.
    pub total: u64,
}

/// A job transition, numbered in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Monotonic index.
    pub index: u64,
    /// When.
    pub at_ms: u64,
    /// Which job.
    pub job_id: JobId,
    /// Job name.
    pub job_name: String,
    /// Job kind.
    pub kind: JobKind,
    /// New state.
    pub state: JobState,
    /// Node, if any.
    pub node: String,
    /// Attempt.
    pub attempt: u32,
    /// Detail for people.
    pub message: String,
    /// Pipeline of the job ("" = none).
    #[serde(default)]
    pub pipeline: String,
}
