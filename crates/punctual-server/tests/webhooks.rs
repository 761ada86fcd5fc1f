//! Webhook delivery against real HTTP targets started by the test on loopback.
#![allow(clippy::disallowed_methods)] // Tests measure time directly.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use punctual_server::webhook::{WebhookConfig, signature};
use punctual_server::{App, ServerConfig};
use punctual_store::{MemoryStore, Store};
use serde_json::{Value, json};
use tower::ServiceExt;

/// One request as a target saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

/// What a target answers, by the number of requests it has seen before.
type Behaviour = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

enum Reply {
    Status(StatusCode),
    Redirect(&'static str),
    RetryAfter(StatusCode, &'static str),
    Hang(Duration),
}

#[derive(Clone)]
struct Target {
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Behaviour,
}

async fn handle(State(target): State<Target>, headers: HeaderMap, body: Bytes) -> Response {
    let n = {
        let mut seen = target.seen.lock().unwrap();
        seen.push(Seen {
            at: Instant::now(),
            headers,
            body,
        });
        seen.len() - 1
    };
    match (target.behaviour)(n) {
        Reply::Status(status) => status.into_response(),
        Reply::Redirect(to) => (StatusCode::FOUND, [("location", to)]).into_response(),
        Reply::RetryAfter(status, after) => (status, [("retry-after", after)]).into_response(),
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
    }
}

/// Starts a target; returns its URL and what it saw.
async fn target(
    behaviour: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let state = Target {
        seen: seen.clone(),
        behaviour: Arc::new(behaviour),
    };
    let app = Router::new()
        .route("/hook", axum::routing::post(handle))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

struct Punctual {
    app: Option<App>,
    router: Router,
}

impl Punctual {
    /// A server whose webhooks may reach the test's targets on loopback.
    fn start(webhook: WebhookConfig) -> Punctual {
        Self::start_strict(WebhookConfig {
            allow_private: true,
            ..webhook
        })
    }

    /// A server with the given address rules (private addresses refused by default).
    fn start_strict(webhook: WebhookConfig) -> Punctual {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let app = App::start(
            store,
            ServerConfig {
                webhook,
                ..ServerConfig::default()
            },
        );
        let router = app.router();
        Punctual {
            app: Some(app),
            router,
        }
    }

    async fn call(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn schedule(&self, body: Value) {
        let (status, answer) = self.call("POST", "/v1/queues/hooks/tasks", body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }

    /// Polls the task until `done` says so, or panics after `within`.
    async fn wait_for(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, task) = self
                .call("GET", &format!("/v1/queues/hooks/tasks/{id}"), Value::Null)
                .await;
            if done(&task) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} never got there: {task}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// Schedules webhook task `id`, and once its delivery has started, stops the app; answers how long
/// the stop took and the task as stored afterwards (read through the router; the store stays readable).
async fn stop_mid_delivery(
    p: Punctual,
    id: &str,
    url: &str,
    seen: &Mutex<Vec<Seen>>,
) -> (Duration, Value) {
    p.schedule(json!({"id": id, "webhook": {"url": url}})).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let router = p.router.clone();
    let started = Instant::now();
    p.stop().await;
    let stopping = started.elapsed();
    let request = Request::builder()
        .uri(format!("/v1/queues/hooks/tasks/{id}"))
        .body(Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (stopping, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_follow_the_ladder_then_success_acks() {
    let (url, seen) = target(|n| {
        Reply::Status(if n < 2 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::NO_CONTENT
        })
    })
    .await;
    let p = Punctual::start(WebhookConfig::default());
    p.schedule(json!({"id": "f", "payload": {"order": 7}, "backoff_ms": [200, 400], "webhook": {"url": url, "headers": {"x-team": "billing"}}}))
        .await;
    let task = p
        .wait_for("f", Duration::from_secs(10), |t| t["state"] == "succeeded")
        .await;
    assert_eq!(task["attempt"], 3);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(195) && gaps[0] < Duration::from_millis(1_000),
        "{gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(395) && gaps[1] < Duration::from_millis(1_200),
        "{gaps:?}"
    );
    for (n, request) in seen.iter().enumerate() {
        assert_eq!(request.headers["punctual-queue"], "hooks");
        assert_eq!(request.headers["punctual-task-id"], "f");
        assert_eq!(
            request.headers["punctual-attempt"],
            (n + 1).to_string().as_str()
        );
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["x-team"], "billing");
        assert_eq!(
            serde_json::from_slice::<Value>(&request.body).unwrap(),
            json!({"order": 7})
        );
        assert!(
            request.headers.get("punctual-signature").is_none(),
            "no secret, no signature"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_target_times_out_and_a_down_target_fails() {
    let (hung, _) = target(|_| Reply::Hang(Duration::from_secs(5))).await;
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}/hook")
    };
    let p = Punctual::start(WebhookConfig::default());
    p.schedule(
        json!({"id": "slow", "max_attempts": 1, "webhook": {"url": hung, "timeout_ms": 300}}),
    )
    .await;
    p.schedule(json!({"id": "gone", "max_attempts": 1, "webhook": {"url": down}}))
        .await;
    let slow = p
        .wait_for("slow", Duration::from_secs(5), |t| t["state"] == "dead")
        .await;
    assert_eq!(slow["last_error"], "timed out after 300 ms");
    let gone = p
        .wait_for("gone", Duration::from_secs(5), |t| t["state"] == "dead")
        .await;
    let error = gone["last_error"].as_str().unwrap();
    assert!(
        error.contains("onnect") || error.contains("refused"),
        "{error}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_lengthens_the_wait() {
    let (url, seen) = target(|n| {
        if n == 0 {
            Reply::RetryAfter(StatusCode::TOO_MANY_REQUESTS, "1")
        } else {
            Reply::Status(StatusCode::OK)
        }
    })
    .await;
    let p = Punctual::start(WebhookConfig::default());
    p.schedule(json!({"id": "r", "backoff_ms": [50], "webhook": {"url": url}}))
        .await;
    let after_429 = p
        .wait_for("r", Duration::from_secs(5), |t| {
            t["attempt"] == 1 && t["state"] == "scheduled"
        })
        .await;
    assert_eq!(after_429["last_error"], "HTTP 429 Too Many Requests");
    p.wait_for("r", Duration::from_secs(5), |t| t["state"] == "succeeded")
        .await;
    let seen = seen.lock().unwrap().clone();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(990),
        "Retry-After: 1 beats the 50 ms step, waited {gap:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_signed_when_a_secret_is_set() {
    let (url, seen) = target(|_| Reply::Status(StatusCode::OK)).await;
    let p = Punctual::start(WebhookConfig {
        secret: Some("whsec".into()),
        ..WebhookConfig::default()
    });
    p.schedule(json!({"id": "s", "payload": [1, "two"], "webhook": {"url": url}}))
        .await;
    p.wait_for("s", Duration::from_secs(5), |t| t["state"] == "succeeded")
        .await;
    let request = seen.lock().unwrap()[0].clone();
    let header = request.headers["punctual-signature"]
        .to_str()
        .unwrap()
        .to_owned();
    let t: u64 = header
        .strip_prefix("t=")
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The receiver's check: recompute over "<t>.<raw body>" with the shared secret.
    assert_eq!(header, signature(b"whsec", t, &request.body));
    assert_ne!(header, signature(b"other", t, &request.body));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_target_does_not_delay_another() {
    let (hung, _) = target(|_| Reply::Hang(Duration::from_secs(3))).await;
    let (fast, fast_seen) = target(|_| Reply::Status(StatusCode::OK)).await;
    let p = Punctual::start(WebhookConfig {
        concurrency: 8,
        per_host: 2,
        ..WebhookConfig::default()
    });
    for i in 0..20 {
        p.schedule(json!({"id": format!("h{i}"), "webhook": {"url": hung, "timeout_ms": 5000}}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    for i in 0..10 {
        p.schedule(json!({"id": format!("f{i}"), "webhook": {"url": fast}}))
            .await;
    }
    for i in 0..10 {
        p.wait_for(&format!("f{i}"), Duration::from_secs(2), |t| {
            t["state"] == "succeeded"
        })
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "fast target waited {:?}",
        started.elapsed()
    );
    assert_eq!(fast_seen.lock().unwrap().len(), 10);
    // The hung target's extra tasks were handed back without losing attempts.
    let (_, waiting) = p
        .call("GET", "/v1/queues/hooks/tasks/h19", Value::Null)
        .await;
    assert!(waiting["attempt"].as_u64().unwrap() <= 1, "{waiting}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_failures_not_followed() {
    let (elsewhere, elsewhere_seen) = target(|_| Reply::Status(StatusCode::OK)).await;
    let location: &'static str = Box::leak(elsewhere.into_boxed_str());
    let (url, _) = target(move |_| Reply::Redirect(location)).await;
    let p = Punctual::start(WebhookConfig::default());
    p.schedule(json!({"id": "moved", "max_attempts": 1, "webhook": {"url": url}}))
        .await;
    let task = p
        .wait_for("moved", Duration::from_secs(5), |t| t["state"] == "dead")
        .await;
    assert_eq!(task["last_error"], "HTTP 302 Found");
    assert!(
        elsewhere_seen.lock().unwrap().is_empty(),
        "the redirect was not followed"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_deliveries_in_flight_finish() {
    let (url, seen) = target(|_| Reply::Hang(Duration::from_millis(700))).await;
    let p = Punctual::start(WebhookConfig::default());
    let (stopping, task) = stop_mid_delivery(p, "inflight", &url, &seen).await;
    assert!(
        stopping >= Duration::from_millis(500),
        "stop waited for the delivery"
    );
    // The outcome was recorded before the writer stopped: the task is acked, not left leased.
    assert_eq!(task["state"], "succeeded", "{task}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_deliveries_that_outlive_the_grace_period() {
    let (url, seen) = target(|_| Reply::Hang(Duration::from_secs(5))).await;
    let p = Punctual::start(WebhookConfig {
        shutdown_grace_ms: 200,
        ..WebhookConfig::default()
    });
    let (stopping, task) = stop_mid_delivery(p, "stuck", &url, &seen).await;
    assert!(
        stopping < Duration::from_secs(3),
        "stop did not wait for the hung target"
    );
    assert_eq!(
        (task["state"].as_str(), task["attempt"].as_u64()),
        (Some("ready"), Some(0)),
        "released, attempt not used: {task}"
    );
}

/// Five dead hosts (each accepting connections and never answering, 30 s timeouts) with many tasks
/// each must not delay a healthy host: with 64 global slots and 16 per host they used to hold every
/// slot, and the healthy host waited 28 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_dead_hosts_do_not_delay_a_healthy_one() {
    let mut dead = Vec::new();
    for _ in 0..5 {
        dead.push(target(|_| Reply::Hang(Duration::from_secs(40))).await.0);
    }
    let (healthy, healthy_seen) = target(|_| Reply::Status(StatusCode::OK)).await;
    let p = Punctual::start(WebhookConfig {
        shutdown_grace_ms: 100,
        ..WebhookConfig::default()
    });
    for (h, url) in dead.iter().enumerate() {
        for i in 0..40 {
            p.schedule(
                json!({"id": format!("d{h}-{i}"), "webhook": {"url": url, "timeout_ms": 30000}}),
            )
            .await;
        }
    }
    // The dead hosts' requests are on the wire.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    for i in 0..50 {
        p.schedule(json!({"id": format!("ok{i}"), "webhook": {"url": healthy}}))
            .await;
    }
    for i in 0..50 {
        p.wait_for(&format!("ok{i}"), Duration::from_secs(10), |t| {
            t["state"] == "succeeded"
        })
        .await;
    }
    let took = started.elapsed();
    eprintln!("50 deliveries to the healthy host beside 5 dead ones took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the healthy host waited {took:?}"
    );
    assert_eq!(healthy_seen.lock().unwrap().len(), 50);
    p.stop().await;
}

/// A host that keeps failing is backed off: its tasks wait (attempts unused) instead of being leased
/// and handed back over and over, and it is probed again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_host_is_backed_off_without_churn() {
    let (url, seen) = target(|_| Reply::Status(StatusCode::SERVICE_UNAVAILABLE)).await;
    let p = Punctual::start(WebhookConfig::default());
    for i in 0..300 {
        p.schedule(json!({"id": format!("f{i}"), "max_attempts": 50, "webhook": {"url": url}}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = seen.lock().unwrap().len();
    // Five failures in a row open the breaker (1 s), then single probes at 1 s, 2 s, …: a few dozen at
    // most, where a plain retry loop would send hundreds.
    assert!(
        requests <= 40,
        "{requests} requests to a failing host in 3 s"
    );
    let (_, listing) = p
        .call("GET", "/v1/queues/hooks/tasks?limit=1000", Value::Null)
        .await;
    let untried = listing["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["attempt"] == 0)
        .count();
    assert!(
        untried >= 250,
        "only {untried} of 300 tasks kept their attempts"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_capped() {
    let (url, _) =
        target(|_| Reply::RetryAfter(StatusCode::SERVICE_UNAVAILABLE, "99999999999")).await;
    let p = Punctual::start(WebhookConfig {
        retry_after_max_ms: 2_000,
        ..WebhookConfig::default()
    });
    p.schedule(json!({"id": "later", "max_attempts": 3, "webhook": {"url": url}}))
        .await;
    let task = p
        .wait_for("later", Duration::from_secs(5), |t| {
            t["attempt"] == 1 && t["state"] == "scheduled"
        })
        .await;
    let wait_ms = task["run_at_ms"].as_u64().unwrap() - task["updated_at_ms"].as_u64().unwrap();
    assert!(
        (1_900..=2_100).contains(&wait_ms),
        "waits {wait_ms} ms: {task}"
    );
    p.stop().await;
}

/// Private addresses are refused when the task is scheduled, with the setting that allows them;
/// framing and Punctual's own headers are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_and_framing_headers_are_refused() {
    let p = Punctual::start_strict(WebhookConfig::default());
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "http://10.0.0.1/",
        "http://localhost:6379/",
        "http://0x7f000001/",
        "http://2130706433/",
    ] {
        let (status, answer) = p
            .call(
                "POST",
                "/v1/queues/hooks/tasks",
                json!({"webhook": {"url": url}}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("--webhook-allow-private"),
            "{url}: {message}"
        );
    }
    for header in [
        "content-length",
        "Host",
        "transfer-encoding",
        "connection",
        "punctual-signature",
    ] {
        let (status, answer) = p
            .call(
                "POST",
                "/v1/queues/hooks/tasks",
                json!({"webhook": {"url": "https://example.com/hook", "headers": {header: "0"}}}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{header}: {answer}"
        );
    }
    p.stop().await;
    // With a CIDR allowed, that network (and only it) is reachable.
    let p = Punctual::start_strict(WebhookConfig {
        allow: vec![punctual_server::webhook::AllowEntry::parse("127.0.0.0/8").unwrap()],
        ..WebhookConfig::default()
    });
    let (url, seen) = target(|_| Reply::Status(StatusCode::OK)).await;
    p.schedule(json!({"id": "local", "webhook": {"url": url}}))
        .await;
    p.wait_for("local", Duration::from_secs(5), |t| {
        t["state"] == "succeeded"
    })
    .await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    let (status, _) = p
        .call(
            "POST",
            "/v1/queues/hooks/tasks",
            json!({"webhook": {"url": "http://10.0.0.1/"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    p.stop().await;
}
