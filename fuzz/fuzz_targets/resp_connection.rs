//! A whole Redis-protocol connection over an in-memory pipe, on the in-memory store: the input is
//! every byte a client sends (any commands, pipelined, valid or not). No input may panic the
//! connection, and every connection must end once the client has sent everything and hung up.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use punctual_server::resp::{EventOptions, Events, RespLimits, conn};
use punctual_server::{App, ServerConfig};
use punctual_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: App,
    events: Arc<Events>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Long-polls would stall the fuzzer: any wait past 1 ms is refused (and that path fuzzed).
        let mut config = ServerConfig::default();
        config.limits.max_wait_ms = 1;
        let (app, events) = runtime.block_on(async {
            let app = App::start(Arc::new(MemoryStore::new()), config);
            let events = Events::new(app.service(), EventOptions::default());
            (app, events)
        });
        Fixture {
            runtime,
            app,
            events,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let f = fixture();
    let _ = &f.app;
    let input = input.to_vec();
    f.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let connection = tokio::spawn(conn::serve(
            server,
            f.app.service(),
            f.events.clone(),
            RespLimits::default(),
            id,
        ));
        let (mut read, mut write) = tokio::io::split(client);
        let send = async {
            // The server may close first (a protocol error, QUIT): the rest is not read.
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        };
        let mut answers = Vec::new();
        let receive = read.read_to_end(&mut answers);
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            let ((), _) = tokio::join!(send, receive);
        })
        .await;
        assert!(ended.is_ok(), "the connection did not end after the client hung up");
        connection.await.expect("the connection panicked");
    });
});
