//! The coordinator link: one `ConnectAgent` stream at a time.
//!
//! Per connection: send `Register` (node facts + running attempts), wait for
//! `Registered`, stop the attempts it lists, flush the [`Outbox`], then
//! heartbeat every interval while serving assignments, cancels and log
//! reads. When the stream breaks, reconnect as [`crate::reconnect`] decides:
//! straight to the leader a "not leader" answer names, else the next of the
//! coordinator list, after a short poll while failing over from a leader
//! just lost and an exponential back-off with jitter otherwise. Jobs keep
//! running while disconnected.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_proto as pb;
use gantry_proto::agent_link_client::AgentLinkClient;
use gantry_proto::agent_message::Msg as Up;
use gantry_proto::coordinator_message::Msg as Down;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::config::AgentConfig;
use crate::convert::{agent_message, wire_bytes};
use crate::executor::{
    Executor, JobEvent, JobEventKind, Launch, LaunchOutcome, StopReason, now_ms,
};
use crate::fence::Contact;
use crate::outbox::Outbox;
use crate::probe::Probes;
use crate::reconnect::{Ended, Reconnect};

/// Metadata key a non-leader coordinator may set to the leader's URL.
pub const LEADER_METADATA: &str = "gantry-leader";
/// How long to wait for TCP + HTTP/2 set-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the coordinator may take to answer `Register`: the stream's
/// response and its first message (`Registered`) together. Without a bound
/// on both, a coordinator that never answers (its registration never
/// committed) held an agent for ever while its node went Down and its
/// finished jobs ran again elsewhere (the nemesis, issue 10).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event or log reply may wait for room in the stream before
/// the connection is considered stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the best-effort flush of final events at shutdown.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// Messages buffered towards the coordinator.
const STREAM_BUFFER: usize = 1024;

/// How a session ended.
enum SessionEnd {
    /// The shutdown token was cancelled.
    Shutdown,
    /// The connection failed or broke.
    Lost {
        /// Whether `Registered` was received (the coordinator was reachable).
        registered: bool,
        /// Whether a connection was made at all.
        connected: bool,
        /// What went wrong, for the log.
        error: String,
        /// The leader's URL, when a follower redirected us.
        leader: Option<String>,
    },
}

impl SessionEnd {
    fn lost(registered: bool, error: impl Into<String>) -> Self {
        Self::Lost {
            registered,
            connected: true,
            error: error.into(),
            leader: None,
        }
    }

    /// No connection could be made.
    fn unreachable(error: impl Into<String>) -> Self {
        Self::Lost {
            registered: false,
            connected: false,
            error: error.into(),
            leader: None,
        }
    }

    fn from_status(registered: bool, status: &tonic::Status) -> Self {
        // A broken connection (e.g. a refused TLS handshake) says why only
        // in the status's causes.
        let mut error = format!("{}: {}", status.code(), status.message());
        let mut cause = std::error::Error::source(status);
        while let Some(source) = cause {
            let text = source.to_string();
            if !error.contains(&text) {
                error.push_str(": ");
                error.push_str(&text);
            }
            cause = source.source();
        }
        Self::Lost {
            registered,
            connected: true,
            error,
            leader: leader_hint(status),
        }
    }
}

/// gRPC metadata key of the join token (the coordinator's
/// `auth::JOIN_TOKEN_METADATA`; the agent does not depend on the coordinator).
pub const JOIN_TOKEN_METADATA: &str = "gantry-join-token";

/// The one place a coordinator endpoint is built: `https://` needs TLS
/// configured, and with TLS configured a plaintext `http://` URL is refused.
pub(crate) fn coordinator_endpoint(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    match (url.starts_with("https://"), tls) {
        (true, Some(tls)) => endpoint.tls_config(tls.clone()).map_err(|e| e.to_string()),
        (true, None) => Err("an https:// coordinator needs --tls-ca".into()),
        (false, Some(_)) => {
            Err("TLS is configured (--tls-ca): coordinator URLs must be https://".into())
        }
        (false, None) => Ok(endpoint),
    }
}

/// The leader URL of a "not leader" answer, when it names one.
fn leader_hint(status: &tonic::Status) -> Option<String> {
    if !status.message().starts_with("not leader") {
        return None;
    }
    let url = status
        .metadata()
        .get(LEADER_METADATA)?
        .to_str()
        .ok()?
        .trim();
    (!url.is_empty()).then(|| url.to_string())
}

/// The link's state across connections.
pub(crate) struct Link {
    config: Arc<AgentConfig>,
    executor: Executor,
    /// A std mutex: probes are synchronous and run under `spawn_blocking`.
    probes: Arc<Mutex<Probes>>,
    events: mpsc::UnboundedReceiver<JobEvent>,
    outbox: Outbox,
    heartbeat_seq: u64,
    /// Confirmed contact with the leader, read by the fence task.
    contact: Contact,
}

impl Link {
    pub(crate) fn new(
        config: Arc<AgentConfig>,
        executor: Executor,
        probes: Probes,
        events: mpsc::UnboundedReceiver<JobEvent>,
        contact: Contact,
    ) -> Self {
        Self {
            config,
            executor,
            probes: Arc::new(Mutex::new(probes)),
            events,
            outbox: Outbox::new(),
            heartbeat_seq: 0,
            contact,
        }
    }

    /// Connects, serves, reconnects; returns once `shutdown` is cancelled.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut reconnect = Reconnect::new();
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        let coordinators = self.config.coordinators.clone();
        loop {
            let url = match redirect.take() {
                Some(url) => url,
                None => {
                    let url = coordinators[next % coordinators.len()].clone();
                    next = next.wrapping_add(1);
                    url
                }
            };
            match self.session(&url, &shutdown).await {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost {
                    registered,
                    connected,
                    error,
                    leader,
                } => {
                    let ended = Ended {
                        url: &url,
                        registered,
                        connected,
                        leader: leader.as_deref(),
                    };
                    let (to, delay) = reconnect.after(ended, std::time::Instant::now());
                    tracing::warn!(
                        coordinator = %url,
                        %error,
                        leader = leader.as_deref().unwrap_or(""),
                        retry_in_ms = delay.as_millis() as u64,
                        "coordinator link lost"
                    );
                    redirect = to;
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection, from connect to break (or shutdown).
    async fn session(&mut self, url: &str, shutdown: &CancellationToken) -> SessionEnd {
        let endpoint = match coordinator_endpoint(url, self.config.tls.as_ref()) {
            Ok(endpoint) => endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                // Heartbeats flow one way; HTTP/2 pings notice a coordinator
                // that vanished without closing the connection (partition).
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true),
            Err(e) => return SessionEnd::unreachable(format!("bad URL {url}: {e}")),
        };
        let channel = tokio::select! {
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            channel = endpoint.connect() => match channel {
                Ok(channel) => channel,
                Err(e) => return SessionEnd::unreachable(format!("cannot connect: {e}")),
            },
        };
        let mut client = AgentLinkClient::new(channel);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let register = self.register().await;
        let running = register.running.len();
        let register_sent_at = std::time::Instant::now();
        // Queued before the call: the coordinator may read it before answering.
        if tx
            .send(agent_message(Up::Register(register)))
            .await
            .is_err()
        {
            return SessionEnd::lost(false, "request stream closed");
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.config.join_token {
            match token.0.parse() {
                Ok(value) => {
                    request.metadata_mut().insert(JOIN_TOKEN_METADATA, value);
                }
                Err(_) => return SessionEnd::lost(false, "join token is not valid metadata"),
            }
        }
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        let response = tokio::select! {
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            response = tokio::time::timeout_at(deadline, client.connect_agent(request)) => response,
        };
        let mut inbound = match response {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return SessionEnd::from_status(false, &status),
            Err(_) => return SessionEnd::lost(false, "no answer to Register in time"),
        };
        let first = tokio::select! {
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            first = tokio::time::timeout_at(deadline, inbound.message()) => first,
        };
        let registered = match first {
            Err(_) => return SessionEnd::lost(false, "no Registered reply in time"),
            Ok(Err(status)) => return SessionEnd::from_status(false, &status),
            Ok(Ok(None)) => return SessionEnd::lost(false, "stream closed before Registered"),
            Ok(Ok(Some(pb::CoordinatorMessage {
                msg: Some(Down::Registered(registered)),
            }))) => registered,
            Ok(Ok(Some(other))) => {
                return SessionEnd::lost(false, format!("expected Registered, got {other:?}"));
            }
        };
        let mut interval = self.config.heartbeat_interval;
        if registered.heartbeat_interval_ms > 0 {
            interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms));
        }
        self.contact.registered(register_sent_at, interval);
        tracing::info!(
            coordinator = %url,
            running,
            stop = registered.stop.len(),
            heartbeat_ms = interval.as_millis() as u64,
            "registered with coordinator"
        );
        for stale in &registered.stop {
            tracing::warn!(
                job_id = stale.job_id,
                attempt = stale.attempt,
                "coordinator does not recognise attempt: stopping it"
            );
            self.executor
                .stop(stale.job_id, stale.attempt, None, StopReason::Stale);
        }

        // Whatever happened while disconnected, then what was kept for re-send.
        while let Ok(event) = self.events.try_recv() {
            self.outbox.push_unsent(event);
        }
        self.acknowledge_expired();
        for event in self.outbox.on_registered(Instant::now()) {
            if let Err(end) = send_event(&tx, event).await {
                return end;
            }
        }

        let mut ticker = heartbeat_ticker(interval, None);
        let mut last_beat: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.final_flush(&tx).await;
                    return SessionEnd::Shutdown;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(new) = self.handle(message, &tx)
                            && new != interval
                        {
                            tracing::info!(
                                from_ms = interval.as_millis() as u64,
                                to_ms = new.as_millis() as u64,
                                "coordinator changed the heartbeat interval"
                            );
                            interval = new;
                            self.contact.interval(interval);
                            // Counted from the last beat: a fleet told at
                            // once must not beat at once.
                            ticker = heartbeat_ticker(interval, last_beat);
                        }
                    }
                    Ok(None) => return SessionEnd::lost(true, "coordinator closed the stream"),
                    Err(status) => return SessionEnd::from_status(true, &status),
                },
                Some(event) = self.events.recv() => {
                    self.outbox.push_sent(event.clone(), Instant::now());
                    if let Err(end) = send_event(&tx, event).await {
                        return end;
                    }
                }
                _ = ticker.tick() => {
                    last_beat = Some(tokio::time::Instant::now());
                    self.acknowledge_expired();
                    let heartbeat = self.heartbeat().await;
                    let seq = heartbeat.seq;
                    match tx.try_send(agent_message(Up::Heartbeat(heartbeat))) {
                        Ok(()) => self.contact.sent(seq, std::time::Instant::now()),
                        // A backed-up stream: the next heartbeat is fresher anyway.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!("stream backed up: heartbeat skipped");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return SessionEnd::lost(true, "request stream closed");
                        }
                    }
                }
            }
        }
    }

    /// Tells the executor which final events the coordinator now has (their
    /// re-send window passed), so their attempt directories can go.
    fn acknowledge_expired(&mut self) {
        let expired = self.outbox.expire(Instant::now());
        if !expired.is_empty() {
            self.executor.acknowledge(&expired);
        }
    }

    /// Serves one coordinator message; returns a new heartbeat interval when
    /// the coordinator changed it.
    fn handle(
        &mut self,
        message: pb::CoordinatorMessage,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) -> Option<Duration> {
        match message.msg? {
            Down::Registered(registered) => (registered.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(registered.heartbeat_interval_ms))),
            Down::HeartbeatInterval(change) => (change.interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(change.interval_ms))),
            Down::Assign(assignment) => {
                let launch = Launch::from(assignment);
                let (job_id, attempt) = (launch.job_id, launch.attempt);
                let span = tracing::info_span!(
                    "job",
                    job_id,
                    attempt,
                    kind = %launch.kind,
                    node = %self.config.node_name,
                );
                let _entered = span.enter();
                match self.executor.launch(launch) {
                    LaunchOutcome::Accepted => {
                        tracing::info!(job_id, attempt, "assignment accepted");
                    }
                    LaunchOutcome::Duplicate => {
                        tracing::info!(
                            job_id,
                            attempt,
                            "duplicate assignment: not started again, its status is reported"
                        );
                    }
                    LaunchOutcome::ShuttingDown => {
                        // Refused explicitly so the coordinator places it elsewhere now.
                        tracing::info!(job_id, attempt, "assignment refused: agent shutting down");
                        let event = JobEvent {
                            job_id,
                            attempt,
                            at_ms: now_ms(),
                            kind: JobEventKind::SpawnFailed {
                                error: "agent is shutting down".into(),
                            },
                        };
                        self.outbox.push_sent(event.clone(), Instant::now());
                        let _ = tx.try_send(agent_message(Up::JobEvent(event.into())));
                    }
                }
                None
            }
            Down::Cancel(cancel) => {
                let span = tracing::info_span!(
                    "job",
                    job_id = cancel.job_id,
                    attempt = cancel.attempt,
                    node = %self.config.node_name,
                );
                let _entered = span.enter();
                if !cancel.reason.is_empty() {
                    tracing::info!(reason = %cancel.reason, "coordinator asks to stop the attempt");
                }
                let grace = (cancel.grace_ms > 0).then(|| Duration::from_millis(cancel.grace_ms));
                if !self.executor.stop_because(
                    cancel.job_id,
                    cancel.attempt,
                    grace,
                    StopReason::Cancelled,
                    cancel.reason.clone(),
                ) {
                    tracing::debug!(
                        job_id = cancel.job_id,
                        attempt = cancel.attempt,
                        "cancel for an attempt not running here"
                    );
                }
                None
            }
            Down::EndRecorded(end) => {
                // The coordinator committed the end: no more re-sends, and
                // the attempt's directory follows the acknowledged policy.
                let key = (end.job_id, end.attempt);
                if self.outbox.recorded(key) {
                    tracing::debug!(
                        job_id = key.0,
                        attempt = key.1,
                        "end recorded by the coordinator"
                    );
                }
                self.executor.acknowledge(&[key]);
                None
            }
            Down::Ping(ping) => {
                self.contact.heard(ping.heard_heartbeat_seq);
                // Answered at once: the coordinator's RTT estimate depends on it.
                let pong = pb::Pong { nonce: ping.nonce };
                let _ = tx.try_send(agent_message(Up::Pong(pong)));
                None
            }
            Down::LogRead(read) => {
                // Off the link loop: a 1 MiB read must not delay heartbeats.
                let executor = self.executor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let request_id = read.request_id;
                    let offset = read.offset;
                    let reply = match executor.read_log(&read.into()).await {
                        Ok(chunk) => pb::LogData {
                            request_id,
                            data: chunk.data,
                            offset: chunk.offset,
                            eof: chunk.eof,
                            error: String::new(),
                        },
                        Err(error) => pb::LogData {
                            request_id,
                            offset,
                            error,
                            ..Default::default()
                        },
                    };
                    // The task ends by itself: a bounded wait, and a closed
                    // stream (session over) fails at once.
                    let message = agent_message(Up::LogData(reply));
                    let _ = tokio::time::timeout(SEND_TIMEOUT, tx.send(message)).await;
                });
                None
            }
        }
    }

    /// Sends the events produced while jobs were being stopped for shutdown.
    async fn final_flush(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) {
        let deadline = Instant::now() + FINAL_FLUSH;
        while let Ok(event) = self.events.try_recv() {
            let message = agent_message(Up::JobEvent(event.into()));
            if tokio::time::timeout_at(deadline, tx.send(message))
                .await
                .is_err()
            {
                return;
            }
        }
        // Give the transport a moment to write what is buffered; the
        // coordinator also learns of the agent leaving when the stream ends.
        let _ = tokio::time::timeout_at(deadline, tx.reserve_many(STREAM_BUFFER)).await;
    }

    async fn register(&self) -> pb::Register {
        let probes = Arc::clone(&self.probes);
        let (host, gpus) = tokio::task::spawn_blocking(move || {
            let mut probes = probes.lock().unwrap_or_else(|e| e.into_inner());
            let host = probes.host.statics();
            let gpus = probes.gpu.lock().gpus();
            (host, gpus)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "probe task failed");
            (
                crate::probe::HostStatic {
                    cpu_millis: 0,
                    memory_total_bytes: 0,
                    disk_total_bytes: 0,
                },
                Vec::new(),
            )
        });
        pb::Register {
            node: self.config.node_name.clone(),
            address: self.config.address.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            gpus: gpus.into_iter().map(Into::into).collect(),
            cpu_millis: wire_bytes(host.cpu_millis),
            memory_total_bytes: wire_bytes(host.memory_total_bytes),
            disk_total_bytes: wire_bytes(host.disk_total_bytes),
            running: self
                .executor
                .running()
                .into_iter()
                .map(Into::into)
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    async fn heartbeat(&mut self) -> pb::Heartbeat {
        self.heartbeat_seq += 1;
        let jobs = self.executor.gpu_jobs();
        let probes = Arc::clone(&self.probes);
        let sample_jobs = jobs.clone();
        let sampled = tokio::task::spawn_blocking(move || {
            let mut probes = probes.lock().unwrap_or_else(|e| e.into_inner());
            // Lock order: probes, then the GPU probe (the GPU watch takes
            // only the latter).
            let host = probes.host.sample();
            (host, probes.gpu.lock().sample(&sample_jobs))
        })
        .await;
        let (host, gpu) = match sampled {
            Ok(sampled) => sampled,
            Err(e) => {
                tracing::error!(error = %e, "probe task failed");
                return pb::Heartbeat {
                    seq: self.heartbeat_seq,
                    sent_at_ms: now_ms(),
                    ..Default::default()
                };
            }
        };
        // Peaks and the over-use policy see every sample, not only the GPU
        // watch's.
        self.executor.observe_gpu_usage(&gpu.jobs);
        // Every running attempt is listed, measured or not (0 = no figure),
        // so the coordinator sees the running set every beat.
        let usage = jobs
            .iter()
            .map(|job| pb::JobUsage {
                job_id: job.job_id,
                attempt: job.attempt,
                gpu_memory_bytes: gpu
                    .jobs
                    .iter()
                    .find(|u| u.job_id == job.job_id && u.attempt == job.attempt)
                    .map_or(0, |u| wire_bytes(u.gpu_memory_bytes)),
            })
            .collect();
        pb::Heartbeat {
            seq: self.heartbeat_seq,
            sent_at_ms: now_ms(),
            gpus: gpu
                .gpus
                .iter()
                .map(|g| pb::GpuTelemetry {
                    index: g.index,
                    used_bytes: wire_bytes(g.used_bytes),
                    utilization_pct: g.utilization_pct,
                    temperature_c: g.temperature_c,
                    fault: g.fault.clone().unwrap_or_default(),
                })
                .collect(),
            cpu_used_pct: host.cpu_used_pct,
            memory_used_bytes: wire_bytes(host.memory_used_bytes),
            disk_used_bytes: wire_bytes(host.disk_used_bytes),
            disk_total_bytes: wire_bytes(host.disk_total_bytes),
            jobs: usage,
            // The coordinator sends no timestamps to echo; it measures RTT
            // from its own clock and `sent_at_ms`.
            echo_ms: 0,
        }
    }
}

/// A heartbeat ticker of period `interval`. Without a previous beat the
/// first tick fires at once: a fresh coordinator gets telemetry immediately
/// and can place work on this node without waiting a period. After a beat
/// (the interval changed mid-session) the next one is a new period after it.
fn heartbeat_ticker(
    interval: Duration,
    last_beat: Option<tokio::time::Instant>,
) -> tokio::time::Interval {
    let period = interval.max(Duration::from_millis(10));
    let start = match last_beat {
        Some(at) => at + period,
        None => tokio::time::Instant::now(),
    };
    let mut ticker = tokio::time::interval_at(start, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

async fn send_event(
    tx: &mpsc::Sender<pb::AgentMessage>,
    event: JobEvent,
) -> Result<(), SessionEnd> {
    let message = agent_message(Up::JobEvent(event.into()));
    match tokio::time::timeout(SEND_TIMEOUT, tx.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SessionEnd::lost(true, "request stream closed")),
        Err(_) => Err(SessionEnd::lost(
            true,
            "stream stuck: event not sent in time",
        )),
    }
}

#[cfg(test)]
mod tests;
