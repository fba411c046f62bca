//! A scheduling pass: order the queue, then for each job filter, score and
//! select through the free-memory index, reserve, and record a reason for
//! every job left waiting.
//!
//! Selection (lexicographic, best first):
//! 1. for shareable jobs, a GPU other jobs already share beats an idle one
//!    (fill partly used GPUs first, keep whole GPUs free for training);
//! 2. bin-packing: the least effective free memory that still fits, in
//!    steps of `Policy::pack_granularity`;
//! 3. node health: fewer recent failures, then lower RTT;
//! 4. node name, then device index (the deterministic tie-break).
//!
//! `prefer_largest` jobs first look for a GPU that gives their largest
//! batch (best fit among those), else take the GPU with the most memory.
//! Multi-GPU jobs take GPUs of one model on one node.

use std::collections::{BTreeMap, HashMap};

use crate::batch::{BatchChoice, choose_batch, free_for_largest, min_free_needed};
use crate::disk::FleetPressure;
use crate::explain::explain;
use crate::filter::{HostFree, LockChecker};
use crate::hash::FxBuild;
use crate::index::{Dir, FreeIndex, Query, Restrict};
use crate::model::{
    ClusterSnapshot, HoldReason, JobId, JobKind, JobRequest, LockMode, Placement, Plan, Unplaced,
};
use crate::order::queue_order;
use crate::preempt::Preemptor;

/// How a pass searches for candidates. Both give the same plan; the full
/// scan exists as the test oracle for the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Search {
    /// Ordered indexes by free memory, updated as the pass assigns:
    /// near O(log n) per job.
    #[default]
    Indexed,
    /// Evaluate every eligible node for every job: O(n) per job.
    FullScan,
}

/// Runs one scheduling pass over `queue` against `snapshot`. Deterministic:
/// the same input gives the same plan, whatever the order of
/// `snapshot.nodes`. Every job of `queue` appears exactly once, in
/// `placements` or in `unplaced`.
pub fn plan(snapshot: &ClusterSnapshot, queue: &[JobRequest]) -> Plan {
    plan_with(snapshot, queue, Search::Indexed)
}

/// [`plan`] with an explicit search strategy.
pub fn plan_with(snapshot: &ClusterSnapshot, queue: &[JobRequest], search: Search) -> Plan {
    if snapshot.nodes.iter().any(|n| n.held_for.is_some()) {
        return plan_with_holds(snapshot, queue, search);
    }
    plan_pass(snapshot, queue, search)
}

/// A pass while some nodes' capacity is held for the jobs that preempted
/// there: each such job is planned first, on its node alone; the rest of
/// the queue never sees those nodes.
fn plan_with_holds(snapshot: &ClusterSnapshot, queue: &[JobRequest], search: Search) -> Plan {
    let mut rest = ClusterSnapshot {
        now_ms: snapshot.now_ms,
        nodes: Vec::with_capacity(snapshot.nodes.len()),
        locks: snapshot.locks.clone(),
        policy: snapshot.policy.clone(),
        running: snapshot.running.clone(),
        queue_usage: snapshot.queue_usage.clone(),
    };
    let mut held: HashMap<&str, &crate::model::NodeView, FxBuild> = HashMap::default();
    for node in &snapshot.nodes {
        match node.held_for {
            Some(_) => {
                held.insert(node.name.as_str(), node);
            }
            None => rest.nodes.push(node.clone()),
        }
    }
    let mut out = Plan::default();
    let mut others = Vec::with_capacity(queue.len());
    for job in queue {
        let own = job
            .held_node
            .as_deref()
            .and_then(|n| held.get(n))
            .filter(|n| n.held_for == Some(job.id));
        let Some(node) = own else {
            others.push(job.clone());
            continue;
        };
        let mut alone = ClusterSnapshot {
            now_ms: snapshot.now_ms,
            nodes: vec![(*node).clone()],
            locks: rest.locks.clone(),
            policy: snapshot.policy.clone(),
            running: Vec::new(),
            queue_usage: snapshot.queue_usage.clone(),
        };
        alone.nodes[0].held_for = None;
        let mine = plan_pass(&alone, std::slice::from_ref(job), search);
        for placement in &mine.placements {
            // The rest of the pass sees the locks it took.
            for request in &job.locks {
                let holders = rest.locks.entry(request.name.clone()).or_default();
                match request.mode {
                    LockMode::Exclusive => holders.exclusive = Some(job.id),
                    LockMode::Shared => {
                        holders.shared.insert(job.id);
                    }
                }
            }
            out.placements.push(placement.clone());
        }
        for mut unplaced in mine.unplaced {
            if matches!(unplaced.reason, HoldReason::NoFit(_)) {
                unplaced.reason = HoldReason::Preempting {
                    node: node.name.clone(),
                    victims: Vec::new(),
                };
            }
            out.unplaced.push(unplaced);
        }
    }
    let others_plan = plan_pass(&rest, &others, search);
    out.placements.extend(others_plan.placements);
    out.unplaced.extend(others_plan.unplaced);
    out.preemptions.extend(others_plan.preemptions);
    out
}

/// One pass over `queue`, holds aside.
fn plan_pass(snapshot: &ClusterSnapshot, queue: &[JobRequest], search: Search) -> Plan {
    let policy = &snapshot.policy;
    let mut index = FreeIndex::build(snapshot, floor(queue));
    let fleet = FleetPressure::measure(&snapshot.nodes);
    let fleet_pressured = fleet.is_pressured(policy.fleet_pressure_fraction);
    let mut locks = LockChecker::new(&snapshot.locks);
    // Shapes that failed earlier in this pass fail again: the pass only ever
    // takes resources, never frees them. Keyed by everything that decides
    // feasibility; a fixed hasher keeps the pass free of randomness.
    let mut failed: HashMap<Shape<'_>, HoldReason, FxBuild> = HashMap::default();

    let mut gangs = Gangs::of(queue);
    let mut failed_gangs: FailedGangs<'_> = HashMap::default();

    let mut out = Plan::default();
    out.unplaced.reserve(queue.len());
    // The queue index of each `out.unplaced` entry's job, `usize::MAX` for
    // gang members (they never preempt): the preemption step reads the
    // jobs back without a map of the whole queue.
    let mut unplaced_at: Vec<usize> = Vec::new();
    let mut owner = usize::MAX;
    for i in queue_order(queue, policy, &snapshot.queue_usage, fleet_pressured) {
        unplaced_at.resize(out.unplaced.len(), owner);
        let job = &queue[i];
        owner = if job.gang.is_some() { usize::MAX } else { i };
        if let Some(gang) = &job.gang {
            if let Some(members) = gangs.first_visit(gang.id) {
                let pass = GangPass {
                    snapshot,
                    search,
                    fleet: &fleet,
                    fleet_pressured,
                };
                pass.run(
                    &mut index,
                    &mut locks,
                    &mut failed_gangs,
                    queue,
                    &members,
                    gang,
                    &mut out,
                );
            }
            continue;
        }
        let hold = |reason| Unplaced {
            job: job.id,
            reason,
        };
        if out.placements.len() >= policy.max_placements_per_pass {
            out.unplaced.push(hold(HoldReason::PassBudget));
            continue;
        }
        if snapshot.nodes.is_empty() {
            out.unplaced.push(hold(HoldReason::NoNodes));
            continue;
        }
        if let Some(reason) = locks.conflict(job) {
            out.unplaced.push(hold(reason));
            continue;
        }
        if fleet_pressured && job.kind.produces_data() && !job.kind.consumes_data() {
            out.unplaced.push(hold(HoldReason::FleetDiskBackpressure {
                pressured: fleet.pressured,
                nodes: fleet.nodes,
            }));
            continue;
        }
        let mut ask = match Ask::new(job, search) {
            Ok(ask) => ask,
            Err(reason) => {
                out.unplaced.push(hold(reason));
                continue;
            }
        };
        ask.group = index.label_group(&ask);
        let shape = Shape::of(&ask);
        if let Some(reason) = failed.get(&shape) {
            out.unplaced.push(hold(reason.clone()));
            continue;
        }
        match select(&mut index, &ask) {
            Some(placement) => {
                locks.grant(job);
                out.placements.push(placement);
            }
            None => {
                let reason = explain(&mut index, &ask);
                failed.insert(shape, reason.clone());
                out.unplaced.push(hold(reason));
            }
        }
    }
    unplaced_at.resize(out.unplaced.len(), owner);
    if policy.preemption.enabled && !snapshot.running.is_empty() {
        preempt(&index, queue, &unplaced_at, search, &mut out);
    }
    out
}

/// The least host resources any job of `queue` asks, per resource (zero
/// for an empty queue: then no node is pruned).
fn floor(queue: &[JobRequest]) -> HostFree {
    let mut jobs = queue.iter().map(|j| &j.resources);
    let Some(first) = jobs.next() else {
        return HostFree::default();
    };
    jobs.fold(
        HostFree {
            cpu_millis: first.cpu_millis,
            memory: first.memory,
            disk: first.disk,
        },
        |f, r| HostFree {
            cpu_millis: f.cpu_millis.min(r.cpu_millis),
            memory: f.memory.min(r.memory),
            disk: f.disk.min(r.disk),
        },
    )
}

/// The gangs of a queue: each gang's members (queue indexes, rank order),
/// handed out once, when the pass first meets one of them.
struct Gangs {
    members: HashMap<JobId, Vec<usize>, FxBuild>,
}

impl Gangs {
    fn of(queue: &[JobRequest]) -> Self {
        let mut members: HashMap<JobId, Vec<usize>, FxBuild> = HashMap::default();
        for (i, job) in queue.iter().enumerate() {
            if let Some(g) = &job.gang {
                members.entry(g.id).or_default().push(i);
            }
        }
        for list in members.values_mut() {
            list.sort_by_key(|&i| queue[i].gang.as_ref().map_or(0, |g| g.rank));
        }
        Gangs { members }
    }

    fn first_visit(&mut self, gang: JobId) -> Option<Vec<usize>> {
        self.members.remove(&gang)
    }
}

/// Gang shapes (rank 0's shape, same label) that failed in this pass, with
/// the size that failed and how close it came.
type FailedGangs<'q> =
    HashMap<(Shape<'q>, Option<String>), (usize, crate::gang::GangMiss), FxBuild>;

/// What a gang's placement reads of the pass.
struct GangPass<'a> {
    snapshot: &'a ClusterSnapshot,
    search: Search,
    fleet: &'a FleetPressure,
    fleet_pressured: bool,
}

impl GangPass<'_> {
    /// Places every member of one gang (`members`, queue indexes in rank
    /// order) or holds them all with one reason.
    #[allow(clippy::too_many_arguments)]
    fn run<'q>(
        &self,
        index: &mut FreeIndex<'_>,
        locks: &mut LockChecker<'_>,
        failed: &mut FailedGangs<'q>,
        queue: &'q [JobRequest],
        members: &[usize],
        gang: &crate::model::GangRequest,
        out: &mut Plan,
    ) {
        let hold_all = |out: &mut Plan, reason: HoldReason| {
            for &m in members {
                out.unplaced.push(Unplaced {
                    job: queue[m].id,
                    reason: reason.clone(),
                });
            }
        };
        let ranks_ok = members.len() == gang.size as usize
            && members.iter().enumerate().all(|(r, &m)| {
                queue[m]
                    .gang
                    .as_ref()
                    .is_some_and(|g| g.rank == r as u32 && g.id == gang.id)
            });
        if !ranks_ok {
            return hold_all(
                out,
                HoldReason::NoFit(format!(
                    "gang of {}: waiting for every member to be pending ({} are)",
                    gang.size,
                    members.len()
                )),
            );
        }
        let policy = &self.snapshot.policy;
        if out.placements.len() + members.len() > policy.max_placements_per_pass {
            return hold_all(out, HoldReason::PassBudget);
        }
        if self.snapshot.nodes.is_empty() {
            return hold_all(out, HoldReason::NoNodes);
        }
        if let Some(reason) = members.iter().find_map(|&m| locks.conflict(&queue[m])) {
            return hold_all(out, reason);
        }
        let kind = queue[members[0]].kind;
        if self.fleet_pressured && kind.produces_data() && !kind.consumes_data() {
            return hold_all(
                out,
                HoldReason::FleetDiskBackpressure {
                    pressured: self.fleet.pressured,
                    nodes: self.fleet.nodes,
                },
            );
        }
        let mut asks = Vec::with_capacity(members.len());
        for &m in members {
            match Ask::new(&queue[m], self.search) {
                Ok(ask) => asks.push(ask),
                Err(reason) => return hold_all(out, reason),
            }
        }
        // A gang of this shape that failed earlier in the pass with as
        // many members or fewer fails again: the pass only takes.
        let key = (Shape::of(&asks[0]), gang.same_label.clone());
        if let Some((size, miss)) = failed.get(&key)
            && *size <= members.len()
        {
            return hold_all(out, miss.reason(members.len(), &asks[0], gang));
        }
        match crate::gang::place_gang(index, &asks, gang) {
            Ok(placements) => {
                for &m in members {
                    locks.grant(&queue[m]);
                }
                out.placements.extend(placements);
            }
            Err(miss) => {
                hold_all(out, miss.reason(members.len(), &asks[0], gang));
                failed.insert(key, (members.len(), miss));
            }
        }
    }
}

/// Lets the jobs left without a fit, highest first in queue order, preempt
/// lower-priority work ([`Preemptor`]); each preemptor's reason then names
/// its victims. `unplaced_at` holds the queue index of each unplaced job
/// (`usize::MAX` for gang members).
fn preempt(
    index: &FreeIndex<'_>,
    queue: &[JobRequest],
    unplaced_at: &[usize],
    search: Search,
    out: &mut Plan,
) {
    // The preemptor is built (a pass over the running jobs by node) only
    // when some job left without a fit ranks above the least important
    // possible victim anywhere.
    let Some(lowest) = Preemptor::lowest_victim_priority(index.snapshot) else {
        return;
    };
    let hopeful = out.unplaced.iter().zip(unplaced_at).any(|(u, &at)| {
        matches!(u.reason, HoldReason::NoFit(_))
            && queue
                .get(at)
                .is_some_and(|j| j.priority > lowest && j.held_node.is_none())
    });
    if !hopeful {
        return;
    }
    let policy = &index.snapshot.policy.preemption;
    let mut preemptor = Preemptor::new(index.snapshot, index);
    // Victims only get fewer as the pass goes: a shape that found none at
    // some priority finds none at that priority or below (for jobs with
    // no preemptor of their own to exclude).
    let mut failed: HashMap<Shape<'_>, i32, FxBuild> = HashMap::default();
    let mut tries = 0;
    for (unplaced, &at) in out.unplaced.iter_mut().zip(unplaced_at) {
        if out.preemptions.len() >= policy.max_per_pass || tries >= policy.max_tries_per_pass {
            break;
        }
        if !matches!(unplaced.reason, HoldReason::NoFit(_)) {
            continue;
        }
        let Some(ask) = queue.get(at).and_then(|job| Ask::new(job, search).ok()) else {
            continue;
        };
        if !preemptor.worth_trying(&ask) {
            continue;
        }
        let plain = ask.job.preempted_by.is_empty();
        let shape = Shape::of(&ask);
        if plain && failed.get(&shape).is_some_and(|&p| ask.job.priority <= p) {
            continue;
        }
        tries += 1;
        match preemptor.choose(index, &ask) {
            Some(decision) => {
                unplaced.reason = HoldReason::Preempting {
                    node: decision.node.clone(),
                    victims: decision.victims.clone(),
                };
                out.preemptions.push(decision);
            }
            None if plain => {
                let worst = failed.entry(shape).or_insert(ask.job.priority);
                *worst = (*worst).max(ask.job.priority);
            }
            None => {}
        }
    }
}

/// One job's request, digested for the search: how much free memory each
/// GPU needs, and which filters apply.
#[derive(Debug, Clone)]
pub(crate) struct Ask<'q> {
    pub job: &'q JobRequest,
    /// Least effective free memory per GPU on which the job fits.
    pub need: u64,
    /// Free memory that gives the largest batch, for `prefer_largest` jobs.
    pub need_largest: Option<u64>,
    /// GPUs wanted, all on one node.
    pub gpus: u32,
    /// Wants its GPUs to itself.
    pub exclusive: bool,
    /// Filters to apply (the reason finder switches them off one by one).
    pub filters: Filters,
    /// Search strategy.
    pub search: Search,
    /// Gang members: only nodes with this label value (see
    /// [`crate::gang`] and [`FreeIndex::group_table`]).
    pub group: Option<crate::index::Group>,
}

/// Which dynamic filters a query applies; all on for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filters {
    /// CPU/RAM/disk must fit.
    pub resources: bool,
    /// Disk pressure keeps data producers off pressured nodes.
    pub pressure: bool,
}

impl<'q> Ask<'q> {
    pub(crate) fn new(job: &'q JobRequest, search: Search) -> Result<Self, HoldReason> {
        let explicit = job.resources.gpu_memory;
        let (need, need_largest) = match (&job.batch, job.resources.gpus) {
            (_, 0) | (None, _) => (explicit.unwrap_or(0), None),
            (Some(policy), _) => {
                let need = min_free_needed(policy, explicit).ok_or_else(|| {
                    HoldReason::NoFit(
                        "its batch rule fits on no GPU: a tier without min_free needs an explicit gpu_memory"
                            .to_string(),
                    )
                })?;
                let largest = if policy.prefer_largest {
                    free_for_largest(policy, explicit).filter(|&l| l > need)
                } else {
                    None
                };
                (need, largest)
            }
        };
        Ok(Ask {
            job,
            need,
            need_largest,
            gpus: job.resources.gpus,
            exclusive: job.exclusive_gpu,
            filters: Filters {
                resources: true,
                pressure: true,
            },
            search,
            group: None,
        })
    }

    pub fn kind(&self) -> JobKind {
        self.job.kind
    }
}

/// Everything that decides whether a job fits, so equal shapes share one
/// failed search per pass.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape<'q> {
    kind: JobKind,
    exclusive: bool,
    gpus: u32,
    need: u64,
    cpu_millis: u64,
    memory: u64,
    disk: u64,
    labels: &'q BTreeMap<String, String>,
    gpu_models: &'q [String],
}

impl<'q> Shape<'q> {
    fn of(ask: &Ask<'q>) -> Self {
        let r = &ask.job.resources;
        Shape {
            kind: ask.job.kind,
            exclusive: ask.exclusive,
            gpus: ask.gpus,
            need: ask.need,
            cpu_millis: r.cpu_millis,
            memory: r.memory,
            disk: r.disk,
            labels: &ask.job.constraints.labels,
            gpu_models: &ask.job.constraints.gpu_models,
        }
    }
}

/// Finds the best placement for `ask` and reserves it in the index.
fn select(index: &mut FreeIndex<'_>, ask: &Ask<'_>) -> Option<Placement> {
    let found = find(index, ask)?;
    take(index, ask, found)
}

/// Reserves `found` for `ask` in the index and makes it a placement.
pub(crate) fn take(index: &mut FreeIndex<'_>, ask: &Ask<'_>, found: Found) -> Option<Placement> {
    let job = ask.job;
    let min_free = found
        .slots
        .iter()
        .map(|&s| index.gpu(s).free)
        .min()
        .unwrap_or(0);
    let batch = match (&job.batch, ask.gpus) {
        (Some(policy), 1..) => {
            let choice = choose_batch(policy, min_free, job.resources.gpu_memory);
            // min_free >= need, and choose_batch is monotone in free memory.
            debug_assert!(choice.is_some(), "batch rule not monotone for {policy:?}");
            Some(choice?)
        }
        _ => None,
    };
    // A job without GPUs reserves no GPU memory, whatever it asked.
    let reserve = match ask.gpus {
        0 => 0,
        _ => batch
            .map(|c: BatchChoice| c.reserve)
            .or(job.resources.gpu_memory)
            .unwrap_or(0),
    };
    debug_assert!(reserve <= min_free || ask.gpus == 0);
    index.reserve(found.node, &found.slots, reserve, ask.exclusive, job);
    Some(Placement {
        job: job.id,
        node: index.node(found.node).view.name.clone(),
        gpus: found.slots.iter().map(|&s| index.gpu(s).device).collect(),
        gpu_memory: reserve,
        batch_size: batch.map(|c| c.size),
        exclusive_gpu: ask.exclusive,
    })
}

/// A node and the GPU slots chosen on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub node: u32,
    pub slots: Vec<u32>,
}

/// The search proper: the best node and GPUs for `ask` under its filters,
/// without reserving anything.
pub(crate) fn find(index: &mut FreeIndex<'_>, ask: &Ask<'_>) -> Option<Found> {
    let restrict = index.restriction(ask);
    if let Restrict::Nothing = restrict {
        return None;
    }
    if ask.gpus == 0 {
        return index.first_node(ask, &restrict).map(|node| Found {
            node,
            slots: Vec::new(),
        });
    }
    if let Some(largest) = ask.need_largest {
        let query = Query {
            need: largest,
            dir: Dir::BestFit,
        };
        if let Some(found) = index.search(ask, query, &restrict) {
            return Some(found);
        }
        let query = Query {
            need: ask.need,
            dir: Dir::MostFree,
        };
        return index.search(ask, query, &restrict);
    }
    let query = Query {
        need: ask.need,
        dir: Dir::BestFit,
    };
    index.search(ask, query, &restrict)
}
