//! One peer's `StepStream`: a call kept open on which batches follow each
//! other without a call (and a round trip) each.
//!
//! With one `Step` call at a time per peer, a leader's append waited for
//! the answer to the call before it (a heartbeat, the previous append), and
//! a follower's acknowledgement for the answer to its previous one: two
//! hand-overs and up to two round trips on every commit. A batch pushed on
//! a link leaves at once. The call runs in a task of its own; its end (the
//! peer stopped, refused a batch, the connection broke or its HTTP/2
//! keepalive went unanswered) is what the sender task sees as the peer
//! failing, as it saw a failed `Step` before.

use std::time::{Duration, Instant};

use gantry_proto::raft as pb;
use pb::raft_peer_client::RaftPeerClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;

/// Batches a link holds before its stream has taken them: a few, so that a
/// peer that stops reading holds back the sender (and then the loop's
/// bounded queue, which drops) rather than memory.
const LINK_BATCHES: usize = 8;
/// How often an open link's connection is pinged.
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is given up.
pub(super) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A link open this long has had a ping answered: the peer is there (a
/// batch taken by the stream proves nothing by itself, the peer answers
/// only when the stream ends).
const PROVEN_AFTER: Duration = KEEPALIVE_INTERVAL.saturating_add(KEEPALIVE_TIMEOUT);
/// A link whose stream takes no batch for this long is given up, as a
/// `Step` call that is not answered was.
pub(super) const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// An open `StepStream` call to one peer.
pub(super) struct Link {
    batches: mpsc::Sender<pb::RaftBatch>,
    call: JoinHandle<Result<(), Status>>,
    /// The member book index sent on this link, if any: the book (and this
    /// replica's HTTP URL) go with the first batch and after each change,
    /// not with every batch.
    pub(super) book_sent: Option<u64>,
    opened: Instant,
}

impl Link {
    /// Opens the call on `client` (a connection without a request
    /// timeout: the call lasts). Must run inside the runtime.
    pub(super) fn open(client: &RaftPeerClient<Channel>) -> Link {
        let (batches, receiver) = mpsc::channel(LINK_BATCHES);
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client
                .step_stream(ReceiverStream::new(receiver))
                .await
                .map(|_| ())
        });
        Link {
            batches,
            call,
            book_sent: None,
            opened: Instant::now(),
        }
    }

    /// Whether the peer has shown it is there: the link outlived a
    /// keepalive round.
    pub(super) fn proven(&self) -> bool {
        self.opened.elapsed() >= PROVEN_AFTER
    }

    /// Hands a batch to the stream. `Err` once the call has ended (with
    /// how it ended) or when the stream took nothing for
    /// [`PUSH_TIMEOUT`]; the link is then spent.
    pub(super) async fn push(&mut self, batch: pb::RaftBatch) -> Result<(), Status> {
        let sent = tokio::select! {
            biased;
            sent = self.batches.send(batch) => sent,
            ended = &mut self.call => return Err(call_status(ended)),
            () = tokio::time::sleep(PUSH_TIMEOUT) => {
                return Err(Status::deadline_exceeded(format!(
                    "the peer's stream took no batch for {} s",
                    PUSH_TIMEOUT.as_secs()
                )));
            }
        };
        match sent {
            Ok(()) => Ok(()),
            // The stream is gone: the call has ended or is ending.
            Err(_) => Err(call_status((&mut self.call).await)),
        }
    }

    /// Resolves when the call ends, with how it ended. Not to be awaited
    /// again after it resolved (the link is spent).
    pub(super) async fn ended(&mut self) -> Status {
        call_status((&mut self.call).await)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.call.abort();
    }
}

/// How a call ended, as a failure: a stream the peer closed without an
/// error is one too (the peer stopped reading it).
fn call_status(ended: Result<Result<(), Status>, tokio::task::JoinError>) -> Status {
    match ended {
        Ok(Ok(())) => Status::unavailable("the peer closed the stream"),
        Ok(Err(status)) => status,
        Err(error) => Status::unavailable(format!("the stream's task: {error}")),
    }
}

/// Resolves when `link`'s call ends; never without a link.
pub(super) async fn link_ended(link: &mut Option<Link>) -> Status {
    match link {
        Some(link) => link.ended().await,
        None => std::future::pending().await,
    }
}
