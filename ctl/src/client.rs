//! Finding the cluster and turning failures into exit codes scripts can rely on.

use std::time::{Duration, Instant};

use gantry_proto as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::security::{ClientTlsFiles, check_scheme};

/// A client of the cluster with the caller's credentials on every call.
pub type Client = pb::gantry_client::GantryClient<InterceptedService<Channel, Credentials>>;

/// Adds `authorization: Bearer TOKEN` to every call, when a token is given.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// How to reach the cluster: addresses, TLS, token; checked once.
pub(crate) struct Setup {
    urls: Vec<String>,
    tls: Option<ClientTlsConfig>,
    /// Whether a client certificate is presented.
    client_cert: bool,
    credentials: Credentials,
}

impl Setup {
    /// What to check when a connection breaks before any answer.
    fn hint(&self) -> &'static str {
        match &self.tls {
            None => " (if the coordinator serves TLS: an https:// address and --tls-ca)",
            Some(_) if self.client_cert => {
                " (TLS: if the coordinator refused this client certificate, its log says why)"
            }
            Some(_) => {
                " (TLS: does the coordinator require a client certificate? --tls-cert, --tls-key)"
            }
        }
    }

    pub(crate) fn new(opts: &crate::ClientOpts) -> Result<Setup, CliError> {
        let tls = ClientTlsFiles {
            ca: opts.tls_ca.clone(),
            cert: opts.tls_cert.clone(),
            key: opts.tls_key.clone(),
        }
        .load()
        .map_err(CliError::invalid)?;
        let bearer = match opts.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                CliError::invalid("--token: not a valid token (printable ASCII only)")
            })?),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut urls = Vec::new();
        for addr in opts
            .addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let url = if addr.contains("://") {
                addr.to_string()
            } else {
                format!("{scheme}://{addr}")
            };
            if Endpoint::from_shared(url.clone()).is_err() {
                return Err(CliError::invalid(format!(
                    "--addr: {url:?} is not a valid URL"
                )));
            }
            check_scheme("--addr", &url, tls.is_some()).map_err(CliError::invalid)?;
            urls.push(url);
        }
        if urls.is_empty() {
            return Err(CliError::invalid("--addr: no coordinator address given"));
        }
        Ok(Setup {
            urls,
            tls,
            client_cert: opts.tls_cert.is_some(),
            credentials: Credentials { bearer },
        })
    }
}

/// Exit codes of client commands.
pub mod exit {
    /// The command did what was asked.
    pub const OK: u8 = 0;
    /// The cluster refused or failed the request (not found, already ended...).
    pub const FAILED: u8 = 1;
    /// Bad input: usage, spec or argument errors. Nothing was changed.
    pub const INVALID: u8 = 2;
    /// The cluster could not be reached (including a failed TLS handshake).
    pub const UNAVAILABLE: u8 = 3;
    /// The cluster refused the caller's credentials: no or unknown token
    /// (UNAUTHENTICATED), or a role that does not cover the command
    /// (PERMISSION_DENIED). Nothing was changed.
    pub const DENIED: u8 = 4;
    /// Recorded, but not confirmed in time: `gantry cancel` of a job whose
    /// agent has not reported its attempt ended (it may still start or
    /// run there; the job is never placed again).
    pub const UNCONFIRMED: u8 = 5;
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
        // A broken connection (a TLS refusal, plaintext to a TLS port) is a
        // status whose causes say why.
        if let Some(source) = std::error::Error::source(&status) {
            let causes = error_chain(source);
            let (code, hint) = if causes.contains("CertificateRequired") {
                (
                    exit::DENIED,
                    " (the coordinator requires a client certificate: --tls-cert and --tls-key)",
                )
            } else if causes.contains("certificate") || causes.contains("Certificate") {
                (exit::DENIED, " (TLS: the certificate was refused)")
            } else {
                (exit::UNAVAILABLE, "")
            };
            return CliError {
                code,
                message: format!("{}: {causes}{hint}", status.message()),
            };
        }
        let code = match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => exit::INVALID,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit::UNAVAILABLE,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => exit::DENIED,
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
pub async fn connect(opts: &crate::ClientOpts) -> Result<Client, CliError> {
    let setup = Setup::new(opts)?;
    connect_leader(&setup, Instant::now() + Duration::from_secs(10), true).await
}

/// [`connect`] until `deadline`. With `fail_fast`, gives up after two rounds
/// in which no coordinator answered at all (a wrong address, not an
/// election); without it, keeps trying until the deadline (a submit whose
/// leader died may be waiting for it to come back).
pub(crate) async fn connect_leader(
    setup: &Setup,
    deadline: Instant,
    fail_fast: bool,
) -> Result<Client, CliError> {
    let candidates = setup.urls.clone();
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
            let mut client = match open(&url, setup).await {
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
                // Credentials are refused the same way by every replica.
                Err(status) if refused(&status) => return Err(status.into()),
                Err(status) => {
                    let broken = std::error::Error::source(&status).is_some();
                    let error = CliError::from(status);
                    if error.code == exit::DENIED {
                        return Err(CliError {
                            code: error.code,
                            message: format!("coordinator at {url}: {}", error.message),
                        });
                    }
                    let hint = if broken { setup.hint() } else { "" };
                    last_error = format!("coordinator at {url}: {}{hint}", error.message);
                }
            }
        }
        // Nobody answering at all is not an election: fail fast.
        let give_up = fail_fast && !answered && rounds >= 2;
        if give_up || Instant::now() + delay > deadline {
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
pub async fn connect_any(opts: &crate::ClientOpts) -> Result<Client, CliError> {
    let setup = Setup::new(opts)?;
    let mut last_error = String::from("--addr: no coordinator address given");
    for url in &setup.urls {
        match open(url, &setup).await {
            Ok(client) => return Ok(client),
            Err(error) => last_error = error,
        }
    }
    Err(CliError {
        code: exit::UNAVAILABLE,
        message: last_error,
    })
}

/// Whether a status is a credential refusal (not worth trying elsewhere).
fn refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// The one place the CLI builds a channel: TLS when configured, the
/// caller's token on every call.
async fn open(url: &str, setup: &Setup) -> Result<Client, String> {
    check_scheme("coordinator URL", url, setup.tls.is_some())?;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60));
    if let Some(tls) = &setup.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS settings for {url}: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach coordinator at {url}: {}", error_chain(&e)))?;
    Ok(
        pb::gantry_client::GantryClient::with_interceptor(channel, setup.credentials.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
    )
}

/// An error with its causes ("transport error: ...: invalid peer
/// certificate: UnknownIssuer"): TLS failures are only in the causes.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
