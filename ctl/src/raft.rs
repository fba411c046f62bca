//! `gantry raft members|add|remove`: the replica set at run time (admin
//! token; answered by the leader, which the client finds from any
//! replica). See README, "Replace a replica".

use gantry_proto as pb;

use crate::client::{self, CliError};
use crate::output::{Format, outln};

/// `gantry raft members`.
pub async fn members(opts: crate::ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let view = client
        .raft_members(pb::RaftMembersRequest {})
        .await?
        .into_inner();
    print(&view, opts.output);
    Ok(())
}

/// `gantry raft add ID URL`: answered once the learner is in the
/// configuration; the leader promotes it once it has caught up.
pub async fn add(id: u64, url: String, opts: crate::ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let view = client
        .raft_add_member(pb::RaftAddMemberRequest { id, url })
        .await?
        .into_inner();
    if opts.output == Format::Table {
        outln!("added replica {id} as a learner; it becomes a voter once it has caught up");
    }
    print(&view, opts.output);
    Ok(())
}

/// `gantry raft remove ID`. Removing the leader: it hands leadership to
/// another voter and answers "not the leader" naming it; the request then
/// goes to the new leader, which removes the old one.
pub async fn remove(id: u64, opts: crate::ClientOpts) -> Result<(), CliError> {
    const HANDOFFS: usize = 3;
    let mut handoffs = 0;
    let view = loop {
        let mut client = client::connect(&opts).await?;
        match client
            .raft_remove_member(pb::RaftRemoveMemberRequest { id })
            .await
        {
            Ok(view) => break view.into_inner(),
            Err(status)
                if handoffs < HANDOFFS
                    && status.code() == tonic::Code::Unavailable
                    && status
                        .metadata()
                        .contains_key(gantry_coordinator::error::LEADER_METADATA) =>
            {
                handoffs += 1;
            }
            Err(status) => return Err(status.into()),
        }
    };
    if opts.output == Format::Table {
        outln!("removed replica {id}");
    }
    print(&view, opts.output);
    Ok(())
}

/// `gantry raft replace OLD NEW URL`: answered once the joint change
/// that promotes NEW and removes OLD applied (NEW caught up first).
pub async fn replace(
    old: u64,
    new: u64,
    url: String,
    opts: crate::ClientOpts,
) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let view = client
        .raft_replace_member(pb::RaftReplaceMemberRequest {
            old_id: old,
            new_id: new,
            url,
        })
        .await?
        .into_inner();
    if opts.output == Format::Table {
        outln!("replaced replica {old} by {new}");
    }
    print(&view, opts.output);
    Ok(())
}

fn print(view: &pb::RaftMembersResponse, format: Format) {
    match format {
        Format::Json => crate::print_json(&serde_json::json!({
            "last_index": view.last_index,
            "commit_index": view.commit_index,
            "changing": view.changing,
            "members": view.members.iter().map(|m| serde_json::json!({
                "id": m.id,
                "url": m.url,
                "role": m.role,
                "leader": m.leader,
                "match_index": m.match_index,
                "last_contact_ms": (m.last_contact_ms >= 0).then_some(m.last_contact_ms),
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            outln!(
                "{:<4} {:<32} {:<8} {:<6} {:>10} {:>12}",
                "ID",
                "ADDRESS",
                "ROLE",
                "LEADER",
                "MATCH",
                "LAST-CONTACT"
            );
            for m in &view.members {
                let contact = if m.leader {
                    "-".to_string()
                } else if m.last_contact_ms < 0 {
                    "never".to_string()
                } else {
                    format!("{:.1}s ago", m.last_contact_ms as f64 / 1000.0)
                };
                outln!(
                    "{:<4} {:<32} {:<8} {:<6} {:>10} {:>12}",
                    m.id,
                    if m.url.is_empty() { "?" } else { &m.url },
                    m.role,
                    if m.leader { "*" } else { "" },
                    m.match_index,
                    contact
                );
            }
            outln!(
                "last index {}, commit index {}{}",
                view.last_index,
                view.commit_index,
                if view.changing {
                    ", a membership change is under way"
                } else {
                    ""
                }
            );
        }
    }
}
