//! Abuse of the real binary: half-sent requests, idle and surplus connections, bodies past the memory
//! budget, input that once panicked, webhooks to private addresses, and dead webhook hosts beside a
//! healthy one. Each checks that the server answers or closes cleanly and that normal clients keep
//! working. `probe_figures` (ignored) prints the figures of docs/operations.md instead of asserting.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::{Server, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `within` passes); answers what was read and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

async fn ok_request(server: &Server) -> reqwest::StatusCode {
    reqwest::Client::new()
        .get(format!("{}/v1/queues", server.url))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(reqwest::StatusCode::IM_A_TEAPOT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_idle_connections_are_closed_after_their_timeouts() {
    let dir = temp_dir("abuse-timeouts");
    let timeouts = [
        "--header-read-timeout-ms",
        "500",
        "--body-read-timeout-ms",
        "500",
        "--idle-timeout-ms",
        "800",
    ];
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server::start_logging(&dir, &timeouts, "info", log.into()).await;

    // A head that never ends.
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /v1/queues/q/tasks HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "a half-sent head was kept");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A slowloris: one byte of head at a time, each before the idle timeout.
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /v1/queues HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        closed = read_until_closed(&mut stream, Duration::from_secs(3))
            .await
            .1;
    }
    assert!(
        closed,
        "a slowloris head was kept for {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // A body that stops halfway: 408 with the JSON error, then the connection closes.
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/queues/q/tasks HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"id\":",
        )
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(closed, "the connection stayed open after a 408");

    // A connection that says nothing.
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        closed && started.elapsed() >= Duration::from_millis(700),
        "idle: {:?}",
        started.elapsed()
    );

    // The limits that were hit are in the log.
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("request head did not arrive in time"),
        "{logged}"
    );
    assert!(
        logged.contains("request bodies did not arrive in time"),
        "{logged}"
    );

    // A connection in steady use is never idle, however long it lives: pipelined pairs of requests
    // every 100 ms on one keep-alive connection, for 3 × the idle timeout, all get their answers.
    // (The second request of a pair is read from hyper's buffer, not the socket; the deadline once
    // missed that request cycle and closed the connection between two requests.)
    let mut stream = TcpStream::connect(&server.addr).await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_millis(2_400) {
        stream
            .write_all(
                b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen
            .windows(15)
            .filter(|w| *w == b"HTTP/1.1 200 OK")
            .count()
            < 2
        {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                .await
                .expect("no answer")
                .unwrap();
            assert!(
                n > 0,
                "closed after {answered} answers, {:?} into steady use",
                started.elapsed()
            );
            seen.extend_from_slice(&buf[..n]);
        }
        answered += 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 30, "{answered}");

    // Nothing was stored, and normal clients were never affected.
    assert_eq!(ok_request(&server).await, reqwest::StatusCode::OK);
    let tasks: serde_json::Value = reqwest::get(format!("{}/v1/queues/q", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tasks["total"], 0, "{tasks}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_clients_get_a_503_and_others_keep_working() {
    let dir = temp_dir("abuse-cap");
    let server = Server::start(&dir, &["--max-connections", "20"]).await;
    // Health checks by the harness have closed; take all 20 slots with idle connections.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&server.addr).await.unwrap();
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections") && answer.contains("--max-connections"));
    assert!(closed);
    // A client retrying after the idle ones leave gets through.
    drop(idle.drain(..10));
    let deadline = Instant::now() + Duration::from_secs(5);
    while ok_request(&server).await != reqwest::StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the server never took new clients again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_memory_budget_get_503() {
    let dir = temp_dir("abuse-memory");
    let server = Server::start(&dir, &["--max-body-memory-mb", "1"]).await;
    // One large body in progress holds most of the budget …
    let mut slow = TcpStream::connect(&server.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/queues/q/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 900000\r\n\r\n{\"tasks\":[",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // … so a second one is refused at once, without reading it.
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/queues/q/batch", server.url))
        .body(format!("{{\"tasks\":[{}]}}", vec!["{}"; 200_000].join(",")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers()["retry-after"], "1");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    // Small requests still fit.
    assert_eq!(ok_request(&server).await, reqwest::StatusCode::OK);
    drop(slow);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_once_panicked_is_a_clear_error_and_private_webhooks_are_refused() {
    let dir = temp_dir("abuse-input");
    let server = Server::start(&dir, &[]).await;
    let http = reqwest::Client::new();
    let post = |body: &'static str| {
        http.post(format!("{}/v1/queues/q/batch", server.url))
            .body(body)
            .send()
    };
    let answer = post(r#"{"tasks": [{"id": "ok"}, {"run_at": "2026-11-22T01:02:€Z"}]}"#)
        .await
        .unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], 201, "{body}");
    assert_eq!(body["results"][1]["status"], 422, "{body}");
    let answer =
        post(r#"{"tasks": [{"webhook": {"url": "http://169.254.169.254/latest/meta-data"}}]}"#)
            .await
            .unwrap();
    let body: serde_json::Value = answer.json().await.unwrap();
    let message = body["results"][0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("--webhook-allow-private"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A target that accepts connections and never answers (their sockets are kept open).
async fn dead_host() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (url, task)
}

/// A target that answers 200 and reports when each task arrived.
async fn healthy_host() -> (String, tokio::sync::mpsc::UnboundedReceiver<Instant>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

/// The delay of 100 deliveries to a healthy host while five dead hosts (30 s timeouts) have 100 due
/// tasks each: the time from scheduling to the last arrival.
async fn healthy_delay_beside_dead_hosts(server: &Server) -> Duration {
    let http = reqwest::Client::new();
    let mut dead = Vec::new();
    for _ in 0..5 {
        dead.push(dead_host().await);
    }
    for (h, (url, _)) in dead.iter().enumerate() {
        let tasks: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({"id": format!("d{h}-{i}"), "webhook": {"url": url, "timeout_ms": 30000}}))
            .collect();
        http.post(format!("{}/v1/queues/dead/batch", server.url))
            .json(&serde_json::json!({ "tasks": tasks }))
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (url, mut arrivals) = healthy_host().await;
    let tasks: Vec<serde_json::Value> = (0..100)
        .map(|i| serde_json::json!({"id": format!("ok{i}"), "webhook": {"url": url}}))
        .collect();
    let started = Instant::now();
    http.post(format!("{}/v1/queues/healthy/batch", server.url))
        .json(&serde_json::json!({ "tasks": tasks }))
        .send()
        .await
        .unwrap();
    let mut last = started;
    for _ in 0..100 {
        last = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .expect("a healthy delivery never came")
            .unwrap();
    }
    last - started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_webhook_hosts_do_not_delay_a_healthy_one() {
    let dir = temp_dir("abuse-dead");
    let server = Server::start(&dir, &["--webhook-allow-private"]).await;
    let delay = healthy_delay_beside_dead_hosts(&server).await;
    eprintln!("100 deliveries to a healthy host beside 5 dead hosts: {delay:?}");
    assert!(
        delay < Duration::from_secs(5),
        "the healthy host waited {delay:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The figures of docs/operations.md: healthy webhook delay beside five dead hosts, open files and
/// request latency under 2 500 slowloris connections, RSS under a flood of large uploads. Prints them;
/// run with `cargo test --release -p punctual --test abuse probe_figures -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn probe_figures() {
    let dir = temp_dir("abuse-probe");
    let server = Server::start(&dir, &["--webhook-allow-private"]).await;
    let pid = server.child.id();
    println!(
        "healthy webhook host beside 5 dead ones: 100 deliveries in {:?}",
        healthy_delay_beside_dead_hosts(&server).await
    );

    // 2 500 slowloris connections, each trickling a header byte every second.
    let mut slow = Vec::new();
    for _ in 0..2_500 {
        if let Ok(mut s) = TcpStream::connect(&server.addr).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
            slow.push(s);
        }
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..15 {
            for s in &mut slow {
                let _ = s.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        slow.len()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_during = open_fds(pid);
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        assert_eq!(ok_request(&server).await, reqwest::StatusCode::OK);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "2 500 slowloris connections: server fds {fds_during}, normal GET p50 {:?} p99 {:?}",
        latencies[100], latencies[198]
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    println!(
        "after the 10 s header timeout: server fds {}",
        open_fds(pid)
    );
    let _ = trickle.await;

    // 16 concurrent 60 MiB batch bodies.
    let before = rss_kib(pid);
    let body = format!(
        "{{\"tasks\":[{{\"payload\":\"{}\"}}]}}",
        "a".repeat(60 << 20)
    );
    let mut uploads = Vec::new();
    for _ in 0..16 {
        let body = body.clone();
        let url = format!("{}/v1/queues/flood/batch", server.url);
        uploads.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut peak = before;
    let mut statuses = Vec::new();
    for upload in uploads {
        while !upload.is_finished() {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses.push(upload.await.unwrap().unwrap_or(0));
    }
    println!(
        "16 × 60 MiB uploads: RSS {} MiB before, peak {} MiB; answers {statuses:?}",
        before >> 10,
        peak >> 10
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server raises its soft limit on open files to the hard limit at start, so the connection cap,
/// not the default soft limit of 1 024, decides how many clients fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = temp_dir("abuse-nofile");
    let addr = format!("127.0.0.1:{}", common::free_port());
    // Start from a low soft limit, as a default login shell has.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 512 && exec {} serve --data-dir {} --http {addr}",
            common::bin(),
            dir.display()
        ))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let limits_path = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let (soft, hard) = loop {
        let ready = reqwest::get(format!("http://{addr}/healthz")).await.is_ok();
        if ready {
            let limits = std::fs::read_to_string(&limits_path).unwrap();
            let line = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .unwrap()
                .to_owned();
            let fields: Vec<&str> = line.split_whitespace().collect();
            break (fields[3].to_owned(), fields[4].to_owned());
        }
        assert!(Instant::now() < deadline, "the server never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, hard, "soft {soft} was not raised to hard {hard}");
    assert_ne!(soft, "512");
    let _ = std::fs::remove_dir_all(&dir);
}
