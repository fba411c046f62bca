//! The replica loop itself ([`Driver`]): started by [`super::node::RaftNode`]
//! on a thread of its own, it owns the `RawNode` and the application. Each
//! round: take the inputs, tick, run the application's clock, propose the
//! round's batch, handle the `Ready`s (persist, send, apply, answer each
//! proposer), then let the store write what it held back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::batch::{self, Batch};
use super::fault::FaultHook;
use super::flusher::Flusher;
use super::guard::{self, LogView, Refusal, RefusalLog};
use super::members::Members;
use super::node::{Input, PeerInput, ProposeReply, publish_to};
use super::snapfile::Descriptor;
use super::storage::SledRaftStorage;
use super::transport::{Outgoing, PeerSenders};
use super::{ProposeError, RaftError, RaftStatus, ReplicatedStateMachine};

/// Inputs handled per round before the loop ticks and builds a `Ready`,
/// so that a flood of proposals cannot starve the clock.
const MAX_INPUTS_PER_ROUND: usize = 8192;
/// Readies handled per round (usually one, two when a persist lets the
/// commit index move).
const MAX_READIES_PER_ROUND: usize = 4;

/// An entry this replica proposed, waiting to be applied: the term it was
/// appended in and its commands' replies, in order.
pub(super) struct Pending<O> {
    pub(super) term: u64,
    pub(super) replies: Vec<Option<ProposeReply<O>>>,
}

impl<O> Pending<O> {
    fn fail(self, error: &ProposeError) {
        for reply in self.replies.into_iter().flatten() {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// Answers each proposer with its own command's outcome; `Err` gives
    /// the replies back when the outcomes do not match them one to one.
    fn answer(self, outcomes: Vec<O>) -> Result<(), Self> {
        if outcomes.len() != self.replies.len() {
            return Err(self);
        }
        for (reply, outcome) in self.replies.into_iter().zip(outcomes) {
            if let Some(reply) = reply {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(())
    }
}

pub(super) struct Driver<A: ReplicatedStateMachine> {
    pub(super) id: u64,
    pub(super) raw: RawNode<SledRaftStorage>,
    pub(super) app: A,
    pub(super) receiver: std_mpsc::Receiver<Input<A>>,
    /// Our own inbox, for reports found while handling a `Ready`.
    pub(super) inbox: std_mpsc::Sender<Input<A>>,
    pub(super) peers: PeerSenders,
    /// The configuration as applied, the member book, learners' progress.
    pub(super) members: Members,
    /// Proposed entries by log index.
    pub(super) pending: BTreeMap<u64, Pending<A::Outcome>>,
    /// This round's proposals, proposed together at its end.
    pub(super) batch: Batch<ProposeReply<A::Outcome>>,
    pub(super) status: Arc<watch::Sender<RaftStatus>>,
    pub(super) cluster_id: u64,
    pub(super) shutdown: CancellationToken,
    /// Sorted voters and learners (from `members`), for the checks of
    /// peers' messages.
    pub(super) voters: Vec<u64>,
    pub(super) learners: Vec<u64>,
    pub(super) refusals: Arc<RefusalLog>,
    pub(super) fault: FaultHook,
    /// Why the loop stopped on its own, once it has.
    pub(super) fatal: Option<String>,
    pub(super) tick: Duration,
    pub(super) compact_after: u64,
    pub(super) compact_keep: u64,
    /// Index and term of the last entry given to the application.
    pub(super) applied: u64,
    pub(super) applied_term: u64,
    /// The applied index at which the application first wanted a
    /// snapshot not yet taken ([`Driver::wanted_due`]).
    pub(super) wanted_since: Option<u64>,
    /// The leader's flushes ([`super::flusher`]).
    pub(super) flusher: Flusher,
    /// The latest `Ready` handed to the flusher and not yet reported.
    pub(super) flushing: Option<u64>,
    /// Messages of such `Ready`s that may leave only once it is durable.
    pub(super) unpersisted: VecDeque<(u64, Vec<Message>)>,
    /// A failed flush of the flusher's, which stops the loop.
    pub(super) persist_failure: Option<RaftError>,
    /// The snapshot whose file is being written ([`super::taking`]).
    pub(super) taking: Option<super::taking::Taking>,
    /// Peers' snapshots installed so far (a snapshot of our own in flight
    /// across one is dropped).
    pub(super) restores: u64,
    /// A snapshot of our own that could not be written or recorded, which
    /// stops the loop.
    pub(super) snapshot_failure: Option<RaftError>,
}

impl<A: ReplicatedStateMachine> Driver<A> {
    pub(super) fn run(&mut self) {
        let mut next_tick = Instant::now() + self.tick;
        let mut failure = None;
        while !self.shutdown.is_cancelled() {
            // Proposals the application made while applying, and a Ready
            // left over, do not wait for the next input.
            let wait = if self.batch.is_empty() && !self.raw.has_ready() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.receiver.recv_timeout(wait) {
                Ok(input) => self.handle(input),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            for _ in 0..MAX_INPUTS_PER_ROUND {
                match self.receiver.try_recv() {
                    Ok(input) => self.handle(input),
                    Err(_) => break,
                }
            }
            if let Some(error) = self.persist_failure.take() {
                failure = Some(error);
                break;
            }
            if let Some(error) = self.snapshot_failure.take() {
                failure = Some(error);
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.fault.check();
                self.raw.tick();
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
            }
            self.propose_batch();
            if let Err(error) = self.on_ready() {
                failure = Some(error);
                break;
            }
            if let Err(reason) = self.app.write_behind() {
                failure = Some(RaftError::App {
                    what: "write the applied state".into(),
                    reason,
                });
                break;
            }
            if self.raw.raft.state != StateRole::Leader && !self.pending.is_empty() {
                self.fail_pending(u64::MAX);
            }
            // The application's own clock (leadership, housekeeping,
            // scheduling passes): once a round, after what the round
            // applied, so a pass sees a submit at once. What it proposes
            // goes with the next round, which then does not wait.
            let applied = self.applied;
            self.members.tick(&mut self.raw, applied);
            let status = self.current_status(true);
            self.app.tick(&status);
            self.take_app_proposals();
            self.publish_status(status);
        }
        if let Some(error) = &failure {
            tracing::error!(id = self.id, %error, "raft node stopped on a fatal error");
            self.fatal = Some(error.to_string());
        }
        for (_, pending) in std::mem::take(&mut self.pending) {
            pending.fail(&ProposeError::Stopped);
        }
        for reply in std::mem::take(&mut self.batch).into_replies() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        self.abandon_snapshot();
        self.app.stop();
        if let Err(error) = self.raw.mut_store().flush() {
            tracing::error!(id = self.id, %error, "raft storage flush on shutdown failed");
        }
        self.publish(false);
        self.shutdown.cancel();
        tracing::info!(id = self.id, "raft node stopped");
    }

    fn handle(&mut self, input: Input<A>) {
        match input {
            Input::Propose { data, reply } => {
                if self.raw.raft.state == StateRole::Leader {
                    self.batch.push(data, Some(reply));
                } else {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
            Input::Request(request) => {
                self.app.handle(request);
                self.take_app_proposals();
            }
            Input::Peer(PeerInput::Step {
                message,
                from,
                peer,
            }) => {
                if let Err(refusal) = self.check_message(&message, from) {
                    self.refusals.refused(peer, from, &refusal);
                    return;
                }
                self.members.heard_from(from);
                if let Err(error) = self.raw.step(*message) {
                    tracing::debug!(id = self.id, %error, "raft message ignored");
                }
            }
            Input::Peer(PeerInput::Unreachable(peer)) => self.raw.report_unreachable(peer),
            Input::Peer(PeerInput::SnapshotStatus { to, finished }) => {
                let status = if finished {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::Peer(PeerInput::Members { cluster_id, book }) => {
                match self.members.adopt(self.raw.mut_store(), cluster_id, book) {
                    Ok(Some(adopted)) => self.cluster_id = adopted,
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(id = self.id, %error, "cannot store the member book")
                    }
                }
                self.sync_members();
            }
            Input::Members(request) => self.members.request(&mut self.raw, request),
            Input::Persisted { number, flushed } => match flushed {
                Ok(()) => self.persisted(number),
                Err(error) => self.persist_failure = Some(error),
            },
            Input::SnapshotWritten(written) => {
                if let Err(error) = self.snapshot_written(written) {
                    self.snapshot_failure = Some(error);
                }
            }
        }
    }

    /// After a membership change: sender tasks, checks of peers' messages.
    fn sync_members(&mut self) {
        if self.members.sync(&mut self.peers) {
            (self.voters, self.learners) = self.members.ids();
        }
    }

    /// Moves the application's own proposals (no proposer waits for them)
    /// into this round's batch.
    fn take_app_proposals(&mut self) {
        for command in self.app.take_proposals() {
            match A::encode(&command) {
                Ok(data) => self.batch.push(data, None),
                Err(error) => tracing::error!(id = self.id, %error, "command dropped"),
            }
        }
    }

    /// Checks a peer's message against this replica's log and configuration
    /// ([`guard::check_message`]) and a snapshot's data against the
    /// application, before raft-rs sees either.
    fn check_message(&mut self, message: &Message, from: u64) -> Result<(), Refusal> {
        let view = LogView {
            id: self.id,
            term: self.raw.raft.term,
            leader: self.raw.raft.leader_id,
            last_index: self.raw.raft.raft_log.last_index(),
            voters: &self.voters,
            learners: &self.learners,
        };
        guard::check_message(message, from, &view)?;
        if let Some(snapshot) = message.snapshot.as_ref() {
            // The transport put the file in place (size and SHA-256
            // checked) before it handed the message over.
            let refuse = |reason: String| Refusal::Value(MessageType::MsgSnapshot, reason);
            let metadata = snapshot.get_metadata();
            let descriptor = Descriptor::decode(&snapshot.data).map_err(refuse)?;
            let file = self
                .raw
                .store()
                .snapshot_dir()
                .existing(metadata.index, metadata.term, &descriptor)
                .map_err(|error| refuse(error.to_string()))?;
            self.app.check_snapshot(&file).map_err(|reason| {
                refuse(format!("the application cannot restore its data: {reason}"))
            })?;
        }
        Ok(())
    }

    /// Proposes this round's batch: its commands share entries
    /// ([`Batch::into_entries`]), each remembered with its replies. Off
    /// the leader (it may have lost the role during the round) every
    /// proposer is told who leads; the application's own are dropped.
    fn propose_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if self.raw.raft.state != StateRole::Leader {
            let error = self.not_leader();
            for reply in batch.into_replies() {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        for (data, replies) in batch.into_entries() {
            let pending = Pending {
                term: self.raw.raft.term,
                replies,
            };
            match self.raw.propose(Vec::new(), data) {
                Ok(()) => {
                    let index = self.raw.raft.raft_log.last_index();
                    self.pending.insert(index, pending);
                }
                Err(raft::Error::ProposalDropped) => pending.fail(&ProposeError::Dropped),
                Err(error) => {
                    tracing::warn!(id = self.id, %error, "raft refused a proposal");
                    pending.fail(&ProposeError::Dropped);
                }
            }
        }
    }

    fn not_leader(&self) -> ProposeError {
        let leader_id = self.leader_id();
        ProposeError::NotLeader {
            leader_id,
            leader_url: leader_id.and_then(|id| self.members.url(id)),
        }
    }

    fn leader_id(&self) -> Option<u64> {
        let leader = self.raw.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    /// Fails the pending proposals with an index up to `through`: their
    /// entries were replaced, or this replica no longer leads.
    fn fail_pending(&mut self, through: u64) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > through {
                break;
            }
            let pending = entry.remove();
            pending.fail(&self.not_leader());
        }
    }

    /// Handles the `Ready`s raft-rs has, in its documented order. A
    /// leader's flush goes to the flusher ([`super::flusher`]) and raft-rs
    /// learns of it later ([`Driver::persisted`]); anyone else flushes
    /// here, which also covers a leader's earlier writes still in flight.
    fn on_ready(&mut self) -> Result<(), RaftError> {
        for _ in 0..MAX_READIES_PER_ROUND {
            if !self.raw.has_ready() {
                break;
            }
            let mut ready = self.raw.ready();
            // A leader's appends may go out before its own persist.
            self.send(ready.take_messages());

            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            let leader = self.raw.raft.state == StateRole::Leader;
            let store = self.raw.mut_store();
            if let Some(snapshot) = &snapshot {
                store.apply_snapshot(snapshot)?;
                self.restores += 1;
            }
            store.append(ready.entries())?;
            if let Some(hard_state) = ready.hs() {
                store.set_hard_state(hard_state)?;
            }
            if snapshot.is_none() && leader {
                self.on_leader_ready(ready)?;
                continue;
            }
            if ready.must_sync() || snapshot.is_some() || self.flushing.is_some() {
                store.flush()?;
            }
            // `advance` below counts every `Ready` so far as durable: so
            // is everything written before that flush.
            self.release(ready.number());
            if let Some(snapshot) = snapshot {
                self.restore(&snapshot)?;
                self.raw.store().remove_stale_snapshots();
            }
            // Votes and append responses only after the flush.
            self.send(ready.take_persisted_messages());
            self.apply(ready.take_committed_entries())?;
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit)?;
            }
            self.send(light.take_messages());
            self.apply(light.take_committed_entries())?;
            self.raw.advance_apply();
        }
        self.maybe_compact()
    }

    /// A leader's `Ready`, its entries and hard state written: the flush
    /// goes to the flusher when the `Ready` needs one, and the loop goes
    /// on. Its committed entries are durable here already (raft-rs hands
    /// out only entries persisted locally), and its commit index reaches
    /// storage with a later `Ready`'s hard state.
    fn on_leader_ready(&mut self, mut ready: raft::Ready) -> Result<(), RaftError> {
        let number = ready.number();
        if ready.must_sync() {
            let file = self.raw.mut_store().sync_target()?;
            if !self.flusher.request(number, file) {
                return Err(RaftError::Inconsistent(
                    "the raft flush thread has stopped".into(),
                ));
            }
            self.flushing = Some(number);
        }
        let persisted = ready.take_persisted_messages();
        if !persisted.is_empty() {
            if self.flushing.is_some() {
                self.unpersisted.push_back((number, persisted));
            } else {
                self.send(persisted);
            }
        }
        self.apply(ready.take_committed_entries())?;
        self.raw.advance_append_async(ready);
        self.raw.advance_apply();
        Ok(())
    }

    /// The flusher's report: every `Ready` up to `number` is durable.
    /// raft-rs is told (a leader's own copy then counts towards the
    /// commit) and the messages that waited for it leave.
    fn persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        self.release(number);
    }

    /// Sends the messages that waited for the `Ready`s up to `number` to
    /// be durable (they are).
    fn release(&mut self, number: u64) {
        if self.flushing.is_some_and(|flushing| flushing <= number) {
            self.flushing = None;
        }
        while self
            .unpersisted
            .front()
            .is_some_and(|(waiting, _)| *waiting <= number)
        {
            if let Some((_, messages)) = self.unpersisted.pop_front() {
                self.send(messages);
            }
        }
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let metadata = snapshot.get_metadata();
        let started = Instant::now();
        let restore = |reason| RaftError::Restore {
            index: metadata.index,
            reason,
        };
        let file = self
            .raw
            .store()
            .snapshot_file()
            .ok_or_else(|| restore("no snapshot file stored".into()))?
            .to_path_buf();
        self.app.restore(metadata.index, &file).map_err(restore)?;
        tracing::info!(
            id = self.id,
            index = metadata.index,
            term = metadata.term,
            bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "installed raft snapshot from the leader"
        );
        self.applied = metadata.index;
        self.applied_term = metadata.term;
        self.members
            .installed(metadata.index, metadata.get_conf_state())?;
        self.sync_members();
        self.fail_pending(metadata.index);
        Ok(())
    }

    /// Applies committed entries to the application, here on the loop,
    /// and answers their proposers. The application's proposals made while
    /// applying (effects of a command) go into the next round's batch.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let outcomes = match entry.get_entry_type() {
                // Empty entries are appended by each new leader.
                EntryType::EntryNormal if entry.data.is_empty() => Vec::new(),
                EntryType::EntryNormal => self.apply_commands(&entry)?,
                EntryType::EntryConfChangeV2 => {
                    self.members.apply(&mut self.raw, &entry)?;
                    self.sync_members();
                    Vec::new()
                }
                // Gantry proposes only V2 changes (the guard refuses v1).
                EntryType::EntryConfChange => {
                    tracing::warn!(
                        id = self.id,
                        index = entry.index,
                        "ignored a v1 conf change"
                    );
                    Vec::new()
                }
            };
            self.take_app_proposals();
            self.applied = entry.index;
            self.applied_term = entry.term;
            self.fail_pending(entry.index - 1);
            if let Some(pending) = self.pending.remove(&entry.index) {
                // Another term's entry at this index replaced ours.
                let answered = if pending.term == entry.term {
                    pending.answer(outcomes)
                } else {
                    Err(pending)
                };
                if let Err(pending) = answered {
                    pending.fail(&self.not_leader());
                }
            }
        }
        Ok(())
    }

    /// The commands of one entry, applied in order: one outcome each.
    fn apply_commands(&mut self, entry: &Entry) -> Result<Vec<A::Outcome>, RaftError> {
        let what = || format!("apply index {}", entry.index);
        let commands = batch::decode(&entry.data).map_err(|reason| RaftError::App {
            what: what(),
            reason,
        })?;
        let outcomes = self
            .app
            .apply(entry.index, &commands)
            .map_err(|reason| RaftError::App {
                what: what(),
                reason,
            })?;
        if outcomes.len() != commands.len() {
            return Err(RaftError::App {
                what: what(),
                reason: format!(
                    "{} outcomes for {} commands",
                    outcomes.len(),
                    commands.len()
                ),
            });
        }
        Ok(outcomes)
    }

    /// How many entries later than another this replica takes a
    /// snapshot: an eighth of `compact_after` per step of its id modulo 4.
    /// Replicas apply the same entries, so they would otherwise take their
    /// snapshots in the same instant (every `compact_after` entries, or
    /// when the application's stored changes outgrow it, which happens at
    /// the same entry everywhere): a snapshot stalls its loop for tens of
    /// ms, and two followers stalled together stall every commit.
    fn snapshot_stagger(&self) -> u64 {
        self.compact_after / 8 * (self.id % 4)
    }

    /// Whether the application's wish for a snapshot is due here: the
    /// stagger's entries after it was first seen.
    fn wanted_due(&mut self, snapshot_index: u64) -> bool {
        if !(self.app.snapshot_wanted() && self.applied > snapshot_index) {
            self.wanted_since = None;
            return false;
        }
        let since = *self.wanted_since.get_or_insert(self.applied);
        self.applied >= since + self.snapshot_stagger()
    }

    /// Removes the next batch of the last compaction's entries, then
    /// starts a snapshot (and the compaction behind it,
    /// [`super::taking`]) once enough entries were applied since the last
    /// one, unless one is in flight.
    fn maybe_compact(&mut self) -> Result<(), RaftError> {
        self.raw.mut_store().compact_step()?;
        if self.taking.is_some() {
            return Ok(());
        }
        let (snapshot_index, _) = self.raw.store().snapshot_index_term();
        // A new member catches up from a snapshot that names it.
        let member_due =
            std::mem::take(&mut self.members.snapshot_due) && self.applied > snapshot_index;
        let due = member_due || self.wanted_due(snapshot_index);
        if !due && self.applied < snapshot_index + self.compact_after + self.snapshot_stagger() {
            return Ok(());
        }
        self.wanted_since = None;
        self.take_snapshot()
    }

    fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let sent = match message.write_to_bytes() {
                Ok(bytes) => {
                    let sent = self.peers.send(to, Outgoing { bytes, snapshot });
                    if !sent {
                        tracing::debug!(id = self.id, to, "raft message dropped: peer queue full");
                    }
                    sent
                }
                Err(error) => {
                    tracing::error!(id = self.id, to, %error, "cannot encode a raft message");
                    false
                }
            };
            // A leader keeps a follower paused until it hears how its
            // snapshot went: a snapshot that never left must be reported.
            if !sent && snapshot {
                let _ = self.inbox.send(Input::Peer(PeerInput::SnapshotStatus {
                    to,
                    finished: false,
                }));
            }
        }
    }

    fn current_status(&self, running: bool) -> RaftStatus {
        let raft = &self.raw.raft;
        let leader_id = self.leader_id();
        RaftStatus {
            id: self.id,
            leader_id,
            leader_url: leader_id.and_then(|id| self.members.url(id)),
            term: raft.term,
            // A stopped replica leads nothing, whatever raft-rs last knew.
            is_leader: running && raft.state == StateRole::Leader && self.applied_term == raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            running,
            fatal: self.fatal.clone(),
            cluster_id: self.cluster_id,
        }
    }

    fn publish(&self, running: bool) {
        self.publish_status(self.current_status(running));
    }

    /// Stores the status; wakes the receivers only when something other
    /// than the commit and applied index changed ([`publish_to`]). Those
    /// two move nearly every round, and each wake is a tokio task
    /// scheduled on the replica's runtime for nothing (the watchers act on
    /// leadership and on the loop stopping); readers of
    /// [`RaftHandle::status`] still see them current.
    fn publish_status(&self, status: RaftStatus) {
        publish_to(&self.status, status);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::sync::oneshot;

    /// The proposers of one entry each get their own command's outcome
    /// (the application's own commands have no proposer); outcomes that
    /// do not match the replies one to one answer nobody.
    #[test]
    fn each_proposer_of_an_entry_gets_its_own_outcome() {
        let (first, first_answer) = oneshot::channel();
        let (third, third_answer) = oneshot::channel();
        let pending = Pending {
            term: 2,
            replies: vec![Some(first), None, Some(third)],
        };
        assert!(pending.answer(vec!["one", "two", "three"]).is_ok());
        assert_eq!(first_answer.blocking_recv().unwrap(), Ok("one"));
        assert_eq!(third_answer.blocking_recv().unwrap(), Ok("three"));

        let (reply, answer) = oneshot::channel::<Result<&str, ProposeError>>();
        let pending = Pending {
            term: 2,
            replies: vec![Some(reply)],
        };
        let Err(pending) = pending.answer(vec!["one", "two"]) else {
            panic!("two outcomes answered one proposer");
        };
        pending.fail(&ProposeError::Dropped);
        assert_eq!(answer.blocking_recv().unwrap(), Err(ProposeError::Dropped));
    }
}
