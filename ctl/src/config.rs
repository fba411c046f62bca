//! `gantry coordinator --config FILE`: the same settings as the flags, in
//! YAML. Flags given on the command line win over the file.
//!
//!     id: 1
//!     peers: {1: http://10.0.0.1:7070, 2: http://10.0.0.2:7070, 3: http://10.0.0.3:7070}
//!     grpc_addr: 10.0.0.1:7070
//!     http_addr: 10.0.0.1:7080
//!     data_dir: /var/lib/gantry
//!     gpu_headroom: 1GiB
//!     oom_signatures: ["CUDA out of memory"]
//!     max_heartbeat_rate: 10000   # heartbeats/s before the interval stretches
//!     queue_weights: {alice: 1, bob: 3}                   # fair share
//!     disk_thresholds: {export: {high: 0.92, low: 0.85}}  # per job kind
//!     breaker: {trip_points: 3, window: 10m, cool_down: 5m, max_doublings: 3, max_share_percent: 10}
//!     tls_cert: /etc/gantry/certs/coordinator.pem   # and tls_key, tls_client_ca,
//!     tokens: /etc/gantry/certs/tokens.yaml         # tls_ca, join_token_file

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::spec::Size;

/// `peers:` as a map or as the `--peers` string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PeersValue {
    /// `{1: URL, 2: URL}`.
    Map(BTreeMap<u64, String>),
    /// `"1=URL,2=URL"`.
    Text(String),
}

/// The coordinator's settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorFile {
    /// This replica's id.
    pub id: Option<u64>,
    /// All replicas.
    pub peers: Option<PeersValue>,
    /// gRPC listen address.
    pub grpc_addr: Option<String>,
    /// HTTP listen address (or `off`).
    pub http_addr: Option<String>,
    /// Storage directory.
    pub data_dir: Option<PathBuf>,
    /// Memory kept free on every GPU.
    pub gpu_headroom: Option<Size>,
    /// Out-of-memory stderr signatures.
    pub oom_signatures: Option<Vec<String>>,
    /// Applied entries between Raft snapshots.
    pub raft_compact_after: Option<u64>,
    /// Heartbeats per second the leader ingests before the interval stretches.
    pub max_heartbeat_rate: Option<u32>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--tokens`.
    pub tokens: Option<PathBuf>,
    /// `--join-token-file`.
    pub join_token_file: Option<PathBuf>,
    /// `--queue-weight`s.
    pub queue_weights: Option<BTreeMap<String, u32>>,
    /// `--disk-threshold`s.
    pub disk_thresholds: Option<BTreeMap<String, crate::policy::ThresholdsFile>>,
    /// `--breaker-*`.
    pub breaker: Option<crate::policy::BreakerFile>,
}

impl CoordinatorFile {
    /// The security settings, apart.
    pub fn security(&self) -> SecurityFile {
        SecurityFile {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            tls_ca: self.tls_ca.clone(),
            tokens: self.tokens.clone(),
            join_token_file: self.join_token_file.clone(),
        }
    }
}

/// The security settings of the coordinator's settings file, taken apart
/// before the other fields are moved out. The fields are repeated in
/// [`CoordinatorFile`] rather than `#[serde(flatten)]`ed because serde
/// cannot combine `flatten` with `deny_unknown_fields`, and a misspelt key
/// must stay an error.
#[derive(Debug, Default, Clone)]
pub struct SecurityFile {
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--tokens`.
    pub tokens: Option<PathBuf>,
    /// `--join-token-file`.
    pub join_token_file: Option<PathBuf>,
}

/// Reads a settings file; errors name the file and the field.
pub fn read_coordinator_file(path: &std::path::Path) -> Result<CoordinatorFile, String> {
    let text = crate::yaml_limits::read_yaml_file(path, 1 << 20, "a settings file")?;
    let deserializer = serde_yaml_ng::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_yaml_ng sometimes names the path itself.
        if inner.starts_with(&field) {
            format!("{}: {inner}", path.display())
        } else {
            format!("{}: {field}: {inner}", path.display())
        }
    })
}

impl PeersValue {
    /// The peers as a map, validated like `--peers`.
    pub fn resolve(self) -> Result<BTreeMap<u64, String>, String> {
        let text = match self {
            PeersValue::Text(text) => text,
            PeersValue::Map(map) => map
                .iter()
                .map(|(id, url)| format!("{id}={url}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        gantry_coordinator::raft::parse_peers(&text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CoordinatorFile, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("coordinator.yaml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        read_coordinator_file(&path)
    }

    #[test]
    fn settings_files() {
        let file = parse("id: 2\npeers: {1: 'http://a:1', 2: 'http://b:1'}\ngpu_headroom: 1GiB\n")
            .expect("parses");
        assert_eq!(file.id, Some(2));
        assert_eq!(file.gpu_headroom.map(|s| s.0), Some(1 << 30));
        assert_eq!(file.peers.expect("peers").resolve().map(|p| p.len()), Ok(2));
        let text = parse("peers: '1=http://a:1,2=http://b:1'\n").expect("parses");
        assert_eq!(text.peers.expect("peers").resolve().map(|p| p.len()), Ok(2));
        let secure =
            parse("tls_cert: /c.pem\ntokens: /t.yaml\njoin_token_file: /j\n").expect("parses");
        let security = secure.security();
        assert_eq!(security.tls_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(security.tokens, Some(PathBuf::from("/t.yaml")));
        assert_eq!(security.join_token_file, Some(PathBuf::from("/j")));
        let error = parse("id: 1\nport: 3\n").expect_err("unknown field");
        assert!(error.contains("unknown field `port`"), "{error}");
        let policy = parse(
            "queue_weights: {a: 1, b: 3}\ndisk_thresholds: {export: {high: 0.9, low: 0.8}}\n",
        )
        .expect("parses");
        assert_eq!(policy.queue_weights.map(|w| w.len()), Some(2));
        let error = parse("disk_thresholds: {export: {high: 0.9}}\n").expect_err("no low");
        assert!(
            error.contains("disk_thresholds.export: missing field `low`"),
            "{error}"
        );
        let breaker = parse("breaker: {trip_points: 4, window: 1h}\n").expect("parses");
        let breaker = breaker.breaker.expect("breaker");
        assert_eq!(
            (breaker.trip_points, breaker.window.as_deref()),
            (Some(4), Some("1h"))
        );
        let error = parse("breaker: {trips: 4}\n").expect_err("unknown key");
        assert!(error.contains("breaker: unknown field `trips`"), "{error}");
        let error = parse("gpu_headroom: -1\n").expect_err("negative");
        assert!(error.contains("gpu_headroom"), "{error}");
    }
}
