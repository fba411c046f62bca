//! Membership at run time: who the replicas are and where they listen.
//!
//! **Where membership lives.** The voters and learners are raft-rs's
//! `ConfState`: changed only by committed `ConfChangeV2` entries, persisted
//! with the Raft storage when each is applied, and carried in every
//! snapshot's metadata. `--peers` seeds it once, for a new cluster; later
//! starts read the stored one and ignore the flag. The addresses are the
//! [`MemberBook`]: the conf change that adds a replica carries `ID=URL` in
//! its entry context, so every replica learns the address when it applies
//! the entry; the book is persisted in its own sled tree with the index of
//! the entry that last changed it. A replica that skipped those entries
//! (it installed a snapshot, or it is new) learns the book from its peers:
//! every batch carries the sender's book and its index, and a receiver
//! adopts a book with a higher index (it was written by a later committed
//! conf change). The book only says where ids listen; who is a member is
//! the `ConfState` alone.
//!
//! **Joining.** A replica started with `--join` and an empty data dir
//! stores no configuration and does not campaign: it waits until the leader,
//! which added it as a learner, contacts it, adopts the cluster id and the
//! book from the first batch, and catches up (by snapshot: every replica
//! takes a snapshot when it applies a conf change that adds an id, so the
//! leader never replays the log from index 1 to a replica that has no
//! configuration).
//!
//! **Decisions** are pure functions tested as data below: [`decide_add`]
//! and [`decide_remove`] refuse changes that are malformed or would lose
//! quorum, [`decide_promotion`] promotes a learner only once its log has
//! stayed within [`PromotePolicy::max_lag`] entries of the leader's for
//! [`PromotePolicy::caught_up_for`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raft::eraftpb::ConfState;
use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use tokio::sync::oneshot;

use super::{RaftError, parse_peers};

/// Most voters and learners a cluster may have (the book and every
/// batch's copy of it stay small).
pub const MAX_MEMBERS: usize = 16;
/// Longest member URL.
pub const MAX_URL_BYTES: usize = 512;
/// The sled tree of the [`MemberBook`] and the index of the last applied
/// conf change.
const TREE: &str = "raft_members";
const BOOK_KEY: &[u8] = b"book";
const CONF_INDEX_KEY: &[u8] = b"conf_index";

/// Where each member listens, and the log index of the conf change that
/// last changed it (0: seeded from `--peers`, or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberBook {
    /// Index of the conf change entry that wrote this book.
    pub index: u64,
    /// Member id -> URL of its `RaftPeer` service.
    pub urls: BTreeMap<u64, String>,
}

impl MemberBook {
    /// The `ID=URL,...` text of `urls` (the `--peers` format, also used in
    /// conf change contexts).
    pub fn peers_text(urls: &BTreeMap<u64, String>) -> String {
        urls.iter()
            .map(|(id, url)| format!("{id}={url}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Checks a book received from a peer: bounded, well-formed URLs.
    pub fn from_wire(index: u64, urls: Vec<(u64, String)>) -> Result<MemberBook, String> {
        if urls.len() > MAX_MEMBERS {
            return Err(format!("{} members (at most {MAX_MEMBERS})", urls.len()));
        }
        if let Some((id, _)) = urls.iter().find(|(_, url)| url.len() > MAX_URL_BYTES) {
            return Err(format!(
                "member {id}: URL longer than {MAX_URL_BYTES} bytes"
            ));
        }
        let map: BTreeMap<u64, String> = urls.into_iter().collect();
        let urls = if map.is_empty() {
            map
        } else {
            parse_peers(&MemberBook::peers_text(&map)).map_err(|error| error.to_string())?
        };
        Ok(MemberBook { index, urls })
    }
}

/// The persisted membership records (sled tree `raft_members`).
pub(crate) struct BookStore {
    tree: sled::Tree,
}

impl BookStore {
    pub(crate) fn open(db: &sled::Db) -> Result<BookStore, RaftError> {
        Ok(BookStore {
            tree: db.open_tree(TREE)?,
        })
    }

    /// The stored book; `None` when none was ever stored.
    pub(crate) fn load(&self) -> Result<Option<MemberBook>, RaftError> {
        let Some(bytes) = self.tree.get(BOOK_KEY)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| RaftError::Inconsistent(format!("member book: {reason}"));
        let text = std::str::from_utf8(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let (index, peers) = text.split_once('\n').unwrap_or((text, ""));
        let index = index
            .parse()
            .map_err(|_| corrupt(format!("index {index:?}")))?;
        let urls = if peers.is_empty() {
            BTreeMap::new()
        } else {
            parse_peers(peers).map_err(|e| corrupt(e.to_string()))?
        };
        Ok(Some(MemberBook { index, urls }))
    }

    pub(crate) fn save(&self, book: &MemberBook) -> Result<(), RaftError> {
        let text = format!("{}\n{}", book.index, MemberBook::peers_text(&book.urls));
        self.tree.insert(BOOK_KEY, text.as_bytes())?;
        Ok(())
    }

    /// The index of the last conf change applied to the stored `ConfState`.
    pub(crate) fn conf_index(&self) -> Result<u64, RaftError> {
        match self.tree.get(CONF_INDEX_KEY)? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    RaftError::Inconsistent("conf change index is not 8 bytes".into())
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    pub(crate) fn set_conf_index(&self, index: u64) -> Result<(), RaftError> {
        self.tree.insert(CONF_INDEX_KEY, &index.to_be_bytes())?;
        Ok(())
    }
}

/// A member's role in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    /// Votes and counts for commits.
    Voter,
    /// Receives the log; does not vote.
    Learner,
}

impl MemberRole {
    /// The role's name in `gantry raft members`.
    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        }
    }
}

/// One member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Raft id.
    pub id: u64,
    /// Its address from the book (`None`: not known to this replica).
    pub url: Option<String>,
    /// Voter or learner.
    pub role: MemberRole,
    /// Whether it leads.
    pub leader: bool,
    /// Highest log index known replicated to it.
    pub matched: u64,
    /// Time since the leader last heard from it (`None`: never, or it is
    /// the leader itself).
    pub last_contact: Option<Duration>,
}

/// `gantry raft members`: the configuration and each member's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersView {
    /// The leader's last log index.
    pub last_index: u64,
    /// The commit index.
    pub commit_index: u64,
    /// Whether a conf change is proposed and not applied yet (or the
    /// configuration is joint).
    pub changing: bool,
    /// Members by id.
    pub members: Vec<MemberInfo>,
}

/// Why a membership request was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// Only the leader changes or reports membership.
    #[error("not the leader (leader: {})", leader_url.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// The leader's URL, when known.
        leader_url: Option<String>,
    },
    /// The request itself is malformed (a bad id or URL).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The change is well-formed but refused in this cluster's state (it
    /// would lose quorum, the id is taken, a change is under way).
    #[error("{0}")]
    Refused(String),
    /// The replica stopped, or lost leadership before the change applied
    /// (it may still apply under the next leader: check `gantry raft members`).
    #[error("{0}")]
    Unavailable(String),
}

/// Requests to the replica loop.
pub enum MembersRequest {
    /// The configuration with progress (leader only).
    List {
        /// The answer.
        reply: oneshot::Sender<Result<MembersView, MembershipError>>,
    },
    /// Add `id` at `url` as a learner; answered once the change applied.
    Add {
        /// New member's id.
        id: u64,
        /// Its `RaftPeer` URL.
        url: String,
        /// The configuration after the change.
        reply: oneshot::Sender<Result<MembersView, MembershipError>>,
    },
    /// Remove `id` (voter or learner, alive or dead).
    Remove {
        /// The member to remove.
        id: u64,
        /// The configuration after the change.
        reply: oneshot::Sender<Result<MembersView, MembershipError>>,
    },
    /// Replace voter `old` by `new` at `url`: `new` joins as a learner,
    /// then one joint change promotes it and removes `old`; answered once
    /// that change applied.
    Replace {
        /// The voter that leaves.
        old: u64,
        /// The replica that takes its place.
        new: u64,
        /// Its `RaftPeer` URL.
        url: String,
        /// The configuration after the joint change.
        reply: oneshot::Sender<Result<MembersView, MembershipError>>,
    },
}

/// What the decisions read: the leader's view of the configuration.
#[derive(Debug, Clone)]
pub struct ClusterView<'a> {
    /// The leader (this replica).
    pub leader: u64,
    /// Voters (incoming and outgoing while joint), sorted.
    pub voters: &'a [u64],
    /// Learners, sorted.
    pub learners: &'a [u64],
    /// A conf change is proposed and not yet applied, or the configuration
    /// is joint.
    pub changing: bool,
    /// The book's addresses.
    pub urls: &'a BTreeMap<u64, String>,
    /// Voters the leader heard from within an election timeout (itself
    /// included).
    pub alive: &'a [u64],
}

/// The conf change to propose and its entry context.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The change (one or more singles; a joint change when more than one
    /// voter changes).
    pub conf_change: ConfChangeV2,
    /// `ID=URL,...` of the members it adds (empty otherwise).
    pub context: String,
}

fn single(change_type: ConfChangeType, id: u64) -> ConfChangeSingle {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change_type);
    single.node_id = id;
    single
}

/// A conf change of `singles`: the simple protocol for one change, joint
/// consensus (left automatically once applied) for several (raft-rs enters
/// a joint configuration for any change of more than one single).
pub fn conf_change(singles: Vec<ConfChangeSingle>) -> ConfChangeV2 {
    let mut change = ConfChangeV2::default();
    change.set_transition(ConfChangeTransition::Auto);
    change.set_changes(singles.into());
    change
}

fn refused(text: String) -> MembershipError {
    MembershipError::Refused(text)
}

/// Adding `id` at `url` as a learner: refused when malformed, when the id
/// or the address is taken, during another change, or past [`MAX_MEMBERS`].
pub fn decide_add(view: &ClusterView<'_>, id: u64, url: &str) -> Result<Change, MembershipError> {
    if id == 0 {
        return Err(MembershipError::Invalid {
            field: "id",
            reason: "must not be 0".into(),
        });
    }
    if url.len() > MAX_URL_BYTES {
        return Err(MembershipError::Invalid {
            field: "url",
            reason: format!("longer than {MAX_URL_BYTES} bytes"),
        });
    }
    let parsed = parse_peers(&format!("{id}={url}")).map_err(|error| MembershipError::Invalid {
        field: "url",
        reason: error.to_string(),
    })?;
    let url = parsed.get(&id).cloned().unwrap_or_default();
    let role = if view.voters.contains(&id) {
        Some("voter")
    } else if view.learners.contains(&id) {
        Some("learner")
    } else {
        None
    };
    if let Some(role) = role {
        return Err(refused(format!("replica {id} is already a {role}")));
    }
    if let Some((other, _)) = view
        .urls
        .iter()
        .find(|(other, u)| **u == url && **other != id)
    {
        return Err(refused(format!(
            "address {url} is already replica {other}'s (remove it first)"
        )));
    }
    if view.changing {
        return Err(refused(
            "another membership change is under way; retry once it has applied".into(),
        ));
    }
    if view.voters.len() + view.learners.len() >= MAX_MEMBERS {
        return Err(refused(format!(
            "the cluster has {MAX_MEMBERS} members, the most it may have"
        )));
    }
    Ok(Change {
        conf_change: conf_change(vec![single(ConfChangeType::AddLearnerNode, id)]),
        context: format!("{id}={url}"),
    })
}

/// Removing `id`: refused when it is not a member, is the last voter or the
/// leader, during another change, or when the voters left that are alive
/// would not be a majority of the voters left.
pub fn decide_remove(view: &ClusterView<'_>, id: u64) -> Result<Change, MembershipError> {
    let change = Change {
        conf_change: conf_change(vec![single(ConfChangeType::RemoveNode, id)]),
        context: String::new(),
    };
    if view.learners.contains(&id) {
        return if view.changing {
            Err(refused(
                "another membership change is under way; retry once it has applied".into(),
            ))
        } else {
            Ok(change)
        };
    }
    if !view.voters.contains(&id) {
        return Err(MembershipError::Invalid {
            field: "id",
            reason: format!(
                "replica {id} is not a member (members: {:?})",
                members(view)
            ),
        });
    }
    if view.voters == [id] {
        return Err(refused(format!(
            "replica {id} is the last voter: removing it would leave no cluster"
        )));
    }
    if id == view.leader {
        return Err(refused(format!(
            "replica {id} leads: it hands leadership over first (see decide_handoff)"
        )));
    }
    check_voter_removal(view, id)?;
    Ok(change)
}

/// What every removal of voter `id` needs: no other change under way, and
/// enough live voters left for a majority of those left.
fn check_voter_removal(view: &ClusterView<'_>, id: u64) -> Result<(), MembershipError> {
    if view.changing {
        return Err(refused(
            "another membership change is under way; retry once it has applied".into(),
        ));
    }
    let left: Vec<u64> = view.voters.iter().copied().filter(|v| *v != id).collect();
    let alive = left.iter().filter(|v| view.alive.contains(v)).count();
    let majority = left.len() / 2 + 1;
    if alive < majority {
        return Err(refused(format!(
            "removing replica {id} would lose quorum: {alive} of the {} voters left are alive, {majority} are needed",
            left.len()
        )));
    }
    Ok(())
}

/// Removing the leader itself: it first hands leadership to the live
/// voter whose log is furthest along (`matched`: each voter's match index;
/// ties go to the lower id), and the new leader removes it. Refused as any
/// voter's removal would be, and when no other voter is alive.
pub fn decide_handoff(
    view: &ClusterView<'_>,
    matched: &BTreeMap<u64, u64>,
) -> Result<u64, MembershipError> {
    let id = view.leader;
    if view.voters == [id] {
        return Err(refused(format!(
            "replica {id} is the last voter: removing it would leave no cluster"
        )));
    }
    check_voter_removal(view, id)?;
    view.voters
        .iter()
        .copied()
        .filter(|v| *v != id && view.alive.contains(v))
        .max_by_key(|v| (matched.get(v).copied().unwrap_or(0), std::cmp::Reverse(*v)))
        .ok_or_else(|| {
            refused(format!(
                "replica {id} leads and no other voter is alive to take over"
            ))
        })
}

fn members(view: &ClusterView<'_>) -> Vec<u64> {
    let mut all: Vec<u64> = view.voters.iter().chain(view.learners).copied().collect();
    all.sort_unstable();
    all
}

/// Replacing voter `old` by a new replica `new` at `url`: refused as
/// adding `new` would be, when `old` is not a voter or leads (remove the
/// leader first: it hands over), and when the voters other than `old`
/// that are alive are not a majority of the configuration (the joint
/// change needs one of the old configuration without `old`, and one of
/// the new before `new` has voted). The change adds `new` as a learner;
/// [`replace`] is the joint change once it has caught up.
pub fn decide_replace(
    view: &ClusterView<'_>,
    old: u64,
    new: u64,
    url: &str,
) -> Result<Change, MembershipError> {
    let add = decide_add(view, new, url)?;
    if !view.voters.contains(&old) {
        return Err(MembershipError::Invalid {
            field: "old_id",
            reason: format!("replica {old} is not a voter (voters: {:?})", view.voters),
        });
    }
    if old == view.leader {
        return Err(refused(format!(
            "replica {old} leads: remove it first (it hands leadership over), then add {new}"
        )));
    }
    let alive = view
        .voters
        .iter()
        .filter(|v| **v != old && view.alive.contains(v))
        .count();
    let majority = view.voters.len() / 2 + 1;
    if alive < majority {
        return Err(refused(format!(
            "replacing replica {old} would lose quorum: {alive} of the other {} voters are alive, {majority} are needed",
            view.voters.len() - 1
        )));
    }
    Ok(add)
}

/// The joint change of a replacement: learner `new` becomes a voter and
/// voter `old` leaves, in one change (joint consensus, left automatically).
pub fn replace(old: u64, new: u64) -> ConfChangeV2 {
    conf_change(vec![
        single(ConfChangeType::AddNode, new),
        single(ConfChangeType::RemoveNode, old),
    ])
}

/// When a learner counts as caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotePolicy {
    /// Entries its log may lag behind the leader's last index.
    pub max_lag: u64,
    /// How long it must have stayed within that lag.
    pub caught_up_for: Duration,
}

impl Default for PromotePolicy {
    fn default() -> PromotePolicy {
        PromotePolicy {
            max_lag: 64,
            caught_up_for: Duration::from_secs(1),
        }
    }
}

/// What to do with one learner this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// Propose it as a voter.
    Promote,
    /// Not yet; `since` is when it was first seen caught up in its current
    /// stretch (`None`: it is behind).
    Wait {
        /// Start of the current caught-up stretch.
        since: Option<Instant>,
    },
}

/// A learner is promoted once its matched index has stayed within
/// `max_lag` of the leader's `last_index` for `caught_up_for`, while it
/// answers (`active`); falling behind or going silent restarts the wait.
pub fn decide_promotion(
    matched: u64,
    active: bool,
    since: Option<Instant>,
    last_index: u64,
    now: Instant,
    policy: PromotePolicy,
) -> Promotion {
    let caught_up = active && matched > 0 && matched + policy.max_lag >= last_index;
    if !caught_up {
        return Promotion::Wait { since: None };
    }
    match since {
        Some(start) if now.saturating_duration_since(start) >= policy.caught_up_for => {
            Promotion::Promote
        }
        Some(start) => Promotion::Wait { since: Some(start) },
        None => Promotion::Wait { since: Some(now) },
    }
}

/// The promotion of learner `id` to voter.
pub fn promote(id: u64) -> ConfChangeV2 {
    conf_change(vec![single(ConfChangeType::AddNode, id)])
}

/// The book after applying `change` (committed at `index`, with
/// `context`): added ids get their context URL, removed ids leave.
pub fn book_after(
    book: &MemberBook,
    index: u64,
    change: &ConfChangeV2,
    context: &[u8],
) -> MemberBook {
    let added = std::str::from_utf8(context)
        .ok()
        .filter(|text| !text.is_empty())
        .and_then(|text| parse_peers(text).ok())
        .unwrap_or_default();
    let mut urls = book.urls.clone();
    for single in change.get_changes() {
        let id = single.node_id;
        match single.get_change_type() {
            ConfChangeType::RemoveNode => {
                urls.remove(&id);
            }
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Some(url) = added.get(&id) {
                    urls.insert(id, url.clone());
                }
            }
        }
    }
    MemberBook { index, urls }
}

/// Whether `change` adds an id that `before` did not have (a new replica,
/// which must catch up by snapshot).
pub fn adds_new_member(before: &ConfState, change: &ConfChangeV2) -> bool {
    change.get_changes().iter().any(|single| {
        single.get_change_type() != ConfChangeType::RemoveNode
            && !before.voters.contains(&single.node_id)
            && !before.learners.contains(&single.node_id)
            && !before.voters_outgoing.contains(&single.node_id)
    })
}

/// Voters (incoming and outgoing) and learners (current and next) of a
/// configuration, sorted: whom peers' messages may come from.
pub fn member_ids(conf: &ConfState) -> (Vec<u64>, Vec<u64>) {
    let mut voters: Vec<u64> = conf
        .voters
        .iter()
        .chain(&conf.voters_outgoing)
        .copied()
        .collect();
    voters.sort_unstable();
    voters.dedup();
    let mut learners: Vec<u64> = conf
        .learners
        .iter()
        .chain(&conf.learners_next)
        .copied()
        .collect();
    learners.sort_unstable();
    learners.dedup();
    learners.retain(|id| !voters.contains(id));
    (voters, learners)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn urls(ids: &[u64]) -> BTreeMap<u64, String> {
        ids.iter()
            .map(|id| (*id, format!("http://10.0.0.{id}:7070")))
            .collect()
    }

    struct Case {
        name: &'static str,
        voters: &'static [u64],
        learners: &'static [u64],
        alive: &'static [u64],
        changing: bool,
        /// Ok(()) or a fragment of the refusal.
        expect: Result<(), &'static str>,
    }

    fn view<'a>(case: &'a Case, book: &'a BTreeMap<u64, String>) -> ClusterView<'a> {
        ClusterView {
            leader: 1,
            voters: case.voters,
            learners: case.learners,
            changing: case.changing,
            urls: book,
            alive: case.alive,
        }
    }

    fn check<T>(case: &Case, got: Result<T, MembershipError>) {
        match (got, case.expect) {
            (Ok(_), Ok(())) => {}
            (Err(error), Err(fragment)) => {
                assert!(
                    error.to_string().contains(fragment),
                    "{}: {error}",
                    case.name
                )
            }
            (Ok(_), Err(fragment)) => panic!("{}: accepted, want {fragment:?}", case.name),
            (Err(error), Ok(())) => panic!("{}: refused: {error}", case.name),
        }
    }

    #[test]
    fn removals() {
        let cases = [
            Case {
                name: "dead follower of three",
                voters: &[1, 2, 3],
                learners: &[],
                alive: &[1, 2],
                changing: false,
                expect: Ok(()),
            },
            Case {
                name: "learner during a change",
                voters: &[1, 2, 3],
                learners: &[4],
                alive: &[1, 2, 3],
                changing: true,
                expect: Err("under way"),
            },
            Case {
                name: "learner",
                voters: &[1, 2, 3],
                learners: &[3, 4],
                alive: &[1],
                changing: false,
                expect: Ok(()),
            },
            Case {
                name: "two of three dead",
                voters: &[1, 2, 3],
                learners: &[],
                alive: &[1],
                changing: false,
                expect: Err("would lose quorum: 1 of the 2 voters left are alive, 2 are needed"),
            },
            Case {
                name: "five with two dead, remove a live one",
                voters: &[1, 2, 3, 4, 5],
                learners: &[],
                alive: &[1, 2, 3],
                changing: false,
                expect: Err("would lose quorum: 2 of the 4 voters left"),
            },
            Case {
                name: "five with two dead, remove a dead one",
                voters: &[1, 2, 3, 4, 5],
                learners: &[],
                alive: &[1, 2, 4],
                changing: false,
                expect: Ok(()),
            },
            Case {
                name: "not a member",
                voters: &[1, 2, 3],
                learners: &[],
                alive: &[1, 2, 3],
                changing: false,
                expect: Err("replica 3 is not a member"),
            },
            Case {
                name: "the leader",
                voters: &[1, 2],
                learners: &[],
                alive: &[1, 2],
                changing: false,
                expect: Err("replica 1 leads"),
            },
            Case {
                name: "last voter",
                voters: &[1],
                learners: &[],
                alive: &[1],
                changing: false,
                expect: Err("last voter"),
            },
            Case {
                name: "during another change",
                voters: &[1, 2, 3],
                learners: &[],
                alive: &[1, 2, 3],
                changing: true,
                expect: Err("another membership change"),
            },
        ];
        let targets = [3, 4, 3, 3, 2, 3, 3, 1, 1, 2];
        for (case, target) in cases.iter().zip(targets) {
            let book = urls(case.voters);
            let mut case_view = view(case, &book);
            if case.name == "not a member" {
                case_view.voters = &[1, 2];
            }
            check(case, decide_remove(&case_view, target));
        }
    }

    #[test]
    fn the_leader_hands_over_to_the_live_voter_furthest_along() {
        // (case, matched by voter, expected target or refusal)
        let base = |name, voters, alive, changing| Case {
            name,
            voters,
            learners: &[],
            alive,
            changing,
            expect: Ok(()),
        };
        type Matched = &'static [(u64, u64)];
        let cases: [(Case, Matched, Result<u64, &str>); 7] = [
            (
                base("furthest along", &[1, 2, 3], &[1, 2, 3], false),
                &[(2, 90), (3, 100)],
                Ok(3),
            ),
            (
                base("a tie goes to the lower id", &[1, 2, 3], &[1, 2, 3], false),
                &[(2, 100), (3, 100)],
                Ok(2),
            ),
            (
                base(
                    "a dead voter is passed over",
                    &[1, 2, 3, 4, 5],
                    &[1, 2, 3, 4],
                    false,
                ),
                &[(2, 50), (3, 60), (4, 70), (5, 100)],
                Ok(4),
            ),
            (
                base("would lose quorum", &[1, 2, 3], &[1, 2], false),
                &[(2, 100)],
                Err("would lose quorum: 1 of the 2 voters left are alive, 2 are needed"),
            ),
            (
                base("last voter", &[1], &[1], false),
                &[],
                Err("last voter"),
            ),
            (
                base("during another change", &[1, 2, 3], &[1, 2, 3], true),
                &[],
                Err("another membership change"),
            ),
            (
                base("nobody to take over", &[1, 2], &[1], false),
                &[],
                Err("would lose quorum"),
            ),
        ];
        for (case, matched, expect) in cases {
            let book = urls(case.voters);
            let matched: BTreeMap<u64, u64> = matched.iter().copied().collect();
            let got = decide_handoff(&view(&case, &book), &matched);
            match (got, expect) {
                (Ok(to), Ok(want)) => assert_eq!(to, want, "{}", case.name),
                (Err(error), Err(fragment)) => {
                    assert!(
                        error.to_string().contains(fragment),
                        "{}: {error}",
                        case.name
                    )
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
            }
        }
    }

    #[test]
    fn replacements() {
        let base = |name, voters, alive, expect| Case {
            name,
            voters,
            learners: &[],
            alive,
            changing: false,
            expect,
        };
        let cases = [
            (base("a dead voter", &[1, 2, 3], &[1, 2], Ok(())), 3, 4),
            (base("a live voter", &[1, 2, 3], &[1, 2, 3], Ok(())), 2, 4),
            (
                base(
                    "one of five, two dead",
                    &[1, 2, 3, 4, 5],
                    &[1, 2, 3],
                    Ok(()),
                ),
                5,
                6,
            ),
            (
                base(
                    "would lose quorum",
                    &[1, 2, 3],
                    &[1, 3],
                    Err(
                        "replacing replica 3 would lose quorum: 1 of the other 2 voters are alive, 2 are needed",
                    ),
                ),
                3,
                4,
            ),
            (
                base(
                    "the leader",
                    &[1, 2, 3],
                    &[1, 2, 3],
                    Err("replica 1 leads: remove it first"),
                ),
                1,
                4,
            ),
            (
                base(
                    "not a voter",
                    &[1, 2, 3],
                    &[1, 2, 3],
                    Err("old_id: replica 7 is not a voter"),
                ),
                7,
                4,
            ),
            (
                base(
                    "new id taken",
                    &[1, 2, 3],
                    &[1, 2, 3],
                    Err("replica 2 is already a voter"),
                ),
                3,
                2,
            ),
        ];
        for (case, old, new) in &cases {
            let book = urls(case.voters);
            let url = format!("http://10.0.0.{new}:7070");
            let got = decide_replace(&view(case, &book), *old, *new, &url);
            if let Ok(change) = &got {
                // The first step adds the new replica as a learner only.
                let singles = change.conf_change.get_changes();
                assert_eq!(singles.len(), 1, "{}", case.name);
                assert_eq!(singles[0].get_change_type(), ConfChangeType::AddLearnerNode);
                assert_eq!(singles[0].node_id, *new);
            }
            check(case, got);
        }
        // The second step is one joint change of two voters.
        let joint = replace(3, 4);
        let singles: Vec<_> = joint
            .get_changes()
            .iter()
            .map(|s| (s.get_change_type(), s.node_id))
            .collect();
        assert_eq!(
            singles,
            [
                (ConfChangeType::AddNode, 4),
                (ConfChangeType::RemoveNode, 3)
            ]
        );
        assert_eq!(joint.get_transition(), ConfChangeTransition::Auto);
    }

    #[test]
    fn additions() {
        let base = |name, voters, learners, changing, expect| Case {
            name,
            voters,
            learners,
            alive: &[1, 2, 3],
            changing,
            expect,
        };
        let cases = [
            (
                base("fresh id", &[1, 2, 3], &[], false, Ok(())),
                4,
                "http://10.0.0.4:7070",
            ),
            (
                base(
                    "a voter's id",
                    &[1, 2, 3],
                    &[],
                    false,
                    Err("replica 3 is already a voter"),
                ),
                3,
                "http://10.0.0.9:7070",
            ),
            (
                base(
                    "a learner's id",
                    &[1, 2, 3],
                    &[4],
                    false,
                    Err("already a learner"),
                ),
                4,
                "http://10.0.0.9:7070",
            ),
            (
                base(
                    "an address in use",
                    &[1, 2, 3],
                    &[],
                    false,
                    Err("already replica 2's"),
                ),
                5,
                "http://10.0.0.2:7070",
            ),
            (
                base("id 0", &[1], &[], false, Err("id: must not be 0")),
                0,
                "http://a:1",
            ),
            (
                base("bad url", &[1], &[], false, Err("must start with http://")),
                4,
                "10.0.0.4:7070",
            ),
            (
                base("during a change", &[1, 2, 3], &[], true, Err("under way")),
                4,
                "http://10.0.0.4:7070",
            ),
        ];
        for (case, id, url) in &cases {
            let book = urls(&[1, 2, 3]);
            let got = decide_add(&view(case, &book), *id, url);
            if let Ok(change) = &got {
                assert_eq!(change.context, format!("{id}={url}"));
                assert_eq!(change.conf_change.get_changes().len(), 1);
                assert_eq!(
                    change.conf_change.get_changes()[0].get_change_type(),
                    ConfChangeType::AddLearnerNode
                );
            }
            check(case, got);
        }
    }

    #[test]
    fn promotion_waits_for_a_caught_up_stretch() {
        let policy = PromotePolicy {
            max_lag: 10,
            caught_up_for: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // (matched, active, since, last_index, now) -> expected
        let cases = [
            (
                "nothing replicated",
                0,
                true,
                None,
                5,
                at(0),
                Promotion::Wait { since: None },
            ),
            (
                "far behind",
                100,
                true,
                None,
                1000,
                at(0),
                Promotion::Wait { since: None },
            ),
            (
                "just caught up",
                995,
                true,
                None,
                1000,
                at(0),
                Promotion::Wait { since: Some(at(0)) },
            ),
            (
                "caught up, not long enough",
                995,
                true,
                Some(at(0)),
                1000,
                at(999),
                Promotion::Wait { since: Some(at(0)) },
            ),
            (
                "caught up long enough",
                991,
                true,
                Some(at(0)),
                1000,
                at(1000),
                Promotion::Promote,
            ),
            (
                "fell behind again",
                980,
                true,
                Some(at(0)),
                1000,
                at(2000),
                Promotion::Wait { since: None },
            ),
            (
                "silent",
                1000,
                false,
                Some(at(0)),
                1000,
                at(2000),
                Promotion::Wait { since: None },
            ),
        ];
        for (name, matched, active, since, last, now, want) in cases {
            assert_eq!(
                decide_promotion(matched, active, since, last, now, policy),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn joint_only_for_several_changes() {
        assert!(promote(4).enter_joint().is_none());
        let joint = conf_change(vec![
            single(ConfChangeType::AddNode, 4),
            single(ConfChangeType::RemoveNode, 3),
        ]);
        assert_eq!(joint.enter_joint(), Some(true));
    }

    #[test]
    fn book_follows_conf_changes() {
        let book = MemberBook {
            index: 3,
            urls: urls(&[1, 2, 3]),
        };
        let add = conf_change(vec![single(ConfChangeType::AddLearnerNode, 4)]);
        let after = book_after(&book, 9, &add, b"4=http://10.0.0.4:7070");
        assert_eq!(after.index, 9);
        assert_eq!(after.urls, urls(&[1, 2, 3, 4]));
        let after = book_after(&after, 12, &promote(4), b"");
        assert_eq!(after.urls, urls(&[1, 2, 3, 4]));
        let remove = conf_change(vec![single(ConfChangeType::RemoveNode, 2)]);
        assert_eq!(book_after(&after, 13, &remove, b"").urls, urls(&[1, 3, 4]));
        let before = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(adds_new_member(&before, &add));
        assert!(!adds_new_member(&before, &remove));
    }

    #[test]
    fn wire_books_are_bounded_and_checked() {
        assert!(MemberBook::from_wire(1, vec![(1, "http://a:1".into())]).is_ok());
        assert!(MemberBook::from_wire(1, vec![(1, "a:1".into())]).is_err());
        let many = (1..=17).map(|id| (id, format!("http://a:{id}"))).collect();
        assert!(
            MemberBook::from_wire(1, many)
                .unwrap_err()
                .contains("at most 16")
        );
    }
}
