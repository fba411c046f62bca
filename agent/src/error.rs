//! The agent's error type. Job failures are not errors: they travel to the
//! coordinator as `JobEvent`s; `AgentError` is for what stops the agent itself
//! or a diagnostic command.

use std::path::PathBuf;

use thiserror::Error;

/// Why the agent (or one of its diagnostic helpers) could not do its work.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is unusable (empty node name, no coordinators, bad URL).
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// A `--fake-gpus` value that does not parse; the message names the bad part.
    #[error("invalid fake GPU list: {0}")]
    FakeGpus(String),
    /// NVML could not be loaded or queried (no driver, no library, no permission).
    #[error("nvml unavailable: {0}")]
    Nvml(String),
    /// A host probe (sysinfo) failed.
    #[error("host probe failed: {0}")]
    Probe(String),
    /// A file-system operation on the agent's data directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What the agent was doing, e.g. "cannot create".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
