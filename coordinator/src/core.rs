//! The coordinator's core: the state machine, the store, the health tracker
//! and the agent sessions, and the scheduling passes. It is the replica
//! loop's application ([`crate::raft::ReplicatedStateMachine`], in
//! `core/replica.rs`): the loop thread that owns the Raft node owns the
//! core too, applies committed entries to it directly and answers each
//! proposer with its typed outcome. gRPC handlers talk to it only through
//! [`Request`] messages with reply channels (sent through the loop's
//! handle), so no lock is shared across tasks.
//!
//! Why a plain thread and not a tokio task: persisting ends in an fsync,
//! which blocks; doing it on a dedicated thread keeps the async runtime
//! free, and draining the inbox before each fsync gives group commit (one
//! fsync, and one log entry, for many submits).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_proto as pb;
use gantry_scheduler::JobId;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::breaker::Breaker;
use crate::command::Command;
use crate::convert;
use crate::decide::{self, Decisions, Registration, Sessions, ToAgent, Tunables};
use crate::domain::{EventRecord, JobState};
use crate::error::CoordinatorError;
use crate::health::{HealthConfig, HealthTracker};
use crate::metrics::{ClusterView, Metrics};
use crate::raft::RaftStatus;
use crate::state::{Outcome, StateMachine};
use crate::store::Store;

mod agents;
mod archive;
mod replica;
mod schedule;
mod views;

pub use views::JobFilter;

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
    /// Where a user's cancel of a job stands ([`decide::effects::cancel_progress`]).
    CancelProgress {
        /// Id.
        id: JobId,
        /// Reply.
        reply: Reply<decide::effects::CancelProgress>,
    },
    /// Jobs, newest first.
    ListJobs {
        /// State filter (empty = all).
        states: Vec<JobState>,
        /// Most jobs returned.
        limit: usize,
        /// Only the jobs of this owner (`gantry jobs --mine`).
        owner: Option<String>,
        /// Only jobs of this kind and pipeline (`/v1/jobs?kind=&pipeline=`):
        /// filtered here, before the limit, so a page stays bounded.
        filter: JobFilter,
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
    /// `gantry jobs --since`: one page of jobs updated since a time, the
    /// history of retired jobs included ([`Core::job_history`]).
    JobHistory {
        /// State filter (empty = all).
        states: Vec<JobState>,
        /// Unix ms.
        since_ms: u64,
        /// The previous page's token ("" = the first page).
        page_token: String,
        /// Most jobs in the page.
        limit: usize,
        /// Reply: the jobs and the next page's token ("" = none).
        reply: Reply<(Vec<pb::Job>, String)>,
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
        /// Reply: the run, its jobs, the loop and the latest runs.
        reply: Reply<pb::PipelineView>,
    },
    /// A backup (`gantry snapshot save`): the applied index and the state
    /// snapshot at it, taken in one step so they agree.
    Backup {
        /// (applied index, serialized [`crate::store::StateSnapshot`]).
        reply: Reply<(u64, Vec<u8>)>,
    },
    /// An agent opened its stream and registered.
    AgentRegister {
        /// Session id (unique per stream).
        session: u64,
        /// Registration, validated.
        register: Registration,
        /// Where to send its messages.
        sender: AgentSender,
        /// Reply (the core sends `Registered` on the stream itself).
        reply: Reply<()>,
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
    /// Retention of finished work; a leader proposes it when hard state
    /// holds another (`Command::SetRetention`).
    pub retention: crate::state::RetentionPolicy,
    /// Fair-share weight per queue (`--queue-weight`); missing = 1.
    pub queue_weights: std::collections::BTreeMap<String, u32>,
    /// Per-kind disk watermarks (`--disk-threshold`).
    pub disk_thresholds:
        std::collections::BTreeMap<gantry_scheduler::JobKind, gantry_scheduler::DiskThresholds>,
    /// The circuit breaker's numbers (`--breaker-*`).
    pub breaker: crate::breaker::BreakerPolicy,
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
            retention: Default::default(),
            queue_weights: Default::default(),
            disk_thresholds: Default::default(),
            breaker: Default::default(),
        }
    }
}

struct Session {
    id: u64,
    sender: AgentSender,
    /// The outstanding RTT probe: nonce and when it was sent.
    ping: Option<(u64, std::time::Instant)>,
    last_ping: std::time::Instant,
    /// Highest heartbeat seq received on this stream, echoed in pings so
    /// the agent knows it is heard (it fences itself otherwise).
    heard_heartbeat_seq: u64,
}

/// Default of [`CoreConfig::max_heartbeat_rate`]: the design's 10,000 nodes
/// at 1 Hz.
pub const DEFAULT_MAX_HEARTBEAT_RATE: u32 = 10_000;

/// How often the tick's sweeps over every node and session run.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

/// How often the heartbeat interval is recomputed from the fleet size.
const INTERVAL_CHECK: Duration = Duration::from_millis(200);

/// How often each connected agent's round-trip time is probed. The ping also
/// confirms the last heartbeat heard, which keeps the agent from fencing
/// itself: it must come well within the agent's fence time (60% of the Down
/// threshold, 9 s at the 1 s interval; see `agent/src/fence.rs`).
const PING_INTERVAL: Duration = Duration::from_secs(3);

struct LogWaiter {
    session: u64,
    ended: bool,
    reply: Reply<(pb::LogData, bool)>,
}

impl Sessions for HashMap<String, Session> {
    fn connected(&self, node: &str) -> bool {
        self.contains_key(node)
    }
}

/// The core's state. Lives on the replica loop's thread; see the module docs.
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
    /// The decision layer's soft state (unconfirmed attempts, preemptions
    /// in flight).
    soft: decide::Soft,
    dirty: bool,
    /// A peer's snapshot file decoded by `check_snapshot`, kept for the
    /// `restore` that follows in the same round (one decode per install);
    /// dropped at the round's tick.
    checked_snapshot: Option<(std::path::PathBuf, crate::store::StateSnapshot)>,
    /// Where the stored state stood at the last snapshot taken
    /// (`ReplicatedStateMachine::snapshot`), for its rebase once its file
    /// is stored.
    snapshot_mark: Option<crate::store::SnapshotMark>,
    /// A failed write of held-back changes outside an apply (before a
    /// read), reported by the loop's next `write_behind`, which stops the
    /// replica.
    store_failure: Option<String>,
    last_pass_ms: u64,
    started_ms: u64,
    /// The replica's status as of the loop's last tick (leadership, term,
    /// the leader's URL).
    raft: RaftStatus,
    /// Commands to propose, taken by the loop after each call into the
    /// core; their effects come when they are applied.
    outbox: Vec<Command>,
    /// Whether this replica leads (and has applied its own term's entry).
    leader: bool,
    /// Current Raft term.
    term: u64,
    /// Agents whose registration waits for its RegisterNode to apply.
    registering: HashMap<String, PendingRegistration>,
    /// When the outstanding plan was proposed; no new pass until it applies.
    plan_in_flight: Option<u64>,
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
    register: Registration,
    sender: AgentSender,
    reply: Reply<()>,
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
    /// Writes everything the store holds back and waits until it is
    /// committed, as before a read of the stored state: for benchmarks and
    /// tests that measure or read the store after applying.
    pub fn sync_store(&mut self) -> Result<(), CoordinatorError> {
        self.store.write_pending(&self.state)?;
        self.store.drain()?;
        Ok(())
    }

    /// A core over a loaded store.
    pub fn new(
        config: CoreConfig,
        mut store: Store,
        events: broadcast::Sender<pb::Event>,
        metrics: Arc<Metrics>,
    ) -> Result<Core, CoordinatorError> {
        let state = store.load()?;
        Ok(Core {
            health: HealthTracker::new(config.health),
            breaker: Breaker::new(config.breaker),
            config,
            state,
            store,
            sessions: HashMap::new(),
            events,
            hold_reasons: HashMap::new(),
            log_waiters: HashMap::new(),
            next_request_id: 1,
            soft: decide::Soft::default(),
            dirty: true,
            checked_snapshot: None,
            snapshot_mark: None,
            store_failure: None,
            last_pass_ms: 0,
            started_ms: now_ms(),
            raft: RaftStatus::default(),
            outbox: Vec::new(),
            leader: false,
            term: 0,
            registering: HashMap::new(),
            plan_in_flight: None,
            metrics,
            heartbeat_interval_ms: 0,
            interval_checked: None,
            housekept: None,
        })
    }

    /// Proposes a command through Raft (the loop takes it from the
    /// outbox after this call into the core). Its effects (dispatch,
    /// cancels, replies to agents) happen when it comes back applied, in
    /// [`Core::after_apply`], on the leader only.
    fn propose(&mut self, command: Command) {
        self.outbox.push(command);
    }

    /// What the leader does once a command is applied.
    fn after_apply(&mut self, command: &Command, outcome: &Outcome) {
        decide::effects::confirmed(&mut self.soft, command);
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
                    self.observe_queue_wait(*job, *at_ms);
                }
            }
            _ => {}
        }
        let tunables = self.tunables();
        let decisions =
            decide::effects::applied(&self.state, &mut self.soft, &tunables, command, outcome);
        self.carry_out(decisions);
    }

    /// The decision layer's tunables, from the configuration.
    fn tunables(&self) -> Tunables {
        Tunables {
            kill_grace_ms: self.config.kill_grace.as_millis() as u64,
            proposal_timeout_ms: PLAN_TIMEOUT_MS,
            ..Tunables::default()
        }
    }

    /// Proposes a decision's commands and sends its messages; a message for
    /// a node whose agent is not connected is dropped (its registration
    /// reconciles it).
    fn carry_out(&mut self, decisions: Decisions) {
        for command in decisions.propose {
            self.propose(command);
        }
        for outgoing in decisions.send {
            let (job, what) = match &outgoing.message {
                ToAgent::Assign(a) => (a.job, "assignment"),
                ToAgent::Cancel { job, .. } => (*job, "cancel"),
                ToAgent::EndRecorded { job, .. } => (*job, "end recorded"),
                ToAgent::Registered { .. } => (0, "registered"),
            };
            let span = self.job_span(job);
            let _entered = span.enter();
            if self.send(&outgoing.node, convert::agent::to_agent(&outgoing.message)) {
                tracing::debug!(node = %outgoing.node, "{what} sent");
            } else {
                tracing::warn!(node = %outgoing.node, "node not connected; {what} dropped (its registration reconciles it)");
            }
        }
    }

    /// Follows leadership: a new leader rebuilds soft state from the next
    /// heartbeats; a deposed one drops its agents so they find the new one.
    fn follow_leadership(&mut self) {
        self.term = self.raft.term;
        if self.raft.is_leader == self.leader {
            return;
        }
        self.leader = self.raft.is_leader;
        if self.leader {
            tracing::info!(
                term = self.term,
                "leading: rebuilding soft state from heartbeats"
            );
            self.health = decide::housekeeping::elected(&self.state, self.config.health, now_ms());
            // Recomputed (and the new tracker scaled) at the next tick.
            self.heartbeat_interval_ms = 0;
            self.interval_checked = None;
            self.dirty = true;
        } else {
            tracing::info!(term = self.term, leader = ?self.raft.leader_url, "no longer leading: dropping agent streams");
            self.sessions.clear();
            self.soft = decide::Soft::default();
            self.hold_reasons.clear();
            self.plan_in_flight = None;
            for (_, pending) in self.registering.drain() {
                let _ = pending.reply.send(Err(CoordinatorError::NotLeader {
                    leader: self.raft.leader_url.clone(),
                }));
            }
        }
    }

    fn handle(&mut self, request: Request) {
        let now = now_ms();
        // A client's read may read the stored state (history, events, a
        // backup): what the store holds back is written first. Agents'
        // messages, the bulk of the requests, read only memory.
        let agent = matches!(
            request,
            Request::AgentRegister { .. }
                | Request::AgentMessage { .. }
                | Request::AgentGone { .. }
        );
        if !agent
            && self.store_failure.is_none()
            && let Err(error) = self.store.write_pending(&self.state)
        {
            self.store_failure = Some(format!("cannot write the applied state: {error}"));
        }
        match request {
            Request::GetJob { id, reply } => {
                let _ = reply.send(self.get_job(id));
            }
            Request::JobHistory {
                states,
                since_ms,
                page_token,
                limit,
                reply,
            } => {
                let _ = reply.send(self.job_history(&states, since_ms, &page_token, limit));
            }
            Request::CancelProgress { id, reply } => {
                let result = self
                    .state
                    .job(id)
                    .map(decide::effects::cancel_progress)
                    .ok_or_else(|| CoordinatorError::NotFound(format!("job {id} not found")));
                let _ = reply.send(result);
            }
            Request::ListJobs {
                states,
                limit,
                owner,
                filter,
                reply,
            } => {
                let jobs = self
                    .state
                    .jobs()
                    .rev()
                    .filter(|j| states.is_empty() || states.contains(&j.state))
                    .filter(|j| owner.is_none() || j.owner == owner)
                    .filter(|j| filter.matches(j))
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
                        leader: self.raft.leader_url.clone(),
                    })
                };
                let _ = reply.send(result);
            }
            Request::EventsSince { from, limit, reply } => {
                let _ = reply.send(self.events_since(from, limit));
            }
            Request::Backup { reply } => {
                let taken = self.store.applied_index().and_then(|index| {
                    let bytes = self.store.snapshot_bytes(&self.state)?;
                    Ok((index, bytes))
                });
                let _ = reply.send(taken.map_err(CoordinatorError::from));
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
                let _ = reply.send(self.pipeline_view(&name, run));
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

    /// The periodic sweeps of the tick: the decision layer's sweep
    /// ([`decide::housekeeping::sweep`]: silence, drain deadlines,
    /// unconfirmed attempts, back-off requeues), then log waiters, the
    /// heartbeat interval and pings.
    fn housekeeping(&mut self, now: u64) {
        let tunables = self.tunables();
        let decisions = decide::housekeeping::sweep(
            &self.state,
            &mut self.health,
            &mut self.soft,
            &self.sessions,
            &tunables,
            now,
        );
        self.carry_out(decisions);
        for quarantine in self.breaker.recheck_held(&self.state, now) {
            self.propose(quarantine);
        }
        if self.state.retention() != &self.config.retention {
            // Every replica retires by the policy in hard state; this
            // leader's flags become it (again, until it applies).
            let policy = self.config.retention;
            self.propose(Command::SetRetention { at_ms: now, policy });
        } else if self.state.retirement_due(now) {
            self.propose(Command::Retire { at_ms: now });
        }
        self.log_waiters.retain(|_, w| !w.reply.is_closed());
        self.update_heartbeat_interval(now);
        self.send_pings();
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
}
