//! The two Redis approaches Punctual replaces, each on its own `redis-server` child on a free
//! loopback port with persistence off (RDB and AOF), as they are usually run for this.
//!
//! - `Zset`: `ZADD due id` plus a hash of payloads; consumers claim due ids atomically with a Lua
//!   script and sleep 10 ms when there are none.
//! - `Keyspace`: `SET task:<n> 1 PX <due - now>` plus the payload in a second key, a subscriber on
//!   `__keyevent@0__:expired` that `GET`s and then `DEL`s the payload.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;

use super::progress::Bar;
use super::subject::{
    Job, Sink, Subject, fan_out, free_port, job_chunks, now_ms, now_us, parse_payload_bytes,
    wait_until,
};
use super::{Ctx, System};

pub struct RedisChild {
    child: Child,
    port: u16,
    url: String,
    args: Vec<String>,
}

impl RedisChild {
    pub async fn start(args: &[&str]) -> Result<RedisChild> {
        let port = free_port()?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_redis(port, &args)?;
        let redis = RedisChild {
            child,
            port,
            url: format!("redis://127.0.0.1:{port}/"),
            args,
        };
        wait_until(Duration::from_secs(10), "redis-server", || redis.answers()).await?;
        Ok(redis)
    }

    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }

    async fn answers(&self) -> bool {
        let Ok(mut con) = self.connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .is_ok()
    }

    /// `INFO memory`'s `used_memory`.
    async fn used_memory(&self) -> Result<u64> {
        let mut con = self.connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut con)
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("INFO memory without used_memory")
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut con = self.connection().await?;
        Ok(cmd.query_async(&mut con).await?)
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_redis(self.port, &self.args)?;
        Ok(())
    }
}

/// One pipeline per chunk of `batch` jobs over `connections` connections to the Redis-protocol
/// server at `url` (Redis, or Punctual's `--resp`); `add` appends a job's commands. Returns the
/// seconds it took.
pub async fn pipelined(
    url: &str,
    jobs: Vec<Job>,
    batch: usize,
    connections: usize,
    bar: &Bar,
    add: fn(&mut redis::Pipeline, &Job),
) -> Result<f64> {
    let client = redis::Client::open(url)?;
    let mut cons = Vec::new();
    for _ in 0..connections.max(1) {
        cons.push(client.get_multiplexed_async_connection().await?);
    }
    fan_out(
        job_chunks(&jobs, batch),
        cons,
        bar,
        move |mut con, (_, chunk): (usize, Vec<Job>)| async move {
            let mut pipe = redis::pipe();
            for job in &chunk {
                add(&mut pipe, job);
            }
            pipe.query_async::<()>(&mut con).await?;
            Ok(con)
        },
    )
    .await
}

/// `n` pub/sub connections to the Redis-protocol server at `url`, each subscribed to
/// `__keyevent@0__:expired` (the subscription confirmed).
pub async fn expiry_subscribers(url: &str, n: usize) -> Result<Vec<redis::aio::PubSub>> {
    let client = redis::Client::open(url)?;
    let mut subscribed = Vec::with_capacity(n);
    for _ in 0..n {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe("__keyevent@0__:expired").await?;
        subscribed.push(pubsub);
    }
    Ok(subscribed)
}

fn spawn_redis(port: u16, args: &[String]) -> Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (Debian: apt-get install -y redis-server)")
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Zset {
    redis: RedisChild,
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

impl Subject for Zset {
    const SYSTEM: System = System::Zset;

    async fn start(_ctx: &Ctx) -> Result<Zset> {
        Ok(Zset {
            redis: RedisChild::start(&[]).await?,
        })
    }

    async fn schedule(
        &self,
        ctx: &Ctx,
        jobs: Vec<Job>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64> {
        pipelined(
            &self.redis.url,
            jobs,
            ctx.sizes.batch,
            connections,
            bar,
            |pipe, job| {
                pipe.cmd("ZADD")
                    .arg("zq")
                    .arg(job.due_ms)
                    .arg(job.n)
                    .ignore();
                pipe.cmd("HSET")
                    .arg("zq:payloads")
                    .arg(job.n)
                    .arg(job.payload())
                    .ignore();
            },
        )
        .await
    }

    async fn consume(
        &self,
        ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..consumers {
            let mut con = self.redis.connection().await?;
            let (sink, max) = (sink.clone(), ctx.sizes.reserve_max);
            workers.push(tokio::spawn(async move {
                let script = redis::Script::new(ZSET_CLAIM);
                while !sink.done() && Instant::now() < deadline {
                    let payloads: Vec<Option<Vec<u8>>> = script
                        .key("zq")
                        .key("zq:payloads")
                        .arg(now_ms())
                        .arg(max)
                        .invoke_async(&mut con)
                        .await
                        .unwrap_or_default();
                    if payloads.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let at_us = now_us();
                    for payload in payloads.iter().flatten() {
                        if let Some((n, due_ms)) = parse_payload_bytes(payload) {
                            sink.take(n, due_ms, at_us);
                        }
                    }
                }
            }));
        }
        for worker in workers {
            worker.await?;
        }
        Ok(())
    }

    async fn memory_bytes(&self) -> Result<u64> {
        self.redis.used_memory().await
    }

    async fn pending(&self) -> Result<u64> {
        self.redis.query(redis::cmd("ZCARD").arg("zq")).await
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        self.redis.kill9_restart().await
    }

    async fn answers(&self) -> bool {
        self.redis.answers().await
    }

    async fn stop(self) {}
}

pub struct Keyspace {
    redis: RedisChild,
    /// Active expiry is switched off until the consumers are subscribed (the drain holds every
    /// key until its consumers listen, so that "all due at once" means the same as for the others).
    held: AtomicBool,
}

impl Subject for Keyspace {
    const SYSTEM: System = System::Keyspace;
    const BROADCAST: bool = true;

    /// Stops Redis from expiring keys in the background until the next `consume` has subscribed.
    async fn hold_due(&self) -> Result<()> {
        self.redis
            .query::<()>(redis::cmd("DEBUG").arg("SET-ACTIVE-EXPIRE").arg(0))
            .await?;
        self.held.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn start(_ctx: &Ctx) -> Result<Keyspace> {
        Ok(Keyspace {
            redis: RedisChild::start(&[
                "--notify-keyspace-events",
                "Ex",
                "--enable-debug-command",
                "local",
            ])
            .await?,
            held: AtomicBool::new(false),
        })
    }

    async fn schedule(
        &self,
        ctx: &Ctx,
        jobs: Vec<Job>,
        connections: usize,
        bar: &Bar,
    ) -> Result<f64> {
        pipelined(
            &self.redis.url,
            jobs,
            ctx.sizes.batch,
            connections,
            bar,
            |pipe, job| {
                pipe.cmd("SET")
                    .arg(format!("payload:{}", job.n))
                    .arg(job.payload())
                    .ignore();
                // PX, not PXAT: a PXAT already past deletes the key at once, with no expiry event.
                let ttl_ms = job.due_ms.saturating_sub(now_ms()).max(1);
                pipe.cmd("SET")
                    .arg(format!("task:{}", job.n))
                    .arg(1)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            },
        )
        .await
    }

    /// `consumers` subscribers, each receiving every expiry event, each `GET`ting the payload and
    /// then `DEL`eting it.
    async fn consume(
        &self,
        _ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()> {
        let mut subscribed = Vec::new();
        for pubsub in expiry_subscribers(&self.redis.url, consumers).await? {
            subscribed.push((pubsub, self.redis.connection().await?));
        }
        if self.held.swap(false, Ordering::Relaxed) {
            self.redis
                .query::<()>(redis::cmd("DEBUG").arg("SET-ACTIVE-EXPIRE").arg(1))
                .await?;
        }
        let give_up = tokio::time::Instant::from_std(deadline);
        let mut workers = Vec::new();
        for (pubsub, mut con) in subscribed {
            let sink = sink.clone();
            workers.push(tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while !sink.done() {
                    let message = tokio::select! {
                        m = messages.next() => m,
                        _ = tokio::time::sleep_until(give_up) => None,
                    };
                    let Some(message) = message else { break };
                    let key: String = message.get_payload().unwrap_or_default();
                    let Some(n) = key.strip_prefix("task:") else {
                        continue;
                    };
                    let payload_key = format!("payload:{n}");
                    let payload: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&payload_key)
                        .query_async(&mut con)
                        .await
                        .unwrap_or(None);
                    let at_us = now_us();
                    if let Some((n, due_ms)) = payload.as_deref().and_then(parse_payload_bytes) {
                        sink.take(n, due_ms, at_us);
                        let _: Result<u64, _> = redis::cmd("DEL")
                            .arg(&payload_key)
                            .query_async(&mut con)
                            .await;
                    }
                }
            }));
        }
        for worker in workers {
            worker.await?;
        }
        Ok(())
    }

    async fn memory_bytes(&self) -> Result<u64> {
        self.redis.used_memory().await
    }

    /// Tasks whose expiring key is still there.
    async fn pending(&self) -> Result<u64> {
        // Two keys per task: the expiring one and its payload.
        let keys: u64 = self.redis.query(&redis::cmd("DBSIZE")).await?;
        Ok(keys / 2)
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        self.redis.kill9_restart().await
    }

    async fn answers(&self) -> bool {
        self.redis.answers().await
    }

    async fn stop(self) {}
}
