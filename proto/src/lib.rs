//! Gantry's wire contract, generated at build time from `proto/gantry.proto`.
//!
//! Only the gRPC layers of `coordinator`, `agent` and `ctl` see these types;
//! everything else works on typed domain values converted in one `convert.rs`
//! per crate.

pub mod codec;

#[allow(missing_docs, clippy::all)]
mod generated {
    tonic::include_proto!("gantry.v1");
}

pub use generated::*;

/// When the leader declares a silent node Down: after this many heartbeat
/// intervals of silence, and never sooner than [`DOWN_AFTER_MIN_MS`]. Part of
/// the contract because the agent fences itself before it (it stops its jobs
/// when the leader has not confirmed a heartbeat for a share of this time),
/// so both sides must compute the same threshold from the interval.
pub const DOWN_INTERVALS: u64 = 15;
/// Floor of the Down threshold, milliseconds (see [`DOWN_INTERVALS`]).
pub const DOWN_AFTER_MIN_MS: u64 = 15_000;

/// Transport between coordinator replicas (`proto/raft.proto`): raft-rs
/// messages carried as opaque bytes.
#[allow(missing_docs, clippy::all)]
pub mod raft {
    tonic::include_proto!("gantry.raft.v1");
}

/// The coordinator's internal storage format (`proto/storage.proto`): the
/// commands of the replicated log. Not part of the API; only the
/// coordinator's `store::codec` converts them.
#[allow(missing_docs, clippy::all)]
pub mod storage {
    tonic::include_proto!("gantry.storage.v1");
}
