//! Coordinator errors and their one mapping to gRPC status codes.

use crate::state::ApplyError;
use crate::store::StoreError;

/// gRPC metadata key carrying the leader's URL on a not-leader refusal.
pub const LEADER_METADATA: &str = "gantry-leader";

/// Everything a coordinator call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad user input; nothing was changed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The offending field, e.g. `jobs[0].resources.gpus`.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// The state machine refused the command.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Storage failed; the coordinator stops.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A node is not connected or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// This replica does not lead; clients and agents should go to `leader`.
    #[error("not leader; the leader is {}", leader.as_deref().unwrap_or("unknown (election in progress)"))]
    NotLeader {
        /// The leader's URL, when known.
        leader: Option<String>,
    },
    /// The caller presented no credential, or one that is not recognised
    /// (bearer token, agent join token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (an agent not in a strict inventory, a
    /// token whose role does not cover the method).
    #[error("{0}")]
    PermissionDenied(String),
    /// The coordinator is shutting down.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// The request is well formed but the coordinator's state refuses it
    /// (a credential reload whose files do not load).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The data volume is under its reserve: writes wait for space.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A client already holds as many open streams as it may
    /// (`--max-streams-per-client`, [`crate::service::StreamLimit`]).
    #[error(
        "too many open streams: {client} already holds {limit}, the limit (--max-streams-per-client); close one first"
    )]
    TooManyStreams {
        /// Who (a token's name or an address).
        client: String,
        /// The limit.
        limit: usize,
    },
    /// Events asked for are below the compaction floor (their jobs were
    /// retired); never answered by skipping them.
    #[error(
        "events before {floor} were compacted (asked from {from}); resynchronise with `gantry jobs`, then `gantry watch --from {floor}`"
    )]
    Compacted {
        /// The first index asked for.
        from: u64,
        /// The lowest index still kept.
        floor: u64,
    },
}

impl CoordinatorError {
    /// The HTTP status for the JSON API (`http`), chosen as the gRPC code is.
    pub fn http_status(&self) -> u16 {
        match self {
            CoordinatorError::InvalidArgument { .. } => 400,
            CoordinatorError::Apply(
                ApplyError::JobNotFound(_)
                | ApplyError::NodeNotFound(_)
                | ApplyError::GpuNotFound { .. },
            )
            | CoordinatorError::NotFound(_) => 404,
            CoordinatorError::Apply(
                ApplyError::AlreadyTerminal { .. }
                | ApplyError::NotDeadLettered { .. }
                | ApplyError::QuarantineRefused { .. },
            ) => 409,
            CoordinatorError::Apply(_) => 400,
            CoordinatorError::Store(_) => 500,
            CoordinatorError::Compacted { .. } => 410,
            CoordinatorError::Unauthenticated(_) => 401,
            CoordinatorError::FailedPrecondition(_) => 409,
            CoordinatorError::ResourceExhausted(_) => 507,
            CoordinatorError::TooManyStreams { .. } => 429,
            CoordinatorError::PermissionDenied(_) => 403,
            CoordinatorError::NotLeader { .. }
            | CoordinatorError::Unavailable(_)
            | CoordinatorError::ShuttingDown => 503,
        }
    }
}

/// Membership refusals: a malformed request is INVALID_ARGUMENT, a change
/// the cluster's state refuses (quorum, an id or address taken, a change
/// under way) FAILED_PRECONDITION.
impl From<crate::raft::membership::MembershipError> for CoordinatorError {
    fn from(error: crate::raft::membership::MembershipError) -> CoordinatorError {
        use crate::raft::membership::MembershipError;
        match error {
            MembershipError::NotLeader { leader_url } => {
                CoordinatorError::NotLeader { leader: leader_url }
            }
            MembershipError::Invalid { field, reason } => CoordinatorError::InvalidArgument {
                field: field.into(),
                reason,
            },
            MembershipError::Refused(reason) => CoordinatorError::FailedPrecondition(reason),
            MembershipError::Unavailable(reason) => CoordinatorError::Unavailable(reason),
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> tonic::Status {
        let message = error.to_string();
        match error {
            CoordinatorError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            CoordinatorError::Apply(
                ApplyError::JobNotFound(_)
                | ApplyError::NodeNotFound(_)
                | ApplyError::GpuNotFound { .. },
            )
            | CoordinatorError::NotFound(_) => tonic::Status::not_found(message),
            CoordinatorError::Apply(
                ApplyError::AlreadyTerminal { .. }
                | ApplyError::NotDeadLettered { .. }
                | ApplyError::QuarantineRefused { .. },
            ) => tonic::Status::failed_precondition(message),
            CoordinatorError::Apply(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::Store(_) => tonic::Status::internal(message),
            CoordinatorError::Compacted { .. } => tonic::Status::out_of_range(message),
            CoordinatorError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            CoordinatorError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            CoordinatorError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            CoordinatorError::ResourceExhausted(_) | CoordinatorError::TooManyStreams { .. } => {
                tonic::Status::resource_exhausted(message)
            }
            CoordinatorError::NotLeader { leader } => {
                let mut status = tonic::Status::unavailable(message);
                if let Some(url) = leader
                    && let Ok(value) = url.parse()
                {
                    status.metadata_mut().insert(LEADER_METADATA, value);
                }
                status
            }
            CoordinatorError::Unavailable(_) | CoordinatorError::ShuttingDown => {
                tonic::Status::unavailable(message)
            }
        }
    }
}
