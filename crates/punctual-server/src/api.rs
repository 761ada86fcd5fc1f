//! The HTTP API v1: routes, request validation, and the JSON shape of tasks.
//!
//! Handlers validate everything before sending a command to the writer, so a bad request never
//! reaches the store. Bodies are read with an explicit size limit and decoded here (not by an axum
//! extractor) so every refusal has the same `{"error": {"code", "message"}}` shape.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use punctual_core::time::format_rfc3339_ms;
use punctual_core::{Backoff, Task, TaskState, Webhook};
use punctual_store::QueueCounts;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::service::{
    AckItem, NackRequest, PatchRequest, ReserveRequest, ScheduleRequest, Service, Settled,
    human_bytes,
};

/// What HTTP keeps beside the service: its body-memory budget and its metric bookkeeping.
pub struct Http {
    pub service: Arc<Service>,
    /// Memory for request bodies being read at once, in KiB permits (`max_body_memory_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Queues whose per-state gauges `/metrics` has set, so an emptied queue can be zeroed.
    pub reported_queues: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The webhook sender's per-host state.
    pub targets: Arc<crate::targets::Targets>,
    /// When the server started (unix ms).
    pub started_ms: u64,
}

impl std::ops::Deref for Http {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

pub type AppState = Arc<Http>;
type Shared = Http;

/// The API router. Tests drive it with `tower::ServiceExt::oneshot`, without a socket.
pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{queue}", get(queue_stats))
        .route("/v1/queues/{queue}/tasks", post(schedule).get(list_tasks))
        .route("/v1/queues/{queue}/timeline", get(timeline))
        .route("/v1/queues/{queue}/batch", post(batch))
        .route("/v1/queues/{queue}/reserve", post(reserve))
        .route("/v1/queues/{queue}/ack", post(ack_many))
        .route(
            "/v1/queues/{queue}/tasks/{id}",
            get(get_task).patch(reschedule).delete(cancel),
        )
        .route("/v1/queues/{queue}/tasks/{id}/ack", post(ack))
        .route("/v1/queues/{queue}/tasks/{id}/nack", post(nack))
        .route("/v1/queues/{queue}/tasks/{id}/extend", post(extend))
        .route("/v1/queues/{queue}/tasks/{id}/retry", post(retry))
        .route("/v1/schedules", get(list_all_schedules))
        .route("/v1/server", get(server_info))
        .route("/v1/openapi.json", get(openapi_document))
        .route("/v1/webhooks/targets", get(webhook_targets))
        .route("/v1/queues/{queue}/schedules", get(list_schedules))
        .route(
            "/v1/queues/{queue}/schedules/{name}",
            get(get_schedule).put(put_schedule).delete(delete_schedule),
        )
        .route(
            "/v1/queues/{queue}/schedules/{name}/{action}",
            post(schedule_action),
        )
        // After the routes: it applies to those already added. axum keeps the `allow` header.
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{method} is not allowed on {}; the allow header lists the methods that are \
                         (docs/api.md)",
                        uri.path()
                    ),
                )
            },
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .merge(crate::ui::routes(state.config.ui))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such endpoint; see docs/api.md",
            )
        })
        .with_state(state);
    guard(router)
}

/// Outermost layer: a bug that panics in any handler answers 500 with the usual JSON error (and is
/// logged) instead of dropping the connection.
fn guard(router: Router) -> Router {
    router.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        panic_answer,
    ))
}

fn panic_answer(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    tracing::error!(panic = what, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server hit a bug while answering this request (it is logged); retry it: requests by \
         id are idempotent",
    )
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Authorization

/// With tokens configured, every `/v1` route (and `/metrics` if protected) needs
/// `Authorization: Bearer <token>`; `/healthz` is always open.
async fn authorize(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    // The API's description is documentation, not data.
    let guarded = (path.starts_with("/v1/") && path != "/v1/openapi.json")
        || path == "/v1"
        || (path == "/metrics" && state.config.protect_metrics);
    if !state.auth_required() || !guarded {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if state.token_accepted(token) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server needs an Authorization: Bearer <token> header with a configured token",
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request decoding

/// A request body in memory, holding its share of the server's body-memory budget until dropped.
pub struct BodyBytes {
    bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::ops::Deref for BodyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads a body of at most `limit` bytes; `what` says, for a refusal, what the limit is for and how to
/// change it. The body must arrive within the body-read timeout, and it is read only when the
/// server's memory budget for bodies being read has room for it (its length, or `limit` when the
/// client does not say); otherwise `503 server_busy` with `Retry-After`.
async fn read_body(
    state: &Shared,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<BodyBytes, ApiError> {
    use axum::body::HttpBody;
    let announced = body.size_hint().exact().map(|n| n as usize);
    if let Some(length) = announced
        && length > limit
    {
        return Err(ApiError::too_large(format!(
            "the request body is larger than {limit} bytes: {what}"
        )));
    }
    // A body larger than the whole budget may still be read, alone.
    let needed_kib = (announced.unwrap_or(limit).div_ceil(1024).max(1) as u64)
        .min(u64::from(crate::body_budget_kib(&state.config))) as u32;
    let timeout = std::time::Duration::from_millis(state.config.conn.body_read_timeout_ms);
    let budget = match state.body_budget.clone().try_acquire_many_owned(needed_kib) {
        Ok(permit) => Some(permit),
        Err(_) => {
            // Read and discard the body (a frame at a time, so it costs no memory) before
            // answering: a client still sending would otherwise get a reset instead of the 503.
            let _ = tokio::time::timeout(timeout, discard(body, limit)).await;
            return Err(ApiError::busy(format!(
                "the server is reading {} MiB of request bodies at once, its limit \
                 (--max-body-memory-mb); retry in a moment",
                state.config.max_body_memory_bytes >> 20
            )));
        }
    };
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await;
    let Ok(read) = read else {
        let limit_ms = state.config.conn.body_read_timeout_ms;
        crate::listen::BODY_TIMEOUT_LOG.hit(state.clock.now_ms(), |n| {
            tracing::warn!(
                body_read_timeout_ms = limit_ms,
                timed_out = n,
                "request bodies did not arrive in time: answered 408 and closed"
            )
        });
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms (--body-read-timeout-ms)",
                state.config.conn.body_read_timeout_ms
            ),
        )
        .closing());
    };
    let bytes = read.map_err(|error| {
        let too_long =
            std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
                .any(|e| e.to_string().contains("length limit"));
        if too_long {
            ApiError::too_large(format!(
                "the request body is larger than {limit} bytes: {what}"
            ))
        } else {
            ApiError::bad_request("bad_body", format!("cannot read request body: {error}"))
        }
    })?;
    Ok(BodyBytes {
        bytes,
        _budget: budget,
    })
}

/// Reads up to `limit` bytes of `body` and drops them as they come.
async fn discard(body: Body, limit: usize) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0usize;
    while seen <= limit {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// Reads a body no larger than a single-task request may be.
async fn read_single(state: &Shared, body: Body) -> Result<BodyBytes, ApiError> {
    read_body(
        state,
        body,
        state.config.limits.max_body_bytes,
        &single_body_limit(state),
    )
    .await
}

/// Reads a body no larger than a batch may be.
async fn read_batch(state: &Shared, body: Body) -> Result<BodyBytes, ApiError> {
    read_body(
        state,
        body,
        state.config.limits.max_batch_body_bytes,
        &batch_body_limit(state),
    )
    .await
}

/// What the single-request body limit is for, in a refusal.
fn single_body_limit(state: &Shared) -> String {
    let max = state.config.limits.max_payload_bytes;
    format!(
        "a task's payload may be at most {max} bytes ({}) of JSON; the server's --max-payload-bytes \
         setting (PUNCTUAL_MAX_PAYLOAD_BYTES) changes it",
        human_bytes(max)
    )
}

/// What the batch body limit is for, in a refusal.
fn batch_body_limit(state: &Shared) -> String {
    format!(
        "a batch body may be at most {} ({} tasks of up to {} each); send fewer or smaller tasks per \
         request",
        human_bytes(state.config.limits.max_batch_body_bytes),
        state.config.limits.max_batch,
        human_bytes(state.config.limits.max_payload_bytes)
    )
}

/// Reads and decodes a body no larger than a single-task request may be.
async fn read_json<T: for<'de> Deserialize<'de>>(
    state: &Shared,
    body: Body,
) -> Result<T, ApiError> {
    decode(&read_single(state, body).await?)
}

/// What a body of the wrong kind altogether is told it must be.
const OBJECT_BODY: &str = "a JSON object; docs/api.md lists each endpoint's fields";

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    crate::decode::decode_at(bytes, "", OBJECT_BODY)
}

/// Decodes a body that may be empty (meaning `{}`).
fn decode_or_default<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        decode(bytes)
    }
}

fn path<T>(result: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    result
        .map(|Path(p)| p)
        .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))
}

/// Extracts `{queue}` and checks its name.
fn queue_path(state: &Shared, p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let queue = path(p)?;
    crate::service::check_queue(state, &queue)?;
    Ok(queue)
}

/// Extracts `{queue}/…/{id}` and checks the queue name.
fn task_path(
    state: &Shared,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    let (queue, id) = path(p)?;
    crate::service::check_queue(state, &queue)?;
    Ok((queue, id))
}

// ---------------------------------------------------------------------------------------------
// Response shapes

#[derive(Serialize)]
struct ExponentialView {
    initial_ms: u64,
    factor: f64,
    max_ms: u64,
    jitter: bool,
}

/// A task as the API shows it. The lease token appears only in a reserve answer.
#[derive(Serialize)]
pub struct TaskView<'a> {
    queue: &'a str,
    id: &'a str,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    run_at: String,
    run_at_ms: u64,
    attempt: u32,
    max_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff_ms: Option<&'a [u64]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff: Option<ExponentialView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<&'a Webhook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ms: Option<u64>,
    created_at: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    last_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purge_at_ms: Option<u64>,
}

pub fn view(task: &Task, with_token: bool) -> TaskView<'_> {
    let (backoff_ms, backoff) = match &task.backoff {
        Backoff::Ladder { steps_ms } => (Some(steps_ms.as_slice()), None),
        Backoff::Exponential {
            initial_ms,
            factor,
            max_ms,
            jitter,
        } => (
            None,
            Some(ExponentialView {
                initial_ms: *initial_ms,
                factor: *factor,
                max_ms: *max_ms,
                jitter: *jitter,
            }),
        ),
    };
    TaskView {
        queue: &task.queue,
        id: &task.id,
        state: task.state.as_str(),
        payload: task
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok()),
        run_at: format_rfc3339_ms(task.run_at_ms),
        run_at_ms: task.run_at_ms,
        attempt: task.attempt,
        max_attempts: task.max_attempts,
        backoff_ms,
        backoff,
        webhook: task.webhook.as_ref(),
        lease_ms: task.lease_ms,
        created_at: format_rfc3339_ms(task.created_at_ms),
        created_at_ms: task.created_at_ms,
        updated_at_ms: task.updated_at_ms,
        last_error: task.last_error.as_deref(),
        lease_expires_at_ms: task.lease.as_ref().map(|l| l.expires_at_ms),
        lease_token: if with_token {
            task.lease.as_ref().map(|l| l.token.as_str())
        } else {
            None
        },
        purge_at_ms: task.purge_at_ms,
    }
}

fn task_response(status: StatusCode, task: &Task) -> Response {
    (status, axum::Json(view(task, false))).into_response()
}

fn counts_json(counts: &QueueCounts) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("queue".into(), counts.queue.clone().into());
    for state in TaskState::ALL {
        map.insert(state.as_str().into(), counts.get(state).into());
    }
    map.insert("total".into(), counts.total().into());
    serde_json::Value::Object(map)
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn healthz(State(state): State<AppState>) -> Response {
    match state.health().await {
        Ok(()) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "failing", "error": error.to_string()})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let handle = crate::metrics::handle();
    if let Ok(queues) = state.read(|s| s.queues()).await {
        let mut reported = state
            .reported_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A queue that has emptied since the last scrape reports zeros, not its last counts.
        let gone: Vec<String> = reported
            .iter()
            .filter(|q| !queues.iter().any(|c| &c.queue == *q))
            .cloned()
            .collect();
        for queue in gone {
            reported.remove(&queue);
            for task_state in TaskState::ALL {
                metrics::gauge!(crate::metrics::TASKS, "queue" => queue.clone(), "state" => task_state.as_str()).set(0.0);
            }
        }
        for counts in queues {
            for task_state in TaskState::ALL {
                metrics::gauge!(crate::metrics::TASKS, "queue" => counts.queue.clone(), "state" => task_state.as_str())
                    .set(counts.get(task_state) as f64);
            }
            reported.insert(counts.queue);
        }
    }
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 description of this API, with this server's limits (docs/openapi.json has the
/// defaults').
async fn openapi_document(State(state): State<AppState>) -> Response {
    axum::Json(crate::openapi::document(&state.config.limits)).into_response()
}

/// The server as the dashboard shows it: version, store, health, disk.
async fn server_info(State(state): State<AppState>) -> Response {
    let health = state.health().await;
    let disk = state
        .config
        .data_dir
        .clone()
        .map(|dir| tokio::task::spawn_blocking(move || punctual_store::disk_usage(&dir)));
    let disk = match disk {
        Some(job) => job.await.ok().flatten(),
        None => None,
    };
    let now = state.clock.now_ms();
    axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "store": state.config.store_kind,
        "status": if health.is_ok() { "ok" } else { "failing" },
        "error": health.err().map(|e| e.to_string()),
        "data_dir": state.config.data_dir.as_ref().map(|d| d.display().to_string()),
        "disk_used_bytes": disk.map(|d| d.used_bytes),
        "disk_free_bytes": disk.map(|d| d.free_bytes),
        "started_at_ms": state.started_ms,
        "uptime_ms": now.saturating_sub(state.started_ms),
        "now_ms": now,
    }))
    .into_response()
}

/// Webhook targets by host: deliveries in flight, failures in a row, back-off, recent outcomes.
async fn webhook_targets(State(state): State<AppState>) -> Response {
    let now = state.clock.now_ms();
    let targets: Vec<serde_json::Value> = state
        .targets
        .view(now)
        .into_iter()
        .map(|t| {
            serde_json::json!({
                "host": t.host,
                "in_flight": t.in_flight,
                "failures_in_a_row": t.failures_in_a_row,
                "backed_off_until_ms": t.backed_off_until_ms,
                "recent": t.recent.iter().map(|(at, ok)| serde_json::json!({"at_ms": at, "ok": ok})).collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "targets": targets, "now_ms": now })).into_response()
}

async fn list_queues(State(state): State<AppState>) -> Result<Response, ApiError> {
    let queues: Vec<serde_json::Value> = state.queues().await?.iter().map(counts_json).collect();
    Ok(axum::Json(serde_json::json!({ "queues": queues })).into_response())
}

async fn queue_stats(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    Ok(axum::Json(counts_json(&state.queue(queue).await?)).into_response())
}

/// What the body of a schedule request must be.
const TASK_BODY: &str = "a JSON object with the task's fields, such as {\"id\": \"m1\", \"delay_ms\": 2000}; \
    to schedule many tasks in one request, POST {\"tasks\": [...]} to /v1/queues/{queue}/batch";

fn created_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

async fn schedule(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let bytes = read_single(&state, body).await?;
    let request: ScheduleRequest = crate::decode::decode_at(&bytes, "", TASK_BODY)?;
    let (created, task) = state.schedule(&queue, request).await?;
    Ok(task_response(created_status(created), &task))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    tasks: Vec<Box<RawValue>>,
}

/// Whether the request asks for a minimal answer (`Prefer: return=minimal`, RFC 7240).
fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("return=minimal"))
}

async fn batch(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let bytes = read_batch(&state, body).await?;
    let request: BatchRequest =
        crate::decode::decode_at(&bytes, "", "a JSON object {\"tasks\": [...]}")?;
    let items = request
        .tasks
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            crate::decode::decode_at::<ScheduleRequest>(
                raw.get().as_bytes(),
                &format!("tasks[{i}]"),
                "a task object",
            )
        })
        .collect();
    let answers = state.schedule_batch(&queue, items).await?;
    let minimal = prefers_minimal(&headers);
    let items: Vec<BatchItem<'_>> = answers
        .iter()
        .map(|answer| match answer {
            Ok((created, task)) if minimal => BatchItem {
                status: created_status(*created).as_u16(),
                id: Some(&task.id),
                task: None,
                error: None,
            },
            Ok((created, task)) => BatchItem {
                status: created_status(*created).as_u16(),
                id: None,
                task: Some(view(task, false)),
                error: None,
            },
            Err(error) => BatchItem {
                status: error.status.as_u16(),
                id: None,
                task: None,
                error: Some(error.into()),
            },
        })
        .collect();
    let mut response = axum::Json(Results { results: items }).into_response();
    if minimal {
        response.headers_mut().insert(
            "preference-applied",
            axum::http::HeaderValue::from_static("return=minimal"),
        );
    }
    Ok(response)
}

/// `{"results": [...]}`, the answer of every per-item endpoint (batch, ack many).
#[derive(Serialize)]
struct Results<T> {
    results: Vec<T>,
}

#[derive(Serialize)]
struct BatchItem<'a> {
    status: u16,
    /// With `Prefer: return=minimal`: the task's id instead of the whole task.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<TaskView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody<'a>>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    message: &'a str,
}

impl<'a> From<&'a ApiError> for ErrorBody<'a> {
    fn from(error: &'a ApiError) -> Self {
        ErrorBody {
            code: error.code,
            message: &error.message,
        }
    }
}

#[derive(Serialize)]
struct TasksAnswer<'a> {
    tasks: Vec<TaskView<'a>>,
}

/// A by-id operation's answer: the task as it is now, or 204.
fn settled_response(settled: Settled) -> Response {
    match settled {
        Settled::Updated(task) => task_response(StatusCode::OK, &task),
        Settled::Done => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn get_task(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    Ok(task_response(
        StatusCode::OK,
        &state.get(&queue, &id).await?,
    ))
}

async fn reschedule(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: PatchRequest = read_json(&state, body).await?;
    state
        .reschedule(&queue, &id, request)
        .await
        .map(settled_response)
}

async fn cancel(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    state.cancel(&queue, &id).await.map(settled_response)
}

// ---------------------------------------------------------------------------------------------
// Recurring schedules (schedules.rs)

async fn list_schedules(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let schedules = state.list_schedules(Some(&queue)).await?;
    Ok(axum::Json(serde_json::json!({ "schedules": schedules })).into_response())
}

async fn list_all_schedules(State(state): State<AppState>) -> Result<Response, ApiError> {
    let schedules = state.list_schedules(None).await?;
    Ok(axum::Json(serde_json::json!({ "schedules": schedules })).into_response())
}

async fn get_schedule(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, name) = task_path(&state, p)?;
    Ok(axum::Json(state.get_schedule(&queue, &name).await?).into_response())
}

async fn put_schedule(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, name) = task_path(&state, p)?;
    let spec: crate::schedules::ScheduleSpec = read_json(&state, body).await?;
    let written = state.put_schedule(&queue, &name, spec).await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(written.view)).into_response())
}

async fn delete_schedule(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, name) = task_path(&state, p)?;
    state.delete_schedule(&queue, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn schedule_action(
    State(state): State<AppState>,
    p: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, name, action) = path(p)?;
    crate::service::check_queue(&state, &queue)?;
    match action.as_str() {
        "pause" | "resume" => Ok(axum::Json(
            state
                .pause_schedule(&queue, &name, action == "pause")
                .await?,
        )
        .into_response()),
        "trigger" => Ok(task_response(
            StatusCode::CREATED,
            &state.trigger_schedule(&queue, &name).await?,
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no schedule action {action:?}: pause, resume or trigger (docs/api.md)"),
        )),
    }
}

async fn reserve(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let bytes = read_single(&state, body).await?;
    let request: ReserveRequest = decode_or_default(&bytes)?;
    let tasks = state.service.reserve(&queue, request).await?;
    Ok(reserve_answer(&tasks))
}

fn reserve_answer(tasks: &[Task]) -> Response {
    let views: Vec<TaskView<'_>> = tasks.iter().map(|t| view(t, true)).collect();
    axum::Json(TasksAnswer { tasks: views }).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    lease_token: String,
}

async fn ack(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: AckRequest = read_json(&state, body).await?;
    state
        .ack(&queue, &id, request.lease_token)
        .await
        .map(settled_response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckManyRequest {
    tasks: Vec<AckItem>,
}

#[derive(Serialize)]
struct AckResult<'a> {
    id: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody<'a>>,
}

/// Acks up to `max_batch` leases in one request and one durable commit.
async fn ack_many(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let request: AckManyRequest = decode(&read_batch(&state, body).await?)?;
    let errors = state.ack_many(&queue, &request.tasks).await?;
    let results: Vec<AckResult<'_>> = request
        .tasks
        .iter()
        .zip(&errors)
        .map(|(item, error)| AckResult {
            id: &item.id,
            status: error.as_ref().map_or(204, |e| e.status.as_u16()),
            error: error.as_ref().map(ErrorBody::from),
        })
        .collect();
    Ok(axum::Json(Results { results }).into_response())
}

async fn nack(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: NackRequest = read_json(&state, body).await?;
    state.nack(&queue, &id, request).await.map(settled_response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendRequest {
    lease_token: String,
    #[serde(deserialize_with = "punctual_core::whole::u64")]
    lease_ms: u64,
}

async fn extend(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: ExtendRequest = read_json(&state, body).await?;
    state
        .extend(&queue, &id, request.lease_token, request.lease_ms)
        .await
        .map(settled_response)
}

async fn retry(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    state.retry(&queue, &id).await.map(settled_response)
}

async fn list_tasks(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::service::LIST_MAX_LIMIT;
    let queue = queue_path(&state, p)?;
    let params = query_params(q, &["state", "limit", "cursor", "order"])?;
    let filter = match params.get("state") {
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "state must be one of scheduled, ready, leased, succeeded, dead; got {s:?}"
            ))
        })?),
        None => None,
    };
    let limit = match params.get("limit") {
        Some(l) => Some(l.parse::<usize>().map_err(|_| {
            ApiError::invalid(format!("limit must be between 1 and {LIST_MAX_LIMIT}"))
        })?),
        None => None,
    };
    // An empty cursor is the first page, as no cursor is.
    let cursor = params.get("cursor").filter(|c| !c.is_empty()).cloned();
    let (tasks, next_cursor) = match params.get("order").map(String::as_str) {
        None | Some("id") => {
            let page = state.list(&queue, filter, cursor, limit).await?;
            (page.tasks, page.next_cursor)
        }
        Some("due") => {
            if filter.is_some_and(|s| s != TaskState::Scheduled) {
                return Err(ApiError::invalid(
                    "order=due lists scheduled tasks only: leave state out or give state=scheduled",
                ));
            }
            let page = state.list_due(&queue, cursor, limit).await?;
            (page.tasks, page.next.map(|c| c.to_string()))
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "order must be id or due; got {other:?}"
            )));
        }
    };
    let tasks: Vec<TaskView<'_>> = tasks.iter().map(|t| view(t, false)).collect();
    Ok(
        axum::Json(serde_json::json!({ "tasks": tasks, "next_cursor": next_cursor }))
            .into_response(),
    )
}

/// A query's parameters, refusing any not in `allowed`.
fn query_params(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let Query(params) = q.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    if let Some(unknown) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::invalid(format!(
            "unknown query parameter {unknown:?}"
        )));
    }
    Ok(params)
}

/// A time in a query: unix milliseconds, or RFC 3339.
fn query_time(name: &str, value: &str) -> Result<u64, ApiError> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map_err(|_| ApiError::invalid(format!("{name} is too large for unix milliseconds")));
    }
    punctual_core::time::parse_rfc3339_ms(value).map_err(|e| {
        ApiError::invalid(format!(
            "{name} must be unix milliseconds or an RFC 3339 date-time: {e}"
        ))
    })
}

async fn timeline(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    use crate::service::TIMELINE_MAX_BUCKETS;
    let queue = queue_path(&state, p)?;
    let params = query_params(q, &["from", "to", "buckets"])?;
    let from = params
        .get("from")
        .map(|v| query_time("from", v))
        .transpose()?;
    let to = params.get("to").map(|v| query_time("to", v)).transpose()?;
    let buckets = match params.get("buckets") {
        Some(b) => Some(b.parse::<usize>().map_err(|_| {
            ApiError::invalid(format!(
                "buckets must be between 1 and {TIMELINE_MAX_BUCKETS}"
            ))
        })?),
        None => None,
    };
    let (slices, timeline) = state.timeline(&queue, from, to, buckets).await?;
    let buckets: Vec<serde_json::Value> = timeline
        .counts
        .iter()
        .enumerate()
        .map(|(i, count)| {
            serde_json::json!({
                "start_ms": slices.from_ms + slices.width_ms * i as u64,
                "count": count,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "queue": queue,
        "from_ms": slices.from_ms,
        "to_ms": slices.to_ms(),
        "bucket_ms": slices.width_ms,
        "resolution_ms": timeline.resolution_ms,
        "total": timeline.counts.iter().sum::<u64>(),
        "buckets": buckets,
    }))
    .into_response())
}

/// The one mapping of an error to an HTTP answer.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.is_overload() {
            // An overload answer the client is told to retry, not a fault of the server.
            tracing::warn!(code = self.code, message = %self.message, "request refused");
        } else if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if self.close {
            headers.insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if self.is_overload() {
            headers.insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_the_json_error() {
        let router = guard(Router::new().route(
            "/boom",
            get(|| async {
                let text = "2026-11-22T01:02:€Z";
                // A slice through a multi-byte character, like the old RFC 3339 parser's.
                #[allow(clippy::string_slice)]
                let cut = &text[..19];
                cut.len().to_string()
            }),
        ));
        let request = axum::http::Request::builder()
            .uri("/boom")
            .body(Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "internal");
    }
}
