//! The task record and its state machine.
//!
//! Every transition is a method that takes `now_ms` and mutates the task in place; none does I/O.
//! The store derives its indexes from the task alone (`due_at_ms`, `ready_at_ms`), so a transition
//! can never leave an index entry that disagrees with the record.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::retry::Backoff;

/// Longest `last_error` kept; longer messages are cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    /// Waiting for its due time (`run_at_ms`).
    Scheduled,
    /// Due; waiting for a consumer.
    Ready,
    /// Held by one consumer until `lease.expires_at_ms`.
    Leased,
    /// Acknowledged; kept until `purge_at_ms`.
    Succeeded,
    /// Out of attempts; kept until retried or deleted.
    Dead,
}

impl TaskState {
    pub const ALL: [TaskState; 5] = [
        TaskState::Scheduled,
        TaskState::Ready,
        TaskState::Leased,
        TaskState::Succeeded,
        TaskState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Ready => "ready",
            TaskState::Leased => "leased",
            TaskState::Succeeded => "succeeded",
            TaskState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Position in [`TaskState::ALL`]; used for per-state counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Succeeded and dead tasks are finished: they cannot be rescheduled.
    pub fn is_finished(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Dead)
    }
}

/// Push delivery target of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole::opt_u64"
    )]
    pub timeout_ms: Option<u64>,
}

/// The lease of a task that one consumer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub token: String,
    pub expires_at_ms: u64,
}

/// One delayed task. The payload is kept as the exact JSON text the client sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub queue: String,
    pub id: String,
    /// Compact JSON text, kept as text so it is never re-parsed or re-escaped.
    pub payload: Option<String>,
    pub state: TaskState,
    /// When the task is (or was) due; for a retry, when the next attempt is due.
    pub run_at_ms: u64,
    /// Deliveries made so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub webhook: Option<Webhook>,
    /// Lease length requested at scheduling; `None` uses the reserve request's or the server's default.
    pub lease_ms: Option<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_error: Option<String>,
    pub lease: Option<Lease>,
    /// For a succeeded task: when it is removed.
    pub purge_at_ms: Option<u64>,
    /// Fingerprint of the request that created the task, for idempotent repeats.
    pub fingerprint: u64,
}

/// Whether a presented lease token still holds the task, and if not, why not.
///
/// A token ends in `-<task hash>.<attempt>` (see [`Task::lease`]), so a token that once leased this
/// task can be told from one that never did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCheck {
    Held,
    /// The token was never a lease of this task (mistyped, a placeholder, another task's).
    Mismatch,
    /// The token leased this task once, but that lease expired and the task was handed out again.
    HandedOutAgain,
    /// The token's lease expired; the task waits in `state` (`scheduled` or `ready`) for its next attempt.
    Expired(TaskState),
    /// The task is finished (`succeeded` or `dead`): no lease can settle it.
    Finished(TaskState),
}

/// Where a failed attempt sends the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to `scheduled` (or straight to `ready` when the delay is zero) for another attempt.
    Retry { run_at_ms: u64 },
    /// No attempts left.
    Dead,
}

fn truncate_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].to_owned()
}

impl Task {
    /// A task not yet stored: `scheduled`, no attempts, no payload, webhook or history. Callers set
    /// the optional fields with struct update syntax; the store's `start` sets the timestamps.
    pub fn new(
        queue: impl Into<String>,
        id: impl Into<String>,
        run_at_ms: u64,
        max_attempts: u32,
        backoff: Backoff,
    ) -> Task {
        Task {
            queue: queue.into(),
            id: id.into(),
            payload: None,
            state: TaskState::Scheduled,
            run_at_ms,
            attempt: 0,
            max_attempts,
            backoff,
            webhook: None,
            lease_ms: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_error: None,
            lease: None,
            purge_at_ms: None,
            fingerprint: 0,
        }
    }

    /// The time at which the due-time index must look at this task again:
    /// firing for `scheduled`, lease expiry for `leased`, purge for `succeeded`.
    pub fn due_at_ms(&self) -> Option<u64> {
        match self.state {
            TaskState::Scheduled => Some(self.run_at_ms),
            TaskState::Leased => self.lease.as_ref().map(|lease| lease.expires_at_ms),
            TaskState::Succeeded => self.purge_at_ms,
            TaskState::Ready | TaskState::Dead => None,
        }
    }

    /// The position of a `ready` task in its queue's ready order (oldest due first).
    pub fn ready_at_ms(&self) -> Option<u64> {
        (self.state == TaskState::Ready).then_some(self.run_at_ms)
    }

    /// A seed for jitter that is stable for this task and attempt.
    pub fn jitter_seed(&self) -> u64 {
        let mut bytes = Vec::with_capacity(self.queue.len() + self.id.len() + 5);
        bytes.extend_from_slice(self.queue.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(self.id.as_bytes());
        bytes.extend_from_slice(&self.attempt.to_le_bytes());
        crate::fnv1a64(&bytes)
    }

    /// Sets `run_at_ms` and the matching state: `ready` if already due, `scheduled` otherwise.
    fn set_due(&mut self, now_ms: u64, run_at_ms: u64) {
        self.run_at_ms = run_at_ms;
        self.state = if run_at_ms <= now_ms {
            TaskState::Ready
        } else {
            TaskState::Scheduled
        };
    }

    /// Puts a new task in its first state.
    pub fn start(&mut self, now_ms: u64) {
        self.attempt = 0;
        self.lease = None;
        self.purge_at_ms = None;
        self.created_at_ms = now_ms;
        self.updated_at_ms = now_ms;
        self.set_due(now_ms, self.run_at_ms);
    }

    /// A `scheduled` task whose time has come becomes `ready`. Returns whether it changed.
    pub fn promote(&mut self, now_ms: u64) -> bool {
        if self.state == TaskState::Scheduled && self.run_at_ms <= now_ms {
            self.state = TaskState::Ready;
            true
        } else {
            false
        }
    }

    /// Hands a `ready` task to one consumer: one more attempt, lease until `now + lease_ms`.
    /// Leases a ready task. The token is `token` (unique per lease) followed by `-<task hash>.<attempt>`,
    /// so a later check can say whether a stale token was this task's.
    pub fn lease(&mut self, now_ms: u64, lease_ms: u64, token: String) {
        debug_assert_eq!(self.state, TaskState::Ready);
        self.state = TaskState::Leased;
        self.attempt = self.attempt.saturating_add(1);
        let token = format!("{token}-{:08x}.{}", self.token_hash(), self.attempt);
        self.lease = Some(Lease {
            token,
            expires_at_ms: now_ms.saturating_add(lease_ms),
        });
        self.updated_at_ms = now_ms;
    }

    /// 32 bits of the task's key, as its lease tokens carry it.
    fn token_hash(&self) -> u32 {
        // FNV-1a of "queue\0id", in parts: this runs on every lease and every ack.
        let hash = crate::fnv1a64_from(
            crate::fnv1a64_from(crate::fnv1a64(self.queue.as_bytes()), b"\0"),
            self.id.as_bytes(),
        );
        (hash >> 32) as u32
    }

    /// Whether `token` was issued by a lease of this task (not necessarily the current one).
    fn issued_here(&self, token: &str) -> bool {
        token
            .rsplit_once('.')
            .and_then(|(rest, attempt)| attempt.parse::<u32>().ok().map(|_| rest))
            .and_then(|rest| rest.rsplit_once('-'))
            .is_some_and(|(_, hash)| {
                hash.len() == 8 && u32::from_str_radix(hash, 16).ok() == Some(self.token_hash())
            })
    }

    pub fn check_lease(&self, token: &str) -> LeaseCheck {
        match (&self.state, &self.lease) {
            (TaskState::Leased, Some(lease)) if lease.token == token => LeaseCheck::Held,
            (TaskState::Succeeded | TaskState::Dead, _) => LeaseCheck::Finished(self.state),
            _ if !self.issued_here(token) => LeaseCheck::Mismatch,
            (TaskState::Leased, _) => LeaseCheck::HandedOutAgain,
            (state, _) => LeaseCheck::Expired(*state),
        }
    }

    /// Moves the lease expiry to `now + lease_ms`.
    pub fn extend(&mut self, now_ms: u64, lease_ms: u64) {
        if let Some(lease) = &mut self.lease {
            lease.expires_at_ms = now_ms.saturating_add(lease_ms);
            self.updated_at_ms = now_ms;
        }
    }

    /// Records a failed attempt (nack, lease expiry, webhook error) and applies the retry policy.
    ///
    /// `delay_override_ms`, when given (a nack's `delay_ms`, a `Retry-After`), replaces the policy's delay.
    pub fn fail(
        &mut self,
        now_ms: u64,
        error: &str,
        delay_override_ms: Option<u64>,
    ) -> FailOutcome {
        self.fail_with(now_ms, error, delay_override_ms, 0)
    }

    /// Like [`fail`](Self::fail) with the policy's delay, but waiting at least `min_delay_ms`
    /// (a webhook target's `Retry-After` that is later than the policy's next step).
    pub fn fail_at_least(&mut self, now_ms: u64, error: &str, min_delay_ms: u64) -> FailOutcome {
        self.fail_with(now_ms, error, None, min_delay_ms)
    }

    fn fail_with(
        &mut self,
        now_ms: u64,
        error: &str,
        delay_override_ms: Option<u64>,
        min_delay_ms: u64,
    ) -> FailOutcome {
        self.lease = None;
        self.last_error = Some(truncate_error(error));
        self.updated_at_ms = now_ms;
        if self.attempt >= self.max_attempts {
            self.state = TaskState::Dead;
            return FailOutcome::Dead;
        }
        let delay_ms = delay_override_ms
            .unwrap_or_else(|| self.backoff.delay_ms(self.attempt, self.jitter_seed()))
            .max(min_delay_ms);
        let run_at_ms = now_ms.saturating_add(delay_ms);
        self.set_due(now_ms, run_at_ms);
        FailOutcome::Retry { run_at_ms }
    }

    /// Gives a leased task back without using up an attempt (a delivery that never started, e.g. at
    /// shutdown or when its target is saturated): due again after `delay_ms`.
    pub fn release(&mut self, now_ms: u64, delay_ms: u64) {
        self.lease = None;
        self.attempt = self.attempt.saturating_sub(1);
        self.updated_at_ms = now_ms;
        self.set_due(now_ms, now_ms.saturating_add(delay_ms));
    }

    /// A leased task back to `scheduled` at `run_at_ms` (or `ready`, if that is not later than
    /// now) with a fresh set of attempts, and `payload` when given.
    pub fn renew(&mut self, now_ms: u64, run_at_ms: u64, payload: Option<String>) {
        self.lease = None;
        self.attempt = 0;
        self.last_error = None;
        if payload.is_some() {
            self.payload = payload;
        }
        self.updated_at_ms = now_ms;
        self.set_due(now_ms, run_at_ms);
    }

    /// Acknowledged: `succeeded`, removed after `retention_ms`.
    pub fn succeed(&mut self, now_ms: u64, retention_ms: u64) {
        self.state = TaskState::Succeeded;
        self.lease = None;
        self.updated_at_ms = now_ms;
        self.purge_at_ms = Some(now_ms.saturating_add(retention_ms));
    }

    /// A dead task goes back to `ready` with a fresh set of attempts; `last_error` is kept for the record.
    pub fn revive(&mut self, now_ms: u64) {
        self.attempt = 0;
        self.updated_at_ms = now_ms;
        self.set_due(now_ms, now_ms);
    }

    /// Moves a `scheduled` or `ready` task to a new due time, optionally replacing its payload.
    pub fn reschedule(
        &mut self,
        now_ms: u64,
        run_at_ms: Option<u64>,
        payload: Option<Option<String>>,
    ) {
        if let Some(payload) = payload {
            self.payload = payload;
        }
        if let Some(run_at_ms) = run_at_ms {
            self.set_due(now_ms, run_at_ms);
        }
        self.updated_at_ms = now_ms;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn task(run_at_ms: u64, max_attempts: u32, backoff: Backoff) -> Task {
        Task {
            payload: Some("{}".into()),
            ..Task::new("q", "t", run_at_ms, max_attempts, backoff)
        }
    }

    fn ladder(steps: &[u64]) -> Backoff {
        Backoff::Ladder {
            steps_ms: steps.to_vec(),
        }
    }

    #[test]
    fn lifecycle_with_a_virtual_clock() {
        let mut t = task(1_000, 3, ladder(&[10, 30]));
        t.start(0);
        assert_eq!(
            (t.state, t.due_at_ms()),
            (TaskState::Scheduled, Some(1_000))
        );
        assert!(!t.promote(999));
        assert!(t.promote(1_000));
        assert_eq!(
            (t.state, t.ready_at_ms(), t.due_at_ms()),
            (TaskState::Ready, Some(1_000), None)
        );

        t.lease(1_001, 500, "a".into());
        assert_eq!(
            (t.state, t.attempt, t.due_at_ms()),
            (TaskState::Leased, 1, Some(1_501))
        );
        let a = t.lease.as_ref().unwrap().token.clone();
        assert!(a.starts_with("a-") && a.ends_with(".1"), "{a}");
        assert_eq!(t.check_lease(&a), LeaseCheck::Held);
        assert_eq!(t.check_lease("b"), LeaseCheck::Mismatch);
        assert_eq!(t.check_lease("…"), LeaseCheck::Mismatch);

        assert_eq!(
            t.fail(1_100, "boom", None),
            FailOutcome::Retry { run_at_ms: 1_110 }
        );
        assert_eq!(
            (t.state, t.last_error.as_deref()),
            (TaskState::Scheduled, Some("boom"))
        );
        assert_eq!(t.check_lease(&a), LeaseCheck::Expired(TaskState::Scheduled));
        assert_eq!(t.check_lease("b"), LeaseCheck::Mismatch);
        let mut other = t.clone();
        other.id = "other".into();
        assert_eq!(
            other.check_lease(&a),
            LeaseCheck::Mismatch,
            "another task's token"
        );

        t.promote(1_110);
        t.lease(1_110, 500, "b".into());
        assert_eq!(t.check_lease(&a), LeaseCheck::HandedOutAgain);
        assert_eq!(
            t.fail(1_200, "again", None),
            FailOutcome::Retry { run_at_ms: 1_230 }
        );
        t.promote(1_230);
        t.lease(1_230, 500, "c".into());
        assert_eq!(t.fail(1_300, "last", None), FailOutcome::Dead);
        assert_eq!(
            (t.state, t.attempt, t.due_at_ms()),
            (TaskState::Dead, 3, None)
        );

        t.revive(2_000);
        assert_eq!(
            (t.state, t.attempt, t.ready_at_ms()),
            (TaskState::Ready, 0, Some(2_000))
        );
        t.lease(2_000, 100, "d".into());
        t.succeed(2_050, 86_400_000);
        assert_eq!(
            (t.state, t.due_at_ms()),
            (TaskState::Succeeded, Some(86_402_050))
        );
    }

    #[test]
    fn zero_delay_retry_is_ready_at_once_and_override_wins() {
        let mut t = task(0, 5, ladder(&[0]));
        t.start(10);
        assert_eq!(t.state, TaskState::Ready);
        t.lease(10, 100, "x".into());
        assert_eq!(t.fail(20, "e", None), FailOutcome::Retry { run_at_ms: 20 });
        assert_eq!(t.state, TaskState::Ready);
        t.lease(20, 100, "y".into());
        assert_eq!(
            t.fail(30, "e", Some(5_000)),
            FailOutcome::Retry { run_at_ms: 5_030 }
        );
        assert_eq!(t.state, TaskState::Scheduled);
    }

    #[test]
    fn retry_after_only_lengthens_and_release_keeps_the_attempt() {
        let mut t = task(0, 5, ladder(&[1_000]));
        t.start(0);
        t.lease(0, 100, "a".into());
        assert_eq!(
            t.fail_at_least(10, "429", 300),
            FailOutcome::Retry { run_at_ms: 1_010 }
        );
        t.promote(1_010);
        t.lease(1_010, 100, "b".into());
        assert_eq!(
            t.fail_at_least(1_020, "429", 5_000),
            FailOutcome::Retry { run_at_ms: 6_020 }
        );
        assert_eq!(t.attempt, 2);
        t.promote(6_020);
        t.lease(6_020, 100, "c".into());
        t.release(6_030, 0);
        assert_eq!(
            (t.state, t.attempt, t.lease.is_none()),
            (TaskState::Ready, 2, true)
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let mut t = task(0, 1, ladder(&[]));
        t.start(0);
        t.lease(0, 10, "x".into());
        let long = "é".repeat(MAX_ERROR_BYTES);
        t.fail(1, &long, None);
        let kept = t.last_error.unwrap();
        assert!(kept.len() <= MAX_ERROR_BYTES && kept.len() >= MAX_ERROR_BYTES - 1);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        /// What the engine may do to a task, with its arguments.
        #[derive(Debug, Clone)]
        enum Op {
            Advance(u64),
            Promote,
            Lease(u64),
            Fail(Option<u64>),
            Succeed,
            Revive,
            Reschedule(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u64..500).prop_map(Op::Advance),
                Just(Op::Promote),
                (1u64..300).prop_map(Op::Lease),
                proptest::option::of(0u64..200).prop_map(Op::Fail),
                Just(Op::Succeed),
                Just(Op::Revive),
                (0u64..600).prop_map(Op::Reschedule),
            ]
        }

        /// A deliberately naive model of the lifecycle, written from the API documentation.
        #[derive(Debug)]
        struct Model {
            state: TaskState,
            attempt: u32,
            run_at: u64,
            lease_until: Option<u64>,
        }

        proptest! {
            #[test]
            fn transitions_match_a_simple_model(
                ops in proptest::collection::vec(op(), 1..80),
                steps in proptest::collection::vec(0u64..100, 0..4),
                max_attempts in 1u32..5,
                first_run_at in 0u64..300,
            ) {
                let mut now = 100u64;
                let mut t = task(first_run_at, max_attempts, Backoff::Ladder { steps_ms: steps.clone() });
                t.start(now);
                let ready_at_start = first_run_at <= now;
                let mut m = Model {
                    state: if ready_at_start { TaskState::Ready } else { TaskState::Scheduled },
                    attempt: 0,
                    run_at: first_run_at,
                    lease_until: None,
                };
                for op in ops {
                    match op {
                        Op::Advance(ms) => now += ms,
                        Op::Promote => {
                            t.promote(now);
                            if m.state == TaskState::Scheduled && m.run_at <= now {
                                m.state = TaskState::Ready;
                            }
                        }
                        Op::Lease(ms) if m.state == TaskState::Ready => {
                            t.lease(now, ms, format!("tok{now}"));
                            m.state = TaskState::Leased;
                            m.attempt += 1;
                            m.lease_until = Some(now + ms);
                        }
                        Op::Fail(delay) if m.state == TaskState::Leased => {
                            t.fail(now, "e", delay);
                            m.lease_until = None;
                            if m.attempt >= max_attempts {
                                m.state = TaskState::Dead;
                            } else {
                                let step = if steps.is_empty() { 0 } else { steps[(m.attempt as usize - 1).min(steps.len() - 1)] };
                                m.run_at = now + delay.unwrap_or(step);
                                m.state = if m.run_at <= now { TaskState::Ready } else { TaskState::Scheduled };
                            }
                        }
                        Op::Succeed if m.state == TaskState::Leased => {
                            t.succeed(now, 1_000);
                            m.state = TaskState::Succeeded;
                            m.lease_until = None;
                        }
                        Op::Revive if m.state == TaskState::Dead => {
                            t.revive(now);
                            m.state = TaskState::Ready;
                            m.attempt = 0;
                            m.run_at = now;
                        }
                        Op::Reschedule(at) if matches!(m.state, TaskState::Scheduled | TaskState::Ready) => {
                            t.reschedule(now, Some(at), None);
                            m.run_at = at;
                            m.state = if at <= now { TaskState::Ready } else { TaskState::Scheduled };
                        }
                        _ => {} // not allowed in this state: the engine never calls it
                    }
                    prop_assert_eq!(t.state, m.state);
                    prop_assert_eq!(t.attempt, m.attempt);
                    prop_assert!(t.attempt <= max_attempts);
                    prop_assert_eq!(t.lease.as_ref().map(|l| l.expires_at_ms), m.lease_until);
                    if matches!(m.state, TaskState::Scheduled | TaskState::Ready) {
                        prop_assert_eq!(t.run_at_ms, m.run_at);
                    }
                    // The indexes a store derives from the task agree with its state.
                    let expected_due = match m.state {
                        TaskState::Scheduled => Some(m.run_at),
                        TaskState::Leased => m.lease_until,
                        TaskState::Succeeded => t.purge_at_ms,
                        TaskState::Ready | TaskState::Dead => None,
                    };
                    prop_assert_eq!(t.due_at_ms(), expected_due);
                    prop_assert_eq!(t.ready_at_ms(), (m.state == TaskState::Ready).then_some(m.run_at));
                }
            }
        }
    }
}
