//! The replicated log end to end: real gRPC on loopback (port 0), sled in
//! temp dirs, a toy state machine. Waits are bounded polls, never fixed
//! sleeps for state.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_coordinator::raft::wal::{Record, Wal};
use gantry_coordinator::raft::{
    ProposeError, RaftConfig, RaftError, RaftHandle, RaftNode, RaftPeerService,
    ReplicatedStateMachine, SnapshotWriter,
};
use gantry_proto::raft as raft_pb;
use raft::eraftpb::Entry;
use raft_pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- logs

/// A minimal `tracing` subscriber for these tests (the crate has no
/// tracing-subscriber): it keeps the latest debug lines of `raft` and
/// `gantry_coordinator` in a ring buffer, printed when a wait times out, and
/// prints every line at once when `GANTRY_TEST_LOG` is set.
mod log {
    use std::collections::VecDeque;
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    const KEEP: usize = 4000;

    struct Ring {
        started: Instant,
        live: bool,
        lines: Mutex<VecDeque<String>>,
        next_span: AtomicU64,
    }

    static RING: OnceLock<Ring> = OnceLock::new();

    /// Installs the subscriber (once per test binary).
    pub fn init() {
        RING.get_or_init(|| {
            let _ = tracing::subscriber::set_global_default(Capture);
            Ring {
                started: Instant::now(),
                live: std::env::var_os("GANTRY_TEST_LOG").is_some(),
                lines: Mutex::new(VecDeque::new()),
                next_span: AtomicU64::new(1),
            }
        });
    }

    /// Prints the lines kept (every test of the binary logs into the same
    /// buffer).
    pub fn dump() {
        if let Some(ring) = RING.get() {
            let lines = ring.lines.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("---- last {} log lines ----", lines.len());
            for line in lines.iter() {
                eprintln!("{line}");
            }
            eprintln!("---- end of log ----");
        }
    }

    struct Capture;

    struct Fields(String);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value}");
            } else {
                let _ = write!(self.0, " {}={value}", field.name());
            }
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            let target = metadata.target();
            *metadata.level() <= Level::DEBUG
                && (target.starts_with("raft") || target.starts_with("gantry_coordinator"))
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            let ring = RING.get();
            Id::from_u64(ring.map_or(1, |r| r.next_span.fetch_add(1, Ordering::Relaxed)))
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let Some(ring) = RING.get() else { return };
            let metadata = event.metadata();
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            let line = format!(
                "{:>9.3} {:?} {:>5} {}:{}",
                ring.started.elapsed().as_secs_f64(),
                std::thread::current().id(),
                metadata.level(),
                metadata.target(),
                fields.0
            );
            if ring.live {
                eprintln!("{line}");
            }
            let mut lines = ring.lines.lock().unwrap_or_else(|e| e.into_inner());
            if lines.len() == KEEP {
                lines.pop_front();
            }
            lines.push_back(line);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

// ---------------------------------------------------------------- toy app

#[derive(Default)]
struct ToyState {
    values: Vec<String>,
    applied: u64,
    /// Indexes of the snapshots restored, in order.
    restores: Vec<u64>,
    /// Make `snapshot` fail (a storage error in the application).
    fail_snapshots: bool,
}

/// An append-only list of strings; the reply is the list's new length.
#[derive(Clone, Default)]
struct Toy(Arc<Mutex<ToyState>>);

impl Toy {
    fn values(&self) -> Vec<String> {
        self.0.lock().unwrap().values.clone()
    }
    fn restores(&self) -> Vec<u64> {
        self.0.lock().unwrap().restores.clone()
    }
    fn applied(&self) -> u64 {
        self.0.lock().unwrap().applied
    }
}

impl ReplicatedStateMachine for Toy {
    type Command = Vec<u8>;
    type Outcome = Vec<u8>;
    type Request = std::convert::Infallible;

    fn encode(command: &Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(command.clone())
    }

    /// Each command's outcome is the list's length after it.
    fn apply(&mut self, index: u64, commands: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
        let mut state = self.0.lock().unwrap();
        assert!(
            index > state.applied,
            "apply {index} after {}",
            state.applied
        );
        let mut outcomes = Vec::new();
        for command in commands {
            let value = String::from_utf8(command.to_vec()).unwrap();
            state.values.push(value);
            outcomes.push(state.values.len().to_string().into_bytes());
        }
        state.applied = index;
        Ok(outcomes)
    }

    fn handle(&mut self, request: std::convert::Infallible) {
        match request {}
    }

    fn snapshot(&mut self) -> Result<SnapshotWriter, String> {
        let state = self.0.lock().unwrap();
        if state.fail_snapshots {
            return Err("injected snapshot failure".into());
        }
        let bytes = serde_json::to_vec(&state.values).map_err(|e| e.to_string())?;
        Ok(Box::new(move |out| {
            out.write_all(&bytes).map_err(|e| e.to_string())
        }))
    }

    fn restore(&mut self, index: u64, file: &Path) -> Result<(), String> {
        let data = std::fs::read(file).map_err(|e| e.to_string())?;
        let mut state = self.0.lock().unwrap();
        state.values = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
        state.applied = index;
        state.restores.push(index);
        Ok(())
    }

    fn applied_index(&self) -> Result<u64, String> {
        Ok(self.0.lock().unwrap().applied)
    }
}

// ---------------------------------------------------------------- sandbox

struct Replica {
    id: u64,
    node: RaftNode<Toy>,
    handle: RaftHandle<Toy>,
    toy: Toy,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    server_stop: CancellationToken,
}

impl Replica {
    async fn stop(self) {
        self.server_stop.cancel();
        self.node.stop().await;
        let server = self.server;
        let abort = server.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Opens the replica's sled database. Retries while another handle still
/// holds its file lock: sled releases it from its flusher thread shortly
/// after the last handle is dropped (a replica refused at start drops its
/// handle on the way out), which under load outlasted the next open.
fn open_db(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

/// `RaftConfig::for_test` with the snapshot files in `dir`.
fn test_config(id: u64, peers: BTreeMap<u64, String>, dir: &Path) -> RaftConfig {
    RaftConfig {
        snapshot_dir: dir.join("raft-snapshots"),
        wal_dir: dir.join("raft-wal"),
        ..RaftConfig::for_test(id, peers)
    }
}

async fn start_replica(
    id: u64,
    listener: TcpListener,
    peers: &BTreeMap<u64, String>,
    dir: &Path,
    toy: Toy,
) -> Replica {
    start_replica_with(test_config(id, peers.clone(), dir), listener, dir, toy).await
}

async fn start_replica_with(
    config: RaftConfig,
    listener: TcpListener,
    dir: &Path,
    toy: Toy,
) -> Replica {
    start_replica_serving(config, listener, dir, toy, Serve::Current).await
}

/// Which peer service a test replica serves.
#[derive(Clone, Copy, PartialEq)]
enum Serve {
    Current,
    /// As a version from before `StepStream` would: UNIMPLEMENTED.
    WithoutStreams,
}

/// The peer service of a version without `StepStream`.
struct WithoutStreams(RaftPeerService);

#[tonic::async_trait]
impl RaftPeer for WithoutStreams {
    async fn step(
        &self,
        request: tonic::Request<raft_pb::RaftBatch>,
    ) -> Result<tonic::Response<raft_pb::RaftAck>, tonic::Status> {
        self.0.step(request).await
    }

    async fn step_stream(
        &self,
        _request: tonic::Request<tonic::Streaming<raft_pb::RaftBatch>>,
    ) -> Result<tonic::Response<raft_pb::RaftAck>, tonic::Status> {
        Err(tonic::Status::unimplemented("StepStream"))
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<raft_pb::SnapshotChunk>>,
    ) -> Result<tonic::Response<raft_pb::RaftAck>, tonic::Status> {
        self.0.install_snapshot(request).await
    }
}

async fn start_replica_serving(
    config: RaftConfig,
    listener: TcpListener,
    dir: &Path,
    toy: Toy,
    serve: Serve,
) -> Replica {
    let id = config.id;
    let db = open_db(dir);
    let node = RaftNode::start(config, &db, toy.clone(), &CancellationToken::new()).unwrap();
    drop(db);
    let handle = node.handle();
    let server_stop = CancellationToken::new();
    let router = match serve {
        Serve::Current => tonic::transport::Server::builder().add_service(handle.peer_service()),
        Serve::WithoutStreams => tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(WithoutStreams(handle.peer_handler()))),
    };
    let stop = server_stop.clone();
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
            .await
    });
    Replica {
        id,
        node,
        handle,
        toy,
        server,
        server_stop,
    }
}

async fn listen(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).await.unwrap()
}

/// Three replicas' data directories.
fn three_dirs() -> Vec<tempfile::TempDir> {
    (0..3).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// Listeners on loopback (port 0) for replicas 1 to 3 and the peer URLs
/// they make.
async fn three_listeners() -> (Vec<(u64, TcpListener)>, BTreeMap<u64, String>) {
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).await;
        peers.insert(id, format!("http://{}", listener.local_addr().unwrap()));
        listeners.push((id, listener));
    }
    (listeners, peers)
}

async fn wait_until(what: &str, check: impl FnMut() -> bool) {
    wait_until_or(what, check, String::new).await;
}

/// Waits for `check`; on timeout, panics with `diagnose()` (the replicas'
/// statuses) and the latest log lines.
async fn wait_until_or(
    what: &str,
    mut check: impl FnMut() -> bool,
    diagnose: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        if Instant::now() >= deadline {
            let diagnosis = diagnose();
            log::dump();
            panic!("timed out waiting for {what}\n{diagnosis}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One line per replica: its Raft status and what its application holds.
fn describe(replicas: &[&Replica]) -> String {
    replicas
        .iter()
        .map(|r| {
            let s = r.handle.status();
            format!(
                "replica {}: running={} term={} leader={:?} is_leader={} commit={} applied={} \
                 app_applied={} values={} restores={:?}\n",
                r.id,
                s.running,
                s.term,
                s.leader_id,
                s.is_leader,
                s.commit_index,
                s.applied_index,
                r.toy.applied(),
                r.toy.values().len(),
                r.toy.restores(),
            )
        })
        .collect()
}

/// Waits until exactly one replica leads (with its term's entry applied)
/// and every other one follows it; returns its id.
async fn wait_for_leader(replicas: &[&Replica]) -> u64 {
    let mut leader = 0;
    wait_until_or(
        "a leader everyone agrees on",
        || {
            let statuses: Vec<_> = replicas.iter().map(|r| r.handle.status()).collect();
            let leaders: Vec<_> = statuses.iter().filter(|s| s.is_leader).collect();
            if leaders.len() != 1 {
                return false;
            }
            leader = leaders[0].id;
            statuses.iter().all(|s| s.leader_id == Some(leader))
        },
        || describe(replicas),
    )
    .await;
    leader
}

fn by_id<'a>(replicas: &[&'a Replica], id: u64) -> &'a Replica {
    replicas.iter().find(|r| r.id == id).unwrap()
}

async fn propose(handle: &RaftHandle<Toy>, value: &str) -> Result<Vec<u8>, ProposeError> {
    tokio::time::timeout(TIMEOUT, handle.propose(value.as_bytes().to_vec()))
        .await
        .expect("proposal answered")
}

/// Waits until every replica has applied the same values as `reference`.
async fn wait_converged(replicas: &[&Replica], expected_len: usize) -> Vec<String> {
    wait_until_or(
        &format!("replicas converge on {expected_len} values"),
        || {
            let first = replicas[0].toy.values();
            first.len() == expected_len && replicas.iter().all(|r| r.toy.values() == first)
        },
        || describe(replicas),
    )
    .await;
    replicas[0].toy.values()
}

/// Waits until the replicas have settled: they agree on a leader that has
/// applied an entry of its own term (so everything committed before, the
/// entries of proposals that failed with an unknown outcome included, is
/// committed), each has applied all that leader has committed, and all hold
/// the same values; returns those values. Use once nothing is proposing.
async fn wait_settled(replicas: &[&Replica]) -> Vec<String> {
    let mut settled = Vec::new();
    wait_until_or(
        "replicas settle on the leader's commit index",
        || {
            let statuses: Vec<_> = replicas.iter().map(|r| r.handle.status()).collect();
            let Some(leader) = statuses.iter().find(|s| s.is_leader) else {
                return false;
            };
            if !statuses
                .iter()
                .all(|s| s.leader_id == Some(leader.id) && s.applied_index == leader.commit_index)
            {
                return false;
            }
            let first = replicas[0].toy.values();
            if !replicas.iter().all(|r| r.toy.values() == first) {
                return false;
            }
            settled = first;
            true
        },
        || describe(replicas),
    )
    .await;
    settled
}

// ---------------------------------------------------------------- tests

/// (a) election, replication in order, NotLeader on followers;
/// (b) leader loss: a new leader, proposals continue, nothing acknowledged
///     is lost; (c) the stopped replica restarts on its data dir and
///     catches up by snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_replicate_fail_over_and_catch_up_by_snapshot() {
    log::init();
    let dirs = three_dirs();
    let (listeners, peers) = three_listeners().await;
    let mut replicas: HashMap<u64, Replica> = HashMap::new();
    for (id, listener) in listeners {
        let dir = dirs[(id - 1) as usize].path();
        replicas.insert(
            id,
            start_replica(id, listener, &peers, dir, Toy::default()).await,
        );
    }

    // (a) A leader; proposals through it are applied everywhere in order.
    let all: Vec<&Replica> = (1..=3).map(|id| &replicas[&id]).collect();
    let leader = wait_for_leader(&all).await;
    let leader_handle = by_id(&all, leader).handle.clone();
    for i in 0..10 {
        let reply = propose(&leader_handle, &format!("a-{i}")).await.unwrap();
        assert_eq!(reply, (i + 1).to_string().into_bytes());
    }
    // Many at once share fsyncs and entries; each still gets its own
    // command's reply.
    let concurrent: Vec<_> = (10..40)
        .map(|i| {
            let handle = leader_handle.clone();
            tokio::spawn(async move { (i, propose(&handle, &format!("a-{i}")).await) })
        })
        .collect();
    let mut positions = Vec::new();
    for task in concurrent {
        let (i, reply) = task.await.unwrap();
        let position = String::from_utf8(reply.unwrap()).unwrap();
        positions.push((i, position.parse::<usize>().unwrap()));
    }
    let values = wait_converged(&all, 40).await;
    assert_eq!(
        values[..10],
        (0..10).map(|i| format!("a-{i}")).collect::<Vec<_>>()[..]
    );
    for (i, position) in &positions {
        assert_eq!(
            values[position - 1],
            format!("a-{i}"),
            "reply {position} to a-{i}"
        );
    }
    let mut positions: Vec<usize> = positions.into_iter().map(|(_, p)| p).collect();
    positions.sort_unstable();
    assert_eq!(positions, (11..=40).collect::<Vec<_>>());

    // A follower refuses with the leader's id and URL.
    let follower = all.iter().find(|r| r.id != leader).unwrap();
    match propose(&follower.handle, "nope").await {
        Err(ProposeError::NotLeader {
            leader_id,
            leader_url,
        }) => {
            assert_eq!(leader_id, Some(leader));
            assert_eq!(leader_url.as_deref(), Some(peers[&leader].as_str()));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }

    // (b) Proposals run continuously while the leader is stopped.
    let handles: Vec<RaftHandle<Toy>> = all.iter().map(|r| r.handle.clone()).collect();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_proposing = CancellationToken::new();
    let proposer = {
        let acked = acked.clone();
        let stop = stop_proposing.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let Some(handle) = handles.iter().find(|h| {
                    let status = h.status();
                    status.running && status.is_leader
                }) else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let value = format!("b-{i}");
                i += 1;
                if propose(handle, &value).await.is_ok() {
                    acked.lock().unwrap().push(value);
                }
            }
        })
    };
    let acked_count = || acked.lock().unwrap().len();
    wait_until_or(
        "acks before the leader stops",
        || acked_count() >= 20,
        || describe(&all),
    )
    .await;
    drop(all);
    let stopped = replicas.remove(&leader).unwrap();
    let stopped_addr: SocketAddr = peers[&leader]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    stopped.stop().await;
    let before_failover = acked_count();

    let survivors: Vec<&Replica> = replicas.values().collect();
    let new_leader = wait_for_leader(&survivors).await;
    assert_ne!(new_leader, leader);
    // Enough entries that the survivors compact past the stopped log (the
    // 30 concurrent proposals above may have shared a few entries).
    wait_until_or(
        "acks after fail-over",
        || acked_count() >= before_failover + 90,
        || describe(&survivors),
    )
    .await;
    stop_proposing.cancel();
    proposer.await.unwrap();

    let acked: Vec<String> = acked.lock().unwrap().clone();
    // Not `new_leader`'s status: leadership may have moved since (a
    // check_quorum step-down under CPU load), and a follower's commit index
    // can trail the last acknowledged entry.
    let survivor_values = wait_settled(&survivors).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for value in &survivor_values {
        *counts.entry(value.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "a value applied twice");
    for value in &acked {
        assert_eq!(
            counts.get(value.as_str()),
            Some(&1),
            "acknowledged {value} lost"
        );
    }
    assert!(survivors.iter().all(|r| r.toy.applied() > 100));

    // (c) The stopped replica restarts on its data dir, same address, with
    // an empty application: it catches up, and by snapshot, since the
    // survivors compacted the entries it lacks.
    let restarted_toy = Toy::default();
    let listener = listen(stopped_addr).await;
    let restarted = start_replica(
        leader,
        listener,
        &peers,
        dirs[(leader - 1) as usize].path(),
        restarted_toy.clone(),
    )
    .await;
    let restores_at_start = restarted_toy.restores().len();
    replicas.insert(leader, restarted);
    let all: Vec<&Replica> = (1..=3).map(|id| &replicas[&id]).collect();
    let expected = survivor_values.len();
    let values = wait_converged(&all, expected).await;
    assert_eq!(values, survivor_values);
    let restores = restarted_toy.restores();
    assert!(
        restores.len() > restores_at_start,
        "caught up without a snapshot from the leader: {restores:?}"
    );

    // And it keeps replicating.
    let leader = wait_for_leader(&all).await;
    let reply = propose(&by_id(&all, leader).handle, "c-0").await.unwrap();
    assert_eq!(reply, (expected + 1).to_string().into_bytes());
    wait_converged(&all, expected + 1).await;

    drop(all);
    for (_, replica) in replicas {
        replica.stop().await;
    }
}

/// (d) A single voter elects itself at once and applies proposals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_elects_itself_and_applies() {
    log::init();
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy::default();
    let node = start_single(dir.path(), toy.clone()).unwrap();
    let handle = node.handle();
    wait_until("single voter leads", || handle.status().is_leader).await;
    for i in 0..25 {
        let reply = propose(&handle, &format!("v-{i}")).await.unwrap();
        assert_eq!(reply, (i + 1).to_string().into_bytes());
    }
    assert_eq!(toy.values().len(), 25);
    let status = handle.status();
    assert_eq!(status.leader_id, Some(1));
    assert_eq!(status.applied_index, status.commit_index);
    node.stop().await;
    assert!(!handle.status().running);
    assert_eq!(propose(&handle, "late").await, Err(ProposeError::Stopped));
}

fn start_single(dir: &Path, toy: Toy) -> Result<RaftNode<Toy>, RaftError> {
    let db = open_db(dir);
    let config = test_config(1, BTreeMap::from([(1, "http://127.0.0.1:1".into())]), dir);
    RaftNode::start(config, &db, toy, &CancellationToken::new())
}

/// (e) A restarted single node restores its state from its snapshot and
/// log; an application ahead of the log, or a log with a hole, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_state_and_refuses_inconsistent_storage() {
    log::init();
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy::default();
    let node = start_single(dir.path(), toy.clone()).unwrap();
    let handle = node.handle();
    wait_until("single voter leads", || handle.status().is_leader).await;
    for i in 0..50 {
        propose(&handle, &format!("v-{i}")).await.unwrap();
    }
    let before = toy.values();
    let applied_before = handle.status().applied_index;
    node.stop().await;

    // An application that lost its state: snapshot, then the log after it.
    let fresh = Toy::default();
    let node = start_single(dir.path(), fresh.clone()).unwrap();
    let handle = node.handle();
    assert_eq!(
        fresh.restores().len(),
        1,
        "restored from the stored snapshot"
    );
    wait_until("state replayed", || {
        handle.status().applied_index >= applied_before
    })
    .await;
    assert_eq!(fresh.values(), before);
    wait_until("leads again", || handle.status().is_leader).await;
    propose(&handle, "after-restart").await.unwrap();
    let before = fresh.values();
    let applied_before = handle.status().applied_index;
    node.stop().await;

    // An application that kept its state: nothing is applied twice (the
    // toy asserts increasing indexes), nothing restored.
    let node = start_single(dir.path(), fresh.clone()).unwrap();
    let handle = node.handle();
    wait_until("leads again", || handle.status().is_leader).await;
    assert_eq!(fresh.values(), before);
    assert_eq!(fresh.restores().len(), 1);
    assert!(handle.status().applied_index > applied_before);
    node.stop().await;

    // An application ahead of the log: refused.
    let ahead = Toy::default();
    ahead.0.lock().unwrap().applied = applied_before + 100;
    let error = start_single(dir.path(), ahead).err().unwrap();
    let text = error.to_string();
    assert!(matches!(error, RaftError::Inconsistent(_)), "{text}");
    assert!(
        text.contains(&format!("applied index {}", applied_before + 100))
            && text.contains("raft log ends at index"),
        "{text}"
    );

    // A hole in the log: refused.
    {
        let last = *wal_entry_indexes(dir.path()).last().unwrap();
        let mut wal = Wal::open(&dir.path().join("raft-wal"), 1 << 20, &mut |_, _| Ok(())).unwrap();
        wal.push_entry(&Entry {
            index: last + 2,
            term: 1,
            ..Default::default()
        })
        .unwrap();
        wal.sync().unwrap();
    }
    let error = start_single(dir.path(), Toy::default()).err().unwrap();
    assert!(error.to_string().contains("raft log has a gap"), "{error}");
}

/// The indexes of the entry records in the log files of `dir`, in the
/// order written.
fn wal_entry_indexes(dir: &Path) -> Vec<u64> {
    let mut indexes = Vec::new();
    Wal::open(&dir.join("raft-wal"), 1 << 20, &mut |record, _| {
        if let Record::Entry(entry) = record {
            indexes.push(entry.index);
        }
        Ok(())
    })
    .unwrap();
    indexes
}

/// (f) Issue 10 item 8: a snapshot the application cannot take stops the
/// replica with the reason, and the log is not compacted behind an empty
/// snapshot: a restart with a working application replays everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_snapshot_stops_the_replica_and_keeps_the_log() {
    log::init();
    let dir = tempfile::tempdir().unwrap();
    let toy = Toy::default();
    toy.0.lock().unwrap().fail_snapshots = true;
    let node = start_single(dir.path(), toy.clone()).unwrap();
    let handle = node.handle();
    wait_until("single voter leads", || handle.status().is_leader).await;
    // for_test snapshots every 20 entries: the 20th apply asks for one.
    let mut stopped = None;
    for i in 0..40 {
        if let Err(error) = propose(&handle, &format!("v-{i}")).await {
            stopped = Some(error);
            break;
        }
    }
    assert!(
        stopped.is_some(),
        "proposals went on after a failed snapshot"
    );
    wait_until("driver stops", || !handle.status().running).await;
    let status = handle.status();
    assert!(!status.is_leader, "a stopped replica does not lead");
    let fatal = status.fatal.unwrap_or_default();
    assert!(
        fatal.contains("take a snapshot") && fatal.contains("injected snapshot failure"),
        "{fatal}"
    );
    assert_eq!(propose(&handle, "late").await, Err(ProposeError::Stopped));
    let applied = toy.values();
    node.stop().await;

    // Nothing was compacted: the log still starts at index 1, and no
    // snapshot was stored.
    {
        let db = open_db(dir.path());
        let meta = db.open_tree("raft_meta").unwrap();
        assert!(meta.get("snapshot_meta").unwrap().is_none());
        assert!(meta.get("truncated").unwrap().is_none());
    }
    assert_eq!(wal_entry_indexes(dir.path()).first(), Some(&1));
    // A fresh application replays the whole log.
    let fresh = Toy::default();
    let node = start_single(dir.path(), fresh.clone()).unwrap();
    let handle = node.handle();
    wait_until("replayed", || fresh.values().len() >= applied.len()).await;
    assert_eq!(fresh.values()[..applied.len()], applied[..]);
    assert!(fresh.restores().is_empty());
    node.stop().await;
    assert!(
        handle.status().fatal.is_none(),
        "a requested stop is not fatal"
    );
}

/// (g) The cluster id is fixed when the cluster is created: a restart with
/// another `--cluster-name` keeps the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_id_is_stored_at_creation() {
    log::init();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let db = open_db(dir.path());
        let mut config = test_config(
            1,
            BTreeMap::from([(1, "http://127.0.0.1:1".into())]),
            dir.path(),
        );
        config.cluster_name = name.to_string();
        RaftNode::start(config, &db, Toy::default(), &CancellationToken::new()).unwrap()
    };
    let node = start("first");
    let created = node.handle().status().cluster_id;
    assert_eq!(created, gantry_coordinator::raft::cluster_id(&[1], "first"));
    node.stop().await;
    let node = start("second");
    assert_eq!(node.handle().status().cluster_id, created);
    node.stop().await;
}

// ---------------------------------------------------------------- snapshot files (issue 11)

/// Three replicas whose snapshots travel in 64 KiB chunks.
async fn start_chunked_cluster(
    dirs: &[tempfile::TempDir],
) -> (HashMap<u64, Replica>, BTreeMap<u64, String>) {
    let (listeners, peers) = three_listeners().await;
    let mut replicas = HashMap::new();
    for (id, listener) in listeners {
        let dir = dirs[(id - 1) as usize].path();
        let config = RaftConfig {
            snapshot_chunk_bytes: 64 << 10,
            ..test_config(id, peers.clone(), dir)
        };
        replicas.insert(
            id,
            start_replica_with(config, listener, dir, Toy::default()).await,
        );
    }
    (replicas, peers)
}

/// (h) A follower that missed ~4 MiB of state catches up from a snapshot
/// sent in 64 KiB chunks (dozens of them), restoring from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_from_a_snapshot_sent_in_chunks() {
    log::init();
    let dirs = three_dirs();
    let (mut replicas, peers) = start_chunked_cluster(&dirs).await;
    let all: Vec<&Replica> = (1..=3).map(|id| &replicas[&id]).collect();
    let leader = wait_for_leader(&all).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    drop(all);
    let stopped = replicas.remove(&follower).unwrap();
    stopped.stop().await;

    let handle = replicas[&leader].handle.clone();
    let pad = "s".repeat(40 << 10);
    for i in 0..100 {
        propose(&handle, &format!("{i:03}-{pad}")).await.unwrap();
    }
    let snapshots = dirs[(leader - 1) as usize].path().join("raft-snapshots");
    let size = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(size > 3 << 20, "a snapshot of a few MiB: {size} bytes");

    let toy = Toy::default();
    let addr: SocketAddr = peers[&follower]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let config = RaftConfig {
        snapshot_chunk_bytes: 64 << 10,
        ..test_config(
            follower,
            peers.clone(),
            dirs[(follower - 1) as usize].path(),
        )
    };
    let restarted = start_replica_with(
        config,
        listen(addr).await,
        dirs[(follower - 1) as usize].path(),
        toy.clone(),
    )
    .await;
    replicas.insert(follower, restarted);
    let all: Vec<&Replica> = (1..=3).map(|id| &replicas[&id]).collect();
    let values = wait_converged(&all, 100).await;
    assert!(values[99].starts_with("099-"));
    assert!(!toy.restores().is_empty(), "caught up without a snapshot");
    drop(all);
    for (_, replica) in replicas {
        replica.stop().await;
    }
}

/// The transfers a hostile or broken peer may send, against a replica
/// whose peers are itself and a fake replica 2: each is refused with the
/// reason and leaves no file; a sound one is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_transfers_are_checked_before_install() {
    use gantry_proto::raft::SnapshotChunk;
    use gantry_proto::raft::raft_peer_client::RaftPeerClient;
    use protobuf::Message as _;
    use raft::eraftpb::{ConfState, Message, MessageType, Snapshot, SnapshotMetadata};

    log::init();
    let dir = tempfile::tempdir().unwrap();
    let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let peers = BTreeMap::from([(1, url.clone()), (2, "http://127.0.0.1:1".to_string())]);
    let toy = Toy::default();
    let config = RaftConfig {
        max_snapshot_bytes: 1 << 20,
        ..test_config(1, peers, dir.path())
    };
    let replica = start_replica_with(config, listener, dir.path(), toy.clone()).await;
    let cluster_id = replica.handle.status().cluster_id;
    let mut client = RaftPeerClient::connect(url).await.unwrap();
    let snapshots = dir.path().join("raft-snapshots");

    let state = serde_json::to_vec(&["a", "b"]).unwrap();
    let sha = |bytes: &[u8]| {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        out
    };
    let message = |size: u64, sha256: [u8; 32]| {
        let descriptor = gantry_coordinator::raft::snapfile::Descriptor { size, sha256 };
        Message {
            msg_type: MessageType::MsgSnapshot,
            from: 2,
            to: 1,
            term: 5,
            snapshot: Some(Snapshot {
                data: descriptor.encode().into(),
                metadata: Some(SnapshotMetadata {
                    conf_state: Some(ConfState {
                        voters: vec![1, 2],
                        ..Default::default()
                    })
                    .into(),
                    index: 40,
                    term: 5,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap()
    };
    // (sender, declared size, declared SHA-256, chunks, what the refusal says)
    let good = sha(&state);
    type Case<'a> = (&'a str, u64, u64, [u8; 32], Vec<Vec<u8>>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a non-member",
            9,
            state.len() as u64,
            good,
            vec![state.clone()],
            "not a member",
        ),
        (
            "a flipped byte",
            2,
            state.len() as u64,
            good,
            vec![b"[\"a\",\"c\"]".to_vec()],
            "checksum mismatch",
        ),
        (
            "more than declared",
            2,
            state.len() as u64,
            good,
            vec![state.clone(), b"x".to_vec()],
            "run past the declared",
        ),
        (
            "cut short",
            2,
            state.len() as u64,
            good,
            vec![state[..3].to_vec()],
            "ended after 3 of",
        ),
        (
            "over --raft-max-snapshot",
            2,
            2 << 20,
            good,
            vec![],
            "over the limit",
        ),
    ];
    for (name, from, size, sha256, chunks, want) in cases {
        let header = message(size, sha256);
        let mut stream = vec![SnapshotChunk {
            cluster_id,
            from,
            to: 1,
            message: header,
            data: Vec::new(),
        }];
        stream.extend(chunks.into_iter().map(|data| SnapshotChunk {
            data,
            ..Default::default()
        }));
        let status = client
            .install_snapshot(tokio_stream::iter(stream))
            .await
            .expect_err(name);
        assert!(status.message().contains(want), "{name}: {status:?}");
        let left: Vec<_> = std::fs::read_dir(&snapshots).unwrap().collect();
        assert!(left.is_empty(), "{name}: files left: {left:?}");
    }
    assert!(toy.restores().is_empty());

    // A sound transfer, in two chunks: the file is in place and installed.
    let stream = vec![
        SnapshotChunk {
            cluster_id,
            from: 2,
            to: 1,
            message: message(state.len() as u64, good),
            data: state[..4].to_vec(),
        },
        SnapshotChunk {
            data: state[4..].to_vec(),
            ..Default::default()
        },
    ];
    client
        .install_snapshot(tokio_stream::iter(stream))
        .await
        .unwrap();
    wait_until("the snapshot is installed", || toy.restores() == [40]).await;
    assert_eq!(toy.values(), ["a", "b"]);
    replica.stop().await;
}

/// A replica of a version from before `StepStream` (it answers
/// UNIMPLEMENTED) still gets its batches, one `Step` call each: with the
/// third replica never started, nothing is elected or committed unless
/// messages reach it, and the newer replica sends it every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_step_streams_gets_step_calls() {
    log::init();
    let dirs = three_dirs();
    let (listeners, peers) = three_listeners().await;
    let mut replicas = Vec::new();
    for (id, listener) in listeners {
        let serve = match id {
            1 => Serve::Current,
            2 => Serve::WithoutStreams,
            // Never started: replicas 1 and 2 are the quorum.
            _ => continue,
        };
        let dir = dirs[(id - 1) as usize].path();
        let config = test_config(id, peers.clone(), dir);
        replicas.push(start_replica_serving(config, listener, dir, Toy::default(), serve).await);
    }
    let both: Vec<&Replica> = replicas.iter().collect();
    let leader = wait_for_leader(&both).await;
    let handle = by_id(&both, leader).handle.clone();
    for i in 0..20 {
        propose(&handle, &format!("v-{i}")).await.unwrap();
    }
    let values = wait_converged(&both, 20).await;
    assert_eq!(
        values,
        (0..20).map(|i| format!("v-{i}")).collect::<Vec<_>>()
    );
    for replica in replicas {
        replica.stop().await;
    }
}
