//! Starting and stopping a coordinator: bind the listener (port 0 works),
//! start the replica loop (the Raft node, which owns the core) and the gRPC
//! server, and shut them down on one token.
//!
//! **Failure is loud.** If the replica loop stops on its own (a panic, a
//! storage error in the log or the core), the [`Failure`] records why; `/healthz`
//! and `/readyz` answer 503 with the reason, and after [`FATAL_LINGER`] (so
//! probes and load balancers see it) the coordinator shuts down and
//! [`RunningCoordinator::wait`] returns the reason as an error: the process
//! exits non-zero and a supervisor restarts it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry_proto as pb;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Authorized};
use crate::core::{Core, CoreConfig};
use crate::credentials::{Credentials, Loaded, TlsSource};
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::raft::{RaftConfig, RaftNode, RaftStatus};
use crate::service::{AgentLinkService, CoreHandle, GantryService};
use crate::store::Store;

/// Largest gRPC message accepted; bigger submits are refused with a clear
/// INVALID_ARGUMENT by validation rather than a transport error.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Everything needed to start a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// gRPC listen address (port 0 = any).
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for `/metrics`, `/v1` and the status page
    /// (port 0 = any; None = no HTTP).
    pub http_addr: Option<SocketAddr>,
    /// The HTTP base URL clients reach this replica at (`--http-advertise`);
    /// `None` = derived from the bound address ([`http_url`]). Followers
    /// name the leader's in their 503s.
    pub http_advertise: Option<String>,
    /// Storage directory.
    pub data_dir: PathBuf,
    /// Core tunables.
    pub core: CoreConfig,
    /// This replica's id.
    pub id: u64,
    /// All replicas' client URLs by id; empty = a single voter at `grpc_addr`.
    /// Only bootstraps a fresh data dir: later starts follow the stored
    /// membership ([`crate::raft::membership`]).
    pub peers: BTreeMap<u64, String>,
    /// A fresh data dir waits to be added to a cluster (`gantry raft add`)
    /// instead of bootstrapping one (`--join`).
    pub join: bool,
    /// Applied entries between Raft snapshots (None = the default, 10,000).
    pub raft_compact_after: Option<u64>,
    /// Size of the chunks a Raft snapshot is sent in
    /// (`--raft-snapshot-chunk`; default 4 MiB).
    pub raft_snapshot_chunk: Option<usize>,
    /// Largest Raft snapshot written or accepted from a peer
    /// (`--raft-max-snapshot`; default 8 GiB).
    pub raft_max_snapshot: Option<u64>,
    /// TLS of the listener (`None` = plaintext); with a client certificate
    /// verifier, every connection must present a certificate (mutual TLS).
    /// ALPN must offer `h2`.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// TLS for dialing peers (see [`RaftConfig::peer_tls`]).
    pub peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// TLS of the HTTP listener (`None` = plain HTTP). ALPN `http/1.1`; no
    /// client certificates: the JSON API checks bearer tokens instead.
    pub http_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Credentials checked on every call (default: none, development).
    pub auth: AuthConfig,
    /// Mixed into the cluster id when the cluster is created
    /// (`--cluster-name`; see [`crate::raft::cluster_id`]).
    pub cluster_name: String,
    /// Re-reads `tls`, `http_tls`, `peer_tls` and `auth` from their files on SIGHUP or
    /// `gantry reload-credentials` (`None` = reloads are refused).
    pub reloader: Option<crate::credentials::Reloader>,
    /// Free space kept on the data volume: client writes are refused under
    /// it (0 = never; see [`crate::disk`]).
    pub disk_reserve: u64,
    /// Open streams (watches, followed logs) per client
    /// (`--max-streams-per-client`).
    pub max_streams_per_client: usize,
}

impl CoordinatorConfig {
    /// A configuration for tests: loopback, port 0, a single voter.
    pub fn for_test(data_dir: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
            http_advertise: None,
            data_dir,
            core: CoreConfig::default(),
            id: 1,
            peers: BTreeMap::new(),
            join: false,
            raft_compact_after: None,
            raft_snapshot_chunk: None,
            raft_max_snapshot: None,
            tls: None,
            peer_tls: None,
            http_tls: None,
            auth: AuthConfig::default(),
            cluster_name: String::new(),
            reloader: None,
            disk_reserve: crate::disk::DEFAULT_RESERVE_BYTES,
            max_streams_per_client: crate::service::DEFAULT_MAX_STREAMS_PER_CLIENT,
        }
    }
}

/// How long a replica that cannot go on keeps answering (503 on its
/// probes, errors on writes) before it exits: long enough for a probe or a
/// load balancer to see it red, short enough to be restarted soon.
pub const FATAL_LINGER: Duration = Duration::from_secs(3);

/// Why this replica cannot go on (its replica loop stopped on its own),
/// once it cannot. Set once; the first reason wins.
#[derive(Debug, Clone, Default)]
pub struct Failure {
    inner: Arc<FailureInner>,
}

#[derive(Debug, Default)]
struct FailureInner {
    reason: std::sync::OnceLock<String>,
    /// Wakes the watcher (a plain thread may set the failure).
    notify: tokio::sync::Notify,
}

impl Failure {
    /// Records the reason (the first one is kept) and wakes the watcher.
    pub fn set(&self, reason: impl Into<String>) {
        let _ = self.inner.reason.set(reason.into());
        self.inner.notify.notify_one();
    }

    /// The reason, once failed.
    pub fn reason(&self) -> Option<&str> {
        self.inner.reason.get().map(String::as_str)
    }
}

/// A running coordinator.
pub struct RunningCoordinator {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address, when HTTP is served.
    pub http_addr: Option<SocketAddr>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Cancelled to stop; `wait` gives open streams a grace period after it.
    shutdown: CancellationToken,
    /// The replica loop, which owns the core.
    raft: RaftNode<Core>,
    /// Set when the replica loop stopped on its own.
    failure: Failure,
    /// The credentials in force (reloaded on SIGHUP).
    credentials: Arc<Credentials>,
}

impl RunningCoordinator {
    /// The credentials in force, to reload them.
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.clone()
    }

    /// Why this replica cannot go on, once it cannot (it then shuts itself
    /// down after [`FATAL_LINGER`]).
    pub fn failure(&self) -> Option<String> {
        self.failure.reason().map(str::to_string)
    }

    /// Waits until the server and the replica loop have stopped (after the
    /// shutdown token was cancelled). Storage is flushed before it returns.
    /// An error when a part stopped on its own (see [`Failure`]).
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let shutdown = self.shutdown.clone();
        let http = async {
            match self.http {
                Some(http) => finish(http, &shutdown, "http").await,
                None => Some(Ok(Ok(()))),
            }
        };
        let (served, http) = tokio::join!(finish(self.server, &shutdown, "grpc"), http);
        match http {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(error))) => tracing::warn!(%error, "http server stopped with an error"),
            Some(Err(error)) => tracing::warn!(%error, "http server task failed"),
        }
        // Cut off after the grace period: not an error, the streams were
        // told to end by closing their connections.
        let served = served.unwrap_or(Ok(Ok(())));
        // Streaming tasks may still hold the loop's handle: it is stopped
        // on the token, not when the last handle goes.
        self.raft.stop().await;
        if let Some(reason) = self.failure.reason() {
            return Err(CoordinatorError::Unavailable(format!(
                "this replica stopped: {reason}"
            )));
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(CoordinatorError::Unavailable(format!(
                "grpc server: {error}"
            ))),
            Err(error) => Err(CoordinatorError::Unavailable(format!(
                "grpc server task: {error}"
            ))),
        }
    }
}

/// How long open streams (agent links, watches, log follows, HTTP keep-alive)
/// may hold a server up after shutdown: they never end on their own, and a
/// graceful server waits for every connection.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Waits for a server task; once `shutdown` is cancelled, for at most
/// [`SHUTDOWN_GRACE`] more, then aborts it (closing its connections) and
/// returns `None`.
async fn finish<T>(
    mut task: tokio::task::JoinHandle<T>,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<Result<T, tokio::task::JoinError>> {
    tokio::select! {
        done = &mut task => Some(done),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(server = what, "connections still open {SHUTDOWN_GRACE:?} after shutdown; closing them");
            task.abort();
            None
        }
    }
}

/// Longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the gRPC server pings each client connection.
const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is closed.
const SERVER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts connections and completes their TLS handshakes concurrently; a
/// refused handshake (no client certificate, one from another CA, an
/// expired one) is logged with the peer address and the reason.
fn tls_incoming(
    listener: TcpListener,
    tls: TlsSource,
    shutdown: CancellationToken,
) -> impl tokio_stream::Stream<
    Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    use tokio_stream::StreamExt as _;
    ReceiverStream::new(accept_tls(listener, tls, shutdown)).map(|(stream, _)| Ok(stream))
}

/// Plain gRPC connections with Nagle's algorithm off, as the TLS ones
/// ([`accept_tls`]): tonic ignores its own `tcp_nodelay` for a stream of
/// connections it did not accept, and a small response held back until
/// the client acknowledges the last one adds a round trip to each submit
/// and each peer's `Step`.
fn nodelay_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        })
    })
}

/// Connections whose TLS handshake succeeded, with the peer address.
pub(crate) type Handshaken = mpsc::Receiver<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    std::net::SocketAddr,
)>;

/// Accepts connections and completes their handshakes concurrently (shared
/// by the gRPC and the HTTP listener).
pub(crate) fn accept_tls(
    listener: TcpListener,
    tls: TlsSource,
    shutdown: CancellationToken,
) -> Handshaken {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The certificates in force now (they may have been reloaded).
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%peer, %error, "refused: TLS handshake failed");
                    }
                    Err(_) => tracing::warn!(%peer, "refused: TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Opens storage, starts the core and the Raft node, and serves gRPC (the
/// client API, the agent link and the Raft peer service on one port) until
/// `shutdown`.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<RunningCoordinator, CoordinatorError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        CoordinatorError::Unavailable(format!(
            "cannot create data dir {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let listener = TcpListener::bind(config.grpc_addr).await.map_err(|e| {
        CoordinatorError::Unavailable(format!("cannot listen on {}: {e}", config.grpc_addr))
    })?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Unavailable(format!("no local address: {e}")))?;
    // Bind HTTP before anything starts, so a taken port fails the start cleanly.
    let http_listener = match config.http_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            CoordinatorError::Unavailable(format!("cannot listen on {addr} (http): {e}"))
        })?),
        None => None,
    };
    let http_addr =
        match &http_listener {
            Some(listener) => Some(listener.local_addr().map_err(|e| {
                CoordinatorError::Unavailable(format!("no local http address: {e}"))
            })?),
            None => None,
        };

    let store = Store::open(&config.data_dir)?;
    let db = store.db().clone();
    let syncer = store.syncer();
    let (events, _) = broadcast::channel(4096);
    let metrics = Arc::new(Metrics::default());
    let core = Core::new(config.core.clone(), store, events.clone(), metrics.clone())?;
    let failure = Failure::default();

    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let raft_config = if config.join {
        RaftConfig::new(config.id, config.peers.clone())
    } else if config.peers.is_empty() {
        RaftConfig::single(config.id, format!("{scheme}://{grpc_addr}"))
    } else {
        RaftConfig::new(config.id, config.peers.clone())
    };
    let mut raft_config = raft_config;
    raft_config.join = config.join;
    let credentials = Credentials::new(
        Loaded {
            tls: config.tls.clone(),
            http_tls: config.http_tls.clone(),
            peer_tls: config.peer_tls.clone(),
            auth: config.auth.clone(),
        },
        config.reloader.clone(),
    );
    raft_config.peer_tls = credentials.peer_tls();
    raft_config.cluster_name = config.cluster_name.clone();
    raft_config.snapshot_dir = config.data_dir.join(crate::raft::snapfile::DIR_NAME);
    raft_config.wal_dir = config.data_dir.join(crate::raft::wal::DIR_NAME);
    raft_config.syncer = syncer;
    if let Some(bytes) = config.raft_snapshot_chunk {
        raft_config.snapshot_chunk_bytes = bytes;
    }
    if let Some(bytes) = config.raft_max_snapshot {
        raft_config.max_snapshot_bytes = bytes;
    }
    raft_config.http_url = http_addr.map(|bound| http_url(&config, bound));
    if let Some(after) = config.raft_compact_after {
        raft_config.compact_after = after;
        raft_config.compact_keep = raft_config.compact_keep.min(after / 2);
    }
    // The loop thread takes the core over: it applies, answers and ticks it.
    let raft = RaftNode::start(raft_config, &db, core, &shutdown)
        .map_err(|e| CoordinatorError::Unavailable(format!("cannot start replication: {e}")))?;
    if raft.is_single_voter() {
        // A single voter elects itself at once: serve only once it leads, so
        // the first request after start is not refused.
        let mut status = raft.handle().watch_status();
        let led = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            status.wait_for(|s| s.is_leader),
        )
        .await;
        if !matches!(led, Ok(Ok(_))) {
            return Err(CoordinatorError::Unavailable(
                "single-voter replication did not elect itself".into(),
            ));
        }
    }
    let handle = CoreHandle::new(events, raft.handle(), metrics.clone())
        .with_disk_reserve(crate::disk::DiskReserve::new(
            config.data_dir.clone(),
            config.disk_reserve,
        ))
        .with_stream_limit(config.max_streams_per_client);
    tokio::spawn(stop_on_failure(
        raft.handle().watch_status(),
        failure.clone(),
        shutdown.clone(),
    ));
    warn_if_open(&config, grpc_addr, http_addr);
    tokio::spawn(count_leader_changes(
        raft.handle().watch_status(),
        metrics,
        shutdown.clone(),
    ));
    let http = http_listener.map(|listener| {
        tokio::spawn(crate::http::serve(
            listener,
            credentials.http_tls(),
            crate::http::HttpState {
                core: handle.clone(),
                auth: credentials.auth(),
                failure: failure.clone(),
            },
            shutdown.clone(),
        ))
    });

    let gantry = GantryService::new(handle.clone()).with_credentials(credentials.clone());
    let gantry =
        pb::gantry_server::GantryServer::new(gantry).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let agents = pb::agent_link_server::AgentLinkServer::new(AgentLinkService::new(handle))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let peers = raft.handle().peer_service();
    // Every service behind the one credential check (`auth.rs`).
    let auth = credentials.auth();
    let gantry = Authorized::new(gantry, auth.clone());
    let agents = Authorized::new(agents, auth.clone());
    let peers = Authorized::new(peers, auth);
    let router = tonic::transport::Server::builder()
        // A peer's `StepStream` (and an agent's link) lasts as long as its
        // connection: one whose other end vanished without a reset (a
        // partition, a host gone) is closed once a ping goes unanswered,
        // rather than kept with its handler for ever.
        .http2_keepalive_interval(Some(SERVER_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(SERVER_KEEPALIVE_TIMEOUT))
        .layer(crate::rpc_trace::RpcTraceLayer)
        .add_service(gantry)
        .add_service(agents)
        .add_service(peers);
    let server = match credentials.tls() {
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            nodelay_incoming(listener),
            shutdown.clone().cancelled_owned(),
        )),
        Some(tls) => {
            let incoming = tls_incoming(listener, tls, shutdown.clone());
            tokio::spawn(
                router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
            )
        }
    };
    Ok(RunningCoordinator {
        grpc_addr,
        http_addr,
        server,
        http,
        shutdown,
        raft,
        failure,
        credentials,
    })
}

/// The HTTP base URL this replica advertises: `--http-advertise`, else the
/// bound address, with the host of this replica's own peer URL when bound
/// to every interface (`0.0.0.0:7080` is no address to dial).
fn http_url(config: &CoordinatorConfig, bound: SocketAddr) -> String {
    if let Some(url) = &config.http_advertise {
        return url.trim_end_matches('/').to_string();
    }
    let scheme = if config.http_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let peer_host = config
        .peers
        .get(&config.id)
        .and_then(|url| url.split_once("://"))
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once(':').map(|(host, _)| host));
    match peer_host {
        Some(host) if bound.ip().is_unspecified() => {
            format!("{scheme}://{host}:{}", bound.port())
        }
        _ => format!("{scheme}://{bound}"),
    }
}

/// Turns a replica loop that stopped on its own (or another [`Failure`])
/// into a shutdown: the reason is logged at once, the probes answer 503
/// for [`FATAL_LINGER`], then everything stops and `wait` returns the
/// reason.
async fn stop_on_failure(
    mut status: tokio::sync::watch::Receiver<RaftStatus>,
    failure: Failure,
    shutdown: CancellationToken,
) {
    loop {
        let driver_gone = tokio::select! {
            () = shutdown.cancelled() => return,
            () = failure.inner.notify.notified() => false,
            changed = status.changed() => changed.is_err(),
        };
        let current = status.borrow_and_update().clone();
        if let Some(reason) = &current.fatal {
            failure.set(format!("replication stopped: {reason}"));
        } else if (driver_gone || !current.running) && !shutdown.is_cancelled() {
            failure.set("replication stopped before the coordinator did");
        }
        if let Some(reason) = failure.reason() {
            tracing::error!(%reason, linger = ?FATAL_LINGER, "this replica cannot go on: reporting unhealthy, then exiting");
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(FATAL_LINGER) => {}
            }
            shutdown.cancel();
            return;
        }
    }
}

/// Whether a listener is reachable beyond loopback while no credential at
/// all is configured.
fn open_beyond_loopback(auth: &AuthConfig, grpc: SocketAddr, http: Option<SocketAddr>) -> bool {
    !auth.is_secured()
        && (!grpc.ip().is_loopback() || http.is_some_and(|addr| !addr.ip().is_loopback()))
}

/// A warn line when the coordinator listens beyond loopback with no
/// credentials at all: then anyone who reaches the port may use the client
/// API, join as an agent, and send Raft messages as a replica.
fn warn_if_open(config: &CoordinatorConfig, grpc: SocketAddr, http: Option<SocketAddr>) {
    if open_beyond_loopback(&config.auth, grpc, http) {
        tracing::warn!(
            %grpc,
            http = ?http,
            "listening beyond loopback with no credentials: anyone who reaches this port can \
             submit and cancel jobs, join as an agent, and send Raft messages as a replica \
             (the peer service is as open as the client API); configure --tokens, \
             --join-token-file and --tls-client-ca (see README, Security)"
        );
    }
}

/// Counts each change to a new known leader, for `gantry_raft_leader_changes_total`.
async fn count_leader_changes(
    mut status: tokio::sync::watch::Receiver<crate::raft::RaftStatus>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut leader = status.borrow().leader_id;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let now = status.borrow().leader_id;
        if now.is_some() && now != leader {
            metrics.leader_changes.inc();
        }
        if now.is_some() {
            leader = now;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn open_listeners_beyond_loopback() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let open = AuthConfig::default();
        let tokens = AuthConfig {
            join_token: Some("a-join-token-of-16+".into()),
            ..AuthConfig::default()
        };
        let cases = [
            (&open, "127.0.0.1:7070", None, false),
            (&open, "127.0.0.11:7070", Some("127.0.0.1:7080"), false),
            (&open, "[::1]:7070", None, false),
            (&open, "0.0.0.0:7070", None, true),
            (&open, "10.0.0.1:7070", Some("127.0.0.1:7080"), true),
            (&open, "127.0.0.1:7070", Some("0.0.0.0:7080"), true),
            (&tokens, "0.0.0.0:7070", Some("0.0.0.0:7080"), false),
        ];
        for (auth, grpc, http, want) in cases {
            assert_eq!(
                open_beyond_loopback(auth, addr(grpc), http.map(addr)),
                want,
                "{grpc} {http:?}"
            );
        }
    }

    #[test]
    fn the_advertised_http_url() {
        let config = |advertise: Option<&str>, peer: Option<&str>, tls: bool| {
            let mut config = CoordinatorConfig::for_test(PathBuf::from("/nonexistent"));
            config.http_advertise = advertise.map(String::from);
            if let Some(peer) = peer {
                config.peers = BTreeMap::from([(1, peer.to_string())]);
            }
            if tls {
                let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
                config.http_tls = Some(Arc::new(
                    tokio_rustls::rustls::ServerConfig::builder()
                        .with_no_client_auth()
                        .with_cert_resolver(Arc::new(
                            tokio_rustls::rustls::server::ResolvesServerCertUsingSni::new(),
                        )),
                ));
            }
            config
        };
        let cases = [
            // (advertise, own peer URL, https, bound, expected)
            (
                None,
                None,
                false,
                "127.0.0.11:43210",
                "http://127.0.0.11:43210",
            ),
            (None, None, true, "10.0.0.1:7080", "https://10.0.0.1:7080"),
            (
                None,
                Some("http://coord-1.lan:7070"),
                false,
                "0.0.0.0:7080",
                "http://coord-1.lan:7080",
            ),
            (
                None,
                Some("http://[fd00::1]:7070"),
                false,
                "[::]:7080",
                "http://[fd00::1]:7080",
            ),
            (
                None,
                Some("http://coord-1.lan:7070"),
                false,
                "10.0.0.1:7080",
                "http://10.0.0.1:7080",
            ),
            (
                Some("https://api.example/"),
                None,
                false,
                "0.0.0.0:7080",
                "https://api.example",
            ),
        ];
        for (advertise, peer, tls, bound, want) in cases {
            let config = config(advertise, peer, tls);
            let bound = bound.parse::<SocketAddr>().unwrap();
            assert_eq!(
                http_url(&config, bound),
                want,
                "{advertise:?} {peer:?} {bound}"
            );
        }
    }

    #[test]
    fn a_failure_keeps_its_first_reason() {
        let failure = Failure::default();
        assert_eq!(failure.reason(), None);
        failure.set("first");
        failure.set("second");
        assert_eq!(failure.reason(), Some("first"));
    }
}
