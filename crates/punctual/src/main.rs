//! The `punctual` binary: `serve`, the client commands, and `bench`.

mod bench;
mod client;
mod duration;
mod work;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use punctual_server::ServerConfig;
use punctual_store::{RedbOptions, RedbStore, Store};

use crate::client::{Client, ScheduleSpec};

/// Punctual: a durable delayed-task server.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Options shared by the client commands.
#[derive(clap::Args, Clone)]
struct ClientOpts {
    /// The server to talk to.
    #[arg(
        long,
        env = "PUNCTUAL_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    server: String,
    /// Print JSON instead of tables (one object per line).
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token for a server started with --auth-token.
    #[arg(long, env = "PUNCTUAL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
}

#[derive(clap::Args)]
struct ServeOpts {
    /// Directory of the data file (created if missing).
    #[arg(long, env = "PUNCTUAL_DATA_DIR", default_value = "./punctual-data")]
    data_dir: PathBuf,
    /// Address to serve HTTP on.
    #[arg(long, env = "PUNCTUAL_HTTP", default_value = "127.0.0.1:7070")]
    http: SocketAddr,
    /// Memory for the store's page cache, in MiB. Bounds RSS whatever the number of pending tasks.
    #[arg(long, env = "PUNCTUAL_CACHE_MB", default_value_t = 64)]
    cache_mb: usize,
    /// Lease length when neither the reserve nor the task names one, in ms.
    #[arg(long, env = "PUNCTUAL_DEFAULT_LEASE_MS", default_value_t = 30_000)]
    default_lease_ms: u64,
    /// Attempts when a task does not say.
    #[arg(long, env = "PUNCTUAL_DEFAULT_MAX_ATTEMPTS", default_value_t = 5)]
    default_max_attempts: u32,
    /// How long succeeded tasks stay readable, in ms (default 24 h).
    #[arg(long, env = "PUNCTUAL_RETENTION_MS", default_value_t = 86_400_000)]
    retention_ms: u64,
    /// Largest payload in bytes (compact JSON).
    #[arg(long, env = "PUNCTUAL_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    max_payload_bytes: usize,
    /// Most tasks in one batch request.
    #[arg(long, env = "PUNCTUAL_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Require `Authorization: Bearer <token>` on /v1 routes; repeat for several tokens
    /// (the env var takes a comma-separated list). /healthz stays open.
    #[arg(
        long = "auth-token",
        env = "PUNCTUAL_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    auth_tokens: Vec<String>,
    /// With --auth-token, require a token on /metrics too.
    #[arg(long, env = "PUNCTUAL_PROTECT_METRICS")]
    protect_metrics: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server in the foreground (logs to stderr; stops cleanly on SIGTERM/SIGINT).
    Serve(ServeOpts),
    /// Schedule a task.
    Schedule {
        queue: String,
        /// Delay from now: 500ms, 10s, 30m, 1h30m, 2d.
        #[arg(long = "in", value_name = "DURATION")]
        in_: Option<String>,
        /// Due time, RFC 3339 (2026-11-22T09:30:00Z).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Task id (default: generated). Scheduling the same id and spec again is a no-op.
        #[arg(long)]
        id: Option<String>,
        /// Payload as JSON.
        #[arg(long)]
        payload: Option<String>,
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Retry ladder, e.g. 10s,30s,1m (the last step repeats).
        #[arg(long)]
        backoff: Option<String>,
        /// Deliver by POSTing to this URL.
        #[arg(long)]
        webhook: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one task.
    Get {
        queue: String,
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel (delete) a task that is not leased.
    Cancel {
        queue: String,
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Move a scheduled or ready task to a new time (and/or replace its payload).
    Reschedule {
        queue: String,
        id: String,
        #[arg(long = "in", value_name = "DURATION")]
        in_: Option<String>,
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        #[arg(long)]
        payload: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List a queue's tasks.
    Ls {
        queue: String,
        /// Only tasks in this state: scheduled, ready, leased, succeeded, dead.
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Counts per state, of every queue or one.
    Stats {
        queue: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Run a shell command for each task of a queue: exit 0 acks, anything else nacks.
    Work(work::WorkOpts),
    /// Measure Punctual on this machine (see docs/benchmarks.md).
    Bench(bench::BenchOpts),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

async fn serve(opts: ServeOpts) -> Result<()> {
    init_logging();
    let mut config = ServerConfig {
        default_lease_ms: opts.default_lease_ms,
        default_max_attempts: opts.default_max_attempts,
        retention_ms: opts.retention_ms,
        auth_tokens: opts
            .auth_tokens
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect(),
        protect_metrics: opts.protect_metrics,
        ..ServerConfig::default()
    };
    config.limits.max_payload_bytes = opts.max_payload_bytes;
    config.limits.max_body_bytes = opts.max_payload_bytes + (64 << 10);
    config.limits.max_batch = opts.max_batch;
    let store = RedbStore::open(
        &opts.data_dir,
        &RedbOptions {
            cache_bytes: opts.cache_mb << 20,
        },
    )
    .context("opening the data directory")?;
    tracing::info!(path = %store.path().display(), "store open");
    let store: Arc<dyn Store> = Arc::new(store);
    let listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .with_context(|| format!("cannot listen on {}", opts.http))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    punctual_server::serve(listener, store, config, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(opts) => serve(opts).await,
        Cmd::Schedule {
            queue,
            in_,
            at,
            id,
            payload,
            max_attempts,
            backoff,
            webhook,
            client,
        } => match Client::new(&client.server, client.json, client.token.as_deref()) {
            Ok(c) => {
                c.schedule(
                    &queue,
                    ScheduleSpec {
                        id,
                        in_,
                        at,
                        payload,
                        max_attempts,
                        backoff,
                        webhook,
                    },
                )
                .await
            }
            Err(e) => Err(e),
        },
        Cmd::Get { queue, id, client } => {
            async {
                Client::new(&client.server, client.json, client.token.as_deref())?
                    .get(&queue, &id)
                    .await
            }
            .await
        }
        Cmd::Cancel { queue, id, client } => {
            async {
                Client::new(&client.server, client.json, client.token.as_deref())?
                    .cancel(&queue, &id)
                    .await
            }
            .await
        }
        Cmd::Reschedule {
            queue,
            id,
            in_,
            at,
            payload,
            client,
        } => {
            async {
                Client::new(&client.server, client.json, client.token.as_deref())?
                    .reschedule(&queue, &id, in_, at, payload)
                    .await
            }
            .await
        }
        Cmd::Ls {
            queue,
            state,
            limit,
            client,
        } => {
            async {
                Client::new(&client.server, client.json, client.token.as_deref())?
                    .ls(&queue, state, limit)
                    .await
            }
            .await
        }
        Cmd::Stats { queue, client } => {
            async {
                Client::new(&client.server, client.json, client.token.as_deref())?
                    .stats(queue.as_deref())
                    .await
            }
            .await
        }
        Cmd::Work(opts) => work::run(opts).await,
        Cmd::Bench(opts) => bench::run(opts).await,
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
