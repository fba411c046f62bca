//! Priority preemption: a pending job that fits nowhere may stop running
//! jobs of lower priority on one node, when what they hold would make it
//! fit.
//!
//! Victims, per node: running jobs of strictly lower priority that are
//! preemptible, not protected (preempted `max_preemptions` times within the
//! starvation window), not a job that preempted the preemptor (no
//! cascades), and not already chosen in this pass. Among the sets that make
//! the job fit, the pass takes, over every eligible node, the set with the
//! fewest jobs, then the lowest highest priority, then the least work lost
//! (the most recently started), then the node name and the job ids: the
//! same input gives the same victims. Sets of up to [`EXACT_UP_TO`] jobs are
//! searched exhaustively among a node's first [`CANDIDATES`] candidates in
//! that order; past that the candidates are taken in order until the job
//! fits.

use std::collections::{BTreeSet, HashMap};

use crate::disk::DiskPressureChecker;
use crate::filter::{GpuModelChecker, GpuShareChecker, LabelChecker, ResourceChecker};
use crate::hash::FxBuild;
use crate::index::FreeIndex;
use crate::model::{ClusterSnapshot, JobId, Preemption, RunningJob};
use crate::place::Ask;

/// Largest victim set searched exhaustively.
const EXACT_UP_TO: usize = 4;
/// Candidates per node considered (bounds the search per node).
const CANDIDATES: usize = 12;

/// The pass's preemption state: running jobs by node, victims taken.
pub(crate) struct Preemptor<'s> {
    snapshot: &'s ClusterSnapshot,
    by_node: HashMap<&'s str, Vec<&'s RunningJob>, FxBuild>,
    /// Victims chosen earlier in this pass, and nodes preempted on.
    taken: BTreeSet<JobId>,
    nodes_taken: BTreeSet<String>,
    /// Lowest priority of any preemptible running job: a job at or below
    /// it cannot preempt anything, checked before any search.
    floor: Option<i32>,
}

/// A candidate set on one node and its rank.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Choice {
    count: usize,
    top_priority: i32,
    work_lost: u64,
    node: String,
    victims: Vec<JobId>,
}

impl<'s> Preemptor<'s> {
    pub fn new(snapshot: &'s ClusterSnapshot) -> Self {
        let mut by_node: HashMap<&'s str, Vec<&'s RunningJob>, FxBuild> = HashMap::default();
        let mut floor = None;
        for job in &snapshot.running {
            if job.preemptible {
                floor = Some(floor.map_or(job.priority, |f: i32| f.min(job.priority)));
            }
            by_node.entry(job.node.as_str()).or_default().push(job);
        }
        Preemptor {
            snapshot,
            by_node,
            taken: BTreeSet::new(),
            nodes_taken: BTreeSet::new(),
            floor,
        }
    }

    /// Whether `ask`'s job could preempt anything at all.
    pub fn worth_trying(&self, ask: &Ask<'_>) -> bool {
        self.snapshot.policy.preemption.enabled
            && ask.job.held_node.is_none()
            && self.floor.is_some_and(|f| ask.job.priority > f)
    }

    /// Whether a running job is protected from preemption at `now_ms`.
    fn protected(&self, job: &RunningJob) -> bool {
        let policy = &self.snapshot.policy.preemption;
        let now = self.snapshot.now_ms;
        let recent = job
            .preempted_at_ms
            .iter()
            .filter(|&&at| at.saturating_add(policy.window_ms) > now)
            .count();
        recent >= policy.max_preemptions as usize
    }

    /// The victims for `ask` over every node of `index`, if any set makes
    /// it fit; records them as taken.
    pub fn choose(&mut self, index: &FreeIndex<'_>, ask: &Ask<'_>) -> Option<Preemption> {
        let job = ask.job;
        let pressure = DiskPressureChecker::new(&self.snapshot.policy);
        let mut best: Option<Choice> = None;
        for n in 0..index.nodes().len() as u32 {
            let slot = index.node(n);
            let view = slot.view;
            if self.nodes_taken.contains(view.name.as_str())
                || !LabelChecker::matches(view, &job.constraints.labels)
                || (pressure.applies_to(job.kind) && pressure.blocks(view, job.kind))
            {
                continue;
            }
            let Some(running) = self.by_node.get(view.name.as_str()) else {
                continue;
            };
            let mut candidates: Vec<&RunningJob> = running
                .iter()
                .copied()
                .filter(|v| {
                    v.priority < job.priority
                        && v.preemptible
                        && !self.taken.contains(&v.id)
                        && !job.preempted_by.contains(&v.id)
                        && !self.protected(v)
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            candidates.sort_by_key(|v| (v.priority, std::cmp::Reverse(v.started_at_ms), v.id));
            // Nothing on this node fits even with every candidate gone.
            if !fits(index, n, ask, &candidates) {
                continue;
            }
            if let Some(choice) = self.best_on(index, n, ask, &candidates)
                && best.as_ref().is_none_or(|b| choice < *b)
            {
                best = Some(choice);
            }
        }
        let choice = best?;
        self.taken.extend(choice.victims.iter().copied());
        self.nodes_taken.insert(choice.node.clone());
        Some(Preemption {
            job: job.id,
            reason: format!(
                "{} job(s) of priority {} at most, below {}, the fewest that make room on node {}",
                choice.count, choice.top_priority, job.priority, choice.node
            ),
            node: choice.node,
            victims: choice.victims,
        })
    }

    /// The best set on node `n`: the smallest, then by rank.
    fn best_on(
        &self,
        index: &FreeIndex<'_>,
        n: u32,
        ask: &Ask<'_>,
        candidates: &[&RunningJob],
    ) -> Option<Choice> {
        let now = self.snapshot.now_ms;
        let name = &index.node(n).view.name;
        let rank = |set: &[&RunningJob]| Choice {
            count: set.len(),
            top_priority: set.iter().map(|v| v.priority).max().unwrap_or(i32::MIN),
            work_lost: set
                .iter()
                .map(|v| now.saturating_sub(v.started_at_ms))
                .sum(),
            node: name.clone(),
            victims: set.iter().map(|v| v.id).collect(),
        };
        let exact = &candidates[..candidates.len().min(CANDIDATES)];
        for size in 1..=EXACT_UP_TO.min(exact.len()) {
            let mut best: Option<Choice> = None;
            for_each_subset(exact, size, &mut |set| {
                if fits(index, n, ask, set) {
                    let choice = rank(set);
                    if best.as_ref().is_none_or(|b| choice < *b) {
                        best = Some(choice);
                    }
                }
            });
            if best.is_some() {
                return best;
            }
        }
        // Larger sets: candidates in order until it fits.
        (EXACT_UP_TO + 1..=candidates.len())
            .find(|&k| fits(index, n, ask, &candidates[..k]))
            .map(|k| rank(&candidates[..k]))
    }
}

/// Calls `f` with every subset of `items` of `size` elements, in
/// lexicographic order of positions.
fn for_each_subset<'a>(
    items: &[&'a RunningJob],
    size: usize,
    f: &mut dyn FnMut(&[&'a RunningJob]),
) {
    fn go<'a>(
        items: &[&'a RunningJob],
        start: usize,
        size: usize,
        chosen: &mut Vec<&'a RunningJob>,
        f: &mut dyn FnMut(&[&'a RunningJob]),
    ) {
        if chosen.len() == size {
            f(chosen);
            return;
        }
        for i in start..items.len() {
            if items.len() - i < size - chosen.len() {
                break;
            }
            chosen.push(items[i]);
            go(items, i + 1, size, chosen, f);
            chosen.pop();
        }
    }
    go(items, 0, size, &mut Vec::with_capacity(size), f);
}

/// Whether `ask` fits on node `n` once `victims` are gone: their host
/// resources, GPU memory, GPU shares and exclusivity come back.
fn fits(index: &FreeIndex<'_>, n: u32, ask: &Ask<'_>, victims: &[&RunningJob]) -> bool {
    let slot = index.node(n);
    let job = ask.job;
    let mut free = slot.free;
    for v in victims {
        free.cpu_millis += v.cpu_millis;
        free.memory += v.memory;
        free.disk += v.disk;
    }
    if !ResourceChecker::fits(&free, job) {
        return false;
    }
    if ask.gpus == 0 {
        return true;
    }
    let mut usable = 0u32;
    for s in slot.gpus.clone() {
        let gpu = index.gpu(s);
        let Some(view) = slot.view.gpus.iter().find(|g| g.index == gpu.device) else {
            continue;
        };
        if !GpuModelChecker::matches(&view.model, &job.constraints.gpu_models) {
            continue;
        }
        let mut memory = gpu.free;
        let mut jobs = gpu.jobs;
        let mut exclusive = gpu.exclusive;
        for v in victims.iter().filter(|v| v.gpus.contains(&gpu.device)) {
            memory = memory.saturating_add(v.gpu_memory);
            jobs = jobs.saturating_sub(1);
            exclusive &= !v.exclusive_gpu;
        }
        if memory >= ask.need && GpuShareChecker::admits(jobs, exclusive, ask.exclusive) {
            usable += 1;
        }
    }
    usable >= ask.gpus
}
