//! Recurring schedules through real `punctual serve` processes: a SIGKILL during a schedule loses and
//! doubles no occurrence after the restart, and three nodes on one Redis (one of them killed midway)
//! create each occurrence of an every-200 ms schedule exactly once, with no leader.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Server, temp_dir};
use punctual_store::redis_testing::RedisServer;
use serde_json::{Value, json};

/// Occurrences taken and acked, by id: `(run_at_ms, times acked)`.
type Taken = BTreeMap<String, (u64, u32)>;

/// Reserves from `urls` in turn and acks what comes, for `for_ms`; a node that does not answer is
/// passed over.
async fn take(urls: &[String], queue: &str, for_ms: u64, taken: &mut Taken) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_millis(for_ms);
    let mut turn = 0usize;
    while Instant::now() < until {
        turn += 1;
        let url = &urls[turn % urls.len()];
        let Ok(response) = http
            .post(format!("{url}/v1/queues/{queue}/reserve"))
            .json(&json!({"max": 100, "wait_ms": 100}))
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(body) = response.json::<Value>().await else {
            continue;
        };
        for task in body["tasks"].as_array().into_iter().flatten() {
            let id = task["id"].as_str().unwrap().to_owned();
            let ack = http
                .post(format!("{url}/v1/queues/{queue}/tasks/{id}/ack"))
                .json(&json!({"lease_token": task["lease_token"]}))
                .send()
                .await;
            let entry = taken
                .entry(id)
                .or_insert((task["run_at_ms"].as_u64().unwrap(), 0));
            if ack.is_ok_and(|r| r.status() == reqwest::StatusCode::NO_CONTENT) {
                entry.1 += 1;
            }
        }
    }
}

/// Every occurrence from the first taken to the last, each acked once: no gap, no double.
fn assert_each_once(taken: &Taken, name: &str, every_ms: u64) -> usize {
    let times: Vec<u64> = taken.values().map(|(at, _)| *at).collect();
    let (first, last) = (times[0], *times.last().unwrap());
    let expected = ((last - first) / every_ms + 1) as usize;
    let mut missing = Vec::new();
    let mut at = first;
    while at <= last {
        if !taken.contains_key(&format!("{name}@{at}")) {
            missing.push(at);
        }
        at += every_ms;
    }
    assert!(missing.is_empty(), "occurrences lost: {missing:?}");
    let twice: Vec<_> = taken.iter().filter(|(_, (_, n))| *n > 1).collect();
    assert!(
        twice.is_empty(),
        "acked twice (an occurrence doubled): {twice:?}"
    );
    let unacked: Vec<_> = taken.iter().filter(|(_, (_, n))| *n == 0).collect();
    assert!(unacked.is_empty(), "never acked: {unacked:?}");
    assert_eq!(taken.len(), expected);
    expected
}

async fn put_schedule(url: &str, queue: &str, name: &str, body: Value) {
    let response = reqwest::Client::new()
        .put(format!("{url}/v1/queues/{queue}/schedules/{name}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_a_schedule_loses_and_doubles_nothing() {
    let mut server = Server::start(&temp_dir("schedule-crash"), &[]).await;
    put_schedule(
        &server.url,
        "beats",
        "beat",
        json!({"every_ms": 200, "missed": "all"}),
    )
    .await;
    let mut taken = Taken::new();
    take(
        std::slice::from_ref(&server.url),
        "beats",
        1_500,
        &mut taken,
    )
    .await;
    let before = taken.len();
    assert!(before >= 5, "{taken:?}");
    server.kill9();
    server.restart().await;
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    take(
        std::slice::from_ref(&server.url),
        "beats",
        3_000,
        &mut taken,
    )
    .await;
    let n = assert_each_once(&taken, "beat", 200);
    assert!(n > before + 5, "occurrences went on after the restart: {n}");
    let last = taken.values().map(|(at, _)| *at).max().unwrap();
    assert!(last > restarted_at + 1_500, "on time after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_create_each_occurrence_once_while_one_is_killed() {
    let redis = RedisServer::start(&[]).expect("start redis-server");
    let url = redis.url();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Server::start(&temp_dir("schedule-node"), &["--redis", &url]).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    put_schedule(
        &urls[1],
        "ticks",
        "tick",
        json!({"every_ms": 200, "missed": "all"}),
    )
    .await;
    let mut taken = Taken::new();
    take(&urls, "ticks", 5_000, &mut taken).await;
    // The node that holds the schedule's lease at this moment may be this one.
    nodes[0].kill9();
    take(&urls[1..], "ticks", 6_000, &mut taken).await;
    let n = assert_each_once(&taken, "tick", 200);
    assert!(n >= 50, "{n} occurrences");
}
