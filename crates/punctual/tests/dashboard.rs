//! The dashboard in a real browser: Debian's chromium, driven by playwright-core
//! (`tests/clients/dashboard.js`), against the real binary with tasks in it. The page must work with
//! no console error, page error, failed request or CSP violation; the dead task retried with the
//! dead-letter view's button is `ready` in the API afterwards; a server with a token asks for it and
//! works once it is given.
//!
//! Screenshots go to `target/dashboard-screenshots/`, or to `$PUNCTUAL_SCREENSHOTS` (the set in
//! `docs/dashboard/` is refreshed with `PUNCTUAL_SCREENSHOTS=docs/dashboard`).
#![allow(clippy::disallowed_methods)] // Tests read the clock directly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Server, free_port, temp_dir};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn node_path() -> PathBuf {
    let modules = root().join("target/clients/node/node_modules");
    assert!(
        modules.join("playwright-core/package.json").exists()
            && Path::new("/usr/bin/chromium").exists(),
        "playwright-core or chromium is missing: run ./scripts/test, which installs both"
    );
    modules
}

fn screenshots() -> PathBuf {
    let dir = match std::env::var_os("PUNCTUAL_SCREENSHOTS") {
        Some(dir) => root().join(dir),
        None => root().join("target/dashboard-screenshots"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the browser script with `vars`; panics with its output unless it printed OK.
fn browse(vars: &[(&str, String)]) {
    let mut command = std::process::Command::new("node");
    command
        .arg(root().join("crates/punctual/tests/clients/dashboard.js"))
        .env("NODE_PATH", node_path())
        .env("SHOTS", screenshots());
    for (k, v) in vars {
        command.env(k, v);
    }
    let output = command.output().expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("OK"),
        "the dashboard check failed:\n{stdout}\n{stderr}"
    );
}

async fn call(http: &reqwest::Client, method: &str, url: String, body: Value) -> (u16, Value) {
    let request = match method {
        "POST" => http.post(url),
        "PUT" => http.put(url),
        _ => http.get(url),
    };
    let Ok(response) = request.json(&body).send().await else {
        return (0, Value::Null);
    };
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Tasks over the next day and month, a dead one, a schedule, and webhook tasks to a closed port and
/// to a host that answers; answers how many `mail` tasks are due within a day.
async fn seed(http: &reqwest::Client, url: &str) -> usize {
    let mut due_within_day = 0;
    let mail: Vec<Value> = (0..400u64)
        .map(|i| {
            // Well inside the page's "next day" (which starts at the quarter hour before now and
            // so ends up to 15 minutes before now + 24 h), or well outside it.
            let delay = if i % 5 == 4 {
                90_000_000 + (i * 4_919_993) % (19 * 86_400_000)
            } else {
                120_000 + ((i * i * 7_919) % 36_000_000) + (i % 3) * 14_400_000
            };
            if delay < 86_400_000 {
                due_within_day += 1;
            }
            json!({"id": format!("welcome-{i}"), "delay_ms": delay, "payload": {"user": i, "template": "welcome", "locale": "en"}})
        })
        .collect();
    let (status, _) = call(
        http,
        "POST",
        format!("{url}/v1/queues/mail/batch"),
        json!({"tasks": mail}),
    )
    .await;
    assert_eq!(status, 200);
    let billing: Vec<Value> = (0..120u64)
        .map(|i| json!({"id": format!("invoice-{i}"), "delay_ms": 3_600_000 + i * 17_000_000, "payload": {"invoice": i}}))
        .collect();
    call(
        http,
        "POST",
        format!("{url}/v1/queues/billing/batch"),
        json!({"tasks": billing}),
    )
    .await;

    // Tasks that fail their only attempt: dead.
    for (queue, id) in [("mail", "bounce-42"), ("billing", "bounce-43")] {
        let body = json!({"id": id, "max_attempts": 1, "payload": {"to": "nobody@example.com"}});
        let (status, _) = call(http, "POST", format!("{url}/v1/queues/{queue}/tasks"), body).await;
        assert_eq!(status, 201);
        let reserve = json!({"max": 1, "wait_ms": 2000});
        let (_, leased) = call(
            http,
            "POST",
            format!("{url}/v1/queues/{queue}/reserve"),
            reserve,
        )
        .await;
        let task = &leased["tasks"][0];
        assert_eq!(task["id"], id);
        let nack = json!({"lease_token": task["lease_token"], "error": "smtp said 550: mailbox unavailable"});
        let (status, _) = call(
            http,
            "POST",
            format!("{url}/v1/queues/{queue}/tasks/{id}/nack"),
            nack,
        )
        .await;
        assert_eq!(status, 200);
    }

    let (status, _) = call(
        http,
        "PUT",
        format!("{url}/v1/queues/reports/schedules/digest"),
        json!({"cron": "0 8 * * MON-FRI", "timezone": "Europe/Berlin", "payload": {"report": "daily"}}),
    )
    .await;
    assert_eq!(status, 201);
    let closed = free_port();
    for (i, hook) in [
        format!("http://127.0.0.1:{closed}/hook"),
        format!("{url}/healthz"),
    ]
    .iter()
    .enumerate()
    {
        for j in 0..8 {
            call(
                http,
                "POST",
                format!("{url}/v1/queues/hooks/tasks"),
                json!({"id": format!("hook-{i}-{j}"), "webhook": {"url": hook}, "max_attempts": 3, "backoff_ms": [200]}),
            )
            .await;
        }
    }
    due_within_day
}

/// Background traffic while the browser looks, so the live charts have something to draw:
/// tasks due within a second or two, and a long-polling consumer that acks them as they come.
fn traffic(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let producer = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let tasks: Vec<Value> = (0..20)
                    .map(|i| json!({"delay_ms": (n * 37 + i * 53) % 1_500}))
                    .collect();
                let batch = json!({"tasks": tasks});
                call(
                    &http,
                    "POST",
                    format!("{url}/v1/queues/activity/batch"),
                    batch,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while !stop.load(Ordering::Relaxed) {
            let reserve = json!({"max": 100, "wait_ms": 500});
            let (_, got) = call(
                &http,
                "POST",
                format!("{url}/v1/queues/activity/reserve"),
                reserve,
            )
            .await;
            for task in got["tasks"].as_array().into_iter().flatten() {
                let id = task["id"].as_str().unwrap_or_default();
                let ack = json!({"lease_token": task["lease_token"]});
                call(
                    &http,
                    "POST",
                    format!("{url}/v1/queues/activity/tasks/{id}/ack"),
                    ack,
                )
                .await;
            }
        }
        let _ = producer.await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    node_path();
    let dir = temp_dir("dashboard");
    let server = Server::start(&dir, &["--webhook-allow-private"]).await;
    let http = reqwest::Client::new();
    let due = seed(&http, &server.url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background = traffic(server.url.clone(), stop.clone());
    let url = server.url.clone();
    tokio::task::spawn_blocking(move || {
        browse(&[
            ("BASE_URL", url),
            ("MODE", "open".into()),
            ("QUEUE", "mail".into()),
            ("SCHEDULED", due.to_string()),
            ("DEAD_ID", "bounce-42".into()),
        ])
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();

    // The retry button's effect, seen through the API.
    let (status, task) = call(
        &http,
        "GET",
        format!("{}/v1/queues/mail/tasks/bounce-42", server.url),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(task["state"], "ready", "{task}");
    // The delete button's.
    let (status, _) = call(
        &http,
        "GET",
        format!("{}/v1/queues/billing/tasks/bounce-43", server.url),
        Value::Null,
    )
    .await;
    assert_eq!(status, 404);
    // The reschedule picker's.
    let (_, task) = call(
        &http,
        "GET",
        format!("{}/v1/queues/mail/tasks/welcome-7", server.url),
        Value::Null,
    )
    .await;
    assert_eq!(task["run_at"], "2027-01-04T10:30:00.000Z", "{task}");
    // The pause button's.
    let (_, schedule) = call(
        &http,
        "GET",
        format!("{}/v1/queues/reports/schedules/digest", server.url),
        Value::Null,
    )
    .await;
    assert_eq!(schedule["paused"], true, "{schedule}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_dashboard_asks_for_it() {
    node_path();
    let dir = temp_dir("dashboard-token");
    let server = Server::start(&dir, &["--auth-token", "s3cret-token"]).await;
    let http = reqwest::Client::new();
    let (status, _) = call(
        &http,
        "POST",
        format!("{}/v1/queues/mail/tasks", server.url),
        json!({"delay_ms": 60_000}),
    )
    .await;
    assert_eq!(status, 401, "the API needs the token");
    let response = http
        .post(format!("{}/v1/queues/mail/tasks", server.url))
        .bearer_auth("s3cret-token")
        .json(&json!({"delay_ms": 60_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    // The page itself needs none: it holds no data.
    let page = http
        .get(format!("{}/ui/", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let url = server.url.clone();
    tokio::task::spawn_blocking(move || {
        browse(&[
            ("BASE_URL", url),
            ("MODE", "token".into()),
            ("TOKEN", "s3cret-token".into()),
            ("QUEUE", "mail".into()),
        ])
    })
    .await
    .unwrap();
}
