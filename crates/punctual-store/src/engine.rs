//! The transition logic every backend shares, written over a small transaction interface.
//!
//! A backend supplies [`Txn`] (records, the due index, the ready index, counters); `apply_one` decides
//! what each command does using the pure state machine of `punctual-core`. Index entries are always
//! derived from the record (`Task::due_at_ms`, `Task::ready_at_ms`) by [`write`], so they cannot drift.

use std::collections::BTreeSet;

use punctual_core::{FailOutcome, LeaseCheck, Task, TaskState};

use crate::{Command, Outcome, PUSH_INDEX, PutWhen, StoreError, Taker, TickReport};

/// Where a ready task sits in the ready index: its own queue for pull delivery, or the push index
/// (keyed by `queue 0x00 id`, so the sender can find the task) when it has a webhook.
fn ready_slot(task: &Task) -> (&str, std::borrow::Cow<'_, str>) {
    slot(task.webhook.is_some(), &task.queue, &task.id)
}

/// [`ready_slot`] of a task with or without a webhook (`push`).
fn slot<'a>(push: bool, queue: &'a str, id: &'a str) -> (&'a str, std::borrow::Cow<'a, str>) {
    if push {
        (PUSH_INDEX, format!("{queue}\0{id}").into())
    } else {
        (queue, id.into())
    }
}

/// What [`write`] needs of the record a transition replaces: its index entries and state. Taken
/// before a task read from the store is changed in place, so the hot transitions (fire, lease,
/// ack, nack) need not clone the whole task to keep the old one for the index update. A transition
/// never changes a task's queue, id or whether it has a webhook.
#[derive(Clone, Copy)]
struct Was {
    due: Option<u64>,
    ready: Option<u64>,
    state: TaskState,
    push: bool,
}

impl Was {
    fn of(task: &Task) -> Was {
        Was {
            due: task.due_at_ms(),
            ready: task.ready_at_ms(),
            state: task.state,
            push: task.webhook.is_some(),
        }
    }
}

/// [`write`] of `new` over the record it was changed from in place, which was `was`.
fn write_over<T: Txn + ?Sized>(txn: &mut T, was: Was, new: &Task) -> Result<(), StoreError> {
    debug_assert_eq!(
        was.push,
        new.webhook.is_some(),
        "a transition keeps the webhook"
    );
    index_out(txn, was, &new.queue, &new.id, Some(new))?;
    index_in(txn, Some(was), new)?;
    txn.put(new)
}

/// The queue whose consumers (or the webhook sender) a newly ready task should wake.
pub fn ready_target(task: &Task) -> &str {
    ready_slot(task).0
}

/// Error text recorded when a lease runs out.
pub const LEASE_EXPIRED: &str = "lease expired";

/// The primitive operations of one write transaction.
pub trait Txn {
    fn get(&mut self, queue: &str, id: &str) -> Result<Option<Task>, StoreError>;
    fn put(&mut self, task: &Task) -> Result<(), StoreError>;
    /// Stores `task` unless its id exists; then returns the existing task and changes nothing.
    /// (One lookup instead of a `get` followed by a `put` on the hot path of scheduling.)
    fn create(&mut self, task: &Task) -> Result<Option<Task>, StoreError>;
    fn remove(&mut self, queue: &str, id: &str) -> Result<(), StoreError>;
    fn due_add(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError>;
    fn due_remove(&mut self, due_ms: u64, queue: &str, id: &str) -> Result<(), StoreError>;
    /// The first `limit` due-index entries at or before `now_ms`.
    fn due_upto(
        &mut self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, String)>, StoreError>;
    fn ready_add(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError>;
    fn ready_remove(&mut self, queue: &str, at_ms: u64, id: &str) -> Result<(), StoreError>;
    /// Ids of the first `limit` ready tasks of a queue, oldest first.
    fn ready_first(&mut self, queue: &str, limit: usize) -> Result<Vec<String>, StoreError>;
    fn count(&mut self, queue: &str, state: TaskState, delta: i64);
}

/// Replaces `old` by `new` (either may be absent), keeping indexes and counters in step.
pub fn write<T: Txn + ?Sized>(
    txn: &mut T,
    old: Option<&Task>,
    new: Option<&Task>,
) -> Result<(), StoreError> {
    write_indexes(txn, old, new)?;
    match (old, new) {
        (_, Some(new)) => txn.put(new),
        (Some(old), None) => txn.remove(&old.queue, &old.id),
        (None, None) => Ok(()),
    }
}

/// The index and counter part of [`write`], for a record that is stored (or removed) separately.
fn write_indexes<T: Txn + ?Sized>(
    txn: &mut T,
    old: Option<&Task>,
    new: Option<&Task>,
) -> Result<(), StoreError> {
    let was = old.map(Was::of);
    if let (Some(old), Some(was)) = (old, was) {
        index_out(txn, was, &old.queue, &old.id, new)?;
    }
    match new {
        Some(new) => index_in(txn, was, new),
        None => Ok(()),
    }
}

/// Removes the index entries of the old record (`was`, named `queue`/`id`) that `new` does not
/// keep, and its count.
fn index_out<T: Txn + ?Sized>(
    txn: &mut T,
    was: Was,
    queue: &str,
    id: &str,
    new: Option<&Task>,
) -> Result<(), StoreError> {
    let (new_due, new_ready) = new.map_or((None, None), |n| (n.due_at_ms(), n.ready_at_ms()));
    if let Some(due) = was.due.filter(|d| Some(*d) != new_due) {
        txn.due_remove(due, queue, id)?;
    }
    if let Some(at) = was.ready.filter(|a| Some(*a) != new_ready) {
        let (slot_queue, slot_id) = slot(was.push, queue, id);
        txn.ready_remove(slot_queue, at, &slot_id)?;
    }
    txn.count(queue, was.state, -1);
    Ok(())
}

/// Adds the index entries of `new` that the old record (`was`, if any) did not have, and its count.
fn index_in<T: Txn + ?Sized>(txn: &mut T, was: Option<Was>, new: &Task) -> Result<(), StoreError> {
    if let Some(due) = new
        .due_at_ms()
        .filter(|d| was.and_then(|w| w.due) != Some(*d))
    {
        txn.due_add(due, &new.queue, &new.id)?;
    }
    if let Some(at) = new
        .ready_at_ms()
        .filter(|a| was.and_then(|w| w.ready) != Some(*a))
    {
        let (queue, id) = ready_slot(new);
        txn.ready_add(queue, at, &id)?;
    }
    txn.count(&new.queue, new.state, 1);
    Ok(())
}

/// Applies one command at `now_ms`.
pub fn apply_one<T: Txn + ?Sized>(
    txn: &mut T,
    now_ms: u64,
    command: &Command,
) -> Result<Outcome, StoreError> {
    match command {
        Command::Schedule(task) => {
            let mut new = (**task).clone();
            new.start(now_ms);
            if let Some(existing) = txn.create(&new)? {
                return Ok(if existing.fingerprint == task.fingerprint {
                    Outcome::Existing(existing)
                } else {
                    Outcome::Conflict(existing)
                });
            }
            write_indexes(txn, None, Some(&new))?;
            Ok(Outcome::Created(new))
        }
        Command::Reschedule {
            queue,
            id,
            run_at_ms,
            payload,
        } => {
            let Some(old) = txn.get(queue, id)? else {
                return Ok(Outcome::NotFound);
            };
            if !matches!(old.state, TaskState::Scheduled | TaskState::Ready) {
                return Ok(Outcome::WrongState(old.state));
            }
            let mut new = old.clone();
            new.reschedule(now_ms, *run_at_ms, payload.clone());
            write(txn, Some(&old), Some(&new))?;
            Ok(Outcome::Updated(new))
        }
        Command::Cancel { queue, id } => {
            let Some(old) = txn.get(queue, id)? else {
                return Ok(Outcome::NotFound);
            };
            if old.state == TaskState::Leased {
                return Ok(Outcome::WrongState(old.state));
            }
            write(txn, Some(&old), None)?;
            Ok(Outcome::Cancelled(old))
        }
        Command::Reserve {
            queue,
            max,
            lease_ms,
            default_lease_ms,
            token_prefix,
        } => {
            let ids = txn.ready_first(queue, *max)?;
            let mut leased = Vec::with_capacity(ids.len());
            for (n, id) in ids.iter().enumerate() {
                let Some(mut task) = txn.get(queue, id)? else {
                    continue;
                };
                if task.state != TaskState::Ready {
                    continue;
                }
                let was = Was::of(&task);
                let lease = lease_ms.or(task.lease_ms).unwrap_or(*default_lease_ms);
                task.lease(now_ms, lease, format!("{token_prefix}{n:x}"));
                write_over(txn, was, &task)?;
                leased.push(task);
            }
            Ok(Outcome::Reserved(leased))
        }
        Command::Ack {
            queue,
            id,
            token,
            retention_ms,
        }
        | Command::AckLazy {
            queue,
            id,
            token,
            retention_ms,
        } => with_lease(txn, queue, id, token, |task| {
            task.succeed(now_ms, *retention_ms);
            Outcome::Acked(task.clone())
        }),
        Command::Nack {
            queue,
            id,
            token,
            error,
            delay_ms,
            min_delay_ms,
        } => with_lease(txn, queue, id, token, |task| {
            let error = error.as_deref().unwrap_or("nacked");
            match min_delay_ms {
                Some(min) if delay_ms.is_none() => task.fail_at_least(now_ms, error, *min),
                _ => task.fail(now_ms, error, *delay_ms),
            };
            Outcome::Updated(task.clone())
        }),
        Command::Release {
            queue,
            id,
            token,
            delay_ms,
        } => with_lease(txn, queue, id, token, |task| {
            task.release(now_ms, *delay_ms);
            Outcome::Updated(task.clone())
        }),
        Command::Renew {
            queue,
            id,
            token,
            run_at_ms,
            payload,
        } => with_lease(txn, queue, id, token, |task| {
            task.renew(now_ms, *run_at_ms, payload.clone());
            Outcome::Updated(task.clone())
        }),
        Command::ReservePush {
            max,
            default_timeout_ms,
            grace_ms,
            token_prefix,
        } => {
            let keys = txn.ready_first(PUSH_INDEX, *max)?;
            let mut leased = Vec::with_capacity(keys.len());
            for (n, key) in keys.iter().enumerate() {
                let Some((queue, id)) = key.split_once('\0') else {
                    continue;
                };
                let Some(old) = txn.get(queue, id)? else {
                    continue;
                };
                if old.state != TaskState::Ready {
                    continue;
                }
                let timeout_ms = old
                    .webhook
                    .as_ref()
                    .and_then(|w| w.timeout_ms)
                    .unwrap_or(*default_timeout_ms);
                let mut new = old.clone();
                new.lease(
                    now_ms,
                    timeout_ms + grace_ms,
                    format!("{token_prefix}{n:x}"),
                );
                write(txn, Some(&old), Some(&new))?;
                leased.push(new);
            }
            Ok(Outcome::Reserved(leased))
        }
        Command::Extend {
            queue,
            id,
            token,
            lease_ms,
        } => with_lease(txn, queue, id, token, |task| {
            task.extend(now_ms, *lease_ms);
            Outcome::Updated(task.clone())
        }),
        Command::Retry { queue, id } => {
            let Some(old) = txn.get(queue, id)? else {
                return Ok(Outcome::NotFound);
            };
            if old.state != TaskState::Dead {
                return Ok(Outcome::WrongState(old.state));
            }
            let mut new = old.clone();
            new.revive(now_ms);
            write(txn, Some(&old), Some(&new))?;
            Ok(Outcome::Updated(new))
        }
        Command::Put {
            task,
            when,
            keep_due,
        } => {
            let old = txn.get(&task.queue, &task.id)?;
            if let Some(firing) = old
                .as_ref()
                .filter(|o| matches!(o.state, TaskState::Ready | TaskState::Leased))
            {
                return Ok(Outcome::WrongState(firing.state));
            }
            let live = old.as_ref().filter(|o| o.state == TaskState::Scheduled);
            let go = match when {
                PutWhen::Always => true,
                PutWhen::Absent => live.is_none(),
                PutWhen::Present => live.is_some(),
            };
            if !go {
                return Ok(Outcome::Put {
                    previous: old.map(Box::new),
                    written: None,
                });
            }
            let mut new = (**task).clone();
            if let Some(live) = live.filter(|_| *keep_due) {
                new.run_at_ms = live.run_at_ms;
            }
            new.start(now_ms);
            replace(txn, old.as_ref(), &new)?;
            Ok(Outcome::Put {
                previous: old.map(Box::new),
                written: Some(Box::new(new)),
            })
        }
        Command::Delete { queue, id } => {
            let Some(old) = txn.get(queue, id)? else {
                return Ok(Outcome::NotFound);
            };
            if old.state != TaskState::Scheduled {
                return Ok(Outcome::WrongState(old.state));
            }
            write(txn, Some(&old), None)?;
            Ok(Outcome::Cancelled(old))
        }
        Command::SetDue {
            queue,
            id,
            run_at_ms,
        } => {
            let Some(old) = txn.get(queue, id)? else {
                return Ok(Outcome::NotFound);
            };
            if old.state != TaskState::Scheduled {
                return Ok(Outcome::WrongState(old.state));
            }
            let mut new = old.clone();
            new.reschedule(now_ms, Some(*run_at_ms), None);
            write(txn, Some(&old), Some(&new))?;
            Ok(Outcome::Updated(new))
        }
        Command::Incr { template, by } => {
            let old = txn.get(&template.queue, &template.id)?;
            match old.as_ref().map(|o| o.state) {
                Some(state @ (TaskState::Ready | TaskState::Leased)) => {
                    Ok(Outcome::WrongState(state))
                }
                Some(TaskState::Scheduled) => {
                    let old = old.as_ref().expect("matched Some");
                    let Some(sum) = old
                        .payload
                        .as_deref()
                        .and_then(payload_integer)
                        .and_then(|n| n.checked_add(*by))
                    else {
                        return Ok(Outcome::NotInteger);
                    };
                    let mut new = old.clone();
                    new.reschedule(now_ms, None, Some(Some(format!("\"{sum}\""))));
                    write(txn, Some(old), Some(&new))?;
                    Ok(Outcome::Updated(new))
                }
                _ => {
                    let mut new = (**template).clone();
                    new.payload = Some(format!("\"{by}\""));
                    new.start(now_ms);
                    replace(txn, old.as_ref(), &new)?;
                    Ok(Outcome::Created(new))
                }
            }
        }
        Command::Tick { limit, takers } => tick(txn, now_ms, *limit, takers).map(Outcome::Ticked),
        Command::Sync | Command::Flush => Ok(Outcome::Synced),
    }
}

/// Writes `new` in place of `old` (which may be absent: then it is created).
/// Writes `new` over `old`, which the caller has just read with `txn.get` in this transaction
/// (`None`: there is no task with its id, so no second lookup is made; on the journal store a
/// lookup that misses costs a probe of the cold tier's id table).
fn replace<T: Txn + ?Sized>(txn: &mut T, old: Option<&Task>, new: &Task) -> Result<(), StoreError> {
    match old {
        Some(old) => write(txn, Some(old), Some(new)),
        None => {
            txn.put(new)?;
            write_indexes(txn, None, Some(new))
        }
    }
}

/// The integer a payload holds, as a JSON integer (`12`) or a JSON string of one (`"12"`), the
/// form the Redis front end stores values in.
fn payload_integer(payload: &str) -> Option<i64> {
    let text = payload
        .strip_prefix('"')
        .and_then(|p| p.strip_suffix('"'))
        .unwrap_or(payload);
    if text.is_empty() || text.len() > 20 || text.starts_with('+') {
        return None;
    }
    text.parse().ok()
}

fn with_lease<T: Txn + ?Sized>(
    txn: &mut T,
    queue: &str,
    id: &str,
    token: &str,
    change: impl FnOnce(&mut Task) -> Outcome,
) -> Result<Outcome, StoreError> {
    let Some(mut task) = txn.get(queue, id)? else {
        return Ok(Outcome::NotFound);
    };
    match task.check_lease(token) {
        LeaseCheck::Held => {
            let was = Was::of(&task);
            let outcome = change(&mut task);
            write_over(txn, was, &task)?;
            Ok(outcome)
        }
        other => Ok(Outcome::LeaseLost(other)),
    }
}

/// Leases `new` (already `ready`) to the first taker of its queue with room, if any.
fn hand_over(takers: &[Taker], taken: &mut [Vec<Task>], now_ms: u64, new: &mut Task) -> bool {
    let Some(i) = takers
        .iter()
        .zip(taken.iter())
        .position(|(t, got)| t.queue == new.queue && got.len() < t.max)
    else {
        return false;
    };
    let taker = &takers[i];
    let lease_ms = taker
        .lease_ms
        .or(new.lease_ms)
        .unwrap_or(taker.default_lease_ms);
    new.lease(
        now_ms,
        lease_ms,
        format!("{}{:x}", taker.token_prefix, taken[i].len()),
    );
    taken[i].push(new.clone());
    true
}

fn tick<T: Txn + ?Sized>(
    txn: &mut T,
    now_ms: u64,
    limit: usize,
    takers: &[Taker],
) -> Result<TickReport, StoreError> {
    let mut taken: Vec<Vec<Task>> = takers.iter().map(|_| Vec::new()).collect();
    // Tasks that were already ready are older than anything firing now: they go first.
    for (i, taker) in takers.iter().enumerate() {
        let room = taker.max.saturating_sub(taken[i].len());
        for id in txn.ready_first(&taker.queue, room)? {
            let Some(mut task) = txn.get(&taker.queue, &id)? else {
                continue;
            };
            if task.state != TaskState::Ready {
                continue;
            }
            let was = Was::of(&task);
            if hand_over(takers, &mut taken, now_ms, &mut task) {
                write_over(txn, was, &task)?;
            }
        }
    }
    let entries = txn.due_upto(now_ms, limit)?;
    let mut report = TickReport {
        more: entries.len() >= limit,
        ..TickReport::default()
    };
    let mut ready_queues = BTreeSet::new();
    for (due_ms, queue, id) in entries {
        let Some(mut task) = txn.get(&queue, &id)? else {
            // An index entry without a record cannot be produced by `write`; drop it rather than loop on it.
            txn.due_remove(due_ms, &queue, &id)?;
            continue;
        };
        if task.due_at_ms() != Some(due_ms) {
            txn.due_remove(due_ms, &queue, &id)?;
            continue;
        }
        // Changed in place from here on; `was` is what the index update needs of the old record.
        let was = Was::of(&task);
        let attempt = task.attempt;
        match was.state {
            TaskState::Scheduled => {
                task.promote(now_ms);
                report.fired += 1;
            }
            TaskState::Leased => {
                report.expired += 1;
                let outcome = task.fail(now_ms, LEASE_EXPIRED, None);
                match outcome {
                    FailOutcome::Dead => report.dead.push(queue.clone()),
                    FailOutcome::Retry { run_at_ms } if run_at_ms > now_ms => {
                        report.due_times.push(run_at_ms)
                    }
                    FailOutcome::Retry { .. } => {}
                }
                report.lease_failures.push(crate::LeaseFailure {
                    queue: queue.clone(),
                    id: id.clone(),
                    attempt,
                    retry_at_ms: match outcome {
                        FailOutcome::Retry { run_at_ms } => Some(run_at_ms),
                        FailOutcome::Dead => None,
                    },
                });
            }
            TaskState::Succeeded => {
                write(txn, Some(&task), None)?;
                report.purged += 1;
                continue;
            }
            TaskState::Ready | TaskState::Dead => unreachable!("due_at_ms is None in these states"),
        }
        if task.state == TaskState::Ready
            && (task.webhook.is_some() || !hand_over(takers, &mut taken, now_ms, &mut task))
        {
            ready_queues.insert(ready_target(&task).to_owned());
        }
        write_over(txn, was, &task)?;
    }
    report.ready_queues = ready_queues.into_iter().collect();
    report.taken = taken;
    Ok(report)
}
