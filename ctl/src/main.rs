//! `gantry`: the one binary. Daemons (`coordinator`, `agent`, `dev`) and the
//! client commands (`submit`, `jobs`, `job`, `logs`, `cancel`, `nodes`,
//! `drain`, `undrain`, `status`, `watch`).
//!
//! Layout: `daemon.rs` starts daemons, `client.rs` finds the cluster and maps
//! failures to exit codes, `submit.rs` retries a submit with its key,
//! `spec.rs` parses job files (`yaml_limits.rs` bounds them first),
//! `output.rs` escapes and prints.

mod backup;
mod certs;
mod client;
mod config;
mod daemon;
mod inventory;
mod output;
mod policy;
mod raft;
mod retention;
mod security;
mod spec;
mod streams;
mod submit;
mod yaml_limits;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gantry_proto as pb;
use gantry_scheduler::units::parse_bytes;

use client::{CliError, exit};
use output::{Format, escape, outln};

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "GPU-aware job scheduler for ML self-play pipelines"
)]
struct Cli {
    /// Log format of daemons: one line per event (text), multi-line for
    /// people (pretty), or one JSON object per line with the event's spans
    /// (json). `RUST_LOG` sets the filter (default `info`).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// One line per event, spans as `job{job_id=7 attempt=1}:` prefixes.
    Text,
    /// Multi-line, for people at a terminal.
    Pretty,
    /// One JSON object per line, with `span` and `spans` fields.
    Json,
}

#[derive(Args, Clone)]
struct ClientOpts {
    /// Coordinator address(es), comma-separated.
    #[arg(
        long,
        env = "GANTRY_ADDR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    addr: String,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "table",
        global = true
    )]
    output: Format,
    /// Bearer token (prefer the GANTRY_TOKEN variable: flags show in `ps`).
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// CA certificate (PEM) of the coordinators; turns on TLS (https://).
    #[arg(long, env = "GANTRY_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "GANTRY_TLS_CERT", global = true)]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "GANTRY_TLS_KEY", global = true)]
    tls_key: Option<PathBuf>,
}

/// TLS and credentials of a coordinator (all also in its --config file).
#[derive(Args, Clone, Default)]
struct CoordinatorSecurityArgs {
    /// Serve TLS with this certificate (PEM; also presented to peers).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS) from
    /// clients, agents and peers.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// CA of the peers' certificates, to dial https:// peers.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client bearer tokens (YAML list of {name, token, role: user|admin});
    /// without it the client API is open.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// File holding the token agents must present; without it any agent may connect.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
}

/// TLS, join token and job user of an agent.
#[derive(Args, Clone, Default)]
struct AgentSecurityArgs {
    /// CA certificate (PEM) of the coordinators; turns on TLS (https://).
    #[arg(long, env = "GANTRY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Agent certificate (PEM) for mutual TLS.
    #[arg(long, env = "GANTRY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Agent private key (PEM) for mutual TLS.
    #[arg(long, env = "GANTRY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// File holding the coordinator's join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// The join token itself, from GANTRY_JOIN_TOKEN (--join-token-file wins).
    #[arg(
        long = "join-token-env",
        env = "GANTRY_JOIN_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// Run jobs as this user (name or uid); the agent must run as root.
    #[arg(long)]
    run_as: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator.
    Coordinator {
        /// Settings file (YAML: id, peers, grpc_addr, data_dir, gpu_headroom,
        /// oom_signatures, max_heartbeat_rate, queue_weights,
        /// disk_thresholds, breaker); flags win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// gRPC listen address (port 0 = any; the bound address is printed).
        /// Default 127.0.0.1:7070.
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// HTTP listen address for /metrics, /v1, /healthz, /readyz and the
        /// status page (port 0 = any; `off` = no HTTP). Default 127.0.0.1:7080.
        #[arg(long)]
        http_addr: Option<String>,
        /// Storage directory (default ./gantry-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Memory kept free on every GPU, e.g. 1GiB (default 0).
        #[arg(long, value_parser = parse_size_arg)]
        gpu_headroom: Option<u64>,
        /// Applied entries between Raft snapshots (default 10000).
        #[arg(long)]
        raft_compact_after: Option<u64>,
        /// Size of the chunks a Raft snapshot is sent to a lagging replica
        /// in, e.g. 4MiB (the default; at most 16MiB).
        #[arg(long, value_parser = parse_size_arg)]
        raft_snapshot_chunk: Option<u64>,
        /// Largest Raft snapshot written or accepted from a peer, e.g.
        /// 8GiB (the default).
        #[arg(long, value_parser = parse_size_arg)]
        raft_max_snapshot: Option<u64>,
        /// Heartbeats per second the leader ingests at most (default 10000):
        /// past that many nodes the heartbeat interval stretches to
        /// nodes / rate seconds (never below 1 s) and agents are told.
        #[arg(long)]
        max_heartbeat_rate: Option<u32>,
        /// Fleet inventory (hosts.yaml): listed nodes that never registered show as missing.
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Refuse agents that are not in the inventory.
        #[arg(long, requires = "inventory")]
        strict_inventory: bool,
        /// Stderr text that marks a GPU out-of-memory death (repeatable;
        /// replaces the defaults: "CUDA out of memory", "OutOfMemoryError",
        /// "CUBLAS_STATUS_ALLOC_FAILED").
        #[arg(long = "oom-signature")]
        oom_signatures: Vec<String>,
        /// This replica's id (one of the ids in --peers).
        #[arg(long)]
        id: Option<u64>,
        /// All replicas, ID=URL[,ID=URL...], e.g. 1=http://10.0.0.1:7070,2=...;
        /// without it the coordinator is a single voter.
        #[arg(long)]
        peers: Option<String>,
        /// Start on an empty --data-dir as a replica waiting to be added
        /// to a running cluster (`gantry raft add ID URL` on the leader)
        /// rather than bootstrapping a cluster; --peers is not needed.
        #[arg(long)]
        join: bool,
        /// Name mixed into the cluster id when the cluster is created (give
        /// clusters with the same replica ids on one network distinct
        /// names); later starts use the stored id and ignore it.
        #[arg(long, default_value = "")]
        cluster_name: String,
        /// Start a new single-voter cluster from this backup (`gantry
        /// snapshot save`) in an empty --data-dir; refuses a damaged file.
        #[arg(long)]
        restore: Option<PathBuf>,
        /// Free space kept on the data volume: client writes (submit,
        /// cancel, drain, ...) are refused below it, reads go on
        /// (default 64MiB; 0 = never refuse).
        #[arg(long, value_parser = parse_size_arg)]
        disk_reserve: Option<u64>,
        #[command(flatten)]
        retention: retention::RetentionArgs,
        #[command(flatten)]
        security: CoordinatorSecurityArgs,
        // Boxed: the breaker's flags made this variant many times the size
        // of the others.
        #[command(flatten)]
        policy: Box<policy::PolicyArgs>,
        #[command(flatten)]
        client_api: daemon::ClientApiArgs,
    },
    /// Run an agent on a GPU node.
    Agent {
        /// Coordinator URL(s), comma-separated.
        #[arg(
            long,
            env = "GANTRY_COORDINATORS",
            default_value = "http://127.0.0.1:7070"
        )]
        coordinators: String,
        /// Node name (default: host name).
        #[arg(long)]
        name: Option<String>,
        /// Address advertised to the coordinator.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
        /// Where job output and work directories live.
        #[arg(long, default_value = "./gantry-agent-data")]
        data_dir: PathBuf,
        /// Node labels, e.g. provider=lambda (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Ports `MASTER_PORT` is chosen from for gangs whose rank 0 runs
        /// here, LOW-HIGH inclusive (default 29500-29999). Registered as
        /// the node label gantry-master-port-range.
        #[arg(long, value_parser = parse_master_port_range)]
        master_port_range: Option<String>,
        /// Fake GPUs instead of NVML, e.g. 2xH100-80GiB,1xRTX4090-24GiB.
        #[arg(long)]
        fake_gpus: Option<String>,
        /// Print what the GPU probe finds and exit.
        #[arg(long)]
        probe: bool,
        /// Stop the jobs on a graceful exit (SIGTERM, Ctrl-C). Without it they
        /// keep running and the next agent started on this data dir adopts them.
        #[arg(long)]
        stop_jobs_on_exit: bool,
        #[command(flatten)]
        security: AgentSecurityArgs,
    },
    /// Internal: the per-attempt job supervisor the agent starts.
    #[command(hide = true)]
    Supervise { attempt_dir: PathBuf },
    /// A whole cluster in one process: coordinator, one agent, storage in ./gantry-data.
    Dev {
        /// gRPC listen address.
        #[arg(long, default_value = "127.0.0.1:7070")]
        grpc_addr: SocketAddr,
        /// HTTP listen address for /metrics, /v1, /healthz, /readyz and the
        /// status page (port 0 = any; `off` = no HTTP). Default 127.0.0.1:7080.
        #[arg(long)]
        http_addr: Option<String>,
        /// Storage directory.
        #[arg(long, default_value = "./gantry-data")]
        data_dir: PathBuf,
        /// Fake GPUs (default 2xH100-80GiB when no NVIDIA driver answers).
        #[arg(long)]
        fake_gpus: Option<String>,
    },
    /// Submit jobs from flags or a spec file.
    Submit(SubmitArgs),
    /// List jobs.
    Jobs {
        /// Only jobs in these states (comma-separated).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Most jobs shown (0 = all); when more exist, stderr says so.
        #[arg(long, default_value = "100")]
        limit: u32,
        /// Only the jobs submitted with my token (GANTRY_TOKEN); not with
        /// --since (the history is listed whole).
        #[arg(long, conflicts_with = "since")]
        mine: bool,
        /// Jobs updated in the last DURATION (e.g. 2d), newest first, the
        /// history of retired jobs included; one page of --limit jobs.
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<u64>,
        /// The next page of a --since listing (stderr prints the token).
        #[arg(long, value_name = "TOKEN", requires = "since")]
        page: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one job.
    Job {
        /// Job id.
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Print a job's output.
    Logs {
        /// Job id.
        id: u64,
        /// Keep printing until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Attempt (default: the latest).
        #[arg(long, default_value = "0")]
        attempt: u32,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel a job (its whole process tree is stopped). Waits up to 10 s
    /// for its node to confirm: exit 0 once nothing of it runs or starts
    /// any more, exit 5 ("cancelling") when its agent has not confirmed.
    Cancel {
        /// Job id.
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List nodes.
    Nodes {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Stop new placements on a node; with --deadline, stop its remaining
    /// jobs at the deadline so they are retried elsewhere.
    Drain {
        /// Node name.
        node: String,
        /// After this long (e.g. 30s, 30m, 2h), jobs still running on the
        /// node are stopped and placed elsewhere without using up an attempt.
        /// Given again, it replaces the earlier deadline.
        #[arg(long, value_name = "DURATION", value_parser = parse_deadline, allow_hyphen_values = true)]
        deadline: Option<u64>,
        /// Wait until the node runs no jobs.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Allow placements on a drained node again.
    Undrain {
        /// Node name.
        node: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cluster summary.
    Status {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Stream job events as they happen.
    Watch {
        /// Only this job.
        #[arg(long)]
        job: Option<u64>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only jobs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Start from this event index (default: new events only).
        #[arg(long)]
        from: Option<u64>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Fleet inventory tools.
    Inventory {
        #[command(subcommand)]
        action: InventoryAction,
    },
    /// Re-read the token file, the join token and the TLS certificates of
    /// the coordinator at --addr (admin; also SIGHUP).
    ReloadCredentials {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Backups of the hard state (restore with `gantry coordinator --restore`).
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// The replica set at run time: list, add, remove replicas (admin).
    Raft {
        #[command(subcommand)]
        action: RaftAction,
    },
    /// Development certificates and tokens.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// GPUs: clear one GPU's fault (`gantry undrain` clears every GPU).
    Gpu {
        #[command(subcommand)]
        action: GpuAction,
    },
    /// Dead-letter queue: jobs whose attempts are exhausted.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Show one run of a pipeline as a DAG with states, each stage's
    /// queue wait, the latest runs and the loop's status; `gantry pipeline
    /// stop NAME` ends a repeating pipeline's loop.
    #[command(args_conflicts_with_subcommands = true)]
    Pipeline {
        #[command(subcommand)]
        action: Option<PipelineAction>,
        /// Pipeline name.
        #[arg(required = true)]
        name: Option<String>,
        /// Run number (default: the latest).
        #[arg(long, default_value = "0")]
        run: u32,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum InventoryAction {
    /// Validate an inventory file (hosts.yaml) and summarise it.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Write a development CA, certificates for a coordinator, an agent and
    /// a client, a join token and a token file (admin + user) into --dir.
    Init {
        /// Output directory (existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Extra coordinator host name or IP (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value = "365")]
        days: u32,
    },
}

#[derive(Subcommand)]
enum RaftAction {
    /// The replicas: id, address, role, leader, match index, last contact.
    Members {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Add a replica started with `gantry coordinator --join --id ID`: it
    /// joins as a learner and becomes a voter once it has caught up.
    Add {
        /// Its raft id (not used by any replica, present or past).
        id: u64,
        /// Its gRPC URL, e.g. http://10.0.0.4:7070.
        url: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Remove a replica (also a dead one), unless that would lose quorum.
    Remove {
        /// Its raft id.
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Replace voter OLD (also a dead one) by a replica started with
    /// `gantry coordinator --join --id NEW`: NEW joins as a learner and,
    /// once caught up, one joint change makes it a voter and removes OLD.
    Replace {
        /// The voter that leaves.
        old: u64,
        /// The new replica's raft id (never used before).
        new: u64,
        /// Its gRPC URL, e.g. http://10.0.0.4:7070.
        url: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Save a consistent copy of the hard state of the replica at --addr
    /// (any replica; admin token) to FILE, checksummed, written atomically.
    Save {
        /// Where to write the backup.
        file: PathBuf,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum GpuAction {
    /// Clear a GPU's fault (an XID, ECC errors, pages pending retirement)
    /// so it takes placements again.
    Reset {
        /// Node name.
        node: String,
        /// GPU index.
        gpu: u32,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum PipelineAction {
    /// End a repeating pipeline's loop after its current run (admin or the
    /// pipeline's owner).
    Stop {
        /// Pipeline name.
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead-lettered jobs.
    List {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show a dead-lettered job with its last error and stderr tail.
    Show {
        /// Job id.
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Retry a dead-lettered job (optionally with a corrected spec) and unblock its dependants.
    Retry {
        /// Job id.
        id: u64,
        /// Corrected spec file (one job, same name).
        #[arg(short = 'f', long = "file")]
        file: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Drop a dead-lettered job (it becomes cancelled; dependants stay blocked).
    Drop {
        /// Job id.
        id: u64,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Args)]
struct SubmitArgs {
    /// Spec file (`-` = stdin); one job, a list, `---` documents, or a pipeline.
    #[arg(short = 'f', long = "file", conflicts_with = "command")]
    file: Option<String>,
    /// Job name.
    #[arg(long)]
    name: Option<String>,
    /// selfplay | export | training | evaluation | promotion | generic
    #[arg(long)]
    kind: Option<String>,
    /// GPUs.
    #[arg(long)]
    gpus: Option<u32>,
    /// GPU memory per GPU, e.g. 8GiB.
    #[arg(long)]
    gpu_memory: Option<String>,
    /// CPUs, e.g. 4 or 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// Host memory, e.g. 16GiB.
    #[arg(long)]
    memory: Option<String>,
    /// Batch size from free GPU memory: MIN_FREE:SIZE,...,SIZE
    /// (e.g. 32GiB:512,16GiB:256,128); `{batch_size}` in the command is replaced.
    #[arg(long, value_parser = parse_batch_tiers)]
    batch_tiers: Option<BatchTiers>,
    /// Environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_label)]
    env: Vec<(String, String)>,
    /// Priority (higher first).
    #[arg(long)]
    priority: Option<i32>,
    /// Attempts before giving up.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Time limit, e.g. 6h.
    #[arg(long)]
    timeout: Option<String>,
    /// Run the command through /bin/sh -c.
    #[arg(long)]
    shell: bool,
    /// Idempotency key: resubmitting with the same key returns the same ids.
    /// Without it a random key is used (and printed if the outcome is unknown).
    #[arg(long)]
    key: Option<String>,
    /// How long to keep retrying (same key) through a failover, an election
    /// or a broken connection, e.g. 30s, 2m; 0 = one attempt.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_retry_for)]
    retry_for: u64,
    #[command(flatten)]
    client: ClientOpts,
    /// The command, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `--deadline`: a positive duration (`30s`, `30m`, `2h`), in milliseconds.
fn parse_deadline(text: &str) -> Result<u64, String> {
    let ms = gantry_scheduler::units::parse_duration_ms(text)
        .map_err(|e| format!("--deadline: {e} (e.g. 30s, 30m, 2h)"))?;
    if ms == 0 {
        return Err("--deadline: must be more than zero (e.g. 30s, 30m, 2h)".into());
    }
    Ok(ms)
}

/// `--since`: a positive duration back from now, in milliseconds.
fn parse_since(text: &str) -> Result<u64, String> {
    match gantry_scheduler::units::parse_duration_ms(text) {
        Ok(0) => Err("--since: must be more than zero (e.g. 2h, 2d)".into()),
        Ok(ms) => Ok(ms),
        Err(e) => Err(format!("--since: {e} (e.g. 2h, 2d)")),
    }
}

/// `--retry-for`: a duration (`30s`, `2m`) in milliseconds; 0 is allowed
/// and means a single attempt.
fn parse_retry_for(text: &str) -> Result<u64, String> {
    gantry_scheduler::units::parse_duration_ms(text)
        .map_err(|e| format!("--retry-for: {e} (e.g. 30s, 2m, or 0 for one attempt)"))
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_bytes(text).map_err(|e| e.to_string())
}

/// `--batch-tiers` parsed (a newtype: clap treats a bare `Vec` as many values).
#[derive(Clone, Debug)]
struct BatchTiers(Vec<pb::BatchTier>);

fn parse_batch_tiers(text: &str) -> Result<BatchTiers, String> {
    text.split(',')
        .map(|tier| {
            let (min_free, size) = match tier.split_once(':') {
                Some((min, size)) => (
                    spec::parse_wire_bytes(min).map_err(|e| format!("{tier:?}: {e}"))?,
                    size,
                ),
                None => (0, tier),
            };
            let size: u32 = size
                .trim()
                .parse()
                .map_err(|_| format!("{tier:?}: batch size {size:?} is not a whole number"))?;
            Ok(pb::BatchTier {
                min_free_bytes: min_free,
                size,
            })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(BatchTiers)
}

/// `--http-addr` (or the settings file's `http_addr`, named by `source`):
/// an address, or `off`; absent means the design's default.
fn resolve_http_addr(text: Option<&str>, source: &str) -> Result<Option<SocketAddr>, CliError> {
    match text {
        None => Ok(Some(DEFAULT_HTTP_ADDR)),
        Some("off") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|e| {
            CliError::invalid(format!(
                "{source}: expected IP:PORT or `off`, got {text:?}: {e}"
            ))
        }),
    }
}

/// The design's default HTTP address.
const DEFAULT_HTTP_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7080);

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// `--master-port-range LOW-HIGH`, checked as the coordinator reads it.
fn parse_master_port_range(text: &str) -> Result<String, String> {
    gantry_coordinator::domain::parse_port_range(text)?;
    Ok(text.trim().to_string())
}

/// The agent's labels: `--label`s, and `--master-port-range` as its label
/// (which `--label` may not set besides).
fn agent_labels(
    labels: Vec<(String, String)>,
    master_port_range: Option<String>,
) -> Result<BTreeMap<String, String>, String> {
    use gantry_coordinator::domain::MASTER_PORTS_LABEL;
    let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
    if labels.contains_key(MASTER_PORTS_LABEL) {
        return Err(format!(
            "--label {MASTER_PORTS_LABEL}: set by --master-port-range, not as a label"
        ));
    }
    if let Some(range) = master_port_range {
        labels.insert(MASTER_PORTS_LABEL.to_string(), range);
    }
    Ok(labels)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        LogFormat::Pretty => builder.pretty().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    // The agent re-executes itself in this hidden mode to copy a snapshot as
    // the job's user; it drops privileges, so it runs before any runtime.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == gantry_agent::snapshot::as_user::HELPER_ARG)
    {
        return gantry_agent::snapshot::as_user::helper_main();
    }
    cli_main()
}

/// jemalloc, as tikv uses: under `gantry-bench e2e` glibc's malloc and
/// free took about 16% of the machine's CPU (many threads allocating and
/// freeing small records; `malloc_consolidate` and `unlink_chunk` high in
/// the profile). Measured in the README (Benchmarks): more jobs/s, less
/// CPU and a lower RSS at 100,000 jobs; mimalloc was as fast but went past
/// the 500 MiB target there.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (the symbol its C code looks
/// up; a NUL-terminated string behind a thin pointer). Freed pages go back
/// to the kernel after 1 s instead of 10 s, from jemalloc's own background
/// thread rather than from whichever thread frees next: the coordinator's
/// RSS follows its live data (snapshots and journal writes free tens of
/// MiB at a time) instead of keeping ten seconds of garbage.
///
/// Unsafe only in that the linker resolves the name: nothing else in the
/// program defines it (tikv-jemalloc-sys declares it weak, for this).
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 43] = b"background_thread:true,dirty_decay_ms:1000\0";

#[tokio::main]
async fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Coordinator {
            config,
            grpc_addr,
            http_addr,
            data_dir,
            gpu_headroom,
            raft_compact_after,
            raft_snapshot_chunk,
            raft_max_snapshot,
            max_heartbeat_rate,
            inventory,
            strict_inventory,
            oom_signatures,
            id,
            peers,
            join,
            cluster_name,
            restore,
            disk_reserve,
            retention,
            security,
            policy,
            client_api,
        } => {
            let retention = match retention.policy() {
                Ok(policy) => policy,
                Err(error) => return fail(CliError::invalid(error)),
            };
            if cluster_name.len() > 128 || cluster_name.chars().any(char::is_control) {
                return fail(CliError::invalid(
                    "--cluster-name: at most 128 bytes, no control characters",
                ));
            }
            let inventory = match inventory {
                None => Vec::new(),
                Some(path) => match inventory::read_inventory(&path) {
                    Ok(hosts) => hosts,
                    Err(error) => return fail(CliError::invalid(format!("--inventory: {error}"))),
                },
            };
            let file = match &config {
                Some(path) => match config::read_coordinator_file(path) {
                    Ok(file) => file,
                    Err(error) => return fail(CliError::invalid(format!("--config: {error}"))),
                },
                None => config::CoordinatorFile::default(),
            };
            let security_file = file.security();
            let policy = match policy::resolve(
                *policy,
                file.queue_weights,
                file.disk_thresholds,
                file.breaker,
            ) {
                Ok(policy) => policy,
                Err(error) => return fail(CliError::invalid(error)),
            };
            let peers = match (peers, file.peers) {
                (Some(text), _) => gantry_coordinator::raft::parse_peers(&text)
                    .map_err(|e| format!("--peers: {e}")),
                (None, Some(value)) => value.resolve().map_err(|e| format!("--config: peers: {e}")),
                (None, None) => Ok(BTreeMap::new()),
            };
            let peers = match peers {
                Ok(peers) => peers,
                Err(error) => return fail(CliError::invalid(error)),
            };
            let grpc_addr = match (grpc_addr, file.grpc_addr) {
                (Some(addr), _) => addr,
                (None, Some(text)) => match text.parse() {
                    Ok(addr) => addr,
                    Err(e) => {
                        return fail(CliError::invalid(format!(
                            "--config: grpc_addr: {text:?}: {e}"
                        )));
                    }
                },
                (None, None) => SocketAddr::from(([127, 0, 0, 1], 7070)),
            };
            let data_dir = data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./gantry-data"));
            let gpu_headroom = gpu_headroom
                .or(file.gpu_headroom.map(|s| s.0.max(0) as u64))
                .unwrap_or(0);
            let oom_signatures = if oom_signatures.is_empty() {
                file.oom_signatures.unwrap_or_default()
            } else {
                oom_signatures
            };
            let raft_compact_after = raft_compact_after.or(file.raft_compact_after);
            if raft_compact_after == Some(0) {
                return fail(CliError::invalid(
                    "--raft-compact-after: must be at least 1",
                ));
            }
            let max_chunk = gantry_coordinator::raft::snapfile::MAX_CHUNK_BYTES as u64;
            if raft_snapshot_chunk.is_some_and(|bytes| bytes == 0 || bytes > max_chunk) {
                return fail(CliError::invalid(
                    "--raft-snapshot-chunk: must be between 1B and 16MiB",
                ));
            }
            if raft_max_snapshot == Some(0) {
                return fail(CliError::invalid(
                    "--raft-max-snapshot: must be at least 1B",
                ));
            }
            let max_heartbeat_rate = max_heartbeat_rate.or(file.max_heartbeat_rate);
            if max_heartbeat_rate == Some(0) {
                return fail(CliError::invalid(
                    "--max-heartbeat-rate: must be at least 1",
                ));
            }
            let id = id.or(file.id).unwrap_or(1);
            if !peers.is_empty() && !peers.contains_key(&id) {
                return fail(CliError::invalid(format!(
                    "--id: {id} is not one of the ids in --peers"
                )));
            }
            let security_args = security;
            let security = match coordinator_security(security_args.clone(), &security_file, &peers)
            {
                Ok(security) => security,
                Err(error) => return fail(CliError::invalid(error)),
            };
            // SIGHUP and `gantry reload-credentials` read the same files again.
            let reload_peers = peers.clone();
            let reloader = gantry_coordinator::credentials::Reloader::new(move || {
                let loaded =
                    coordinator_security(security_args.clone(), &security_file, &reload_peers)?;
                Ok(gantry_coordinator::credentials::Loaded {
                    tls: loaded.tls,
                    http_tls: loaded.http_tls,
                    peer_tls: loaded.peer_tls,
                    auth: loaded.auth,
                })
            });
            let resolved = match (http_addr, file.http_addr) {
                (Some(text), _) => resolve_http_addr(Some(&text), "--http-addr"),
                (None, file_value) => {
                    resolve_http_addr(file_value.as_deref(), "--config: http_addr")
                }
            };
            let http_addr = match resolved {
                Ok(addr) => addr,
                Err(error) => return fail(error),
            };
            if join && restore.is_some() {
                return fail(CliError::invalid(
                    "--join: a restored replica starts its own cluster; leave out --join or --restore",
                ));
            }
            if let Some(file) = &restore {
                if peers.len() > 1 {
                    return fail(CliError::invalid(
                        "--restore starts a single-voter cluster: leave out --peers",
                    ));
                }
                match gantry_coordinator::backup::restore(file, &data_dir, id) {
                    Ok(restored) => println!(
                        "restored {} jobs at index {} (replica {}'s backup) into {}",
                        restored.jobs,
                        restored.header.applied_index,
                        restored.header.replica,
                        data_dir.display()
                    ),
                    Err(error) => return fail(CliError::invalid(format!("--restore: {error}"))),
                }
            }
            init_logging(cli.log_format);
            let options = daemon::CoordinatorOptions {
                security,
                grpc_addr,
                http_addr,
                data_dir,
                gpu_headroom,
                id,
                peers,
                join,
                cluster_name,
                oom_signatures,
                raft_compact_after,
                raft_snapshot_chunk: raft_snapshot_chunk.map(|bytes| bytes as usize),
                raft_max_snapshot,
                max_heartbeat_rate,
                inventory,
                strict_inventory,
                reloader: Some(reloader),
                disk_reserve: disk_reserve
                    .unwrap_or(gantry_coordinator::disk::DEFAULT_RESERVE_BYTES),
                retention,
                policy,
                client_api,
            };
            daemon_result(daemon::run_coordinator(options).await)
        }
        Command::Agent {
            coordinators,
            name,
            address,
            data_dir,
            labels,
            master_port_range,
            fake_gpus,
            probe,
            stop_jobs_on_exit,
            security,
        } => {
            init_logging(cli.log_format);
            if probe {
                return probe_gpus(fake_gpus);
            }
            let labels = match agent_labels(labels, master_port_range) {
                Ok(labels) => labels,
                Err(error) => return fail(CliError::invalid(error)),
            };
            let security = match agent_security(security, &coordinators) {
                Ok(security) => security,
                Err(error) => return fail(CliError::invalid(error)),
            };
            let options = daemon::AgentOptions {
                security,
                node_name: name.unwrap_or_else(daemon::hostname),
                address,
                coordinators: coordinators
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                data_dir,
                labels,
                fake_gpus,
                stop_jobs_on_exit,
            };
            daemon_result(daemon::run_agent(options).await)
        }
        Command::Supervise { attempt_dir } => {
            init_logging(cli.log_format);
            return gantry_agent::supervisor::run(&attempt_dir).await;
        }
        Command::Dev {
            grpc_addr,
            http_addr,
            data_dir,
            fake_gpus,
        } => {
            let http_addr = match resolve_http_addr(http_addr.as_deref(), "--http-addr") {
                Ok(addr) => addr,
                Err(error) => return fail(error),
            };
            init_logging(cli.log_format);
            let options = daemon::CoordinatorOptions {
                grpc_addr,
                http_addr,
                data_dir,
                gpu_headroom: 0,
                id: 1,
                peers: BTreeMap::new(),
                join: false,
                cluster_name: String::new(),
                oom_signatures: Vec::new(),
                raft_compact_after: None,
                raft_snapshot_chunk: None,
                raft_max_snapshot: None,
                max_heartbeat_rate: None,
                inventory: Vec::new(),
                strict_inventory: false,
                security: Default::default(),
                reloader: None,
                disk_reserve: gantry_coordinator::disk::DEFAULT_RESERVE_BYTES,
                retention: Default::default(),
                policy: Default::default(),
                client_api: Default::default(),
            };
            daemon_result(daemon::run_dev(options, fake_gpus).await)
        }
        Command::Certs {
            action: CertsAction::Init { dir, hosts, days },
        } => certs_init(&dir, &hosts, days),
        Command::Dlq { action } => dlq(action).await,
        Command::Gpu {
            action: GpuAction::Reset { node, gpu, client },
        } => reset_gpu(node, gpu, client).await,
        Command::Snapshot {
            action: SnapshotAction::Save { file, client },
        } => backup::save(&file, client).await,
        Command::Raft { action } => match action {
            RaftAction::Members { client } => raft::members(client).await,
            RaftAction::Add { id, url, client } => raft::add(id, url, client).await,
            RaftAction::Remove { id, client } => raft::remove(id, client).await,
            RaftAction::Replace {
                old,
                new,
                url,
                client,
            } => raft::replace(old, new, url, client).await,
        },
        Command::Inventory {
            action: InventoryAction::Check { file },
        } => inventory_check(&file),
        Command::Pipeline {
            action: Some(PipelineAction::Stop { name, client }),
            ..
        } => pipeline_stop(name, client).await,
        Command::Pipeline {
            action: None,
            name,
            run,
            client,
        } => pipeline(name.unwrap_or_default(), run, client).await,
        Command::Submit(args) => submit(args).await,
        Command::Jobs {
            state,
            limit,
            since: Some(since),
            page,
            client,
            ..
        } => job_history(state, limit, since, page, client).await,
        Command::Jobs {
            state,
            limit,
            mine,
            client,
            ..
        } => jobs(state, limit, mine, client).await,
        Command::ReloadCredentials { client } => reload_credentials(client).await,
        Command::Job { id, client } => job(id, client).await,
        Command::Logs {
            id,
            follow,
            stderr,
            attempt,
            client,
        } => streams::logs(id, follow, stderr, attempt, client).await,
        Command::Cancel { id, client } => cancel(id, client).await,
        Command::Nodes { client } => nodes(client).await,
        Command::Drain {
            node,
            deadline,
            wait,
            client,
        } => drain(node, true, deadline, wait, client).await,
        Command::Undrain { node, client } => drain(node, false, None, false, client).await,
        Command::Status { client } => status(client).await,
        Command::Watch {
            job,
            kind,
            pipeline,
            from,
            client,
        } => streams::watch(job, kind, pipeline, from, client).await,
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(error) => fail(error),
    }
}

/// Loads and checks a coordinator's TLS files and credentials (flags win
/// over the settings file).
fn coordinator_security(
    args: CoordinatorSecurityArgs,
    file: &config::SecurityFile,
    peers: &BTreeMap<u64, String>,
) -> Result<security::CoordinatorSecurity, String> {
    let pick = |flag: Option<PathBuf>, from_file: &Option<PathBuf>| flag.or(from_file.clone());
    let tls = security::ServerTlsFiles {
        cert: pick(args.tls_cert, &file.tls_cert),
        key: pick(args.tls_key, &file.tls_key),
        client_ca: pick(args.tls_client_ca, &file.tls_client_ca),
        ca: pick(args.tls_ca, &file.tls_ca),
    }
    .load()?;
    let tokens = match pick(args.tokens, &file.tokens) {
        Some(path) => Some(security::read_tokens(&path)?),
        None => None,
    };
    let join_token = match pick(args.join_token_file, &file.join_token_file) {
        Some(path) => Some(security::read_secret("--join-token-file", &path)?),
        None => None,
    };
    let auth = gantry_coordinator::auth::AuthConfig {
        tokens,
        join_token,
        mtls: tls.mtls,
        peer_roots: tls.client_roots.clone(),
    };
    if peers.len() > 1 {
        if (auth.tokens.is_some() || auth.join_token.is_some()) && !auth.mtls {
            return Err("--peers with --tokens or --join-token-file needs --tls-client-ca: the raft peer service is authenticated by mutual TLS".into());
        }
        for url in peers.values() {
            security::check_scheme("--peers", url, tls.peers.is_some())?;
        }
    }
    Ok(security::CoordinatorSecurity {
        tls: tls.server,
        peer_tls: tls.peers,
        http_tls: tls.http,
        auth,
    })
}

/// Loads and checks an agent's TLS files, join token and job user.
fn agent_security(
    args: AgentSecurityArgs,
    coordinators: &str,
) -> Result<security::AgentSecurity, String> {
    let tls = security::ClientTlsFiles {
        ca: args.tls_ca,
        cert: args.tls_cert,
        key: args.tls_key,
    }
    .load()?;
    for url in coordinators
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        security::check_scheme("--coordinators", url, tls.is_some())?;
    }
    let join_token = match (args.join_token_file, args.join_token) {
        (Some(path), _) => Some(security::read_secret("--join-token-file", &path)?),
        (None, Some(token)) if !token.trim().is_empty() => Some(token.trim().to_string()),
        _ => None,
    };
    let run_as = match args.run_as {
        Some(user) => Some(gantry_agent::RunAs::resolve(&user).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok(security::AgentSecurity {
        tls,
        join_token,
        run_as,
    })
}

fn certs_init(dir: &std::path::Path, hosts: &[String], days: u32) -> Result<(), CliError> {
    let written = certs::init(dir, hosts, days).map_err(CliError::invalid)?;
    for path in written {
        outln!("wrote {}", path.display());
    }
    Ok(())
}

fn fail(error: CliError) -> ExitCode {
    // Server messages echo user input (names, paths): escaped like the rest.
    eprintln!("error: {}", escape(&error.message));
    ExitCode::from(error.code)
}

fn daemon_result(result: anyhow::Result<()>) -> Result<(), CliError> {
    result.map_err(|e| CliError::failed(format!("{e:#}")))
}

fn probe_gpus(fake: Option<String>) -> ExitCode {
    let source = match fake {
        Some(text) => match gantry_agent::parse_fake_gpus(&text) {
            Ok(gpus) => gantry_agent::GpuSource::Fake(gpus),
            Err(e) => return fail(CliError::invalid(format!("--fake-gpus: {e}"))),
        },
        None => gantry_agent::GpuSource::Nvml,
    };
    match gantry_agent::probe_gpus(&source) {
        Ok(gpus) => {
            outln!("{} GPU(s)", gpus.len());
            for gpu in gpus {
                outln!("{gpu}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(CliError::failed(format!("GPU probe: {error}"))),
    }
}

pub(crate) fn print_json(value: &serde_json::Value) {
    // Serialising a `Value` cannot fail (its map keys are strings).
    outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn submit(args: SubmitArgs) -> Result<(), CliError> {
    let (pipeline, jobs, repeat, run_dir) = match &args.file {
        Some(path) => {
            let parsed =
                spec::read_spec_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            (parsed.pipeline, parsed.jobs, parsed.repeat, parsed.run_dir)
        }
        None => {
            if args.command.is_empty() {
                return Err(CliError::invalid(
                    "command: give a command after `--`, or a spec file with -f",
                ));
            }
            let gpu_memory = match &args.gpu_memory {
                Some(text) => spec::parse_wire_bytes(text)
                    .map_err(|e| CliError::invalid(format!("--gpu-memory: {e}")))?,
                None => 0,
            };
            let memory = match &args.memory {
                Some(text) => spec::parse_wire_bytes(text)
                    .map_err(|e| CliError::invalid(format!("--memory: {e}")))?,
                None => 0,
            };
            let cpus = args.cpus.unwrap_or(0.0);
            if !(0.0..=1e6).contains(&cpus) {
                return Err(CliError::invalid(format!(
                    "--cpus: {cpus} is not a sensible number of cores"
                )));
            }
            let timeout_ms = match &args.timeout {
                Some(text) => spec::parse_timeout(text).map_err(CliError::invalid)?,
                None => None,
            };
            if args.max_attempts == Some(0) {
                return Err(CliError::invalid("--max-attempts: must be at least 1"));
            }
            let jobs = vec![pb::JobSpec {
                name: args.name.clone().unwrap_or_default(),
                kind: args.kind.clone().unwrap_or_default(),
                command: args.command.clone(),
                env: args.env.iter().cloned().collect(),
                resources: Some(pb::Resources {
                    gpus: args.gpus.unwrap_or(0),
                    gpu_memory_bytes: gpu_memory,
                    cpu_millis: (cpus * 1000.0) as i64,
                    memory_bytes: memory,
                    disk_bytes: 0,
                }),
                priority: args.priority.unwrap_or(0),
                retry: args.max_attempts.map(|n| pb::RetryPolicy {
                    max_attempts: n,
                    backoff_ms: 0,
                }),
                timeout_ms,
                shell: args.shell,
                batch: args.batch_tiers.clone().map(|tiers| pb::BatchSpec {
                    tiers: tiers.0,
                    ..Default::default()
                }),
                ..Default::default()
            }];
            (None, jobs, None, String::new())
        }
    };
    let key = args.key.clone().unwrap_or_else(new_submission_key);
    let request = pb::SubmitRequest {
        jobs,
        submission_key: key,
        pipeline: pipeline.unwrap_or_default(),
        repeat,
        run_dir,
    };
    let retry_for = std::time::Duration::from_millis(args.retry_for);
    let response = submit::submit(&args.client, request, retry_for).await?;
    match args.client.output {
        Format::Json => print_json(&serde_json::json!({ "job_ids": response.job_ids })),
        Format::Table => {
            for id in &response.job_ids {
                outln!("submitted job {id}");
            }
        }
    }
    Ok(())
}

/// A random key so a submit retried after a lost reply is not duplicated.
fn new_submission_key() -> String {
    format!(
        "cli-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

async fn reload_credentials(opts: ClientOpts) -> Result<(), CliError> {
    // The replica at --addr, leader or not: each reloads its own files.
    let mut client = client::connect_any(&opts).await?;
    let reloaded = client
        .reload_credentials(pb::ReloadCredentialsRequest {})
        .await?
        .into_inner();
    match opts.output {
        Format::Json => print_json(&serde_json::json!({
            "tokens": reloaded.tokens,
            "tls": reloaded.tls,
        })),
        Format::Table => outln!(
            "credentials reloaded: {} client tokens{}",
            reloaded.tokens,
            if reloaded.tls {
                ", TLS certificates"
            } else {
                ""
            }
        ),
    }
    Ok(())
}

async fn jobs(
    state: Vec<String>,
    limit: u32,
    mine: bool,
    opts: ClientOpts,
) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    // One row more than shown tells whether the limit cut the list (0 = all).
    let mut jobs = client
        .list_jobs(pb::ListJobsRequest {
            states: state,
            limit: if limit == 0 {
                0
            } else {
                limit.saturating_add(1)
            },
            mine,
            ..Default::default()
        })
        .await?
        .into_inner()
        .jobs;
    let cut = limit > 0 && jobs.len() > limit as usize;
    jobs.truncate(if limit == 0 {
        jobs.len()
    } else {
        limit as usize
    });
    print_jobs(&jobs, opts.output);
    if cut {
        // On stderr, so `-o json` and pipes get only the rows.
        eprintln!("showing {limit} jobs, there are more: use --limit N (0 = all)");
    }
    Ok(())
}

/// `gantry jobs --since`: one page of jobs updated since then, history
/// included; the command for the next page on stderr.
async fn job_history(
    state: Vec<String>,
    limit: u32,
    since: u64,
    page: Option<String>,
    opts: ClientOpts,
) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let response = client
        .list_jobs(pb::ListJobsRequest {
            states: state,
            limit: if limit == 0 { 1000 } else { limit },
            since_ms: now.saturating_sub(since).max(1),
            page_token: page.unwrap_or_default(),
            mine: false,
        })
        .await?
        .into_inner();
    print_jobs(&response.jobs, opts.output);
    if !response.next_page_token.is_empty() {
        eprintln!(
            "more jobs: add --page {} for the next page",
            response.next_page_token
        );
    }
    Ok(())
}

/// A list of jobs as a table or JSON (`gantry jobs`, `gantry dlq list`).
fn print_jobs(jobs: &[pb::Job], format: Format) {
    match format {
        Format::Json => print_json(&serde_json::Value::Array(
            jobs.iter().map(output::job_json).collect(),
        )),
        Format::Table => {
            let rows: Vec<Vec<String>> = jobs.iter().map(output::job_row).collect();
            output::table(
                &["ID", "NAME", "KIND", "STATE", "NODE", "GPUS", "DETAIL"],
                &rows,
            );
        }
    }
}

async fn job(id: u64, opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let job = client
        .get_job(pb::GetJobRequest { job_id: id })
        .await?
        .into_inner();
    match opts.output {
        Format::Json => print_json(&output::job_json(&job)),
        Format::Table => output::print_job(&job),
    }
    Ok(())
}

async fn cancel(id: u64, opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let answer = client
        .cancel_job(pb::CancelJobRequest { job_id: id })
        .await?
        .into_inner();
    let state = answer.state.as_str();
    match opts.output {
        Format::Json => print_json(&serde_json::json!({
            "job_id": id,
            "state": state,
            "node": answer.node,
            "attempt": answer.attempt,
        })),
        Format::Table if state == "cancelled" => outln!("job {id} cancelled"),
        Format::Table if state == "cancelling" => {}
        Format::Table => outln!("job {id} ended {state} before the cancel took effect"),
    }
    if state == "cancelling" {
        return Err(CliError {
            code: exit::UNCONFIRMED,
            message: format!(
                "job {id}: cancel recorded (it is never placed again), but node {} has not confirmed that attempt {} stopped; it may still start or run there until its agent reports it ended (see `gantry job {id}`)",
                answer.node, answer.attempt
            ),
        });
    }
    Ok(())
}

async fn nodes(opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    match opts.output {
        Format::Json => print_json(&serde_json::Value::Array(
            nodes.iter().map(output::node_json).collect(),
        )),
        Format::Table => {
            let rows: Vec<Vec<String>> = nodes.iter().map(output::node_row).collect();
            output::table(
                &[
                    "NAME", "STATE", "PROVIDER", "GPUS", "GPU FREE", "DISK", "JOBS", "RTT",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

async fn drain(
    node: String,
    drain: bool,
    deadline_ms: Option<u64>,
    wait: bool,
    opts: ClientOpts,
) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let shown = escape(&node).into_owned();
    client
        .drain(pb::DrainRequest {
            node: node.clone(),
            drain,
            deadline_after_ms: deadline_ms.unwrap_or(0),
        })
        .await?;
    match opts.output {
        Format::Json => print_json(&serde_json::json!({
            "node": node,
            "draining": drain,
            "deadline_after_ms": deadline_ms,
        })),
        Format::Table => match (drain, deadline_ms) {
            (false, _) => outln!("node {shown} undrained, out of quarantine"),
            (true, None) => outln!("node {shown} draining: no new placements"),
            (true, Some(ms)) => outln!(
                "node {shown} draining: no new placements; jobs still running in {} are stopped and placed elsewhere",
                gantry_scheduler::units::format_duration_ms(ms)
            ),
        },
    }
    if !wait {
        return Ok(());
    }
    // Poll the node listing: the wait ends when the node holds no job.
    loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        let running = nodes
            .iter()
            .find(|n| n.name == node)
            .map_or(0, |n| n.running_jobs);
        if running == 0 {
            if opts.output == Format::Table {
                outln!("node {shown} runs no jobs");
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn status(opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect_any(&opts).await?;
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    match opts.output {
        Format::Json => print_json(&output::status_json(&status)),
        Format::Table => {
            outln!(
                "coordinator {} (leader: {}), gantry {}",
                status.coordinator_id,
                status.is_leader,
                status.version
            );
            outln!(
                "nodes: {} ready of {}",
                status.nodes_ready,
                status.nodes_total
            );
            outln!(
                "gpus:  {} ({} total, {} reserved)",
                status.gpus_total,
                gantry_scheduler::units::format_bytes(status.gpu_memory_total_bytes.max(0) as u64),
                gantry_scheduler::units::format_bytes(
                    status.gpu_memory_reserved_bytes.max(0) as u64
                )
            );
            let mut states: Vec<_> = status.jobs_by_state.iter().collect();
            states.sort();
            let jobs: Vec<String> = states
                .iter()
                .map(|(s, n)| format!("{}={n}", escape(s)))
                .collect();
            outln!(
                "jobs:  {}",
                if jobs.is_empty() {
                    "none".to_string()
                } else {
                    jobs.join(" ")
                }
            );
            outln!("last event: {}", status.last_event_index);
        }
    }
    Ok(())
}

async fn reset_gpu(node: String, gpu: u32, opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    client
        .reset_gpu(pb::ResetGpuRequest {
            node: node.clone(),
            gpu,
        })
        .await?;
    match opts.output {
        Format::Json => print_json(&serde_json::json!({"node": node, "gpu": gpu, "healthy": true})),
        Format::Table => outln!(
            "gpu {gpu} of node {} cleared: placements again",
            escape(&node)
        ),
    }
    Ok(())
}

async fn dlq(action: DlqAction) -> Result<(), CliError> {
    match action {
        DlqAction::List { client: opts } => {
            let mut client = client::connect(&opts).await?;
            let jobs = client
                .dlq_list(pb::DlqListRequest {})
                .await?
                .into_inner()
                .jobs;
            print_jobs(&jobs, opts.output);
        }
        DlqAction::Show { id, client: opts } => {
            let mut client = client::connect(&opts).await?;
            let job = client
                .get_job(pb::GetJobRequest { job_id: id })
                .await?
                .into_inner();
            if job.state != "deadlettered" {
                return Err(CliError::failed(format!(
                    "job {id} is not in the dead-letter queue ({})",
                    job.state
                )));
            }
            match opts.output {
                Format::Json => print_json(&output::job_json(&job)),
                Format::Table => {
                    output::print_job(&job);
                    if let Some(tail) = job
                        .attempts
                        .iter()
                        .rev()
                        .map(|a| a.output_tail.as_str())
                        .find(|t| !t.is_empty())
                    {
                        outln!("  last stderr:");
                        for line in tail.lines() {
                            outln!("    {}", escape(line));
                        }
                    }
                }
            }
        }
        DlqAction::Retry {
            id,
            file,
            client: opts,
        } => {
            let spec = match file {
                Some(path) => {
                    let mut parsed = spec::read_spec_file(&path)
                        .map_err(|e| CliError::invalid(e.to_string()))?;
                    if parsed.jobs.len() != 1 {
                        return Err(CliError::invalid(format!(
                            "{path}: dlq retry takes exactly one job, found {}",
                            parsed.jobs.len()
                        )));
                    }
                    parsed.jobs.pop()
                }
                None => None,
            };
            let mut client = client::connect(&opts).await?;
            client
                .dlq_retry(pb::DlqRetryRequest { job_id: id, spec })
                .await?;
            match opts.output {
                Format::Json => print_json(&serde_json::json!({ "job_id": id, "retried": true })),
                Format::Table => outln!("job {id} retried; jobs blocked on it are pending again"),
            }
        }
        DlqAction::Drop { id, client: opts } => {
            let mut client = client::connect(&opts).await?;
            client.dlq_drop(pb::DlqDropRequest { job_id: id }).await?;
            match opts.output {
                Format::Json => print_json(&serde_json::json!({ "job_id": id, "dropped": true })),
                Format::Table => outln!("job {id} dropped from the dead-letter queue"),
            }
        }
    }
    Ok(())
}

async fn pipeline(name: String, run: u32, opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let view = client
        .get_pipeline(pb::GetPipelineRequest { name, run })
        .await?
        .into_inner();
    match opts.output {
        Format::Json => print_json(&output::pipeline_json(&view)),
        Format::Table => output::print_pipeline(&view),
    }
    Ok(())
}

async fn pipeline_stop(name: String, opts: ClientOpts) -> Result<(), CliError> {
    let mut client = client::connect(&opts).await?;
    let run = client
        .stop_pipeline(pb::StopPipelineRequest { name: name.clone() })
        .await?
        .into_inner()
        .run;
    match opts.output {
        Format::Json => print_json(&serde_json::json!({
            "name": name, "stopped": true, "last_run": run
        })),
        Format::Table => outln!(
            "pipeline {} stopped: run {run} is its last",
            output::escape(&name)
        ),
    }
    Ok(())
}

fn inventory_check(file: &std::path::Path) -> Result<(), CliError> {
    let hosts = inventory::read_inventory(file).map_err(CliError::invalid)?;
    let gpus: u32 = hosts.iter().map(|h| h.gpu_count).sum();
    let providers: std::collections::BTreeSet<&str> = hosts
        .iter()
        .filter_map(|h| h.labels.get("provider").map(String::as_str))
        .collect();
    outln!(
        "{}: {} hosts, {gpus} GPUs, providers: {}",
        file.display(),
        hosts.len(),
        providers.into_iter().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
