//! Agent configuration and the `--fake-gpus` parser.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use gantry_scheduler::units::parse_bytes;

use crate::error::AgentError;

/// Everything an agent needs to run; built by the `gantry agent` command line
/// or by [`AgentConfig::for_test`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unique node name; the coordinator keys all node state by it.
    pub node_name: String,
    /// Address advertised to the coordinator, e.g. `127.0.0.2`.
    pub address: String,
    /// Coordinator URLs such as `http://127.0.0.1:7070`, tried in order and
    /// then round robin; a `gantry-leader` redirect jumps the queue.
    pub coordinators: Vec<String>,
    /// Jobs' output and work directories live here; disk usage is measured
    /// for the volume that holds it.
    pub data_dir: PathBuf,
    /// Labels matched by job constraints (provider, region, ...).
    pub labels: BTreeMap<String, String>,
    /// Where GPU facts come from.
    pub gpus: GpuSource,
    /// Heartbeat period; `Registered.heartbeat_interval_ms` overrides it when > 0.
    pub heartbeat_interval: Duration,
    /// SIGTERM -> SIGKILL grace when stopping a job; `CancelJob.grace_ms`
    /// overrides it when > 0.
    pub kill_grace: Duration,
    /// TLS for the coordinator link (`https://` URLs): the coordinators' CA
    /// and, for mutual TLS, the agent's certificate. `None` = plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Sent on every `ConnectAgent` when the coordinator requires it.
    pub join_token: Option<JoinToken>,
    /// Run jobs as this user (the agent must be root, or be that user).
    pub run_as: Option<RunAs>,
    /// How job supervisors are started; `None` = this binary in its hidden
    /// `supervise` mode ([`crate::supervisor::SupervisorCommand::this_binary`]).
    pub supervisor: Option<crate::supervisor::SupervisorCommand>,
    /// Whether a graceful shutdown (SIGTERM, Ctrl-C) stops the jobs too.
    /// Off by default: jobs keep running under their supervisors and the next
    /// agent process adopts them, so restarting or upgrading the agent loses
    /// nothing. `gantry dev` and the test sandbox turn it on.
    pub stop_jobs_on_exit: bool,
}

/// The agent join token; its `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(pub String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(..)")
    }
}

/// The unprivileged user jobs run as (`--run-as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Primary group id; supplementary groups are dropped (std's `uid()`
    /// clears them when the agent is root).
    pub gid: u32,
}

impl RunAs {
    /// Looks `user` up (name or numeric uid) and checks the agent may switch
    /// to it: only root may run jobs as another user.
    pub fn resolve(user: &str) -> Result<RunAs, AgentError> {
        let bad = |why: String| AgentError::Config(format!("--run-as {user:?}: {why}"));
        let found = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(user),
        }
        .map_err(|e| bad(format!("cannot look the user up: {e}")))?
        .ok_or_else(|| bad("no such user".into()))?;
        let me = nix::unistd::geteuid();
        if !me.is_root() && found.uid != me {
            return Err(bad(format!(
                "the agent runs as uid {me}, not root, so it cannot run jobs as uid {}; start it as root or drop --run-as",
                found.uid
            )));
        }
        Ok(RunAs {
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        })
    }
}

impl AgentConfig {
    /// A configuration for tests: no GPUs, no labels, address `127.0.0.1`,
    /// a fast heartbeat (200 ms) and a short kill grace (1 s).
    pub fn for_test(name: &str, data_dir: PathBuf, coordinators: Vec<String>) -> Self {
        Self {
            node_name: name.to_string(),
            address: "127.0.0.1".to_string(),
            coordinators,
            data_dir,
            labels: BTreeMap::new(),
            gpus: GpuSource::Fake(Vec::new()),
            heartbeat_interval: Duration::from_millis(200),
            kill_grace: Duration::from_secs(1),
            tls: None,
            join_token: None,
            run_as: None,
            #[cfg(not(test))]
            supervisor: None,
            // The unit-test binary doubles as the supervisor.
            #[cfg(test)]
            supervisor: Some(crate::supervisor::SupervisorCommand::for_test()),
            stop_jobs_on_exit: false,
        }
    }

    /// Checks what can be checked before connecting anywhere.
    pub(crate) fn validate(&self) -> Result<(), AgentError> {
        if self.node_name.trim().is_empty() {
            return Err(AgentError::Config("node name must not be empty".into()));
        }
        if self.coordinators.is_empty() {
            return Err(AgentError::Config(
                "at least one coordinator URL is required".into(),
            ));
        }
        for url in &self.coordinators {
            crate::link::coordinator_endpoint(url, self.tls.as_ref())
                .map_err(|e| AgentError::Config(format!("coordinator URL {url:?}: {e}")))?;
        }
        Ok(())
    }
}

/// Where the agent learns about its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    /// The NVIDIA driver through NVML, loaded at run time; no driver means no GPUs.
    Nvml,
    /// Simulated GPUs for tests and `gantry dev` (see [`crate::probe::fake`]).
    Fake(Vec<FakeGpu>),
}

/// One simulated GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    /// Model name as reported, e.g. `H100-80GiB`.
    pub model: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
}

/// Parses `2xH100-80GiB,1xRTX4090-24GiB`: comma-separated `COUNTxMODEL-SIZE`
/// groups. The size is the last `-`-separated part of the model token; the
/// model reported is the whole token (`H100-80GiB`). Errors name the bad part.
pub fn parse_fake_gpus(text: &str) -> Result<Vec<FakeGpu>, AgentError> {
    let bad = |part: &str, why: String| AgentError::FakeGpus(format!("{part:?}: {why}"));
    if text.trim().is_empty() {
        return Err(AgentError::FakeGpus(
            "empty; expected e.g. 2xH100-80GiB,1xRTX4090-24GiB".into(),
        ));
    }
    let mut gpus = Vec::new();
    for part in text.split(',').map(str::trim) {
        let Some((count, model)) = part.split_once(['x', 'X']) else {
            return Err(bad(
                part,
                "expected COUNTxMODEL-SIZE, e.g. 2xH100-80GiB".into(),
            ));
        };
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad(part, format!("count {count:?} is not a whole number")))?;
        if count == 0 {
            return Err(bad(part, "count must be at least 1".into()));
        }
        let model = model.trim();
        let Some((name, size)) = model.rsplit_once('-') else {
            return Err(bad(part, "expected MODEL-SIZE, e.g. H100-80GiB".into()));
        };
        if name.is_empty() {
            return Err(bad(part, "model name is empty".into()));
        }
        let total_bytes = parse_bytes(size).map_err(|e| bad(part, format!("size: {e}")))?;
        if total_bytes == 0 {
            return Err(bad(part, "size must be greater than zero".into()));
        }
        gpus.extend((0..count).map(|_| FakeGpu {
            model: model.to_string(),
            total_bytes,
        }));
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn ok(text: &str) -> Vec<(String, u64)> {
        parse_fake_gpus(text)
            .unwrap()
            .into_iter()
            .map(|g| (g.model, g.total_bytes))
            .collect()
    }

    fn err(text: &str) -> String {
        parse_fake_gpus(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_good_lists() {
        assert_eq!(
            ok("2xH100-80GiB,1xRTX4090-24GiB"),
            vec![
                ("H100-80GiB".to_string(), 80 * GIB),
                ("H100-80GiB".to_string(), 80 * GIB),
                ("RTX4090-24GiB".to_string(), 24 * GIB),
            ]
        );
        assert_eq!(
            ok(" 1x A100-SXM-40GiB "),
            vec![("A100-SXM-40GiB".to_string(), 40 * GIB)]
        );
        assert_eq!(
            ok("1xT4-16000000000"),
            vec![("T4-16000000000".to_string(), 16_000_000_000)]
        );
    }

    #[test]
    fn rejects_bad_input_naming_the_part() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            (
                "twoxH100-80GiB",
                "\"twoxH100-80GiB\": count \"two\" is not a whole number",
            ),
            ("0xH100-80GiB", "count must be at least 1"),
            ("-1xH100-80GiB", "is not a whole number"),
            ("2xH100-lots", "\"2xH100-lots\": size:"),
            ("2xH100", "expected MODEL-SIZE"),
            ("H100-80GiB", "expected COUNTxMODEL-SIZE"),
            ("1xH100-80GiB,,", "expected COUNTxMODEL-SIZE"),
            ("1x-80GiB", "model name is empty"),
            ("1xH100-0GiB", "greater than zero"),
        ];
        for (input, want) in cases {
            let got = err(input);
            assert!(
                got.contains(want),
                "{input:?}: {got:?} does not contain {want:?}"
            );
        }
    }
}
