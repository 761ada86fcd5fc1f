//! The Redis front end over real sockets: redis-rs (RESP2 and RESP3) for commands and replies, raw
//! bytes where the exact frames matter (subscribe confirmations, push frames, errors), against the
//! journal store on real files. Waits poll with a deadline; nothing sleeps to "wait for" an event.
#![allow(clippy::disallowed_methods)] // Tests measure elapsed time directly.

mod common;

use common::temp_dir;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use punctual_server::resp::{EventOptions, RespLimits};
use punctual_server::{App, RespOptions, ServerConfig};
use punctual_store::{JournalStore, JournalStoreOptions};
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    app: Option<App>,
    addr: SocketAddr,
}

impl Server {
    async fn start(config: ServerConfig, events: EventOptions) -> Server {
        Self::start_in(&temp_dir("resp"), config, events).await
    }

    /// A server on the store in `dir` (a restart when a server used it before).
    async fn start_in(dir: &std::path::Path, config: ServerConfig, events: EventOptions) -> Server {
        let store = Arc::new(JournalStore::open(dir, &JournalStoreOptions::default()).unwrap());
        let mut app = App::start(store, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        app.start_resp(
            listener,
            RespOptions {
                events,
                limits: RespLimits::default(),
            },
        );
        Server {
            app: Some(app),
            addr,
        }
    }

    async fn default() -> Server {
        Self::start(ServerConfig::default(), EventOptions::default()).await
    }

    async fn client(&self, resp3: bool) -> redis::aio::MultiplexedConnection {
        let url = if resp3 {
            format!("redis://{}/?protocol=resp3", self.addr)
        } else {
            format!("redis://{}/", self.addr)
        };
        redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn raw(&self) -> Raw {
        Raw {
            stream: TcpStream::connect(self.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// A connection that sends and reads bytes as they are.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until `expected` has arrived (and checks it is exactly what came), or 5 s pass.
    async fn expect(&mut self, expected: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.buf.len() < expected.len() && Instant::now() < deadline {
            let mut chunk = [0u8; 4096];
            let read =
                tokio::time::timeout(Duration::from_millis(200), self.stream.read(&mut chunk))
                    .await;
            if let Ok(Ok(n)) = read {
                if n == 0 {
                    break;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
        let got: Vec<u8> = self
            .buf
            .drain(..expected.len().min(self.buf.len()))
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "frames differ"
        );
    }

    async fn roundtrip(&mut self, send: &[u8], expected: &[u8]) {
        self.send(send).await;
        self.expect(expected).await;
    }

    /// Nothing more arrives within `ms`.
    async fn quiet(&mut self, ms: u64) {
        let mut chunk = [0u8; 4096];
        let read =
            tokio::time::timeout(Duration::from_millis(ms), self.stream.read(&mut chunk)).await;
        if let Ok(Ok(n)) = read {
            assert!(
                n == 0,
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            );
        }
        assert!(
            self.buf.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

fn cmd(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n{part}\r\n", part.len()).as_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_answer_as_redis_does_in_resp2_and_resp3() {
    let server = Server::default().await;
    for resp3 in [false, true] {
        let mut c = server.client(resp3).await;
        let p = if resp3 { "r3" } else { "r2" };
        let k = |name: &str| format!("{p}:{name}");
        let _: () = c.set(k("a"), "v1").await.unwrap();
        assert_eq!(
            c.get::<_, Option<String>>(k("a")).await.unwrap().as_deref(),
            Some("v1")
        );
        assert_eq!(c.ttl::<_, i64>(k("a")).await.unwrap(), -1);
        assert_eq!(c.ttl::<_, i64>(k("missing")).await.unwrap(), -2);
        let _: () = c.set_ex(k("b"), "v2", 100).await.unwrap();
        assert_eq!(c.ttl::<_, i64>(k("b")).await.unwrap(), 100);
        let pttl: i64 = c.pttl(k("b")).await.unwrap();
        assert!((99_000..=100_000).contains(&pttl), "{pttl}");
        let _: () = c.pset_ex(k("c"), "v3", 1500).await.unwrap();
        let ttl: i64 = c.ttl(k("c")).await.unwrap();
        assert!(
            (1..=2).contains(&ttl),
            "TTL rounds the ms left to the nearest second: {ttl}"
        );
        let n: i64 = c.exists(&[k("a"), k("b"), k("nope")]).await.unwrap();
        assert_eq!(n, 2);
        // SET options, any order and case.
        let nx: Option<String> = redis::cmd("SET")
            .arg(k("a"))
            .arg("x")
            .arg("nx")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(nx, None);
        let old: Option<String> = redis::cmd("set")
            .arg(k("a"))
            .arg("v9")
            .arg("GET")
            .arg("xx")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(old.as_deref(), Some("v1"));
        let xx: Option<String> = redis::cmd("SET")
            .arg(k("none"))
            .arg("x")
            .arg("XX")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(xx, None);
        let ok: String = redis::cmd("SET")
            .arg(k("lock"))
            .arg("1")
            .arg("EX")
            .arg("10")
            .arg("NX")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(ok, "OK");
        let again: Option<String> = redis::cmd("SET")
            .arg(k("lock"))
            .arg("1")
            .arg("NX")
            .arg("EX")
            .arg("10")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(again, None, "the lock pattern: a second SET NX fails");
        let _: () = redis::cmd("SET")
            .arg(k("b"))
            .arg("kept")
            .arg("KEEPTTL")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(c.ttl::<_, i64>(k("b")).await.unwrap(), 100);
        let _: () = c.set(k("b"), "plain").await.unwrap();
        assert_eq!(
            c.ttl::<_, i64>(k("b")).await.unwrap(),
            -1,
            "a plain SET clears the TTL"
        );
        // EXPIRE family and PERSIST.
        assert_eq!(c.expire::<_, i64>(k("b"), 60).await.unwrap(), 1);
        assert_eq!(c.ttl::<_, i64>(k("b")).await.unwrap(), 60);
        assert_eq!(c.pexpire::<_, i64>(k("b"), 30_000).await.unwrap(), 1);
        assert_eq!(c.ttl::<_, i64>(k("b")).await.unwrap(), 30);
        assert_eq!(c.expire::<_, i64>(k("missing"), 60).await.unwrap(), 0);
        let nx: i64 = redis::cmd("EXPIRE")
            .arg(k("b"))
            .arg(99)
            .arg("NX")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(nx, 0, "NX: it already has a TTL");
        assert_eq!(c.persist::<_, i64>(k("b")).await.unwrap(), 1);
        assert_eq!(c.persist::<_, i64>(k("b")).await.unwrap(), 0);
        assert_eq!(c.ttl::<_, i64>(k("b")).await.unwrap(), -1);
        let at = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1000) as i64;
        assert_eq!(c.expire_at::<_, i64>(k("b"), at).await.unwrap(), 1);
        let ttl: i64 = c.ttl(k("b")).await.unwrap();
        assert!((998..=1000).contains(&ttl), "{ttl}");
        // EXPIRE with a time not in the future deletes the key.
        assert_eq!(c.expire::<_, i64>(k("b"), 0).await.unwrap(), 1);
        assert_eq!(c.exists::<_, i64>(k("b")).await.unwrap(), 0);
        // Counters: INCR, INCRBY (what redis-py's incr sends), DECR, DECRBY; TTL kept.
        assert_eq!(c.incr::<_, _, i64>(k("n"), 1).await.unwrap(), 1);
        assert_eq!(
            redis::cmd("INCR")
                .arg(k("n"))
                .query_async::<i64>(&mut c)
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            redis::cmd("DECRBY")
                .arg(k("n"))
                .arg(5)
                .query_async::<i64>(&mut c)
                .await
                .unwrap(),
            -3
        );
        assert_eq!(c.get::<_, String>(k("n")).await.unwrap(), "-3");
        let err = redis::cmd("INCR")
            .arg(k("a"))
            .query_async::<i64>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("value is not an integer or out of range"),
            "{err}"
        );
        // DEL counts only live keys; UNLINK is the same.
        let n: i64 = c.del(&[k("a"), k("c"), k("nope")]).await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            redis::cmd("UNLINK")
                .arg(k("lock"))
                .query_async::<i64>(&mut c)
                .await
                .unwrap(),
            1
        );
        assert_eq!(c.get::<_, Option<String>>(k("a")).await.unwrap(), None);
        // Errors with Redis's texts.
        let err = redis::cmd("SETEX")
            .arg(k("e"))
            .arg(0)
            .arg("v")
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid expire time in 'setex' command"),
            "{err}"
        );
        let err = redis::cmd("PSETEX")
            .arg(k("e"))
            .arg(-1)
            .arg("v")
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid expire time in 'psetex' command"),
            "{err}"
        );
        let err = redis::cmd("SETEX")
            .arg(k("e"))
            .arg("1.5")
            .arg("v")
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("value is not an integer or out of range"),
            "{err}"
        );
        let err = redis::cmd("SETEX")
            .arg(k("e"))
            .arg(10)
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("wrong number of arguments for 'setex' command"),
            "{err}"
        );
        let err = redis::cmd("SET")
            .arg(k("e"))
            .arg("v")
            .arg("EX")
            .arg(10)
            .arg("PX")
            .arg(5)
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("syntax error"), "{err}");
        let err = redis::cmd("SET")
            .arg(k("e"))
            .arg("v")
            .arg("EX")
            .arg(0)
            .query_async::<()>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid expire time in 'set' command"),
            "{err}"
        );
        assert_eq!(
            c.exists::<_, i64>(k("e")).await.unwrap(),
            0,
            "a refused write stores nothing"
        );
    }
    // DBSIZE, SELECT and FLUSHDB work on a database's own keys.
    let mut c = server.client(false).await;
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = c.set("in3", "x").await.unwrap();
    assert_eq!(
        redis::cmd("DBSIZE")
            .query_async::<i64>(&mut c)
            .await
            .unwrap(),
        1
    );
    let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await.unwrap();
    assert_eq!(
        redis::cmd("DBSIZE")
            .query_async::<i64>(&mut c)
            .await
            .unwrap(),
        0
    );
    let err = redis::cmd("SELECT")
        .arg(16)
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("DB index is out of range"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_frames_are_byte_for_byte_redis() {
    let server = Server::default().await;
    let mut r = server.raw().await;
    // HELLO 3: a map with proto 3; then RESP3 nulls.
    r.send(&cmd(&["HELLO", "3"])).await;
    r.expect(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.0\r\n$5\r\nproto\r\n:3\r\n$2\r\nid\r\n").await;
    r.buf.clear();
    // Drain the rest of the HELLO reply (its id varies).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = [0u8; 256];
    let _ = tokio::time::timeout(Duration::from_millis(200), r.stream.read(&mut rest)).await;
    r.roundtrip(&cmd(&["GET", "nothing"]), b"_\r\n").await;
    r.roundtrip(
        &cmd(&["HELLO", "4"]),
        b"-NOPROTO unsupported protocol version\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["HELLO", "x"]),
        b"-ERR Protocol version is not an integer or out of range\r\n",
    )
    .await;
    // RESP3 subscribe confirmations are push frames; other commands still work while subscribed.
    r.roundtrip(
        &cmd(&["PSUBSCRIBE", "__keyevent@0__:expired"]),
        b">3\r\n$10\r\npsubscribe\r\n$22\r\n__keyevent@0__:expired\r\n:1\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["PING"]), b"+PONG\r\n").await;
    r.roundtrip(&cmd(&["PSETEX", "k3", "50", "v"]), b"+OK\r\n")
        .await;
    r.expect(b">4\r\n$8\r\npmessage\r\n$22\r\n__keyevent@0__:expired\r\n$22\r\n__keyevent@0__:expired\r\n$2\r\nk3\r\n").await;
    r.roundtrip(
        &cmd(&["PUNSUBSCRIBE"]),
        b">3\r\n$12\r\npunsubscribe\r\n$22\r\n__keyevent@0__:expired\r\n:0\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["UNSUBSCRIBE"]),
        b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n",
    )
    .await;

    // RESP2: counts over channels and patterns, the subscribed context, PING's array form.
    let mut r = server.raw().await;
    r.roundtrip(
        &cmd(&["SUBSCRIBE", "a", "b"]),
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["SUBSCRIBE", "a"]),
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:2\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["psubscribe", "p*"]),
        b"*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["GET", "x"]), b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n").await;
    r.roundtrip(&cmd(&["PING"]), b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
        .await;
    r.roundtrip(
        &cmd(&["NOSUCH", "x"]),
        b"-ERR unknown command 'NOSUCH', with args beginning with: 'x' \r\n",
    )
    .await;
    r.roundtrip(&cmd(&["UNSUBSCRIBE"]), b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n").await;
    r.roundtrip(&cmd(&["QUIT"]), b"+OK\r\n").await;

    // Handshake commands clients send and ignore the answers of, or depend on.
    let mut r = server.raw().await;
    r.roundtrip(
        &cmd(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]),
        b"+OK\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["CLIENT", "MAINT_NOTIFICATIONS", "ON"]),
        b"-ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP.\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["config", "SET", "notify-keyspace-events", "Egx$"]),
        b"+OK\r\n",
    )
    .await;
    r.roundtrip(
        &cmd(&["CONFIG", "GET", "notify-keyspace-events"]),
        b"*2\r\n$22\r\nnotify-keyspace-events\r\n$4\r\ng$xE\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["CONFIG", "SET", "notify-keyspace-events", "Ex!"]), b"-ERR CONFIG SET failed (possibly related to argument 'notify-keyspace-events') - Invalid event class character. Use 'Ag$lshzxeKEtmdn'.\r\n").await;
    r.roundtrip(
        &cmd(&["CONFIG", "SET", "nosuchparam", "1"]),
        b"-ERR Unknown option or number of arguments for CONFIG SET - 'nosuchparam'\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["CONFIG", "GET", "nosuchparam"]), b"*0\r\n")
        .await;
    r.roundtrip(
        &cmd(&["CONFIG", "SET", "notify-keyspace-events", "Ex"]),
        b"+OK\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["ECHO", "hi"]), b"$2\r\nhi\r\n").await;
    r.roundtrip(b"PING\r\n", b"+PONG\r\n").await;
    let mut c = server.client(false).await;
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(
        info.contains("redis_version:")
            && info.contains("loading:0")
            && !info.contains("loading:1"),
        "{info}"
    );

    // A pipeline of 100 SETEX in one write: 100 answers, in order, after one commit.
    let mut r = server.raw().await;
    let mut pipeline = Vec::new();
    for i in 0..100 {
        pipeline.extend(cmd(&["setex", &format!("pipe:{i}"), "600", "v"]));
    }
    pipeline.extend(cmd(&["DBSIZE"]));
    let mut expected = b"+OK\r\n".repeat(100);
    expected.extend_from_slice(b":100\r\n");
    r.roundtrip(&pipeline, &expected).await;
    // A malformed frame: Redis's protocol error, then the connection closes; nothing stored changes.
    r.roundtrip(
        b"*2\r\n$3\r\nGET\r\n$x\r\n",
        b"-ERR Protocol error: invalid bulk length\r\n",
    )
    .await;
    r.quiet(300).await;
    let mut c = server.client(false).await;
    assert_eq!(
        redis::cmd("DBSIZE")
            .query_async::<i64>(&mut c)
            .await
            .unwrap(),
        100
    );
    server.stop().await;
}

/// Collects the keys of `pmessage`/`message` frames a RESP2 subscriber receives.
async fn subscriber(
    addr: SocketAddr,
    auth: Option<(&str, &str)>,
    pattern: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    subscriber_handle(addr, auth, pattern).await.0
}

/// A subscriber whose connection closes when the returned handle is aborted.
async fn subscriber_handle(
    addr: SocketAddr,
    auth: Option<(&str, &str)>,
    pattern: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<String>,
    tokio::task::AbortHandle,
) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if let Some((user, password)) = auth {
        stream
            .write_all(&cmd(&["AUTH", user, password]))
            .await
            .unwrap();
        let mut ok = [0u8; 5];
        stream.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n");
    }
    stream
        .write_all(&cmd(&["PSUBSCRIBE", pattern]))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let confirm = format!(
        "*3\r\n$10\r\npsubscribe\r\n${}\r\n{pattern}\r\n:1\r\n",
        pattern.len()
    );
    let mut buf = vec![0u8; confirm.len()];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&buf), confirm);
    let reader = tokio::spawn(async move {
        let mut data = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(n) = stream.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            data.extend_from_slice(&chunk[..n]);
            // Frames: *4 $8 pmessage $P pattern $C channel $K key.
            while let Ok(Some((args, used))) = punctual_server::resp::frame::parse(&data) {
                data.drain(..used);
                assert_eq!(args[0], b"pmessage");
                let _ = tx.send(String::from_utf8_lossy(&args[3]).into_owned());
            }
        }
    });
    (rx, reader.abort_handle())
}

async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    into: &mut Vec<String>,
    until: Instant,
) {
    while let Ok(Some(key)) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx.recv()).await
    {
        into.push(key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_expiry_goes_to_one_subscriber_of_each_group_on_time() {
    let server = Server::default().await;
    let pattern = "__keyevent@0__:expired";
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(subscriber(server.addr, None, pattern).await);
    }
    // Another application, named by its AUTH user: it gets every event too.
    let mut audit = subscriber(server.addr, Some(("audit", "any")), pattern).await;
    let mut c = server.client(false).await;
    let started = Instant::now();
    for i in 0..60 {
        let _: () = redis::cmd("PSETEX")
            .arg(format!("g:{i}"))
            .arg(200 + i * 5)
            .arg("v")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let until = Instant::now() + Duration::from_millis(2500);
    let mut got: Vec<Vec<String>> = Vec::new();
    for rx in &mut members {
        let mut keys = Vec::new();
        collect(rx, &mut keys, until).await;
        got.push(keys);
    }
    let mut audited = Vec::new();
    collect(&mut audit, &mut audited, until).await;
    let mut all: Vec<String> = got.concat();
    all.sort();
    let mut expected: Vec<String> = (0..60).map(|i| format!("g:{i}")).collect();
    expected.sort();
    assert_eq!(all, expected, "each event exactly once within the group");
    assert!(
        got.iter().all(|keys| !keys.is_empty()),
        "members take turns: {got:?}"
    );
    audited.sort();
    assert_eq!(audited, expected, "the other group got every event too");
    assert!(started.elapsed() < Duration::from_secs(3));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_mode_gives_every_subscriber_every_event() {
    let server = Server::start(
        ServerConfig::default(),
        EventOptions {
            broadcast: true,
            ..EventOptions::default()
        },
    )
    .await;
    let mut a = subscriber(server.addr, None, "__keyevent@*__:expired").await;
    let mut b = subscriber(server.addr, None, "__keyevent@*__:expired").await;
    let mut c = server.client(false).await;
    for i in 0..5 {
        let _: () = redis::cmd("PSETEX")
            .arg(format!("b:{i}"))
            .arg(100)
            .arg("v")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let until = Instant::now() + Duration::from_millis(1500);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    collect(&mut a, &mut got_a, until).await;
    collect(&mut b, &mut got_b, until).await;
    assert_eq!(got_a.len(), 5, "{got_a:?}");
    assert_eq!(got_b.len(), 5, "{got_b:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_while_nobody_listens_and_fired_values_stay_readable() {
    let server = Server::default().await;
    let mut c = server.client(false).await;
    let _: () = redis::cmd("PSETEX")
        .arg("order:1")
        .arg(100)
        .arg("payload-1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("PSETEX")
        .arg("order:2")
        .arg(150)
        .arg("payload-2")
        .query_async(&mut c)
        .await
        .unwrap();
    // Cancelled: never published.
    let _: () = redis::cmd("PSETEX")
        .arg("order:3")
        .arg(150)
        .arg("payload-3")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(c.del::<_, i64>("order:3").await.unwrap(), 1);
    // Past their expiry the keys read as gone, as in Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.exists::<_, i64>("order:2").await.unwrap() == 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.exists::<_, i64>("order:1").await.unwrap(), 0);
    assert_eq!(c.get::<_, Option<String>>("order:1").await.unwrap(), None);
    assert_eq!(c.ttl::<_, i64>("order:1").await.unwrap(), -2);
    // The value is still there through the service (the HTTP API's get).
    let service = server.app.as_ref().unwrap().service();
    let task = service.get("db0", "order:1").await.unwrap();
    assert_eq!(task.payload.as_deref(), Some("\"payload-1\""));
    // A subscriber that comes later gets what fired while nobody listened, and not the cancelled key.
    let mut late = subscriber(server.addr, None, "__keyevent@0__:expired").await;
    let mut got = Vec::new();
    collect(
        &mut late,
        &mut got,
        Instant::now() + Duration::from_millis(1500),
    )
    .await;
    got.sort();
    assert_eq!(got, vec!["order:1".to_owned(), "order:2".to_owned()]);
    server.stop().await;
}

/// The groups `PUNCTUAL.GROUPS` lists, as (user, id, members here, waiting).
async fn groups(c: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String, i64, i64)> {
    let value: redis::Value = redis::cmd("PUNCTUAL.GROUPS").query_async(c).await.unwrap();
    let redis::Value::Array(items) = value else {
        panic!("not an array: {value:?}")
    };
    items
        .iter()
        .map(|item| {
            let f = fields(item);
            let text = |name: &str| match &f[name] {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            };
            let int = |name: &str| match &f[name] {
                redis::Value::Int(n) => *n,
                other => panic!("{name} is not an integer: {other:?}"),
            };
            (
                text("user"),
                text("id"),
                int("members_here"),
                int("waiting"),
            )
        })
        .collect()
}

/// Polls `PUNCTUAL.GROUPS` until `ok` holds of it, for up to 5 s.
async fn groups_until(
    c: &mut redis::aio::MultiplexedConnection,
    what: &str,
    ok: impl Fn(&[(String, String, i64, i64)]) -> bool,
) -> Vec<(String, String, i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = groups(c).await;
        if ok(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn psetex_many(c: &mut redis::aio::MultiplexedConnection, prefix: &str, n: usize) {
    for i in 0..n {
        let _: () = redis::cmd("PSETEX")
            .arg(format!("{prefix}:{i}"))
            .arg(50)
            .arg("v")
            .query_async(c)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_application_gets_every_event_while_away_and_across_a_restart() {
    let dir = temp_dir("resp");
    let pattern = "__keyevent@0__:expired";
    let server = Server::start_in(&dir, ServerConfig::default(), EventOptions::default()).await;
    let mut c = server.client(false).await;
    // Two applications subscribe once, then both go away.
    let (_, billing) = subscriber_handle(server.addr, Some(("billing", "x")), pattern).await;
    let (_, shipping) = subscriber_handle(server.addr, Some(("shipping", "x")), pattern).await;
    let known = groups_until(&mut c, "both groups registered", |g| {
        g.len() == 2 && g.iter().all(|(_, _, here, _)| *here == 1)
    })
    .await;
    let users: Vec<&str> = known.iter().map(|(u, ..)| u.as_str()).collect();
    assert!(
        users.contains(&"billing") && users.contains(&"shipping"),
        "{known:?}"
    );
    billing.abort();
    shipping.abort();
    groups_until(&mut c, "members gone", |g| {
        g.iter().all(|(_, _, here, _)| *here == 0)
    })
    .await;
    // Ten events fire while both are away: each group keeps all ten.
    psetex_many(&mut c, "away", 10).await;
    groups_until(&mut c, "ten waiting for each", |g| {
        g.iter().all(|(_, _, _, waiting)| *waiting == 10)
    })
    .await;
    drop(c);
    server.stop().await;

    // After a restart the groups and their backlogs are still there.
    let server = Server::start_in(&dir, ServerConfig::default(), EventOptions::default()).await;
    let mut c = server.client(false).await;
    groups_until(&mut c, "groups remembered", |g| {
        g.len() == 2 && g.iter().all(|(_, _, _, waiting)| *waiting == 10)
    })
    .await;
    let mut billing = subscriber(server.addr, Some(("billing", "x")), pattern).await;
    let mut got = Vec::new();
    collect(
        &mut billing,
        &mut got,
        Instant::now() + Duration::from_millis(1500),
    )
    .await;
    got.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("away:{i}")).collect();
    expected.sort();
    assert_eq!(
        got, expected,
        "billing gets what fired while it was away, once"
    );
    // Billing is here and shipping is not: billing gets new events at once, shipping keeps them.
    psetex_many(&mut c, "later", 5).await;
    let mut live = Vec::new();
    collect(
        &mut billing,
        &mut live,
        Instant::now() + Duration::from_millis(1000),
    )
    .await;
    assert_eq!(live.len(), 5, "{live:?}");
    let shipping_id = groups_until(&mut c, "shipping keeps fifteen", |g| {
        g.iter()
            .any(|(u, _, _, waiting)| u == "shipping" && *waiting == 15)
    })
    .await
    .into_iter()
    .find(|(u, ..)| u == "shipping")
    .unwrap()
    .1;
    let (mut shipping, shipping_handle) =
        subscriber_handle(server.addr, Some(("shipping", "x")), pattern).await;
    let mut got = Vec::new();
    collect(
        &mut shipping,
        &mut got,
        Instant::now() + Duration::from_millis(1500),
    )
    .await;
    got.sort();
    let mut expected: Vec<String> = (0..10)
        .map(|i| format!("away:{i}"))
        .chain((0..5).map(|i| format!("later:{i}")))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "shipping gets all fifteen, once");
    // Forgotten: the group is gone and keeps nothing more.
    shipping_handle.abort();
    groups_until(&mut c, "shipping away", |g| {
        g.iter()
            .any(|(u, _, here, _)| u == "shipping" && *here == 0)
    })
    .await;
    let forgot: i64 = redis::cmd("PUNCTUAL.FORGET")
        .arg(&shipping_id)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(forgot, 1);
    let again: i64 = redis::cmd("PUNCTUAL.FORGET")
        .arg(&shipping_id)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(again, 0, "forgetting twice");
    let left = groups(&mut c).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].0, "billing");
    drop(billing);
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_protocol_and_the_user_names_the_group() {
    let server = Server::start(
        ServerConfig {
            auth_tokens: vec!["s3cret".into()],
            ..ServerConfig::default()
        },
        EventOptions::default(),
    )
    .await;
    let mut r = server.raw().await;
    r.roundtrip(&cmd(&["GET", "k"]), b"-NOAUTH Authentication required.\r\n")
        .await;
    r.roundtrip(
        &cmd(&["AUTH", "wrong"]),
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    )
    .await;
    r.roundtrip(&cmd(&["AUTH", "billing", "s3cret"]), b"+OK\r\n")
        .await;
    r.roundtrip(&cmd(&["GET", "k"]), b"$-1\r\n").await;
    let client = redis::Client::open(format!(
        "redis://billing:s3cret@{}/?protocol=resp3",
        server.addr
    ))
    .unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = c.set("k", "v").await.unwrap();
    assert_eq!(c.get::<_, String>("k").await.unwrap(), "v");
    server.stop().await;
}

/// A task map (RESP2 flat array) as field -> value.
fn fields(value: &redis::Value) -> std::collections::HashMap<String, redis::Value> {
    let items: Vec<redis::Value> = match value {
        redis::Value::Array(items) => items.clone(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        other => panic!("not a task: {other:?}"),
    };
    items
        .chunks(2)
        .map(|pair| {
            (
                redis::from_redis_value::<String>(&pair[0]).unwrap(),
                pair[1].clone(),
            )
        })
        .collect()
}

fn field<T: redis::FromRedisValue>(
    task: &std::collections::HashMap<String, redis::Value>,
    name: &str,
) -> T {
    redis::from_redis_value(&task[name]).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_commands_do_what_the_http_api_does() {
    let server = Server::default().await;
    for resp3 in [false, true] {
        let mut c = server.client(resp3).await;
        let q = if resp3 { "native3" } else { "native2" };
        let (id, created): (String, i64) = redis::cmd("PUNCTUAL.SCHEDULE")
            .arg(q)
            .arg("ID")
            .arg("t1")
            .arg("DELAY")
            .arg(150)
            .arg("PAYLOAD")
            .arg(r#"{"order":1}"#)
            .arg("MAXATTEMPTS")
            .arg(3)
            .arg("BACKOFF")
            .arg("10,20")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!((id.as_str(), created), ("t1", 1));
        // The same request again is an idempotent repeat.
        let (_, created): (String, i64) = redis::cmd("PUNCTUAL.SCHEDULE")
            .arg(q)
            .arg("ID")
            .arg("t1")
            .arg("DELAY")
            .arg(150)
            .arg("PAYLOAD")
            .arg(r#"{"order":1}"#)
            .arg("MAXATTEMPTS")
            .arg(3)
            .arg("BACKOFF")
            .arg("10,20")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(created, 0);
        let task: redis::Value = redis::cmd("PUNCTUAL.GET")
            .arg(q)
            .arg("t1")
            .query_async(&mut c)
            .await
            .unwrap();
        let task = fields(&task);
        assert_eq!(field::<String>(&task, "state"), "scheduled");
        assert_eq!(field::<String>(&task, "payload"), r#"{"order":1}"#);
        // A long-poll reserve gets the task when it becomes due.
        let started = Instant::now();
        let tasks: Vec<redis::Value> = redis::cmd("PUNCTUAL.RESERVE")
            .arg(q)
            .arg("COUNT")
            .arg(10)
            .arg("WAIT")
            .arg(5000)
            .arg("LEASE")
            .arg(10_000)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(tasks.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(3));
        let leased = fields(&tasks[0]);
        let token: String = field(&leased, "lease_token");
        let extended: redis::Value = redis::cmd("PUNCTUAL.EXTEND")
            .arg(q)
            .arg("t1")
            .arg(&token)
            .arg(20_000)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(field::<String>(&fields(&extended), "state"), "leased");
        let nacked: redis::Value = redis::cmd("PUNCTUAL.NACK")
            .arg(q)
            .arg("t1")
            .arg(&token)
            .arg("ERROR")
            .arg("boom")
            .arg("DELAY")
            .arg(0)
            .query_async(&mut c)
            .await
            .unwrap();
        let nacked = fields(&nacked);
        assert_eq!(field::<String>(&nacked, "last_error"), "boom");
        let tasks: Vec<redis::Value> = redis::cmd("PUNCTUAL.RESERVE")
            .arg(q)
            .arg("WAIT")
            .arg(2000)
            .query_async(&mut c)
            .await
            .unwrap();
        let token: String = field(&fields(&tasks[0]), "lease_token");
        let ok: String = redis::cmd("PUNCTUAL.ACK")
            .arg(q)
            .arg("t1")
            .arg(&token)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(ok, "OK");
        let err = redis::cmd("PUNCTUAL.ACK")
            .arg(q)
            .arg("t1")
            .arg(&token)
            .query_async::<String>(&mut c)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already finished"), "{err}");
        // BATCH: one answer per item; a bad item does not stop the others.
        let mut r = server.raw().await;
        r.roundtrip(
            &cmd(&["PUNCTUAL.BATCH", q, r#"{"id":"b1","delay_ms":60000}"#, r#"{"id":"b2","max_attempts":0}"#, r#"{"id":"b3"}"#]),
            b"*3\r\n*2\r\n$2\r\nb1\r\n:1\r\n-ERR max_attempts must be between 1 and 1000\r\n*2\r\n$2\r\nb3\r\n:1\r\n",
        )
        .await;
        assert_eq!(
            redis::cmd("PUNCTUAL.CANCEL")
                .arg(q)
                .arg("b1")
                .query_async::<i64>(&mut c)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            redis::cmd("PUNCTUAL.CANCEL")
                .arg(q)
                .arg("b1")
                .query_async::<i64>(&mut c)
                .await
                .unwrap(),
            0
        );
        let none: Option<String> = redis::cmd("PUNCTUAL.GET")
            .arg(q)
            .arg("b1")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(none, None);
        // Bad input: clear errors, nothing stored.
        let err = redis::cmd("PUNCTUAL.SCHEDULE")
            .arg(q)
            .arg("ID")
            .arg("bad")
            .arg("PAYLOAD")
            .arg("{nope")
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("PAYLOAD is not JSON"), "{err}");
        let err = redis::cmd("PUNCTUAL.SCHEDULE")
            .arg(q)
            .arg("ID")
            .arg("bad")
            .arg("LEASE")
            .arg(1)
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("lease_ms must be between"),
            "{err}"
        );
        let err = redis::cmd("PUNCTUAL.SCHEDULE")
            .arg("bad queue")
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("queue name"), "{err}");
        let none: Option<String> = redis::cmd("PUNCTUAL.GET")
            .arg(q)
            .arg("bad")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(none, None);
    }
    // Pipelined schedules are one commit, answered in order.
    let mut r = server.raw().await;
    let mut pipeline = Vec::new();
    let mut expected = Vec::new();
    for i in 0..300 {
        let id = format!("p{i:03}");
        pipeline.extend(cmd(&[
            "PUNCTUAL.SCHEDULE",
            "piped",
            "ID",
            &id,
            "DELAY",
            "60000",
        ]));
        expected.extend(format!("*2\r\n$4\r\n{id}\r\n:1\r\n").into_bytes());
    }
    r.roundtrip(&pipeline, &expected).await;
    let counts = server
        .app
        .as_ref()
        .unwrap()
        .service()
        .queue("piped".into())
        .await
        .unwrap();
    assert_eq!(counts.get(punctual_core::TaskState::Scheduled), 300);
    server.stop().await;
}
