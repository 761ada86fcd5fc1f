//! Distributed mode end to end: three real `punctual serve` nodes on one Redis (and on a 3-master Redis
//! Cluster) that this test starts on free loopback ports. Tasks are scheduled and consumed through
//! different nodes, one node is SIGKILLed mid-run, and every task must be acked exactly once, with none
//! lost.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, temp_dir};
use punctual_store::redis_testing::{RedisCluster, RedisServer};
use serde_json::{Value, json};

const TASKS: usize = 10_000;

/// The counts of queue `d` as one node sees them.
async fn stats(url: &str) -> Value {
    reqwest::get(format!("{url}/v1/queues/d"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs `body` and answers the JSON reply.
async fn post(url: String, body: Value) -> Value {
    reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn nodes(args: &[&str]) -> Vec<Server> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Server::start(&temp_dir("node"), args).await);
    }
    nodes
}

#[derive(Default)]
struct Tally {
    /// Successful acks (204) per task id.
    acks: HashMap<String, u32>,
    /// Acks sent whose answer never came (the node died): they may or may not have committed.
    unknown: Vec<String>,
    deliveries: u64,
}

/// Reserves from `url` and acks everything it gets, until `stop` or the node stops answering.
async fn consume(url: String, tally: Arc<Mutex<Tally>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let http = reqwest::Client::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(response) = http
            .post(format!("{url}/v1/queues/d/reserve"))
            .json(&json!({"max": 50, "wait_ms": 300, "lease_ms": 1500}))
            .send()
            .await
        else {
            return; // the node is gone
        };
        let Ok(answer) = response.json::<Value>().await else {
            return;
        };
        let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
        if tasks.is_empty() {
            continue;
        }
        tally.lock().unwrap().deliveries += tasks.len() as u64;
        let items: Vec<Value> = tasks
            .iter()
            .map(|t| json!({"id": t["id"], "lease_token": t["lease_token"]}))
            .collect();
        let answer = match http
            .post(format!("{url}/v1/queues/d/ack"))
            .json(&json!({ "tasks": items }))
            .send()
            .await
        {
            Ok(response) => response.json::<Value>().await.ok(),
            Err(_) => None,
        };
        let Some(answer) = answer else {
            // Cut off: the acks may have committed, or the leases will expire and the tasks come back
            // through another node.
            let ids = tasks.iter().map(|t| t["id"].as_str().unwrap().to_owned());
            tally.lock().unwrap().unknown.extend(ids);
            return;
        };
        let mut tally = tally.lock().unwrap();
        for result in answer["results"].as_array().into_iter().flatten() {
            if result["status"] == 204 {
                *tally
                    .acks
                    .entry(result["id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
}

async fn schedule_through_all(nodes: &[Server]) {
    for (n, chunk) in (0..TASKS).collect::<Vec<_>>().chunks(500).enumerate() {
        let url = &nodes[n % nodes.len()].url;
        let tasks: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"id": format!("t{i}"), "delay_ms": (i * 7) % 3000, "payload": {"n": i}, "max_attempts": 100, "backoff_ms": [0]}))
            .collect();
        let answer = post(
            format!("{url}/v1/queues/d/batch"),
            json!({ "tasks": tasks }),
        )
        .await;
        for result in answer["results"].as_array().unwrap() {
            assert_eq!(result["status"], 201, "{result}");
        }
    }
}

/// Three nodes, two consumers on each; node 1 is SIGKILLed once a third of the tasks are acked (its
/// consumers' leases then expire and the tasks come back through the other nodes).
async fn three_nodes_one_killed(args: &[&str]) {
    let mut nodes = nodes(args).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut consumers = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            consumers.push(tokio::spawn(consume(
                node.url.clone(),
                tally.clone(),
                stop.clone(),
            )));
        }
    }
    schedule_through_all(&nodes).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let acked = || tally.lock().unwrap().acks.len();
    while acked() < TASKS / 3 {
        assert!(Instant::now() < deadline, "only {} acked", acked());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Node 1 hands out leases that are never settled, then dies: those tasks must come back elsewhere.
    let mut hoarded: Vec<String> = Vec::new();
    while hoarded.is_empty() {
        let answer = post(
            format!("{}/v1/queues/d/reserve", nodes[1].url),
            json!({"max": 100, "wait_ms": 1000, "lease_ms": 1000}),
        )
        .await;
        hoarded = answer["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(Instant::now() < deadline, "nothing left to hoard");
    }
    nodes[1].kill9();
    loop {
        let counts = stats(&nodes[0].url).await;
        if counts["succeeded"] == TASKS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all succeeded after the kill: {counts}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for consumer in consumers {
        let _ = consumer.await;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let twice: Vec<_> = tally.acks.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "acked more than once: {twice:?}");
    // Every task's ack was answered, but for those whose answer the kill cut off.
    let unanswered: Vec<&String> = tally
        .unknown
        .iter()
        .filter(|id| !tally.acks.contains_key(*id))
        .collect();
    assert_eq!(tally.acks.len() + unanswered.len(), TASKS);
    eprintln!(
        "{} deliveries for {TASKS} tasks; {} leases held on the killed node; {} acks cut off by the kill",
        tally.deliveries,
        hoarded.len(),
        unanswered.len()
    );
    for id in &hoarded {
        assert_eq!(
            tally.acks.get(id),
            Some(&1),
            "{id}, leased on the killed node, came back"
        );
    }
    // Every surviving node sees the same store: all succeeded, nothing else left.
    for node in [&nodes[0], &nodes[2]] {
        let stats = stats(&node.url).await;
        assert_eq!(stats["succeeded"], TASKS, "{stats}");
        assert_eq!(stats["leased"], 0, "{stats}");
        assert_eq!(stats["ready"], 0, "{stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_one_redis_ack_each_task_once_through_a_kill() {
    let redis = RedisServer::start(&[]).expect("start redis-server");
    three_nodes_one_killed(&["--redis", &redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_cluster_ack_each_task_once_through_a_kill() {
    let cluster = RedisCluster::start(3).expect("start a 3-master cluster");
    let urls = cluster.urls().join(",");
    three_nodes_one_killed(&["--redis-cluster", &urls]).await;
}

/// Two nodes on a Redis that speaks TLS and demands client certificates: a task scheduled through one
/// is delivered through the other (commands and the events channel over `rediss://`). Bad TLS settings
/// stop a node at start with a message naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_over_tls_with_client_certificates() {
    let redis = RedisServer::start_tls(true).expect("start redis-server with TLS");
    let url = redis.tls_url().unwrap();
    let file = |name: &str| redis.tls_file(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let args = [
        "--redis",
        &url,
        "--redis-tls-ca",
        &ca,
        "--redis-tls-cert",
        &cert,
        "--redis-tls-key",
        &key,
    ];
    let a = Server::start(&temp_dir("tls-a"), &args).await;
    let b = Server::start(&temp_dir("tls-b"), &args).await;
    // b waits first; a schedules a task due in 300 ms.
    let waiting = tokio::spawn(post(
        format!("{}/v1/queues/t/reserve", b.url),
        json!({"max": 1, "wait_ms": 10_000}),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let scheduled = post(
        format!("{}/v1/queues/t/tasks", a.url),
        json!({"id": "over-tls", "delay_ms": 300, "payload": {"n": 1}}),
    )
    .await;
    assert_eq!(scheduled["id"], "over-tls", "{scheduled}");
    let reserved = waiting.await.unwrap();
    assert_eq!(reserved["tasks"][0]["id"], "over-tls", "{reserved}");

    let refused = |extra: &[&str]| {
        let output = std::process::Command::new(common::bin())
            .arg("serve")
            .args(["--http", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{extra:?} started");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let untrusted = refused(&["--redis", &url]);
    assert!(untrusted.contains("certificate"), "{untrusted}");
    let plain = refused(&["--redis", &redis.url(), "--redis-tls-ca", &ca]);
    assert!(plain.contains("rediss://"), "{plain}");
    let missing = refused(&["--redis", &url, "--redis-tls-ca", "/nonexistent/ca.pem"]);
    assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    let half = refused(&["--redis", &url, "--redis-tls-cert", &cert]);
    assert!(half.contains("redis-tls-key"), "{half}");
}
