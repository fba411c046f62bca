//! HTTP beside gRPC: `/metrics` (Prometheus), the JSON API under `/v1`,
//! `/healthz`, `/readyz` and the status page at `/`.
//!
//! The JSON API reads and writes what the gRPC API does, through the same
//! [`CoreHandle`] functions: one validation with the same error texts, the
//! roles of `auth::METHODS` (each write checks the gRPC method it stands
//! for), JSON rendered with the same views as `gantry -o json`. Writes are
//! in `writes`, the event and log streams in `streams`, and the OpenAPI 3
//! description of every route in `openapi.json` (`/v1/openapi.json`).
//!
//! A follower answers `/metrics` with its own Raft metrics, `/v1/status` with
//! its own view, and the rest with 503 naming the leader (`gantry-leader`
//! header and `leader` field), as the gRPC API does, and the leader's HTTP
//! base URL (`gantry-leader-http` header and `leader_http` field), which
//! replicas learn from each other's Raft batches (`raft::http_urls`), so an
//! HTTP client given one follower's address finds the leader.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::middleware;

use crate::core::{JobFilter, Request};
use crate::credentials::{SharedAuth, TlsSource};
use crate::domain::JobState;
use crate::error::{CoordinatorError, LEADER_METADATA};
use crate::json::{job_json, node_json, status_json};
use crate::metrics;
use crate::server::{Failure, Handshaken, accept_tls};
use crate::service::CoreHandle;
use gantry_scheduler::JobKind;

mod streams;
mod writes;

pub use writes::IDEMPOTENCY_KEY;

/// The status page: one self-contained file, no build step.
const STATUS_PAGE: &str = include_str!("status.html");

/// The OpenAPI 3 description of the JSON API; a test checks its paths
/// against [`api_paths`] and an integration test its methods against the
/// running server.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The header naming the leader's HTTP base URL in a follower's 503.
pub const LEADER_HTTP_HEADER: &str = "gantry-leader-http";

/// Jobs returned by `/v1/jobs` when no `limit` is given.
const DEFAULT_JOB_LIMIT: usize = 1000;

/// Most jobs one `/v1/jobs` page may ask for: an answer is built in memory.
const MAX_JOB_LIMIT: usize = 10_000;

/// How long `/healthz` waits for the core to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The core, as the gRPC services reach it.
    pub core: CoreHandle,
    /// Credentials: with client tokens configured, `/v1` needs one.
    pub auth: SharedAuth,
    /// Set when the replica loop stopped on its own: both probes
    /// then answer 503 with the reason until the process exits.
    pub failure: Failure,
}

/// The JSON API's routes behind the token check; the router is built from
/// this table, so [`api_paths`] is exactly what is served.
fn api_routes() -> Vec<(&'static str, MethodRouter<HttpState>)> {
    vec![
        ("/v1/status", get(cluster_status)),
        ("/v1/nodes", get(nodes)),
        ("/v1/nodes/{name}/drain", post(writes::drain)),
        ("/v1/nodes/{name}/undrain", post(writes::undrain)),
        ("/v1/nodes/{name}/gpus/{gpu}/reset", post(writes::reset_gpu)),
        ("/v1/jobs", get(jobs).post(writes::submit)),
        ("/v1/jobs/{id}", get(job)),
        ("/v1/jobs/{id}/cancel", post(writes::cancel)),
        ("/v1/jobs/{id}/logs", get(streams::logs)),
        ("/v1/dlq", get(dlq)),
        ("/v1/dlq/{id}", delete(writes::dlq_drop)),
        ("/v1/dlq/{id}/retry", post(writes::dlq_retry)),
        ("/v1/events", get(streams::events)),
        ("/v1/pipelines/{name}", get(pipeline)),
        ("/v1/pipelines/{name}/stop", post(writes::stop_pipeline)),
    ]
}

/// The description itself is open, like the status page.
const OPENAPI_PATH: &str = "/v1/openapi.json";

/// Every path under `/v1` the router serves.
pub fn api_paths() -> Vec<&'static str> {
    let mut paths: Vec<&'static str> = api_routes().into_iter().map(|(path, _)| path).collect();
    paths.push(OPENAPI_PATH);
    paths
}

/// The routes. `/v1` is behind the bearer-token check when tokens are
/// configured (any role reads; each write also needs its method's role);
/// `/metrics`, `/healthz`, `/readyz`, the OpenAPI description and the page
/// itself (static, it fetches `/v1` with the token the user gives it) stay
/// open for probes and scrapers.
pub fn router(state: HttpState) -> Router {
    let api = api_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            name_leader_http,
        ));
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(OPENAPI_PATH, get(openapi))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Serves the routes on `listener` (HTTPS with `tls`) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsSource>,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The client's address counts its streams when it has no token.
    let app = router(state).into_make_service_with_connect_info::<ClientAddr>();
    match tls {
        None => {
            axum::serve(NodelayListener(listener), app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        Some(tls) => {
            let local = listener.local_addr()?;
            let handshaken = accept_tls(listener, tls, shutdown.clone());
            axum::serve(TlsListener { handshaken, local }, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}

/// The address a request came from (a request extension, as
/// `ConnectInfo<ClientAddr>`), over plain TCP or TLS alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, NodelayListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, NodelayListener>) -> ClientAddr {
        ClientAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> ClientAddr {
        ClientAddr(*stream.remote_addr())
    }
}

/// Plain connections with Nagle's algorithm off (as the TLS ones): a
/// response must not wait for the client's acknowledgement of the last.
struct NodelayListener(TcpListener);

impl axum::serve::Listener for NodelayListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Connections after their TLS handshake, for `axum::serve`.
struct TlsListener {
    handshaken: Handshaken,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The acceptor stops only at shutdown, when the server stops
            // asking; wait for that rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn require_token(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let what = format!("{} {}", request.method(), request.uri().path());
    match state.auth.check_http_read(&what, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(error) => {
            tracing::warn!(path = %request.uri().path(), %error, "http request refused");
            writes::drain_body(request.into_body()).await;
            ApiError(error).into_response()
        }
    }
}

/// A follower's 503 also names the leader's HTTP base URL, once this
/// replica knows it (see the module docs): the handlers' errors know only
/// the gRPC URL, the state knows the rest.
async fn name_leader_http(
    State(state): State<HttpState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    if response.status() != StatusCode::SERVICE_UNAVAILABLE {
        return response;
    }
    let Some(ErrorBody(mut body)) = response.extensions_mut().remove::<ErrorBody>() else {
        return response;
    };
    let Some(url) = body.get("leader").and(state.core.leader_http_url()) else {
        return response;
    };
    let Ok(value) = HeaderValue::from_str(&url) else {
        return response;
    };
    body["leader_http"] = json!(url);
    let headers = response.headers_mut();
    headers.insert(LEADER_HTTP_HEADER, value);
    headers.remove(header::CONTENT_LENGTH);
    *response.body_mut() = axum::body::Body::from(body.to_string());
    response
}

/// An error answer's JSON body, kept beside it for [`name_leader_http`].
#[derive(Clone)]
struct ErrorBody(Value);

/// A failed API call: a JSON body `{"error": ...}` (with `field` and
/// `reason` for bad input, `leader` from a follower) and the status chosen
/// by [`CoordinatorError::http_status`].
struct ApiError(CoordinatorError);

impl From<CoordinatorError> for ApiError {
    fn from(error: CoordinatorError) -> ApiError {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = json!({ "error": self.0.to_string() });
        if let CoordinatorError::InvalidArgument { field, reason } = &self.0 {
            body["field"] = json!(field);
            body["reason"] = json!(reason);
        }
        let leader = match &self.0 {
            CoordinatorError::NotLeader { leader } => leader.clone(),
            _ => None,
        };
        if let Some(url) = &leader {
            body["leader"] = json!(url);
        }
        let mut response = (status, axum::Json(body.clone())).into_response();
        response.extensions_mut().insert(ErrorBody(body));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gantry\""),
            );
        }
        if let Some(value) = leader.and_then(|url| HeaderValue::from_str(&url).ok()) {
            response.headers_mut().insert(LEADER_METADATA, value);
        }
        response
    }
}

/// A job id from the path.
fn parse_job_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        invalid(
            "id",
            format!(
                "{:?} is not a job id (a positive integer)",
                crate::spec_file::printable(id, 64)
            ),
        )
    })
}

fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
    ApiError(CoordinatorError::InvalidArgument {
        field: field.to_string(),
        reason: reason.into(),
    })
}

/// Refuses query parameters the endpoint does not know, naming them.
fn only_params(query: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match query.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) if known.is_empty() => {
            Err(invalid(unknown, "this endpoint takes no parameters"))
        }
        Some(unknown) => Err(invalid(
            unknown,
            format!("unknown parameter (expected one of: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

async fn status_page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(STATUS_PAGE))
}

/// OpenMetrics when the scraper asks for it (Prometheus does), the classic
/// text format otherwise.
async fn metrics_text(
    State(HttpState { core, .. }): State<HttpState>,
    headers: HeaderMap,
) -> Response {
    let raft = core.raft_status();
    // On a follower (or mid-election) the core refuses: render Raft only.
    let view = if raft.is_leader {
        core.call(|reply| Request::ClusterView { reply })
            .await
            .ok()
            .map(Arc::new)
    } else {
        None
    };
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    // Rendering is CPU work that grows with the fleet (about 80 ms for
    // 10,000 nodes x 8 GPUs, see bench/benches/metrics.rs): keep it off the
    // async workers that serve gRPC.
    let rendered = tokio::task::spawn_blocking(move || {
        let text = metrics::render(core.metrics(), &raft, view);
        if wants_openmetrics {
            (metrics::OPENMETRICS_CONTENT_TYPE, text)
        } else {
            (
                metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
                metrics::to_prometheus_text(&text),
            )
        }
    })
    .await;
    match rendered {
        Ok((content_type, text)) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(error) => ApiError(CoordinatorError::Unavailable(format!(
            "metrics rendering failed: {error}"
        )))
        .into_response(),
    }
}

/// Why this replica is broken beyond repair, if it is: a recorded
/// [`Failure`], or a replica loop that stopped while the server still runs
/// (the failure watcher may not have run yet).
fn broken(core: &CoreHandle, failure: &Failure) -> Option<String> {
    if let Some(reason) = failure.reason() {
        return Some(reason.to_string());
    }
    let raft = core.raft_status();
    match raft.fatal {
        Some(reason) => Some(format!("replication stopped: {reason}")),
        None if !raft.running => Some("replication has stopped".to_string()),
        None => None,
    }
}

/// Healthy while the core (on the replica loop) answers and nothing has
/// stopped on its own; 503 with the reason otherwise.
async fn healthz(State(HttpState { core, failure, .. }): State<HttpState>) -> Response {
    if let Some(reason) = broken(&core, &failure) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    let answered =
        tokio::time::timeout(HEALTH_TIMEOUT, core.call(|reply| Request::Status { reply })).await;
    if let Ok(Ok(_)) = answered {
        return (StatusCode::OK, "ok\n").into_response();
    }
    // The replica loop may have died while the call waited: its reason.
    if let Some(reason) = broken(&core, &failure) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    match answered {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Err(error)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "coordinator core did not answer within 2s\n",
        )
            .into_response(),
    }
}

/// Ready once this replica knows a leader and has applied everything it
/// knows committed: only then do its reads reflect the cluster.
async fn readyz(State(HttpState { core, failure, .. }): State<HttpState>) -> Response {
    let raft = core.raft_status();
    let reason = if let Some(reason) = broken(&core, &failure) {
        Some(reason)
    } else if raft.leader_id.is_none() {
        Some("no leader known (election in progress)".to_string())
    } else if raft.applied_index < raft.commit_index {
        Some(format!(
            "applying the log: applied {} of {} committed entries",
            raft.applied_index, raft.commit_index
        ))
    } else {
        None
    };
    let body = json!({
        "ready": reason.is_none(),
        "reason": reason,
        "is_leader": raft.is_leader,
        "leader_id": raft.leader_id,
        "leader_url": raft.leader_url,
        "leader_http": core.leader_http_url(),
        "commit_index": raft.commit_index,
        "applied_index": raft.applied_index,
    });
    let status = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn cluster_status(
    State(HttpState { core, .. }): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    only_params(&query, &[])?;
    let status = core.call(|reply| Request::Status { reply }).await?;
    Ok(axum::Json(status_json(&status)))
}

async fn nodes(
    State(HttpState { core, .. }): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    only_params(&query, &[])?;
    core.require_leader()?;
    let nodes = core.call(|reply| Request::ListNodes { reply }).await?;
    Ok(axum::Json(nodes.iter().map(node_json).collect()))
}

async fn jobs(
    State(HttpState { core, .. }): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    only_params(&query, &["state", "limit", "kind", "pipeline"])?;
    let mut states = Vec::new();
    for name in query
        .get("state")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let state = JobState::parse(name).ok_or_else(|| {
            invalid(
                "state",
                format!(
                    "unknown state {:?} (expected one of {})",
                    crate::spec_file::printable(name, 64),
                    JobState::ALL.map(|s| s.as_str()).join(", ")
                ),
            )
        })?;
        states.push(state);
    }
    let limit = match query.get("limit") {
        None => DEFAULT_JOB_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > MAX_JOB_LIMIT => {
                return Err(invalid(
                    "limit",
                    format!("{n} is more than the {MAX_JOB_LIMIT} jobs a page may hold"),
                ));
            }
            Ok(n) if n > 0 => n,
            _ => {
                return Err(invalid(
                    "limit",
                    format!(
                        "{:?} is not a positive integer",
                        crate::spec_file::printable(text, 64)
                    ),
                ));
            }
        },
    };
    let filter = job_filter(&query)?;
    core.require_leader()?;
    let jobs = core
        .call(|reply| Request::ListJobs {
            states,
            limit,
            owner: None,
            filter,
            reply,
        })
        .await?;
    Ok(axum::Json(jobs.iter().map(job_json).collect()))
}

/// `kind=` and `pipeline=` of `/v1/jobs`, checked: a kind the specs know,
/// a pipeline name no longer than names can be.
fn job_filter(query: &HashMap<String, String>) -> Result<JobFilter, ApiError> {
    let kind = match query.get("kind").map(String::as_str) {
        None | Some("") => None,
        Some(name) => Some(JobKind::parse(name).ok_or_else(|| {
            invalid(
                "kind",
                format!(
                    "unknown kind {:?} (expected one of {})",
                    crate::spec_file::printable(name, 64),
                    JobKind::ALL.map(JobKind::as_str).join(", ")
                ),
            )
        })?),
    };
    let pipeline = match query.get("pipeline").map(String::as_str) {
        None | Some("") => None,
        Some(name) if name.chars().count() > crate::limits::MAX_NAME_LEN => {
            return Err(invalid(
                "pipeline",
                format!("longer than {} characters", crate::limits::MAX_NAME_LEN),
            ));
        }
        Some(name) => Some(name.to_string()),
    };
    Ok(JobFilter { kind, pipeline })
}

/// `GET /v1/pipelines/{name}?run=N`: a run's jobs (the latest run without
/// `run`).
async fn pipeline(
    State(HttpState { core, .. }): State<HttpState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    only_params(&query, &["run"])?;
    if name.chars().count() > crate::limits::MAX_NAME_LEN {
        return Err(invalid("name", "longer than a pipeline name can be"));
    }
    let run = match query.get("run") {
        None => 0,
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| invalid("run", "must be a run number (a positive integer)"))?,
    };
    core.require_leader()?;
    let view = core
        .call(|reply| Request::Pipeline { name, run, reply })
        .await?;
    Ok(axum::Json(crate::json::pipeline_json(&view)))
}

async fn job(
    State(HttpState { core, .. }): State<HttpState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = parse_job_id(&id)?;
    core.require_leader()?;
    let job = core.call(|reply| Request::GetJob { id, reply }).await?;
    Ok(axum::Json(job_json(&job)))
}

async fn dlq(
    State(HttpState { core, .. }): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    only_params(&query, &[])?;
    core.require_leader()?;
    let jobs = core.call(|reply| Request::DlqList { reply }).await?;
    Ok(axum::Json(jobs.iter().map(job_json).collect()))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(CoordinatorError::NotFound(format!(
        "no endpoint {}; try /, /metrics, /healthz, /readyz, {}",
        crate::spec_file::printable(uri.path(), 128),
        api_paths().join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI description names exactly the paths the router serves
    /// (its methods are checked against a running server by the
    /// integration test `http_api`).
    #[test]
    fn openapi_describes_every_served_path() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let mut described: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let mut served = api_paths();
        described.sort_unstable();
        served.sort_unstable();
        assert_eq!(described, served);
    }
}
