//! Link tests against an in-process fake coordinator on loopback.

use std::time::Duration;

use gantry_proto::agent_link_server::{AgentLink, AgentLinkServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::config::{AgentConfig, GpuSource, parse_fake_gpus};

const WAIT: Duration = Duration::from_secs(20);

/// One agent connection as the test sees it.
struct Conn {
    inbound: Streaming<pb::AgentMessage>,
    outbound: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
}

impl Conn {
    async fn recv(&mut self) -> Up {
        tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("no agent message in time")
            .expect("stream error")
            .expect("stream ended")
            .msg
            .expect("empty message")
    }

    /// Skips messages until `pick` returns something.
    async fn until<T>(&mut self, mut pick: impl FnMut(Up) -> Option<T>) -> T {
        loop {
            if let Some(found) = pick(self.recv().await) {
                return found;
            }
        }
    }

    async fn event(&mut self, job_id: u64) -> pb::job_event::Event {
        self.until(|m| match m {
            Up::JobEvent(e) if e.job_id == job_id => e.event,
            _ => None,
        })
        .await
    }

    async fn send(&self, msg: Down) {
        self.outbound
            .send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
            .await
            .expect("agent stream gone");
    }

    async fn register(&mut self, stop: Vec<pb::RunningJob>) -> pb::Register {
        let Up::Register(register) = self.recv().await else {
            panic!("first message is not Register");
        };
        self.send(Down::Registered(pb::Registered {
            heartbeat_interval_ms: 50,
            stop,
        }))
        .await;
        register
    }
}

struct FakeCoordinator {
    conns: mpsc::UnboundedSender<Conn>,
    /// When set, answer like a follower that knows the leader.
    redirect_to: Option<String>,
    /// This many first streams are taken and never answered (a
    /// registration that never commits).
    unanswered: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl AgentLink for FakeCoordinator {
    type ConnectAgentStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn connect_agent(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectAgentStream>, Status> {
        if let Some(leader) = &self.redirect_to {
            let mut status = Status::unavailable("not leader; try the leader");
            status
                .metadata_mut()
                .insert(LEADER_METADATA, leader.parse().unwrap());
            return Err(status);
        }
        let unanswered = &self.unanswered;
        if unanswered
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            let _held = request.into_inner();
            return std::future::pending().await;
        }
        let (outbound, rx) = mpsc::channel(64);
        let _ = self.conns.send(Conn {
            inbound: request.into_inner(),
            outbound,
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts a fake coordinator on an ephemeral port; returns its URL and the
/// connections it receives.
async fn coordinator(
    redirect_to: Option<String>,
    shutdown: CancellationToken,
) -> (String, mpsc::UnboundedReceiver<Conn>) {
    coordinator_with(redirect_to, 0, shutdown).await
}

/// [`coordinator`] that leaves its first `unanswered` streams unanswered.
async fn coordinator_with(
    redirect_to: Option<String>,
    unanswered: usize,
    shutdown: CancellationToken,
) -> (String, mpsc::UnboundedReceiver<Conn>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let service = AgentLinkServer::new(FakeCoordinator {
        conns: tx,
        redirect_to,
        unanswered: unanswered.into(),
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    (url, rx)
}

async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>) -> Conn {
    tokio::time::timeout(WAIT, conns.recv())
        .await
        .expect("agent did not connect in time")
        .expect("server gone")
}

fn assignment(job_id: u64, script: &str) -> Down {
    Down::Assign(pb::Assignment {
        job_id,
        attempt: 1,
        spec: Some(pb::JobSpec {
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }),
        gpus: vec![1],
        gpu_memory_bytes: 1 << 30,
        batch_size: 32,
    })
}

#[tokio::test]
async fn register_heartbeat_run_reconnect_resend_and_shutdown() {
    let server_stop = CancellationToken::new();
    let (url, mut conns) = coordinator(None, server_stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fake-state.json"),
        r#"{"gpu_used_bytes": {"0": 1000}, "job_gpu_memory_bytes": {"1": 5000}, "disk_used_bytes": 90, "disk_total_bytes": 100}"#,
    )
    .unwrap();
    // A dead coordinator first: the agent must move on to the next one.
    let mut config = AgentConfig::for_test(
        "node-a",
        dir.path().into(),
        vec!["http://127.0.0.1:1".into(), url],
    );
    config.gpus = GpuSource::Fake(parse_fake_gpus("2xH100-80GiB").unwrap());
    config.labels.insert("provider".into(), "lambda".into());
    config.stop_jobs_on_exit = true;
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(crate::run(config, agent_stop.clone()));

    // First connection: register, run a job, see telemetry and logs.
    let mut conn = next_conn(&mut conns).await;
    let register = conn.register(vec![]).await;
    assert_eq!(register.node, "node-a");
    assert_eq!(
        register.labels.get("provider").map(String::as_str),
        Some("lambda")
    );
    assert_eq!(register.gpus.len(), 2);
    assert_eq!(register.gpus[1].model, "H100-80GiB");
    assert_eq!(register.disk_total_bytes, 100);
    assert!(register.cpu_millis >= 1000);
    assert_eq!(register.version, env!("CARGO_PKG_VERSION"));
    assert!(register.running.is_empty());

    conn.send(assignment(1, "echo hi; exec sleep 1000")).await;
    assert!(matches!(
        conn.event(1).await,
        pb::job_event::Event::Started(_)
    ));
    let heartbeat = conn
        .until(|m| match m {
            Up::Heartbeat(h) if !h.jobs.is_empty() => Some(h),
            _ => None,
        })
        .await;
    let used: Vec<i64> = heartbeat.gpus.iter().map(|g| g.used_bytes).collect();
    assert_eq!(used, vec![1000, 5000]);
    assert_eq!(heartbeat.jobs[0].gpu_memory_bytes, 5000);
    assert_eq!(
        (heartbeat.disk_used_bytes, heartbeat.disk_total_bytes),
        (90, 100)
    );
    assert!(heartbeat.seq > 0 && heartbeat.sent_at_ms > 0);

    let log_read = |request_id, job_id| {
        Down::LogRead(pb::LogRead {
            request_id,
            job_id,
            attempt: 1,
            stream: "stdout".into(),
            offset: 0,
            max_bytes: 0,
        })
    };
    let log = loop {
        conn.send(log_read(7, 1)).await;
        let log = conn
            .until(|m| match m {
                Up::LogData(d) if d.request_id == 7 => Some(d),
                _ => None,
            })
            .await;
        if !log.data.is_empty() {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (log.data.as_slice(), log.eof, log.error.as_str()),
        (&b"hi\n"[..], false, "")
    );
    conn.send(log_read(8, 99)).await;
    let missing = conn
        .until(|m| match m {
            Up::LogData(d) if d.request_id == 8 => Some(d),
            _ => None,
        })
        .await;
    assert_eq!(missing.error, "no output for job 99 attempt 1 on this node");

    // The coordinator drops the stream: the job keeps running and is listed
    // on re-registration; the coordinator tells the agent it is stale.
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let stale = pb::RunningJob {
        job_id: 1,
        attempt: 1,
        started_at_ms: 0,
    };
    let register = conn.register(vec![stale]).await;
    assert_eq!(register.running.len(), 1);
    assert_eq!(
        (register.running[0].job_id, register.running[0].attempt),
        (1, 1)
    );
    let pb::job_event::Event::Exited(exit) = conn.event(1).await else {
        panic!("expected an exit");
    };
    assert!(exit.cancelled);

    // A duplicate of a finished attempt starts nothing: its end is the
    // answer. A cancel stops a job.
    conn.send(assignment(1, "echo again")).await;
    let pb::job_event::Event::Exited(exit) = conn.event(1).await else {
        panic!("expected the exit again");
    };
    assert!(exit.cancelled);
    conn.send(assignment(2, "exec sleep 1000")).await;
    assert!(matches!(
        conn.event(2).await,
        pb::job_event::Event::Started(_)
    ));
    conn.send(Down::Cancel(pb::CancelJob {
        job_id: 2,
        attempt: 1,
        grace_ms: 500,
        reason: String::new(),
    }))
    .await;
    let pb::job_event::Event::Exited(exit) = conn.event(2).await else {
        panic!("expected an exit");
    };
    assert!(exit.cancelled);

    // The coordinator committed job 2's end and says so; a ping orders it.
    conn.send(Down::EndRecorded(pb::EndRecorded {
        job_id: 2,
        attempt: 1,
    }))
    .await;
    conn.send(Down::Ping(pb::Ping {
        nonce: 1,
        ..Default::default()
    }))
    .await;
    conn.until(|m| matches!(m, Up::Pong(p) if p.nonce == 1).then_some(()))
        .await;

    // Reconnect again: the exits not recorded are re-sent (at-least-once),
    // before anything else; nothing runs.
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    assert!(conn.register(vec![]).await.running.is_empty());
    conn.send(Down::Ping(pb::Ping {
        nonce: 2,
        ..Default::default()
    }))
    .await;
    let mut resent = Vec::new();
    loop {
        match conn.recv().await {
            Up::JobEvent(e) => {
                assert!(
                    matches!(e.event, Some(pb::job_event::Event::Exited(_))),
                    "{e:?}"
                );
                resent.push(e.job_id);
            }
            Up::Pong(p) if p.nonce == 2 => break,
            _ => {}
        }
    }
    assert_eq!(resent, vec![1], "job 2's end was recorded");

    // Shutdown stops running jobs and reports them as not cancelled.
    conn.send(assignment(3, "exec sleep 1000")).await;
    assert!(matches!(
        conn.event(3).await,
        pb::job_event::Event::Started(_)
    ));
    agent_stop.cancel();
    let pb::job_event::Event::Exited(exit) = conn.event(3).await else {
        panic!("expected an exit");
    };
    assert!(!exit.cancelled);
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server_stop.cancel();
}

/// A coordinator that takes the stream and never answers it must not hold
/// the agent: it gives up after `REGISTER_TIMEOUT` and registers again.
#[tokio::test]
async fn a_registration_never_answered_is_given_up_and_tried_again() {
    let server_stop = CancellationToken::new();
    let (url, mut conns) = coordinator_with(None, 1, server_stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::for_test("node-a", dir.path().into(), vec![url]);
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(crate::run(config, agent_stop.clone()));
    let mut conn = tokio::time::timeout(REGISTER_TIMEOUT + WAIT, conns.recv())
        .await
        .expect("the agent never tried again")
        .expect("server gone");
    assert_eq!(conn.register(vec![]).await.node, "node-a");
    stop_all(agent, agent_stop, server_stop).await;
}

/// Stops the agent (it must end in time) and the fake coordinators.
async fn stop_all(
    agent: tokio::task::JoinHandle<Result<(), crate::error::AgentError>>,
    agent_stop: CancellationToken,
    server_stop: CancellationToken,
) {
    agent_stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server_stop.cancel();
}

#[tokio::test]
async fn follows_a_not_leader_redirect() {
    let server_stop = CancellationToken::new();
    let (leader_url, mut conns) = coordinator(None, server_stop.clone()).await;
    let (follower_url, _none) = coordinator(Some(leader_url), server_stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::for_test("node-b", dir.path().into(), vec![follower_url]);
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(crate::run(config, agent_stop.clone()));
    let mut conn = next_conn(&mut conns).await;
    assert_eq!(conn.register(vec![]).await.node, "node-b");
    stop_all(agent, agent_stop, server_stop).await;
}

#[tokio::test]
async fn applies_a_changed_heartbeat_interval() {
    let server_stop = CancellationToken::new();
    let (url, mut conns) = coordinator(None, server_stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::for_test("node-c", dir.path().into(), vec![url]);
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(crate::run(config, agent_stop.clone()));
    let mut conn = next_conn(&mut conns).await;
    conn.register(vec![]).await; // 50 ms
    let heartbeat = |m: Up| matches!(m, Up::Heartbeat(_)).then_some(());
    conn.until(heartbeat).await;
    conn.until(heartbeat).await;

    // Stretched: beats come at least 600 ms apart (one may be in flight).
    conn.send(Down::HeartbeatInterval(pb::HeartbeatInterval {
        interval_ms: 600,
    }))
    .await;
    let changed = std::time::Instant::now();
    let mut previous = loop {
        conn.until(heartbeat).await;
        if changed.elapsed() > Duration::from_millis(150) {
            break std::time::Instant::now();
        }
    };
    for _ in 0..2 {
        conn.until(heartbeat).await;
        let gap = previous.elapsed();
        assert!(gap >= Duration::from_millis(500), "beat after {gap:?}");
        previous = std::time::Instant::now();
    }

    // Back to 50 ms: eight beats take well under eight stretched periods.
    conn.send(Down::HeartbeatInterval(pb::HeartbeatInterval {
        interval_ms: 50,
    }))
    .await;
    let start = std::time::Instant::now();
    for _ in 0..8 {
        conn.until(heartbeat).await;
    }
    assert!(
        start.elapsed() < Duration::from_millis(4_000),
        "eight beats took {:?}",
        start.elapsed()
    );
    agent_stop.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server_stop.cancel();
}
