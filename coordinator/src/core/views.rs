//! What the core shows: nodes and their state as `gantry nodes` and
//! placement see them, the cluster status, and the leader's view for
//! `/metrics`.

use std::collections::HashMap;

use gantry_proto as pb;
use gantry_scheduler::{JobId, NodeState, Policy};

use super::Core;
use crate::convert;
use crate::decide;
use crate::metrics::{ClusterView, KindLabel};

/// Which jobs a listing wants besides their state (`/v1/jobs?kind=&pipeline=`);
/// `None` matches every job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs of this kind.
    pub kind: Option<gantry_scheduler::JobKind>,
    /// Only jobs of this pipeline.
    pub pipeline: Option<String>,
}

impl JobFilter {
    /// Whether `job` passes.
    pub fn matches(&self, job: &crate::domain::JobRecord) -> bool {
        self.kind.is_none_or(|kind| job.spec.kind == kind)
            && self
                .pipeline
                .as_deref()
                .is_none_or(|pipeline| job.pipeline == pipeline)
    }
}

impl Core {
    /// The placement policy of every pass.
    pub(super) fn policy(&self) -> Policy {
        Policy {
            gpu_headroom: self.config.gpu_headroom,
            queue_weights: self.config.queue_weights.clone(),
            disk_thresholds: self.config.disk_thresholds.clone(),
            ..Policy::default()
        }
    }

    /// A node's data-volume size ([`decide::schedule::disk_total`]).
    pub(super) fn disk_total(&self, node: &crate::domain::NodeRecord) -> u64 {
        decide::schedule::disk_total(node, &self.health)
    }

    /// A registered node's state ([`decide::schedule::node_state`]).
    pub(super) fn node_state(&self, node: &crate::domain::NodeRecord) -> NodeState {
        decide::schedule::node_state(node, &self.health, &self.sessions)
    }

    pub(super) fn nodes_to_proto(&self) -> Vec<pb::Node> {
        let now = super::now_ms();
        let free = decide::schedule::gpu_free(&self.state, &self.health, self.config.gpu_headroom);
        self.state
            .nodes()
            .map(|node| {
                let health = self.health.get(&node.name);
                let connected = self.sessions.contains_key(&node.name);
                let state = self.node_state(node);
                pb::Node {
                    name: node.name.clone(),
                    address: node.address.clone(),
                    state: state.as_str().to_string(),
                    draining: node.draining,
                    labels: node.labels.clone().into_iter().collect(),
                    gpus: node
                        .gpus
                        .iter()
                        .map(|g| {
                            let telemetry = health
                                .and_then(|h| h.gpus.get(&g.index))
                                .copied()
                                .unwrap_or_default();
                            pb::GpuInfo {
                                index: g.index,
                                model: g.model.clone(),
                                total_bytes: g.total as i64,
                                used_bytes: telemetry.used as i64,
                                reserved_bytes: self.state.gpu_usage(&node.name, g.index).reserved
                                    as i64,
                                utilization_pct: telemetry.utilization_pct,
                                temperature_c: telemetry.temperature_c,
                                free_bytes: free
                                    .get(&node.name)
                                    .and_then(|gpus| gpus.get(&g.index))
                                    .map_or(0, |f| *f as i64),
                                fault: node.gpu_fault(g.index).unwrap_or_default().to_string(),
                            }
                        })
                        .collect(),
                    cpu_millis: node.cpu_millis as i64,
                    memory_total_bytes: node.memory_total as i64,
                    memory_used_bytes: health.map_or(0, |h| h.memory_used as i64),
                    disk_total_bytes: health.map_or(node.disk_total, |h| h.disk_total) as i64,
                    disk_used_bytes: health.map_or(0, |h| h.disk_used as i64),
                    last_seen_ms: health.map_or(0, |h| h.last_seen_ms),
                    rtt_ms: health.map_or(0.0, |h| h.rtt_ms),
                    running_jobs: self.state.jobs_on(&node.name).count() as u32,
                    disk_pressure: health.is_some_and(|h| h.disk_pressure),
                    connected,
                    drain_deadline_ms: node.drain_deadline_ms.unwrap_or(0),
                    ..convert::quarantine_to_proto(node.quarantine.as_ref(), now)
                }
            })
            .chain(self.missing_nodes())
            .collect()
    }

    /// Inventory nodes that never registered, shown as `missing`.
    pub(super) fn missing_nodes(&self) -> Vec<pb::Node> {
        self.config
            .inventory
            .iter()
            .filter(|host| self.state.node(&host.name).is_none())
            .map(|host| pb::Node {
                name: host.name.clone(),
                address: host.address.clone(),
                state: "missing".into(),
                labels: host.labels.clone().into_iter().collect(),
                gpus: (0..host.gpu_count)
                    .map(|index| pb::GpuInfo {
                        index,
                        model: host.gpu_model.clone(),
                        total_bytes: host.gpu_memory as i64,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// Submission to placement of a job whose assignment just applied.
    pub(super) fn observe_queue_wait(&self, job: JobId, placed_at_ms: u64) {
        let Some(record) = self.state.job(job) else {
            return;
        };
        let waited = placed_at_ms.saturating_sub(record.submitted_at_ms);
        self.metrics.placements.inc();
        self.metrics
            .queue_wait_seconds
            .get_or_create(&KindLabel {
                kind: record.spec.kind.as_str().to_string(),
            })
            .observe(waited as f64 / 1000.0);
    }

    /// What `/metrics` reports of the cluster (leader only).
    pub(super) fn cluster_view(&self) -> ClusterView {
        let mut jobs = std::collections::BTreeMap::new();
        for job in self.state.jobs() {
            *jobs
                .entry((
                    job.state.as_str().to_string(),
                    job.spec.kind.as_str().to_string(),
                ))
                .or_default() += 1;
        }
        // Counted as a pass counts it, without building a whole snapshot.
        let mut fleet = gantry_scheduler::disk::FleetPressure::default();
        for node in self.state.nodes() {
            fleet.count(
                self.node_state(node),
                node.draining,
                self.disk_total(node),
                self.health.get(&node.name).is_some_and(|h| h.disk_pressure),
            );
        }
        ClusterView {
            nodes: self.nodes_to_proto(),
            jobs,
            dlq: self.state.dead_lettered().count() as u64,
            agents_connected: self.sessions.len() as u64,
            fleet_disk_pressure: fleet.is_pressured(self.policy().fleet_pressure_fraction),
            gpu_free: decide::schedule::gpu_free(
                &self.state,
                &self.health,
                self.config.gpu_headroom,
            ),
        }
    }

    pub(super) fn status(&self, now: u64) -> pb::ClusterStatus {
        let nodes = self.nodes_to_proto();
        let mut jobs_by_state: HashMap<String, u32> = HashMap::new();
        for job in self.state.jobs() {
            *jobs_by_state
                .entry(job.state.as_str().to_string())
                .or_default() += 1;
        }
        let raft = self.raft.clone();
        pb::ClusterStatus {
            coordinator_id: self.config.id.clone(),
            is_leader: self.leader,
            leader_url: raft.leader_url.unwrap_or_default(),
            leader_id: raft.leader_id.unwrap_or(0),
            raft_term: raft.term,
            commit_index: raft.commit_index,
            applied_index: raft.applied_index,
            nodes_total: nodes.len() as u32,
            nodes_ready: nodes.iter().filter(|n| n.state == "ready").count() as u32,
            gpus_total: nodes.iter().map(|n| n.gpus.len() as u32).sum(),
            gpu_memory_total_bytes: nodes
                .iter()
                .flat_map(|n| &n.gpus)
                .map(|g| g.total_bytes)
                .sum(),
            gpu_memory_reserved_bytes: nodes
                .iter()
                .flat_map(|n| &n.gpus)
                .map(|g| g.reserved_bytes)
                .sum(),
            jobs_by_state,
            last_event_index: self.state.next_event_index().saturating_sub(1),
            version: format!(
                "{} (up {}s)",
                env!("CARGO_PKG_VERSION"),
                now.saturating_sub(self.started_ms) / 1000
            ),
            history_bytes: self
                .store
                .history_bytes()
                .inspect_err(|error| tracing::warn!(%error, "cannot read the history's size"))
                .ok(),
            event_floor: self.state.event_floor(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobFilter;
    use crate::domain::{JobRecord, JobSpec};
    use gantry_scheduler::JobKind;

    #[test]
    fn a_job_filter_matches_kind_and_pipeline() {
        let job = |kind: JobKind, pipeline: &str| {
            let mut record = JobRecord::for_test(
                1,
                JobSpec {
                    kind,
                    ..JobSpec::for_test("j")
                },
            );
            record.pipeline = pipeline.to_string();
            record
        };
        let filter = |kind: Option<JobKind>, pipeline: Option<&str>| JobFilter {
            kind,
            pipeline: pipeline.map(String::from),
        };
        let training = job(JobKind::Training, "loop");
        let loose = job(JobKind::Evaluation, "");
        let cases = [
            (filter(None, None), &training, true),
            (filter(None, None), &loose, true),
            (filter(Some(JobKind::Training), None), &training, true),
            (filter(Some(JobKind::Training), None), &loose, false),
            (filter(None, Some("loop")), &training, true),
            (filter(None, Some("loop")), &loose, false),
            (
                filter(Some(JobKind::Training), Some("loop")),
                &training,
                true,
            ),
            (
                filter(Some(JobKind::Evaluation), Some("loop")),
                &training,
                false,
            ),
            (
                filter(Some(JobKind::Evaluation), Some("other")),
                &loose,
                false,
            ),
        ];
        for (filter, job, want) in cases {
            assert_eq!(
                filter.matches(job),
                want,
                "{filter:?} on {} {:?}",
                job.spec.kind.as_str(),
                job.pipeline
            );
        }
    }
}
