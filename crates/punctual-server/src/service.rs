//! The service layer: every validated operation of Punctual, shared by its front ends.
//!
//! HTTP (`api.rs`) and the Redis protocol (`resp/`) parse their wire forms into the typed requests
//! here, call one method, and render its answer. Validation, task building, limits and outcome
//! mapping live only here, so a rule is never written twice or differently. This module imports no
//! front end. Its error type is [`ApiError`], whose code and message both front ends show (HTTP with
//! its status, the Redis protocol as an `-ERR` line).

use std::sync::Arc;

use axum::http::StatusCode;
use punctual_core::time::parse_rfc3339_ms;
use punctual_core::{Backoff, LeaseCheck, Task, TaskState, Webhook, fnv1a64};
use punctual_store::{
    Buckets, Command, DueCursor, DuePage, Outcome, Page, PutWhen, QueueCounts, Store, StoreError,
    Timeline,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::error::ApiError;
pub use crate::ids::IdGen;
use crate::writer::{Park, Writer};

/// The one service both front ends (HTTP, the Redis protocol) call: it owns the store handle, the
/// writer, the clock, the limits and the id generator, and has one method per validated operation.
/// A front end translates its wire form into these calls and their answers back, and nothing else.
pub struct Service {
    pub store: Arc<dyn Store>,
    pub writer: Writer,
    pub config: ServerConfig,
    pub clock: Clock,
    pub shutdown: watch::Receiver<bool>,
    pub ids: IdGen,
}

impl Service {
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

/// Keeps the payload as the exact JSON text that was sent (an explicit `null` is `Some("null")`, so
/// "absent" and "null" differ). It is stored and delivered byte for byte: key order, spacing and
/// numbers of any size are the client's.
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// What a by-id operation left: the task as it is now, or nothing (cancelled, acked).
pub enum Settled {
    Updated(Box<Task>),
    Done,
}

/// The one mapping from a by-id command's outcome to an answer; `action` names it in conflicts.
pub fn settled(queue: &str, id: &str, action: &str, outcome: Outcome) -> Result<Settled, ApiError> {
    match outcome {
        Outcome::Updated(task) => Ok(Settled::Updated(Box::new(task))),
        Outcome::Cancelled(_) | Outcome::Acked(_) => Ok(Settled::Done),
        Outcome::NotFound => Err(ApiError::not_found(queue, id)),
        Outcome::WrongState(s) => Err(wrong_state(queue, id, s, action)),
        Outcome::LeaseLost(check) => Err(lease_refused(queue, id, check)),
        other => Err(unexpected(&other)),
    }
}

/// A change of a task's due time and/or payload (`PATCH` on HTTP).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub delay_ms: Option<u64>,
    pub run_at: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub payload: Option<Box<RawValue>>,
}

/// A reserve, with its long-poll.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    #[serde(default, deserialize_with = "punctual_core::whole::opt_usize")]
    pub max: Option<usize>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub wait_ms: Option<u64>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub lease_ms: Option<u64>,
}

/// A failed attempt reported by the consumer holding the lease.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NackRequest {
    pub lease_token: String,
    pub error: Option<String>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub delay_ms: Option<u64>,
}

/// One ack of many.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckItem {
    pub id: String,
    pub lease_token: String,
}

/// How long after a long-poll's deadline the caller still waits for the writer's answer.
pub const PARK_GRACE_MS: u64 = 250;

/// Default and largest page of a listing.
pub const LIST_DEFAULT_LIMIT: usize = 100;
pub const LIST_MAX_LIMIT: usize = 1000;

/// Default and largest number of slices of a timeline, and its default range.
pub const TIMELINE_DEFAULT_BUCKETS: usize = 60;
pub const TIMELINE_MAX_BUCKETS: usize = 1000;
pub const TIMELINE_DEFAULT_RANGE_MS: u64 = 86_400_000;

impl Service {
    /// Builds the service on a started writer.
    pub fn new(
        store: Arc<dyn Store>,
        writer: Writer,
        config: ServerConfig,
        clock: Clock,
        shutdown: watch::Receiver<bool>,
    ) -> Service {
        Service {
            store,
            writer,
            config,
            clock,
            shutdown,
            ids: IdGen::default(),
        }
    }

    /// Whether `token` is one of the configured bearer tokens (constant time in its content).
    pub fn token_accepted(&self, token: &str) -> bool {
        self.config
            .auth_tokens
            .iter()
            .any(|t| same_secret(t.as_bytes(), token.as_bytes()))
    }

    /// Whether clients must present a token at all.
    pub fn auth_required(&self) -> bool {
        !self.config.auth_tokens.is_empty()
    }

    pub async fn health(&self) -> Result<(), StoreError> {
        self.read(|s| s.health()).await
    }

    pub async fn queues(&self) -> Result<Vec<QueueCounts>, ApiError> {
        Ok(self.read(|s| s.queues()).await?)
    }

    /// One queue's counts (zeros for a queue that holds nothing).
    pub async fn queue(&self, queue: String) -> Result<QueueCounts, ApiError> {
        check_queue(self, &queue)?;
        Ok(self
            .queues()
            .await?
            .into_iter()
            .find(|c| c.queue == queue)
            .unwrap_or(QueueCounts {
                queue,
                counts: [0; 5],
            }))
    }

    /// Schedules one task: `(created, task)`; `created` is false for an idempotent repeat.
    pub async fn schedule(
        &self,
        queue: &str,
        request: ScheduleRequest,
    ) -> Result<(bool, Task), ApiError> {
        check_queue(self, queue)?;
        let task = build_task(self, queue, request, self.clock.now_ms())?;
        let outcome = self
            .writer
            .submit_one(Command::Schedule(Box::new(task)))
            .await?;
        schedule_answer(outcome)
    }

    /// Schedules many tasks in one commit. Each item is validated alone; an invalid one (or one that
    /// could not even be decoded, given as `Err`) gets its error and the others go ahead.
    pub async fn schedule_batch(
        &self,
        queue: &str,
        items: Vec<Result<ScheduleRequest, ApiError>>,
    ) -> Result<Vec<Result<(bool, Task), ApiError>>, ApiError> {
        check_queue(self, queue)?;
        let max = self.config.limits.max_batch;
        if items.len() > max {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "batch_too_large",
                format!(
                    "a batch holds at most {max} tasks; this one has {}",
                    items.len()
                ),
            ));
        }
        let now_ms = self.clock.now_ms();
        let mut results: Vec<Result<usize, ApiError>> = Vec::with_capacity(items.len());
        let mut commands = Vec::new();
        for item in items {
            let built = item.and_then(|r| build_task(self, queue, r, now_ms));
            results.push(built.map(|task| {
                commands.push(Command::Schedule(Box::new(task)));
                commands.len() - 1
            }));
        }
        let outcomes = if commands.is_empty() {
            Vec::new()
        } else {
            self.writer.submit(commands).await?
        };
        let mut outcomes: Vec<Option<Outcome>> = outcomes.into_iter().map(Some).collect();
        Ok(results
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
            .collect())
    }

    /// A task by id, in any state.
    pub async fn get(&self, queue: &str, id: &str) -> Result<Task, ApiError> {
        check_queue(self, queue)?;
        let (q, i) = (queue.to_owned(), id.to_owned());
        self.read(move |s| s.get(&q, &i))
            .await?
            .ok_or_else(|| ApiError::not_found(queue, id))
    }

    pub async fn reschedule(
        &self,
        queue: &str,
        id: &str,
        request: PatchRequest,
    ) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        if request.delay_ms.is_none() && request.run_at.is_none() && request.payload.is_none() {
            return Err(ApiError::invalid("give delay_ms or run_at, and/or payload"));
        }
        let now_ms = self.clock.now_ms();
        let run_at_ms = if request.delay_ms.is_some() || request.run_at.is_some() {
            Some(due_time(
                self,
                now_ms,
                request.delay_ms,
                request.run_at.as_deref(),
            )?)
        } else {
            None
        };
        let payload = match request.payload {
            Some(value) => Some(payload_text(self, Some(value))?),
            None => None,
        };
        let command = Command::Reschedule {
            queue: queue.to_owned(),
            id: id.to_owned(),
            run_at_ms,
            payload,
        };
        self.by_id(queue, id, "reschedule", command).await
    }

    pub async fn cancel(&self, queue: &str, id: &str) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        let command = Command::Cancel {
            queue: queue.to_owned(),
            id: id.to_owned(),
        };
        self.by_id(queue, id, "cancel", command).await
    }

    /// Leases up to `max` ready tasks, waiting up to `wait_ms` for some to become ready.
    pub async fn reserve(
        &self,
        queue: &str,
        request: ReserveRequest,
    ) -> Result<Vec<Task>, ApiError> {
        check_queue(self, queue)?;
        let limits = &self.config.limits;
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
            check_lease_ms(self, lease_ms, "lease_ms")?;
        }
        // The writer leases what is ready at once; with `wait_ms`, it keeps the request until tasks
        // of the queue become ready or the deadline passes.
        let wait_ms = if *self.shutdown.borrow() { 0 } else { wait_ms };
        let deadline_ms = self.clock.now_ms() + wait_ms;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer.park(Park {
            queue: queue.to_owned(),
            max,
            lease_ms: request.lease_ms,
            default_lease_ms: self.config.default_lease_ms,
            token_prefix: format!("{}.", self.ids.next()),
            deadline_ms,
            reply,
        })?;
        let mut shutdown = self.shutdown.clone();
        // The writer stops serving the park at its deadline; waiting a little longer here means a
        // lease made just before the deadline still reaches the client.
        let give_up = self.clock.instant_at(deadline_ms + PARK_GRACE_MS);
        tokio::select! {
            // An answer that is there wins over shutdown: dropping it would strand its leases.
            biased;
            answer = answer => match answer {
                Ok(Ok(tasks)) => Ok(tasks),
                Ok(Err(error)) => Err(error.into()),
                Err(_) => Ok(Vec::new()),
            },
            _ = tokio::time::sleep_until(give_up) => Ok(Vec::new()),
            _ = shutdown.changed() => Ok(Vec::new()),
        }
    }

    pub async fn ack(&self, queue: &str, id: &str, token: String) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        let command = Command::Ack {
            queue: queue.to_owned(),
            id: id.to_owned(),
            token,
            retention_ms: self.config.retention_ms,
        };
        self.by_id(queue, id, "ack", command).await
    }

    /// Acks up to `max_batch` leases in one durable commit; each item's error, if any, in order.
    pub async fn ack_many(
        &self,
        queue: &str,
        items: &[AckItem],
    ) -> Result<Vec<Option<ApiError>>, ApiError> {
        check_queue(self, queue)?;
        let max = self.config.limits.max_batch;
        if items.is_empty() || items.len() > max {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "batch_too_large",
                format!("give 1 to {max} acks; this request has {}", items.len()),
            ));
        }
        let commands: Vec<Command> = items
            .iter()
            .map(|item| Command::Ack {
                queue: queue.to_owned(),
                id: item.id.clone(),
                token: item.lease_token.clone(),
                retention_ms: self.config.retention_ms,
            })
            .collect();
        let outcomes = self.writer.submit(commands).await?;
        Ok(items
            .iter()
            .zip(outcomes)
            .map(|(item, outcome)| settled(queue, &item.id, "ack", outcome).err())
            .collect())
    }

    pub async fn nack(
        &self,
        queue: &str,
        id: &str,
        request: NackRequest,
    ) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        if let Some(delay) = request.delay_ms
            && delay > self.config.limits.max_delay_ms
        {
            return Err(ApiError::invalid("delay_ms exceeds the maximum delay"));
        }
        let command = Command::Nack {
            queue: queue.to_owned(),
            id: id.to_owned(),
            token: request.lease_token,
            error: request.error,
            delay_ms: request.delay_ms,
            min_delay_ms: None,
        };
        self.by_id(queue, id, "settle", command).await
    }

    pub async fn extend(
        &self,
        queue: &str,
        id: &str,
        token: String,
        lease_ms: u64,
    ) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        check_lease_ms(self, lease_ms, "lease_ms")?;
        let command = Command::Extend {
            queue: queue.to_owned(),
            id: id.to_owned(),
            token,
            lease_ms,
        };
        self.by_id(queue, id, "settle", command).await
    }

    pub async fn retry(&self, queue: &str, id: &str) -> Result<Settled, ApiError> {
        check_queue(self, queue)?;
        let command = Command::Retry {
            queue: queue.to_owned(),
            id: id.to_owned(),
        };
        self.by_id(queue, id, "retry", command).await
    }

    /// One page of a queue's tasks, optionally of one state.
    pub async fn list(
        &self,
        queue: &str,
        state: Option<TaskState>,
        cursor: Option<String>,
        limit: Option<usize>,
    ) -> Result<Page, ApiError> {
        check_queue(self, queue)?;
        let limit = match limit {
            Some(l) if (1..=LIST_MAX_LIMIT).contains(&l) => l,
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "limit must be between 1 and {LIST_MAX_LIMIT}"
                )));
            }
            None => LIST_DEFAULT_LIMIT,
        };
        let q = queue.to_owned();
        Ok(self
            .read(move |s| s.list(&q, state, cursor.as_deref(), limit))
            .await?)
    }

    /// A page of `queue`'s scheduled tasks in due order (then id order) after `cursor` (a
    /// `next_cursor` of an earlier page).
    pub async fn list_due(
        &self,
        queue: &str,
        cursor: Option<String>,
        limit: Option<usize>,
    ) -> Result<DuePage, ApiError> {
        check_queue(self, queue)?;
        let limit = match limit {
            Some(l) if (1..=LIST_MAX_LIMIT).contains(&l) => l,
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "limit must be between 1 and {LIST_MAX_LIMIT}"
                )));
            }
            None => LIST_DEFAULT_LIMIT,
        };
        let after = match cursor {
            Some(text) => Some(DueCursor::parse(&text).ok_or_else(|| {
                ApiError::invalid(
                    "cursor must be the next_cursor of an earlier page with order=due",
                )
            })?),
            None => None,
        };
        let q = queue.to_owned();
        Ok(self
            .read(move |s| s.list_due(&q, after.as_ref(), limit))
            .await?)
    }

    /// Scheduled tasks of `queue` counted by due time in `buckets` equal slices of `[from_ms, to_ms)`
    /// (defaults: now, a day later, 60 slices). The range may reach at most `max_delay_ms` past
    /// now, as far as a task can be scheduled.
    pub async fn timeline(
        &self,
        queue: &str,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        buckets: Option<usize>,
    ) -> Result<(Buckets, Timeline), ApiError> {
        check_queue(self, queue)?;
        let now = self.clock.now_ms();
        let from_ms = from_ms.unwrap_or(now);
        let to_ms = to_ms.unwrap_or(from_ms.saturating_add(TIMELINE_DEFAULT_RANGE_MS));
        let count = buckets.unwrap_or(TIMELINE_DEFAULT_BUCKETS);
        if !(1..=TIMELINE_MAX_BUCKETS).contains(&count) {
            return Err(ApiError::invalid(format!(
                "buckets must be between 1 and {TIMELINE_MAX_BUCKETS}"
            )));
        }
        if to_ms <= from_ms {
            return Err(ApiError::invalid("to must be later than from"));
        }
        let max_delay_ms = self.config.limits.max_delay_ms;
        if to_ms > now.saturating_add(max_delay_ms) {
            return Err(ApiError::invalid(format!(
                "to may be at most max_delay_ms ({max_delay_ms} ms) after now"
            )));
        }
        let slices = Buckets::new(from_ms, to_ms, count)
            .ok_or_else(|| ApiError::invalid("the range does not fit"))?;
        let q = queue.to_owned();
        let timeline = self.read(move |s| s.timeline(&q, &slices)).await?;
        Ok((slices, timeline))
    }

    /// Commits one command on task `id` and maps its outcome.
    async fn by_id(
        &self,
        queue: &str,
        id: &str,
        action: &str,
        command: Command,
    ) -> Result<Settled, ApiError> {
        settled(queue, id, action, self.writer.submit_one(command).await?)
    }
}

/// Compares in time that depends only on the lengths, so a token cannot be guessed byte by byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

pub fn check_queue(state: &Service, queue: &str) -> Result<(), ApiError> {
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
    pub id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub payload: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub delay_ms: Option<u64>,
    pub run_at: Option<String>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u32")]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_vec_u64")]
    pub backoff_ms: Option<Vec<u64>>,
    pub backoff: Option<ExponentialSpec>,
    pub webhook: Option<Webhook>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    pub lease_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExponentialSpec {
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
    initial_ms: Option<u64>,
    factor: Option<f64>,
    #[serde(default, deserialize_with = "punctual_core::whole::opt_u64")]
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

pub fn check_lease_ms(state: &Service, lease_ms: u64, field: &str) -> Result<(), ApiError> {
    let limits = &state.config.limits;
    if lease_ms < limits.min_lease_ms || lease_ms > limits.max_lease_ms {
        return Err(ApiError::invalid(format!(
            "{field} must be between {} and {} ms",
            limits.min_lease_ms, limits.max_lease_ms
        )));
    }
    Ok(())
}

pub fn payload_text(
    state: &Service,
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
pub fn due_time(
    state: &Service,
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

fn check_webhook(state: &Service, webhook: &Webhook) -> Result<(), ApiError> {
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
    state: &Service,
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

pub(crate) fn unexpected(outcome: &Outcome) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected store outcome {outcome:?}"),
    )
}

/// A schedule's outcome: the task and whether it was created now (`false`: an idempotent repeat).
pub fn schedule_answer(outcome: Outcome) -> Result<(bool, Task), ApiError> {
    match outcome {
        Outcome::Created(task) => Ok((true, task)),
        Outcome::Existing(task) => Ok((false, task)),
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

// ---------------------------------------------------------------------------------------------
// Keys: the Redis front end's model. A key is a task of its database's queue whose id is the key
// and whose payload is the value as a JSON string; a live key is a `scheduled` task, due at its
// expiry (or at `NEVER_MS` without a TTL). Once it fires it reads as gone.

/// One key write; a batch of them is one commit ([`Service::keys`]).
#[derive(Debug, Clone)]
pub enum KeyOp {
    /// `SET` and its family: `payload` is the value's JSON text ([`Service::key_payload`]).
    Put {
        key: String,
        payload: String,
        run_at_ms: u64,
        when: PutWhen,
        keep_due: bool,
    },
    /// `DEL`: only a live key.
    Delete { key: String },
    /// `EXPIRE`, `PERSIST`: only a live key.
    SetDue { key: String, run_at_ms: u64 },
    /// `INCRBY`.
    Incr { key: String, by: i64 },
}

/// What a [`KeyOp`] did.
#[derive(Debug)]
pub enum KeyAnswer {
    /// The live key that was there before (for `SET … GET`), and whether the value was written.
    Put {
        previous: Option<Box<Task>>,
        written: bool,
    },
    /// Whether a live key was deleted (`DEL`) or had its due time moved (`EXPIRE`).
    Done(bool),
    /// The value after `INCRBY`.
    Integer(i64),
    Refused(ApiError),
}

/// How many times a write waits for a key that is firing at that moment (`ready` or `leased` for
/// the instant its expiry event is handed out), and for how long each time.
const FIRING_RETRIES: u32 = 100;
const FIRING_WAIT_MS: u64 = 2;

/// A key's value, from the JSON string the front end stored (or any other JSON, as its text).
pub fn key_value(task: &Task) -> Vec<u8> {
    let payload = task.payload.as_deref().unwrap_or("");
    match serde_json::from_str::<String>(payload) {
        Ok(text) => text.into_bytes(),
        Err(_) => payload.as_bytes().to_vec(),
    }
}

impl Service {
    /// A key as a task id: UTF-8 without control characters, at most `max_id_bytes`.
    pub fn key_id(&self, key: &[u8]) -> Result<String, ApiError> {
        let text = std::str::from_utf8(key).map_err(|_| {
            ApiError::invalid("a key must be UTF-8 text (Punctual keeps keys as task ids)")
        })?;
        self.config
            .limits
            .check_id(text)
            .map_err(|m| ApiError::invalid(m.replace("task id", "key")))?;
        Ok(text.to_owned())
    }

    /// A value as a payload: a JSON string of the value, which must be UTF-8, within
    /// `max_payload_bytes` once quoted.
    pub fn key_payload(&self, value: &[u8]) -> Result<String, ApiError> {
        let text = std::str::from_utf8(value).map_err(|_| {
            ApiError::invalid("a value must be UTF-8 text (Punctual keeps values as JSON strings)")
        })?;
        let json = serde_json::to_string(text).unwrap_or_default();
        let max = self.config.limits.max_payload_bytes;
        if json.len() > max {
            return Err(ApiError::too_large(format!(
                "the value is {} bytes as a JSON string; the limit is {max} ({}), set by \
                 --max-payload-bytes",
                json.len(),
                human_bytes(max)
            )));
        }
        Ok(json)
    }

    /// The live key `key` of `queue` (a `scheduled` task), or `None` when it does not exist or
    /// has fired.
    pub async fn live_key(&self, queue: &str, key: &str) -> Result<Option<Task>, ApiError> {
        let (q, k) = (queue.to_owned(), key.to_owned());
        let task = self.read(move |s| s.get(&q, &k)).await?;
        Ok(task.filter(|t| t.state == TaskState::Scheduled))
    }

    /// A key's task. Its attempts are the hub's hand-offs of its expiry event: if a lease of the
    /// hub ever runs out (a crash after the lease was made durable by another commit), the key is
    /// ready again at once and fires again, rather than counting towards a dead letter. An empty
    /// ladder is "retry at once" (clients may not send one: they must say `[0]`) and, unlike
    /// `[0]`, allocates nothing in each of the task's copies.
    fn key_task(&self, queue: &str, key: &str, payload: Option<String>, run_at_ms: u64) -> Task {
        let backoff = Backoff::Ladder {
            steps_ms: Vec::new(),
        };
        Task {
            payload,
            ..Task::new(
                queue,
                key,
                run_at_ms,
                self.config.limits.max_attempts,
                backoff,
            )
        }
    }

    fn key_command(&self, queue: &str, op: &KeyOp) -> Command {
        match op {
            KeyOp::Put {
                key,
                payload,
                run_at_ms,
                when,
                keep_due,
            } => Command::Put {
                task: Box::new(self.key_task(queue, key, Some(payload.clone()), *run_at_ms)),
                when: *when,
                keep_due: *keep_due,
            },
            KeyOp::Delete { key } => Command::Delete {
                queue: queue.to_owned(),
                id: key.clone(),
            },
            KeyOp::SetDue { key, run_at_ms } => Command::SetDue {
                queue: queue.to_owned(),
                id: key.clone(),
                run_at_ms: *run_at_ms,
            },
            KeyOp::Incr { key, by } => Command::Incr {
                template: Box::new(self.key_task(queue, key, None, punctual_core::NEVER_MS)),
                by: *by,
            },
        }
    }

    /// Applies key writes in order in one commit and answers each. A write that finds its key
    /// firing at that instant is tried again a moment later, in order with the others.
    pub async fn keys(&self, queue: &str, ops: &[KeyOp]) -> Result<Vec<KeyAnswer>, ApiError> {
        check_queue(self, queue)?;
        let mut answers: Vec<Option<KeyAnswer>> = ops.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..ops.len()).collect();
        for round in 0..=FIRING_RETRIES {
            if pending.is_empty() {
                break;
            }
            if round > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(FIRING_WAIT_MS)).await;
            }
            let commands = pending
                .iter()
                .map(|&i| self.key_command(queue, &ops[i]))
                .collect();
            let outcomes = self.writer.submit(commands).await?;
            let mut again = Vec::new();
            for (&i, outcome) in pending.iter().zip(outcomes) {
                let answer = match outcome {
                    Outcome::WrongState(TaskState::Ready | TaskState::Leased)
                        if !matches!(ops[i], KeyOp::Delete { .. } | KeyOp::SetDue { .. }) =>
                    {
                        again.push(i);
                        continue;
                    }
                    Outcome::Put { previous, written } => KeyAnswer::Put {
                        previous: previous.filter(|p| p.state == TaskState::Scheduled),
                        written: written.is_some(),
                    },
                    Outcome::Cancelled(_) => KeyAnswer::Done(true),
                    Outcome::Updated(task) | Outcome::Created(task)
                        if matches!(ops[i], KeyOp::Incr { .. }) =>
                    {
                        let value = key_value(&task);
                        match std::str::from_utf8(&value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                        {
                            Some(n) => KeyAnswer::Integer(n),
                            None => KeyAnswer::Refused(unexpected(&Outcome::Updated(task))),
                        }
                    }
                    Outcome::Updated(_) => KeyAnswer::Done(true),
                    Outcome::NotFound | Outcome::WrongState(_) => KeyAnswer::Done(false),
                    Outcome::NotInteger => KeyAnswer::Refused(ApiError::invalid(
                        "value is not an integer or out of range",
                    )),
                    other => KeyAnswer::Refused(unexpected(&other)),
                };
                answers[i] = Some(answer);
            }
            pending = again;
        }
        for i in pending {
            answers[i] = Some(KeyAnswer::Refused(ApiError::conflict(
                "key_firing",
                "the key is firing at this moment and its expiry event is being handed out; retry",
            )));
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every op answered"))
            .collect())
    }

    /// Hands fired keys' expiry events on: acks each lease of `queue`, and in the same commit
    /// keeps each event of `kept` (`(backlog, payload)`) as a ready task of that backlog, to be
    /// delivered when a subscriber comes. Events past a backlog's room (`max_waiting`, counted by
    /// the caller) are the caller's to count as dropped.
    pub async fn keys_fired(
        &self,
        queue: &str,
        leases: &[(String, String)],
        kept: &[(String, String)],
    ) -> Result<(), ApiError> {
        let mut commands = self.kept_events(kept);
        // The events are out already: the acks need not wait for an fsync (a crash that loses one
        // hands the key out again, an event twice). Kept events make the commit durable anyway.
        commands.extend(leases.iter().map(|(id, token)| Command::AckLazy {
            queue: queue.to_owned(),
            id: id.clone(),
            token: token.clone(),
            retention_ms: self.config.retention_ms,
        }));
        if commands.is_empty() {
            return Ok(());
        }
        // Kept events make the commit durable, and the acks in it with them.
        let durable = commands.iter().any(Command::is_durable);
        self.writer.submit(commands).await?;
        if !leases.is_empty() && !durable {
            self.writer.flush_soon();
        }
        Ok(())
    }

    /// A ready task for each kept event `(backlog, payload)`.
    fn kept_events(&self, kept: &[(String, String)]) -> Vec<Command> {
        let now_ms = self.clock.now_ms();
        kept.iter()
            .map(|(backlog, payload)| {
                Command::Schedule(Box::new(Task {
                    payload: Some(payload.clone()),
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    ..Task::new(
                        backlog,
                        self.ids.next(),
                        now_ms,
                        self.config.limits.max_attempts,
                        Backoff::default(),
                    )
                }))
            })
            .collect()
    }

    /// Settles leases of waiting events: `delivered` are acked (and purged at once), `back` are
    /// given back without counting an attempt, due again after `delay_ms`; in the same commit the
    /// events of `kept` are kept in other backlogs, as in [`Service::keys_fired`].
    pub async fn events_settled(
        &self,
        backlog: &str,
        delivered: &[(String, String)],
        back: &[(String, String)],
        delay_ms: u64,
        kept: &[(String, String)],
    ) -> Result<(), ApiError> {
        let mut commands = self.kept_events(kept);
        commands.extend(delivered.iter().map(|(id, token)| Command::Ack {
            queue: backlog.to_owned(),
            id: id.clone(),
            token: token.clone(),
            retention_ms: 0,
        }));
        commands.extend(back.iter().map(|(id, token)| Command::Release {
            queue: backlog.to_owned(),
            id: id.clone(),
            token: token.clone(),
            delay_ms,
        }));
        if commands.is_empty() {
            return Ok(());
        }
        self.writer.submit(commands).await.map(|_| ())
    }

    /// Cancels tasks of `queue` in one commit (those not leased); how many were cancelled.
    pub async fn cancel_many(&self, queue: &str, ids: Vec<String>) -> Result<usize, ApiError> {
        check_queue(self, queue)?;
        let commands = ids
            .into_iter()
            .map(|id| Command::Cancel {
                queue: queue.to_owned(),
                id,
            })
            .collect();
        let outcomes = self.writer.submit(commands).await?;
        Ok(outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Cancelled(_)))
            .count())
    }
}
