//! The Redis store against real `redis-server` processes this test starts on free loopback ports:
//! the conformance suite and the oracle comparison on a standalone server (one shard and several) and
//! on a 3-master cluster, and exclusivity when several stores race for the same tasks.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

mod common;

use common::step;
use proptest::prelude::*;
use punctual_store::conformance;
use punctual_store::redis_testing::{RedisCluster, RedisServer};
use punctual_store::{Command, Outcome, RedisOptions, RedisStore, RedisTarget, Store, Taker};

fn server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(|| RedisServer::start(&[]).expect("start redis-server"))
}

fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3).expect("start a 3-master cluster"))
}

/// A fresh keyspace on the shared server: every store gets its own key prefix.
fn prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A store on `target` under `prefix`.
fn open(target: RedisTarget, prefix: &str, shards: Option<u32>) -> RedisStore {
    let options = RedisOptions {
        prefix: prefix.to_owned(),
        shards,
        ..RedisOptions::default()
    };
    RedisStore::open(&target, &options).expect("open the redis store")
}

fn standalone(shards: u32) -> RedisStore {
    open(
        RedisTarget::Standalone(server().url()),
        &prefix(),
        Some(shards),
    )
}

fn on_cluster(shards: u32) -> RedisStore {
    open(
        RedisTarget::Cluster(cluster().urls()),
        &prefix(),
        Some(shards),
    )
}

#[test]
fn redis_store_conforms_with_one_shard() {
    conformance::run_all(&|| Box::new(standalone(1)));
}

#[test]
fn redis_store_conforms_with_seven_shards() {
    conformance::run_all(&|| Box::new(standalone(7)));
}

#[test]
fn redis_cluster_store_conforms() {
    conformance::run_all(&|| Box::new(on_cluster(12)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Reads merge the shards of a queue, so the oracle's order holds whatever the shard count.
    #[test]
    fn redis_matches_the_oracle(
        steps in proptest::collection::vec(step(), 1..120),
        batch in 1usize..8,
        shards in 1u32..5,
    ) {
        let store = standalone(shards);
        conformance::compare_with_oracle(&store, &steps, batch);
    }
}

#[test]
fn a_keyspace_keeps_its_shard_count() {
    let prefix = prefix();
    let open = |shards: Option<u32>| {
        RedisStore::open(
            &RedisTarget::Standalone(server().url()),
            &RedisOptions {
                prefix: prefix.clone(),
                shards,
                ..RedisOptions::default()
            },
        )
    };
    assert_eq!(open(Some(5)).unwrap().shards(), 5);
    assert_eq!(open(None).unwrap().shards(), 5, "a later node adopts it");
    let error = open(Some(3)).err().expect("a different count is refused");
    assert!(error.to_string().contains("5 shards"), "{error}");
}

#[test]
fn a_bad_url_or_prefix_is_a_clear_error() {
    let refused = RedisStore::open(
        &RedisTarget::Standalone(format!(
            "redis://127.0.0.1:{}/",
            punctual_store::redis_testing::free_port()
        )),
        &RedisOptions::default(),
    )
    .err()
    .expect("nothing listens there");
    assert!(refused.to_string().contains("redis"), "{refused}");
    let bad = RedisStore::open(
        &RedisTarget::Standalone(server().url()),
        &RedisOptions {
            prefix: "a{b}".into(),
            ..RedisOptions::default()
        },
    )
    .err()
    .expect("braces would break the hash tags");
    assert!(bad.to_string().contains("prefix"), "{bad}");
}

/// Four stores (as four nodes would) fire and lease the same 2 000 tasks at once, with reserves and
/// ticks racing: every task is leased exactly once.
fn race(make: impl Fn(&str) -> RedisStore) {
    let prefix = prefix();
    let first = make(&prefix);
    let schedules: Vec<Command> = (0..2000)
        .map(|i| {
            Command::Schedule(Box::new(conformance::task(
                "q",
                &format!("t{i}"),
                1_000 + (i % 50),
                3,
                &[],
            )))
        })
        .collect();
    first.apply(500, &schedules).unwrap();
    let stores: Vec<Arc<RedisStore>> = std::iter::once(first)
        .chain((1..4).map(|_| make(&prefix)))
        .map(Arc::new)
        .collect();
    let threads: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, store)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut leased = Vec::new();
                for round in 0..400 {
                    let taker = Taker {
                        queue: "q".into(),
                        max: 7,
                        lease_ms: Some(60_000),
                        default_lease_ms: 60_000,
                        token_prefix: format!("n{n}r{round}."),
                    };
                    let commands = [
                        Command::Tick {
                            limit: 100,
                            takers: vec![taker.clone()],
                        },
                        Command::Reserve {
                            queue: "q".into(),
                            max: 11,
                            lease_ms: Some(60_000),
                            default_lease_ms: 60_000,
                            token_prefix: format!("n{n}R{round}."),
                        },
                    ];
                    for outcome in store.apply(2_000, &commands).unwrap() {
                        match outcome {
                            Outcome::Ticked(report) => {
                                leased.extend(report.taken.into_iter().flatten())
                            }
                            Outcome::Reserved(tasks) => leased.extend(tasks),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                leased
            })
        })
        .collect();
    let leased: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let distinct: HashSet<&str> = leased.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(distinct.len(), leased.len(), "a task was leased twice");
    assert_eq!(distinct.len(), 2000, "every task was leased");
    // The store agrees: each task is leased with the token its one consumer got.
    for task in &leased {
        let stored = stores[0].get("q", &task.id).unwrap().unwrap();
        assert_eq!(stored.lease, task.lease, "{}", task.id);
    }
    assert_eq!(stores[0].queues().unwrap()[0].counts, [0, 0, 2000, 0, 0]);
}

#[test]
fn racing_stores_lease_each_task_once() {
    race(|prefix| open(RedisTarget::Standalone(server().url()), prefix, Some(4)));
}

#[test]
fn racing_stores_on_a_cluster_lease_each_task_once() {
    race(|prefix| open(RedisTarget::Cluster(cluster().urls()), prefix, Some(12)));
}

#[test]
fn notices_reach_the_other_stores_only() {
    let prefix = prefix();
    let node = || open(RedisTarget::Standalone(server().url()), &prefix, None);
    let (a, b) = (node(), node());
    let (rx_a, rx_b) = (listen(&a), listen(&b));
    a.publish(punctual_store::Notice {
        due_times: vec![42],
        ready_queues: vec!["q".into()],
        ..punctual_store::Notice::default()
    });
    let got = news(&rx_b).expect("b hears a");
    assert_eq!(got.due_times, vec![42]);
    assert_eq!(got.ready_queues, vec!["q".to_owned()]);
    // a hears b join (a resync: shards change owners), but nothing of its own notice.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(300) {
        if let Ok(notice) = rx_a.recv_timeout(std::time::Duration::from_millis(50)) {
            assert!(notice.resync, "a does not hear itself: {notice:?}");
        }
    }
}

/// Subscribes `store` to its notices; answers them once it is subscribed (its first notice, a resync).
fn listen(store: &RedisStore) -> std::sync::mpsc::Receiver<punctual_store::Notice> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    store.subscribe(Box::new(move |n| {
        let _ = tx.lock().unwrap().send(n);
    }));
    let first = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert!(
        first.expect("subscribed").resync,
        "the first notice is a resync"
    );
    rx
}

/// `from` publishes a ready queue and `to` (listening on `rx`) hears it.
fn ready_notice_crosses(from: &RedisStore, rx: &std::sync::mpsc::Receiver<punctual_store::Notice>) {
    from.publish(punctual_store::Notice {
        ready_queues: vec!["q".into()],
        ..punctual_store::Notice::default()
    });
    let got = news(rx).expect("the other store hears it");
    assert_eq!(got.ready_queues, vec!["q".to_owned()]);
}

/// The next notice with news in it, skipping resync requests (sent when other nodes come and go).
fn news(rx: &std::sync::mpsc::Receiver<punctual_store::Notice>) -> Option<punctual_store::Notice> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        let notice = rx.recv_timeout(left).ok()?;
        if notice != punctual_store::Notice::resync() {
            return Some(notice);
        }
    }
}

/// A node that hears another one join, or stop (no heartbeat for 1.5 s), asks for a resync: the
/// shards the two share change owners.
#[test]
fn a_node_joining_or_leaving_asks_for_a_resync() {
    let prefix = prefix();
    let node = || open(RedisTarget::Standalone(server().url()), &prefix, None);
    let a = node();
    let rx = listen(&a);
    let wait = std::time::Duration::from_secs(5);
    let b = node();
    assert!(rx.recv_timeout(wait).expect("b joins").resync);
    drop(b);
    let dropped = std::time::Instant::now();
    let notice = rx.recv_timeout(wait).expect("b is gone");
    assert!(notice.resync);
    let after = dropped.elapsed();
    assert!(
        after >= std::time::Duration::from_millis(900),
        "only once b is silent for 1.5 s (heartbeats every 0.5 s): {after:?}"
    );
}

/// `wait_replicas`: a durable commit is answered once that many replicas have it, and fails clearly
/// when they do not confirm in time; leases (not durable) never wait.
#[test]
fn wait_replicas_holds_durable_answers_until_replicas_confirm() {
    let primary = RedisServer::start(&[]).expect("start the primary");
    let port = primary.port.to_string();
    let replica =
        RedisServer::start(&["--replicaof", "127.0.0.1", &port]).expect("start the replica");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !primary
        .cli(&["info", "replication"])
        .unwrap()
        .contains("state=online")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never synced"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let open = |replicas: u32, timeout_ms: u64| {
        RedisStore::open(
            &RedisTarget::Standalone(primary.url()),
            &RedisOptions {
                prefix: "w".into(),
                wait_replicas: replicas,
                wait_timeout_ms: timeout_ms,
                ..RedisOptions::default()
            },
        )
        .unwrap()
    };
    let schedule = |id: &str| Command::Schedule(Box::new(conformance::task("q", id, 0, 1, &[])));

    let one = open(1, 5_000);
    one.apply(10, &[schedule("a")])
        .expect("one replica confirms");
    // The replica has it the moment the answer comes.
    let on_replica = replica
        .cli(&["hlen", &format!("w:{{{}}}:t:q", tag_of("q"))])
        .unwrap();
    assert_eq!(on_replica.trim(), "1");

    // A 2 s wait, so that a lease that waited for it could not pass for one that did not.
    let two = open(2, 2_000);
    let error = two
        .apply(10, &[schedule("b")])
        .expect_err("there is only one replica");
    assert!(
        error.to_string().contains("reached 1 of 2 replicas"),
        "{error}"
    );
    let reserve = Command::Reserve {
        queue: "q".into(),
        max: 10,
        lease_ms: None,
        default_lease_ms: 30_000,
        token_prefix: "r.".into(),
    };
    let started = std::time::Instant::now();
    two.apply(20, &[reserve]).expect("a lease does not wait");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1_000),
        "{:?}",
        started.elapsed()
    );
}

/// The hash tag of a queue's shard 0 (FNV-1a of the name), as the store computes it.
fn tag_of(queue: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in queue.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}.0")
}

/// TLS with a private CA and client certificates (`tls-auth-clients yes`): the conformance suite and
/// pub/sub notices run over `rediss://`; a missing CA or client certificate, and certificates given for
/// a `redis://` URL, are clear errors.
#[test]
fn tls_with_a_private_ca_and_client_certificates() {
    use punctual_store::RedisTls;
    let server = RedisServer::start_tls(true).expect("start redis-server with TLS");
    let url = server.tls_url().unwrap();
    let read = |name: &str| std::fs::read(server.tls_file(name)).unwrap();
    let full = RedisTls {
        ca: Some(read("ca.crt")),
        client: Some((read("client.crt"), read("client.key"))),
    };
    let open = |url: &str, prefix: &str, tls: &RedisTls| {
        RedisStore::open(
            &RedisTarget::Standalone(url.to_owned()),
            &RedisOptions {
                prefix: prefix.to_owned(),
                tls: tls.clone(),
                io_timeout_ms: 2_000,
                ..RedisOptions::default()
            },
        )
    };

    let unknown_ca = open(&url, "x", &RedisTls::default())
        .err()
        .expect("the bundled roots do not know the test CA");
    assert!(
        unknown_ca
            .to_string()
            .to_lowercase()
            .contains("certificate"),
        "{unknown_ca}"
    );
    let no_client = RedisTls {
        client: None,
        ..full.clone()
    };
    assert!(
        open(&url, "x", &no_client).is_err(),
        "the server demands a client certificate"
    );
    let plain = open(&server.url(), "x", &full)
        .err()
        .expect("certificates for a redis:// URL");
    assert!(plain.to_string().contains("rediss://"), "{plain}");

    conformance::run_all(&|| Box::new(open(&url, &prefix(), &full).expect("open over TLS")));

    let prefix = prefix();
    let (a, b) = (
        open(&url, &prefix, &full).unwrap(),
        open(&url, &prefix, &full).unwrap(),
    );
    ready_notice_crosses(&a, &listen(&b));
}

/// A 3-master cluster that speaks TLS (`tls-cluster yes`): the conformance suite runs over `rediss://`
/// URLs with the cluster's CA, and notices cross between two stores.
#[test]
fn a_tls_cluster_conforms() {
    use punctual_store::RedisTls;
    let cluster = RedisCluster::start_tls(3).expect("start a TLS cluster");
    let tls = RedisTls {
        ca: Some(std::fs::read(cluster.nodes[0].tls_file("ca.crt")).unwrap()),
        client: None,
    };
    let open = |prefix: &str| {
        RedisStore::open(
            &RedisTarget::Cluster(cluster.tls_urls()),
            &RedisOptions {
                prefix: prefix.to_owned(),
                tls: tls.clone(),
                ..RedisOptions::default()
            },
        )
        .expect("open the TLS cluster")
    };
    conformance::run_all(&|| Box::new(open(&prefix())));
    let prefix = prefix();
    let (a, b) = (open(&prefix), open(&prefix));
    ready_notice_crosses(&a, &listen(&b));
}

/// Two nodes that hear each other split the shards: a tick fires only the owner's tasks, and due times
/// of the other node's shards stay out of a node's timer; once those tasks are `OWNER_GRACE_MS` overdue
/// (their owner stalls while still sending heartbeats), the other node fires them too.
#[test]
fn each_node_fires_its_own_shards_and_takes_over_a_stalled_owner() {
    use punctual_core::TaskState;
    use punctual_store::OWNER_GRACE_MS;
    let prefix = prefix();
    let node = || open(RedisTarget::Standalone(server().url()), &prefix, Some(16));
    let (a, b) = (node(), node());
    let (rx_a, rx_b) = (listen(&a), listen(&b));
    // Each has heard the other (a join asks for a resync).
    assert!(
        rx_a.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap()
            .resync
    );
    assert!(
        rx_b.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap()
            .resync
    );
    let ids: Vec<String> = (0..200).map(|i| format!("t{i}")).collect();
    let due = 10_000;
    let schedules: Vec<Command> = ids
        .iter()
        .map(|id| Command::Schedule(Box::new(conformance::task("q", id, due, 3, &[]))))
        .collect();
    a.apply(1_000, &schedules).unwrap();
    let (mine, theirs): (Vec<&String>, Vec<&String>) = ids.iter().partition(|id| b.owns("q", id));
    assert!(!mine.is_empty() && !theirs.is_empty(), "16 shards split");
    for id in &ids {
        assert_ne!(a.owns("q", id), b.owns("q", id), "{id} has one owner");
    }

    // b's timer hears of its own shards' times only.
    assert_eq!(b.due_times(0, 20_000, 10).unwrap().times, vec![due]);
    let tick = || Command::Tick {
        limit: 1_000,
        takers: Vec::new(),
    };
    b.apply(due, &[tick()]).unwrap();
    let state = |id: &str| b.get("q", id).unwrap().unwrap().state;
    assert!(mine.iter().all(|id| state(id) == TaskState::Ready));
    assert!(
        theirs.iter().all(|id| state(id) == TaskState::Scheduled),
        "left to their owner"
    );
    let late = due + OWNER_GRACE_MS + 1;
    assert!(
        b.due_times(0, late, 10).unwrap().times.is_empty(),
        "a's are a's"
    );
    // a stalls: it never ticks. Once its tasks are overdue by the grace, b sees and fires them.
    b.apply(late, &[]).unwrap();
    assert_eq!(
        b.due_times(0, late, 10).unwrap().times,
        vec![due],
        "b sees them now"
    );
    b.apply(late, &[tick()]).unwrap();
    assert!(ids.iter().all(|id| state(id) == TaskState::Ready));
}

/// A keyspace written before the scheduled index (`w`) existed gets it built when a node of this
/// version opens it, so its timeline counts every scheduled task.
#[test]
fn an_older_keyspace_gets_its_scheduled_index_at_open() {
    let prefix = prefix();
    let target = RedisTarget::Standalone(server().url());
    let store = open(target.clone(), &prefix, Some(3));
    for i in 0..2_500u64 {
        let task = conformance::task("old", &format!("t{i:04}"), 10_000 + i * 1_000, 1, &[]);
        store
            .apply(0, &[Command::Schedule(Box::new(task))])
            .unwrap();
    }
    // Some fire and are leased: those are not scheduled any more.
    store
        .apply(
            20_000,
            &[Command::Tick {
                limit: 100,
                takers: Vec::new(),
            }],
        )
        .unwrap();
    drop(store);
    // Before the scheduled index, `d` held every due time and there was no `w`.
    let keys = scheduled_into_due_index(&prefix);
    assert_eq!(keys.len(), 3, "one scheduled index per shard: {keys:?}");
    for key in keys {
        server().cli(&["DEL", &key]).unwrap();
    }
    server()
        .cli(&["HDEL", &format!("{prefix}:meta"), "scheduled_index"])
        .unwrap();

    let store = open(target, &prefix, None);
    let buckets = punctual_store::Buckets::new(0, 3_000_000, 30).unwrap();
    let got = store.timeline("old", &buckets).unwrap();
    let want = conformance::timeline_from_listing(&store, "old", &buckets);
    assert_eq!(got.counts, want);
    assert_eq!(got.counts.iter().sum::<u64>(), 2_500 - 11);
}

/// Makes a keyspace look as one written before the due index was split: every scheduled task's due
/// time in `d` too (which then held every due time). Answers the scheduled indexes (`w`) it copied.
fn scheduled_into_due_index(prefix: &str) -> Vec<String> {
    let keys = index_keys(prefix, "w");
    for w in &keys {
        let d = w.replacen(":w:", ":d:", 1);
        server().cli(&["ZUNIONSTORE", &d, "2", &d, w]).unwrap();
    }
    keys
}

/// The `kind` index keys of a keyspace, one per queue shard that has one.
fn index_keys(prefix: &str, kind: &str) -> Vec<String> {
    server()
        .cli(&["--scan", "--pattern", &format!("{prefix}*:{kind}:*")])
        .unwrap()
        .lines()
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Members of every `kind` index of a keyspace.
fn index_members(prefix: &str, kind: &str) -> u64 {
    index_keys(prefix, kind)
        .iter()
        .map(|k| {
            server()
                .cli(&["ZCARD", k])
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn an_older_keyspace_with_scheduled_tasks_in_both_due_indexes_fires_each_once() {
    let prefix = prefix();
    let store = open(RedisTarget::Standalone(server().url()), &prefix, Some(3));
    for i in 0..600u64 {
        let task = conformance::task("both", &format!("t{i:04}"), 10_000 + i * 10, 1, &[]);
        store
            .apply(0, &[Command::Schedule(Box::new(task))])
            .unwrap();
    }
    assert_eq!(
        index_members(&prefix, "d"),
        0,
        "scheduled tasks are only in w"
    );
    assert_eq!(scheduled_into_due_index(&prefix).len(), 3);
    assert_eq!(index_members(&prefix, "d"), 600);

    // Changing a task clears its old entry: 20 move later, 20 are cancelled.
    for i in 0..20u64 {
        let moved = Command::Reschedule {
            queue: "both".into(),
            id: format!("t{i:04}"),
            run_at_ms: Some(900_000 + i),
            payload: None,
        };
        let cancelled = Command::Cancel {
            queue: "both".into(),
            id: format!("t{:04}", 100 + i),
        };
        store.apply(0, &[moved, cancelled]).unwrap();
    }
    assert_eq!(index_members(&prefix, "d"), 560);

    let mut fired = 0;
    let mut ticks = 0;
    for now_ms in [16_000, 1_000_000] {
        loop {
            let command = Command::Tick {
                limit: 50,
                takers: Vec::new(),
            };
            let Outcome::Ticked(report) = store.apply(now_ms, &[command]).unwrap().remove(0) else {
                panic!("a tick answers a report")
            };
            fired += report.fired;
            ticks += 1;
            assert!(ticks < 100, "ticks keep finding work: {fired} fired");
            if !report.more {
                break;
            }
        }
    }
    assert_eq!(fired, 580, "every task fired once");
    assert_eq!(index_members(&prefix, "d"), 0, "no entry left behind");
    assert_eq!(index_members(&prefix, "w"), 0);
    let counts = store.queues().unwrap();
    assert_eq!(counts[0].get(punctual_core::TaskState::Ready), 580);
}
