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
use punctual_core::time::{format_rfc3339_ms, parse_rfc3339_ms};
use punctual_core::{Backoff, LeaseCheck, Task, TaskState, Webhook, fnv1a64};
use punctual_store::{Command, Outcome, QueueCounts, Store, StoreError};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::error::ApiError;
pub use crate::ids::IdGen;
use crate::writer::{Park, Writer};

/// Everything a handler needs.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    pub config: ServerConfig,
    pub clock: Clock,
    pub shutdown: watch::Receiver<bool>,
    pub ids: IdGen,
    /// Memory for request bodies being read at once, in KiB permits (`max_body_memory_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Queues whose per-state gauges `/metrics` has set, so an emptied queue can be zeroed.
    pub reported_queues: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

pub type AppState = Arc<Shared>;

impl Shared {
    /// Runs a store read on a blocking thread: a read may wait on the network (the Redis store), and
    /// must never hold up the async workers that serve every other request.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(store.as_ref()))
            .await
            .unwrap_or_else(|e| Err(StoreError::Storage(format!("store read failed: {e}"))))
    }
}

/// The API router. Tests drive it with `tower::ServiceExt::oneshot`, without a socket.
pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{queue}", get(queue_stats))
        .route("/v1/queues/{queue}/tasks", post(schedule).get(list_tasks))
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

/// Compares in time that depends only on the lengths, so a token cannot be guessed byte by byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With tokens configured, every `/v1` route (and `/metrics` if protected) needs
/// `Authorization: Bearer <token>`; `/healthz` is always open.
async fn authorize(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let tokens = &state.config.auth_tokens;
    let path = request.uri().path();
    let guarded = path.starts_with("/v1/")
        || path == "/v1"
        || (path == "/metrics" && state.config.protect_metrics);
    if tokens.is_empty() || !guarded {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token)
            if tokens
                .iter()
                .any(|t| same_secret(t.as_bytes(), token.as_bytes())) =>
        {
            next.run(request).await
        }
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

fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
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

/// Keeps the payload as the exact JSON text that was sent (an explicit `null` is `Some("null")`, so
/// "absent" and "null" differ). It is stored and delivered byte for byte: key order, spacing and
/// numbers of any size are the client's.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn path<T>(result: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    result
        .map(|Path(p)| p)
        .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))
}

/// Extracts `{queue}` and checks its name.
fn queue_path(state: &Shared, p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let queue = path(p)?;
    check_queue(state, &queue)?;
    Ok(queue)
}

/// Extracts `{queue}/…/{id}` and checks the queue name.
fn task_path(
    state: &Shared,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<(String, String), ApiError> {
    let (queue, id) = path(p)?;
    check_queue(state, &queue)?;
    Ok((queue, id))
}

fn check_queue(state: &Shared, queue: &str) -> Result<(), ApiError> {
    state
        .config
        .limits
        .check_queue(queue)
        .map_err(|m| ApiError::bad_request("invalid_queue", m))
}

/// The body of a schedule request (and of each batch item).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    delay_ms: Option<u64>,
    run_at: Option<String>,
    max_attempts: Option<u32>,
    backoff_ms: Option<Vec<u64>>,
    backoff: Option<ExponentialSpec>,
    webhook: Option<Webhook>,
    lease_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ExponentialSpec {
    initial_ms: Option<u64>,
    factor: Option<f64>,
    max_ms: Option<u64>,
    jitter: Option<bool>,
}

/// What the idempotency fingerprint covers: the request as sent, minus the id (the key itself).
#[derive(Serialize)]
struct Fingerprint<'a> {
    payload: Option<&'a str>,
    delay_ms: Option<u64>,
    run_at: Option<&'a str>,
    max_attempts: Option<u32>,
    backoff_ms: Option<&'a [u64]>,
    backoff: Option<&'a ExponentialSpec>,
    webhook: Option<&'a Webhook>,
    lease_ms: Option<u64>,
}

fn check_lease_ms(state: &Shared, lease_ms: u64, field: &str) -> Result<(), ApiError> {
    let limits = &state.config.limits;
    if lease_ms < limits.min_lease_ms || lease_ms > limits.max_lease_ms {
        return Err(ApiError::invalid(format!(
            "{field} must be between {} and {} ms",
            limits.min_lease_ms, limits.max_lease_ms
        )));
    }
    Ok(())
}

fn payload_text(
    state: &Shared,
    payload: Option<Box<RawValue>>,
) -> Result<Option<String>, ApiError> {
    let Some(raw) = payload else {
        return Ok(None);
    };
    let text = String::from(Box::<str>::from(raw));
    let max = state.config.limits.max_payload_bytes;
    if text.len() > max {
        return Err(ApiError::too_large(format!(
            "payload is {} bytes; the limit is {max} ({}), set by --max-payload-bytes",
            text.len(),
            human_bytes(max)
        )));
    }
    Ok(Some(text))
}

/// Resolves `delay_ms` / `run_at` to a due time; neither means now.
fn due_time(
    state: &Shared,
    now_ms: u64,
    delay_ms: Option<u64>,
    run_at: Option<&str>,
) -> Result<u64, ApiError> {
    let max_delay_ms = state.config.limits.max_delay_ms;
    let run_at_ms = match (delay_ms, run_at) {
        (Some(_), Some(_)) => return Err(ApiError::invalid("give delay_ms or run_at, not both")),
        (Some(delay), None) => {
            if delay > max_delay_ms {
                return Err(ApiError::invalid(format!(
                    "delay_ms exceeds the maximum of {max_delay_ms} ms"
                )));
            }
            now_ms + delay
        }
        (None, Some(text)) => {
            let at =
                parse_rfc3339_ms(text).map_err(|e| ApiError::invalid(format!("run_at: {e}")))?;
            if at > now_ms.saturating_add(max_delay_ms) {
                return Err(ApiError::invalid(format!(
                    "run_at is more than {max_delay_ms} ms ({} days) in the future",
                    max_delay_ms / 86_400_000
                )));
            }
            at
        }
        (None, None) => now_ms,
    };
    Ok(run_at_ms)
}

fn check_webhook(state: &Shared, webhook: &Webhook) -> Result<(), ApiError> {
    let url = webhook.url.as_str();
    if url.len() > state.config.limits.max_url_bytes {
        return Err(ApiError::invalid(format!(
            "webhook.url is longer than {} bytes",
            state.config.limits.max_url_bytes
        )));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| ApiError::invalid("webhook.url must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(ApiError::invalid("webhook.url has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid(
            "webhook.url must not contain spaces or control characters",
        ));
    }
    state
        .config
        .webhook
        .policy()
        .check_url(url)
        .map_err(ApiError::invalid)?;
    for (name, value) in &webhook.headers {
        if crate::address::refused_header(name) {
            return Err(ApiError::invalid(format!(
                "webhook header {name:?} may not be set by a task: it frames the request or is \
                 Punctual's own (host, content-length, transfer-encoding, connection and other \
                 hop-by-hop headers, punctual-*)"
            )));
        }
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(ApiError::invalid(format!(
                "webhook header name {name:?} is not a valid HTTP token"
            )));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(ApiError::invalid(format!(
                "webhook header {name:?} has control characters"
            )));
        }
    }
    if let Some(timeout_ms) = webhook.timeout_ms
        && !(1..=300_000).contains(&timeout_ms)
    {
        return Err(ApiError::invalid(
            "webhook.timeout_ms must be between 1 and 300000",
        ));
    }
    Ok(())
}

/// Validates a schedule request and builds the task it asks for.
pub fn build_task(
    state: &Shared,
    queue: &str,
    request: ScheduleRequest,
    now_ms: u64,
) -> Result<Task, ApiError> {
    let limits = &state.config.limits;
    let id = match request.id {
        Some(id) => {
            limits
                .check_id(&id)
                .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id", m))?;
            id
        }
        None => state.ids.next(),
    };
    let payload = payload_text(state, request.payload)?;
    let run_at_ms = due_time(state, now_ms, request.delay_ms, request.run_at.as_deref())?;
    let max_attempts = request
        .max_attempts
        .unwrap_or(state.config.default_max_attempts);
    if max_attempts == 0 || max_attempts > limits.max_attempts {
        return Err(ApiError::invalid(format!(
            "max_attempts must be between 1 and {}",
            limits.max_attempts
        )));
    }
    let backoff = match (&request.backoff_ms, &request.backoff) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("give backoff_ms or backoff, not both"));
        }
        (Some(steps), None) => Backoff::Ladder {
            steps_ms: steps.clone(),
        },
        (None, Some(spec)) => {
            let Backoff::Exponential {
                initial_ms,
                factor,
                max_ms,
                jitter,
            } = Backoff::default()
            else {
                unreachable!("the default backoff is exponential")
            };
            Backoff::Exponential {
                initial_ms: spec.initial_ms.unwrap_or(initial_ms),
                factor: spec.factor.unwrap_or(factor),
                max_ms: spec
                    .max_ms
                    .unwrap_or(max_ms.max(spec.initial_ms.unwrap_or(0))),
                jitter: spec.jitter.unwrap_or(jitter),
            }
        }
        (None, None) => Backoff::default(),
    };
    backoff
        .validate(limits.max_delay_ms)
        .map_err(ApiError::invalid)?;
    if let Some(webhook) = &request.webhook {
        check_webhook(state, webhook)?;
    }
    if let Some(lease_ms) = request.lease_ms {
        check_lease_ms(state, lease_ms, "lease_ms")?;
    }
    let fingerprint = fnv1a64(
        &serde_json::to_vec(&Fingerprint {
            payload: payload.as_deref(),
            delay_ms: request.delay_ms,
            run_at: request.run_at.as_deref(),
            max_attempts: request.max_attempts,
            backoff_ms: request.backoff_ms.as_deref(),
            backoff: request.backoff.as_ref(),
            webhook: request.webhook.as_ref(),
            lease_ms: request.lease_ms,
        })
        .unwrap_or_default(),
    );
    Ok(Task {
        payload,
        webhook: request.webhook,
        lease_ms: request.lease_ms,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
        fingerprint,
        ..Task::new(queue, id, run_at_ms, max_attempts, backoff)
    })
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

fn wrong_state(queue: &str, id: &str, state: TaskState, action: &str) -> ApiError {
    ApiError::conflict(
        "wrong_state",
        format!(
            "cannot {action} task {id:?} in queue {queue:?}: it is {}",
            state.as_str()
        ),
    )
}

/// Why a lease token did not settle task `id`, in words that are true for the case.
fn lease_refused(queue: &str, id: &str, check: LeaseCheck) -> ApiError {
    match check {
        LeaseCheck::Mismatch => ApiError::conflict(
            "lease_mismatch",
            format!(
                "the lease_token is not a lease of task {id:?} in queue {queue:?}; give the \
                 lease_token from the reserve answer that handed this task out"
            ),
        ),
        LeaseCheck::HandedOutAgain => ApiError::conflict(
            "lease_lost",
            format!(
                "your lease of task {id:?} in queue {queue:?} expired and the task was handed out \
                 again; its new holder settles it (lease longer, or extend the lease while working)"
            ),
        ),
        LeaseCheck::Expired(state) => ApiError::conflict(
            "lease_expired",
            format!(
                "your lease of task {id:?} in queue {queue:?} expired; the task is {} and will be \
                 handed out again for its next attempt",
                state.as_str()
            ),
        ),
        LeaseCheck::Finished(state) => ApiError::conflict(
            "task_finished",
            format!(
                "task {id:?} in queue {queue:?} is already finished: it is {}",
                state.as_str()
            ),
        ),
        LeaseCheck::Held => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "a held lease was refused",
        ),
    }
}

fn unexpected(outcome: &Outcome) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected store outcome {outcome:?}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn healthz(State(state): State<AppState>) -> Response {
    match state.read(|s| s.health()).await {
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

async fn list_queues(State(state): State<AppState>) -> Result<Response, ApiError> {
    let queues: Vec<serde_json::Value> = state
        .read(|s| s.queues())
        .await?
        .iter()
        .map(counts_json)
        .collect();
    Ok(axum::Json(serde_json::json!({ "queues": queues })).into_response())
}

async fn queue_stats(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let counts = state
        .read(|s| s.queues())
        .await?
        .into_iter()
        .find(|c| c.queue == queue)
        .unwrap_or(QueueCounts {
            queue,
            counts: [0; 5],
        });
    Ok(axum::Json(counts_json(&counts)).into_response())
}

/// What the body of a schedule request must be.
const TASK_BODY: &str = "a JSON object with the task's fields, such as {\"id\": \"m1\", \"delay_ms\": 2000}; \
    to schedule many tasks in one request, POST {\"tasks\": [...]} to /v1/queues/{queue}/batch";

async fn schedule(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let bytes = read_single(&state, body).await?;
    let request: ScheduleRequest = crate::decode::decode_at(&bytes, "", TASK_BODY)?;
    let task = build_task(&state, &queue, request, state.clock.now_ms())?;
    let outcome = state
        .writer
        .submit_one(Command::Schedule(Box::new(task)))
        .await?;
    schedule_answer(outcome).map(|(status, task)| task_response(status, &task))
}

fn schedule_answer(outcome: Outcome) -> Result<(StatusCode, Task), ApiError> {
    match outcome {
        Outcome::Created(task) => Ok((StatusCode::CREATED, task)),
        Outcome::Existing(task) => Ok((StatusCode::OK, task)),
        Outcome::Conflict(task) => Err(ApiError::conflict(
            "id_conflict",
            format!(
                "task {:?} already exists in queue {:?} with a different spec",
                task.id, task.queue
            ),
        )),
        other => Err(unexpected(&other)),
    }
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
    let max = state.config.limits.max_batch;
    if request.tasks.len() > max {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_too_large",
            format!(
                "a batch holds at most {max} tasks; this one has {}",
                request.tasks.len()
            ),
        ));
    }
    let now_ms = state.clock.now_ms();
    // Validate every item first; only the valid ones go to the store, in one commit.
    let mut results: Vec<Result<usize, ApiError>> = Vec::with_capacity(request.tasks.len());
    let mut commands = Vec::new();
    for (i, raw) in request.tasks.iter().enumerate() {
        let built = crate::decode::decode_at::<ScheduleRequest>(
            raw.get().as_bytes(),
            &format!("tasks[{i}]"),
            "a task object",
        )
        .and_then(|r| build_task(&state, &queue, r, now_ms));
        results.push(built.map(|task| {
            commands.push(Command::Schedule(Box::new(task)));
            commands.len() - 1
        }));
    }
    let outcomes = if commands.is_empty() {
        Vec::new()
    } else {
        state.writer.submit(commands).await?
    };
    let mut outcomes: Vec<Option<Outcome>> = outcomes.into_iter().map(Some).collect();
    let answers: Vec<Result<(StatusCode, Task), ApiError>> = results
        .into_iter()
        .map(|result| {
            result.and_then(|n| {
                let outcome = outcomes.get_mut(n).and_then(Option::take).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "missing outcome",
                    )
                })?;
                schedule_answer(outcome)
            })
        })
        .collect();
    let minimal = prefers_minimal(&headers);
    let items: Vec<BatchItem<'_>> = answers
        .iter()
        .map(|answer| match answer {
            Ok((status, task)) if minimal => BatchItem {
                status: status.as_u16(),
                id: Some(&task.id),
                task: None,
                error: None,
            },
            Ok((status, task)) => BatchItem {
                status: status.as_u16(),
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

async fn get_task(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let (q, i) = (queue.clone(), id.clone());
    match state.read(move |s| s.get(&q, &i)).await? {
        Some(task) => Ok(task_response(StatusCode::OK, &task)),
        None => Err(ApiError::not_found(&queue, &id)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRequest {
    delay_ms: Option<u64>,
    run_at: Option<String>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
}

async fn reschedule(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: PatchRequest = read_json(&state, body).await?;
    if request.delay_ms.is_none() && request.run_at.is_none() && request.payload.is_none() {
        return Err(ApiError::invalid("give delay_ms or run_at, and/or payload"));
    }
    let now_ms = state.clock.now_ms();
    let run_at_ms = if request.delay_ms.is_some() || request.run_at.is_some() {
        Some(due_time(
            &state,
            now_ms,
            request.delay_ms,
            request.run_at.as_deref(),
        )?)
    } else {
        None
    };
    let payload = match request.payload {
        Some(value) => Some(payload_text(&state, Some(value))?),
        None => None,
    };
    let command = Command::Reschedule {
        queue: queue.clone(),
        id: id.clone(),
        run_at_ms,
        payload,
    };
    by_id(&state, &queue, &id, "reschedule", command).await
}

async fn cancel(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let command = Command::Cancel {
        queue: queue.clone(),
        id: id.clone(),
    };
    by_id(&state, &queue, &id, "cancel", command).await
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveRequest {
    max: Option<usize>,
    wait_ms: Option<u64>,
    lease_ms: Option<u64>,
}

async fn reserve(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let bytes = read_single(&state, body).await?;
    let request: ReserveRequest = decode_or_default(&bytes)?;
    let limits = &state.config.limits;
    let max = request.max.unwrap_or(1);
    if max == 0 || max > limits.max_reserve {
        return Err(ApiError::invalid(format!(
            "max must be between 1 and {}",
            limits.max_reserve
        )));
    }
    let wait_ms = request.wait_ms.unwrap_or(0);
    if wait_ms > limits.max_wait_ms {
        return Err(ApiError::invalid(format!(
            "wait_ms must be at most {}",
            limits.max_wait_ms
        )));
    }
    if let Some(lease_ms) = request.lease_ms {
        check_lease_ms(&state, lease_ms, "lease_ms")?;
    }
    // The writer leases what is ready at once; with `wait_ms`, it keeps the request until tasks of
    // the queue become ready or the deadline passes.
    let wait_ms = if *state.shutdown.borrow() { 0 } else { wait_ms };
    let deadline_ms = state.clock.now_ms() + wait_ms;
    let (reply, answer) = tokio::sync::oneshot::channel();
    state.writer.park(Park {
        queue,
        max,
        lease_ms: request.lease_ms,
        default_lease_ms: state.config.default_lease_ms,
        token_prefix: format!("{}.", state.ids.next()),
        deadline_ms,
        reply,
    })?;
    let mut shutdown = state.shutdown.clone();
    // The writer stops serving the park at its deadline; waiting a little longer here means a lease
    // made just before the deadline still reaches this client.
    let give_up = state.clock.instant_at(deadline_ms + PARK_GRACE_MS);
    tokio::select! {
        answer = answer => match answer {
            Ok(Ok(tasks)) => Ok(reserve_answer(&tasks)),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Ok(reserve_answer(&[])),
        },
        _ = tokio::time::sleep_until(give_up) => Ok(reserve_answer(&[])),
        _ = shutdown.changed() => Ok(reserve_answer(&[])),
    }
}

/// How long after a long-poll's deadline the handler still waits for the writer's answer.
const PARK_GRACE_MS: u64 = 250;

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
    let command = Command::Ack {
        queue: queue.clone(),
        id: id.clone(),
        token: request.lease_token,
        retention_ms: state.config.retention_ms,
    };
    by_id(&state, &queue, &id, "ack", command).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckItem {
    id: String,
    lease_token: String,
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
    let max = state.config.limits.max_batch;
    if request.tasks.is_empty() || request.tasks.len() > max {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_too_large",
            format!(
                "give 1 to {max} acks; this request has {}",
                request.tasks.len()
            ),
        ));
    }
    let commands: Vec<Command> = request
        .tasks
        .iter()
        .map(|item| Command::Ack {
            queue: queue.clone(),
            id: item.id.clone(),
            token: item.lease_token.clone(),
            retention_ms: state.config.retention_ms,
        })
        .collect();
    let outcomes = state.writer.submit(commands).await?;
    let errors: Vec<Option<ApiError>> = request
        .tasks
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| answer(&queue, &item.id, "ack", outcome).err())
        .collect();
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NackRequest {
    lease_token: String,
    error: Option<String>,
    delay_ms: Option<u64>,
}

async fn nack(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: NackRequest = read_json(&state, body).await?;
    if let Some(delay) = request.delay_ms
        && delay > state.config.limits.max_delay_ms
    {
        return Err(ApiError::invalid("delay_ms exceeds the maximum delay"));
    }
    let command = Command::Nack {
        queue: queue.clone(),
        id: id.clone(),
        token: request.lease_token,
        error: request.error,
        delay_ms: request.delay_ms,
        min_delay_ms: None,
    };
    by_id(&state, &queue, &id, "settle", command).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendRequest {
    lease_token: String,
    lease_ms: u64,
}

async fn extend(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let request: ExtendRequest = read_json(&state, body).await?;
    check_lease_ms(&state, request.lease_ms, "lease_ms")?;
    let command = Command::Extend {
        queue: queue.clone(),
        id: id.clone(),
        token: request.lease_token,
        lease_ms: request.lease_ms,
    };
    by_id(&state, &queue, &id, "settle", command).await
}

/// Commits one command on task `id` and answers with its outcome.
async fn by_id(
    state: &Shared,
    queue: &str,
    id: &str,
    action: &str,
    command: Command,
) -> Result<Response, ApiError> {
    answer(queue, id, action, state.writer.submit_one(command).await?)
}

/// The one mapping from a by-id command's outcome to an answer; `action` names it in 409 messages.
fn answer(queue: &str, id: &str, action: &str, outcome: Outcome) -> Result<Response, ApiError> {
    match outcome {
        Outcome::Updated(task) => Ok(task_response(StatusCode::OK, &task)),
        Outcome::Cancelled(_) | Outcome::Acked(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        Outcome::NotFound => Err(ApiError::not_found(queue, id)),
        Outcome::WrongState(s) => Err(wrong_state(queue, id, s, action)),
        Outcome::LeaseLost(check) => Err(lease_refused(queue, id, check)),
        other => Err(unexpected(&other)),
    }
}

async fn retry(
    State(state): State<AppState>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (queue, id) = task_path(&state, p)?;
    let command = Command::Retry {
        queue: queue.clone(),
        id: id.clone(),
    };
    by_id(&state, &queue, &id, "retry", command).await
}

/// Default and largest page of a listing.
pub const LIST_DEFAULT_LIMIT: usize = 100;
pub const LIST_MAX_LIMIT: usize = 1000;

async fn list_tasks(
    State(state): State<AppState>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let queue = queue_path(&state, p)?;
    let Query(params) = q.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "state" | "limit" | "cursor"))
    {
        return Err(ApiError::invalid(format!(
            "unknown query parameter {unknown:?}"
        )));
    }
    let filter = match params.get("state") {
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "state must be one of scheduled, ready, leased, succeeded, dead; got {s:?}"
            ))
        })?),
        None => None,
    };
    let limit = match params.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=LIST_MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::invalid(format!("limit must be between 1 and {LIST_MAX_LIMIT}"))
            })?,
        None => LIST_DEFAULT_LIMIT,
    };
    let (q, cursor) = (queue.clone(), params.get("cursor").cloned());
    let page = state
        .read(move |s| s.list(&q, filter, cursor.as_deref(), limit))
        .await?;
    let tasks: Vec<TaskView<'_>> = page.tasks.iter().map(|t| view(t, false)).collect();
    Ok(
        axum::Json(serde_json::json!({ "tasks": tasks, "next_cursor": page.next_cursor }))
            .into_response(),
    )
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
