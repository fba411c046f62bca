//! The replica loop: one thread owns the `RawNode` (hence the log) and the
//! application (for the coordinator, the core: state machine, store, soft
//! state and agent sessions), in the style of raft-rs's `five_mem_node`
//! example. Each round it takes what arrived (proposals, the
//! application's requests, peers' messages), ticks, lets the application
//! run its timers, proposes the round's commands as batch entries
//! ([`super::batch`]), then handles raft-rs's `Ready`s: persist, send,
//! apply committed entries to the application itself, answer each waiting
//! proposer with its own typed outcome, advance. See the module docs of
//! [`crate::raft`] for the ordering it keeps.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::batch::{self, Batch};
use super::fault::FaultHook;
use super::flusher::Flusher;
use super::guard::{self, LogView, Refusal, RefusalLog};
use super::http_urls::HttpUrls;
use super::logger::raft_logger;
use super::members::Members;
use super::membership::{MemberBook, MembersRequest};
use super::snapfile::{Descriptor, SnapshotDir};
use super::storage::SledRaftStorage;
use super::transport::{Outgoing, PeerCheck, PeerSenders, RaftPeerService, SnapshotInbox};
use super::{ProposeError, RaftConfig, RaftError, RaftStatus, ReplicatedStateMachine};
use gantry_proto::raft::raft_peer_server::RaftPeerServer;

/// The reply to a proposal: the application's outcome of its command once
/// the entry is committed and applied.
pub type ProposeReply<O> = oneshot::Sender<Result<O, ProposeError>>;

/// What the transport hands the loop (the same for every application).
pub(crate) enum PeerInput {
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
    /// A peer's member book, with its batch's cluster id
    /// ([`super::membership`]).
    Members { cluster_id: u64, book: MemberBook },
}

/// Inputs of the loop.
pub(crate) enum Input<A: ReplicatedStateMachine> {
    /// Append a command, encoded by its proposer (leader only).
    Propose {
        data: Vec<u8>,
        reply: ProposeReply<A::Outcome>,
    },
    /// A request for the application (a read, an agent's message).
    Request(A::Request),
    /// From the transport.
    Peer(PeerInput),
    /// An admin's membership request.
    Members(MembersRequest),
    /// The flusher's report: every `Ready` up to `number` is durable
    /// ([`super::flusher`]).
    Persisted {
        number: u64,
        flushed: Result<(), sled::Error>,
    },
}

/// The loop's inbox as the transport sees it: it sends [`PeerInput`]s
/// whatever the application. False once the loop has stopped.
#[derive(Clone)]
pub(crate) struct PeerInbox(Arc<dyn Fn(PeerInput) -> bool + Send + Sync>);

impl PeerInbox {
    fn new<A: ReplicatedStateMachine>(inbox: std_mpsc::Sender<Input<A>>) -> PeerInbox {
        PeerInbox(Arc::new(move |input| {
            inbox.send(Input::Peer(input)).is_ok()
        }))
    }

    pub(crate) fn send(&self, input: PeerInput) -> bool {
        (self.0)(input)
    }
}

/// Inputs handled per round before the loop ticks and builds a `Ready`,
/// so that a flood of proposals cannot starve the clock.
const MAX_INPUTS_PER_ROUND: usize = 8192;
/// Readies handled per round (usually one, two when a persist lets the
/// commit index move).
const MAX_READIES_PER_ROUND: usize = 4;

/// The cloneable way into a running [`RaftNode`]: propose, send the
/// application requests, watch leadership, serve peers.
pub struct RaftHandle<A: ReplicatedStateMachine> {
    id: u64,
    inbox: std_mpsc::Sender<Input<A>>,
    status: watch::Receiver<RaftStatus>,
    peers: Arc<PeerCheck>,
    /// Where peers' snapshots are received (one transfer at a time).
    snapshots: Arc<SnapshotInbox>,
}

impl<A: ReplicatedStateMachine> Clone for RaftHandle<A> {
    fn clone(&self) -> Self {
        RaftHandle {
            id: self.id,
            inbox: self.inbox.clone(),
            status: self.status.clone(),
            peers: self.peers.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

impl<A: ReplicatedStateMachine> RaftHandle<A> {
    /// Proposes a command and waits until it is committed and applied;
    /// returns the application's outcome of this command (other commands
    /// of the same entry get theirs). The command is encoded here, on the
    /// caller's thread, once. Fails at once with
    /// [`ProposeError::NotLeader`] on a follower.
    pub async fn propose(&self, command: A::Command) -> Result<A::Outcome, ProposeError> {
        let data = A::encode(&command).map_err(ProposeError::Encode)?;
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(Input::Propose { data, reply })
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.unwrap_or(Err(ProposeError::Stopped))
    }

    /// Hands a request to the application, on the loop. False when the
    /// loop has stopped: the request is dropped (with any reply channel in
    /// it, which its waiter sees closed).
    pub fn request(&self, request: A::Request) -> bool {
        self.inbox.send(Input::Request(request)).is_ok()
    }

    /// Hands a membership request (list, add, remove) to the loop; false
    /// when the loop has stopped.
    pub fn members(&self, request: MembersRequest) -> bool {
        self.inbox.send(Input::Members(request)).is_ok()
    }

    /// The latest status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes: it is woken when leadership, term,
    /// leader, running or the fatal error change, not for the commit and
    /// applied index alone (the value it reads has them current).
    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// The HTTP API base URL of the leader this replica knows, once a
    /// batch from it has said it (see `http_urls`).
    pub fn leader_http_url(&self) -> Option<String> {
        let leader = self.status.borrow().leader_id?;
        self.peers.http.get(leader)
    }

    /// The `RaftPeer` gRPC service to mount next to the coordinator's other
    /// services (`Server::builder().add_service(handle.peer_service())`).
    pub fn peer_service(&self) -> RaftPeerServer<RaftPeerService> {
        RaftPeerService::new(
            self.id,
            PeerInbox::new(self.inbox.clone()),
            self.peers.clone(),
            self.snapshots.clone(),
        )
        .into_server()
    }
}

/// A running replica: the loop thread and the peer sender tasks. Dropping
/// it stops them (use [`RaftNode::stop`] to also wait until the storage is
/// flushed and released).
pub struct RaftNode<A: ReplicatedStateMachine> {
    handle: RaftHandle<A>,
    /// A child of the caller's token: cancelled by `stop`, by `Drop`, or by
    /// the loop itself when it fails.
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Closed when the loop thread has finished (storage flushed).
    done: Option<oneshot::Receiver<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The stored configuration at start was this replica alone.
    single_voter: bool,
}

impl<A: ReplicatedStateMachine> RaftNode<A> {
    /// Opens the Raft storage in `db`, reconciles it with the application
    /// (restoring the application from the stored snapshot when it is
    /// behind it), and starts the loop thread, which takes the application
    /// over, and the peer sender tasks.
    /// Must be called within a tokio runtime. Refuses to start when the
    /// storage and the application's applied index disagree.
    ///
    /// A fresh storage is initialised with the ids of `config.peers` as
    /// voters; every replica of a new cluster must get the same ids. A
    /// single voter campaigns at once and leads within one round.
    pub fn start(
        config: RaftConfig,
        db: &sled::Db,
        mut app: A,
        shutdown: &CancellationToken,
    ) -> Result<RaftNode<A>, RaftError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|error| RaftError::Start(format!("no tokio runtime: {error}")))?;
        let files = SnapshotDir::open(&config.snapshot_dir, config.max_snapshot_bytes)?;
        let snapshots = Arc::new(SnapshotInbox::new(files.clone()));
        let mut storage = SledRaftStorage::open(db, files)?;
        let flag_voters: Vec<u64> = config.peers.keys().copied().collect();
        let joining = storage.is_fresh() && config.join;
        if storage.is_fresh() && !config.join {
            storage.initialize(flag_voters.clone())?;
            storage.flush()?;
        } else if !joining {
            // Membership lives in the log: the stored configuration wins.
            let (stored, _) = super::membership::member_ids(storage.conf_state());
            if !config.join && stored != flag_voters {
                tracing::info!(
                    flag = ?flag_voters,
                    stored = ?stored,
                    "--peers ignored: this data dir's stored membership is used (--peers only bootstraps a new cluster)"
                );
            }
        }
        let cluster_id = if joining {
            storage.cluster_id().unwrap_or(0)
        } else {
            resolve_cluster_id(&mut storage, &flag_voters, &config.cluster_name)?
        };
        let peer_check = Arc::new(PeerCheck {
            cluster_id: cluster_id.into(),
            members: Default::default(),
            book: Default::default(),
            refusals: Arc::new(RefusalLog::default()),
            http: HttpUrls::new(config.id, config.http_url.as_deref()),
        });
        let alive_within = config.tick * u32::try_from(config.election_tick).unwrap_or(u32::MAX);
        let seed = if joining {
            BTreeMap::new()
        } else {
            config.peers.clone()
        };
        let members = Members::open(
            config.id,
            db,
            &storage,
            &seed,
            peer_check.clone(),
            alive_within,
        )?;
        let (voters, learners) = members.ids();
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
            // A commit index travels with the next append or heartbeat
            // instead of an append of its own to every follower: half the
            // peer messages (and the followers' rounds that only apply),
            // off the machine the next submit needs. Followers apply at
            // most a heartbeat later when nothing else is appended.
            skip_bcast_commit: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = raft_logger(config.id);
        let mut raw = RawNode::new(&raft_config, storage, &logger)?;
        let single_voter = voters == [config.id] && learners.is_empty();
        if single_voter {
            raw.campaign()?;
        }

        let shutdown = shutdown.child_token();
        let (inbox, receiver) = std_mpsc::channel();
        let mut peers = PeerSenders::start(
            &config,
            peer_check.clone(),
            &PeerInbox::new(inbox.clone()),
            &runtime,
            &shutdown,
        )?;
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
        let flush_inbox = inbox.clone();
        let flusher = Flusher::start(
            config.id,
            db.clone(),
            Box::new(move |number, flushed| {
                flush_inbox
                    .send(Input::Persisted { number, flushed })
                    .is_ok()
            }),
        )?;
        let (status_tx, status) = watch::channel(initial);
        // Shared with the thread's wrapper, which publishes the stop even
        // when the loop panics.
        let status_tx = Arc::new(status_tx);
        let (done_tx, done) = oneshot::channel();
        let driver = Driver {
            id: config.id,
            raw,
            app,
            receiver,
            inbox: inbox.clone(),
            peers,
            members,
            pending: BTreeMap::new(),
            batch: Batch::default(),
            status: status_tx.clone(),
            cluster_id,
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
            flusher,
            flushing: None,
            unpersisted: VecDeque::new(),
            persist_failure: None,
        };
        let thread_shutdown = shutdown.clone();
        let id = config.id;
        let thread = std::thread::Builder::new()
            .name(format!("gantry-raft-{}", config.id))
            .spawn(move || {
                let mut driver = driver;
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run()));
                if let Err(payload) = ran {
                    // Said first: dropping the loop (the application and
                    // the storage, whose sled flushes on drop) may take a
                    // while, and its callers (probes) must not wait on it.
                    let reason = format!("raft thread panicked: {}", panic_message(&*payload));
                    tracing::error!(id, %reason, "raft node stopped");
                    status_tx.send_modify(|status| {
                        status.running = false;
                        status.is_leader = false;
                        status.fatal = Some(reason);
                    });
                    thread_shutdown.cancel();
                }
                drop(driver);
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
                snapshots,
            },
            shutdown,
            thread: Some(thread),
            done: Some(done),
            tasks,
            single_voter,
        })
    }

    /// Whether the stored configuration at start was this replica alone
    /// (it elects itself at once).
    pub fn is_single_voter(&self) -> bool {
        self.single_voter
    }

    /// The cloneable handle: propose, requests, watch status, peer service.
    pub fn handle(&self) -> RaftHandle<A> {
        self.handle.clone()
    }

    /// Stops the loop and the sender tasks and waits until the loop has
    /// stopped the application and flushed and released the storage (the
    /// sled directory may then be opened again). Pending proposals fail
    /// with [`ProposeError::Stopped`].
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

impl<A: ReplicatedStateMachine> Drop for RaftNode<A> {
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
        let Some(file) = storage.snapshot_file() else {
            return Err(RaftError::Inconsistent(format!(
                "snapshot metadata at index {snapshot_index} but no snapshot stored"
            )));
        };
        app.restore(snapshot_index, file)
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

/// The cluster id stored with the log; for a fresh storage (or one written
/// before cluster ids existed), the one derived from the voters and the
/// name, stored now so that later starts read it back whatever the flags.
fn resolve_cluster_id(
    storage: &mut SledRaftStorage,
    voters: &[u64],
    name: &str,
) -> Result<u64, RaftError> {
    let derived = super::cluster_id(voters, name);
    match storage.cluster_id() {
        Some(stored) => {
            if stored != derived {
                tracing::info!(
                    cluster_id = format_args!("{stored:#018x}"),
                    "using the cluster id stored when this cluster was created \
                     (--peers ids and --cluster-name only set it then)"
                );
            }
            Ok(stored)
        }
        None => {
            storage.set_cluster_id(derived)?;
            storage.flush()?;
            Ok(derived)
        }
    }
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

/// Stores `status` in `sender`, waking its receivers only for a change
/// beyond progress ([`beyond_progress`]).
fn publish_to(sender: &watch::Sender<RaftStatus>, status: RaftStatus) {
    sender.send_if_modified(|current| {
        let notify = beyond_progress(current, &status);
        *current = status;
        notify
    });
}

/// Whether two statuses differ in more than the commit and applied index
/// (the changes a status receiver is woken for). Every field is named, so
/// a new one must be placed on one side or the other.
fn beyond_progress(a: &RaftStatus, b: &RaftStatus) -> bool {
    let RaftStatus {
        id,
        leader_id,
        leader_url,
        term,
        is_leader,
        commit_index: _,
        applied_index: _,
        running,
        fatal,
        cluster_id,
    } = a;
    *id != b.id
        || *leader_id != b.leader_id
        || *leader_url != b.leader_url
        || *term != b.term
        || *is_leader != b.is_leader
        || *running != b.running
        || *fatal != b.fatal
        || *cluster_id != b.cluster_id
}

/// An entry this replica proposed, waiting to be applied: the term it was
/// appended in and its commands' replies, in order.
struct Pending<O> {
    term: u64,
    replies: Vec<Option<ProposeReply<O>>>,
}

impl<O> Pending<O> {
    fn fail(self, error: &ProposeError) {
        for reply in self.replies.into_iter().flatten() {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// Answers each proposer with its own command's outcome; `Err` gives
    /// the replies back when the outcomes do not match them one to one.
    fn answer(self, outcomes: Vec<O>) -> Result<(), Self> {
        if outcomes.len() != self.replies.len() {
            return Err(self);
        }
        for (reply, outcome) in self.replies.into_iter().zip(outcomes) {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(())
    }
}

struct Driver<A: ReplicatedStateMachine> {
    id: u64,
    raw: RawNode<SledRaftStorage>,
    app: A,
    receiver: std_mpsc::Receiver<Input<A>>,
    /// Our own inbox, for reports found while handling a `Ready`.
    inbox: std_mpsc::Sender<Input<A>>,
    peers: PeerSenders,
    /// The configuration as applied, the member book, learners' progress.
    members: Members,
    /// Proposed entries by log index.
    pending: BTreeMap<u64, Pending<A::Outcome>>,
    /// This round's proposals, proposed together at its end.
    batch: Batch<ProposeReply<A::Outcome>>,
    status: Arc<watch::Sender<RaftStatus>>,
    cluster_id: u64,
    shutdown: CancellationToken,
    /// Sorted voters and learners (from `members`), for the checks of
    /// peers' messages.
    voters: Vec<u64>,
    learners: Vec<u64>,
    refusals: Arc<RefusalLog>,
    fault: FaultHook,
    /// Why the loop stopped on its own, once it has.
    fatal: Option<String>,
    tick: Duration,
    compact_after: u64,
    compact_keep: u64,
    /// Index and term of the last entry given to the application.
    applied: u64,
    applied_term: u64,
    /// The leader's flushes ([`super::flusher`]).
    flusher: Flusher,
    /// The latest `Ready` handed to the flusher and not yet reported.
    flushing: Option<u64>,
    /// Messages of such `Ready`s that may leave only once it is durable.
    unpersisted: VecDeque<(u64, Vec<Message>)>,
    /// A failed flush of the flusher's, which stops the loop.
    persist_failure: Option<sled::Error>,
}

impl<A: ReplicatedStateMachine> Driver<A> {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick;
        let mut failure = None;
        while !self.shutdown.is_cancelled() {
            // Proposals the application made while applying, and a Ready
            // left over, do not wait for the next input.
            let wait = if self.batch.is_empty() && !self.raw.has_ready() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
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
            if let Some(error) = self.persist_failure.take() {
                failure = Some(error.into());
                break;
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
            self.propose_batch();
            if let Err(error) = self.on_ready() {
                failure = Some(error);
                break;
            }
            if let Err(reason) = self.app.write_behind() {
                failure = Some(RaftError::App {
                    what: "write the applied state".into(),
                    reason,
                });
                break;
            }
            if self.raw.raft.state != StateRole::Leader && !self.pending.is_empty() {
                self.fail_pending(u64::MAX);
            }
            // The application's own clock (leadership, housekeeping,
            // scheduling passes): once a round, after what the round
            // applied, so a pass sees a submit at once. What it proposes
            // goes with the next round, which then does not wait.
            let applied = self.applied;
            self.members.tick(&mut self.raw, applied);
            let status = self.current_status(true);
            self.app.tick(&status);
            self.take_app_proposals();
            self.publish_status(status);
        }
        if let Some(error) = &failure {
            tracing::error!(id = self.id, %error, "raft node stopped on a fatal error");
            self.fatal = Some(error.to_string());
        }
        for (_, pending) in std::mem::take(&mut self.pending) {
            pending.fail(&ProposeError::Stopped);
        }
        for reply in std::mem::take(&mut self.batch).into_replies() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        self.app.stop();
        if let Err(error) = self.raw.store().flush() {
            tracing::error!(id = self.id, %error, "raft storage flush on shutdown failed");
        }
        self.publish(false);
        self.shutdown.cancel();
        tracing::info!(id = self.id, "raft node stopped");
    }

    fn handle(&mut self, input: Input<A>) {
        match input {
            Input::Propose { data, reply } => {
                if self.raw.raft.state == StateRole::Leader {
                    self.batch.push(data, Some(reply));
                } else {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
            Input::Request(request) => {
                self.app.handle(request);
                self.take_app_proposals();
            }
            Input::Peer(PeerInput::Step {
                message,
                from,
                peer,
            }) => {
                if let Err(refusal) = self.check_message(&message, from) {
                    self.refusals.refused(peer, from, &refusal);
                    return;
                }
                self.members.heard_from(from);
                if let Err(error) = self.raw.step(*message) {
                    tracing::debug!(id = self.id, %error, "raft message ignored");
                }
            }
            Input::Peer(PeerInput::Unreachable(peer)) => self.raw.report_unreachable(peer),
            Input::Peer(PeerInput::SnapshotStatus { to, finished }) => {
                let status = if finished {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::Peer(PeerInput::Members { cluster_id, book }) => {
                match self.members.adopt(self.raw.mut_store(), cluster_id, book) {
                    Ok(Some(adopted)) => self.cluster_id = adopted,
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(id = self.id, %error, "cannot store the member book")
                    }
                }
                self.sync_members();
            }
            Input::Members(request) => self.members.request(&mut self.raw, request),
            Input::Persisted { number, flushed } => match flushed {
                Ok(()) => self.persisted(number),
                Err(error) => self.persist_failure = Some(error),
            },
        }
    }

    /// After a membership change: sender tasks, checks of peers' messages.
    fn sync_members(&mut self) {
        if self.members.sync(&mut self.peers) {
            (self.voters, self.learners) = self.members.ids();
        }
    }

    /// Moves the application's own proposals (no proposer waits for them)
    /// into this round's batch.
    fn take_app_proposals(&mut self) {
        for command in self.app.take_proposals() {
            match A::encode(&command) {
                Ok(data) => self.batch.push(data, None),
                Err(error) => tracing::error!(id = self.id, %error, "command dropped"),
            }
        }
    }

    /// Checks a peer's message against this replica's log and configuration
    /// ([`guard::check_message`]) and a snapshot's data against the
    /// application, before raft-rs sees either.
    fn check_message(&mut self, message: &Message, from: u64) -> Result<(), Refusal> {
        let view = LogView {
            id: self.id,
            term: self.raw.raft.term,
            leader: self.raw.raft.leader_id,
            last_index: self.raw.raft.raft_log.last_index(),
            voters: &self.voters,
            learners: &self.learners,
        };
        guard::check_message(message, from, &view)?;
        if let Some(snapshot) = message.snapshot.as_ref() {
            // The transport put the file in place (size and SHA-256
            // checked) before it handed the message over.
            let refuse = |reason: String| Refusal::Value(MessageType::MsgSnapshot, reason);
            let metadata = snapshot.get_metadata();
            let descriptor = Descriptor::decode(&snapshot.data).map_err(refuse)?;
            let file = self
                .raw
                .store()
                .snapshot_dir()
                .existing(metadata.index, metadata.term, &descriptor)
                .map_err(|error| refuse(error.to_string()))?;
            self.app.check_snapshot(&file).map_err(|reason| {
                refuse(format!("the application cannot restore its data: {reason}"))
            })?;
        }
        Ok(())
    }

    /// Proposes this round's batch: its commands share entries
    /// ([`Batch::into_entries`]), each remembered with its replies. Off
    /// the leader (it may have lost the role during the round) every
    /// proposer is told who leads; the application's own are dropped.
    fn propose_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if self.raw.raft.state != StateRole::Leader {
            let error = self.not_leader();
            for reply in batch.into_replies() {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        for (data, replies) in batch.into_entries() {
            let pending = Pending {
                term: self.raw.raft.term,
                replies,
            };
            match self.raw.propose(Vec::new(), data) {
                Ok(()) => {
                    let index = self.raw.raft.raft_log.last_index();
                    self.pending.insert(index, pending);
                }
                Err(raft::Error::ProposalDropped) => pending.fail(&ProposeError::Dropped),
                Err(error) => {
                    tracing::warn!(id = self.id, %error, "raft refused a proposal");
                    pending.fail(&ProposeError::Dropped);
                }
            }
        }
    }

    fn not_leader(&self) -> ProposeError {
        let leader_id = self.leader_id();
        ProposeError::NotLeader {
            leader_id,
            leader_url: leader_id.and_then(|id| self.members.url(id)),
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
            pending.fail(&self.not_leader());
        }
    }

    /// Handles the `Ready`s raft-rs has, in its documented order. A
    /// leader's flush goes to the flusher ([`super::flusher`]) and raft-rs
    /// learns of it later ([`Driver::persisted`]); anyone else flushes
    /// here, which also covers a leader's earlier writes still in flight.
    fn on_ready(&mut self) -> Result<(), RaftError> {
        for _ in 0..MAX_READIES_PER_ROUND {
            if !self.raw.has_ready() {
                break;
            }
            let mut ready = self.raw.ready();
            // A leader's appends may go out before its own persist.
            self.send(ready.take_messages());

            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            let leader = self.raw.raft.state == StateRole::Leader;
            let store = self.raw.mut_store();
            if let Some(snapshot) = &snapshot {
                store.apply_snapshot(snapshot)?;
            }
            store.append(ready.entries())?;
            if let Some(hard_state) = ready.hs() {
                store.set_hard_state(hard_state)?;
            }
            if snapshot.is_none() && leader {
                self.on_leader_ready(ready)?;
                continue;
            }
            if ready.must_sync() || snapshot.is_some() || self.flushing.is_some() {
                store.flush()?;
            }
            // `advance` below counts every `Ready` so far as durable: so
            // is everything written before that flush.
            self.release(ready.number());
            if let Some(snapshot) = snapshot {
                self.restore(&snapshot)?;
                self.raw.store().remove_stale_snapshots();
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

    /// A leader's `Ready`, its entries and hard state written: the flush
    /// goes to the flusher when the `Ready` needs one, and the loop goes
    /// on. Its committed entries are durable here already (raft-rs hands
    /// out only entries persisted locally), and its commit index reaches
    /// storage with a later `Ready`'s hard state.
    fn on_leader_ready(&mut self, mut ready: raft::Ready) -> Result<(), RaftError> {
        let number = ready.number();
        if ready.must_sync() {
            if !self.flusher.request(number) {
                return Err(RaftError::Inconsistent(
                    "the raft flush thread has stopped".into(),
                ));
            }
            self.flushing = Some(number);
        }
        let persisted = ready.take_persisted_messages();
        if !persisted.is_empty() {
            if self.flushing.is_some() {
                self.unpersisted.push_back((number, persisted));
            } else {
                self.send(persisted);
            }
        }
        self.apply(ready.take_committed_entries())?;
        self.raw.advance_append_async(ready);
        self.raw.advance_apply();
        Ok(())
    }

    /// The flusher's report: every `Ready` up to `number` is durable.
    /// raft-rs is told (a leader's own copy then counts towards the
    /// commit) and the messages that waited for it leave.
    fn persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        self.release(number);
    }

    /// Sends the messages that waited for the `Ready`s up to `number` to
    /// be durable (they are).
    fn release(&mut self, number: u64) {
        if self.flushing.is_some_and(|flushing| flushing <= number) {
            self.flushing = None;
        }
        while self
            .unpersisted
            .front()
            .is_some_and(|(waiting, _)| *waiting <= number)
        {
            if let Some((_, messages)) = self.unpersisted.pop_front() {
                self.send(messages);
            }
        }
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let metadata = snapshot.get_metadata();
        let started = Instant::now();
        let restore = |reason| RaftError::Restore {
            index: metadata.index,
            reason,
        };
        let file = self
            .raw
            .store()
            .snapshot_file()
            .ok_or_else(|| restore("no snapshot file stored".into()))?
            .to_path_buf();
        self.app.restore(metadata.index, &file).map_err(restore)?;
        tracing::info!(
            id = self.id,
            index = metadata.index,
            term = metadata.term,
            bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "installed raft snapshot from the leader"
        );
        self.applied = metadata.index;
        self.applied_term = metadata.term;
        self.members
            .installed(metadata.index, metadata.get_conf_state())?;
        self.sync_members();
        self.fail_pending(metadata.index);
        Ok(())
    }

    /// Applies committed entries to the application, here on the loop,
    /// and answers their proposers. The application's proposals made while
    /// applying (effects of a command) go into the next round's batch.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let outcomes = match entry.get_entry_type() {
                // Empty entries are appended by each new leader.
                EntryType::EntryNormal if entry.data.is_empty() => Vec::new(),
                EntryType::EntryNormal => self.apply_commands(&entry)?,
                EntryType::EntryConfChangeV2 => {
                    self.members.apply(&mut self.raw, &entry)?;
                    self.sync_members();
                    Vec::new()
                }
                // Gantry proposes only V2 changes (the guard refuses v1).
                EntryType::EntryConfChange => {
                    tracing::warn!(
                        id = self.id,
                        index = entry.index,
                        "ignored a v1 conf change"
                    );
                    Vec::new()
                }
            };
            self.take_app_proposals();
            self.applied = entry.index;
            self.applied_term = entry.term;
            self.fail_pending(entry.index - 1);
            if let Some(pending) = self.pending.remove(&entry.index) {
                // Another term's entry at this index replaced ours.
                let answered = if pending.term == entry.term {
                    pending.answer(outcomes)
                } else {
                    Err(pending)
                };
                if let Err(pending) = answered {
                    pending.fail(&self.not_leader());
                }
            }
        }
        Ok(())
    }

    /// The commands of one entry, applied in order: one outcome each.
    fn apply_commands(&mut self, entry: &Entry) -> Result<Vec<A::Outcome>, RaftError> {
        let what = || format!("apply index {}", entry.index);
        let commands = batch::decode(&entry.data).map_err(|reason| RaftError::App {
            what: what(),
            reason,
        })?;
        let outcomes = self
            .app
            .apply(entry.index, &commands)
            .map_err(|reason| RaftError::App {
                what: what(),
                reason,
            })?;
        if outcomes.len() != commands.len() {
            return Err(RaftError::App {
                what: what(),
                reason: format!(
                    "{} outcomes for {} commands",
                    outcomes.len(),
                    commands.len()
                ),
            });
        }
        Ok(outcomes)
    }

    /// Snapshots the application and compacts the log once enough entries
    /// were applied since the last snapshot.
    fn maybe_compact(&mut self) -> Result<(), RaftError> {
        let (snapshot_index, _) = self.raw.store().snapshot_index_term();
        // A new member catches up from a snapshot that names it.
        let due = std::mem::take(&mut self.members.snapshot_due) && self.applied > snapshot_index;
        if !due && self.applied < snapshot_index + self.compact_after {
            return Ok(());
        }
        let started = Instant::now();
        let applied = self.applied;
        // Never keep index 1: a replica with an empty log must get the
        // snapshot (which carries the configuration), not the log from 1.
        let keep = self.compact_keep.min(applied.saturating_sub(1));
        // Streamed into its file. A failed snapshot stops the replica:
        // compacting the log behind anything but the whole state would
        // lose the rest for good (the previous file stays the stored one).
        let app = &mut self.app;
        let descriptor = self
            .raw
            .mut_store()
            .create_snapshot(applied, &mut |out| app.snapshot(out), keep)
            .map_err(|error| RaftError::App {
                what: format!("take a snapshot at index {applied}"),
                reason: error.to_string(),
            })?;
        let bytes = descriptor.map_or(0, |d| d.size);
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
                let _ = self.inbox.send(Input::Peer(PeerInput::SnapshotStatus {
                    to,
                    finished: false,
                }));
            }
        }
    }

    fn current_status(&self, running: bool) -> RaftStatus {
        let raft = &self.raw.raft;
        let leader_id = self.leader_id();
        RaftStatus {
            id: self.id,
            leader_id,
            leader_url: leader_id.and_then(|id| self.members.url(id)),
            term: raft.term,
            // A stopped replica leads nothing, whatever raft-rs last knew.
            is_leader: running && raft.state == StateRole::Leader && self.applied_term == raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            running,
            fatal: self.fatal.clone(),
            cluster_id: self.cluster_id,
        }
    }

    fn publish(&self, running: bool) {
        self.publish_status(self.current_status(running));
    }

    /// Stores the status; wakes the receivers only when something other
    /// than the commit and applied index changed ([`publish_to`]). Those
    /// two move nearly every round, and each wake is a tokio task
    /// scheduled on the replica's runtime for nothing (the watchers act on
    /// leadership and on the loop stopping); readers of
    /// [`RaftHandle::status`] still see them current.
    fn publish_status(&self, status: RaftStatus) {
        publish_to(&self.status, status);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Progress alone (commit, applied) wakes no status receiver; any
    /// other change does.
    #[test]
    fn only_changes_beyond_progress_wake_status_receivers() {
        let base = RaftStatus {
            id: 1,
            leader_id: Some(1),
            term: 3,
            is_leader: true,
            commit_index: 10,
            applied_index: 9,
            running: true,
            ..Default::default()
        };
        let progressed = RaftStatus {
            commit_index: 12,
            applied_index: 12,
            ..base.clone()
        };
        assert!(!beyond_progress(&base, &progressed));
        let changes = [
            RaftStatus {
                leader_id: Some(2),
                ..progressed.clone()
            },
            RaftStatus {
                term: 4,
                ..progressed.clone()
            },
            RaftStatus {
                is_leader: false,
                ..progressed.clone()
            },
            RaftStatus {
                running: false,
                ..progressed.clone()
            },
            RaftStatus {
                fatal: Some("disk".into()),
                ..progressed.clone()
            },
            RaftStatus {
                leader_url: Some("http://b".into()),
                ..progressed.clone()
            },
            RaftStatus {
                cluster_id: 7,
                ..progressed.clone()
            },
        ];
        for changed in &changes {
            assert!(beyond_progress(&base, changed), "{changed:?}");
        }

        let (sender, mut receiver) = watch::channel(base.clone());
        receiver.mark_unchanged();
        publish_to(&sender, progressed.clone());
        assert!(!receiver.has_changed().unwrap());
        assert_eq!(receiver.borrow().commit_index, 12);
        publish_to(&sender, changes[2].clone());
        assert!(receiver.has_changed().unwrap());
    }

    /// The proposers of one entry each get their own command's outcome
    /// (the application's own commands have no proposer); outcomes that
    /// do not match the replies one to one answer nobody.
    #[test]
    fn each_proposer_of_an_entry_gets_its_own_outcome() {
        let (first, first_answer) = oneshot::channel();
        let (third, third_answer) = oneshot::channel();
        let pending = Pending {
            term: 2,
            replies: vec![Some(first), None, Some(third)],
        };
        assert!(pending.answer(vec!["one", "two", "three"]).is_ok());
        assert_eq!(first_answer.blocking_recv().unwrap(), Ok("one"));
        assert_eq!(third_answer.blocking_recv().unwrap(), Ok("three"));

        let (reply, answer) = oneshot::channel::<Result<&str, ProposeError>>();
        let pending = Pending {
            term: 2,
            replies: vec![Some(reply)],
        };
        let Err(pending) = pending.answer(vec!["one", "two"]) else {
            panic!("two outcomes answered one proposer");
        };
        pending.fail(&ProposeError::Dropped);
        assert_eq!(answer.blocking_recv().unwrap(), Err(ProposeError::Dropped));
    }
}
