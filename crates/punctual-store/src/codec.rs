//! The on-disk encoding of a task record.
//!
//! Layout: `[version: u8][header length: u32 LE][header: JSON of Task without payload][payload: JSON text]`.
//! The payload is kept raw after the header so a 1 MiB payload is never escaped or re-parsed.
//! An empty payload section means "no payload" (valid JSON text is never empty).

use punctual_core::Task;

use crate::StoreError;

/// Version of the record layout and of the table layout in `redb_store`.
///
/// Bump it when either changes incompatibly, and teach `RedbStore::open` to migrate or refuse older files.
pub const FORMAT_VERSION: u8 = 1;

pub fn encode(task: &Task) -> Vec<u8> {
    let header = serde_json::to_vec(task).unwrap_or_default();
    let payload = task.payload.as_deref().unwrap_or("").as_bytes();
    let mut out = Vec::with_capacity(5 + header.len() + payload.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

pub fn decode(queue: &str, id: &str, bytes: &[u8]) -> Result<Task, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        queue: queue.to_owned(),
        id: id.to_owned(),
        reason,
    };
    if bytes.len() < 5 {
        return Err(corrupt("record shorter than its header".into()));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(corrupt(format!("record version {} (expected {FORMAT_VERSION})", bytes[0])));
    }
    let header_len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let header = bytes
        .get(5..5 + header_len)
        .ok_or_else(|| corrupt("header length beyond the record".into()))?;
    let mut task: Task = serde_json::from_slice(header).map_err(|e| corrupt(e.to_string()))?;
    let payload = &bytes[5 + header_len..];
    if !payload.is_empty() {
        let text = std::str::from_utf8(payload).map_err(|e| corrupt(e.to_string()))?;
        task.payload = Some(text.to_owned());
    }
    Ok(task)
}
