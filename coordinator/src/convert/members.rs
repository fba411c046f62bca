//! Membership views to and from the wire (`gantry raft members`).

use gantry_proto as pb;

use crate::raft::membership::MembersView;

impl From<MembersView> for pb::RaftMembersResponse {
    fn from(view: MembersView) -> pb::RaftMembersResponse {
        pb::RaftMembersResponse {
            members: view
                .members
                .into_iter()
                .map(|member| pb::RaftMember {
                    id: member.id,
                    url: member.url.unwrap_or_default(),
                    role: member.role.name().to_string(),
                    leader: member.leader,
                    match_index: member.matched,
                    last_contact_ms: member
                        .last_contact
                        .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                })
                .collect(),
            last_index: view.last_index,
            commit_index: view.commit_index,
            changing: view.changing,
        }
    }
}
