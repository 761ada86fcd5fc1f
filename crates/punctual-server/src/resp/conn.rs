//! One Redis-protocol connection: reads pipelined requests, runs them in order, and writes the
//! answers and, while subscribed, the events its groups hand it.
//!
//! Key writes that arrive together (a pipeline of `SETEX`) are applied in one commit and answered
//! after it is durable; any other command first waits for the writes before it, so every command
//! sees the effects of those sent earlier on the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::events::{Delivery, Events};
use super::frame::{self, Reply};
use super::{keys, native, pubsub, server};
use crate::error::ApiError;
use crate::service::{KeyAnswer, KeyOp, ScheduleRequest, Service};

/// Limits of the Redis front end.
#[derive(Debug, Clone)]
pub struct RespLimits {
    /// Most connections at once; past it a new one gets `-ERR max number of clients reached`.
    pub max_connections: usize,
    /// Largest request (all of one command's arguments); a larger one is refused and the
    /// connection closed, as Redis does past `proto-max-bulk-len`.
    pub max_request_bytes: usize,
    /// Most commands run from one read before their answers are written (a pipeline's step).
    pub max_pipeline: usize,
}

impl Default for RespLimits {
    fn default() -> Self {
        RespLimits {
            max_connections: 10_000,
            max_request_bytes: 4 << 20,
            max_pipeline: 1_000,
        }
    }
}

/// What a connection knows about itself.
pub struct Conn {
    pub id: u64,
    pub resp3: bool,
    pub db: u32,
    pub user: Option<String>,
    pub authed: bool,
    pub name: Option<Vec<u8>>,
    pub channels: Vec<Vec<u8>>,
    pub patterns: Vec<Vec<u8>>,
    pub quit: bool,
    pub service: Arc<Service>,
    pub events: Arc<Events>,
    pub tx: mpsc::Sender<Delivery>,
    joined: bool,
}

impl Conn {
    pub fn subscriptions(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }

    pub fn queue(&self) -> String {
        self.events.queue(self.db)
    }

    /// Tells the events what this connection now subscribes to.
    pub fn sync_subscriptions(&mut self) {
        if !self.joined {
            self.events
                .join(self.id, self.tx.clone(), self.user.clone());
            self.joined = true;
        }
        self.events
            .subscriptions(self.id, &self.channels, &self.patterns);
    }
}

/// How a batched key write's answer becomes a reply.
pub enum Render {
    /// `SET`: `+OK`, or null when NX/XX was not met; with GET, the old value.
    Set { get: bool },
    /// `DEL`/`UNLINK` over `n` keys: how many were live.
    Count(usize),
    /// `EXPIRE` family: 1 or 0.
    Flag,
    /// `INCR` family: the new value.
    Integer,
}

/// One step of a pipeline: an answer at once, or key writes to commit first.
pub enum Step {
    Reply(Reply),
    Keys(Vec<KeyOp>, Render),
    /// Tasks to schedule in a queue (`PUNCTUAL.SCHEDULE`, or `PUNCTUAL.BATCH` when the flag is set).
    Schedule(String, Vec<Result<ScheduleRequest, ApiError>>, bool),
    /// Close after the answer (`QUIT`).
    Close(Reply),
}

pub fn wrong_args(lower: &str) -> Reply {
    Reply::Error(format!(
        "ERR wrong number of arguments for '{lower}' command"
    ))
}

/// Redis's text for an unknown command: the name as sent and the first arguments, quoted.
pub fn unknown(raw: &str, args: &[Vec<u8>]) -> Reply {
    let mut listed = String::new();
    for arg in args.iter().skip(1).take(16) {
        let text = String::from_utf8_lossy(arg);
        let cut: String = text.chars().take(128).collect();
        listed.push_str(&format!("'{cut}' "));
    }
    let raw: String = raw.chars().take(128).collect();
    Reply::Error(format!(
        "ERR unknown command '{raw}', with args beginning with: {listed}"
    ))
}

/// Commands a RESP2 connection may send while subscribed.
fn allowed_subscribed(lower: &str) -> bool {
    matches!(
        lower,
        "subscribe"
            | "psubscribe"
            | "unsubscribe"
            | "punsubscribe"
            | "ping"
            | "quit"
            | "reset"
            | "ssubscribe"
            | "sunsubscribe"
    )
}

/// Whether a command exists, for the order of Redis's checks (unknown before context errors).
fn known(lower: &str) -> bool {
    keys::handles(lower)
        || pubsub::handles(lower)
        || server::handles(lower)
        || native::handles(lower)
}

/// Whether a request only adds to the pending batch of writes (it reads nothing first).
fn batched(lower: &str, args: &[Vec<u8>]) -> bool {
    let expire_with_condition = lower.contains("expire") && args.len() == 4;
    (keys::batchable(lower) && !expire_with_condition)
        || matches!(lower, "punctual.schedule" | "punctual.batch")
}

/// Runs one request; `lower` is its command name in lowercase.
async fn step(conn: &mut Conn, lower: String, args: Vec<Vec<u8>>) -> Step {
    if !known(&lower) {
        return Step::Reply(unknown(&String::from_utf8_lossy(&args[0]), &args));
    }
    if !conn.authed && !matches!(lower.as_str(), "auth" | "hello" | "quit") {
        return Step::Reply(Reply::Error("NOAUTH Authentication required.".into()));
    }
    if !conn.resp3 && conn.subscriptions() > 0 && !allowed_subscribed(&lower) {
        return Step::Reply(Reply::Error(format!(
            "ERR Can't execute '{lower}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / \
             RESET are allowed in this context"
        )));
    }
    let now_ms = conn.service.clock.now_ms();
    if keys::handles(&lower) {
        return keys::run(conn, &lower, &args, now_ms).await;
    }
    if pubsub::handles(&lower) {
        return Step::Reply(pubsub::run(conn, &lower, &args));
    }
    if native::handles(&lower) {
        return native::run(conn, &lower, &args).await;
    }
    server::run(conn, &lower, &args).await
}

/// Most key writes committed together; a pipeline with more is committed in parts, in order.
const MAX_BATCH_OPS: usize = 10_000;

/// Writes gathered from a pipeline, committed together before any other command runs.
#[derive(Default)]
enum Batch {
    #[default]
    Empty,
    Keys {
        queue: String,
        ops: Vec<KeyOp>,
        /// Each command's reply slot, how many ops it has, and how its reply is made.
        renders: Vec<(usize, usize, Render)>,
    },
    Schedules {
        queue: String,
        items: Vec<Result<ScheduleRequest, ApiError>>,
        /// Each command's reply slot, how many items it has, and whether it was a `PUNCTUAL.BATCH`.
        slots: Vec<(usize, usize, bool)>,
    },
}

/// Commits the batch and renders each batched command's reply into its slot.
async fn flush(conn: &Conn, batch: &mut Batch, replies: &mut [Option<Reply>]) {
    match std::mem::take(batch) {
        Batch::Empty => {}
        Batch::Keys {
            queue,
            ops,
            renders,
        } => {
            let answers = conn.service.keys(&queue, &ops).await;
            let mut answers = match answers {
                Ok(answers) => answers.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(error) => ops.iter().map(|_| Err(error.message.clone())).collect(),
            };
            for (slot, count, render) in renders {
                let part: Vec<Result<KeyAnswer, String>> = answers.drain(..count).collect();
                replies[slot] = Some(keys::render(render, part));
            }
        }
        Batch::Schedules {
            queue,
            items,
            slots,
        } => {
            let count = items.len();
            let results = conn.service.schedule_batch(&queue, items).await;
            let mut results: Vec<Result<_, ApiError>> = match results {
                Ok(results) => results,
                Err(error) => (0..count)
                    .map(|_| {
                        Err(ApiError::new(
                            error.status,
                            error.code,
                            error.message.clone(),
                        ))
                    })
                    .collect(),
            };
            for (slot, n, many) in slots {
                let part: Vec<Reply> = results.drain(..n).map(native::scheduled).collect();
                replies[slot] = Some(if many {
                    Reply::Array(part)
                } else {
                    part.into_iter().next().unwrap_or(Reply::Null)
                });
            }
        }
    }
}

/// Serves one connection until it closes or quits: a TCP stream, or any byte stream (the fuzz
/// target drives it over an in-memory pipe).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    service: Arc<Service>,
    events: Arc<Events>,
    limits: RespLimits,
    id: u64,
) {
    let (tx, mut rx) = mpsc::channel::<Delivery>(events.options.connection_queue);
    let mut conn = Conn {
        id,
        resp3: false,
        db: 0,
        user: None,
        authed: !service.auth_required(),
        name: None,
        channels: Vec::new(),
        patterns: Vec::new(),
        quit: false,
        service,
        events: events.clone(),
        tx,
        joined: false,
    };
    let mut input: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut output: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut closing = false;
    let mut unsent: Vec<Delivery> = Vec::new();
    'conn: loop {
        tokio::select! {
            biased;
            read = stream.read_buf(&mut input) => {
                match read {
                    Ok(0) | Err(_) => break 'conn,
                    Ok(_) => {}
                }
                // Run every complete request in the buffer, batching key writes.
                let mut requests = Vec::new();
                let mut used = 0usize;
                loop {
                    if requests.len() >= limits.max_pipeline {
                        break;
                    }
                    match frame::parse(&input[used..]) {
                        Ok(Some((args, n))) => {
                            used += n;
                            if !args.is_empty() {
                                requests.push(args);
                            }
                        }
                        Ok(None) => {
                            if input.len() - used > limits.max_request_bytes {
                                requests.push(Vec::new());
                                closing = true;
                            }
                            break;
                        }
                        Err(error) => {
                            output.clear();
                            Reply::Error(error.to_string()).encode(conn.resp3, &mut output);
                            let _ = stream.write_all(&output).await;
                            break 'conn;
                        }
                    }
                }
                input.drain(..used);
                let mut replies: Vec<Option<Reply>> = (0..requests.len()).map(|_| None).collect();
                let mut batch = Batch::Empty;
                for (slot, args) in requests.into_iter().enumerate() {
                    if args.is_empty() {
                        replies[slot] = Some(Reply::Error(format!(
                            "ERR Protocol error: a request is larger than {} bytes \
                             (the Redis front end's limit)",
                            limits.max_request_bytes
                        )));
                        break;
                    }
                    let lower = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
                    // Commands that are not batched writes see everything sent before them.
                    if !batched(&lower, &args) {
                        flush(&conn, &mut batch, &mut replies).await;
                    }
                    match step(&mut conn, lower, args).await {
                        Step::Reply(reply) => replies[slot] = Some(reply),
                        Step::Keys(new, render) => {
                            let queue = conn.queue();
                            let full = matches!(&batch, Batch::Keys { ops, .. } if ops.len() + new.len() > MAX_BATCH_OPS);
                            if full || !matches!(&batch, Batch::Keys { queue: q, .. } if *q == queue) {
                                flush(&conn, &mut batch, &mut replies).await;
                                batch = Batch::Keys { queue, ops: Vec::new(), renders: Vec::new() };
                            }
                            if let Batch::Keys { ops, renders, .. } = &mut batch {
                                renders.push((slot, new.len(), render));
                                ops.extend(new);
                            }
                        }
                        Step::Schedule(queue, new, many) => {
                            let max = conn.service.config.limits.max_batch;
                            let full = matches!(&batch, Batch::Schedules { items, .. } if items.len() + new.len() > max);
                            if full || !matches!(&batch, Batch::Schedules { queue: q, .. } if *q == queue) {
                                flush(&conn, &mut batch, &mut replies).await;
                                batch = Batch::Schedules { queue, items: Vec::new(), slots: Vec::new() };
                            }
                            if let Batch::Schedules { items, slots, .. } = &mut batch {
                                slots.push((slot, new.len(), many));
                                items.extend(new);
                            }
                        }
                        Step::Close(reply) => {
                            replies[slot] = Some(reply);
                            closing = true;
                            break;
                        }
                    }
                }
                flush(&conn, &mut batch, &mut replies).await;
                output.clear();
                for reply in replies.into_iter().flatten() {
                    reply.encode(conn.resp3, &mut output);
                }
                if stream.write_all(&output).await.is_err() || closing {
                    break 'conn;
                }
            }
            delivery = rx.recv(), if conn.joined => {
                let Some(first) = delivery else { break 'conn };
                let mut batch = vec![first];
                while batch.len() < 1024 {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                // Queued before an UNSUBSCRIBE: not for this connection any more (a RESP2
                // client out of subscribed mode must not get a message frame).
                let (batch, stale): (Vec<Delivery>, Vec<Delivery>) = batch
                    .into_iter()
                    .partition(|d| d.held_by(&conn.channels, &conn.patterns));
                if !stale.is_empty() {
                    events.give_back(stale);
                }
                output.clear();
                for delivery in &batch {
                    pubsub::message(delivery).encode(conn.resp3, &mut output);
                }
                if stream.write_all(&output).await.is_err() {
                    unsent = batch;
                    break 'conn;
                }
            }
        }
    }
    rx.close();
    while let Ok(delivery) = rx.try_recv() {
        unsent.push(delivery);
    }
    if conn.joined {
        events.leave(id, unsent);
    }
    let _ = stream.shutdown().await;
}
