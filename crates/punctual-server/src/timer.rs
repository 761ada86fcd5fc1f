//! The timer driver: one tokio task that sleeps until the next due time (or a wake-up), then asks the
//! writer to process everything due. Firing, lease expiry and purging all go through this one path.
//!
//! The driver holds only a [`DueWindow`] of distinct upcoming due times, refilled from the store's
//! due-time index as time advances; the store stays the source of truth.

use std::sync::{Arc, Mutex, MutexGuard};

use punctual_core::DueWindow;
use punctual_store::{Command, Outcome, Store};
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::writer::Writer;

/// The window shared by the writer (which inserts committed due times) and the driver.
pub struct Timer {
    window: Mutex<DueWindow>,
    wake: Notify,
}

impl Timer {
    pub fn new(span_ms: u64, capacity: usize) -> Self {
        Timer {
            window: Mutex::new(DueWindow::new(span_ms, capacity)),
            wake: Notify::new(),
        }
    }

    fn window(&self) -> MutexGuard<'_, DueWindow> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records due times that were just committed; wakes the driver if one is earlier than its plan.
    pub fn insert_all(&self, due_times: &[u64]) {
        if due_times.is_empty() {
            return;
        }
        let mut earliest = false;
        {
            let mut window = self.window();
            for due in due_times {
                earliest |= window.insert(*due);
            }
        }
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Refills the window if needed. The store read and the fill happen under the window lock, so a
    /// concurrent `insert_all` lands either before (and is seen by the read) or after (and is kept).
    fn refill(&self, store: &dyn Store, now_ms: u64) -> bool {
        let mut window = self.window();
        if let Some(range) = window.refill_range(now_ms) {
            match store.due_times(range.from_ms, range.to_ms, range.limit) {
                Ok(found) => window.fill(range, &found.times, found.truncated),
                Err(error) => {
                    tracing::error!(%error, "cannot read due times; retrying");
                    return false;
                }
            }
        }
        true
    }
}

/// Runs until `shutdown` turns true.
pub async fn drive(
    timer: Arc<Timer>,
    store: Arc<dyn Store>,
    writer: Writer,
    clock: Clock,
    tick_limit: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now_ms = clock.now_ms();
        if !timer.refill(store.as_ref(), now_ms) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        let fired = timer.window().poll(now_ms);
        if fired {
            // Process everything due, in bounded ticks so other writes interleave.
            loop {
                match writer.submit_one(Command::Tick { limit: tick_limit }).await {
                    Ok(Outcome::Ticked(report)) if report.more => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::error!(message = %error.message, "timer tick failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        break;
                    }
                }
            }
            continue;
        }
        let wake_ms = timer.window().next_wake_ms();
        if wake_ms <= now_ms {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(clock.instant_at(wake_ms)) => {}
            _ = timer.wake.notified() => {}
            _ = shutdown.changed() => {}
        }
    }
}
