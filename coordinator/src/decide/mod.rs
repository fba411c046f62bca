//! The coordinator's decisions as data: pure functions of (hard state,
//! soft state, sessions, now) that return the commands to propose and the
//! messages to send, in the style of Nomad's scheduler (it reads a state
//! view and submits a plan; a harness plays the planner and records plans).
//!
//! - [`reconcile`]: an agent's registration against hard state.
//! - [`housekeeping`]: the periodic sweep (silence to Down, unconfirmed
//!   attempts, drain deadlines, back-off requeues).
//! - [`effects`]: what the leader sends once a command is applied
//!   (assignments, and every cancel path).
//! - [`schedule`]: a scheduling pass's input (queue, snapshot) and plan.
//! - [`gpu_health`]: what a heartbeat's GPU faults commit.
//!
//! [`crate::core`] only glues these to the world: it owns the state, calls
//! them, proposes what they return through Raft and sends what they return
//! on the agents' streams (converted to prost in [`crate::convert::agent`]).
//!
//! **Architecture Invariant**: nothing here sees prost types, channels,
//! clocks or Raft. Time is an argument; "connected" is the [`Sessions`]
//! trait. Every decision is covered through the table-driven harness in
//! `harness.rs`, where faults (a dropped message, a failover, silence) are
//! inputs.

use std::collections::{BTreeSet, HashMap};

use gantry_scheduler::JobId;

use crate::command::Command;
use crate::domain::{GpuRecord, JobRecord, JobSpec};

pub mod effects;
pub mod gpu_health;
pub mod housekeeping;
pub mod reconcile;
pub mod schedule;

#[cfg(test)]
mod cases;
#[cfg(test)]
mod harness;

/// What a decision returns: commands to propose through Raft and messages
/// to send to agents, in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decisions {
    /// Commands to propose, in order.
    pub propose: Vec<Command>,
    /// Messages to agents, in order (per node, the order they must arrive).
    pub send: Vec<Outgoing>,
}

impl Decisions {
    /// Appends another decision's output.
    pub fn extend(&mut self, other: Decisions) {
        self.propose.extend(other.propose);
        self.send.extend(other.send);
    }

    fn to(&mut self, node: &str, message: ToAgent) {
        self.send.push(Outgoing {
            node: node.to_string(),
            message,
        });
    }
}

/// A message for one node's agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Node name.
    pub node: String,
    /// The message.
    pub message: ToAgent,
}

/// A message from the coordinator to an agent, as the decisions see it.
#[derive(Debug, Clone, PartialEq)]
pub enum ToAgent {
    /// The answer to a registration; always the stream's first message.
    Registered {
        /// Heartbeat interval the agent is told.
        heartbeat_interval_ms: u64,
        /// Reported attempts hard state does not know: the agent stops them.
        stop: Vec<RunningAttempt>,
    },
    /// Start an attempt. Sending the same attempt again is safe only
    /// because an agent answers an assignment for an attempt it already has
    /// with that attempt's status instead of starting it (ARCHITECTURE.md,
    /// "an attempt number is started by at most one process").
    Assign(Box<Assignment>),
    /// Stop an attempt (SIGTERM, then SIGKILL after `grace_ms`).
    Cancel {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Grace between SIGTERM and SIGKILL.
        grace_ms: u64,
        /// Why ("" = cancelled by the user).
        reason: String,
    },
    /// The attempt's final event is committed: the agent stops re-sending
    /// it and may clean up after it.
    EndRecorded {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
    },
}

/// One attempt to start, with everything the agent needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Job.
    pub job: JobId,
    /// Attempt number (the fencing token of its reports).
    pub attempt: u32,
    /// What to run.
    pub spec: JobSpec,
    /// GPU indices on the node.
    pub gpus: Vec<u32>,
    /// Reserved memory per GPU.
    pub gpu_memory: u64,
    /// Batch size chosen at placement (0 = none).
    pub batch_size: u32,
}

/// An attempt an agent says it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunningAttempt {
    /// Job.
    pub job: JobId,
    /// Attempt.
    pub attempt: u32,
    /// When the agent started it (unix ms; 0 = unknown).
    pub started_at_ms: u64,
}

/// An agent's registration, converted from the wire (and validated) in
/// [`crate::convert::agent`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registration {
    /// Node name (never empty).
    pub node: String,
    /// Address its agent listens on.
    pub address: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// GPUs.
    pub gpus: Vec<GpuRecord>,
    /// CPU capacity in millicores.
    pub cpu_millis: u64,
    /// RAM.
    pub memory_total: u64,
    /// Data volume size.
    pub disk_total: u64,
    /// Attempts the agent runs now (or holds ended, not yet reported).
    pub running: Vec<RunningAttempt>,
}

impl Registration {
    /// The reported attempts as (job, attempt) pairs.
    pub fn reported(&self) -> BTreeSet<(JobId, u32)> {
        self.running.iter().map(|r| (r.job, r.attempt)).collect()
    }
}

/// Which nodes have an open agent stream to this leader.
pub trait Sessions {
    /// Whether `node`'s agent is connected.
    fn connected(&self, node: &str) -> bool;
}

impl Sessions for BTreeSet<String> {
    fn connected(&self, node: &str) -> bool {
        self.contains(node)
    }
}

/// The decisions' own soft state: leader memory that is rebuilt, not
/// replicated, and dropped when leadership is lost.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Soft {
    /// Running attempts a registration did not report, and when their
    /// grace ends (they are then declared lost). The grace runs from the
    /// *first* registration that failed to report the attempt: a flapping
    /// agent cannot keep restarting it.
    pub unconfirmed: HashMap<(JobId, u32), u64>,
    /// Drained nodes past their deadline whose `PreemptDrained` is in
    /// flight, and when it was proposed (proposed again after a timeout).
    pub preempting: HashMap<String, u64>,
    /// Gangs whose `GangStop` is in flight, and when it was proposed
    /// (proposed again after a timeout).
    pub gang_stops: HashMap<JobId, u64>,
}

/// Tunables the decisions read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunables {
    /// Grace between SIGTERM and SIGKILL for cancels.
    pub kill_grace_ms: u64,
    /// How long a Running attempt may go unreported after its agent
    /// re-registers before it is declared lost (its exit event may still be
    /// in flight).
    pub unconfirmed_grace_ms: u64,
    /// A proposal not applied within this time is given up (leadership was
    /// lost) and may be proposed again.
    pub proposal_timeout_ms: u64,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            kill_grace_ms: 5_000,
            unconfirmed_grace_ms: 10_000,
            proposal_timeout_ms: 5_000,
        }
    }
}

/// A cancel message for one attempt.
pub fn cancel(tunables: &Tunables, job: JobId, attempt: u32, reason: &str) -> ToAgent {
    ToAgent::Cancel {
        job,
        attempt,
        grace_ms: tunables.kill_grace_ms,
        reason: reason.to_string(),
    }
}

/// What a gang member's process is told of its gang (README, "Gangs"):
/// Gantry's own names and the ones `torchrun` and `torch.distributed`
/// read. `GANTRY_NODES` lists every member's node address in rank order;
/// rank 0's is `MASTER_ADDR`, and `MASTER_PORT` is the port chosen when
/// the gang was placed. Each member's node comes from its current attempt,
/// which every member got in the same command.
pub fn gang_env(
    state: &crate::state::StateMachine,
    gang: &crate::domain::GangMember,
) -> Vec<(String, String)> {
    let addresses: Vec<String> = gang
        .members()
        .map(|id| {
            let node = state
                .job(id)
                .and_then(|j| j.current_attempt())
                .map(|a| a.node.clone())
                .unwrap_or_default();
            state
                .node(&node)
                .map(|n| n.address.clone())
                .filter(|a| !a.is_empty())
                .unwrap_or(node)
        })
        .collect();
    let master = addresses.first().cloned().unwrap_or_default();
    let (rank, size) = (gang.rank.to_string(), gang.size.to_string());
    vec![
        ("GANTRY_RANK".into(), rank.clone()),
        ("GANTRY_WORLD_SIZE".into(), size.clone()),
        ("GANTRY_NODES".into(), addresses.join(",")),
        ("GANTRY_GANG".into(), gang.first.to_string()),
        ("MASTER_ADDR".into(), master),
        ("MASTER_PORT".into(), gang.port.to_string()),
        ("RANK".into(), rank.clone()),
        ("NODE_RANK".into(), rank),
        ("WORLD_SIZE".into(), size),
        ("LOCAL_RANK".into(), "0".into()),
    ]
}

/// What a pipeline job learns of its run: `GANTRY_PIPELINE`,
/// `GANTRY_PIPELINE_RUN`, and after the first run `GANTRY_PREVIOUS_RUN`; with
/// `run_dir:`, `GANTRY_RUN_DIR` and `GANTRY_PREVIOUS_RUN_DIR`. A spec may not
/// set `GANTRY_*` itself (refused at submit), so these never clash.
pub fn pipeline_env(record: &JobRecord) -> Vec<(String, String)> {
    if record.pipeline.is_empty() {
        return Vec::new();
    }
    let run = record.run;
    let policy = &record.run_policy;
    let mut env = vec![
        ("GANTRY_PIPELINE".to_string(), record.pipeline.clone()),
        ("GANTRY_PIPELINE_RUN".to_string(), run.to_string()),
    ];
    if run > 1 {
        env.push(("GANTRY_PREVIOUS_RUN".into(), (run - 1).to_string()));
    }
    if let Some(dir) = policy.run_dir_of(run) {
        env.push(("GANTRY_RUN_DIR".into(), dir));
    }
    if run > 1
        && let Some(dir) = policy.run_dir_of(run - 1)
    {
        env.push(("GANTRY_PREVIOUS_RUN_DIR".into(), dir));
    }
    env
}

/// The assignment of a job's current attempt, and its node; `None` when the
/// job has no attempt (or is gone).
pub fn assignment(state: &crate::state::StateMachine, job: JobId) -> Option<(String, ToAgent)> {
    let record = state.job(job)?;
    let attempt = record.current_attempt()?;
    let mut spec = record.spec.clone();
    if let Some(gang) = &record.gang {
        spec.env.extend(gang_env(state, gang));
    }
    spec.env.extend(pipeline_env(record));
    let message = Assignment {
        job,
        attempt: attempt.attempt,
        spec,
        gpus: attempt.gpus.clone(),
        gpu_memory: attempt.gpu_memory,
        batch_size: attempt.batch_size,
    };
    Some((attempt.node.clone(), ToAgent::Assign(Box::new(message))))
}
