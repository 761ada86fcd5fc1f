//! `SUBSCRIBE`, `PSUBSCRIBE`, `UNSUBSCRIBE`, `PUNSUBSCRIBE`, with Redis's frames and counts, and the
//! frames of the events themselves. In RESP3 all of them are push frames (`>`).

use super::conn::{Conn, wrong_args};
use super::events::Delivery;
use super::frame::Reply;

pub fn handles(lower: &str) -> bool {
    matches!(
        lower,
        "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe"
    )
}

fn bulk(bytes: &[u8]) -> Reply {
    Reply::Bulk(bytes.to_vec())
}

fn confirm(kind: &str, name: Option<&[u8]>, count: usize) -> Reply {
    Reply::Push(vec![
        bulk(kind.as_bytes()),
        name.map_or(Reply::Null, bulk),
        Reply::Integer(count as i64),
    ])
}

/// The frame of one event: `message channel payload` or `pmessage pattern channel payload`.
pub fn message(delivery: &Delivery) -> Reply {
    match &delivery.pattern {
        Some(pattern) => Reply::Push(vec![
            bulk(b"pmessage"),
            bulk(pattern),
            bulk(&delivery.channel),
            bulk(&delivery.message),
        ]),
        None => Reply::Push(vec![
            bulk(b"message"),
            bulk(&delivery.channel),
            bulk(&delivery.message),
        ]),
    }
}

/// Runs one of the four commands; several confirmations are one reply of several frames.
pub fn run(conn: &mut Conn, lower: &str, args: &[Vec<u8>]) -> Reply {
    let pattern = lower.starts_with('p');
    let kind = &lower[usize::from(pattern)..];
    let mut frames = Vec::new();
    if kind == "subscribe" {
        if args.len() < 2 {
            return wrong_args(lower);
        }
        for name in &args[1..] {
            let list = if pattern {
                &mut conn.patterns
            } else {
                &mut conn.channels
            };
            if !list.contains(name) {
                list.push(name.clone());
            }
            frames.push(confirm(lower, Some(name), conn.subscriptions()));
        }
    } else {
        let names: Vec<Vec<u8>> = if args.len() > 1 {
            args[1..].to_vec()
        } else if pattern {
            conn.patterns.clone()
        } else {
            conn.channels.clone()
        };
        if names.is_empty() {
            frames.push(confirm(lower, None, conn.subscriptions()));
        }
        for name in &names {
            let list = if pattern {
                &mut conn.patterns
            } else {
                &mut conn.channels
            };
            list.retain(|n| n != name);
            frames.push(confirm(lower, Some(name), conn.subscriptions()));
        }
    }
    conn.sync_subscriptions();
    Reply::Many(frames)
}
