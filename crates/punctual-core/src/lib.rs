//! Punctual's pure core: the task model, its state machine, retry policies, the due-time window and time formatting.
//!
//! Nothing in this crate performs I/O or reads the clock: every function that depends on time takes `now_ms`
//! (unix milliseconds) as an argument, so the whole lifecycle can be driven by a virtual clock in tests.

pub mod duration;
pub mod limits;
pub mod retry;
pub mod task;
pub mod time;
pub mod window;

pub use limits::Limits;
pub use retry::Backoff;
pub use task::{FailOutcome, LeaseCheck, Task, TaskState, Webhook};
pub use window::DueWindow;

/// A 64-bit FNV-1a hash: stable across Rust versions and platforms, so it can be persisted.
///
/// Used for request fingerprints (idempotency) and for deterministic jitter; not for security.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
