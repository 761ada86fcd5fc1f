//! Webhook targets: per-host delivery caps and a circuit breaker, so one target's failures never
//! delay another's.
//!
//! - A host is keyed by scheme, lower-case host and port with the default filled in, so
//!   `HTTP://Example.com` and `http://example.com:80` share one budget.
//! - A healthy host may have `per_host` deliveries in flight; a host whose last delivery failed only
//!   `FAILING_PER_HOST`.
//! - After `BREAKER_FAILURES` failures in a row the host is *backed off* for a time that doubles
//!   with each further failure (1 s up to 60 s); its tasks are handed back once, with a delay until
//!   the back-off ends, instead of being offered again and again. When it ends, one probe delivery
//!   goes; its success closes the breaker, its failure backs off again.
//! - A failure here is a connection error, a timeout or a 5xx; any other answer proves the host is
//!   up (the task's own retry policy still treats non-2xx as a failed attempt).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Failures in a row that back a host off.
pub const BREAKER_FAILURES: u32 = 5;
/// Deliveries in flight to a host whose last delivery failed.
pub const FAILING_PER_HOST: usize = 2;
/// The first back-off, and the longest.
pub const BACKOFF_MIN_MS: u64 = 1_000;
pub const BACKOFF_MAX_MS: u64 = 60_000;
/// Outcomes kept per host for the dashboard and the log.
const RECENT: usize = 20;

/// The per-host key of a webhook URL.
pub fn host_key(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => format!(
            "{}://{}:{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or("").to_ascii_lowercase(),
            parsed.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_ascii_lowercase(),
    }
}

#[derive(Debug, Default)]
struct HostState {
    in_flight: usize,
    /// Of those, requests running longer than the sender's stall time (a hung or slow host).
    slow: usize,
    /// Failures in a row.
    failures: u32,
    /// Backed off until then (unix ms).
    open_until_ms: u64,
    /// The next back-off.
    backoff_ms: u64,
    /// A probe is in flight (after a back-off).
    probing: bool,
    /// The latest outcomes, newest last: (unix ms, success).
    recent: std::collections::VecDeque<(u64, bool)>,
}

/// What the sender may do with a task for a host now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Deliver it; the slot is held until the [`Slot`] is dropped.
    Go,
    /// The host has all the deliveries in flight it may have: offer the task again shortly (later
    /// when its requests are `slow`, so a hung host's tasks do not churn).
    Saturated { slow: bool },
    /// The host is backed off: hand the task back until then (unix ms).
    BackedOff { until_ms: u64 },
}

/// Every host the sender has talked to recently.
#[derive(Default)]
pub struct Targets {
    hosts: Mutex<HashMap<String, HostState>>,
}

/// A delivery in flight to a host; dropping it frees the host's slot (the outcome is recorded with
/// [`Slot::finish`]).
pub struct Slot {
    targets: Arc<Targets>,
    host: String,
    finished: bool,
    slow: bool,
}

impl Slot {
    /// The request has run longer than the sender's stall time.
    pub fn mark_slow(&mut self) {
        if !self.slow {
            self.slow = true;
            if let Some(state) = self.targets.lock().get_mut(&self.host) {
                state.slow += 1;
            }
        }
    }

    /// Records the delivery's outcome (`healthy`: the host answered with anything but a 5xx).
    pub fn finish(mut self, now_ms: u64, healthy: bool) {
        self.finished = true;
        self.targets.record(&self.host, now_ms, healthy, self.slow);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.finished {
            // Cut off (shutdown): neither a success nor a failure.
            let mut hosts = self.targets.lock();
            if let Some(state) = hosts.get_mut(&self.host) {
                state.in_flight = state.in_flight.saturating_sub(1);
                if self.slow {
                    state.slow = state.slow.saturating_sub(1);
                }
                state.probing = false;
            }
        }
    }
}

/// One host as the dashboard and tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    pub host: String,
    pub in_flight: usize,
    pub failures_in_a_row: u32,
    pub backed_off_until_ms: Option<u64>,
    /// The latest outcomes, newest last: (unix ms, success).
    pub recent: Vec<(u64, bool)>,
}

impl Targets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostState>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides about one delivery to `host` (a [`host_key`]) at `now_ms`.
    pub fn admit(
        self: &Arc<Self>,
        host: &str,
        per_host: usize,
        now_ms: u64,
    ) -> (Admit, Option<Slot>) {
        let mut hosts = self.lock();
        let state = hosts.entry(host.to_owned()).or_default();
        if state.open_until_ms > now_ms {
            return (
                Admit::BackedOff {
                    until_ms: state.open_until_ms,
                },
                None,
            );
        }
        if state.failures >= BREAKER_FAILURES {
            // The back-off is over: one probe at a time.
            if state.probing {
                return (
                    Admit::BackedOff {
                        until_ms: now_ms + BACKOFF_MIN_MS,
                    },
                    None,
                );
            }
            state.probing = true;
        } else {
            let cap = if state.failures > 0 {
                FAILING_PER_HOST.min(per_host)
            } else {
                per_host
            };
            if state.in_flight >= cap.max(1) {
                return (
                    Admit::Saturated {
                        slow: state.slow > 0,
                    },
                    None,
                );
            }
        }
        state.in_flight += 1;
        let slot = Slot {
            targets: self.clone(),
            host: host.to_owned(),
            finished: false,
            slow: false,
        };
        (Admit::Go, Some(slot))
    }

    fn record(&self, host: &str, now_ms: u64, healthy: bool, slow: bool) {
        let mut hosts = self.lock();
        let Some(state) = hosts.get_mut(host) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        if slow {
            state.slow = state.slow.saturating_sub(1);
        }
        state.probing = false;
        state.recent.push_back((now_ms, healthy));
        while state.recent.len() > RECENT {
            state.recent.pop_front();
        }
        if healthy {
            state.failures = 0;
            state.backoff_ms = 0;
            state.open_until_ms = 0;
            return;
        }
        state.failures = state.failures.saturating_add(1);
        if state.failures >= BREAKER_FAILURES {
            let backoff = state.backoff_ms.clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
            state.open_until_ms = now_ms + backoff;
            state.backoff_ms = (backoff * 2).min(BACKOFF_MAX_MS);
            if state.failures == BREAKER_FAILURES {
                tracing::warn!(
                    host,
                    failures = state.failures,
                    backoff_ms = backoff,
                    "webhook target backed off after failures in a row; probing it again after the back-off"
                );
            }
        }
        // Hosts nobody talks to any more are forgotten, so memory follows the live hosts.
        if hosts.len() > 10_000 {
            hosts.retain(|_, s| s.in_flight > 0 || s.failures > 0);
        }
    }

    /// Every known host, by key.
    pub fn view(&self, now_ms: u64) -> Vec<TargetView> {
        let hosts = self.lock();
        let mut out: Vec<TargetView> = hosts
            .iter()
            .map(|(host, s)| TargetView {
                host: host.clone(),
                in_flight: s.in_flight,
                failures_in_a_row: s.failures,
                backed_off_until_ms: (s.open_until_ms > now_ms).then_some(s.open_until_ms),
                recent: s.recent.iter().copied().collect(),
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_keyed_by_scheme_host_and_port() {
        assert_eq!(host_key("HTTP://Example.COM/a?b"), "http://example.com:80");
        assert_eq!(host_key("http://example.com:80/x"), "http://example.com:80");
        assert_eq!(
            host_key("https://u@example.com/x"),
            "https://example.com:443"
        );
        assert_ne!(
            host_key("http://a.com:8080/"),
            host_key("http://a.com:8081/")
        );
    }

    #[test]
    fn a_failing_host_is_capped_then_backed_off_then_probed() {
        let targets = Arc::new(Targets::default());
        let h = "http://dead:80";
        let mut slots = Vec::new();
        for _ in 0..16 {
            let (admit, slot) = targets.admit(h, 16, 0);
            assert_eq!(admit, Admit::Go);
            slots.push(slot.unwrap());
        }
        assert_eq!(
            targets.admit(h, 16, 0).0,
            Admit::Saturated { slow: false },
            "per-host cap"
        );
        // They all fail: after the first failure the host may have only two in flight.
        slots.pop().unwrap().finish(10, false);
        for slot in slots.drain(..3) {
            slot.finish(10, false);
        }
        assert_eq!(targets.view(10)[0].failures_in_a_row, 4);
        assert_eq!(
            targets.admit(h, 16, 10).0,
            Admit::Saturated { slow: false },
            "12 still in flight > 2"
        );
        slots.pop().unwrap().finish(20, false);
        // Five in a row: backed off for 1 s.
        assert_eq!(
            targets.admit(h, 16, 21).0,
            Admit::BackedOff { until_ms: 1_020 }
        );
        for slot in slots.drain(..) {
            slot.finish(30, false);
        }
        // Each further failure (of those still in flight) backs it off longer, up to 60 s.
        let view = &targets.view(30)[0];
        assert_eq!(view.in_flight, 0);
        assert!(view.backed_off_until_ms.is_some());
        let until = view.backed_off_until_ms.unwrap();
        // After the back-off: one probe, and no second one beside it.
        let (admit, probe) = targets.admit(h, 16, until);
        assert_eq!(admit, Admit::Go);
        assert!(matches!(
            targets.admit(h, 16, until).0,
            Admit::BackedOff { .. }
        ));
        probe.unwrap().finish(until + 5, false);
        let again = targets.view(until + 5)[0].backed_off_until_ms.unwrap();
        assert!(again - (until + 5) >= 2_000, "the back-off doubled");
        let (_, probe) = targets.admit(h, 16, again);
        probe.unwrap().finish(again + 1, true);
        assert_eq!(
            targets.admit(h, 16, again + 1).0,
            Admit::Go,
            "healthy again"
        );
    }

    #[test]
    fn hosts_do_not_share_caps() {
        let targets = Arc::new(Targets::default());
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(targets.admit("http://a:80", 2, 0).1.unwrap());
        }
        assert_eq!(
            targets.admit("http://a:80", 2, 0).0,
            Admit::Saturated { slow: false }
        );
        assert_eq!(targets.admit("http://b:80", 2, 0).0, Admit::Go);
    }
}
