//! The decision harness, in the style of Nomad's `scheduler/testing.go`:
//! it plays the core's glue around the decision functions. Steps feed
//! registrations, heartbeats, job events, cancels, failovers and the
//! passage of time; every proposed command is applied at once to a real
//! [`StateMachine`] (as if Raft committed it), and every message is
//! delivered to a small model of the node's agent, or dropped when the
//! agent is not connected. The harness records what was proposed and sent,
//! and a case checks that record and the final state.
//!
//! The agent model starts a process when an assignment for an attempt it
//! does not have arrives, and answers one it already has without starting
//! anything (the agent's contract; ARCHITECTURE.md). Its attempts survive
//! its restarts (they run under their own supervisors). After every case
//! the harness checks the invariants "an attempt number is started by at
//! most one process" and "once a cancel is acknowledged, no process of that
//! job starts"; a cancel is acknowledged as the client API does it, once
//! [`effects::cancel_progress`] says it is settled.

use std::collections::{BTreeMap, BTreeSet};

use gantry_scheduler::{JobId, Policy};

use super::{Decisions, Registration, RunningAttempt, Soft, ToAgent, Tunables};
use super::{effects, housekeeping, reconcile, schedule};
use crate::command::Command;
use crate::domain::{GpuRecord, JobSpec, JobState};
use crate::health::{GpuTelemetry, HealthConfig, HealthTracker, Heartbeat};
use crate::state::{Outcome, StateMachine};

pub(super) const GIB: u64 = 1 << 30;

/// Time between two ticks of [`Step::Advance`]: the core sweeps every
/// 100 ms and passes at least every 2 s; half a second is fine-grained
/// enough for the thresholds (seconds) and keeps the record readable.
const TICK_MS: u64 = 500;

/// One input.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// The node's agent connects and registers, reporting these attempts
    /// (one 80 GiB GPU per node).
    Register(&'static str, &'static [(JobId, u32)]),
    /// The agent dies: its stream ends, it beats no more. Its processes
    /// keep running.
    Kill(&'static str),
    /// The node's stream silently loses every message from now until the
    /// agent is killed (a connection that broke, not yet noticed).
    Deafen(&'static str),
    /// Messages to the node stay on the wire (sent, not yet received by
    /// the agent) until [`Step::Release`]; a kill loses them.
    Hold(&'static str),
    /// The agent receives what is on the wire to it, in order.
    Release(&'static str),
    /// Jobs are submitted.
    Submit(Vec<JobSpec>),
    /// The agent reports an attempt started.
    Started(&'static str, JobId, u32),
    /// The agent reports an attempt exited with a code.
    Exited(&'static str, JobId, u32, i32),
    /// A user cancels a job.
    Cancel(JobId),
    /// Time passes: every tick, each live agent beats, the leader sweeps
    /// and runs a scheduling pass.
    Advance(u64),
    /// The leader dies; a new one, built from the same hard state, takes
    /// over (agents reconnect only when a step registers them).
    Failover,
}

/// What must hold after the steps.
#[derive(Debug, Clone)]
pub(super) enum Want {
    /// A job's state.
    Job(JobId, JobState),
    /// Whether a node is committed Down.
    Down(&'static str, bool),
    /// Memory reserved on a node's GPU 0.
    Reserved(&'static str, u64),
    /// Processes started for a job (by every agent, over the whole run).
    Starts(JobId, usize),
    /// A line of the record containing this text.
    Recorded(&'static str),
    /// No line of the record contains this text.
    NotRecorded(&'static str),
    /// At most this many commands were proposed in the whole run.
    ProposedAtMost(usize),
}

#[derive(Debug, Default)]
struct Agent {
    /// Whether its process is up (it beats and may register).
    alive: bool,
    /// Messages to it are lost ([`Step::Deafen`]).
    deaf: bool,
    /// Messages to it wait on the wire ([`Step::Hold`]).
    held: bool,
    /// Messages sent and not yet received, in order.
    wire: Vec<ToAgent>,
    /// Attempts it has, by (job, attempt): true while running.
    attempts: BTreeMap<(JobId, u32), bool>,
}

/// The core's glue, played over the decision functions.
pub(super) struct Harness {
    state: StateMachine,
    health: HealthTracker,
    soft: Soft,
    connected: BTreeSet<String>,
    agents: BTreeMap<String, Agent>,
    tunables: Tunables,
    term: u64,
    now: u64,
    /// What was proposed, refused, sent and dropped, in order.
    record: Vec<String>,
    proposed: usize,
    /// Process starts: (job, attempt, node), in order.
    starts: Vec<(JobId, u32, String)>,
    /// Jobs whose cancel was recorded and not yet acknowledged.
    cancelling: BTreeSet<JobId>,
    /// For each job whose cancel was acknowledged, how many process starts
    /// had happened by then.
    cancelled_at: BTreeMap<JobId, usize>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            state: StateMachine::new(),
            health: HealthTracker::new(HealthConfig::default()),
            soft: Soft::default(),
            connected: BTreeSet::new(),
            agents: BTreeMap::new(),
            tunables: Tunables::default(),
            term: 1,
            now: 1_000,
            record: Vec::new(),
            proposed: 0,
            starts: Vec::new(),
            cancelling: BTreeSet::new(),
            cancelled_at: BTreeMap::new(),
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Register(node, running) => self.register(node, running),
            Step::Kill(node) => {
                self.connected.remove(node);
                self.health.on_disconnect(node);
                let agent = self.agents.entry(node.to_string()).or_default();
                agent.alive = false;
                agent.deaf = false;
                agent.held = false;
                agent.wire.clear();
            }
            Step::Deafen(node) => self.agents.entry(node.to_string()).or_default().deaf = true,
            Step::Hold(node) => self.agents.entry(node.to_string()).or_default().held = true,
            Step::Release(node) => {
                let agent = self.agents.entry(node.to_string()).or_default();
                agent.held = false;
                let wire = std::mem::take(&mut agent.wire);
                for message in wire {
                    self.receive(node, message);
                }
            }
            Step::Submit(jobs) => self.propose(Command::Submit {
                at_ms: self.now,
                key: None,
                jobs,
                pipeline: None,
                owner: None,
            }),
            Step::Started(node, job, attempt) => self.propose(Command::JobStarted {
                at_ms: self.now,
                job,
                attempt,
                node: node.into(),
            }),
            Step::Exited(node, job, attempt, code) => {
                if let Some(a) = self.agents.get_mut(node) {
                    a.attempts.insert((job, attempt), false);
                }
                self.propose(exited(self.now, node, job, attempt, code));
            }
            Step::Cancel(job) => self.propose(Command::RequestCancel {
                at_ms: self.now,
                job,
            }),
            Step::Advance(ms) => {
                let until = self.now + ms;
                while self.now < until {
                    self.now = (self.now + TICK_MS).min(until);
                    self.tick();
                }
            }
            Step::Failover => {
                self.term += 1;
                self.connected.clear();
                self.soft = Soft::default();
                self.health = housekeeping::elected(&self.state, HealthConfig::default(), self.now);
                self.record.push(format!("failover term {}", self.term));
            }
        }
    }

    fn register(&mut self, node: &'static str, running: &[(JobId, u32)]) {
        let agent = self.agents.entry(node.to_string()).or_default();
        agent.alive = true;
        let registration = Registration {
            node: node.into(),
            address: "127.0.0.1".into(),
            gpus: vec![GpuRecord {
                index: 0,
                model: "H100".into(),
                total: 80 * GIB,
            }],
            cpu_millis: 64_000,
            memory_total: 512 * GIB,
            disk_total: 1 << 40,
            running: running
                .iter()
                .map(|&(job, attempt)| RunningAttempt {
                    job,
                    attempt,
                    started_at_ms: 0,
                })
                .collect(),
            ..Default::default()
        };
        self.health.on_register(
            node,
            registration.reported(),
            registration.disk_total,
            self.now,
        );
        self.connected.remove(node);
        self.propose(reconcile::register_command(&registration, self.now));
        let decisions = reconcile::registered(
            &self.state,
            &mut self.soft,
            &self.tunables,
            &registration,
            1_000,
            self.now,
        );
        // The registration's own messages go on its new stream.
        self.connected.insert(node.to_string());
        self.carry_out(decisions);
    }

    /// One tick of the leader's loop: beats of live agents, the sweep, a pass.
    fn tick(&mut self) {
        let beats: Vec<String> = self
            .agents
            .iter()
            .filter(|(name, a)| a.alive && self.connected.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for node in beats {
            let beat = Heartbeat {
                gpus: vec![(0, GpuTelemetry::default())],
                disk_total: 1 << 40,
                ..Default::default()
            };
            self.health.on_heartbeat(&node, &beat, self.now);
        }
        let decisions = housekeeping::sweep(
            &self.state,
            &mut self.health,
            &mut self.soft,
            &self.connected,
            &self.tunables,
            self.now,
        );
        self.carry_out(decisions);
        let pass = schedule::pass(
            &self.state,
            &self.health,
            &self.connected,
            &Policy::default(),
            &crate::breaker::Breaker::default(),
            self.term,
            self.now,
        );
        if let Some(assign) = pass.assign {
            self.propose(assign);
        }
        for preempt in pass.preempt {
            self.propose(preempt);
        }
    }

    /// Proposes, i.e. applies at once, then carries out the effects.
    fn propose(&mut self, command: Command) {
        self.proposed += 1;
        let line = summary(&command);
        self.record.push(format!("propose {line}"));
        let outcome = match self.state.apply(command.clone()) {
            Ok(outcome) => outcome,
            Err(error) => {
                self.record.push(format!("refused {line}: {error}"));
                return;
            }
        };
        self.state.take_changes();
        if let Outcome::Assigned { refused, .. } = &outcome {
            for (job, reason) in refused {
                self.record
                    .push(format!("refused placement of {job}: {reason}"));
            }
        }
        if let (Command::RequestCancel { job, .. }, Outcome::CancelRequested { .. }) =
            (&command, &outcome)
        {
            self.cancelling.insert(*job);
        }
        self.acknowledge_cancels();
        effects::confirmed(&mut self.soft, &command);
        let decisions = effects::applied(
            &self.state,
            &mut self.soft,
            &self.tunables,
            &command,
            &outcome,
        );
        self.carry_out(decisions);
    }

    /// Plays the client API's cancel: a cancel is acknowledged once
    /// [`effects::cancel_progress`] says it is settled.
    fn acknowledge_cancels(&mut self) {
        let settled: Vec<JobId> = self
            .cancelling
            .iter()
            .copied()
            .filter(|job| {
                self.state.job(*job).is_some_and(|j| {
                    matches!(
                        effects::cancel_progress(j),
                        effects::CancelProgress::Settled(_)
                    )
                })
            })
            .collect();
        for job in settled {
            self.cancelling.remove(&job);
            self.record.push(format!("acknowledged cancel {job}"));
            self.cancelled_at.insert(job, self.starts.len());
        }
    }

    fn carry_out(&mut self, decisions: Decisions) {
        for command in decisions.propose {
            self.propose(command);
        }
        for outgoing in decisions.send {
            let node = outgoing.node;
            let line = message_summary(&outgoing.message);
            let delivered =
                self.connected.contains(&node) && self.agents.get(&node).is_some_and(|a| a.alive);
            if !delivered {
                self.record.push(format!("drop {node} {line}"));
                continue;
            }
            if self.agents.get(&node).is_some_and(|a| a.deaf) {
                self.record.push(format!("lost {node} {line}"));
                continue;
            }
            self.record.push(format!("send {node} {line}"));
            let agent = self.agents.entry(node.clone()).or_default();
            if agent.held {
                agent.wire.push(outgoing.message);
                continue;
            }
            self.receive(&node, outgoing.message);
        }
    }

    /// The node's agent receives a message.
    fn receive(&mut self, node: &str, message: ToAgent) {
        self.record
            .push(format!("{node} receives {}", message_summary(&message)));
        let agent = self.agents.entry(node.to_string()).or_default();
        match message {
            ToAgent::Assign(a) => {
                // The agent's contract: an attempt it has is answered,
                // never started again.
                if let std::collections::btree_map::Entry::Vacant(entry) =
                    agent.attempts.entry((a.job, a.attempt))
                {
                    entry.insert(true);
                    self.starts.push((a.job, a.attempt, node.to_string()));
                }
            }
            ToAgent::Cancel { job, attempt, .. } => {
                if let Some(running) = agent.attempts.get_mut(&(job, attempt)) {
                    *running = false;
                }
            }
            ToAgent::Registered { .. } | ToAgent::EndRecorded { .. } => {}
        }
    }

    fn check_invariants(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for (job, attempt, node) in &self.starts {
            if !seen.insert((job, attempt)) {
                errors.push(format!("attempt {job}#{attempt} started twice (on {node})"));
            }
        }
        for (job, before) in &self.cancelled_at {
            if let Some((_, attempt, node)) = self.starts[*before..].iter().find(|(j, ..)| j == job)
            {
                errors.push(format!(
                    "job {job} was cancelled, then attempt {attempt} started on {node}"
                ));
            }
        }
        errors
    }

    fn check_want(&self, want: &Want) -> Option<String> {
        let fail = |what: String| Some(format!("{want:?}: {what}"));
        match want {
            Want::Job(job, state) => {
                let got = self.state.job(*job).map(|j| j.state);
                (got != Some(*state)).then(|| format!("{want:?}: got {got:?}"))
            }
            Want::Down(node, down) => {
                let got = self.state.node(node).map(|n| n.down);
                (got != Some(*down)).then(|| format!("{want:?}: got {got:?}"))
            }
            Want::Reserved(node, bytes) => {
                let got = self.state.gpu_usage(node, 0).reserved;
                (got != *bytes).then(|| format!("{want:?}: got {got}"))
            }
            Want::Starts(job, count) => {
                let got = self.starts.iter().filter(|(j, ..)| j == job).count();
                (got != *count).then(|| format!("{want:?}: got {got}"))
            }
            Want::Recorded(text) => {
                if self.record.iter().any(|l| l.contains(text)) {
                    None
                } else {
                    fail("not in the record".into())
                }
            }
            Want::NotRecorded(text) => self
                .record
                .iter()
                .find(|l| l.contains(text))
                .and_then(|l| fail(format!("recorded: {l}"))),
            Want::ProposedAtMost(most) => {
                (self.proposed > *most).then(|| format!("{want:?}: {} proposed", self.proposed))
            }
        }
    }
}

/// Runs the steps and checks the wants and the invariants; on failure the
/// panic shows every problem and the whole record.
pub(super) fn check(steps: Vec<Step>, wants: &[Want]) {
    let mut harness = Harness::new();
    for step in steps {
        harness.step(step);
    }
    let mut errors = harness.check_invariants();
    errors.extend(wants.iter().filter_map(|w| harness.check_want(w)));
    if !errors.is_empty() {
        let record = harness.record.join("\n  ");
        panic!(
            "{}\nrecord ({} proposed):\n  {record}",
            errors.join("\n"),
            harness.proposed
        );
    }
}

/// A job on one GPU with 40 GiB, retried `attempts` times with a 30 s
/// back-off.
pub(super) fn job(name: &str, attempts: u32) -> JobSpec {
    let mut spec = JobSpec::for_test(name);
    spec.resources.gpu_memory = Some(40 * GIB);
    spec.retry.max_attempts = attempts;
    spec.retry.backoff_ms = 30_000;
    spec
}

fn exited(at_ms: u64, node: &str, job: JobId, attempt: u32, code: i32) -> Command {
    Command::JobExited {
        at_ms,
        job,
        attempt,
        node: node.into(),
        code: Some(code),
        signal: None,
        error: String::new(),
        cancelled: false,
        oom: false,
        output_tail: String::new(),
        peak_gpu_memory: 0,
    }
}

/// One line per command: what and on whom.
fn summary(command: &Command) -> String {
    match command {
        Command::Submit { jobs, .. } => format!("Submit {} jobs", jobs.len()),
        Command::RegisterNode { name, .. } => format!("RegisterNode {name}"),
        Command::Assign { placements, .. } => {
            let placed: Vec<String> = placements
                .iter()
                .map(|p| format!("{}@{}", p.job, p.node))
                .collect();
            format!("Assign {}", placed.join(" "))
        }
        Command::JobStarted {
            job, attempt, node, ..
        } => format!("JobStarted {job}#{attempt}@{node}"),
        Command::JobExited {
            job,
            attempt,
            node,
            code,
            ..
        } => format!("JobExited {job}#{attempt}@{node} code {code:?}"),
        Command::AttemptLost {
            job,
            attempt,
            reason,
            ..
        } => format!("AttemptLost {job}#{attempt} ({reason})"),
        Command::ReviveAttempt {
            job, attempt, node, ..
        } => format!("ReviveAttempt {job}#{attempt}@{node}"),
        Command::SetNodeDown { node, down, .. } => format!("SetNodeDown {node} {down}"),
        Command::Requeue { job, .. } => format!("Requeue {job}"),
        Command::RequestCancel { job, .. } => format!("RequestCancel {job}"),
        Command::Preempt {
            job, node, victims, ..
        } => format!("Preempt {job}@{node} victims {victims:?}"),
        other => format!("{other:?}"),
    }
}

fn message_summary(message: &ToAgent) -> String {
    match message {
        ToAgent::Registered { stop, .. } => {
            let stop: Vec<String> = stop
                .iter()
                .map(|r| format!("{}#{}", r.job, r.attempt))
                .collect();
            format!("registered stop [{}]", stop.join(" "))
        }
        ToAgent::Assign(a) => format!("assign {}#{}", a.job, a.attempt),
        ToAgent::Cancel {
            job,
            attempt,
            reason,
            ..
        } => format!("cancel {job}#{attempt} {reason:?}"),
        ToAgent::EndRecorded { job, attempt } => format!("end recorded {job}#{attempt}"),
    }
}
