//! The daemons: `gantry coordinator`, `gantry agent`, `gantry dev`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use gantry_agent::{AgentConfig, GpuSource};
use gantry_coordinator::CoordinatorConfig;
use gantry_coordinator::core::CoreConfig;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

/// Reloads the credentials on every SIGHUP until `shutdown`; a reload that
/// fails keeps the previous credentials and says why at error level.
fn reload_on_sighup(
    credentials: std::sync::Arc<gantry_coordinator::credentials::Credentials>,
    shutdown: CancellationToken,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: credentials reload only through gantry reload-credentials");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                hangup = hangups.recv() => if hangup.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading credentials");
            if let Err(error) = credentials.reload().await {
                tracing::error!(%error, "credentials not reloaded");
            }
        }
    });
}

/// How clients reach the client API and how much of it one may hold.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientApiArgs {
    /// HTTP base URL clients reach this replica at, e.g.
    /// https://coord-1.example:7080 (default: the bound --http-addr, with
    /// the host of this replica's --peers URL when bound to 0.0.0.0).
    /// Followers name the leader's in their 503s, so HTTP clients follow it.
    #[arg(long, value_parser = parse_http_url)]
    pub http_advertise: Option<String>,
    /// Streams (event watches, followed logs; gRPC and HTTP together) one
    /// client may hold open at once: per token, or per address without
    /// tokens. Past it a new stream is refused (429 / RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = gantry_coordinator::service::DEFAULT_MAX_STREAMS_PER_CLIENT, value_parser = parse_stream_limit)]
    pub max_streams_per_client: usize,
}

impl Default for ClientApiArgs {
    fn default() -> ClientApiArgs {
        ClientApiArgs {
            http_advertise: None,
            max_streams_per_client: gantry_coordinator::service::DEFAULT_MAX_STREAMS_PER_CLIENT,
        }
    }
}

/// `--max-streams-per-client`: 1 to 100,000.
fn parse_stream_limit(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?} is not a number of streams from 1 to 100000"
        )),
    }
}

/// `--http-advertise`: an http(s) URL with a host.
fn parse_http_url(text: &str) -> Result<String, String> {
    let url = text.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.len() > 256 || rest.contains(|c: char| c.is_whitespace() || c == '/')
    {
        return Err(format!("{url:?} is not a base URL (http://HOST:PORT)"));
    }
    Ok(url.to_string())
}

/// Options shared by the coordinator and `gantry dev`.
pub struct CoordinatorOptions {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (None = no HTTP).
    pub http_addr: Option<SocketAddr>,
    /// Storage directory.
    pub data_dir: PathBuf,
    /// Memory kept free on each GPU.
    pub gpu_headroom: u64,
    /// Replica id.
    pub id: u64,
    /// Replicas' client URLs by id (empty = a single voter).
    pub peers: BTreeMap<u64, String>,
    /// `--join`: a fresh data dir waits to be added (`gantry raft add`).
    pub join: bool,
    /// `--cluster-name` (mixed into a new cluster's id).
    pub cluster_name: String,
    /// Stderr signatures of GPU out-of-memory deaths (empty = the defaults).
    pub oom_signatures: Vec<String>,
    /// Applied entries between Raft snapshots (None = the default).
    pub raft_compact_after: Option<u64>,
    /// `--raft-snapshot-chunk` (None = the default, 4 MiB).
    pub raft_snapshot_chunk: Option<usize>,
    /// `--raft-max-snapshot` (None = the default, 8 GiB).
    pub raft_max_snapshot: Option<u64>,
    /// Heartbeats per second before the interval stretches (None = the default).
    pub max_heartbeat_rate: Option<u32>,
    /// Fleet inventory.
    pub inventory: Vec<gantry_coordinator::core::InventoryHost>,
    /// Refuse agents not in the inventory.
    pub strict_inventory: bool,
    /// TLS and credentials (default: none).
    pub security: crate::security::CoordinatorSecurity,
    /// Reads `security` again from its files (SIGHUP).
    pub reloader: Option<gantry_coordinator::credentials::Reloader>,
    /// Free space kept on the data volume (`--disk-reserve`).
    pub disk_reserve: u64,
    /// Retention of finished work (validated).
    pub retention: gantry_coordinator::state::RetentionPolicy,
    /// Queue weights and disk thresholds (default: none).
    pub policy: crate::policy::SchedulingPolicy,
    /// The advertised HTTP URL and the per-client stream limit.
    pub client_api: ClientApiArgs,
}

fn coordinator_config(options: &CoordinatorOptions) -> CoordinatorConfig {
    let mut core = CoreConfig {
        id: options.id.to_string(),
        gpu_headroom: options.gpu_headroom,
        ..CoreConfig::default()
    };
    if !options.oom_signatures.is_empty() {
        core.oom_signatures = options.oom_signatures.clone();
    }
    if let Some(rate) = options.max_heartbeat_rate {
        core.max_heartbeat_rate = rate;
    }
    core.inventory = options.inventory.clone();
    core.strict_inventory = options.strict_inventory;
    core.retention = options.retention;
    core.queue_weights = options.policy.queue_weights.clone();
    core.disk_thresholds = options.policy.disk_thresholds.clone();
    core.breaker = options.policy.breaker;
    CoordinatorConfig {
        grpc_addr: options.grpc_addr,
        http_addr: options.http_addr,
        data_dir: options.data_dir.clone(),
        core,
        id: options.id,
        peers: options.peers.clone(),
        join: options.join,
        raft_compact_after: options.raft_compact_after,
        raft_snapshot_chunk: options.raft_snapshot_chunk,
        raft_max_snapshot: options.raft_max_snapshot,
        tls: options.security.tls.clone(),
        peer_tls: options.security.peer_tls.clone(),
        http_tls: options.security.http_tls.clone(),
        auth: options.security.auth.clone(),
        cluster_name: options.cluster_name.clone(),
        reloader: options.reloader.clone(),
        disk_reserve: options.disk_reserve,
        http_advertise: options.client_api.http_advertise.clone(),
        max_streams_per_client: options.client_api.max_streams_per_client,
    }
}

/// `gantry coordinator`.
pub async fn run_coordinator(options: CoordinatorOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let running = gantry_coordinator::start(coordinator_config(&options), shutdown.clone())
        .await
        .context("cannot start the coordinator")?;
    print_listening(&running);
    reload_on_sighup(running.credentials(), shutdown.clone());
    tracing::info!(grpc = %running.grpc_addr, http = ?running.http_addr, data_dir = %options.data_dir.display(), "coordinator serving");
    running.wait().await?;
    Ok(())
}

/// Options of `gantry agent` (and the agent inside `gantry dev`).
pub struct AgentOptions {
    /// Node name.
    pub node_name: String,
    /// Advertised address.
    pub address: String,
    /// Coordinator URLs.
    pub coordinators: Vec<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `--fake-gpus`, if given.
    pub fake_gpus: Option<String>,
    /// TLS, join token, job user (default: none).
    pub security: crate::security::AgentSecurity,
    /// Stop the jobs on a graceful exit instead of leaving them for the
    /// next agent process.
    pub stop_jobs_on_exit: bool,
}

fn agent_config(options: AgentOptions) -> anyhow::Result<AgentConfig> {
    let gpus = match &options.fake_gpus {
        Some(text) => GpuSource::Fake(
            gantry_agent::parse_fake_gpus(text).map_err(|e| anyhow::anyhow!("--fake-gpus: {e}"))?,
        ),
        None => GpuSource::Nvml,
    };
    if options.coordinators.is_empty() {
        bail!("--coordinators: at least one coordinator URL is needed");
    }
    let mut config =
        AgentConfig::for_test(&options.node_name, options.data_dir, options.coordinators);
    config.address = options.address;
    config.labels = options.labels;
    config.gpus = gpus;
    config.heartbeat_interval = Duration::from_secs(1);
    config.kill_grace = Duration::from_secs(5);
    config.tls = options.security.tls;
    config.join_token = options.security.join_token.map(gantry_agent::JoinToken);
    config.run_as = options.security.run_as;
    config.stop_jobs_on_exit = options.stop_jobs_on_exit;
    Ok(config)
}

/// `gantry agent`.
pub async fn run_agent(options: AgentOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let name = options.node_name.clone();
    let config = agent_config(options)?;
    println!("agent node={name}");
    gantry_agent::run(config, shutdown)
        .await
        .context("agent failed")?;
    Ok(())
}

/// `gantry dev`: a coordinator and one agent in this process.
pub async fn run_dev(options: CoordinatorOptions, fake_gpus: Option<String>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let coordinator_dir = options.data_dir.join("coordinator");
    let agent_dir = options.data_dir.join("agent");
    let coordinator_options = CoordinatorOptions {
        data_dir: coordinator_dir,
        ..options
    };
    let running =
        gantry_coordinator::start(coordinator_config(&coordinator_options), shutdown.clone())
            .await
            .context("cannot start the coordinator")?;
    let url = format!("http://{}", running.grpc_addr);

    // Fake GPUs unless asked otherwise or a real driver answers.
    let fake_gpus = match fake_gpus {
        Some(text) => Some(text),
        None => match gantry_agent::probe_gpus(&GpuSource::Nvml) {
            Ok(gpus) if !gpus.is_empty() => None,
            _ => Some("2xH100-80GiB".to_string()),
        },
    };
    let gpu_text = fake_gpus.clone().map_or_else(
        || "real GPUs (NVML)".to_string(),
        |f| format!("fake GPUs {f}"),
    );
    let node_name = hostname();
    let agent = agent_config(AgentOptions {
        node_name: node_name.clone(),
        address: "127.0.0.1".into(),
        coordinators: vec![url.clone()],
        data_dir: agent_dir,
        labels: BTreeMap::from([("provider".to_string(), "local".to_string())]),
        fake_gpus,
        security: Default::default(),
        // One process for everything: Ctrl-C leaves nothing running.
        stop_jobs_on_exit: true,
    })?;
    let agent_task = tokio::spawn(gantry_agent::run(agent, shutdown.clone()));

    print_listening(&running);
    if let Some(http) = running.http_addr {
        println!("status page: http://{http}/  (metrics: http://{http}/metrics)");
    }
    println!(
        "gantry dev: coordinator at {url}, agent {node_name} with {gpu_text}, data in {}",
        coordinator_options
            .data_dir
            .parent()
            .unwrap_or(&coordinator_options.data_dir)
            .display()
    );
    println!(
        "try:  GANTRY_ADDR={url} gantry submit --kind selfplay --gpus 1 --gpu-memory 8GiB --batch-tiers 32GiB:512,16GiB:256,128 -- sh -c 'echo batch {{batch_size}} on GPU $CUDA_VISIBLE_DEVICES'"
    );
    println!("      GANTRY_ADDR={url} gantry jobs");
    println!("press Ctrl-C to stop (running jobs are stopped, storage is flushed)");

    match agent_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::error!(%error, "agent failed");
            shutdown.cancel();
        }
        Err(error) => {
            tracing::error!(%error, "agent task failed");
            shutdown.cancel();
        }
    }
    running.wait().await?;
    println!("gantry dev: stopped");
    Ok(())
}

/// The bound addresses, one line each (tests and scripts read them).
fn print_listening(running: &gantry_coordinator::RunningCoordinator) {
    println!("listening grpc={}", running.grpc_addr);
    if let Some(http) = running.http_addr {
        println!("listening http={http}");
    }
}

/// This machine's host name, for the dev node.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dev-node".to_string())
}
