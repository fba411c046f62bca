//! The scheduler's input and output types: a cluster snapshot and a queue of
//! job requests go in, a [`Plan`] comes out. Every input type derives
//! `Default` so callers build them with `..Default::default()` and new fields
//! do not break them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A job's id, assigned by the coordinator in submission order.
pub type JobId = u64;

/// What a job does in the pipeline; decides defaults (exclusive GPU for
/// training) and whether disk backpressure applies.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Produces game records: data-producing.
    Selfplay,
    /// Turns records into training shards: data-producing, also a consumer.
    Export,
    /// Trains a model; exclusive GPU by default.
    Training,
    /// Evaluates a model against another.
    Evaluation,
    /// Promotes a model.
    Promotion,
    /// Anything else.
    #[default]
    Generic,
}

impl JobKind {
    /// Every kind, in pipeline order.
    pub const ALL: [JobKind; 6] = [
        JobKind::Selfplay,
        JobKind::Export,
        JobKind::Training,
        JobKind::Evaluation,
        JobKind::Promotion,
        JobKind::Generic,
    ];

    /// Parses the lowercase name used in specs.
    pub fn parse(name: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The lowercase name used in specs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Selfplay => "selfplay",
            JobKind::Export => "export",
            JobKind::Training => "training",
            JobKind::Evaluation => "evaluation",
            JobKind::Promotion => "promotion",
            JobKind::Generic => "generic",
        }
    }

    /// Data-producing kinds are held back on disk pressure.
    pub fn produces_data(self) -> bool {
        matches!(self, JobKind::Selfplay | JobKind::Export)
    }

    /// Kinds that drain data volumes (export reads game records, training
    /// reads shards). When the fleet is disk-pressured they are ordered
    /// first so the pressure clears.
    pub fn consumes_data(self) -> bool {
        matches!(self, JobKind::Export | JobKind::Training)
    }

    /// Whether a job of this kind wants a GPU to itself unless it says otherwise.
    pub fn exclusive_gpu_by_default(self) -> bool {
        matches!(self, JobKind::Training)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resources one job asks for. GPU memory is per GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Number of GPUs, all on one node.
    pub gpus: u32,
    /// Memory to reserve on each GPU; `None` lets the batch tier decide.
    pub gpu_memory: Option<u64>,
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Host memory in bytes.
    pub memory: u64,
    /// Scratch disk in bytes.
    pub disk: u64,
}

/// One batch tier: the first tier whose `min_free` fits the GPU's effective
/// free memory gives the batch size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchTier {
    /// Effective free memory this tier needs; `None` is the catch-all.
    pub min_free: Option<u64>,
    /// Batch size chosen by this tier.
    pub size: u32,
}

/// `base + per_sample * batch` must fit in effective free memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryModel {
    /// Fixed memory of the model and framework.
    pub base: u64,
    /// Memory per sample of batch.
    pub per_sample: u64,
    /// Smallest acceptable batch.
    pub min: u32,
    /// Largest useful batch.
    pub max: u32,
    /// Batch sizes are rounded down to a multiple of this (0 or 1 = any).
    pub multiple_of: u32,
}

/// How the batch size of a job is chosen from free GPU memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPolicy {
    /// Tier rule (the users' current rule of thumb).
    pub tiers: Vec<BatchTier>,
    /// Memory-model rule; used when `tiers` is empty.
    pub model: Option<MemoryModel>,
    /// Prefer the placement that gives the largest batch over bin-packing.
    pub prefer_largest: bool,
}

impl BatchPolicy {
    /// The users' rule of thumb before Gantry: 32 GiB free -> 512,
    /// 16 GiB -> 256, else 128 (the catch-all tier needs an explicit
    /// `gpu_memory` to reserve).
    pub fn users_rule_of_thumb() -> BatchPolicy {
        const GIB: u64 = 1 << 30;
        BatchPolicy {
            tiers: vec![
                BatchTier {
                    min_free: Some(32 * GIB),
                    size: 512,
                },
                BatchTier {
                    min_free: Some(16 * GIB),
                    size: 256,
                },
                BatchTier {
                    min_free: None,
                    size: 128,
                },
            ],
            ..Default::default()
        }
    }
}

/// Shared or exclusive hold on a named lock.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Many holders at once (readers).
    #[default]
    Shared,
    /// One holder (a writer).
    Exclusive,
}

impl LockMode {
    /// Parses `shared` / `exclusive`.
    pub fn parse(name: &str) -> Option<LockMode> {
        match name {
            "shared" => Some(LockMode::Shared),
            "exclusive" => Some(LockMode::Exclusive),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        }
    }
}

/// A named lock a job must hold while it runs, e.g. `model/square8_2p`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    /// Lock name.
    pub name: String,
    /// Hold mode.
    pub mode: LockMode,
}

/// Where a job may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraints {
    /// Every label must match the node's.
    pub labels: BTreeMap<String, String>,
    /// The GPU model must be one of these (empty = any). Matching is by
    /// case-insensitive prefix, so `A100` matches `A100-80GB`.
    pub gpu_models: Vec<String>,
}

/// A job waiting for placement, as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRequest {
    /// Job id (also the age tie-break: lower is older).
    pub id: JobId,
    /// Pipeline role.
    pub kind: JobKind,
    /// Higher runs first.
    pub priority: i32,
    /// Submission time, unix ms.
    pub submitted_at_ms: u64,
    /// Fair-share queue (pipeline or user); "" is the default queue.
    pub queue: String,
    /// What it needs.
    pub resources: Resources,
    /// Whether it needs its GPUs to itself.
    pub exclusive_gpu: bool,
    /// Batch-size rule, if the job lets Gantry choose.
    pub batch: Option<BatchPolicy>,
    /// Named locks it must hold.
    pub locks: Vec<LockRequest>,
    /// Placement constraints.
    pub constraints: Constraints,
    /// Jobs that preempted this one: it never preempts them in turn (no
    /// cascades).
    pub preempted_by: Vec<JobId>,
    /// The node whose capacity is held for it after it preempted jobs
    /// there: it is placed there or waits.
    pub held_node: Option<String>,
    /// Membership of a gang (`nodes: N`): the pass places all of its
    /// members at once, on distinct nodes, or none.
    pub gang: Option<GangRequest>,
}

/// One member of a gang, as the scheduler sees it. Every member of a gang
/// carries the same `id`, `size` and `same_label`, and the same resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GangRequest {
    /// The gang's id: its rank-0 member's job id.
    pub id: JobId,
    /// This member's rank, `0..size`.
    pub rank: u32,
    /// Members in the gang (nodes wanted).
    pub size: u32,
    /// Every member on nodes with one value of this label (`provider` by
    /// default, falling back to `NodeView::provider`; nodes without it
    /// form one group of their own). `None`: anywhere.
    pub same_label: Option<String>,
}

/// A job holding resources, as preemption sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunningJob {
    /// Job id.
    pub id: JobId,
    /// Its node.
    pub node: String,
    /// Its priority: only higher-priority jobs may preempt it.
    pub priority: i32,
    /// Whether it may be preempted at all (`preemptible` in its spec).
    pub preemptible: bool,
    /// When its current attempt was placed: the most recently started lose
    /// the least work.
    pub started_at_ms: u64,
    /// GPU devices it holds.
    pub gpus: Vec<u32>,
    /// Memory reserved on each of them.
    pub gpu_memory: u64,
    /// Whether it holds them exclusively.
    pub exclusive_gpu: bool,
    /// CPU it reserved, thousandths of a core.
    pub cpu_millis: u64,
    /// Host memory it reserved.
    pub memory: u64,
    /// Disk it reserved.
    pub disk: u64,
    /// When it was preempted lately (starvation protection).
    pub preempted_at_ms: Vec<u64>,
}

/// Health state of a node, from the leader's health tracker.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeating; eligible.
    #[default]
    Ready,
    /// Missed heartbeats for a few seconds: no new placements.
    Suspect,
    /// Silent past the down threshold: its jobs are lost.
    Down,
}

impl NodeState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }
}

/// One GPU as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuView {
    /// Device index on its node (what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    /// Model name, e.g. `H100-80GiB`.
    pub model: String,
    /// Total memory.
    pub total: u64,
    /// Memory in use per NVML, all processes.
    pub nvml_used: u64,
    /// Of `nvml_used`, what Gantry's own jobs use (so it is not counted twice).
    pub gantry_used: u64,
    /// Sum of Gantry reservations on this GPU.
    pub reserved: u64,
    /// Held by an exclusive-GPU job.
    pub exclusive: bool,
    /// Number of jobs holding reservations on it.
    pub jobs: u32,
    /// Reported faulty (XID, uncorrected ECC, pages pending retirement):
    /// it takes no job until an operator clears it.
    pub unhealthy: bool,
}

impl GpuView {
    /// `total - reserved - used_by_others - headroom`, where
    /// `used_by_others = nvml_used - gantry_used` (never below zero).
    pub fn effective_free(&self, headroom: u64) -> u64 {
        let used_by_others = self.nvml_used.saturating_sub(self.gantry_used);
        self.total
            .saturating_sub(self.reserved)
            .saturating_sub(used_by_others)
            .saturating_sub(headroom)
    }
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// Node name (unique).
    pub name: String,
    /// Health state.
    pub state: NodeState,
    /// Drained by an operator: no new placements.
    pub draining: bool,
    /// Whether the current leader has heard from it since taking office.
    pub heard_from: bool,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Cloud provider (`lambda`, `vast`, `hetzner`, `onprem`). A `provider`
    /// label constraint matches this when the node has no `provider` label,
    /// so the inventory's provider column need not be copied into labels.
    pub provider: String,
    /// Its GPUs.
    pub gpus: Vec<GpuView>,
    /// CPU capacity in thousandths of a core.
    pub cpu_millis_total: u64,
    /// CPU reserved by Gantry jobs.
    pub cpu_millis_reserved: u64,
    /// Host memory capacity.
    pub memory_total: u64,
    /// Host memory reserved by Gantry jobs.
    pub memory_reserved: u64,
    /// Data volume size.
    pub disk_total: u64,
    /// Data volume use.
    pub disk_used: u64,
    /// Disk reserved by Gantry jobs.
    pub disk_reserved: u64,
    /// Disk-pressure flag (with hysteresis, kept by the caller).
    pub disk_pressure: bool,
    /// Smoothed round-trip time to the leader.
    pub rtt_ms: f64,
    /// Evidence against the node from its recent jobs (the coordinator's
    /// circuit breaker counts it). A health score: among equal fits, fewer
    /// failures win.
    pub recent_failures: u32,
    /// Quarantined until this time (unix ms); 0 = not quarantined. Set by
    /// the caller's circuit breaker.
    pub quarantined_until_ms: u64,
    /// Capacity held for this job, which preempted jobs here: no other job
    /// is placed on the node until it starts or the hold lapses.
    pub held_for: Option<JobId>,
}

/// Who holds a named lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockHolders {
    /// The exclusive holder, if any.
    pub exclusive: Option<JobId>,
    /// Shared holders.
    pub shared: BTreeSet<JobId>,
}

/// Tunables of a scheduling pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Memory kept free on every GPU.
    pub gpu_headroom: u64,
    /// Disk use fraction above which a node is pressured.
    pub disk_high_watermark: f64,
    /// Disk use fraction below which pressure clears.
    pub disk_low_watermark: f64,
    /// Most placements in one pass (bounds pass latency).
    pub max_placements_per_pass: usize,
    /// Per-kind disk watermarks overriding the node's default pressure flag
    /// for that kind (e.g. let export run up to 92% because it frees more
    /// than it writes). A kind listed here is subject to backpressure even
    /// if it does not produce data.
    pub disk_thresholds: BTreeMap<JobKind, DiskThresholds>,
    /// Fraction of ready nodes (with a data volume) that must be pressured
    /// for the fleet as a whole to count as pressured. Then pure producers
    /// (selfplay) are held everywhere and consumers are ordered first.
    pub fleet_pressure_fraction: f64,
    /// GPUs whose effective free memory differs by less than this count as
    /// equally good fits, so node health (failures, RTT) decides between
    /// them. Without it a few MiB of NVML noise would outrank a 200 ms RTT.
    pub pack_granularity: u64,
    /// Priority preemption.
    pub preemption: PreemptionPolicy,
    /// Fair-share weight per queue (`JobRequest::queue`); missing = 1. Under
    /// contention a queue of weight 2 holds twice the GPUs of a queue of
    /// weight 1 (see [`crate::order`]).
    pub queue_weights: BTreeMap<String, u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            gpu_headroom: 0,
            disk_high_watermark: 0.85,
            disk_low_watermark: 0.75,
            max_placements_per_pass: usize::MAX,
            disk_thresholds: BTreeMap::new(),
            fleet_pressure_fraction: 0.8,
            pack_granularity: 1 << 30,
            queue_weights: BTreeMap::new(),
            preemption: PreemptionPolicy::default(),
        }
    }
}

/// When a pending job may preempt running ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreemptionPolicy {
    /// Preemption on at all.
    pub enabled: bool,
    /// Preemptions decided per pass at most (bounds pass latency and how
    /// much work one pass can stop).
    pub max_per_pass: usize,
    /// Jobs that may look for victims per pass at most (each looks at
    /// every eligible node).
    pub max_tries_per_pass: usize,
    /// A job preempted this many times within `window_ms` is protected
    /// from further preemption until the oldest of them leaves the window.
    pub max_preemptions: u32,
    /// The starvation window.
    pub window_ms: u64,
}

impl Default for PreemptionPolicy {
    fn default() -> Self {
        PreemptionPolicy {
            enabled: true,
            max_per_pass: 16,
            max_tries_per_pass: 32,
            max_preemptions: 3,
            window_ms: 60 * 60 * 1000,
        }
    }
}

/// High/low disk-use watermarks (fractions of the data volume) with
/// hysteresis: pressure turns on above `high` and off below `low`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiskThresholds {
    /// Use fraction above which pressure turns on.
    pub high: f64,
    /// Use fraction below which pressure turns off again.
    pub low: f64,
}

impl Default for DiskThresholds {
    fn default() -> Self {
        DiskThresholds {
            high: 0.85,
            low: 0.75,
        }
    }
}

/// Everything a scheduling pass reads. Time is an argument, never read.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    /// Current time, unix ms.
    pub now_ms: u64,
    /// Nodes, in any order.
    pub nodes: Vec<NodeView>,
    /// Named locks currently held.
    pub locks: BTreeMap<String, LockHolders>,
    /// Tunables.
    pub policy: Policy,
    /// Jobs holding resources, for preemption (empty: nothing to preempt).
    pub running: Vec<RunningJob>,
    /// GPUs held by each fair-share queue's running jobs (a CPU-only job
    /// counts one): what the queue order weighs against
    /// `Policy::queue_weights`. Missing = none held.
    pub queue_usage: BTreeMap<String, u64>,
}

/// A decision to run one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The job.
    pub job: JobId,
    /// Node name.
    pub node: String,
    /// GPU indices on that node.
    pub gpus: Vec<u32>,
    /// Memory reserved on each of those GPUs.
    pub gpu_memory: u64,
    /// Chosen batch size, if the job has a batch policy.
    pub batch_size: Option<u32>,
    /// Whether the GPUs are held exclusively.
    pub exclusive_gpu: bool,
}

/// Why a job was not placed in this pass. `Display` gives the sentence
/// shown to users by `gantry job <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// No node is registered at all.
    NoNodes,
    /// No node could take it; the text explains the closest miss.
    NoFit(String),
    /// A named lock is held by another job.
    LockHeld {
        /// Lock name.
        lock: String,
        /// A current holder.
        holder: JobId,
    },
    /// Disk pressure on every node that would otherwise fit.
    DiskBackpressure {
        /// Pressured eligible nodes.
        pressured: usize,
        /// Eligible nodes.
        eligible: usize,
    },
    /// The pass ran out of its placement budget before reaching this job.
    PassBudget,
    /// It preempts jobs on a node and waits for them to stop.
    Preempting {
        /// The node.
        node: String,
        /// The jobs being stopped.
        victims: Vec<JobId>,
    },
    /// The fleet as a whole is disk-pressured: pure data producers wait
    /// everywhere until consumers have drained enough.
    FleetDiskBackpressure {
        /// Pressured ready nodes.
        pressured: usize,
        /// Ready nodes with a data volume.
        nodes: usize,
    },
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldReason::NoNodes => f.write_str("no nodes registered"),
            HoldReason::NoFit(text) => f.write_str(text),
            HoldReason::LockHeld { lock, holder } => write!(f, "lock {lock} held by job {holder}"),
            HoldReason::DiskBackpressure {
                pressured,
                eligible,
            } => {
                write!(
                    f,
                    "disk backpressure on {pressured}/{eligible} eligible nodes"
                )
            }
            HoldReason::PassBudget => f.write_str("waiting for the next scheduling pass"),
            HoldReason::Preempting { node, victims } if victims.is_empty() => write!(
                f,
                "waiting for the jobs it preempted on node {node} to stop; capacity held"
            ),
            HoldReason::Preempting { node, victims } => write!(
                f,
                "preempting {} on node {node}; capacity held until they stop",
                crate::explain::first_few(victims.iter().map(|v| format!("job {v}")), ", ")
            ),
            HoldReason::FleetDiskBackpressure { pressured, nodes } => write!(
                f,
                "disk backpressure across the fleet ({pressured}/{nodes} nodes pressured)"
            ),
        }
    }
}

/// A job left waiting, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// The job.
    pub job: JobId,
    /// Why.
    pub reason: HoldReason,
}

/// A decision that a pending job preempts running ones on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    /// The preemptor.
    pub job: JobId,
    /// Where.
    pub node: String,
    /// The jobs stopped for it, in choice order.
    pub victims: Vec<JobId>,
    /// Why these: the rule that chose them, for `gantry job`.
    pub reason: String,
}

/// The output of a scheduling pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Jobs to start, in decision order.
    pub placements: Vec<Placement>,
    /// Jobs left waiting, each with a reason.
    pub unplaced: Vec<Unplaced>,
    /// Running jobs to stop so that a higher-priority job fits; each
    /// preemptor is also in `unplaced`, with a reason naming its victims.
    pub preemptions: Vec<Preemption>,
}
