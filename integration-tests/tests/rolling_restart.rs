//! Rolling restart of the replica set and the agents (issue 15, item 3):
//! replicas are restarted one at a time, followers first and the leader last
//! (the README's procedure), then each agent (killed and started again, as
//! an upgrade does: its jobs keep running under their supervisors and the
//! new agent process adopts them), while jobs run and a client submits. No
//! acknowledged job is lost, none runs twice (a ledger the jobs write),
//! jobs running across the restarts keep their one attempt, and the
//! replicas' histories pass the invariant checker. Prints the unavailability
//! each restart caused (the longest gap between acknowledged submits) and
//! the submit errors clients saw; asserts no timing.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::{Sandbox, run_gantry, wait_until};

const T: Duration = Duration::from_secs(60);

#[test]
fn a_rolling_restart_loses_nothing_and_runs_nothing_twice() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let agents = [("node-a", "127.0.0.2"), ("node-b", "127.0.0.3")];
    let mut agent_procs = Vec::new();
    for (name, ip) in agents {
        agent_procs.push(sandbox.start_agent(name, &addrs, "1xH100-80GiB", ip, &[])?);
    }
    sandbox.wait_nodes_ready(&addrs, agents.len(), T)?;
    let ledger = sandbox.path().join("ledger");
    let ledger_text = ledger.display().to_string();

    // Two jobs run across every restart.
    let mut long = Vec::new();
    for i in 0..2 {
        let script = format!("echo long-{i} >> {ledger_text}; sleep 40");
        long.push(sandbox.submit(&addrs, &["--gpus", "0", "--", "sh", "-c", &script])?);
    }
    for id in &long {
        sandbox.wait_job_state(&addrs, *id, "running", T)?;
    }

    let stop = AtomicBool::new(false);
    // (name, id, acknowledged at) of every acknowledged submit.
    let acknowledged = Mutex::new(Vec::<(String, u64, Instant)>::new());
    let errors = Mutex::new(Vec::<String>::new());
    let mut windows = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("load-{i}");
                let script = format!("echo {name} >> {ledger_text}");
                let args = [
                    "submit", "-o", "json", "--key", &name, "--name", &name, "--gpus", "0", "--",
                    "sh", "-c", &script,
                ];
                // Unacknowledged: retrying with the same key is safe.
                for _ in 0..5 {
                    let out = run_gantry(&addrs, &[], &args);
                    match out.json().ok().and_then(|v| v["job_ids"][0].as_u64()) {
                        Some(id) if out.code == 0 => {
                            acknowledged.lock().expect("lock").push((
                                name.clone(),
                                id,
                                Instant::now(),
                            ));
                            break;
                        }
                        _ => errors
                            .lock()
                            .expect("lock")
                            .push(out.stderr.trim().to_string()),
                    }
                }
                i += 1;
            }
        });
        // Followers first, the leader last.
        let mut order: Vec<usize> = (1..=3).filter(|id| *id != leader).collect();
        order.push(leader);
        for id in order {
            let started = Instant::now();
            sandbox.stop_replica(&mut set, id);
            sandbox.start_replica(&mut set, id)?;
            let leader_now = wait_until("a leader", T, || sandbox.leader_of(&set))?;
            let target =
                sandbox.gantry_json(&set.urls[leader_now - 1], &["status"])?["commit_index"]
                    .as_u64()
                    .unwrap_or(0);
            let url = set.urls[id - 1].clone();
            wait_until("the restarted replica to catch up", T, || {
                let status = sandbox.gantry_json(&url, &["status"]).ok()?;
                (status["applied_index"].as_u64()? >= target).then_some(())
            })?;
            // A few acknowledged submits after it: the window is closed.
            let count = acknowledged.lock().expect("lock").len();
            wait_until("submits after the restart", T, || {
                (acknowledged.lock().expect("lock").len() >= count + 3).then_some(())
            })?;
            windows.push((id, started, Instant::now()));
        }
        // Then every agent, one at a time.
        for ((name, ip), proc) in agents.iter().zip(agent_procs.iter_mut()) {
            sandbox.proc(*proc).kill9();
            *proc = sandbox.start_agent(name, &addrs, "1xH100-80GiB", ip, &[])?;
            sandbox.wait_nodes_ready(&addrs, agents.len(), T)?;
            let count = acknowledged.lock().expect("lock").len();
            wait_until("submits after the agent restart", T, || {
                (acknowledged.lock().expect("lock").len() >= count + 3).then_some(())
            })?;
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;

    let acknowledged = acknowledged.into_inner().expect("lock");
    let errors = errors.into_inner().expect("lock");
    // Unavailability per restart: the longest gap between acknowledgements.
    let mut gaps: Vec<Duration> = windows
        .iter()
        .map(|(_, from, to)| {
            let times: Vec<Instant> = acknowledged
                .iter()
                .map(|(_, _, at)| *at)
                .filter(|at| at >= from && at <= to)
                .collect();
            let mut edges = vec![*from];
            edges.extend(times);
            edges
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        })
        .collect();
    gaps.sort();
    eprintln!(
        "rolling restart: unavailability per replica p50 {:?} max {:?}; {} submits acknowledged, {} submit errors: {:?}",
        gaps[gaps.len() / 2],
        gaps.last().copied().unwrap_or_default(),
        acknowledged.len(),
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );

    // Every acknowledged job exists once and runs once.
    for (name, id, _) in &acknowledged {
        let job = sandbox.wait_job_state(&addrs, *id, "succeeded", T)?;
        assert_eq!(job["name"], name.as_str(), "{job}");
    }
    for id in &long {
        let job = sandbox.wait_job_state(&addrs, *id, "succeeded", T)?;
        assert_eq!(job["attempts"].as_array().map(Vec::len), Some(1), "{job}");
    }
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&ledger)?.lines() {
        *runs.entry(line.to_string()).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs run twice: {twice:?}");
    for (name, _, _) in &acknowledged {
        assert_eq!(runs.get(name), Some(&1), "{name} ran once");
    }
    for i in 0..2 {
        assert_eq!(runs.get(&format!("long-{i}")), Some(&1));
    }

    for id in 1..=3 {
        sandbox.stop_replica(&mut set, id);
    }
    check_replicas(&read_replicas(&set.dirs)?)?;
    Ok(())
}
