//! The apply-time re-check of a plan: every placement against hard state
//! (reservations, exclusivity, locks, host resources), so no plan can
//! overcommit a GPU whatever the scheduler decided.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gantry_scheduler::{JobId, LockMode, Placement};

use super::preempt::hold_refusal;
use super::{Outcome, StateMachine};
use crate::domain::{AttemptRecord, GangMember, JobState, master_ports};

impl StateMachine {
    /// Re-checks a placement against hard state: the job is pending, the node
    /// exists and is usable, every GPU exists, is healthy, fits and respects
    /// exclusivity, and the locks are free.
    pub(super) fn check_placement(&self, placement: &Placement) -> Result<(), String> {
        let job = self
            .jobs
            .get(&placement.job)
            .ok_or_else(|| format!("job {} not found", placement.job))?;
        if job.state != JobState::Pending || job.cancel_requested {
            return Err(format!("job {} is {}, not pending", job.id, job.state));
        }
        let node = self
            .nodes
            .get(&placement.node)
            .ok_or_else(|| format!("node {} not registered", placement.node))?;
        if node.down || node.draining {
            return Err(format!("node {} is down or draining", node.name));
        }
        if placement.gpus.len() != job.spec.resources.gpus as usize {
            return Err(format!(
                "job {} wants {} GPUs, plan gives {}",
                job.id,
                job.spec.resources.gpus,
                placement.gpus.len()
            ));
        }
        let distinct: BTreeSet<u32> = placement.gpus.iter().copied().collect();
        if distinct.len() != placement.gpus.len() {
            return Err(format!("job {} given the same GPU twice", job.id));
        }
        if let Some(asked) = job.spec.resources.gpu_memory
            && placement.gpu_memory < asked
        {
            return Err(format!("job {} reserves less than it asked", job.id));
        }
        for index in &placement.gpus {
            let gpu = node
                .gpus
                .iter()
                .find(|g| g.index == *index)
                .ok_or_else(|| format!("node {} has no GPU {index}", node.name))?;
            if let Some(fault) = node.gpu_fault(*index) {
                return Err(format!("GPU {}/{index} is unhealthy ({fault})", node.name));
            }
            let usage = self.gpu_usage(&node.name, *index);
            if usage.reserved + placement.gpu_memory > gpu.total {
                return Err(format!(
                    "GPU {}/{index} would be overcommitted ({} + {} > {})",
                    node.name, usage.reserved, placement.gpu_memory, gpu.total
                ));
            }
            if usage.exclusive || (placement.exclusive_gpu && usage.jobs > 0) {
                return Err(format!(
                    "GPU {}/{index} is not free for this job",
                    node.name
                ));
            }
        }
        for lock in &job.spec.locks {
            if let Some(holders) = self.locks.get(&lock.name) {
                let busy = match lock.mode {
                    LockMode::Shared => holders.exclusive.is_some(),
                    LockMode::Exclusive => {
                        holders.exclusive.is_some() || !holders.shared.is_empty()
                    }
                };
                if busy {
                    return Err(format!("lock {} is held", lock.name));
                }
            }
        }
        Ok(())
    }

    pub(super) fn assign(&mut self, at_ms: u64, placements: Vec<Placement>) -> Outcome {
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        let holds = self.holds_at(at_ms);
        let mut gangs_seen = BTreeSet::new();
        for (i, placement) in placements.iter().enumerate() {
            if let Some(gang) = self.jobs.get(&placement.job).and_then(|j| j.gang.clone()) {
                if gangs_seen.insert(gang.first) {
                    let plan = &placements[i..];
                    self.assign_gang(at_ms, &gang, plan, &holds, &mut applied, &mut refused);
                }
                continue;
            }
            if let Err(reason) = self.check_placement(placement) {
                refused.push((placement.job, reason));
                continue;
            }
            if let Some(reason) = hold_refusal(&holds, placement) {
                refused.push((placement.job, reason));
                continue;
            }
            let attempt = self.apply_placement(at_ms, placement);
            applied.push((placement.job, attempt));
        }
        Outcome::Assigned { applied, refused }
    }

    /// Applies every member of a gang from `plan` (the plan from the first
    /// member on), or none: each member's placement is re-checked, the
    /// members must be exactly the gang's, on distinct nodes, and a
    /// `MASTER_PORT` must be free on rank 0's node; else all are refused
    /// with the first reason.
    fn assign_gang(
        &mut self,
        at_ms: u64,
        gang: &GangMember,
        plan: &[Placement],
        holds: &HashMap<String, JobId>,
        applied: &mut Vec<(JobId, u32)>,
        refused: &mut Vec<(JobId, String)>,
    ) {
        let members: Vec<&Placement> = plan
            .iter()
            .filter(|p| (gang.first..gang.first + u64::from(gang.size)).contains(&p.job))
            .collect();
        let check = || -> Result<u16, String> {
            let jobs: BTreeSet<JobId> = members.iter().map(|p| p.job).collect();
            if members.len() != gang.size as usize || jobs.len() != members.len() {
                return Err(format!(
                    "gang {} needs all {} members placed at once, plan has {}",
                    gang.first,
                    gang.size,
                    jobs.len()
                ));
            }
            let nodes: BTreeSet<&str> = members.iter().map(|p| p.node.as_str()).collect();
            if nodes.len() != members.len() {
                return Err(format!("gang {} members share a node", gang.first));
            }
            for p in &members {
                self.check_placement(p)?;
                if let Some(reason) = hold_refusal(holds, p) {
                    return Err(reason);
                }
            }
            let rank0 = members
                .iter()
                .find(|p| p.job == gang.first)
                .map(|p| p.node.as_str())
                .unwrap_or_default();
            self.free_gang_port(rank0)?.ok_or_else(|| {
                format!(
                    "no free MASTER_PORT left on node {rank0} for gang {}",
                    gang.first
                )
            })
        };
        match check() {
            Err(reason) => {
                refused.extend(members.iter().map(|p| (p.job, reason.clone())));
            }
            Ok(port) => {
                for p in members {
                    if let Some(g) = self.jobs.get_mut(&p.job).and_then(|j| j.gang.as_mut()) {
                        g.port = port;
                    }
                    let attempt = self.apply_placement(at_ms, p);
                    applied.push((p.job, attempt));
                }
            }
        }
    }

    /// The lowest port of `node`'s gang range (its agent's
    /// `--master-port-range`, see [`master_ports`]) that no active gang with
    /// rank 0 on `node` uses; an unreadable range is the refusal's reason.
    fn free_gang_port(&self, node: &str) -> Result<Option<u16>, String> {
        let range = match self.nodes.get(node) {
            Some(record) => master_ports(&record.labels)
                .map_err(|e| format!("node {node}'s MASTER_PORT range: {e}"))?,
            None => master_ports(&BTreeMap::new())?,
        };
        let used: BTreeSet<u16> = self
            .jobs_on(node)
            .filter_map(|j| j.gang.as_ref().filter(|g| g.rank == 0).map(|g| g.port))
            .collect();
        Ok(range.into_iter().find(|p| !used.contains(p)))
    }

    /// Records a checked placement as the job's next attempt; returns its
    /// number.
    fn apply_placement(&mut self, at_ms: u64, placement: &Placement) -> u32 {
        let Some(job) = self.jobs.get_mut(&placement.job) else {
            return 0;
        };
        let attempt = job.attempts.len() as u32 + 1;
        // One attempt at a time: a first push would reserve room for four
        // (about 550 bytes unused per job, 55 MiB at 100,000 jobs).
        job.attempts.reserve_exact(1);
        job.attempts.push(AttemptRecord {
            attempt,
            node: placement.node.clone(),
            gpus: placement.gpus.clone(),
            gpu_memory: placement.gpu_memory,
            batch_size: placement.batch_size.unwrap_or(0),
            exclusive_gpu: placement.exclusive_gpu,
            assigned_at_ms: at_ms,
            started_at_ms: 0,
            ended_at_ms: 0,
            exit_code: None,
            signal: None,
            error: String::new(),
            outcome: None,
            output_tail: String::new(),
            oom: false,
            forgiven: false,
            peak_gpu_memory: 0,
            preempted: String::new(),
        });
        self.transition(at_ms, placement.job, JobState::Assigned, String::new());
        attempt
    }

    /// Whether `attempt`'s reservation fits its GPUs once `replacing`'s (if
    /// on the same GPUs) is released.
    pub(super) fn reservation_fits(
        &self,
        attempt: &AttemptRecord,
        replacing: Option<&AttemptRecord>,
    ) -> bool {
        let Some(node) = self.nodes.get(&attempt.node) else {
            return false;
        };
        attempt.gpus.iter().all(|index| {
            let Some(gpu) = node.gpus.iter().find(|g| g.index == *index) else {
                return false;
            };
            let mut usage = self.gpu_usage(&attempt.node, *index);
            if let Some(r) = replacing.filter(|r| r.node == attempt.node && r.gpus.contains(index))
            {
                usage.reserved -= r.gpu_memory;
                usage.jobs -= 1;
                if r.exclusive_gpu {
                    usage.exclusive = false;
                }
            }
            usage.reserved + attempt.gpu_memory <= gpu.total
                && !usage.exclusive
                && !(attempt.exclusive_gpu && usage.jobs > 0)
        })
    }
}
