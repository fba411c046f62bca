//! Raft messages between replicas over gRPC (`proto/raft.proto`).
//!
//! Receiving: [`RaftPeerService`] checks each batch's envelope (cluster
//! id, sender a member, recipient this replica: [`guard::check_envelope`]),
//! decodes each message and hands it to the driver's channel, which checks
//! each message against its log before stepping it. Batches come on a
//! `StepStream` a peer keeps open, one batch after another without a call
//! per batch, or one `Step` call each (older senders, forged-message
//! tests). Sending is [`send`]: one task per peer.
//!
//! Snapshots do not travel with the batches: a `MsgSnapshot` carries only
//! its file's descriptor ([`super::snapfile`]), and the sender task streams
//! the file itself in chunks (`InstallSnapshot`, `--raft-snapshot-chunk`,
//! 4 MiB by default), the message in the first chunk, then reports to
//! raft-rs whether it arrived. The receiver
//! ([`RaftPeerService::install_snapshot`]) checks the envelope as for a
//! batch, takes one transfer at a time, writes the chunks to a temporary
//! file (never past the declared size, itself at most
//! `--raft-max-snapshot`; a chunk at most [`MAX_CHUNK_BYTES`]; a stalled
//! transfer is dropped after [`CHUNK_TIMEOUT`]), checks size and SHA-256,
//! renames it into place, and only then hands the message to the loop,
//! which checks it like any other before raft-rs sees it.

mod link;
mod send;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use gantry_proto::raft as pb;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::guard::{self, LogView, RefusalLog};
use super::http_urls::HttpUrls;
use super::membership::MemberBook;
use super::node::{PeerInbox, PeerInput};
use super::snapfile::{Descriptor, Incoming, MAX_CHUNK_BYTES, SnapshotDir};
use crate::error::CoordinatorError;

pub(crate) use send::{Outgoing, PeerSenders};

/// Largest Raft gRPC message either way: a batch (up to
/// [`send::BATCH_BYTES`] past its first message, whose entries are bounded by the client API's
/// request limit) or a snapshot chunk. Snapshots themselves are files sent
/// in chunks, so the state is not bounded by this.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// A snapshot transfer whose next chunk does not come within this is
/// dropped (its temporary file removed), freeing the one transfer slot.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole transfer may take this long plus a second per MiB.
const TRANSFER_BASE: Duration = Duration::from_secs(60);

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
    /// Cancelled when the replica stops: ends the open `StepStream`s.
    stop: CancellationToken,
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

    /// The book's index, without a copy of the book.
    fn book_index(&self) -> u64 {
        self.book.read().map(|book| book.index).unwrap_or_default()
    }
}

impl RaftPeerService {
    pub(crate) fn new(
        id: u64,
        inbox: PeerInbox,
        peers: Arc<PeerCheck>,
        snapshots: Arc<SnapshotInbox>,
        stop: CancellationToken,
    ) -> RaftPeerService {
        RaftPeerService {
            id,
            inbox,
            peers,
            snapshots,
            stop,
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
        self.step_batch(request.into_inner(), peer)?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn step_stream(
        &self,
        request: Request<tonic::Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let peer = request.remote_addr();
        let mut batches = request.into_inner();
        loop {
            // A stream lasts as long as its sender's connection: it must
            // not hold up this replica's shutdown (a graceful server stop
            // waits for every open call).
            let next = tokio::select! {
                _ = self.stop.cancelled() => {
                    return Err(CoordinatorError::Unavailable("raft node stopped".into()).into());
                }
                next = batches.message() => next?,
            };
            match next {
                Some(batch) => self.step_batch(batch, peer)?,
                None => return Ok(Response::new(pb::RaftAck {})),
            }
        }
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
        self.queue(message, first.from, peer)?;
        Ok(Response::new(pb::RaftAck {}))
    }
}

impl RaftPeerService {
    /// Checks one batch's envelope, records the sender's member book and
    /// HTTP URL, and queues its messages for the loop in order (`Step` and
    /// each batch of `StepStream`).
    fn step_batch(
        &self,
        batch: pb::RaftBatch,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
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
            if joining || book.index > self.peers.book_index() {
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
            self.queue(message, batch.from, peer)?;
        }
        Ok(())
    }

    /// Hands a checked message to the loop; UNAVAILABLE once it stopped.
    fn queue(
        &self,
        message: Message,
        from: u64,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        let sent = self.inbox.send(PeerInput::Step {
            message: Box::new(message),
            from,
            peer,
        });
        if !sent {
            return Err(CoordinatorError::Unavailable("raft node stopped".into()).into());
        }
        Ok(())
    }

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
