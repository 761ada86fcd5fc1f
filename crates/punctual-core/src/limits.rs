//! Named limits on what clients may send. Every limit has a default, is configurable, and is enforced
//! before anything is stored.

/// The limits one server enforces. `Limits::default()` holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload, as the JSON text sent (`413 payload_too_large` above).
    pub max_payload_bytes: usize,
    /// Largest request body for a single-task request; a batch may be up to `max_batch` times this, capped at `max_batch_body_bytes`.
    pub max_body_bytes: usize,
    /// Largest request body of a batch.
    pub max_batch_body_bytes: usize,
    /// Longest task id, in bytes of UTF-8.
    pub max_id_bytes: usize,
    /// Longest queue name, in bytes (`[A-Za-z0-9._:-]`).
    pub max_queue_bytes: usize,
    /// Most tasks in one batch request.
    pub max_batch: usize,
    /// Most tasks one reserve may return.
    pub max_reserve: usize,
    /// Longest long-poll of a reserve.
    pub max_wait_ms: u64,
    /// Shortest lease.
    pub min_lease_ms: u64,
    /// Longest lease.
    pub max_lease_ms: u64,
    /// Furthest in the future a task may be due (and longest backoff step).
    pub max_delay_ms: u64,
    /// Most attempts a task may ask for.
    pub max_attempts: u32,
    /// Longest webhook URL.
    pub max_url_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_body_bytes: (1 << 20) + (64 << 10),
            max_batch_body_bytes: 64 << 20,
            max_id_bytes: 256,
            max_queue_bytes: 128,
            max_batch: 1000,
            max_reserve: 1000,
            max_wait_ms: 60_000,
            min_lease_ms: 100,
            max_lease_ms: 12 * 3600 * 1000,
            max_delay_ms: 10 * 365 * 24 * 3600 * 1000,
            max_attempts: 1000,
            max_url_bytes: 2048,
        }
    }
}

impl Limits {
    /// Checks a queue name: 1..=`max_queue_bytes` bytes of `[A-Za-z0-9._:-]`.
    pub fn check_queue(&self, queue: &str) -> Result<(), String> {
        if queue.is_empty() || queue.len() > self.max_queue_bytes {
            return Err(format!(
                "queue name must be 1 to {} bytes",
                self.max_queue_bytes
            ));
        }
        if !queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err("queue name may contain only A-Z, a-z, 0-9, '.', '_', ':' and '-'".into());
        }
        Ok(())
    }

    /// Checks a task id: 1..=`max_id_bytes` bytes of UTF-8 without control characters.
    pub fn check_id(&self, id: &str) -> Result<(), String> {
        if id.is_empty() || id.len() > self.max_id_bytes {
            return Err(format!(
                "task id must be 1 to {} bytes of UTF-8",
                self.max_id_bytes
            ));
        }
        if id.chars().any(char::is_control) {
            return Err("task id must not contain control characters".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_and_id_rules() {
        let limits = Limits::default();
        assert!(limits.check_queue("orders.cancel:v1-x_y").is_ok());
        assert!(limits.check_queue("").is_err());
        assert!(limits.check_queue("a b").is_err());
        assert!(limits.check_queue(&"q".repeat(129)).is_err());
        assert!(limits.check_id("order/123 ünïcode").is_ok());
        assert!(limits.check_id(&"é".repeat(128)).is_ok());
        assert!(limits.check_id(&"é".repeat(129)).is_err());
        assert!(limits.check_id("a\nb").is_err());
    }
}
