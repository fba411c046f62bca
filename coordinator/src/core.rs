//! The coordinator's core: one thread that owns the state machine, the store,
//! the health tracker and the agent sessions, and runs scheduling passes.
//! gRPC handlers talk to it only through [`Request`] messages with reply
//! channels, so no lock is shared across tasks.
//!
//! Why a plain thread and not a tokio task: applying a batch of commands ends
//! in a sled flush, which blocks; doing it on a dedicated thread keeps the
//! async runtime free, and draining the queue before each flush gives group
//! commit (one fsync for many submits).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_proto as pb;
use gantry_scheduler::{ClusterSnapshot, GpuView, JobId, JobRequest, NodeState, NodeView, Policy};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::breaker::Breaker;
use crate::command::Command;
use crate::convert;
use crate::domain::{EventRecord, GpuRecord, JobState};
use crate::error::CoordinatorError;
use crate::health::{HealthConfig, HealthTracker};
use crate::metrics::{ClusterView, KindLabel, Metrics};
use crate::raft::RaftHandle;
use crate::state::{ApplyError, Outcome, StateMachine};
use crate::store::Store;

/// A reply channel.
pub type Reply<T> = oneshot::Sender<Result<T, CoordinatorError>>;
/// Messages to one agent's stream.
///
/// Boxed: tokio's channel allocates its slots 32 at a time, and a slot the
/// size of a `CoordinatorMessage` (an `Assignment` inline) or of a
/// `tonic::Status` cost every connected agent tens of KiB (160 MiB at
/// 10,000 agents); a pointer-sized slot costs 256 bytes per channel block.
pub type AgentSender = mpsc::UnboundedSender<Box<pb::CoordinatorMessage>>;

/// Requests to the core.
pub enum Request {
    /// One job.
    GetJob {
        /// Id.
        id: JobId,
        /// Reply.
        reply: Reply<pb::Job>,
    },
    /// Jobs, newest first.
    ListJobs {
        /// State filter (empty = all).
        states: Vec<JobState>,
        /// Most jobs returned.
        limit: usize,
        /// Reply.
        reply: Reply<Vec<pb::Job>>,
    },
    /// Nodes with health.
    ListNodes {
        /// Reply.
        reply: Reply<Vec<pb::Node>>,
    },
    /// Cluster summary.
    Status {
        /// Reply.
        reply: Reply<pb::ClusterStatus>,
    },
    /// The leader's view for `/metrics`.
    ClusterView {
        /// Reply.
        reply: Reply<ClusterView>,
    },
    /// Stored events from an index.
    EventsSince {
        /// First index.
        from: u64,
        /// Most events.
        limit: usize,
        /// Reply.
        reply: Reply<Vec<EventRecord>>,
    },
    /// Read a slice of a job's output from its node.
    ReadLog {
        /// Job.
        job: JobId,
        /// Attempt (0 = latest).
        attempt: u32,
        /// stdout or stderr.
        stream: String,
        /// Offset.
        offset: u64,
        /// Reply with the agent's answer and whether the attempt has ended.
        reply: Reply<(pb::LogData, bool)>,
    },
    /// Jobs in the dead-letter queue.
    DlqList {
        /// Reply.
        reply: Reply<Vec<pb::Job>>,
    },
    /// One run of a pipeline.
    Pipeline {
        /// Name.
        name: String,
        /// Run (0 = latest).
        run: u32,
        /// Reply: the run number and its jobs.
        reply: Reply<(u32, Vec<pb::Job>)>,
    },
    /// The Raft driver applies a committed entry (on its thread, waiting).
    RaftApply {
        /// Log index.
        index: u64,
        /// The serialized command.
        data: Vec<u8>,
        /// The serialized `Result<Outcome, ApplyError>`.
        reply: std_mpsc::Sender<Vec<u8>>,
    },
    /// The Raft driver takes a snapshot of the applied state.
    RaftSnapshot {
        /// Serialized [`crate::store::StateSnapshot`].
        reply: std_mpsc::Sender<Vec<u8>>,
    },
    /// The Raft driver installs a snapshot.
    RaftRestore {
        /// Index the snapshot was taken at.
        index: u64,
        /// Serialized [`crate::store::StateSnapshot`].
        data: Vec<u8>,
        /// Done, or why not.
        reply: std_mpsc::Sender<Result<(), String>>,
    },
    /// The Raft driver asks for the applied index.
    RaftAppliedIndex {
        /// The index.
        reply: std_mpsc::Sender<u64>,
    },
    /// The replication handle, once the Raft node has started.
    AttachRaft {
        /// Handle.
        handle: RaftHandle,
    },
    /// An agent opened its stream and registered.
    AgentRegister {
        /// Session id (unique per stream).
        session: u64,
        /// Registration.
        register: pb::Register,
        /// Where to send its messages.
        sender: AgentSender,
        /// Reply.
        reply: Reply<pb::Registered>,
    },
    /// A message on an agent's stream.
    AgentMessage {
        /// Session id.
        session: u64,
        /// Node name.
        node: String,
        /// Message.
        message: pb::AgentMessage,
    },
    /// Stop: flush storage and end the core thread.
    Shutdown,
    /// An agent's stream ended.
    AgentGone {
        /// Session id.
        session: u64,
        /// Node name.
        node: String,
    },
}

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Identity shown in status.
    pub id: String,
    /// Heartbeat interval told to agents of a small fleet: the shortest
    /// ever asked for. It stretches past this with fleet size
    /// ([`crate::health::heartbeat_interval_ms`]).
    pub heartbeat_interval: Duration,
    /// Heartbeats per second the leader is asked to ingest at most: past
    /// `max_heartbeat_rate` nodes the interval stretches to
    /// `nodes / max_heartbeat_rate` seconds.
    pub max_heartbeat_rate: u32,
    /// Health thresholds.
    pub health: HealthConfig,
    /// Memory kept free on each GPU.
    pub gpu_headroom: u64,
    /// Safety-net scheduling interval.
    pub pass_interval: Duration,
    /// Grace between SIGTERM and SIGKILL for cancels.
    pub kill_grace: Duration,
    /// Stderr signatures of a GPU out-of-memory death.
    pub oom_signatures: Vec<String>,
    /// The nodes the fleet inventory expects (`--inventory`).
    pub inventory: Vec<InventoryHost>,
    /// Refuse agents that are not in the inventory.
    pub strict_inventory: bool,
}

/// A node the fleet inventory (`hosts.yaml`) expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryHost {
    /// Node name (what its agent registers as).
    pub name: String,
    /// Its address.
    pub address: String,
    /// Labels, including `provider` and `region`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// GPU model ("" = no GPUs).
    pub gpu_model: String,
    /// GPUs.
    pub gpu_count: u32,
    /// Memory per GPU.
    pub gpu_memory: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            id: "1".into(),
            heartbeat_interval: Duration::from_secs(1),
            max_heartbeat_rate: DEFAULT_MAX_HEARTBEAT_RATE,
            health: HealthConfig::default(),
            gpu_headroom: 0,
            pass_interval: Duration::from_secs(2),
            kill_grace: Duration::from_secs(5),
            oom_signatures: [
                "CUDA out of memory",
                "OutOfMemoryError",
                "CUBLAS_STATUS_ALLOC_FAILED",
            ]
            .map(String::from)
            .to_vec(),
            inventory: Vec::new(),
            strict_inventory: false,
        }
    }
}

struct Session {
    id: u64,
    sender: AgentSender,
    /// The outstanding RTT probe: nonce and when it was sent.
    ping: Option<(u64, std::time::Instant)>,
    last_ping: std::time::Instant,
}

/// Default of [`CoreConfig::max_heartbeat_rate`]: the design's 10,000 nodes
/// at 1 Hz.
pub const DEFAULT_MAX_HEARTBEAT_RATE: u32 = 10_000;

/// How often the tick's sweeps over every node and session run.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

/// How often the heartbeat interval is recomputed from the fleet size.
const INTERVAL_CHECK: Duration = Duration::from_millis(200);

/// How often each connected agent's round-trip time is probed.
const PING_INTERVAL: Duration = Duration::from_secs(5);

struct LogWaiter {
    session: u64,
    ended: bool,
    reply: Reply<(pb::LogData, bool)>,
}

/// How much of a failed attempt's stderr is kept (and shown by `dlq show`).
const OUTPUT_TAIL_BYTES: usize = 64 << 10;

/// How long a Running job may go unreported after its agent re-registers
/// before it is declared lost (its exit event may still be in flight).
const UNCONFIRMED_GRACE_MS: u64 = 10_000;

/// The core's state. Lives on its own thread; see the module docs.
pub struct Core {
    config: CoreConfig,
    state: StateMachine,
    store: Store,
    health: HealthTracker,
    /// The node circuit breaker's evidence (soft; quarantines are hard state).
    breaker: Breaker,
    sessions: HashMap<String, Session>,
    events: broadcast::Sender<pb::Event>,
    hold_reasons: HashMap<JobId, String>,
    log_waiters: HashMap<u64, LogWaiter>,
    next_request_id: u64,
    unconfirmed: HashMap<(JobId, u32), u64>,
    dirty: bool,
    last_pass_ms: u64,
    started_ms: u64,
    /// Replication; commands are proposed through it and come back applied.
    raft: Option<RaftHandle>,
    /// Whether this replica leads (and has applied its own term's entry).
    leader: bool,
    /// Current Raft term.
    term: u64,
    /// Agents whose registration waits for its RegisterNode to apply.
    registering: HashMap<String, PendingRegistration>,
    /// When the outstanding plan was proposed; no new pass until it applies.
    plan_in_flight: Option<u64>,
    /// Drained nodes past their deadline whose `PreemptDrained` is in
    /// flight, and when it was proposed (proposed again after a timeout).
    preempting: HashMap<String, u64>,
    /// A storage failure: the core stops.
    fatal: Option<String>,
    /// Asked to stop (after the server and the Raft node have stopped).
    stop: bool,
    /// Event metrics this thread observes (pass latency, queue wait).
    metrics: Arc<Metrics>,
    /// The heartbeat interval agents are told now (stretched with the
    /// fleet), in milliseconds.
    heartbeat_interval_ms: u64,
    /// When the interval was last recomputed (it counts every node, so not
    /// on every tick).
    interval_checked: Option<std::time::Instant>,
    /// When the tick last swept nodes and sessions ([`Core::housekeeping`]).
    housekept: Option<std::time::Instant>,
}

struct PendingRegistration {
    session: u64,
    register: pb::Register,
    sender: AgentSender,
    reply: Reply<pb::Registered>,
}

/// A plan not applied within this time is given up (leadership was lost).
const PLAN_TIMEOUT_MS: u64 = 5_000;

/// Wall-clock time in unix milliseconds (commands carry it; apply never reads it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    /// A core over a loaded store.
    pub fn new(
        config: CoreConfig,
        store: Store,
        events: broadcast::Sender<pb::Event>,
        metrics: Arc<Metrics>,
    ) -> Result<Core, CoordinatorError> {
        let state = store.load()?;
        Ok(Core {
            health: HealthTracker::new(config.health),
            breaker: Breaker::default(),
            config,
            state,
            store,
            sessions: HashMap::new(),
            events,
            hold_reasons: HashMap::new(),
            log_waiters: HashMap::new(),
            next_request_id: 1,
            unconfirmed: HashMap::new(),
            dirty: true,
            last_pass_ms: 0,
            started_ms: now_ms(),
            raft: None,
            leader: false,
            term: 0,
            registering: HashMap::new(),
            plan_in_flight: None,
            preempting: HashMap::new(),
            fatal: None,
            stop: false,
            metrics,
            heartbeat_interval_ms: 0,
            interval_checked: None,
            housekept: None,
        })
    }

    /// Runs until every sender of `requests` is dropped. Flushes on exit.
    pub fn run(mut self, requests: std_mpsc::Receiver<Request>) {
        let tick = Duration::from_millis(200);
        loop {
            match requests.recv_timeout(tick) {
                Ok(request) => {
                    self.handle(request);
                    // Group commit: take what else is queued before flushing.
                    for _ in 0..4096 {
                        match requests.try_recv() {
                            Ok(request) => self.handle(request),
                            Err(_) => break,
                        }
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.stop {
                break;
            }
            self.tick();
            if let Some(error) = &self.fatal {
                tracing::error!(%error, "cannot persist state; stopping the coordinator core");
                return;
            }
        }
        if let Err(error) = self.store.flush() {
            tracing::error!(%error, "final flush failed");
        }
        tracing::info!("coordinator core stopped; storage flushed");
    }

    /// Proposes a command through Raft. Its effects (dispatch, cancels,
    /// replies to agents) happen when it comes back applied, in
    /// [`Core::after_apply`], on the leader only.
    fn propose(&mut self, command: Command) {
        let Some(raft) = &self.raft else {
            tracing::warn!("no replication yet; command dropped");
            return;
        };
        match serde_json::to_vec(&command) {
            // The answer is not needed here: the effects come with the apply.
            Ok(bytes) => raft.propose_with(bytes, tokio::sync::oneshot::channel().0),
            Err(error) => tracing::error!(%error, "cannot encode command"),
        }
    }

    /// Applies a committed entry: state machine, storage (the Raft log is
    /// the durable record, so no flush), events, then the leader's effects.
    fn raft_apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let result: Result<Outcome, ApplyError> = match serde_json::from_slice::<Command>(data) {
            Ok(command) => {
                // Lines about one job carry its span (id, attempt, kind, node).
                let span = command
                    .job()
                    .map_or_else(tracing::Span::none, |job| self.job_span(job));
                let _entered = span.enter();
                let result = self.state.apply(command.clone());
                let changes = self.state.take_changes();
                if self.leader {
                    for quarantine in self.breaker.observe(&changes.jobs, &self.state, now_ms()) {
                        self.propose(quarantine);
                    }
                }
                if tracing::enabled!(tracing::Level::DEBUG) {
                    for event in &changes.events {
                        let log = || tracing::debug!(index = event.index, state = %event.state, detail = %event.message, "job transition");
                        if command.job() == Some(event.job_id) {
                            log();
                            continue;
                        }
                        tracing::info_span!(
                            "job",
                            job_id = event.job_id,
                            attempt = event.attempt,
                            kind = event.kind.as_str(),
                            node = %event.node,
                        )
                        .in_scope(log);
                    }
                }
                if let Err(error) = self.store.persist_applied(&self.state, &changes, index) {
                    self.fatal = Some(error.to_string());
                }
                for event in &changes.events {
                    let _ = self.events.send(convert::event_to_proto(event));
                }
                self.dirty |= !changes.jobs.is_empty() || !changes.nodes.is_empty();
                if let Ok(outcome) = &result {
                    self.after_apply(&command, outcome);
                }
                result
            }
            Err(error) => {
                tracing::error!(index, %error, "undecodable log entry skipped");
                Ok(Outcome::Done)
            }
        };
        serde_json::to_vec(&result).unwrap_or_default()
    }

    /// What the leader does once a command is applied.
    fn after_apply(&mut self, command: &Command, outcome: &Outcome) {
        if let Command::JobStarted { job, attempt, .. } | Command::JobExited { job, attempt, .. } =
            command
        {
            self.unconfirmed.remove(&(*job, *attempt));
        }
        if !self.leader {
            return;
        }
        match (command, outcome) {
            (Command::RegisterNode { name, .. }, _) => self.complete_registration(name),
            (Command::Assign { at_ms, .. }, Outcome::Assigned { applied, refused }) => {
                self.plan_in_flight = None;
                for (job, reason) in refused {
                    tracing::warn!(job_id = job, %reason, "placement refused on re-check");
                    self.hold_reasons
                        .insert(*job, format!("placement refused on re-check: {reason}"));
                    self.dirty = true;
                }
                for (job, _) in applied {
                    self.hold_reasons.remove(job);
                    let span = self.job_span(*job);
                    let _entered = span.enter();
                    self.observe_queue_wait(*job, *at_ms);
                    self.send_assignment(*job);
                }
            }
            (
                Command::JobStarted {
                    job, attempt, node, ..
                },
                Outcome::Stale,
            ) => {
                tracing::info!(node = %node, job_id = job, attempt, "stale attempt started; telling the agent to stop it");
                self.send_cancel(node, *job, *attempt);
            }
            (
                Command::RequestCancel { job, .. },
                Outcome::CancelRequested {
                    stop: Some((node, attempt)),
                    ..
                },
            ) => {
                self.send_cancel(node, *job, *attempt);
            }
            (Command::PreemptDrained { .. }, Outcome::Preempted { node, stop }) => {
                self.preempting.remove(node);
                for (job, attempt) in stop {
                    let span = self.job_span(*job);
                    let _entered = span.enter();
                    let reason = format!("preempted: node {node} drained");
                    tracing::info!(%reason, "drain deadline passed; telling the agent to stop the attempt");
                    if !self.send(node, self.cancel_message(*job, *attempt, &reason)) {
                        // Its registration (or the Down timeout) takes over.
                        tracing::warn!(
                            "node not connected; the attempt is stopped when it registers"
                        );
                    }
                }
            }
            (
                Command::ReviveAttempt {
                    job, attempt, node, ..
                },
                Outcome::Revived { withdrawn },
            ) => {
                tracing::info!(node = %node, job_id = job, attempt, "lost attempt came back; kept");
                if let Some((other, number)) = withdrawn {
                    self.send_cancel(other, *job, *number);
                }
            }
            (
                Command::ReviveAttempt {
                    job, attempt, node, ..
                },
                Outcome::Stale,
            ) => {
                tracing::info!(node = %node, job_id = job, attempt, "lost attempt came back too late; stopping it");
                self.send_cancel(node, *job, *attempt);
            }
            _ => {}
        }
    }

    /// Follows leadership: a new leader rebuilds soft state from the next
    /// heartbeats; a deposed one drops its agents so they find the new one.
    fn follow_leadership(&mut self) {
        let Some(raft) = &self.raft else { return };
        let status = raft.status();
        self.term = status.term;
        if status.is_leader == self.leader {
            return;
        }
        self.leader = status.is_leader;
        if self.leader {
            tracing::info!(
                term = status.term,
                "leading: rebuilding soft state from heartbeats"
            );
            self.health = HealthTracker::new(self.config.health);
            // Recomputed (and the new tracker scaled) at the next tick.
            self.heartbeat_interval_ms = 0;
            self.interval_checked = None;
            self.dirty = true;
        } else {
            tracing::info!(term = status.term, leader = ?status.leader_url, "no longer leading: dropping agent streams");
            self.sessions.clear();
            self.unconfirmed.clear();
            self.hold_reasons.clear();
            self.plan_in_flight = None;
            self.preempting.clear();
            for (_, pending) in self.registering.drain() {
                let _ = pending.reply.send(Err(CoordinatorError::NotLeader {
                    leader: status.leader_url.clone(),
                }));
            }
        }
    }

    fn handle(&mut self, request: Request) {
        let now = now_ms();
        match request {
            Request::GetJob { id, reply } => {
                let result = self
                    .state
                    .job(id)
                    .map(|job| {
                        convert::job_to_proto(job, self.hold_reasons.get(&id).map(String::as_str))
                    })
                    .ok_or_else(|| CoordinatorError::NotFound(format!("job {id} not found")));
                let _ = reply.send(result);
            }
            Request::ListJobs {
                states,
                limit,
                reply,
            } => {
                let jobs = self
                    .state
                    .jobs()
                    .rev()
                    .filter(|j| states.is_empty() || states.contains(&j.state))
                    .take(limit)
                    .map(|job| {
                        convert::job_to_proto(
                            job,
                            self.hold_reasons.get(&job.id).map(String::as_str),
                        )
                    })
                    .collect();
                let _ = reply.send(Ok(jobs));
            }
            Request::ListNodes { reply } => {
                let _ = reply.send(Ok(self.nodes_to_proto()));
            }
            Request::Status { reply } => {
                let _ = reply.send(Ok(self.status(now)));
            }
            Request::ClusterView { reply } => {
                let result = if self.leader {
                    Ok(self.cluster_view())
                } else {
                    Err(CoordinatorError::NotLeader {
                        leader: self.raft.as_ref().and_then(|r| r.status().leader_url),
                    })
                };
                let _ = reply.send(result);
            }
            Request::EventsSince { from, limit, reply } => {
                let result = self
                    .store
                    .events_since(from, limit)
                    .map_err(CoordinatorError::from);
                let _ = reply.send(result);
            }
            Request::RaftApply { index, data, reply } => {
                let _ = reply.send(self.raft_apply(index, &data));
            }
            Request::RaftSnapshot { reply } => {
                let bytes = self.store.snapshot_bytes(&self.state);
                match bytes {
                    Ok(bytes) => {
                        let _ = reply.send(bytes);
                    }
                    Err(error) => self.fatal = Some(error.to_string()),
                }
            }
            Request::RaftRestore { index, data, reply } => {
                let result = serde_json::from_slice::<crate::store::StateSnapshot>(&data)
                    .map_err(|e| format!("undecodable snapshot: {e}"))
                    .and_then(|snapshot| {
                        self.store
                            .replace_all(&snapshot, index)
                            .map_err(|e| e.to_string())
                    });
                let result = result.map(|state| {
                    self.state = state;
                    self.dirty = true;
                });
                let _ = reply.send(result);
            }
            Request::RaftAppliedIndex { reply } => {
                let index = self.store.applied_index().unwrap_or(0);
                let _ = reply.send(index);
            }
            Request::Shutdown => self.stop = true,
            Request::AttachRaft { handle } => {
                self.raft = Some(handle);
                self.follow_leadership();
            }
            Request::DlqList { reply } => {
                let jobs = self
                    .state
                    .dead_lettered()
                    .map(|job| convert::job_to_proto(job, None))
                    .collect();
                let _ = reply.send(Ok(jobs));
            }
            Request::Pipeline { name, run, reply } => {
                let (run, jobs) = self.state.pipeline_jobs(&name, run);
                let result = if jobs.is_empty() {
                    Err(CoordinatorError::NotFound(format!(
                        "no pipeline {name:?} run {run}"
                    )))
                } else {
                    Ok((
                        run,
                        jobs.into_iter()
                            .map(|job| {
                                convert::job_to_proto(
                                    job,
                                    self.hold_reasons.get(&job.id).map(String::as_str),
                                )
                            })
                            .collect(),
                    ))
                };
                let _ = reply.send(result);
            }
            Request::ReadLog {
                job,
                attempt,
                stream,
                offset,
                reply,
            } => self.read_log(job, attempt, stream, offset, reply),
            Request::AgentRegister {
                session,
                register,
                sender,
                reply,
            } => self.register(now, session, register, sender, reply),
            Request::AgentMessage {
                session,
                node,
                message,
            } => self.agent_message(now, session, &node, message),
            Request::AgentGone { session, node } => {
                if self.sessions.get(&node).is_some_and(|s| s.id == session) {
                    self.sessions.remove(&node);
                    self.health.on_disconnect(&node);
                    tracing::info!(node = %node, "agent disconnected");
                }
                let orphaned: Vec<u64> = self
                    .log_waiters
                    .iter()
                    .filter(|(_, w)| w.session == session)
                    .map(|(id, _)| *id)
                    .collect();
                for id in orphaned {
                    if let Some(waiter) = self.log_waiters.remove(&id) {
                        let _ = waiter.reply.send(Err(CoordinatorError::Unavailable(format!(
                            "node {node} disconnected"
                        ))));
                    }
                }
            }
        }
    }

    /// The span of one job's handling: every line logged inside it carries
    /// the job's id, current attempt, kind and node.
    fn job_span(&self, job: JobId) -> tracing::Span {
        let record = self.state.job(job);
        let attempt = record.and_then(|j| j.current_attempt());
        tracing::info_span!(
            "job",
            job_id = job,
            attempt = attempt.map_or(0, |a| a.attempt),
            kind = record.map_or("", |j| j.spec.kind.as_str()),
            node = attempt.map_or("", |a| a.node.as_str()),
        )
    }

    fn send(&self, node: &str, message: pb::coordinator_message::Msg) -> bool {
        match self.sessions.get(node) {
            Some(session) => session
                .sender
                .send(Box::new(pb::CoordinatorMessage { msg: Some(message) }))
                .is_ok(),
            None => false,
        }
    }

    fn cancel_message(
        &self,
        job: JobId,
        attempt: u32,
        reason: &str,
    ) -> pb::coordinator_message::Msg {
        let grace_ms = self.config.kill_grace.as_millis() as u64;
        pb::coordinator_message::Msg::Cancel(pb::CancelJob {
            job_id: job,
            attempt,
            grace_ms,
            reason: reason.to_string(),
        })
    }

    fn send_cancel(&self, node: &str, job: JobId, attempt: u32) {
        self.send(node, self.cancel_message(job, attempt, ""));
    }

    /// The assignment message of a job's current attempt, and its node.
    fn assignment_message(&self, job: JobId) -> Option<(String, pb::coordinator_message::Msg)> {
        let record = self.state.job(job)?;
        let attempt = record.current_attempt()?;
        let message = pb::Assignment {
            job_id: job,
            attempt: attempt.attempt,
            spec: Some(convert::spec_to_proto(&record.spec)),
            gpus: attempt.gpus.clone(),
            gpu_memory_bytes: attempt.gpu_memory as i64,
            batch_size: attempt.batch_size,
        };
        Some((
            attempt.node.clone(),
            pb::coordinator_message::Msg::Assign(message),
        ))
    }

    fn send_assignment(&self, job: JobId) {
        let Some((node, message)) = self.assignment_message(job) else {
            return;
        };
        if self.send(&node, message) {
            tracing::debug!("assignment sent");
        } else {
            tracing::warn!(job_id = job, node = %node, "node not connected; assignment will be sent when it registers");
        }
    }

    /// Starts an agent's registration: its RegisterNode is proposed, and the
    /// rest happens in [`Core::complete_registration`] once it is applied.
    fn register(
        &mut self,
        now: u64,
        session: u64,
        register: pb::Register,
        sender: AgentSender,
        reply: Reply<pb::Registered>,
    ) {
        let name = register.node.clone();
        if name.is_empty() {
            let _ = reply.send(Err(CoordinatorError::InvalidArgument {
                field: "register.node".into(),
                reason: "must not be empty".into(),
            }));
            return;
        }
        if !self.leader {
            let leader = self.raft.as_ref().and_then(|r| r.status().leader_url);
            let _ = reply.send(Err(CoordinatorError::NotLeader { leader }));
            return;
        }
        if self.config.strict_inventory && !self.config.inventory.iter().any(|h| h.name == name) {
            tracing::warn!(node = %name, address = %register.address, "agent refused: not in the inventory (--strict-inventory)");
            let _ = reply.send(Err(CoordinatorError::PermissionDenied(format!(
                "node {name:?} is not in the inventory and the coordinator runs with --strict-inventory"
            ))));
            return;
        }
        let command = Command::RegisterNode {
            at_ms: now,
            name: name.clone(),
            address: register.address.clone(),
            labels: convert::labels(register.labels.clone()),
            gpus: register
                .gpus
                .iter()
                .map(|g| GpuRecord {
                    index: g.index,
                    model: g.model.clone(),
                    total: g.total_bytes.max(0) as u64,
                })
                .collect(),
            cpu_millis: register.cpu_millis.max(0) as u64,
            memory_total: register.memory_total_bytes.max(0) as u64,
            disk_total: register.disk_total_bytes.max(0) as u64,
        };
        self.health.on_register(&name, &register, now);
        // A previous stream of this node is replaced now: its messages are stale.
        self.sessions.remove(&name);
        let pending = PendingRegistration {
            session,
            register,
            sender,
            reply,
        };
        if let Some(old) = self.registering.insert(name, pending) {
            let _ = old.reply.send(Err(CoordinatorError::Unavailable(
                "replaced by a newer registration".into(),
            )));
        }
        self.propose(command);
    }

    /// Reconciles a registered agent's running attempts against hard state,
    /// then opens its session: Registered first, then re-sent assignments.
    fn complete_registration(&mut self, name: &str) {
        let Some(PendingRegistration {
            session,
            register,
            sender,
            reply,
        }) = self.registering.remove(name)
        else {
            return;
        };
        let now = now_ms();
        let mut stop = Vec::new();
        let reported: BTreeSet<(JobId, u32)> = register
            .running
            .iter()
            .map(|r| (r.job_id, r.attempt))
            .collect();
        for running in &register.running {
            let job = self.state.job(running.job_id);
            let current = job.is_some_and(|j| {
                j.state.is_active()
                    && j.current_attempt().is_some_and(|a| {
                        a.attempt == running.attempt && a.node == name && a.ended_at_ms == 0
                    })
            });
            let lost_here = job.is_some_and(|j| {
                j.attempts.iter().any(|a| {
                    a.attempt == running.attempt
                        && a.node == name
                        && a.outcome == Some(crate::domain::AttemptOutcome::Lost)
                })
            });
            if current {
                if job.is_some_and(|j| j.state == JobState::Assigned) {
                    self.propose(Command::JobStarted {
                        at_ms: running.started_at_ms.max(now),
                        job: running.job_id,
                        attempt: running.attempt,
                        node: name.to_string(),
                    });
                }
            } else if lost_here {
                // Lost is not dead: kept if its replacement has not started
                // (decided when the revive applies; stopped otherwise).
                self.propose(Command::ReviveAttempt {
                    at_ms: now,
                    job: running.job_id,
                    attempt: running.attempt,
                    node: name.to_string(),
                });
            } else {
                tracing::info!(node = %name, job_id = running.job_id, attempt = running.attempt, "stopping an attempt hard state does not know");
                stop.push(*running);
            }
        }
        let active: Vec<(JobId, u32, JobState, bool, String)> = self
            .state
            .jobs_on(name)
            .filter_map(|j| {
                j.current_attempt().map(|a| {
                    (
                        j.id,
                        a.attempt,
                        j.state,
                        j.cancel_requested,
                        a.preempted.clone(),
                    )
                })
            })
            .collect();
        // Sent after Registered, which must be the stream's first message.
        let mut outgoing = Vec::new();
        for (job, attempt, state, cancel, preempted) in active {
            let is_reported = reported.contains(&(job, attempt));
            if !preempted.is_empty() {
                // Preempted by a drain deadline: stop it, never (re)start it.
                if is_reported {
                    outgoing.push(self.cancel_message(job, attempt, &preempted));
                } else if state == JobState::Assigned {
                    self.propose(Command::AttemptLost {
                        at_ms: now,
                        job,
                        attempt,
                        reason: format!("{preempted}; the agent never started it"),
                    });
                }
                if is_reported || state == JobState::Assigned {
                    continue;
                }
            }
            match state {
                JobState::Assigned if !is_reported => {
                    outgoing.extend(self.assignment_message(job).map(|(_, message)| message));
                }
                JobState::Running if !is_reported => {
                    self.unconfirmed
                        .insert((job, attempt), now + UNCONFIRMED_GRACE_MS);
                }
                _ => {}
            }
            if cancel && is_reported {
                outgoing.push(self.cancel_message(job, attempt, ""));
            }
        }
        self.dirty = true;
        let registered = pb::Registered {
            heartbeat_interval_ms: self.heartbeat_interval_ms() as u32,
            stop,
        };
        let _ = sender.send(Box::new(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(registered.clone())),
        }));
        for message in outgoing {
            let _ = sender.send(Box::new(pb::CoordinatorMessage { msg: Some(message) }));
        }
        // Only now does the session exist for everyone else (pings, dispatch),
        // so nothing can overtake Registered.
        self.sessions.insert(
            name.to_string(),
            Session {
                id: session,
                sender,
                ping: None,
                // Probe soon after registering, not a whole interval later.
                last_ping: std::time::Instant::now()
                    .checked_sub(PING_INTERVAL)
                    .unwrap_or_else(std::time::Instant::now),
            },
        );
        tracing::info!(node = %name, running = register.running.len(), "agent registered");
        let _ = reply.send(Ok(registered));
    }

    fn agent_message(&mut self, now: u64, session: u64, node: &str, message: pb::AgentMessage) {
        if self.sessions.get(node).is_none_or(|s| s.id != session) {
            return; // a replaced session: its messages are stale
        }
        match message.msg {
            Some(pb::agent_message::Msg::Heartbeat(hb)) => {
                if self.health.on_heartbeat(node, &hb, now) {
                    self.dirty = true;
                }
            }
            Some(pb::agent_message::Msg::JobEvent(event)) => self.job_event(now, node, event),
            Some(pb::agent_message::Msg::LogData(data)) => {
                if let Some(waiter) = self.log_waiters.remove(&data.request_id) {
                    let ended = waiter.ended;
                    let _ = waiter.reply.send(Ok((data, ended)));
                }
            }
            Some(pb::agent_message::Msg::Pong(pong)) => {
                let sample = self
                    .sessions
                    .get_mut(node)
                    .and_then(|session| match session.ping {
                        Some((nonce, sent)) if nonce == pong.nonce => {
                            session.ping = None;
                            Some(sent.elapsed().as_secs_f64() * 1000.0)
                        }
                        _ => None,
                    });
                if let Some(rtt_ms) = sample {
                    self.health.on_rtt_sample(node, rtt_ms);
                }
            }
            Some(pb::agent_message::Msg::Register(_)) | None => {
                tracing::warn!(node = %node, "unexpected message on an established agent stream");
            }
        }
    }

    fn job_event(&mut self, now: u64, node: &str, event: pb::JobEvent) {
        let span = self.job_span(event.job_id);
        let _entered = span.enter();
        let at_ms = if event.at_ms > 0 { event.at_ms } else { now };
        let (job, attempt) = (event.job_id, event.attempt);
        let command = match event.event {
            Some(pb::job_event::Event::Started(_)) => Command::JobStarted {
                at_ms,
                job,
                attempt,
                node: node.to_string(),
            },
            Some(pb::job_event::Event::Exited(exit)) if exit.agent_shutdown && !exit.cancelled => {
                Command::AttemptLost {
                    at_ms,
                    job,
                    attempt,
                    reason: format!("the agent on {node} shut down"),
                }
            }
            Some(pb::job_event::Event::Exited(exit)) => {
                let tail = String::from_utf8_lossy(&exit.stderr_tail);
                let failed = !(exit.code == Some(0) && exit.signal.is_none());
                let oom = failed
                    && self
                        .config
                        .oom_signatures
                        .iter()
                        .any(|sig| tail.contains(sig.as_str()));
                let error = if exit.over_memory {
                    crate::breaker::OVER_MEMORY_ERROR.to_string()
                } else {
                    last_lines(&tail, 512)
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .to_string()
                };
                Command::JobExited {
                    at_ms,
                    job,
                    attempt,
                    node: node.to_string(),
                    code: exit.code,
                    signal: exit.signal,
                    error,
                    cancelled: exit.cancelled,
                    oom,
                    output_tail: last_lines(&tail, OUTPUT_TAIL_BYTES),
                    peak_gpu_memory: exit.peak_gpu_memory_bytes.max(0) as u64,
                }
            }
            Some(pb::job_event::Event::SpawnFailed(failed)) => Command::JobExited {
                at_ms,
                job,
                attempt,
                node: node.to_string(),
                code: None,
                signal: None,
                error: format!("spawn failed: {}", failed.error),
                cancelled: false,
                oom: false,
                output_tail: String::new(),
                peak_gpu_memory: 0,
            },
            None => return,
        };
        self.propose(command);
    }

    fn read_log(
        &mut self,
        job: JobId,
        attempt: u32,
        stream: String,
        offset: u64,
        reply: Reply<(pb::LogData, bool)>,
    ) {
        let Some(record) = self.state.job(job) else {
            let _ = reply.send(Err(CoordinatorError::NotFound(format!(
                "job {job} not found"
            ))));
            return;
        };
        let chosen = if attempt == 0 {
            record.current_attempt()
        } else {
            record.attempts.iter().find(|a| a.attempt == attempt)
        };
        let Some(chosen) = chosen else {
            let message = if attempt == 0 {
                format!("job {job} has not been placed yet ({})", record.state)
            } else {
                format!("job {job} has no attempt {attempt}")
            };
            let _ = reply.send(Err(CoordinatorError::NotFound(message)));
            return;
        };
        let node = chosen.node.clone();
        let Some(session) = self.sessions.get(&node) else {
            let _ = reply.send(Err(CoordinatorError::Unavailable(format!(
                "node {node} holding the output of job {job} is not connected"
            ))));
            return;
        };
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let ended = chosen.ended_at_ms > 0 || record.state.is_terminal();
        let message = pb::LogRead {
            request_id,
            job_id: job,
            attempt: chosen.attempt,
            stream,
            offset,
            max_bytes: 256 << 10,
        };
        let session_id = session.id;
        if session
            .sender
            .send(Box::new(pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::LogRead(message)),
            }))
            .is_err()
        {
            let _ = reply.send(Err(CoordinatorError::Unavailable(format!(
                "node {node} disconnected"
            ))));
            return;
        }
        self.log_waiters.insert(
            request_id,
            LogWaiter {
                session: session_id,
                ended,
                reply,
            },
        );
    }

    fn tick(&mut self) {
        let now = now_ms();
        self.follow_leadership();
        if !self.leader {
            return;
        }
        // The loop ticks after every batch of requests, which at 10,000
        // heartbeats/s is thousands of times a second; the sweeps over every
        // node and session below run at most every HOUSEKEEPING_INTERVAL.
        let instant = std::time::Instant::now();
        if self
            .housekept
            .is_none_or(|at| instant.duration_since(at) >= HOUSEKEEPING_INTERVAL)
        {
            self.housekept = Some(instant);
            self.housekeeping(now);
        }
        if self
            .plan_in_flight
            .is_some_and(|since| now.saturating_sub(since) > PLAN_TIMEOUT_MS)
        {
            self.plan_in_flight = None;
        }
        let timer_due =
            now.saturating_sub(self.last_pass_ms) >= self.config.pass_interval.as_millis() as u64;
        if (self.dirty || timer_due) && self.plan_in_flight.is_none() {
            self.schedule(now);
        }
    }

    /// The periodic sweeps of the tick: silence (Suspect/Down), drain
    /// deadlines, unconfirmed attempts, pings, back-off requeues, the
    /// heartbeat interval.
    fn housekeeping(&mut self, now: u64) {
        for node in self.health.tick(now) {
            if self.state.node(&node).is_some_and(|n| !n.down) {
                tracing::warn!(node = %node, "node is down; its jobs are lost and will be retried");
                self.propose(Command::SetNodeDown {
                    at_ms: now,
                    node,
                    down: true,
                });
            }
        }
        self.preempt_due(now);
        for quarantine in self.breaker.recheck_held(&self.state, now) {
            self.propose(quarantine);
        }
        let expired: Vec<(JobId, u32)> = self
            .unconfirmed
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for (job, attempt) in expired {
            self.unconfirmed.remove(&(job, attempt));
            let reason = "the agent no longer runs it".to_string();
            self.propose(Command::AttemptLost {
                at_ms: now,
                job,
                attempt,
                reason,
            });
        }
        self.log_waiters.retain(|_, w| !w.reply.is_closed());
        self.update_heartbeat_interval(now);
        self.send_pings();
        let due: Vec<JobId> = self
            .state
            .backing_off()
            .filter(|j| j.not_before_ms <= now)
            .map(|j| j.id)
            .collect();
        for job in due {
            self.propose(Command::Requeue { at_ms: now, job });
        }
    }

    /// Finds draining nodes past their deadline that still run attempts
    /// not yet preempted, and proposes their preemption. Only nodes whose
    /// agent is connected: a silent node's attempts are left to the Down
    /// timeout (Lost, retried elsewhere), so no attempt is counted twice.
    fn preempt_due(&mut self, now: u64) {
        self.preempting
            .retain(|_, since| now.saturating_sub(*since) <= PLAN_TIMEOUT_MS);
        let due: Vec<String> = self
            .state
            .nodes()
            .filter(|n| n.draining && self.state.drain_due(&n.name, now))
            .filter(|n| !n.down && self.sessions.contains_key(&n.name))
            .filter(|n| !self.preempting.contains_key(&n.name))
            .filter(|n| !self.state.preemptible_on(&n.name).is_empty())
            .map(|n| n.name.clone())
            .collect();
        for node in due {
            tracing::info!(node = %node, "drain deadline passed; preempting its attempts");
            self.preempting.insert(node.clone(), now);
            self.propose(Command::PreemptDrained { at_ms: now, node });
        }
    }

    /// The interval agents are told now (the base until first computed).
    fn heartbeat_interval_ms(&self) -> u64 {
        let base = self.config.heartbeat_interval.as_millis() as u64;
        self.heartbeat_interval_ms.max(base)
    }

    /// Recomputes the heartbeat interval from the number of live nodes (at
    /// most every [`INTERVAL_CHECK`]); when it changed, tells every
    /// connected agent and rescales the health thresholds.
    fn update_heartbeat_interval(&mut self, now: u64) {
        let instant = std::time::Instant::now();
        if self
            .interval_checked
            .is_some_and(|at| instant.duration_since(at) < INTERVAL_CHECK)
        {
            return;
        }
        self.interval_checked = Some(instant);
        let nodes = self.state.nodes().filter(|n| !n.down).count() as u64;
        let interval = crate::health::heartbeat_interval_ms(
            nodes,
            u64::from(self.config.max_heartbeat_rate),
            self.config.heartbeat_interval.as_millis() as u64,
        );
        if interval == self.heartbeat_interval_ms {
            return;
        }
        let first = self.heartbeat_interval_ms == 0;
        self.heartbeat_interval_ms = interval;
        self.health.set_interval(interval, now);
        if first && interval == self.config.heartbeat_interval.as_millis() as u64 {
            return; // agents were told this at registration
        }
        tracing::info!(
            nodes,
            interval_ms = interval,
            max_rate = self.config.max_heartbeat_rate,
            "heartbeat interval changed"
        );
        let message = pb::coordinator_message::Msg::HeartbeatInterval(pb::HeartbeatInterval {
            interval_ms: interval.min(u64::from(u32::MAX)) as u32,
        });
        for session in self.sessions.values() {
            let _ = session.sender.send(Box::new(pb::CoordinatorMessage {
                msg: Some(message.clone()),
            }));
        }
    }

    fn send_pings(&mut self) {
        let now = std::time::Instant::now();
        let mut nonce = self.next_request_id;
        for session in self.sessions.values_mut() {
            if now.duration_since(session.last_ping) < PING_INTERVAL {
                continue;
            }
            nonce += 1;
            session.last_ping = now;
            session.ping = Some((nonce, now));
            let ping = pb::coordinator_message::Msg::Ping(pb::Ping { nonce });
            let _ = session
                .sender
                .send(Box::new(pb::CoordinatorMessage { msg: Some(ping) }));
        }
        self.next_request_id = nonce + 1;
    }

    /// One scheduling pass: snapshot -> plan -> commit -> dispatch.
    fn schedule(&mut self, now: u64) {
        let started = std::time::Instant::now();
        self.plan_and_propose(now);
        self.metrics
            .scheduling_pass_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    fn plan_and_propose(&mut self, now: u64) {
        self.dirty = false;
        self.last_pass_ms = now;
        let mut reasons = HashMap::new();
        let mut queue = Vec::new();
        for job in self.state.pending() {
            if job.not_before_ms > now {
                reasons.insert(
                    job.id,
                    format!(
                        "retry back-off: next attempt in {}s",
                        (job.not_before_ms - now).div_ceil(1000)
                    ),
                );
                continue;
            }
            if let Some(dep) = job.depends_on.iter().find(|d| {
                self.state
                    .job(**d)
                    .is_none_or(|j| j.state != JobState::Succeeded)
            }) {
                let name = self
                    .state
                    .job(*dep)
                    .map(|j| j.spec.name.clone())
                    .unwrap_or_default();
                reasons.insert(job.id, format!("waiting for job {dep} ({name}) to succeed"));
                continue;
            }
            queue.push(JobRequest {
                id: job.id,
                kind: job.spec.kind,
                priority: job.spec.priority,
                submitted_at_ms: job.submitted_at_ms,
                queue: job.spec.queue.clone(),
                resources: learned_resources(job, self.state.estimate(&job.class())),
                exclusive_gpu: job.spec.exclusive_gpu(),
                batch: capped_batch(job),
                locks: job.spec.locks.clone(),
                constraints: job.spec.constraints.clone(),
            });
        }
        if queue.is_empty() {
            self.hold_reasons = reasons;
            return;
        }
        let snapshot = self.snapshot(now);
        let plan = gantry_scheduler::plan(&snapshot, &queue);
        for unplaced in plan.unplaced {
            reasons.insert(unplaced.job, unplaced.reason.to_string());
        }
        // Jobs being placed keep no stale reason; the plan applies shortly.
        for placement in &plan.placements {
            reasons.remove(&placement.job);
        }
        if !plan.placements.is_empty() {
            self.plan_in_flight = Some(now);
            self.propose(Command::Assign {
                at_ms: now,
                placements: plan.placements,
                term: self.term,
            });
        }
        self.hold_reasons = reasons;
    }

    fn snapshot(&self, now: u64) -> ClusterSnapshot {
        let nodes = self
            .state
            .nodes()
            .map(|node| {
                let health = self.health.get(&node.name);
                let state = self.node_state(node);
                // What Gantry's own jobs use on each GPU, from the agent's per-job figures.
                let mut gantry_used: HashMap<u32, u64> = HashMap::new();
                if let Some(h) = health {
                    for job in self.state.jobs_on(&node.name) {
                        if let (Some(used), Some(attempt)) =
                            (h.job_gpu_memory.get(&job.id), job.current_attempt())
                            && !attempt.gpus.is_empty()
                        {
                            for gpu in &attempt.gpus {
                                *gantry_used.entry(*gpu).or_default() +=
                                    used / attempt.gpus.len() as u64;
                            }
                        }
                    }
                }
                let host = self.state.host_usage(&node.name);
                NodeView {
                    name: node.name.clone(),
                    state,
                    draining: node.draining,
                    heard_from: health.is_some(),
                    labels: node.labels.clone(),
                    gpus: node
                        .gpus
                        .iter()
                        .map(|g| {
                            let usage = self.state.gpu_usage(&node.name, g.index);
                            GpuView {
                                index: g.index,
                                model: g.model.clone(),
                                total: g.total,
                                nvml_used: health
                                    .and_then(|h| h.gpus.get(&g.index))
                                    .map_or(0, |t| t.used),
                                gantry_used: gantry_used.get(&g.index).copied().unwrap_or(0),
                                reserved: usage.reserved,
                                exclusive: usage.exclusive,
                                jobs: usage.jobs,
                            }
                        })
                        .collect(),
                    cpu_millis_total: node.cpu_millis,
                    cpu_millis_reserved: host.cpu_millis,
                    memory_total: node.memory_total,
                    memory_reserved: host.memory,
                    disk_total: self.disk_total(node),
                    disk_used: health.map_or(0, |h| h.disk_used),
                    disk_reserved: host.disk,
                    disk_pressure: health.is_some_and(|h| h.disk_pressure),
                    rtt_ms: health.map_or(0.0, |h| h.rtt_ms),
                    provider: node.labels.get("provider").cloned().unwrap_or_default(),
                    recent_failures: self.breaker.recent_failures(&node.name, now),
                    quarantined_until_ms: node.quarantine.as_ref().map_or(0, |q| q.until_ms),
                }
            })
            .collect();
        ClusterSnapshot {
            now_ms: now,
            nodes,
            locks: self.state.locks().clone(),
            policy: self.policy(),
        }
    }

    /// The placement policy of every pass.
    fn policy(&self) -> Policy {
        Policy {
            gpu_headroom: self.config.gpu_headroom,
            ..Policy::default()
        }
    }

    /// A node's data-volume size: the agent's latest report, or what it
    /// registered with.
    fn disk_total(&self, node: &crate::domain::NodeRecord) -> u64 {
        self.health
            .get(&node.name)
            .map_or(node.disk_total, |h| h.disk_total.max(node.disk_total))
    }

    /// A registered node's state as placement and `gantry nodes` see it:
    /// committed Down wins; otherwise the health tracker's view while its
    /// agent is connected; a silent or disconnected node is never Ready.
    fn node_state(&self, node: &crate::domain::NodeRecord) -> NodeState {
        let health = self.health.get(&node.name);
        match health {
            _ if node.down => NodeState::Down,
            Some(h) if self.sessions.contains_key(&node.name) => h.state,
            Some(h) if h.state == NodeState::Down => NodeState::Down,
            _ => NodeState::Suspect,
        }
    }

    fn nodes_to_proto(&self) -> Vec<pb::Node> {
        let now = now_ms();
        self.state
            .nodes()
            .map(|node| {
                let health = self.health.get(&node.name);
                let connected = self.sessions.contains_key(&node.name);
                let state = self.node_state(node);
                pb::Node {
                    name: node.name.clone(),
                    address: node.address.clone(),
                    state: state.as_str().to_string(),
                    draining: node.draining,
                    labels: node.labels.clone().into_iter().collect(),
                    gpus: node
                        .gpus
                        .iter()
                        .map(|g| {
                            let telemetry = health
                                .and_then(|h| h.gpus.get(&g.index))
                                .copied()
                                .unwrap_or_default();
                            pb::GpuInfo {
                                index: g.index,
                                model: g.model.clone(),
                                total_bytes: g.total as i64,
                                used_bytes: telemetry.used as i64,
                                reserved_bytes: self.state.gpu_usage(&node.name, g.index).reserved
                                    as i64,
                                utilization_pct: telemetry.utilization_pct,
                                temperature_c: telemetry.temperature_c,
                            }
                        })
                        .collect(),
                    cpu_millis: node.cpu_millis as i64,
                    memory_total_bytes: node.memory_total as i64,
                    memory_used_bytes: health.map_or(0, |h| h.memory_used as i64),
                    disk_total_bytes: health.map_or(node.disk_total, |h| h.disk_total) as i64,
                    disk_used_bytes: health.map_or(0, |h| h.disk_used as i64),
                    last_seen_ms: health.map_or(0, |h| h.last_seen_ms),
                    rtt_ms: health.map_or(0.0, |h| h.rtt_ms),
                    running_jobs: self.state.jobs_on(&node.name).count() as u32,
                    disk_pressure: health.is_some_and(|h| h.disk_pressure),
                    connected,
                    drain_deadline_ms: node.drain_deadline_ms.unwrap_or(0),
                    ..convert::quarantine_to_proto(node.quarantine.as_ref(), now)
                }
            })
            .chain(self.missing_nodes())
            .collect()
    }

    /// Inventory nodes that never registered, shown as `missing`.
    fn missing_nodes(&self) -> Vec<pb::Node> {
        self.config
            .inventory
            .iter()
            .filter(|host| self.state.node(&host.name).is_none())
            .map(|host| pb::Node {
                name: host.name.clone(),
                address: host.address.clone(),
                state: "missing".into(),
                labels: host.labels.clone().into_iter().collect(),
                gpus: (0..host.gpu_count)
                    .map(|index| pb::GpuInfo {
                        index,
                        model: host.gpu_model.clone(),
                        total_bytes: host.gpu_memory as i64,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// Submission to placement of a job whose assignment just applied.
    fn observe_queue_wait(&self, job: JobId, placed_at_ms: u64) {
        let Some(record) = self.state.job(job) else {
            return;
        };
        let waited = placed_at_ms.saturating_sub(record.submitted_at_ms);
        self.metrics.placements.inc();
        self.metrics
            .queue_wait_seconds
            .get_or_create(&KindLabel {
                kind: record.spec.kind.as_str().to_string(),
            })
            .observe(waited as f64 / 1000.0);
    }

    /// What `/metrics` reports of the cluster (leader only).
    fn cluster_view(&self) -> ClusterView {
        let mut jobs = std::collections::BTreeMap::new();
        for job in self.state.jobs() {
            *jobs
                .entry((
                    job.state.as_str().to_string(),
                    job.spec.kind.as_str().to_string(),
                ))
                .or_default() += 1;
        }
        // Counted as a pass counts it, without building a whole snapshot.
        let mut fleet = gantry_scheduler::disk::FleetPressure::default();
        for node in self.state.nodes() {
            fleet.count(
                self.node_state(node),
                node.draining,
                self.disk_total(node),
                self.health.get(&node.name).is_some_and(|h| h.disk_pressure),
            );
        }
        ClusterView {
            nodes: self.nodes_to_proto(),
            jobs,
            dlq: self.state.dead_lettered().count() as u64,
            agents_connected: self.sessions.len() as u64,
            fleet_disk_pressure: fleet.is_pressured(self.policy().fleet_pressure_fraction),
        }
    }

    fn status(&self, now: u64) -> pb::ClusterStatus {
        let nodes = self.nodes_to_proto();
        let mut jobs_by_state: HashMap<String, u32> = HashMap::new();
        for job in self.state.jobs() {
            *jobs_by_state
                .entry(job.state.as_str().to_string())
                .or_default() += 1;
        }
        let raft = self
            .raft
            .as_ref()
            .map(RaftHandle::status)
            .unwrap_or_default();
        pb::ClusterStatus {
            coordinator_id: self.config.id.clone(),
            is_leader: self.leader,
            leader_url: raft.leader_url.unwrap_or_default(),
            leader_id: raft.leader_id.unwrap_or(0),
            raft_term: raft.term,
            commit_index: raft.commit_index,
            applied_index: raft.applied_index,
            nodes_total: nodes.len() as u32,
            nodes_ready: nodes.iter().filter(|n| n.state == "ready").count() as u32,
            gpus_total: nodes.iter().map(|n| n.gpus.len() as u32).sum(),
            gpu_memory_total_bytes: nodes
                .iter()
                .flat_map(|n| &n.gpus)
                .map(|g| g.total_bytes)
                .sum(),
            gpu_memory_reserved_bytes: nodes
                .iter()
                .flat_map(|n| &n.gpus)
                .map(|g| g.reserved_bytes)
                .sum(),
            jobs_by_state,
            last_event_index: self.state.next_event_index().saturating_sub(1),
            version: format!(
                "{} (up {}s)",
                env!("CARGO_PKG_VERSION"),
                now.saturating_sub(self.started_ms) / 1000
            ),
        }
    }
}

/// The job's resources with its class's learned GPU-memory estimate applied:
/// a class that ran out of memory (or was seen using more) reserves more.
fn learned_resources(
    job: &crate::domain::JobRecord,
    estimate: Option<u64>,
) -> gantry_scheduler::Resources {
    let mut resources = job.spec.resources.clone();
    if let (Some(estimate), true) = (estimate, resources.gpus > 0) {
        // Only an explicit reservation is raised: a tier-sized one is chosen per GPU.
        if let Some(asked) = resources.gpu_memory {
            resources.gpu_memory = Some(asked.max(estimate));
        }
    }
    resources
}

/// The job's batch policy limited to its out-of-memory cap: tiers above the
/// cap become the cap, a memory model's `max` drops to it.
fn capped_batch(job: &crate::domain::JobRecord) -> Option<gantry_scheduler::BatchPolicy> {
    let mut batch = job.spec.batch.clone()?;
    let Some(cap) = job.batch_cap else {
        return Some(batch);
    };
    for tier in &mut batch.tiers {
        tier.size = tier.size.min(cap);
    }
    if let Some(model) = &mut batch.model {
        model.max = model.max.min(cap).max(model.min);
    }
    Some(batch)
}

/// The last `max` bytes of `text`, cut at a line start where possible.
fn last_lines(text: &str, max: usize) -> String {
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    match tail.find('\n') {
        Some(i) => tail[i + 1..].to_string(),
        None => tail.to_string(),
    }
}
