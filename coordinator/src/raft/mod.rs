//! The replicated log: tikv raft-rs over gRPC, with the log in sled.
//!
//! Layout:
//! - [`storage`]: [`SledRaftStorage`], the Raft log, hard state and latest
//!   snapshot on sled trees `raft_log` and `raft_meta`, implementing
//!   [`raft::Storage`];
//! - [`node`]: [`RaftNode`], the replica loop: the thread that owns the
//!   `RawNode` and the application, and [`RaftHandle`], the cloneable way
//!   in (propose typed commands, send the application requests, watch
//!   leadership);
//! - [`snapfile`]: snapshots as files (written, fsynced and renamed;
//!   received in chunks and checked against their SHA-256);
//! - [`batch`]: the layout of an entry that carries several commands;
//! - [`transport`]: [`RaftPeerService`] (receives peers' messages) and the
//!   per-peer sender tasks;
//! - [`guard`]: the checks every peer message passes before it reaches
//!   raft-rs (cluster, membership, recipient, and the values that would make
//!   raft-rs panic), and the rate-limited log of refusals;
//! - [`logger`]: the slog drain that forwards raft-rs logs to `tracing`.
//!
//! **Ownership.** One loop thread owns the `RawNode`, hence the Raft log,
//! and the application ([`ReplicatedStateMachine`]: for the coordinator,
//! the core with its state machine, store, soft state and agent sessions).
//! Everything else talks to it through one channel: proposals (typed
//! commands, encoded once by their proposer), the application's requests
//! (answered on oneshot channels they carry), peers' messages, transport
//! reports. Nothing crosses a thread to apply: the loop applies committed
//! entries to the application itself and answers each proposer with the
//! application's typed outcome of its own command. The application owns
//! its applied state and its applied index; the Raft storage owns the log
//! and the latest snapshot. On start the loop checks that the two agree
//! (the applied index lies within what the log and the snapshot cover)
//! and refuses to start otherwise.
//!
//! **A round** of the loop: take what arrived (at most
//! `MAX_INPUTS_PER_ROUND`, waiting at most until the next tick, not at all
//! when proposals or a `Ready` are left), tick Raft's clock when due,
//! propose the round's commands (the proposers' and the application's own)
//! as batch entries (tikv raftstore's write batches: up to 1,024 commands
//! or 1 MiB share one entry, hence one append, one fsync and one storage
//! batch in the application), handle the `Ready`s, let the application run
//! its own tick on what was applied (one timer for both clocks), publish
//! the status (its watchers are woken only when more than the commit and
//! applied index changed: those move every round and nobody waits on
//! them). A leader tells followers a new commit index with its next
//! append or heartbeat, not with an append of its own (raft-rs's
//! `skip_bcast_commit`, as tikv sets it): half the peer messages on a
//! 2-core machine, at the cost of followers applying up to a heartbeat
//! later when nothing else is appended.
//!
//! **Ordering** (raft-rs's documented `Ready` order, as in its
//! `five_mem_node` example): for each `Ready` the driver sends the messages
//! that may go out before persistence (a leader's appends), persists the
//! snapshot, entries and hard state, flushes (one fsync for every proposal
//! drained since the last one), then sends the messages that must follow
//! persistence (votes, append responses), applies committed entries and
//! advances. A leader does not wait for its own flush: it hands it to the
//! flusher thread ([`flusher`]: raft-rs's asynchronous `Ready`s) and goes
//! on with the next inputs; raft-rs counts the leader's copy towards a
//! quorum, and hands out its entries to apply, only once the flusher has
//! reported it durable. Anyone else flushes on the loop (which also covers
//! a former leader's flushes still in flight). A proposal is answered only
//! after its entry is committed (fsynced on a quorum, the leader's own copy
//! included) and applied, with the outcome the application returned for
//! its command.
//!
//! **Why a thread and not a task**: a sled flush blocks for an fsync, and
//! everything the loop does is sequential anyway; a dedicated thread keeps
//! the async runtime free and needs no locks. The transport is async (tokio
//! tasks, tonic), and talks to the thread through channels.
//!
//! **Compaction**: once `compact_after` entries have been applied since the
//! last snapshot, the loop has the application stream a snapshot into a
//! file ([`snapfile`]: fsynced and renamed, the previous one kept until
//! then), records it and drops the log up to `compact_keep` entries before
//! it. A follower that needs a dropped entry gets that file instead, in
//! chunks over `InstallSnapshot` ([`transport`]), checked against its
//! SHA-256 before its node sees the message, and installs it through
//! [`ReplicatedStateMachine::restore`].
//!
//! **Peers are not trusted.** Without mutual TLS anyone who reaches the
//! peer port can send Raft messages. Each batch carries the cluster id
//! (stored with the log when the cluster is created) and the sender's and
//! recipient's ids; the transport refuses a batch from another cluster, from
//! an id that is not a member, or for another replica, and the loop
//! refuses each message that would make raft-rs panic or that Gantry never
//! sends (proposals, read-index, leader transfer) before `RawNode::step`
//! ([`guard::check_message`]). A member's id can still be claimed by anyone
//! on the network: only mutual TLS proves who sends.
//!
//! **Errors**: storage and application errors (a failed apply, snapshot or
//! applied-index read, an entry whose batch does not decode) are fatal for
//! the loop: it logs them, fails what is pending and stops, publishing
//! `running: false` and the reason in [`RaftStatus::fatal`]; so does a
//! panic of the loop thread (in raft-rs or in the application), caught at
//! the thread's edge. The coordinator then reports unhealthy and exits
//! non-zero (`server.rs`). Nothing is replaced by a default value: an empty
//! snapshot with the log compacted behind it would lose the state.

pub mod batch;
mod driver;
pub mod fault;
mod flusher;
pub mod guard;
mod http_urls;
pub mod logger;
mod members;
pub mod membership;
pub mod node;
pub mod snapfile;
pub mod storage;
mod taking;
pub mod transport;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use node::{RaftHandle, RaftNode};
pub use storage::SledRaftStorage;
pub use transport::RaftPeerService;

/// Writes a snapshot taken by [`ReplicatedStateMachine::snapshot`] into its
/// file, off the replica loop.
pub type SnapshotWriter = Box<dyn FnOnce(&mut dyn std::io::Write) -> Result<(), String> + Send>;

/// The application driven by the replicated log (the coordinator's core).
/// The replica loop owns it and calls it only on its thread: commands in
/// log order, requests and ticks in between.
///
/// Every `Err` is fatal for the replica (the loop stops and the reason is
/// published in [`RaftStatus::fatal`]): an application that cannot persist
/// or read its state must not be stood in for by a default value.
pub trait ReplicatedStateMachine: Send + Sized + 'static {
    /// What proposers propose ([`RaftHandle::propose`]).
    type Command: Send + 'static;
    /// What each command's proposer gets back once it is applied.
    type Outcome: Send + 'static;
    /// Requests the application answers on the loop
    /// ([`RaftHandle::request`]): reads, agents' messages.
    type Request: Send + 'static;

    /// Encodes a command for the log (on the proposer's thread; never
    /// empty). It is decoded only by [`apply`](Self::apply).
    fn encode(command: &Self::Command) -> Result<Vec<u8>, String>;
    /// Applies the commands of one committed entry at `index` (as
    /// encoded, in proposal order; an entry carries one or more) and
    /// returns one outcome per command, in the same order, for their
    /// proposers. It must be deterministic: every replica applies the same
    /// commands in the same order. A command the state machine refuses is
    /// an outcome, not an `Err`; `Err` means the application could not
    /// apply at all (its storage failed).
    fn apply(&mut self, index: u64, commands: &[&[u8]]) -> Result<Vec<Self::Outcome>, String>;
    /// Takes a snapshot of the whole applied state, on the loop: what it
    /// returns writes it into its file ([`snapfile`]) later, on the
    /// loop's snapshot thread, while the loop goes on applying. It must
    /// capture the state as it is now (encoded, or in handles that later
    /// applies do not change), since the log is compacted behind it: the
    /// whole state or `Err`.
    fn snapshot(&mut self) -> Result<SnapshotWriter, String>;
    /// The last snapshot taken (by [`snapshot`](Self::snapshot), at
    /// `index`) is stored in `file` (complete, synced, named by the Raft
    /// storage); entries after `index` may have been applied since: the
    /// application may make it the base of its stored state (the default
    /// does nothing). Not called when a peer's snapshot was installed in
    /// between. `Err` stops the replica.
    fn snapshot_stored(&mut self, index: u64, file: &Path) -> Result<(), String> {
        let _ = (index, file);
        Ok(())
    }
    /// Whether the application wants a snapshot now, before the usual
    /// number of entries (its stored changes since the last one outgrew
    /// what a snapshot costs); the default never does.
    fn snapshot_wanted(&self) -> bool {
        false
    }
    /// Checks that the snapshot file `file` is one this application can
    /// restore, without changing its state: a peer's snapshot that would
    /// not restore is refused before raft-rs installs it (the default
    /// accepts all). What it decoded may be kept for the
    /// [`restore`](Self::restore) that usually follows in the same round.
    fn check_snapshot(&mut self, file: &Path) -> Result<(), String> {
        let _ = file;
        Ok(())
    }
    /// Replaces the whole state from the snapshot file `file` taken at
    /// `index`; afterwards [`applied_index`](Self::applied_index) must
    /// return `index`.
    fn restore(&mut self, index: u64, file: &Path) -> Result<(), String>;
    /// The index of the last applied entry as persisted by the application
    /// (0 if none). Entries after it are applied again on start, so an
    /// application may persist lazily: the log is the durable record. An
    /// unreadable index is an `Err`, never 0 (which would apply everything
    /// again).
    fn applied_index(&self) -> Result<u64, String>;
    /// Handles a request sent with [`RaftHandle::request`].
    fn handle(&mut self, request: Self::Request);
    /// The application's clock: called once per round of the loop, after
    /// the round's inputs, with this replica's status (leadership).
    fn tick(&mut self, status: &RaftStatus) {
        let _ = status;
    }
    /// The commands the application wants proposed on its own (no
    /// proposer waits for them; their effects come with their apply),
    /// taken after each call into it and proposed with the round's batch.
    fn take_proposals(&mut self) -> Vec<Self::Command> {
        Vec::new()
    }
    /// Writes whatever the application held back from its applies once
    /// it is due; called once per round of the loop. An `Err` is fatal, as
    /// for [`apply`](Self::apply): the replica stops (the Raft log still
    /// holds every entry after the stored applied index).
    fn write_behind(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// The loop is stopping (shutdown or a fatal error): flush.
    fn stop(&mut self) {}
}

/// The cluster id of a new cluster: a hash (FNV-1a, 64 bits) of its voter
/// ids and its name. Deterministic, so every replica of a new cluster
/// computes the same value from the same `--peers` ids and
/// `--cluster-name`; stored with the log at creation, and read from there
/// ever after ([`SledRaftStorage::cluster_id`]). The peer URLs are not part
/// of it: replicas may reach each other through different addresses
/// (proxies, NAT). It is not a secret; it keeps clusters apart, and
/// clusters with the same voter ids on one network need distinct names.
pub fn cluster_id(voters: &[u64], name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut voters = voters.to_vec();
    voters.sort_unstable();
    voters.dedup();
    let text = format!(
        "gantry-cluster\0{}\0{name}",
        voters
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let hash = text.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    // 0 means "no cluster id" on the wire.
    hash.max(1)
}

/// Configuration of one replica.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This replica's Raft id (non-zero, a key of `peers`).
    pub id: u64,
    /// Every voter of a new cluster, this one included: id -> gRPC URL of
    /// its `RaftPeer` service. Only bootstraps a fresh data dir (all
    /// replicas of a new cluster get the same ids); afterwards membership
    /// is the stored configuration ([`membership`]) and this is ignored.
    pub peers: BTreeMap<u64, String>,
    /// Start with a fresh data dir as a replica waiting to be added
    /// (`gantry raft add`) instead of bootstrapping a cluster: `peers` may
    /// be empty. Ignored once the data dir holds a configuration.
    pub join: bool,
    /// Interval of Raft's logical clock.
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns (randomised up to
    /// twice this). 10 ticks of 100 ms: about 1 s.
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Applied entries since the last snapshot that trigger a new snapshot
    /// and log compaction.
    pub compact_after: u64,
    /// Entries kept in the log before the snapshot index at compaction, so
    /// that a follower slightly behind catches up from the log instead of a
    /// snapshot.
    pub compact_keep: u64,
    /// Largest size of the entries in one append message.
    pub max_append_bytes: u64,
    /// Messages queued per peer before new ones are dropped (Raft
    /// retransmits what is lost).
    pub peer_queue: usize,
    /// TLS for dialing peers (their URLs are then `https://`): the CA of
    /// their certificates and this replica's own certificate as client
    /// identity, followed as credentials reload (the sender tasks redial
    /// when it changes). `None` = plaintext.
    pub peer_tls: Option<crate::credentials::PeerTlsSource>,
    /// Mixed into the cluster id of a new cluster (`--cluster-name`); once
    /// the cluster exists, its stored id is used and this is ignored.
    pub cluster_name: String,
    /// Where snapshot files live (`<data dir>/raft-snapshots`); required.
    pub snapshot_dir: PathBuf,
    /// Where the log's segment files live (`<data dir>/raft-wal`,
    /// [`wal`]); required.
    pub wal_dir: PathBuf,
    /// Size of the chunks a snapshot is sent in (`--raft-snapshot-chunk`).
    pub snapshot_chunk_bytes: usize,
    /// Largest snapshot written or accepted from a peer
    /// (`--raft-max-snapshot`).
    pub max_snapshot_bytes: u64,
    /// This replica's HTTP API base URL, sent with every batch to its peers
    /// so a follower can name the leader's to HTTP clients (`http_urls`).
    pub http_url: Option<String>,
    /// Makes the flushes of the Raft metadata durable (the store's, whose
    /// database the metadata shares: [`crate::durable`]); none by default
    /// (a test's temporary database). The log's own files are always
    /// synced.
    pub syncer: crate::durable::Syncer,
}

impl RaftConfig {
    /// A configuration with production defaults: 100 ms ticks, ~1 s election
    /// timeout, a snapshot every 10,000 entries.
    pub fn new(id: u64, peers: BTreeMap<u64, String>) -> RaftConfig {
        RaftConfig {
            id,
            peers,
            tick: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 3,
            compact_after: 10_000,
            compact_keep: 1_000,
            max_append_bytes: 1 << 20,
            peer_queue: 4096,
            peer_tls: None,
            cluster_name: String::new(),
            snapshot_dir: PathBuf::new(),
            wal_dir: PathBuf::new(),
            snapshot_chunk_bytes: snapfile::DEFAULT_CHUNK_BYTES,
            max_snapshot_bytes: snapfile::DEFAULT_MAX_SNAPSHOT_BYTES,
            http_url: None,
            join: false,
            syncer: crate::durable::Syncer::none(),
        }
    }

    /// A single-voter configuration (`gantry dev`): it elects itself at once.
    pub fn single(id: u64, url: impl Into<String>) -> RaftConfig {
        RaftConfig::new(id, BTreeMap::from([(id, url.into())]))
    }

    /// A configuration for tests: 50 ms ticks (elections in 0.5-1 s) and a
    /// snapshot every 20 entries keeping 5, so that catch-up by snapshot is
    /// exercised.
    pub fn for_test(id: u64, peers: BTreeMap<u64, String>) -> RaftConfig {
        RaftConfig {
            tick: Duration::from_millis(50),
            compact_after: 20,
            compact_keep: 5,
            ..RaftConfig::new(id, peers)
        }
    }

    /// Checks the values that raft-rs does not check itself.
    pub fn validate(&self) -> Result<(), RaftError> {
        if self.id == 0 {
            return Err(RaftError::Config("raft id must not be 0".into()));
        }
        if !self.join && !self.peers.contains_key(&self.id) {
            return Err(RaftError::Config(format!(
                "raft id {} is not among the peers {:?}",
                self.id,
                self.peers.keys().collect::<Vec<_>>()
            )));
        }
        if self.tick.is_zero() {
            return Err(RaftError::Config("raft tick must not be zero".into()));
        }
        if self.heartbeat_tick == 0 || self.election_tick <= self.heartbeat_tick {
            return Err(RaftError::Config(format!(
                "raft election tick ({}) must exceed the heartbeat tick ({}), which must not be 0",
                self.election_tick, self.heartbeat_tick
            )));
        }
        if self.compact_after == 0 {
            return Err(RaftError::Config("raft compact_after must not be 0".into()));
        }
        if self.snapshot_dir.as_os_str().is_empty() {
            return Err(RaftError::Config("raft snapshot_dir must be set".into()));
        }
        if self.wal_dir.as_os_str().is_empty() {
            return Err(RaftError::Config("raft wal_dir must be set".into()));
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes > snapfile::MAX_CHUNK_BYTES {
            return Err(RaftError::Config(format!(
                "raft snapshot chunk of {} bytes: must be between 1 and {}",
                self.snapshot_chunk_bytes,
                snapfile::MAX_CHUNK_BYTES
            )));
        }
        if self.max_snapshot_bytes == 0 {
            return Err(RaftError::Config(
                "raft max snapshot size must not be 0".into(),
            ));
        }
        if self.peer_queue == 0 {
            return Err(RaftError::Config("raft peer_queue must not be 0".into()));
        }
        Ok(())
    }
}

/// Parses `--peers`: `1=http://10.0.0.1:7101,2=http://10.0.0.2:7101`.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, RaftError> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        let Some((id, url)) = part.split_once('=') else {
            return Err(RaftError::Peers(format!(
                "{part:?}: expected ID=URL, e.g. 1=http://127.0.0.1:7101"
            )));
        };
        let (id, url) = (id.trim(), url.trim());
        let id: u64 = id.parse().map_err(|_| {
            RaftError::Peers(format!("{part:?}: id {id:?} is not a positive integer"))
        })?;
        if id == 0 {
            return Err(RaftError::Peers(format!("{part:?}: id must not be 0")));
        }
        let Some(rest) = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
        else {
            return Err(RaftError::Peers(format!(
                "{part:?}: URL {url:?} must start with http:// or https://"
            )));
        };
        if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
            return Err(RaftError::Peers(format!(
                "{part:?}: URL {url:?} has no host"
            )));
        }
        if peers.insert(id, url.to_string()).is_some() {
            return Err(RaftError::Peers(format!("{part:?}: id {id} appears twice")));
        }
    }
    if peers.is_empty() {
        return Err(RaftError::Peers(
            "no peers given: expected ID=URL[,ID=URL...]".into(),
        ));
    }
    Ok(peers)
}

/// Leadership and progress of one replica, published on a
/// `tokio::sync::watch` channel by the driver (receivers are woken for
/// changes beyond the commit and applied index; the value holds them
/// current).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This replica's id.
    pub id: u64,
    /// The leader this replica knows of.
    pub leader_id: Option<u64>,
    /// The leader's URL from the peer map.
    pub leader_url: Option<String>,
    /// Current term.
    pub term: u64,
    /// This replica leads *and* has applied an entry of its own term, so its
    /// applied state holds everything committed before it became leader:
    /// reads from it are up to date and it may act on them.
    pub is_leader: bool,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied to the application.
    pub applied_index: u64,
    /// False once the driver has stopped (shutdown or a fatal error).
    pub running: bool,
    /// Why the driver stopped on its own (a storage or application error,
    /// a panic); `None` while running and after a requested stop.
    pub fatal: Option<String>,
    /// This replica's cluster id (see [`cluster_id`]).
    pub cluster_id: u64,
}

/// Why a proposal did not get a reply from the application.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This replica does not lead (or stopped leading before the entry
    /// committed). For a proposal that was accepted and then lost its
    /// leader, the outcome is unknown: the entry may still commit under the
    /// next leader, so commands should be idempotent (submission keys).
    #[error("not the leader (leader: {})", leader_url.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// The leader's id, when known.
        leader_id: Option<u64>,
        /// The leader's URL, when known.
        leader_url: Option<String>,
    },
    /// raft-rs dropped the proposal (a leadership transfer is under way);
    /// nothing was appended, retrying is safe.
    #[error("proposal dropped by raft; retry")]
    Dropped,
    /// The loop has stopped (shutdown or a fatal storage error).
    #[error("raft node stopped")]
    Stopped,
    /// The command could not be encoded (a bug); nothing was proposed.
    #[error("cannot encode the command: {0}")]
    Encode(String),
}

/// Errors of the replication module. Storage errors are fatal for the driver.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// sled failed.
    #[error("raft storage: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record did not decode.
    #[error("raft storage: corrupt {what}: {source}")]
    Decode {
        /// What was read.
        what: &'static str,
        /// Decode error.
        source: protobuf::ProtobufError,
    },
    /// A record did not encode (a bug).
    #[error("raft storage: cannot encode {what}: {source}")]
    Encode {
        /// What was written.
        what: &'static str,
        /// Encode error.
        source: protobuf::ProtobufError,
    },
    /// The log, hard state, snapshot and applied index disagree; the node
    /// refuses to start rather than apply a wrong history.
    #[error("raft storage is inconsistent: {0}")]
    Inconsistent(String),
    /// A file of the Raft log ([`wal`]) could not be created, written,
    /// synced, read or removed.
    #[error("raft log file: {0}")]
    Wal(String),
    /// A snapshot file could not be written, read, received or checked.
    #[error("raft snapshot file: {0}")]
    SnapshotFile(String),
    /// The application refused a snapshot.
    #[error("raft: cannot restore snapshot at index {index}: {reason}")]
    Restore {
        /// Snapshot index.
        index: u64,
        /// The application's reason.
        reason: String,
    },
    /// raft-rs refused something.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The application failed (see [`ReplicatedStateMachine`]).
    #[error("raft: the application cannot {what}: {reason}")]
    App {
        /// What was asked (`apply index 12`, `take a snapshot`).
        what: String,
        /// The application's reason.
        reason: String,
    },
    /// A bad `--peers` value.
    #[error("invalid --peers: {0}")]
    Peers(String),
    /// A bad configuration.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// Threads, tasks or runtime could not be started.
    #[error("raft: cannot start: {0}")]
    Start(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn check(input: &str, expect: Result<&[(u64, &str)], &str>) {
        let got = parse_peers(input);
        match (got, expect) {
            (Ok(peers), Ok(want)) => {
                let want: BTreeMap<u64, String> = want
                    .iter()
                    .map(|(id, url)| (*id, url.to_string()))
                    .collect();
                assert_eq!(peers, want, "input {input:?}");
            }
            (Err(error), Err(fragment)) => {
                let text = error.to_string();
                assert!(text.contains(fragment), "input {input:?}: {text}");
            }
            (got, want) => panic!("input {input:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parse_peers_cases() {
        check(
            "1=http://127.0.0.1:7101",
            Ok(&[(1, "http://127.0.0.1:7101")]),
        );
        check(
            "1=http://a:1, 2=https://b:2 ,3=http://c:3,",
            Ok(&[(1, "http://a:1"), (2, "https://b:2"), (3, "http://c:3")]),
        );
        check("", Err("no peers given"));
        check("1", Err("\"1\": expected ID=URL"));
        check("x=http://a:1", Err("id \"x\" is not a positive integer"));
        check("-1=http://a:1", Err("not a positive integer"));
        check("0=http://a:1", Err("id must not be 0"));
        check("1=a:1", Err("must start with http:// or https://"));
        check("1=http://", Err("has no host"));
        check(
            "1=http://a:1,1=http://b:1",
            Err("\"1=http://b:1\": id 1 appears twice"),
        );
    }

    #[test]
    fn cluster_ids() {
        let base = cluster_id(&[1, 2, 3], "");
        // Deterministic, and blind to the order and repetition of ids.
        assert_eq!(base, cluster_id(&[3, 1, 2], ""));
        assert_eq!(base, cluster_id(&[1, 2, 2, 3], ""));
        assert_ne!(base, 0);
        for other in [
            cluster_id(&[1, 2, 4], ""),
            cluster_id(&[1, 2], ""),
            cluster_id(&[1, 2, 3], "prod"),
            cluster_id(&[12, 3], ""),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(cluster_id(&[1], "a"), cluster_id(&[1], "b"));
    }

    #[test]
    fn config_validation() {
        let single = |id, url| RaftConfig {
            snapshot_dir: PathBuf::from("/tmp/snaps"),
            wal_dir: PathBuf::from("/tmp/wal"),
            ..RaftConfig::single(id, url)
        };
        assert!(single(1, "http://a:1").validate().is_ok());
        assert!(
            RaftConfig::single(1, "http://a:1")
                .validate()
                .unwrap_err()
                .to_string()
                .contains("snapshot_dir must be set")
        );
        let error = single(1, "http://a:1");
        let error = RaftConfig { id: 2, ..error }.validate().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("raft id 2 is not among the peers")
        );
        let cases = [
            (
                RaftConfig {
                    snapshot_chunk_bytes: 0,
                    ..single(1, "http://a:1")
                },
                "snapshot chunk of 0 bytes",
            ),
            (
                RaftConfig {
                    heartbeat_tick: 10,
                    ..single(1, "http://a:1")
                },
                "election tick",
            ),
        ];
        for (config, want) in cases {
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(want), "{error}");
        }
    }
}
