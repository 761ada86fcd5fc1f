//! Fills a journal store with N scheduled tasks due over 30 days, then times reopening it:
//! `cargo run --release -p punctual-store --example reopen -- DIR N` (N in tasks; an existing DIR
//! is only reopened; with `REOPEN_FILL_ONLY` set it stops after the fill, leaving a crashed store
//! to copy; `REOPEN_CHECKPOINT_MB` sets the checkpoint interval, default the store's; with
//! `REOPEN_WORST` set the fill goes on past N until one batch before the next checkpoint would
//! start, the most journal a restart can have to replay). Prints the phases' times, for profiling
//! recovery.
#![allow(clippy::disallowed_methods)] // A timing tool.

use std::time::Instant;

use punctual_core::Task;
use punctual_store::{Command, JournalStore, JournalStoreOptions, Store};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    let n: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("N"));
    let now = 1_800_000_000_000u64;
    let mut options = JournalStoreOptions {
        now_ms: now,
        ..JournalStoreOptions::default()
    };
    if let Ok(mb) = std::env::var("REOPEN_CHECKPOINT_MB") {
        options.checkpoint_bytes = mb.parse::<u64>().expect("REOPEN_CHECKPOINT_MB") << 20;
    }
    if !dir.join("checkpoint").exists() {
        let store = JournalStore::open(&dir, &options).unwrap();
        let started = Instant::now();
        let month = 30 * 86_400_000u64;
        let worst = std::env::var_os("REOPEN_WORST").is_some();
        // Batches at which a checkpoint started, to find where the next one would.
        let mut starts: Vec<u64> = Vec::new();
        let mut chunk = 0u64;
        loop {
            let last = match (starts.len(), worst) {
                (_, false) | (0 | 1, true) => n.div_ceil(1_000),
                (k, true) => {
                    let every = (starts[k - 1] - starts[0]) / (k as u64 - 1);
                    n.div_ceil(1_000).max(starts[k - 1] + every - 1)
                }
            };
            if chunk >= last {
                break;
            }
            let batch: Vec<Command> = (chunk * 1_000
                ..((chunk + 1) * 1_000).min(n.max(last * 1_000)))
                .map(|i| {
                    let due = now + 60_000 + (i.wrapping_mul(2_654_435_761) % month);
                    let task: Task = punctual_store::conformance::task(
                        "bench",
                        &format!("task-{i:010}"),
                        due,
                        3,
                        &[1_000],
                    );
                    Command::Schedule(Box::new(task))
                })
                .collect();
            let before = store.stats();
            store.apply(now, &batch).unwrap();
            let after = store.stats();
            // A checkpoint starts inside the commit whose journal growth crosses the interval.
            if after.checkpoint_under_way && !before.checkpoint_under_way
                || after.checkpoints > before.checkpoints + u64::from(before.checkpoint_under_way)
            {
                starts.push(chunk);
            }
            chunk += 1;
        }
        let n = if worst { chunk * 1_000 } else { n };
        println!(
            "filled {n} in {:.2?}: {:?}",
            started.elapsed(),
            store.stats()
        );
        // A crash, not a clean shutdown: no final checkpoint. A checkpoint still being written on
        // its thread is finished first, so nothing renames files under the reopen below.
        store.wait_for_checkpoint().unwrap();
        std::mem::forget(store);
        if std::env::var_os("REOPEN_FILL_ONLY").is_some() {
            return;
        }
    }
    let started = Instant::now();
    let store = JournalStore::open(&dir, &options).unwrap();
    println!("reopened in {:.2?}: {:?}", started.elapsed(), store.stats());
    let got = store.get("bench", "task-0000000007").unwrap();
    println!("a get: {:?}", got.map(|t| t.run_at_ms));
    // After a clean shutdown (a checkpoint, nothing to replay): the id table's rebuild alone.
    store.apply(now, &[Command::Sync]).unwrap();
    drop(store);
    let started = Instant::now();
    let store = JournalStore::open(&dir, &options).unwrap();
    println!(
        "reopened after a clean shutdown in {:.2?}: {:?}",
        started.elapsed(),
        store.stats()
    );
}
