//! Runs the conformance suite against every backend, and the generated workload against the oracle.

mod common;

use common::step;
use proptest::prelude::*;
use punctual_core::TaskState;
use punctual_store::conformance;
use punctual_store::{MemoryStore, RedbOptions, RedbStore, Store};

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "punctual-store-{tag}-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn redb() -> Box<dyn Store> {
    Box::new(RedbStore::open(&temp_dir("conf"), &RedbOptions::default()).unwrap())
}

#[test]
fn memory_store_conforms() {
    conformance::run_all(&|| Box::new(MemoryStore::new()));
}

#[test]
fn redb_store_conforms() {
    conformance::run_all(&redb);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn redb_matches_the_oracle(steps in proptest::collection::vec(step(), 1..120), batch in 1usize..8) {
        let store = redb();
        conformance::compare_with_oracle(store.as_ref(), &steps, batch);
    }
}

#[test]
fn redb_keeps_everything_across_reopen() {
    let dir = temp_dir("reopen");
    {
        let store = RedbStore::open(&dir, &RedbOptions::default()).unwrap();
        conformance::counts_and_listing(&store);
    }
    let store = RedbStore::open(&dir, &RedbOptions::default()).unwrap();
    assert_eq!(store.queues().unwrap()[0].counts, [6, 3, 0, 1, 0]);
    assert_eq!(store.list("q", None, None, 100).unwrap().tasks.len(), 10);
    assert_eq!(store.due_times(0, u64::MAX, 10).unwrap().times.len(), 2);
}

#[test]
fn garbage_data_file_is_a_clear_error() {
    let dir = temp_dir("garbage");
    std::fs::write(dir.join("punctual.redb"), vec![0x5a; 64 * 1024]).unwrap();
    let error = RedbStore::open(&dir, &RedbOptions::default())
        .err()
        .expect("must refuse")
        .to_string();
    assert!(error.contains("punctual.redb"), "{error}");
}

#[test]
fn truncated_data_file_is_refused_or_recovered_never_silently_empty() {
    let dir = temp_dir("torn");
    {
        let store = RedbStore::open(&dir, &RedbOptions::default()).unwrap();
        conformance::counts_and_listing(&store);
    }
    let path = dir.join("punctual.redb");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    match RedbStore::open(&dir, &RedbOptions::default()) {
        Err(error) => assert!(error.to_string().contains("punctual.redb"), "{error}"),
        Ok(store) => {
            // If redb recovers, the committed tasks must all be there.
            assert_eq!(store.list("q", None, None, 100).unwrap().tasks.len(), 10);
        }
    }
}

#[test]
fn a_failed_fsync_poisons_the_store_for_good() {
    use punctual_store::{Command, StoreError};
    let backend = conformance::FailingSync::default();
    let fail = backend.fail.clone();
    let store = RedbStore::open_with_backend(backend, &RedbOptions::default()).unwrap();
    let schedule = |id: &str| Command::Schedule(Box::new(conformance::task("q", id, 0, 1, &[])));
    store
        .apply(0, &[schedule("a")])
        .expect("healthy store writes");
    assert!(store.health().is_ok());

    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let error = store
        .apply(1, &[schedule("b")])
        .expect_err("the fsync failed");
    assert!(matches!(error, StoreError::Poisoned(_)), "{error}");
    assert!(
        error.to_string().contains("injected fsync failure"),
        "{error}"
    );

    // Even once the disk "recovers", the store never retries: it refuses every write until restarted.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        store.apply(2, &[schedule("c")]),
        Err(StoreError::Poisoned(_))
    ));
    assert!(store.health().is_err());
    // Reads still answer, and the task acknowledged before the failure is there.
    assert!(store.get("q", "a").unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------
// The journal store (storage v2, first stage)

use punctual_store::journal::JournalOptions;
use punctual_store::{
    Command, JournalStore, JournalStoreOptions, Outcome, SliceGeometry, StoreError,
};

fn journal_store() -> Box<dyn Store> {
    Box::new(JournalStore::open(&temp_dir("jconf"), &JournalStoreOptions::default()).unwrap())
}

/// Time slices of a few milliseconds, so the suites' tasks (due 0–10 000 ms) live in slice files
/// of all three levels and move between them and memory as the suites' clock advances.
fn tiny_slices() -> JournalStoreOptions {
    JournalStoreOptions {
        slices: SliceGeometry {
            load_ahead_ms: 5,
            widths_ms: [10, 50, 500],
            reach_ms: [100, 1_000],
        },
        ..JournalStoreOptions::default()
    }
}

fn sliced_store() -> Box<dyn Store> {
    Box::new(JournalStore::open(&temp_dir("jslices"), &tiny_slices()).unwrap())
}

#[test]
fn journal_store_conforms() {
    conformance::run_all(&journal_store);
}

#[test]
fn journal_store_conforms_with_tasks_in_slice_files() {
    conformance::run_all(&sliced_store);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn journal_store_matches_the_oracle(steps in proptest::collection::vec(step(), 1..120), batch in 1usize..8) {
        let store = journal_store();
        conformance::compare_with_oracle(store.as_ref(), &steps, batch);
    }

    #[test]
    fn journal_store_with_slice_files_matches_the_oracle(steps in proptest::collection::vec(step(), 1..120), batch in 1usize..8) {
        let store = sliced_store();
        conformance::compare_with_oracle(store.as_ref(), &steps, batch);
    }
}

/// Cold tasks are found by id, cancelled, moved and listed without being in memory, and come back
/// from the journal after a reopen; the slice files go once their tasks are due.
#[test]
fn journal_store_keeps_far_tasks_in_slice_files() {
    let dir = temp_dir("jcold");
    let store = JournalStore::open(&dir, &tiny_slices()).unwrap();
    let schedule: Vec<Command> = (0..2_000u64)
        .map(|n| {
            Command::Schedule(Box::new(conformance::task(
                "q",
                &format!("t{n:04}"),
                200 + n * 5,
                3,
                &[10],
            )))
        })
        .collect();
    store.apply(0, &schedule).unwrap();
    let stats = store.stats();
    assert_eq!((stats.hot_tasks, stats.cold_tasks), (0, 2_000));
    let slices = || std::fs::read_dir(dir.join("slices")).unwrap().count();
    assert_eq!(
        store.get("q", "t1234").unwrap().unwrap().run_at_ms,
        200 + 1234 * 5
    );
    assert!(store.get("q", "t9999").unwrap().is_none());
    // Cancel one, move one far ahead and one into the hot window.
    let outcomes = store
        .apply(
            0,
            &[
                Command::Cancel {
                    queue: "q".into(),
                    id: "t0007".into(),
                },
                Command::Reschedule {
                    queue: "q".into(),
                    id: "t0008".into(),
                    run_at_ms: Some(50_000),
                    payload: None,
                },
                Command::Reschedule {
                    queue: "q".into(),
                    id: "t0009".into(),
                    run_at_ms: Some(1),
                    payload: None,
                },
            ],
        )
        .unwrap();
    assert!(matches!(outcomes[0], Outcome::Cancelled(ref t) if t.id == "t0007"));
    assert!(store.get("q", "t0007").unwrap().is_none());
    assert_eq!(store.get("q", "t0008").unwrap().unwrap().run_at_ms, 50_000);
    assert_eq!(store.stats().hot_tasks, 1);
    let page = store.list("q", None, Some("t0005"), 4).unwrap();
    let ids: Vec<&str> = page.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t0006", "t0008", "t0009", "t0010"]);
    assert_eq!(page.next_cursor.as_deref(), Some("t0010"));
    assert_eq!(
        store.due_times(0, 230, 10).unwrap().times,
        [1, 200, 205, 210, 215, 220, 225, 230]
    );
    // A clean shutdown checkpoints; the reopen starts from that checkpoint.
    store.apply(0, &[Command::Sync]).unwrap();
    drop(store);
    // Reopened later, at 3 s: what came due while it was closed fires at once (t0000–t0560 less
    // the cancelled t0007 and the moved t0008; t0009 now due at 1 ms).
    let options = JournalStoreOptions {
        now_ms: 3_000,
        ..tiny_slices()
    };
    let store = JournalStore::open(&dir, &options).unwrap();
    assert_eq!(store.stats().cold_tasks + store.stats().hot_tasks, 1_999);
    assert_eq!(store.get("q", "t0008").unwrap().unwrap().run_at_ms, 50_000);
    let mut fired = tick(&store, 3_000).fired;
    assert_eq!(fired, 559);
    // Fire everything: the slices empty into memory as time passes, and their files go.
    let mut now = 3_007;
    while now <= 60_000 {
        let report = tick(&store, now);
        fired += report.fired;
        now += 7;
    }
    assert_eq!(fired, 1_999);
    assert_eq!(store.stats().cold_tasks, 0);
    // Emptied slice files go with the next checkpoint (the one before still names them).
    assert!(matches!(
        store.apply(now, &[Command::Sync]).unwrap()[0],
        Outcome::Synced
    ));
    assert_eq!(slices(), 0);
}

fn tick(store: &dyn Store, now_ms: u64) -> punctual_store::TickReport {
    match store
        .apply(
            now_ms,
            &[Command::Tick {
                limit: 100_000,
                takers: Vec::new(),
            }],
        )
        .unwrap()
        .pop()
    {
        Some(Outcome::Ticked(report)) => report,
        other => panic!("{other:?}"),
    }
}

#[test]
fn journal_store_keeps_everything_durable_across_reopen() {
    let dir = temp_dir("jreopen");
    {
        let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
        conformance::counts_and_listing(&store);
    }
    let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
    assert_eq!(store.queues().unwrap()[0].counts, [6, 3, 0, 1, 0]);
    assert_eq!(store.list("q", None, None, 100).unwrap().tasks.len(), 10);
    assert_eq!(store.due_times(0, u64::MAX, 10).unwrap().times.len(), 2);
}

/// A lazy ack is not synced before it answers, but it reaches the journal with the next durable
/// commit: a crash any time after that does not bring the task back (the Redis front end's fired
/// keys would fire again). One task is kept for its retention, one is purged before that commit.
#[test]
fn journal_store_keeps_a_lazy_ack_through_a_crash_after_a_durable_commit() {
    let later = conformance::task("other", "later", 9_000_000, 3, &[]);
    lazy_acks_survive_a_crash_after(temp_dir("jlazy"), Command::Schedule(Box::new(later)));
}

/// A `Flush` is the durable commit the server sends a while after lazy acks when nothing else
/// writes; with nothing waiting it writes nothing.
#[test]
fn journal_store_keeps_a_lazy_ack_through_a_crash_after_a_flush() {
    let dir = temp_dir("jflush");
    let journal_bytes = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    {
        let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
        let task = conformance::task("q", "x", 1_000, 3, &[]);
        store
            .apply(0, &[Command::Schedule(Box::new(task))])
            .unwrap();
        let before = journal_bytes(&dir);
        assert_eq!(
            store.apply(0, &[Command::Flush]).unwrap()[0],
            Outcome::Synced
        );
        assert_eq!(
            journal_bytes(&dir),
            before,
            "nothing waiting, nothing written"
        );
        store
            .apply(
                0,
                &[Command::Cancel {
                    queue: "q".into(),
                    id: "x".into(),
                }],
            )
            .unwrap();
    }
    lazy_acks_survive_a_crash_after(dir, Command::Flush);
}

/// Two tasks acked lazily (one kept for its retention, one purged by a tick before `durable`),
/// then `durable`, then a crash: neither is handed out again.
fn lazy_acks_survive_a_crash_after(dir: std::path::PathBuf, durable: Command) {
    {
        let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
        for id in ["kept", "gone"] {
            let task = conformance::task("q", id, 1_000, 3, &[]);
            store
                .apply(0, &[Command::Schedule(Box::new(task))])
                .unwrap();
        }
        assert_eq!(tick(&store, 2_000).fired, 2);
        let reserve = Command::Reserve {
            queue: "q".into(),
            max: 10,
            lease_ms: Some(10_000),
            default_lease_ms: 30_000,
            token_prefix: "t".into(),
        };
        let Outcome::Reserved(tasks) = store.apply(2_000, &[reserve]).unwrap().remove(0) else {
            panic!("reserve answers tasks")
        };
        for task in tasks {
            let ack = Command::AckLazy {
                queue: "q".into(),
                retention_ms: if task.id == "kept" { 3_600_000 } else { 0 },
                id: task.id,
                token: task.lease.unwrap().token,
            };
            assert!(matches!(
                store.apply(2_000, &[ack]).unwrap()[0],
                Outcome::Acked(_)
            ));
        }
        // Purged by a (non-durable) tick before the next durable commit: that commit deletes it.
        assert_eq!(tick(&store, 2_500).purged, 1);
        store.apply(2_000, &[durable]).unwrap();
        // Dropped without `Sync`: no checkpoint, as after kill -9.
    }
    let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
    let kept = store
        .get("q", "kept")
        .unwrap()
        .expect("kept for its retention");
    assert_eq!(kept.state, punctual_core::TaskState::Succeeded);
    assert_eq!(store.get("q", "gone").unwrap(), None);
    assert_eq!(tick(&store, 3_000).fired, 0, "nothing fires again");
}

/// Every task of a store, for comparing states.
fn snapshot(store: &dyn Store) -> Vec<punctual_core::Task> {
    store
        .queues()
        .unwrap()
        .iter()
        .flat_map(|q| store.list(&q.queue, None, None, 10_000).unwrap().tasks)
        .collect()
}

/// Crash images of the whole store: the journal cut at each commit (fsync boundary) and inside each
/// commit reopens to exactly the state after the last whole commit — everything acknowledged, nothing
/// invented — compared with the in-memory oracle that ran the same commands.
#[test]
fn journal_store_crash_images_hold_exactly_the_acknowledged_commits() {
    let dir = temp_dir("jcrash");
    let oracle = MemoryStore::new();
    let store = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
    let segment = |d: &std::path::Path| {
        std::fs::read_dir(d.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .next()
            .unwrap()
    };
    let mut states = vec![(std::fs::metadata(segment(&dir)).unwrap().len(), Vec::new())];
    for n in 0..25u64 {
        let mut batch = vec![Command::Schedule(Box::new(conformance::task(
            "q",
            &format!("t{n}"),
            1_000 + n * 100,
            3,
            &[10],
        )))];
        if n % 3 == 2 {
            batch.push(Command::Cancel {
                queue: "q".into(),
                id: format!("t{}", n - 2),
            });
        }
        if n % 4 == 3 {
            batch.push(Command::Reschedule {
                queue: "q".into(),
                id: format!("t{}", n - 1),
                run_at_ms: Some(50_000),
                payload: Some(Some("\"moved\"".into())),
            });
        }
        assert_eq!(
            store.apply(n, &batch).unwrap(),
            oracle.apply(n, &batch).unwrap()
        );
        states.push((
            std::fs::metadata(segment(&dir)).unwrap().len(),
            snapshot(&oracle),
        ));
    }
    drop(store);
    let path = segment(&dir);
    let image = std::fs::read(&path).unwrap();
    for window in states.windows(2) {
        let ((start, before), (end, after)) = (&window[0], &window[1]);
        for cut in [*start, (start + end) / 2, end - 1, *end] {
            let case = temp_dir("jcut");
            std::fs::create_dir_all(case.join("journal")).unwrap();
            std::fs::write(
                case.join("journal").join(path.file_name().unwrap()),
                &image[..cut as usize],
            )
            .unwrap();
            let reopened = JournalStore::open(&case, &JournalStoreOptions::default()).unwrap();
            let want = if cut == *end { after } else { before };
            assert_eq!(
                &snapshot(&reopened),
                want,
                "cut at {cut} (commit {start}..{end})"
            );
            let _ = std::fs::remove_dir_all(&case);
        }
    }
}

#[test]
fn journal_store_refuses_a_commit_on_a_full_disk_and_goes_on() {
    let dir = temp_dir("jfull");
    let options = JournalStoreOptions {
        // Write 0 is the first commit's; write 1 fails as ENOSPC does.
        journal: JournalOptions {
            fail_write_at: Some(1),
            ..JournalOptions::default()
        },
        ..JournalStoreOptions::default()
    };
    let store = JournalStore::open(&dir, &options).unwrap();
    let schedule = |id: &str| Command::Schedule(Box::new(conformance::task("q", id, 0, 1, &[])));
    store.apply(0, &[schedule("a")]).unwrap();
    let error = store
        .apply(1, &[schedule("b")])
        .expect_err("the disk is full");
    assert!(matches!(error, StoreError::NoSpace(_)), "{error}");
    // Nothing of the refused commit is visible; reads work; the next commit succeeds.
    assert!(store.get("q", "b").unwrap().is_none());
    assert_eq!(store.queues().unwrap()[0].total(), 1);
    assert!(store.health().is_ok());
    store.apply(2, &[schedule("c")]).unwrap();
    drop(store);
    let reopened = JournalStore::open(&dir, &JournalStoreOptions::default()).unwrap();
    let ids: Vec<String> = snapshot(&reopened).into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["a", "c"]);
}

#[test]
fn journal_store_is_poisoned_for_good_by_a_failed_fsync() {
    let dir = temp_dir("jpoison");
    let options = JournalStoreOptions {
        // Sync 0 writes the segment header; sync 2 is the second commit's.
        journal: JournalOptions {
            fail_sync_at: Some(2),
            ..JournalOptions::default()
        },
        ..JournalStoreOptions::default()
    };
    let store = JournalStore::open(&dir, &options).unwrap();
    let schedule = |id: &str| Command::Schedule(Box::new(conformance::task("q", id, 0, 1, &[])));
    store.apply(0, &[schedule("a")]).unwrap();
    assert!(matches!(
        store.apply(1, &[schedule("b")]),
        Err(StoreError::Poisoned(_))
    ));
    assert!(store.health().is_err());
    assert!(matches!(
        store.apply(2, &[schedule("c")]),
        Err(StoreError::Poisoned(_))
    ));
    assert!(store.get("q", "a").unwrap().is_some(), "reads still answer");
    assert!(
        store.get("q", "b").unwrap().is_none(),
        "the failed commit is not visible"
    );
}

/// Checkpoints bound the journal: segments behind the last checkpoint are deleted, and a reopen
/// replays only what came after it.
#[test]
fn journal_store_releases_the_journal_behind_checkpoints() {
    let dir = temp_dir("jcheckpoint");
    let options = JournalStoreOptions {
        checkpoint_bytes: 8 << 10,
        journal: JournalOptions {
            segment_bytes: 4 << 10,
            ..JournalOptions::default()
        },
        ..tiny_slices()
    };
    let size = |d: &std::path::Path| -> u64 {
        std::fs::read_dir(d.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let mut biggest = 0;
    {
        let store = JournalStore::open(&dir, &options).unwrap();
        let creates: Vec<Command> = (0..50)
            .map(|i| {
                Command::Schedule(Box::new(conformance::task(
                    "q",
                    &format!("t{i}"),
                    5_000,
                    1,
                    &[],
                )))
            })
            .collect();
        store.apply(0, &creates).unwrap();
        for round in 0..300u64 {
            let batch: Vec<Command> = (0..50)
                .map(|i| Command::Reschedule {
                    queue: "q".into(),
                    id: format!("t{i}"),
                    run_at_ms: Some(10_000 + round),
                    payload: None,
                })
                .collect();
            store.apply(round, &batch).unwrap();
            // Segments are released by the checkpoint's thread once it is installed.
            store.wait_for_checkpoint().unwrap();
            biggest = biggest.max(size(&dir));
        }
        assert!(dir.join("checkpoint").exists());
    }
    // 300 rounds of 50 reschedules journal about 1.3 MB; checkpoints keep a few segments of it.
    assert!(biggest < 64 << 10, "the journal reached {biggest} bytes");
    let store = JournalStore::open(&dir, &options).unwrap();
    let tasks = snapshot(&store);
    assert_eq!(tasks.len(), 50);
    assert!(tasks.iter().all(|t| t.run_at_ms == 10_299));
    assert_eq!(store.stats().cold_tasks, 50);
    assert!(
        store.stats().replayed_at_open < 50 * 40,
        "{:?}",
        store.stats()
    );
    drop(store);
    let again = JournalStore::open(&dir, &options).unwrap();
    assert_eq!(snapshot(&again), tasks);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Crash images of the whole data directory (checkpoint, slice files, journal) taken after every
/// commit of a workload that moves tasks through all three slice levels, with checkpoints every
/// few commits. Each reopens to exactly the oracle's state after that commit; so does each with
/// junk appended to every slice file (writes after the last checkpoint torn or half on disk, which
/// recovery must cut off), and each with its journal's last batch torn (the state before it).
#[test]
fn journal_store_directory_crash_images_reopen_to_the_acknowledged_state() {
    crash_images(
        "jdircrash",
        JournalStoreOptions::default().checkpoint_step_tasks,
        5,
    );
}

/// The same, with checkpoints encoded 2 hot tasks per commit: most images are taken while one is
/// being built, with tasks firing, moving between the tiers and changing under it.
#[test]
fn journal_store_crash_images_reopen_while_checkpoints_are_built_across_commits() {
    crash_images("jdircrash-fuzzy", 2, 2);
}

fn crash_images(name: &str, step: usize, at_least_checkpoints: usize) {
    let dir = temp_dir(name);
    let images = temp_dir(&format!("{name}-images"));
    let mut building = 0;
    let options = JournalStoreOptions {
        checkpoint_bytes: 6 << 10,
        checkpoint_step_tasks: step,
        journal: JournalOptions {
            segment_bytes: 8 << 10,
            ..JournalOptions::default()
        },
        ..tiny_slices()
    };
    let oracle = MemoryStore::new();
    let store = JournalStore::open(&dir, &options).unwrap();
    let mut states = Vec::new();
    let mut now = 0u64;
    for n in 0..60u64 {
        let mut batch: Vec<Command> = (0..8)
            .map(|i| {
                Command::Schedule(Box::new(conformance::task(
                    "q",
                    &format!("t{n}-{i}"),
                    now + 20 + (n * 37 + i * 211) % 3_000,
                    2,
                    &[10],
                )))
            })
            .collect();
        if n >= 2 {
            batch.push(Command::Cancel {
                queue: "q".into(),
                id: format!("t{}-1", n - 2),
            });
            batch.push(Command::Reschedule {
                queue: "q".into(),
                id: format!("t{}-2", n - 2),
                run_at_ms: Some(now + 1_500),
                payload: Some(Some(format!("[{n}]"))),
            });
        }
        batch.push(Command::Tick {
            limit: 1_000,
            takers: Vec::new(),
        });
        let got = store.apply(now, &batch).unwrap();
        let want = oracle.apply(now, &batch).unwrap();
        assert_eq!(got.len(), want.len());
        // A checkpoint this commit started is written by a thread of its own: copying the
        // directory meanwhile would race its rename. Recovery from a crash during one is what the
        // kill -9 test (`crates/punctual/tests/crash.rs`) covers.
        store.wait_for_checkpoint().unwrap();
        building += usize::from(store.stats().checkpoint_under_way);
        copy_dir(&dir, &images.join(n.to_string()));
        states.push((now, with_counts(&oracle)));
        now += 23;
    }
    drop(store);
    let mut checkpoints = std::collections::BTreeSet::new();
    for (n, (now, want)) in states.iter().enumerate() {
        let image = images.join(n.to_string());
        if let Ok(bytes) = std::fs::read(image.join("checkpoint")) {
            checkpoints.insert(bytes);
        }
        let reopen = |path: &std::path::Path| {
            let options = JournalStoreOptions {
                now_ms: *now,
                ..options.clone()
            };
            with_counts(&JournalStore::open(path, &options).unwrap())
        };
        let plain = images.join(format!("{n}-plain"));
        copy_dir(&image, &plain);
        assert_eq!(&reopen(&plain), want, "image {n}");

        let junk = images.join(format!("{n}-junk"));
        copy_dir(&image, &junk);
        for entry in std::fs::read_dir(junk.join("slices")).unwrap() {
            let path = entry.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend_from_slice(&[0xA5; 37]);
            std::fs::write(&path, bytes).unwrap();
        }
        assert_eq!(&reopen(&junk), want, "image {n} with junk after the slices");

        if n > 0 {
            let torn = images.join(format!("{n}-torn"));
            copy_dir(&image, &torn);
            let mut segments: Vec<_> = std::fs::read_dir(torn.join("journal"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            segments.sort();
            let last = segments.last().unwrap();
            let len = std::fs::metadata(last).unwrap().len();
            // Cutting 3 bytes off the last batch tears it; a crash can do that only while no
            // checkpoint covers it, so not when this very commit wrote a checkpoint.
            let checkpoint_of =
                |m: usize| std::fs::read(images.join(m.to_string()).join("checkpoint")).ok();
            if len > 16 && checkpoint_of(n) == checkpoint_of(n - 1) {
                let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
                f.set_len(len - 3).unwrap();
                let got = reopen(&torn);
                assert!(
                    got == *want || got == states[n - 1].1,
                    "image {n} with a torn last batch: neither this commit's state nor the one before"
                );
            }
        }
    }
    assert!(
        checkpoints.len() > at_least_checkpoints,
        "only {} distinct checkpoints",
        checkpoints.len()
    );
    if step < 100 {
        assert!(building > 30, "only {building} images while one was built");
    }
}

/// Every task and every queue's counts.
/// Every task, the counts, and the timeline of queue `q` over 10 s in 500 ms slices (a multiple of
/// every cell of `tiny_slices`, so exact).
type Seen = (
    Vec<punctual_core::Task>,
    Vec<punctual_store::QueueCounts>,
    punctual_store::Timeline,
);

fn with_counts(store: &dyn Store) -> Seen {
    let buckets = punctual_store::Buckets::new(0, 10_000, 20).unwrap();
    (
        snapshot(store),
        store.queues().unwrap(),
        store.timeline("q", &buckets).unwrap(),
    )
}

/// A data directory written by the release before checkpoint format 2 (`tests/fixtures/
/// checkpoint-v1`, made by `punctual serve` at 501ab5e: five mail tasks and one billing task due in
/// 2027, two mail tasks ready, one leased, one billing task acked, then SIGTERM) opens with every
/// task and count, and the next checkpoint, in the current format (3), reopens the same.
#[test]
fn journal_store_opens_a_version_1_checkpoint() {
    let dir = temp_dir("jcheckpoint-v1");
    copy_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1"),
        &dir,
    );
    // Minutes after the fixture was written, so nothing in it has come due since.
    let options = JournalStoreOptions {
        now_ms: 1_796_236_600_000,
        ..JournalStoreOptions::default()
    };
    let counts = |store: &JournalStore| -> Vec<(String, [u64; 5])> {
        store
            .queues()
            .unwrap()
            .into_iter()
            .map(|q| (q.queue, q.counts))
            .collect()
    };
    let state = |s: TaskState| s.index();
    let mut billing = [0u64; 5];
    billing[state(TaskState::Scheduled)] = 1;
    billing[state(TaskState::Succeeded)] = 1;
    let mut mail = [0u64; 5];
    mail[state(TaskState::Scheduled)] = 5;
    mail[state(TaskState::Ready)] = 2;
    mail[state(TaskState::Leased)] = 1;
    let want = vec![("billing".to_owned(), billing), ("mail".to_owned(), mail)];
    let store = JournalStore::open(&dir, &options).unwrap();
    assert_eq!(counts(&store), want);
    assert_eq!(store.stats().cold_tasks, 6);
    // The cold tier's timeline cells, which checkpoints before version 3 did not hold, are counted
    // from the slices at open, and kept by the next checkpoint.
    let year = punctual_store::Buckets::new(options.now_ms, options.now_ms + 400 * 86_400_000, 400)
        .unwrap();
    let timeline = |store: &JournalStore| {
        ["mail", "billing"].map(|q| store.timeline(q, &year).unwrap().counts)
    };
    let expected = ["mail", "billing"]
        .map(|q| punctual_store::conformance::timeline_from_listing(&store, q, &year));
    assert_eq!(expected[0].iter().sum::<u64>(), 5);
    assert_eq!(timeline(&store), expected);
    let far = store.get("mail", "far-3").unwrap().unwrap();
    assert_eq!(far.payload.as_deref(), Some(r#"{"n":3}"#));
    let tasks = snapshot(&store);
    assert_eq!(tasks.len(), 10);
    store.apply(options.now_ms, &[Command::Sync]).unwrap();
    drop(store);
    assert_eq!(std::fs::read(dir.join("checkpoint")).unwrap()[4], 3);
    let store = JournalStore::open(&dir, &options).unwrap();
    assert_eq!(counts(&store), want);
    assert_eq!(snapshot(&store), tasks);
    assert_eq!(timeline(&store), expected);
}
