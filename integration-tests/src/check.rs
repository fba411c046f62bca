//! The invariant checker of the replication tests: it opens every replica's
//! storage (after the processes have stopped) and checks that replicas at
//! the same applied index hold identical state, and that over the whole job
//! history no GPU was overcommitted and no exclusive lock had two holders.
//! Retention is part of the comparison: the jobs retired into each
//! replica's history, the event floor and the next job id must agree too.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail, ensure};
use gantry_coordinator::StateMachine;
use gantry_coordinator::domain::JobRecord;
use gantry_coordinator::store::Store;
use gantry_scheduler::LockMode;

/// What one replica's storage holds.
pub struct ReplicaState {
    /// Its data directory.
    pub dir: PathBuf,
    /// Last applied Raft index.
    pub applied: u64,
    /// Every job, by id.
    pub jobs: Vec<JobRecord>,
    /// Every retired job in its history, newest first.
    pub history: Vec<JobRecord>,
    state: StateMachine,
}

impl ReplicaState {
    /// Its state machine, as restored from storage.
    pub fn state(&self) -> &StateMachine {
        &self.state
    }
}

/// Reads each replica's storage.
pub fn read_replicas(dirs: &[PathBuf]) -> anyhow::Result<Vec<ReplicaState>> {
    dirs.iter()
        .map(|dir| {
            let mut store = Store::open(dir).with_context(|| format!("open {}", dir.display()))?;
            let state = store.load()?;
            Ok(ReplicaState {
                dir: dir.clone(),
                applied: store.applied_index()?,
                jobs: state.jobs().cloned().collect(),
                history: store.history_page(0, None, usize::MAX, |_| true)?.jobs,
                state,
            })
        })
        .collect()
}

/// Checks the replicas against each other and the history of each.
pub fn check_replicas(replicas: &[ReplicaState]) -> anyhow::Result<()> {
    for (i, a) in replicas.iter().enumerate() {
        for b in &replicas[i + 1..] {
            if a.applied == b.applied {
                let same = |what: &str, equal: bool| {
                    ensure!(
                        equal,
                        "{} and {} differ at applied index {} ({what})",
                        a.dir.display(),
                        b.dir.display(),
                        a.applied
                    );
                    Ok(())
                };
                same("jobs", a.jobs == b.jobs)?;
                // (A replica that installed a snapshot keeps only the history
                // it recorded since; no test here restores one after jobs
                // were retired.)
                same("retired jobs", a.history == b.history)?;
                same(
                    "event floor",
                    a.state.event_floor() == b.state.event_floor(),
                )?;
                same(
                    "next job id",
                    a.state.next_job_id() == b.state.next_job_id(),
                )?;
            }
        }
        check_history(a)?;
        let mut archived: Vec<u64> = a.history.iter().map(|job| job.id).collect();
        archived.sort_unstable();
        if let Some(twice) = archived.windows(2).find(|pair| pair[0] == pair[1]) {
            bail!(
                "{} has job {} twice in its history",
                a.dir.display(),
                twice[0]
            );
        }
    }
    Ok(())
}

/// A reservation held over [start, end): (start, end, bytes, exclusive).
type Hold = (u64, u64, u64, bool);

/// No GPU's reservations ever exceeded its memory, an exclusive GPU never
/// had a second job, and an exclusive lock never had a second holder, at any
/// moment of the recorded history (attempt intervals [assigned, ended)).
fn check_history(replica: &ReplicaState) -> anyhow::Result<()> {
    let mut gpus: BTreeMap<(String, u32), Vec<Hold>> = BTreeMap::new();
    let mut locks: BTreeMap<String, Vec<(u64, u64, LockMode, u64)>> = BTreeMap::new();
    for job in &replica.jobs {
        for attempt in &job.attempts {
            let end = if attempt.ended_at_ms == 0 {
                u64::MAX
            } else {
                attempt.ended_at_ms
            };
            for gpu in &attempt.gpus {
                gpus.entry((attempt.node.clone(), *gpu)).or_default().push((
                    attempt.assigned_at_ms,
                    end,
                    attempt.gpu_memory,
                    attempt.exclusive_gpu,
                ));
            }
            for lock in &job.spec.locks {
                locks.entry(lock.name.clone()).or_default().push((
                    attempt.assigned_at_ms,
                    end,
                    lock.mode,
                    job.id,
                ));
            }
        }
    }
    for ((node, index), intervals) in &gpus {
        let total = replica
            .state
            .node(node)
            .and_then(|n| n.gpus.iter().find(|g| g.index == *index))
            .map(|g| g.total)
            .with_context(|| format!("GPU {node}/{index} of an attempt is not registered"))?;
        for (start, _, _, _) in intervals {
            let live: Vec<_> = intervals
                .iter()
                .filter(|(s, e, _, _)| s <= start && start < e)
                .collect();
            let reserved: u64 = live.iter().map(|(_, _, bytes, _)| bytes).sum();
            if reserved > total {
                bail!("GPU {node}/{index} overcommitted at {start}: {reserved} > {total}");
            }
            if live.len() > 1 && live.iter().any(|(_, _, _, exclusive)| *exclusive) {
                bail!("exclusive GPU {node}/{index} shared at {start}");
            }
        }
    }
    for (name, intervals) in &locks {
        for (start, _, _, _) in intervals {
            let live: Vec<_> = intervals
                .iter()
                .filter(|(s, e, _, _)| s <= start && start < e)
                .collect();
            let holders: std::collections::BTreeSet<u64> =
                live.iter().map(|(_, _, _, job)| *job).collect();
            if holders.len() > 1
                && live
                    .iter()
                    .any(|(_, _, mode, _)| *mode == LockMode::Exclusive)
            {
                bail!("exclusive lock {name} had holders {holders:?} at {start}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_coordinator::domain::{AttemptRecord, GpuRecord, JobSpec, JobState, NodeRecord};
    use gantry_scheduler::{LockRequest, Resources};

    const GIB: u64 = 1 << 30;

    fn job(id: u64, start: u64, end: u64, memory: u64, exclusive_lock: bool) -> JobRecord {
        let spec = JobSpec {
            resources: Resources {
                gpus: 1,
                gpu_memory: Some(memory),
                ..Default::default()
            },
            locks: if exclusive_lock {
                vec![LockRequest {
                    name: "model/x".into(),
                    mode: LockMode::Exclusive,
                }]
            } else {
                vec![]
            },
            ..JobSpec::for_test(&format!("j{id}"))
        };
        JobRecord {
            state: JobState::Succeeded,
            updated_at_ms: end,
            attempts: vec![AttemptRecord {
                attempt: 1,
                node: "n1".into(),
                gpus: vec![0],
                gpu_memory: memory,
                batch_size: 0,
                exclusive_gpu: false,
                assigned_at_ms: start,
                started_at_ms: start,
                ended_at_ms: end,
                exit_code: Some(0),
                signal: None,
                error: String::new(),
                outcome: None,
                output_tail: String::new(),
                oom: false,
                forgiven: false,
                peak_gpu_memory: 0,
                preempted: String::new(),
            }],
            ..JobRecord::for_test(id, spec)
        }
    }

    fn replica(jobs: Vec<JobRecord>) -> ReplicaState {
        let node = NodeRecord {
            name: "n1".into(),
            address: String::new(),
            labels: Default::default(),
            gpus: vec![GpuRecord {
                index: 0,
                model: "H100".into(),
                total: 80 * GIB,
            }],
            cpu_millis: 0,
            memory_total: 0,
            disk_total: 0,
            draining: false,
            drain_deadline_ms: None,
            registered_at_ms: 0,
            down: false,
            quarantine: None,
            gpu_faults: Default::default(),
        };
        let state = StateMachine::restore(jobs.clone(), vec![node], vec![], vec![], 1);
        ReplicaState {
            dir: PathBuf::from("test"),
            applied: 1,
            jobs,
            history: Vec::new(),
            state,
        }
    }

    #[test]
    fn the_checker_catches_what_it_checks() {
        // Back to back is fine; overlapping 60 + 60 on 80 GiB is not.
        assert!(
            check_history(&replica(vec![
                job(1, 0, 10, 60 * GIB, false),
                job(2, 10, 20, 60 * GIB, false)
            ]))
            .is_ok()
        );
        let error = check_history(&replica(vec![
            job(1, 0, 10, 60 * GIB, false),
            job(2, 5, 20, 60 * GIB, false),
        ]))
        .expect_err("overcommit");
        assert!(error.to_string().contains("overcommitted"), "{error}");
        let error = check_history(&replica(vec![
            job(1, 0, 10, 10 * GIB, true),
            job(2, 5, 20, 10 * GIB, true),
        ]))
        .expect_err("two lock holders");
        assert!(error.to_string().contains("exclusive lock"), "{error}");
        // Replicas at equal index must agree.
        let a = replica(vec![job(1, 0, 10, 10 * GIB, false)]);
        let b = replica(vec![job(1, 0, 11, 10 * GIB, false)]);
        assert!(check_replicas(&[a, b]).is_err());
    }
}
