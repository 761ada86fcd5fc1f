//! `punctual bench`: measures a real `punctual serve` child process over loopback HTTP.
//!
//! Each scenario starts its own server on a fresh data directory and a free port, drives it, prints
//! its figures and stops it. Numbers are printed, never asserted: this is a measuring tool, not a test.
// The benchmark measures wall time itself; the Clock rule is for server logic.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::duration::parse_duration_ms;

#[derive(clap::Args)]
pub struct BenchOpts {
    /// Which scenario: ingest, burst, drain, memory, restart, webhook; zset, keyspace or beanstalkd (the Redis
    /// sorted-set, Redis keyspace-notification and beanstalkd approaches on the same loads, for
    /// comparison); or all (ingest, burst, restart, webhook).
    #[arg(default_value = "all")]
    scenario: String,
    /// Tasks for ingest and memory; tasks pending in burst and restart.
    #[arg(long, default_value_t = 1_000_000)]
    tasks: u64,
    /// Tasks falling due in the burst.
    #[arg(long, default_value_t = 100_000)]
    burst: u64,
    /// Over how long the burst falls due.
    #[arg(long, default_value = "10s")]
    burst_over: String,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent connections for ingest.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Pull consumers in the burst.
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// Most tasks one reserve takes.
    #[arg(long, default_value_t = 100)]
    reserve_max: usize,
    /// Where to keep the data directories (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Extra arguments for `punctual serve`, e.g. "--cache-mb 32".
    #[arg(long, default_value = "")]
    serve_args: String,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A `punctual serve` child process.
struct Server {
    child: Child,
    url: String,
    addr: String,
    dir: PathBuf,
    extra: Vec<String>,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl Server {
    fn start(dir: &Path, extra: &[String]) -> Result<Server> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = spawn_serve(dir, &addr, extra)?;
        Ok(Server {
            child,
            url: format!("http://{addr}"),
            addr,
            dir: dir.to_owned(),
            extra: extra.to_vec(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) -> Result<()> {
        self.child = spawn_serve(&self.dir, &self.addr, &self.extra)?;
        Ok(())
    }

    fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn data_bytes(&self) -> u64 {
        std::fs::metadata(self.dir.join("punctual.redb")).map_or(0, |m| m.len())
    }

    fn stop(mut self) {
        // SIGTERM for a clean stop.
        let _ = Command::new("kill").arg(self.pid().to_string()).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_serve(dir: &Path, addr: &str, extra: &[String]) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))?;
    Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .arg("--http")
        .arg(addr)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting punctual serve")
}

async fn wait_healthy(http: &reqwest::Client, url: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("server at {url} did not become healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn work_dir(opts: &BenchOpts, tag: &str) -> Result<PathBuf> {
    let base = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("punctual-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Pre-built batch bodies: tasks `first..first+count`, due at `due(i)`.
fn bodies(first: u64, count: u64, batch: usize, due: impl Fn(u64) -> String) -> Vec<Vec<u8>> {
    bodies_with(first, count, batch, |n| {
        format!("{{\"id\":\"t{n}\",\"payload\":{{\"n\":{n}}},{}}}", due(n))
    })
}

/// Pre-built batch bodies of the task objects `item(i)` for `first..first+count`.
fn bodies_with(first: u64, count: u64, batch: usize, item: impl Fn(u64) -> String) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = first;
    while i < first + count {
        let end = (i + batch as u64).min(first + count);
        let items: Vec<String> = (i..end).map(&item).collect();
        out.push(format!("{{\"tasks\":[{}]}}", items.join(",")).into_bytes());
        i = end;
    }
    out
}

/// Sends every work item through one of `connections`, each used by its own worker that takes the
/// next item when it is done with the last; returns the seconds it took. `send` gets the connection
/// by value and hands it back, which keeps the workers' futures `Send` and `'static`.
async fn fan_out<W, C, F, Fut>(work: Vec<W>, connections: Vec<C>, send: F) -> Result<f64>
where
    W: Send + 'static,
    C: Send + 'static,
    F: Fn(C, W) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<C>> + Send,
{
    let queue = Arc::new(Mutex::new(work));
    let started = Instant::now();
    let mut workers = Vec::new();
    for connection in connections {
        let (queue, send) = (queue.clone(), send.clone());
        workers.push(tokio::spawn(async move {
            let mut connection = connection;
            loop {
                let Some(item) = queue.lock().await.pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                connection = send(connection, item).await?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Sends the bodies over `connections` concurrent connections; returns (tasks accepted, seconds).
async fn ingest(
    http: &reqwest::Client,
    url: &str,
    bodies: Vec<Vec<u8>>,
    connections: usize,
) -> Result<(u64, f64)> {
    let accepted = Arc::new(AtomicU64::new(0));
    let (http, batch_url, counter) = (
        http.clone(),
        format!("{url}/v1/queues/bench/batch"),
        accepted.clone(),
    );
    let secs = fan_out(
        bodies,
        vec![(); connections.max(1)],
        move |(), body: Vec<u8>| {
            let (http, batch_url, counter) = (http.clone(), batch_url.clone(), counter.clone());
            async move {
                let response = http
                    .post(batch_url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("batch answered {}", response.status());
                }
                let answer: Value = response.json().await?;
                let ok = answer["results"].as_array().map_or(0, |r| {
                    r.iter()
                        .filter(|x| x["status"] == 201 || x["status"] == 200)
                        .count()
                });
                counter.fetch_add(ok as u64, Ordering::Relaxed);
                Ok(())
            }
        },
    )
    .await?;
    Ok((accepted.load(Ordering::Relaxed), secs))
}

/// A histogram of lateness in microseconds, up to 10 minutes.
fn lateness_histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?)
}

/// "p50 …, p99 …, p99.9 …, max …" of a histogram of microseconds, in milliseconds.
fn quantiles(h: &Histogram<u64>) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

const THIRTY_DAYS_MS: u64 = 30 * 86_400_000;

fn spread_over_30_days(n: u64) -> String {
    // A deterministic spread: task n is due somewhere in the next 30 days (but at least an hour away).
    let offset = 3_600_000 + (n.wrapping_mul(2_654_435_761) % THIRTY_DAYS_MS);
    format!("\"delay_ms\":{offset}")
}

/// Commit statistics from the server's /metrics: (commits, mean commands per commit, mean commit ms).
async fn commit_stats(http: &reqwest::Client, url: &str) -> Option<(f64, f64, f64)> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let commits = value("punctual_store_commit_commands_count")?;
    let commands = value("punctual_store_commit_commands_sum")?;
    let seconds = value("punctual_store_commit_duration_seconds_sum")?;
    Some((
        commits,
        commands / commits.max(1.0),
        seconds * 1000.0 / commits.max(1.0),
    ))
}

/// The server's own view of delivery lateness (reserve commit time − run_at), from its histogram:
/// the share of deliveries within each bucket bound.
async fn server_lateness(http: &reqwest::Client, url: &str) -> Option<String> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = "punctual_delivery_lateness_seconds_bucket{queue=\"bench\",le=\"";
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_owned(), count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.iter().find(|(le, _)| le == "+Inf")?.1;
    let shares: Vec<String> = buckets
        .iter()
        .filter(|(le, _)| ["0.001", "0.002", "0.005", "0.01", "0.02"].contains(&le.as_str()))
        .map(|(le, n)| {
            format!(
                "≤{} ms {:.2}%",
                le.parse::<f64>().unwrap_or(0.0) * 1000.0,
                n * 100.0 / total.max(1.0)
            )
        })
        .collect();
    Some(shares.join(", "))
}

async fn scenario_ingest(opts: &BenchOpts, http: &reqwest::Client, extra: &[String]) -> Result<()> {
    let dir = work_dir(opts, "ingest")?;
    let server = Server::start(&dir, extra)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let bodies = bodies(0, opts.tasks, opts.batch, spread_over_30_days);
    let (accepted, secs) = ingest(http, &server.url, bodies, opts.connections).await?;
    println!(
        "ingest: {accepted} tasks due over 30 days, batches of {}, {} connections: {:.1} s, {:.0} tasks/s durable (fsync per group commit)",
        opts.batch,
        opts.connections,
        secs,
        accepted as f64 / secs
    );
    if let Some((commits, per_commit, commit_ms)) = commit_stats(http, &server.url).await {
        println!(
            "ingest: {commits:.0} commits, {per_commit:.0} commands per commit, {commit_ms:.2} ms per commit (apply + fsync)"
        );
    }
    println!(
        "ingest: server RSS {:.1} MiB, data file {:.1} MiB",
        server.rss_bytes() as f64 / 1048576.0,
        server.data_bytes() as f64 / 1048576.0
    );
    server.stop();
    Ok(())
}

async fn scenario_memory(opts: &BenchOpts, http: &reqwest::Client, extra: &[String]) -> Result<()> {
    let dir = work_dir(opts, "memory")?;
    let server = Server::start(&dir, extra)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let step = 1_000_000u64.min(opts.tasks);
    let mut done = 0u64;
    let started = Instant::now();
    while done < opts.tasks {
        let count = step.min(opts.tasks - done);
        let bodies = bodies(done, count, opts.batch, spread_over_30_days);
        ingest(http, &server.url, bodies, opts.connections).await?;
        done += count;
        println!(
            "memory: {done} pending, RSS {:.1} MiB, data file {:.1} MiB, {:.0} s",
            server.rss_bytes() as f64 / 1048576.0,
            server.data_bytes() as f64 / 1048576.0,
            started.elapsed().as_secs_f64()
        );
    }
    server.stop();
    Ok(())
}

/// Pull consumers: reserve, record lateness at receipt, ack in the background.
struct Consumed {
    lateness_us: Histogram<u64>,
    received: u64,
    duplicates: u64,
}

async fn consume(
    http: &reqwest::Client,
    url: &str,
    consumers: usize,
    reserve_max: usize,
    expect: u64,
    give_up_after: Duration,
) -> Result<Consumed> {
    let seen = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let received = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(lateness_histogram()?));
    let deadline = Instant::now() + give_up_after;
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let (http, url) = (http.clone(), url.to_owned());
        let (seen, received, duplicates, hist) = (
            seen.clone(),
            received.clone(),
            duplicates.clone(),
            hist.clone(),
        );
        workers.push(tokio::spawn(async move {
            // Every reserved batch is acked with one request (POST /v1/queues/{queue}/ack).
            let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Value>>();
            let acker = {
                let (http, url) = (http.clone(), url.clone());
                tokio::spawn(async move {
                    let limit = Arc::new(tokio::sync::Semaphore::new(8));
                    while let Some(acks) = ack_rx.recv().await {
                        let permit = limit.clone().acquire_owned().await;
                        let (http, url) = (http.clone(), url.clone());
                        tokio::spawn(async move {
                            let _ = http
                                .post(format!("{url}/v1/queues/bench/ack"))
                                .json(&json!({ "tasks": acks }))
                                .send()
                                .await;
                            drop(permit);
                        });
                    }
                })
            };
            while received.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
                let response = http
                    .post(format!("{url}/v1/queues/bench/reserve"))
                    .json(&json!({"max": reserve_max, "wait_ms": 1000, "lease_ms": 60_000}))
                    .send()
                    .await;
                let Ok(response) = response else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let at_us = now_us();
                let Ok(body) = response.json::<Value>().await else {
                    continue;
                };
                let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
                let mut lateness = Vec::with_capacity(tasks.len());
                let mut acks = Vec::with_capacity(tasks.len());
                for task in &tasks {
                    let run_at_us = task["run_at_ms"].as_u64().unwrap_or(0) * 1000;
                    lateness.push(at_us.saturating_sub(run_at_us).max(1));
                    let id = task["id"].as_str().unwrap_or("").to_owned();
                    if !seen.lock().await.insert(id.clone()) {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    acks.push(json!({"id": id, "lease_token": task["lease_token"]}));
                }
                if !acks.is_empty() {
                    let _ = ack_tx.send(acks);
                }
                received.fetch_add(tasks.len() as u64, Ordering::Relaxed);
                let mut h = hist.lock().await;
                for l in lateness {
                    let _ = h.record(l);
                }
            }
            drop(ack_tx);
            let _ = acker.await;
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let lateness_us = hist.lock().await.clone();
    Ok(Consumed {
        lateness_us,
        received: received.load(Ordering::Relaxed),
        duplicates: duplicates.load(Ordering::Relaxed),
    })
}

async fn scenario_burst(opts: &BenchOpts, http: &reqwest::Client, extra: &[String]) -> Result<()> {
    let dir = work_dir(opts, "burst")?;
    let server = Server::start(&dir, extra)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let over_ms = parse_duration_ms(&opts.burst_over).map_err(anyhow::Error::msg)?;
    let pending = bodies(0, opts.tasks, opts.batch, spread_over_30_days);
    let (accepted, secs) = ingest(http, &server.url, pending, opts.connections).await?;
    println!("burst: {accepted} tasks pending over 30 days (ingested in {secs:.1} s)");
    // The burst is due from 3 s after it is scheduled, spread evenly over `over_ms`.
    let lead_ms = 3_000 + opts.burst / 50;
    let start_ms = now_us() / 1000 + lead_ms;
    let burst_bodies = bodies(opts.tasks, opts.burst, opts.batch, |n| {
        let at = start_ms + (n - opts.tasks) * over_ms / opts.burst.max(1);
        format!(
            "\"run_at\":\"{}\"",
            punctual_core::time::format_rfc3339_ms(at)
        )
    });
    let (burst_accepted, burst_secs) =
        ingest(http, &server.url, burst_bodies, opts.connections).await?;
    let slack_ms = (start_ms * 1000).saturating_sub(now_us()) / 1000;
    println!(
        "burst: {burst_accepted} tasks due over {over_ms} ms scheduled in {burst_secs:.1} s; first due in {slack_ms} ms"
    );
    if burst_accepted < opts.burst || now_us() / 1000 >= start_ms {
        println!("burst: WARNING the burst was not fully scheduled before its first due time");
    }
    let consumed = consume(
        http,
        &server.url,
        opts.consumers,
        opts.reserve_max,
        opts.burst,
        Duration::from_millis(lead_ms + over_ms + 60_000),
    )
    .await?;
    let h = &consumed.lateness_us;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "burst: {} consumers, reserve max {}: received {} of {}, missed (not within 60 s) {}, duplicates {}",
        opts.consumers,
        opts.reserve_max,
        consumed.received,
        opts.burst,
        opts.burst.saturating_sub(consumed.received),
        consumed.duplicates
    );
    println!(
        "burst: lateness run_at -> consumer has it: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
    if let Some(shares) = server_lateness(http, &server.url).await {
        println!("burst: server-side lateness (lease commit - run_at): {shares}");
    }
    if let Some((commits, per_commit, commit_ms)) = commit_stats(http, &server.url).await {
        println!(
            "burst: server did {commits:.0} commits, {per_commit:.1} commands per commit, {commit_ms:.2} ms per commit"
        );
    }
    println!(
        "burst: server RSS {:.1} MiB",
        server.rss_bytes() as f64 / 1048576.0
    );
    server.stop();
    Ok(())
}

async fn scenario_restart(
    opts: &BenchOpts,
    http: &reqwest::Client,
    extra: &[String],
) -> Result<()> {
    let dir = work_dir(opts, "restart")?;
    let mut server = Server::start(&dir, extra)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let pending = bodies(0, opts.tasks, opts.batch, spread_over_30_days);
    ingest(http, &server.url, pending, opts.connections).await?;
    // A few tasks already due (and not yet delivered) when the server dies.
    let soon = bodies(opts.tasks, 10, 10, |_| "\"delay_ms\":0".to_owned());
    ingest(http, &server.url, soon, 1).await?;
    server.kill9();
    let started = Instant::now();
    server.restart()?;
    let healthy = wait_healthy(http, &server.url, Duration::from_secs(120)).await?;
    let first = loop {
        let response = http
            .post(format!("{}/v1/queues/bench/reserve", server.url))
            .json(&json!({"max": 1, "wait_ms": 1000}))
            .send()
            .await?;
        let body: Value = response.json().await?;
        if body["tasks"].as_array().is_some_and(|t| !t.is_empty()) {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("no delivery within 120 s of restart");
        }
    };
    println!(
        "restart: kill -9 with {} pending; answering after {:.0} ms, first delivery after {:.0} ms",
        opts.tasks,
        healthy.as_secs_f64() * 1000.0,
        first.as_secs_f64() * 1000.0
    );
    server.stop();
    Ok(())
}

pub async fn run(opts: BenchOpts) -> Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let extra: Vec<String> = opts
        .serve_args
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    println!(
        "punctual bench {} on {} cores (server and load generator share the machine)",
        env!("CARGO_PKG_VERSION"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    match opts.scenario.as_str() {
        "ingest" => scenario_ingest(&opts, &http, &extra).await,
        "burst" => scenario_burst(&opts, &http, &extra).await,
        "memory" => scenario_memory(&opts, &http, &extra).await,
        "restart" => scenario_restart(&opts, &http, &extra).await,
        "webhook" => scenario_webhook(&opts, &http, &extra).await,
        "zset" => scenario_zset(&opts).await,
        "drain" => scenario_drain(&opts, &http, &extra).await,
        "keyspace" => scenario_keyspace(&opts).await,
        "beanstalkd" => scenario_beanstalkd(&opts).await,
        "all" => {
            scenario_ingest(&opts, &http, &extra).await?;
            scenario_burst(&opts, &http, &extra).await?;
            scenario_restart(&opts, &http, &extra).await?;
            scenario_webhook(&opts, &http, &extra).await
        }
        other => {
            bail!("unknown scenario {other:?}: use ingest, burst, memory, restart, webhook or all")
        }
    }
}

/// A fast local webhook target: answers 204 at once and records, per request, the lateness from the
/// `run_at_ms` carried in the payload to its arrival (µs).
async fn webhook_target() -> Result<(String, Arc<std::sync::Mutex<Vec<u64>>>)> {
    let arrivals: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let recorded = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let at_us = now_us();
                let run_at_ms = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["run_at_ms"].as_u64())
                    .unwrap_or(0);
                recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(at_us.saturating_sub(run_at_ms * 1000).max(1));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, arrivals))
}

/// Webhook throughput (tasks all due at once, 64 deliveries in flight) and lateness
/// (`--burst` tasks due over `--burst-over`).
async fn scenario_webhook(
    opts: &BenchOpts,
    http: &reqwest::Client,
    extra: &[String],
) -> Result<()> {
    let dir = work_dir(opts, "webhook")?;
    let mut args = extra.to_vec();
    args.extend([
        "--webhook-concurrency".to_owned(),
        "64".to_owned(),
        "--webhook-per-host".to_owned(),
        "64".to_owned(),
    ]);
    let server = Server::start(&dir, &args)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let (url, arrivals) = webhook_target().await?;
    let count =
        |arrivals: &Arc<std::sync::Mutex<Vec<u64>>>| arrivals.lock().map_or(0, |a| a.len()) as u64;

    // Throughput: everything due at once.
    let drain = opts.burst;
    let due_now = bodies_with(0, drain, opts.batch, |n| {
        format!(
            "{{\"id\":\"w{n}\",\"webhook\":{{\"url\":\"{url}\"}},\"payload\":{{\"run_at_ms\":0}}}}"
        )
    });
    let started = Instant::now();
    ingest(http, &server.url, due_now, opts.connections).await?;
    while count(&arrivals) < drain && started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "webhook: {} of {drain} tasks due at once delivered to a local target in {secs:.1} s (scheduling included): {:.0} deliveries/s, 64 in flight",
        count(&arrivals),
        count(&arrivals) as f64 / secs
    );

    // Lateness: a burst due over `burst_over`.
    arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();
    let over_ms = parse_duration_ms(&opts.burst_over).map_err(anyhow::Error::msg)?;
    let lead_ms = 3_000 + opts.burst / 50;
    let start_ms = now_us() / 1000 + lead_ms;
    let burst = bodies_with(drain, opts.burst, opts.batch, |n| {
        let at = start_ms + (n - drain) * over_ms / opts.burst.max(1);
        format!(
            "{{\"id\":\"w{n}\",\"run_at\":\"{}\",\"webhook\":{{\"url\":\"{url}\"}},\"payload\":{{\"run_at_ms\":{at}}}}}",
            punctual_core::time::format_rfc3339_ms(at)
        )
    });
    ingest(http, &server.url, burst, opts.connections).await?;
    let deadline = Instant::now() + Duration::from_millis(lead_ms + over_ms + 60_000);
    while count(&arrivals) < opts.burst && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut hist = lateness_histogram()?;
    for lateness in arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
    {
        hist.record(*lateness)?;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "webhook: {} of {} tasks due over {over_ms} ms arrived; lateness due time -> request received: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        hist.len(),
        opts.burst,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    server.stop();
    Ok(())
}

/// A `redis-server` child on a free loopback port, with nothing on disk (as the seeds run it).
struct RedisChild {
    child: Child,
    url: String,
}

impl RedisChild {
    async fn start() -> Result<RedisChild> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (install it: apt-get install -y redis-server)")?;
        let url = format!("redis://127.0.0.1:{port}/");
        let redis = RedisChild { child, url };
        let started = Instant::now();
        loop {
            if let Ok(client) = redis::Client::open(redis.url.as_str())
                && let Ok(mut con) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut con)
                    .await
                    .is_ok()
            {
                return Ok(redis);
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `count` connections to the Redis child.
async fn redis_connections(
    redis: &RedisChild,
    count: usize,
) -> Result<Vec<redis::aio::MultiplexedConnection>> {
    let mut connections = Vec::new();
    for _ in 0..count.max(1) {
        connections.push(redis.connection().await?);
    }
    Ok(connections)
}

/// Runs one pipeline per chunk of 100 items over `connections` connections; `add` appends an item's
/// commands to the pipeline. Returns the seconds it took.
async fn redis_pipelined<T: Clone + Send + Sync + 'static>(
    redis: &RedisChild,
    items: Vec<T>,
    connections: usize,
    add: fn(&mut redis::Pipeline, &T),
) -> Result<f64> {
    let chunks: Vec<Vec<T>> = items.chunks(100).map(<[_]>::to_vec).collect();
    let connections = redis_connections(redis, connections).await?;
    fan_out(
        chunks,
        connections,
        move |mut con, chunk: Vec<T>| async move {
            let mut pipe = redis::pipe();
            for item in &chunk {
                add(&mut pipe, item);
            }
            pipe.query_async::<()>(&mut con).await?;
            Ok(con)
        },
    )
    .await
}

/// The sorted-set approach: `ZADD due id` + a hash of payloads, pipelined 100 tasks per round trip.
async fn zset_ingest(
    redis: &RedisChild,
    tasks: Vec<(String, u64, String)>,
    connections: usize,
) -> Result<f64> {
    redis_pipelined(redis, tasks, connections, |pipe, (id, due, payload)| {
        pipe.cmd("ZADD").arg("zq").arg(*due).arg(id).ignore();
        pipe.cmd("HSET")
            .arg("zq:payloads")
            .arg(id)
            .arg(payload)
            .ignore();
    })
    .await
}

/// Claims due ids atomically (range + remove + payloads), as people write it.
const ZSET_CLAIM: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #ids == 0 then return {} end
redis.call('ZREM', KEYS[1], unpack(ids))
local payloads = redis.call('HMGET', KEYS[2], unpack(ids))
redis.call('HDEL', KEYS[2], unpack(ids))
return payloads
"#;

async fn scenario_zset(opts: &BenchOpts) -> Result<()> {
    let redis = RedisChild::start().await?;
    let spread = |n: u64| 3_600_000 + (n.wrapping_mul(2_654_435_761) % THIRTY_DAYS_MS);
    let now_ms = now_us() / 1000;
    let pending: Vec<(String, u64, String)> = (0..opts.tasks)
        .map(|n| {
            (
                format!("t{n}"),
                now_ms + spread(n),
                format!("{{\"n\":{n}}}"),
            )
        })
        .collect();
    let secs = zset_ingest(&redis, pending, opts.connections).await?;
    println!(
        "zset: ingest {} tasks due over 30 days, 100 per round trip, {} connections: {:.1} s, {:.0} tasks/s (no fsync: Redis with persistence off)",
        opts.tasks,
        opts.connections,
        secs,
        opts.tasks as f64 / secs
    );
    let mut con = redis.connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut con)
        .await?;
    if let Some(used) = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        println!(
            "zset: used_memory {:.1} MiB with {} pending: {:.0} bytes per task",
            used as f64 / 1048576.0,
            opts.tasks,
            used as f64 / opts.tasks.max(1) as f64
        );
    }

    let over_ms = parse_duration_ms(&opts.burst_over).map_err(anyhow::Error::msg)?;
    let start_ms = now_us() / 1000 + 3_000;
    let burst: Vec<(String, u64, String)> = (0..opts.burst)
        .map(|n| {
            let at = start_ms + n * over_ms / opts.burst.max(1);
            (format!("b{n}"), at, format!("{{\"run_at_ms\":{at}}}"))
        })
        .collect();
    zset_ingest(&redis, burst, opts.connections).await?;
    let deadline = Instant::now() + Duration::from_millis(3_000 + over_ms + 60_000);
    let (received, hist) = zset_consume(&redis, opts, opts.burst, deadline).await?;
    println!(
        "zset: burst of {} due over {over_ms} ms, {} consumers polling every 10 ms: received {}, lateness {}",
        opts.burst,
        opts.consumers,
        received,
        quantiles(&hist)
    );
    Ok(())
}

/// Sorted-set consumers: claim up to `--reserve-max` due ids at a time, sleep 10 ms when idle (the
/// approach's precision), until `expect` payloads arrived or `deadline`. Payloads that carry a
/// `run_at_ms` have their lateness recorded.
async fn zset_consume(
    redis: &RedisChild,
    opts: &BenchOpts,
    expect: u64,
    deadline: Instant,
) -> Result<(u64, Histogram<u64>)> {
    let hist = Arc::new(Mutex::new(lateness_histogram()?));
    let received = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for mut con in redis_connections(redis, opts.consumers).await? {
        let (hist, received, max) = (hist.clone(), received.clone(), opts.reserve_max);
        consumers.push(tokio::spawn(async move {
            let script = redis::Script::new(ZSET_CLAIM);
            while received.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
                let payloads: Vec<Option<String>> = script
                    .key("zq")
                    .key("zq:payloads")
                    .arg(now_us() / 1000)
                    .arg(max)
                    .invoke_async(&mut con)
                    .await
                    .unwrap_or_default();
                if payloads.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let at_us = now_us();
                let mut h = hist.lock().await;
                for payload in payloads.iter().flatten() {
                    let run_at_ms = serde_json::from_str::<Value>(payload)
                        .ok()
                        .and_then(|v| v["run_at_ms"].as_u64());
                    if let Some(run_at_ms) = run_at_ms {
                        let _ = h.record(at_us.saturating_sub(run_at_ms * 1000).max(1));
                    }
                }
                received.fetch_add(payloads.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for consumer in consumers {
        consumer.await?;
    }
    let hist = hist.lock().await.clone();
    Ok((received.load(Ordering::Relaxed), hist))
}

/// The keyspace-notification approach, as the seeds do it: `SET key x PX delay` with the data packed
/// into the key name, and a subscriber on `__keyevent@0__:expired`.
async fn scenario_keyspace(opts: &BenchOpts) -> Result<()> {
    use futures_util::StreamExt;

    let redis = RedisChild::start().await?;
    let mut con = redis.connection().await?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Ex")
        .query_async::<()>(&mut con)
        .await?;
    let spread = |n: u64| 3_600_000 + (n.wrapping_mul(2_654_435_761) % THIRTY_DAYS_MS);
    let set_all = |keys: Vec<(String, u64)>| {
        redis_pipelined(&redis, keys, opts.connections, |pipe, (key, px)| {
            pipe.cmd("SET")
                .arg(key)
                .arg("x")
                .arg("PX")
                .arg(*px)
                .ignore();
        })
    };
    let pending: Vec<(String, u64)> = (0..opts.tasks)
        .map(|n| (format!("order:{n}:0"), spread(n)))
        .collect();
    let secs = set_all(pending).await?;
    println!(
        "keyspace: ingest {} keys with TTLs over 30 days, 100 per round trip, {} connections: {:.0} tasks/s (no fsync)",
        opts.tasks,
        opts.connections,
        opts.tasks as f64 / secs
    );

    let client = redis::Client::open(redis.url.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe("__keyevent@0__:expired").await?;
    let over_ms = parse_duration_ms(&opts.burst_over).map_err(anyhow::Error::msg)?;
    let start_ms = now_us() / 1000 + 3_000;
    let burst: Vec<(String, u64)> = (0..opts.burst)
        .map(|n| {
            let at = start_ms + n * over_ms / opts.burst.max(1);
            (
                format!("burst:{n}:{at}"),
                at.saturating_sub(now_us() / 1000).max(1),
            )
        })
        .collect();
    set_all(burst).await?;
    let mut hist = lateness_histogram()?;
    let mut messages = pubsub.on_message();
    let give_up = tokio::time::Instant::from_std(
        Instant::now() + Duration::from_millis(3_000 + over_ms + 60_000),
    );
    let mut received = 0u64;
    while received < opts.burst {
        let message = tokio::select! {
            m = messages.next() => m,
            _ = tokio::time::sleep_until(give_up) => None,
        };
        let Some(message) = message else { break };
        let at_us = now_us();
        let key: String = message.get_payload().unwrap_or_default();
        // Only the burst's keys carry their due time; the pending ones are far in the future.
        if let Some(run_at_ms) = key
            .strip_prefix("burst:")
            .and_then(|k| k.rsplit(':').next())
            .and_then(|t| t.parse::<u64>().ok())
        {
            let _ = hist.record(at_us.saturating_sub(run_at_ms * 1000).max(1));
            received += 1;
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "keyspace: burst of {} due over {over_ms} ms with {} pending, one subscriber: {} fired within 60 s of the last due time ({:.1} %), lateness of those p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        opts.burst,
        opts.tasks,
        received,
        received as f64 * 100.0 / opts.burst.max(1) as f64,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max())
    );
    Ok(())
}

/// A minimal beanstalkd client: just `put`, `reserve-with-timeout` and `delete`.
struct Beanstalk {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Beanstalk {
    async fn connect(addr: &str) -> Result<Beanstalk> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Beanstalk {
            reader: tokio::io::BufReader::new(read),
            writer,
        })
    }

    async fn line(&mut self) -> Result<String> {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            bail!("beanstalkd closed the connection");
        }
        Ok(line.trim_end().to_owned())
    }

    /// Puts every job in one write, then reads every answer (pipelining, as for the others).
    async fn put_many(&mut self, jobs: &[(u64, String)]) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut out = String::new();
        for (delay_s, body) in jobs {
            out.push_str(&format!(
                "put 1024 {delay_s} 60 {}\r\n{body}\r\n",
                body.len()
            ));
        }
        self.writer.write_all(out.as_bytes()).await?;
        for _ in jobs {
            let answer = self.line().await?;
            if !answer.starts_with("INSERTED") {
                bail!("beanstalkd answered {answer:?} to put");
            }
        }
        Ok(())
    }

    async fn reserve(&mut self) -> Result<Option<(String, String)>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.writer.write_all(b"reserve-with-timeout 1\r\n").await?;
        let answer = self.line().await?;
        let mut parts = answer.split_whitespace();
        match parts.next() {
            Some("RESERVED") => {
                let id = parts.next().unwrap_or("").to_owned();
                let len: usize = parts.next().unwrap_or("0").parse()?;
                let mut body = vec![0u8; len + 2];
                self.reader.read_exact(&mut body).await?;
                body.truncate(len);
                Ok(Some((id, String::from_utf8_lossy(&body).into_owned())))
            }
            Some("TIMED_OUT") | Some("DEADLINE_SOON") => Ok(None),
            _ => bail!("beanstalkd answered {answer:?} to reserve"),
        }
    }

    async fn delete(&mut self, id: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.writer
            .write_all(format!("delete {id}\r\n").as_bytes())
            .await?;
        let answer = self.line().await?;
        if answer != "DELETED" {
            bail!("beanstalkd answered {answer:?} to delete");
        }
        Ok(())
    }
}

async fn beanstalk_put_all(
    addr: &str,
    jobs: Vec<(u64, String)>,
    connections: usize,
) -> Result<f64> {
    let chunks: Vec<Vec<(u64, String)>> = jobs.chunks(100).map(<[_]>::to_vec).collect();
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        clients.push(Beanstalk::connect(addr).await?);
    }
    fan_out(
        chunks,
        clients,
        |mut client, chunk: Vec<(u64, String)>| async move {
            client.put_many(&chunk).await?;
            Ok(client)
        },
    )
    .await
}

/// beanstalkd with its binlog on (`-b`, default fsync policy: none), `put` with a delay in whole
/// seconds, `reserve` + `delete`.
async fn scenario_beanstalkd(opts: &BenchOpts) -> Result<()> {
    let dir = work_dir(opts, "beanstalkd")?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new("beanstalkd")
        .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-b"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting beanstalkd (install it: apt-get install -y beanstalkd)")?;
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("beanstalkd did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = async {
        let spread_s = |n: u64| (3_600_000 + (n.wrapping_mul(2_654_435_761) % THIRTY_DAYS_MS)) / 1000;
        let pending: Vec<(u64, String)> = (0..opts.tasks).map(|n| (spread_s(n), format!("{{\"n\":{n}}}"))).collect();
        let secs = beanstalk_put_all(&addr, pending, opts.connections).await?;
        println!(
            "beanstalkd: ingest {} jobs delayed over 30 days, 100 per round trip, {} connections: {:.0} tasks/s (binlog without fsync)",
            opts.tasks,
            opts.connections,
            opts.tasks as f64 / secs
        );
        let over_ms = parse_duration_ms(&opts.burst_over).map_err(anyhow::Error::msg)?;
        let start_ms = now_us() / 1000 + 3_000;
        let burst: Vec<(u64, String)> = (0..opts.burst)
            .map(|n| {
                let at = start_ms + n * over_ms / opts.burst.max(1);
                // Delays are whole seconds: round up so no job comes early.
                let delay_s = at.saturating_sub(now_us() / 1000).div_ceil(1000);
                (delay_s, format!("{{\"run_at_ms\":{at}}}"))
            })
            .collect();
        beanstalk_put_all(&addr, burst, opts.connections).await?;
        let hist = Arc::new(Mutex::new(lateness_histogram()?));
        let received = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_millis(3_000 + over_ms + 60_000);
        let mut consumers = Vec::new();
        for _ in 0..opts.consumers {
            let mut client = Beanstalk::connect(&addr).await?;
            let (hist, received, expect) = (hist.clone(), received.clone(), opts.burst);
            consumers.push(tokio::spawn(async move {
                while received.load(Ordering::Relaxed) < expect && Instant::now() < deadline {
                    let Some((id, body)) = client.reserve().await? else { continue };
                    let at_us = now_us();
                    if let Some(run_at_ms) = serde_json::from_str::<Value>(&body).ok().and_then(|v| v["run_at_ms"].as_u64()) {
                        let _ = hist.lock().await.record(at_us.saturating_sub(run_at_ms * 1000).max(1));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    client.delete(&id).await?;
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for consumer in consumers {
            consumer.await??;
        }
        println!(
            "beanstalkd: burst of {} due over {over_ms} ms, {} consumers: received {}, lateness {} (delays are whole seconds)",
            opts.burst,
            opts.consumers,
            received.load(Ordering::Relaxed),
            quantiles(&*hist.lock().await)
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Drain: `--tasks` tasks all due at once, delivered to `--consumers` consumers that ack each one;
/// then the same with the Redis sorted-set approach (claim + delete), if `redis-server` is there.
async fn scenario_drain(opts: &BenchOpts, http: &reqwest::Client, extra: &[String]) -> Result<()> {
    let dir = work_dir(opts, "drain")?;
    let server = Server::start(&dir, extra)?;
    wait_healthy(http, &server.url, Duration::from_secs(30)).await?;
    let due_now = bodies(0, opts.tasks, opts.batch, |_| "\"delay_ms\":0".to_owned());
    ingest(http, &server.url, due_now, opts.connections).await?;
    let started = Instant::now();
    let consumed = consume(
        http,
        &server.url,
        opts.consumers,
        opts.reserve_max,
        opts.tasks,
        Duration::from_secs(600),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "drain: punctual delivered {} of {} due tasks to {} consumers (reserve up to {}, one ack request per batch) in {secs:.1} s: {:.0} tasks/s, {} duplicates",
        consumed.received,
        opts.tasks,
        opts.consumers,
        opts.reserve_max,
        consumed.received as f64 / secs,
        consumed.duplicates
    );
    server.stop();

    let Ok(redis) = RedisChild::start().await else {
        println!("drain: redis-server not found; skipping the sorted-set drain");
        return Ok(());
    };
    let now_ms = now_us() / 1000;
    let tasks: Vec<(String, u64, String)> = (0..opts.tasks)
        .map(|n| (format!("t{n}"), now_ms, format!("{{\"n\":{n}}}")))
        .collect();
    zset_ingest(&redis, tasks, opts.connections).await?;
    let started = Instant::now();
    let (received, _) =
        zset_consume(&redis, opts, opts.tasks, started + Duration::from_secs(600)).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "drain: redis sorted set delivered {received} tasks to {} consumers (claim up to {}) in {secs:.1} s: {:.0} tasks/s",
        opts.consumers,
        opts.reserve_max,
        received as f64 / secs
    );
    Ok(())
}
