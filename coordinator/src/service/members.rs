//! `gantry raft members|add|remove`: membership requests to the replica
//! loop, answered by the leader ([`crate::raft::membership`]).

use tokio::sync::oneshot;

use super::CoreHandle;
use crate::error::CoordinatorError;
use crate::raft::membership::{MembersRequest, MembersView, MembershipError};

type Reply = oneshot::Sender<Result<MembersView, MembershipError>>;

impl CoreHandle {
    /// Sends a membership request built around its reply channel and waits
    /// for the answer (a change: until it applied).
    pub async fn members(
        &self,
        build: impl FnOnce(Reply) -> MembersRequest,
    ) -> Result<MembersView, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        if !self.raft.members(build(reply)) {
            return Err(CoordinatorError::ShuttingDown);
        }
        let view = answer.await.map_err(|_| CoordinatorError::ShuttingDown)??;
        Ok(view)
    }
}
