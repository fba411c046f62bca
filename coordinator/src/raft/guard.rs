//! What a peer's Raft message must satisfy before it reaches raft-rs.
//!
//! raft-rs 0.7 trusts its peers: several values in a message make it panic
//! (`fatal!`) or break an invariant it never checks, and a panic kills the
//! driver thread. Each check here names the raft-rs path it closes:
//!
//! - a heartbeat whose `commit` is past this replica's last index:
//!   `RaftLog::commit_to` panics ("to_commit N is out of range");
//! - an append whose entries are not numbered `index + 1, index + 2, ...`:
//!   `maybe_append` slices out of range or appends with a gap
//!   (`truncate_and_append`), or overflows `index + len`;
//! - an append anchored past this log's end with `log_term` 0: `term()` is
//!   0 out of range, so it "matches" and the commit moves past the last
//!   index (the same panic);
//! - a snapshot with term 0 (the same "match" trick: `restore` fast-forwards
//!   the commit past the log) or with a configuration `confchange::restore`
//!   cannot restore (no voters, an id both voter and learner: "invalid
//!   restore" is fatal);
//! - an append response acknowledging an index past the leader's log (the
//!   leader then sends its followers appends anchored past their logs) or
//!   asking for a snapshot (`request_snapshot`; Gantry never asks, and an
//!   unanswerable request is fatal on the leader);
//! - a term so large that the next election overflows it;
//! - message types Gantry never sends between replicas: a `MsgPropose`
//!   would append a forged command on the leader, `MsgTimeoutNow` would
//!   start an election at once (taken only from the leader this replica
//!   follows, in its term: the leader hands over leadership with it before
//!   it is removed), and local types (`MsgHup`, `MsgBeat`, ...)
//!   are refused by raft-rs itself but are refused here first.
//!
//! Checks are pure functions of the message and a [`LogView`] taken just
//! before the step, tested as data below. Refusals are logged through
//! [`RefusalLog`], at most [`LOG_BURST`] lines per [`LOG_WINDOW`], so a
//! flood of forged messages does not flood the log.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raft::eraftpb::{EntryType, Message, MessageType};

/// Largest step up from the current term a message may claim: far beyond
/// any real history of elections, far below overflow.
pub const MAX_TERM_STEP: u64 = 1 << 32;

/// What the driver knows of its own log and configuration when it checks a
/// message.
#[derive(Debug, Clone, Copy)]
pub struct LogView<'a> {
    /// This replica's id.
    pub id: u64,
    /// Its current term.
    pub term: u64,
    /// The leader it knows in that term (0: none).
    pub leader: u64,
    /// Index of its last log entry (unstable entries included).
    pub last_index: u64,
    /// Voters of the configuration (outgoing ones too while joint), sorted;
    /// empty (with `learners`) while this replica waits to join.
    pub voters: &'a [u64],
    /// Learners of the configuration, sorted.
    pub learners: &'a [u64],
}

impl LogView<'_> {
    /// Whether `id` is a voter or learner. A replica waiting to join knows
    /// no members yet: whoever added it may contact it.
    pub fn is_member(&self, id: u64) -> bool {
        (self.voters.is_empty() && self.learners.is_empty())
            || self.voters.contains(&id)
            || self.learners.contains(&id)
    }
}

/// Why a peer's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The batch names another cluster.
    #[error("cluster id {got:#018x} is not this cluster's ({want:#018x})")]
    Cluster {
        /// The message's cluster id (0: none; a replica of an older version).
        got: u64,
        /// This replica's cluster id.
        want: u64,
    },
    /// The sender is not a voter or learner.
    #[error("sender {0} is not a member of this cluster")]
    NotMember(u64),
    /// The message is for another replica.
    #[error("addressed to replica {to}, this is replica {id}")]
    Recipient {
        /// The recipient named.
        to: u64,
        /// This replica.
        id: u64,
    },
    /// A message's own sender differs from its batch's.
    #[error("message from {message} in a batch from {batch}")]
    Sender {
        /// The message's `from`.
        message: u64,
        /// The batch's `from`.
        batch: u64,
    },
    /// A message type replicas never send each other.
    #[error("{0:?} is not accepted from peers")]
    Type(MessageType),
    /// A value raft-rs would panic on, or that no replica sends.
    #[error("{0:?}: {1}")]
    Value(MessageType, String),
}

/// Checks who sent a message and to whom (the batch envelope already
/// passed [`check_envelope`]).
fn check_addressing(message: &Message, view: &LogView<'_>) -> Result<(), Refusal> {
    if message.to != view.id {
        return Err(Refusal::Recipient {
            to: message.to,
            id: view.id,
        });
    }
    if !view.is_member(message.from) || message.from == view.id {
        return Err(Refusal::NotMember(message.from));
    }
    Ok(())
}

/// Checks a batch's envelope: the cluster, the sender, the recipient.
pub fn check_envelope(
    cluster_id: u64,
    from: u64,
    to: u64,
    want_cluster: u64,
    view: &LogView<'_>,
) -> Result<(), Refusal> {
    if cluster_id != want_cluster {
        return Err(Refusal::Cluster {
            got: cluster_id,
            want: want_cluster,
        });
    }
    if to != view.id {
        return Err(Refusal::Recipient { to, id: view.id });
    }
    if !view.is_member(from) || from == view.id {
        return Err(Refusal::NotMember(from));
    }
    Ok(())
}

/// Checks one message of a batch from `batch_from` against this replica's
/// log and configuration. `Ok` means raft-rs may step it without panicking.
pub fn check_message(
    message: &Message,
    batch_from: u64,
    view: &LogView<'_>,
) -> Result<(), Refusal> {
    if message.from != batch_from {
        return Err(Refusal::Sender {
            message: message.from,
            batch: batch_from,
        });
    }
    check_addressing(message, view)?;
    let kind = message.get_msg_type();
    let bad = |why: String| Err(Refusal::Value(kind, why));
    match kind {
        MessageType::MsgAppend
        | MessageType::MsgAppendResponse
        | MessageType::MsgRequestVote
        | MessageType::MsgRequestVoteResponse
        | MessageType::MsgSnapshot
        | MessageType::MsgHeartbeat
        | MessageType::MsgHeartbeatResponse
        | MessageType::MsgRequestPreVote
        | MessageType::MsgRequestPreVoteResponse => {}
        // A leader handing over (`RawNode::transfer_leader`).
        MessageType::MsgTimeoutNow
            if view.leader != 0 && message.from == view.leader && message.term == view.term => {}
        other => return Err(Refusal::Type(other)),
    }
    if message.term == 0 {
        return bad("term 0 (only local messages have no term)".into());
    }
    if message.term > view.term.saturating_add(MAX_TERM_STEP) {
        return bad(format!(
            "term {} is more than {MAX_TERM_STEP} past the current term {}",
            message.term, view.term
        ));
    }
    match kind {
        MessageType::MsgHeartbeat if message.commit > view.last_index => bad(format!(
            "commit {} is past the last log index {}",
            message.commit, view.last_index
        )),
        MessageType::MsgAppend => check_append(message, view).or_else(bad),
        MessageType::MsgSnapshot => check_snapshot(message, view).or_else(bad),
        MessageType::MsgAppendResponse if message.request_snapshot != 0 => bad(format!(
            "asks for a snapshot at {} (replicas never do)",
            message.request_snapshot
        )),
        MessageType::MsgAppendResponse if !message.reject && message.index > view.last_index => {
            bad(format!(
                "acknowledges index {} past the last log index {}",
                message.index, view.last_index
            ))
        }
        _ => Ok(()),
    }
}

fn check_append(message: &Message, view: &LogView<'_>) -> Result<(), String> {
    if (message.index == 0) != (message.log_term == 0) {
        return Err(format!(
            "anchor index {} with log term {} (only index 0 has term 0)",
            message.index, message.log_term
        ));
    }
    if message.log_term > message.term {
        return Err(format!(
            "anchor log term {} is past the message term {}",
            message.log_term, message.term
        ));
    }
    let mut previous_term = message.log_term;
    for (offset, entry) in message.entries.iter().enumerate() {
        let want = message
            .index
            .checked_add(offset as u64 + 1)
            .ok_or_else(|| format!("entry index overflows after anchor {}", message.index))?;
        if entry.index != want {
            return Err(format!(
                "entry {offset} has index {}, expected {want} (entries follow the anchor without gaps)",
                entry.index
            ));
        }
        if entry.term < previous_term || entry.term > message.term {
            return Err(format!(
                "entry {} has term {}, outside [{previous_term}, {}]",
                entry.index, entry.term, message.term
            ));
        }
        if entry.get_entry_type() == EntryType::EntryConfChange {
            return Err(format!(
                "entry {} is a v1 configuration change (Gantry proposes only ConfChangeV2)",
                entry.index
            ));
        }
        previous_term = entry.term;
    }
    let _ = view;
    Ok(())
}

fn check_snapshot(message: &Message, view: &LogView<'_>) -> Result<(), String> {
    let Some(snapshot) = message.snapshot.as_ref() else {
        return Err("no snapshot".into());
    };
    let metadata = snapshot.get_metadata();
    if metadata.index == 0 || metadata.term == 0 || metadata.term > message.term {
        return Err(format!(
            "snapshot index {} term {} (both must be positive, the term at most {})",
            metadata.index, metadata.term, message.term
        ));
    }
    let _ = view;
    check_conf_state(metadata.get_conf_state())
}

/// What `confchange::restore` needs of a snapshot's configuration: voters,
/// learners apart from voters, the joint parts consistent.
fn check_conf_state(conf: &raft::eraftpb::ConfState) -> Result<(), String> {
    let joint = !conf.voters_outgoing.is_empty();
    let bad = conf.voters.is_empty()
        || conf.voters.len() + conf.learners.len() > super::membership::MAX_MEMBERS
        || conf
            .learners
            .iter()
            .any(|id| conf.voters.contains(id) || conf.voters_outgoing.contains(id))
        || conf
            .learners_next
            .iter()
            .any(|id| !conf.voters_outgoing.contains(id) || conf.voters.contains(id))
        || (!joint && conf.auto_leave);
    if bad {
        return Err(format!(
            "snapshot configuration cannot be restored (voters {:?}, learners {:?}, outgoing {:?}, learners next {:?})",
            conf.voters, conf.learners, conf.voters_outgoing, conf.learners_next
        ));
    }
    Ok(())
}

/// Refusals logged per window; the rest are counted and summed up in the
/// first line of the next window.
pub const LOG_BURST: u32 = 10;
/// The window of [`LOG_BURST`].
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A warn line per refused peer message, at most [`LOG_BURST`] per
/// [`LOG_WINDOW`] for the whole replica (a flood comes from many addresses,
/// so the limit is not per address; memory stays constant).
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<LogWindow>,
}

#[derive(Debug, Default)]
struct LogWindow {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Logs a refusal (from `peer`, when the transport knows the address)
    /// unless this window's lines are spent. Returns whether it logged.
    pub fn refused(&self, peer: Option<SocketAddr>, from: u64, refusal: &Refusal) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = state
            .started
            .is_none_or(|started| now.duration_since(started) >= LOG_WINDOW);
        if expired {
            if state.suppressed > 0 {
                tracing::warn!(
                    suppressed = state.suppressed,
                    "more raft peer messages were refused than logged in the last {LOG_WINDOW:?}"
                );
            }
            *state = LogWindow {
                started: Some(now),
                logged: 0,
                suppressed: 0,
            };
        }
        if state.logged >= LOG_BURST {
            state.suppressed += 1;
            return false;
        }
        state.logged += 1;
        drop(state);
        let peer = peer.map_or_else(|| "unknown".to_string(), |addr| addr.to_string());
        tracing::warn!(%peer, from, reason = %refusal, "refused a raft message");
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use raft::eraftpb::{ConfState, Entry, Snapshot, SnapshotMetadata};

    const VOTERS: &[u64] = &[1, 2, 3];

    fn view() -> LogView<'static> {
        LogView {
            id: 1,
            term: 5,
            leader: 0,
            last_index: 100,
            voters: VOTERS,
            learners: &[],
        }
    }

    fn message(kind: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = 2;
        m.to = 1;
        m.term = 5;
        m
    }

    fn entries(first: u64, terms: &[u64]) -> Vec<Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &term)| Entry {
                index: first + i as u64,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn snapshot(index: u64, term: u64, voters: &[u64]) -> Snapshot {
        Snapshot {
            data: b"{}".to_vec().into(),
            metadata: Some(SnapshotMetadata {
                index,
                term,
                conf_state: Some(ConfState {
                    voters: voters.to_vec(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    /// (message edit, expected refusal fragment or None for accepted)
    type Case = (&'static str, fn(&mut Message), Option<&'static str>);

    fn check_cases(kind: MessageType, cases: &[Case]) {
        for (name, edit, want) in cases {
            let mut m = message(kind);
            edit(&mut m);
            let got = check_message(&m, 2, &view());
            match (got, want) {
                (Ok(()), None) => {}
                (Err(refusal), Some(fragment)) => {
                    let text = refusal.to_string();
                    assert!(text.contains(fragment), "{kind:?} {name}: {text}");
                }
                (got, want) => panic!("{kind:?} {name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn addressing_and_types() {
        let cases: &[Case] = &[
            ("plain", |_| {}, None),
            (
                "non-member",
                |m| m.from = 77,
                Some("message from 77 in a batch from 2"),
            ),
            (
                "other recipient",
                |m| m.to = 3,
                Some("addressed to replica 3"),
            ),
            ("term 0", |m| m.term = 0, Some("term 0")),
            (
                "huge term",
                |m| m.term = 5 + MAX_TERM_STEP + 1,
                Some("past the current term"),
            ),
            ("largest term step", |m| m.term = 5 + MAX_TERM_STEP, None),
            ("higher term", |m| m.term = 9, None),
        ];
        check_cases(MessageType::MsgRequestVote, cases);
        let mut forged = message(MessageType::MsgHeartbeat);
        forged.from = 77;
        let refusal = check_message(&forged, 77, &view()).unwrap_err();
        assert_eq!(refusal, Refusal::NotMember(77));
        let mut own = message(MessageType::MsgHeartbeat);
        own.from = 1;
        assert_eq!(
            check_message(&own, 1, &view()).unwrap_err(),
            Refusal::NotMember(1)
        );
        for kind in [
            MessageType::MsgPropose,
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgTimeoutNow,
            MessageType::MsgTransferLeader,
            MessageType::MsgReadIndex,
            MessageType::MsgReadIndexResp,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgCheckQuorum,
        ] {
            assert_eq!(
                check_message(&message(kind), 2, &view()),
                Err(Refusal::Type(kind))
            );
        }
        // A leader hands over with `MsgTimeoutNow`: taken from the leader
        // this replica follows, in its term, from no one else.
        let following = |leader| LogView { leader, ..view() };
        let timeout_now = message(MessageType::MsgTimeoutNow);
        assert_eq!(check_message(&timeout_now, 2, &following(2)), Ok(()));
        for (case, leader, term) in [
            ("not the leader", 3, 5),
            ("no leader", 0, 5),
            ("another term", 2, 6),
        ] {
            let mut forged = timeout_now.clone();
            forged.term = term;
            assert_eq!(
                check_message(&forged, 2, &following(leader)),
                Err(Refusal::Type(MessageType::MsgTimeoutNow)),
                "{case}"
            );
        }
    }

    #[test]
    fn envelope() {
        let v = view();
        assert_eq!(check_envelope(9, 2, 1, 9, &v), Ok(()));
        assert_eq!(
            check_envelope(8, 2, 1, 9, &v),
            Err(Refusal::Cluster { got: 8, want: 9 })
        );
        assert_eq!(
            check_envelope(9, 2, 3, 9, &v),
            Err(Refusal::Recipient { to: 3, id: 1 })
        );
        assert_eq!(check_envelope(9, 77, 1, 9, &v), Err(Refusal::NotMember(77)));
        let learners = [4];
        let with_learner = LogView {
            learners: &learners,
            ..view()
        };
        assert_eq!(check_envelope(9, 4, 1, 9, &with_learner), Ok(()));
        // A replica waiting to join knows no members: the leader that added
        // it may contact it, but not as this replica's own id.
        let joining = LogView {
            voters: &[],
            learners: &[],
            ..view()
        };
        assert_eq!(check_envelope(9, 77, 1, 9, &joining), Ok(()));
        assert_eq!(
            check_envelope(9, 1, 1, 9, &joining),
            Err(Refusal::NotMember(1))
        );
    }

    #[test]
    fn heartbeat_commit_within_the_log() {
        let cases: &[Case] = &[
            ("commit 0", |m| m.commit = 0, None),
            ("commit at last", |m| m.commit = 100, None),
            (
                "commit past last",
                |m| m.commit = 101,
                Some("commit 101 is past the last log index 100"),
            ),
            (
                "issue 16",
                |m| m.commit = 1_000_000_000,
                Some("past the last log index"),
            ),
        ];
        check_cases(MessageType::MsgHeartbeat, cases);
    }

    #[test]
    fn append_entries_follow_their_anchor() {
        let cases: &[Case] = &[
            (
                "probe",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                },
                None,
            ),
            (
                "probe past the end",
                |m| {
                    m.index = 500;
                    m.log_term = 5;
                    m.commit = 600;
                },
                None,
            ),
            (
                "entries",
                |m| {
                    m.index = 100;
                    m.log_term = 4;
                    m.entries = entries(101, &[4, 5, 5]).into();
                    m.commit = 1000;
                },
                None,
            ),
            (
                "from the start",
                |m| {
                    m.entries = entries(1, &[1]).into();
                },
                None,
            ),
            (
                "term-0 anchor past the end",
                |m| {
                    m.index = 1000;
                    m.log_term = 0;
                    m.commit = 1000;
                },
                Some("only index 0 has term 0"),
            ),
            (
                "index 0 with a term",
                |m| {
                    m.index = 0;
                    m.log_term = 1;
                },
                Some("only index 0 has term 0"),
            ),
            (
                "anchor term past message term",
                |m| {
                    m.index = 100;
                    m.log_term = 6;
                },
                Some("past the message term"),
            ),
            (
                "gap",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    m.entries = entries(105, &[5]).into();
                },
                Some("expected 101"),
            ),
            (
                "repeat",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    let mut e = entries(101, &[5, 5]);
                    e[1].index = 101;
                    m.entries = e.into();
                },
                Some("expected 102"),
            ),
            (
                "overflow",
                |m| {
                    m.index = u64::MAX;
                    m.log_term = 5;
                    m.entries = entries(0, &[5]).into();
                },
                Some("overflows"),
            ),
            (
                "decreasing terms",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    m.entries = entries(101, &[4]).into();
                },
                Some("outside [5, 5]"),
            ),
            (
                "entry term past message",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    m.entries = entries(101, &[6]).into();
                },
                Some("outside"),
            ),
            (
                "conf change",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    let mut e = entries(101, &[5]);
                    e[0].set_entry_type(EntryType::EntryConfChange);
                    m.entries = e.into();
                },
                Some("v1 configuration change"),
            ),
            (
                "conf change v2",
                |m| {
                    m.index = 100;
                    m.log_term = 5;
                    let mut e = entries(101, &[5]);
                    e[0].set_entry_type(EntryType::EntryConfChangeV2);
                    m.entries = e.into();
                },
                None,
            ),
        ];
        check_cases(MessageType::MsgAppend, cases);
    }

    #[test]
    fn snapshots_keep_term_and_configuration() {
        let cases: &[Case] = &[
            ("ok", |m| m.set_snapshot(snapshot(200, 5, &[3, 1, 2])), None),
            ("none", |_| {}, Some("no snapshot")),
            (
                "term 0",
                |m| m.set_snapshot(snapshot(1_000_000, 0, &[1, 2, 3])),
                Some("both must be positive"),
            ),
            (
                "index 0",
                |m| m.set_snapshot(snapshot(0, 5, &[1, 2, 3])),
                Some("both must be positive"),
            ),
            (
                "term past message",
                |m| m.set_snapshot(snapshot(200, 6, &[1, 2, 3])),
                Some("at most 5"),
            ),
            (
                "other voters (membership changed)",
                |m| m.set_snapshot(snapshot(200, 5, &[1, 2, 4])),
                None,
            ),
            (
                "joint",
                |m| {
                    let mut s = snapshot(200, 5, &[1, 2, 3]);
                    s.mut_metadata().mut_conf_state().voters_outgoing = vec![1, 2, 4];
                    s.mut_metadata().mut_conf_state().auto_leave = true;
                    m.set_snapshot(s);
                },
                None,
            ),
            (
                "no voters",
                |m| m.set_snapshot(snapshot(200, 5, &[])),
                Some("cannot be restored"),
            ),
            (
                "voter and learner",
                |m| {
                    let mut s = snapshot(200, 5, &[1, 2, 3]);
                    s.mut_metadata().mut_conf_state().learners = vec![3];
                    m.set_snapshot(s);
                },
                Some("cannot be restored"),
            ),
            (
                "auto leave outside a joint configuration",
                |m| {
                    let mut s = snapshot(200, 5, &[1, 2, 3]);
                    s.mut_metadata().mut_conf_state().auto_leave = true;
                    m.set_snapshot(s);
                },
                Some("cannot be restored"),
            ),
        ];
        check_cases(MessageType::MsgSnapshot, cases);
    }

    #[test]
    fn append_responses_stay_within_the_log() {
        let cases: &[Case] = &[
            ("ack", |m| m.index = 100, None),
            (
                "ack past the end",
                |m| m.index = 101,
                Some("acknowledges index 101"),
            ),
            (
                "reject past the end",
                |m| {
                    m.reject = true;
                    m.index = 500;
                    m.reject_hint = 400;
                    m.log_term = 3;
                },
                None,
            ),
            (
                "snapshot request",
                |m| m.request_snapshot = 50,
                Some("asks for a snapshot"),
            ),
        ];
        check_cases(MessageType::MsgAppendResponse, cases);
    }

    #[test]
    fn refusal_log_is_bounded() {
        let log = RefusalLog::default();
        let refusal = Refusal::NotMember(77);
        let logged = (0..1000)
            .filter(|_| log.refused(None, 77, &refusal))
            .count();
        assert_eq!(logged, LOG_BURST as usize);
    }

    /// Without the guard, raft-rs 0.7 panics on the forged heartbeat of
    /// issue 16: this is the path the checks above close.
    #[test]
    fn unguarded_raft_panics_on_a_forged_commit() {
        use raft::storage::MemStorage;
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let config = raft::Config {
            id: 1,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = raft::RawNode::new(&config, storage, &logger).unwrap();
        let mut forged = message(MessageType::MsgHeartbeat);
        forged.term = 1;
        forged.commit = 1_000_000_000;
        let guard_view = LogView {
            term: node.raft.term,
            last_index: node.raft.raft_log.last_index(),
            ..view()
        };
        assert!(check_message(&forged, 2, &guard_view).is_err());
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.step(forged)));
        assert!(stepped.is_err(), "raft-rs accepted an out-of-range commit");
    }
}
