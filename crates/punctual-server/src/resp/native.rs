//! Punctual's own commands over RESP, for new code and for throughput: the same operations as the
//! HTTP API, through the same service. Pipelined `PUNCTUAL.SCHEDULE`s to one queue are committed
//! together, like an HTTP batch.
//!
//! ```text
//! PUNCTUAL.SCHEDULE queue [ID id] [DELAY ms | AT unix-ms] [PAYLOAD json] [MAXATTEMPTS n]
//!                         [BACKOFF ms,ms,...] [LEASE ms]            -> [id, created 1|0]
//! PUNCTUAL.BATCH queue task-json [task-json ...]                    -> [[id, created] | error, ...]
//! PUNCTUAL.RESERVE queue [COUNT n] [WAIT ms] [LEASE ms]             -> [task, ...]
//! PUNCTUAL.ACK queue id token [id token ...]                        -> acked count
//! PUNCTUAL.NACK queue id token [ERROR text] [DELAY ms]              -> task
//! PUNCTUAL.EXTEND queue id token lease-ms                           -> task
//! PUNCTUAL.GET queue id                                             -> task | null
//! PUNCTUAL.CANCEL queue id                                          -> 1 | 0
//! PUNCTUAL.GROUPS                                                   -> [group, ...]
//! PUNCTUAL.FORGET group-id                                          -> 1 | 0
//! ```
//!
//! `PUNCTUAL.GROUPS` lists the subscriber groups the registry knows (see `events.rs`), each a map
//! of `id`, `user`, `kind` (`channel` or `pattern`), `subscription`, `members_here`, `waiting`
//! and `last_seen_ms`; `PUNCTUAL.FORGET` drops one with the events waiting for it.
//!
//! A task is a map (RESP3) or a flat array of field, value (RESP2).

use punctual_core::Task;
use serde_json::value::RawValue;

use super::conn::{Conn, Step, wrong_args};
use super::frame::Reply;
use super::keys::refusal;
use crate::error::ApiError;
use crate::service::{AckItem, NackRequest, ReserveRequest, ScheduleRequest, Settled};

pub fn handles(lower: &str) -> bool {
    matches!(
        lower,
        "punctual.schedule"
            | "punctual.batch"
            | "punctual.reserve"
            | "punctual.ack"
            | "punctual.nack"
            | "punctual.extend"
            | "punctual.get"
            | "punctual.cancel"
            | "punctual.groups"
            | "punctual.forget"
    )
}

/// `PUNCTUAL.GROUPS` and `PUNCTUAL.FORGET`.
async fn groups(conn: &Conn, lower: &str, args: &[Vec<u8>]) -> Reply {
    let bulk = |s: &[u8]| Reply::Bulk(s.to_vec());
    if lower == "punctual.forget" {
        let [_, id] = args else {
            return wrong_args(lower);
        };
        return match std::str::from_utf8(id) {
            Ok(id) => match conn.events.forget(id).await {
                Ok(found) => Reply::Integer(i64::from(found)),
                Err(error) => refusal(&error),
            },
            Err(_) => Reply::Integer(0),
        };
    }
    if args.len() != 1 {
        return wrong_args(lower);
    }
    match conn.events.groups().await {
        Ok(groups) => Reply::Array(
            groups
                .into_iter()
                .map(|g| {
                    Reply::Map(vec![
                        (bulk(b"id"), bulk(g.id.as_bytes())),
                        (
                            bulk(b"user"),
                            g.user
                                .as_deref()
                                .map_or(Reply::Null, |u| bulk(u.as_bytes())),
                        ),
                        (
                            bulk(b"kind"),
                            bulk(if g.pattern { b"pattern" } else { b"channel" }),
                        ),
                        (bulk(b"subscription"), bulk(&g.subscription)),
                        (bulk(b"members_here"), Reply::Integer(g.members_here as i64)),
                        (bulk(b"waiting"), Reply::Integer(g.waiting)),
                        (bulk(b"last_seen_ms"), Reply::Integer(g.last_seen_ms as i64)),
                    ])
                })
                .collect(),
        ),
        Err(error) => refusal(&error),
    }
}

fn text(arg: &[u8], what: &str) -> Result<String, Reply> {
    String::from_utf8(arg.to_vec()).map_err(|_| Reply::Error(format!("ERR {what} must be UTF-8")))
}

fn number(arg: Option<&Vec<u8>>, what: &str) -> Result<u64, Reply> {
    arg.and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Reply::Error(format!("ERR {what} must be a non-negative integer")))
}

fn json(arg: &[u8]) -> Result<Box<RawValue>, Reply> {
    let text = text(arg, "PAYLOAD")?;
    RawValue::from_string(text).map_err(|e| Reply::Error(format!("ERR PAYLOAD is not JSON: {e}")))
}

/// `PUNCTUAL.SCHEDULE`'s options as the service's request.
fn schedule_request(args: &[Vec<u8>]) -> Result<ScheduleRequest, Reply> {
    let mut request = ScheduleRequest::default();
    let mut i = 2;
    while i < args.len() {
        let option = args[i].to_ascii_lowercase();
        let value = args.get(i + 1);
        let Some(value) = value else {
            return Err(Reply::Error("ERR syntax error".into()));
        };
        match option.as_slice() {
            b"id" => request.id = Some(text(value, "ID")?),
            b"delay" => request.delay_ms = Some(number(Some(value), "DELAY")?),
            b"at" => {
                request.run_at = Some(punctual_core::time::format_rfc3339_ms(number(
                    Some(value),
                    "AT",
                )?))
            }
            b"payload" => request.payload = Some(json(value)?),
            b"maxattempts" => {
                request.max_attempts = Some(
                    u32::try_from(number(Some(value), "MAXATTEMPTS")?)
                        .map_err(|_| Reply::Error("ERR MAXATTEMPTS is too large".into()))?,
                )
            }
            b"backoff" => {
                let steps: Result<Vec<u64>, _> = text(value, "BACKOFF")?
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect();
                request.backoff_ms = Some(steps.map_err(|_| {
                    Reply::Error("ERR BACKOFF is a comma-separated list of ms".into())
                })?);
            }
            b"lease" => request.lease_ms = Some(number(Some(value), "LEASE")?),
            _ => return Err(Reply::Error("ERR syntax error".into())),
        }
        i += 2;
    }
    Ok(request)
}

/// A task's fields, as a map.
pub fn task_reply(task: &Task) -> Reply {
    let bulk = |s: &str| Reply::Bulk(s.as_bytes().to_vec());
    let int = |n: u64| Reply::Integer(n as i64);
    let mut fields = vec![
        (bulk("queue"), bulk(&task.queue)),
        (bulk("id"), bulk(&task.id)),
        (bulk("state"), bulk(task.state.as_str())),
        (
            bulk("payload"),
            task.payload.as_deref().map_or(Reply::Null, bulk),
        ),
        (bulk("run_at_ms"), int(task.run_at_ms)),
        (bulk("attempt"), int(u64::from(task.attempt))),
        (bulk("max_attempts"), int(u64::from(task.max_attempts))),
        (bulk("created_at_ms"), int(task.created_at_ms)),
        (
            bulk("last_error"),
            task.last_error.as_deref().map_or(Reply::Null, bulk),
        ),
    ];
    if let Some(lease) = &task.lease {
        fields.push((bulk("lease_token"), bulk(&lease.token)));
        fields.push((bulk("lease_expires_at_ms"), int(lease.expires_at_ms)));
    }
    Reply::Map(fields)
}

fn settled(result: Result<Settled, ApiError>) -> Reply {
    match result {
        Ok(Settled::Updated(task)) => task_reply(&task),
        Ok(Settled::Done) => Reply::ok(),
        Err(error) => refusal(&error),
    }
}

/// The reply to one schedule.
pub fn scheduled(result: Result<(bool, Task), ApiError>) -> Reply {
    match result {
        Ok((created, task)) => Reply::Array(vec![
            Reply::Bulk(task.id.into_bytes()),
            Reply::Integer(i64::from(created)),
        ]),
        Err(error) => refusal(&error),
    }
}

pub async fn run(conn: &mut Conn, lower: &str, args: &[Vec<u8>]) -> Step {
    if matches!(lower, "punctual.groups" | "punctual.forget") {
        return Step::Reply(groups(conn, lower, args).await);
    }
    let Some(queue) = args.get(1) else {
        return Step::Reply(wrong_args(lower));
    };
    let queue = match text(queue, "the queue") {
        Ok(queue) => queue,
        Err(reply) => return Step::Reply(reply),
    };
    let service = conn.service.clone();
    let reply = match lower {
        "punctual.schedule" => match schedule_request(args) {
            Ok(request) => return Step::Schedule(queue, vec![Ok(request)], false),
            Err(reply) => reply,
        },
        "punctual.batch" => {
            if args.len() < 3 {
                return Step::Reply(wrong_args(lower));
            }
            let items = args[2..]
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    crate::decode::decode_at::<ScheduleRequest>(
                        raw,
                        &format!("tasks[{i}]"),
                        "a task object",
                    )
                })
                .collect();
            return Step::Schedule(queue, items, true);
        }
        "punctual.reserve" => {
            let mut request = ReserveRequest::default();
            let mut i = 2;
            while i < args.len() {
                let value = args.get(i + 1);
                let parsed = match args[i].to_ascii_lowercase().as_slice() {
                    b"count" => number(value, "COUNT").map(|n| request.max = Some(n as usize)),
                    b"wait" => number(value, "WAIT").map(|n| request.wait_ms = Some(n)),
                    b"lease" => number(value, "LEASE").map(|n| request.lease_ms = Some(n)),
                    _ => Err(Reply::Error("ERR syntax error".into())),
                };
                if let Err(reply) = parsed {
                    return Step::Reply(reply);
                }
                i += 2;
            }
            match service.reserve(&queue, request).await {
                Ok(tasks) => Reply::Array(tasks.iter().map(task_reply).collect()),
                Err(error) => refusal(&error),
            }
        }
        "punctual.ack" => {
            if args.len() < 4 || !args.len().is_multiple_of(2) {
                return Step::Reply(wrong_args(lower));
            }
            let items: Result<Vec<AckItem>, Reply> = args[2..]
                .chunks(2)
                .map(|pair| {
                    Ok(AckItem {
                        id: text(&pair[0], "the id")?,
                        lease_token: text(&pair[1], "the token")?,
                    })
                })
                .collect();
            match items {
                Err(reply) => reply,
                Ok(items) if items.len() == 1 => {
                    let item = &items[0];
                    settled(
                        service
                            .ack(&queue, &item.id, item.lease_token.clone())
                            .await,
                    )
                }
                Ok(items) => match service.ack_many(&queue, &items).await {
                    Ok(errors) => match errors.iter().flatten().next() {
                        Some(error) if errors.iter().all(Option::is_some) => refusal(error),
                        _ => Reply::Integer(errors.iter().filter(|e| e.is_none()).count() as i64),
                    },
                    Err(error) => refusal(&error),
                },
            }
        }
        "punctual.nack" => {
            if args.len() < 4 {
                return Step::Reply(wrong_args(lower));
            }
            let (id, token) = match (text(&args[2], "the id"), text(&args[3], "the token")) {
                (Ok(id), Ok(token)) => (id, token),
                (Err(reply), _) | (_, Err(reply)) => return Step::Reply(reply),
            };
            let mut request = NackRequest {
                lease_token: token,
                error: None,
                delay_ms: None,
            };
            let mut i = 4;
            while i < args.len() {
                let value = args.get(i + 1);
                let parsed = match args[i].to_ascii_lowercase().as_slice() {
                    b"error" => value
                        .ok_or_else(|| Reply::Error("ERR syntax error".into()))
                        .and_then(|v| text(v, "ERROR"))
                        .map(|e| request.error = Some(e)),
                    b"delay" => number(value, "DELAY").map(|n| request.delay_ms = Some(n)),
                    _ => Err(Reply::Error("ERR syntax error".into())),
                };
                if let Err(reply) = parsed {
                    return Step::Reply(reply);
                }
                i += 2;
            }
            settled(service.nack(&queue, &id, request).await)
        }
        "punctual.extend" => {
            if args.len() != 5 {
                return Step::Reply(wrong_args(lower));
            }
            match (
                text(&args[2], "the id"),
                text(&args[3], "the token"),
                number(args.get(4), "the lease"),
            ) {
                (Ok(id), Ok(token), Ok(ms)) => {
                    settled(service.extend(&queue, &id, token, ms).await)
                }
                (Err(reply), ..) | (_, Err(reply), _) | (.., Err(reply)) => reply,
            }
        }
        "punctual.get" | "punctual.cancel" => {
            if args.len() != 3 {
                return Step::Reply(wrong_args(lower));
            }
            let id = match text(&args[2], "the id") {
                Ok(id) => id,
                Err(reply) => return Step::Reply(reply),
            };
            if lower == "punctual.get" {
                match service.get(&queue, &id).await {
                    Ok(task) => task_reply(&task),
                    Err(error) if error.code == "not_found" => Reply::Null,
                    Err(error) => refusal(&error),
                }
            } else {
                match service.cancel(&queue, &id).await {
                    Ok(_) => Reply::Integer(1),
                    Err(error) if error.code == "not_found" => Reply::Integer(0),
                    Err(error) => refusal(&error),
                }
            }
        }
        _ => super::conn::unknown(lower, args),
    };
    Step::Reply(reply)
}
