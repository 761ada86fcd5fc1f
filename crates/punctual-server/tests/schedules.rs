//! Recurring schedules through the router (no socket), on the journal store on real files and on a
//! Redis the test starts: occurrences on time and once, the API's answers and refusals, pause,
//! resume, trigger, delete, `overlap: "skip"`, and each `missed` policy across a restart.
//! Waits poll with a deadline; nothing sleeps to "wait for" an occurrence.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

mod common;

use common::temp_dir;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use punctual_server::{App, ServerConfig};
use punctual_store::{JournalStore, JournalStoreOptions, Store};
use serde_json::{Value, json};
use tower::ServiceExt;

fn journal(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(JournalStore::open(dir, &JournalStoreOptions::default()).unwrap())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Harness {
    app: Option<App>,
    router: Router,
}

impl Harness {
    fn new(store: Arc<dyn Store>) -> Harness {
        let app = App::start(
            store,
            ServerConfig {
                retention_ms: 60_000,
                ..ServerConfig::default()
            },
        );
        let router = app.router();
        Harness {
            app: Some(app),
            router,
        }
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value)
    }

    /// Takes whatever is ready in `queue` (acking it), for up to `for_ms`: `(id, run_at_ms, taken_at_ms)`.
    async fn take(&self, queue: &str, for_ms: u64) -> Vec<(String, u64, u64)> {
        let until = Instant::now() + Duration::from_millis(for_ms);
        let mut got = Vec::new();
        while Instant::now() < until {
            let (status, body) = self
                .call(
                    "POST",
                    &format!("/v1/queues/{queue}/reserve"),
                    Some(json!({"max": 100, "wait_ms": 100})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let at = now_ms();
            for task in body["tasks"].as_array().unwrap() {
                let id = task["id"].as_str().unwrap().to_owned();
                let token = task["lease_token"].as_str().unwrap();
                let (status, _) = self
                    .call(
                        "POST",
                        &format!("/v1/queues/{queue}/tasks/{id}/ack"),
                        Some(json!({"lease_token": token})),
                    )
                    .await;
                assert_eq!(status, StatusCode::NO_CONTENT);
                got.push((id, task["run_at_ms"].as_u64().unwrap(), at));
            }
        }
        got
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// Polls `GET` of a schedule until `ok` holds, for up to 5 s.
async fn schedule_until(h: &Harness, uri: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = h.call("GET", uri, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_n_creates_each_occurrence_once_and_on_time() {
    let h = Harness::new(journal(&temp_dir("schedules")));
    let uri = "/v1/queues/jobs/schedules/tick";
    let (status, created) = h
        .call(
            "PUT",
            uri,
            Some(json!({"every_ms": 200, "payload": {"report": "daily"}, "max_attempts": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let runs = created["next_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 5);
    let first = runs[0]["run_at_ms"].as_u64().unwrap();
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["run_at_ms"].as_u64().unwrap(), first + 200 * i as u64);
        assert!(run["run_at"].as_str().unwrap().ends_with("+00:00"));
    }
    let got = h.take("jobs", 1_500).await;
    // Every occurrence in the window, each once, with its derived id and the schedule's fields.
    let mut times: Vec<u64> = got.iter().map(|(_, at, _)| *at).collect();
    times.sort_unstable();
    assert!(times.len() >= 5, "{got:?}");
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 200, "{times:?}");
    }
    assert_eq!(times[0], first);
    for (id, at, taken) in &got {
        assert_eq!(*id, format!("tick@{at}"));
        assert!(taken + 5 >= *at, "not before its time: {id} at {taken}");
        assert!(taken - at < 300, "late: {id} taken at {taken}");
    }
    let (_, task) = h
        .call("GET", &format!("/v1/queues/jobs/tasks/{}", got[0].0), None)
        .await;
    assert_eq!(task["payload"], json!({"report": "daily"}));
    assert_eq!(task["max_attempts"], 2);
    let view = schedule_until(&h, uri, "counts", |v| {
        v["occurrences_created"].as_u64().unwrap() >= times.len() as u64
    })
    .await;
    assert_eq!(view["occurrences_skipped"], 0);
    assert!(view["last_run_at_ms"].as_u64().unwrap() <= now_ms());
    // Replacing answers 200 and keeps the history.
    let (status, replaced) = h.call("PUT", uri, Some(json!({"every_ms": 300}))).await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert!(replaced["occurrences_created"].as_u64().unwrap() >= times.len() as u64);
    // Listed with its queue's schedules only.
    h.call(
        "PUT",
        "/v1/queues/other/schedules/x",
        Some(json!({"every_ms": 60000})),
    )
    .await;
    let (_, list) = h.call("GET", "/v1/queues/jobs/schedules", None).await;
    let names: Vec<&str> = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tick"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_schedules_show_their_zone_and_bad_specs_are_refused() {
    let h = Harness::new(journal(&temp_dir("schedules")));
    let (status, view) = h
        .call(
            "PUT",
            "/v1/queues/mail/schedules/weekdays",
            Some(json!({"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(view["timezone"], "Europe/Berlin");
    for run in view["next_runs"].as_array().unwrap() {
        let text = run["run_at"].as_str().unwrap();
        assert!(text.ends_with("T09:00:00+01:00"), "{text}");
    }
    // A cron with seconds.
    let (status, view) = h
        .call(
            "PUT",
            "/v1/queues/mail/schedules/often",
            Some(json!({"cron": "*/10 * * * * *"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let runs: Vec<u64> = view["next_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_at_ms"].as_u64().unwrap())
        .collect();
    assert!(runs.windows(2).all(|p| p[1] - p[0] == 10_000), "{runs:?}");
    for (body, expect) in [
        (json!({"cron": "0 25 * * *"}), "field 2 (hour)"),
        (
            json!({"cron": "0 9 * * *", "timezone": "Mars/Base"}),
            "time zone",
        ),
        (json!({"cron": "0 9 * * *", "every_ms": 1000}), "not both"),
        (json!({}), "every_ms or cron"),
        (json!({"every_ms": 10}), "every_ms must be between"),
        (
            json!({"every_ms": 1000, "missed": "some"}),
            "missed must be",
        ),
        (
            json!({"every_ms": 1000, "overlap": "maybe"}),
            "overlap must be",
        ),
        (json!({"every_ms": 1000, "colour": "red"}), "colour"),
        (json!({"every_ms": 1000, "max_attempts": 0}), "max_attempts"),
        (json!({"cron": "0 0 30 2 *"}), "matches no date"),
        (
            json!({"every_ms": 1000, "start_at": "2027-01-02T00:00:00Z", "end_at": "2027-01-01T00:00:00Z"}),
            "end_at is before start_at",
        ),
    ] {
        let (status, error) = h
            .call("PUT", "/v1/queues/mail/schedules/bad", Some(body.clone()))
            .await;
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{body}: {status} {error}"
        );
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(expect),
            "{body}: {error}"
        );
    }
    let (status, _) = h.call("GET", "/v1/queues/mail/schedules/bad", None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing stored for a refused spec"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_trigger_and_delete() {
    let h = Harness::new(journal(&temp_dir("schedules")));
    let uri = "/v1/queues/ops/schedules/beat";
    h.call("PUT", uri, Some(json!({"every_ms": 200}))).await;
    let (status, paused) = h.call("POST", &format!("{uri}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["next_runs"], json!([]));
    // What was created before the pause (up to a second ahead) still fires; then nothing.
    h.take("ops", 1_200).await;
    assert!(h.take("ops", 600).await.is_empty(), "nothing while paused");
    let (status, triggered) = h.call("POST", &format!("{uri}/trigger"), None).await;
    assert_eq!(status, StatusCode::CREATED, "{triggered}");
    assert!(
        triggered["id"]
            .as_str()
            .unwrap()
            .starts_with("beat@trigger-")
    );
    let got = h.take("ops", 300).await;
    assert_eq!(got.len(), 1, "the triggered occurrence: {got:?}");
    let (_, resumed) = h.call("POST", &format!("{uri}/resume"), None).await;
    assert_eq!(resumed["paused"], false);
    assert!(!h.take("ops", 800).await.is_empty(), "occurrences again");
    let (status, _) = h.call("POST", &format!("{uri}/explode"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("DELETE", uri, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h.call("GET", uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.call("DELETE", uri, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Occurrences created ahead fire; after them, nothing.
    h.take("ops", 1_200).await;
    assert!(h.take("ops", 600).await.is_empty(), "nothing after delete");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_waits_for_the_previous_occurrence() {
    let h = Harness::new(journal(&temp_dir("schedules")));
    let uri = "/v1/queues/slow/schedules/job";
    h.call(
        "PUT",
        uri,
        Some(json!({"every_ms": 200, "overlap": "skip", "lease_ms": 60000})),
    )
    .await;
    // Take the first occurrence and hold it (never ack): no other may be created meanwhile.
    let deadline = Instant::now() + Duration::from_secs(3);
    let held = loop {
        let (_, body) = h
            .call(
                "POST",
                "/v1/queues/slow/reserve",
                Some(json!({"max": 10, "wait_ms": 200})),
            )
            .await;
        let tasks = body["tasks"].as_array().unwrap().clone();
        if !tasks.is_empty() {
            assert_eq!(tasks.len(), 1, "{tasks:?}");
            break tasks[0].clone();
        }
        assert!(Instant::now() < deadline, "no first occurrence");
    };
    let view = schedule_until(&h, uri, "skips while the first runs", |v| {
        v["occurrences_skipped"].as_u64().unwrap() >= 3
    })
    .await;
    assert_eq!(view["occurrences_created"], 1, "{view}");
    let (_, queue) = h.call("GET", "/v1/queues/slow", None).await;
    assert_eq!(queue["total"], 1, "{queue}");
    // Once it is done, the next occurrence comes.
    let (status, _) = h
        .call(
            "POST",
            &format!("/v1/queues/slow/tasks/{}/ack", held["id"].as_str().unwrap()),
            Some(json!({"lease_token": held["lease_token"]})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        !h.take("slow", 1_000).await.is_empty(),
        "the next occurrence"
    );
    h.stop().await;
}

/// A schedule every 200 ms whose server is away for 3 s, under `missed`: the occurrences taken
/// after the restart whose time fell in the part of the downtime that nothing had created ahead
/// (more than a second after the stop) and that was over a second before the restart (the grace),
/// and the schedule's view. The exact arithmetic of each policy is unit-tested in the core on a
/// virtual clock; this checks the same through a real restart.
async fn after_downtime(missed: &str) -> (Vec<(String, u64, u64)>, Value) {
    let dir = temp_dir("schedules");
    let h = Harness::new(journal(&dir));
    let uri = "/v1/queues/q/schedules/s";
    h.call("PUT", uri, Some(json!({"every_ms": 200, "missed": missed})))
        .await;
    h.take("q", 600).await;
    h.stop().await;
    let away_from = now_ms();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let back_at = now_ms();
    let h = Harness::new(journal(&dir));
    let got = h.take("q", 1_500).await;
    let (_, view) = h.call("GET", uri, None).await;
    h.stop().await;
    eprintln!("{missed}: away {away_from} back {back_at}: {got:?} {view}");
    let missed_runs = got
        .into_iter()
        .filter(|(_, at, _)| *at > away_from + 1_000 && *at < back_at - 1_000)
        .collect();
    (missed_runs, view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_occurrences_follow_the_policy_after_a_restart() {
    let (all, view) = after_downtime("all").await;
    assert!(all.len() >= 3, "all: every missed occurrence: {all:?}");
    assert_eq!(view["occurrences_skipped"], 0, "{view}");
    let (latest, view) = after_downtime("latest").await;
    assert!(
        latest.len() <= 1,
        "latest: one for all that was missed: {latest:?}"
    );
    assert!(view["occurrences_skipped"].as_u64().unwrap() >= 2, "{view}");
    let (skip, view) = after_downtime("skip").await;
    assert!(skip.is_empty(), "skip: nothing missed is created: {skip:?}");
    assert!(view["occurrences_skipped"].as_u64().unwrap() >= 3, "{view}");
}
