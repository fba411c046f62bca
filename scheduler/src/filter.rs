//! Feasibility checkers: the hard filters a node or GPU must pass before it
//! is scored. Each is a small pure type shared by the indexed pass
//! ([`crate::place`]) and the naive baseline ([`crate::naive`]), so both
//! agree on what "fits" means.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::model::{HoldReason, JobId, JobRequest, LockHolders, LockMode, NodeState, NodeView};

/// Why a node takes no new placements regardless of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeRefusal {
    /// Missed heartbeats.
    Suspect,
    /// Silent past the down threshold.
    Down,
    /// Drained by an operator.
    Draining,
    /// Not heard from since this leader took office.
    NotHeardFrom,
    /// Circuit breaker open.
    Quarantined,
}

impl NodeRefusal {
    /// Every refusal, in the order reasons list them.
    pub const ALL: [NodeRefusal; 5] = [
        NodeRefusal::Suspect,
        NodeRefusal::Down,
        NodeRefusal::Draining,
        NodeRefusal::NotHeardFrom,
        NodeRefusal::Quarantined,
    ];
}

impl fmt::Display for NodeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRefusal::Suspect => "suspect",
            NodeRefusal::Down => "down",
            NodeRefusal::Draining => "draining",
            NodeRefusal::NotHeardFrom => "not heard from yet",
            NodeRefusal::Quarantined => "quarantined",
        })
    }
}

/// Node state, drain, leader contact and quarantine: the job-independent
/// filter. Nodes it refuses are never indexed.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeStateChecker;

impl NodeStateChecker {
    /// `Ok` when the node may take new placements at `now_ms`.
    pub fn admits(node: &NodeView, now_ms: u64) -> Result<(), NodeRefusal> {
        match node.state {
            NodeState::Ready => {}
            NodeState::Suspect => return Err(NodeRefusal::Suspect),
            NodeState::Down => return Err(NodeRefusal::Down),
        }
        if node.draining {
            return Err(NodeRefusal::Draining);
        }
        // A new leader has no telemetry for the node yet: placing on a stale
        // GPU-memory view is how OOMs happen.
        if !node.heard_from {
            return Err(NodeRefusal::NotHeardFrom);
        }
        if now_ms < node.quarantined_until_ms {
            return Err(NodeRefusal::Quarantined);
        }
        Ok(())
    }
}

/// Label constraints: every wanted label must equal the node's.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabelChecker;

impl LabelChecker {
    /// The node's value for a label; `provider` falls back to the node's
    /// provider field.
    pub fn value<'n>(node: &'n NodeView, key: &str) -> Option<&'n str> {
        match node.labels.get(key) {
            Some(v) => Some(v.as_str()),
            None if key == "provider" && !node.provider.is_empty() => Some(node.provider.as_str()),
            None => None,
        }
    }

    /// Whether the node carries every wanted label.
    pub fn matches(node: &NodeView, wanted: &BTreeMap<String, String>) -> bool {
        wanted
            .iter()
            .all(|(k, v)| Self::value(node, k) == Some(v.as_str()))
    }
}

/// GPU model constraints: case-insensitive prefix, so `A100` matches
/// `A100-80GB`; an empty list matches any model.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuModelChecker;

impl GpuModelChecker {
    /// Whether `model` is one of `wanted`.
    pub fn matches(model: &str, wanted: &[String]) -> bool {
        wanted.is_empty()
            || wanted.iter().any(|w| {
                model.len() >= w.len()
                    && model.as_bytes()[..w.len()].eq_ignore_ascii_case(w.as_bytes())
            })
    }
}

/// Exclusive vs shared GPUs: an exclusive job needs a GPU no Gantry job
/// holds; a shareable job needs one no exclusive job holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuShareChecker;

impl GpuShareChecker {
    /// Whether a GPU with `jobs` Gantry jobs (`exclusive` if one of them
    /// holds it exclusively) can take a job wanting `exclusive_job`.
    pub fn admits(jobs: u32, exclusive: bool, exclusive_job: bool) -> bool {
        !exclusive && (!exclusive_job || jobs == 0)
    }
}

/// Host resources: CPU, RAM and scratch disk, against what is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFree {
    /// CPU left, thousandths of a core.
    pub cpu_millis: u64,
    /// RAM left.
    pub memory: u64,
    /// Data-volume space left (capacity - used - reserved).
    pub disk: u64,
}

impl HostFree {
    /// What a node has left before this pass.
    pub fn of(node: &NodeView) -> Self {
        HostFree {
            cpu_millis: node
                .cpu_millis_total
                .saturating_sub(node.cpu_millis_reserved),
            memory: node.memory_total.saturating_sub(node.memory_reserved),
            disk: node
                .disk_total
                .saturating_sub(node.disk_used)
                .saturating_sub(node.disk_reserved),
        }
    }

    /// Takes a job's host resources (after [`ResourceChecker::fits`]).
    pub fn take(&mut self, job: &JobRequest) {
        self.cpu_millis = self.cpu_millis.saturating_sub(job.resources.cpu_millis);
        self.memory = self.memory.saturating_sub(job.resources.memory);
        self.disk = self.disk.saturating_sub(job.resources.disk);
    }
}

/// CPU/RAM/disk filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceChecker;

impl ResourceChecker {
    /// Whether the job's host resources fit in what is left.
    pub fn fits(free: &HostFree, job: &JobRequest) -> bool {
        free.cpu_millis >= job.resources.cpu_millis
            && free.memory >= job.resources.memory
            && free.disk >= job.resources.disk
    }

    /// Whether `want`, as host resources, fits in what is left.
    pub fn fits_free(free: &HostFree, want: &HostFree) -> bool {
        free.cpu_millis >= want.cpu_millis && free.memory >= want.memory && free.disk >= want.disk
    }
}

/// Named locks: the holders from the snapshot plus those granted earlier in
/// the same pass, so two exclusive requests in one pass cannot both win.
#[derive(Debug, Clone, Default)]
pub struct LockChecker<'s> {
    held: Option<&'s BTreeMap<String, LockHolders>>,
    /// Granted in this pass: name -> (exclusive holder, a shared holder).
    granted: HashMap<String, (Option<JobId>, Option<JobId>)>,
}

impl<'s> LockChecker<'s> {
    /// A checker over the snapshot's current holders.
    pub fn new(held: &'s BTreeMap<String, LockHolders>) -> Self {
        LockChecker {
            held: Some(held),
            granted: HashMap::new(),
        }
    }

    /// The first lock `job` cannot take, with a holder to name. A job is
    /// never blocked by itself (a retried job may still be listed).
    pub fn conflict(&self, job: &JobRequest) -> Option<HoldReason> {
        for request in &job.locks {
            let snapshot = self.held.and_then(|h| h.get(&request.name));
            let granted = self.granted.get(&request.name);
            let exclusive = snapshot
                .and_then(|h| h.exclusive)
                .into_iter()
                .chain(granted.and_then(|g| g.0))
                .find(|&holder| holder != job.id);
            let holder = match request.mode {
                LockMode::Shared => exclusive,
                LockMode::Exclusive => exclusive.or_else(|| {
                    snapshot
                        .into_iter()
                        .flat_map(|h| h.shared.iter().copied())
                        .chain(granted.and_then(|g| g.1))
                        .find(|&holder| holder != job.id)
                }),
            };
            if let Some(holder) = holder {
                return Some(HoldReason::LockHeld {
                    lock: request.name.clone(),
                    holder,
                });
            }
        }
        None
    }

    /// Records that `job` was placed and now holds its locks.
    pub fn grant(&mut self, job: &JobRequest) {
        for request in &job.locks {
            let entry = self.granted.entry(request.name.clone()).or_default();
            match request.mode {
                LockMode::Exclusive => entry.0 = Some(job.id),
                LockMode::Shared => {
                    entry.1.get_or_insert(job.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LockRequest;

    fn ready() -> NodeView {
        NodeView {
            name: "n".into(),
            heard_from: true,
            ..Default::default()
        }
    }

    #[test]
    fn node_state() {
        fn check(node: NodeView, expected: Result<(), NodeRefusal>) {
            assert_eq!(NodeStateChecker::admits(&node, 1000), expected, "{node:?}");
        }
        check(ready(), Ok(()));
        check(
            NodeView {
                state: NodeState::Suspect,
                ..ready()
            },
            Err(NodeRefusal::Suspect),
        );
        check(
            NodeView {
                state: NodeState::Down,
                ..ready()
            },
            Err(NodeRefusal::Down),
        );
        check(
            NodeView {
                draining: true,
                ..ready()
            },
            Err(NodeRefusal::Draining),
        );
        check(
            NodeView {
                heard_from: false,
                ..ready()
            },
            Err(NodeRefusal::NotHeardFrom),
        );
        check(
            NodeView {
                quarantined_until_ms: 1001,
                ..ready()
            },
            Err(NodeRefusal::Quarantined),
        );
        check(
            NodeView {
                quarantined_until_ms: 1000,
                ..ready()
            },
            Ok(()),
        );
    }

    #[test]
    fn labels() {
        fn check(
            node_labels: &[(&str, &str)],
            provider: &str,
            wanted: &[(&str, &str)],
            expected: bool,
        ) {
            let node = NodeView {
                labels: node_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                provider: provider.into(),
                ..ready()
            };
            let wanted = wanted
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(
                LabelChecker::matches(&node, &wanted),
                expected,
                "{node_labels:?} vs {wanted:?}"
            );
        }
        check(&[], "", &[], true);
        check(&[("zone", "a")], "", &[("zone", "a")], true);
        check(&[("zone", "a")], "", &[("zone", "b")], false);
        check(&[("zone", "a")], "", &[("zone", "a"), ("rack", "1")], false);
        check(&[], "lambda", &[("provider", "lambda")], true);
        check(
            &[("provider", "vast")],
            "lambda",
            &[("provider", "lambda")],
            false,
        );
        check(&[], "", &[("provider", "lambda")], false);
    }

    #[test]
    fn gpu_models() {
        fn check(model: &str, wanted: &[&str], expected: bool) {
            let wanted: Vec<String> = wanted.iter().map(|w| w.to_string()).collect();
            assert_eq!(
                GpuModelChecker::matches(model, &wanted),
                expected,
                "{model} vs {wanted:?}"
            );
        }
        check("H100-80GiB", &[], true);
        check("H100-80GiB", &["H100"], true);
        check("H100-80GiB", &["h100"], true);
        check("A100-80GB", &["H100", "A100-80GB"], true);
        check("A100-40GB", &["A100-80GB"], false);
        check("A10", &["A100"], false);
        check("RTX4090", &["H100"], false);
    }

    #[test]
    fn gpu_sharing() {
        // (jobs, exclusive, exclusive_job, admitted)
        let cases = [
            (0, false, false, true),
            (0, false, true, true),
            (2, false, false, true),
            (2, false, true, false),
            (1, true, false, false),
            (1, true, true, false),
        ];
        for (jobs, exclusive, exclusive_job, expected) in cases {
            assert_eq!(
                GpuShareChecker::admits(jobs, exclusive, exclusive_job),
                expected,
                "jobs={jobs} exclusive={exclusive} exclusive_job={exclusive_job}"
            );
        }
    }

    #[test]
    fn host_resources() {
        let node = NodeView {
            cpu_millis_total: 8000,
            cpu_millis_reserved: 2000,
            memory_total: 64,
            memory_reserved: 16,
            disk_total: 100,
            disk_used: 50,
            disk_reserved: 10,
            ..ready()
        };
        let free = HostFree::of(&node);
        assert_eq!(
            free,
            HostFree {
                cpu_millis: 6000,
                memory: 48,
                disk: 40
            }
        );
        let job = |cpu: u64, memory: u64, disk: u64| {
            let mut job = JobRequest::default();
            job.resources.cpu_millis = cpu;
            job.resources.memory = memory;
            job.resources.disk = disk;
            job
        };
        // (cpu, memory, disk, fits)
        let cases = [
            (0, 0, 0, true),
            (6000, 48, 40, true),
            (6001, 0, 0, false),
            (0, 49, 0, false),
            (0, 0, 41, false),
        ];
        for (cpu, memory, disk, expected) in cases {
            assert_eq!(
                ResourceChecker::fits(&free, &job(cpu, memory, disk)),
                expected,
                "cpu={cpu} memory={memory} disk={disk}"
            );
        }
        let mut left = free;
        left.take(&job(6000, 8, 40));
        assert_eq!(
            left,
            HostFree {
                cpu_millis: 0,
                memory: 40,
                disk: 0
            }
        );
    }

    #[test]
    fn locks() {
        let lock = |name: &str, mode: LockMode| LockRequest {
            name: name.into(),
            mode,
        };
        let job = |id: JobId, locks: Vec<LockRequest>| JobRequest {
            id,
            locks,
            ..Default::default()
        };
        let mut held = BTreeMap::new();
        held.insert(
            "model/a".to_string(),
            LockHolders {
                exclusive: Some(812),
                shared: Default::default(),
            },
        );
        held.insert(
            "model/b".to_string(),
            LockHolders {
                exclusive: None,
                shared: [7, 9].into_iter().collect(),
            },
        );
        let checker = LockChecker::new(&held);
        let conflict = |j: &JobRequest| checker.conflict(j).map(|r| r.to_string());
        let cases = [
            (
                job(1, vec![lock("model/a", LockMode::Shared)]),
                Some("lock model/a held by job 812"),
            ),
            (
                job(1, vec![lock("model/a", LockMode::Exclusive)]),
                Some("lock model/a held by job 812"),
            ),
            (job(812, vec![lock("model/a", LockMode::Exclusive)]), None),
            (job(1, vec![lock("model/b", LockMode::Shared)]), None),
            (
                job(1, vec![lock("model/b", LockMode::Exclusive)]),
                Some("lock model/b held by job 7"),
            ),
            (
                job(7, vec![lock("model/b", LockMode::Exclusive)]),
                Some("lock model/b held by job 9"),
            ),
            (job(1, vec![lock("model/c", LockMode::Exclusive)]), None),
            (job(1, vec![]), None),
        ];
        for (j, expected) in cases {
            assert_eq!(conflict(&j).as_deref(), expected, "{:?}", j.locks);
        }

        // Within one pass: the first exclusive grant blocks the second.
        let mut checker = LockChecker::new(&held);
        let writer = job(20, vec![lock("model/c", LockMode::Exclusive)]);
        let reader = job(21, vec![lock("model/d", LockMode::Shared)]);
        assert_eq!(checker.conflict(&writer), None);
        checker.grant(&writer);
        checker.grant(&reader);
        let cases = [
            (
                job(22, vec![lock("model/c", LockMode::Exclusive)]),
                Some("lock model/c held by job 20"),
            ),
            (
                job(22, vec![lock("model/c", LockMode::Shared)]),
                Some("lock model/c held by job 20"),
            ),
            (job(22, vec![lock("model/d", LockMode::Shared)]), None),
            (
                job(22, vec![lock("model/d", LockMode::Exclusive)]),
                Some("lock model/d held by job 21"),
            ),
        ];
        for (j, expected) in cases {
            assert_eq!(
                checker.conflict(&j).map(|r| r.to_string()).as_deref(),
                expected,
                "{:?}",
                j.locks
            );
        }
    }
}
