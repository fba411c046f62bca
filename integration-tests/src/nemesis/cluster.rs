//! The processes under fault and the faults themselves: killing and
//! restarting agents and replicas, cutting a replica's links, and the
//! bounded waits for recovery, quiet and convergence.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::{Fault, FaultKind, NemesisConfig, Outage, RECOVERY, lock, now_ms, pause};
use crate::ledger::LedgerWatch;
use crate::{PartitionableReplicas, Sandbox, wait_until};

/// An agent of the run.
struct Agent {
    name: String,
    address: String,
    proc: Option<usize>,
}

/// The processes under fault.
pub(super) struct Cluster {
    pub(super) parts: PartitionableReplicas,
    pub(super) addrs: String,
    agents: Vec<Agent>,
    fake_gpus: String,
}

impl Cluster {
    pub(super) fn start(sandbox: &mut Sandbox, config: &NemesisConfig) -> anyhow::Result<Cluster> {
        let parts = sandbox.start_partitionable_replicas()?;
        let addrs = parts.set.addrs();
        wait_until("a leader", RECOVERY, || sandbox.leader_of(&parts.set))?;
        let mut agents = Vec::new();
        for i in 0..config.agents {
            let name = format!("node-{}", i + 1);
            let address = format!("127.0.0.{}", 2 + i);
            let proc = sandbox.start_agent(&name, &addrs, &config.fake_gpus, &address, &[])?;
            agents.push(Agent {
                name,
                address,
                proc: Some(proc),
            });
        }
        sandbox.wait_nodes_ready(&addrs, config.agents, RECOVERY)?;
        Ok(Cluster {
            parts,
            addrs,
            agents,
            fake_gpus: config.fake_gpus.clone(),
        })
    }

    pub(super) fn inject(
        &mut self,
        sandbox: &mut Sandbox,
        rng: &mut StdRng,
        kind: FaultKind,
    ) -> anyhow::Result<Fault> {
        let at_ms = now_ms();
        let fault = match kind {
            FaultKind::AgentKill => {
                let index = rng.random_range(0..self.agents.len());
                let killed_ms = self.kill_agent(sandbox, index);
                pause(rng, 1_000, 4_000);
                let outage = self.restart_agent(sandbox, index, killed_ms)?;
                Fault {
                    kind,
                    at_ms,
                    target: outage.node.clone(),
                    outage: Some(outage),
                }
            }
            FaultKind::LeaderKill => {
                let id = self.leader(sandbox)?;
                self.kill_replica(sandbox, id);
                pause(rng, 1_000, 3_000);
                sandbox.start_replica(&mut self.parts.set, id)?;
                Fault {
                    kind,
                    at_ms,
                    target: format!("replica-{id}"),
                    outage: None,
                }
            }
            FaultKind::Partition => {
                let id = if rng.random_bool(0.5) {
                    self.leader(sandbox)?
                } else {
                    rng.random_range(1..=3)
                };
                self.parts.isolate(id);
                pause(rng, 2_000, 5_000);
                self.parts.heal();
                Fault {
                    kind,
                    at_ms,
                    target: format!("replica-{id}"),
                    outage: None,
                }
            }
            FaultKind::AgentAndLeaderKill => self.kill_agent_and_leader(sandbox, rng, None)?,
        };
        self.leader(sandbox)?;
        Ok(fault)
    }

    /// Kills an agent, then the leader within a second; restarts the
    /// leader, and the agent unless `node_dies` (then the node's job
    /// processes are killed too, as when a machine dies, and it stays dead).
    pub(super) fn kill_agent_and_leader(
        &mut self,
        sandbox: &mut Sandbox,
        rng: &mut StdRng,
        node_dies: Option<&Mutex<LedgerWatch>>,
    ) -> anyhow::Result<Fault> {
        let at_ms = now_ms();
        let index = rng.random_range(0..self.agents.len());
        let killed_ms = self.kill_agent(sandbox, index);
        if let Some(watch) = node_dies {
            let mut watch = lock(watch)?;
            watch.poll(now_ms())?;
            watch.kill_on(&self.agents[index].name);
        }
        pause(rng, 100, 1_000);
        let id = self.leader(sandbox)?;
        self.kill_replica(sandbox, id);
        pause(rng, 1_000, 3_000);
        sandbox.start_replica(&mut self.parts.set, id)?;
        let outage = if node_dies.is_none() {
            self.restart_agent(sandbox, index, killed_ms)?
        } else {
            Outage {
                node: self.agents[index].name.clone(),
                killed_ms,
                restarted_ms: None,
                ready_ms: None,
            }
        };
        Ok(Fault {
            kind: FaultKind::AgentAndLeaderKill,
            at_ms,
            target: format!("{} and replica-{id}", outage.node),
            outage: Some(outage),
        })
    }

    pub(super) fn leader(&self, sandbox: &Sandbox) -> anyhow::Result<usize> {
        wait_until("a leader", RECOVERY, || sandbox.leader_of(&self.parts.set))
    }

    pub(super) fn kill_replica(&mut self, sandbox: &mut Sandbox, id: usize) {
        if let Some(index) = self.parts.set.procs[id - 1].take() {
            sandbox.proc(index).kill9();
        }
    }

    pub(super) fn kill_agent(&mut self, sandbox: &mut Sandbox, index: usize) -> u64 {
        if let Some(proc) = self.agents[index].proc.take() {
            sandbox.proc(proc).kill9();
        }
        now_ms()
    }

    /// Restarts an agent and waits (bounded) until the leader shows it
    /// ready on a fresh heartbeat.
    pub(super) fn restart_agent(
        &mut self,
        sandbox: &mut Sandbox,
        index: usize,
        killed_ms: u64,
    ) -> anyhow::Result<Outage> {
        let agent = &mut self.agents[index];
        let restarted_ms = now_ms();
        agent.proc = Some(sandbox.start_agent(
            &agent.name,
            &self.addrs,
            &self.fake_gpus,
            &agent.address,
            &[],
        )?);
        let ready_ms = wait_until(&format!("{} ready again", agent.name), RECOVERY, || {
            let nodes = sandbox.gantry_json(&self.addrs, &["nodes"]).ok()?;
            let node = nodes
                .as_array()?
                .iter()
                .find(|n| n["name"] == agent.name.as_str())?;
            let fresh = node["last_seen_ms"].as_u64()? >= restarted_ms;
            (fresh && node["state"] == "ready" && node["connected"] == true).then(now_ms)
        })
        .ok();
        Ok(Outage {
            node: agent.name.clone(),
            killed_ms,
            restarted_ms: Some(restarted_ms),
            ready_ms,
        })
    }

    /// Heals every link, waits (bounded) until no job is left unfinished
    /// and every dead agent's node is Down. Returns whether it got there.
    pub(super) fn settle(
        &self,
        sandbox: &Sandbox,
        dead_nodes: &[String],
        within: Duration,
    ) -> bool {
        self.parts.heal();
        wait_until("the cluster to go quiet", within, || {
            let ended = sandbox.all_jobs_ended(&self.addrs)?;
            let nodes = sandbox.gantry_json(&self.addrs, &["nodes"]).ok()?;
            let nodes = nodes.as_array()?;
            let down = dead_nodes.iter().all(|dead| {
                nodes
                    .iter()
                    .any(|n| n["name"] == dead.as_str() && n["state"] == "down")
            });
            (ended && down).then_some(())
        })
        .is_ok()
    }

    /// Stops the agents (nothing then writes), waits (bounded) for the
    /// replicas to reach one applied index, and stops them followers first,
    /// so no election adds an entry to some of them.
    pub(super) fn stop_all(&mut self, sandbox: &mut Sandbox) -> anyhow::Result<()> {
        for agent in &mut self.agents {
            if let Some(proc) = agent.proc.take() {
                sandbox.proc(proc).stop(Duration::from_secs(10));
            }
        }
        for id in 1..=3 {
            if self.parts.set.procs[id - 1].is_none() {
                sandbox.start_replica(&mut self.parts.set, id)?;
            }
        }
        let urls = self.parts.set.urls.clone();
        let applied =
            |url: &String| sandbox.gantry_json(url, &["status"]).ok()?["applied_index"].as_u64();
        let _ = wait_until("the replicas to converge", RECOVERY, || {
            let indexes: Vec<u64> = urls.iter().map(applied).collect::<Option<_>>()?;
            indexes.windows(2).all(|w| w[0] == w[1]).then_some(())
        });
        let leader = sandbox.leader_of(&self.parts.set);
        let mut order: Vec<usize> = (1..=3).filter(|id| Some(*id) != leader).collect();
        order.extend(leader);
        for id in order {
            sandbox.stop_replica(&mut self.parts.set, id);
        }
        Ok(())
    }
}
