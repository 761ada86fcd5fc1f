//! The programs people run on Redis keyspace notifications, unchanged, against a real `punctual serve
//! --resp`: a producer (shadow key, PSETEX, DEL to cancel) and three PSUBSCRIBE daemons, written with
//! redis-py 8 (RESP3), node `redis` v4 (RESP2), and redis-cli. Each run checks on-time firing, one
//! delivery among the three daemons, cancelling, the shadow key, and no loss while the daemons are
//! down. `scripts/test` installs the clients under `target/clients/`.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Server, free_port, temp_dir};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
enum Client {
    Python,
    Node,
    Cli,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn python() -> PathBuf {
    let python = root().join("target/clients/venv/bin/python");
    assert!(
        python.exists(),
        "redis-py is not installed: run ./scripts/test, which installs it into target/clients/venv"
    );
    python
}

fn node_path() -> PathBuf {
    let modules = root().join("target/clients/node/node_modules");
    assert!(
        modules.join("redis").exists(),
        "node redis is not installed: run ./scripts/test, which installs it into target/clients/node"
    );
    modules
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A running daemon and the events it printed.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(client: Client, role: &str, args: &[String]) -> Child {
    let mut command = match client {
        Client::Python => {
            let mut c = Command::new(python());
            c.arg(clients_dir().join(format!("{role}.py")));
            c
        }
        Client::Node => {
            let mut c = Command::new("node");
            c.arg(clients_dir().join(format!("{role}.js")))
                .env("NODE_PATH", node_path());
            c
        }
        Client::Cli => Command::new("redis-cli"),
    };
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the {client:?} {role}: {e}"))
}

/// One JSON value per line; redis-cli's `--csv` lines become the same shape.
fn reader(child: &mut Child, client: Client) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let value = match client {
                Client::Cli => {
                    let fields: Vec<String> = line
                        .split(',')
                        .map(|f| f.trim_matches('"').to_owned())
                        .collect();
                    match fields.first().map(String::as_str) {
                        Some("psubscribe") => serde_json::json!({"ready": true}),
                        Some("pmessage") if fields.len() == 4 => {
                            serde_json::json!({"key": fields[3], "at_ms": now_ms()})
                        }
                        _ => continue,
                    }
                }
                _ => match serde_json::from_str(&line) {
                    Ok(value) => value,
                    Err(_) => continue,
                },
            };
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

fn daemon(client: Client, port: u16) -> Daemon {
    daemon_as(client, port, None)
}

/// A daemon that connects as `user` (redis-py and node only), which names its group.
fn daemon_as(client: Client, port: u16, user: Option<&str>) -> Daemon {
    let mut args: Vec<String> = match client {
        Client::Cli => vec![
            "-p".into(),
            port.to_string(),
            "--csv".into(),
            "psubscribe".into(),
            "__keyevent@0__:expired".into(),
        ],
        _ => vec![port.to_string()],
    };
    args.extend(user.map(str::to_owned));
    let mut child = spawn(client, "daemon", &args);
    let lines = reader(&mut child, client);
    let ready = lines
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{client:?} daemon not ready: {e}"));
    assert_eq!(ready["ready"], true, "{ready}");
    Daemon { child, lines }
}

/// Runs the producer: `count` keys `prefix:i` due `base_ms + i * step_ms` from now, with shadow keys,
/// and `cancels` keys set and deleted. Returns each key's due time.
fn produce(
    client: Client,
    port: u16,
    prefix: &str,
    count: u64,
    base_ms: u64,
    step_ms: u64,
    cancels: u64,
) -> BTreeMap<String, u64> {
    let mut due = BTreeMap::new();
    match client {
        Client::Cli => {
            let mut child = spawn(client, "producer", &["-p".into(), port.to_string()]);
            let mut script = String::new();
            let start = now_ms();
            for i in 0..count {
                let key = format!("{prefix}:{i}");
                let delay = base_ms + i * step_ms;
                script.push_str(&format!(
                    "SET shadow:{key} \"payload of {key}\"\nPSETEX {key} {delay} \"\"\n"
                ));
                due.insert(key, start + delay);
            }
            for i in 0..cancels {
                script.push_str(&format!(
                    "SET {prefix}:cancel{i} x PX {base_ms}\nDEL {prefix}:cancel{i}\n"
                ));
            }
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success());
            let text = String::from_utf8_lossy(&output.stdout);
            assert_eq!(
                text.matches("OK").count() as u64,
                2 * count + cancels,
                "{text}"
            );
        }
        _ => {
            let args: Vec<String> = [
                port.to_string(),
                prefix.into(),
                count.to_string(),
                base_ms.to_string(),
                step_ms.to_string(),
                cancels.to_string(),
            ]
            .into();
            let mut child = spawn(client, "producer", &args);
            let lines = reader(&mut child, client);
            loop {
                let line = lines
                    .recv_timeout(Duration::from_secs(20))
                    .expect("producer output");
                if line["done"] == true {
                    break;
                }
                due.insert(
                    line["key"].as_str().unwrap().to_owned(),
                    line["due_ms"].as_u64().unwrap(),
                );
            }
            assert!(
                child.wait().unwrap().success(),
                "{client:?} producer failed"
            );
        }
    }
    due
}

/// Events from all `daemons` until every key of `due` arrived or `within` passed.
fn collect(
    daemons: &[Daemon],
    due: &BTreeMap<String, u64>,
    within: Duration,
) -> Vec<(usize, Value)> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline && seen.len() < due.len() {
        for (n, d) in daemons.iter().enumerate() {
            while let Ok(event) = d.lines.try_recv() {
                seen.insert(event["key"].as_str().unwrap_or("").to_owned());
                events.push((n, event));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Anything late (a duplicate, a cancelled key) would arrive right after.
    std::thread::sleep(Duration::from_millis(300));
    for (n, d) in daemons.iter().enumerate() {
        while let Ok(event) = d.lines.try_recv() {
            events.push((n, event));
        }
    }
    events
}

async fn scenario(client: Client, extra: &[&str]) {
    let port = free_port();
    let resp = format!("127.0.0.1:{port}");
    let mut args = vec!["--resp", &resp];
    args.extend_from_slice(extra);
    let _server = Server::start(&temp_dir("clients"), &args).await;
    let daemons: Vec<Daemon> = (0..3).map(|_| daemon(client, port)).collect();
    let due = produce(client, port, "order", 30, 400, 20, 3);
    let events = collect(&daemons, &due, Duration::from_secs(8));
    let keys: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["key"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(
        keys.len(),
        unique.len(),
        "{client:?}: an event was delivered twice: {keys:?}"
    );
    let expected: BTreeSet<&str> = due.keys().map(String::as_str).collect();
    assert_eq!(
        unique, expected,
        "{client:?}: every key fired once, no cancelled key fired"
    );
    let mut lateness: Vec<i64> = events
        .iter()
        .map(|(_, e)| e["at_ms"].as_i64().unwrap() - due[e["key"].as_str().unwrap()] as i64)
        .collect();
    lateness.sort_unstable();
    eprintln!(
        "{client:?}: lateness ms p50 {} max {}",
        lateness[lateness.len() / 2],
        lateness[lateness.len() - 1]
    );
    // On time: Redis delivered these seconds late under load; a second is generous for a loaded CI box.
    assert!(
        *lateness.last().unwrap() < 1000 && lateness[0] > -50,
        "{client:?}: {lateness:?}"
    );
    let per_daemon: Vec<usize> = (0..3)
        .map(|n| events.iter().filter(|(d, _)| *d == n).count())
        .collect();
    assert!(
        per_daemon.iter().all(|n| *n > 0),
        "{client:?}: the three daemons share the events: {per_daemon:?}"
    );
    for (_, event) in &events {
        if !matches!(client, Client::Cli) {
            let key = event["key"].as_str().unwrap();
            assert_eq!(
                event["shadow"],
                format!("payload of {key}"),
                "{client:?}: the shadow key"
            );
            assert_eq!(event["lock"], true, "{client:?}: SET NX EX took the lock");
        }
    }
    // The daemons go away; keys fire while nobody listens; one daemon comes back and gets them all.
    drop(daemons);
    let due = produce(client, port, "gap", 10, 200, 10, 0);
    let last = *due.values().max().unwrap();
    while now_ms() < last + 500 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = [daemon(client, port)];
    let events = collect(&back, &due, Duration::from_secs(8));
    let keys: BTreeSet<String> = events
        .iter()
        .map(|(_, e)| e["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events.len(),
        10,
        "{client:?}: each waiting event once: {events:?}"
    );
    assert_eq!(
        keys,
        due.keys().cloned().collect::<BTreeSet<_>>(),
        "{client:?}: nothing lost while the daemons were down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_programs_run_unchanged() {
    scenario(Client::Python, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_redis_v4_programs_run_unchanged() {
    scenario(Client::Node, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_runs_unchanged() {
    scenario(Client::Cli, &[]).await;
}

/// The same programs against a node of the distributed mode, on a Redis the test starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_programs_run_unchanged_on_a_redis_backed_node() {
    let redis = punctual_store::redis_testing::RedisServer::start(&[]).expect("start redis-server");
    scenario(Client::Python, &["--redis", &redis.url()]).await;
}

/// Two applications (AUTH users) on two nodes of one Redis: each gets every event once, also the
/// ones that fire while it is away, wherever they fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_applications_on_two_nodes_each_get_every_event_once() {
    let redis = punctual_store::redis_testing::RedisServer::start(&[]).expect("start redis-server");
    let url = redis.url();
    let (port_a, port_b) = (free_port(), free_port());
    let (resp_a, resp_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let _a = Server::start(&temp_dir("groups-a"), &["--resp", &resp_a, "--redis", &url]).await;
    let _b = Server::start(&temp_dir("groups-b"), &["--resp", &resp_b, "--redis", &url]).await;
    let billing = daemon_as(Client::Python, port_a, Some("billing"));
    let shipping = daemon_as(Client::Python, port_b, Some("shipping"));
    // Both nodes know both groups (a node reads the registry every 2 s, and on PUNCTUAL.GROUPS).
    for resp in [&resp_a, &resp_b] {
        let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let groups: Vec<redis::Value> = redis::cmd("PUNCTUAL.GROUPS")
                .query_async(&mut conn)
                .await
                .unwrap();
            if groups.len() == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{resp}: {groups:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let check = |events: &[(usize, Value)], due: &BTreeMap<String, u64>, who: &str| {
        let keys: Vec<String> = events
            .iter()
            .map(|(_, e)| e["key"].as_str().unwrap().to_owned())
            .collect();
        let unique: BTreeSet<String> = keys.iter().cloned().collect();
        assert_eq!(keys.len(), unique.len(), "{who}: twice: {keys:?}");
        assert_eq!(
            unique,
            due.keys().cloned().collect::<BTreeSet<_>>(),
            "{who}: every event"
        );
    };
    // Produced through node A; fired by whichever node's hub takes them.
    let due = produce(Client::Python, port_a, "both", 20, 300, 10, 2);
    let got = collect(std::slice::from_ref(&billing), &due, Duration::from_secs(8));
    check(&got, &due, "billing");
    let got = collect(
        std::slice::from_ref(&shipping),
        &due,
        Duration::from_secs(8),
    );
    check(&got, &due, "shipping");
    // Shipping goes away; billing keeps getting events; shipping gets its own when it is back.
    drop(shipping);
    let due = produce(Client::Python, port_b, "away", 10, 200, 10, 0);
    let got = collect(std::slice::from_ref(&billing), &due, Duration::from_secs(8));
    check(&got, &due, "billing while shipping is away");
    let shipping = daemon_as(Client::Python, port_b, Some("shipping"));
    let got = collect(
        std::slice::from_ref(&shipping),
        &due,
        Duration::from_secs(8),
    );
    check(&got, &due, "shipping after it came back");
}

/// SIGKILL between `SETEX` and its expiry: the key is durable, so its event fires after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_between_setex_and_its_expiry_still_fires_after_restart() {
    let port = free_port();
    let resp = format!("127.0.0.1:{port}");
    let mut server = Server::start(&temp_dir("resp-crash"), &["--resp", &resp]).await;
    let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for i in 0..20 {
        let _: () = redis::cmd("SETEX")
            .arg(format!("crash:{i}"))
            .arg(2)
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let set_at = now_ms();
    server.kill9();
    server.restart().await;
    let cli = daemon(Client::Cli, port);
    let due: BTreeMap<String, u64> = (0..20)
        .map(|i| (format!("crash:{i}"), set_at + 2000))
        .collect();
    let events = collect(std::slice::from_ref(&cli), &due, Duration::from_secs(10));
    let keys: BTreeSet<String> = events
        .iter()
        .map(|(_, e)| e["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        due.keys().cloned().collect::<BTreeSet<_>>(),
        "every key fired after the restart"
    );
    assert_eq!(events.len(), 20, "each once");
}

/// SIGKILL after events were handed out: the hub's acks are lazy (no fsync of their own), but they
/// reach the journal with the next durable write, so no event comes back after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_handed_out_before_a_kill_9_is_not_handed_out_again() {
    events_handed_out_then_kill_9("acked", true).await;
}

/// With no write after the events, the server's own flush (`LAZY_FLUSH_MS`, 200 ms) makes the
/// acks durable: a kill -9 a second later does not hand them out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_handed_out_a_second_before_a_kill_9_with_no_write_after_is_not_handed_out_again()
{
    events_handed_out_then_kill_9("flushed", false).await;
}

/// 50 keys fire and reach a redis-cli subscriber; then a durable `PSETEX` (`write_after`) or a
/// second's wait, SIGKILL and a restart: no event comes again, and all 50 are acked.
async fn events_handed_out_then_kill_9(tag: &str, write_after: bool) {
    let port = free_port();
    let resp = format!("127.0.0.1:{port}");
    let mut server =
        Server::start(&temp_dir(&format!("resp-crash-{tag}")), &["--resp", &resp]).await;
    let cli = daemon(Client::Cli, port);
    let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let set_at = now_ms();
    for i in 0..50 {
        psetex(&mut conn, &format!("{tag}:{i}"), 300).await;
    }
    let due: BTreeMap<String, u64> = (0..50)
        .map(|i| (format!("{tag}:{i}"), set_at + 300))
        .collect();
    let events = collect(std::slice::from_ref(&cli), &due, Duration::from_secs(10));
    assert_eq!(events.len(), 50, "each once before the kill");
    if write_after {
        // A durable write after the events, as any producer makes.
        psetex(&mut conn, "later", 600_000).await;
    } else {
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(cli);
    server.kill9();
    server.restart().await;
    let cli = daemon(Client::Cli, port);
    std::thread::sleep(Duration::from_secs(2));
    let again: Vec<Value> = cli.lines.try_iter().collect();
    assert!(
        again.is_empty(),
        "handed out again after the restart: {again:?}"
    );
    let counts: Value = reqwest::get(format!("{}/v1/queues/db0", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counts["succeeded"], 50, "{counts}");
    assert_eq!(counts["scheduled"], u64::from(write_after), "{counts}");
}

async fn psetex(conn: &mut redis::aio::MultiplexedConnection, key: &str, ms: u64) {
    let _: () = redis::cmd("PSETEX")
        .arg(key)
        .arg(ms)
        .arg("v")
        .query_async(conn)
        .await
        .unwrap();
}
