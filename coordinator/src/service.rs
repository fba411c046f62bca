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
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::auth::Caller;
use crate::command::Command;
use crate::convert;
use crate::core::{Core, Request, now_ms};
use crate::credentials::Credentials;
use crate::decide::effects::CancelProgress;
use crate::disk::DiskReserve;
use crate::domain::JobState;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::raft::membership::MembersRequest;
use crate::raft::{ProposeError, RaftHandle, RaftStatus};
use crate::state::Outcome;

mod members;
mod stream_limit;
mod streams;
mod writes;

pub use stream_limit::{DEFAULT_MAX_STREAMS_PER_CLIENT, StreamClient, StreamLimit, StreamPermit};
pub use streams::{EventFilter, StreamItem};

/// How long an agent's registration may wait for its RegisterNode to apply
/// (under the agent's own 10 s bound, so it gets this answer).
const REGISTER_WAIT: Duration = Duration::from_secs(8);

/// Size of one chunk of a backup on the wire (well under the 4 MiB
/// default message limit of clients).
const BACKUP_CHUNK_BYTES: usize = 1 << 20;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A handle to the core shared by all services.
#[derive(Clone)]
pub struct CoreHandle {
    events: broadcast::Sender<pb::Event>,
    sessions: Arc<AtomicU64>,
    /// The replica loop, which owns the core: proposals and requests.
    raft: RaftHandle<Core>,
    metrics: Arc<Metrics>,
    /// Client writes are refused under the data volume's reserve.
    disk: Option<Arc<DiskReserve>>,
    /// Open watches and followed logs per client.
    streams: StreamLimit,
}

impl CoreHandle {
    /// Refuses client writes while the data volume is under `reserve`.
    pub fn with_disk_reserve(self, reserve: DiskReserve) -> CoreHandle {
        CoreHandle {
            disk: Some(Arc::new(reserve)),
            ..self
        }
    }

    /// At most `max` open streams per client (`--max-streams-per-client`).
    pub fn with_stream_limit(self, max: usize) -> CoreHandle {
        CoreHandle {
            streams: StreamLimit::new(max),
            ..self
        }
    }

    /// Counts a new stream (watch, followed log) against `client`, or
    /// refuses it naming the limit; keep the permit with the stream.
    /// A follower refuses with the leader first, as the streams themselves do.
    pub fn open_stream(&self, client: StreamClient) -> Result<StreamPermit, CoordinatorError> {
        self.require_leader()?;
        self.streams.acquire(client)
    }

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
            disk: None,
            streams: StreamLimit::default(),
        }
    }

    /// This replica's event metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The HTTP API base URL of the leader, once this replica knows it.
    pub fn leader_http_url(&self) -> Option<String> {
        self.raft.leader_http_url()
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
        if let Some(disk) = &self.disk {
            disk.check()?;
        }
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
    /// What `ReloadCredentials` reloads (`None`: it is refused).
    credentials: Option<Arc<Credentials>>,
}

impl GantryService {
    /// A service over the core.
    pub fn new(core: CoreHandle) -> GantryService {
        GantryService {
            core,
            credentials: None,
        }
    }

    /// Serves `ReloadCredentials` with `credentials`.
    pub fn with_credentials(self, credentials: Arc<Credentials>) -> GantryService {
        GantryService {
            credentials: Some(credentials),
            ..self
        }
    }

    /// Counts a stream call against its caller: its token, else its address.
    fn open_stream<T>(&self, request: &GrpcRequest<T>) -> Result<StreamPermit, CoordinatorError> {
        let token = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.name.as_str());
        let address = request.remote_addr().map(|a| a.ip());
        self.core.open_stream(StreamClient::new(token, address))
    }
}

#[tonic::async_trait]
impl pb::gantry_server::Gantry for GantryService {
    async fn submit(
        &self,
        request: GrpcRequest<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let owner = request.extensions().get::<Caller>().map(|c| c.name.clone());
        let job_ids = self.core.submit(request.into_inner(), owner).await?;
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
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        let owner = match (request.mine, caller) {
            (false, _) => None,
            (true, Some(caller)) => Some(caller.name),
            (true, None) => {
                return Err(CoordinatorError::InvalidArgument {
                    field: "mine".into(),
                    reason: "jobs have owners only when the coordinator has --tokens".into(),
                }
                .into());
            }
        };
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
        if request.since_ms != 0 || !request.page_token.is_empty() {
            let (since_ms, page_token) = (request.since_ms, request.page_token);
            let (jobs, next_page_token) = self
                .core
                .call(|reply| Request::JobHistory {
                    states,
                    since_ms,
                    page_token,
                    limit,
                    reply,
                })
                .await?;
            return Ok(Response::new(pb::ListJobsResponse {
                jobs,
                next_page_token,
            }));
        }
        let jobs = self
            .core
            .call(|reply| Request::ListJobs {
                states,
                limit,
                owner,
                filter: Default::default(),
                reply,
            })
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            ..Default::default()
        }))
    }

    async fn cancel_job(
        &self,
        request: GrpcRequest<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let job = request.into_inner().job_id;
        Ok(Response::new(
            match self.core.cancel(job, caller.as_ref()).await? {
                CancelProgress::Settled(state) => pb::CancelJobResponse {
                    state: state.as_str().to_string(),
                    ..Default::default()
                },
                CancelProgress::Cancelling { node, attempt, .. } => pb::CancelJobResponse {
                    state: "cancelling".into(),
                    node,
                    attempt,
                },
            },
        ))
    }

    async fn dlq_list(
        &self,
        _request: GrpcRequest<pb::DlqListRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.core.require_leader()?;
        let jobs = self.core.call(|reply| Request::DlqList { reply }).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            ..Default::default()
        }))
    }

    async fn dlq_retry(
        &self,
        request: GrpcRequest<pb::DlqRetryRequest>,
    ) -> Result<Response<pb::DlqRetryResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        self.core
            .dlq_retry(request.job_id, request.spec, caller.as_ref())
            .await?;
        Ok(Response::new(pb::DlqRetryResponse {}))
    }

    async fn dlq_drop(
        &self,
        request: GrpcRequest<pb::DlqDropRequest>,
    ) -> Result<Response<pb::DlqDropResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        self.core
            .dlq_drop(request.into_inner().job_id, caller.as_ref())
            .await?;
        Ok(Response::new(pb::DlqDropResponse {}))
    }

    async fn stop_pipeline(
        &self,
        request: GrpcRequest<pb::StopPipelineRequest>,
    ) -> Result<Response<pb::StopPipelineResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let run = self
            .core
            .stop_pipeline(request.into_inner().name, caller.as_ref())
            .await?;
        Ok(Response::new(pb::StopPipelineResponse { run }))
    }

    async fn reload_credentials(
        &self,
        _request: GrpcRequest<pb::ReloadCredentialsRequest>,
    ) -> Result<Response<pb::ReloadCredentialsResponse>, Status> {
        let Some(credentials) = &self.credentials else {
            return Err(CoordinatorError::FailedPrecondition(
                "this coordinator cannot reload its credentials".into(),
            )
            .into());
        };
        let reloaded = credentials.reload().await?;
        Ok(Response::new(pb::ReloadCredentialsResponse {
            tokens: u32::try_from(reloaded.tokens).unwrap_or(u32::MAX),
            tls: reloaded.tls,
        }))
    }

    type SnapshotSaveStream = BoxStream<pb::SnapshotChunk>;

    async fn snapshot_save(
        &self,
        _request: GrpcRequest<pb::SnapshotSaveRequest>,
    ) -> Result<Response<Self::SnapshotSaveStream>, Status> {
        // Any replica: its applied state is a consistent prefix of the log.
        let (index, state) = self.core.call(|reply| Request::Backup { reply }).await?;
        let replica = self.core.raft_status().id;
        let file = tokio::task::spawn_blocking(move || {
            crate::backup::encode(index, replica, now_ms(), &state)
        })
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("backup task failed: {e}")))?;
        let total = file.len() as u64;
        tracing::info!(index, bytes = total, "backup taken");
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = file
            .chunks(BACKUP_CHUNK_BYTES)
            .enumerate()
            .map(|(i, data)| {
                Ok(pb::SnapshotChunk {
                    data: data.to_vec(),
                    total_bytes: if i == 0 { total } else { 0 },
                    applied_index: if i == 0 { index } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn get_pipeline(
        &self,
        request: GrpcRequest<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::PipelineView>, Status> {
        self.core.require_leader()?;
        let request = request.into_inner();
        let (name, run) = (request.name, request.run);
        let view = self
            .core
            .call(|reply| Request::Pipeline { name, run, reply })
            .await?;
        Ok(Response::new(view))
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        request: GrpcRequest<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let permit = self.open_stream(&request)?;
        let request = request.into_inner();
        let chunks = self
            .core
            .logs(
                request.job_id,
                request.attempt,
                &request.stream,
                request.offset,
                request.follow,
            )
            .await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(chunks).map(move |c| {
                // Counted against its client as long as the stream lives.
                let _open = &permit;
                c.map_err(Status::from)
            }),
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
        self.core
            .set_drain(request.node, request.drain, request.deadline_after_ms)
            .await?;
        Ok(Response::new(pb::DrainResponse {}))
    }

    async fn reset_gpu(
        &self,
        request: GrpcRequest<pb::ResetGpuRequest>,
    ) -> Result<Response<pb::ResetGpuResponse>, Status> {
        let request = request.into_inner();
        self.core.reset_gpu(request.node, request.gpu).await?;
        Ok(Response::new(pb::ResetGpuResponse {}))
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
        let permit = self.open_stream(&request)?;
        let request = request.into_inner();
        let filter = EventFilter {
            job: request.job_id,
            kind: request.kind,
            pipeline: request.pipeline,
        };
        let events = self.core.watch(request.from_index, filter)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(events).map(move |e| {
                // Counted against its client as long as the stream lives.
                let _open = &permit;
                e.map_err(Status::from)
            }),
        )))
    }

    async fn raft_members(
        &self,
        _request: GrpcRequest<pb::RaftMembersRequest>,
    ) -> Result<Response<pb::RaftMembersResponse>, Status> {
        let view = self
            .core
            .members(|reply| MembersRequest::List { reply })
            .await?;
        Ok(Response::new(view.into()))
    }

    async fn raft_add_member(
        &self,
        request: GrpcRequest<pb::RaftAddMemberRequest>,
    ) -> Result<Response<pb::RaftMembersResponse>, Status> {
        let pb::RaftAddMemberRequest { id, url } = request.into_inner();
        let view = self
            .core
            .members(|reply| MembersRequest::Add { id, url, reply })
            .await?;
        Ok(Response::new(view.into()))
    }

    async fn raft_remove_member(
        &self,
        request: GrpcRequest<pb::RaftRemoveMemberRequest>,
    ) -> Result<Response<pb::RaftMembersResponse>, Status> {
        let id = request.into_inner().id;
        let view = self
            .core
            .members(|reply| MembersRequest::Remove { id, reply })
            .await?;
        Ok(Response::new(view.into()))
    }

    async fn raft_replace_member(
        &self,
        request: GrpcRequest<pb::RaftReplaceMemberRequest>,
    ) -> Result<Response<pb::RaftMembersResponse>, Status> {
        let pb::RaftReplaceMemberRequest {
            old_id,
            new_id,
            url,
        } = request.into_inner();
        let view = self
            .core
            .members(|reply| MembersRequest::Replace {
                old: old_id,
                new: new_id,
                url,
                reply,
            })
            .await?;
        Ok(Response::new(view.into()))
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
        // The core sends Registered on the stream itself, first. Bounded: a
        // registration whose RegisterNode never applies must not hold the
        // agent (it registers again; the agent bounds its wait too).
        tokio::time::timeout(
            REGISTER_WAIT,
            self.core.call(|reply| Request::AgentRegister {
                session,
                register,
                sender: sender.clone(),
                reply,
            }),
        )
        .await
        .map_err(|_| {
            CoordinatorError::Unavailable("registration not committed in time".into())
        })??;
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
