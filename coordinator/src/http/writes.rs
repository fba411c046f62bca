//! The JSON API's writes: the same validation, error texts, roles and
//! leader redirection as the gRPC API, through the same `CoreHandle`
//! functions. Each handler checks the role of the gRPC method it stands for
//! (`auth::METHODS` is the one table); the body is read with a hard limit
//! and parsed with the schema of `gantry submit -f` (`spec_file`).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use gantry_proto as pb;
use serde_json::json;

use super::{ApiError, HttpState, invalid, only_params, parse_job_id};
use crate::auth::Caller;
use crate::decide::effects::CancelProgress;
use crate::error::CoordinatorError;
use crate::limits::MAX_NAME_LEN;
use crate::spec_file::{MAX_SPEC_FILE_BYTES, ParsedSpec, SpecError, parse_spec_text, printable};

/// The header carrying a submission's idempotency key (`gantry submit --key`).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How much of a body past the limit is read and dropped so the client
/// still gets its 400 (a connection closed on unread data is reset, and the
/// answer lost); past this the connection is simply closed.
const MAX_BODY_DRAIN: u64 = 64 << 20;

/// Reads and drops a refused request's body (up to [`MAX_BODY_DRAIN`]):
/// a connection closed with unread data is reset, and the refusal lost.
pub(super) async fn drain_body(body: Body) {
    let _ = read_body(body).await;
}

/// Refuses the call unless the caller's token may use `method` (a gRPC
/// method path: the HTTP route does what that method does); the caller
/// (`None` when no tokens are configured) for the ownership checks.
fn authorize(
    state: &HttpState,
    method: &str,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    state
        .auth
        .current()
        .check(method, headers, None)
        .map_err(|error| {
            tracing::warn!(method, %error, "http request refused");
            ApiError(error)
        })
}

/// The body as text, at most [`MAX_SPEC_FILE_BYTES`]; a larger one is
/// refused naming `body` (after reading and dropping up to
/// [`MAX_BODY_DRAIN`], so the refusal reaches the client).
async fn read_body(body: Body) -> Result<String, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| invalid("body", format!("cannot read the body: {e}")))?;
        total = total.saturating_add(chunk.len() as u64);
        if total <= MAX_SPEC_FILE_BYTES {
            bytes.extend_from_slice(&chunk);
        } else if total > MAX_BODY_DRAIN {
            break;
        }
    }
    if total > MAX_SPEC_FILE_BYTES {
        return Err(invalid(
            "body",
            format!(
                "larger than the {} limit for a spec",
                gantry_scheduler::units::format_bytes(MAX_SPEC_FILE_BYTES)
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        invalid(
            "body",
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// A spec error as the API's 400: the field path (`body` when the error
/// is about the whole) and the reason, exactly as `gantry submit -f` words
/// them after the file name.
fn spec_error(error: SpecError) -> ApiError {
    let field = if error.field.is_empty() {
        "body".to_string()
    } else {
        error.field
    };
    ApiError(CoordinatorError::InvalidArgument {
        field,
        reason: error.reason,
    })
}

/// Parses a spec body: YAML when the content type says so (the text of a
/// spec file, several documents allowed), JSON otherwise (one document).
fn parse_body(headers: &HeaderMap, text: &str) -> Result<ParsedSpec, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if content_type.contains("yaml") {
        return parse_spec_text(text, "").map_err(spec_error);
    }
    // serde_json refuses nesting past 128 levels, so no depth pre-scan.
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid("body", format!("not JSON: {e}")))?;
    let value = serde_yaml_ng::to_value(&json)
        .map_err(|e| invalid("body", format!("cannot read the spec: {e}")))?;
    crate::spec_file::spec_from_value(value, "").map_err(spec_error)
}

/// `POST /v1/jobs`: one job, a list or a pipeline; `Idempotency-Key` as
/// `--key`. 201 with the ids (the same ids again for a key seen before).
pub(super) async fn submit(
    State(state): State<HttpState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Read (bounded) before refusing anything, so every refusal reaches
    // the client; a refused token still wins over a bad body.
    let text = read_body(body).await;
    let caller = authorize(&state, "/gantry.v1.Gantry/Submit", &headers)?;
    only_params(&query, &[])?;
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => String::new(),
        Some(value) => value
            .to_str()
            .map_err(|_| invalid("Idempotency-Key", "must be visible ASCII"))?
            .to_string(),
    };
    let parsed = parse_body(&headers, &text?)?;
    let request = pb::SubmitRequest {
        jobs: parsed.jobs,
        submission_key: key,
        pipeline: parsed.pipeline.unwrap_or_default(),
        repeat: parsed.repeat,
        run_dir: parsed.run_dir,
    };
    let ids = state.core.submit(request, caller.map(|c| c.name)).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "job_ids": ids }))).into_response())
}

/// `POST /v1/jobs/{id}/cancel`: answered once the cancel is settled (or
/// after a bounded wait), with the job's state and whether it is settled
/// (`settled: false` names the attempt its agent has not confirmed ended).
pub(super) async fn cancel(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, "/gantry.v1.Gantry/CancelJob", &headers)?;
    let id = parse_job_id(&id)?;
    let body = match state.core.cancel(id, caller.as_ref()).await? {
        CancelProgress::Settled(job_state) => {
            json!({ "id": id, "state": job_state.as_str(), "settled": true })
        }
        CancelProgress::Cancelling {
            node,
            attempt,
            state: job_state,
        } => json!({
            "id": id,
            "state": job_state.as_str(),
            "settled": false,
            "node": node,
            "attempt": attempt,
        }),
    };
    Ok(axum::Json(body).into_response())
}

/// `POST /v1/dlq/{id}/retry`, optionally with a corrected spec (one job,
/// in the schema of a spec file) as the body.
pub(super) async fn dlq_retry(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let text = read_body(body).await;
    let caller = authorize(&state, "/gantry.v1.Gantry/DlqRetry", &headers)?;
    let id = parse_job_id(&id)?;
    let text = text?;
    let spec = if text.trim().is_empty() {
        None
    } else {
        let parsed = parse_body(&headers, &text)?;
        if parsed.pipeline.is_some() || parsed.jobs.len() != 1 {
            return Err(invalid(
                "body",
                "a corrected spec is one job (a mapping), not a list or a pipeline",
            ));
        }
        parsed.jobs.into_iter().next()
    };
    state.core.dlq_retry(id, spec, caller.as_ref()).await?;
    Ok(axum::Json(json!({ "id": id, "retried": true })).into_response())
}

/// `DELETE /v1/dlq/{id}`: the job is dropped for good (a user token only
/// its own jobs; see `CoreHandle::dlq_drop`).
pub(super) async fn dlq_drop(
    State(state): State<HttpState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, "/gantry.v1.Gantry/DlqDrop", &headers)?;
    let id = parse_job_id(&id)?;
    state.core.dlq_drop(id, caller.as_ref()).await?;
    Ok(axum::Json(json!({ "id": id, "dropped": true })).into_response())
}

/// `POST /v1/pipelines/{name}/stop`: the loop ends after its current run
/// (a user token only its own pipelines; see `CoreHandle::stop_pipeline`).
pub(super) async fn stop_pipeline(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, "/gantry.v1.Gantry/StopPipeline", &headers)?;
    let run = state
        .core
        .stop_pipeline(name.clone(), caller.as_ref())
        .await?;
    Ok(axum::Json(json!({ "name": name, "stopped": true, "last_run": run })).into_response())
}

/// A node name from the path, bounded before it is echoed anywhere.
fn node_name(name: &str) -> Result<String, ApiError> {
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(invalid(
            "node",
            format!(
                "{:?} is not a node name (1 to {MAX_NAME_LEN} characters)",
                printable(name, 64)
            ),
        ));
    }
    Ok(name.to_string())
}

/// `POST /v1/nodes/{name}/drain?deadline=30m` (admin): no new placements;
/// with a deadline, the node's jobs are preempted then and run elsewhere.
pub(super) async fn drain(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, "/gantry.v1.Gantry/Drain", &headers)?;
    only_params(&query, &["deadline"])?;
    let node = node_name(&name)?;
    let deadline_ms = match query.get("deadline") {
        None => 0,
        Some(text) => match gantry_scheduler::units::parse_duration_ms(text) {
            Ok(0) => {
                return Err(invalid(
                    "deadline",
                    "must be more than zero (e.g. 30s, 30m, 2h)",
                ));
            }
            Ok(ms) => ms,
            Err(e) => return Err(invalid("deadline", format!("{e} (e.g. 30s, 30m, 2h)"))),
        },
    };
    state
        .core
        .set_drain(node.clone(), true, deadline_ms)
        .await?;
    Ok(axum::Json(json!({
        "node": node,
        "draining": true,
        "deadline_after_ms": (deadline_ms > 0).then_some(deadline_ms),
    }))
    .into_response())
}

/// `POST /v1/nodes/{name}/undrain` (admin): back in service, and cleared
/// of a circuit-breaker quarantine.
pub(super) async fn undrain(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, "/gantry.v1.Gantry/Drain", &headers)?;
    only_params(&query, &[])?;
    let node = node_name(&name)?;
    state.core.set_drain(node.clone(), false, 0).await?;
    Ok(axum::Json(json!({ "node": node, "draining": false })).into_response())
}

/// `POST /v1/nodes/{name}/gpus/{gpu}/reset` (admin): clears the GPU's
/// fault, as `gantry gpu reset NODE GPU` (the `ResetGpu` method's role and
/// errors: a node or GPU that does not exist is 404).
pub(super) async fn reset_gpu(
    State(state): State<HttpState>,
    Path((name, gpu)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, "/gantry.v1.Gantry/ResetGpu", &headers)?;
    only_params(&query, &[])?;
    let node = node_name(&name)?;
    let gpu: u32 = gpu.parse().map_err(|_| {
        invalid(
            "gpu",
            format!(
                "{:?} is not a GPU index (a number, 0 to {})",
                printable(&gpu, 64),
                u32::MAX
            ),
        )
    })?;
    state.core.reset_gpu(node.clone(), gpu).await?;
    Ok(axum::Json(json!({ "node": node, "gpu": gpu, "reset": true })).into_response())
}
