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
use crate::filter::{GpuShareChecker, HostFree, LabelChecker, ResourceChecker};
use crate::hash::FxBuild;
use crate::index::FreeIndex;
use crate::model::{ClusterSnapshot, JobId, Preemption, RunningJob};
use crate::place::{Ask, Search};

/// Largest victim set searched exhaustively.
const EXACT_UP_TO: usize = 4;
/// Candidates per node considered (bounds the search per node).
const CANDIDATES: usize = 12;

/// The pass's preemption state: possible victims by eligible node, victims
/// taken.
pub(crate) struct Preemptor<'s> {
    snapshot: &'s ClusterSnapshot,
    /// By the index's node number: the preemptible, unprotected running
    /// jobs there, put in victim order (lowest priority, then most recent)
    /// when the search first looks at them (`sorted`): most nodes never
    /// get that far.
    by_node: Vec<Vec<&'s RunningJob>>,
    sorted: Vec<bool>,
    /// By node number: the first of its jobs in victim order.
    heads: Vec<Option<&'s RunningJob>>,
    /// Victims chosen earlier in this pass, and nodes preempted on.
    taken: BTreeSet<JobId>,
    nodes_taken: Vec<bool>,
    /// Lowest priority of any preemptible running job: a job at or below
    /// it cannot preempt anything, checked before any search.
    floor: Option<i32>,
    /// Nodes with possible victims in order of the best set they could
    /// offer at most ([`Preemptor::bound`]), built on the first indexed
    /// search: a search stops at the first node whose bound cannot beat
    /// a one-victim set already found.
    ordered: Option<Vec<u32>>,
    /// What every node gets back once all its possible victims below a
    /// priority are gone, by that priority (built on first use).
    released: Vec<(i32, Released)>,
}

/// What the possible victims below one priority hold, summed: per node
/// their host resources, per GPU slot their memory, their count and
/// whether one holds it exclusively. The job fits nowhere they do not
/// make room, so a node fails the search before any set is tried.
struct Released {
    host: Vec<HostFree>,
    /// Per GPU slot of the index: (memory, jobs, an exclusive holder).
    gpus: Vec<(u64, u32, bool)>,
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
    pub fn new(snapshot: &'s ClusterSnapshot, index: &FreeIndex<'_>) -> Self {
        let numbers: HashMap<&str, usize, FxBuild> = index
            .nodes()
            .iter()
            .enumerate()
            .map(|(n, slot)| (slot.view.name.as_str(), n))
            .collect();
        let mut by_node: Vec<Vec<&'s RunningJob>> = vec![Vec::new(); numbers.len()];
        let mut heads: Vec<Option<&'s RunningJob>> = vec![None; numbers.len()];
        let mut floor = None;
        // Running jobs come grouped by node more often than not: the last
        // name looked up is checked before hashing.
        let mut last: Option<(&str, Option<usize>)> = None;
        for job in &snapshot.running {
            if !job.preemptible || protected(snapshot, job) {
                continue;
            }
            let number = match last {
                Some((name, n)) if name == job.node => n,
                _ => numbers.get(job.node.as_str()).copied(),
            };
            last = Some((job.node.as_str(), number));
            if let Some(n) = number {
                floor = Some(floor.map_or(job.priority, |f: i32| f.min(job.priority)));
                by_node[n].push(job);
                if heads[n].is_none_or(|h| victim_order(job) < victim_order(h)) {
                    heads[n] = Some(job);
                }
            }
        }
        Preemptor {
            snapshot,
            nodes_taken: vec![false; by_node.len()],
            sorted: vec![false; by_node.len()],
            heads,
            by_node,
            taken: BTreeSet::new(),
            floor,
            ordered: None,
            released: Vec::new(),
        }
    }

    /// Whether some job with these properties could preempt at all,
    /// without building a [`Preemptor`]: the lowest priority of any
    /// preemptible, unprotected running job, wherever it runs (a bound of
    /// [`Preemptor::worth_trying`]'s floor, which counts eligible nodes
    /// only).
    pub fn lowest_victim_priority(snapshot: &ClusterSnapshot) -> Option<i32> {
        snapshot
            .running
            .iter()
            .filter(|j| j.preemptible && !protected(snapshot, j))
            .map(|j| j.priority)
            .min()
    }

    /// Whether `ask`'s job could preempt anything at all.
    pub fn worth_trying(&self, ask: &Ask<'_>) -> bool {
        self.snapshot.policy.preemption.enabled
            && ask.job.held_node.is_none()
            // A gang needs N nodes at once; one node's victims never fit it.
            && ask.job.gang.is_none()
            && self.floor.is_some_and(|f| ask.job.priority > f)
    }

    /// Puts node `n`'s possible victims in victim order (once).
    fn sort_victims(&mut self, n: u32) {
        let n = n as usize;
        if !self.sorted[n] {
            self.by_node[n].sort_unstable_by_key(|v| victim_order(v));
            self.sorted[n] = true;
        }
    }

    /// The least any set on node `n` can rank: one victim, its lowest
    /// priority, the least work lost at that priority, the node's name.
    /// Every [`Choice`] there is at least this (the victims list aside).
    fn bound(&self, index: &FreeIndex<'s>, n: u32) -> Option<(i32, u64, &'s str)> {
        let first = self.heads[n as usize]?;
        let lost = self.snapshot.now_ms.saturating_sub(first.started_at_ms);
        Some((first.priority, lost, index.node(n).view.name.as_str()))
    }

    /// The nodes with possible victims, by [`Preemptor::bound`].
    fn ordered(&mut self, index: &FreeIndex<'s>) -> Vec<u32> {
        if let Some(order) = self.ordered.take() {
            return order;
        }
        let mut keyed: Vec<((i32, u64, &'s str), u32)> = (0..self.by_node.len() as u32)
            .filter_map(|n| Some((self.bound(index, n)?, n)))
            .collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, n)| n).collect()
    }

    /// The index into `released` of what goes once every possible victim
    /// below `priority` is gone, summed on first use.
    fn released(&mut self, index: &FreeIndex<'_>, priority: i32) -> usize {
        if let Some(r) = self.released.iter().position(|(p, _)| *p == priority) {
            return r;
        }
        let nodes = index.nodes();
        let mut host = vec![HostFree::default(); nodes.len()];
        let mut gpus = vec![(0u64, 0u32, false); index.gpu_count()];
        for (n, running) in self.by_node.iter().enumerate() {
            let slots = nodes[n].gpus.clone();
            // Slots are in device order: distinct devices strictly increase.
            let distinct = slots
                .clone()
                .zip(slots.clone().skip(1))
                .all(|(a, b)| index.gpu(a).device < index.gpu(b).device);
            for v in running.iter().filter(|v| v.priority < priority) {
                let h = &mut host[n];
                h.cpu_millis += v.cpu_millis;
                h.memory += v.memory;
                h.disk += v.disk;
                let mut add = |s: u32| {
                    let g = &mut gpus[s as usize];
                    g.0 = g.0.saturating_add(v.gpu_memory);
                    g.1 += 1;
                    g.2 |= v.exclusive_gpu;
                };
                // A one-GPU victim where devices are distinct and numbered
                // from 0 (the usual node): its slot without a search.
                let direct = match v.gpus.as_slice() {
                    [d] if distinct => slots
                        .clone()
                        .nth(*d as usize)
                        .filter(|&s| index.gpu(s).device == *d),
                    _ => None,
                };
                match direct {
                    Some(s) => add(s),
                    None => slots
                        .clone()
                        .filter(|&s| v.gpus.contains(&index.gpu(s).device))
                        .for_each(add),
                }
            }
        }
        self.released.push((priority, Released { host, gpus }));
        self.released.len() - 1
    }

    /// The victims for `ask` over every node of `index`, if any set makes
    /// it fit; records them as taken.
    pub fn choose(&mut self, index: &FreeIndex<'s>, ask: &Ask<'_>) -> Option<Preemption> {
        let job = ask.job;
        let pressure = DiskPressureChecker::new(&self.snapshot.policy);
        let accepted = index.accepted_models(&job.constraints.gpu_models);
        let fit = Fit {
            index,
            ask,
            accepted: &accepted,
        };
        // The full-scan oracle visits every node in index order; the
        // indexed search visits them by bound and stops early.
        let order = match ask.search {
            Search::Indexed => self.ordered(index),
            Search::FullScan => (0..self.by_node.len() as u32).collect(),
        };
        let released = (ask.search == Search::Indexed).then(|| self.released(index, job.priority));
        let mut best: Option<(u32, Choice)> = None;
        // One buffer for every node's candidates.
        let mut candidates: Vec<&RunningJob> = Vec::new();
        for &n in &order {
            // The first in victim order is the least important.
            if self.heads[n as usize].is_none_or(|v| v.priority >= job.priority)
                || self.nodes_taken[n as usize]
            {
                continue;
            }
            if ask.search == Search::Indexed
                && let Some((_, b)) = &best
                && b.count == 1
                && let Some((p, lost, name)) = self.bound(index, n)
                && (b.top_priority, b.work_lost, b.node.as_str()) < (p, lost, name)
            {
                // This node's sets, and every later node's, rank below.
                break;
            }
            let slot = index.node(n);
            let view = slot.view;
            // Nodes without enough GPUs of an accepted model are no
            // candidates whatever runs there.
            if !index.has_gpus(n, &accepted, ask.gpus)
                || !LabelChecker::matches(view, &job.constraints.labels)
                || (pressure.applies_to(job.kind) && pressure.blocks(view, job.kind))
            {
                continue;
            }
            // Every lower-priority job gone, before any is filtered out: if
            // the job does not fit then, no subset makes it fit. (The
            // full scan adds them up here, the indexed search reads the
            // sums.)
            let lower =
                |running: &[&RunningJob]| running.partition_point(|v| v.priority < job.priority);
            let room = match released {
                Some(r) => fit.fits_released(n, &self.released[r].1),
                None => {
                    self.sort_victims(n);
                    let running = &self.by_node[n as usize];
                    fit.fits(n, &running[..lower(running)])
                }
            };
            if !room {
                continue;
            }
            self.sort_victims(n);
            let running = &self.by_node[n as usize];
            candidates.clear();
            candidates.extend(
                running
                    .iter()
                    .copied()
                    .take_while(|v| v.priority < job.priority)
                    .filter(|v| !self.taken.contains(&v.id) && !job.preempted_by.contains(&v.id)),
            );
            if candidates.is_empty() {
                continue;
            }
            // Nothing on this node fits even with every candidate gone
            // (the same test as above when none was filtered out).
            if candidates.len() < lower(running) && !fit.fits(n, &candidates) {
                continue;
            }
            // A set larger than the best so far cannot win (fewest first).
            let most = best.as_ref().map_or(usize::MAX, |(_, b)| b.count);
            if let Some(choice) = self.best_on(&fit, n, &candidates, most)
                && best.as_ref().is_none_or(|(_, b)| choice < *b)
            {
                best = Some((n, choice));
            }
        }
        if ask.search == Search::Indexed {
            self.ordered = Some(order);
        }
        let (n, choice) = best?;
        self.taken.extend(choice.victims.iter().copied());
        self.nodes_taken[n as usize] = true;
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

    /// The best set on node `n` of at most `most` jobs: the smallest, then
    /// by rank.
    fn best_on(
        &self,
        fit: &Fit<'_, '_>,
        n: u32,
        candidates: &[&RunningJob],
        most: usize,
    ) -> Option<Choice> {
        let index = fit.index;
        let now = self.snapshot.now_ms;
        // A set's rank on this node (the node name is the same for all):
        // priority at most, work lost, then the ids.
        let key = |set: &[&RunningJob]| {
            (
                set.iter().map(|v| v.priority).max().unwrap_or(i32::MIN),
                set.iter()
                    .map(|v| now.saturating_sub(v.started_at_ms))
                    .sum::<u64>(),
            )
        };
        let ids = |set: &[&RunningJob]| set.iter().map(|v| v.id).collect::<Vec<JobId>>();
        let choice = |set: &[&RunningJob]| {
            let (top_priority, work_lost) = key(set);
            Choice {
                count: set.len(),
                top_priority,
                work_lost,
                node: index.node(n).view.name.clone(),
                victims: ids(set),
            }
        };
        let exact = &candidates[..candidates.len().min(CANDIDATES)];
        let mut chosen: Vec<&RunningJob> = Vec::with_capacity(EXACT_UP_TO);
        for size in 1..=EXACT_UP_TO.min(exact.len()).min(most) {
            let mut best: Option<(i32, u64)> = None;
            for_each_subset(exact, size, &mut |set| {
                // Rank first (cheap), then the fit test, for sets that
                // would beat the best so far.
                let k = key(set);
                let better = best.is_none_or(|b| {
                    k < b || (k == b && set.iter().map(|v| v.id).lt(chosen.iter().map(|v| v.id)))
                });
                if better && fit.fits(n, set) {
                    best = Some(k);
                    chosen.clear();
                    chosen.extend_from_slice(set);
                }
            });
            if best.is_some() {
                return Some(choice(&chosen));
            }
        }
        // Larger sets: candidates in order until it fits.
        (EXACT_UP_TO + 1..=candidates.len().min(most))
            .find(|&k| fit.fits(n, &candidates[..k]))
            .map(|k| choice(&candidates[..k]))
    }
}

/// Victim order: lowest priority first, then the most recently started,
/// then by id.
fn victim_order(job: &RunningJob) -> (i32, std::cmp::Reverse<u64>, JobId) {
    (job.priority, std::cmp::Reverse(job.started_at_ms), job.id)
}

/// Whether a running job is protected from preemption: preempted
/// `max_preemptions` times within the starvation window before now.
fn protected(snapshot: &ClusterSnapshot, job: &RunningJob) -> bool {
    let policy = &snapshot.policy.preemption;
    let recent = job
        .preempted_at_ms
        .iter()
        .filter(|&&at| at.saturating_add(policy.window_ms) > snapshot.now_ms)
        .count();
    recent >= policy.max_preemptions as usize
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

/// What a fit test reads: the index, the job, and the models it accepts
/// (by model number, computed once per search).
struct Fit<'a, 'q> {
    index: &'a FreeIndex<'a>,
    ask: &'a Ask<'q>,
    accepted: &'a [bool],
}

impl Fit<'_, '_> {
    /// [`Fit::fits`] with every possible victim below the job's priority
    /// gone, from their sums: the same answer, without visiting them.
    fn fits_released(&self, n: u32, released: &Released) -> bool {
        self.fits_after(n, released.host[n as usize], |slot, _| {
            released.gpus[slot as usize]
        })
    }

    /// Whether the job fits on node `n` once `victims` are gone: their
    /// host resources, GPU memory, GPU shares and exclusivity come back.
    fn fits(&self, n: u32, victims: &[&RunningJob]) -> bool {
        let mut back = HostFree::default();
        for v in victims {
            back.cpu_millis += v.cpu_millis;
            back.memory += v.memory;
            back.disk += v.disk;
        }
        self.fits_after(n, back, |_, device| {
            victims.iter().filter(|v| v.gpus.contains(&device)).fold(
                (0u64, 0u32, false),
                |(memory, jobs, exclusive), v| {
                    (
                        memory.saturating_add(v.gpu_memory),
                        jobs + 1,
                        exclusive || v.exclusive_gpu,
                    )
                },
            )
        })
    }

    /// The one fit test of both: node `n`'s free host resources plus
    /// `back`, and per usable GPU what `released(slot, device)` gives back
    /// (GPU memory, jobs leaving, whether an exclusive holder leaves).
    fn fits_after(
        &self,
        n: u32,
        back: HostFree,
        released: impl Fn(u32, u32) -> (u64, u32, bool),
    ) -> bool {
        let (index, ask) = (self.index, self.ask);
        let slot = index.node(n);
        let free = HostFree {
            cpu_millis: slot.free.cpu_millis + back.cpu_millis,
            memory: slot.free.memory + back.memory,
            disk: slot.free.disk + back.disk,
        };
        if !ResourceChecker::fits(&free, ask.job) {
            return false;
        }
        if ask.gpus == 0 {
            return true;
        }
        let mut usable = 0u32;
        for s in slot.gpus.clone() {
            let gpu = index.gpu(s);
            if gpu.unhealthy || !self.accepted[gpu.model as usize] {
                continue;
            }
            let (memory, jobs, exclusive_victim) = released(s, gpu.device);
            let memory = gpu.free.saturating_add(memory);
            let jobs = gpu.jobs.saturating_sub(jobs);
            let exclusive = gpu.exclusive && !exclusive_victim;
            if memory >= ask.need && GpuShareChecker::admits(jobs, exclusive, ask.exclusive) {
                usable += 1;
            }
        }
        usable >= ask.gpus
    }
}
