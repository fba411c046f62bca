//! Finding the cluster and turning failures into exit codes scripts can rely on.

use std::time::Duration;

use gantry_proto as pb;
use tonic::transport::{Channel, Endpoint};

/// Exit codes of client commands.
pub mod exit {
    /// The command did what was asked.
    pub const OK: u8 = 0;
    /// The cluster refused or failed the request (not found, already ended...).
    pub const FAILED: u8 = 1;
    /// Bad input: usage, spec or argument errors. Nothing was changed.
    pub const INVALID: u8 = 2;
    /// The cluster could not be reached.
    pub const UNAVAILABLE: u8 = 3;
}

/// A client error carrying its exit code and one readable line.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// One line for people.
    pub message: String,
}

impl CliError {
    /// Bad input.
    pub fn invalid(message: impl Into<String>) -> CliError {
        CliError {
            code: exit::INVALID,
            message: message.into(),
        }
    }

    /// A failed request.
    pub fn failed(message: impl Into<String>) -> CliError {
        CliError {
            code: exit::FAILED,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        let code = match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => exit::INVALID,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit::UNAVAILABLE,
            _ => exit::FAILED,
        };
        let message = status.message().replace('\n', " ");
        CliError {
            code,
            message: if message.is_empty() {
                format!("{:?}", status.code())
            } else {
                message
            },
        }
    }
}

/// Connects to the leader: tries each coordinator of a comma-separated list,
/// follows a follower's pointer to the leader, and retries with back-off
/// while an election is under way (up to about 10 s).
pub async fn connect(addrs: &str) -> Result<pb::gantry_client::GantryClient<Channel>, CliError> {
    let mut candidates: Vec<String> = Vec::new();
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        if Endpoint::from_shared(url.clone()).is_err() {
            return Err(CliError::invalid(format!(
                "--addr: {url:?} is not a valid URL"
            )));
        }
        candidates.push(url);
    }
    if candidates.is_empty() {
        return Err(CliError::invalid("--addr: no coordinator address given"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut delay = Duration::from_millis(100);
    let mut last_error = String::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let mut answered = false;
        let mut queue = candidates.clone();
        let mut tried = 0;
        while let Some(url) = queue.pop() {
            tried += 1;
            if tried > 2 * candidates.len() + 2 {
                break;
            }
            let mut client = match open(&url).await {
                Ok(client) => client,
                Err(error) => {
                    last_error = error;
                    continue;
                }
            };
            match client.status(pb::StatusRequest {}).await {
                Ok(status) => {
                    answered = true;
                    let status = status.into_inner();
                    if status.is_leader {
                        return Ok(client);
                    }
                    last_error =
                        format!("coordinator at {url} does not lead and knows no leader yet");
                    if !status.leader_url.is_empty() && status.leader_url != url {
                        queue.push(status.leader_url);
                    }
                }
                Err(status) => last_error = format!("coordinator at {url}: {}", status.message()),
            }
        }
        // Nobody answering at all is not an election: fail fast.
        let give_up = !answered && rounds >= 2;
        if give_up || std::time::Instant::now() + delay > deadline {
            return Err(CliError {
                code: exit::UNAVAILABLE,
                message: last_error,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Connects to the first coordinator that answers, leader or not (for
/// `gantry status`, which every replica answers about itself).
pub async fn connect_any(
    addrs: &str,
) -> Result<pb::gantry_client::GantryClient<Channel>, CliError> {
    let mut last_error = String::from("--addr: no coordinator address given");
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        match open(&url).await {
            Ok(client) => return Ok(client),
            Err(error) => last_error = error,
        }
    }
    Err(CliError {
        code: exit::UNAVAILABLE,
        message: last_error,
    })
}

async fn open(url: &str) -> Result<pb::gantry_client::GantryClient<Channel>, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach coordinator at {url}: {e}"))?;
    Ok(pb::gantry_client::GantryClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}
