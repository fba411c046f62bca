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
