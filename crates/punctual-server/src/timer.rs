//! The timer driver: one OS thread that sleeps until the next due time (or a wake-up), then asks the
//! writer to process everything due. Firing, lease expiry and purging all go through this one path.
//!
//! It is a plain thread rather than a tokio task because tokio's timer rounds every deadline up to the
//! next whole millisecond of its own clock, which alone adds up to a millisecond of lateness; a condvar
//! wait with a timeout sleeps on a high-resolution timer (tens of microseconds here).
//!
//! The driver holds only a [`DueWindow`] of distinct upcoming due times, refilled from the store's
//! due-time index as time advances; the store stays the source of truth.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use punctual_core::DueWindow;
use punctual_store::{Command, Outcome, Store};

use crate::clock::Clock;
use crate::writer::Writer;

/// Most distinct due times one resync reads.
const RESYNC_LIMIT: usize = 1_000;

#[derive(Default)]
struct Signal {
    /// Something changed (an earlier due time, or shutdown): re-plan the sleep.
    woken: bool,
    stopping: bool,
    /// Notices from other nodes may have been missed: re-read what is due soon now.
    resync: bool,
}

/// The window shared by the writer (which inserts committed due times) and the driver.
pub struct Timer {
    window: Mutex<DueWindow>,
    signal: Mutex<Signal>,
    condvar: Condvar,
}

impl Timer {
    pub fn new(span_ms: u64, capacity: usize) -> Self {
        Timer {
            window: Mutex::new(DueWindow::new(span_ms, capacity)),
            signal: Mutex::new(Signal::default()),
            condvar: Condvar::new(),
        }
    }

    /// How far ahead the window looks.
    pub fn span_ms(&self) -> u64 {
        self.window().span_ms()
    }

    fn window(&self) -> MutexGuard<'_, DueWindow> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self) -> MutexGuard<'_, Signal> {
        self.signal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        self.signal().woken = true;
        self.condvar.notify_all();
    }

    /// Asks the driver to re-read the store's due times up to shortly ahead (a shared store's notices may
    /// have been missed).
    pub fn request_resync(&self) {
        self.signal().resync = true;
        self.condvar.notify_all();
    }

    /// Waits until `every_ms` has passed since the last resync, a resync is requested, or shutdown.
    /// Returns false on shutdown.
    fn wait_resync(&self, clock: &Clock, due_us: u64) -> bool {
        self.wait(clock, due_us, |signal| std::mem::take(&mut signal.resync))
    }

    /// Waits until the wall clock reaches `until_us`, `flag` takes a raised flag, or shutdown. Returns
    /// false on shutdown.
    fn wait(&self, clock: &Clock, until_us: u64, flag: impl Fn(&mut Signal) -> bool) -> bool {
        let mut signal = self.signal();
        loop {
            if signal.stopping {
                return false;
            }
            let remaining_us = until_us.saturating_sub(clock.now_us());
            if flag(&mut signal) || remaining_us == 0 {
                return true;
            }
            signal = self
                .condvar
                .wait_timeout(signal, Duration::from_micros(remaining_us))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Reads the earliest due times up to `to_ms` from the store into the window. On a shared store this
    /// catches what another node committed without this node hearing of it (a lost notice, or a node
    /// that died between its commit and its notice). Only the earliest [`RESYNC_LIMIT`] distinct times
    /// are read: those are the ones about to matter, and later ones are read by later resyncs.
    fn resync(&self, store: &dyn Store, to_ms: u64) {
        if self.window().is_unloaded() {
            return;
        }
        match store.due_times(0, to_ms, RESYNC_LIMIT) {
            Ok(found) => self.insert_all(&found.times),
            Err(error) => tracing::error!(%error, "cannot re-read due times"),
        }
    }

    /// Ends the driver thread (and the resync thread).
    pub fn stop(&self) {
        self.signal().stopping = true;
        self.condvar.notify_all();
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
            self.wake();
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

    /// Sleeps until the wall clock reaches `wake_ms`, a wake-up, or shutdown. Returns false on shutdown.
    fn sleep_until(&self, clock: &Clock, wake_ms: u64) -> bool {
        self.wait(clock, wake_ms * 1000, |signal| {
            std::mem::take(&mut signal.woken)
        })
    }

    fn stopping(&self) -> bool {
        self.signal().stopping
    }
}

/// Starts the driver thread; it runs until [`Timer::stop`].
pub fn start(
    timer: Arc<Timer>,
    store: Arc<dyn Store>,
    writer: Writer,
    clock: Clock,
    tick_limit: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("punctual-timer".into())
        .spawn(move || drive(&timer, store.as_ref(), &writer, clock, tick_limit))
        .expect("spawn timer thread")
}

/// On a store shared with other nodes: a thread that every `every_ms` (or when asked, see
/// [`Timer::request_resync`]) re-reads what is due within the next `2 × every_ms`. It runs beside the
/// driver, so its reads never delay a tick.
pub fn start_resync(
    timer: Arc<Timer>,
    store: Arc<dyn Store>,
    clock: Clock,
    every_ms: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("punctual-resync".into())
        .spawn(move || {
            let mut due_us = 0;
            while timer.wait_resync(&clock, due_us) {
                let now_ms = clock.now_ms();
                timer.resync(store.as_ref(), now_ms + 2 * every_ms);
                due_us = (now_ms + every_ms) * 1000;
            }
        })
        .expect("spawn resync thread")
}

fn drive(timer: &Timer, store: &dyn Store, writer: &Writer, clock: Clock, tick_limit: usize) {
    while !timer.stopping() {
        let now_ms = clock.now_ms();
        if !timer.refill(store, now_ms) {
            timer.sleep_until(&clock, now_ms + 100);
            continue;
        }
        if timer.window().poll(now_ms) {
            // Process everything due, in bounded ticks so other writes interleave.
            loop {
                match writer.submit_blocking(vec![Command::Tick {
                    limit: tick_limit,
                    takers: Vec::new(),
                }]) {
                    Ok(mut outcomes) => match outcomes.pop() {
                        Some(Outcome::Ticked(report)) if report.more => continue,
                        _ => break,
                    },
                    Err(error) => {
                        tracing::error!(message = %error.message, "timer tick failed");
                        timer.sleep_until(&clock, now_ms + 100);
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
        if !timer.sleep_until(&clock, wake_ms) {
            return;
        }
    }
}
