//! The `punctual` binary: `serve` and the client commands (the benchmark is `punctual-bench`).

mod client;
mod config;
mod work;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use punctual_core::TaskState;
use punctual_server::ServerConfig;
use punctual_store::{
    JournalStore, JournalStoreOptions, RedbOptions, RedbStore, RedisOptions, RedisStore,
    RedisTarget, RedisTls, Store,
};

use crate::client::{Client, EverySpec, ScheduleSpec};
use crate::config::ServeOpts;

/// mimalloc instead of glibc malloc: the server allocates and frees many small strings and tasks per
/// request on several threads, and glibc's free-list consolidation was about a third of the CPU of a
/// drain (perf, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

#[derive(Subcommand)]
enum Cmd {
    /// Run the server in the foreground (logs to stderr; stops cleanly on SIGTERM/SIGINT).
    Serve(Box<ServeOpts>),
    /// Schedule a task.
    Schedule {
        /// The queue (letters, digits and . _ : -).
        queue: String,
        #[command(flatten)]
        spec: ScheduleSpec,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show one task.
    Get {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel (delete) a task that is not leased.
    Cancel {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Move a scheduled or ready task to a new time (and/or replace its payload).
    Reschedule {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        /// New delay from now: 500ms, 10s, 5min, 1h30m, 2d.
        #[arg(long = "in", value_name = "DURATION")]
        in_: Option<String>,
        /// New due time, RFC 3339 with a zone (2026-11-22T09:30:00Z).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// New payload as JSON.
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Give a dead task new attempts: it becomes ready at once.
    Retry {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Acknowledge a leased task as done.
    Ack {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        /// The lease_token from the reserve answer that handed the task out.
        #[arg(long, value_name = "TOKEN")]
        lease_token: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Report a failed attempt of a leased task: the retry policy decides when it runs again.
    Nack {
        /// The task's queue.
        queue: String,
        /// The task's id.
        id: String,
        /// The lease_token from the reserve answer that handed the task out.
        #[arg(long, value_name = "TOKEN")]
        lease_token: String,
        /// Why it failed (kept as the task's last_error).
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
        /// Retry after this long instead of the policy's next step.
        #[arg(long, value_name = "DURATION")]
        delay: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List a queue's tasks (or every queue's, with --all-queues).
    Ls {
        /// The queue (leave out with --all-queues).
        #[arg(required_unless_present = "all_queues")]
        queue: Option<String>,
        /// List the tasks of every queue, e.g. `ls --all-queues --state dead`.
        #[arg(long, conflicts_with = "queue")]
        all_queues: bool,
        /// Only tasks in this state: scheduled, ready, leased, succeeded, dead.
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to print (per queue with --all-queues).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Counts per state, of every queue or one.
    Stats {
        /// Only this queue.
        queue: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Create or replace a recurring schedule: a task in QUEUE for each occurrence, e.g.
    /// `every reports daily --cron '0 9 * * MON-FRI' --tz Europe/Berlin --payload '{"r":1}'`.
    Every {
        /// The queue its occurrences go to.
        queue: String,
        /// The schedule's name (letters, digits and . _ : -).
        name: String,
        #[command(flatten)]
        spec: EverySpec,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List recurring schedules, of one queue or of all.
    Schedules {
        /// Only this queue.
        queue: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Delete a recurring schedule (occurrences already created, up to a second ahead, stay).
    Unschedule {
        queue: String,
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Pause a recurring schedule: no occurrences until it is resumed.
    Pause {
        queue: String,
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Resume a paused schedule, from now (what fell while paused is not created).
    Resume {
        queue: String,
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Run a shell command for each task of a queue: exit 0 acks, anything else nacks.
    Work(work::WorkOpts),
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
    let print = opts.print_config;
    let settings = opts.resolve()?;
    if print {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    init_logging();
    let store = open_store(&settings)?;
    log_recovered(store.as_ref());
    let mut config = ServerConfig {
        default_lease_ms: settings.default_lease_ms,
        default_max_attempts: settings.default_max_attempts,
        retention_ms: settings.retention_ms,
        auth_tokens: settings.auth_tokens,
        protect_metrics: settings.protect_metrics,
        ui: settings.ui,
        store_kind: settings.store.to_owned(),
        data_dir: (!settings.store.starts_with("redis")).then(|| settings.data_dir.clone()),
        ..ServerConfig::default()
    };
    config.limits.max_payload_bytes = settings.max_payload_bytes;
    config.limits.max_body_bytes = settings.max_payload_bytes + (64 << 10);
    config.limits.max_batch = settings.max_batch;
    config.limits.max_wait_ms = settings.max_wait_ms;
    config.webhook.secret = settings.webhook_secret;
    config.webhook.concurrency = settings.webhook_concurrency;
    config.webhook.per_host = settings.webhook_per_host;
    config.webhook.allow_private = settings.webhook_allow_private;
    config.webhook.allow = settings
        .webhook_allow
        .iter()
        .map(|e| punctual_server::webhook::AllowEntry::parse(e))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    config.webhook.retry_after_max_ms = settings.webhook_retry_after_max_ms;
    config.conn = punctual_server::listen::ConnLimits {
        max_connections: settings.max_connections,
        header_read_timeout_ms: settings.header_read_timeout_ms,
        body_read_timeout_ms: settings.body_read_timeout_ms,
        idle_timeout_ms: settings.idle_timeout_ms,
    };
    config.max_body_memory_bytes = settings.max_body_memory_mb << 20;
    match punctual_server::listen::raise_fd_limit() {
        Some(limit) if (limit as usize) < settings.max_connections + 64 => tracing::warn!(
            open_files = limit,
            max_connections = settings.max_connections,
            "the open-file limit is below max_connections; raise LimitNOFILE (systemd) or ulimit -n"
        ),
        Some(limit) => tracing::info!(open_files = limit, "open-file limit"),
        None => tracing::warn!("cannot read or raise the open-file limit"),
    }
    let listener = tokio::net::TcpListener::bind(settings.http)
        .await
        .with_context(|| format!("cannot listen on {}", settings.http))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    let resp = match settings.resp {
        Some(addr) => {
            let resp_listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the Redis protocol"))?;
            tracing::info!(addr = %resp_listener.local_addr()?, "listening for the Redis protocol");
            let events = punctual_server::resp::EventOptions {
                databases: settings.resp_databases,
                queue_prefix: settings.resp_queue_prefix.clone(),
                broadcast: settings.resp_broadcast,
                max_waiting: settings.resp_max_waiting,
                retention_ms: settings.retention_ms,
                notify: settings.resp_notify.clone(),
                ..Default::default()
            };
            let limits = punctual_server::resp::RespLimits {
                max_connections: settings.resp_max_connections,
                max_request_bytes: settings.max_payload_bytes * 2 + (64 << 10),
                ..Default::default()
            };
            Some((
                resp_listener,
                punctual_server::RespOptions { events, limits },
            ))
        }
        None => None,
    };
    punctual_server::serve(listener, resp, store, config, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// One line at start: how many tasks the store holds, per state (what a restart recovered).
fn log_recovered(store: &dyn Store) {
    match store.queues() {
        Ok(queues) => {
            let count = |state: TaskState| queues.iter().map(|q| q.get(state)).sum::<u64>();
            tracing::info!(
                queues = queues.len(),
                scheduled = count(TaskState::Scheduled),
                ready = count(TaskState::Ready),
                leased = count(TaskState::Leased),
                succeeded = count(TaskState::Succeeded),
                dead = count(TaskState::Dead),
                "recovered tasks from the store (leased ones are handed out again when their lease ends)"
            );
        }
        Err(error) => tracing::warn!(%error, "cannot count the stored tasks"),
    }
}

/// The first start of the journal store on a data directory of the redb store: every task is copied
/// into the journal (with progress lines), then the redb file is renamed `punctual.redb.migrated`, kept
/// as a backup. A migration cut short leaves the redb file in place and starts again from scratch.
fn migrate_from_redb(
    store: &JournalStore,
    redb_file: &std::path::Path,
    cache_mb: usize,
) -> Result<()> {
    let dir = redb_file.parent().unwrap_or(std::path::Path::new("."));
    let redb = RedbStore::open(
        dir,
        &RedbOptions {
            cache_bytes: cache_mb << 20,
        },
    )
    .context("opening the redb data file to migrate it")?;
    let total: u64 = redb.queues()?.iter().map(|q| q.total()).sum();
    tracing::info!(file = %redb_file.display(), tasks = total, "migrating the redb store into the journal store");
    let mut last_logged = 0u64;
    let copied = store
        .import(&redb, |copied| {
            if copied - last_logged >= 100_000 || copied == total {
                tracing::info!(copied, of = total, "migrating");
                last_logged = copied;
            }
        })
        .context("copying the redb store's tasks into the journal")?;
    drop(redb);
    let backup = redb_file.with_extension("redb.migrated");
    std::fs::rename(redb_file, &backup)
        .with_context(|| format!("renaming {} after the migration", redb_file.display()))?;
    tracing::info!(copied, backup = %backup.display(), "migration done; the redb file is kept as a backup");
    Ok(())
}

fn open_store(settings: &config::Settings) -> Result<Arc<dyn Store>> {
    if settings.store == "journal" {
        let options = JournalStoreOptions {
            min_free_bytes: settings.min_free_disk_mb << 20,
            checkpoint_bytes: settings.checkpoint_mb << 20,
            now_ms: punctual_server::Clock.now_ms(),
            ..JournalStoreOptions::default()
        };
        let redb_file = settings.data_dir.join("punctual.redb");
        let journal_dir = settings.data_dir.join("journal");
        // The redb file is renamed only once a migration is complete, and the server serves nothing
        // before that: a journal beside it is a migration cut short, to start again.
        if redb_file.exists() && journal_dir.exists() {
            tracing::warn!("an earlier migration from redb was cut short; starting it again");
            std::fs::remove_dir_all(&journal_dir)
                .with_context(|| format!("removing {}", journal_dir.display()))?;
        }
        let store = JournalStore::open(&settings.data_dir, &options)
            .context("opening the data directory")?;
        if redb_file.exists() {
            migrate_from_redb(&store, &redb_file, settings.cache_mb)?;
        }
        tracing::info!(path = %store.path().display(), "journal store open");
        return Ok(Arc::new(store));
    }
    if settings.store == "redb" && settings.data_dir.join("journal").exists() {
        anyhow::bail!(
            "{} holds a journal store (its journal/ directory); start without --store redb (the \
             journal store is the default, --store journal), or point --data-dir elsewhere",
            settings.data_dir.display()
        );
    }
    if settings.store == "redb" {
        let store = RedbStore::open(
            &settings.data_dir,
            &RedbOptions {
                cache_bytes: settings.cache_mb << 20,
            },
        )
        .context("opening the data directory")?;
        tracing::info!(path = %store.path().display(), "store open");
        return Ok(Arc::new(store));
    }
    let target = if settings.store == "redis" {
        RedisTarget::Standalone(settings.redis_urls[0].clone())
    } else {
        RedisTarget::Cluster(settings.redis_urls.clone())
    };
    let read = |path: &Option<std::path::PathBuf>, what: &str| -> Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
            })
            .transpose()
    };
    let client = match (
        read(&settings.redis_tls_cert, "client certificate")?,
        read(&settings.redis_tls_key, "client key")?,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    };
    let store = RedisStore::open(
        &target,
        &RedisOptions {
            prefix: settings.redis_prefix.clone(),
            shards: settings.redis_shards,
            wait_replicas: settings.redis_wait_replicas,
            wait_timeout_ms: settings.redis_wait_timeout_ms,
            tls: RedisTls {
                ca: read(&settings.redis_tls_ca, "CA file")?,
                client,
            },
            ..RedisOptions::default()
        },
    )
    .with_context(|| {
        format!(
            "opening the Redis store at {}",
            settings.redis_nodes.join(",")
        )
    })?;
    tracing::info!(
        store = settings.store,
        nodes = %settings.redis_nodes.join(","),
        prefix = %settings.redis_prefix,
        shards = store.shards(),
        "store open"
    );
    Ok(Arc::new(store))
}

fn connect(opts: &ClientOpts) -> Result<Client> {
    Client::new(&opts.server, opts.json, opts.token.as_deref())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(opts) => serve(*opts).await,
        Cmd::Schedule {
            queue,
            spec,
            client,
        } => async { connect(&client)?.schedule(&queue, spec).await }.await,
        Cmd::Get { queue, id, client } => async { connect(&client)?.get(&queue, &id).await }.await,
        Cmd::Every {
            queue,
            name,
            spec,
            client,
        } => async { connect(&client)?.every(&queue, &name, spec).await }.await,
        Cmd::Schedules { queue, client } => {
            async { connect(&client)?.schedules(queue.as_deref()).await }.await
        }
        Cmd::Unschedule {
            queue,
            name,
            client,
        } => async { connect(&client)?.unschedule(&queue, &name).await }.await,
        Cmd::Pause {
            queue,
            name,
            client,
        } => async { connect(&client)?.pause(&queue, &name, true).await }.await,
        Cmd::Resume {
            queue,
            name,
            client,
        } => async { connect(&client)?.pause(&queue, &name, false).await }.await,
        Cmd::Cancel { queue, id, client } => {
            async { connect(&client)?.cancel(&queue, &id).await }.await
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
                connect(&client)?
                    .reschedule(&queue, &id, in_, at, payload)
                    .await
            }
            .await
        }
        Cmd::Retry { queue, id, client } => {
            async { connect(&client)?.retry(&queue, &id).await }.await
        }
        Cmd::Ack {
            queue,
            id,
            lease_token,
            client,
        } => async { connect(&client)?.ack(&queue, &id, &lease_token).await }.await,
        Cmd::Nack {
            queue,
            id,
            lease_token,
            error,
            delay,
            client,
        } => {
            async {
                connect(&client)?
                    .nack(&queue, &id, &lease_token, error, delay)
                    .await
            }
            .await
        }
        Cmd::Ls {
            queue,
            all_queues: _,
            state,
            limit,
            client,
        } => async { connect(&client)?.ls(queue.as_deref(), state, limit).await }.await,
        Cmd::Stats { queue, client } => {
            async { connect(&client)?.stats(queue.as_deref()).await }.await
        }
        Cmd::Work(opts) => work::run(opts).await,
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
