//! Times the store's part of a drain, without HTTP: N tasks all due at once, fired by ticks, leased
//! 100 at a time by 4 reserves per commit, acked 100 per command batch.
//! `cargo run --release -p punctual-store --example drain -- DIR N [redb]` (DIR must not exist; a number
//! instead of `redb`: the journal store's checkpoint interval in MiB, default 8).
//! Prints each phase's time per task, for profiling the writer's cost per delivered task, and the
//! slowest commits of the drain (what a checkpoint costs the commit it runs in).
#![allow(clippy::disallowed_methods)] // A timing tool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use punctual_core::Task;
use punctual_store::{
    Command, JournalStore, JournalStoreOptions, Outcome, RedbOptions, RedbStore, Store,
};

/// The allocator the server uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("DIR"));
    let n: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("N"));
    let third = args.next();
    let redb = third.as_deref() == Some("redb");
    let checkpoint_mb: u64 = third.and_then(|a| a.parse().ok()).unwrap_or(8);
    let now = 1_800_000_000_000u64;
    let mut journal = None;
    let store: Arc<dyn Store> = if redb {
        std::fs::create_dir_all(&dir).unwrap();
        Arc::new(RedbStore::open(&dir, &RedbOptions::default()).unwrap())
    } else {
        let options = JournalStoreOptions {
            now_ms: now,
            checkpoint_bytes: checkpoint_mb << 20,
            ..JournalStoreOptions::default()
        };
        let store = Arc::new(JournalStore::open(&dir, &options).unwrap());
        journal = Some(store.clone());
        store
    };
    let started = Instant::now();
    let mut scheduling = Vec::new();
    for chunk in 0..n.div_ceil(1_000) {
        let batch: Vec<Command> = (chunk * 1_000..((chunk + 1) * 1_000).min(n))
            .map(|i| {
                let task: Task = punctual_store::conformance::task(
                    "bench",
                    &format!("drain-{i:010}"),
                    now + 1_000,
                    3,
                    &[1_000],
                );
                Command::Schedule(Box::new(task))
            })
            .collect();
        let commit = Instant::now();
        store.apply(now, &batch).unwrap();
        scheduling.push(commit.elapsed());
    }
    report("schedule", started.elapsed(), n);
    summary("schedule commits", &mut scheduling);
    let now = now + 2_000;

    let (mut tick, mut reserve, mut ack) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    // Every commit's time in the drain.
    let mut commits: Vec<Duration> = Vec::new();
    let mut timed = |store: &dyn Store, commands: &[Command]| {
        let started = Instant::now();
        let outcomes = store.apply(now, commands).unwrap();
        commits.push(started.elapsed());
        outcomes
    };
    let mut delivered = 0u64;
    let mut round = 0u64;
    loop {
        let started = Instant::now();
        let mut fired = 0;
        loop {
            let outcome = timed(
                store.as_ref(),
                &[Command::Tick {
                    limit: 2_000,
                    takers: Vec::new(),
                }],
            );
            let Some(Outcome::Ticked(report)) = outcome.into_iter().next() else {
                panic!("tick outcome")
            };
            fired += report.fired;
            if !report.more || fired >= 2_000 {
                break;
            }
        }
        tick += started.elapsed();

        let started = Instant::now();
        let reserves: Vec<Command> = (0..4)
            .map(|c| Command::Reserve {
                queue: "bench".into(),
                max: 100,
                lease_ms: Some(60_000),
                default_lease_ms: 60_000,
                token_prefix: format!("t{round}-{c}-"),
            })
            .collect();
        round += 1;
        let outcomes = timed(store.as_ref(), &reserves);
        reserve += started.elapsed();
        let leased: Vec<Task> = outcomes
            .into_iter()
            .flat_map(|o| match o {
                Outcome::Reserved(tasks) => tasks,
                _ => Vec::new(),
            })
            .collect();
        if leased.is_empty() && fired == 0 {
            break;
        }
        delivered += leased.len() as u64;

        let started = Instant::now();
        let acks: Vec<Command> = leased
            .iter()
            .map(|t| Command::Ack {
                queue: t.queue.clone(),
                id: t.id.clone(),
                token: t.lease.as_ref().unwrap().token.clone(),
                retention_ms: 86_400_000,
            })
            .collect();
        for outcome in timed(store.as_ref(), &acks) {
            assert!(matches!(outcome, Outcome::Acked(_)), "{outcome:?}");
        }
        ack += started.elapsed();
    }
    assert_eq!(delivered, n);
    report("tick (fire)", tick, n);
    report("reserve", reserve, n);
    report("ack (one fsync per 400)", ack, n);
    report("deliver, all three", tick + reserve + ack, n);
    summary("drain commits", &mut commits);
    if let Some(journal) = journal {
        println!("{:?}", journal.stats());
    }
}

/// The distribution of commit times.
fn summary(what: &str, commits: &mut [Duration]) {
    commits.sort_unstable();
    let at = |q: f64| commits[((commits.len() - 1) as f64 * q) as usize];
    println!(
        "{what} {}: p50 {:.2?}  p99 {:.2?}  p99.9 {:.2?}  slowest {:.2?}  over 5 ms: {}",
        commits.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        commits.last().copied().unwrap_or_default(),
        commits
            .iter()
            .filter(|c| **c > Duration::from_millis(5))
            .count()
    );
}

fn report(what: &str, took: Duration, n: u64) {
    println!(
        "{what:<26} {:>8.2?}  {:>6.2} µs/task  {:>7.1} k tasks/s",
        took,
        took.as_secs_f64() * 1e6 / n as f64,
        n as f64 / took.as_secs_f64() / 1e3
    );
}
