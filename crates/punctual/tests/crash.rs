//! Crash test: drive a real `punctual serve` with a mixed load, SIGKILL it at random moments, restart it,
//! and check through the API that every acknowledged change survived and no acked task comes back.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Rng, Server, temp_dir};
use serde_json::{Value, json};

/// What the clients were told. Only answers that arrived count; a request cut off by the kill is unknown.
#[derive(Default)]
struct Model {
    /// Scheduling answered 201/200.
    scheduled: HashSet<String>,
    /// Cancel answered 204.
    cancelled: HashSet<String>,
    /// Cancel sent but its answer never came (cut off by a kill): the task may or may not be gone.
    cancel_unknown: HashSet<String>,
    /// Ack answered 204.
    acked: HashSet<String>,
    /// Deliveries of tasks that had already been acked (must stay empty).
    redelivered_after_ack: Vec<String>,
    /// Deliveries per id, for the report.
    deliveries: HashMap<String, u32>,
}

type Shared = Arc<Mutex<Model>>;

async fn schedule_some(
    http: &reqwest::Client,
    url: &str,
    model: &Shared,
    first: u64,
    rng_bits: u64,
) {
    let tasks: Vec<Value> = (0..20)
        .map(|i| {
            let n = first + i;
            // Some due at once, some within the run, some after the next crash.
            let delay = (rng_bits >> (i % 16)) % 1_500;
            json!({"id": format!("t{n}"), "payload": {"n": n}, "delay_ms": delay, "max_attempts": 1000, "backoff_ms": [0]})
        })
        .collect();
    let Ok(response) = http
        .post(format!("{url}/v1/queues/crash/batch"))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
    else {
        return;
    };
    let Ok(answer) = response.json::<Value>().await else {
        return;
    };
    let mut m = model.lock().unwrap();
    for item in answer["results"].as_array().into_iter().flatten() {
        if item["status"] == 201 || item["status"] == 200 {
            m.scheduled
                .insert(item["task"]["id"].as_str().unwrap().to_owned());
        }
    }
}

/// Reserves and settles tasks: ack most, nack some, abandon a few (their lease must expire).
async fn consume_some(
    http: &reqwest::Client,
    url: &str,
    model: &Shared,
    choice: u64,
    max: usize,
) -> usize {
    let Ok(response) = http
        .post(format!("{url}/v1/queues/crash/reserve"))
        .json(&json!({"max": max, "wait_ms": 100, "lease_ms": 400}))
        .send()
        .await
    else {
        return 0;
    };
    let Ok(answer) = response.json::<Value>().await else {
        return 0;
    };
    let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
    let mut settles = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        let id = task["id"].as_str().unwrap().to_owned();
        {
            let mut m = model.lock().unwrap();
            if m.acked.contains(&id) {
                m.redelivered_after_ack.push(id.clone());
            }
            *m.deliveries.entry(id.clone()).or_default() += 1;
        }
        let token = task["lease_token"].clone();
        let (http, url, model) = (http.clone(), url.to_owned(), model.clone());
        let how = (choice >> (i % 60)) % 10;
        // Settle concurrently, as a real worker pool would.
        settles.push(tokio::spawn(async move {
            match how {
                0 => {} // abandoned: the lease expires
                1 | 2 => {
                    let _ = http
                        .post(format!("{url}/v1/queues/crash/tasks/{id}/nack"))
                        .json(&json!({"lease_token": token, "error": "try again"}))
                        .send()
                        .await;
                }
                _ => {
                    if let Ok(r) = http
                        .post(format!("{url}/v1/queues/crash/tasks/{id}/ack"))
                        .json(&json!({ "lease_token": token }))
                        .send()
                        .await
                        && r.status() == 204
                    {
                        model.lock().unwrap().acked.insert(id);
                    }
                }
            }
        }));
    }
    for settle in settles {
        let _ = settle.await;
    }
    tasks.len()
}

async fn cancel_one(http: &reqwest::Client, url: &str, model: &Shared, pick: u64) {
    let id = {
        let m = model.lock().unwrap();
        let candidates: Vec<&String> = m
            .scheduled
            .iter()
            .filter(|id| !m.acked.contains(*id))
            .collect();
        if candidates.is_empty() {
            return;
        }
        candidates[(pick as usize) % candidates.len()].clone()
    };
    model.lock().unwrap().cancel_unknown.insert(id.clone());
    if let Ok(r) = http
        .delete(format!("{url}/v1/queues/crash/tasks/{id}"))
        .send()
        .await
    {
        let mut m = model.lock().unwrap();
        m.cancel_unknown.remove(&id);
        if r.status() == 204 {
            m.cancelled.insert(id);
        }
    }
}

/// Checks the server's state against what clients were told.
async fn verify(http: &reqwest::Client, url: &str, model: &Shared) {
    let (scheduled, cancelled, acked, cancel_unknown) = {
        let m = model.lock().unwrap();
        (
            m.scheduled.clone(),
            m.cancelled.clone(),
            m.acked.clone(),
            m.cancel_unknown.clone(),
        )
    };
    for id in &scheduled {
        let get = || http.get(format!("{url}/v1/queues/crash/tasks/{id}")).send();
        // A request that gets no answer at all says nothing about the store. One run of 104 kill rounds
        // saw one (IncompleteMessage; most likely a pooled connection to the process just killed, not
        // established). One retry, said out loud so it stays visible.
        let response = match get().await {
            Ok(response) => response,
            Err(error) => {
                eprintln!("verify: GET {id} got no answer ({error}); retrying once");
                get().await.unwrap()
            }
        };
        let status = response.status().as_u16();
        if cancelled.contains(id) {
            assert_eq!(status, 404, "cancelled task {id} came back");
            continue;
        }
        if status == 404 && cancel_unknown.contains(id) {
            // The cancel committed but its answer was cut off by the kill: that is a cancel.
            model.lock().unwrap().cancelled.insert(id.clone());
            continue;
        }
        assert_eq!(
            status, 200,
            "acknowledged task {id} is missing after the crash"
        );
        let task: Value = response.json().await.unwrap();
        if acked.contains(id) {
            assert_eq!(
                task["state"], "succeeded",
                "acked task {id} is {}",
                task["state"]
            );
        }
    }
}

/// How long the kill-and-restart loop goes on.
enum Until {
    Rounds(usize),
    Elapsed(Duration),
}

impl Until {
    fn more(&self, round: usize, started: Instant) -> bool {
        match self {
            Until::Rounds(n) => round < *n,
            Until::Elapsed(d) => started.elapsed() < *d,
        }
    }
}

/// Five kills by default; `PUNCTUAL_CRASH_ROUNDS=200` for the long mode. On the redb store, kept
/// for one release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_resurrects_nothing() {
    let rounds = std::env::var("PUNCTUAL_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    kill_and_check(Until::Rounds(rounds), &["--store", "redb"]).await;
}

/// The same on the journal store, the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_the_journal_store_loses_and_resurrects_nothing() {
    let rounds = std::env::var("PUNCTUAL_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    // Checkpoints every MiB, so kills land before, during and after them.
    kill_and_check(
        Until::Rounds(rounds),
        &["--store", "journal", "--checkpoint-mb", "1"],
    )
    .await;
}

/// The soak: the same mixed load with random `kill -9` for `PUNCTUAL_SOAK_MINUTES` (default 10),
/// then a full check. Run it with
/// `PUNCTUAL_SOAK_MINUTES=30 cargo test --release -p punctual --test crash soak -- --ignored --nocapture`
/// (`PUNCTUAL_SOAK_STORE=redb` for the redb store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak_with_random_kills() {
    let minutes: u64 = std::env::var("PUNCTUAL_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let store = std::env::var("PUNCTUAL_SOAK_STORE").unwrap_or_else(|_| "journal".into());
    kill_and_check(
        Until::Elapsed(Duration::from_secs(minutes * 60)),
        &["--store", &store],
    )
    .await;
}

async fn kill_and_check(until: Until, args: &[&str]) {
    let soak_started = Instant::now();
    let mut rng = Rng::from_env_or_time();
    let dir = temp_dir("crash");
    let mut server = Server::start(&dir, args).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let model: Shared = Arc::default();
    let mut next_id = 0u64;

    let mut round = 0;
    while until.more(round, soak_started) {
        round += 1;
        let run_for = Duration::from_millis(300 + rng.below(900));
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..4u64 {
            let (http, url, model) = (http.clone(), server.url.clone(), model.clone());
            let first = next_id + worker * 1_000_000;
            let seed = rng.next();
            workers.push(tokio::spawn(async move {
                let mut local = Rng(seed);
                let mut n = first;
                while started.elapsed() < run_for {
                    match worker {
                        0 | 1 => {
                            schedule_some(&http, &url, &model, n, local.next()).await;
                            n += 20;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        2 => {
                            consume_some(&http, &url, &model, local.next(), 10).await;
                        }
                        _ => {
                            consume_some(&http, &url, &model, local.next(), 10).await;
                            if local.below(3) == 0 {
                                cancel_one(&http, &url, &model, local.next()).await;
                            }
                        }
                    }
                }
            }));
        }
        // Kill while the load is running, at a random moment within it.
        tokio::time::sleep(run_for.mul_f64(0.5 + rng.below(50) as f64 / 100.0)).await;
        server.kill9();
        for worker in workers {
            worker.await.unwrap();
        }
        next_id += 10_000_000;
        server.restart().await;
        verify(&http, &server.url, &model).await;
        let m = model.lock().unwrap();
        eprintln!(
            "round {round}: scheduled {}, acked {}, cancelled {}",
            m.scheduled.len(),
            m.acked.len(),
            m.cancelled.len()
        );
        assert!(
            m.redelivered_after_ack.is_empty(),
            "acked tasks delivered again: {:?}",
            m.redelivered_after_ack
        );
    }

    // Drain: every task that was not cancelled must eventually be delivered and acked, including those
    // that came due while the server was down and those whose lease was held at a crash.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let outstanding: Vec<String> = {
            let m = model.lock().unwrap();
            m.scheduled
                .iter()
                .filter(|id| !m.cancelled.contains(*id) && !m.acked.contains(*id))
                .cloned()
                .collect()
        };
        if outstanding.is_empty() {
            break;
        }
        if outstanding.len() <= 50 {
            // An ack that committed but whose answer was cut off by a kill leaves a task `succeeded`
            // that the model does not know was acked; that is correct, so count it as done.
            for id in &outstanding {
                let task: Value = http
                    .get(format!("{}/v1/queues/crash/tasks/{id}", server.url))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if task["state"] == "succeeded" {
                    model.lock().unwrap().acked.insert(id.clone());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} tasks never completed, e.g. {:?}",
            outstanding.len(),
            &outstanding[..outstanding.len().min(5)]
        );
        // Ack everything from here on, with four consumers.
        let drains: Vec<_> = (0..4)
            .map(|_| {
                let (http, url, model) = (http.clone(), server.url.clone(), model.clone());
                tokio::spawn(async move {
                    consume_some(&http, &url, &model, 0x3333_3333_3333_3333, 100).await
                })
            })
            .collect();
        for drain in drains {
            drain.await.unwrap();
        }
    }
    verify(&http, &server.url, &model).await;
    let m = model.lock().unwrap();
    assert!(
        m.redelivered_after_ack.is_empty(),
        "acked tasks delivered again: {:?}",
        m.redelivered_after_ack
    );
    assert!(
        m.acked.len() > 100,
        "the load did too little to mean anything: {} acked",
        m.acked.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
