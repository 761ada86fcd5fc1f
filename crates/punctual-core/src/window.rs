//! The timer driver's bounded in-memory window of upcoming due times.
//!
//! The store's due-time index is the source of truth. The window holds only the distinct due times
//! in `[now, horizon]` (at most `capacity` of them), so memory is bounded by what is due soon, never by
//! how many tasks are pending. Entries are hints: a deadline only tells the driver *when* to look at the
//! store; the store decides what is actually due. Stale entries (a cancelled task) cost a spurious look.
//!
//! Invariant: every due time in the store that is `<= horizon` and not yet polled is in the window.
//! It holds because (a) `fill` loads every stored due time in `(horizon, to]` and only then raises the
//! horizon, and (b) writers call `insert` after committing, which keeps anything `<= horizon`.
//! The caller must run a refill's store read and `fill` without an `insert` in between (one lock).

use std::collections::BTreeSet;

#[derive(Debug, Clone)]
pub struct DueWindow {
    deadlines: BTreeSet<u64>,
    horizon_ms: u64,
    span_ms: u64,
    capacity: usize,
    loaded: bool,
}

/// What the driver must read from the store to refill the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillRange {
    /// First due time to load (inclusive).
    pub from_ms: u64,
    /// Last due time to load (inclusive).
    pub to_ms: u64,
    /// Most distinct due times to load.
    pub limit: usize,
}

impl DueWindow {
    /// A window that looks `span_ms` ahead and holds at most `capacity` distinct due times.
    pub fn new(span_ms: u64, capacity: usize) -> Self {
        DueWindow {
            deadlines: BTreeSet::new(),
            horizon_ms: 0,
            span_ms: span_ms.max(2),
            capacity: capacity.max(2),
            loaded: false,
        }
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// How far ahead it looks.
    pub fn span_ms(&self) -> u64 {
        self.span_ms
    }

    /// Most distinct due times it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// True until the first `fill`.
    pub fn is_unloaded(&self) -> bool {
        !self.loaded
    }

    pub fn horizon_ms(&self) -> u64 {
        self.horizon_ms
    }

    /// When the horizon gets this close to `now`, the window must be refilled.
    fn refill_point(&self) -> u64 {
        self.horizon_ms.saturating_sub(self.span_ms / 2)
    }

    /// The range to read from the store, or `None` when the window still reaches far enough ahead.
    pub fn refill_range(&self, now_ms: u64) -> Option<RefillRange> {
        if self.loaded && now_ms < self.refill_point() {
            return None;
        }
        let from_ms = if self.loaded {
            self.horizon_ms.saturating_add(1)
        } else {
            0
        };
        let to_ms = now_ms.saturating_add(self.span_ms).max(from_ms);
        Some(RefillRange {
            from_ms,
            to_ms,
            limit: self.capacity.saturating_sub(self.deadlines.len()).max(1),
        })
    }

    /// Takes the distinct due times the store returned for `range`, in ascending order.
    /// `truncated` says the store stopped early (limit or scan budget): the horizon then stops at the last
    /// time returned, which stands for every task due at or before it.
    pub fn fill(&mut self, range: RefillRange, due_times: &[u64], truncated: bool) {
        self.deadlines.extend(due_times.iter().copied());
        let truncated = truncated || due_times.len() >= range.limit;
        self.horizon_ms = match (truncated, due_times.last()) {
            (true, Some(last)) => *last,
            _ => range.to_ms,
        };
        self.loaded = true;
        self.enforce_capacity();
    }

    /// Records a due time committed to the store. Returns true if it is now the earliest deadline,
    /// in which case the driver must be woken to re-plan its sleep.
    pub fn insert(&mut self, due_ms: u64) -> bool {
        if !self.loaded || due_ms > self.horizon_ms {
            // Beyond the horizon: a later refill loads it from the store.
            return false;
        }
        let earliest = self.deadlines.first().is_none_or(|first| due_ms < *first);
        self.deadlines.insert(due_ms);
        self.enforce_capacity();
        earliest && self.deadlines.contains(&due_ms)
    }

    fn enforce_capacity(&mut self) {
        while self.deadlines.len() > self.capacity {
            if let Some(last) = self.deadlines.pop_last() {
                // Everything before `last` is still here; `last` itself is reloaded by the next refill.
                self.horizon_ms = last - 1;
            }
        }
    }

    /// Removes and reports whether any deadline is at or before `now_ms`.
    pub fn poll(&mut self, now_ms: u64) -> bool {
        let mut fired = false;
        while let Some(first) = self.deadlines.first() {
            if *first > now_ms {
                break;
            }
            self.deadlines.pop_first();
            fired = true;
        }
        fired
    }

    /// When the driver must next wake up: the earliest deadline or the refill point, whichever is sooner.
    pub fn next_wake_ms(&self) -> u64 {
        if !self.loaded {
            return 0;
        }
        let refill = self.refill_point();
        match self.deadlines.first() {
            Some(first) => (*first).min(refill),
            None => refill,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn refill(window: &mut DueWindow, store: &BTreeSet<u64>, now_ms: u64) {
        if let Some(range) = window.refill_range(now_ms) {
            let times: Vec<u64> = store
                .range(range.from_ms..=range.to_ms)
                .copied()
                .take(range.limit)
                .collect();
            window.fill(range, &times, false);
        }
    }

    #[test]
    fn loads_past_due_on_first_refill_and_fires_them() {
        let store: BTreeSet<u64> = [5, 50, 5_000_000].into();
        let mut w = DueWindow::new(60_000, 16);
        assert_eq!(w.next_wake_ms(), 0);
        refill(&mut w, &store, 100);
        assert_eq!(w.len(), 2, "the far-future time stays in the store");
        assert!(w.poll(100));
        assert!(w.is_empty());
        assert_eq!(w.next_wake_ms(), 100 + 60_000 - 30_000);
    }

    #[test]
    fn capacity_bounds_memory_and_lowers_the_horizon() {
        let store: BTreeSet<u64> = (1..=1_000).map(|i| i * 10).collect();
        let mut w = DueWindow::new(1_000_000, 8);
        refill(&mut w, &store, 0);
        assert_eq!(w.len(), 8);
        assert_eq!(w.horizon_ms(), 80);
        assert!(!w.insert(90), "beyond the horizon");
        assert!(w.insert(1), "earliest deadline wakes the driver");
        assert_eq!(w.len(), 8);
        assert_eq!(w.horizon_ms(), 79);
    }

    proptest! {
        /// Against a model store: the driver never sleeps past a due time that is in the store.
        #[test]
        fn never_sleeps_past_a_stored_due_time(
            ops in proptest::collection::vec((0u8..3, 0u64..5_000), 1..200),
            capacity in 2usize..12,
            span_ms in 10u64..2_000,
        ) {
            let mut store: BTreeSet<u64> = BTreeSet::new();
            let mut w = DueWindow::new(span_ms, capacity);
            let mut now = 0u64;
            refill(&mut w, &store, now);
            for (kind, arg) in ops {
                match kind {
                    // A writer commits a due time, then tells the window.
                    0 => {
                        let due = now + arg;
                        store.insert(due);
                        w.insert(due);
                    }
                    // A cancel: the store forgets it, the window keeps a stale hint.
                    1 => {
                        if let Some(due) = store.range(now..).nth(arg as usize % 4).copied() {
                            store.remove(&due);
                        }
                    }
                    // The driver sleeps until its next wake-up, then polls and refills.
                    _ => {
                        let wake = w.next_wake_ms().max(now);
                        if let Some(first_due) = store.range(now + 1..).next() {
                            prop_assert!(wake <= *first_due, "woke at {wake}, after due time {first_due}");
                        }
                        now = wake;
                        if w.poll(now) {
                            // The tick processes everything due in the store.
                            let due: Vec<u64> = store.range(..=now).copied().collect();
                            for d in due { store.remove(&d); }
                        }
                        refill(&mut w, &store, now);
                        prop_assert!(w.len() <= capacity);
                    }
                }
            }
        }
    }
}
