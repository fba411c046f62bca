//! The typed commands that change hard state. Every change goes through one
//! [`Command`] applied by [`crate::state::StateMachine::apply`]; today the
//! single coordinator applies them directly, and a replicated log can carry
//! them unchanged (they are serde values and carry their own timestamps, so
//! applying is deterministic).

use gantry_scheduler::{JobId, Placement};
use serde::{Deserialize, Serialize};

use crate::domain::{GpuRecord, JobSpec, RunPolicy};

/// A hard-state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Store new jobs. With a key already seen, returns the earlier ids.
    Submit {
        /// Proposal time.
        at_ms: u64,
        /// Idempotency key.
        key: Option<String>,
        /// Validated specs.
        jobs: Vec<JobSpec>,
        /// Pipeline name, when the jobs form one run of a pipeline.
        #[serde(default)]
        pipeline: Option<String>,
        /// Name of the submitting token (`None` without `--tokens`): in the
        /// command, so every replica records the same owner.
        #[serde(default)]
        owner: Option<String>,
    },
    /// An agent (re-)registered.
    RegisterNode {
        /// Proposal time.
        at_ms: u64,
        /// Name.
        name: String,
        /// Advertised address.
        address: String,
        /// Labels.
        labels: std::collections::BTreeMap<String, String>,
        /// GPUs.
        gpus: Vec<GpuRecord>,
        /// CPU capacity.
        cpu_millis: u64,
        /// RAM.
        memory_total: u64,
        /// Disk.
        disk_total: u64,
    },
    /// Commit a scheduling plan. Each placement is re-checked against hard
    /// state; infeasible ones are refused, never applied.
    Assign {
        /// Proposal time.
        at_ms: u64,
        /// Placements from the scheduler.
        placements: Vec<Placement>,
        /// Raft term of the leader that made the plan (0 without replication).
        #[serde(default)]
        term: u64,
    },
    /// The agent started an attempt.
    JobStarted {
        /// Report time.
        at_ms: u64,
        /// Job.
        job: JobId,
        /// Attempt (fencing token).
        attempt: u32,
        /// Reporting node.
        node: String,
    },
    /// An attempt ended.
    JobExited {
        /// Report time.
        at_ms: u64,
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Reporting node.
        node: String,
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
        /// Error text for people (stderr tail or spawn error).
        error: String,
        /// It was stopped because of a cancel.
        cancelled: bool,
        /// The stderr tail carried a GPU out-of-memory signature.
        #[serde(default)]
        oom: bool,
        /// The last 64 KiB of stderr.
        #[serde(default)]
        output_tail: String,
        /// Highest GPU memory seen, per GPU.
        #[serde(default)]
        peak_gpu_memory: u64,
    },
    /// A failed job's back-off is over: place it again.
    Requeue {
        /// Time.
        at_ms: u64,
        /// Job.
        job: JobId,
    },
    /// Take a job out of the dead-letter queue (optionally with a new spec)
    /// and unblock the jobs waiting on it.
    DlqRetry {
        /// Time.
        at_ms: u64,
        /// Job.
        job: JobId,
        /// Replacement spec (boxed: it dwarfs the other commands).
        spec: Option<Box<JobSpec>>,
    },
    /// Discard a dead-lettered job.
    DlqDrop {
        /// Time.
        at_ms: u64,
        /// Job.
        job: JobId,
    },
    /// A lost attempt's node came back with it still running before its
    /// replacement started: keep the original, withdraw the replacement.
    ReviveAttempt {
        /// Time.
        at_ms: u64,
        /// Job.
        job: JobId,
        /// The lost attempt, still running.
        attempt: u32,
        /// Its node.
        node: String,
    },
    /// A user asked to cancel.
    RequestCancel {
        /// Request time.
        at_ms: u64,
        /// Job.
        job: JobId,
    },
    /// An attempt is gone without an exit report (node down, agent forgot it).
    AttemptLost {
        /// Time.
        at_ms: u64,
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// The health tracker's committed view of a node changed.
    SetNodeDown {
        /// Time.
        at_ms: u64,
        /// Node.
        node: String,
        /// Down or back.
        down: bool,
    },
    /// Operator drain flag.
    SetDrain {
        /// Time.
        at_ms: u64,
        /// Node.
        node: String,
        /// Drain or undrain.
        draining: bool,
        /// Absolute deadline (unix ms) after which the node's attempts are
        /// preempted. On a drain, `None` keeps any earlier deadline; an
        /// undrain always clears it.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// The leader found a draining node past its deadline still running
    /// attempts: mark them preempted (applied only if, at `at_ms`, the node
    /// is still draining and its deadline has passed).
    PreemptDrained {
        /// Time (the leader's clock when it proposed).
        at_ms: u64,
        /// Node.
        node: String,
    },
    /// The circuit breaker found evidence against a node: no placements on
    /// it until `until_ms`. Apply refuses it when it would quarantine more
    /// than the fleet's share or the last node taking work at `at_ms`
    /// ([`crate::breaker::admit`]).
    Quarantine {
        /// Time (the leader's clock when it proposed).
        at_ms: u64,
        /// Node.
        node: String,
        /// End of the quarantine (unix ms), after `at_ms`.
        until_ms: u64,
        /// Evidence points against the node.
        failures: u32,
        /// The evidence, for people.
        reason: String,
        /// The leader's breaker policy: apply re-checks the fleet share and
        /// the trip window with it (absent in older entries: the defaults).
        #[serde(default)]
        policy: crate::breaker::BreakerPolicy,
    },
    /// A pending job preempts lower-priority jobs on one node (the
    /// scheduler's choice). Apply re-checks every rule at `at_ms` and does
    /// nothing if one no longer holds; else it marks the victims' attempts
    /// preempted and holds the node for the preemptor until it starts or
    /// `until_ms`.
    Preempt {
        /// Time (the leader's clock when it proposed).
        at_ms: u64,
        /// The preemptor.
        job: JobId,
        /// The node.
        node: String,
        /// The jobs to stop.
        victims: Vec<JobId>,
        /// Why these, for people.
        reason: String,
        /// End of the hold.
        until_ms: u64,
    },
    /// An operator cleared a node's quarantine (`gantry undrain`): placements
    /// again, and the evidence so far is forgiven.
    ClearQuarantine {
        /// Time.
        at_ms: u64,
        /// Node.
        node: String,
    },
    /// The retention of finished work every replica applies (proposed by a
    /// leader whose `--job-retention` and related flags differ from hard
    /// state), so that every replica retires the same jobs.
    SetRetention {
        /// Time.
        at_ms: u64,
        /// The policy, already validated.
        policy: crate::state::RetentionPolicy,
    },
    /// Nothing but a time: proposed by the leader when a finished job's
    /// retention is over and no other command came to retire it (every
    /// applied command retires what is due at its `at_ms`).
    Retire {
        /// The leader's clock when it proposed.
        at_ms: u64,
    },
    /// A GPU's health changed. With a `fault` (and a `gpu`): the leader saw
    /// the agent report it; apply marks the GPU unhealthy and the attempts
    /// on it preempted as a node fault, unless an operator cleared that same
    /// fault, or cleared the GPU after `at_ms` (a stale report). Without a
    /// fault: an operator's clear (`gpu` `None`: every GPU of the node, as
    /// `gantry undrain` does), or with `seen_healthy` the agent reported the
    /// GPU healthy again, and a cleared fault is forgotten (the same fault
    /// reported later marks the GPU again; a fault in force stays).
    SetGpuHealth {
        /// Time (the leader's clock when it proposed).
        at_ms: u64,
        /// Node.
        node: String,
        /// GPU index; `None` only for an operator's clear.
        gpu: Option<u32>,
        /// The fault, bounded by `limits::MAX_GPU_FAULT_CHARS`.
        fault: Option<String>,
        /// The agent reports the GPU healthy (forget an acknowledged fault).
        #[serde(default)]
        seen_healthy: bool,
    },
    /// A submit of a pipeline run with `repeat:` or `run_dir:` (a `Submit`
    /// whose jobs carry the run policy; a variant of its own so that the
    /// plain submit, proposed by every test, stays as it was).
    SubmitLoop {
        /// Proposal time.
        at_ms: u64,
        /// Idempotency key.
        key: Option<String>,
        /// Validated specs.
        jobs: Vec<JobSpec>,
        /// Pipeline name.
        pipeline: String,
        /// Name of the submitting token.
        owner: Option<String>,
        /// The pipeline's `repeat:` and `run_dir:` (validated).
        run_policy: RunPolicy,
    },
    /// `gantry pipeline stop`: the loop of a repeating pipeline starts no
    /// run after its latest one (nothing to stop changes nothing).
    StopPipeline {
        /// Time.
        at_ms: u64,
        /// Pipeline.
        name: String,
    },
    /// A gang's attempt broke (a member ended other than by succeeding):
    /// stop its running members, run its succeeded ones again, or end its
    /// waiting ones with a member that ended for good. Apply works out
    /// what is due at `at_ms` from hard state (`state::GangSettle`), so a
    /// duplicate changes nothing.
    GangStop {
        /// The leader's clock when it proposed.
        at_ms: u64,
        /// The gang (its rank-0 member's id).
        gang: JobId,
    },
}

impl Command {
    /// A `RegisterNode` for tests at time 1: `gpus` H100s of `gpu_memory`
    /// each, 8 CPUs, 64 GiB of RAM and 100 GiB of disk.
    pub fn register_for_test(name: &str, gpus: u32, gpu_memory: u64) -> Command {
        Command::RegisterNode {
            at_ms: 1,
            name: name.into(),
            address: "127.0.0.1".into(),
            labels: Default::default(),
            gpus: (0..gpus)
                .map(|index| GpuRecord {
                    index,
                    model: "H100".into(),
                    total: gpu_memory,
                })
                .collect(),
            cpu_millis: 8000,
            memory_total: 64 << 30,
            disk_total: 100 << 30,
        }
    }

    /// An `Assign` for tests: `job` on GPU 0 of `node` with 10 GiB, in a
    /// plan of term 1.
    pub fn assign_for_test(at_ms: u64, job: JobId, node: &str) -> Command {
        Command::Assign {
            at_ms,
            placements: vec![Placement {
                job,
                node: node.into(),
                gpus: vec![0],
                gpu_memory: 10 << 30,
                batch_size: None,
                exclusive_gpu: false,
            }],
            term: 1,
        }
    }

    /// A `JobExited` for tests: attempt `attempt` of `job` on `node` exited
    /// with `code` (an error text when it is not 0; no signal, no tail).
    pub fn exited_for_test(at_ms: u64, job: JobId, attempt: u32, node: &str, code: i32) -> Command {
        Command::JobExited {
            at_ms,
            job,
            attempt,
            node: node.into(),
            code: Some(code),
            signal: None,
            error: if code == 0 {
                String::new()
            } else {
                format!("exit status {code}")
            },
            cancelled: false,
            oom: false,
            output_tail: String::new(),
            peak_gpu_memory: 0,
        }
    }

    /// The one job this command is about, if it is about one (for its log span).
    pub fn job(&self) -> Option<JobId> {
        match self {
            Command::JobStarted { job, .. }
            | Command::JobExited { job, .. }
            | Command::Requeue { job, .. }
            | Command::DlqRetry { job, .. }
            | Command::DlqDrop { job, .. }
            | Command::ReviveAttempt { job, .. }
            | Command::RequestCancel { job, .. }
            | Command::AttemptLost { job, .. }
            | Command::Preempt { job, .. }
            | Command::GangStop { gang: job, .. } => Some(*job),
            Command::Submit { .. }
            | Command::RegisterNode { .. }
            | Command::Assign { .. }
            | Command::SetNodeDown { .. }
            | Command::SetDrain { .. }
            | Command::PreemptDrained { .. }
            | Command::Quarantine { .. }
            | Command::ClearQuarantine { .. }
            | Command::SetRetention { .. }
            | Command::Retire { .. }
            | Command::SetGpuHealth { .. }
            | Command::SubmitLoop { .. }
            | Command::StopPipeline { .. } => None,
        }
    }

    /// The command's own time: retention is decided from it in apply.
    pub fn at_ms(&self) -> u64 {
        match self {
            Command::Submit { at_ms, .. }
            | Command::RegisterNode { at_ms, .. }
            | Command::Assign { at_ms, .. }
            | Command::JobStarted { at_ms, .. }
            | Command::JobExited { at_ms, .. }
            | Command::Requeue { at_ms, .. }
            | Command::DlqRetry { at_ms, .. }
            | Command::DlqDrop { at_ms, .. }
            | Command::ReviveAttempt { at_ms, .. }
            | Command::RequestCancel { at_ms, .. }
            | Command::AttemptLost { at_ms, .. }
            | Command::SetNodeDown { at_ms, .. }
            | Command::SetDrain { at_ms, .. }
            | Command::PreemptDrained { at_ms, .. }
            | Command::Quarantine { at_ms, .. }
            | Command::ClearQuarantine { at_ms, .. }
            | Command::Preempt { at_ms, .. }
            | Command::SetRetention { at_ms, .. }
            | Command::SetGpuHealth { at_ms, .. }
            | Command::Retire { at_ms }
            | Command::SubmitLoop { at_ms, .. }
            | Command::StopPipeline { at_ms, .. }
            | Command::GangStop { at_ms, .. } => *at_ms,
        }
    }
}
