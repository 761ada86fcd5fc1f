//! The on-disk encoding of a task record: compact, little-endian, versioned.
//!
//! Queue and id live in the table key, so the value holds only the rest:
//!
//! ```text
//! version u8 | state u8 | flags u8 | run_at_ms u64 | attempt u32 | max_attempts u32
//! | created_at_ms u64 | updated_at_ms u64 | fingerprint u64
//! | backoff: kind u8, then ladder (count u16, steps u64…) or exponential (initial u64, factor f64, max u64, jitter u8)
//! | [lease_ms u64] | [purge_at_ms u64] | [lease: token (u16 len + bytes), expires_at_ms u64]
//! | [last_error: u32 len + bytes] | [webhook: u32 len + JSON] | payload: the remaining bytes (JSON text)
//! ```
//! `[…]` parts are present when their flag bit is set.

use punctual_core::{Backoff, Task, TaskState, Webhook, task::Lease};

use crate::StoreError;

/// Version of the record layout and of the table layout in `redb_store`.
///
/// Bump it when either changes incompatibly, and teach `RedbStore::open` to migrate or refuse older files
/// (it refuses a file whose `meta.format_version` differs, naming both versions).
pub const FORMAT_VERSION: u8 = 1;

const HAS_LEASE_MS: u8 = 1;
const HAS_PURGE_AT: u8 = 2;
const HAS_LEASE: u8 = 4;
const HAS_ERROR: u8 = 8;
const HAS_WEBHOOK: u8 = 16;
const HAS_PAYLOAD: u8 = 32;

fn state_byte(state: TaskState) -> u8 {
    state.index() as u8
}

/// Whether an encoded record is of a `scheduled` task, read from its state byte alone.
pub fn is_scheduled(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT_VERSION)
        && bytes.get(1) == Some(&state_byte(TaskState::Scheduled))
}

pub fn encode(task: &Task) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + task.payload.as_ref().map_or(0, String::len));
    encode_into(task, &mut out);
    out
}

/// [`encode`], appending to `out`.
pub fn encode_into(task: &Task, out: &mut Vec<u8>) {
    let payload = task.payload.as_deref().map(str::as_bytes);
    let webhook = task
        .webhook
        .as_ref()
        .map(|w| serde_json::to_vec(w).unwrap_or_default());
    out.reserve(64 + payload.map_or(0, <[u8]>::len));
    let mut flags = 0;
    for (present, bit) in [
        (task.lease_ms.is_some(), HAS_LEASE_MS),
        (task.purge_at_ms.is_some(), HAS_PURGE_AT),
        (task.lease.is_some(), HAS_LEASE),
        (task.last_error.is_some(), HAS_ERROR),
        (webhook.is_some(), HAS_WEBHOOK),
        (payload.is_some(), HAS_PAYLOAD),
    ] {
        if present {
            flags |= bit;
        }
    }
    out.push(FORMAT_VERSION);
    out.push(state_byte(task.state));
    out.push(flags);
    out.extend_from_slice(&task.run_at_ms.to_le_bytes());
    out.extend_from_slice(&task.attempt.to_le_bytes());
    out.extend_from_slice(&task.max_attempts.to_le_bytes());
    out.extend_from_slice(&task.created_at_ms.to_le_bytes());
    out.extend_from_slice(&task.updated_at_ms.to_le_bytes());
    out.extend_from_slice(&task.fingerprint.to_le_bytes());
    match &task.backoff {
        Backoff::Ladder { steps_ms } => {
            out.push(0);
            out.extend_from_slice(&(steps_ms.len() as u16).to_le_bytes());
            for step in steps_ms {
                out.extend_from_slice(&step.to_le_bytes());
            }
        }
        Backoff::Exponential {
            initial_ms,
            factor,
            max_ms,
            jitter,
        } => {
            out.push(1);
            out.extend_from_slice(&initial_ms.to_le_bytes());
            out.extend_from_slice(&factor.to_le_bytes());
            out.extend_from_slice(&max_ms.to_le_bytes());
            out.push(u8::from(*jitter));
        }
    }
    if let Some(lease_ms) = task.lease_ms {
        out.extend_from_slice(&lease_ms.to_le_bytes());
    }
    if let Some(purge_at_ms) = task.purge_at_ms {
        out.extend_from_slice(&purge_at_ms.to_le_bytes());
    }
    if let Some(lease) = &task.lease {
        out.extend_from_slice(&(lease.token.len() as u16).to_le_bytes());
        out.extend_from_slice(lease.token.as_bytes());
        out.extend_from_slice(&lease.expires_at_ms.to_le_bytes());
    }
    if let Some(error) = &task.last_error {
        out.extend_from_slice(&(error.len() as u32).to_le_bytes());
        out.extend_from_slice(error.as_bytes());
    }
    if let Some(webhook) = &webhook {
        out.extend_from_slice(&(webhook.len() as u32).to_le_bytes());
        out.extend_from_slice(webhook);
    }
    if let Some(payload) = payload {
        out.extend_from_slice(payload);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("record cut short at byte {}", self.pos))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| "u16")?,
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "u32")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }
    fn text(&mut self, len: usize) -> Result<String, String> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|e| e.to_string())
    }
    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }
}

pub fn decode(queue: &str, id: &str, bytes: &[u8]) -> Result<Task, StoreError> {
    decode_inner(queue, id, bytes).map_err(|reason| StoreError::Corrupt {
        queue: queue.to_owned(),
        id: id.to_owned(),
        reason,
    })
}

fn decode_inner(queue: &str, id: &str, bytes: &[u8]) -> Result<Task, String> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "record version {version} (expected {FORMAT_VERSION})"
        ));
    }
    let state_index = r.u8()?;
    let state = *TaskState::ALL
        .get(usize::from(state_index))
        .ok_or_else(|| format!("unknown state {state_index}"))?;
    let flags = r.u8()?;
    let run_at_ms = r.u64()?;
    let attempt = r.u32()?;
    let max_attempts = r.u32()?;
    let created_at_ms = r.u64()?;
    let updated_at_ms = r.u64()?;
    let fingerprint = r.u64()?;
    let backoff = match r.u8()? {
        0 => {
            let count = r.u16()?;
            let steps_ms = (0..count).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Backoff::Ladder { steps_ms }
        }
        1 => Backoff::Exponential {
            initial_ms: r.u64()?,
            factor: f64::from_bits(r.u64()?),
            max_ms: r.u64()?,
            jitter: r.u8()? != 0,
        },
        kind => return Err(format!("unknown backoff kind {kind}")),
    };
    let lease_ms = if flags & HAS_LEASE_MS != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let purge_at_ms = if flags & HAS_PURGE_AT != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let lease = if flags & HAS_LEASE != 0 {
        let len = usize::from(r.u16()?);
        let token = r.text(len)?;
        Some(Lease {
            token,
            expires_at_ms: r.u64()?,
        })
    } else {
        None
    };
    let last_error = if flags & HAS_ERROR != 0 {
        let len = r.u32()? as usize;
        Some(r.text(len)?)
    } else {
        None
    };
    let webhook: Option<Webhook> = if flags & HAS_WEBHOOK != 0 {
        let len = r.u32()? as usize;
        Some(serde_json::from_slice(r.take(len)?).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let payload = if flags & HAS_PAYLOAD != 0 {
        Some(String::from_utf8(r.rest().to_vec()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    Ok(Task {
        queue: queue.to_owned(),
        id: id.to_owned(),
        payload,
        state,
        run_at_ms,
        attempt,
        max_attempts,
        backoff,
        webhook,
        lease_ms,
        created_at_ms,
        updated_at_ms,
        last_error,
        lease,
        purge_at_ms,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sample() -> Task {
        Task {
            queue: "q".into(),
            id: "i".into(),
            payload: Some("{\"a\":[1,2]}".into()),
            state: TaskState::Leased,
            run_at_ms: 1,
            attempt: 2,
            max_attempts: 3,
            backoff: Backoff::Ladder {
                steps_ms: vec![10, 20],
            },
            webhook: Some(Webhook {
                url: "http://x/y".into(),
                headers: BTreeMap::from([("k".into(), "v".into())]),
                timeout_ms: Some(5),
            }),
            lease_ms: Some(400),
            created_at_ms: 4,
            updated_at_ms: 5,
            last_error: Some("é".into()),
            lease: Some(Lease {
                token: "tok".into(),
                expires_at_ms: 6,
            }),
            purge_at_ms: Some(7),
            fingerprint: 8,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let full = sample();
        assert_eq!(decode("q", "i", &encode(&full)).unwrap(), full);
        let bare = Task {
            payload: None,
            webhook: None,
            lease_ms: None,
            last_error: None,
            lease: None,
            purge_at_ms: None,
            backoff: Backoff::default(),
            ..sample()
        };
        assert_eq!(decode("q", "i", &encode(&bare)).unwrap(), bare);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() - 12 {
            // Cutting into the fixed part or the optional sections must fail cleanly (the payload
            // is the tail, so only cuts before it are detectable).
            let _ = decode("q", "i", &bytes[..cut]);
        }
        assert!(decode("q", "i", &bytes[..10]).is_err());
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 99;
        assert!(
            decode("q", "i", &wrong_version)
                .unwrap_err()
                .to_string()
                .contains("version 99")
        );
    }
}
