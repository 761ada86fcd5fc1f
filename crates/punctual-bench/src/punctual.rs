//! Punctual itself: a `punctual serve` child process on the embedded store with default settings,
//! driven over loopback HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::progress::Bar;
use super::subject::{
    Job, Sink, Subject, fan_out, free_port, fresh_dir, now_us, parse_payload, rss_bytes, wait_until,
};
use super::{Ctx, System};

/// The queue every scenario uses.
const QUEUE: &str = "bench";

pub struct Punctual {
    child: Child,
    pub url: String,
    addr: String,
    dir: PathBuf,
    extra: Vec<String>,
    http: reqwest::Client,
}

/// The `punctual` binary the bench runs, chosen once at start ([`set_binary`]).
static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Chooses the `punctual` binary: `given`, else the one beside this binary (cargo builds both
/// into the same `target/<profile>/`); an error that says how to build it if there is none.
pub fn set_binary(given: Option<PathBuf>) -> Result<()> {
    let path = match given {
        Some(path) => path,
        None => std::env::current_exe()?
            .with_file_name(format!("punctual{}", std::env::consts::EXE_SUFFIX)),
    };
    if !path.is_file() {
        anyhow::bail!(
            "no punctual binary at {}: build it first (cargo build --release, beside              cargo build --release -p punctual-bench), or name one with --punctual-bin",
            path.display()
        );
    }
    let _ = BINARY.set(path);
    Ok(())
}

fn spawn_serve(dir: &Path, addr: &str, extra: &[String]) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))?;
    let binary = BINARY.get().context("the punctual binary was not chosen")?;
    let mut command = Command::new(binary);
    command.arg("serve");
    // A node on Redis keeps no data of its own.
    if !extra.iter().any(|a| a.starts_with("--redis")) {
        command.arg("--data-dir").arg(dir);
    }
    command
        .arg("--http")
        .arg(addr)
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("PUNCTUAL_BENCH_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting punctual serve")
}

impl Punctual {
    /// Starts a server with `extra` arguments for `punctual serve` beyond the bench's own.
    pub async fn start_with(ctx: &Ctx, extra: &[String]) -> Result<Punctual> {
        let dir = fresh_dir(ctx, "punctual")?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut extra = extra.to_vec();
        extra.extend(ctx.extra.iter().cloned());
        let child = spawn_serve(&dir, &addr, &extra)?;
        let server = Punctual {
            child,
            url: format!("http://{addr}"),
            addr,
            dir,
            extra,
            http: ctx.http.clone(),
        };
        wait_until(Duration::from_secs(30), "punctual serve", || {
            server.healthy()
        })
        .await?;
        Ok(server)
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GETs an API path as JSON.
    pub async fn http_get(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await?
            .json()
            .await?)
    }

    async fn healthy(&self) -> bool {
        matches!(self.http.get(format!("{}/healthz", self.url)).send().await,
                 Ok(r) if r.status().is_success())
    }

    /// Posts batch bodies, each `(tasks in it, body)`; every task must be accepted.
    pub async fn post_batches(
        &self,
        bodies: Vec<(usize, Vec<u8>)>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64> {
        let (http, batch_url) = (
            self.http.clone(),
            format!("{}/v1/queues/{QUEUE}/batch", self.url),
        );
        fan_out(
            bodies,
            vec![(); connections.max(1)],
            bar,
            move |(), (count, body): (usize, Vec<u8>)| {
                let (http, batch_url) = (http.clone(), batch_url.clone());
                async move {
                    // A high-rate producer asks for ids only (`Prefer: return=minimal`), and
                    // reads the answer into a typed struct, skipping what it does not need.
                    #[derive(serde::Deserialize)]
                    struct Item {
                        status: u16,
                    }
                    #[derive(serde::Deserialize)]
                    struct Answer {
                        results: Vec<Item>,
                    }
                    let response = http
                        .post(batch_url)
                        .header("content-type", "application/json")
                        .header("prefer", "return=minimal")
                        .body(body)
                        .send()
                        .await?;
                    if !response.status().is_success() {
                        bail!("batch answered {}", response.status());
                    }
                    let text = response.bytes().await?;
                    let answer: Answer = serde_json::from_slice(&text)?;
                    let ok = answer
                        .results
                        .iter()
                        .filter(|x| x.status == 201 || x.status == 200)
                        .count();
                    if ok != count {
                        let shown: String =
                            String::from_utf8_lossy(&text).chars().take(300).collect();
                        bail!("only {ok} of {count} tasks in a batch were accepted: {shown}…");
                    }
                    Ok(())
                }
            },
        )
        .await
    }
}

impl Subject for Punctual {
    const SYSTEM: System = System::Punctual;

    async fn start(ctx: &Ctx) -> Result<Punctual> {
        Punctual::start_with(ctx, &[]).await
    }

    async fn schedule(
        &self,
        ctx: &Ctx,
        jobs: Vec<Job>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64> {
        let bodies = jobs
            .chunks(ctx.sizes.batch)
            .map(|chunk| {
                let items: Vec<String> = chunk
                    .iter()
                    .map(|job| {
                        format!(
                            "{{\"id\":\"t{}\",\"run_at\":\"{}\",\"payload\":{}}}",
                            job.n,
                            punctual_core::time::format_rfc3339_ms(job.due_ms),
                            job.payload()
                        )
                    })
                    .collect();
                (
                    chunk.len(),
                    format!("{{\"tasks\":[{}]}}", items.join(",")).into_bytes(),
                )
            })
            .collect();
        self.post_batches(bodies, connections, bar).await
    }

    /// Pull consumers: reserve up to `reserve_max` with a 1 s long-poll, note each payload at
    /// receipt, and ack each reserved batch with one request in the background.
    async fn consume(
        &self,
        ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..consumers {
            let (http, url, sink, max) = (
                self.http.clone(),
                self.url.clone(),
                sink.clone(),
                ctx.sizes.reserve_max,
            );
            workers.push(tokio::spawn(async move {
                let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Value>>();
                let acker = {
                    let (http, url) = (http.clone(), url.clone());
                    tokio::spawn(async move {
                        let limit = Arc::new(tokio::sync::Semaphore::new(8));
                        let mut sent = Vec::new();
                        while let Some(acks) = ack_rx.recv().await {
                            let permit = limit.clone().acquire_owned().await;
                            let (http, url) = (http.clone(), url.clone());
                            sent.push(tokio::spawn(async move {
                                let _ = http
                                    .post(format!("{url}/v1/queues/{QUEUE}/ack"))
                                    .json(&json!({ "tasks": acks }))
                                    .send()
                                    .await;
                                drop(permit);
                            }));
                        }
                        for ack in sent {
                            let _ = ack.await;
                        }
                    })
                };
                while !sink.done() && Instant::now() < deadline {
                    let wait_ms = deadline
                        .saturating_duration_since(Instant::now())
                        .as_millis()
                        .min(1000);
                    let response = http
                        .post(format!("{url}/v1/queues/{QUEUE}/reserve"))
                        .json(&json!({"max": max, "wait_ms": wait_ms, "lease_ms": 60_000}))
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
                    let mut acks = Vec::with_capacity(tasks.len());
                    for task in &tasks {
                        if let Some((n, due_ms)) = parse_payload(&task["payload"]) {
                            sink.take(n, due_ms, at_us);
                        }
                        acks.push(json!({"id": task["id"], "lease_token": task["lease_token"]}));
                    }
                    if !acks.is_empty() {
                        let _ = ack_tx.send(acks);
                    }
                }
                drop(ack_tx);
                let _ = acker.await;
            }));
        }
        for worker in workers {
            worker.await?;
        }
        Ok(())
    }

    async fn memory_bytes(&self) -> Result<u64> {
        Ok(rss_bytes(self.child.id()))
    }

    fn disk_bytes_written(&self) -> Option<u64> {
        super::subject::write_bytes(self.child.id())
    }

    async fn pending(&self) -> Result<u64> {
        let stats: Value = self
            .http
            .get(format!("{}/v1/queues/{QUEUE}", self.url))
            .send()
            .await?
            .json()
            .await?;
        Ok(["scheduled", "ready", "leased"]
            .iter()
            .map(|s| stats[s].as_u64().unwrap_or(0))
            .sum())
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_serve(&self.dir, &self.addr, &self.extra)?;
        Ok(())
    }

    async fn answers(&self) -> bool {
        self.healthy().await
    }

    async fn stop(mut self) {
        // SIGTERM for a clean stop.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
