//! Real partitions: every replica, agent and the client in a network
//! namespace of its own on one bridge ([`NetLab`]), links cut by the kernel
//! (blackhole routes) under a load of ledger jobs, then healed; after each,
//! the checker judges the ledger the jobs wrote together with every
//! replica's storage (no overlap, no attempt started twice, nothing
//! completed twice, nothing lost, replicas identical).
//!
//! What each fault covers (the proxy tests in `partition.rs` and the nemesis
//! cut Raft links at the application level; these cut packets):
//! - symmetric: the leader loses both followers both ways; the majority
//!   elects, keeps committing, the old leader steps down and catches up.
//! - one way: the leader's packets to the followers are dropped while theirs
//!   still reach it.
//! - agent and leader only: one agent cannot reach the leader (it still
//!   reaches the followers) for longer than the Down threshold while its jobs
//!   run: the node goes Down and its jobs run elsewhere, so the agent must
//!   have stopped them first (it fences itself when the leader has not
//!   confirmed a heartbeat for too long), or they would run twice at once.
//!
//! Needs root and iproute2: skips with a note otherwise, fails instead under
//! `GANTRY_REQUIRE_TOOLS=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_integration_tests::check::{check_replicas, read_replicas};
use gantry_integration_tests::ledger::{LedgerWatch, job_command};
use gantry_integration_tests::load::{self, Load, LoadPlan};
use gantry_integration_tests::nemesis::now_ms;
use gantry_integration_tests::netns::NetLab;
use gantry_integration_tests::verdict::{Ground, Stored, check};
use gantry_integration_tests::{ReplicaSet, Sandbox, peers_flag, tools_required, wait_until};
use gantry_scheduler::JobId;

const T: Duration = Duration::from_secs(60);
/// Hosts: 1-3 replicas, 4-5 agents, 6 the client.
const AGENTS: [usize; 2] = [4, 5];
const CLIENT: usize = 6;
/// Every replica listens on this port of its own namespace.
const PORT: u16 = 7070;

/// A cluster in namespaces, its ledger and its load.
struct Lab {
    sandbox: Sandbox,
    net: NetLab,
    set: ReplicaSet,
    ledger: PathBuf,
    watch: Arc<Mutex<LedgerWatch>>,
    load: Arc<Mutex<Load>>,
    /// Sandbox process index of each agent started.
    agents: Vec<usize>,
    /// Ledger jobs submitted by the test itself (not the load), with their
    /// designed failing attempts (none).
    own: BTreeMap<JobId, u32>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Ok(watch) = self.watch.lock() {
            watch.kill_survivors();
        }
    }
}

/// Makes the lab, or says why not (`None`: skip).
fn lab_or_skip(test: &str) -> anyhow::Result<Option<NetLab>> {
    match NetLab::new(CLIENT) {
        Ok(net) => Ok(Some(net)),
        Err(error) if !tools_required() => {
            eprintln!(
                "{test}: skipped, cannot make network namespaces (needs root and iproute2): {error:#}"
            );
            Ok(None)
        }
        Err(error) => Err(error.context("network namespaces (GANTRY_REQUIRE_TOOLS=1)")),
    }
}

impl Lab {
    /// Three replicas and the agents (`gpus` each, in order), each in its namespace.
    fn start(net: NetLab, agents: &[&str]) -> anyhow::Result<Lab> {
        let mut sandbox = Sandbox::new()?;
        let urls: Vec<String> = (1..=3)
            .map(|i| format!("http://{}:{PORT}", net.ip(i)))
            .collect();
        let peers = peers_flag(&urls);
        let mut set = ReplicaSet {
            procs: vec![None; 3],
            listen: (1..=3).map(|i| format!("{}:{PORT}", net.ip(i))).collect(),
            urls,
            peers: vec![peers; 3],
            dirs: (1..=3)
                .map(|i| sandbox.path().join(format!("replica-{i}")))
                .collect(),
            extra_args: Vec::new(),
        };
        for id in 1..=3 {
            sandbox.set_netns(Some(net.ns(id)));
            sandbox.start_replica(&mut set, id)?;
        }
        let ledger = sandbox.path().join("ledger");
        std::fs::write(&ledger, "")?;
        let watch = Arc::new(Mutex::new(LedgerWatch::new(&ledger)?));
        let stop = Arc::new(AtomicBool::new(false));
        let mut lab = Lab {
            sandbox,
            net,
            set,
            ledger,
            watch,
            load: Arc::new(Mutex::new(Load::default())),
            agents: Vec::new(),
            own: BTreeMap::new(),
            stop,
            threads: Vec::new(),
        };
        for (host, gpus) in AGENTS.iter().zip(agents) {
            lab.start_agent(*host, gpus)?;
        }
        lab.sandbox.set_netns(Some(lab.net.ns(CLIENT)));
        let watch = lab.watch.clone();
        let stop = lab.stop.clone();
        lab.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut watch) = watch.lock() {
                    let _ = watch.poll(now_ms());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        Ok(lab)
    }

    fn agent_name(host: usize) -> String {
        format!("node-{host}")
    }

    fn start_agent(&mut self, host: usize, gpus: &str) -> anyhow::Result<()> {
        let addrs = self.set.addrs();
        self.sandbox.set_netns(Some(self.net.ns(host)));
        let started = self.sandbox.start_agent(
            &Self::agent_name(host),
            &addrs,
            gpus,
            &self.net.ip(host),
            &[],
        );
        self.sandbox.set_netns(Some(self.net.ns(CLIENT)));
        self.agents.push(started?);
        Ok(())
    }

    fn wait_ready(&self, nodes: usize) -> anyhow::Result<()> {
        self.sandbox
            .wait_nodes_ready(&self.set.addrs(), nodes, T)
            .map(|_| ())
    }

    fn leader(&self) -> anyhow::Result<usize> {
        wait_until("a leader", T, || self.sandbox.leader_of(&self.set))
    }

    /// Starts the seeded background load of ledger jobs from the client host.
    fn start_load(&mut self, seed: u64) {
        let plan = LoadPlan {
            addrs: self.set.addrs(),
            dir: self.sandbox.path().to_path_buf(),
            ledger: self.ledger.clone(),
            seed,
            jobs_per_second: 1.0,
            netns: Some(self.net.ns(CLIENT).to_string()),
        };
        self.threads.push(load::spawn(
            plan,
            self.load.clone(),
            self.watch.clone(),
            self.stop.clone(),
        ));
    }

    /// Submits one ledger job of `sleep_ms` on one GPU.
    fn submit_ledger_job(&mut self, sleep_ms: u64) -> anyhow::Result<JobId> {
        let spec = self
            .sandbox
            .path()
            .join(format!("own-{}.json", self.own.len()));
        let job = serde_json::json!({
            "kind": "selfplay",
            "resources": {"gpus": 1, "gpu_memory": "10GiB"},
            "retry": {"max_attempts": 5, "backoff": "1s"},
            "command": job_command(&self.ledger, sleep_ms, 0),
        });
        std::fs::write(&spec, serde_json::to_string(&job)?)?;
        let id = self
            .sandbox
            .submit(&self.set.addrs(), &["-f", &spec.display().to_string()])?;
        self.own.insert(id, 0);
        Ok(id)
    }

    /// Applied index of each replica that answers.
    fn applied(&self, id: usize) -> Option<u64> {
        self.sandbox
            .gantry_json(&self.set.urls[id - 1], &["status"])
            .ok()?["applied_index"]
            .as_u64()
    }

    /// Heals, stops the load, waits for every job to end and the replicas
    /// to converge, stops everything and runs the checkers.
    fn heal_settle_and_judge(mut self) -> anyhow::Result<()> {
        self.net.heal()?;
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let addrs = self.set.addrs();
        wait_until("every job to end", Duration::from_secs(120), || {
            self.sandbox.all_jobs_ended(&addrs)?.then_some(())
        })?;
        wait_until("the replicas to converge", T, || {
            let applied: Vec<u64> = (1..=3).map(|id| self.applied(id)).collect::<Option<_>>()?;
            applied.windows(2).all(|w| w[0] == w[1]).then_some(())
        })?;
        let end_ms = now_ms();
        {
            let mut watch = self.watch.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            watch.poll(end_ms)?;
            watch.mark_survivors();
        }
        self.stop_all();
        let replicas = read_replicas(&self.set.dirs)?;
        let stored = replicas
            .iter()
            .map(Stored::read)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let executions = {
            let watch = self.watch.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            watch.kill_survivors();
            watch.executions().to_vec()
        };
        let load = self
            .load
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let mut acknowledged = load.acked.clone();
        acknowledged.extend(self.own.iter().map(|(k, v)| (*k, *v)));
        let verdict = check(&Ground {
            executions: &executions,
            acknowledged: &acknowledged,
            cancels: &load.cancels,
            stored: &stored,
            dead_nodes: &[],
            end_ms,
        });
        let mut problems: Vec<String> = verdict.violations.iter().map(|v| v.to_string()).collect();
        if let Err(error) = check_replicas(&replicas) {
            problems.push(format!("replicas: {error:#}"));
        }
        eprintln!(
            "netns: {} jobs acknowledged, {} processes, {} cancels, {} submit errors, extra work {:?}",
            acknowledged.len(),
            executions.len(),
            load.cancels.len(),
            load.submit_errors,
            verdict.extra
        );
        assert!(
            problems.is_empty(),
            "{} violations:\n{}",
            problems.len(),
            problems.join("\n")
        );
        assert!(!acknowledged.is_empty(), "nothing ran");
        Ok(())
    }

    /// Stops agents, then followers, then the leader (no election adds an
    /// entry to some replicas only).
    fn stop_all(&mut self) {
        for index in self.agents.drain(..) {
            self.sandbox.proc(index).stop(Duration::from_secs(10));
        }
        let leader = self.sandbox.leader_of(&self.set);
        let mut order: Vec<usize> = (1..=3).filter(|id| Some(*id) != leader).collect();
        order.extend(leader);
        for id in order {
            self.sandbox.stop_replica(&mut self.set, id);
        }
    }
}

/// How the leader is cut from the followers.
#[derive(Clone, Copy)]
enum LeaderCut {
    /// Both ways.
    Symmetric,
    /// Only the leader's packets to them are dropped.
    OneWay,
}

/// Cuts the leader from both followers under load; the majority elects a
/// new leader and keeps running jobs, the old one steps down; then heals
/// and judges.
fn leader_cut_off(test: &str, cut: LeaderCut, seed: u64) -> anyhow::Result<()> {
    let Some(net) = lab_or_skip(test)? else {
        return Ok(());
    };
    let mut lab = Lab::start(net, &["2xH100-80GiB", "2xH100-80GiB"])?;
    lab.wait_ready(2)?;
    lab.start_load(seed);
    std::thread::sleep(Duration::from_secs(4));
    let old = lab.leader()?;
    for other in (1..=3).filter(|id| *id != old) {
        match cut {
            LeaderCut::Symmetric => lab.net.cut_both(old, other)?,
            LeaderCut::OneWay => lab.net.cut(old, other)?,
        }
    }
    wait_until("a new leader among the followers", T, || {
        lab.sandbox.leader_of(&lab.set).filter(|id| *id != old)
    })?;
    // The old leader must not go on believing it leads while cut off (it
    // cannot commit; check-quorum makes it step down).
    let old_url = lab.set.urls[old - 1].clone();
    wait_until("the cut-off leader to step down", T, || {
        let status = lab.sandbox.gantry_json(&old_url, &["status"]).ok()?;
        (status["is_leader"] == false).then_some(())
    })?;
    let during = lab.submit_ledger_job(500)?;
    lab.sandbox
        .wait_job_state(&lab.set.addrs(), during, "succeeded", T)?;
    std::thread::sleep(Duration::from_secs(6));
    lab.heal_settle_and_judge()
}

/// The leader loses both followers, both ways, under load.
#[test]
fn a_symmetric_partition_of_the_leader() -> anyhow::Result<()> {
    leader_cut_off(
        "a_symmetric_partition_of_the_leader",
        LeaderCut::Symmetric,
        0x5e7_0001,
    )
}

/// The leader's packets to both followers are dropped (theirs still reach
/// it) under load.
#[test]
fn one_way_loss_from_the_leader() -> anyhow::Result<()> {
    leader_cut_off(
        "one_way_loss_from_the_leader",
        LeaderCut::OneWay,
        0x5e7_0002,
    )
}

/// One agent cannot reach the leader (it still reaches the followers) for
/// longer than the Down threshold while two long jobs run on it, and an
/// idle agent can take them: they must not run twice at once.
#[test]
fn an_agent_cut_from_the_leader_only() -> anyhow::Result<()> {
    let Some(net) = lab_or_skip("an_agent_cut_from_the_leader_only")? else {
        return Ok(());
    };
    // Only the agent to be cut runs at first, so the long jobs land on it.
    let mut lab = Lab::start(net, &["2xH100-80GiB"])?;
    lab.wait_ready(1)?;
    let long: Vec<JobId> = (0..2)
        .map(|_| lab.submit_ledger_job(40_000))
        .collect::<anyhow::Result<_>>()?;
    for id in &long {
        lab.sandbox
            .wait_job_state(&lab.set.addrs(), *id, "running", T)?;
    }
    lab.start_agent(AGENTS[1], "2xH100-80GiB")?;
    lab.wait_ready(2)?;
    let leader = lab.leader()?;
    let cut_at = now_ms();
    lab.net.cut_both(AGENTS[0], leader)?;
    // Past the Down threshold (15 s): the node goes Down and its jobs are
    // placed on the other agent.
    let addrs = lab.set.addrs();
    wait_until("the cut agent's node to go down", T, || {
        let nodes = lab.sandbox.gantry_json(&addrs, &["nodes"]).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == Lab::agent_name(AGENTS[0]).as_str() && n["state"] == "down")
            .then_some(())
    })?;
    eprintln!("netns: node down {} ms after the cut", now_ms() - cut_at);
    for id in &long {
        wait_until("the job to run on the other agent", T, || {
            let job = lab.sandbox.job(&addrs, *id).ok()?;
            let attempts = job["attempts"].as_array()?;
            let last = attempts.last()?;
            (job["state"] == "running" && last["node"] == Lab::agent_name(AGENTS[1]).as_str())
                .then_some(())
        })?;
    }
    std::thread::sleep(Duration::from_secs(3));
    lab.heal_settle_and_judge()
}
