//! Runs the conformance suite against every backend, and the generated workload against the oracle.

mod common;

use common::step;
use proptest::prelude::*;
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
