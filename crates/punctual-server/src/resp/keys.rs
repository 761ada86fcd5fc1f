//! The key commands: a key is a task of the database's queue (see `docs/redis-protocol.md`).
//!
//! `SET` and its family, `DEL`, `EXPIRE` and its family, and `INCR` and its family are batched
//! writes; `GET`, `EXISTS`, `TTL`, `PTTL`, `PERSIST`, `DBSIZE` and `FLUSHDB` run alone, after the
//! writes sent before them.

use punctual_core::NEVER_MS;
use punctual_store::PutWhen;

use super::conn::{Conn, Render, Step, wrong_args};
use super::frame::Reply;
use crate::error::ApiError;
use crate::service::{KeyAnswer, KeyOp, key_value};

const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

pub fn handles(lower: &str) -> bool {
    batchable(lower)
        || matches!(
            lower,
            "get"
                | "exists"
                | "ttl"
                | "pttl"
                | "persist"
                | "dbsize"
                | "flushdb"
                | "flushall"
                | "expiretime"
                | "pexpiretime"
        )
}

/// The key writes that are committed together when pipelined.
pub fn batchable(lower: &str) -> bool {
    matches!(
        lower,
        "set"
            | "setex"
            | "psetex"
            | "setnx"
            | "del"
            | "unlink"
            | "incr"
            | "incrby"
            | "decr"
            | "decrby"
            | "expire"
            | "pexpire"
            | "expireat"
            | "pexpireat"
    )
}

fn error(text: impl Into<String>) -> Step {
    Step::Reply(Reply::Error(text.into()))
}

/// A service refusal as a Redis error line.
pub fn refusal(error: &ApiError) -> Reply {
    if error.code == "invalid_field" && error.message.contains("not an integer") {
        return Reply::Error(NOT_INTEGER.into());
    }
    let prefix = match error.code {
        "key_firing" => "BUSYKEY",
        "store_poisoned" | "store_unavailable" | "unavailable" | "server_busy" => "TRYAGAIN",
        "insufficient_storage" => "OOM",
        _ => "ERR",
    };
    Reply::Error(format!("{prefix} {}", error.message))
}

fn integer(arg: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(arg).ok()?;
    if text.is_empty() || text.len() > 20 || text.starts_with('+') {
        return None;
    }
    text.parse().ok()
}

/// A TTL's due time: `Err` with Redis's text when it is not a positive time within the limit.
fn due(
    conn: &Conn,
    now_ms: u64,
    unit_ms: u64,
    absolute: bool,
    arg: &[u8],
    cmd: &str,
) -> Result<u64, Reply> {
    let Some(n) = integer(arg) else {
        return Err(Reply::Error(NOT_INTEGER.into()));
    };
    let invalid = || Reply::Error(format!("ERR invalid expire time in '{cmd}' command"));
    if n <= 0 {
        return Err(invalid());
    }
    let ms = (n as u64).checked_mul(unit_ms).ok_or_else(invalid)?;
    let at = if absolute {
        ms
    } else {
        now_ms.checked_add(ms).ok_or_else(invalid)?
    };
    if at > now_ms.saturating_add(conn.service.config.limits.max_delay_ms) {
        return Err(invalid());
    }
    Ok(at)
}

fn key(conn: &Conn, arg: &[u8]) -> Result<String, Reply> {
    conn.service.key_id(arg).map_err(|e| refusal(&e))
}

fn put(
    conn: &Conn,
    key_arg: &[u8],
    value: &[u8],
    run_at_ms: u64,
    when: PutWhen,
    keep_due: bool,
) -> Result<KeyOp, Reply> {
    Ok(KeyOp::Put {
        key: key(conn, key_arg)?,
        payload: conn.service.key_payload(value).map_err(|e| refusal(&e))?,
        run_at_ms,
        when,
        keep_due,
    })
}

fn keys_step(op: Result<KeyOp, Reply>, render: Render) -> Step {
    match op {
        Ok(op) => Step::Keys(vec![op], render),
        Err(reply) => Step::Reply(reply),
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`, options in any order and case.
fn set(conn: &Conn, args: &[Vec<u8>], now_ms: u64) -> Step {
    if args.len() < 3 {
        return Step::Reply(wrong_args("set"));
    }
    let (mut when, mut get, mut keep) = (PutWhen::Always, false, false);
    let mut expiry: Option<(u64, bool, &[u8])> = None;
    let mut i = 3;
    while i < args.len() {
        let option = args[i].to_ascii_lowercase();
        let next = args.get(i + 1);
        match option.as_slice() {
            b"nx" if when != PutWhen::Present => when = PutWhen::Absent,
            b"xx" if when != PutWhen::Absent => when = PutWhen::Present,
            b"get" => get = true,
            b"keepttl" if expiry.is_none() => keep = true,
            b"ex" | b"px" | b"exat" | b"pxat" if expiry.is_none() && !keep && next.is_some() => {
                let (unit, absolute) = match option.as_slice() {
                    b"ex" => (1000, false),
                    b"px" => (1, false),
                    b"exat" => (1000, true),
                    _ => (1, true),
                };
                expiry = Some((unit, absolute, next.map(Vec::as_slice).unwrap_or_default()));
                i += 1;
            }
            _ => return error("ERR syntax error"),
        }
        i += 1;
    }
    let run_at_ms = match expiry {
        None => NEVER_MS,
        Some((unit, absolute, arg)) => {
            // `EXAT`/`PXAT` in the past is allowed: the key is set and fires at once.
            if absolute {
                match integer(arg) {
                    Some(n) if n > 0 => match (n as u64).checked_mul(unit) {
                        Some(at)
                            if at
                                <= now_ms
                                    .saturating_add(conn.service.config.limits.max_delay_ms) =>
                        {
                            at
                        }
                        _ => return error("ERR invalid expire time in 'set' command"),
                    },
                    Some(_) => return error("ERR invalid expire time in 'set' command"),
                    None => return error(NOT_INTEGER),
                }
            } else {
                match due(conn, now_ms, unit, false, arg, "set") {
                    Ok(at) => at,
                    Err(reply) => return Step::Reply(reply),
                }
            }
        }
    };
    keys_step(
        put(conn, &args[1], &args[2], run_at_ms, when, keep),
        Render::Set { get },
    )
}

pub async fn run(conn: &mut Conn, lower: &str, args: &[Vec<u8>], now_ms: u64) -> Step {
    let argc = args.len();
    match lower {
        "set" => set(conn, args, now_ms),
        "setex" | "psetex" => {
            if argc != 4 {
                return Step::Reply(wrong_args(lower));
            }
            let unit = if lower == "setex" { 1000 } else { 1 };
            let op = due(conn, now_ms, unit, false, &args[2], lower)
                .and_then(|at| put(conn, &args[1], &args[3], at, PutWhen::Always, false));
            keys_step(op, Render::Set { get: false })
        }
        "setnx" => {
            if argc != 3 {
                return Step::Reply(wrong_args(lower));
            }
            let op = put(conn, &args[1], &args[2], NEVER_MS, PutWhen::Absent, false);
            keys_step(op, Render::Flag)
        }
        "del" | "unlink" => {
            if argc < 2 {
                return Step::Reply(wrong_args(lower));
            }
            let mut ops = Vec::with_capacity(argc - 1);
            for arg in &args[1..] {
                match key(conn, arg) {
                    Ok(key) => ops.push(KeyOp::Delete { key }),
                    // A key that cannot exist is not deleted.
                    Err(_) => continue,
                }
            }
            if ops.is_empty() {
                return Step::Reply(Reply::Integer(0));
            }
            let n = ops.len();
            Step::Keys(ops, Render::Count(n))
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let with_amount = lower.ends_with("by");
            if argc != if with_amount { 3 } else { 2 } {
                return Step::Reply(wrong_args(lower));
            }
            let by = if with_amount {
                match integer(&args[2]) {
                    Some(n) => n,
                    None => return error(NOT_INTEGER),
                }
            } else {
                1
            };
            let by = if lower.starts_with("decr") {
                match by.checked_neg() {
                    Some(n) => n,
                    None => return error("ERR decrement would overflow"),
                }
            } else {
                by
            };
            keys_step(
                key(conn, &args[1]).map(|key| KeyOp::Incr { key, by }),
                Render::Integer,
            )
        }
        "expire" | "pexpire" | "expireat" | "pexpireat" => expire(conn, lower, args, now_ms).await,
        "get" => {
            if argc != 2 {
                return Step::Reply(wrong_args(lower));
            }
            match live(conn, &args[1]).await {
                Ok(Some(task)) => Step::Reply(Reply::Bulk(key_value(&task))),
                Ok(None) => Step::Reply(Reply::Null),
                Err(reply) => Step::Reply(reply),
            }
        }
        "exists" => {
            if argc < 2 {
                return Step::Reply(wrong_args(lower));
            }
            let mut n = 0;
            for arg in &args[1..] {
                match live(conn, arg).await {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => {}
                    Err(reply) => return Step::Reply(reply),
                }
            }
            Step::Reply(Reply::Integer(n))
        }
        "ttl" | "pttl" | "expiretime" | "pexpiretime" => {
            if argc != 2 {
                return Step::Reply(wrong_args(lower));
            }
            let task = match live(conn, &args[1]).await {
                Ok(task) => task,
                Err(reply) => return Step::Reply(reply),
            };
            let answer = match task {
                None => -2,
                Some(t) if t.run_at_ms == NEVER_MS => -1,
                Some(t) => match lower {
                    "ttl" => (t.run_at_ms.saturating_sub(now_ms) as i64 + 500) / 1000,
                    "pttl" => t.run_at_ms.saturating_sub(now_ms) as i64,
                    "expiretime" => (t.run_at_ms / 1000) as i64,
                    _ => t.run_at_ms as i64,
                },
            };
            Step::Reply(Reply::Integer(answer))
        }
        "persist" => {
            if argc != 2 {
                return Step::Reply(wrong_args(lower));
            }
            match live(conn, &args[1]).await {
                Ok(Some(task)) if task.run_at_ms != NEVER_MS => {
                    let op = KeyOp::SetDue {
                        key: task.id,
                        run_at_ms: NEVER_MS,
                    };
                    Step::Keys(vec![op], Render::Flag)
                }
                Ok(_) => Step::Reply(Reply::Integer(0)),
                Err(reply) => Step::Reply(reply),
            }
        }
        "dbsize" => {
            if argc != 1 {
                return Step::Reply(wrong_args(lower));
            }
            match conn.service.queue(conn.queue()).await {
                Ok(counts) => Step::Reply(Reply::Integer(
                    counts.get(punctual_core::TaskState::Scheduled) as i64,
                )),
                Err(error) => Step::Reply(refusal(&error)),
            }
        }
        "flushdb" | "flushall" => {
            let options_ok = args[1..]
                .iter()
                .all(|a| a.eq_ignore_ascii_case(b"async") || a.eq_ignore_ascii_case(b"sync"));
            if argc > 2 || !options_ok {
                return error("ERR syntax error");
            }
            let dbs: Vec<u32> = if lower == "flushall" {
                (0..conn.events.options.databases).collect()
            } else {
                vec![conn.db]
            };
            for db in dbs {
                if let Err(error) = flush(conn, db).await {
                    return Step::Reply(refusal(&error));
                }
            }
            Step::Reply(Reply::ok())
        }
        _ => Step::Reply(super::conn::unknown(lower, args)),
    }
}

/// The live key named by `arg`, if any; a key that cannot be a task id does not exist.
async fn live(conn: &Conn, arg: &[u8]) -> Result<Option<punctual_core::Task>, Reply> {
    let Ok(key) = conn.service.key_id(arg) else {
        return Ok(None);
    };
    conn.service
        .live_key(&conn.queue(), &key)
        .await
        .map_err(|e| refusal(&e))
}

/// `EXPIRE key seconds [NX|XX|GT|LT]` and its ms and absolute forms. A time at or before now deletes
/// the key (Redis emits `del`, not `expired`, for it).
async fn expire(conn: &Conn, lower: &str, args: &[Vec<u8>], now_ms: u64) -> Step {
    if !(3..=4).contains(&args.len()) {
        return Step::Reply(wrong_args(lower));
    }
    let (unit, absolute) = match lower {
        "expire" => (1000, false),
        "pexpire" => (1, false),
        "expireat" => (1000, true),
        _ => (1, true),
    };
    let Some(n) = integer(&args[2]) else {
        return error(NOT_INTEGER);
    };
    let invalid = || error(format!("ERR invalid expire time in '{lower}' command"));
    let at: Option<u64> = if n <= 0 {
        None
    } else {
        let Some(ms) = (n as u64).checked_mul(unit) else {
            return invalid();
        };
        let at = if absolute {
            Some(ms)
        } else {
            now_ms.checked_add(ms)
        };
        match at {
            Some(at) if at > now_ms.saturating_add(conn.service.config.limits.max_delay_ms) => {
                return invalid();
            }
            Some(at) if at <= now_ms => None,
            Some(at) => Some(at),
            None => return invalid(),
        }
    };
    let Ok(key) = conn.service.key_id(&args[1]) else {
        return Step::Reply(Reply::Integer(0));
    };
    if let Some(option) = args.get(3) {
        let option = option.to_ascii_lowercase();
        if !matches!(option.as_slice(), b"nx" | b"xx" | b"gt" | b"lt") {
            return error(format!(
                "ERR Unsupported option {}",
                String::from_utf8_lossy(&args[3])
            ));
        }
        let current = match conn.service.live_key(&conn.queue(), &key).await {
            Ok(Some(task)) => task,
            Ok(None) => return Step::Reply(Reply::Integer(0)),
            Err(error) => return Step::Reply(refusal(&error)),
        };
        let has_ttl = current.run_at_ms != NEVER_MS;
        let new = at.unwrap_or(now_ms);
        let go = match option.as_slice() {
            b"nx" => !has_ttl,
            b"xx" => has_ttl,
            // A key without a TTL counts as an infinite one.
            b"gt" => has_ttl && new > current.run_at_ms,
            _ => !has_ttl || new < current.run_at_ms,
        };
        if !go {
            return Step::Reply(Reply::Integer(0));
        }
    }
    let op = match at {
        Some(run_at_ms) => KeyOp::SetDue { key, run_at_ms },
        None => KeyOp::Delete { key },
    };
    Step::Keys(vec![op], Render::Flag)
}

/// Deletes every live key of `db`, a page at a time.
async fn flush(conn: &Conn, db: u32) -> Result<(), ApiError> {
    let queue = conn.events.queue(db);
    loop {
        let page = conn
            .service
            .list(
                &queue,
                Some(punctual_core::TaskState::Scheduled),
                None,
                Some(1000),
            )
            .await?;
        if page.tasks.is_empty() {
            return Ok(());
        }
        let ops: Vec<KeyOp> = page
            .tasks
            .into_iter()
            .map(|t| KeyOp::Delete { key: t.id })
            .collect();
        conn.service.keys(&queue, &ops).await?;
    }
}

/// The reply of one batched command from its answers.
pub fn render(render: Render, answers: Vec<Result<KeyAnswer, String>>) -> Reply {
    let mut replies = answers.into_iter().map(|answer| match answer {
        Err(message) => Err(Reply::Error(format!("TRYAGAIN {message}"))),
        Ok(KeyAnswer::Refused(error)) => Err(refusal(&error)),
        Ok(answer) => Ok(answer),
    });
    match render {
        Render::Count(_) => {
            let mut n = 0;
            for answer in replies {
                match answer {
                    Ok(KeyAnswer::Done(true)) => n += 1,
                    Ok(_) => {}
                    Err(reply) => return reply,
                }
            }
            Reply::Integer(n)
        }
        render => match replies.next() {
            None => Reply::Null,
            Some(Err(reply)) => reply,
            Some(Ok(answer)) => match (render, answer) {
                (Render::Set { get: true }, KeyAnswer::Put { previous, .. }) => match previous {
                    Some(task) => Reply::Bulk(key_value(&task)),
                    None => Reply::Null,
                },
                (Render::Set { get: false }, KeyAnswer::Put { written: true, .. }) => Reply::ok(),
                (Render::Set { get: false }, KeyAnswer::Put { written: false, .. }) => Reply::Null,
                (Render::Flag, KeyAnswer::Put { written, .. }) => {
                    Reply::Integer(i64::from(written))
                }
                (Render::Flag, KeyAnswer::Done(done)) => Reply::Integer(i64::from(done)),
                (Render::Integer, KeyAnswer::Integer(n)) => Reply::Integer(n),
                (_, answer) => Reply::Error(format!("ERR unexpected answer {answer:?}")),
            },
        },
    }
}
