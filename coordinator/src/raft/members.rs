//! The replica loop's membership state: the configuration as applied, the
//! member book, the leader's record of when it last heard from each
//! member, learners' caught-up stretches, and the admin requests waiting
//! for their conf change to apply. The decisions it acts on are the pure
//! functions of [`super::membership`]; this is where they meet raft-rs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use super::RaftError;
use super::membership::{
    BookStore, Change, ClusterView, MemberBook, MemberInfo, MemberRole, MembersRequest,
    MembersView, MembershipError, PromotePolicy, Promotion, adds_new_member, book_after,
    decide_add, decide_handoff, decide_promotion, decide_remove, decide_replace, member_ids,
    promote, replace,
};
use super::storage::SledRaftStorage;
use super::transport::{PeerCheck, PeerSenders};

type Reply = oneshot::Sender<Result<MembersView, MembershipError>>;

/// An admin request waiting for its conf change (at a log index) to apply.
struct Waiting {
    term: u64,
    reply: Reply,
}

/// A request to remove this replica while it leads: leadership is being
/// handed to `to`; once another replica leads, the request is answered
/// with `NotLeader` naming it, and the client asks it to do the removal.
struct Handoff {
    to: u64,
    reply: Reply,
    /// Given up after this (raft-rs aborts a transfer after an election
    /// timeout).
    deadline: Instant,
}

/// A replacement under way: `new` was proposed as a learner; once it has
/// caught up, one joint change promotes it and removes `old`, and `reply`
/// is answered when that change applies.
struct Replacement {
    old: u64,
    new: u64,
    reply: Reply,
}

/// See the module docs.
pub(crate) struct Members {
    id: u64,
    store: BookStore,
    book: MemberBook,
    /// The configuration as applied (what the storage holds).
    conf: ConfState,
    /// Index of the last conf change applied to `conf` (or of the snapshot
    /// that carried it): entries at or before it are not applied again
    /// after a restart.
    conf_index: u64,
    /// When the leader last heard from each member.
    contact: BTreeMap<u64, Instant>,
    /// Start of each learner's current caught-up stretch.
    caught_up: BTreeMap<u64, Instant>,
    waiting: BTreeMap<u64, Waiting>,
    /// The removal of this replica, waiting for leadership to move.
    handoff: Option<Handoff>,
    /// A replacement waiting for its new replica to catch up.
    replacing: Option<Replacement>,
    policy: PromotePolicy,
    /// A member heard from within this counts as alive (an election timeout).
    alive_within: Duration,
    check: Arc<PeerCheck>,
    /// A conf change added a new id: the loop takes a snapshot at once, so
    /// the new replica catches up from one that names it.
    pub(crate) snapshot_due: bool,
    /// The book or the configuration changed since the last [`Members::sync`].
    dirty: bool,
}

impl Members {
    /// Loads the book (seeding it from `--peers` the first time) and the
    /// applied conf change index, and publishes both to `check`.
    pub(crate) fn open(
        id: u64,
        db: &sled::Db,
        storage: &SledRaftStorage,
        seed: &BTreeMap<u64, String>,
        check: Arc<PeerCheck>,
        alive_within: Duration,
    ) -> Result<Members, RaftError> {
        let store = BookStore::open(db)?;
        let book = match store.load()? {
            Some(book) => book,
            None => {
                let book = MemberBook {
                    index: 0,
                    urls: seed.clone(),
                };
                store.save(&book)?;
                book
            }
        };
        let conf_index = store.conf_index()?;
        let members = Members {
            id,
            store,
            book,
            conf: storage.conf_state().clone(),
            conf_index,
            contact: BTreeMap::new(),
            caught_up: BTreeMap::new(),
            waiting: BTreeMap::new(),
            handoff: None,
            replacing: None,
            policy: PromotePolicy::default(),
            alive_within,
            check,
            snapshot_due: false,
            dirty: true,
        };
        members.publish();
        Ok(members)
    }

    /// The URL of `id` in the book.
    pub(crate) fn url(&self, id: u64) -> Option<String> {
        self.book.urls.get(&id).cloned()
    }

    /// Voters and learners, sorted, for the checks of peers' messages.
    pub(crate) fn ids(&self) -> (Vec<u64>, Vec<u64>) {
        member_ids(&self.conf)
    }

    /// A message from `from` arrived.
    pub(crate) fn heard_from(&mut self, from: u64) {
        if self.contact.len() < 2 * super::membership::MAX_MEMBERS
            || self.contact.contains_key(&from)
        {
            self.contact.insert(from, Instant::now());
        }
    }

    fn alive(&self, id: u64, now: Instant) -> bool {
        id == self.id
            || self
                .contact
                .get(&id)
                .is_some_and(|at| now.saturating_duration_since(*at) <= self.alive_within)
    }

    fn not_leader(&self, raw: &RawNode<SledRaftStorage>) -> MembershipError {
        MembershipError::NotLeader {
            leader_url: self.url(raw.raft.leader_id),
        }
    }

    /// A conf change is proposed and not applied yet, or the configuration
    /// is joint. (raft-rs's `has_pending_conf` lags while the entry that
    /// applied is being handled: its applied index moves on `advance`.)
    fn changing(&self, raw: &RawNode<SledRaftStorage>) -> bool {
        let applied = raw.raft.raft_log.applied.max(self.conf_index);
        raw.raft.pending_conf_index > applied || !self.conf.voters_outgoing.is_empty()
    }

    /// The configuration with each member's progress (leader only).
    fn view(&self, raw: &RawNode<SledRaftStorage>) -> Result<MembersView, MembershipError> {
        if raw.raft.state != StateRole::Leader {
            return Err(self.not_leader(raw));
        }
        let now = Instant::now();
        let last_index = raw.raft.raft_log.last_index();
        let (voters, learners) = self.ids();
        let role = |id: &u64| {
            if voters.contains(id) {
                MemberRole::Voter
            } else {
                MemberRole::Learner
            }
        };
        let members = voters
            .iter()
            .chain(&learners)
            .map(|id| MemberInfo {
                id: *id,
                url: self.url(*id),
                role: role(id),
                leader: *id == self.id,
                matched: if *id == self.id {
                    last_index
                } else {
                    raw.raft.prs().get(*id).map_or(0, |p| p.matched)
                },
                last_contact: (*id != self.id)
                    .then(|| {
                        self.contact
                            .get(id)
                            .map(|at| now.saturating_duration_since(*at))
                    })
                    .flatten(),
            })
            .collect();
        Ok(MembersView {
            last_index,
            commit_index: raw.raft.raft_log.committed,
            changing: self.changing(raw),
            members,
        })
    }

    /// Answers a list at once; proposes an add or a remove (answered when
    /// it applies) or refuses it with the decision's reason.
    pub(crate) fn request(&mut self, raw: &mut RawNode<SledRaftStorage>, request: MembersRequest) {
        let (decided, reply) = match request {
            MembersRequest::List { reply } => {
                let _ = reply.send(self.view(raw));
                return;
            }
            MembersRequest::Add { id, url, reply } => {
                (self.decide(raw, |view| decide_add(view, id, &url)), reply)
            }
            MembersRequest::Remove { id, reply } if id == self.id => {
                self.hand_off(raw, reply);
                return;
            }
            MembersRequest::Remove { id, reply } => {
                (self.decide(raw, |view| decide_remove(view, id)), reply)
            }
            MembersRequest::Replace {
                old,
                new,
                url,
                reply,
            } => {
                self.start_replacement(raw, old, new, &url, reply);
                return;
            }
        };
        match decided {
            Ok(change) => {
                self.propose(raw, change, Some(reply));
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// The removal of this replica while it leads: hands leadership to the
    /// voter [`decide_handoff`] picks; [`Members::tick`] answers once
    /// another replica leads (or the handoff timed out).
    fn hand_off(&mut self, raw: &mut RawNode<SledRaftStorage>, reply: Reply) {
        if self.handoff.is_some() {
            let _ = reply.send(Err(MembershipError::Refused(
                "a leadership handoff is already under way; retry once it is done".into(),
            )));
            return;
        }
        let matched: BTreeMap<u64, u64> = raw
            .raft
            .prs()
            .iter()
            .map(|(id, p)| (*id, p.matched))
            .collect();
        match self.decide(raw, |view| decide_handoff(view, &matched)) {
            Ok(to) => {
                tracing::info!(
                    id = self.id,
                    to,
                    "removing the leader: handing leadership over first"
                );
                raw.transfer_leader(to);
                self.handoff = Some(Handoff {
                    to,
                    reply,
                    deadline: Instant::now() + 3 * self.alive_within,
                });
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// Proposes the learner of a replacement; [`Members::tick`] proposes
    /// the joint change once it has caught up.
    fn start_replacement(
        &mut self,
        raw: &mut RawNode<SledRaftStorage>,
        old: u64,
        new: u64,
        url: &str,
        reply: Reply,
    ) {
        if self.replacing.is_some() {
            let _ = reply.send(Err(MembershipError::Refused(
                "a replacement is already under way; retry once it has applied".into(),
            )));
            return;
        }
        match self.decide(raw, |view| decide_replace(view, old, new, url)) {
            Ok(change) => {
                if self.propose(raw, change, None) {
                    tracing::info!(
                        id = self.id,
                        old,
                        new,
                        "replacing a voter: adding the new replica as a learner"
                    );
                    self.replacing = Some(Replacement { old, new, reply });
                } else {
                    let _ = reply.send(Err(MembershipError::Unavailable(
                        "the learner was not proposed; retry".into(),
                    )));
                }
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// The replacement's next step once `learner` has caught up: the joint
    /// change, answered when it applies. False when `learner` is not the
    /// replacement's (it is promoted alone).
    fn finish_replacement(&mut self, raw: &mut RawNode<SledRaftStorage>, learner: u64) -> bool {
        let Some(replacement) = self.replacing.take_if(|r| r.new == learner) else {
            return false;
        };
        let (voters, _) = self.ids();
        if !voters.contains(&replacement.old) {
            let _ = replacement.reply.send(Err(MembershipError::Refused(format!(
                "replica {} left while {learner} caught up; {learner} is promoted alone",
                replacement.old
            ))));
            return false;
        }
        tracing::info!(
            id = self.id,
            old = replacement.old,
            new = learner,
            "learner caught up: one joint change promotes it and removes the old voter"
        );
        let change = Change {
            conf_change: replace(replacement.old, learner),
            context: String::new(),
        };
        self.propose(raw, change, Some(replacement.reply));
        true
    }

    /// Answers a handoff once another replica leads, or when it took too
    /// long (the removal is then not done).
    fn tick_handoff(&mut self, raw: &RawNode<SledRaftStorage>) {
        let Some(handoff) = self.handoff.take() else {
            return;
        };
        let leader = raw.raft.leader_id;
        if raw.raft.state != StateRole::Leader && leader != 0 && leader != self.id {
            tracing::info!(
                id = self.id,
                leader,
                "leadership handed over; the new leader removes this replica"
            );
            let _ = handoff.reply.send(Err(self.not_leader(raw)));
        } else if Instant::now() >= handoff.deadline {
            let _ = handoff.reply.send(Err(MembershipError::Unavailable(format!(
                "leadership did not move to replica {} in time; nothing was removed, retry",
                handoff.to
            ))));
        } else {
            self.handoff = Some(handoff);
        }
    }

    fn decide<T>(
        &self,
        raw: &RawNode<SledRaftStorage>,
        decide: impl FnOnce(&ClusterView<'_>) -> Result<T, MembershipError>,
    ) -> Result<T, MembershipError> {
        if raw.raft.state != StateRole::Leader {
            return Err(self.not_leader(raw));
        }
        let now = Instant::now();
        let (voters, learners) = self.ids();
        let alive: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|id| self.alive(*id, now))
            .collect();
        decide(&ClusterView {
            leader: self.id,
            voters: &voters,
            learners: &learners,
            changing: self.changing(raw),
            urls: &self.book.urls,
            alive: &alive,
        })
    }

    /// True when the change is in the log (answered on `reply` once it
    /// applies); otherwise `reply` has the error.
    fn propose(
        &mut self,
        raw: &mut RawNode<SledRaftStorage>,
        change: Change,
        reply: Option<Reply>,
    ) -> bool {
        let before = raw.raft.raft_log.last_index();
        let proposed = raw.propose_conf_change(change.context.into_bytes(), change.conf_change);
        let index = raw.raft.raft_log.last_index();
        let result = match proposed {
            Ok(()) if index > before => Ok(index),
            Ok(()) => Err("raft dropped the change".to_string()),
            Err(error) => Err(error.to_string()),
        };
        match (result, reply) {
            (Ok(index), Some(reply)) => {
                let term = raw.raft.term;
                self.waiting.insert(index, Waiting { term, reply });
                true
            }
            (Ok(_), None) => true,
            (Err(error), reply) => {
                tracing::warn!(id = self.id, %error, "membership change not proposed");
                if let Some(reply) = reply {
                    let _ = reply.send(Err(MembershipError::Unavailable(format!(
                        "membership change not proposed: {error}; retry"
                    ))));
                }
                false
            }
        }
    }

    /// The leader's round: promotes a learner that has caught up, and
    /// fails the waiting requests of a replica that lost leadership or
    /// whose change was replaced.
    pub(crate) fn tick(&mut self, raw: &mut RawNode<SledRaftStorage>, applied: u64) {
        self.tick_handoff(raw);
        let replaced: Vec<u64> = self.waiting.range(..=applied).map(|(i, _)| *i).collect();
        for index in replaced {
            if let Some(waiting) = self.waiting.remove(&index) {
                let _ = waiting.reply.send(Err(MembershipError::Unavailable(
                    "the change was replaced by another leader's entry; retry".into(),
                )));
            }
        }
        if raw.raft.state != StateRole::Leader {
            self.caught_up.clear();
            let error = self.not_leader(raw);
            for (_, waiting) in std::mem::take(&mut self.waiting) {
                let _ = waiting.reply.send(Err(MembershipError::Unavailable(format!(
                    "leadership was lost before the change applied ({error}); check `gantry raft members`"
                ))));
            }
            if let Some(replacement) = self.replacing.take() {
                let _ = replacement.reply.send(Err(MembershipError::Unavailable(format!(
                    "leadership was lost during the replacement ({error}); replica {} may be a learner: check `gantry raft members`",
                    replacement.new
                ))));
            }
            return;
        }
        if self.changing(raw) {
            return;
        }
        let (_, learners) = self.ids();
        if let Some(replacement) = self.replacing.take_if(|r| !learners.contains(&r.new)) {
            let _ = replacement.reply.send(Err(MembershipError::Refused(format!(
                "replica {} is no longer a learner; nothing was replaced",
                replacement.new
            ))));
        }
        let now = Instant::now();
        let last_index = raw.raft.raft_log.last_index();
        let (_, learners) = self.ids();
        self.caught_up.retain(|id, _| learners.contains(id));
        for id in learners {
            let matched = raw.raft.prs().get(id).map_or(0, |p| p.matched);
            let since = self.caught_up.get(&id).copied();
            let active = self.alive(id, now) && id != self.id;
            match decide_promotion(matched, active, since, last_index, now, self.policy) {
                Promotion::Promote => {
                    self.caught_up.remove(&id);
                    if self.finish_replacement(raw, id) {
                        return;
                    }
                    tracing::info!(
                        id = self.id,
                        learner = id,
                        matched,
                        last_index,
                        "learner caught up: promoting it to voter"
                    );
                    self.caught_up.remove(&id);
                    self.propose(
                        raw,
                        Change {
                            conf_change: promote(id),
                            context: String::new(),
                        },
                        None,
                    );
                    return;
                }
                Promotion::Wait { since: Some(start) } => {
                    self.caught_up.insert(id, start);
                }
                Promotion::Wait { since: None } => {
                    self.caught_up.remove(&id);
                }
            }
        }
    }

    /// Applies a committed conf change entry: raft-rs's configuration, the
    /// stored `ConfState`, the book; answers the request that proposed it.
    pub(crate) fn apply(
        &mut self,
        raw: &mut RawNode<SledRaftStorage>,
        entry: &Entry,
    ) -> Result<(), RaftError> {
        if entry.index <= self.conf_index {
            // Applied before a restart: the stored configuration has it.
            return Ok(());
        }
        let change =
            ConfChangeV2::parse_from_bytes(&entry.data).map_err(|source| RaftError::Decode {
                what: "conf change entry",
                source,
            })?;
        let outcome = match raw.apply_conf_change(&change) {
            Ok(conf) => {
                let new_member = adds_new_member(&self.conf, &change);
                self.book = book_after(&self.book, entry.index, &change, &entry.context);
                self.store.save(&self.book)?;
                raw.mut_store().set_conf_state(conf.clone())?;
                tracing::info!(
                    id = self.id,
                    index = entry.index,
                    voters = ?conf.voters,
                    learners = ?conf.learners,
                    outgoing = ?conf.voters_outgoing,
                    "membership changed"
                );
                self.conf = conf;
                self.snapshot_due |= new_member;
                self.dirty = true;
                Ok(())
            }
            // Every replica refuses the same change the same way.
            Err(error) => {
                tracing::warn!(id = self.id, index = entry.index, %error, "conf change refused by raft");
                Err(MembershipError::Refused(format!(
                    "raft refused the change: {error}"
                )))
            }
        };
        self.conf_index = entry.index;
        self.store.set_conf_index(entry.index)?;
        if let Some(waiting) = self.waiting.remove(&entry.index) {
            let answer = if waiting.term != entry.term {
                Err(MembershipError::Unavailable(
                    "the change was replaced by another leader's entry; retry".into(),
                ))
            } else {
                outcome.and_then(|()| self.view(raw))
            };
            let _ = waiting.reply.send(answer);
        }
        Ok(())
    }

    /// A snapshot at `index` was installed: its configuration is ours.
    pub(crate) fn installed(&mut self, index: u64, conf: &ConfState) -> Result<(), RaftError> {
        self.conf = conf.clone();
        self.conf_index = index;
        self.store.set_conf_index(index)?;
        self.dirty = true;
        Ok(())
    }

    /// A peer's book (and, while this replica waits to join, the cluster
    /// id to adopt). Returns the cluster id adopted, if any.
    pub(crate) fn adopt(
        &mut self,
        storage: &mut SledRaftStorage,
        cluster_id: u64,
        book: MemberBook,
    ) -> Result<Option<u64>, RaftError> {
        let mut adopted = None;
        if storage.cluster_id().is_none() && cluster_id != 0 {
            storage.set_cluster_id(cluster_id)?;
            self.check.cluster_id.store(cluster_id, Ordering::Relaxed);
            tracing::info!(
                id = self.id,
                cluster_id = format_args!("{cluster_id:#018x}"),
                "joined a cluster"
            );
            adopted = Some(cluster_id);
        }
        if book.index > self.book.index {
            tracing::info!(id = self.id, index = book.index, urls = ?book.urls, "member book learned from a peer");
            self.book = book;
            self.store.save(&self.book)?;
            self.dirty = true;
        }
        Ok(adopted)
    }

    /// Brings the sender tasks and the transport's checks up to date after
    /// a change; returns true when something changed.
    pub(crate) fn sync(&mut self, peers: &mut PeerSenders) -> bool {
        if !std::mem::take(&mut self.dirty) {
            return false;
        }
        peers.sync(&self.book);
        let (voters, learners) = self.ids();
        self.contact
            .retain(|id, _| voters.contains(id) || learners.contains(id));
        self.publish();
        true
    }

    fn publish(&self) {
        if let Ok(mut members) = self.check.members.write() {
            *members = self.ids();
        }
        if let Ok(mut book) = self.check.book.write() {
            *book = self.book.clone();
        }
    }
}
