//! Unpredictable, unique identifiers for generated task ids and lease tokens, shared by the HTTP API
//! and the webhook sender (a room of its own, so the sender does not import a front end).

use std::sync::atomic::{AtomicU64, Ordering};

/// Unpredictable, unique identifiers (generated task ids, lease tokens) without a random-number crate:
/// std's `RandomState` is seeded from the OS, and hashing a counter with it gives distinct values.
pub struct IdGen {
    counter: AtomicU64,
    state: std::collections::hash_map::RandomState,
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen {
            counter: AtomicU64::new(0),
            state: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl IdGen {
    pub fn next(&self) -> String {
        use std::hash::BuildHasher;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = self.state.hash_one(n);
        let b = self.state.hash_one(!n);
        format!("{a:016x}{b:016x}")
    }
}
