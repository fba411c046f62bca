//! Prometheus metrics, in two kinds:
//!
//! - event metrics (histograms, counters) are observed where the event
//!   happens and live in [`Metrics`]: atomics behind an `Arc`, shared by the
//!   replica loop, the services and the HTTP server of one coordinator;
//! - state metrics (node states, GPU memory, jobs by state) are computed at
//!   scrape time from a [`ClusterView`] the core builds, so they can never
//!   drift from the state they describe.
//!
//! Followers render only their own Raft metrics: the cluster view (soft
//! state: telemetry, connected agents) exists on the leader alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_proto as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::raft::RaftStatus;

/// The content type of [`render`]'s output: OpenMetrics text, which
/// Prometheus asks for in its `Accept` header.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`to_prometheus_text`]'s output: the classic text
/// format, for clients that do not ask for OpenMetrics (curl, promtool).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as the classic Prometheus text format, as the
/// Go client does when a scraper does not ask for OpenMetrics: no `# UNIT`
/// or `# EOF` lines, and a counter's family is named like its `_total`
/// sample. Everything else is the same in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A job-kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct KindLabel {
    /// selfplay, training, ...
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to about 65 s (doubling).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// Event metrics of one coordinator.
#[derive(Debug)]
pub struct Metrics {
    /// Wall time of each scheduling pass (snapshot, plan), leader only.
    pub scheduling_pass_seconds: Histogram,
    /// Submission to placement, by kind, observed when a plan applies.
    pub queue_wait_seconds: HistogramFamily<KindLabel>,
    /// gRPC submit latency: received to committed and applied.
    pub submit_seconds: Histogram,
    /// Jobs placed by applied plans.
    pub placements: Counter,
    /// Times this replica saw the leader change (a new leader id).
    pub leader_changes: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            scheduling_pass_seconds: latency_histogram(),
            queue_wait_seconds: Family::new_with_constructor(latency_histogram),
            submit_seconds: latency_histogram(),
            placements: Counter::default(),
            leader_changes: Counter::default(),
        }
    }
}

/// What the leader's core knows of the cluster at one instant.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Every node, registered or only in the inventory (`missing`).
    pub nodes: Vec<pb::Node>,
    /// Job counts by (state, kind).
    pub jobs: BTreeMap<(String, String), u64>,
    /// Jobs in the dead-letter queue.
    pub dlq: u64,
    /// Agents with an open stream to this leader.
    pub agents_connected: u64,
    /// Whether the fleet as a whole is disk-pressured (pure producers wait).
    pub fleet_disk_pressure: bool,
    /// Effective free memory of each GPU by node and index, as placement
    /// computes it (`total - reserved - used by others - headroom`).
    pub gpu_free: BTreeMap<String, BTreeMap<u32, u64>>,
}

/// Every node state, so `gantry_nodes{state}` has a zero rather than a gap.
const NODE_STATES: [&str; 4] = ["ready", "suspect", "down", "missing"];

/// Renders the exposition: Raft and event metrics always, cluster metrics
/// when `view` is given (on the leader).
pub fn render(metrics: &Metrics, raft: &RaftStatus, view: Option<Arc<ClusterView>>) -> String {
    let mut registry = Registry::default();
    let info: Family<VersionLabel, Gauge> = Family::default();
    info.get_or_create(&VersionLabel {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
    .set(1);
    registry.register("gantry_build", "Build information", info);
    register_raft(&mut registry, metrics, raft);
    registry.register_with_unit(
        "gantry_scheduling_pass",
        "Scheduling pass latency (snapshot and plan)",
        Unit::Seconds,
        metrics.scheduling_pass_seconds.clone(),
    );
    registry.register_with_unit(
        "gantry_queue_wait",
        "Time from submission to placement",
        Unit::Seconds,
        metrics.queue_wait_seconds.clone(),
    );
    registry.register_with_unit(
        "gantry_submit",
        "Submit latency: received to committed and applied",
        Unit::Seconds,
        metrics.submit_seconds.clone(),
    );
    registry.register(
        "gantry_placements",
        "Jobs placed by applied plans",
        metrics.placements.clone(),
    );
    let cluster: Gauge = Gauge::default();
    cluster.set(i64::from(view.is_some()));
    registry.register(
        "gantry_cluster_metrics_available",
        "1 when this replica serves the cluster metrics (it leads); 0 on a follower",
        cluster,
    );
    if let Some(view) = view {
        registry.register_collector(Box::new(ClusterCollector(view)));
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn register_raft(registry: &mut Registry, metrics: &Metrics, raft: &RaftStatus) {
    gauge(
        registry,
        "gantry_raft_term",
        "Current Raft term",
        raft.term as i64,
    );
    gauge(
        registry,
        "gantry_raft_commit_index",
        "Highest log index known committed",
        raft.commit_index as i64,
    );
    gauge(
        registry,
        "gantry_raft_applied_index",
        "Highest log index applied to the state machine",
        raft.applied_index as i64,
    );
    gauge(
        registry,
        "gantry_raft_leader_id",
        "The leader's replica id (0 = unknown)",
        raft.leader_id.unwrap_or(0) as i64,
    );
    gauge(
        registry,
        "gantry_raft_is_leader",
        "1 when this replica leads",
        i64::from(raft.is_leader),
    );
    registry.register(
        "gantry_raft_leader_changes",
        "Leader changes seen by this replica",
        metrics.leader_changes.clone(),
    );
}

/// The cluster's state metrics, encoded straight from the view on each
/// scrape (no intermediate metric families: at 10,000 nodes x 8 GPUs that is
/// half a million series, and building families for them cost most of the
/// scrape).
#[derive(Debug)]
struct ClusterCollector(Arc<ClusterView>);

/// Writes one gauge family: its descriptor, then one sample per series.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let help = format!("{help}.");
    let mut metric = encoder.encode_descriptor(name, &help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Writes one gauge without labels.
fn gauge_value(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> std::fmt::Result {
    let help = format!("{help}.");
    encoder
        .encode_descriptor(name, &help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let view = &*self.0;
        let e = &mut encoder;
        let mut by_state: BTreeMap<&str, i64> = NODE_STATES.iter().map(|s| (*s, 0)).collect();
        for node in &view.nodes {
            *by_state.entry(node.state.as_str()).or_default() += 1;
        }
        gauges(
            e,
            "gantry_nodes",
            "Nodes by state",
            None,
            by_state.iter().map(|(state, n)| ([("state", *state)], *n)),
        )?;
        gauges(
            e,
            "gantry_node_info",
            "One series per node with its address, provider and state",
            None,
            view.nodes.iter().map(|n| {
                let provider = n.labels.get("provider").map_or("", String::as_str);
                (
                    [
                        ("node", n.name.as_str()),
                        ("address", n.address.as_str()),
                        ("provider", provider),
                        ("state", n.state.as_str()),
                    ],
                    1i64,
                )
            }),
        )?;
        // Missing nodes never registered: they have no live figures.
        let live: Vec<&pb::Node> = view.nodes.iter().filter(|n| n.state != "missing").collect();
        let per_node = |f: fn(&pb::Node) -> i64| {
            live.iter()
                .map(move |n| ([("node", n.name.as_str())], f(n)))
        };
        gauges(
            e,
            "gantry_node_draining",
            "1 when the node takes no new placements",
            None,
            per_node(|n| i64::from(n.draining)),
        )?;
        gauges(
            e,
            "gantry_node_quarantined",
            "1 when the circuit breaker keeps placements off the node",
            None,
            per_node(|n| i64::from(n.quarantined_until_ms > 0)),
        )?;
        gauges(
            e,
            "gantry_node_connected",
            "1 when the node's agent has a stream open to the leader",
            None,
            per_node(|n| i64::from(n.connected)),
        )?;
        gauges(
            e,
            "gantry_node_disk_pressure",
            "1 when the node holds back data-producing work (disk backpressure)",
            None,
            per_node(|n| i64::from(n.disk_pressure)),
        )?;
        gauges(
            e,
            "gantry_node_disk_total",
            "Disk capacity of the node's data volume",
            Some(&Unit::Bytes),
            per_node(|n| n.disk_total_bytes),
        )?;
        gauges(
            e,
            "gantry_node_disk_used",
            "Disk used on the node's data volume",
            Some(&Unit::Bytes),
            per_node(|n| n.disk_used_bytes),
        )?;
        gauges(
            e,
            "gantry_node_running_jobs",
            "Jobs assigned to or running on the node",
            None,
            per_node(|n| i64::from(n.running_jobs)),
        )?;
        gauges(
            e,
            "gantry_node_rtt",
            "Round-trip time from the leader to the node's agent",
            Some(&Unit::Seconds),
            live.iter()
                .map(|n| ([("node", n.name.as_str())], n.rtt_ms / 1000.0)),
        )?;
        // GPU index labels, made once per scrape.
        let most = live
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| g.index))
            .max()
            .map_or(0, |m| m as usize + 1);
        let ids: Vec<String> = (0..most).map(|i| i.to_string()).collect();
        let per_gpu = |f: fn(&pb::GpuInfo) -> i64| {
            let ids = &ids;
            live.iter().flat_map(move |n| {
                n.gpus.iter().map(move |g| {
                    (
                        [
                            ("node", n.name.as_str()),
                            ("gpu", ids[g.index as usize].as_str()),
                        ],
                        f(g),
                    )
                })
            })
        };
        gauges(
            e,
            "gantry_gpu_memory_total",
            "GPU memory capacity",
            Some(&Unit::Bytes),
            live.iter().flat_map(|n| {
                n.gpus.iter().map(|g| {
                    (
                        [
                            ("node", n.name.as_str()),
                            ("gpu", ids[g.index as usize].as_str()),
                            ("model", g.model.as_str()),
                        ],
                        g.total_bytes,
                    )
                })
            }),
        )?;
        gauges(
            e,
            "gantry_gpu_memory_used",
            "GPU memory in use as the driver reports it (all processes)",
            Some(&Unit::Bytes),
            per_gpu(|g| g.used_bytes),
        )?;
        gauges(
            e,
            "gantry_gpu_memory_reserved",
            "GPU memory reserved by Gantry's assignments",
            Some(&Unit::Bytes),
            per_gpu(|g| g.reserved_bytes),
        )?;
        gauges(
            e,
            "gantry_gpu_memory_free",
            "GPU memory the scheduler can still place on: total - reserved - used by other processes - headroom",
            Some(&Unit::Bytes),
            live.iter().flat_map(|n| {
                let ids = &ids;
                n.gpus.iter().filter_map(move |g| {
                    // The same figure placement uses; a GPU the view has no
                    // figure for gets no series rather than a guess.
                    let free = view.gpu_free.get(&n.name)?.get(&g.index)?;
                    Some((
                        [
                            ("node", n.name.as_str()),
                            ("gpu", ids[g.index as usize].as_str()),
                        ],
                        (*free).min(i64::MAX as u64) as i64,
                    ))
                })
            }),
        )?;
        gauges(
            e,
            "gantry_gpu_utilization_ratio",
            "GPU utilisation (0 to 1)",
            None,
            live.iter().flat_map(|n| {
                let ids = &ids;
                n.gpus.iter().map(move |g| {
                    (
                        [
                            ("node", n.name.as_str()),
                            ("gpu", ids[g.index as usize].as_str()),
                        ],
                        f64::from(g.utilization_pct) / 100.0,
                    )
                })
            }),
        )?;
        gauges(
            e,
            "gantry_gpu_healthy",
            "1 while the GPU takes placements as far as its health goes, 0 while a committed fault (XID, ECC, page retirement) keeps it out until cleared",
            None,
            per_gpu(|g| i64::from(g.fault.is_empty())),
        )?;
        gauges(
            e,
            "gantry_gpu_temperature",
            "GPU temperature",
            Some(&Unit::Celsius),
            per_gpu(|g| i64::from(g.temperature_c)),
        )?;
        gauges(
            e,
            "gantry_jobs",
            "Jobs by state and kind",
            None,
            view.jobs.iter().map(|((state, kind), n)| {
                (
                    [("state", state.as_str()), ("kind", kind.as_str())],
                    *n as i64,
                )
            }),
        )?;
        gauge_value(
            e,
            "gantry_dlq_jobs",
            "Jobs in the dead-letter queue",
            view.dlq as i64,
        )?;
        gauge_value(
            e,
            "gantry_agents_connected",
            "Agents with a stream open to this leader",
            view.agents_connected as i64,
        )?;
        gauge_value(
            e,
            "gantry_fleet_disk_pressure",
            "1 when enough of the fleet is disk-pressured that pure producers wait",
            i64::from(view.fleet_disk_pressure),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ClusterView {
        let mut jobs = BTreeMap::new();
        jobs.insert(("running".to_string(), "training".to_string()), 2);
        ClusterView {
            nodes: vec![pb::Node {
                name: "gpu-01".into(),
                address: "10.0.0.1".into(),
                state: "ready".into(),
                connected: true,
                quarantined_until_ms: 1_000,
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    model: "H100".into(),
                    total_bytes: 80 << 30,
                    used_bytes: 10 << 30,
                    reserved_bytes: 20 << 30,
                    utilization_pct: 50,
                    temperature_c: 61,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            jobs,
            dlq: 1,
            agents_connected: 1,
            fleet_disk_pressure: false,
            // Less than total - max(used, reserved) = 60 GiB: others' use
            // and the headroom count too.
            gpu_free: [("gpu-01".to_string(), [(0, 52 << 30)].into())].into(),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"))
    }

    #[test]
    fn leader_exposition_has_cluster_series() {
        let metrics = Metrics::default();
        metrics.submit_seconds.observe(0.003);
        let raft = RaftStatus {
            is_leader: true,
            term: 4,
            leader_id: Some(2),
            ..Default::default()
        };
        let text = render(&metrics, &raft, Some(Arc::new(view())));
        assert_eq!(line(&text, "gantry_raft_term "), "gantry_raft_term 4");
        assert_eq!(
            line(&text, "gantry_raft_is_leader "),
            "gantry_raft_is_leader 1"
        );
        assert_eq!(
            line(
                &text,
                "gantry_gpu_memory_reserved_bytes{node=\"gpu-01\",gpu=\"0\"}"
            ),
            format!(
                "gantry_gpu_memory_reserved_bytes{{node=\"gpu-01\",gpu=\"0\"}} {}",
                20u64 << 30
            )
        );
        assert_eq!(
            line(&text, "gantry_gpu_memory_free_bytes{"),
            format!(
                "gantry_gpu_memory_free_bytes{{node=\"gpu-01\",gpu=\"0\"}} {}",
                52u64 << 30
            )
        );
        assert_eq!(
            line(&text, "gantry_gpu_healthy{"),
            "gantry_gpu_healthy{node=\"gpu-01\",gpu=\"0\"} 1"
        );
        let mut sick = view();
        sick.nodes[0].gpus[0].fault = "critical xid 79".into();
        let text_sick = render(&metrics, &raft, Some(Arc::new(sick)));
        assert_eq!(
            line(&text_sick, "gantry_gpu_healthy{"),
            "gantry_gpu_healthy{node=\"gpu-01\",gpu=\"0\"} 0"
        );
        assert_eq!(
            line(&text, "gantry_gpu_utilization_ratio{"),
            "gantry_gpu_utilization_ratio{node=\"gpu-01\",gpu=\"0\"} 0.5"
        );
        assert_eq!(
            line(&text, "gantry_jobs{"),
            "gantry_jobs{state=\"running\",kind=\"training\"} 2"
        );
        assert_eq!(
            line(&text, "gantry_node_quarantined{"),
            "gantry_node_quarantined{node=\"gpu-01\"} 1"
        );
        assert_eq!(
            line(&text, "gantry_nodes{state=\"ready\"}"),
            "gantry_nodes{state=\"ready\"} 1"
        );
        assert_eq!(
            line(&text, "gantry_nodes{state=\"down\"}"),
            "gantry_nodes{state=\"down\"} 0"
        );
        assert_eq!(
            line(&text, "gantry_submit_seconds_count"),
            "gantry_submit_seconds_count 1"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn classic_text_names_counter_families_by_their_samples() {
        let metrics = Metrics::default();
        metrics.placements.inc();
        let text = to_prometheus_text(&render(&metrics, &RaftStatus::default(), None));
        assert!(text.contains("# TYPE gantry_placements_total counter\n"));
        assert!(text.contains("# HELP gantry_placements_total Jobs placed"));
        assert!(text.contains("\ngantry_placements_total 1\n"));
        assert!(text.contains("# TYPE gantry_submit_seconds histogram\n"));
        assert!(!text.contains("# UNIT"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn follower_exposition_has_raft_only() {
        let text = render(&Metrics::default(), &RaftStatus::default(), None);
        assert!(text.contains("gantry_raft_term 0"));
        assert!(text.contains("gantry_cluster_metrics_available 0"));
        assert!(!text.contains("gantry_gpu_memory_total_bytes"));
        assert!(!text.contains("gantry_jobs{"));
    }
}
