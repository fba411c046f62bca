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

/// Connects to the first coordinator of a comma-separated list that answers.
pub async fn connect(addrs: &str) -> Result<pb::gantry_client::GantryClient<Channel>, CliError> {
    let mut last_error = String::from("no address given");
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(60)),
            Err(e) => {
                return Err(CliError::invalid(format!(
                    "--addr: {url:?} is not a valid URL: {e}"
                )));
            }
        };
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(pb::gantry_client::GantryClient::new(channel)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20));
            }
            Err(e) => last_error = format!("cannot reach coordinator at {url}: {e}"),
        }
    }
    Err(CliError {
        code: exit::UNAVAILABLE,
        message: last_error,
    })
}
