//! Sending Raft messages: one tokio task per peer with a bounded queue of
//! messages the driver has already encoded. The task takes everything
//! queued (up to [`BATCH_BYTES`] or [`BATCH_MESSAGES`]) as one batch and
//! pushes it on the peer's `StepStream` ([`link`]), in order, without
//! waiting for the peer between batches; a peer of an older version, which
//! answers UNIMPLEMENTED, gets one `Step` call per batch instead. When a
//! peer fails (the stream ends, a call fails), the task drops what queued
//! behind, tells the driver (`report_unreachable`, and snapshot failure),
//! and backs off before trying again: Raft retransmits what matters, and
//! stale heartbeats are worthless. tonic's lazy channels reconnect on the
//! next call. When the credentials reload a new peer TLS (CA or this
//! replica's client certificate), each task drops its channels and dials
//! again with it at once, so the rotated identity is what peers see from
//! then on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gantry_proto::raft as pb;
use pb::raft_peer_client::RaftPeerClient;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::link::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Link, link_ended};
use super::{MAX_MESSAGE_BYTES, PeerCheck, snapshot_message, transfer_limit};
use crate::credentials::PeerTlsSource;
use crate::raft::membership::MemberBook;
use crate::raft::node::{PeerInbox, PeerInput};
use crate::raft::snapfile::SnapshotDir;
use crate::raft::{RaftConfig, RaftError};

/// A batch stops growing past this many bytes (a snapshot goes alone).
pub(super) const BATCH_BYTES: usize = 4 << 20;
/// Or past this many messages.
const BATCH_MESSAGES: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Limit of one `Step` call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An encoded message waiting in a peer's queue.
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) snapshot: bool,
}

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

/// The clients of one peer, each on a connection of its own, lazy
/// (nothing is dialled until a call).
struct PeerClients {
    /// Batches on a long-lived `StepStream` ([`Link`]): no request
    /// timeout, but HTTP/2 keepalive pings, so a peer cut off (a partition,
    /// a host gone without a reset) ends the call within
    /// [`KEEPALIVE_INTERVAL`] plus [`KEEPALIVE_TIMEOUT`].
    stream: RaftPeerClient<Channel>,
    /// One `Step` call per batch, each limited by [`REQUEST_TIMEOUT`]:
    /// for peers without `StepStream`.
    step: RaftPeerClient<Channel>,
    /// Snapshots (a transfer does not hold up the batches), limited by
    /// their size, not [`REQUEST_TIMEOUT`].
    snapshots: RaftPeerClient<Channel>,
}

/// The clients of the peer at `url`. Must run inside the runtime (tonic's
/// lazy channel spawns).
fn peer_clients(url: &str, tls: Option<&ClientTlsConfig>) -> Result<PeerClients, String> {
    let endpoint = peer_endpoint(url, tls)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let client = |endpoint: Endpoint| {
        RaftPeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
    let stream = endpoint
        .clone()
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(PeerClients {
        stream: client(stream),
        step: client(endpoint.clone().timeout(REQUEST_TIMEOUT)),
        snapshots: client(endpoint),
    })
}

/// The senders: one task per peer, fed by a bounded queue of messages the
/// driver has already encoded ([`PeerSenders::send`]).
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
        let clients = peer_clients(url, current.as_ref())?;
        let (queue, receiver) = mpsc::channel(self.queue_len);
        let stop = self.shutdown.child_token();
        let peer = PeerTask {
            from: self.from,
            check: self.check.clone(),
            to,
            url: url.to_string(),
            tls,
            http_url: self.http_url.clone(),
            clients,
            link: None,
            unary: false,
            queue: receiver,
            inbox: self.inbox.clone(),
            shutdown: stop.clone(),
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
    /// This replica's HTTP URL, sent with the book (empty: none).
    http_url: String,
    clients: PeerClients,
    /// The open `StepStream`, if any ([`Link`]).
    link: Option<Link>,
    /// The peer answered `StepStream` with UNIMPLEMENTED (an older
    /// version): one `Step` call per batch until it fails.
    unary: bool,
    queue: mpsc::Receiver<Outgoing>,
    inbox: PeerInbox,
    shutdown: CancellationToken,
    /// Where this replica's snapshot files are.
    files: SnapshotDir,
    chunk_bytes: usize,
    /// A snapshot taken off the queue while a batch was being gathered:
    /// it goes next, on its own.
    held: Option<Outgoing>,
}

/// How a sender task goes on after a delivery failed.
enum AfterFailure {
    Continue,
    Stop,
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
                    // The stream ended while there was nothing to send.
                    status = link_ended(&mut self.link) => {
                        match self.failed(status, &mut reachable, &mut backoff).await {
                            AfterFailure::Continue => continue,
                            AfterFailure::Stop => return,
                        }
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
            let messages = self.gather(first.bytes);
            let shutdown = self.shutdown.clone();
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.deliver(messages) => result,
            };
            match result {
                Ok(()) if self.answered() => {
                    if !reachable {
                        tracing::info!(peer = self.to, "raft peer reachable again");
                        reachable = true;
                    }
                    backoff = MIN_BACKOFF;
                }
                Ok(()) => {}
                Err(status) => match self.failed(status, &mut reachable, &mut backoff).await {
                    AfterFailure::Continue => {}
                    AfterFailure::Stop => return,
                },
            }
        }
    }

    /// Whether the peer has answered since the last failure: a `Step`
    /// call came back, or the link is [`Link::proven`]. Until then a
    /// failing peer is not called reachable and the back-off keeps growing.
    fn answered(&self) -> bool {
        self.unary || self.link.as_ref().is_some_and(Link::proven)
    }

    /// `first` and whatever else is queued, in order, up to the batch
    /// limits; a snapshot met on the way is held for next.
    fn gather(&mut self, first: Vec<u8>) -> Vec<Vec<u8>> {
        let mut bytes = first.len();
        let mut messages = vec![first];
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
        messages
    }

    /// Sends one batch: on the link (opened when there is none), or in a
    /// `Step` call to a peer without `StepStream`.
    async fn deliver(&mut self, messages: Vec<Vec<u8>>) -> Result<(), Status> {
        if self.unary {
            let batch = self.batch(messages, Some(self.check.book()));
            return self.clients.step.step(batch).await.map(|_| ());
        }
        // The book goes with a link's first batch and after it changed.
        let index = self.check.book_index();
        let book = self
            .link
            .as_ref()
            .is_none_or(|link| link.book_sent != Some(index))
            .then(|| self.check.book());
        let sent = book.as_ref().map(|book| book.index);
        let batch = self.batch(messages, book);
        let link = self
            .link
            .get_or_insert_with(|| Link::open(&self.clients.stream));
        if sent.is_some() {
            link.book_sent = sent;
        }
        link.push(batch).await
    }

    /// A batch of `messages` in this replica's envelope; with `book`, the
    /// member book and this replica's HTTP URL.
    fn batch(&self, messages: Vec<Vec<u8>>, book: Option<MemberBook>) -> pb::RaftBatch {
        let (from_http, members) = match book {
            Some(book) => {
                let members = pb::RaftMembers {
                    index: book.index,
                    members: book
                        .urls
                        .into_iter()
                        .map(|(id, url)| pb::RaftMember { id, url })
                        .collect(),
                };
                (self.http_url.clone(), Some(members))
            }
            None => (String::new(), None),
        };
        pb::RaftBatch {
            messages,
            from: self.from,
            cluster_id: self.check.cluster_id.load(Ordering::Relaxed),
            to: self.to,
            from_http,
            members,
        }
    }

    /// After a batch could not be delivered (or the link ended): a peer
    /// without `StepStream` gets `Step` calls from then on; otherwise the
    /// link goes, what is queued is dropped, the loop hears the peer is
    /// unreachable (and of a snapshot that will not arrive), and the task
    /// backs off before the next try.
    async fn failed(
        &mut self,
        status: Status,
        reachable: &mut bool,
        backoff: &mut Duration,
    ) -> AfterFailure {
        self.link = None;
        if !self.unary && status.code() == tonic::Code::Unimplemented {
            tracing::info!(
                peer = self.to,
                "raft peer has no StepStream (an older version): one Step call per batch"
            );
            self.unary = true;
            return AfterFailure::Continue;
        }
        // A peer that comes back may be a newer version.
        self.unary = false;
        if *reachable {
            tracing::warn!(
                peer = self.to,
                error = %status_detail(&status),
                code = ?status.code(),
                "raft peer unreachable; dropping messages until it answers"
            );
            *reachable = false;
        }
        let mut dropped = 0usize;
        let mut snapshot = false;
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
            _ = self.shutdown.cancelled() => return AfterFailure::Stop,
            _ = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        AfterFailure::Continue
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
        let call = self.clients.snapshots.install_snapshot(chunks);
        match tokio::time::timeout(transfer_limit(descriptor.size), call).await {
            Ok(Ok(_)) => Ok(descriptor.size),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("the transfer took too long".into()),
        }
    }

    /// Replaces the clients by ones dialled with the peer TLS in force
    /// (which it marks seen), and closes the link. Dropping the old clients
    /// closes their connections, so no call goes out with a retired
    /// certificate; a config that cannot be used is logged and the old
    /// clients stay.
    fn redial(&mut self) {
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        let current = tls.borrow_and_update().clone();
        match peer_clients(&self.url, Some(&current)) {
            Ok(clients) => {
                self.clients = clients;
                self.link = None;
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
    let delay = crate::raft::fault::snapshot_chunk_delay();
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

/// A status's message followed by the errors under it: a failed stream's
/// message alone is tonic's "transport error", which names neither the
/// connection refused nor the keepalive that timed out.
fn status_detail(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let more = error.to_string();
        // A status made from an error repeats it as its message.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_failed_link_names_the_errors_under_its_status() {
        let mut status = Status::unavailable("transport error");
        status.set_source(Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert_eq!(
            status_detail(&status),
            "transport error: connection refused"
        );
        let from_error =
            Status::from_error(Box::new(std::io::Error::other("keep-alive timed out")));
        assert_eq!(status_detail(&from_error), "keep-alive timed out");
        assert_eq!(
            status_detail(&Status::unavailable("the peer closed the stream")),
            "the peer closed the stream"
        );
    }
}
