//! The driver: one thread owns the `RawNode` (hence the log) and the
//! application, and runs raft-rs's `Ready` loop. See the module docs of
//! [`crate::raft`] for the ordering it keeps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::fault::FaultHook;
use super::guard::{self, LogView, Refusal, RefusalLog};
use super::logger::raft_logger;
use super::storage::SledRaftStorage;
use super::transport::{Outgoing, PeerCheck, PeerSenders, RaftPeerService};
use super::{ProposeError, RaftConfig, RaftError, RaftStatus, ReplicatedStateMachine};
use gantry_proto::raft::raft_peer_server::RaftPeerServer;

/// The reply to a proposal: the application's reply bytes once the entry is
/// committed and applied.
pub type ProposeReply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;

/// Inputs of the driver thread.
pub(crate) enum Input {
    /// Append a command (leader only).
    Propose { data: Vec<u8>, reply: ProposeReply },
    /// A message from a peer, with the sender named by its batch and the
    /// address it came from (for the log of refusals).
    Step {
        message: Box<Message>,
        from: u64,
        peer: Option<SocketAddr>,
    },
    /// A peer did not answer.
    Unreachable(u64),
    /// Whether a snapshot reached a peer.
    SnapshotStatus { to: u64, finished: bool },
}

/// Inputs handled per round before the driver ticks and builds a `Ready`,
/// so that a flood of proposals cannot starve the clock.
const MAX_INPUTS_PER_ROUND: usize = 8192;
/// Readies handled per round (usually one, two when a persist lets the
/// commit index move).
const MAX_READIES_PER_ROUND: usize = 4;

/// The cloneable way into a running [`RaftNode`]: propose, watch leadership,
/// serve peers.
#[derive(Clone)]
pub struct RaftHandle {
    id: u64,
    inbox: std_mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    peers: Arc<PeerCheck>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is committed and applied;
    /// returns the application's reply. Fails at once with
    /// [`ProposeError::NotLeader`] on a follower.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.propose_with(data, reply);
        answer.await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Proposes a command without waiting: the answer comes on `reply`
    /// (for callers on plain threads, such as the coordinator's core).
    /// A dropped `reply` sender means [`ProposeError::Stopped`].
    pub fn propose_with(&self, data: Vec<u8>, reply: ProposeReply) {
        if let Err(std_mpsc::SendError(Input::Propose { reply, .. })) =
            self.inbox.send(Input::Propose { data, reply })
        {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }

    /// The latest status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes (leadership, term, commit and applied
    /// index).
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// The `RaftPeer` gRPC service to mount next to the coordinator's other
    /// services (`Server::builder().add_service(handle.peer_service())`).
    pub fn peer_service(&self) -> RaftPeerServer<RaftPeerService> {
        RaftPeerService::new(self.id, self.inbox.clone(), self.peers.clone()).into_server()
    }
}

/// A running replica: the driver thread and the peer sender tasks. Dropping
/// it stops them (use [`RaftNode::stop`] to also wait until the storage is
/// flushed and released).
pub struct RaftNode {
    handle: RaftHandle,
    /// A child of the caller's token: cancelled by `stop`, by `Drop`, or by
    /// the driver itself when it fails.
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Closed when the driver thread has finished (storage flushed).
    done: Option<oneshot::Receiver<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RaftNode {
    /// Opens the Raft storage in `db`, reconciles it with the application
    /// (restoring the application from the stored snapshot when it is
    /// behind it), and starts the driver thread and the peer sender tasks.
    /// Must be called within a tokio runtime. Refuses to start when the
    /// storage and the application's applied index disagree.
    ///
    /// A fresh storage is initialised with the ids of `config.peers` as
    /// voters; every replica of a new cluster must get the same ids. A
    /// single voter campaigns at once and leads within one round.
    pub fn start<A: ReplicatedStateMachine>(
        config: RaftConfig,
        db: &sled::Db,
        mut app: A,
        shutdown: &CancellationToken,
    ) -> Result<RaftNode, RaftError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|error| RaftError::Start(format!("no tokio runtime: {error}")))?;
        let mut storage = SledRaftStorage::open(db)?;
        let voters: Vec<u64> = config.peers.keys().copied().collect();
        if storage.is_fresh() {
            storage.initialize(voters.clone())?;
            storage.flush()?;
        } else {
            let mut stored = storage.conf_state().voters.clone();
            stored.sort_unstable();
            if stored != voters {
                return Err(RaftError::Config(format!(
                    "--peers has ids {voters:?} but this data dir belongs to a cluster of {stored:?} \
                     (membership changes are not supported)"
                )));
            }
        }
        let derived = super::cluster_id(&voters, &config.cluster_name);
        let cluster_id = match storage.cluster_id() {
            Some(stored) => {
                if stored != derived {
                    tracing::info!(
                        cluster_id = format_args!("{stored:#018x}"),
                        "using the cluster id stored when this cluster was created \
                         (--peers ids and --cluster-name only set it then)"
                    );
                }
                stored
            }
            None => {
                storage.set_cluster_id(derived)?;
                storage.flush()?;
                derived
            }
        };
        let mut learners = storage.conf_state().learners.clone();
        learners.sort_unstable();
        let peer_check = Arc::new(PeerCheck {
            cluster_id,
            voters: voters.clone(),
            learners: learners.clone(),
            refusals: Arc::new(RefusalLog::default()),
        });
        let applied = reconcile(&mut storage, &mut app)?;
        let applied_term = raft::Storage::term(&storage, applied)?;

        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied,
            max_size_per_msg: config.max_append_bytes,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = raft_logger(config.id);
        let mut raw = RawNode::new(&raft_config, storage, &logger)?;
        if voters == [config.id] {
            raw.campaign()?;
        }

        let shutdown = shutdown.child_token();
        let (inbox, receiver) = std_mpsc::channel();
        let mut peers = PeerSenders::start(&config, cluster_id, &inbox, &runtime, &shutdown)?;
        let tasks = peers.take_tasks();
        let initial = RaftStatus {
            id: config.id,
            term: raw.raft.term,
            commit_index: raw.raft.raft_log.committed,
            applied_index: applied,
            running: true,
            cluster_id,
            ..Default::default()
        };
        let (status_tx, status) = watch::channel(initial);
        // Shared with the thread's wrapper, which publishes the stop even
        // when the driver panics.
        let status_tx = Arc::new(status_tx);
        let (done_tx, done) = oneshot::channel();
        let driver = Driver {
            id: config.id,
            raw,
            app,
            receiver,
            inbox: inbox.clone(),
            peers,
            urls: config.peers.clone(),
            pending: BTreeMap::new(),
            status: status_tx.clone(),
            shutdown: shutdown.clone(),
            voters: voters.clone(),
            learners,
            refusals: peer_check.refusals.clone(),
            fault: FaultHook::from_env(),
            fatal: None,
            tick: config.tick,
            compact_after: config.compact_after,
            compact_keep: config.compact_keep,
            applied,
            applied_term,
        };
        let thread_shutdown = shutdown.clone();
        let id = config.id;
        let thread = std::thread::Builder::new()
            .name(format!("gantry-raft-{}", config.id))
            .spawn(move || {
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || driver.run()));
                if let Err(payload) = ran {
                    // The driver (and its storage) were dropped while
                    // unwinding; what remains is to say so.
                    let reason = format!("raft thread panicked: {}", panic_message(&*payload));
                    tracing::error!(id, %reason, "raft node stopped");
                    status_tx.send_modify(|status| {
                        status.running = false;
                        status.is_leader = false;
                        status.fatal = Some(reason);
                    });
                    thread_shutdown.cancel();
                }
                drop(done_tx);
            })
            .map_err(|error| RaftError::Start(format!("cannot start the raft thread: {error}")))?;
        tracing::info!(id = config.id, applied, voters = ?voters, "raft node started");
        Ok(RaftNode {
            handle: RaftHandle {
                id: config.id,
                inbox,
                status,
                peers: peer_check,
            },
            shutdown,
            thread: Some(thread),
            done: Some(done),
            tasks,
        })
    }

    /// The cloneable handle: propose, watch status, peer service.
    pub fn handle(&self) -> RaftHandle {
        self.handle.clone()
    }

    /// Stops the driver and the sender tasks and waits until the driver has
    /// flushed and released the storage (the sled directory may then be
    /// opened again). Pending proposals fail with [`ProposeError::Stopped`].
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Makes the application and the storage agree before `RawNode` starts;
/// returns the applied index to start from.
fn reconcile<A: ReplicatedStateMachine>(
    storage: &mut SledRaftStorage,
    app: &mut A,
) -> Result<u64, RaftError> {
    let mut applied = app_applied_index(app)?;
    let last = storage.last_index();
    if applied > last {
        return Err(RaftError::Inconsistent(format!(
            "the application has applied index {applied} but the raft log ends at index {last}"
        )));
    }
    let (snapshot_index, _) = storage.snapshot_index_term();
    if applied < snapshot_index {
        let Some(snapshot) = storage.load_snapshot()? else {
            return Err(RaftError::Inconsistent(format!(
                "snapshot metadata at index {snapshot_index} but no snapshot stored"
            )));
        };
        app.restore(snapshot_index, &snapshot.data)
            .map_err(|reason| RaftError::Restore {
                index: snapshot_index,
                reason,
            })?;
        tracing::info!(
            from = applied,
            to = snapshot_index,
            "application restored from the stored raft snapshot"
        );
        applied = app_applied_index(app)?;
        if applied != snapshot_index {
            return Err(RaftError::Inconsistent(format!(
                "after restoring the snapshot at index {snapshot_index} the application reports applied index {applied}"
            )));
        }
    }
    let first = storage.first_index();
    if applied + 1 < first {
        return Err(RaftError::Inconsistent(format!(
            "the application has applied index {applied} but the raft log starts at index {first} \
             and no snapshot covers the gap"
        )));
    }
    if applied > storage.hard_state().commit {
        // Only committed entries are ever applied: the commit index on disk
        // lagged behind (it is written without a flush of its own).
        storage.set_commit(applied)?;
        storage.flush()?;
    }
    Ok(applied)
}

fn app_applied_index<A: ReplicatedStateMachine>(app: &A) -> Result<u64, RaftError> {
    app.applied_index().map_err(|reason| RaftError::App {
        what: "read its applied index".into(),
        reason,
    })
}

/// The text of a panic's payload (for the reason a dead thread gives).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}

/// A proposal waiting for its entry to be applied.
struct Pending {
    term: u64,
    reply: ProposeReply,
}

struct Driver<A> {
    id: u64,
    raw: RawNode<SledRaftStorage>,
    app: A,
    receiver: std_mpsc::Receiver<Input>,
    /// Our own inbox, for reports found while handling a `Ready`.
    inbox: std_mpsc::Sender<Input>,
    peers: PeerSenders,
    urls: BTreeMap<u64, String>,
    /// Proposals by log index, with the term they were appended in.
    pending: BTreeMap<u64, Pending>,
    status: Arc<watch::Sender<RaftStatus>>,
    shutdown: CancellationToken,
    /// Sorted voters and learners (static), for the checks of peers' messages.
    voters: Vec<u64>,
    learners: Vec<u64>,
    refusals: Arc<RefusalLog>,
    fault: FaultHook,
    /// Why the driver stopped on its own, once it has.
    fatal: Option<String>,
    tick: Duration,
    compact_after: u64,
    compact_keep: u64,
    /// Index and term of the last entry given to the application.
    applied: u64,
    applied_term: u64,
}

impl<A: ReplicatedStateMachine> Driver<A> {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick;
        let mut failure = None;
        while !self.shutdown.is_cancelled() {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(wait) {
                Ok(input) => self.handle(input),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            for _ in 0..MAX_INPUTS_PER_ROUND {
                match self.receiver.try_recv() {
                    Ok(input) => self.handle(input),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.fault.check();
                self.raw.tick();
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
            }
            if let Err(error) = self.on_ready() {
                failure = Some(error);
                break;
            }
            if self.raw.raft.state != StateRole::Leader && !self.pending.is_empty() {
                self.fail_pending(u64::MAX);
            }
            self.publish(true);
        }
        if let Some(error) = &failure {
            tracing::error!(id = self.id, %error, "raft node stopped on a fatal error");
            self.fatal = Some(error.to_string());
        }
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(ProposeError::Stopped));
        }
        if let Err(error) = self.raw.store().flush() {
            tracing::error!(id = self.id, %error, "raft storage flush on shutdown failed");
        }
        self.publish(false);
        self.shutdown.cancel();
        tracing::info!(id = self.id, "raft node stopped");
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { data, reply } => self.propose(data, reply),
            Input::Step {
                message,
                from,
                peer,
            } => {
                if let Err(refusal) = self.check_message(&message, from) {
                    self.refusals.refused(peer, from, &refusal);
                    return;
                }
                if let Err(error) = self.raw.step(*message) {
                    tracing::debug!(id = self.id, %error, "raft message ignored");
                }
            }
            Input::Unreachable(peer) => self.raw.report_unreachable(peer),
            Input::SnapshotStatus { to, finished } => {
                let status = if finished {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    /// Checks a peer's message against this replica's log and configuration
    /// ([`guard::check_message`]) and a snapshot's data against the
    /// application, before raft-rs sees either.
    fn check_message(&self, message: &Message, from: u64) -> Result<(), Refusal> {
        let view = LogView {
            id: self.id,
            term: self.raw.raft.term,
            last_index: self.raw.raft.raft_log.last_index(),
            voters: &self.voters,
            learners: &self.learners,
        };
        guard::check_message(message, from, &view)?;
        if let Some(snapshot) = message.snapshot.as_ref() {
            self.app.check_snapshot(&snapshot.data).map_err(|reason| {
                Refusal::Value(
                    MessageType::MsgSnapshot,
                    format!("the application cannot restore its data: {reason}"),
                )
            })?;
        }
        Ok(())
    }

    fn propose(&mut self, data: Vec<u8>, reply: ProposeReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                self.pending.insert(index, Pending { term, reply });
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(ProposeError::Dropped));
            }
            Err(error) => {
                tracing::warn!(id = self.id, %error, "raft refused a proposal");
                let _ = reply.send(Err(ProposeError::Dropped));
            }
        }
    }

    fn not_leader(&self) -> ProposeError {
        let leader_id = self.leader_id();
        ProposeError::NotLeader {
            leader_id,
            leader_url: leader_id.and_then(|id| self.urls.get(&id).cloned()),
        }
    }

    fn leader_id(&self) -> Option<u64> {
        let leader = self.raw.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    /// Fails the pending proposals with an index up to `through`: their
    /// entries were replaced, or this replica no longer leads.
    fn fail_pending(&mut self, through: u64) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > through {
                break;
            }
            let pending = entry.remove();
            let _ = pending.reply.send(Err(self.not_leader()));
        }
    }

    /// Handles the `Ready`s raft-rs has, in its documented order.
    fn on_ready(&mut self) -> Result<(), RaftError> {
        for _ in 0..MAX_READIES_PER_ROUND {
            if !self.raw.has_ready() {
                break;
            }
            let mut ready = self.raw.ready();
            // A leader's appends may go out before its own persist.
            self.send(ready.take_messages());

            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            let store = self.raw.mut_store();
            if let Some(snapshot) = &snapshot {
                store.apply_snapshot(snapshot)?;
            }
            store.append(ready.entries())?;
            if let Some(hard_state) = ready.hs() {
                store.set_hard_state(hard_state)?;
            }
            if ready.must_sync() {
                store.flush()?;
            }
            if let Some(snapshot) = snapshot {
                self.restore(&snapshot)?;
            }
            // Votes and append responses only after the flush.
            self.send(ready.take_persisted_messages());
            self.apply(ready.take_committed_entries())?;

            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit)?;
            }
            self.send(light.take_messages());
            self.apply(light.take_committed_entries())?;
            self.raw.advance_apply();
        }
        self.maybe_compact()
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let metadata = snapshot.get_metadata();
        self.app
            .restore(metadata.index, &snapshot.data)
            .map_err(|reason| RaftError::Restore {
                index: metadata.index,
                reason,
            })?;
        tracing::info!(
            id = self.id,
            index = metadata.index,
            term = metadata.term,
            bytes = snapshot.data.len(),
            "installed raft snapshot from the leader"
        );
        self.applied = metadata.index;
        self.applied_term = metadata.term;
        self.fail_pending(metadata.index);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let reply = match entry.get_entry_type() {
                // Empty entries are appended by each new leader.
                EntryType::EntryNormal if entry.data.is_empty() => Vec::new(),
                EntryType::EntryNormal => {
                    self.app
                        .apply(entry.index, &entry.data)
                        .map_err(|reason| RaftError::App {
                            what: format!("apply index {}", entry.index),
                            reason,
                        })?
                }
                // Membership is static: nothing proposes conf changes.
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        id = self.id,
                        index = entry.index,
                        "ignored a raft conf change"
                    );
                    Vec::new()
                }
            };
            self.applied = entry.index;
            self.applied_term = entry.term;
            self.fail_pending(entry.index - 1);
            if let Some(pending) = self.pending.remove(&entry.index) {
                let answer = if pending.term == entry.term {
                    Ok(reply)
                } else {
                    Err(self.not_leader())
                };
                let _ = pending.reply.send(answer);
            }
        }
        Ok(())
    }

    /// Snapshots the application and compacts the log once enough entries
    /// were applied since the last snapshot.
    fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let (snapshot_index, _) = self.raw.store().snapshot_index_term();
        if self.applied < snapshot_index + self.compact_after {
            return Ok(());
        }
        let started = Instant::now();
        // A failed snapshot stops the replica: compacting the log behind
        // anything but the whole state would lose the rest for good.
        let data = self.app.snapshot().map_err(|reason| RaftError::App {
            what: format!("take a snapshot at index {}", self.applied),
            reason,
        })?;
        let bytes = data.len();
        let applied = self.applied;
        let keep = self.compact_keep;
        self.raw.mut_store().create_snapshot(applied, data, keep)?;
        tracing::info!(
            id = self.id,
            index = applied,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "raft snapshot taken, log compacted"
        );
        Ok(())
    }

    fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let sent = match message.write_to_bytes() {
                Ok(bytes) => {
                    let sent = self.peers.send(to, Outgoing { bytes, snapshot });
                    if !sent {
                        tracing::debug!(id = self.id, to, "raft message dropped: peer queue full");
                    }
                    sent
                }
                Err(error) => {
                    tracing::error!(id = self.id, to, %error, "cannot encode a raft message");
                    false
                }
            };
            // A leader keeps a follower paused until it hears how its
            // snapshot went: a snapshot that never left must be reported.
            if !sent && snapshot {
                let _ = self.inbox.send(Input::SnapshotStatus {
                    to,
                    finished: false,
                });
            }
        }
    }

    fn publish(&self, running: bool) {
        let raft = &self.raw.raft;
        let leader_id = self.leader_id();
        let status = RaftStatus {
            id: self.id,
            leader_id,
            leader_url: leader_id.and_then(|id| self.urls.get(&id).cloned()),
            term: raft.term,
            // A stopped replica leads nothing, whatever raft-rs last knew.
            is_leader: running && raft.state == StateRole::Leader && self.applied_term == raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            running,
            fatal: self.fatal.clone(),
            cluster_id: self.status.borrow().cluster_id,
        };
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        });
    }
}
