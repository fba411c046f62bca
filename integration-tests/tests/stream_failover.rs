//! `gantry logs -f` and `gantry watch` through a leader failover: both are
//! served by the leader, so killing it breaks them mid-stream. They must
//! reconnect to the new leader and resume where they stopped: every line of
//! the job's output printed exactly once and in order, every event of the
//! job shown exactly once.

use std::time::Duration;

use gantry_integration_tests::{Sandbox, wait_until};

const T: Duration = Duration::from_secs(60);
/// Lines the job prints, one every 250 ms: long enough to span a failover.
const LINES: u32 = 60;

#[test]
fn logs_and_watch_resume_on_the_new_leader() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    sandbox.start_agent("node-a", &addrs, "1xH100-80GiB", "127.0.0.2", &[])?;
    sandbox.wait_nodes_ready(&addrs, 1, T)?;
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); echo line $i; sleep 0.25; done");
    let id = sandbox.submit(&addrs, &["--name", "talker", "--", "sh", "-c", &script])?;
    sandbox.wait_job_state(&addrs, id, "running", T)?;
    let id_arg = id.to_string();
    let logs = sandbox.start_client("logs", &addrs, &["logs", "-f", &id_arg])?;
    let watch = sandbox.start_client(
        "watch",
        &addrs,
        &["watch", "--job", &id_arg, "--from", "1", "-o", "json"],
    )?;

    // A few lines through the first leader, then it dies.
    let mut printed = Vec::new();
    while printed.len() < 5 {
        let line = sandbox.proc(logs).next_line(T);
        printed.push(line.ok_or_else(|| anyhow::anyhow!("logs -f printed nothing"))?);
    }
    let leader_proc = set.procs[leader - 1].ok_or_else(|| anyhow::anyhow!("no leader proc"))?;
    sandbox.proc(leader_proc).kill9();
    set.procs[leader - 1] = None;

    // The rest arrives through the new leader, and the command ends when
    // the job has.
    while let Some(line) = sandbox.proc(logs).next_line(T) {
        printed.push(line);
    }
    let status = sandbox.proc(logs).wait_exit(T);
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(
        printed,
        expected,
        "logs -f through a failover (exit {status:?}); its stderr: {}",
        sandbox.log("logs")
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        sandbox.log("logs")
    );
    assert!(
        sandbox.log("logs").contains("reconnecting"),
        "the stream was never broken, so nothing was tested: {}",
        sandbox.log("logs")
    );

    // Watch: each of the job's events once, in index order, through the end.
    let mut seen: Vec<serde_json::Value> = Vec::new();
    while !seen.iter().any(|e| e["state"] == "succeeded") {
        let line = sandbox.proc(watch).next_line(T).ok_or_else(|| {
            anyhow::anyhow!(
                "watch stopped before the job ended: {}",
                sandbox.log("watch")
            )
        })?;
        seen.push(serde_json::from_str(&line)?);
    }
    let indexes: Vec<u64> = seen.iter().filter_map(|e| e["index"].as_u64()).collect();
    assert!(
        indexes.windows(2).all(|w| w[0] < w[1]),
        "watch repeated or reordered events: {indexes:?}"
    );
    // The same events as a watch started afterwards shows.
    let after = sandbox.start_client(
        "watch-after",
        &addrs,
        &["watch", "--job", &id_arg, "--from", "1", "-o", "json"],
    )?;
    let mut replay: Vec<u64> = Vec::new();
    while replay.len() < indexes.len() {
        let line = sandbox.proc(after).next_line(T).ok_or_else(|| {
            anyhow::anyhow!(
                "the second watch stopped early: {}",
                sandbox.log("watch-after")
            )
        })?;
        let event: serde_json::Value = serde_json::from_str(&line)?;
        replay.extend(event["index"].as_u64());
    }
    assert_eq!(
        indexes, replay,
        "the watch through the failover missed events"
    );
    Ok(())
}
