//! Issue 16, item 1: the Raft peer service of a running replica set under
//! forged messages (raw `RaftPeer.Step` calls and `StepStream`s, no
//! credentials configured),
//! and a replica whose Raft thread dies.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use anyhow::Context as _;
use gantry_integration_tests::{Sandbox, http_get, plain, wait_until};
use gantry_proto::raft as pb;
use pb::raft_peer_client::RaftPeerClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

const T: Duration = Duration::from_secs(60);

/// What `gantry coordinator --peers 1=..,2=..,3=..` stores as its cluster id.
fn cluster_id() -> u64 {
    gantry_coordinator::raft::cluster_id(&[1, 2, 3], "")
}

fn heartbeat(from: u64, to: u64, term: u64, commit: u64) -> Message {
    let mut message = Message::default();
    message.set_msg_type(MessageType::MsgHeartbeat);
    message.from = from;
    message.to = to;
    message.term = term;
    message.commit = commit;
    message
}

/// How a forged batch is sent: in a `Step` call, or alone on a `StepStream`
/// (the way replicas send).
#[derive(Clone, Copy)]
enum Via {
    Call,
    Stream,
}

/// Sends one batch to `url`; the gRPC status code and message on refusal.
fn send(
    runtime: &tokio::runtime::Runtime,
    via: Via,
    url: &str,
    cluster_id: u64,
    from: u64,
    to: u64,
    message: &Message,
) -> Result<(), (tonic::Code, String)> {
    let batch = pb::RaftBatch {
        messages: vec![message.write_to_bytes().unwrap()],
        from,
        cluster_id,
        to,
        from_http: String::new(),
        members: None,
    };
    runtime.block_on(async {
        let mut client = RaftPeerClient::connect(url.to_string())
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        let answer = match via {
            Via::Call => client.step(batch).await,
            Via::Stream => client.step_stream(tokio_stream::iter([batch])).await,
        };
        answer
            .map(|_| ())
            .map_err(|status| (status.code(), status.message().to_string()))
    })
}

fn status(sandbox: &Sandbox, url: &str) -> anyhow::Result<serde_json::Value> {
    sandbox.gantry_json(url, &["status"])
}

fn submit(sandbox: &Sandbox, addrs: &str) -> anyhow::Result<u64> {
    sandbox.submit(
        addrs,
        &["--gpus", "1", "--gpu-memory", "1GiB", "--", "true"],
    )
}

/// Forged messages to every replica, each refused for its own reason; the
/// replicas keep their term and leader, stay healthy and keep taking writes.
/// Before the fix the first heartbeat (issue 16's "replica 77", commit
/// 1,000,000,000) panicked the Raft thread and every write failed after.
#[test]
fn forged_raft_messages_are_refused_and_writes_go_on() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    submit(&sandbox, &addrs)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let term = status(&sandbox, &set.urls[leader - 1])?["raft_term"]
        .as_u64()
        .context("raft_term")?;
    let id = cluster_id();

    for (i, url) in set.urls.iter().enumerate() {
        let me = i as u64 + 1;
        let other = if me == 1 { 2 } else { 1 };
        // Replica 1 (whose log is read below) gets `Step` calls, the others
        // streams: each refusal is the same either way.
        let via = if me == 1 { Via::Call } else { Via::Stream };
        // Issue 16: a non-member with an out-of-range commit, and one with
        // a huge term (which raised the term by 1,000 before).
        for forged in [
            heartbeat(77, me, term, 1_000_000_000),
            heartbeat(77, me, term + 1_000, 0),
        ] {
            let (code, text) = send(&runtime, via, url, id, 77, me, &forged).unwrap_err();
            assert_eq!(code, tonic::Code::PermissionDenied, "{text}");
            assert!(text.contains("sender 77 is not a member"), "{text}");
        }
        // Another cluster (or a replica of an older version: no id).
        for wrong in [id ^ 1, 0] {
            let (code, text) = send(
                &runtime,
                via,
                url,
                wrong,
                other,
                me,
                &heartbeat(other, me, term, 0),
            )
            .unwrap_err();
            assert_eq!(code, tonic::Code::PermissionDenied, "{text}");
            assert!(text.contains("is not this cluster's"), "{text}");
        }
        // Addressed to another replica.
        let third = 6 - me - other;
        let (code, text) = send(
            &runtime,
            via,
            url,
            id,
            other,
            third,
            &heartbeat(other, third, term, 0),
        )
        .unwrap_err();
        assert_eq!(code, tonic::Code::PermissionDenied, "{text}");
        assert!(
            text.contains(&format!("addressed to replica {third}")),
            "{text}"
        );
        // A member's id with an out-of-range commit passes the envelope (the
        // id cannot be proven without mutual TLS) but never reaches raft-rs;
        // so does a message whose own sender disagrees with its batch.
        for passes in [
            heartbeat(other, me, term, 1_000_000_000),
            heartbeat(77, me, term + 1_000, 0),
        ] {
            send(&runtime, via, url, id, other, me, &passes).unwrap();
        }
    }

    // Every replica still runs, healthy and ready, at the same term, and
    // the cluster takes writes.
    for (i, url) in set.urls.iter().enumerate() {
        let index = set.procs[i].context("replica")?;
        assert!(sandbox.proc(index).is_running(), "replica {} died", i + 1);
        let http = sandbox.proc(index).http.clone().context("http")?;
        wait_until("ready", T, || {
            (http_get(&http, "/readyz", None).ok()?.status == 200).then_some(())
        })?;
        assert_eq!(http_get(&http, "/healthz", None)?.status, 200);
        let now = status(&sandbox, url)?["raft_term"]
            .as_u64()
            .context("term")?;
        assert_eq!(now, term, "replica {} changed term", i + 1);
    }
    for _ in 0..3 {
        submit(&sandbox, &addrs)?;
    }
    // Refusals are logged with the peer's address.
    let log = plain(&sandbox.log(&format!("replica-1-{}", set.procs[0].context("replica 1")?)));
    assert!(
        log.lines()
            .any(|line| line.contains("refused a raft message") && line.contains("peer=127.0.0.1:")),
        "{log}"
    );
    assert!(
        log.contains("commit 1000000000 is past the last log index"),
        "{log}"
    );
    Ok(())
}

/// A Raft thread that dies (here by the debug-build fault hook) turns
/// `/readyz` and `/healthz` red with the reason, and the process exits
/// non-zero with the reason logged, so a supervisor restarts it. Before
/// the fix both probes stayed 200 and the process kept running.
#[test]
fn a_dead_raft_thread_turns_probes_red_and_ends_the_process() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let trigger = sandbox.path().join("kill-raft");
    sandbox.set_daemon_env(
        gantry_coordinator::raft::fault::PANIC_FILE_ENV,
        &trigger.display().to_string(),
    );
    let coordinator = sandbox.start_coordinator_with("coordinator", &[])?;
    submit(&sandbox, &coordinator.url)?;
    assert_eq!(http_get(&coordinator.http, "/readyz", None)?.status, 200);
    assert_eq!(http_get(&coordinator.http, "/healthz", None)?.status, 200);

    std::fs::write(&trigger, b"")?;
    let (mut ready_red, mut health_red) = (None, None);
    wait_until("both probes red", T, || {
        if ready_red.is_none() {
            let ready = http_get(&coordinator.http, "/readyz", None).ok()?;
            if ready.status == 503 {
                ready_red = Some(ready.body);
            }
        }
        if health_red.is_none() {
            let health = http_get(&coordinator.http, "/healthz", None).ok()?;
            if health.status == 503 {
                health_red = Some(health.body);
            }
        }
        (ready_red.is_some() && health_red.is_some()).then_some(())
    })?;
    for body in [ready_red.unwrap(), health_red.unwrap()] {
        assert!(body.contains("raft thread panicked"), "{body}");
    }

    let exit = sandbox
        .proc(coordinator.index)
        .wait_exit(T)
        .context("the coordinator did not exit")?;
    assert!(!exit.success(), "exit status {exit}");
    let log = plain(&sandbox.log("coordinator"));
    assert!(
        log.contains("this replica cannot go on") && log.contains("fault injection"),
        "{log}"
    );
    Ok(())
}
