//! The JSON API's streams: events as Server-Sent Events (each event's index
//! is its SSE id, so a client reconnecting with `Last-Event-ID` misses
//! nothing) and a job's output as a chunked body, over the same
//! `CoreHandle::watch` / `CoreHandle::logs` as the gRPC API.
//!
//! Each stream is counted against its caller (`--max-streams-per-client`)
//! while it is open, and follows its caller's credential as the gRPC
//! streams do (`credentials::Revocable`): once a credential reload revokes
//! the token (or lowers its role), an event stream ends with a final
//! `error` event (`{"error", "status"}`) and a log stream is aborted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, ClientAddr, HttpState, invalid, only_params, parse_job_id};
use crate::credentials::SharedAuth;
use crate::error::CoordinatorError;
use crate::json::event_json;
use crate::limits::MAX_NAME_LEN;
use crate::service::{EventFilter, StreamClient, StreamPermit};

/// The gRPC methods the two streams stand for (their roles, and the
/// credential each stream is re-checked with).
const WATCH_METHOD: &str = "/gantry.v1.Gantry/WatchEvents";
const LOGS_METHOD: &str = "/gantry.v1.Gantry/Logs";

/// What one streamed answer needs before it starts: its place among its
/// caller's streams, and the end of its credential.
struct Opened {
    /// Held, never read: dropped with the stream, it frees the place.
    _permit: StreamPermit,
    revoked: std::pin::Pin<Box<dyn Future<Output = CoordinatorError> + Send>>,
}

/// Counts a stream against its caller (its token, else its address) and
/// watches its credential; refused past the caller's limit.
fn open_stream(
    state: &HttpState,
    method: &'static str,
    headers: &HeaderMap,
    connect: Option<axum::Extension<ConnectInfo<ClientAddr>>>,
) -> Result<Opened, ApiError> {
    let caller = state.auth.current().check(method, headers, None)?;
    let address = connect.map(|axum::Extension(ConnectInfo(ClientAddr(address)))| address.ip());
    let client = StreamClient::new(caller.as_ref().map(|c| c.name.as_str()), address);
    let permit = state.core.open_stream(client)?;
    Ok(Opened {
        _permit: permit,
        revoked: Box::pin(revoked(state.auth.clone(), method, headers.clone())),
    })
}

/// Resolves once the credentials in force no longer let these headers
/// call `method` (never, while they do).
async fn revoked(auth: SharedAuth, method: &'static str, headers: HeaderMap) -> CoordinatorError {
    let mut changes = auth.changes();
    while let Some(config) = changes.next().await {
        if let Err(error) = config.check(method, &headers, None) {
            return error;
        }
    }
    // The channel closes only when the coordinator stops: the stream then
    // ends with its connection.
    std::future::pending().await
}

/// `stream` while its caller's credential holds (counted against the
/// caller all along); once revoked, `last` gives its final item, if any.
fn guarded<S, T>(
    stream: S,
    opened: Opened,
    last: fn(CoordinatorError) -> T,
) -> impl Stream<Item = T> + Send + 'static
where
    S: Stream<Item = T> + Send + 'static,
    T: Send + 'static,
{
    let start = (Box::pin(stream), opened);
    futures::stream::unfold(Some(start), move |state| async move {
        let (mut stream, mut opened) = state?;
        tokio::select! {
            item = stream.next() => item.map(|item| (item, Some((stream, opened)))),
            error = &mut opened.revoked => {
                tracing::info!(%error, "http stream closed: its credential no longer passes");
                Some((last(error), None))
            }
        }
    })
}

/// An event stream's final event: why it ended (`status` as the API's
/// status for the error, so a client can tell a revoked token, 401, from
/// a lost leader, 503).
fn error_event(error: CoordinatorError) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().event("error").data(
        serde_json::json!({ "error": error.to_string(), "status": error.http_status() })
            .to_string(),
    ))
}

/// A log stream cut short: the body is aborted, so the client sees a
/// broken transfer, never a silently short log.
fn aborted(error: CoordinatorError) -> Result<Bytes, std::io::Error> {
    Err(std::io::Error::other(error.to_string()))
}

/// How often an idle event stream sends a comment, so proxies and clients
/// can tell a quiet stream from a dead one.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A query parameter as a positive integer, if given.
fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|text| {
            text.parse::<u64>()
                .map_err(|_| invalid(name, "must be a non-negative integer"))
        })
        .transpose()
}

/// A name filter (kind, pipeline), bounded as names are in a spec.
fn name_filter(query: &HashMap<String, String>, name: &str) -> Result<String, ApiError> {
    let text = query.get(name).cloned().unwrap_or_default();
    if text.chars().count() > MAX_NAME_LEN {
        return Err(invalid(
            name,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    Ok(text)
}

/// `GET /v1/events?from=N&job=&kind=&pipeline=`: every matching event from
/// index `from` (default 1) on, history then live, as SSE with the index as
/// id. `Last-Event-ID` (sent by browsers and the Python client on
/// reconnect) wins over `from`: the stream resumes just after it.
pub(super) async fn events(
    State(state): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    connect: Option<axum::Extension<ConnectInfo<ClientAddr>>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    only_params(&query, &["from", "job", "kind", "pipeline"])?;
    // No `from`: from the oldest event kept (0; below the compaction floor
    // an explicit `from` is refused, never skipped).
    let mut from = number(&query, "from")?.unwrap_or(0);
    if let Some(last) = headers.get("last-event-id") {
        let last = last
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| invalid("Last-Event-ID", "must be an event index (an integer)"))?;
        from = last.saturating_add(1);
    }
    let filter = EventFilter {
        job: number(&query, "job")?.unwrap_or(0),
        kind: name_filter(&query, "kind")?,
        pipeline: name_filter(&query, "pipeline")?,
    };
    let opened = open_stream(&state, WATCH_METHOD, &headers, connect)?;
    let events = state.core.watch(from, filter)?;
    let stream = ReceiverStream::new(events).map(|item| match item {
        Ok(event) => Ok(SseEvent::default()
            .id(event.index.to_string())
            .event("job")
            .data(event_json(&event).to_string())),
        // The stream ends after this: the client reconnects from the
        // last id it saw.
        Err(error) => error_event(error),
    });
    let stream = guarded(stream, opened, error_event);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// `GET /v1/jobs/{id}/logs?stream=stdout|stderr&follow=true&attempt=N&offset=N`:
/// the job's output as it is on its node, streamed; with `follow`, until
/// the attempt ends. An error after the first bytes aborts the body (the
/// client sees a broken transfer, never a silently short log).
pub(super) async fn logs(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    connect: Option<axum::Extension<ConnectInfo<ClientAddr>>>,
) -> Result<Response, ApiError> {
    only_params(&query, &["stream", "follow", "attempt", "offset"])?;
    let id = parse_job_id(&id)?;
    let follow = match query.get("follow").map(String::as_str) {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => return Err(invalid("follow", "must be true or false")),
    };
    let attempt = match number(&query, "attempt")? {
        None => 0,
        Some(n) => u32::try_from(n).map_err(|_| invalid("attempt", "too large"))?,
    };
    let offset = number(&query, "offset")?.unwrap_or(0);
    let stream_name = query.get("stream").map(String::as_str).unwrap_or("stdout");
    let opened = open_stream(&state, LOGS_METHOD, &headers, connect)?;
    let chunks = state
        .core
        .logs(id, attempt, stream_name, offset, follow)
        .await?;
    let body = ReceiverStream::new(chunks).map(|item| {
        item.map(|chunk| Bytes::from(chunk.data))
            .map_err(|error| std::io::Error::other(error.to_string()))
    });
    let mut response = Body::from_stream(guarded(body, opened, aborted)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
