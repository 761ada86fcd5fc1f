//! The one place that reads the time. Everything else gets `now_ms` from here or as an argument.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in unix milliseconds, plus the mapping to tokio's monotonic timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock;

impl Clock {
    #[allow(clippy::disallowed_methods)] // The one sanctioned clock read.
    pub fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Wall-clock time in unix microseconds, for precise sleeps.
    #[allow(clippy::disallowed_methods)]
    pub fn now_us(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    /// The tokio instant at which the wall clock reads `at_ms` (now, if that is in the past).
    #[allow(clippy::disallowed_methods)]
    pub fn instant_at(&self, at_ms: u64) -> tokio::time::Instant {
        let now_us = self.now_us();
        tokio::time::Instant::now() + Duration::from_micros((at_ms * 1000).saturating_sub(now_us))
    }
}
