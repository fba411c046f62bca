//! Gantry's placement policy, as a pure library: a cluster snapshot and a
//! queue go in, a [`Plan`] (placements, and a reason for every job left
//! waiting) comes out.
//!
//! Layout:
//! - [`model`]: the snapshot (nodes, GPUs, locks, policy), job requests and
//!   the [`Plan`] that comes out. The API boundary with the coordinator.
//! - [`place`]: a scheduling pass, [`plan`]: order, filter, score, select,
//!   reserve.
//! - `preempt` (private): priority preemption, the victims a pass chooses.
//! - [`order`]: queue order: priority, fair share across queues, age.
//! - [`filter`]: the feasibility checkers (`*Checker`): node state, labels,
//!   GPU model, GPU sharing, host resources, named locks.
//! - `index` (private): the free-memory index that keeps placement near
//!   O(log n) per job at 10,000 nodes.
//! - `gang` (private): gang placement (`nodes: N`), all members on
//!   distinct nodes at once or none.
//! - `explain` (private): the reason a job waits, from relaxing filters.
//! - [`batch`]: batch sizing from free GPU memory.
//! - [`disk`]: disk backpressure: watermarks with hysteresis, per-kind
//!   thresholds, fleet pressure.
//! - [`health`]: the health ranking (the circuit breaker is the coordinator's).
//! - [`share`]: fair share measured: a closed-loop simulation of a
//!   contended fleet, for the unit table and the benchmark.
//! - [`naive`]: first-fit full-scan baseline, for benchmarks and as a test
//!   oracle.
//! - [`units`]: sizes and durations for people.
//!
//! Architecture invariant: this crate knows nothing of tokio, gRPC, sled or
//! clocks. Time is an argument (`ClusterSnapshot::now_ms`); the same input
//! always gives the same plan.

pub mod batch;
pub mod disk;
mod explain;
pub mod filter;
mod gang;
mod hash;
pub mod health;
mod index;
pub mod model;
pub mod naive;
pub mod order;
pub mod place;
mod preempt;
pub mod share;
pub mod units;

pub use batch::{BatchChoice, choose_batch};
pub use disk::next_disk_pressure;
pub use model::*;
pub use place::plan;
