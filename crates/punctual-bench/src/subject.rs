//! What every system under test provides, and the shared pieces the drivers use: tasks (`Job`),
//! the consumer-side record of what arrived (`Sink`), and the worker pool (`fan_out`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use super::progress::Bar;
use super::{Ctx, System};

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    now_us() / 1000
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A histogram of lateness in microseconds, up to 10 minutes.
pub fn lateness_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One task of a scenario: number `n` (its id everywhere), due at `due_ms` (Unix ms).
#[derive(Clone, Copy)]
pub struct Job {
    pub n: u64,
    pub due_ms: u64,
}

impl Job {
    /// The payload every system carries: enough for the consumer to know which task it holds and
    /// how late it is.
    pub fn payload(&self) -> String {
        format!("{{\"n\":{},\"due_ms\":{}}}", self.n, self.due_ms)
    }
}

/// Reads `(n, due_ms)` back out of a payload.
pub fn parse_payload(value: &serde_json::Value) -> Option<(u64, u64)> {
    Some((value["n"].as_u64()?, value["due_ms"].as_u64()?))
}

pub fn parse_payload_bytes(bytes: &[u8]) -> Option<(u64, u64)> {
    parse_payload(&serde_json::from_slice(bytes).ok()?)
}

/// What the consumers of one scenario received: tasks `first..first+count` are the ones it watches;
/// it is done when `expect` distinct ones arrived.
pub struct Sink {
    first: u64,
    expect: u64,
    seen: Vec<AtomicU8>,
    received: AtomicU64,
    duplicates: AtomicU64,
    first_at_us: AtomicU64,
    lateness_us: std::sync::Mutex<Histogram<u64>>,
    bar: Bar,
}

impl Sink {
    pub fn new(label: &str, first: u64, count: u64, expect: u64) -> Arc<Sink> {
        Arc::new(Sink {
            first,
            expect,
            seen: (0..count).map(|_| AtomicU8::new(0)).collect(),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            first_at_us: AtomicU64::new(0),
            lateness_us: std::sync::Mutex::new(lateness_histogram()),
            bar: Bar::new(label, expect),
        })
    }

    /// A consumer holds the payload of task `n`, due at `due_ms`, at `at_us`.
    pub fn take(&self, n: u64, due_ms: u64, at_us: u64) {
        let Some(slot) = n
            .checked_sub(self.first)
            .and_then(|i| self.seen.get(i as usize))
        else {
            return; // a task of another scenario
        };
        if slot.fetch_add(1, Ordering::Relaxed) > 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.received.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first_at_us.store(at_us, Ordering::Relaxed);
        }
        self.bar.add(1);
        let lateness = at_us.saturating_sub(due_ms * 1000).max(1);
        if let Ok(mut h) = self.lateness_us.lock() {
            let _ = h.record(lateness);
        }
    }

    pub fn done(&self) -> bool {
        self.received.load(Ordering::Relaxed) >= self.expect
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// When the first task arrived (Unix µs).
    pub fn first_at_us(&self) -> Option<u64> {
        Some(self.first_at_us.load(Ordering::Relaxed)).filter(|&at| at > 0)
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    pub fn lateness(&self) -> Histogram<u64> {
        self.lateness_us
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| lateness_histogram())
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

/// A system under test, started fresh by `start` and driven through the scenarios.
pub trait Subject: Sized {
    const SYSTEM: System;
    /// Every consumer receives every event (pub/sub), so a burst uses one consumer.
    const BROADCAST: bool = false;

    async fn start(ctx: &Ctx) -> Result<Self>;
    /// Schedules the jobs in round trips of `ctx.sizes.batch` over `connections` connections;
    /// returns the seconds until the last was acknowledged.
    async fn schedule(
        &self,
        ctx: &Ctx,
        jobs: Vec<Job>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64>;
    /// Runs `consumers` consumers that hand what they receive to `sink` until it is done or `deadline`.
    async fn consume(
        &self,
        ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()>;
    /// Keeps tasks that fall due from being handed out until the next `consume` is ready (only
    /// where delivery does not wait for a consumer to ask).
    async fn hold_due(&self) -> Result<()> {
        Ok(())
    }
    /// RAM the system uses for its tasks: RSS of the server process, or Redis's `used_memory`.
    async fn memory_bytes(&self) -> Result<u64>;
    /// Bytes the server process has written to storage so far (`write_bytes` of `/proc/PID/io`),
    /// where that is its own disk traffic; `None` for the peers (Redis runs without persistence).
    fn disk_bytes_written(&self) -> Option<u64> {
        None
    }
    /// Tasks the system holds (pending, ready or leased).
    async fn pending(&self) -> Result<u64>;
    /// Kills the server with SIGKILL and starts it again on the same data and port.
    async fn kill9_restart(&mut self) -> Result<()>;
    /// Whether the server answers a request.
    async fn answers(&self) -> bool;
    async fn stop(self);
}

/// Sends every work item through one of `connections`, each used by its own worker that takes the
/// next item when it is done with the last; returns the seconds it took. An item is `(tasks, work)`:
/// `tasks` is added to `bar` once `send` is done with the item. `send` gets the connection by value
/// and hands it back, which keeps the workers' futures `Send` and `'static`.
pub async fn fan_out<W, C, F, Fut>(
    work: Vec<(usize, W)>,
    connections: Vec<C>,
    bar: &Bar,
    send: F,
) -> Result<f64>
where
    W: Send + 'static,
    C: Send + 'static,
    F: Fn(C, (usize, W)) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<C>> + Send,
{
    let mut work = work;
    work.reverse(); // workers pop from the end: send in order
    let queue = Arc::new(Mutex::new(work));
    let started = Instant::now();
    let mut workers = Vec::new();
    for connection in connections {
        let (queue, send, bar) = (queue.clone(), send.clone(), bar.clone());
        workers.push(tokio::spawn(async move {
            let mut connection = connection;
            loop {
                let Some(item) = queue.lock().await.pop() else {
                    return Ok::<(), anyhow::Error>(());
                };
                let tasks = item.0;
                connection = send(connection, item).await?;
                bar.add(tasks as u64);
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The jobs in round trips of `batch`, as work items for [`fan_out`].
pub fn job_chunks(jobs: &[Job], batch: usize) -> Vec<(usize, Vec<Job>)> {
    jobs.chunks(batch).map(|c| (c.len(), c.to_vec())).collect()
}

/// A fresh, empty directory for one system's data.
pub fn fresh_dir(ctx: &Ctx, tag: &str) -> Result<PathBuf> {
    let dir = ctx.work_dir.join(format!(
        "punctual-bench-{tag}-{}-{}",
        std::process::id(),
        ctx.next_dir()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Resident set size of a process, from /proc.
/// `write_bytes` of `/proc/PID/io`: what the process caused to be written to storage.
pub fn write_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Waits until `ready` answers true, polling every 2 ms, for at most `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut ready: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if ready().await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            anyhow::bail!("{what} did not answer within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
