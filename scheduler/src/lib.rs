//! Gantry's placement policy, as a pure library.
//!
//! Layout:
//! - [`model`]: the snapshot (nodes, GPUs, locks, policy), job requests and
//!   the [`Plan`] that comes out.
//! - [`place`]: a scheduling pass, [`plan`].
//! - [`batch`]: batch sizing from free GPU memory.
//! - [`units`]: sizes and durations for people.
//!
//! Architecture invariant: this crate knows nothing of tokio, gRPC, sled or
//! clocks. Time is an argument (`ClusterSnapshot::now_ms`); the same input
//! always gives the same plan.

pub mod batch;
pub mod model;
pub mod place;
pub mod units;

pub use batch::{BatchChoice, choose_batch};
pub use model::*;
pub use place::plan;
