//! Gantry's benchmarks as a library, so the `gantry-bench` binary and the
//! criterion benches share one workload generator.
//!
//! - [`rng`]: a seeded deterministic generator (splitmix64).
//! - [`workload`]: synthetic fleets and job streams.
//! - [`sched`]: the pure-placement scenario behind `gantry-bench sched`.

pub mod rng;
pub mod sched;
pub mod workload;
