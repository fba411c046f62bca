//! Criterion benchmark of one scheduling pass: 10,000 nodes x 8 GPUs, a
//! pass of up to 10,000 placements from a 20,000-job queue, indexed
//! scheduler vs naive first-fit (the latter on a smaller queue: it scans
//! every node per job).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use gantry_bench::sched::{SchedConfig, workload_for};
use gantry_scheduler::naive::plan_first_fit;
use gantry_scheduler::plan;

fn pass(c: &mut Criterion) {
    let config = SchedConfig {
        nodes: 10_000,
        gpus_per_node: 8,
        jobs: 20_000,
        seed: 1,
        pass_budget: 10_000,
        naive_passes: 0,
        gang_fraction: 0.0,
        urgent_fraction: 0.0,
    };
    let (snapshot, queue) = workload_for(&config);
    let mut group = c.benchmark_group("sched");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("indexed_pass_10k_placements", |b| {
        b.iter(|| plan(black_box(&snapshot), black_box(&queue)))
    });
    let small = &queue[..1_000];
    group.bench_function("indexed_pass_1k_jobs", |b| {
        b.iter(|| plan(black_box(&snapshot), black_box(small)))
    });
    group.bench_function("naive_pass_1k_jobs", |b| {
        b.iter(|| plan_first_fit(black_box(&snapshot), black_box(small)))
    });
    group.finish();
}

criterion_group!(benches, pass);
criterion_main!(benches);
