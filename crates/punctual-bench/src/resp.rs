//! Punctual over its Redis protocol, driven by the keyspace-notification program people run on
//! Redis: `PSETEX task:<n>:<due_ms> <ttl> <payload>` pipelined, and subscribers on
//! `__keyevent@0__:expired`. Each event goes to one subscriber (they form one group), which knows
//! the task from the key name, as handlers of `order:<id>` keys do; so the lateness is the event's
//! own. (Reading the payload back with `PUNCTUAL.GET db0 <key>`, which Punctual keeps after the
//! event where Redis has deleted it, adds a round trip per event per subscriber: with four
//! subscribers taking 10 k events/s that queued up to a p99 of 72 ms on this machine.)

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::Value;

use super::progress::Bar;
use super::punctual::Punctual;
use super::redis_peers::{expiry_subscribers, pipelined};
use super::subject::{Job, Sink, Subject, free_port, now_ms, now_us};
use super::{Ctx, System};

pub struct PunctualResp {
    server: Punctual,
    url: String,
}

impl Subject for PunctualResp {
    const SYSTEM: System = System::PunctualResp;

    async fn start(ctx: &Ctx) -> Result<PunctualResp> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let server = Punctual::start_with(ctx, &["--resp".into(), addr.clone()]).await?;
        Ok(PunctualResp {
            server,
            url: format!("redis://{addr}/"),
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
            &self.url,
            jobs,
            ctx.sizes.batch,
            connections,
            bar,
            |pipe, job| {
                let ttl_ms = job.due_ms.saturating_sub(now_ms()).max(1);
                pipe.cmd("PSETEX")
                    .arg(format!("task:{}:{}", job.n, job.due_ms))
                    .arg(ttl_ms)
                    .arg(job.payload())
                    .ignore();
            },
        )
        .await
    }

    async fn consume(
        &self,
        _ctx: &Ctx,
        consumers: usize,
        sink: Arc<Sink>,
        deadline: Instant,
    ) -> Result<()> {
        let subscribed = expiry_subscribers(&self.url, consumers).await?;
        let give_up = tokio::time::Instant::from_std(deadline);
        let mut workers = Vec::new();
        for pubsub in subscribed {
            let sink = sink.clone();
            workers.push(tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while !sink.done() {
                    // Every subscriber of the group gets only some of the events: look at the sink
                    // now and then, so the others stop once the last one arrived.
                    let message = tokio::select! {
                        m = messages.next() => m,
                        _ = tokio::time::sleep_until(give_up) => None,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => continue,
                    };
                    let Some(message) = message else { break };
                    let key: String = message.get_payload().unwrap_or_default();
                    let at_us = now_us();
                    let mut parts = key.strip_prefix("task:").unwrap_or("").split(':');
                    let n = parts.next().and_then(|p| p.parse().ok());
                    let due_ms = parts.next().and_then(|p| p.parse().ok());
                    if let (Some(n), Some(due_ms)) = (n, due_ms) {
                        sink.take(n, due_ms, at_us);
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
        self.server.memory_bytes().await
    }

    fn disk_bytes_written(&self) -> Option<u64> {
        self.server.disk_bytes_written()
    }

    /// Keys not yet fired, and events waiting for a subscriber.
    async fn pending(&self) -> Result<u64> {
        let mut total = 0;
        for queue in ["db0", "db0.expired"] {
            let stats: Value = self.server.http_get(&format!("/v1/queues/{queue}")).await?;
            total += ["scheduled", "ready", "leased"]
                .iter()
                .map(|s| stats[s].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        Ok(total)
    }

    async fn kill9_restart(&mut self) -> Result<()> {
        self.server.kill9_restart().await
    }

    async fn answers(&self) -> bool {
        self.server.answers().await
    }

    async fn stop(self) {
        self.server.stop().await
    }
}
