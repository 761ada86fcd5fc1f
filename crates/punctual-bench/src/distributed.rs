//! Punctual only: distributed mode, with 1, 2 and 3 nodes on one Redis and on a 3-master Redis Cluster
//! that the bench starts itself (AOF on, `appendfsync everysec`). The load is the same whatever the node
//! count: the scheduling connections and the consumers are spread over the nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use punctual_store::redis_testing::{RedisCluster, RedisServer};

use super::progress::Bar;
use super::punctual::Punctual;
use super::report::{Results, Unit};
use super::subject::{Job, Sink, Subject, now_ms};
use super::{Ctx, Scenario, System, burst_jobs, deadline_at_ms, pending_job};

/// Where the nodes keep their tasks.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    /// One standalone Redis.
    #[value(name = "redis")]
    Standalone,
    /// A 3-master Redis Cluster.
    Cluster,
}

impl Backend {
    pub fn key(self) -> &'static str {
        match self {
            Backend::Standalone => "redis",
            Backend::Cluster => "cluster",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Backend::Standalone => "one Redis",
            Backend::Cluster => "3-master Redis Cluster",
        }
    }
}

/// Redis's durability in this bench.
const AOF: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "everysec"];

/// The Redis processes of one configuration.
enum Store {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    fn start(backend: Backend) -> Result<Store> {
        Ok(match backend {
            Backend::Standalone => Store::One(RedisServer::start(&AOF)?),
            Backend::Cluster => {
                let cluster = RedisCluster::start(3)?;
                for node in &cluster.nodes {
                    node.cli(&["config", "set", "appendonly", "yes"])?;
                    node.cli(&["config", "set", "appendfsync", "everysec"])?;
                }
                Store::Cluster(cluster)
            }
        })
    }

    fn serve_args(&self) -> Vec<String> {
        match self {
            Store::One(server) => vec!["--redis".into(), server.url()],
            Store::Cluster(cluster) => vec!["--redis-cluster".into(), cluster.urls().join(",")],
        }
    }

    fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Store::One(server) => vec![server],
            Store::Cluster(cluster) => cluster.nodes.iter().collect(),
        }
    }

    /// Commands every Redis process has processed so far, summed.
    fn commands(&self) -> Result<u64> {
        let mut total = 0;
        for server in self.servers() {
            let info = server.cli(&["info", "stats"])?;
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("INFO stats without total_commands_processed")?;
        }
        Ok(total)
    }
}

/// `items` split over `parts` as evenly as possible, in order.
fn spread<T>(items: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    let parts = parts.max(1);
    let mut out: Vec<Vec<T>> = (0..parts).map(|_| Vec::new()).collect();
    let per = items.len().div_ceil(parts).max(1);
    for (i, item) in items.into_iter().enumerate() {
        out[i / per].push(item);
    }
    out
}

/// Schedules `jobs` through all nodes at once (their share of the connections each); seconds taken.
async fn schedule_all(ctx: &Ctx, nodes: &[Punctual], jobs: Vec<Job>, bar: &Bar) -> Result<f64> {
    let connections = spread((0..ctx.sizes.fill_connections()).collect(), nodes.len());
    let started = Instant::now();
    let parts = spread(jobs, nodes.len());
    let sends = nodes
        .iter()
        .zip(parts)
        .zip(connections)
        .map(|((node, jobs), conns)| node.schedule(ctx, jobs, conns.len().max(1), bar));
    for result in futures_util::future::join_all(sends).await {
        result?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Runs the consumers, spread over the nodes, until `sink` is done or `deadline`.
async fn consume_all(
    ctx: &Ctx,
    nodes: &[Punctual],
    sink: &Arc<Sink>,
    deadline: Instant,
) -> Result<()> {
    let consumers = spread((0..ctx.sizes.consumers).collect(), nodes.len());
    let runs = nodes
        .iter()
        .zip(consumers)
        .map(|(node, c)| node.consume(ctx, c.len().max(1), sink.clone(), deadline));
    for result in futures_util::future::join_all(runs).await {
        result?;
    }
    Ok(())
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    for &backend in &ctx.sizes.backends {
        for &nodes in &ctx.sizes.nodes {
            eprintln!("== Punctual on {}, {nodes} node(s)", backend.label());
            one(ctx, backend, nodes, res)
                .await
                .with_context(|| format!("{}, {nodes} node(s)", backend.label()))?;
        }
    }
    Ok(())
}

fn key(backend: Backend, nodes: usize, metric: &str) -> String {
    format!("dist_{}_{nodes}_{metric}", backend.key())
}

async fn one(ctx: &Ctx, backend: Backend, nodes: usize, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let store = Store::start(backend)?;
    let mut servers = Vec::new();
    for _ in 0..nodes {
        servers.push(Punctual::start_with(ctx, &store.serve_args()).await?);
    }
    let outcome = async {
        let mut add = |metric: &str, unit: Unit, value: f64| {
            res.add(
                Scenario::Distributed,
                key(backend, nodes, metric),
                metric.to_owned(),
                unit,
                System::Punctual,
                value,
            );
        };
        let label = format!("{} × {nodes}", backend.label());

        // Ingest: the pending set, due over 30 days.
        let now = now_ms();
        let jobs = (0..s.tasks).map(|n| pending_job(n, now)).collect();
        let bar = Bar::new(format!("{label}: ingest"), s.tasks);
        let secs = schedule_all(ctx, &servers, jobs, &bar).await?;
        bar.finish();
        add("ingest", Unit::Rate, s.tasks as f64 / secs);

        // Idle: Redis commands per second and node, with the pending set and nothing due.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = store.commands()?;
        let window = Duration::from_millis(s.idle_ms);
        tokio::time::sleep(window).await;
        let after = store.commands()?;
        // Each INFO is a command too.
        let info_calls = store.servers().len() as u64;
        let per_node =
            after.saturating_sub(before + info_calls) as f64 / window.as_secs_f64() / nodes as f64;
        add("idle", Unit::Rate, per_node);

        // Burst on top of the pending set.
        let first = s.tasks;
        let (start, jobs) = burst_jobs(s, first);
        let bar = Bar::new(format!("{label}: schedule the burst"), s.burst);
        schedule_all(ctx, &servers, jobs, &bar).await?;
        bar.finish();
        let sink = Sink::new(&format!("{label}: burst"), first, s.burst, s.burst);
        let deadline = deadline_at_ms(start + s.burst_over_ms + s.give_up_ms);
        consume_all(ctx, &servers, &sink, deadline).await?;
        sink.finish();
        let lateness = sink.lateness();
        let ms = |q: f64| {
            if lateness.is_empty() {
                f64::NAN
            } else {
                lateness.value_at_quantile(q) as f64 / 1000.0
            }
        };
        add("p50", Unit::Ms, ms(0.5));
        add("p99", Unit::Ms, ms(0.99));
        add("max", Unit::Ms, ms(1.0));
        let on_time = lateness.count_between(0, s.give_up_ms * 1000);
        add(
            "missed",
            Unit::Count,
            s.burst.saturating_sub(on_time) as f64,
        );
        let burst_twice = sink.duplicates();

        // Drain: tasks all due at once.
        let first = first + s.burst;
        let now = now_ms();
        let jobs = (0..s.drain)
            .map(|i| Job {
                n: first + i,
                due_ms: now,
            })
            .collect();
        let bar = Bar::new(format!("{label}: schedule the drain"), s.drain);
        schedule_all(ctx, &servers, jobs, &bar).await?;
        bar.finish();
        let sink = Sink::new(&format!("{label}: drain"), first, s.drain, s.drain);
        let started = Instant::now();
        let deadline = started + Duration::from_millis(s.give_up_ms.max(1000) * 10);
        consume_all(ctx, &servers, &sink, deadline).await?;
        let secs = started.elapsed().as_secs_f64();
        sink.finish();
        add("drain", Unit::Rate, sink.received() as f64 / secs);
        add(
            "twice",
            Unit::Count,
            (burst_twice + sink.duplicates()) as f64,
        );
        add(
            "drain_missing",
            Unit::Count,
            s.drain.saturating_sub(sink.received()) as f64,
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    for server in servers {
        server.stop().await;
    }
    drop(store);
    outcome
}
