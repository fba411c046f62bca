//! Who may call what. Every gRPC call passes through [`Authorized`], which
//! looks its method path up in [`METHODS`] (the one table of required
//! rights) and checks the caller's credentials before the call reaches a
//! service:
//!
//! - client API (`gantry.v1.Gantry`): a bearer token (`authorization:
//!   Bearer TOKEN`) whose role covers the method, when `--tokens` is set;
//! - agent link (`gantry.v1.AgentLink`): the join token in the
//!   [`JOIN_TOKEN_METADATA`] key, when `--join-token-file` is set;
//! - Raft peers (`gantry.raft.v1.RaftPeer`): mutual TLS. When the port
//!   requires client certificates (`--tls-client-ca`), rustls has verified
//!   the caller's certificate before any call, and the peer service further
//!   takes only replica certificates: ones that chain to the client CA and
//!   are valid for server authentication (agents' and clients' certificates
//!   carry only the client-auth usage). When the port does not require
//!   certificates and any other credential is configured, peer calls are
//!   refused (fail closed).
//!
//! Without any credential configured everything is allowed (development).
//! Refusals are logged at warn with the peer address and mapped to a status
//! through [`CoordinatorError`].
//!
//! The checks in force can be replaced at run time
//! ([`crate::credentials`]): each call reads the current ones, and a call's
//! response is re-checked on every change, so an open stream ends once its
//! token is revoked. A caller with a bearer token is handed to the service
//! as a [`Caller`] request extension: jobs record it as their owner, and
//! [`may_change`] lets a `user` change only its own jobs.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};

use crate::credentials::{Revocable, SharedAuth};
use crate::error::CoordinatorError;

/// gRPC metadata key carrying an agent's join token on `ConnectAgent`.
pub const JOIN_TOKEN_METADATA: &str = "gantry-join-token";

/// What a client token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Submit, cancel, retry from the dead-letter queue, and read everything.
    User,
    /// Everything: also drain/undrain and dropping dead-lettered jobs.
    Admin,
}

impl Role {
    /// The role's name in token files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    /// Parses `user` or `admin`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One client bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    /// Who holds it (named in refusals and logs; the token never is).
    pub name: String,
    /// The secret.
    pub token: String,
    /// What it may do.
    pub role: Role,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Who made a call, by bearer token (a request extension the services read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (recorded as the owner of the jobs it submits).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Whether `caller` may `action` (cancel, retry, drop) job `job` owned by
/// `owner`. Without tokens (no caller) everything is open; an admin may
/// change any job; a user only the jobs it submitted (not those submitted
/// before tokens were configured, which have no owner).
pub fn may_change(
    caller: Option<&Caller>,
    action: &str,
    job: u64,
    owner: Option<&str>,
) -> Result<(), CoordinatorError> {
    let Some(caller) = caller else {
        return Ok(());
    };
    if caller.role == Role::Admin || owner == Some(caller.name.as_str()) {
        return Ok(());
    }
    let whose = match owner {
        Some(owner) => format!("belongs to '{owner}'"),
        None => "has no owner (submitted without tokens)".to_string(),
    };
    Err(CoordinatorError::PermissionDenied(format!(
        "{action} job {job}: the job {whose}; token '{}' (role user) may {action} only its own jobs",
        caller.name
    )))
}

/// The right a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A client bearer token with at least this role.
    Role(Role),
    /// The agent join token.
    AgentJoin,
    /// A replica: authenticated by mutual TLS.
    Peer,
}

/// Every gRPC method the coordinator serves and the right it needs. A
/// method missing here is refused whenever any credential is configured
/// (the unit test checks that every rpc of the protos has an entry).
pub const METHODS: &[(&str, Need)] = &[
    ("/gantry.v1.Gantry/Submit", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/GetJob", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/ListJobs", Need::Role(Role::User)),
    // A user may cancel, retry and drop only its own jobs (`may_change`,
    // checked by the service against the job's owner).
    ("/gantry.v1.Gantry/CancelJob", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/Logs", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/ListNodes", Need::Role(Role::User)),
    // Drain and undrain (the same rpc) change what the whole fleet may run.
    ("/gantry.v1.Gantry/Drain", Need::Role(Role::Admin)),
    // Vouching for a GPU is the operator's call, like an undrain.
    ("/gantry.v1.Gantry/ResetGpu", Need::Role(Role::Admin)),
    ("/gantry.v1.Gantry/Status", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/WatchEvents", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/DlqList", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/DlqRetry", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/DlqDrop", Need::Role(Role::User)),
    ("/gantry.v1.Gantry/GetPipeline", Need::Role(Role::User)),
    // A user may stop only the loops it submitted (`may_change`).
    ("/gantry.v1.Gantry/StopPipeline", Need::Role(Role::User)),
    // Credentials of the whole replica: an operator's call.
    (
        "/gantry.v1.Gantry/ReloadCredentials",
        Need::Role(Role::Admin),
    ),
    // Every job of every user, in one file.
    ("/gantry.v1.Gantry/SnapshotSave", Need::Role(Role::Admin)),
    // The replica set itself.
    ("/gantry.v1.Gantry/RaftMembers", Need::Role(Role::Admin)),
    ("/gantry.v1.Gantry/RaftAddMember", Need::Role(Role::Admin)),
    (
        "/gantry.v1.Gantry/RaftRemoveMember",
        Need::Role(Role::Admin),
    ),
    (
        "/gantry.v1.Gantry/RaftReplaceMember",
        Need::Role(Role::Admin),
    ),
    ("/gantry.v1.AgentLink/ConnectAgent", Need::AgentJoin),
    ("/gantry.raft.v1.RaftPeer/Step", Need::Peer),
    ("/gantry.raft.v1.RaftPeer/StepStream", Need::Peer),
    ("/gantry.raft.v1.RaftPeer/InstallSnapshot", Need::Peer),
];

/// The methods whose answer is a stream: they are closed when their
/// caller's credential is revoked. A unary call already checked runs to its
/// answer (what it did is done; cutting the answer would only hide it).
/// The unit test checks this against the protos' `returns (stream`.
pub const STREAMS: &[&str] = &[
    "/gantry.v1.Gantry/Logs",
    "/gantry.v1.Gantry/WatchEvents",
    "/gantry.v1.Gantry/SnapshotSave",
    "/gantry.v1.AgentLink/ConnectAgent",
];

/// The right `path` needs, if it is a known method.
pub fn need(path: &str) -> Option<Need> {
    METHODS.iter().find(|(p, _)| *p == path).map(|(_, n)| *n)
}

/// A method path as people say it: `/gantry.v1.Gantry/DlqDrop` -> `dlq drop`.
pub fn method_words(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut words = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            words.push(' ');
        }
        words.extend(c.to_lowercase());
    }
    words
}

/// The credentials a coordinator checks. The default checks nothing.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Client tokens; `None` = the client API is open (development).
    pub tokens: Option<Vec<BearerToken>>,
    /// The agents' join token; `None` = any agent may connect.
    pub join_token: Option<String>,
    /// Whether the port requires client certificates (mutual TLS).
    pub mtls: bool,
    /// The client CA's certificates (DER): a Raft peer's certificate must
    /// chain to one of them and be valid for server authentication.
    pub peer_roots: Vec<CertificateDer<'static>>,
}

impl AuthConfig {
    /// Whether any credential is configured.
    pub fn is_secured(&self) -> bool {
        self.tokens.is_some() || self.join_token.is_some() || self.mtls
    }

    /// Checks one call; `peer_certs` is the TLS client's certificate chain,
    /// if it presented one. `Ok` carries the caller's token, if any.
    pub fn check(
        &self,
        path: &str,
        headers: &HeaderMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Option<Caller>, CoordinatorError> {
        let Some(need) = need(path) else {
            if self.is_secured() {
                return Err(CoordinatorError::PermissionDenied(format!(
                    "unknown method {path}"
                )));
            }
            return Ok(None);
        };
        match need {
            Need::Role(role) => self.check_bearer(path, role, headers),
            Need::AgentJoin => self.check_join(headers).map(|()| None),
            Need::Peer => self.check_peer(peer_certs).map(|()| None),
        }
    }

    /// Checks a read of the HTTP JSON API: with tokens configured, any
    /// known token (either role) may read; `what` names the endpoint.
    pub fn check_http_read(&self, what: &str, headers: &HeaderMap) -> Result<(), CoordinatorError> {
        self.check_bearer(what, Role::User, headers).map(|_| ())
    }

    fn check_bearer(
        &self,
        path: &str,
        role: Role,
        headers: &HeaderMap,
    ) -> Result<Option<Caller>, CoordinatorError> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let Some(presented) = presented else {
            return Err(CoordinatorError::Unauthenticated(
                "bearer token required".into(),
            ));
        };
        let Some(secret) = presented
            .strip_prefix("Bearer ")
            .or_else(|| presented.strip_prefix("bearer "))
        else {
            return Err(CoordinatorError::Unauthenticated(
                "bearer token required (the authorization header must be 'Bearer TOKEN')".into(),
            ));
        };
        // Every token is compared, in constant time, whatever matches.
        let mut found: Option<&BearerToken> = None;
        for token in tokens {
            if constant_time_eq(token.token.as_bytes(), secret.trim().as_bytes()) {
                found = Some(token);
            }
        }
        let Some(token) = found else {
            return Err(CoordinatorError::Unauthenticated(
                "bearer token not recognised".into(),
            ));
        };
        if token.role < role {
            return Err(CoordinatorError::PermissionDenied(format!(
                "{} needs the {} role; token '{}' has role {}",
                method_words(path),
                role,
                token.name,
                token.role
            )));
        }
        Ok(Some(Caller {
            name: token.name.clone(),
            role: token.role,
        }))
    }

    fn check_peer(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
    ) -> Result<(), CoordinatorError> {
        if !self.is_secured() {
            return Ok(());
        }
        if !self.mtls {
            return Err(CoordinatorError::Unauthenticated(
                "the raft peer service needs mutual TLS (--tls-client-ca) when tokens are configured"
                    .into(),
            ));
        }
        let Some((leaf, intermediates)) = chain.and_then(<[_]>::split_first) else {
            return Err(CoordinatorError::Unauthenticated(
                "the raft peer service needs a replica's client certificate".into(),
            ));
        };
        let refused = |why: String| {
            CoordinatorError::PermissionDenied(format!(
                "the raft peer service takes only replica certificates (valid for server authentication): {why}"
            ))
        };
        let anchors = self
            .peer_roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| refused(format!("unusable client CA: {e}")))?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| refused(e.to_string()))?;
        let algorithms = tokio_rustls::rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        cert.verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| refused(e.to_string()))
    }

    fn check_join(&self, headers: &HeaderMap) -> Result<(), CoordinatorError> {
        let Some(expected) = &self.join_token else {
            return Ok(());
        };
        let presented = headers
            .get(JOIN_TOKEN_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        match presented {
            None => Err(CoordinatorError::Unauthenticated(
                "agent join token missing".into(),
            )),
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(CoordinatorError::Unauthenticated(
                "agent join token invalid".into(),
            )),
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// A gRPC service behind the credential check: calls that pass
/// [`AuthConfig::check`] go to `inner`, the others are answered with the
/// refusal's status (and a warn line naming the peer address).
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    config: SharedAuth,
}

impl<S> Authorized<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: SharedAuth) -> Authorized<S> {
        Authorized { inner, config }
    }
}

impl<S: NamedService> NamedService for Authorized<S> {
    const NAME: &'static str = S::NAME;
}

fn remote_addr(request: &Request<Body>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

impl<S> Service<Request<Body>> for Authorized<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path().to_string();
        let peer_certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let config = self.config.current();
        match config.check(
            &path,
            request.headers(),
            peer_certs.as_deref().map(Vec::as_slice),
        ) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                if !config.is_secured() || !STREAMS.contains(&path.as_str()) {
                    return Box::pin(self.inner.call(request));
                }
                // The response lives as long as the call's credential does.
                let headers = request.headers().clone();
                let still_valid: crate::credentials::StillValid = Box::new(move |next| {
                    next.check(&path, &headers, peer_certs.as_deref().map(Vec::as_slice))
                        .map(|_| ())
                });
                let changes = self.config.changes();
                let future = self.inner.call(request);
                Box::pin(async move {
                    let response = future.await?;
                    Ok(response.map(|body| Body::new(Revocable::new(body, changes, still_valid))))
                })
            }
            Err(error) => {
                let peer =
                    remote_addr(&request).map_or_else(|| "unknown".to_string(), |a| a.to_string());
                tracing::warn!(%peer, method = %path, %error, "refused");
                let status = tonic::Status::from(error);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            tokens: Some(vec![
                BearerToken {
                    name: "alice".into(),
                    token: "user-secret".into(),
                    role: Role::User,
                },
                BearerToken {
                    name: "root".into(),
                    token: "admin-secret".into(),
                    role: Role::Admin,
                },
            ]),
            join_token: Some("join-secret".into()),
            mtls: false,
            peer_roots: Vec::new(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().expect("header value"));
        }
        map
    }

    fn check(path: &str, pairs: &[(&'static str, &str)]) -> Result<Option<String>, String> {
        let checked = config().check(path, &headers(pairs), None);
        checked.map(|c| c.map(|c| c.name)).map_err(|e| {
            let message = e.to_string();
            format!("{:?}: {message}", tonic::Status::from(e).code())
        })
    }

    /// Every rpc in the protos has exactly one entry in the table.
    #[test]
    fn every_method_has_an_entry() {
        let protos = [
            ("gantry.v1", include_str!("../../proto/gantry.proto")),
            ("gantry.raft.v1", include_str!("../../proto/raft.proto")),
        ];
        let mut seen = 0;
        let mut streams = Vec::new();
        for (package, text) in protos {
            let mut service = "";
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.trim_end_matches('{').trim();
                }
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let name = rest.split('(').next().unwrap_or("").trim();
                    let path = format!("/{package}.{service}/{name}");
                    let entries = METHODS.iter().filter(|(p, _)| *p == path).count();
                    assert_eq!(entries, 1, "{path} needs exactly one entry in METHODS");
                    seen += 1;
                    if rest.contains("returns (stream") {
                        streams.push(path);
                    }
                }
            }
        }
        assert_eq!(
            seen,
            METHODS.len(),
            "METHODS lists a method the protos lack"
        );
        assert_eq!(streams, STREAMS, "STREAMS must list the streaming rpcs");
    }

    /// Method path, headers, expected caller name or error text.
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        Result<Option<&'static str>, &'static str>,
    );

    #[test]
    fn bearer_tokens_and_roles() {
        let drain = "/gantry.v1.Gantry/Drain";
        let submit = "/gantry.v1.Gantry/Submit";
        let cases: Vec<Case> = vec![
            (
                submit,
                vec![],
                Err("Unauthenticated: bearer token required"),
            ),
            (
                submit,
                vec![("authorization", "Basic abc")],
                Err("Unauthenticated: bearer token required"),
            ),
            (
                submit,
                vec![("authorization", "Bearer nope")],
                Err("Unauthenticated: bearer token not recognised"),
            ),
            (
                submit,
                vec![("authorization", "Bearer user-secret")],
                Ok(Some("alice")),
            ),
            (
                drain,
                vec![("authorization", "Bearer user-secret")],
                Err("drain needs the admin role; token 'alice' has role user"),
            ),
            (
                "/gantry.v1.Gantry/ReloadCredentials",
                vec![("authorization", "Bearer user-secret")],
                Err("PermissionDenied: reload credentials needs the admin role"),
            ),
            (
                "/gantry.v1.Gantry/RaftAddMember",
                vec![("authorization", "Bearer user-secret")],
                Err("PermissionDenied: raft add member needs the admin role"),
            ),
            (
                "/gantry.v1.Gantry/RaftMembers",
                vec![("authorization", "Bearer user-secret")],
                Err("raft members needs the admin role"),
            ),
            (
                "/gantry.v1.Gantry/RaftRemoveMember",
                vec![("authorization", "Bearer admin-secret")],
                Ok(Some("root")),
            ),
            (
                drain,
                vec![("authorization", "Bearer admin-secret")],
                Ok(Some("root")),
            ),
            (
                "/gantry.v1.Gantry/Nope",
                vec![("authorization", "Bearer admin-secret")],
                Err("unknown method"),
            ),
        ];
        for (path, pairs, expected) in cases {
            let got = check(path, &pairs);
            match expected {
                Ok(name) => assert_eq!(got, Ok(name.map(String::from)), "{path} {pairs:?}"),
                Err(text) => {
                    let error = got.expect_err(path);
                    assert!(error.contains(text), "{path} {pairs:?}: {error}");
                }
            }
        }
    }

    #[test]
    fn join_token_and_peers() {
        let join = "/gantry.v1.AgentLink/ConnectAgent";
        assert!(
            check(join, &[])
                .expect_err("missing")
                .contains("agent join token missing")
        );
        assert!(
            check(join, &[(JOIN_TOKEN_METADATA, "wrong")])
                .expect_err("wrong")
                .contains("agent join token invalid")
        );
        assert_eq!(
            check(join, &[(JOIN_TOKEN_METADATA, "join-secret")]),
            Ok(None)
        );
        for peer in [
            "/gantry.raft.v1.RaftPeer/Step",
            "/gantry.raft.v1.RaftPeer/StepStream",
            "/gantry.raft.v1.RaftPeer/InstallSnapshot",
        ] {
            assert!(
                check(peer, &[])
                    .expect_err("no mtls")
                    .contains("mutual TLS")
            );
        }
        let peer = "/gantry.raft.v1.RaftPeer/InstallSnapshot";
        let mtls = AuthConfig {
            mtls: true,
            ..config()
        };
        let error = mtls
            .check(peer, &HeaderMap::new(), None)
            .expect_err("no cert");
        assert!(error.to_string().contains("client certificate"), "{error}");
        // Nothing configured: everything is open.
        let open = AuthConfig::default();
        for (path, _) in METHODS {
            assert!(open.check(path, &HeaderMap::new(), None).is_ok(), "{path}");
        }
    }

    #[test]
    fn users_change_only_their_own_jobs() {
        let alice = Caller {
            name: "alice".into(),
            role: Role::User,
        };
        let root = Caller {
            name: "root".into(),
            role: Role::Admin,
        };
        // Caller, owner, expected refusal.
        type Case<'a> = (Option<&'a Caller>, Option<&'a str>, Result<(), &'a str>);
        let cases: &[Case] = &[
            (None, Some("bob"), Ok(())),
            (None, None, Ok(())),
            (Some(&alice), Some("alice"), Ok(())),
            (
                Some(&alice),
                Some("bob"),
                Err(
                    "cancel job 7: the job belongs to 'bob'; token 'alice' (role user) may cancel only its own jobs",
                ),
            ),
            (
                Some(&alice),
                None,
                Err(
                    "cancel job 7: the job has no owner (submitted without tokens); token 'alice' (role user) may cancel only its own jobs",
                ),
            ),
            (Some(&root), Some("bob"), Ok(())),
            (Some(&root), None, Ok(())),
        ];
        for (caller, owner, want) in cases {
            let got = may_change(*caller, "cancel", 7, *owner);
            match want {
                Ok(()) => assert!(got.is_ok(), "{caller:?} {owner:?}: {got:?}"),
                Err(text) => {
                    let error = got.expect_err("refused");
                    assert_eq!(error.to_string(), *text);
                    assert_eq!(
                        tonic::Status::from(error).code(),
                        tonic::Code::PermissionDenied
                    );
                }
            }
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn method_names_read_like_words() {
        assert_eq!(method_words("/gantry.v1.Gantry/DlqDrop"), "dlq drop");
        assert_eq!(method_words("/gantry.v1.Gantry/Drain"), "drain");
    }
}
