//! Gantry's coordinator as a library.
//!
//! Layout:
//! - [`server`]: start/stop; binds gRPC (port 0 works).
//! - [`service`]: tonic services, thin adapters over the core.
//! - [`core`]: hard state, soft state and agent sessions, and the
//!   scheduling passes: the application of the replica loop.
//! - [`decide`]: the core's decisions as pure functions of state and
//!   time (commands to propose, messages to send), tested as data.
//! - [`command`] + [`state`]: every hard-state change is a [`Command`]
//!   applied by [`StateMachine::apply`].
//! - [`store`]: sled persistence of the state machine.
//! - [`health`]: soft state from heartbeats.
//! - [`breaker`]: the node circuit breaker (evidence, fleet share, the
//!   `Quarantine` command's checks).
//! - [`raft`]: the replicated log (raft-rs over gRPC, log in sled) and the
//!   replica loop, the one thread that owns it and the core.
//! - [`convert`]: wire <-> domain, with input validation against [`limits`];
//!   [`dag`] resolves a submission's `after:` edges (linear).
//! - [`spec_file`]: the job spec schema of `gantry submit -f` and
//!   `POST /v1/jobs` (YAML or JSON) -> wire specs; [`yaml_depth`] bounds
//!   YAML nesting before any parser runs.
//! - [`rpc_trace`]: a tracing span per gRPC request.
//! - [`error`]: errors and their one mapping to gRPC status codes.
//! - [`http`]: `/metrics`, the JSON API, health and the status page.
//! - [`metrics`]: Prometheus exposition; [`json`]: JSON views shared with
//!   `gantry -o json`.
//! - [`auth`]: who may call what (bearer tokens, agent join token, mTLS for
//!   peers), checked in one wrapper around every service.
//!
//! Architecture invariant: nothing is acknowledged before it is flushed to
//! sled; only the replica loop's thread touches the Raft log and the
//! state machine.

pub mod auth;
pub mod backup;
pub mod breaker;
pub mod command;
pub mod convert;
pub mod core;
pub mod credentials;
pub mod dag;
pub mod decide;
pub mod disk;
pub mod domain;
pub mod durable;
pub mod error;
pub mod framed;
pub mod health;
pub mod http;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod raft;
pub mod rpc_trace;
pub mod server;
pub mod service;
pub mod spec_file;
pub mod state;
pub mod store;
pub mod yaml_depth;

pub use command::Command;
pub use error::CoordinatorError;
pub use server::{CoordinatorConfig, RunningCoordinator, start};
pub use state::StateMachine;
