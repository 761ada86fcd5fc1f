//! Every endpoint's request decoding, through the real router on the in-memory store: the first
//! byte picks an endpoint, the rest is the body. No input may panic a handler or get a 5xx.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use punctual_server::{App, ServerConfig};
use punctual_store::MemoryStore;
use tower::ServiceExt;

const ENDPOINTS: [(&str, &str); 12] = [
    ("POST", "/v1/queues/q/tasks"),
    ("POST", "/v1/queues/q/batch"),
    ("POST", "/v1/queues/q/reserve"),
    ("POST", "/v1/queues/q/ack"),
    ("PATCH", "/v1/queues/q/tasks/t"),
    ("POST", "/v1/queues/q/tasks/t/ack"),
    ("POST", "/v1/queues/q/tasks/t/nack"),
    ("POST", "/v1/queues/q/tasks/t/extend"),
    ("POST", "/v1/queues/q/tasks/t/retry"),
    ("DELETE", "/v1/queues/q/tasks/t"),
    ("GET", "/v1/queues/q/tasks?state=dead&limit=5"),
    ("PUT", "/v1/queues/q/tasks"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _app: App,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Long-polls would stall the fuzzer: any wait past 1 ms is refused (and that path fuzzed).
        let mut config = ServerConfig::default();
        config.limits.max_wait_ms = 1;
        let app = runtime.block_on(async { App::start(Arc::new(MemoryStore::new()), config) });
        let router = app.router();
        Fixture {
            runtime,
            router,
            _app: app,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, body)) = input.split_first() else {
        return;
    };
    let (method, path) = ENDPOINTS[pick as usize % ENDPOINTS.len()];
    let f = fixture();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::from(body.to_vec()))
        .unwrap();
    let status = f
        .runtime
        .block_on(f.router.clone().oneshot(request))
        .unwrap()
        .status();
    assert!(!status.is_server_error(), "{method} {path}: {status}");
});
