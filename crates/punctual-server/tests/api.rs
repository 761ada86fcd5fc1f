//! API tests through the router (no socket), against the in-memory store, the redb store, and the Redis
//! store on a standalone `redis-server` and on a 3-master cluster that the tests start themselves.
//! Timing-dependent checks poll for a condition with a deadline; none sleeps to "wait for" something.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

mod common;

use common::temp_dir;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use punctual_server::{App, ServerConfig};
use punctual_store::redis_testing::{RedisCluster, RedisServer};
use punctual_store::{
    JournalStore, JournalStoreOptions, MemoryStore, RedbOptions, RedbStore, RedisOptions,
    RedisStore, RedisTarget, Store,
};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Harness {
    app: Option<App>,
    router: Router,
}

impl Harness {
    fn new(store: Arc<dyn Store>) -> Harness {
        Self::with_config(
            store,
            ServerConfig {
                retention_ms: 60_000,
                ..ServerConfig::default()
            },
        )
    }

    fn with_config(store: Arc<dyn Store>, config: ServerConfig) -> Harness {
        let app = App::start(store, config);
        let router = app.router();
        Harness {
            app: Some(app),
            router,
        }
    }

    async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call_as(None, method, uri, body).await
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    async fn json(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, uri, Some(&body.to_string())).await
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

fn redis_store(target: RedisTarget, shards: u32) -> Arc<dyn Store> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let options = RedisOptions {
        prefix: format!("api{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        shards: Some(shards),
        ..RedisOptions::default()
    };
    Arc::new(RedisStore::open(&target, &options).expect("open the redis store"))
}

fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    let server = SERVER.get_or_init(|| RedisServer::start(&[]).expect("start redis-server"));
    let cluster = CLUSTER.get_or_init(|| RedisCluster::start(3).expect("start a redis cluster"));
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "redb",
            Arc::new(RedbStore::open(&temp_dir("api"), &RedbOptions::default()).unwrap()),
        ),
        (
            "journal",
            Arc::new(
                JournalStore::open(&temp_dir("api"), &JournalStoreOptions::default()).unwrap(),
            ),
        ),
        (
            "redis",
            redis_store(RedisTarget::Standalone(server.url()), 3),
        ),
        (
            "redis-cluster",
            redis_store(RedisTarget::Cluster(cluster.urls()), 12),
        ),
    ]
}

/// Runs one scenario against every backend.
macro_rules! each_store {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            for (backend, store) in stores() {
                eprintln!("backend: {backend}");
                let h = Harness::new(store);
                let f: fn(
                    &Harness,
                )
                    -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> =
                    |h| Box::pin($body(h));
                f(&h).await;
                h.stop().await;
            }
        }
    };
}

async fn schedule_idempotency(h: &Harness) {
    let spec = json!({"id": "o1", "payload": {"b": 2, "a": 1}, "delay_ms": 60_000, "backoff_ms": [10, 30]});
    let (status, task) = h
        .json("POST", "/v1/queues/orders/tasks", spec.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(task["state"], "scheduled");
    assert_eq!(task["payload"], json!({"a": 1, "b": 2}));
    assert_eq!(task["backoff_ms"], json!([10, 30]));
    assert!(task["run_at"].as_str().unwrap().ends_with('Z'));
    assert!(task.get("lease_token").is_none());
    // The same request again, with keys in another order: the same task, 200.
    let again = json!({"backoff_ms": [10, 30], "delay_ms": 60_000, "payload": {"a": 1, "b": 2}, "id": "o1"});
    let (status, repeat) = h.json("POST", "/v1/queues/orders/tasks", again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        repeat["run_at_ms"], task["run_at_ms"],
        "an idempotent repeat does not move the task"
    );
    let (status, error) = h
        .json(
            "POST",
            "/v1/queues/orders/tasks",
            json!({"id": "o1", "payload": {"a": 2}, "delay_ms": 60_000}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["error"]["code"], "id_conflict");
    let (status, got) = h.call("GET", "/v1/queues/orders/tasks/o1", None).await;
    assert_eq!(
        (status, &got["payload"]),
        (StatusCode::OK, &json!({"a": 1, "b": 2}))
    );
    let (status, error) = h.call("GET", "/v1/queues/orders/tasks/nope", None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    // A generated id.
    let (status, generated) = h
        .json(
            "POST",
            "/v1/queues/orders/tasks",
            json!({"delay_ms": 60_000}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(generated["id"].as_str().unwrap().len() >= 16);
}
each_store!(
    schedule_is_idempotent_and_conflicts_are_409,
    schedule_idempotency
);

async fn bad_input(h: &Harness) {
    let long_id = "x".repeat(257);
    let big_payload = format!("{{\"payload\":\"{}\"}}", "a".repeat((1 << 20) + 1));
    let cases: Vec<(&str, &str, String, StatusCode, &str)> = vec![
        (
            "POST",
            "/v1/queues/q/tasks",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            "".into(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"delay_ms":"soon"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"delay_ms":-5}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"delay_ms":5,"run_at":"2030-01-01T00:00:00Z"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"run_at":"tomorrow"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"run_at":"2030-02-30T00:00:00Z"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"dealy_ms":5}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            format!(r#"{{"id":"{long_id}"}}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"max_attempts":0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"lease_ms":5}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"backoff_ms":[1],"backoff":{}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"backoff_ms":[]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"backoff":{"factor":0.1}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"webhook":{"url":"ftp://x"}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"webhook":{"url":"http:///nohost"}}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            big_payload,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            format!("{{\"payload\":\"{}\"}}", "a".repeat(2 << 20)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/queues/bad%20queue/tasks",
            "{}".into(),
            StatusCode::BAD_REQUEST,
            "invalid_queue",
        ),
        (
            "POST",
            "/v1/queues/q/reserve",
            r#"{"max":0}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/reserve",
            r#"{"max":1001}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/reserve",
            r#"{"wait_ms":60001}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/queues/q/tasks/x/ack",
            "{}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "PATCH",
            "/v1/queues/q/tasks/x",
            "{}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/queues/q/tasks?state=sleeping",
            "".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/queues/q/tasks?limit=0",
            "".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            "GET",
            "/v2/nothing",
            "".into(),
            StatusCode::NOT_FOUND,
            "no_route",
        ),
    ];
    // One stored task that none of the bad requests may touch.
    let (status, before) = h
        .json(
            "POST",
            "/v1/queues/q/tasks",
            json!({"id": "keep", "delay_ms": 60_000}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    for (method, uri, body, want_status, want_code) in cases {
        let body = (!body.is_empty() || method == "POST").then_some(body);
        let (status, answer) = h.call(method, uri, body.as_deref()).await;
        assert_eq!(status, want_status, "{method} {uri}: {answer}");
        assert_eq!(
            answer["error"]["code"], want_code,
            "{method} {uri}: {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (_, queues) = h.call("GET", "/v1/queues", None).await;
    assert_eq!(
        queues["queues"],
        json!([{"queue": "q", "scheduled": 1, "ready": 0, "leased": 0, "succeeded": 0, "dead": 0, "total": 1}])
    );
    let (_, after) = h.call("GET", "/v1/queues/q/tasks/keep", None).await;
    assert_eq!(after, before, "bad input changed nothing stored");
}
each_store!(bad_input_is_refused_and_changes_nothing, bad_input);

async fn reserve_one(
    h: &Harness,
    queue: &str,
    wait_ms: u64,
    lease_ms: Option<u64>,
) -> Option<Value> {
    let mut body = json!({"max": 1, "wait_ms": wait_ms});
    if let Some(lease_ms) = lease_ms {
        body["lease_ms"] = lease_ms.into();
    }
    let (status, answer) = h
        .json("POST", &format!("/v1/queues/{queue}/reserve"), body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["tasks"].as_array().unwrap().first().cloned()
}

async fn deliver_on_time_and_ack(h: &Harness) {
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks",
            json!({"id": "t", "payload": [1], "delay_ms": 300}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(
        reserve_one(h, "q", 0, None).await.is_none(),
        "not before its time"
    );
    let started = Instant::now();
    let task = reserve_one(h, "q", 5_000, None)
        .await
        .expect("delivered within the long-poll");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let lateness = now_ms.saturating_sub(task["run_at_ms"].as_u64().unwrap());
    assert!(lateness < 1_000, "delivered {lateness} ms late");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        (task["attempt"].as_u64(), task["state"].as_str()),
        (Some(1), Some("leased"))
    );
    assert_eq!(task["payload"], json!([1]));
    let token = task["lease_token"].as_str().unwrap().to_owned();
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/t/ack",
            json!({"lease_token": token}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, error) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/t/ack",
            json!({"lease_token": token}),
        )
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("task_finished"))
    );
    let (_, got) = h.call("GET", "/v1/queues/q/tasks/t", None).await;
    assert_eq!(got["state"], "succeeded");
    assert!(got["purge_at_ms"].as_u64().is_some());
    // Long-poll with nothing due ends empty after about wait_ms.
    let started = Instant::now();
    assert!(reserve_one(h, "q", 200, None).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(150));
}
each_store!(delivers_on_time_and_acks, deliver_on_time_and_ack);

async fn nack_ladder_dead_retry(h: &Harness) {
    let spec = json!({"id": "n", "max_attempts": 2, "backoff_ms": [200]});
    assert_eq!(
        h.json("POST", "/v1/queues/q/tasks", spec).await.0,
        StatusCode::CREATED
    );
    let first = reserve_one(h, "q", 2_000, None).await.unwrap();
    let (status, after) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/n/nack",
            json!({"lease_token": first["lease_token"], "error": "boom"}),
        )
        .await;
    assert_eq!(
        (status, after["state"].as_str()),
        (StatusCode::OK, Some("scheduled"))
    );
    assert_eq!(after["last_error"], "boom");
    assert!(
        reserve_one(h, "q", 0, None).await.is_none(),
        "waits for the backoff step"
    );
    let second = reserve_one(h, "q", 3_000, None)
        .await
        .expect("redelivered after the backoff");
    assert_eq!(second["attempt"], 2);
    let spacing = second["run_at_ms"].as_u64().unwrap() - after["updated_at_ms"].as_u64().unwrap();
    assert_eq!(spacing, 200, "the ladder's step");
    let (_, dead) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/n/nack",
            json!({"lease_token": second["lease_token"], "error": "again"}),
        )
        .await;
    assert_eq!(
        (dead["state"].as_str(), dead["last_error"].as_str()),
        (Some("dead"), Some("again"))
    );
    let (_, listed) = h.call("GET", "/v1/queues/q/tasks?state=dead", None).await;
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);
    let (status, revived) = h.call("POST", "/v1/queues/q/tasks/n/retry", None).await;
    assert_eq!(
        (
            status,
            revived["state"].as_str(),
            revived["attempt"].as_u64()
        ),
        (StatusCode::OK, Some("ready"), Some(0))
    );
    let (status, _) = h.call("POST", "/v1/queues/q/tasks/n/retry", None).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "only a dead task can be retried"
    );
    assert!(reserve_one(h, "q", 1_000, None).await.is_some());
}
each_store!(
    nack_follows_the_ladder_then_dead_then_retry,
    nack_ladder_dead_retry
);

async fn lease_expiry(h: &Harness) {
    assert_eq!(
        h.json(
            "POST",
            "/v1/queues/q/tasks",
            json!({"id": "l", "backoff_ms": [0]})
        )
        .await
        .0,
        StatusCode::CREATED
    );
    let first = reserve_one(h, "q", 1_000, Some(300)).await.unwrap();
    let (status, extended) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/l/extend",
            json!({"lease_token": first["lease_token"], "lease_ms": 400}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(extended["lease_expires_at_ms"].as_u64() > first["lease_expires_at_ms"].as_u64());
    assert!(
        extended.get("lease_token").is_none(),
        "tokens are shown only to the reserver"
    );
    let (status, _) = h.call("DELETE", "/v1/queues/q/tasks/l", None).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a leased task cannot be cancelled"
    );
    let second = reserve_one(h, "q", 5_000, None)
        .await
        .expect("redelivered after the lease expired");
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["last_error"], "lease expired");
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/l/ack",
            json!({"lease_token": first["lease_token"]}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the expired lease is no longer yours"
    );
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/l/ack",
            json!({"lease_token": second["lease_token"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}
each_store!(an_expired_lease_redelivers, lease_expiry);

async fn patch_and_delete(h: &Harness) {
    h.json(
        "POST",
        "/v1/queues/q/tasks",
        json!({"id": "p", "delay_ms": 3_600_000}),
    )
    .await;
    h.json(
        "POST",
        "/v1/queues/q/tasks",
        json!({"id": "d", "delay_ms": 3_600_000}),
    )
    .await;
    let (status, moved) = h
        .json(
            "PATCH",
            "/v1/queues/q/tasks/p",
            json!({"delay_ms": 0, "payload": {"v": 2}}),
        )
        .await;
    assert_eq!(
        (status, moved["state"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    let (status, _) = h
        .json(
            "PATCH",
            "/v1/queues/q/tasks/p",
            json!({"run_at": "2030-01-01T00:00:00Z", "delay_ms": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let task = reserve_one(h, "q", 1_000, None).await.unwrap();
    assert_eq!(
        (task["id"].as_str(), &task["payload"]),
        (Some("p"), &json!({"v": 2}))
    );
    let (status, _) = h
        .json("PATCH", "/v1/queues/q/tasks/p", json!({"delay_ms": 10}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a leased task cannot be rescheduled"
    );
    let (status, _) = h
        .json("PATCH", "/v1/queues/q/tasks/zzz", json!({"delay_ms": 10}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        h.call("DELETE", "/v1/queues/q/tasks/d", None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.call("DELETE", "/v1/queues/q/tasks/d", None).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, stats) = h.call("GET", "/v1/queues/q", None).await;
    assert_eq!(
        (stats["leased"].as_u64(), stats["total"].as_u64()),
        (Some(1), Some(1))
    );
}
each_store!(patch_reschedules_and_delete_cancels, patch_and_delete);

/// The `status` of each entry of a batch answer's `results`.
fn result_statuses(answer: &Value) -> Vec<u64> {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect()
}

async fn batch_and_listing(h: &Harness) {
    let body = json!({"tasks": [
        {"id": "a", "delay_ms": 60_000},
        {"id": "b", "delay_ms": "x"},
        {"id": "a", "delay_ms": 60_000},
        {"id": "a", "delay_ms": 1},
        {"id": "c"},
        {"id": "d", "payload": "x".repeat((1 << 20) + 10)},
    ]});
    let (status, answer) = h.json("POST", "/v1/queues/pages/batch", body).await;
    assert_eq!(status, StatusCode::OK);
    let statuses = result_statuses(&answer);
    assert_eq!(statuses, [201, 422, 200, 409, 201, 413]);
    assert_eq!(answer["results"][0]["task"]["id"], "a");
    assert_eq!(answer["results"][1]["error"]["code"], "invalid_field");
    // `Prefer: return=minimal`: ids instead of whole tasks, errors as before.
    let request = Request::builder()
        .method("POST")
        .uri("/v1/queues/pages/batch")
        .header("content-type", "application/json")
        .header("prefer", "respond-async, return=minimal")
        .body(Body::from(
            json!({"tasks": [{"id": "m", "delay_ms": 60_000}, {"id": "a", "delay_ms": 60_000}, {"id": "n", "delay_ms": -1}]})
                .to_string(),
        ))
        .unwrap();
    let response = h.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("preference-applied")
            .map(|v| v.to_str().unwrap()),
        Some("return=minimal")
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let minimal: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        minimal,
        json!({"results": [
            {"status": 201, "id": "m"},
            {"status": 200, "id": "a"},
            {"status": 422, "error": minimal["results"][2]["error"].clone()},
        ]})
    );
    assert_eq!(minimal["results"][2]["error"]["code"], "invalid_field");
    let too_many = json!({"tasks": vec![json!({}); 1001]});
    let (status, error) = h.json("POST", "/v1/queues/pages/batch", too_many).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("batch_too_large"))
    );
    for i in 0..7 {
        h.json(
            "POST",
            "/v1/queues/pages/tasks",
            json!({"id": format!("z{i}"), "delay_ms": 60_000}),
        )
        .await;
    }
    let mut ids = Vec::new();
    let mut uri = "/v1/queues/pages/tasks?limit=4".to_owned();
    loop {
        let (status, page) = h.call("GET", &uri, None).await;
        assert_eq!(status, StatusCode::OK);
        ids.extend(
            page["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/v1/queues/pages/tasks?limit=4&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(
        ids,
        ["a", "c", "m", "z0", "z1", "z2", "z3", "z4", "z5", "z6"]
    );
    let (_, ready) = h
        .call("GET", "/v1/queues/pages/tasks?state=ready", None)
        .await;
    assert_eq!(ready["tasks"].as_array().unwrap().len(), 1);
    let (_, health) = h.call("GET", "/healthz", None).await;
    assert_eq!(health["status"], "ok");
    let (status, metrics) = h.call("GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("punctual_tasks_scheduled_total"), "{text}");
    assert!(
        text.contains("# HELP punctual_tasks_scheduled_total Tasks created, by queue."),
        "{text}"
    );
    assert!(
        text.contains("punctual_tasks{queue=\"pages\",state=\"scheduled\"} 9"),
        "{text}"
    );
}
each_store!(batch_answers_per_item_and_listing_pages, batch_and_listing);

async fn exclusive_consumers(h: &Harness) {
    let tasks: Vec<Value> = (0..200)
        .map(|i| json!({"id": format!("t{i}"), "delay_ms": 200 + i % 50}))
        .collect();
    let (status, _) = h
        .json("POST", "/v1/queues/q/batch", json!({"tasks": tasks}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let consumers = (0..4).map(|_| async {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 200 && Instant::now() < deadline {
            let (_, answer) = h
                .json(
                    "POST",
                    "/v1/queues/q/reserve",
                    json!({"max": 7, "wait_ms": 300}),
                )
                .await;
            let batch = answer["tasks"].as_array().unwrap().clone();
            if batch.is_empty() {
                break;
            }
            for task in batch {
                let (status, _) = h
                    .json(
                        "POST",
                        &format!("/v1/queues/q/tasks/{}/ack", task["id"].as_str().unwrap()),
                        json!({"lease_token": task["lease_token"]}),
                    )
                    .await;
                assert_eq!(status, StatusCode::NO_CONTENT);
                got.push(task["id"].as_str().unwrap().to_owned());
            }
        }
        got
    });
    let results = futures_join_all(consumers.collect()).await;
    let mut all: Vec<String> = results.into_iter().flatten().collect();
    assert_eq!(all.len(), 200, "every task delivered");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200, "no task delivered twice");
}
each_store!(concurrent_consumers_get_each_task_once, exclusive_consumers);

/// A tiny join-all so the tests need no futures crate.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("all ready")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_turns_healthz_red_and_refuses_writes() {
    let backend = punctual_store::conformance::FailingSync::default();
    let fail = backend.fail.clone();
    let store = RedbStore::open_with_backend(backend, &RedbOptions::default()).unwrap();
    let h = Harness::new(Arc::new(store));
    assert_eq!(
        h.json("POST", "/v1/queues/q/tasks", json!({"id": "a"}))
            .await
            .0,
        StatusCode::CREATED
    );
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, error) = h
        .json("POST", "/v1/queues/q/tasks", json!({"id": "b"}))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("store_poisoned"))
    );
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, health) = h.call("GET", "/healthz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        health["error"]
            .as_str()
            .unwrap()
            .contains("injected fsync failure"),
        "{health}"
    );
    let (status, _) = h
        .json("POST", "/v1/queues/q/tasks", json!({"id": "c"}))
        .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no write is accepted after a failed fsync"
    );
    let (status, task) = h.call("GET", "/v1/queues/q/tasks/a", None).await;
    assert_eq!(
        (status, task["id"].as_str()),
        (StatusCode::OK, Some("a")),
        "reads still work"
    );
    h.stop().await;
}

/// After a failed fsync the server answers what is in flight, then `serve` returns an error (the
/// binary exits non-zero), so `Restart=on-failure` restarts it and recovery runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_store_stops_the_server_with_an_error() {
    let backend = punctual_store::conformance::FailingSync::default();
    let fail = backend.fail.clone();
    let store = RedbStore::open_with_backend(backend, &RedbOptions::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(punctual_server::serve(
        listener,
        None,
        Arc::new(store),
        ServerConfig::default(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let post = |id: &'static str| {
        http.post(format!("{url}/v1/queues/q/tasks"))
            .body(format!(r#"{{"id": "{id}"}}"#))
            .send()
    };
    assert_eq!(post("a").await.unwrap().status(), 201);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        post("b").await.unwrap().status(),
        503,
        "answered, not dropped"
    );
    let result = tokio::time::timeout(Duration::from_secs(20), serving)
        .await
        .expect("the server kept running on a poisoned store")
        .unwrap();
    let error = result.expect_err("serve must fail").to_string();
    assert!(error.contains("poisoned"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_guard_the_api_but_not_healthz() {
    for protect_metrics in [false, true] {
        let config = ServerConfig {
            auth_tokens: vec!["s3cret".into(), "rotated".into()],
            protect_metrics,
            ..ServerConfig::default()
        };
        let h = Harness::with_config(Arc::new(MemoryStore::new()), config);
        let (status, error) = h.call("GET", "/v1/queues", None).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );
        assert_eq!(
            h.call_as(Some("s3cre"), "GET", "/v1/queues", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            h.call_as(Some("wrong!"), "POST", "/v1/queues/q/tasks", Some("{}"))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            h.call_as(Some("s3cret"), "POST", "/v1/queues/q/tasks", Some("{}"))
                .await
                .0,
            StatusCode::CREATED
        );
        assert_eq!(
            h.call_as(Some("rotated"), "GET", "/v1/queues", None)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            h.call("GET", "/healthz", None).await.0,
            StatusCode::OK,
            "health checks need no token"
        );
        let metrics = h.call("GET", "/metrics", None).await.0;
        let want = if protect_metrics {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(metrics, want, "protect_metrics = {protect_metrics}");
        assert_eq!(
            h.call_as(Some("s3cret"), "GET", "/metrics", None).await.0,
            StatusCode::OK
        );
        h.stop().await;
    }
}

async fn ack_in_batches(h: &Harness) {
    let tasks: Vec<Value> = (0..5).map(|i| json!({"id": format!("a{i}")})).collect();
    h.json("POST", "/v1/queues/q/batch", json!({"tasks": tasks}))
        .await;
    let (_, answer) = h
        .json("POST", "/v1/queues/q/reserve", json!({"max": 5}))
        .await;
    let leased = answer["tasks"].as_array().unwrap().clone();
    assert_eq!(leased.len(), 5);
    let mut acks: Vec<Value> = leased
        .iter()
        .map(|t| json!({"id": t["id"], "lease_token": t["lease_token"]}))
        .collect();
    acks.push(json!({"id": "a0", "lease_token": "stale"}));
    acks.push(json!({"id": "nope", "lease_token": "x"}));
    let (status, answer) = h
        .json("POST", "/v1/queues/q/ack", json!({"tasks": acks}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let statuses = result_statuses(&answer);
    assert_eq!(statuses, [204, 204, 204, 204, 204, 409, 404]);
    assert_eq!(answer["results"][5]["error"]["code"], "task_finished");
    let (_, stats) = h.call("GET", "/v1/queues/q", None).await;
    assert_eq!(stats["succeeded"], 5);
    let (status, _) = h
        .json("POST", "/v1/queues/q/ack", json!({"tasks": []}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}
each_store!(acks_can_be_sent_in_batches, ack_in_batches);

/// A memory store for tests that need to bend it: `shared` makes apps treat it as a store other
/// nodes share (without any notices between them), and `before_apply` runs before each commit (to
/// hold it at a gate).
struct TestStore {
    inner: MemoryStore,
    shared: bool,
    #[allow(clippy::type_complexity)]
    before_apply: Option<Box<dyn Fn(&[punctual_store::Command]) + Send + Sync>>,
}

impl Store for TestStore {
    fn apply(
        &self,
        now_ms: u64,
        commands: &[punctual_store::Command],
    ) -> Result<Vec<punctual_store::Outcome>, punctual_store::StoreError> {
        if let Some(before) = &self.before_apply {
            before(commands);
        }
        self.inner.apply(now_ms, commands)
    }
    fn get(
        &self,
        queue: &str,
        id: &str,
    ) -> Result<Option<punctual_core::Task>, punctual_store::StoreError> {
        self.inner.get(queue, id)
    }
    fn list(
        &self,
        queue: &str,
        state: Option<punctual_core::TaskState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<punctual_store::Page, punctual_store::StoreError> {
        self.inner.list(queue, state, after, limit)
    }
    fn queues(&self) -> Result<Vec<punctual_store::QueueCounts>, punctual_store::StoreError> {
        self.inner.queues()
    }
    fn due_times(
        &self,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<punctual_store::DueTimes, punctual_store::StoreError> {
        self.inner.due_times(from_ms, to_ms, limit)
    }
    fn timeline(
        &self,
        queue: &str,
        buckets: &punctual_store::Buckets,
    ) -> Result<punctual_store::Timeline, punctual_store::StoreError> {
        self.inner.timeline(queue, buckets)
    }
    fn list_due(
        &self,
        queue: &str,
        after: Option<&punctual_store::DueCursor>,
        limit: usize,
    ) -> Result<punctual_store::DuePage, punctual_store::StoreError> {
        self.inner.list_due(queue, after, limit)
    }
    fn health(&self) -> Result<(), punctual_store::StoreError> {
        self.inner.health()
    }
    fn shared(&self) -> bool {
        self.shared
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_hears_nothing_still_delivers_after_its_resync() {
    // Two apps on one store without any notices between them, as two nodes would be if every
    // pub/sub message were lost: the periodic re-read of due times must still get a task to the
    // other node's long-poll.
    let store: Arc<dyn Store> = Arc::new(TestStore {
        inner: MemoryStore::new(),
        shared: true,
        before_apply: None,
    });
    let config = ServerConfig {
        resync_ms: 200,
        ..ServerConfig::default()
    };
    let a = Harness::with_config(store.clone(), config.clone());
    let b = Harness::with_config(store, config);
    // B waits first, then A schedules: B never hears of it but through the store.
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let task = reserve_one(&b, "silent", 10_000, None).await;
        (task, started.elapsed(), b)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = a
        .json(
            "POST",
            "/v1/queues/silent/tasks",
            json!({"id": "x", "delay_ms": 300}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (task, waited, b) = waiting.await.unwrap();
    let task = task.expect("B delivered the task A scheduled");
    assert_eq!(task["id"], "x");
    // Due 400 ms after B started waiting; B's timer learns of it within one resync (200 ms).
    assert!(waited < Duration::from_millis(1_500), "{waited:?}");
    a.stop().await;
    b.stop().await;
}

/// Redis going away is a 503 the client may retry, on writes, reads and `/healthz`; not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_a_503() {
    let redis = RedisServer::start(&[]).expect("start redis-server");
    let h = Harness::new(redis_store(RedisTarget::Standalone(redis.url()), 1));
    let (status, _) = h
        .json("POST", "/v1/queues/q/tasks", json!({"id": "a"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    drop(redis);
    let (status, answer) = h
        .json("POST", "/v1/queues/q/tasks", json!({"id": "b"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "store_unavailable", "{answer}");
    let (status, answer) = h.call("GET", "/v1/queues/q/tasks/a", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let (status, _) = h.call("GET", "/healthz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    h.stop().await;
}

/// Every refusal names the field by its JSON path, says what was expected in a client's words (not
/// serde's Rust types) and, where it helps, gives an example.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_field_and_say_what_to_send() {
    let h = Harness::new(Arc::new(MemoryStore::new()));
    let two_mb = format!("{{\"payload\":\"{}\"}}", "a".repeat(2 << 20));
    let cases: Vec<(&str, &str, String, StatusCode, &[&str])> =
        vec![
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"delay_ms": "30m"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["delay_ms: expected a whole number of milliseconds", "\"30m\"", "1800000"],
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"webhook": "https://example.com/hook"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["webhook: expected an object with a url", r#"{"url": "#],
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"run_at": "2026-12-01T15:00:00"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["run_at", "add Z", "+01:00"],
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"[{"id": "a"}]"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["the request body must be a JSON object", "got a list", "/batch"],
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            r#"{"tasks": [{"id": "a"}]}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            &["unknown field `tasks`", "/v1/queues/{queue}/batch"],
        ),
        (
            "POST",
            "/v1/queues/q/batch",
            r#"{"tasks": [{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "d", "delay_ms": "30m"}]}"#
                .into(),
            StatusCode::OK,
            &["tasks[3].delay_ms: expected a whole number of milliseconds"],
        ),
        (
            "POST",
            "/v1/queues/q/batch",
            r#"{"tasks": [{"backoff_ms": [10, "x"]}]}"#.into(),
            StatusCode::OK,
            &["tasks[0].backoff_ms[1]: expected a list of delays"],
        ),
        (
            "POST",
            "/v1/queues/q/tasks",
            two_mb,
            StatusCode::PAYLOAD_TOO_LARGE,
            &["1048576 bytes (1 MiB)", "--max-payload-bytes"],
        ),
        (
            "PUT",
            "/v1/queues/q/tasks",
            "{}".into(),
            StatusCode::METHOD_NOT_ALLOWED,
            &["PUT is not allowed on /v1/queues/q/tasks", "allow header"],
        ),
    ];
    for (method, uri, body, want_status, wants) in cases {
        let (status, answer) = h.call(method, uri, Some(&body)).await;
        assert_eq!(status, want_status, "{method} {uri} {body:.80}: {answer}");
        let error = if status == StatusCode::OK {
            answer["results"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["status"] != 201)
                .map(|r| r["error"].clone())
                .unwrap_or_default()
        } else {
            answer["error"].clone()
        };
        let message = error["message"].as_str().unwrap_or_default();
        for want in wants {
            assert!(
                message.contains(want),
                "{method} {uri}: {message:?} lacks {want:?}"
            );
        }
        assert!(
            !message.contains("u64") && !message.contains("struct"),
            "{message}"
        );
    }
    // A wrong method is a JSON error that keeps the allow header.
    let response = h
        .router
        .clone()
        .oneshot(
            Request::builder()
                .method("DELETE")
                .uri("/v1/queues/q/tasks")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    h.stop().await;
}

/// The payload comes back byte for byte: key order, spacing inside, and integers beyond 64 bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_is_kept_as_the_text_that_was_sent() {
    for (backend, store) in stores().into_iter().take(2) {
        let h = Harness::new(store);
        let payload =
            r#"{"z": 1, "a": [1,2 ,3], "big": 123456789012345678901234567890, "f": 1.10}"#;
        let body = format!(r#"{{"id": "p", "payload": {payload}}}"#);
        let (status, _) = h.call("POST", "/v1/queues/q/tasks", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{backend}");
        let response = h
            .router
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/v1/queues/q/tasks/p")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(
            text.contains(&format!(r#""payload":{payload}"#)),
            "{backend}: {text}"
        );
        // The same request again is the same task; another text of the same payload is another spec.
        let (status, _) = h.call("POST", "/v1/queues/q/tasks", Some(&body)).await;
        assert_eq!(status, StatusCode::OK, "{backend}");
        h.stop().await;
    }
}

/// A wrong token, a lease that expired and was handed out again, a lease that expired with the task
/// waiting, and a finished task each get their own code and a message that is true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_refusals_say_what_happened() {
    let h = Harness::new(Arc::new(MemoryStore::new()));
    h.json(
        "POST",
        "/v1/queues/q/tasks",
        json!({"id": "t", "max_attempts": 5, "backoff_ms": [0], "lease_ms": 100}),
    )
    .await;
    let first = reserve_one(&h, "q", 1000, None).await.unwrap();
    let first_token = first["lease_token"].as_str().unwrap().to_owned();
    let ack = |token: &str| json!({ "lease_token": token });
    // The README's tour pasted literally: the placeholder token.
    let (status, error) = h.json("POST", "/v1/queues/q/tasks/t/ack", ack("…")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_mismatch"))
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserve answer"),
        "{error}"
    );
    // The lease expires (100 ms); the task waits for its next attempt.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, task) = h.call("GET", "/v1/queues/q/tasks/t", None).await;
        if task["state"] != "leased" {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, error) = h
        .json("POST", "/v1/queues/q/tasks/t/ack", ack(&first_token))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_expired")),
        "{error}"
    );
    // Handed out again: the old token is told so.
    let second = reserve_one(&h, "q", 1000, None).await.unwrap();
    let (status, error) = h
        .json("POST", "/v1/queues/q/tasks/t/ack", ack(&first_token))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("lease_lost")),
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("handed out again")
    );
    // Still leased to the second holder: a wrong token is a mismatch, not "handed out again".
    let (_, error) = h
        .json("POST", "/v1/queues/q/tasks/t/ack", ack("wrong"))
        .await;
    assert_eq!(error["error"]["code"], "lease_mismatch");
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks/t/ack",
            ack(second["lease_token"].as_str().unwrap()),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, error) = h
        .json("POST", "/v1/queues/q/tasks/t/ack", ack(&first_token))
        .await;
    assert_eq!(error["error"]["code"], "task_finished");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("succeeded")
    );
    h.stop().await;
}

/// A reserve whose commit outlasts its handler's patience (its deadline plus the grace) leases tasks
/// nobody receives. They must be given back at once, not stay leased until the lease runs out: in the
/// drain benchmark one slow checkpoint left 400 tasks stuck for 60 s that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_leased_to_a_long_poll_that_gave_up_are_given_back_at_once() {
    // Armed, the next commit that leases (a reserve) says so and waits for `open`.
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (open, open_rx) = std::sync::mpsc::channel::<()>();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (entered_tx, open_rx) = (
        std::sync::Mutex::new(entered_tx),
        std::sync::Mutex::new(open_rx),
    );
    let gate = armed.clone();
    let store = Arc::new(TestStore {
        inner: MemoryStore::new(),
        shared: false,
        before_apply: Some(Box::new(move |commands| {
            let leases = commands
                .iter()
                .any(|c| matches!(c, punctual_store::Command::Reserve { .. }));
            if leases && gate.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let _ = entered_tx.lock().unwrap().send(());
                let _ = open_rx.lock().unwrap().recv();
            }
        })),
    });
    let h = Harness::new(store);
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/q/tasks",
            json!({"id": "x", "delay_ms": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Wait until it is ready (the timer fires it), so the held reserve is the one that leases it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, task) = h.call("GET", "/v1/queues/q/tasks/x", None).await;
        if task["state"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {task}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    let held = tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(5)));
    // wait_ms 0: the handler answers empty 250 ms (its grace) after it asked, commit or no commit.
    let gave_up = reserve_one(&h, "q", 0, Some(600_000)).await;
    assert!(held.await.unwrap().is_ok(), "the reserve reached the store");
    assert!(gave_up.is_none(), "the handler gave up: {gave_up:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Now the held commit leases x, to a reply nobody reads.
    open.send(()).unwrap();
    let again = reserve_one(&h, "q", 3_000, Some(600_000)).await;
    let again = again.expect("x is handed out again at once, not after its 10-minute lease");
    assert_eq!(again["id"], "x");
    assert_eq!(
        again["attempt"], 1,
        "the lost lease did not count as an attempt: {again}"
    );
    h.stop().await;
}

/// The timeline counts a queue's scheduled tasks by due time, as a listing does; its refusals
/// name the parameter.
async fn timeline_matches_listing(h: &Harness) {
    let day = 86_400_000u64;
    let tasks: Vec<Value> = (0..120u64)
        .map(|i| json!({"id": format!("t{i}"), "delay_ms": 90_000 + (i * 28_793_311) % (40 * day)}))
        .collect();
    for queue in ["tl", "tl-other"] {
        let (status, answer) = h
            .json(
                "POST",
                &format!("/v1/queues/{queue}/batch"),
                json!({"tasks": tasks}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(result_statuses(&answer).iter().all(|s| *s == 201));
    }
    let (status, _) = h.call("DELETE", "/v1/queues/tl/tasks/t7", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, page) = h
        .call(
            "GET",
            "/v1/queues/tl/tasks?state=scheduled&limit=1000",
            None,
        )
        .await;
    let due: Vec<u64> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["run_at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(due.len(), 119);
    let now = due.iter().min().unwrap() - 90_000;
    // Hours from the hour before now: aligned with every store's index, so exact.
    let from = now - now % 3_600_000;
    let hours = 41 * 24;
    let (status, answer) = h
        .call(
            "GET",
            &format!(
                "/v1/queues/tl/timeline?from={from}&to={}&buckets={hours}",
                from + hours * 3_600_000
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut want = vec![0u64; hours as usize];
    for d in &due {
        want[((d - from) / 3_600_000) as usize] += 1;
    }
    let got: Vec<u64> = answer["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(answer["total"], 119);
    assert_eq!(answer["resolution_ms"], 1);
    assert_eq!(answer["bucket_ms"], 3_600_000);
    assert_eq!(answer["buckets"][1]["start_ms"], from + 3_600_000);

    // RFC 3339 bounds, and the defaults: from now, a day, 60 slices.
    let first_day = due.iter().filter(|d| **d < from + day).count() as u64;
    let rfc = |ms: u64| punctual_core::time::format_rfc3339_ms(ms);
    let (status, answer) = h
        .call(
            "GET",
            &format!(
                "/v1/queues/tl/timeline?from={}&to={}&buckets=24",
                rfc(from),
                rfc(from + day)
            ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        (answer["from_ms"].as_u64(), answer["total"].as_u64()),
        (Some(from), Some(first_day))
    );
    let (status, answer) = h.call("GET", "/v1/queues/tl/timeline", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["buckets"].as_array().unwrap().len(), 60);
    assert_eq!(
        answer["to_ms"].as_u64().unwrap() - answer["from_ms"].as_u64().unwrap(),
        day
    );
    let (_, empty) = h
        .call("GET", "/v1/queues/nothing-here/timeline", None)
        .await;
    assert_eq!(empty["total"], 0);

    let refusals = [
        ("buckets=0", "buckets must be between 1 and 1000"),
        ("buckets=1001", "buckets must be between 1 and 1000"),
        ("buckets=x", "buckets must be between 1 and 1000"),
        ("from=2000&to=1000", "to must be later than from"),
        (
            "from=yesterday",
            "from must be unix milliseconds or an RFC 3339",
        ),
        ("to=99999999999999999999999", "to is too large"),
        ("to=9999999999999", "to may be at most max_delay_ms"),
        ("bucket=3", "unknown query parameter \"bucket\""),
    ];
    assert_refused(h, "/v1/queues/tl/timeline", &refusals).await;
}

/// Each query is a 422 whose message says what is given with it.
async fn assert_refused(h: &Harness, path: &str, cases: &[(&str, &str)]) {
    for (query, says) in cases {
        let (status, answer) = h.call("GET", &format!("{path}?{query}"), None).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{query}: {message}");
    }
}

each_store!(the_timeline_matches_a_listing, timeline_matches_listing);

/// One raw answer: status, headers and body text.
async fn fetch(h: &Harness, uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let request = Request::builder().uri(uri).body(Body::empty()).unwrap();
    let response = h.router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into(),
    )
}

/// The dashboard's page and assets come from the binary, need no token, and carry a strict CSP;
/// `--ui off` takes them away. `/v1/server` and `/v1/webhooks/targets` need the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let config = ServerConfig {
        auth_tokens: vec!["t0ken".into()],
        ..ServerConfig::default()
    };
    let h = Harness::with_config(Arc::new(MemoryStore::new()), config.clone());
    let (status, headers, _) = fetch(&h, "/").await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers["location"], "/ui/");
    for page in ["/ui", "/ui/"] {
        let (status, headers, body) = fetch(&h, page).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(body.contains("/ui/assets/app.js"));
        assert!(!body.contains("<script>"), "no inline script");
        assert!(!body.contains("style="), "no inline style");
    }
    for (asset, media_type, contains) in [
        ("app.js", "text/javascript; charset=utf-8", "sessionStorage"),
        ("app.css", "text/css; charset=utf-8", "--accent"),
        (
            "uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "uPlot",
        ),
        ("uPlot.min.css", "text/css; charset=utf-8", ".uplot"),
        (
            "uPlot.LICENSE.txt",
            "text/plain; charset=utf-8",
            "The MIT License",
        ),
        ("favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, headers, body) = fetch(&h, &format!("/ui/assets/{asset}")).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
        assert_eq!(headers["content-type"], media_type, "{asset}");
        assert!(body.contains(contains), "{asset}");
        assert!(headers.contains_key("content-security-policy"));
    }
    let (status, _, body) = fetch(&h, "/ui/assets/../../Cargo.toml").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = fetch(&h, "/ui/assets/secret.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no_route"));

    let (status, _) = h.call("GET", "/v1/server", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, server) = h.call_as(Some("t0ken"), "GET", "/v1/server", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (server["store"].as_str(), server["status"].as_str()),
        (Some("memory"), Some("ok"))
    );
    assert!(
        server["disk_used_bytes"].is_null(),
        "no data directory: {server}"
    );
    let (status, _) = h.call("GET", "/v1/webhooks/targets", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, targets) = h
        .call_as(Some("t0ken"), "GET", "/v1/webhooks/targets", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(targets["targets"], json!([]));
    h.stop().await;

    let off = Harness::with_config(
        Arc::new(MemoryStore::new()),
        ServerConfig {
            ui: false,
            ..config
        },
    );
    for path in ["/", "/ui", "/ui/", "/ui/assets/app.js"] {
        let (status, _, body) = fetch(&off, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(body.contains("no_route"), "{path}: {body}");
    }
    off.stop().await;
}

/// `order=due` pages through a queue's scheduled tasks by due time, as a listing sorted by due time.
async fn due_order_listing(h: &Harness) {
    let day = 86_400_000u64;
    let tasks: Vec<Value> = (0..90u64)
        .map(|i| json!({"id": format!("d{i:02}"), "delay_ms": 90_000 + (i * 28_793_311) % (20 * day)}))
        .collect();
    let (status, _) = h
        .json(
            "POST",
            "/v1/queues/due-order/batch",
            json!({"tasks": tasks}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, page) = h
        .call("GET", "/v1/queues/due-order/tasks?limit=1000", None)
        .await;
    let mut want: Vec<(u64, String)> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["run_at_ms"].as_u64().unwrap(),
                t["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    want.sort();
    let mut got = Vec::new();
    let mut uri = "/v1/queues/due-order/tasks?order=due&state=scheduled&limit=20".to_owned();
    loop {
        let (status, page) = h.call("GET", &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for t in page["tasks"].as_array().unwrap() {
            got.push((
                t["run_at_ms"].as_u64().unwrap(),
                t["id"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => {
                uri = format!("/v1/queues/due-order/tasks?order=due&limit=20&cursor={next}")
            }
            None => break,
        }
    }
    assert_eq!(got, want);
    let refusals = [
        (
            "order=due&state=dead",
            "order=due lists scheduled tasks only",
        ),
        ("order=soon", "order must be id or due"),
        (
            "order=due&cursor=nonsense",
            "cursor must be the next_cursor",
        ),
        ("order=due&limit=0", "limit must be between 1 and 1000"),
    ];
    assert_refused(h, "/v1/queues/due-order/tasks", &refusals).await;
}

each_store!(due_order_pages_match_a_sorted_listing, due_order_listing);

/// `GET /v1/openapi.json` serves the document, without a token, and it equals the committed
/// `docs/openapi.json` (with the default limits). `PUNCTUAL_WRITE_OPENAPI=1` rewrites that file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_and_matches_the_committed_one() {
    let config = ServerConfig {
        auth_tokens: vec!["t0ken".into()],
        ..ServerConfig::default()
    };
    let h = Harness::with_config(Arc::new(MemoryStore::new()), config);
    let (status, served) = h.call("GET", "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "no token needed: {served}");
    assert_eq!(served["openapi"], "3.1.0");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let text = format!("{}\n", serde_json::to_string_pretty(&served).unwrap());
    if std::env::var_os("PUNCTUAL_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "docs/openapi.json differs from what the server serves: run \
         PUNCTUAL_WRITE_OPENAPI=1 cargo test -p punctual-server --test api openapi, and commit it"
    );
    // Every route of the router is described, and nothing else.
    let mut paths: Vec<&str> = served["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    for path in &paths {
        let probe = path
            .replace("{queue}", "q")
            .replace("{id}", "i")
            .replace("{name}", "n")
            .replace("{action}", "pause");
        for (method, _) in served["paths"][*path].as_object().unwrap() {
            let (status, answer) = h
                .call_as(Some("t0ken"), &method.to_uppercase(), &probe, Some("{}"))
                .await;
            assert!(
                !matches!(status.as_u16(), 404 | 405) || answer["error"]["code"] == "not_found",
                "{method} {probe}: {status} {answer}"
            );
        }
    }
    h.stop().await;
}

/// A whole number written as a float (`60000.0`, as PHP's and Python's encoders write floats) is
/// read as that number; a fraction is still refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_numbers_written_as_floats_are_accepted() {
    let h = Harness::new(Arc::new(MemoryStore::new()));
    let (status, task) = h
        .json(
            "POST",
            "/v1/queues/floats/tasks",
            json!({"id": "f", "delay_ms": 60000.0, "max_attempts": 3.0, "backoff_ms": [1000.0, 2000], "lease_ms": 5000.0}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{task}");
    assert_eq!(
        (
            task["max_attempts"].as_u64(),
            task["backoff_ms"].clone(),
            task["lease_ms"].as_u64()
        ),
        (Some(3), json!([1000, 2000]), Some(5000))
    );
    let (status, answer) = h
        .json("POST", "/v1/queues/floats/tasks", json!({"delay_ms": 1.5}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("delay_ms: expected a whole number"),
        "{message}"
    );
    let (status, answer) = h
        .json(
            "POST",
            "/v1/queues/floats/reserve",
            json!({"max": 2.0, "wait_ms": 0.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    h.stop().await;
}
