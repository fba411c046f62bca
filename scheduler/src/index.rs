//! The free-memory index a pass searches instead of scanning every node.
//!
//! Eligible nodes (the state filter passed) are numbered in health order,
//! healthiest first, and their GPUs get consecutive slots. GPUs are grouped
//! into pools by (model, node disk-pressure flag), so a model constraint or
//! the pressure filter drops whole pools. In each pool two ordered sets hold
//! `(free-memory bucket, slot)` keys: GPUs shared by Gantry jobs and idle
//! GPUs (exclusively held GPUs are in neither). A best fit is then the first
//! key at or above the job's bucket that passes the per-node checks: an
//! O(log n) range lookup, and an empty range says at once that nothing fits.
//! Multi-GPU jobs use per-(pool, k) node sets keyed by the k-th largest free
//! memory among a node's usable GPUs, built on first use in a pass.
//!
//! Every reservation updates the keys it changes, so later jobs of the same
//! pass see what earlier ones took.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use crate::disk::DiskPressureChecker;
use crate::filter::{
    GpuModelChecker, GpuShareChecker, HostFree, LabelChecker, NodeStateChecker, ResourceChecker,
};
use crate::hash::FxBuild;
use crate::health::HealthScorer;
use crate::model::{ClusterSnapshot, JobRequest, NodeView};
use crate::place::{Ask, Found, Search};

/// One eligible node during a pass.
#[derive(Debug)]
pub(crate) struct NodeSlot<'s> {
    pub view: &'s NodeView,
    /// Its GPUs' slots, ordered by device index.
    pub gpus: Range<u32>,
    /// Host resources left.
    pub free: HostFree,
    /// Chosen for a member of the gang being placed: its other members
    /// must go elsewhere (set and cleared by [`crate::gang`]).
    pub taken_by_gang: bool,
    /// Below the pass's resource floor: no job of the pass fits, so its
    /// GPUs are in no ordered set.
    pub pruned: bool,
}

/// One GPU during a pass.
#[derive(Debug, Clone)]
pub(crate) struct GpuSlot {
    /// Node number (health rank).
    pub node: u32,
    /// Device index on the node.
    pub device: u32,
    /// Index into the pass's model list.
    pub model: u32,
    /// Effective free memory left.
    pub free: u64,
    /// Gantry jobs holding reservations.
    pub jobs: u32,
    /// Held by an exclusive job, or unhealthy.
    pub exclusive: bool,
    /// Unhealthy: no job, even once its holders are preempted.
    pub unhealthy: bool,
}

/// The two sets a usable GPU can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GpuSet {
    /// Already shared by Gantry jobs: filled first.
    Shared,
    /// No Gantry job: kept for exclusive jobs where possible.
    Idle,
}

impl GpuSlot {
    fn set(&self) -> Option<GpuSet> {
        if !GpuShareChecker::admits(self.jobs, self.exclusive, false) {
            None
        } else if self.jobs == 0 {
            Some(GpuSet::Idle)
        } else {
            Some(GpuSet::Shared)
        }
    }

    fn usable_by(&self, exclusive_job: bool) -> bool {
        GpuShareChecker::admits(self.jobs, self.exclusive, exclusive_job)
    }
}

/// Search direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Least free memory that fits, healthiest node among equals.
    BestFit,
    /// Most free memory (largest batch), healthiest node among equals.
    MostFree,
}

/// One search: at least `need` free per GPU, in direction `dir`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query {
    pub need: u64,
    pub dir: Dir,
}

/// Which nodes a search may look at.
#[derive(Debug, Clone)]
pub(crate) enum Restrict {
    /// Use the ordered indexes.
    All,
    /// Scan these nodes (health order): a rare label, or the full-scan oracle.
    Nodes(Vec<u32>),
    /// A wanted label no eligible node has.
    Nothing,
}

#[derive(Debug)]
struct Multi {
    exclusive: bool,
    k: u32,
    /// Only nodes with this group value (table, value): a gang kept within
    /// one label value searches a set of its own instead of skipping the
    /// other values' nodes key by key.
    group: Option<Group>,
    set: BTreeSet<u128>,
}

/// A label value of a group table: (table, value id).
pub(crate) type Group = (u32, u32);

/// One label's values across the eligible nodes, built on first use in a
/// pass, so gang members compare value ids instead of strings.
#[derive(Debug)]
struct GroupTable<'s> {
    label: String,
    /// Distinct values in name order ("" = nodes without the label).
    values: Vec<&'s str>,
    /// Each node's value id.
    of_node: Vec<u32>,
}

#[derive(Debug)]
struct Pool {
    model: u32,
    pressured: bool,
    shared: BTreeSet<u128>,
    idle: BTreeSet<u128>,
    /// Nodes with GPUs in this pool, health order (pruned ones included
    /// once pruned during the pass).
    nodes: Vec<u32>,
    multi: Vec<Multi>,
}

impl Pool {
    fn set(&self, set: GpuSet) -> &BTreeSet<u128> {
        match set {
            GpuSet::Shared => &self.shared,
            GpuSet::Idle => &self.idle,
        }
    }

    fn set_mut(&mut self, set: GpuSet) -> &mut BTreeSet<u128> {
        match set {
            GpuSet::Shared => &mut self.shared,
            GpuSet::Idle => &mut self.idle,
        }
    }
}

/// The pass's view of the fleet: eligible nodes, their GPUs, and the
/// ordered indexes over them.
#[derive(Debug)]
pub(crate) struct FreeIndex<'s> {
    pub snapshot: &'s ClusterSnapshot,
    pub pressure: DiskPressureChecker<'s>,
    /// The least host resources any job of the pass asks.
    floor: HostFree,
    /// Nodes pruned in this pass (health order at build, then in the
    /// order they were pruned): a search that ignores host resources (the
    /// reason finder's) also scans these, as they are in no set.
    pruned: Vec<u32>,
    granularity: u64,
    nodes: Vec<NodeSlot<'s>>,
    gpus: Vec<GpuSlot>,
    pub models: Vec<&'s str>,
    pools: Vec<Pool>,
    /// (label, value) -> nodes carrying it, health order; each built on
    /// first use in the pass (a handful of wanted labels per pass).
    labels: HashMap<(&'s str, &'s str), Vec<u32>, FxBuild>,
    /// (label, value) pairs no eligible node carries, looked up this pass.
    absent: Vec<(String, String)>,
    /// Label value tables for gangs' `same_label`.
    groups: Vec<GroupTable<'s>>,
    /// The pools of the current search, kept between searches.
    pool_buffer: Vec<usize>,
}

fn key(bucket: u64, id: u32) -> u128 {
    (u128::from(bucket) << 64) | u128::from(id)
}

fn key_bucket(key: u128) -> u64 {
    (key >> 64) as u64
}

fn key_id(key: u128) -> u32 {
    // The low 64 bits hold a u32 id by construction.
    (key & u128::from(u32::MAX)) as u32
}

/// Whether `a` beats `b` in direction `dir`.
fn better(a: u128, b: u128, dir: Dir) -> bool {
    match dir {
        Dir::BestFit => a < b,
        Dir::MostFree => {
            key_bucket(a) > key_bucket(b)
                || (key_bucket(a) == key_bucket(b) && key_id(a) < key_id(b))
        }
    }
}

fn pick(best: &mut Option<u128>, candidate: u128, dir: Dir) {
    if best.is_none_or(|b| better(candidate, b, dir)) {
        *best = Some(candidate);
    }
}

impl<'s> FreeIndex<'s> {
    /// Builds the index for one pass.
    ///
    /// `floor` is the least host resources any job of the queue asks, per
    /// resource: a node left with less than that of one takes no job of
    /// the pass, so its GPUs leave the ordered sets and searches stop
    /// visiting it (see [`FreeIndex::reserve`]).
    pub fn build(snapshot: &'s ClusterSnapshot, floor: HostFree) -> Self {
        let policy = &snapshot.policy;
        let headroom = policy.gpu_headroom;
        let admitted: Vec<&NodeView> = snapshot
            .nodes
            .iter()
            .filter(|n| NodeStateChecker::admits(n, snapshot.now_ms).is_ok())
            .collect();
        let order = HealthScorer::rank(&admitted);
        let (nodes, gpus, models) = Self::slots(&admitted, &order, headroom, &floor);

        let granularity = policy.pack_granularity.max(1);
        let mut pools: Vec<Pool> = (0..models.len() * 2)
            .map(|p| Pool {
                model: (p / 2) as u32,
                pressured: p % 2 == 1,
                shared: BTreeSet::new(),
                idle: BTreeSet::new(),
                nodes: Vec::new(),
                multi: Vec::new(),
            })
            .collect();
        let mut shared: Vec<Vec<u128>> = vec![Vec::new(); pools.len()];
        let mut idle: Vec<Vec<u128>> = vec![Vec::new(); pools.len()];
        for (slot, g) in gpus.iter().enumerate() {
            let node = &nodes[g.node as usize];
            if node.pruned {
                continue;
            }
            let p = pool_id(g.model, node.view.disk_pressure);
            if pools[p].nodes.last() != Some(&g.node) {
                pools[p].nodes.push(g.node);
            }
            let k = key(g.free / granularity, slot as u32);
            match g.set() {
                Some(GpuSet::Shared) => shared[p].push(k),
                Some(GpuSet::Idle) => idle[p].push(k),
                None => {}
            }
        }
        for (p, pool) in pools.iter_mut().enumerate() {
            // Sorted input lets BTreeSet build in bulk.
            shared[p].sort_unstable();
            idle[p].sort_unstable();
            pool.shared = std::mem::take(&mut shared[p]).into_iter().collect();
            pool.idle = std::mem::take(&mut idle[p]).into_iter().collect();
        }

        let pruned = (0..nodes.len() as u32)
            .filter(|&n| nodes[n as usize].pruned)
            .collect();
        FreeIndex {
            snapshot,
            pressure: DiskPressureChecker::new(policy),
            floor,
            pruned,
            granularity,
            nodes,
            gpus,
            models,
            pools,
            labels: HashMap::default(),
            absent: Vec::new(),
            groups: Vec::new(),
            pool_buffer: Vec::new(),
        }
    }

    /// The eligible nodes in health order (`order` ranks `admitted`),
    /// their GPUs in device order, and the GPU models in name order. One
    /// pass over the GPUs: a fleet has a handful of models and a node's
    /// GPUs are mostly of one, so a GPU's model is first compared with the
    /// previous GPU's, and models are numbered as they come, then renumbered
    /// in name order.
    fn slots(
        admitted: &[&'s NodeView],
        order: &[usize],
        headroom: u64,
        floor: &HostFree,
    ) -> (Vec<NodeSlot<'s>>, Vec<GpuSlot>, Vec<&'s str>) {
        let mut models: Vec<&'s str> = Vec::new();
        let mut last: Option<(&'s str, u32)> = None;
        let mut nodes = Vec::with_capacity(order.len());
        let mut gpus = Vec::with_capacity(admitted.iter().map(|n| n.gpus.len()).sum());
        let mut devices: Vec<usize> = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            let view = admitted[i];
            let start = gpus.len() as u32;
            // GPUs come in device order from the agents: sort only when
            // they do not.
            devices.clear();
            if !view.gpus.is_sorted_by_key(|g| g.index) {
                devices.extend(0..view.gpus.len());
                devices.sort_by_key(|&d| view.gpus[d].index);
            }
            for d in 0..view.gpus.len() {
                let g = &view.gpus[if devices.is_empty() { d } else { devices[d] }];
                let model = match last {
                    Some((name, id)) if name == g.model => id,
                    _ => {
                        let id = match models.iter().position(|m| *m == g.model) {
                            Some(id) => id as u32,
                            None => {
                                models.push(g.model.as_str());
                                models.len() as u32 - 1
                            }
                        };
                        last = Some((g.model.as_str(), id));
                        id
                    }
                };
                gpus.push(GpuSlot {
                    node: rank as u32,
                    device: g.index,
                    model,
                    free: g.effective_free(headroom),
                    jobs: g.jobs,
                    // An unhealthy GPU admits no job, like an exclusively held one.
                    exclusive: g.exclusive || g.unhealthy,
                    unhealthy: g.unhealthy,
                });
            }
            let free = HostFree::of(view);
            nodes.push(NodeSlot {
                view,
                gpus: start..gpus.len() as u32,
                free,
                taken_by_gang: false,
                pruned: !ResourceChecker::fits_free(&free, floor),
            });
        }
        // Renumber the models in name order.
        let mut sorted = models.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let renumber: Vec<u32> = models
            .iter()
            .map(|m| sorted.binary_search(m).unwrap_or(0) as u32)
            .collect();
        if renumber.iter().enumerate().any(|(i, &r)| r != i as u32) {
            for g in &mut gpus {
                g.model = renumber[g.model as usize];
            }
        }
        (nodes, gpus, sorted)
    }

    /// The value table of `label` (built on first use): its id and the
    /// number of distinct values, ids in name order.
    pub fn group_table(&mut self, label: &str) -> (u32, u32) {
        if let Some(t) = self.groups.iter().position(|t| t.label == label) {
            return (t as u32, self.groups[t].values.len() as u32);
        }
        // A label has a handful of values: number them as they come (the
        // last one compared first), then renumber them in name order.
        let mut seen: Vec<&'s str> = Vec::new();
        let mut last: Option<(&'s str, u32)> = None;
        let mut of_node: Vec<u32> = self
            .nodes
            .iter()
            .map(|n| {
                let v = LabelChecker::value(n.view, label).unwrap_or("");
                match last {
                    Some((l, id)) if l == v => id,
                    _ => {
                        let id = match seen.iter().position(|s| *s == v) {
                            Some(id) => id as u32,
                            None => {
                                seen.push(v);
                                seen.len() as u32 - 1
                            }
                        };
                        last = Some((v, id));
                        id
                    }
                }
            })
            .collect();
        let mut values = seen.clone();
        values.sort_unstable();
        let renumber: Vec<u32> = seen
            .iter()
            .map(|v| values.binary_search(v).unwrap_or(0) as u32)
            .collect();
        for id in &mut of_node {
            *id = renumber[*id as usize];
        }
        let count = values.len() as u32;
        self.groups.push(GroupTable {
            label: label.to_string(),
            values,
            of_node,
        });
        (self.groups.len() as u32 - 1, count)
    }

    /// For a job with wanted labels, the group of its first one: searches
    /// then turn away other values' nodes on a value id, before comparing
    /// label strings (which still decide). `None` without labels, or when
    /// no node has that value.
    pub fn label_group(&mut self, ask: &Ask<'_>) -> Option<Group> {
        let (label, value) = ask.job.constraints.labels.iter().next()?;
        let (table, _) = self.group_table(label);
        let values = &self.groups[table as usize].values;
        let id = values.binary_search(&value.as_str()).ok()?;
        Some((table, id as u32))
    }

    /// The value a group stands for ("" = nodes without the label).
    pub fn group_value(&self, (table, value): Group) -> &'s str {
        self.groups[table as usize].values[value as usize]
    }

    /// Which of the pass's models (by model number) `wanted` accepts.
    pub fn accepted_models(&self, wanted: &[String]) -> Vec<bool> {
        self.models
            .iter()
            .map(|m| GpuModelChecker::matches(m, wanted))
            .collect()
    }

    /// Whether node `n` has at least `k` GPUs of one accepted model, in use
    /// or not.
    pub fn has_gpus(&self, n: u32, accepted: &[bool], k: u32) -> bool {
        if k == 0 {
            return true;
        }
        let slots = &self.gpus
            [self.nodes[n as usize].gpus.start as usize..self.nodes[n as usize].gpus.end as usize];
        slots.iter().enumerate().any(|(i, g)| {
            accepted[g.model as usize]
                // First GPU of its model on the node: count that model.
                && !slots[..i].iter().any(|o| o.model == g.model)
                && slots.iter().filter(|o| o.model == g.model).count() >= k as usize
        })
    }

    fn in_group(&self, n: u32, group: Option<Group>) -> bool {
        group.is_none_or(|(t, v)| self.groups[t as usize].of_node[n as usize] == v)
    }

    /// An eligible node by number.
    pub fn node(&self, n: u32) -> &NodeSlot<'s> {
        &self.nodes[n as usize]
    }

    /// Eligible nodes, health order.
    pub fn nodes(&self) -> &[NodeSlot<'s>] {
        &self.nodes
    }

    /// Marks node `n` as chosen (or no longer chosen) for a member of the
    /// gang being placed.
    pub fn set_taken_by_gang(&mut self, n: u32, taken: bool) {
        self.nodes[n as usize].taken_by_gang = taken;
    }

    /// A GPU by slot.
    pub fn gpu(&self, slot: u32) -> &GpuSlot {
        &self.gpus[slot as usize]
    }

    /// GPU slots of the pass (every eligible node's GPUs).
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    fn bucket(&self, free: u64) -> u64 {
        free / self.granularity
    }

    /// Which nodes a job's search may look at: label postings make rare
    /// labels cheap (scan the few nodes that carry them rather than skip
    /// through the whole index).
    pub fn restriction(&mut self, ask: &Ask<'_>) -> Restrict {
        if ask.search == Search::FullScan {
            return Restrict::Nodes((0..self.nodes.len() as u32).collect());
        }
        let wanted = &ask.job.constraints.labels;
        let group = ask
            .group
            .map(|(t, v)| {
                let table = &self.groups[t as usize];
                (table.label.as_str(), table.values[v as usize])
            })
            .filter(|(_, v)| !v.is_empty());
        // A multi-GPU search kept within a group alone has ordered sets of
        // that group's nodes (`Multi::group`): better than scanning them.
        if wanted.is_empty() && (group.is_none() || ask.gpus >= 2) {
            return Restrict::All;
        }
        let wanted = wanted.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in wanted.clone().chain(group) {
            // Field by field: the group's label borrows `groups`.
            add_postings(
                &self.nodes,
                &self.groups,
                &mut self.labels,
                &mut self.absent,
                k,
                v,
            );
            if !self.labels.contains_key(&(k, v)) {
                return Restrict::Nothing;
            }
        }
        let mut smallest: Option<&Vec<u32>> = None;
        for (k, v) in wanted.chain(group) {
            match self.labels.get(&(k, v)) {
                None => return Restrict::Nothing,
                Some(list) if smallest.is_none_or(|s| list.len() < s.len()) => {
                    smallest = Some(list)
                }
                Some(_) => {}
            }
        }
        match smallest {
            Some(list) if list.len() * 8 < self.nodes.len() => Restrict::Nodes(list.clone()),
            _ => Restrict::All,
        }
    }

    /// Whether the job's node-flag pressure filter drops pressured pools.
    fn skips_pressured(&self, ask: &Ask<'_>) -> bool {
        ask.filters.pressure && self.pressure.uses_node_flag(ask.kind())
    }

    /// Pools whose model the job accepts and whose pressure it tolerates,
    /// written into `out` (cleared first; one buffer per search, not one
    /// allocation per job).
    fn pools_for(&self, ask: &Ask<'_>, out: &mut Vec<usize>) {
        let skip = self.skips_pressured(ask);
        let wanted = &ask.job.constraints.gpu_models;
        out.clear();
        for (m, name) in self.models.iter().enumerate() {
            if GpuModelChecker::matches(name, wanted) {
                out.push(pool_id(m as u32, false));
                if !skip {
                    out.push(pool_id(m as u32, true));
                }
            }
        }
    }

    /// The per-node checks the pools cannot express: host resources,
    /// labels, per-kind disk thresholds.
    pub fn node_ok(&self, n: u32, ask: &Ask<'_>) -> bool {
        let node = &self.nodes[n as usize];
        let job = ask.job;
        // Value ids first: the cheapest test, and the one that turns away
        // most of the nodes a labelled search visits.
        if !self.in_group(n, ask.group) || node.taken_by_gang {
            return false;
        }
        if ask.filters.resources && !ResourceChecker::fits(&node.free, job) {
            return false;
        }
        if !job.constraints.labels.is_empty()
            && !LabelChecker::matches(node.view, &job.constraints.labels)
        {
            return false;
        }
        if ask.filters.pressure
            && !self.pressure.uses_node_flag(job.kind)
            && self.pressure.blocks(node.view, job.kind)
        {
            return false;
        }
        true
    }

    /// For jobs without GPUs: the healthiest node that passes the checks.
    pub fn first_node(&self, ask: &Ask<'_>, restrict: &Restrict) -> Option<u32> {
        let skip = self.skips_pressured(ask);
        let ok =
            |n: u32| !(skip && self.nodes[n as usize].view.disk_pressure) && self.node_ok(n, ask);
        match restrict {
            Restrict::Nothing => None,
            Restrict::All => (0..self.nodes.len() as u32).find(|&n| ok(n)),
            Restrict::Nodes(list) => list.iter().copied().find(|&n| ok(n)),
        }
    }

    /// The best GPUs for `ask` under `query`, or `None`.
    pub fn search(&mut self, ask: &Ask<'_>, query: Query, restrict: &Restrict) -> Option<Found> {
        let mut pools = std::mem::take(&mut self.pool_buffer);
        self.pools_for(ask, &mut pools);
        let found = self.search_pools(ask, query, restrict, &pools);
        self.pool_buffer = pools;
        found
    }

    fn search_pools(
        &mut self,
        ask: &Ask<'_>,
        query: Query,
        restrict: &Restrict,
        pools: &[usize],
    ) -> Option<Found> {
        // Pruned nodes are in no set: a search that ignores host resources
        // scans them besides.
        let extra = (matches!(restrict, Restrict::All)
            && !ask.filters.resources
            && !self.pruned.is_empty())
        .then(|| Restrict::Nodes(self.pruned.clone()));
        if ask.gpus == 1 {
            let sets: &[GpuSet] = if ask.exclusive {
                &[GpuSet::Idle]
            } else {
                &[GpuSet::Shared, GpuSet::Idle]
            };
            let mut best = None;
            for &set in sets {
                for &p in pools {
                    if let Some(k) = self.query_gpu(p, set, ask, query, restrict) {
                        pick(&mut best, k, query.dir);
                    }
                    if let Some(extra) = &extra
                        && let Some(k) = self.query_gpu(p, set, ask, query, extra)
                    {
                        pick(&mut best, k, query.dir);
                    }
                }
                // A fit among shared GPUs beats any idle one, except when
                // looking for the most memory.
                if best.is_some() && query.dir == Dir::BestFit {
                    break;
                }
            }
            let slot = key_id(best?);
            return Some(Found {
                node: self.gpus[slot as usize].node,
                slots: vec![slot],
            });
        }
        let mut best: Option<(u128, usize)> = None;
        for &p in pools {
            let found = [
                self.query_multi(p, ask, query, restrict),
                match &extra {
                    Some(extra) => self.query_multi(p, ask, query, extra),
                    None => None,
                },
            ];
            for k in found.into_iter().flatten() {
                if best.is_none_or(|(b, _)| better(k, b, query.dir)) {
                    best = Some((k, p));
                }
            }
        }
        let (k, p) = best?;
        let node = key_id(k);
        let slots = self.pick_gpus(node, self.pools[p].model, ask, query);
        Some(Found { node, slots })
    }

    fn query_gpu(
        &self,
        p: usize,
        set: GpuSet,
        ask: &Ask<'_>,
        query: Query,
        restrict: &Restrict,
    ) -> Option<u128> {
        let pool = &self.pools[p];
        let need = query.need;
        let fits = |k: &u128| {
            let g = &self.gpus[key_id(*k) as usize];
            g.free >= need && self.node_ok(g.node, ask)
        };
        match restrict {
            Restrict::Nothing => None,
            Restrict::All => {
                let set = pool.set(set);
                let low = key(self.bucket(need), 0);
                match query.dir {
                    Dir::BestFit => set.range(low..).find(|k| fits(k)).copied(),
                    Dir::MostFree => {
                        // The top bucket that fits, then its healthiest node.
                        let top = *set.range(low..).rev().find(|k| fits(k))?;
                        let floor = key(key_bucket(top), 0);
                        set.range(floor..=top).find(|k| fits(k)).copied()
                    }
                }
            }
            Restrict::Nodes(list) => {
                let mut best = None;
                for &n in list {
                    let node = &self.nodes[n as usize];
                    if node.view.disk_pressure != pool.pressured || !self.node_ok(n, ask) {
                        continue;
                    }
                    for slot in node.gpus.clone() {
                        let g = &self.gpus[slot as usize];
                        if g.model == pool.model && g.set() == Some(set) && g.free >= need {
                            pick(&mut best, key(self.bucket(g.free), slot), query.dir);
                        }
                    }
                }
                best
            }
        }
    }

    fn query_multi(
        &mut self,
        p: usize,
        ask: &Ask<'_>,
        query: Query,
        restrict: &Restrict,
    ) -> Option<u128> {
        let (exclusive, k) = (ask.exclusive, ask.gpus);
        let model = self.pools[p].model;
        let need = query.need;
        match restrict {
            Restrict::Nothing => None,
            Restrict::All => {
                let m = self.multi_index(p, exclusive, k, ask.group);
                let set = &self.pools[p].multi[m].set;
                let fits = |key: &u128| {
                    let n = key_id(*key);
                    self.kth_free(n, model, exclusive, k)
                        .is_some_and(|f| f >= need)
                        && self.node_ok(n, ask)
                };
                let low = key(self.bucket(need), 0);
                match query.dir {
                    Dir::BestFit => set.range(low..).find(|k| fits(k)).copied(),
                    Dir::MostFree => {
                        let top = *set.range(low..).rev().find(|k| fits(k))?;
                        let floor = key(key_bucket(top), 0);
                        set.range(floor..=top).find(|k| fits(k)).copied()
                    }
                }
            }
            Restrict::Nodes(list) => {
                let pressured = self.pools[p].pressured;
                let mut best = None;
                for &n in list {
                    if self.nodes[n as usize].view.disk_pressure != pressured
                        || !self.node_ok(n, ask)
                    {
                        continue;
                    }
                    if let Some(f) = self.kth_free(n, model, exclusive, k)
                        && f >= need
                    {
                        pick(&mut best, key(self.bucket(f), n), query.dir);
                    }
                }
                best
            }
        }
    }

    /// The k-GPU node set of pool `p`, built on first use in the pass.
    fn multi_index(&mut self, p: usize, exclusive: bool, k: u32, group: Option<Group>) -> usize {
        if let Some(m) = self.pools[p]
            .multi
            .iter()
            .position(|m| m.exclusive == exclusive && m.k == k && m.group == group)
        {
            return m;
        }
        let model = self.pools[p].model;
        let mut keys: Vec<u128> = self.pools[p]
            .nodes
            .iter()
            .filter(|&&n| !self.nodes[n as usize].pruned && self.in_group(n, group))
            .filter_map(|&n| {
                let f = self.kth_free(n, model, exclusive, k)?;
                Some(key(self.bucket(f), n))
            })
            .collect();
        keys.sort_unstable();
        self.pools[p].multi.push(Multi {
            exclusive,
            k,
            group,
            set: keys.into_iter().collect(),
        });
        self.pools[p].multi.len() - 1
    }

    /// The k-th largest free memory among node `n`'s GPUs of `model` that an
    /// (exclusive) job may use: the most each of k GPUs there can offer.
    fn kth_free(&self, n: u32, model: u32, exclusive: bool, k: u32) -> Option<u64> {
        let k = k as usize;
        let usable = self.nodes[n as usize]
            .gpus
            .clone()
            .map(|s| &self.gpus[s as usize])
            .filter(|g| g.model == model && g.usable_by(exclusive))
            .map(|g| g.free);
        // Nodes have a handful of GPUs: select on the stack, not the heap
        // (this runs for every key a multi-GPU search visits).
        let mut small = [0u64; 32];
        let mut len = 0;
        let mut spill = Vec::new();
        for free in usable {
            if len < small.len() {
                small[len] = free;
                len += 1;
            } else {
                spill.push(free);
            }
        }
        let frees: &mut [u64] = if spill.is_empty() {
            &mut small[..len]
        } else {
            spill.extend_from_slice(&small);
            &mut spill
        };
        if k == 0 || frees.len() < k {
            return None;
        }
        let (_, kth, _) = frees.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        Some(*kth)
    }

    /// The k GPUs to take on the chosen node: best fit picks the tightest
    /// (shared ones first for shareable jobs), most-free the roomiest.
    fn pick_gpus(&self, n: u32, model: u32, ask: &Ask<'_>, query: Query) -> Vec<u32> {
        let mut slots: Vec<u32> = self.nodes[n as usize]
            .gpus
            .clone()
            .filter(|&s| {
                let g = &self.gpus[s as usize];
                g.model == model && g.usable_by(ask.exclusive) && g.free >= query.need
            })
            .collect();
        match query.dir {
            Dir::BestFit => slots.sort_by_key(|&s| {
                let g = &self.gpus[s as usize];
                (g.set() != Some(GpuSet::Shared), g.free, s)
            }),
            Dir::MostFree => {
                slots.sort_by_key(|&s| (std::cmp::Reverse(self.gpus[s as usize].free), s))
            }
        }
        slots.truncate(ask.gpus as usize);
        slots
    }

    /// Reserves `reserve` bytes on each of `slots` (on node `n`) and the
    /// job's host resources, updating every key that changes.
    pub fn reserve(
        &mut self,
        n: u32,
        slots: &[u32],
        reserve: u64,
        exclusive: bool,
        job: &JobRequest,
    ) {
        self.nodes[n as usize].free.take(job);
        let Some(&first) = slots.first() else {
            return;
        };
        let model = self.gpus[first as usize].model;
        let p = pool_id(model, self.nodes[n as usize].view.disk_pressure);
        // Sets of other group values do not hold this node.
        let before: Vec<Option<Option<u64>>> = self.pools[p]
            .multi
            .iter()
            .map(|m| {
                self.in_group(n, m.group)
                    .then(|| self.kth_free(n, model, m.exclusive, m.k))
            })
            .collect();
        for &slot in slots {
            let g = &self.gpus[slot as usize];
            let (old_key, old_set) = (key(self.bucket(g.free), slot), g.set());
            if let Some(set) = old_set {
                self.pools[p].set_mut(set).remove(&old_key);
            }
            let g = &mut self.gpus[slot as usize];
            g.free = g.free.saturating_sub(reserve);
            g.jobs += 1;
            g.exclusive |= exclusive;
            let g = &self.gpus[slot as usize];
            let (new_key, new_set) = (key(self.bucket(g.free), slot), g.set());
            if let Some(set) = new_set {
                self.pools[p].set_mut(set).insert(new_key);
            }
        }
        for (m, old) in before.into_iter().enumerate() {
            let Some(old) = old else {
                continue;
            };
            let (me, k) = (self.pools[p].multi[m].exclusive, self.pools[p].multi[m].k);
            let new = self.kth_free(n, model, me, k);
            if new == old {
                continue;
            }
            let set = &mut self.pools[p].multi[m].set;
            if let Some(f) = old {
                set.remove(&key(f / self.granularity, n));
            }
            if let Some(f) = new {
                set.insert(key(f / self.granularity, n));
            }
        }
        if !ResourceChecker::fits_free(&self.nodes[n as usize].free, &self.floor) {
            self.prune(n);
        }
    }

    /// Takes node `n`'s GPUs out of every ordered set: no job of the pass
    /// fits its host resources any more.
    fn prune(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        node.pruned = true;
        self.pruned.push(n);
        let pressured = node.view.disk_pressure;
        for slot in node.gpus.clone() {
            let g = &self.gpus[slot as usize];
            let p = pool_id(g.model, pressured);
            if let Some(set) = g.set() {
                let k = key(self.bucket(g.free), slot);
                self.pools[p].set_mut(set).remove(&k);
            }
        }
        let mut models: Vec<u32> = Vec::new();
        for slot in self.nodes[n as usize].gpus.clone() {
            let model = self.gpus[slot as usize].model;
            if !models.contains(&model) {
                models.push(model);
            }
        }
        for model in models {
            let p = pool_id(model, pressured);
            for m in 0..self.pools[p].multi.len() {
                let multi = &self.pools[p].multi[m];
                if !self.in_group(n, multi.group) {
                    continue;
                }
                if let Some(f) = self.kth_free(n, model, multi.exclusive, multi.k) {
                    let k = key(self.bucket(f), n);
                    self.pools[p].multi[m].set.remove(&k);
                }
            }
        }
    }
}

/// Adds to `labels` the nodes carrying `label` = `value` (as
/// [`LabelChecker::value`] reads it), health order, unless there already;
/// to `absent` when no node does.
fn add_postings<'s>(
    nodes: &[NodeSlot<'s>],
    groups: &[GroupTable<'s>],
    labels: &mut HashMap<(&'s str, &'s str), Vec<u32>, FxBuild>,
    absent: &mut Vec<(String, String)>,
    label: &str,
    value: &str,
) {
    if labels.contains_key(&(label, value)) || absent.iter().any(|(l, v)| l == label && v == value)
    {
        return;
    }
    // The key borrows the snapshot, as the map does: the label's name as
    // the first node carrying it spells it.
    let mut key = None;
    let mut list = Vec::new();
    // The label's value table, when built, already read every node's
    // value ("" there also stands for nodes without the label).
    let table = groups
        .iter()
        .find(|t| t.label == label && !value.is_empty())
        .map(|t| (t, t.values.binary_search(&value).ok()));
    for (n, node) in nodes.iter().enumerate() {
        let view = node.view;
        let carries = match table {
            Some((_, None)) => break,
            Some((t, Some(id))) => t.of_node[n] == id as u32,
            None => LabelChecker::value(view, label) == Some(value),
        };
        if !carries {
            continue;
        }
        list.push(n as u32);
        if key.is_none()
            && let Some(v) = LabelChecker::value(view, label)
        {
            let name = view
                .labels
                .get_key_value(label)
                .map_or("provider", |(k, _)| k.as_str());
            key = Some((name, v));
        }
    }
    match key {
        Some(key) => {
            labels.insert(key, list);
        }
        None => absent.push((label.to_string(), value.to_string())),
    }
}

fn pool_id(model: u32, pressured: bool) -> usize {
    model as usize * 2 + usize::from(pressured)
}
