//! The webhook sender: delivers due tasks that carry a `webhook` by POSTing their payload.
//!
//! One tokio task leases ready webhook tasks (`Command::ReservePush`) as long as a global cap on
//! concurrent deliveries allows, and runs each delivery on its own task with one shared connection
//! pool. A 2xx answer acks; any other status, a timeout or a connection error is a failed attempt
//! (with `Retry-After`, when later than the policy's next delay and at most `retry_after_max_ms`,
//! deciding the delay).
//!
//! One target's failures never delay another's (see `targets.rs`): each host has its own cap, a
//! failing host a smaller one, and a host that keeps failing is backed off, its tasks handed back
//! once until the back-off ends. A request still running after `STALL_MS` gives its global slot to
//! a second, larger pool of slots for slow requests, so requests hanging on dead hosts cannot hold
//! the slots healthy hosts need. Addresses are checked at delivery (`address.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use punctual_core::Task;
use punctual_core::time::parse_http_date_ms;
use punctual_store::{Command, Outcome};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore, watch};

pub use crate::address::AllowEntry;
use crate::address::{AddressPolicy, GuardedResolver};
use crate::clock::Clock;
use crate::ids::IdGen;
use crate::metrics as m;
use crate::targets::{Admit, Slot, Targets, host_key};
use crate::writer::Writer;

/// How the sender behaves; `WebhookConfig::default()` holds the documented defaults.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Signs every request with `punctual-signature` when set.
    pub secret: Option<String>,
    /// Deliveries in flight at once, over all targets.
    pub concurrency: usize,
    /// Deliveries in flight at once to one host (`host:port`).
    pub per_host: usize,
    /// Request timeout when the task does not name one.
    pub default_timeout_ms: u64,
    /// How long deliveries in flight may finish at shutdown; the rest are retried after restart.
    pub shutdown_grace_ms: u64,
    /// Let webhooks reach private, loopback and link-local addresses.
    pub allow_private: bool,
    /// Networks and host names webhooks may reach although private.
    pub allow: Vec<AllowEntry>,
    /// Longest delay a target's `Retry-After` may ask for.
    pub retry_after_max_ms: u64,
}

impl WebhookConfig {
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy {
            allow_private: self.allow_private,
            allow: self.allow.clone(),
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            secret: None,
            concurrency: 64,
            per_host: 16,
            default_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            allow_private: false,
            allow: Vec::new(),
            retry_after_max_ms: 86_400_000,
        }
    }
}

/// A webhook task's lease is its request timeout plus this, so a lease never ends mid-request.
const LEASE_GRACE_MS: u64 = 5_000;
/// A task whose host is saturated is offered again after this …
const SATURATED_RETRY_MS: u64 = 200;
/// … or after this when the host's requests are slow (hung), so its tasks do not churn.
const SLOW_HOST_RETRY_MS: u64 = 2_000;
/// A request still running after this gives its global slot to the pool for slow requests.
const STALL_MS: u64 = 250;
/// The pool for slow requests is this many times the global concurrency.
const STALLED_FACTOR: usize = 4;
/// Without a wake-up, the sender still looks for due webhook tasks this often.
const IDLE_POLL: Duration = Duration::from_secs(5);

pub struct Sender {
    writer: Writer,
    config: WebhookConfig,
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    targets: Arc<Targets>,
    /// Slots for requests that have run longer than `STALL_MS`.
    stalled: Arc<Semaphore>,
    clock: Clock,
    ids: IdGen,
    /// How long an acked task stays readable (the server's retention).
    retention_ms: u64,
    /// Requests on the wire: lease token → (queue, id), to release them if shutdown cuts them off.
    in_flight: Mutex<HashMap<String, (String, String)>>,
}

/// The `punctual-signature` header value: `t=<unix_ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t_ms: u64, body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t_ms},v1={hex}")
}

/// `Retry-After` as a delay from now: seconds, or an HTTP date.
fn retry_after_ms(value: &str, now_ms: u64) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1000));
    }
    parse_http_date_ms(value).map(|at| at.saturating_sub(now_ms))
}

impl Sender {
    pub fn new(writer: Writer, config: WebhookConfig, retention_ms: u64, clock: Clock) -> Sender {
        let policy = Arc::new(config.policy());
        let stalled_slots = config.concurrency.max(1) * STALLED_FACTOR;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .pool_max_idle_per_host(config.per_host.max(1))
            .build()
            .expect("an HTTP client with rustls builds");
        Sender {
            writer,
            config,
            client,
            policy,
            targets: Arc::new(Targets::default()),
            stalled: Arc::new(Semaphore::new(stalled_slots)),
            clock,
            ids: IdGen::default(),
            retention_ms,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The per-host state, for the dashboard (`GET /v1/webhooks/targets`).
    pub fn targets(&self) -> Arc<Targets> {
        self.targets.clone()
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown`, then gives deliveries in flight the grace period to finish.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        loop {
            if *shutdown.borrow() {
                break;
            }
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = shutdown.changed() => break,
            };
            let mut permits = vec![first];
            while permits.len() < 100 {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // Register for the wake-up before looking, so a task that becomes ready in between is not missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let command = Command::ReservePush {
                max: permits.len(),
                default_timeout_ms: self.config.default_timeout_ms,
                grace_ms: LEASE_GRACE_MS,
                token_prefix: format!("{}.", self.ids.next()),
            };
            let tasks = match self.writer.submit_one(command).await {
                Ok(Outcome::Reserved(tasks)) => tasks,
                Ok(_) => Vec::new(),
                Err(error) => {
                    tracing::error!(message = %error.message, "cannot lease webhook tasks");
                    Vec::new()
                }
            };
            if tasks.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            let now_ms = self.clock.now_ms();
            let mut handed_back = Vec::new();
            for task in tasks {
                let Some(permit) = permits.pop() else { break };
                let host = task
                    .webhook
                    .as_ref()
                    .map_or_else(String::new, |w| host_key(&w.url));
                let (admit, slot) = self.targets.admit(&host, self.config.per_host, now_ms);
                let delay_ms = match (admit, slot) {
                    (Admit::Go, Some(slot)) => {
                        let sender = self.clone();
                        tokio::spawn(async move {
                            let outcome = sender.deliver(task, permit, slot).await;
                            if let Some(command) = outcome {
                                sender.settle(command).await;
                            }
                        });
                        continue;
                    }
                    (Admit::BackedOff { until_ms }, _) => until_ms.saturating_sub(now_ms),
                    (Admit::Saturated { slow: true }, _) => SLOW_HOST_RETRY_MS,
                    _ => SATURATED_RETRY_MS,
                };
                // Not now: back without using an attempt, due again when the host may take it.
                if let Some(lease) = &task.lease {
                    handed_back.push(Command::Release {
                        queue: task.queue.clone(),
                        id: task.id.clone(),
                        token: lease.token.clone(),
                        delay_ms,
                    });
                }
            }
            if !handed_back.is_empty()
                && let Err(error) = self.writer.submit(handed_back).await
            {
                tracing::error!(message = %error.message, "cannot hand webhook tasks back");
            }
        }
        let all = self.config.concurrency.max(1) as u32;
        let all_stalled = (self.config.concurrency.max(1) * STALLED_FACTOR) as u32;
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        // Every delivery holds a global slot or, once slow, a slot of the slow pool: all are back
        // when both pools are full again.
        let drained = async {
            let _global = slots.acquire_many(all).await;
            let _slow = self.stalled.acquire_many(all_stalled).await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            // Give the cut-off deliveries back without using up their attempt; the writer's final sync
            // makes that durable, so after a restart they are simply due again.
            let cut_off: Vec<(String, (String, String))> = self.in_flight().drain().collect();
            tracing::warn!(
                count = cut_off.len(),
                "releasing webhook deliveries still in flight at shutdown"
            );
            for (token, (queue, id)) in cut_off {
                self.settle(Command::Release {
                    queue,
                    id,
                    token,
                    delay_ms: 0,
                })
                .await;
            }
        }
    }

    async fn settle(&self, command: Command) {
        if let Err(error) = self.writer.submit_one(command).await {
            tracing::error!(message = %error.message, "cannot record a webhook delivery's outcome");
        }
    }

    /// Makes one delivery, holding a global slot (`permit`) and the host's (`slot`); returns the
    /// command that records its outcome.
    async fn deliver(
        &self,
        task: Task,
        permit: tokio::sync::OwnedSemaphorePermit,
        mut slot: Slot,
    ) -> Option<Command> {
        let (Some(webhook), Some(lease)) = (task.webhook.as_ref(), task.lease.as_ref()) else {
            return None;
        };
        let token = lease.token.clone();
        let nack = |error: String, retry_after: Option<u64>| Command::Nack {
            queue: task.queue.clone(),
            id: task.id.clone(),
            token: token.clone(),
            error: Some(error),
            delay_ms: None,
            min_delay_ms: retry_after,
        };
        // A literal address is checked here too: the task may predate the rules or a change of them.
        if let Err(refusal) = self.policy.check_url(&webhook.url) {
            drop(slot);
            tracing::info!(
                queue = task.queue.as_str(),
                id = task.id.as_str(),
                attempt = task.attempt,
                reason = refusal.as_str(),
                "webhook attempt refused"
            );
            return Some(nack(refusal, None));
        }
        let body = task.payload.clone().unwrap_or_else(|| "null".to_owned());
        let timeout_ms = webhook.timeout_ms.unwrap_or(self.config.default_timeout_ms);
        let mut request = self
            .client
            .post(&webhook.url)
            .timeout(Duration::from_millis(timeout_ms))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("punctual-queue", task.queue.as_str())
            .header("punctual-task-id", task.id.as_str())
            .header("punctual-attempt", task.attempt.to_string());
        for (name, value) in &webhook.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(secret) = &self.config.secret {
            request = request.header(
                "punctual-signature",
                signature(secret.as_bytes(), self.clock.now_ms(), body.as_bytes()),
            );
        }
        self.in_flight()
            .insert(token.clone(), (task.queue.clone(), task.id.clone()));
        #[allow(clippy::disallowed_methods)] // Measures request duration only.
        let started = std::time::Instant::now();
        let send = request.body(body).send();
        tokio::pin!(send);
        // Past STALL_MS the request moves to the pool for slow requests, freeing its global slot.
        let mut permit = Some(permit);
        let mut stalled = None;
        let result = tokio::select! {
            result = &mut send => result,
            () = tokio::time::sleep(Duration::from_millis(STALL_MS)) => {
                slot.mark_slow();
                if let Ok(slow) = self.stalled.clone().try_acquire_owned() {
                    stalled = Some(slow);
                    permit = None;
                }
                send.await
            }
        };
        drop((permit, stalled));
        // None: shutdown released this delivery while it ran, so its outcome no longer matters.
        self.in_flight().remove(&token)?;
        metrics::histogram!(m::WEBHOOK_SECONDS).record(started.elapsed().as_secs_f64());
        let (outcome_label, failure) = match result {
            Ok(response) if response.status().is_success() => ("2xx", None),
            Ok(response) if response.status().is_server_error() => {
                let retry_after = self.retry_after(&response);
                (
                    "5xx",
                    Some((format!("HTTP {}", response.status()), retry_after)),
                )
            }
            Ok(response) => {
                let status = response.status();
                let class = if status.is_redirection() {
                    "3xx"
                } else {
                    "4xx"
                };
                let retry_after = self.retry_after(&response);
                (class, Some((format!("HTTP {status}"), retry_after)))
            }
            Err(error) if error.is_timeout() => (
                "timeout",
                Some((format!("timed out after {timeout_ms} ms"), None)),
            ),
            Err(error) => {
                let mut message = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    message = format!("{message}: {cause}");
                    source = cause.source();
                }
                ("error", Some((message, None)))
            }
        };
        metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => outcome_label).increment(1);
        // The host is up if it answered at all, short of a 5xx.
        slot.finish(
            self.clock.now_ms(),
            matches!(outcome_label, "2xx" | "3xx" | "4xx"),
        );
        if let Some((reason, _)) = &failure {
            tracing::info!(
                queue = task.queue.as_str(),
                id = task.id.as_str(),
                attempt = task.attempt,
                host = host_key(&webhook.url).as_str(),
                reason = reason.as_str(),
                "webhook attempt failed"
            );
        }
        Some(match failure {
            None => Command::Ack {
                queue: task.queue.clone(),
                id: task.id.clone(),
                token,
                retention_ms: self.retention_ms,
            },
            Some((error, retry_after)) => nack(error, retry_after),
        })
    }

    /// A response's `Retry-After` as a delay, capped at `retry_after_max_ms`.
    fn retry_after(&self, response: &reqwest::Response) -> Option<u64> {
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_ms(v, self.clock.now_ms()))
            .map(|ms| ms.min(self.config.retry_after_max_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body() {
        // HMAC-SHA256("key", "1.{}"), computed independently with Python's hmac module.
        assert_eq!(
            signature(b"key", 1, b"{}"),
            "t=1,v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }

    #[test]
    fn hosts_and_retry_after() {
        assert_eq!(retry_after_ms("120", 0), Some(120_000));
        assert_eq!(
            retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_770_000),
            Some(7_000)
        );
        assert_eq!(retry_after_ms("soon", 0), None);
    }
}
