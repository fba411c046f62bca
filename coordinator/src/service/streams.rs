//! The client API's streams, shared by the gRPC service and the HTTP API
//! (Server-Sent Events, chunked logs): the event history then live events
//! with nothing missed, and a job's output read from its node.

use std::time::Duration;

use gantry_proto as pb;
use tokio::sync::{broadcast, mpsc};

use super::CoreHandle;
use crate::convert;
use crate::core::Request;
use crate::error::CoordinatorError;

/// Events read from storage per request while catching up.
const EVENT_PAGE: usize = 1000;

/// How long one log read may wait for the node.
const LOG_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a followed log with nothing new is read again.
const LOG_POLL: Duration = Duration::from_millis(250);

/// Which events a watcher wants; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this job's events (0: every job).
    pub job: u64,
    /// Only jobs of this kind.
    pub kind: String,
    /// Only jobs of this pipeline.
    pub pipeline: String,
}

impl EventFilter {
    fn matches(&self, event: &pb::Event) -> bool {
        (self.job == 0 || event.job_id == self.job)
            && (self.kind.is_empty() || event.kind == self.kind)
            && (self.pipeline.is_empty() || event.pipeline == self.pipeline)
    }
}

/// One item of a stream: a value or the error that ends it.
pub type StreamItem<T> = Result<T, CoordinatorError>;

impl CoreHandle {
    /// Every event from index `from` on that `filter` matches, in index
    /// order and without gaps: the stored history first, then live events.
    /// The task ends when the receiver is dropped.
    pub fn watch(
        &self,
        from: u64,
        filter: EventFilter,
    ) -> Result<mpsc::Receiver<StreamItem<pb::Event>>, CoordinatorError> {
        self.require_leader()?;
        let core = self.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Subscribe before reading history so nothing falls in between.
            let mut live = core.events.subscribe();
            // 0: from the oldest event kept (the core maps it to the floor,
            // and refuses anything below it).
            let mut next = from;
            loop {
                // Catch up from storage.
                loop {
                    let from = next;
                    let page = match core
                        .call(|reply| Request::EventsSince {
                            from,
                            limit: EVENT_PAGE,
                            reply,
                        })
                        .await
                    {
                        Ok(page) => page,
                        Err(error) => {
                            let _ = tx.send(Err(error)).await;
                            return;
                        }
                    };
                    let done = page.len() < EVENT_PAGE;
                    for event in page {
                        next = event.index + 1;
                        let event = convert::event_to_proto(&event);
                        if filter.matches(&event) && tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    if done {
                        break;
                    }
                }
                // Then live, skipping what history already gave.
                loop {
                    // A watcher that went away ends the task at once, not at
                    // the next event (which may never come).
                    let received = tokio::select! {
                        received = live.recv() => received,
                        _ = tx.closed() => return,
                    };
                    match received {
                        Ok(event) if event.index < next => {}
                        Ok(event) if event.index == next => {
                            next += 1;
                            if filter.matches(&event) && tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        // A gap (lagged or out of order): go back to storage.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Ok(rx)
    }

    /// A job's output (`stream`: `stdout` or `stderr`, empty for stdout)
    /// from `offset`, read from its node; with `follow`, until the attempt
    /// has ended and everything is read. The first read happens before
    /// this returns, so "job not found" is an error, not a broken stream.
    pub async fn logs(
        &self,
        job: u64,
        attempt: u32,
        stream: &str,
        offset: u64,
        follow: bool,
    ) -> Result<mpsc::Receiver<StreamItem<pb::LogChunk>>, CoordinatorError> {
        self.require_leader()?;
        let stream = match stream {
            "" | "stdout" => "stdout".to_string(),
            "stderr" => "stderr".to_string(),
            other => {
                return Err(CoordinatorError::InvalidArgument {
                    field: "stream".into(),
                    reason: format!(
                        "unknown stream {:?} (expected stdout or stderr)",
                        crate::spec_file::printable(other, 64)
                    ),
                });
            }
        };
        let core = self.clone();
        let (tx, rx) = mpsc::channel(4);
        let read = move |offset: u64| {
            let core = core.clone();
            let stream = stream.clone();
            async move {
                tokio::time::timeout(
                    LOG_READ_TIMEOUT,
                    core.call(|reply| Request::ReadLog {
                        job,
                        attempt,
                        stream,
                        offset,
                        reply,
                    }),
                )
                .await
                .map_err(|_| {
                    CoordinatorError::Unavailable("node did not answer the log read in time".into())
                })?
            }
        };
        let (first, ended) = read(offset).await?;
        if !first.error.is_empty() {
            return Err(CoordinatorError::NotFound(first.error));
        }
        tokio::spawn(async move {
            let mut chunk = first;
            let mut ended = ended;
            loop {
                let next_offset = chunk.offset + chunk.data.len() as u64;
                let empty = chunk.data.is_empty();
                let eof = chunk.eof;
                if !empty
                    && tx
                        .send(Ok(pb::LogChunk {
                            data: chunk.data,
                            offset: chunk.offset,
                        }))
                        .await
                        .is_err()
                {
                    return;
                }
                if empty && (!follow || eof || ended) {
                    return;
                }
                if empty {
                    if tx.is_closed() {
                        return; // the reader went away
                    }
                    tokio::time::sleep(LOG_POLL).await;
                }
                match read(next_offset).await {
                    Ok((next, now_ended)) if next.error.is_empty() => {
                        chunk = next;
                        ended = now_ended;
                    }
                    Ok((next, _)) => {
                        let _ = tx.send(Err(CoordinatorError::NotFound(next.error))).await;
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}
