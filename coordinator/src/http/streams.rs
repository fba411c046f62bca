//! The JSON API's streams: events as Server-Sent Events (each event's index
//! is its SSE id, so a client reconnecting with `Last-Event-ID` misses
//! nothing) and a job's output as a chunked body, over the same
//! `CoreHandle::watch` / `CoreHandle::logs` as the gRPC API.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, HttpState, invalid, only_params, parse_job_id};
use crate::json::event_json;
use crate::limits::MAX_NAME_LEN;
use crate::service::EventFilter;

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
    let events = state.core.watch(from, filter)?;
    let stream = ReceiverStream::new(events).map(|item| {
        Ok(match item {
            Ok(event) => SseEvent::default()
                .id(event.index.to_string())
                .event("job")
                .data(event_json(&event).to_string()),
            // The stream ends after this: the client reconnects from the
            // last id it saw.
            Err(error) => SseEvent::default()
                .event("error")
                .data(serde_json::json!({ "error": error.to_string() }).to_string()),
        })
    });
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
    let chunks = state
        .core
        .logs(id, attempt, stream_name, offset, follow)
        .await?;
    let body = ReceiverStream::new(chunks).map(|item| {
        item.map(|chunk| Bytes::from(chunk.data))
            .map_err(|error| std::io::Error::other(error.to_string()))
    });
    let mut response = Body::from_stream(body).into_response();
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
