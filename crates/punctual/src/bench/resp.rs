//! Punctual over its Redis protocol, driven by the keyspace-notification program people run on
//! Redis: `PSETEX task:<n> <ttl> <payload>` pipelined, and subscribers on `__keyevent@0__:expired`.
//! Each event goes to one subscriber (they form one group), which reads the payload with
//! `PUNCTUAL.GET db0 task:<n>`: Punctual keeps a fired key's value, where Redis has deleted it.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::Value;

use super::progress::Bar;
use super::punctual::Punctual;
use super::subject::{
    Job, Sink, Subject, fan_out, free_port, job_chunks, now_ms, now_us, parse_payload_bytes,
};
use super::{Ctx, System};

pub struct PunctualResp {
    server: Punctual,
    url: String,
}

impl PunctualResp {
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

/// The payload of a fired key, from `PUNCTUAL.GET`'s answer (the value is a JSON string).
fn payload_of(task: &redis::Value) -> Option<Vec<u8>> {
    let items: Vec<redis::Value> = match task {
        redis::Value::Array(items) => items.clone(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        _ => return None,
    };
    let at = items.chunks(2).position(|p| {
        redis::from_redis_value::<String>(&p[0]).ok().as_deref() == Some("payload")
    })?;
    let text: String = redis::from_redis_value(&items[at * 2 + 1]).ok()?;
    let value: String = serde_json::from_str(&text).ok()?;
    Some(value.into_bytes())
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
        let mut cons = Vec::new();
        for _ in 0..connections.max(1) {
            cons.push(self.connection().await?);
        }
        fan_out(
            job_chunks(&jobs, ctx.sizes.batch),
            cons,
            bar,
            move |mut con, (_, chunk): (usize, Vec<Job>)| async move {
                let mut pipe = redis::pipe();
                for job in &chunk {
                    let ttl_ms = job.due_ms.saturating_sub(now_ms()).max(1);
                    pipe.cmd("PSETEX")
                        .arg(format!("task:{}", job.n))
                        .arg(ttl_ms)
                        .arg(job.payload())
                        .ignore();
                }
                pipe.query_async::<()>(&mut con).await?;
                Ok(con)
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
        let client = redis::Client::open(self.url.as_str())?;
        let mut subscribed = Vec::new();
        for _ in 0..consumers {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("__keyevent@0__:expired").await?;
            subscribed.push((pubsub, self.connection().await?));
        }
        let give_up = tokio::time::Instant::from_std(deadline);
        let mut workers = Vec::new();
        for (pubsub, mut con) in subscribed {
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
                    if !key.starts_with("task:") {
                        continue;
                    }
                    let task: redis::Value = redis::cmd("PUNCTUAL.GET")
                        .arg("db0")
                        .arg(&key)
                        .query_async(&mut con)
                        .await
                        .unwrap_or(redis::Value::Nil);
                    let at_us = now_us();
                    if let Some((n, due_ms)) =
                        payload_of(&task).as_deref().and_then(parse_payload_bytes)
                    {
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
