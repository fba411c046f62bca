//! `gantry-bench e2e`: the whole path on one machine. Three `gantry
//! coordinator` processes form a Raft group on loopback; a simulated fleet
//! of agents (in this process, one `AgentLink` stream each, 8 fake GPUs per
//! node) "runs" every assignment at once (Started, then Exited 0); client
//! tasks submit single small GPU jobs as fast as they are acknowledged.
//!
//! Measured: submit throughput (acknowledged jobs/s), submit latency,
//! submit-to-start latency (submit sent -> assignment received by an agent),
//! jobs started per second; then the leader is killed with SIGKILL and the
//! time to the first acknowledged submit on the survivors is measured
//! (failover), with the agents' reconnection, and every acknowledged job id
//! is looked up on the new leader (none may be lost).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use gantry_agent::reconnect::{Ended, Reconnect};
use gantry_proto as pb;
use pb::agent_link_client::AgentLinkClient;
use pb::gantry_client::GantryClient;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

mod entries;
mod open_loop;

use crate::procs::{CpuMeter, CpuUsed, ProcGroup, free_ports, require_gantry, run_scenario};
use crate::stats::Latencies;

pub(crate) const GIB: i64 = 1 << 30;
const LEADER_METADATA: &str = "gantry-leader";
/// How long the simulated agents keep sent job events to re-send after a
/// reconnect (the real agent's outbox; the coordinator deduplicates).
const OUTBOX_KEEP: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct E2eConfig {
    /// The `gantry` binary that runs the coordinators.
    pub gantry: PathBuf,
    /// Simulated agents (nodes of 8 GPUs).
    pub agents: usize,
    /// Concurrent submitting tasks.
    pub concurrency: usize,
    /// How long to submit (unless `jobs` is set).
    pub duration: Duration,
    /// Stop after this many submits instead of after `duration`.
    pub jobs: Option<u64>,
    /// Sequential submits measured before the concurrent load (0 = none).
    pub sequential: usize,
    /// `RUST_LOG` for the coordinators.
    pub log_level: String,
    /// Skip the leader-kill phase.
    pub no_failover: bool,
    /// Offered submits per second (open loop, latency from each submit's
    /// due time) instead of `concurrency` closed-loop submitters.
    pub rate: Option<f64>,
}

/// Figures of the failover phase.
#[derive(Debug, Clone)]
pub struct FailoverReport {
    /// Replica id (1-based) that was killed.
    pub killed: usize,
    /// Replica id that acknowledged the first submit after the kill.
    pub new_leader: usize,
    /// SIGKILL -> first acknowledged submit.
    pub failover: Duration,
    /// Submit attempts made until then.
    pub attempts: u64,
    /// SIGKILL -> the probe job's assignment reached an agent.
    pub first_start: Option<Duration>,
    /// Agents registered again with the new leader (within 15 s).
    pub agents_reconnected: usize,
    /// SIGKILL -> agent registered again, over those that did.
    pub agents_reconnect: Latencies,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct E2eReport {
    /// What ran.
    pub config: E2eConfig,
    /// Sequential submit latency (one at a time, before the load).
    pub sequential: Latencies,
    /// Acknowledged submits during the load.
    pub acked: usize,
    /// Failed submits during the load.
    pub errors: usize,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// First send -> last acknowledgement of the load.
    pub load_time: Duration,
    /// Latency of each acknowledged submit.
    pub submit: Latencies,
    /// Submit sent -> assignment received, per acknowledged job that started.
    pub submit_to_start: Latencies,
    /// Acknowledged load jobs whose assignment reached an agent.
    pub started: usize,
    /// Load start -> last of those assignments.
    pub start_time: Duration,
    /// Failover figures (unless skipped).
    pub failover: Option<FailoverReport>,
    /// Acknowledged job ids checked on the (new) leader.
    pub checked: usize,
    /// Acknowledged job ids it did not list.
    pub lost: usize,
    /// Jobs by state on the (new) leader at the end.
    pub states: BTreeMap<String, usize>,
    /// Raft entries committed per acknowledged load job (submit, placement,
    /// start, exit, heartbeat-driven changes...), from the leader's
    /// commit index before the load and once its jobs started and the log
    /// settled; `None` when the leader did not answer either reading.
    pub raft_entries_per_job: Option<f64>,
    /// CPU time the three coordinators (measured) and this process (own:
    /// the submitters and the simulated agents) used from the load's start
    /// until the log settled (every load job's submit, placement, start and
    /// exit), when it could be read.
    pub cpu: Option<CpuUsed>,
}

impl E2eReport {
    /// Acknowledged jobs per second of load.
    pub fn jobs_per_s(&self) -> f64 {
        self.acked as f64 / self.load_time.as_secs_f64().max(1e-9)
    }

    /// Started jobs per second (load start -> last start).
    pub fn started_per_s(&self) -> f64 {
        self.started as f64 / self.start_time.as_secs_f64().max(1e-9)
    }

    /// CPU per acknowledged load job, µs: (the three coordinators', this
    /// process's). A figure of the work a job costs that the machine's
    /// other tenants move much less than jobs/s.
    pub fn cpu_per_job_us(&self) -> Option<(f64, f64)> {
        self.cpu?.per_op_us(self.acked)
    }

    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        let failover = self.failover.as_ref().map(|f| {
            json!({
                "killed_replica": f.killed,
                "new_leader_replica": f.new_leader,
                "failover_ms": ms(f.failover),
                "attempts": f.attempts,
                "first_start_ms": f.first_start.map(ms),
                "agents_reconnected": f.agents_reconnected,
                "agents_reconnect_p50_ms": f.agents_reconnect.ms(0.5),
                "agents_reconnect_max_ms": f.agents_reconnect.ms(1.0),
            })
        });
        json!({
            "scenario": "e2e",
            "replicas": 3,
            "agents": c.agents,
            "gpus_per_agent": 8,
            "concurrency": c.concurrency,
            "offered_rate": c.rate,
            "duration_s": c.duration.as_secs_f64(),
            "jobs_limit": c.jobs,
            "jobs_per_s": self.jobs_per_s(),
            "acked": self.acked,
            "errors": self.errors,
            "first_error": self.first_error,
            "load_s": self.load_time.as_secs_f64(),
            "submit_p50_ms": self.submit.ms(0.5),
            "submit_p99_ms": self.submit.ms(0.99),
            "submit_max_ms": self.submit.ms(1.0),
            "sequential_submits": self.sequential.len(),
            "sequential_submit_p50_ms": self.sequential.ms(0.5),
            "sequential_submit_p99_ms": self.sequential.ms(0.99),
            "submit_to_start_p50_ms": self.submit_to_start.ms(0.5),
            "submit_to_start_p99_ms": self.submit_to_start.ms(0.99),
            "submit_to_start_max_ms": self.submit_to_start.ms(1.0),
            "started": self.started,
            "started_per_s": self.started_per_s(),
            "start_s": self.start_time.as_secs_f64(),
            "failover": failover,
            "checked": self.checked,
            "lost": self.lost,
            "states": self.states,
            "raft_entries_per_job": self.raft_entries_per_job,
            "coordinator_cpu_per_job_us": self.cpu_per_job_us().map(|(coordinators, _)| coordinators),
            "bench_cpu_per_job_us": self.cpu_per_job_us().map(|(_, bench)| bench),
        })
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "{:.0} jobs/s\n\
             gantry-bench e2e: 3 replicas on loopback, {} simulated agents x 8 GPUs, {} submitters, {}\n\
             submitted: {} acknowledged in {:.2} s, {} errors{}\n\
             submit latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            self.jobs_per_s(),
            c.agents,
            c.concurrency,
            match (c.rate, c.jobs) {
                (Some(rate), _) => format!(
                    "open loop at {rate:.0} submits/s offered for {:.0} s (latency from each submit's due time)",
                    c.duration.as_secs_f64()
                ),
                (None, Some(n)) => format!("{n} jobs"),
                (None, None) => format!("{:.0} s", c.duration.as_secs_f64()),
            },
            self.acked,
            self.load_time.as_secs_f64(),
            self.errors,
            self.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            self.submit.ms(0.5),
            self.submit.ms(0.99),
            self.submit.ms(1.0),
        );
        if !self.sequential.is_empty() {
            out.push_str(&format!(
                "sequential submit ({} one at a time): p50 {:.2} ms, p99 {:.2} ms\n",
                self.sequential.len(),
                self.sequential.ms(0.5),
                self.sequential.ms(0.99),
            ));
        }
        out.push_str(&format!(
            "submit-to-start (sent -> assignment at agent): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} jobs)\n\
             started: {} of {} jobs, {:.0} jobs/s (load start -> last start {:.2} s); {} Raft entries per job\n",
            self.submit_to_start.ms(0.5),
            self.submit_to_start.ms(0.99),
            self.submit_to_start.ms(1.0),
            self.submit_to_start.len(),
            self.started,
            self.acked,
            self.started_per_s(),
            self.start_time.as_secs_f64(),
            self.raft_entries_per_job
                .map_or_else(|| "unknown (the leader's Status did not answer)".to_string(), |e| format!("{e:.2}")),
        ));
        if let Some((coordinators, bench)) = self.cpu_per_job_us() {
            out.push_str(&format!(
                "CPU per job: {coordinators:.0} µs in the three coordinators, {bench:.0} µs in this process (submitters and agents)\n"
            ));
        }
        match &self.failover {
            Some(f) => {
                out.push_str(&format!(
                    "failover: replica {} killed (SIGKILL); replica {} acknowledged a submit after {:.0} ms ({} attempts)\n",
                    f.killed,
                    f.new_leader,
                    ms(f.failover),
                    f.attempts,
                ));
                out.push_str(&format!(
                    "after the kill: first job started at {}; agents reconnected {}/{} (p50 {:.0} ms, last {:.0} ms; the real agent's reconnect decision)\n",
                    f.first_start
                        .map(|d| format!("{:.0} ms", ms(d)))
                        .unwrap_or_else(|| "never (15 s)".into()),
                    f.agents_reconnected,
                    c.agents,
                    f.agents_reconnect.ms(0.5),
                    f.agents_reconnect.ms(1.0),
                ));
            }
            None => out.push_str("failover: skipped\n"),
        }
        let states: Vec<String> = self
            .states
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!(
            "acknowledged jobs lost: {} of {} checked on the leader; jobs by state: {}\n",
            self.lost,
            self.checked,
            states.join(", "),
        ));
        let check = |ok: bool| if ok { "ok" } else { "MISSED" };
        let failover_ok = self
            .failover
            .as_ref()
            .is_some_and(|f| f.failover <= Duration::from_secs(3));
        // The latency targets are set at 1,000 submits/s offered (issue
        // 11); a closed loop's latencies are its own load's, not judged.
        let open_loop = |ok: bool| {
            if c.rate.is_some() {
                check(ok)
            } else {
                "not judged in a closed loop"
            }
        };
        out.push_str(&format!(
            "targets: >= 5000 jobs/s {}; open loop (set at --rate 1000): submit p99 <= 10 ms {}, submit-to-start p50 <= 50 ms {}; failover <= 3 s {}; agents back <= 3 s {}; none lost {}",
            check(self.jobs_per_s() >= 5000.0),
            open_loop(self.submit.ms(0.99) <= 10.0),
            open_loop(self.submit_to_start.ms(0.5) <= 50.0),
            if self.failover.is_some() {
                check(failover_ok)
            } else {
                "skipped"
            },
            match &self.failover {
                Some(f) => check(
                    f.agents_reconnected == c.agents
                        && f.agents_reconnect.ms(1.0) <= 3000.0
                ),
                None => "skipped",
            },
            check(self.lost == 0),
        ));
        out
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the scenario (its own tokio runtime; child processes are stopped
/// on return, error or not).
pub fn run(config: &E2eConfig) -> anyhow::Result<E2eReport> {
    run_scenario("gantry-bench-e2e-", 15, async |procs| {
        scenario(config, procs).await
    })
}

/// The three replicas.
struct Replicas {
    urls: Vec<String>,
    procs: Vec<usize>,
}

fn start_replicas(config: &E2eConfig, procs: &mut ProcGroup) -> anyhow::Result<Replicas> {
    let addrs = free_ports(3)?;
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let peers = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("{}={u}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut indexes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = i + 1;
        let data = procs.path().join(format!("replica-{id}"));
        let args = vec![
            "coordinator".to_string(),
            "--id".into(),
            id.to_string(),
            "--peers".into(),
            peers.clone(),
            "--grpc-addr".into(),
            addr.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            // Three replicas on one host: HTTP is not measured here.
            "--http-addr".into(),
            "off".into(),
        ];
        let index = procs.spawn(
            &format!("replica-{id}"),
            &config.gantry,
            &args,
            &[("RUST_LOG", &config.log_level)],
        )?;
        indexes.push(index);
    }
    for &index in &indexes {
        procs
            .proc(index)
            .wait_line("listening grpc=", Duration::from_secs(30))?;
    }
    Ok(Replicas {
        urls,
        procs: indexes,
    })
}

pub(crate) fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true))
}

pub(crate) fn gantry_client(channel: Channel) -> GantryClient<Channel> {
    GantryClient::new(channel).max_decoding_message_size(1 << 30)
}

pub(crate) async fn status(url: &str) -> Option<pb::ClusterStatus> {
    let channel = endpoint(url).ok()?.connect().await.ok()?;
    let mut client = gantry_client(channel);
    let call = client.status(pb::StatusRequest {});
    let response = tokio::time::timeout(Duration::from_millis(1000), call)
        .await
        .ok()?
        .ok()?;
    Some(response.into_inner())
}

/// Index of the replica that says it leads, waiting up to `timeout`.
async fn wait_leader(urls: &[String], skip: Option<usize>, timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for (i, url) in urls.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            if status(url).await.is_some_and(|s| s.is_leader) {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn leader_hint(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

pub(crate) fn job_spec() -> pb::JobSpec {
    pb::JobSpec {
        name: "bench".into(),
        kind: "generic".into(),
        command: vec!["true".into()],
        resources: Some(pb::Resources {
            gpus: 1,
            gpu_memory_bytes: GIB,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn submit_request(key: String) -> pb::SubmitRequest {
    pb::SubmitRequest {
        jobs: vec![job_spec()],
        submission_key: key,
        pipeline: String::new(),
        ..Default::default()
    }
}

// ------------------------------------------------------------- the fleet

/// Shared state of the simulated agents.
pub(crate) struct Fleet {
    urls: Vec<String>,
    /// Job id -> when its first assignment reached an agent.
    assigned: Mutex<HashMap<u64, Instant>>,
    /// Per agent: when it last registered.
    registered: Mutex<Vec<Option<Instant>>>,
    /// How sessions failed before registering: connect failed, refused
    /// (gRPC error), no answer within 10 s, bad first message.
    failures: [AtomicU64; 4],
}

impl Fleet {
    /// Agents registered since `since`, and when each did (after `since`).
    fn registered_since(&self, since: Instant) -> (usize, Latencies) {
        let registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        let after: Vec<Duration> = registered
            .iter()
            .flatten()
            .filter(|at| **at >= since)
            .map(|at| at.duration_since(since))
            .collect();
        (after.len(), Latencies::new(after))
    }

    fn assigned_at(&self, job: u64) -> Option<Instant> {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .copied()
    }
}

pub(crate) fn up(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

pub(crate) fn register_message(name: &str) -> pb::AgentMessage {
    up(pb::agent_message::Msg::Register(pb::Register {
        node: name.to_string(),
        address: String::new(),
        labels: HashMap::new(),
        gpus: (0..8)
            .map(|index| pb::GpuStatic {
                index,
                model: "H100-80GiB".into(),
                total_bytes: 80 * GIB,
                uuid: format!("GPU-{name}-{index}"),
            })
            .collect(),
        cpu_millis: 64_000,
        memory_total_bytes: 512 * GIB,
        disk_total_bytes: 2048 * GIB,
        running: Vec::new(),
        version: "gantry-bench".into(),
    }))
}

fn heartbeat_message(seq: u64) -> pb::AgentMessage {
    up(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
        seq,
        sent_at_ms: unix_ms(),
        gpus: (0..8)
            .map(|index| pb::GpuTelemetry {
                index,
                used_bytes: 0,
                utilization_pct: 0,
                temperature_c: 40,
                fault: String::new(),
            })
            .collect(),
        cpu_used_pct: 5,
        memory_used_bytes: 8 * GIB,
        disk_used_bytes: 100 * GIB,
        disk_total_bytes: 2048 * GIB,
        jobs: Vec::new(),
        echo_ms: 0,
    }))
}

pub(crate) fn job_event(
    job_id: u64,
    attempt: u32,
    event: pb::job_event::Event,
) -> pb::AgentMessage {
    up(pb::agent_message::Msg::JobEvent(pb::JobEvent {
        job_id,
        attempt,
        event: Some(event),
        at_ms: unix_ms(),
    }))
}

/// Why a session ended.
enum SessionEnd {
    /// Refused or failed before registering; maybe with a leader hint.
    Refused {
        hint: Option<String>,
        /// Whether a connection was made at all.
        connected: bool,
    },
    /// Registered, then the stream ended.
    Ended,
}

impl SessionEnd {
    fn refused(hint: Option<String>) -> Self {
        Self::Refused {
            hint,
            connected: true,
        }
    }
}

/// One simulated agent, reconnecting for ever (aborted by the runtime), as
/// the real agent's link decides (`gantry_agent::reconnect`, the same code).
async fn agent(index: usize, fleet: Arc<Fleet>, first_url: String) {
    let name = format!("sim-{index}");
    let mut outbox: VecDeque<(Instant, pb::AgentMessage)> = VecDeque::new();
    let mut redirect = Some(first_url);
    let mut next = index;
    let mut reconnect = Reconnect::new();
    loop {
        let url = redirect.take().unwrap_or_else(|| {
            next += 1;
            fleet.urls[next % fleet.urls.len()].clone()
        });
        let end = session(index, &name, &url, &fleet, &mut outbox).await;
        let (registered, connected, hint) = match end {
            SessionEnd::Refused { hint, connected } => (false, connected, hint),
            SessionEnd::Ended => (true, true, None),
        };
        let ended = Ended {
            url: &url,
            registered,
            connected,
            leader: hint.as_deref(),
        };
        let (to, delay) = reconnect.after(ended, Instant::now());
        redirect = to;
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    index: usize,
    name: &str,
    url: &str,
    fleet: &Fleet,
    outbox: &mut VecDeque<(Instant, pb::AgentMessage)>,
) -> SessionEnd {
    let Ok(endpoint) = endpoint(url) else {
        return SessionEnd::Refused {
            hint: None,
            connected: false,
        };
    };
    let Ok(channel) = endpoint.connect().await else {
        fleet.failures[0].fetch_add(1, Ordering::Relaxed);
        return SessionEnd::Refused {
            hint: None,
            connected: false,
        };
    };
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4096);
    if tx.send(register_message(name)).await.is_err() {
        return SessionEnd::refused(None);
    }
    let mut client = AgentLinkClient::new(channel);
    let call = client.connect_agent(ReceiverStream::new(rx));
    let mut inbound = match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            fleet.failures[1].fetch_add(1, Ordering::Relaxed);
            return SessionEnd::refused(leader_hint(&status));
        }
        Err(_) => {
            fleet.failures[2].fetch_add(1, Ordering::Relaxed);
            return SessionEnd::refused(None);
        }
    };
    match inbound.message().await {
        Ok(Some(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Registered(_)),
        })) => {}
        _ => {
            fleet.failures[3].fetch_add(1, Ordering::Relaxed);
            return SessionEnd::refused(None);
        }
    }
    {
        let mut registered = fleet.registered.lock().unwrap_or_else(|e| e.into_inner());
        registered[index] = Some(Instant::now());
    }
    // Re-send recent job events (the coordinator deduplicates them).
    let now = Instant::now();
    while outbox
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > OUTBOX_KEEP)
    {
        outbox.pop_front();
    }
    for (_, message) in outbox.iter() {
        if tx.send(message.clone()).await.is_err() {
            return SessionEnd::Ended;
        }
    }
    let beat = tx.clone();
    let heartbeat = tokio::spawn(async move {
        let mut seq = 0;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            ticker.tick().await;
            seq += 1;
            if beat.send(heartbeat_message(seq)).await.is_err() {
                break;
            }
        }
    });
    while let Ok(Some(message)) = inbound.message().await {
        let Some(msg) = message.msg else { continue };
        let reply: Vec<pb::AgentMessage> = match msg {
            pb::coordinator_message::Msg::Assign(assignment) => {
                let at = Instant::now();
                fleet
                    .assigned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(assignment.job_id)
                    .or_insert(at);
                let started = job_event(
                    assignment.job_id,
                    assignment.attempt,
                    pb::job_event::Event::Started(pb::Started { pid: 1 }),
                );
                let exited = job_event(
                    assignment.job_id,
                    assignment.attempt,
                    pb::job_event::Event::Exited(pb::Exited {
                        code: Some(0),
                        ..Default::default()
                    }),
                );
                outbox.push_back((at, started.clone()));
                outbox.push_back((at, exited.clone()));
                while outbox
                    .front()
                    .is_some_and(|(t, _)| at.duration_since(*t) > OUTBOX_KEEP)
                {
                    outbox.pop_front();
                }
                vec![started, exited]
            }
            pb::coordinator_message::Msg::Ping(ping) => {
                vec![up(pb::agent_message::Msg::Pong(pb::Pong {
                    nonce: ping.nonce,
                }))]
            }
            pb::coordinator_message::Msg::LogRead(read) => {
                vec![up(pb::agent_message::Msg::LogData(pb::LogData {
                    request_id: read.request_id,
                    data: Vec::new(),
                    offset: read.offset,
                    eof: true,
                    error: String::new(),
                }))]
            }
            // Jobs end at once: nothing left to cancel.
            // 1 Hz is kept: a fleet this small is never stretched.
            // Recorded ends: the outbox is trimmed by age instead.
            pb::coordinator_message::Msg::Cancel(_)
            | pb::coordinator_message::Msg::EndRecorded(_)
            | pb::coordinator_message::Msg::Registered(_)
            | pb::coordinator_message::Msg::HeartbeatInterval(_) => Vec::new(),
        };
        for message in reply {
            if tx.send(message).await.is_err() {
                break;
            }
        }
    }
    heartbeat.abort();
    SessionEnd::Ended
}

// ------------------------------------------------------------ the client

/// One acknowledged submit.
struct Acked {
    job: u64,
    sent: Instant,
    latency: Duration,
}

struct Load {
    acked: Vec<Acked>,
    errors: usize,
    first_error: Option<String>,
    start: Instant,
    end: Instant,
}

impl Load {
    /// When the last acknowledgement came (the start when none did).
    fn last_ack(&self) -> Instant {
        self.acked
            .iter()
            .map(|a| a.sent + a.latency)
            .max()
            .unwrap_or(self.start)
    }
}

async fn sequential(client: &GantryClient<Channel>, run: &str, count: usize) -> Vec<Acked> {
    let mut client = client.clone();
    let mut out = Vec::with_capacity(count);
    for seq in 0..count {
        let sent = Instant::now();
        let call = client.submit(submit_request(format!("{run}-seq-{seq}")));
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(10), call).await {
            let latency = sent.elapsed();
            for job in response.into_inner().job_ids {
                out.push(Acked { job, sent, latency });
            }
        }
    }
    out
}

async fn load(config: &E2eConfig, leader_url: &str, run: &str) -> anyhow::Result<Load> {
    // One HTTP/2 connection per 16 submitters.
    let connections = config.concurrency.div_ceil(16).max(1);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(gantry_client(endpoint(leader_url)?.connect().await?));
    }
    if let Some(rate) = config.rate {
        let total = config
            .jobs
            .unwrap_or((rate * config.duration.as_secs_f64()).ceil() as u64);
        return open_loop::load(&clients, rate, total, run).await;
    }
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut tasks = Vec::new();
    for task in 0..config.concurrency {
        let mut client = clients[task % connections].clone();
        let issued = issued.clone();
        let limit = config.jobs;
        let run = run.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            let mut seq = 0u64;
            loop {
                match limit {
                    Some(limit) => {
                        if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                            break;
                        }
                    }
                    None => {
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                }
                seq += 1;
                let request = submit_request(format!("{run}-{task}-{seq}"));
                let sent = Instant::now();
                let call = client.submit(request);
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(response)) => {
                        let latency = sent.elapsed();
                        for job in response.into_inner().job_ids {
                            acked.push(Acked { job, sent, latency });
                        }
                    }
                    Ok(Err(status)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| status.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "timed out after 10 s".to_string());
                    }
                }
            }
            (acked, errors, first_error)
        }));
    }
    let mut out = Load {
        acked: Vec::new(),
        errors: 0,
        first_error: None,
        start,
        end: start,
    };
    for task in tasks {
        let (acked, errors, first_error) = task.await?;
        out.acked.extend(acked);
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first_error;
        }
    }
    out.end = out.last_ack();
    Ok(out)
}

/// Submits every 20 ms across the surviving replicas (following leader
/// hints) until one acknowledges.
async fn first_submit_after_kill(
    urls: &[String],
    dead: usize,
    run: &str,
    give_up: Duration,
) -> anyhow::Result<(usize, u64, u64)> {
    let mut clients: HashMap<usize, GantryClient<Channel>> = HashMap::new();
    for (i, url) in urls.iter().enumerate() {
        if i != dead {
            clients.insert(i, gantry_client(endpoint(url)?.connect_lazy()));
        }
    }
    let start = Instant::now();
    let mut attempts = 0u64;
    let mut target = (dead + 1) % urls.len();
    loop {
        attempts += 1;
        let Some(client) = clients.get_mut(&target) else {
            bail!("no client for replica {}", target + 1);
        };
        let call = client.submit(submit_request(format!("{run}-failover-{attempts}")));
        let mut hinted = None;
        match tokio::time::timeout(Duration::from_secs(1), call).await {
            Ok(Ok(response)) => {
                let job = response.into_inner().job_ids.first().copied().unwrap_or(0);
                return Ok((target, job, attempts));
            }
            Ok(Err(status)) => {
                hinted = leader_hint(&status)
                    .and_then(|hint| urls.iter().position(|u| *u == hint))
                    .filter(|&i| i != dead && i != target);
            }
            Err(_) => {}
        }
        if start.elapsed() > give_up {
            bail!("no replica acknowledged a submit within {give_up:?} of the leader's death");
        }
        match hinted {
            Some(i) => target = i,
            None => {
                target = (target + 1) % urls.len();
                if target == dead {
                    target = (target + 1) % urls.len();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Every job the leader knows of: the retained ones (one `ListJobs`) and,
/// paged through `since_ms`, those retired into the history since
/// `since_ms` (past `--max-retained-jobs` a long run retires its first
/// jobs; a retired job is archived, not lost). The states count the
/// retained jobs, plus `archived`.
async fn list_job_ids(
    url: &str,
    since_ms: u64,
) -> anyhow::Result<(HashSet<u64>, BTreeMap<String, usize>, Duration)> {
    let mut client = gantry_client(endpoint(url)?.connect().await?);
    let started = Instant::now();
    let jobs = client
        .list_jobs(pb::ListJobsRequest {
            states: Vec::new(),
            limit: 0,
            mine: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .jobs;
    let mut states = BTreeMap::new();
    let mut ids = HashSet::new();
    for job in jobs {
        *states.entry(job.state).or_insert(0) += 1;
        ids.insert(job.id);
    }
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                since_ms,
                page_token: page_token.clone(),
                limit: 1_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        for job in page.jobs.iter().filter(|j| j.archived) {
            if ids.insert(job.id) {
                *states.entry("archived".to_string()).or_insert(0) += 1;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok((ids, states, started.elapsed()))
}

/// Starts `agents` simulated agents (first at the leader's URL) and waits
/// until every one registered (at most 60 s).
pub(crate) async fn start_fleet(
    urls: &[String],
    agents: usize,
    leader: usize,
) -> anyhow::Result<(Arc<Fleet>, Vec<tokio::task::JoinHandle<()>>)> {
    let fleet = Arc::new(Fleet {
        urls: urls.to_vec(),
        assigned: Mutex::new(HashMap::new()),
        registered: Mutex::new(vec![None; agents]),
        failures: Default::default(),
    });
    let fleet_started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..agents {
        tasks.push(tokio::spawn(agent(
            index,
            fleet.clone(),
            urls[leader].clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (count, _) = fleet.registered_since(fleet_started);
        if count == agents {
            return Ok((fleet, tasks));
        }
        if Instant::now() > deadline {
            bail!("only {count} of {agents} simulated agents registered within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scenario(config: &E2eConfig, procs: &mut ProcGroup) -> anyhow::Result<E2eReport> {
    require_gantry(&config.gantry)?;
    let replicas = start_replicas(config, procs)?;
    let urls = replicas.urls.clone();
    let leader = wait_leader(&urls, None, Duration::from_secs(30))
        .await
        .context("no replica became leader within 30 s")?;
    eprintln!(
        "e2e: 3 replicas up ({}); leader is replica {}",
        urls.join(", "),
        leader + 1
    );

    // The fleet.
    let fleet_started = Instant::now();
    let (fleet, agents) = start_fleet(&urls, config.agents, leader).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = status(&urls[leader])
            .await
            .map_or(0, |s| s.nodes_ready as usize);
        if ready >= config.agents {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {} nodes ready within 30 s", config.agents);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "e2e: {} simulated agents registered in {:.2} s",
        config.agents,
        fleet_started.elapsed().as_secs_f64()
    );

    let run_started_ms = unix_ms();
    let run_id = format!("bench-{}-{}", std::process::id(), run_started_ms);
    let mut all_acked: Vec<u64> = Vec::new();

    // Sequential submits (also a warm-up).
    let seq_client = gantry_client(endpoint(&urls[leader])?.connect().await?);
    let seq = sequential(&seq_client, &run_id, config.sequential).await;
    all_acked.extend(seq.iter().map(|a| a.job));
    let sequential = Latencies::new(seq.iter().map(|a| a.latency).collect());

    // The load.
    let commit_before = entries::commit_index(&urls[leader]).await;
    let cpu_meter = CpuMeter::start(procs.pids(&replicas.procs));
    eprintln!(
        "e2e: submitting with {} tasks for {}",
        config.concurrency,
        match config.jobs {
            Some(n) => format!("{n} jobs"),
            None => format!("{:?}", config.duration),
        }
    );
    let load = load(config, &urls[leader], &run_id).await?;
    all_acked.extend(load.acked.iter().map(|a| a.job));

    // Wait until every acknowledged job has reached an agent (or 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = {
            let assigned = fleet.assigned.lock().unwrap_or_else(|e| e.into_inner());
            load.acked
                .iter()
                .filter(|a| !assigned.contains_key(&a.job))
                .count()
        };
        if missing == 0 || Instant::now() > deadline {
            if missing > 0 {
                eprintln!("e2e: {missing} acknowledged jobs not started 30 s after the load");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut to_start = Vec::new();
    let mut last_start = load.start;
    {
        let assigned = fleet.assigned.lock().unwrap_or_else(|e| e.into_inner());
        for a in &load.acked {
            if let Some(at) = assigned.get(&a.job) {
                to_start.push(at.saturating_duration_since(a.sent));
                last_start = last_start.max(*at);
            }
        }
    }
    let started = to_start.len();
    let commit_after = entries::settled_commit_index(&urls[leader]).await;
    let cpu = CpuMeter::used_or_report(cpu_meter, "e2e");
    eprintln!(
        "e2e: leader's commit index {commit_before:?} before the load, {commit_after:?} after"
    );
    let raft_entries_per_job =
        entries::entries_per_job(commit_before, commit_after, load.acked.len());
    let submit = Latencies::new(load.acked.iter().map(|a| a.latency).collect());

    // Failover.
    let mut failover = None;
    let mut final_leader = leader;
    if !config.no_failover {
        // Let the Started/Exited events settle so the kill hits a quiet-ish
        // leader, as in a real incident between bursts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        eprintln!("e2e: killing the leader (replica {})", leader + 1);
        let killed_at = Instant::now();
        procs.proc(replicas.procs[leader]).kill9();
        let (new_leader, probe_job, attempts) =
            first_submit_after_kill(&urls, leader, &run_id, Duration::from_secs(30)).await?;
        let failover_time = killed_at.elapsed();
        all_acked.push(probe_job);
        final_leader = new_leader;
        // The probe job's start and the agents' return (up to 15 s).
        let deadline = killed_at + Duration::from_secs(15);
        let mut first_start = None;
        loop {
            if first_start.is_none() {
                first_start = fleet
                    .assigned_at(probe_job)
                    .map(|at| at.saturating_duration_since(killed_at));
            }
            let (count, _) = fleet.registered_since(killed_at);
            if (first_start.is_some() && count == config.agents) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (reconnected, reconnect) = fleet.registered_since(killed_at);
        let failures: Vec<u64> = fleet
            .failures
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .collect();
        eprintln!(
            "e2e: agent sessions that failed before registering: {} connect, {} refused, {} unanswered (10 s), {} bad first message",
            failures[0], failures[1], failures[2], failures[3]
        );
        failover = Some(FailoverReport {
            killed: leader + 1,
            new_leader: new_leader + 1,
            failover: failover_time,
            attempts,
            first_start,
            agents_reconnected: reconnected,
            agents_reconnect: reconnect,
        });
    }

    // No acknowledged job may be missing on the leader.
    let (ids, states, list_time) =
        list_job_ids(&urls[final_leader], run_started_ms.saturating_sub(60_000))
            .await
            .context("ListJobs on the leader")?;
    let lost = all_acked.iter().filter(|id| !ids.contains(id)).count();
    eprintln!(
        "e2e: ListJobs returned {} jobs (the history's included) in {:.0} ms",
        ids.len(),
        ms(list_time)
    );
    for task in &agents {
        task.abort();
    }

    Ok(E2eReport {
        config: config.clone(),
        sequential,
        acked: load.acked.len(),
        errors: load.errors,
        first_error: load.first_error,
        load_time: load.end.saturating_duration_since(load.start),
        submit,
        submit_to_start: Latencies::new(to_start),
        started,
        start_time: last_start.saturating_duration_since(load.start),
        failover,
        checked: all_acked.len(),
        lost,
        states,
        raft_entries_per_job,
        cpu,
    })
}
