//! Gangs on real processes: a 2-node gang on 3 agents gets consistent ranks
//! and `MASTER_ADDR`/`MASTER_PORT` (each member writes its environment to
//! a file), and when one member's node dies (its agent SIGKILLed with the
//! member's processes) the whole gang is placed again elsewhere with a new
//! attempt, and no member of the old attempt is left running. The agents
//! run with `--master-port-range`, so `MASTER_PORT` comes from their range;
//! a bad range is refused naming the flag.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use gantry_integration_tests::{Sandbox, pid_alive, run_gantry, wait_until};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

/// Every agent's `--master-port-range`.
const PORTS: &str = "31000-31009";

const NODES: [(&str, &str); 3] = [
    ("node-a", "127.0.0.2"),
    ("node-b", "127.0.0.3"),
    ("node-c", "127.0.0.4"),
];

/// What member `job` wrote in attempt `attempt`: its environment and pid.
fn member_env(dir: &Path, job: u64, attempt: u64) -> Option<(BTreeMap<String, String>, i32)> {
    let env = std::fs::read_to_string(dir.join(format!("env-{job}-{attempt}"))).ok()?;
    let pid = std::fs::read_to_string(dir.join(format!("pid-{job}-{attempt}"))).ok()?;
    let env = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some((env, pid.trim().parse().ok()?))
}

/// The node of a job's attempt `attempt`, once it runs.
fn running_on(job: &Value, attempt: u64) -> Option<String> {
    let a = job["attempts"].as_array()?.last()?;
    (job["state"] == "running" && a["attempt"] == attempt)
        .then(|| a["node"].as_str().map(String::from))?
}

fn address(node: &str) -> &'static str {
    NODES
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, a)| *a)
        .unwrap_or("?")
}

/// Both members' env files of `attempt`, checked for consistency: ranks
/// 0 and 1, world size 2, the same node list, master address and port,
/// rank 0's node as master. Returns the pids.
fn check_envs(dir: &Path, first: u64, attempt: u64, nodes: [&str; 2]) -> anyhow::Result<[i32; 2]> {
    let (e0, p0) = wait_until("rank 0's environment", T, || {
        member_env(dir, first, attempt)
    })?;
    let (e1, p1) = wait_until("rank 1's environment", T, || {
        member_env(dir, first + 1, attempt)
    })?;
    let want_nodes = format!("{},{}", address(nodes[0]), address(nodes[1]));
    for (rank, env) in [(0, &e0), (1, &e1)] {
        let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("");
        assert_eq!(get("GANTRY_RANK"), rank.to_string(), "{env:?}");
        assert_eq!(get("RANK"), rank.to_string(), "{env:?}");
        assert_eq!(get("GANTRY_WORLD_SIZE"), "2", "{env:?}");
        assert_eq!(get("WORLD_SIZE"), "2", "{env:?}");
        assert_eq!(get("LOCAL_RANK"), "0", "{env:?}");
        assert_eq!(get("GANTRY_NODES"), want_nodes, "{env:?}");
        assert_eq!(get("MASTER_ADDR"), address(nodes[0]), "{env:?}");
        assert_eq!(get("GANTRY_ATTEMPT"), attempt.to_string(), "{env:?}");
    }
    assert_eq!(e0.get("MASTER_PORT"), e1.get("MASTER_PORT"));
    let port: u16 = e0.get("MASTER_PORT").map_or(Ok(0), |p| p.parse())?;
    assert!((31_000..=31_009).contains(&port), "MASTER_PORT {port}");
    Ok([p0, p1])
}

#[test]
fn a_gang_gets_consistent_ranks_and_moves_whole_when_a_member_node_dies() -> anyhow::Result<()> {
    let mut sandbox = Sandbox::new()?;
    let coordinator = sandbox.start_coordinator("coordinator", 0, None)?;
    let url = coordinator.url.clone();
    let mut agents = BTreeMap::new();
    for (name, addr) in NODES {
        agents.insert(
            name,
            sandbox.start_agent_with(
                name,
                &url,
                "1xH100-80GiB",
                addr,
                &[],
                &["--master-port-range", PORTS],
            )?,
        );
    }
    sandbox.wait_nodes_ready(&url, 3, T)?;

    let dir = sandbox.path().join("envs");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let spec = sandbox.path().join("gang.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: train\nnodes: 2\nresources: {{gpus: 1, gpu_memory: 10GiB}}\n\
             command: [sh, -c, 'env > {d}/env-$GANTRY_JOB_ID-$GANTRY_ATTEMPT.tmp; \
             mv {d}/env-$GANTRY_JOB_ID-$GANTRY_ATTEMPT.tmp {d}/env-$GANTRY_JOB_ID-$GANTRY_ATTEMPT; \
             echo $$ > {d}/pid-$GANTRY_JOB_ID-$GANTRY_ATTEMPT; exec sleep 600']\n"
        ),
    )?;
    let submitted = sandbox.gantry_json(&url, &["submit", "-f", &spec.display().to_string()])?;
    let first = submitted["job_ids"][0].as_u64().expect("job id");

    // Both members run, on two distinct nodes, in one attempt.
    let nodes1 = wait_until("both members running", T, || {
        let n0 = running_on(&sandbox.job(&url, first).ok()?, 1)?;
        let n1 = running_on(&sandbox.job(&url, first + 1).ok()?, 1)?;
        Some([n0, n1])
    })?;
    assert_ne!(nodes1[0], nodes1[1]);
    let pids1 = check_envs(&dir, first, 1, [&nodes1[0], &nodes1[1]])?;

    // `gantry job` lists the members.
    let view = sandbox.job(&url, first + 1)?;
    let members = view["gang_members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 2, "{view}");
    assert_eq!(members[0]["rank"], 0, "{view}");
    assert_eq!(members[1]["node"], nodes1[1].as_str(), "{view}");
    let text = sandbox.gantry(&url, &["job", &first.to_string()]);
    assert!(text.stdout.contains("rank 1"), "{text:?}");

    // Rank 1's machine dies: its agent and its processes.
    let dead = nodes1[1].clone();
    let index = agents[dead.as_str()];
    sandbox.proc(index).kill9();
    killpg(Pid::from_raw(pids1[1]), Signal::SIGKILL)?;

    // The gang runs again as a whole, attempt 2, on the two nodes left.
    let nodes2 = wait_until("the gang running again", T, || {
        let n0 = running_on(&sandbox.job(&url, first).ok()?, 2)?;
        let n1 = running_on(&sandbox.job(&url, first + 1).ok()?, 2)?;
        Some([n0, n1])
    })?;
    assert!(
        !nodes2.contains(&dead),
        "{nodes2:?} includes the dead {dead}"
    );
    assert_ne!(nodes2[0], nodes2[1]);
    check_envs(&dir, first, 2, [&nodes2[0], &nodes2[1]])?;
    // No member of attempt 1 is left running.
    wait_until("rank 0 of attempt 1 to be stopped", T, || {
        (!pid_alive(pids1[0])).then_some(())
    })?;
    assert!(!pid_alive(pids1[1]));
    let job = sandbox.job(&url, first)?;
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts[0]["outcome"], "preempted", "{job}");
    Ok(())
}

#[test]
fn a_bad_master_port_range_is_refused_naming_the_flag() {
    for (range, why) in [
        ("29999-29500", "29999 is above 29500"),
        ("29500", "is not LOW-HIGH"),
        ("0-10", "is not a port"),
        ("1-70000", "is not a port"),
    ] {
        let out = run_gantry(
            "http://127.0.0.1:1",
            &[],
            &["agent", "--master-port-range", range],
        );
        assert_eq!(out.code, 2, "{range}: {out:?}");
        assert!(
            out.stderr.contains("--master-port-range") && out.stderr.contains(why),
            "{range}: {}",
            out.stderr
        );
    }
    // The label is the flag's alone.
    let out = run_gantry(
        "http://127.0.0.1:1",
        &[],
        &["agent", "--label", "gantry-master-port-range=1-2"],
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("set by --master-port-range"),
        "{}",
        out.stderr
    );
}
