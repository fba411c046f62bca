//! The tonic services: thin adapters. Writes are validated, turned into a
//! [`Command`] and proposed through Raft (answered with the command's own
//! typed outcome once committed and applied); reads are a [`Request`] to
//! the core, on the replica loop. A replica that does not lead refuses both
//! with the leader's URL, so clients and agents follow it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use gantry_proto as pb;
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::command::Command;
use crate::convert;
use crate::core::{Core, Request, now_ms};
use crate::domain::JobState;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::raft::{ProposeError, RaftHandle, RaftStatus};
use crate::state::Outcome;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A handle to the core shared by all services.
#[derive(Clone)]
pub struct CoreHandle {
    events: broadcast::Sender<pb::Event>,
    sessions: Arc<AtomicU64>,
    /// The replica loop, which owns the core: proposals and requests.
    raft: RaftHandle<Core>,
    metrics: Arc<Metrics>,
}

impl CoreHandle {
    /// Wraps the replica loop's handle and the event broadcaster.
    pub fn new(
        events: broadcast::Sender<pb::Event>,
        raft: RaftHandle<Core>,
        metrics: Arc<Metrics>,
    ) -> CoreHandle {
        CoreHandle {
            events,
            sessions: Arc::new(AtomicU64::new(1)),
            raft,
            metrics,
        }
    }

    /// This replica's event metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This replica's Raft progress and leadership.
    pub fn raft_status(&self) -> RaftStatus {
        self.raft.status()
    }

    /// Refuses with the leader's URL unless this replica leads.
    pub fn require_leader(&self) -> Result<(), CoordinatorError> {
        let status = self.raft.status();
        if status.is_leader {
            Ok(())
        } else {
            Err(CoordinatorError::NotLeader {
                leader: status.leader_url,
            })
        }
    }

    /// Proposes a command and returns its outcome once committed and applied.
    pub async fn propose(&self, command: Command) -> Result<Outcome, CoordinatorError> {
        let result = self
            .raft
            .propose(command)
            .await
            .map_err(|error| match error {
                ProposeError::NotLeader { leader_url, .. } => {
                    CoordinatorError::NotLeader { leader: leader_url }
                }
                other => CoordinatorError::Unavailable(other.to_string()),
            })?;
        Ok(result?)
    }

    /// Sends a request built around a reply channel and waits for the answer.
    pub async fn call<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<T, CoordinatorError>>) -> Request,
    ) -> Result<T, CoordinatorError> {
        let (tx, rx) = oneshot::channel();
        if !self.raft.request(build(tx)) {
            return Err(CoordinatorError::ShuttingDown);
        }
        rx.await.map_err(|_| CoordinatorError::ShuttingDown)?
    }

    fn post(&self, request: Request) {
        let _ = self.raft.request(request);
    }
}

/// The client API (`gantry.v1.Gantry`).
pub struct GantryService {
    core: CoreHandle,
}

impl GantryService {
    /// A service over the core.
    pub fn new(core: CoreHandle) -> GantryService {
        GantryService { core }
    }
}

#[tonic::async_trait]
impl pb::gantry_server::Gantry for GantryService {
    async fn submit(
        &self,
        request: GrpcRequest<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let received = std::time::Instant::now();
        let request = request.into_inner();
        let size = request.encoded_len();
        let convert::ValidSubmit {
            key,
            specs,
            pipeline,
        } = convert::submit_request(request, size)?;
        let count = specs.len();
        self.core.require_leader()?;
        let command = Command::Submit {
            at_ms: now_ms(),
            key,
            jobs: specs,
            pipeline,
        };
        let job_ids = match self.core.propose(command).await? {
            Outcome::Submitted(ids) => ids,
            _ => Vec::new(),
        };
        self.core
            .metrics
            .submit_seconds
            .observe(received.elapsed().as_secs_f64());
        tracing::info!(
            jobs = count,
            first = job_ids.first().copied().unwrap_or(0),
            "submitted"
        );
        Ok(Response::new(pb::SubmitResponse { job_ids }))
    }

    async fn get_job(
        &self,
        request: GrpcRequest<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.core.require_leader()?;
        let id = request.into_inner().job_id;
        Ok(Response::new(
            self.core
                .call(|reply| Request::GetJob { id, reply })
                .await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: GrpcRequest<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.core.require_leader()?;
        let request = request.into_inner();
        let mut states = Vec::new();
        for name in &request.states {
            let state = JobState::parse(name).ok_or_else(|| CoordinatorError::InvalidArgument {
                field: "states".into(),
                reason: format!(
                    "unknown state {name:?} (expected one of {})",
                    JobState::ALL.map(|s| s.as_str()).join(", ")
                ),
            })?;
            states.push(state);
        }
        let limit = if request.limit == 0 {
            usize::MAX
        } else {
            request.limit as usize
        };
        let jobs = self
            .core
            .call(|reply| Request::ListJobs {
                states,
                limit,
                reply,
            })
            .await?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: GrpcRequest<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let job = request.into_inner().job_id;
        let outcome = self
            .core
            .propose(Command::RequestCancel {
                at_ms: now_ms(),
                job,
            })
            .await?;
        let state = match outcome {
            Outcome::CancelRequested { state, .. } => state,
            _ => JobState::Cancelled,
        };
        Ok(Response::new(pb::CancelJobResponse {
            state: state.as_str().to_string(),
        }))
    }

    async fn dlq_list(
        &self,
        _request: GrpcRequest<pb::DlqListRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.core.require_leader()?;
        let jobs = self.core.call(|reply| Request::DlqList { reply }).await?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn dlq_retry(
        &self,
        request: GrpcRequest<pb::DlqRetryRequest>,
    ) -> Result<Response<pb::DlqRetryResponse>, Status> {
        let request = request.into_inner();
        let spec = match request.spec {
            Some(spec) => Some(Box::new(convert::job_spec(spec, "spec.")?)),
            None => None,
        };
        let command = Command::DlqRetry {
            at_ms: now_ms(),
            job: request.job_id,
            spec,
        };
        self.core.propose(command).await?;
        Ok(Response::new(pb::DlqRetryResponse {}))
    }

    async fn dlq_drop(
        &self,
        request: GrpcRequest<pb::DlqDropRequest>,
    ) -> Result<Response<pb::DlqDropResponse>, Status> {
        let job = request.into_inner().job_id;
        self.core
            .propose(Command::DlqDrop {
                at_ms: now_ms(),
                job,
            })
            .await?;
        Ok(Response::new(pb::DlqDropResponse {}))
    }

    async fn get_pipeline(
        &self,
        request: GrpcRequest<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::PipelineView>, Status> {
        self.core.require_leader()?;
        let request = request.into_inner();
        let (name, run) = (request.name, request.run);
        let reply_name = name.clone();
        let (run, jobs) = self
            .core
            .call(|reply| Request::Pipeline { name, run, reply })
            .await?;
        Ok(Response::new(pb::PipelineView {
            name: reply_name,
            run,
            jobs,
        }))
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        request: GrpcRequest<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.core.require_leader()?;
        let request = request.into_inner();
        let stream = match request.stream.as_str() {
            "" | "stdout" => "stdout".to_string(),
            "stderr" => "stderr".to_string(),
            other => {
                return Err(CoordinatorError::InvalidArgument {
                    field: "stream".into(),
                    reason: format!("unknown stream {other:?} (expected stdout or stderr)"),
                }
                .into());
            }
        };
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(4);
        // The first read happens before the stream is returned, so errors
        // such as "job not found" are a status, not a broken stream.
        let (job, attempt) = (request.job_id, request.attempt);
        let read = move |offset: u64| {
            let core = core.clone();
            let stream = stream.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
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
        let (first, ended) = read(request.offset).await?;
        if !first.error.is_empty() {
            return Err(CoordinatorError::NotFound(first.error).into());
        }
        let follow = request.follow;
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
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                match read(next_offset).await {
                    Ok((next, now_ended)) if next.error.is_empty() => {
                        chunk = next;
                        ended = now_ended;
                    }
                    Ok((next, _)) => {
                        let _ = tx.send(Err(Status::not_found(next.error))).await;
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        _request: GrpcRequest<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.core.require_leader()?;
        let nodes = self.core.call(|reply| Request::ListNodes { reply }).await?;
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn drain(
        &self,
        request: GrpcRequest<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let request = request.into_inner();
        if request.node.is_empty() {
            return Err(CoordinatorError::InvalidArgument {
                field: "node".into(),
                reason: "must not be empty".into(),
            }
            .into());
        }
        // The leader turns the relative deadline into an absolute one here,
        // so the command (and every replica applying it) carries one time.
        let at_ms = now_ms();
        let deadline_ms = (request.drain && request.deadline_after_ms > 0)
            .then(|| at_ms.saturating_add(request.deadline_after_ms));
        let command = Command::SetDrain {
            at_ms,
            node: request.node.clone(),
            draining: request.drain,
            deadline_ms,
        };
        self.core.propose(command).await?;
        if !request.drain {
            // An operator's undrain also vouches for the node against the
            // circuit breaker.
            let node = request.node;
            self.core
                .propose(Command::ClearQuarantine { at_ms, node })
                .await?;
        }
        Ok(Response::new(pb::DrainResponse {}))
    }

    async fn status(
        &self,
        _request: GrpcRequest<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(
            self.core.call(|reply| Request::Status { reply }).await?,
        ))
    }

    type WatchEventsStream = BoxStream<pb::Event>;

    async fn watch_events(
        &self,
        request: GrpcRequest<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.core.require_leader()?;
        let request = request.into_inner();
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(256);
        let matches = move |e: &pb::Event| {
            (request.job_id == 0 || e.job_id == request.job_id)
                && (request.kind.is_empty() || e.kind == request.kind)
                && (request.pipeline.is_empty() || e.pipeline == request.pipeline)
        };
        tokio::spawn(async move {
            // Subscribe before reading history so nothing falls in between.
            let mut live = core.events.subscribe();
            let mut next = request.from_index.max(1);
            loop {
                // Catch up from storage.
                loop {
                    let from = next;
                    let page = match core
                        .call(|reply| Request::EventsSince {
                            from,
                            limit: 1000,
                            reply,
                        })
                        .await
                    {
                        Ok(page) => page,
                        Err(error) => {
                            let _ = tx.send(Err(error.into())).await;
                            return;
                        }
                    };
                    let done = page.len() < 1000;
                    for event in page {
                        next = event.index + 1;
                        let event = convert::event_to_proto(&event);
                        if matches(&event) && tx.send(Ok(event)).await.is_err() {
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
                            if matches(&event) && tx.send(Ok(event)).await.is_err() {
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
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The agent API (`gantry.v1.AgentLink`).
pub struct AgentLinkService {
    core: CoreHandle,
}

impl AgentLinkService {
    /// A service over the core.
    pub fn new(core: CoreHandle) -> AgentLinkService {
        AgentLinkService { core }
    }
}

#[tonic::async_trait]
impl pb::agent_link_server::AgentLink for AgentLinkService {
    type ConnectAgentStream = BoxStream<pb::CoordinatorMessage>;

    async fn connect_agent(
        &self,
        request: GrpcRequest<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectAgentStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("agent sent no registration"))?;
        let register = match first {
            Some(Ok(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Register(register)),
            })) => register,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an agent stream must be register",
                ));
            }
        };
        let register = convert::agent::registration(register)?;
        let node = register.node.clone();
        let session = self.core.sessions.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        // The core sends Registered on the stream itself, first.
        self.core
            .call(|reply| Request::AgentRegister {
                session,
                register,
                sender: sender.clone(),
                reply,
            })
            .await?;
        let core = self.core.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(message) => core.post(Request::AgentMessage {
                        session,
                        node: node.clone(),
                        message,
                    }),
                    Err(status) => {
                        tracing::debug!(node = %node, %status, "agent stream error");
                        break;
                    }
                }
            }
            core.post(Request::AgentGone { session, node });
        });
        let outbound = UnboundedReceiverStream::new(receiver).map(|message| Ok(*message));
        Ok(Response::new(Box::pin(outbound)))
    }
}
