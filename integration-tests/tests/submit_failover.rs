//! `gantry submit` through a leader failover: without `--key`, every submit
//! that is acknowledged created exactly one job, and one that gives up
//! either created none or printed the key to retry with (issue 10.7).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gantry_integration_tests::{Sandbox, gantry_bin, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(60);

/// Jobs per submit: large enough that a submit is usually in flight (sent,
/// not yet answered) when the leader dies, which is when a submit without
/// retries fails although its jobs may exist.
const BATCH: usize = 300;

/// One `gantry submit -f` of [`BATCH`] jobs named `NAME-0`, `NAME-1`, ... as
/// a script would run it.
struct Submitted {
    name: String,
    code: i32,
    ids: Vec<u64>,
    stderr: String,
}

fn submit(addrs: &str, dir: &std::path::Path, name: &str) -> Submitted {
    let path = dir.join(format!("{name}.yaml"));
    let spec: String = (0..BATCH)
        .map(|j| format!("- {{name: {name}-{j}, command: [sleep, '1']}}\n"))
        .collect();
    std::fs::write(&path, spec).expect("write spec");
    let output = Command::new(gantry_bin())
        .args(["submit", "-o", "json", "-f"])
        .arg(&path)
        .env("GANTRY_ADDR", addrs)
        .stdin(Stdio::null())
        .output()
        .expect("run gantry");
    let ids = serde_json::from_slice::<serde_json::Value>(&output.stdout)
        .ok()
        .and_then(|v| {
            v["job_ids"]
                .as_array()
                .map(|a| a.iter().filter_map(|id| id.as_u64()).collect())
        })
        .unwrap_or_default();
    Submitted {
        name: name.to_string(),
        code: output.status.code().unwrap_or(-1),
        ids,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn submits_through_a_failover_create_each_job_once() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let mut set = sandbox.start_replicas(&[])?;
    let addrs = set.addrs();
    let leader = wait_until("a leader", T, || sandbox.leader_of(&set))?;
    let leader_index =
        set.procs[leader - 1].ok_or_else(|| anyhow::anyhow!("leader not running"))?;
    let leader_pid = sandbox
        .proc(leader_index)
        .pid()
        .ok_or_else(|| anyhow::anyhow!("leader has no pid"))?;

    // Three scripts submit one job at a time; the leader is killed once
    // some have been acknowledged, while others are in flight.
    let acknowledged = AtomicUsize::new(0);
    let per_client = 8;
    let dir = sandbox.path().to_path_buf();
    let results: Vec<Submitted> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|c| {
                let (addrs, acknowledged, dir) = (&addrs, &acknowledged, &dir);
                scope.spawn(move || {
                    (0..per_client)
                        .map(|i| {
                            let done = submit(addrs, dir, &format!("c{c}-{i}"));
                            if done.code == 0 {
                                acknowledged.fetch_add(1, Ordering::SeqCst);
                            }
                            done
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let _ = wait_until("a few acknowledged submits", T, || {
            (acknowledged.load(Ordering::SeqCst) >= 3).then_some(())
        });
        let _ = kill(Pid::from_raw(leader_pid as i32), Signal::SIGKILL);
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .collect()
    });
    sandbox.proc(leader_index).kill9();
    set.procs[leader - 1] = None;

    let survivor = &set.urls[if leader == 1 { 1 } else { 0 }];
    let jobs = wait_until("the new leader's job list", T, || {
        sandbox
            .gantry_json(survivor, &["jobs", "--limit", "0"])
            .ok()
    })?;
    // Jobs by the submit that named them (`c0-3-17` -> `c0-3`), in id order.
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for job in jobs.as_array().into_iter().flatten() {
        let name = job["name"].as_str().unwrap_or("");
        let submit = name.rsplit_once('-').map_or(name, |(s, _)| s);
        stored
            .entry(submit.to_string())
            .or_default()
            .push(job["id"].as_u64().unwrap_or(0));
    }
    for ids in stored.values_mut() {
        ids.sort_unstable();
    }
    let mut failed = Vec::new();
    for done in &results {
        let ids = stored.get(&done.name).cloned().unwrap_or_default();
        if done.code == 0 {
            let mut acked = done.ids.clone();
            acked.sort_unstable();
            assert!(
                ids == acked && ids.len() == BATCH,
                "{}: acknowledged {} ids, stored {} jobs (same ids: {})",
                done.name,
                acked.len(),
                ids.len(),
                ids == acked
            );
        } else {
            assert_eq!(done.code, 3, "{}: {}", done.name, done.stderr);
            assert!(
                ids.is_empty() || done.stderr.contains("--key cli-"),
                "{}: failed without printing the key, but created {} jobs: {}",
                done.name,
                ids.len(),
                done.stderr
            );
            failed.push((&done.name, ids.len(), &done.stderr));
        }
    }
    // The failover takes seconds; the 30 s retry covers it.
    assert!(failed.is_empty(), "failed submits: {failed:?}");
    assert_eq!(stored.len(), results.len(), "jobs of every submit, once");
    Ok(())
}
