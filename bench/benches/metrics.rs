//! Cost of one `/metrics` scrape on the leader: rendering the exposition
//! for a fleet of N nodes x 8 GPUs (the ClusterView the core builds is an
//! input here; building it is a scan the core already does for `gantry nodes`).

use std::collections::BTreeMap;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gantry_coordinator::metrics::{ClusterView, Metrics, render, to_prometheus_text};
use gantry_coordinator::raft::RaftStatus;
use gantry_proto as pb;

fn fleet(nodes: usize) -> ClusterView {
    let gib = 1i64 << 30;
    let nodes: Vec<pb::Node> = (0..nodes)
        .map(|i| pb::Node {
            name: format!("gpu-{i:05}"),
            address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
            state: if i % 97 == 0 { "suspect" } else { "ready" }.into(),
            labels: [("provider".to_string(), "lambda".to_string())].into(),
            gpus: (0..8)
                .map(|g| pb::GpuInfo {
                    index: g,
                    model: "H100-80GiB".into(),
                    total_bytes: 80 * gib,
                    used_bytes: i64::from(g) * 3 * gib,
                    reserved_bytes: i64::from(g) * 4 * gib,
                    utilization_pct: 40 + g,
                    temperature_c: 55 + g,
                    free_bytes: 80 * gib - i64::from(g) * 4 * gib,
                    fault: String::new(),
                })
                .collect(),
            disk_total_bytes: 2 << 40,
            disk_used_bytes: 1 << 40,
            rtt_ms: 1.5,
            running_jobs: 6,
            connected: true,
            ..Default::default()
        })
        .collect();
    let mut jobs = BTreeMap::new();
    for state in ["pending", "running", "succeeded", "failed"] {
        for kind in ["selfplay", "export", "training", "evaluation", "promotion"] {
            jobs.insert((state.to_string(), kind.to_string()), 5_000);
        }
    }
    // Placement's figure: total - reserved - used by others (none here).
    let gpu_free = nodes
        .iter()
        .map(|n: &pb::Node| {
            let free = n
                .gpus
                .iter()
                .map(|g| (g.index, (g.total_bytes - g.reserved_bytes).max(0) as u64))
                .collect();
            (n.name.clone(), free)
        })
        .collect();
    ClusterView {
        nodes,
        jobs,
        gpu_free,
        dlq: 12,
        agents_connected: 10_000,
        fleet_disk_pressure: false,
    }
}

fn scrape(c: &mut Criterion) {
    let metrics = Metrics::default();
    let raft = RaftStatus {
        is_leader: true,
        term: 3,
        leader_id: Some(1),
        ..Default::default()
    };
    let mut group = c.benchmark_group("metrics_scrape");
    group.sample_size(10);
    for nodes in [1_000, 10_000] {
        let view = std::sync::Arc::new(fleet(nodes));
        let text = to_prometheus_text(&render(&metrics, &raft, Some(view.clone())));
        eprintln!(
            "{nodes} nodes x 8 GPUs: exposition {} lines, {:.1} MiB",
            text.lines().count(),
            text.len() as f64 / (1 << 20) as f64
        );
        group.bench_with_input(BenchmarkId::new("render", nodes), &view, |b, view| {
            b.iter(|| to_prometheus_text(&render(&metrics, &raft, Some(view.clone()))));
        });
    }
    group.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
