//! `/metrics` forgets the series of queues nobody touches any more, so short-lived queue names do not
//! grow memory and the scrape forever. (Its own test binary: the recorder is process-wide and the
//! first server decides its idle time.)
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use punctual_server::{App, ServerConfig};
use punctual_store::MemoryStore;
use tower::ServiceExt;

async fn call(router: &axum::Router, method: &str, uri: &str, body: &str) -> String {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_forgotten_queues_leave_the_scrape() {
    let app = App::start(
        Arc::new(MemoryStore::new()),
        ServerConfig {
            metric_idle_ms: 500,
            ..ServerConfig::default()
        },
    );
    let router = app.router();
    for q in 0..50 {
        call(
            &router,
            "POST",
            &format!("/v1/queues/short-{q}/tasks"),
            r#"{"id": "t"}"#,
        )
        .await;
        call(
            &router,
            "DELETE",
            &format!("/v1/queues/short-{q}/tasks/t"),
            "",
        )
        .await;
    }
    let text = call(&router, "GET", "/metrics", "").await;
    assert!(text.contains("queue=\"short-49\""), "{text}");
    // Nothing touches those queues now; another keeps being used.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        call(
            &router,
            "POST",
            "/v1/queues/busy/tasks",
            r#"{"delay_ms": 60000}"#,
        )
        .await;
        let text = call(&router, "GET", "/metrics", "").await;
        if !text.contains("short-") {
            assert!(text.contains("queue=\"busy\""), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "old series stayed:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
