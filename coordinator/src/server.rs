//! Starting and stopping a coordinator: bind the listeners (port 0 works),
//! start the core thread and the gRPC server, and shut both down on one token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;

use gantry_proto as pb;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::core::{Core, CoreConfig};
use crate::error::CoordinatorError;
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
    /// Storage directory.
    pub data_dir: PathBuf,
    /// Core tunables.
    pub core: CoreConfig,
}

impl CoordinatorConfig {
    /// A configuration for tests: loopback, port 0.
    pub fn for_test(data_dir: PathBuf) -> CoordinatorConfig {
        CoordinatorConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            core: CoreConfig::default(),
        }
    }
}

/// A running coordinator.
pub struct RunningCoordinator {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    core: std::thread::JoinHandle<()>,
}

impl RunningCoordinator {
    /// Waits until the server and the core have stopped (after the shutdown
    /// token was cancelled). The core flushes storage before it returns.
    pub async fn wait(self) -> Result<(), CoordinatorError> {
        let served = self.server.await;
        let core = self.core;
        tokio::task::spawn_blocking(move || core.join()).await.ok();
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

/// Opens storage, starts the core and serves gRPC until `shutdown`.
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
    let store = Store::open(&config.data_dir)?;
    let (events, _) = broadcast::channel(4096);
    let core = Core::new(config.core.clone(), store, events.clone())?;
    let (requests, inbox) = std_mpsc::channel();
    let core_thread = std::thread::Builder::new()
        .name("gantry-core".into())
        .spawn(move || core.run(inbox))
        .map_err(|e| CoordinatorError::Unavailable(format!("cannot start core thread: {e}")))?;
    let handle = CoreHandle::new(requests, events);

    let listener = TcpListener::bind(config.grpc_addr).await.map_err(|e| {
        CoordinatorError::Unavailable(format!("cannot listen on {}: {e}", config.grpc_addr))
    })?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Unavailable(format!("no local address: {e}")))?;
    let gantry = pb::gantry_server::GantryServer::new(GantryService::new(handle.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let agents = pb::agent_link_server::AgentLinkServer::new(AgentLinkService::new(handle))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(gantry)
            .add_service(agents)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
    });
    // The core stops when the last request sender (held by the services) is
    // dropped, which happens once the server has shut down.
    Ok(RunningCoordinator {
        grpc_addr,
        server,
        core: core_thread,
    })
}
