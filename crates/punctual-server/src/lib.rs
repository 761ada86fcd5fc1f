//! Punctual's server: the HTTP API over a [`Store`], the group-commit writer, the timer driver and
//! long-poll reserves. It sees storage only through the `Store` trait.
// The OpenAPI document (openapi.rs) is one large `json!` literal.
#![recursion_limit = "512"]

pub mod address;
pub mod api;
pub mod clock;
pub mod config;
pub mod decode;
pub mod error;
pub mod ids;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod resp;
pub mod schedules;
pub mod service;
pub mod targets;
pub mod timer;
pub mod ui;
pub mod webhook;
pub mod writer;

use std::future::Future;
use std::sync::Arc;

use punctual_store::Store;
use tokio::sync::watch;

pub use api::router;
pub use clock::Clock;
pub use config::ServerConfig;

use crate::api::Http;
use crate::service::Service;
use crate::timer::Timer;
use crate::writer::{Effects, Writer};

/// A running server core: writer thread and timer driver, ready to serve its router.
pub struct App {
    state: api::AppState,
    /// The Redis front end's hubs, when it was started.
    /// Background tasks awaited at stop: the schedule materialiser, the Redis front end's.
    resp_tasks: Vec<tokio::task::JoinHandle<()>>,
    poisoned: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    timer: Arc<Timer>,
    driver: std::thread::JoinHandle<()>,
    resync: Option<std::thread::JoinHandle<()>>,
    webhooks: tokio::task::JoinHandle<()>,
    writer_thread: std::thread::JoinHandle<()>,
}

impl App {
    /// Starts the writer and the timer driver on `store`. Must be called inside a tokio runtime.
    pub fn start(store: Arc<dyn Store>, config: ServerConfig) -> App {
        // Install the recorder before anything counts, or early counts are lost.
        let _ = metrics::install(config.metric_idle_ms);
        let clock = Clock;
        let timer = Arc::new(Timer::new(config.window_span_ms, config.window_capacity));
        let push_wake = Arc::new(tokio::sync::Notify::new());
        let (poisoned, poisoned_rx) = watch::channel(false);
        let (writer, writer_thread) = Writer::start(
            store.clone(),
            clock,
            Effects {
                timer: timer.clone(),
                push_wake: push_wake.clone(),
                poisoned,
            },
            config.max_commit_commands,
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let sender = Arc::new(webhook::Sender::new(
            writer.clone(),
            config.webhook.clone(),
            config.retention_ms,
            clock,
        ));
        let targets = sender.targets();
        let webhooks = tokio::spawn(sender.run(push_wake, shutdown_rx.clone()));
        let shared = store.shared();
        if shared {
            // Other nodes' commits: their due times wake this node's timer, their ready queues serve
            // this node's long-polls.
            let timer = timer.clone();
            let writer = writer.clone();
            store.subscribe(Box::new(move |notice| {
                if notice.resync {
                    timer.request_resync();
                }
                timer.insert_all(&notice.due_times);
                if !notice.ready_queues.is_empty() {
                    writer.ready_elsewhere(notice.ready_queues);
                }
            }));
        }
        let driver = timer::start(
            timer.clone(),
            store.clone(),
            writer.clone(),
            clock,
            config.tick_limit,
        );
        let resync = shared.then(|| {
            timer::start_resync(timer.clone(), store.clone(), clock, config.resync_ms.max(1))
        });
        let body_budget = Arc::new(tokio::sync::Semaphore::new(
            body_budget_kib(&config) as usize
        ));
        let service = Arc::new(Service::new(
            store,
            writer,
            config,
            clock,
            shutdown_rx.clone(),
        ));
        // Every node materialises recurring schedules; the store's leases share them out.
        let materialiser = tokio::spawn(schedules::materialiser(service.clone(), shutdown_rx));
        let state = Arc::new(Http {
            service,
            body_budget,
            reported_queues: Default::default(),
            targets,
            started_ms: clock.now_ms(),
        });
        App {
            state,
            resp_tasks: vec![materialiser],
            poisoned: poisoned_rx,
            shutdown,
            timer,
            driver,
            resync,
            webhooks,
            writer_thread,
        }
    }

    /// Completes once a commit has found the store poisoned.
    pub fn poisoned(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut poisoned = self.poisoned.clone();
        async move {
            let _ = poisoned.wait_for(|p| *p).await;
        }
    }

    pub fn router(&self) -> axum::Router {
        router(self.state.clone())
    }

    /// The service both front ends call.
    pub fn service(&self) -> Arc<Service> {
        self.state.service.clone()
    }

    /// Starts the Redis front end on `listener`: its hubs, and the accept loop.
    pub fn start_resp(&mut self, listener: tokio::net::TcpListener, resp: RespOptions) {
        let events = resp::Events::new(self.service(), resp.events);
        let started = events.start(self.shutdown.subscribe());
        self.resp_tasks.extend(started);
        self.resp_tasks.push(tokio::spawn(resp::serve(
            listener,
            self.service(),
            events,
            resp.limits,
            self.shutdown.subscribe(),
        )));
    }

    /// Ends long-polls and the timer driver, then waits for the writer to finish what it holds.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let App {
            state,
            resp_tasks,
            writer_thread,
            driver,
            resync,
            webhooks,
            timer,
            ..
        } = self;
        // Deliveries in flight get their grace period while the writer still records their outcome.
        let _ = webhooks.await;
        for task in resp_tasks {
            let _ = task.await;
        }
        timer.stop();
        state.writer.stop();
        drop(state);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = driver.join();
            if let Some(resync) = resync {
                let _ = resync.join();
            }
            let _ = writer_thread.join();
        })
        .await;
    }
}

/// The body-memory budget in KiB permits (at least one).
pub(crate) fn body_budget_kib(config: &ServerConfig) -> u32 {
    (config.max_body_memory_bytes / 1024).clamp(1, u32::MAX as usize) as u32
}

/// The Redis front end's listener and settings, for [`serve`].
pub struct RespOptions {
    pub events: resp::EventOptions,
    pub limits: resp::RespLimits,
}

/// Serves the API on `listener` (and the Redis protocol on `resp`'s listener, if given) until
/// `signal` completes, then shuts down cleanly.
pub async fn serve(
    listener: tokio::net::TcpListener,
    resp: Option<(tokio::net::TcpListener, RespOptions)>,
    store: Arc<dyn Store>,
    config: ServerConfig,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let conn = config.conn.clone();
    let mut app = App::start(store, config);
    if let Some((resp_listener, options)) = resp {
        app.start_resp(resp_listener, options);
    }
    let router = app.router();
    let shutdown = app.shutdown.clone();
    let poisoned = app.poisoned();
    let poison_seen = app.poisoned.clone();
    let result = listen::serve_http(
        listener,
        router,
        conn,
        Clock,
        async move {
            tokio::select! {
                () = signal => tracing::info!("shutting down: finishing in-flight requests"),
                () = poisoned => tracing::error!(
                    "the store is poisoned (a failed fsync): answering in-flight requests, then \
                     exiting non-zero so a supervisor restarts the server and recovery runs"
                ),
            }
            let _ = shutdown.send(true);
        },
        std::time::Duration::from_secs(30),
    )
    .await;
    app.stop().await;
    if *poison_seen.borrow() {
        return Err(std::io::Error::other(
            "stopped because the store is poisoned after a failed fsync; restart to recover",
        ));
    }
    result
}
