//! Punctual's pure core: the task model, its state machine, retry policies, the due-time window and time formatting.
//!
//! Nothing in this crate performs I/O or reads the clock: every function that depends on time takes `now_ms`
//! (unix milliseconds) as an argument, so the whole lifecycle can be driven by a virtual clock in tests.

pub mod duration;
pub mod limits;
pub mod retry;
pub mod schedule;
pub mod task;
pub mod time;
pub mod whole;
pub mod window;

pub use limits::Limits;
pub use retry::Backoff;
pub use task::{FailOutcome, LeaseCheck, Task, TaskState, Webhook};
pub use window::DueWindow;

/// The due time of a task that never fires: 9999-12-31T23:59:59.999Z. The Redis front end keeps a
/// key without a TTL as a task due then (`SET k v`); past every `max_delay_ms`, so no client can ask
/// for it by accident.
pub const NEVER_MS: u64 = 253_402_300_799_999;

/// A 64-bit FNV-1a hash: stable across Rust versions and platforms, so it can be persisted.
///
/// Used for request fingerprints (idempotency) and for deterministic jitter; not for security.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_from(FNV1A64_OFFSET, bytes)
}

/// The FNV-1a starting value, `fnv1a64(b"")`.
pub const FNV1A64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a continued over `bytes` from `hash`, so a key in parts hashes without being joined:
/// `fnv1a64_from(fnv1a64(a), b) == fnv1a64(a ++ b)`.
pub fn fnv1a64_from(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The murmur3 64-bit finalizer: every input bit flips each output bit with probability about ½, so
/// FNV-1a values of keys that differ only in their last bytes become unrelated.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}
