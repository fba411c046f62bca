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

use raft::RawNode;
use raft::eraftpb::Message;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use super::driver::Driver;
use super::fault::FaultHook;
use super::flusher::Flusher;
use super::guard::RefusalLog;
use super::http_urls::HttpUrls;
use super::logger::raft_logger;
use super::members::Members;
use super::membership::{MemberBook, MembersRequest};
use super::snapfile::SnapshotDir;
use super::storage::SledRaftStorage;
use super::transport::{PeerCheck, PeerSenders, RaftPeerService, SnapshotInbox};
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
        flushed: Result<(), RaftError>,
    },
    /// The snapshot writer thread's report ([`super::taking`]).
    SnapshotWritten(super::taking::Written),
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

/// The cloneable way into a running [`RaftNode`]: propose, send the
/// application requests, watch leadership, serve peers.
pub struct RaftHandle<A: ReplicatedStateMachine> {
    id: u64,
    inbox: std_mpsc::Sender<Input<A>>,
    status: watch::Receiver<RaftStatus>,
    peers: Arc<PeerCheck>,
    /// Where peers' snapshots are received (one transfer at a time).
    snapshots: Arc<SnapshotInbox>,
    /// The node's token: the peer service's open streams end with it.
    stop: CancellationToken,
}

impl<A: ReplicatedStateMachine> Clone for RaftHandle<A> {
    fn clone(&self) -> Self {
        RaftHandle {
            id: self.id,
            inbox: self.inbox.clone(),
            status: self.status.clone(),
            peers: self.peers.clone(),
            snapshots: self.snapshots.clone(),
            stop: self.stop.clone(),
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
        self.peer_handler().into_server()
    }

    /// The `RaftPeer` service itself, to wrap before serving it (the
    /// transport tests stand in an older version that has no
    /// `StepStream` with it); [`RaftPeerService::into_server`] serves it.
    pub fn peer_handler(&self) -> RaftPeerService {
        RaftPeerService::new(
            self.id,
            PeerInbox::new(self.inbox.clone()),
            self.peers.clone(),
            self.snapshots.clone(),
            self.stop.clone(),
        )
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
        let mut storage = SledRaftStorage::open(db, files, &config.wal_dir, config.syncer.clone())?;
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
            wanted_since: None,
            applied,
            applied_term,
            flusher,
            flushing: None,
            unpersisted: VecDeque::new(),
            persist_failure: None,
            taking: None,
            restores: 0,
            snapshot_failure: None,
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
                stop: shutdown.clone(),
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
pub(super) fn publish_to(sender: &watch::Sender<RaftStatus>, status: RaftStatus) {
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
}
