//! Raft messages between replicas over gRPC (`proto/raft.proto`).
//!
//! Receiving: [`RaftPeerService`] checks the batch's envelope (cluster id,
//! sender a member, recipient this replica: [`guard::check_envelope`]),
//! decodes each message and hands it to the driver's channel, which checks
//! each message against its log before stepping it. Sending: one tokio task per peer with a
//! bounded queue of messages the driver has already encoded; the task sends
//! everything queued in one `Step` call, in order, one call at a time. When a
//! peer does not answer, the task drops the batch and whatever queued behind
//! it, tells the driver (`report_unreachable`, and snapshot failure), and
//! backs off before trying again — Raft retransmits what matters, and stale
//! heartbeats are worthless. tonic's lazy channel reconnects on the next call.
//! When the credentials reload a new peer TLS (CA or this replica's client
//! certificate), each task drops its channels and dials again with it at
//! once, so the rotated identity is what peers see from then on.
//!
//! Snapshots do not travel in `Step`: a `MsgSnapshot` carries only its
//! file's descriptor ([`super::snapfile`]), and the sender task streams the
//! file itself in chunks (`InstallSnapshot`, `--raft-snapshot-chunk`, 4 MiB
//! by default), the message in the first chunk, then reports to raft-rs
//! whether it arrived. The receiver ([`RaftPeerService::install_snapshot`])
//! checks the envelope as for `Step`, takes one transfer at a time, writes
//! the chunks to a temporary file (never past the declared size, itself at
//! most `--raft-max-snapshot`; a chunk at most [`MAX_CHUNK_BYTES`]; a
//! stalled transfer is dropped after [`CHUNK_TIMEOUT`]), checks size and
//! SHA-256, renames it into place, and only then hands the message to the
//! loop, which checks it like any other before raft-rs sees it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use gantry_proto::raft as pb;
use pb::raft_peer_client::RaftPeerClient;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use super::guard::{self, LogView, RefusalLog};
use super::http_urls::HttpUrls;
use super::membership::MemberBook;
use super::node::{PeerInbox, PeerInput};
use super::snapfile::{Descriptor, Incoming, MAX_CHUNK_BYTES, SnapshotDir};
use super::{RaftConfig, RaftError};
use crate::credentials::PeerTlsSource;
use crate::error::CoordinatorError;

/// Largest Raft gRPC message either way: a batch (up to [`BATCH_BYTES`]
/// past its first message, whose entries are bounded by the client API's
/// request limit) or a snapshot chunk. Snapshots themselves are files sent
/// in chunks, so the state is not bounded by this.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// A snapshot transfer whose next chunk does not come within this is
/// dropped (its temporary file removed), freeing the one transfer slot.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole transfer may take this long plus a second per MiB.
const TRANSFER_BASE: Duration = Duration::from_secs(60);
/// A batch stops growing past this many bytes (a snapshot goes alone).
const BATCH_BYTES: usize = 4 << 20;
/// Or past this many messages.
const BATCH_MESSAGES: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Limit of one `Step` call, snapshots included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The `RaftPeer` gRPC service of one replica: forwards peers' messages to
/// its driver. Mount it with [`RaftHandle::peer_service`](super::RaftHandle::peer_service).
#[derive(Clone)]
pub struct RaftPeerService {
    id: u64,
    /// The loop's inbox (a std channel: the loop is a plain thread;
    /// sending never blocks).
    inbox: PeerInbox,
    /// Who may send: this cluster's id and (static) members.
    peers: Arc<PeerCheck>,
    /// Where snapshots are received.
    snapshots: Arc<SnapshotInbox>,
}

/// Where a replica receives its peers' snapshots: its snapshot directory,
/// one transfer at a time (a second is refused, so peers cannot fill the
/// disk with parallel transfers).
pub(crate) struct SnapshotInbox {
    files: SnapshotDir,
    busy: Semaphore,
}

impl SnapshotInbox {
    pub(crate) fn new(files: SnapshotDir) -> SnapshotInbox {
        SnapshotInbox {
            files,
            busy: Semaphore::new(1),
        }
    }
}

/// How long a transfer of `bytes` may take, either side.
fn transfer_limit(bytes: u64) -> Duration {
    TRANSFER_BASE + Duration::from_secs(bytes >> 20)
}

/// What the service checks a batch's envelope against, and the member
/// book the sender tasks attach to every batch. The loop updates it when a
/// conf change applies or a snapshot installs (see [`super::membership`]).
pub(crate) struct PeerCheck {
    /// 0 while this replica waits to join (any cluster may contact it).
    pub(crate) cluster_id: AtomicU64,
    /// Sorted voters and learners; both empty while waiting to join.
    pub(crate) members: RwLock<(Vec<u64>, Vec<u64>)>,
    /// Where members listen, sent along with every batch.
    pub(crate) book: RwLock<MemberBook>,
    /// Shared with the driver: one budget of warn lines for both.
    pub(crate) refusals: Arc<RefusalLog>,
    /// The members' HTTP URLs, as their batches give them.
    pub(crate) http: HttpUrls,
}

impl PeerCheck {
    fn book(&self) -> MemberBook {
        self.book
            .read()
            .map(|book| book.clone())
            .unwrap_or_default()
    }
}

impl RaftPeerService {
    pub(crate) fn new(
        id: u64,
        inbox: PeerInbox,
        peers: Arc<PeerCheck>,
        snapshots: Arc<SnapshotInbox>,
    ) -> RaftPeerService {
        RaftPeerService {
            id,
            inbox,
            peers,
            snapshots,
        }
    }

    /// The tonic server for this service, with message limits large enough
    /// for snapshots; pass it to `Server::builder().add_service(..)`.
    pub fn into_server(self) -> RaftPeerServer<RaftPeerService> {
        RaftPeerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl RaftPeer for RaftPeerService {
    async fn step(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let peer = request.remote_addr();
        let batch = request.into_inner();
        self.check_envelope(batch.cluster_id, batch.from, batch.to, peer)?;
        self.peers.http.record(batch.from, &batch.from_http);
        if let Some(members) = batch.members {
            let book = MemberBook::from_wire(
                members.index,
                members.members.into_iter().map(|m| (m.id, m.url)).collect(),
            )
            .map_err(|reason| CoordinatorError::InvalidArgument {
                field: "members".into(),
                reason,
            })?;
            let joining = self.peers.cluster_id.load(Ordering::Relaxed) == 0;
            if joining || book.index > self.peers.book().index {
                self.inbox.send(PeerInput::Members {
                    cluster_id: batch.cluster_id,
                    book,
                });
            }
        }
        for (i, bytes) in batch.messages.iter().enumerate() {
            let message = Message::parse_from_bytes(bytes).map_err(|error| {
                CoordinatorError::InvalidArgument {
                    field: format!("messages[{i}]"),
                    reason: format!("cannot decode a raft message from {}: {error}", batch.from),
                }
            })?;
            let sent = self.inbox.send(PeerInput::Step {
                message: Box::new(message),
                from: batch.from,
                peer,
            });
            if !sent {
                return Err(CoordinatorError::Unavailable("raft node stopped".into()).into());
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let peer = request.remote_addr();
        let mut chunks = request.into_inner();
        let first = next_chunk(&mut chunks, CHUNK_TIMEOUT)
            .await?
            .ok_or_else(|| invalid("message", "empty snapshot stream".into()))?;
        self.check_envelope(first.cluster_id, first.from, first.to, peer)?;
        let (message, descriptor) = snapshot_message(&first.message)?;
        let Ok(_permit) = self.snapshots.busy.try_acquire() else {
            return Err(CoordinatorError::ResourceExhausted(
                "a snapshot transfer is already in progress".into(),
            )
            .into());
        };
        let metadata = message.get_snapshot().get_metadata();
        let (index, term) = (metadata.index, metadata.term);
        let files = self.snapshots.files.clone();
        let mut incoming = blocking(move || files.receive(index, term, descriptor))
            .await?
            .map_err(|error| invalid("message", error.to_string()))?;
        let deadline = Instant::now() + transfer_limit(descriptor.size);
        let mut data = first.data;
        loop {
            if data.len() > MAX_CHUNK_BYTES {
                return Err(invalid(
                    "data",
                    format!(
                        "chunk of {} bytes is over the limit of {MAX_CHUNK_BYTES}",
                        data.len()
                    ),
                ));
            }
            if !data.is_empty() {
                incoming = write_chunk(incoming, data).await?;
            }
            let wait = CHUNK_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match next_chunk(&mut chunks, wait).await? {
                Some(next) => data = next.data,
                None => break,
            }
        }
        let bytes = incoming.written();
        blocking(move || incoming.finish())
            .await?
            .map_err(|error| invalid("data", error.to_string()))?;
        tracing::info!(
            from = first.from,
            index,
            term,
            bytes,
            "raft snapshot received"
        );
        let sent = self.inbox.send(PeerInput::Step {
            message: Box::new(message),
            from: first.from,
            peer,
        });
        if !sent {
            return Err(CoordinatorError::Unavailable("raft node stopped".into()).into());
        }
        Ok(Response::new(pb::RaftAck {}))
    }
}

impl RaftPeerService {
    /// Refuses a batch or transfer from another cluster, a non-member or
    /// for another replica ([`guard::check_envelope`]).
    fn check_envelope(
        &self,
        cluster_id: u64,
        from: u64,
        to: u64,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        let (voters, learners) = self
            .peers
            .members
            .read()
            .map(|members| members.clone())
            .unwrap_or_default();
        let view = LogView {
            id: self.id,
            // The envelope check reads only the id and the members.
            term: 0,
            leader: 0,
            last_index: 0,
            voters: &voters,
            learners: &learners,
        };
        // A replica waiting to join takes the cluster id of whoever added it.
        let want_cluster = match self.peers.cluster_id.load(Ordering::Relaxed) {
            0 => cluster_id,
            stored => stored,
        };
        if let Err(refusal) = guard::check_envelope(cluster_id, from, to, want_cluster, &view) {
            self.peers.refusals.refused(peer, from, &refusal);
            return Err(CoordinatorError::PermissionDenied(format!(
                "raft batch refused: {refusal}"
            ))
            .into());
        }
        Ok(())
    }
}

/// The next chunk of a transfer, `None` at its end; a stalled transfer is
/// an error.
async fn next_chunk(
    chunks: &mut tonic::Streaming<pb::SnapshotChunk>,
    wait: Duration,
) -> Result<Option<pb::SnapshotChunk>, Status> {
    match tokio::time::timeout(wait, chunks.message()).await {
        Ok(next) => next,
        Err(_) => Err(CoordinatorError::Unavailable(format!(
            "snapshot transfer stalled: no chunk for {} s",
            wait.as_secs()
        ))
        .into()),
    }
}

/// The `MsgSnapshot` of a transfer's first chunk and its file descriptor.
fn snapshot_message(bytes: &[u8]) -> Result<(Message, Descriptor), Status> {
    let message = Message::parse_from_bytes(bytes)
        .map_err(|error| invalid("message", format!("cannot decode a raft message: {error}")))?;
    if message.get_msg_type() != MessageType::MsgSnapshot || !message.has_snapshot() {
        return Err(invalid(
            "message",
            format!("{:?} is not a snapshot", message.get_msg_type()),
        ));
    }
    let descriptor = Descriptor::decode(&message.get_snapshot().data)
        .map_err(|reason| invalid("message", reason))?;
    Ok((message, descriptor))
}

/// Writes a chunk off the async threads.
async fn write_chunk(mut incoming: Incoming, data: Vec<u8>) -> Result<Incoming, Status> {
    blocking(move || incoming.write_chunk(&data).map(|()| incoming))
        .await?
        .map_err(|error| invalid("data", error.to_string()))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| CoordinatorError::Unavailable(format!("snapshot task: {error}")).into())
}

fn invalid(field: &str, reason: String) -> Status {
    CoordinatorError::InvalidArgument {
        field: field.to_string(),
        reason,
    }
    .into()
}

/// An encoded message waiting in a peer's queue.
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) snapshot: bool,
}

/// The queues of the per-peer sender tasks, by peer id.
/// The one place a peer endpoint is built: `https://` peers need TLS (the
/// peers' CA, and this replica's certificate as its client identity).
fn peer_endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    match (url.starts_with("https://"), tls) {
        (true, Some(tls)) => endpoint.tls_config(tls.clone()).map_err(|e| e.to_string()),
        (true, None) => Err("an https:// peer needs --tls-ca".into()),
        (false, Some(_)) => Err("TLS is configured (--tls-ca): peer URLs must be https://".into()),
        (false, None) => Ok(endpoint),
    }
}

/// The two clients of one peer: batches, and snapshots on a connection of
/// their own (a transfer does not hold up heartbeats) limited by their
/// size, not [`REQUEST_TIMEOUT`]. Lazy: nothing is dialled until a call.
/// Must run inside the runtime (tonic's lazy channel spawns).
fn peer_clients(
    url: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<(RaftPeerClient<Channel>, RaftPeerClient<Channel>), String> {
    let endpoint = peer_endpoint(url, tls)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let client = |endpoint: Endpoint| {
        RaftPeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
    let snapshots = client(endpoint.clone());
    Ok((client(endpoint.timeout(REQUEST_TIMEOUT)), snapshots))
}

pub(crate) struct PeerSenders {
    queues: HashMap<u64, PeerQueue>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What new sender tasks need (members join at run time).
    from: u64,
    /// The peer TLS in force, followed by every task.
    tls: Option<PeerTlsSource>,
    queue_len: usize,
    check: Arc<PeerCheck>,
    inbox: PeerInbox,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    /// This replica's HTTP URL, sent with every batch (empty: none).
    http_url: String,
    /// Where this replica's snapshot files are.
    files: SnapshotDir,
    /// Size of the chunks a snapshot is streamed in.
    chunk_bytes: usize,
}

/// One peer's queue, its URL, and the token that stops its task when the
/// peer leaves the book.
struct PeerQueue {
    url: String,
    queue: mpsc::Sender<Outgoing>,
    stop: CancellationToken,
}

impl PeerSenders {
    /// Starts one sender task per member of the book other than this
    /// replica.
    pub(crate) fn start(
        config: &RaftConfig,
        check: Arc<PeerCheck>,
        inbox: &PeerInbox,
        runtime: &tokio::runtime::Handle,
        shutdown: &CancellationToken,
    ) -> Result<PeerSenders, RaftError> {
        let mut senders = PeerSenders {
            queues: HashMap::new(),
            tasks: Vec::new(),
            from: config.id,
            tls: config.peer_tls.clone(),
            queue_len: config.peer_queue,
            inbox: inbox.clone(),
            runtime: runtime.clone(),
            shutdown: shutdown.clone(),
            check: check.clone(),
            http_url: config.http_url.clone().unwrap_or_default(),
            files: SnapshotDir::open(&config.snapshot_dir, config.max_snapshot_bytes)?,
            chunk_bytes: config.snapshot_chunk_bytes,
        };
        let book = check.book();
        for (&to, url) in &book.urls {
            senders
                .connect(to, url)
                .map_err(|error| RaftError::Config(format!("peer {to} URL {url:?}: {error}")))?;
        }
        Ok(senders)
    }

    /// Starts (or restarts, for a new URL) the sender task of `to`.
    fn connect(&mut self, to: u64, url: &str) -> Result<(), String> {
        if to == self.from || self.queues.get(&to).is_some_and(|q| q.url == url) {
            return Ok(());
        }
        self.disconnect(to);
        // Called from the loop thread too: tonic's lazy channel spawns.
        let _runtime = self.runtime.enter();
        let mut tls = self.tls.clone();
        let current = tls.as_mut().map(|tls| tls.borrow_and_update().clone());
        let (client, snapshots) = peer_clients(url, current.as_ref())?;
        let (queue, receiver) = mpsc::channel(self.queue_len);
        let stop = self.shutdown.child_token();
        let peer = PeerTask {
            from: self.from,
            check: self.check.clone(),
            to,
            url: url.to_string(),
            tls,
            http_url: self.http_url.clone(),
            client,
            queue: receiver,
            inbox: self.inbox.clone(),
            shutdown: stop.clone(),
            snapshots,
            files: self.files.clone(),
            chunk_bytes: self.chunk_bytes,
            held: None,
        };
        self.tasks.push(self.runtime.spawn(peer.run()));
        self.queues.insert(
            to,
            PeerQueue {
                url: url.to_string(),
                queue,
                stop,
            },
        );
        Ok(())
    }

    fn disconnect(&mut self, to: u64) {
        if let Some(peer) = self.queues.remove(&to) {
            peer.stop.cancel();
        }
    }

    /// Makes the sender tasks match `book`: a task per member other than
    /// this replica, none for ids that left. A URL that cannot be dialled
    /// (TLS mismatch) is logged and that member stays unreachable.
    pub(crate) fn sync(&mut self, book: &MemberBook) {
        let gone: Vec<u64> = self
            .queues
            .keys()
            .copied()
            .filter(|id| !book.urls.contains_key(id))
            .collect();
        for id in gone {
            self.disconnect(id);
        }
        for (&to, url) in &book.urls {
            if let Err(error) = self.connect(to, url) {
                tracing::error!(peer = to, url, %error, "cannot dial raft peer");
            }
        }
        self.tasks.retain(|task| !task.is_finished());
    }

    /// Queues a message; false when there is no such peer or its queue is
    /// full (the message is dropped; Raft retransmits).
    pub(crate) fn send(&self, to: u64, message: Outgoing) -> bool {
        match self.queues.get(&to) {
            Some(peer) => peer.queue.try_send(message).is_ok(),
            None => false,
        }
    }

    /// The sender tasks, to wait for on shutdown.
    pub(crate) fn take_tasks(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut self.tasks)
    }
}

struct PeerTask {
    from: u64,
    /// The cluster id and the book, read for each batch.
    check: Arc<PeerCheck>,
    to: u64,
    /// The peer's URL, to dial again when the TLS changes.
    url: String,
    /// The peer TLS in force; a change redials ([`PeerTask::redial`]).
    tls: Option<PeerTlsSource>,
    /// This replica's HTTP URL, sent with every batch (empty: none).
    http_url: String,
    client: RaftPeerClient<Channel>,
    queue: mpsc::Receiver<Outgoing>,
    inbox: PeerInbox,
    shutdown: CancellationToken,
    /// The client snapshots are streamed on.
    snapshots: RaftPeerClient<Channel>,
    /// Where this replica's snapshot files are.
    files: SnapshotDir,
    chunk_bytes: usize,
    /// A snapshot taken off the queue while a batch was being gathered:
    /// it goes next, on its own.
    held: Option<Outgoing>,
}

impl PeerTask {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut reachable = true;
        loop {
            if self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.has_changed().unwrap_or(false))
            {
                self.redial();
            }
            let first = match self.held.take() {
                Some(held) => held,
                None => tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    () = tls_changed(&mut self.tls) => {
                        self.redial();
                        continue;
                    }
                    next = self.queue.recv() => match next {
                        Some(message) => message,
                        None => return,
                    },
                },
            };
            if first.snapshot {
                let shutdown = self.shutdown.clone();
                let sent = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    sent = self.send_snapshot(first.bytes) => sent,
                };
                self.report(PeerInput::SnapshotStatus {
                    to: self.to,
                    finished: sent,
                });
                if !sent {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(MAX_BACKOFF) => {}
                    }
                }
                continue;
            }
            let mut bytes = first.bytes.len();
            let mut snapshot = false;
            let mut messages = vec![first.bytes];
            while bytes < BATCH_BYTES && messages.len() < BATCH_MESSAGES {
                match self.queue.try_recv() {
                    Ok(next) if next.snapshot => {
                        self.held = Some(next);
                        break;
                    }
                    Ok(next) => {
                        bytes += next.bytes.len();
                        messages.push(next.bytes);
                    }
                    Err(_) => break,
                }
            }
            let book = self.check.book();
            let batch = pb::RaftBatch {
                messages,
                from: self.from,
                cluster_id: self.check.cluster_id.load(Ordering::Relaxed),
                to: self.to,
                from_http: self.http_url.clone(),
                members: Some(pb::RaftMembers {
                    index: book.index,
                    members: book
                        .urls
                        .into_iter()
                        .map(|(id, url)| pb::RaftMember { id, url })
                        .collect(),
                }),
            };
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                result = self.client.step(batch) => result,
            };
            match result {
                Ok(_) => {
                    if !reachable {
                        tracing::info!(peer = self.to, "raft peer reachable again");
                        reachable = true;
                    }
                    backoff = MIN_BACKOFF;
                }
                Err(status) => {
                    if reachable {
                        tracing::warn!(
                            peer = self.to,
                            error = %status.message(),
                            code = ?status.code(),
                            "raft peer unreachable; dropping messages until it answers"
                        );
                        reachable = false;
                    }
                    let mut dropped = 0usize;
                    if let Some(held) = self.held.take() {
                        snapshot |= held.snapshot;
                        dropped += 1;
                    }
                    while let Ok(stale) = self.queue.try_recv() {
                        snapshot |= stale.snapshot;
                        dropped += 1;
                    }
                    tracing::debug!(peer = self.to, dropped, "dropped queued raft messages");
                    self.report(PeerInput::Unreachable(self.to));
                    if snapshot {
                        self.report(PeerInput::SnapshotStatus {
                            to: self.to,
                            finished: false,
                        });
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Streams the snapshot file a `MsgSnapshot` (encoded in `message`)
    /// names; true once the peer has it in place and its node has the
    /// message.
    async fn send_snapshot(&mut self, message: Vec<u8>) -> bool {
        let started = Instant::now();
        match self.stream_snapshot(message).await {
            Ok(bytes) => {
                tracing::info!(
                    peer = self.to,
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "raft snapshot sent"
                );
                true
            }
            Err(reason) => {
                tracing::warn!(peer = self.to, %reason, "raft snapshot not sent");
                false
            }
        }
    }

    async fn stream_snapshot(&mut self, message: Vec<u8>) -> Result<u64, String> {
        let (parsed, descriptor) =
            snapshot_message(&message).map_err(|status| status.message().to_string())?;
        let metadata = parsed.get_snapshot().get_metadata();
        let path = self
            .files
            .path_of(metadata.index, metadata.term, &descriptor);
        // Opened now: a newer snapshot may replace it on disk while it is
        // sent, and the open file stays readable.
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
        let header = pb::SnapshotChunk {
            cluster_id: self.check.cluster_id.load(Ordering::Relaxed),
            from: self.from,
            to: self.to,
            message,
            data: Vec::new(),
        };
        let chunks = chunk_stream(header, file, self.chunk_bytes, descriptor.size);
        let call = self.snapshots.install_snapshot(chunks);
        match tokio::time::timeout(transfer_limit(descriptor.size), call).await {
            Ok(Ok(_)) => Ok(descriptor.size),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("the transfer took too long".into()),
        }
    }

    /// Replaces both clients by ones dialled with the peer TLS in force
    /// (which it marks seen). Dropping the old clients closes their
    /// connections, so no call goes out with a retired certificate; a
    /// config that cannot be used is logged and the old clients stay.
    fn redial(&mut self) {
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        let current = tls.borrow_and_update().clone();
        match peer_clients(&self.url, Some(&current)) {
            Ok((client, snapshots)) => {
                self.client = client;
                self.snapshots = snapshots;
                tracing::info!(peer = self.to, "raft peer TLS reloaded; dialing again");
            }
            Err(error) => {
                tracing::error!(peer = self.to, %error, "cannot dial raft peer with the reloaded TLS")
            }
        }
    }

    fn report(&self, input: PeerInput) {
        // The loop has stopped when this fails; the task stops on the token.
        let _ = self.inbox.send(input);
    }
}

/// Resolves when the peer TLS changes; never without one (or once its
/// sender is gone: nothing can change it any more).
async fn tls_changed(tls: &mut Option<PeerTlsSource>) {
    if let Some(tls) = tls
        && tls.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// The chunks of a snapshot file: the header (envelope and message) with
/// the first bytes, then `chunk_bytes` at a time. A read error ends the
/// stream early, which the receiver refuses (short of the declared size).
fn chunk_stream(
    header: pb::SnapshotChunk,
    file: tokio::fs::File,
    chunk_bytes: usize,
    size: u64,
) -> impl futures::Stream<Item = pb::SnapshotChunk> + Send + 'static {
    let delay = super::fault::snapshot_chunk_delay();
    futures::stream::unfold(
        (Some(header), file, 0u64),
        move |(header, mut file, sent)| async move {
            if header.is_none() && sent >= size {
                return None;
            }
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let want = chunk_bytes.min(usize::try_from(size - sent).unwrap_or(chunk_bytes));
            let mut data = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the snapshot file being sent");
                        return None;
                    }
                }
            }
            if filled < want {
                tracing::warn!(sent, size, "the snapshot file being sent is short");
                return None;
            }
            let mut chunk = header.unwrap_or_default();
            chunk.data = data;
            Some((chunk, (None, file, sent + filled as u64)))
        },
    )
}
