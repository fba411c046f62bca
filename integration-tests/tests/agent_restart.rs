//! Agents survive their own restart: a job runs under its supervisor
//! process, so killing the agent (SIGKILL) neither stops the job nor makes
//! the coordinator run it again, and a restarted agent adopts it. Ground
//! truth is a ledger every job appends to: `start|end JOB ATTEMPT PID`.

use std::path::Path;
use std::time::Duration;

use gantry_integration_tests::{Sandbox, pid_alive, wait_until};

const T: Duration = Duration::from_secs(40);

/// A shell command that records its start and end in `ledger`, running
/// `middle` in between.
fn ledger_command(ledger: &Path, middle: &str) -> String {
    let l = ledger.display();
    format!(
        "echo start $GANTRY_JOB_ID $GANTRY_ATTEMPT $$ >> {l}; {middle}; echo end $GANTRY_JOB_ID $GANTRY_ATTEMPT $$ >> {l}"
    )
}

/// The ledger's lines for `job`, as (what, attempt, pid).
fn ledger_of(ledger: &Path, job: u64) -> Vec<(String, u32, u32)> {
    std::fs::read_to_string(ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() == 4 && f[1] == job.to_string())
                .then(|| Some((f[0].to_string(), f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .collect()
}

/// Checks the job ran exactly once, to its end, and that the coordinator
/// recorded it succeeded with one attempt on `node`.
fn assert_ran_once(
    sandbox: &Sandbox,
    url: &str,
    ledger: &Path,
    job: u64,
    node: &str,
) -> anyhow::Result<()> {
    let done = sandbox.wait_job_state(url, job, "succeeded", T)?;
    let lines = ledger_of(ledger, job);
    let pid = lines.first().map_or(0, |l| l.2);
    assert_eq!(
        lines,
        vec![("start".to_string(), 1, pid), ("end".to_string(), 1, pid)],
        "one process, started once, finished"
    );
    let attempts = done["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 1, "{done}");
    assert_eq!(attempts[0]["node"], node, "{done}");
    Ok(())
}

/// A coordinator and agent `node-a`; returns the URL and the agent's index.
fn start_cluster(sandbox: &mut Sandbox) -> anyhow::Result<(String, usize)> {
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let agent = restart_agent(sandbox, &coordinator.url)?;
    sandbox.wait_nodes_ready(&coordinator.url, 1, T)?;
    Ok((coordinator.url, agent))
}

/// Starts (again) agent `node-a` on its data directory.
fn restart_agent(sandbox: &mut Sandbox, url: &str) -> anyhow::Result<usize> {
    sandbox.start_agent("node-a", url, "1xH100-80GiB", "127.0.0.2", &[])
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[test]
fn a_job_survives_an_agent_killed_with_sigkill_and_runs_once() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (url, agent) = start_cluster(&mut sandbox)?;
    let ledger = sandbox.path().join("ledger");
    let gate = sandbox.path().join("gate");
    let middle = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let job = sandbox.submit(&url, &["--", "sh", "-c", &ledger_command(&ledger, &middle)])?;
    sandbox.wait_job_state(&url, job, "running", T)?;
    let pid = wait_until("the job's start line", T, || {
        ledger_of(&ledger, job).first().map(|l| l.2)
    })?;

    sandbox.proc(agent).kill9();
    assert!(pid_alive(pid as i32), "the job outlives its agent");
    restart_agent(&mut sandbox, &url)?;
    sandbox.wait_nodes_ready(&url, 1, T)?;
    // Adopted: still running, on the same node, the same process.
    let job_now = sandbox.job(&url, job)?;
    assert_eq!(job_now["state"], "running", "{job_now}");
    std::fs::write(&gate, "")?;
    assert_ran_once(&sandbox, &url, &ledger, job, "node-a")
}

#[test]
fn an_agent_stopped_right_after_the_fork_does_not_start_the_attempt_twice() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (url, agent) = start_cluster(&mut sandbox)?;
    let agent_pid = sandbox.proc(agent).pid().expect("agent pid");
    let ledger = sandbox.path().join("ledger");
    // The job's first act freezes its agent: the agent is stopped the
    // moment its attempt forks, before it can report Started.
    let command = format!(
        "kill -STOP {agent_pid}; {}",
        ledger_command(&ledger, "sleep 1")
    );
    let job = sandbox.submit(&url, &["--", "sh", "-c", &command])?;
    wait_until("the agent to be stopped", T, || {
        (proc_state(agent_pid) == Some('T')).then_some(())
    })?;
    sandbox.proc(agent).kill9();
    // The coordinator re-sends the still-assigned attempt on re-registration.
    restart_agent(&mut sandbox, &url)?;
    assert_ran_once(&sandbox, &url, &ledger, job, "node-a")?;
    let log = sandbox.log("node-a");
    assert!(!log.contains("job spawn failed"), "{log}");
    Ok(())
}

/// Sends `signal` (a `kill` name: STOP, CONT) to `pid`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

/// `gantry cancel` acknowledges (exit 0) only what its agent confirmed:
/// the job's process is gone when it returns. With the agent frozen, it
/// answers `cancelling` (exit 5) naming the node and attempt, and the
/// process, which does still run, is stopped once the agent wakes up.
#[test]
fn a_cancel_is_acknowledged_only_once_the_agent_confirms_the_stop() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let (url, agent) = start_cluster(&mut sandbox)?;
    let agent_pid = sandbox.proc(agent).pid().expect("agent pid");
    let ledger = sandbox.path().join("ledger");
    let command = ledger_command(&ledger, "sleep 600");
    let running = |sandbox: &Sandbox| -> anyhow::Result<(u64, u32)> {
        let job = sandbox.submit(&url, &["--", "sh", "-c", &command])?;
        sandbox.wait_job_state(&url, job, "running", T)?;
        let pid = wait_until("the job's start line", T, || {
            ledger_of(&ledger, job).first().map(|l| l.2)
        })?;
        Ok((job, pid))
    };

    let (job, pid) = running(&sandbox)?;
    let out = sandbox.gantry(&url, &["cancel", &job.to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("cancelled"), "{out:?}");
    assert!(!pid_alive(pid as i32), "acknowledged, yet its process runs");
    assert_eq!(sandbox.job(&url, job)?["state"], "cancelled");

    let (job, pid) = running(&sandbox)?;
    signal(agent_pid, "STOP")?;
    let out = sandbox.gantry(&url, &["cancel", &job.to_string()]);
    let frozen_alive = pid_alive(pid as i32);
    signal(agent_pid, "CONT")?;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.contains("node-a") && out.stderr.contains("attempt 1"),
        "{out:?}"
    );
    assert!(
        frozen_alive,
        "the process ran on while the cancel was unconfirmed"
    );
    sandbox.wait_job_state(&url, job, "cancelled", T)?;
    wait_until("the cancelled job's process to end", T, || {
        (!pid_alive(pid as i32)).then_some(())
    })?;
    Ok(())
}
