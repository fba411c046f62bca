//! `gantry-bench heartbeats`: the leader's heartbeat ingest. One `gantry
//! coordinator` process (a single voter, no HTTP) and an in-process fleet of
//! simulated agents speaking the agent protocol: each registers (8 fake GPUs),
//! then heartbeats at the interval the coordinator's `Registered` gave and
//! follows `HeartbeatInterval` changes, keeping its phase like the real
//! agent. The fleet shares a few HTTP/2 connections (`agents_per_connection`
//! streams on each; tonic's server sets no concurrent-stream limit), so
//! 10,000 agents need 40 sockets, not 10,000.
//!
//! Optionally `jobs` jobs are submitted once the fleet is up (in batches);
//! the agents report them Started and keep them running, listed in every
//! heartbeat, so the coordinator holds the target's 10,000 nodes and
//! 100,000 jobs.
//!
//! Measured over a steady window after registration (and the jobs): the
//! heartbeats the fleet sent per second, the coordinator's CPU (utime +
//! stime from `/proc/PID/stat`) and this process's, the coordinator's RSS
//! (`VmRSS`, and the peak `VmHWM`), the time the whole fleet took to
//! register, the interval the coordinator chose, and, as the coordinator's
//! own acknowledgement, its view at the end of the window: nodes Ready in
//! `ListNodes` and how long ago each was last heard from.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gantry_proto as pb;
use pb::agent_link_client::AgentLinkClient;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::e2e::{GIB, endpoint, gantry_client, job_event, register_message, status, unix_ms, up};
use crate::procs::{CpuMeter, ProcGroup, free_ports, require_gantry, run_scenario};
use crate::rng::Rng;
use crate::stats::Latencies;

/// What to run.
#[derive(Debug, Clone)]
pub struct HeartbeatsConfig {
    /// The `gantry` binary that runs the coordinator.
    pub gantry: PathBuf,
    /// Simulated agents (nodes of 8 GPUs).
    pub agents: usize,
    /// Length of the measured steady window.
    pub duration: Duration,
    /// Jobs submitted (and kept running) before the window.
    pub jobs: u64,
    /// Agent streams per HTTP/2 connection.
    pub agents_per_connection: usize,
    /// `--max-heartbeat-rate` for the coordinator (None = its default).
    pub max_heartbeat_rate: Option<u32>,
    /// `RUST_LOG` for the coordinator.
    pub log_level: String,
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct HeartbeatsReport {
    /// What ran.
    pub config: HeartbeatsConfig,
    /// HTTP/2 connections the fleet used.
    pub connections: usize,
    /// First agent started -> every agent had its `Registered`.
    pub registration: Duration,
    /// First agent started -> the coordinator said every node is Ready.
    pub ready: Duration,
    /// Submitting the jobs -> every one reached an agent (None = no jobs).
    pub jobs_time: Option<Duration>,
    /// Jobs acknowledged.
    pub jobs_acked: u64,
    /// Assignments the agents received.
    pub jobs_started: u64,
    /// Heartbeat interval the agents were on at the end (min, max), ms.
    pub interval_ms: (u32, u32),
    /// The measured window.
    pub window: Duration,
    /// Heartbeats the fleet sent in the window.
    pub sent: u64,
    /// Heartbeats skipped in the window because a stream was backed up.
    pub skipped: u64,
    /// Coordinator CPU over the window, percent of one core.
    pub coordinator_cpu_pct: f64,
    /// This process's CPU over the window, percent of one core.
    pub bench_cpu_pct: f64,
    /// Coordinator RSS at the end of the window.
    pub rss_bytes: u64,
    /// Largest coordinator RSS sampled during the window.
    pub rss_max_bytes: u64,
    /// Coordinator peak RSS over its life (`VmHWM`).
    pub rss_peak_bytes: u64,
    /// Nodes the coordinator listed at the end, and how many were Ready.
    pub nodes_listed: usize,
    /// Nodes Ready at the end of the window.
    pub nodes_ready: usize,
    /// Now minus each node's last-seen time, at the end of the window.
    pub staleness: Latencies,
    /// Sessions that failed before registering (retried).
    pub failed_sessions: u64,
}

impl HeartbeatsReport {
    /// Heartbeats sent per second of the window.
    pub fn per_s(&self) -> f64 {
        self.sent as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Heartbeats per second per agent.
    pub fn hz(&self) -> f64 {
        self.per_s() / self.config.agents.max(1) as f64
    }

    /// The machine-readable record printed by `--json`.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        json!({
            "scenario": "heartbeats",
            "agents": c.agents,
            "gpus_per_agent": 8,
            "connections": self.connections,
            "jobs": c.jobs,
            "jobs_acked": self.jobs_acked,
            "jobs_started": self.jobs_started,
            "jobs_s": self.jobs_time.map(|d| d.as_secs_f64()),
            "max_heartbeat_rate": c.max_heartbeat_rate,
            "interval_ms_min": self.interval_ms.0,
            "interval_ms_max": self.interval_ms.1,
            "registration_s": self.registration.as_secs_f64(),
            "ready_s": self.ready.as_secs_f64(),
            "window_s": self.window.as_secs_f64(),
            "heartbeats_sent": self.sent,
            "heartbeats_skipped": self.skipped,
            "heartbeats_per_s": self.per_s(),
            "hz_per_agent": self.hz(),
            "coordinator_cpu_pct": self.coordinator_cpu_pct,
            "bench_cpu_pct": self.bench_cpu_pct,
            "coordinator_rss_bytes": self.rss_bytes,
            "coordinator_rss_max_bytes": self.rss_max_bytes,
            "coordinator_rss_peak_bytes": self.rss_peak_bytes,
            "nodes_listed": self.nodes_listed,
            "nodes_ready": self.nodes_ready,
            "last_seen_age_p50_ms": self.staleness.ms(0.5),
            "last_seen_age_p99_ms": self.staleness.ms(0.99),
            "last_seen_age_max_ms": self.staleness.ms(1.0),
            "failed_sessions": self.failed_sessions,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        })
    }

    /// The human summary; the first line is the headline figure.
    pub fn human(&self) -> String {
        let c = &self.config;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let interval = if self.interval_ms.0 == self.interval_ms.1 {
            format!("{} ms", self.interval_ms.0)
        } else {
            format!("{}..{} ms", self.interval_ms.0, self.interval_ms.1)
        };
        let mut out = format!(
            "{} agents at {:.2} Hz: coordinator CPU {:.0}% of one core, RSS {:.0} MiB\n\
             gantry-bench heartbeats: 1 coordinator, {} simulated agents x 8 GPUs on {} HTTP/2 connections, {} jobs, {:.0} s window\n\
             heartbeats: {} sent in {:.1} s = {:.0}/s ({} skipped on a backed-up stream); interval chosen by the coordinator {}{}\n\
             registration: whole fleet registered in {:.2} s, all Ready in {:.2} s ({} sessions retried)\n",
            c.agents,
            self.hz(),
            self.coordinator_cpu_pct,
            mib(self.rss_bytes),
            c.agents,
            self.connections,
            c.jobs,
            self.window.as_secs_f64(),
            self.sent,
            self.window.as_secs_f64(),
            self.per_s(),
            self.skipped,
            interval,
            c.max_heartbeat_rate
                .map(|r| format!(" (--max-heartbeat-rate {r})"))
                .unwrap_or_default(),
            self.registration.as_secs_f64(),
            self.ready.as_secs_f64(),
            self.failed_sessions,
        );
        if let Some(took) = self.jobs_time {
            out.push_str(&format!(
                "jobs: {} acknowledged, {} started on agents in {:.1} s (kept running, reported in heartbeats)\n",
                self.jobs_acked,
                self.jobs_started,
                took.as_secs_f64()
            ));
        }
        out.push_str(&format!(
            "coordinator: CPU {:.0}% of one core, RSS {:.0} MiB (max in window {:.0} MiB, peak {:.0} MiB); this bench process: CPU {:.0}% (same {}-core machine)\n\
             coordinator view at the end: {} of {} nodes Ready; last heard from p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ago\n",
            self.coordinator_cpu_pct,
            mib(self.rss_bytes),
            mib(self.rss_max_bytes),
            mib(self.rss_peak_bytes),
            self.bench_cpu_pct,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.nodes_ready,
            self.nodes_listed,
            self.staleness.ms(0.5),
            self.staleness.ms(0.99),
            self.staleness.ms(1.0),
        ));
        let check = |ok: bool| if ok { "ok" } else { "MISSED" };
        let at_1hz = self.interval_ms.1 <= 1_000 && self.hz() >= 0.95;
        out.push_str(&format!(
            "targets: {} agents at 1 Hz {}; coordinator CPU < 100% of one core {}; RSS <= 500 MiB {}{}",
            c.agents,
            check(at_1hz && self.nodes_ready == c.agents),
            check(self.coordinator_cpu_pct < 100.0),
            check(self.rss_max_bytes <= 500 << 20),
            if c.agents == 10_000 && c.jobs >= 100_000 {
                ""
            } else {
                " (the RSS target is set at 10,000 agents and 100,000 jobs)"
            },
        ));
        out
    }
}

/// Runs the scenario (its own tokio runtime; the coordinator is stopped on
/// return, error or not).
pub fn run(config: &HeartbeatsConfig) -> anyhow::Result<HeartbeatsReport> {
    run_scenario("gantry-bench-heartbeats-", 20, async |procs| {
        scenario(config, procs).await
    })
}

/// Shared counters of the simulated fleet.
struct Fleet {
    registered: AtomicU64,
    sent: AtomicU64,
    skipped: AtomicU64,
    assigned: AtomicU64,
    failed: AtomicU64,
    /// Each agent's current interval, ms (0 = not registered yet).
    intervals: Vec<AtomicU32>,
}

/// A `/proc/PID/status` size field (`VmRSS`, `VmHWM`) in bytes.
pub(crate) fn status_bytes(pid: &str, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("status value")?
        .parse()?;
    Ok(kib * 1024)
}

fn heartbeat(seq: u64, running: &[(u64, u32)]) -> pb::AgentMessage {
    // Running jobs share the node's 8 GPUs; report their memory per GPU.
    let per_gpu = running.len().div_ceil(8) as i64;
    up(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
        seq,
        sent_at_ms: unix_ms(),
        gpus: (0..8)
            .map(|index| pb::GpuTelemetry {
                index,
                used_bytes: per_gpu * 8 * GIB,
                utilization_pct: if running.is_empty() { 0 } else { 90 },
                temperature_c: 40,
                fault: String::new(),
            })
            .collect(),
        cpu_used_pct: 5,
        memory_used_bytes: 8 * GIB,
        disk_used_bytes: 100 * GIB,
        disk_total_bytes: 2048 * GIB,
        jobs: running
            .iter()
            .map(|&(job_id, attempt)| pb::JobUsage {
                job_id,
                attempt,
                gpu_memory_bytes: 6 * GIB,
            })
            .collect(),
        echo_ms: 0,
    }))
}

fn ticker(period: Duration, last_beat: Option<tokio::time::Instant>) -> tokio::time::Interval {
    // As the real agent: the first beat at once, a changed interval counted
    // from the last beat.
    let start = last_beat.map_or_else(tokio::time::Instant::now, |at| at + period);
    let mut ticker = tokio::time::interval_at(start, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// One simulated agent, re-registering after a lost session (aborted by
/// the runtime at the end).
async fn agent(index: usize, channel: Channel, fleet: Arc<Fleet>) {
    let name = format!("hb-{index:05}");
    let mut rng = Rng::new(index as u64 + 1);
    let mut backoff = Duration::from_millis(200);
    loop {
        if session(index, &name, channel.clone(), &fleet).await {
            backoff = Duration::from_millis(200);
        } else {
            fleet.failed.fetch_add(1, Ordering::Relaxed);
        }
        let half = backoff.as_millis() as u64 / 2;
        tokio::time::sleep(Duration::from_millis(half + rng.below(half + 1))).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One session; true when it registered.
async fn session(index: usize, name: &str, channel: Channel, fleet: &Fleet) -> bool {
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    if tx.send(register_message(name)).await.is_err() {
        return false;
    }
    let mut client = AgentLinkClient::new(channel);
    let call = client.connect_agent(ReceiverStream::new(rx));
    let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(60), call).await else {
        return false;
    };
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), inbound.message()).await;
    let Ok(Ok(Some(pb::CoordinatorMessage {
        msg: Some(pb::coordinator_message::Msg::Registered(registered)),
    }))) = first
    else {
        return false;
    };
    let mut interval_ms = registered.heartbeat_interval_ms.max(10);
    fleet.intervals[index].store(interval_ms, Ordering::Relaxed);
    fleet.registered.fetch_add(1, Ordering::Relaxed);
    let mut running: Vec<(u64, u32)> = Vec::new();
    let mut beats = ticker(Duration::from_millis(u64::from(interval_ms)), None);
    let mut last_beat = None;
    let mut seq = 0;
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Ok(Some(message)) = message else { break };
                let Some(msg) = message.msg else { continue };
                let reply = match msg {
                    pb::coordinator_message::Msg::Assign(a) => {
                        fleet.assigned.fetch_add(1, Ordering::Relaxed);
                        running.push((a.job_id, a.attempt));
                        Some(job_event(a.job_id, a.attempt, pb::job_event::Event::Started(pb::Started { pid: 1 })))
                    }
                    pb::coordinator_message::Msg::Cancel(c) => {
                        running.retain(|r| *r != (c.job_id, c.attempt));
                        Some(job_event(c.job_id, c.attempt, pb::job_event::Event::Exited(pb::Exited {
                            code: None,
                            cancelled: true,
                            ..Default::default()
                        })))
                    }
                    pb::coordinator_message::Msg::Ping(ping) => {
                        Some(up(pb::agent_message::Msg::Pong(pb::Pong { nonce: ping.nonce })))
                    }
                    pb::coordinator_message::Msg::LogRead(read) => {
                        Some(up(pb::agent_message::Msg::LogData(pb::LogData {
                            request_id: read.request_id,
                            data: Vec::new(),
                            offset: read.offset,
                            eof: true,
                            error: String::new(),
                        })))
                    }
                    pb::coordinator_message::Msg::HeartbeatInterval(change) => {
                        if change.interval_ms > 0 && change.interval_ms != interval_ms {
                            interval_ms = change.interval_ms;
                            fleet.intervals[index].store(interval_ms, Ordering::Relaxed);
                            beats = ticker(Duration::from_millis(u64::from(interval_ms)), last_beat);
                        }
                        None
                    }
                    pb::coordinator_message::Msg::Registered(_)
                    | pb::coordinator_message::Msg::EndRecorded(_) => None,
                };
                if let Some(reply) = reply && tx.send(reply).await.is_err() {
                    break;
                }
            }
            _ = beats.tick() => {
                last_beat = Some(tokio::time::Instant::now());
                seq += 1;
                match tx.try_send(heartbeat(seq, &running)) {
                    Ok(()) => { fleet.sent.fetch_add(1, Ordering::Relaxed); }
                    Err(mpsc::error::TrySendError::Full(_)) => { fleet.skipped.fetch_add(1, Ordering::Relaxed); }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
    }
    fleet.intervals[index].store(0, Ordering::Relaxed);
    fleet.registered.fetch_sub(1, Ordering::Relaxed);
    true
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl AsyncFnMut() -> (bool, String),
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, progress) = done().await;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not done within {timeout:?} ({progress})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn submit_batch(run: &str, batch: u64, count: u64) -> pb::SubmitRequest {
    let spec = pb::JobSpec {
        name: "hb".into(),
        kind: "generic".into(),
        command: vec!["sleep".into(), "infinity".into()],
        resources: Some(pb::Resources {
            gpus: 1,
            gpu_memory_bytes: 6 * GIB,
            ..Default::default()
        }),
        ..Default::default()
    };
    pb::SubmitRequest {
        jobs: vec![spec; count as usize],
        submission_key: format!("{run}-{batch}"),
        pipeline: String::new(),
        ..Default::default()
    }
}

/// Submits `jobs` jobs in batches of 1,000 from 4 tasks; returns how many
/// were acknowledged.
async fn submit_jobs(url: &str, jobs: u64) -> anyhow::Result<u64> {
    const BATCH: u64 = 1_000;
    let client = gantry_client(endpoint(url)?.connect().await?);
    let run = format!("hb-{}-{}", std::process::id(), unix_ms());
    let batches = jobs.div_ceil(BATCH);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = client.clone();
        let next = next.clone();
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch >= batches {
                    return Ok::<u64, anyhow::Error>(acked);
                }
                let count = BATCH.min(jobs - batch * BATCH);
                let response = client
                    .submit(submit_batch(&run, batch, count))
                    .await
                    .with_context(|| format!("submit of batch {batch}"))?;
                acked += response.into_inner().job_ids.len() as u64;
            }
        }));
    }
    let mut acked = 0;
    for task in tasks {
        acked += task.await??;
    }
    Ok(acked)
}

async fn scenario(
    config: &HeartbeatsConfig,
    procs: &mut ProcGroup,
) -> anyhow::Result<HeartbeatsReport> {
    require_gantry(&config.gantry)?;
    let addr = free_ports(1)?[0];
    let url = format!("http://{addr}");
    let mut args = vec![
        "coordinator".to_string(),
        "--grpc-addr".into(),
        addr.to_string(),
        "--data-dir".into(),
        procs.path().join("coordinator").display().to_string(),
        "--http-addr".into(),
        "off".into(),
    ];
    if let Some(rate) = config.max_heartbeat_rate {
        args.extend(["--max-heartbeat-rate".into(), rate.to_string()]);
    }
    let pid = procs.spawn_coordinator(&config.gantry, &args, &config.log_level)?;
    wait_for("leadership", Duration::from_secs(30), async || {
        (
            status(&url).await.is_some_and(|s| s.is_leader),
            String::new(),
        )
    })
    .await?;

    // The fleet, on shared connections.
    let per_connection = config.agents_per_connection.max(1);
    let connections = config.agents.div_ceil(per_connection).max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            endpoint(&url)?
                .connect()
                .await
                .context("connecting the fleet")?,
        );
    }
    let fleet = Arc::new(Fleet {
        registered: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        assigned: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        intervals: (0..config.agents).map(|_| AtomicU32::new(0)).collect(),
    });
    eprintln!(
        "heartbeats: coordinator up at {url} (pid {pid}); starting {} agents on {connections} connections",
        config.agents
    );
    let started = Instant::now();
    let mut agents = Vec::with_capacity(config.agents);
    for i in 0..config.agents {
        agents.push(tokio::spawn(agent(
            i,
            channels[i % connections].clone(),
            fleet.clone(),
        )));
    }
    let total = config.agents as u64;
    wait_for("registration", Duration::from_secs(300), async || {
        let n = fleet.registered.load(Ordering::Relaxed);
        (n >= total, format!("{n} of {total} registered"))
    })
    .await?;
    let registration = started.elapsed();
    wait_for("readiness", Duration::from_secs(60), async || {
        let ready = status(&url).await.map_or(0, |s| s.nodes_ready) as u64;
        (ready >= total, format!("{ready} of {total} Ready"))
    })
    .await?;
    let ready = started.elapsed();
    eprintln!(
        "heartbeats: {} agents registered in {:.2} s, Ready in {:.2} s",
        config.agents,
        registration.as_secs_f64(),
        ready.as_secs_f64()
    );

    // The jobs.
    let mut jobs_time = None;
    let mut jobs_acked = 0;
    if config.jobs > 0 {
        let submitted = Instant::now();
        jobs_acked = submit_jobs(&url, config.jobs).await?;
        eprintln!(
            "heartbeats: {jobs_acked} jobs acknowledged in {:.1} s; waiting for them to start",
            submitted.elapsed().as_secs_f64()
        );
        wait_for("job starts", Duration::from_secs(300), async || {
            let n = fleet.assigned.load(Ordering::Relaxed);
            (n >= jobs_acked, format!("{n} of {jobs_acked} started"))
        })
        .await?;
        jobs_time = Some(submitted.elapsed());
    }

    // Settle (every agent on its current interval for two beats), then measure.
    let max_interval = fleet
        .intervals
        .iter()
        .map(|i| i.load(Ordering::Relaxed))
        .max()
        .unwrap_or(1_000);
    tokio::time::sleep(
        Duration::from_millis(u64::from(max_interval) * 2).max(Duration::from_secs(2)),
    )
    .await;
    let meter = CpuMeter::start(vec![pid.parse().context("coordinator pid")?])?;
    let (sent0, skipped0) = (
        fleet.sent.load(Ordering::Relaxed),
        fleet.skipped.load(Ordering::Relaxed),
    );
    let window_start = Instant::now();
    let mut rss_max = 0;
    while window_start.elapsed() < config.duration {
        rss_max = rss_max.max(status_bytes(&pid, "VmRSS:")?);
        let left = config.duration.saturating_sub(window_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let window = window_start.elapsed();
    let used = meter.used()?;
    let sent = fleet.sent.load(Ordering::Relaxed) - sent0;
    let skipped = fleet.skipped.load(Ordering::Relaxed) - skipped0;
    let rss_bytes = status_bytes(&pid, "VmRSS:")?;
    let rss_peak_bytes = status_bytes(&pid, "VmHWM:")?;
    let pct = |cpu: Duration| cpu.as_secs_f64() / window.as_secs_f64() * 100.0;

    // The coordinator's own view.
    let mut client = gantry_client(endpoint(&url)?.connect().await?);
    let nodes = client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .context("ListNodes")?
        .into_inner()
        .nodes;
    let now = unix_ms();
    let nodes_ready = nodes.iter().filter(|n| n.state == "ready").count();
    let staleness = Latencies::new(
        nodes
            .iter()
            .map(|n| Duration::from_millis(now.saturating_sub(n.last_seen_ms)))
            .collect(),
    );
    let intervals: Vec<u32> = fleet
        .intervals
        .iter()
        .map(|i| i.load(Ordering::Relaxed))
        .collect();
    for task in &agents {
        task.abort();
    }
    eprintln!(
        "heartbeats: window done ({} sent, last heard p99 {:.0} ms ago)",
        sent,
        staleness.ms(0.99)
    );
    Ok(HeartbeatsReport {
        config: config.clone(),
        connections,
        registration,
        ready,
        jobs_time,
        jobs_acked,
        jobs_started: fleet.assigned.load(Ordering::Relaxed),
        interval_ms: (
            intervals.iter().copied().min().unwrap_or(0),
            intervals.iter().copied().max().unwrap_or(0),
        ),
        window,
        sent,
        skipped,
        coordinator_cpu_pct: pct(used.measured),
        bench_cpu_pct: pct(used.own),
        rss_bytes,
        rss_max_bytes: rss_max.max(rss_bytes),
        rss_peak_bytes,
        nodes_listed: nodes.len(),
        nodes_ready,
        staleness,
        failed_sessions: fleet.failed.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_from_proc() {
        let me = std::process::id().to_string();
        assert!(crate::procs::cpu_ticks(&me).is_ok());
        assert!(
            CpuMeter::start(vec![std::process::id()])
                .unwrap()
                .used()
                .is_ok()
        );
        assert!(status_bytes(&me, "VmRSS:").unwrap() > 0);
    }
}
