//! One conformance suite that every [`Store`] backend runs.
//!
//! Each check gets a fresh, empty store from the factory and drives it with an explicit `now_ms`,
//! so the suite is deterministic and never sleeps. [`compare_with_oracle`] replays a command sequence
//! against a backend and the [`MemoryStore`](crate::MemoryStore) and demands identical answers.

use punctual_core::{Backoff, LeaseCheck, Task, TaskState};

use crate::{Buckets, Command, MemoryStore, Outcome, PutWhen, Store, Taker};

/// Builds a task as the server would before scheduling it.
pub fn task(queue: &str, id: &str, run_at_ms: u64, max_attempts: u32, steps_ms: &[u64]) -> Task {
    let backoff = Backoff::Ladder {
        steps_ms: steps_ms.to_vec(),
    };
    Task {
        payload: Some(format!("{{\"id\":\"{id}\"}}")),
        fingerprint: run_at_ms ^ u64::from(max_attempts),
        ..Task::new(queue, id, run_at_ms, max_attempts, backoff)
    }
}

fn one(store: &dyn Store, now_ms: u64, command: Command) -> Outcome {
    let mut outcomes = store.apply(now_ms, &[command]).expect("store error");
    assert_eq!(outcomes.len(), 1);
    outcomes.remove(0)
}

fn schedule(store: &dyn Store, now_ms: u64, task: Task) -> Outcome {
    one(store, now_ms, Command::Schedule(Box::new(task)))
}

fn reserve(store: &dyn Store, now_ms: u64, queue: &str, max: usize) -> Vec<Task> {
    match one(
        store,
        now_ms,
        Command::Reserve {
            queue: queue.into(),
            max,
            lease_ms: None,
            default_lease_ms: 1_000,
            token_prefix: format!("tok{now_ms}-"),
        },
    ) {
        Outcome::Reserved(tasks) => tasks,
        other => panic!("reserve answered {other:?}"),
    }
}

fn tick(store: &dyn Store, now_ms: u64) -> crate::TickReport {
    match one(
        store,
        now_ms,
        Command::Tick {
            limit: 10_000,
            takers: Vec::new(),
        },
    ) {
        Outcome::Ticked(report) => report,
        other => panic!("tick answered {other:?}"),
    }
}

fn token(task: &Task) -> String {
    task.lease.as_ref().expect("leased").token.clone()
}

fn state(store: &dyn Store, queue: &str, id: &str) -> Option<TaskState> {
    store.get(queue, id).expect("get").map(|t| t.state)
}

fn ack(store: &dyn Store, now_ms: u64, task: &Task) -> Outcome {
    one(
        store,
        now_ms,
        Command::Ack {
            queue: task.queue.clone(),
            id: task.id.clone(),
            token: token(task),
            retention_ms: 10_000,
        },
    )
}

fn nack(store: &dyn Store, now_ms: u64, task: &Task, error: &str) -> Outcome {
    one(
        store,
        now_ms,
        Command::Nack {
            queue: task.queue.clone(),
            id: task.id.clone(),
            token: token(task),
            error: Some(error.into()),
            delay_ms: None,
            min_delay_ms: None,
        },
    )
}

pub fn schedule_is_idempotent_by_fingerprint(store: &dyn Store) {
    let t = task("q", "a", 5_000, 3, &[10]);
    assert!(
        matches!(schedule(store, 1_000, t.clone()), Outcome::Created(ref c) if c.state == TaskState::Scheduled && c.created_at_ms == 1_000)
    );
    assert!(
        matches!(schedule(store, 1_500, t.clone()), Outcome::Existing(ref e) if e.created_at_ms == 1_000)
    );
    let mut different = t.clone();
    different.fingerprint += 1;
    assert!(matches!(
        schedule(store, 1_600, different),
        Outcome::Conflict(_)
    ));
    // The same id in another queue is another task.
    let mut other_queue = t;
    other_queue.queue = "r".into();
    assert!(matches!(
        schedule(store, 1_700, other_queue),
        Outcome::Created(_)
    ));
    let got = store.get("q", "a").unwrap().unwrap();
    assert_eq!(got.payload.as_deref(), Some("{\"id\":\"a\"}"));
    assert_eq!(store.get("q", "missing").unwrap(), None);
}

pub fn fires_on_time_in_due_order(store: &dyn Store) {
    schedule(store, 0, task("q", "late", 3_000, 1, &[]));
    schedule(store, 0, task("q", "early", 2_000, 1, &[]));
    schedule(store, 0, task("q", "now", 0, 1, &[]));
    assert_eq!(
        state(store, "q", "now"),
        Some(TaskState::Ready),
        "due at scheduling means ready at once"
    );
    assert_eq!(tick(store, 1_999).fired, 0);
    assert_eq!(state(store, "q", "early"), Some(TaskState::Scheduled));
    let report = tick(store, 3_000);
    assert_eq!(
        (report.fired, report.ready_queues.clone()),
        (2, vec!["q".to_owned()])
    );
    let ids: Vec<String> = reserve(store, 3_000, "q", 2)
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["now", "early"], "oldest due first, at most max");
    let rest = reserve(store, 3_001, "q", 10);
    assert_eq!(rest.len(), 1);
    assert_eq!(
        (rest[0].id.as_str(), rest[0].attempt, rest[0].state),
        ("late", 1, TaskState::Leased)
    );
    assert!(
        reserve(store, 3_002, "q", 10).is_empty(),
        "a leased task is held by one consumer only"
    );
    assert!(reserve(store, 3_002, "other", 10).is_empty());
}

pub fn ack_succeeds_then_purges(store: &dyn Store) {
    schedule(store, 0, task("q", "a", 0, 1, &[]));
    let leased = reserve(store, 10, "q", 1).remove(0);
    assert!(
        matches!(ack(store, 20, &leased), Outcome::Acked(ref t) if t.state == TaskState::Succeeded)
    );
    assert!(matches!(
        ack(store, 21, &leased),
        Outcome::LeaseLost(LeaseCheck::Finished(TaskState::Succeeded))
    ));
    assert_eq!(tick(store, 10_019).purged, 0);
    assert_eq!(state(store, "q", "a"), Some(TaskState::Succeeded));
    assert_eq!(tick(store, 10_020).purged, 1);
    assert_eq!(state(store, "q", "a"), None);
    assert!(
        store.queues().unwrap().is_empty(),
        "a queue with no tasks is not listed"
    );
}

pub fn nack_follows_the_ladder_then_dies_and_retries(store: &dyn Store) {
    schedule(store, 0, task("q", "a", 0, 3, &[100, 500]));
    let first = reserve(store, 0, "q", 1).remove(0);
    assert!(
        matches!(nack(store, 10, &first, "e1"), Outcome::Updated(ref t) if t.run_at_ms == 110 && t.state == TaskState::Scheduled)
    );
    tick(store, 110);
    let second = reserve(store, 110, "q", 1).remove(0);
    assert_eq!(second.attempt, 2);
    assert!(matches!(
        nack(store, 120, &first, "stale"),
        Outcome::LeaseLost(LeaseCheck::HandedOutAgain)
    ));
    assert!(
        matches!(nack(store, 120, &second, "e2"), Outcome::Updated(ref t) if t.run_at_ms == 620)
    );
    tick(store, 620);
    let third = reserve(store, 620, "q", 1).remove(0);
    assert!(
        matches!(nack(store, 630, &third, "e3"), Outcome::Updated(ref t) if t.state == TaskState::Dead)
    );
    let dead = store.get("q", "a").unwrap().unwrap();
    assert_eq!((dead.attempt, dead.last_error.as_deref()), (3, Some("e3")));
    assert!(reserve(store, 10_000, "q", 1).is_empty());
    assert!(
        matches!(one(store, 700, Command::Retry { queue: "q".into(), id: "a".into() }), Outcome::Updated(ref t) if t.state == TaskState::Ready && t.attempt == 0)
    );
    assert!(matches!(
        one(
            store,
            701,
            Command::Retry {
                queue: "q".into(),
                id: "a".into()
            }
        ),
        Outcome::WrongState(TaskState::Ready)
    ));
    assert_eq!(reserve(store, 702, "q", 1).len(), 1);
}

pub fn lease_expiry_is_a_failed_attempt(store: &dyn Store) {
    schedule(store, 0, task("q", "a", 0, 2, &[0]));
    let first = reserve(store, 0, "q", 1).remove(0);
    assert_eq!(first.lease.as_ref().unwrap().expires_at_ms, 1_000);
    assert_eq!(tick(store, 999).expired, 0);
    let report = tick(store, 1_000);
    assert_eq!(
        (report.expired, report.ready_queues.clone()),
        (1, vec!["q".to_owned()])
    );
    let expired = store.get("q", "a").unwrap().unwrap();
    assert_eq!(
        (expired.state, expired.last_error.as_deref()),
        (TaskState::Ready, Some("lease expired"))
    );
    assert!(matches!(
        ack(store, 1_001, &first),
        Outcome::LeaseLost(LeaseCheck::Expired(TaskState::Ready))
    ));
    let second = reserve(store, 1_002, "q", 1).remove(0);
    assert_ne!(token(&first), token(&second));
    let report = tick(store, 2_002);
    assert_eq!(
        (report.expired, report.dead.clone()),
        (1, vec!["q".to_owned()])
    );
    assert_eq!(state(store, "q", "a"), Some(TaskState::Dead));
}

pub fn extend_moves_the_lease(store: &dyn Store) {
    schedule(store, 0, task("q", "a", 0, 1, &[]));
    let leased = reserve(store, 0, "q", 1).remove(0);
    let extend = Command::Extend {
        queue: "q".into(),
        id: "a".into(),
        token: token(&leased),
        lease_ms: 5_000,
    };
    assert!(
        matches!(one(store, 900, extend), Outcome::Updated(ref t) if t.lease.as_ref().unwrap().expires_at_ms == 5_900)
    );
    assert_eq!(tick(store, 5_899).expired, 0);
    assert!(matches!(ack(store, 5_000, &leased), Outcome::Acked(_)));
}

pub fn cancel_and_reschedule_respect_state(store: &dyn Store) {
    schedule(store, 0, task("q", "a", 5_000, 1, &[]));
    schedule(store, 0, task("q", "b", 0, 1, &[]));
    let moved = one(
        store,
        10,
        Command::Reschedule {
            queue: "q".into(),
            id: "a".into(),
            run_at_ms: Some(100),
            payload: Some(Some("[1]".into())),
        },
    );
    assert!(
        matches!(moved, Outcome::Updated(ref t) if t.run_at_ms == 100 && t.payload.as_deref() == Some("[1]"))
    );
    assert_eq!(
        tick(store, 4_000).fired,
        1,
        "fires at the new time, and only once"
    );
    assert_eq!(tick(store, 6_000).fired, 0, "the old due entry is gone");
    let leased = reserve(store, 6_000, "q", 1).remove(0);
    assert_eq!(leased.id, "b");
    let cancel_leased = Command::Cancel {
        queue: "q".into(),
        id: "b".into(),
    };
    assert!(matches!(
        one(store, 6_001, cancel_leased),
        Outcome::WrongState(TaskState::Leased)
    ));
    let move_leased = Command::Reschedule {
        queue: "q".into(),
        id: "b".into(),
        run_at_ms: Some(9_000),
        payload: None,
    };
    assert!(matches!(
        one(store, 6_001, move_leased),
        Outcome::WrongState(TaskState::Leased)
    ));
    assert!(matches!(
        one(
            store,
            6_002,
            Command::Cancel {
                queue: "q".into(),
                id: "a".into()
            }
        ),
        Outcome::Cancelled(_)
    ));
    assert!(matches!(
        one(
            store,
            6_003,
            Command::Cancel {
                queue: "q".into(),
                id: "a".into()
            }
        ),
        Outcome::NotFound
    ));
    assert_eq!(
        reserve(store, 6_004, "q", 10).len(),
        0,
        "a cancelled ready task is not handed out"
    );
}

pub fn counts_and_listing(store: &dyn Store) {
    for i in 0..10 {
        schedule(
            store,
            0,
            task(
                "q",
                &format!("t{i}"),
                if i < 4 { 0 } else { 1_000_000 },
                1,
                &[],
            ),
        );
    }
    let leased = reserve(store, 1, "q", 1).remove(0);
    ack(store, 2, &leased);
    let counts = store.queues().unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].counts, [6, 3, 0, 1, 0]);
    assert_eq!(counts[0].total(), 10);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list("q", None, cursor.as_deref(), 3).unwrap();
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks.into_iter().map(|t| t.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    expected.sort();
    assert_eq!(seen, expected, "pages cover every task once, in id order");
    let ready = store.list("q", Some(TaskState::Ready), None, 100).unwrap();
    assert_eq!(ready.tasks.len(), 3);
    assert!(ready.tasks.iter().all(|t| t.state == TaskState::Ready));
    assert!(store.list("nope", None, None, 10).unwrap().tasks.is_empty());
}

pub fn due_times_are_distinct_and_bounded(store: &dyn Store) {
    for (i, due) in [100u64, 100, 200, 300, 400, 5_000].iter().enumerate() {
        schedule(store, 0, task("q", &format!("t{i}"), *due, 1, &[]));
    }
    let all = store.due_times(0, 1_000, 10).unwrap();
    assert_eq!(
        (all.times.as_slice(), all.truncated),
        ([100, 200, 300, 400].as_slice(), false)
    );
    let some = store.due_times(150, 1_000, 2).unwrap();
    assert_eq!(
        (some.times.as_slice(), some.truncated),
        ([200, 300].as_slice(), true)
    );
}

/// What a timeline should count: scheduled tasks of `queue` by the slice of `buckets` their due
/// time falls in, from a listing.
pub fn timeline_from_listing(store: &dyn Store, queue: &str, buckets: &Buckets) -> Vec<u64> {
    let mut counts = vec![0; buckets.count];
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list(queue, Some(TaskState::Scheduled), cursor.as_deref(), 1_000)
            .unwrap();
        for task in page.tasks {
            if let Some(i) = buckets.index(task.run_at_ms) {
                counts[i] += 1;
            }
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return counts,
        }
    }
}

/// The timeline counts only scheduled tasks of the queue asked for, by due time, and agrees with a
/// listing: exactly for slices aligned with the store's index, and within its `resolution_ms`
/// (tasks counted at or before their own slice, never later, never lost) for any others.
pub fn timeline_counts_scheduled_tasks_by_due_time(store: &dyn Store) {
    let day = 86_400_000u64;
    // Due from now to 40 days ahead: hot, and in every slice level of the journal store.
    let due = |i: u64| match i % 4 {
        0 => i * 37,
        1 => 5_000 + i * 61_001,
        2 => 3 * 3_600_000 + i * 997_331,
        _ => (i * 7_919_993) % (40 * day),
    };
    for i in 0..200u64 {
        schedule(store, 0, task("tl", &format!("t{i}"), due(i), 2, &[10]));
        schedule(store, 0, task("other", &format!("o{i}"), due(i), 1, &[]));
    }
    // Fired, leased (a lease expiry in the due index), acked (a purge time in it), cancelled and
    // rescheduled tasks.
    tick(store, 2_000);
    let leased = reserve(store, 2_000, "tl", 3);
    assert_eq!(leased.len(), 3);
    ack(store, 2_001, &leased[0]);
    one(
        store,
        2_002,
        Command::Cancel {
            queue: "tl".into(),
            id: "t5".into(),
        },
    );
    one(
        store,
        2_003,
        Command::Reschedule {
            queue: "tl".into(),
            id: "t6".into(),
            run_at_ms: Some(2 * day + 17),
            payload: None,
        },
    );
    let total = store
        .list("tl", Some(TaskState::Scheduled), None, 1_000)
        .unwrap()
        .tasks
        .len() as u64;

    // Aligned: hours from midnight (every index cell divides an hour).
    let hours = Buckets::new(0, 41 * day, 41 * 24).unwrap();
    let got = store.timeline("tl", &hours).unwrap();
    assert_eq!(got.counts, timeline_from_listing(store, "tl", &hours));
    assert_eq!(got.resolution_ms, 1);
    assert_eq!(got.counts.iter().sum::<u64>(), total);

    // Not aligned, and narrower than some cells.
    let odd = Buckets::new(1_234, 1_234 + 1_000 * 3_333_337, 1_000).unwrap();
    let got = store.timeline("tl", &odd).unwrap();
    let want = timeline_from_listing(store, "tl", &odd);
    if got.resolution_ms == 1 {
        assert_eq!(got.counts, want);
    } else {
        let mut got_sum = 0;
        let mut want_sum = 0;
        let resolution = got.resolution_ms;
        for (i, (got, want)) in got.counts.iter().zip(&want).enumerate() {
            got_sum += got;
            want_sum += want;
            let end = odd.from_ms + odd.width_ms * (i as u64 + 1);
            let reach =
                Buckets::new(odd.from_ms.saturating_sub(resolution), end + resolution, 1).unwrap();
            let at_most = timeline_from_listing(store, "tl", &reach)[0];
            assert!(
                want_sum <= got_sum && got_sum <= at_most,
                "slice {i}: {got_sum} counted up to it, {want_sum} due, at most {at_most}"
            );
        }
    }

    // An empty queue, and a range with nothing in it.
    assert_eq!(
        store.timeline("nope", &hours).unwrap().counts,
        vec![0; hours.count]
    );
    let past = Buckets::new(50 * day, 51 * day, 10).unwrap();
    assert_eq!(store.timeline("tl", &past).unwrap().counts, vec![0; 10]);
}

/// Scheduled tasks in due order, page by page, are exactly a listing's, sorted by due time then id:
/// ties, other queues, fired, leased, acked, cancelled and rescheduled tasks included.
pub fn list_due_pages_scheduled_tasks_in_due_order(store: &dyn Store) {
    let day = 86_400_000u64;
    let due = |i: u64| match i % 5 {
        0 => 1_000 + (i % 3), // ties, hot
        1 => 7_200_000,       // ties, later
        2 => 5_000 + i * 61_001,
        3 => 3 * 3_600_000 + i * 997_331,
        _ => (i * 7_919_993) % (40 * day),
    };
    for i in 0..150u64 {
        schedule(store, 0, task("ld", &format!("t{i:03}"), due(i), 2, &[10]));
        schedule(store, 0, task("ld-other", &format!("o{i}"), due(i), 1, &[]));
        schedule(store, 0, task("la", &format!("a{i}"), due(i), 1, &[]));
    }
    tick(store, 1_001);
    let leased = reserve(store, 1_001, "ld", 2);
    ack(store, 1_002, &leased[0]);
    one(
        store,
        1_003,
        Command::Cancel {
            queue: "ld".into(),
            id: "t002".into(),
        },
    );
    one(
        store,
        1_003,
        Command::Reschedule {
            queue: "ld".into(),
            id: "t003".into(),
            run_at_ms: Some(7_200_000),
            payload: None,
        },
    );
    let mut want: Vec<(u64, String)> = store
        .list("ld", Some(TaskState::Scheduled), None, 1_000)
        .unwrap()
        .tasks
        .into_iter()
        .map(|t| (t.run_at_ms, t.id))
        .collect();
    want.sort();
    assert!(want.len() > 100);
    for limit in [1_000, 7] {
        let mut got = Vec::new();
        let mut cursor: Option<crate::DueCursor> = None;
        for _ in 0..1_000 {
            let page = store.list_due("ld", cursor.as_ref(), limit).unwrap();
            assert!(page.tasks.len() <= limit);
            assert!(page.tasks.iter().all(|t| t.state == TaskState::Scheduled));
            got.extend(page.tasks.into_iter().map(|t| (t.run_at_ms, t.id)));
            match page.next {
                Some(next) => {
                    let text = next.to_string();
                    assert_eq!(crate::DueCursor::parse(&text), Some(next.clone()));
                    cursor = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(got, want, "pages of {limit}");
    }
    assert!(store.list_due("nope", None, 10).unwrap().tasks.is_empty());
}

pub fn payloads_round_trip(store: &dyn Store) {
    let mut none = task("q", "none", 0, 1, &[]);
    none.payload = None;
    schedule(store, 0, none);
    let mut big = task("q", "big", 0, 1, &[]);
    big.payload = Some(format!("\"{}\"", "x".repeat(1 << 20)));
    schedule(store, 0, big.clone());
    assert_eq!(store.get("q", "none").unwrap().unwrap().payload, None);
    assert_eq!(store.get("q", "big").unwrap().unwrap().payload, big.payload);
}

pub fn tick_hands_due_tasks_to_takers(store: &dyn Store) {
    schedule(store, 0, task("q", "old", 0, 1, &[]));
    schedule(store, 0, task("q", "b", 100, 1, &[]));
    schedule(store, 0, task("q", "c", 100, 1, &[]));
    schedule(store, 0, task("r", "other", 100, 1, &[]));
    let taker = |max: usize| Taker {
        queue: "q".into(),
        max,
        lease_ms: Some(700),
        default_lease_ms: 1_000,
        token_prefix: format!("k{max}-"),
    };
    let Outcome::Ticked(report) = one(
        store,
        100,
        Command::Tick {
            limit: 100,
            takers: vec![taker(2), taker(5)],
        },
    ) else {
        panic!("tick answered something else")
    };
    let ids: Vec<Vec<&str>> = report
        .taken
        .iter()
        .map(|t| t.iter().map(|t| t.id.as_str()).collect())
        .collect();
    assert_eq!(
        ids,
        [vec!["old", "b"], vec!["c"]],
        "older ready tasks first, each taker up to its max"
    );
    assert!(
        report
            .taken
            .iter()
            .flatten()
            .all(|t| t.state == TaskState::Leased && t.attempt == 1)
    );
    assert_eq!(
        report.taken[0][0].lease.as_ref().unwrap().expires_at_ms,
        800
    );
    assert_ne!(token(&report.taken[0][0]), token(&report.taken[1][0]));
    assert_eq!(
        report.ready_queues,
        vec!["r".to_owned()],
        "only the queue without a taker is left ready"
    );
    assert_eq!(state(store, "q", "c"), Some(TaskState::Leased));
    assert_eq!(state(store, "r", "other"), Some(TaskState::Ready));
    assert!(matches!(
        ack(store, 101, &report.taken[1][0]),
        Outcome::Acked(_)
    ));
}

pub fn webhook_tasks_go_only_to_the_push_sender(store: &dyn Store) {
    let mut hooked = task("q", "hook", 100, 3, &[1_000]);
    hooked.webhook = Some(punctual_core::Webhook {
        url: "http://127.0.0.1:9/x".into(),
        headers: Default::default(),
        timeout_ms: Some(2_000),
    });
    schedule(store, 0, hooked);
    schedule(store, 0, task("q", "pull", 100, 3, &[]));
    let taker = Taker {
        queue: "q".into(),
        max: 10,
        lease_ms: None,
        default_lease_ms: 1_000,
        token_prefix: "t-".into(),
    };
    let Outcome::Ticked(report) = one(
        store,
        100,
        Command::Tick {
            limit: 10,
            takers: vec![taker],
        },
    ) else {
        panic!("tick answered something else")
    };
    let taken: Vec<&str> = report.taken[0].iter().map(|t| t.id.as_str()).collect();
    assert_eq!(taken, ["pull"], "a pull consumer never gets a webhook task");
    assert_eq!(report.ready_queues, vec![crate::PUSH_INDEX.to_owned()]);
    assert!(reserve(store, 101, "q", 10).is_empty());
    let push = |now| match one(
        store,
        now,
        Command::ReservePush {
            max: 10,
            default_timeout_ms: 10_000,
            grace_ms: 500,
            token_prefix: format!("p{now}-"),
        },
    ) {
        Outcome::Reserved(tasks) => tasks,
        other => panic!("reserve push answered {other:?}"),
    };
    let first = push(102).remove(0);
    assert_eq!((first.id.as_str(), first.attempt), ("hook", 1));
    assert_eq!(
        first.lease.as_ref().unwrap().expires_at_ms,
        102 + 2_000 + 500
    );
    // A 429 with Retry-After 5 s: later than the ladder's 1 s, so it wins.
    let nack = Command::Nack {
        queue: "q".into(),
        id: "hook".into(),
        token: token(&first),
        error: Some("HTTP 429".into()),
        delay_ms: None,
        min_delay_ms: Some(5_000),
    };
    assert!(matches!(one(store, 200, nack), Outcome::Updated(ref t) if t.run_at_ms == 5_200));
    tick(store, 5_200);
    let second = push(5_200).remove(0);
    let release = Command::Release {
        queue: "q".into(),
        id: "hook".into(),
        token: token(&second),
        delay_ms: 0,
    };
    assert!(
        matches!(one(store, 5_201, release), Outcome::Updated(ref t) if t.attempt == 1 && t.state == TaskState::Ready)
    );
    assert_eq!(
        push(5_202)[0].attempt,
        2,
        "a released delivery did not use up an attempt"
    );
}

/// `Renew`, the primitive of recurring schedules: a schedule's record is a task that the node
/// materialising it leases, and gives back as `scheduled` at its next materialisation with its
/// cursor in the payload, in the same commit as the occurrences (tasks with derived ids, so a second
/// materialisation of the same occurrence creates nothing).
pub fn renew_gives_a_lease_back_as_scheduled(store: &dyn Store) {
    let record = Task {
        payload: Some("{\"cursor_ms\":0}".into()),
        ..Task::new("schedules", "q/every", 1_000, 3, Backoff::default())
    };
    assert!(matches!(schedule(store, 0, record), Outcome::Created(_)));
    tick(store, 1_000);
    let leased = reserve(store, 1_000, "schedules", 10).remove(0);
    assert_eq!(leased.attempt, 1);
    let occurrence = |at: u64| {
        Command::Schedule(Box::new(Task {
            payload: Some("{}".into()),
            ..Task::new("q", format!("every@{at}"), at, 3, Backoff::default())
        }))
    };
    let renew = |token: String, run_at_ms: u64| Command::Renew {
        queue: "schedules".into(),
        id: "q/every".into(),
        token,
        run_at_ms,
        payload: Some(format!("{{\"cursor_ms\":{run_at_ms}}}")),
    };
    let outcomes = store
        .apply(
            1_001,
            &[
                occurrence(2_000),
                occurrence(3_000),
                renew(token(&leased), 2_500),
            ],
        )
        .expect("apply");
    assert!(matches!(outcomes[0], Outcome::Created(_)));
    assert!(matches!(outcomes[1], Outcome::Created(_)));
    match &outcomes[2] {
        Outcome::Updated(t) => {
            assert_eq!(t.state, TaskState::Scheduled);
            assert_eq!((t.run_at_ms, t.attempt), (2_500, 0));
            assert!(t.lease.is_none());
        }
        other => panic!("renew answered {other:?}"),
    }
    let stored = store.get("schedules", "q/every").unwrap().unwrap();
    assert_eq!(stored.payload.as_deref(), Some("{\"cursor_ms\":2500}"));
    assert_eq!(stored.state, TaskState::Scheduled);
    // The lease is gone: renewing again with it changes nothing.
    assert!(matches!(
        one(store, 1_002, renew(token(&leased), 9_000)),
        Outcome::LeaseLost(_)
    ));
    // The same occurrence again (another node, or after a crash): nothing new.
    assert!(matches!(
        one(store, 1_003, occurrence(2_000)),
        Outcome::Existing(_)
    ));
    // Due again at 2 500, with the occurrences firing at their own times.
    let report = tick(store, 2_500);
    assert_eq!(report.fired, 2, "the 2 000 occurrence and the record");
    assert_eq!(state(store, "q", "every@2000"), Some(TaskState::Ready));
    assert_eq!(state(store, "q", "every@3000"), Some(TaskState::Scheduled));
    let again = reserve(store, 2_500, "schedules", 10).remove(0);
    assert_eq!(
        again.attempt, 1,
        "a renewed record starts its attempts afresh"
    );
    // Renewed to a time already past: ready at once.
    match one(store, 2_600, renew(token(&again), 2_000)) {
        Outcome::Updated(t) => assert_eq!(t.state, TaskState::Ready),
        other => panic!("renew answered {other:?}"),
    }
}

/// A named conformance check.
/// A key-value task as the Redis front end writes it: the value is a JSON string.
fn key(id: &str, value: &str, run_at_ms: u64) -> Task {
    Task {
        payload: Some(format!("\"{value}\"")),
        ..Task::new("db0", id, run_at_ms, 1, Backoff::default())
    }
}

fn put(store: &dyn Store, now_ms: u64, task: Task, when: PutWhen, keep_due: bool) -> Outcome {
    let command = Command::Put {
        task: Box::new(task),
        when,
        keep_due,
    };
    one(store, now_ms, command)
}

fn written(outcome: Outcome) -> (Option<Task>, Option<Task>) {
    match outcome {
        Outcome::Put { previous, written } => (previous.map(|t| *t), written.map(|t| *t)),
        other => panic!("put answered {other:?}"),
    }
}

/// `Put`, `Delete`, `SetDue` and `Incr`: the Redis front end's keys, on every backend.
pub fn keys_put_delete_set_due_and_incr(store: &dyn Store) {
    let never = punctual_core::NEVER_MS;
    // A key without a TTL never fires, and a far due time is stored like any other.
    let (previous, task) = written(put(
        store,
        1_000,
        key("plain", "v1", never),
        PutWhen::Always,
        false,
    ));
    assert!(previous.is_none());
    assert_eq!(task.unwrap().state, TaskState::Scheduled);
    assert!(tick(store, 10_000_000).fired == 0);
    // NX on a live key writes nothing and shows what is there; XX on a missing one neither.
    let (previous, task) = written(put(
        store,
        1_001,
        key("plain", "v2", never),
        PutWhen::Absent,
        false,
    ));
    assert_eq!(previous.unwrap().payload.as_deref(), Some("\"v1\""));
    assert!(task.is_none());
    let (previous, task) = written(put(
        store,
        1_002,
        key("nokey", "v", never),
        PutWhen::Present,
        false,
    ));
    assert!(previous.is_none() && task.is_none());
    assert_eq!(state(store, "db0", "nokey"), None);
    // A plain overwrite replaces value and due time; KEEPTTL keeps a live key's due time.
    written(put(
        store,
        1_003,
        key("ttl", "a", 5_000),
        PutWhen::Always,
        false,
    ));
    let (_, task) = written(put(
        store,
        1_004,
        key("ttl", "b", never),
        PutWhen::Always,
        true,
    ));
    let task = task.unwrap();
    assert_eq!(
        (task.run_at_ms, task.payload.as_deref()),
        (5_000, Some("\"b\""))
    );
    // SetDue moves it; a due time in the past fires it at once.
    match one(
        store,
        1_005,
        Command::SetDue {
            queue: "db0".into(),
            id: "ttl".into(),
            run_at_ms: 7_000,
        },
    ) {
        Outcome::Updated(t) => assert_eq!((t.run_at_ms, t.state), (7_000, TaskState::Scheduled)),
        other => panic!("set_due answered {other:?}"),
    }
    let report = tick(store, 7_000);
    assert_eq!(report.fired, 1);
    // Fired (ready): Put, Delete, SetDue and Incr leave it alone for its delivery.
    assert_eq!(
        put(store, 7_001, key("ttl", "c", never), PutWhen::Always, false),
        Outcome::WrongState(TaskState::Ready)
    );
    assert_eq!(
        one(
            store,
            7_001,
            Command::Delete {
                queue: "db0".into(),
                id: "ttl".into()
            }
        ),
        Outcome::WrongState(TaskState::Ready)
    );
    assert_eq!(
        one(
            store,
            7_001,
            Command::SetDue {
                queue: "db0".into(),
                id: "ttl".into(),
                run_at_ms: 9_000
            }
        ),
        Outcome::WrongState(TaskState::Ready)
    );
    // Delivered and acked: the key reads as gone, and a Put writes a new one over the kept value.
    let leased = reserve(store, 7_002, "db0", 10);
    assert_eq!(leased.len(), 1);
    let lazy = Command::AckLazy {
        queue: "db0".into(),
        id: "ttl".into(),
        token: token(&leased[0]),
        retention_ms: 10_000,
    };
    assert!(!lazy.is_durable());
    assert!(matches!(one(store, 7_003, lazy), Outcome::Acked(_)));
    let (previous, task) = written(put(
        store,
        7_004,
        key("ttl", "d", 9_000),
        PutWhen::Absent,
        false,
    ));
    assert_eq!(previous.unwrap().state, TaskState::Succeeded);
    assert_eq!(task.unwrap().state, TaskState::Scheduled);
    // Delete removes only a live key.
    assert!(matches!(
        one(
            store,
            7_005,
            Command::Delete {
                queue: "db0".into(),
                id: "ttl".into()
            }
        ),
        Outcome::Cancelled(_)
    ));
    assert_eq!(
        one(
            store,
            7_005,
            Command::Delete {
                queue: "db0".into(),
                id: "ttl".into()
            }
        ),
        Outcome::NotFound
    );
    // Incr creates, adds, keeps the due time, and refuses what is not an integer.
    let incr = |now, id: &str, by| {
        one(
            store,
            now,
            Command::Incr {
                template: Box::new(key(id, "", never)),
                by,
            },
        )
    };
    assert!(
        matches!(incr(8_000, "n", 5), Outcome::Created(t) if t.payload.as_deref() == Some("\"5\""))
    );
    assert!(
        matches!(incr(8_001, "n", -7), Outcome::Updated(t) if t.payload.as_deref() == Some("\"-2\""))
    );
    written(put(
        store,
        8_002,
        key("n", "41", 20_000),
        PutWhen::Always,
        false,
    ));
    assert!(
        matches!(incr(8_003, "n", 1), Outcome::Updated(t) if t.payload.as_deref() == Some("\"42\"") && t.run_at_ms == 20_000)
    );
    assert_eq!(incr(8_004, "plain", 1), Outcome::NotInteger);
    written(put(
        store,
        8_005,
        key("big", "9223372036854775807", never),
        PutWhen::Always,
        false,
    ));
    assert_eq!(incr(8_006, "big", 1), Outcome::NotInteger);
    assert_eq!(
        store
            .get("db0", "plain")
            .unwrap()
            .unwrap()
            .payload
            .as_deref(),
        Some("\"v1\"")
    );
    let counts = store.queues().unwrap();
    let db0 = counts
        .iter()
        .find(|c| c.queue == "db0")
        .expect("db0 counted");
    assert_eq!(db0.get(TaskState::Scheduled), 3, "{counts:?}");
}

type Check = (&'static str, fn(&dyn Store));

/// Every check, each on a fresh store.
pub fn run_all(make: &dyn Fn() -> Box<dyn Store>) {
    let checks: [Check; 16] = [
        (
            "list_due_pages_scheduled_tasks_in_due_order",
            list_due_pages_scheduled_tasks_in_due_order,
        ),
        (
            "timeline_counts_scheduled_tasks_by_due_time",
            timeline_counts_scheduled_tasks_by_due_time,
        ),
        (
            "renew_gives_a_lease_back_as_scheduled",
            renew_gives_a_lease_back_as_scheduled,
        ),
        (
            "keys_put_delete_set_due_and_incr",
            keys_put_delete_set_due_and_incr,
        ),
        (
            "webhook_tasks_go_only_to_the_push_sender",
            webhook_tasks_go_only_to_the_push_sender,
        ),
        (
            "tick_hands_due_tasks_to_takers",
            tick_hands_due_tasks_to_takers,
        ),
        (
            "schedule_is_idempotent_by_fingerprint",
            schedule_is_idempotent_by_fingerprint,
        ),
        ("fires_on_time_in_due_order", fires_on_time_in_due_order),
        ("ack_succeeds_then_purges", ack_succeeds_then_purges),
        (
            "nack_follows_the_ladder_then_dies_and_retries",
            nack_follows_the_ladder_then_dies_and_retries,
        ),
        (
            "lease_expiry_is_a_failed_attempt",
            lease_expiry_is_a_failed_attempt,
        ),
        ("extend_moves_the_lease", extend_moves_the_lease),
        (
            "cancel_and_reschedule_respect_state",
            cancel_and_reschedule_respect_state,
        ),
        ("counts_and_listing", counts_and_listing),
        (
            "due_times_are_distinct_and_bounded",
            due_times_are_distinct_and_bounded,
        ),
        ("payloads_round_trip", payloads_round_trip),
    ];
    for (name, check) in checks {
        eprintln!("conformance: {name}");
        check(make().as_ref());
    }
}

/// A step of a generated workload, resolved against the store's state when it runs.
#[derive(Debug, Clone)]
pub enum Step {
    Schedule {
        id: u8,
        delay_ms: u16,
        max_attempts: u8,
    },
    Reserve {
        max: u8,
    },
    /// Ack, nack or extend the n-th task handed out so far (stale tokens included on purpose).
    Settle {
        nth: u8,
        how: u8,
    },
    Cancel {
        id: u8,
    },
    Reschedule {
        id: u8,
        delay_ms: u16,
    },
    Retry {
        id: u8,
    },
    Advance {
        ms: u16,
    },
}

/// Replays `steps` against `store` and a fresh [`MemoryStore`], grouping them into batches of `batch`
/// commands, and asserts that both answer every command identically and end with the same tasks.
pub fn compare_with_oracle(store: &dyn Store, steps: &[Step], batch: usize) {
    let oracle = MemoryStore::new();
    let mut now = 1_000u64;
    let mut handed: Vec<Task> = Vec::new();
    let mut pending: Vec<Command> = Vec::new();
    let id = |n: u8| format!("t{}", n % 16);
    let flush = |pending: &mut Vec<Command>, now: u64, handed: &mut Vec<Task>| {
        if pending.is_empty() {
            return;
        }
        let got = store.apply(now, pending).expect("backend error");
        let want = oracle.apply(now, pending).expect("oracle error");
        assert_eq!(got, want, "backend and oracle disagree on {pending:?}");
        for outcome in got {
            match outcome {
                Outcome::Reserved(tasks) => handed.extend(tasks),
                Outcome::Ticked(report) => handed.extend(report.taken.into_iter().flatten()),
                _ => {}
            }
        }
        pending.clear();
    };
    for step in steps {
        let command = match step {
            Step::Schedule {
                id: n,
                delay_ms,
                max_attempts,
            } => Command::Schedule(Box::new(task(
                "q",
                &id(*n),
                now + u64::from(*delay_ms),
                u32::from(*max_attempts % 4) + 1,
                &[50, 200],
            ))),
            Step::Reserve { max } => Command::Reserve {
                queue: "q".into(),
                max: usize::from(*max % 5) + 1,
                lease_ms: None,
                default_lease_ms: 300,
                token_prefix: format!("{now}-{}-", handed.len()),
            },
            Step::Settle { nth, how } => {
                flush(&mut pending, now, &mut handed);
                let Some(t) =
                    (!handed.is_empty()).then(|| handed[usize::from(*nth) % handed.len()].clone())
                else {
                    continue;
                };
                let (queue, id, token) = (t.queue.clone(), t.id.clone(), token(&t));
                match how % 3 {
                    0 => Command::Ack {
                        queue,
                        id,
                        token,
                        retention_ms: 500,
                    },
                    1 => Command::Nack {
                        queue,
                        id,
                        token,
                        error: Some("e".into()),
                        delay_ms: None,
                        min_delay_ms: None,
                    },
                    _ => Command::Extend {
                        queue,
                        id,
                        token,
                        lease_ms: 400,
                    },
                }
            }
            Step::Cancel { id: n } => Command::Cancel {
                queue: "q".into(),
                id: id(*n),
            },
            Step::Reschedule { id: n, delay_ms } => Command::Reschedule {
                queue: "q".into(),
                id: id(*n),
                run_at_ms: Some(now + u64::from(*delay_ms)),
                payload: None,
            },
            Step::Retry { id: n } => Command::Retry {
                queue: "q".into(),
                id: id(*n),
            },
            Step::Advance { ms } => {
                flush(&mut pending, now, &mut handed);
                now += u64::from(*ms);
                Command::Tick {
                    limit: 7,
                    takers: if ms % 2 == 0 {
                        vec![Taker {
                            queue: "q".into(),
                            max: usize::from(*ms % 3) + 1,
                            lease_ms: None,
                            default_lease_ms: 300,
                            token_prefix: format!("{now}-tick-"),
                        }]
                    } else {
                        Vec::new()
                    },
                }
            }
        };
        pending.push(command);
        if pending.len() >= batch {
            flush(&mut pending, now, &mut handed);
        }
    }
    flush(&mut pending, now, &mut handed);
    let all = |s: &dyn Store| s.list("q", None, None, 1_000).expect("list").tasks;
    assert_eq!(all(store), all(&oracle), "final task sets differ");
    assert_eq!(
        store.queues().unwrap(),
        oracle.queues().unwrap(),
        "final counts differ"
    );
}

/// An in-memory redb backend whose fsync fails while `fail` is set: for testing poisoning.
#[derive(Debug, Default)]
pub struct FailingSync {
    inner: redb::backends::InMemoryBackend,
    pub fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl redb::StorageBackend for FailingSync {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)
    }
}
