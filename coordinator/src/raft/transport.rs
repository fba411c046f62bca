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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_proto::raft as pb;
use pb::raft_peer_client::RaftPeerClient;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use super::guard::{self, LogView, RefusalLog};
use super::http_urls::HttpUrls;
use super::node::{PeerInbox, PeerInput};
use super::{RaftConfig, RaftError};
use crate::error::CoordinatorError;

/// Largest Raft gRPC message either way: snapshots carry the whole state.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
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
}

/// What the service checks a batch's envelope against. Membership is static
/// (`--peers`, stored with the log), so it is fixed for the node's lifetime.
pub(crate) struct PeerCheck {
    pub(crate) cluster_id: u64,
    /// Sorted voters.
    pub(crate) voters: Vec<u64>,
    /// Sorted learners.
    pub(crate) learners: Vec<u64>,
    /// Shared with the driver: one budget of warn lines for both.
    pub(crate) refusals: Arc<RefusalLog>,
    /// The members' HTTP URLs, as their batches give them.
    pub(crate) http: HttpUrls,
}

impl RaftPeerService {
    pub(crate) fn new(id: u64, inbox: PeerInbox, peers: Arc<PeerCheck>) -> RaftPeerService {
        RaftPeerService { id, inbox, peers }
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
        let view = LogView {
            id: self.id,
            // The envelope check reads only the id and the members.
            term: 0,
            last_index: 0,
            voters: &self.peers.voters,
            learners: &self.peers.learners,
        };
        if let Err(refusal) = guard::check_envelope(
            batch.cluster_id,
            batch.from,
            batch.to,
            self.peers.cluster_id,
            &view,
        ) {
            self.peers.refusals.refused(peer, batch.from, &refusal);
            return Err(CoordinatorError::PermissionDenied(format!(
                "raft batch refused: {refusal}"
            ))
            .into());
        }
        self.peers.http.record(batch.from, &batch.from_http);
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

pub(crate) struct PeerSenders {
    queues: HashMap<u64, mpsc::Sender<Outgoing>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PeerSenders {
    /// Starts one sender task per peer other than this replica.
    pub(crate) fn start(
        config: &RaftConfig,
        cluster_id: u64,
        inbox: &PeerInbox,
        runtime: &tokio::runtime::Handle,
        shutdown: &CancellationToken,
    ) -> Result<PeerSenders, RaftError> {
        let mut queues = HashMap::new();
        let mut tasks = Vec::new();
        for (&to, url) in &config.peers {
            if to == config.id {
                continue;
            }
            let endpoint = peer_endpoint(url, config.peer_tls.as_ref())
                .map_err(|error| RaftError::Config(format!("peer {to} URL {url:?}: {error}")))?
                .connect_timeout(Duration::from_secs(1))
                .timeout(REQUEST_TIMEOUT)
                .tcp_nodelay(true);
            let (queue, receiver) = mpsc::channel(config.peer_queue);
            let peer = PeerTask {
                from: config.id,
                cluster_id,
                to,
                http_url: config.http_url.clone().unwrap_or_default(),
                client: RaftPeerClient::new(endpoint.connect_lazy())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
                queue: receiver,
                inbox: inbox.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.push(runtime.spawn(peer.run()));
            queues.insert(to, queue);
        }
        Ok(PeerSenders { queues, tasks })
    }

    /// Queues a message; false when there is no such peer or its queue is
    /// full (the message is dropped; Raft retransmits).
    pub(crate) fn send(&self, to: u64, message: Outgoing) -> bool {
        match self.queues.get(&to) {
            Some(queue) => queue.try_send(message).is_ok(),
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
    cluster_id: u64,
    to: u64,
    /// This replica's HTTP URL, sent with every batch (empty: none).
    http_url: String,
    client: RaftPeerClient<Channel>,
    queue: mpsc::Receiver<Outgoing>,
    inbox: PeerInbox,
    shutdown: CancellationToken,
}

impl PeerTask {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut reachable = true;
        loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                next = self.queue.recv() => match next {
                    Some(message) => message,
                    None => return,
                },
            };
            let mut bytes = first.bytes.len();
            let mut snapshot = first.snapshot;
            let mut messages = vec![first.bytes];
            while bytes < BATCH_BYTES && messages.len() < BATCH_MESSAGES {
                match self.queue.try_recv() {
                    Ok(next) => {
                        bytes += next.bytes.len();
                        snapshot |= next.snapshot;
                        messages.push(next.bytes);
                    }
                    Err(_) => break,
                }
            }
            let batch = pb::RaftBatch {
                messages,
                from: self.from,
                cluster_id: self.cluster_id,
                to: self.to,
                from_http: self.http_url.clone(),
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
                    if snapshot {
                        self.report(PeerInput::SnapshotStatus {
                            to: self.to,
                            finished: true,
                        });
                    }
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

    fn report(&self, input: PeerInput) {
        // The loop has stopped when this fails; the task stops on the token.
        let _ = self.inbox.send(input);
    }
}
