//! The Redis-protocol front end: `punctual serve --resp ADDR`. The keyspace-notification code people
//! run on Redis works against it unchanged, and becomes correct (docs/redis-protocol.md).
//!
//! - [`frame`]: the sans-IO wire codec, fuzzed.
//! - [`conn`]: one connection: pipelining, batching of key writes, subscribed mode.
//! - [`keys`], [`pubsub`], [`server`]: the Redis commands, by family; [`native`]: Punctual's own.
//! - [`events`]: fired keys published to groups of subscribers, and kept while nobody listens.
//!
//! Commands call the [`Service`](crate::service::Service), as HTTP handlers do.

pub mod conn;
pub mod events;
pub mod frame;
pub mod glob;
pub mod keys;
pub mod native;
pub mod pubsub;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use conn::RespLimits;
pub use events::{EventOptions, Events};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::service::Service;

/// Accepts Redis-protocol connections on `listener` until `shutdown` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    events: Arc<Events>,
    limits: RespLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (mut stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(%error, "the Redis-protocol listener could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
            });
            continue;
        };
        let (service, events, limits) = (service.clone(), events.clone(), limits.clone());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            conn::serve(stream, service, events, limits, id).await;
            drop(slot);
        });
    }
}
