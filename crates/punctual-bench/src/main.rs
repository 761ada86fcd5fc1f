//! `punctual-bench`: Punctual side by side with the approaches it replaces, in one run, on the same
//! machine, with the same load. Its own binary, so the `punctual` binary carries no bench code; it
//! runs the `punctual` binary built beside it (or `--punctual-bin`) as the server under test.
//!
//! Every system is started by the bench itself on a free loopback port, fresh for each group of
//! scenarios, driven through the same scenarios and stopped; the figures go into a markdown report
//! (medians of `--runs` with their range) and a lateness plot. Numbers are printed, never asserted:
//! this is a measuring tool, not a test.
// The benchmark measures wall time itself; the Clock rule is for server logic.
#![allow(clippy::disallowed_methods)]

mod beanstalk;
mod distributed;
mod plot;
mod progress;
mod punctual;
mod redis_peers;
mod report;
mod resp;
mod schedules;
mod subject;
mod webhook;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use progress::Bar;
use punctual_core::duration::parse_duration_ms;
use report::{Results, Unit};
use subject::{Job, Sink, Subject, now_ms, now_us};

/// The systems the bench compares.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Debug,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum System {
    /// Punctual on its embedded store, default durability.
    Punctual,
    /// Redis sorted-set polling.
    Zset,
    /// Redis keyspace notifications.
    Keyspace,
    /// beanstalkd with its binlog on.
    Beanstalkd,
    /// Punctual over its Redis protocol, driven by the keyspace-notification program.
    PunctualResp,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Punctual => "Punctual",
            System::Zset => "Redis sorted set",
            System::Keyspace => "Redis keyspace events",
            System::Beanstalkd => "beanstalkd",
            System::PunctualResp => "Punctual over RESP",
        }
    }

    /// The program the system needs, and the Debian package that has it.
    fn program(self) -> Option<(&'static str, &'static str)> {
        match self {
            System::Punctual | System::PunctualResp => None,
            System::Zset | System::Keyspace => Some(("redis-server", "redis-server")),
            System::Beanstalkd => Some(("beanstalkd", "beanstalkd")),
        }
    }
}

/// The scenarios, in the order the report lists them.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Debug,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Scenario {
    Ingest,
    Burst,
    Drain,
    Memory,
    Restart,
    Correctness,
    /// Punctual only: webhook deliveries to a local target.
    Webhook,
    /// Punctual only: 1, 2 and 3 nodes on one Redis and on a 3-master Redis Cluster.
    Distributed,
    /// Punctual only: recurring schedules (lateness of occurrences, cost of many schedules).
    Schedules,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser)]
#[command(
    name = "punctual-bench",
    version,
    about = "Punctual side by side with the approaches it replaces (docs/benchmarks.md)"
)]
pub struct BenchOpts {
    /// The `punctual` binary to run as the server under test [default: the one beside this binary,
    /// e.g. target/release/punctual after `cargo build --release`].
    #[arg(long, env = "PUNCTUAL_BIN")]
    punctual_bin: Option<PathBuf>,
    /// Systems to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values = ["punctual", "zset", "keyspace", "beanstalkd", "punctual-resp"])]
    systems: Vec<System>,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values = ["ingest", "burst", "drain", "memory", "restart", "correctness", "webhook", "distributed", "schedules"])]
    scenarios: Vec<Scenario>,
    /// Runs of every scenario; the report gives medians and ranges.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Small sizes (a smoke test of every path in well under a minute; not a measurement).
    #[arg(long)]
    quick: bool,
    /// Write the report into this markdown file (rewriting only its generated section), its plots
    /// beside it as <name>-lateness.svg and <name>-throughput.svg, and the run's raw figures and
    /// histograms as <name>-raw.json; without it the report goes to stdout.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Run nothing: redraw the report's generated section in --report FILE and its plots from the
    /// raw results of an earlier run (a <name>-raw.json).
    #[arg(long, requires = "report")]
    replot: Option<PathBuf>,
    /// Tasks pending, due over 30 days, for ingest, memory, burst, restart [default: 1000000; quick: 10000].
    #[arg(long)]
    tasks: Option<u64>,
    /// Tasks falling due in the burst [default: 100000; quick: 2000].
    #[arg(long)]
    burst: Option<u64>,
    /// Over how long the burst falls due [default: 10s; quick: 1s].
    #[arg(long)]
    burst_over: Option<String>,
    /// Tasks all due at once for the drain [default: 1000000; quick: 10000].
    #[arg(long)]
    drain: Option<u64>,
    /// Punctual only: a second memory point with this many pending; 0 to skip [default: 10000000; quick: 0].
    #[arg(long)]
    memory_tasks: Option<u64>,
    /// Tasks in each correctness check [default: 1000; quick: 200].
    #[arg(long)]
    correctness: Option<u64>,
    /// How long the consumer is away in the correctness check [default: 5s; quick: 1s].
    #[arg(long)]
    disconnect: Option<String>,
    /// Schedules every 1 s whose occurrences' lateness is measured [default: 1000; quick: 50].
    #[arg(long)]
    schedules: Option<u64>,
    /// How long those schedules run [default: 60s; quick: 3s].
    #[arg(long)]
    schedules_for: Option<String>,
    /// Start those schedules at evenly spaced instants of a second, so their occurrences do not
    /// fall due together.
    #[arg(long)]
    schedules_spread: bool,
    /// Mostly daily schedules whose cost at rest is measured [default: 100000; quick: 1000].
    #[arg(long)]
    daily_schedules: Option<u64>,
    /// A task not delivered within this long after its due time counts as missed [default: 60s; quick: 2s].
    #[arg(long)]
    give_up: Option<String>,
    /// Distributed mode: node counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["1", "2", "3"])]
    nodes: Vec<usize>,
    /// Distributed mode: Redis set-ups to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["redis", "cluster"])]
    backends: Vec<distributed::Backend>,
    /// Distributed mode: how long idle nodes' Redis commands are counted [default: 10s; quick: 2s].
    #[arg(long)]
    idle: Option<String>,
    /// Tasks per round trip (batch request or pipeline) when scheduling.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Ingest only: every task due this long after it is sent (e.g. 30m, the unpaid-order timeout),
    /// instead of spread over 30 days.
    #[arg(long)]
    due_in: Option<String>,
    /// Connections for ingest, comma-separated; the last one is also used to fill the other scenarios.
    #[arg(long, value_delimiter = ',', default_values = ["1", "4"])]
    connections: Vec<usize>,
    /// Consumers in the burst and the drain.
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// Most tasks one reserve (or sorted-set claim) takes.
    #[arg(long, default_value_t = 100)]
    reserve_max: usize,
    /// Where to keep data directories (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Extra arguments for `punctual serve`, e.g. "--cache-mb 32".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    serve_args: String,
}

/// The sizes of one bench run, from the options and `--quick`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Sizes {
    pub tasks: u64,
    pub burst: u64,
    pub burst_over_ms: u64,
    pub drain: u64,
    pub memory_tasks: u64,
    pub correctness: u64,
    pub disconnect_ms: u64,
    pub give_up_ms: u64,
    pub idle_ms: u64,
    pub nodes: Vec<usize>,
    pub backends: Vec<distributed::Backend>,
    pub batch: usize,
    /// Ingest with every task due this long after it is sent, instead of over 30 days.
    pub due_in_ms: Option<u64>,
    pub connections: Vec<usize>,
    pub consumers: usize,
    pub reserve_max: usize,
    pub schedules: u64,
    pub schedules_for_ms: u64,
    pub schedules_spread: bool,
    pub daily_schedules: u64,
}

impl Sizes {
    fn new(opts: &BenchOpts) -> Result<Sizes> {
        let q = opts.quick;
        let ms = |given: &Option<String>, full: &str, quick: &str| -> Result<u64> {
            let text = given.as_deref().unwrap_or(if q { quick } else { full });
            parse_duration_ms(text).map_err(anyhow::Error::msg)
        };
        let n = |given: Option<u64>, full: u64, quick: u64| {
            given.unwrap_or(if q { quick } else { full })
        };
        let sizes = Sizes {
            tasks: n(opts.tasks, 1_000_000, 10_000),
            burst: n(opts.burst, 100_000, 2_000),
            burst_over_ms: ms(&opts.burst_over, "10s", "1s")?,
            drain: n(opts.drain, 1_000_000, 10_000),
            memory_tasks: n(opts.memory_tasks, 10_000_000, 0),
            correctness: n(opts.correctness, 1_000, 200),
            disconnect_ms: ms(&opts.disconnect, "5s", "1s")?,
            give_up_ms: ms(&opts.give_up, "60s", "2s")?,
            idle_ms: ms(&opts.idle, "10s", "2s")?.max(100),
            nodes: opts.nodes.clone(),
            backends: opts.backends.clone(),
            batch: opts.batch,
            due_in_ms: opts
                .due_in
                .as_deref()
                .map(parse_duration_ms)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            connections: opts.connections.clone(),
            consumers: opts.consumers,
            reserve_max: opts.reserve_max,
            schedules: n(opts.schedules, 1_000, 50).max(1),
            schedules_for_ms: ms(&opts.schedules_for, "60s", "3s")?.max(1_000),
            schedules_spread: opts.schedules_spread,
            daily_schedules: n(opts.daily_schedules, 100_000, 1_000).max(1),
        };
        if sizes.batch == 0 || sizes.batch > 1000 {
            bail!("--batch must be 1..=1000 (Punctual's batch limit)");
        }
        if sizes.nodes.is_empty() || sizes.nodes.iter().any(|n| !(1..=16).contains(n)) {
            bail!("--nodes needs at least one count, each 1..=16");
        }
        if sizes.backends.is_empty() {
            bail!("--backends needs at least one of redis, cluster");
        }
        if sizes.connections.is_empty() || sizes.connections.contains(&0) {
            bail!("--connections needs at least one count, each at least 1");
        }
        if sizes.consumers == 0 || sizes.reserve_max == 0 || opts.runs == 0 {
            bail!("--consumers, --reserve-max and --runs must be at least 1");
        }
        if sizes.burst == 0 || sizes.drain == 0 || sizes.correctness == 0 || sizes.tasks == 0 {
            bail!("--tasks, --burst, --drain and --correctness must be at least 1");
        }
        Ok(sizes)
    }

    /// How far ahead a burst is scheduled: time to schedule it (at 25 k tasks/s or better) before
    /// its first task is due.
    fn lead_ms(&self) -> u64 {
        1_000 + self.burst / 25
    }

    /// Connections used to fill a system for the scenarios after ingest.
    fn fill_connections(&self) -> usize {
        self.connections.last().copied().unwrap_or(1)
    }
}

/// What every driver shares.
pub struct Ctx {
    pub sizes: Sizes,
    pub http: reqwest::Client,
    /// Extra `punctual serve` arguments.
    pub extra: Vec<String>,
    pub work_dir: PathBuf,
    dirs: AtomicU64,
}

impl Ctx {
    fn next_dir(&self) -> u64 {
        self.dirs.fetch_add(1, Ordering::Relaxed)
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = <BenchOpts as clap::Parser>::parse();
    if let (Some(raw), Some(report)) = (&opts.replot, &opts.report) {
        return replot(raw, report);
    }
    punctual::set_binary(opts.punctual_bin.clone())?;
    run(opts).await
}

pub async fn run(opts: BenchOpts) -> Result<()> {
    let sizes = Sizes::new(&opts)?;
    let ctx = Ctx {
        sizes,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        extra: opts
            .serve_args
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        work_dir: opts.work_dir.clone().unwrap_or_else(std::env::temp_dir),
        dirs: AtomicU64::new(0),
    };
    let mut results = Results::new(opts.runs);
    let mut systems = opts.systems.clone();
    systems.sort();
    systems.dedup();
    let mut scenarios = opts.scenarios.clone();
    scenarios.sort();
    scenarios.dedup();
    systems.retain(|system| match system.program() {
        Some((program, package)) if !on_path(program) => {
            let note = format!(
                "{}: `{program}` is not on PATH, so it was not run (Debian: `apt-get install -y {package}`).",
                system.label()
            );
            eprintln!("{note}");
            results.notes.push(note);
            false
        }
        _ => true,
    });
    let started = Instant::now();
    for run in 1..=opts.runs {
        for &system in &systems {
            eprintln!("== run {run} of {}: {}", opts.runs, system.label());
            let outcome = match system {
                System::Punctual => {
                    drive::<punctual::Punctual>(&ctx, &scenarios, &mut results).await
                }
                System::Zset => drive::<redis_peers::Zset>(&ctx, &scenarios, &mut results).await,
                System::Keyspace => {
                    drive::<redis_peers::Keyspace>(&ctx, &scenarios, &mut results).await
                }
                System::Beanstalkd => {
                    drive::<beanstalk::Beanstalkd>(&ctx, &scenarios, &mut results).await
                }
                System::PunctualResp => {
                    drive::<resp::PunctualResp>(&ctx, &scenarios, &mut results).await
                }
            };
            if let Err(e) = outcome {
                let note = format!("run {run}, {}: failed: {e:#}", system.label());
                eprintln!("{note}");
                results.notes.push(note);
            }
        }
        if systems.contains(&System::Punctual) && scenarios.contains(&Scenario::Webhook) {
            eprintln!("== run {run} of {}: Punctual webhooks", opts.runs);
            if let Err(e) = webhook::run(&ctx, &mut results).await {
                results
                    .notes
                    .push(format!("run {run}, Punctual webhooks: failed: {e:#}"));
            }
        }
        if systems.contains(&System::Punctual) && scenarios.contains(&Scenario::Schedules) {
            eprintln!("== run {run} of {}: Punctual schedules", opts.runs);
            if let Err(e) = schedules::run(&ctx, &mut results).await {
                results
                    .notes
                    .push(format!("run {run}, Punctual schedules: failed: {e:#}"));
            }
        }
        if systems.contains(&System::Punctual) && scenarios.contains(&Scenario::Distributed) {
            if on_path("redis-server") && on_path("redis-cli") {
                if let Err(e) = distributed::run(&ctx, &mut results).await {
                    results.notes.push(format!(
                        "run {run}, Punctual distributed mode: failed: {e:#}"
                    ));
                }
            } else if run == 1 {
                results.notes.push(
                    "Punctual distributed mode: `redis-server` or `redis-cli` is not on PATH, so it was not run (Debian: `apt-get install -y redis-server redis-tools`)."
                        .to_owned(),
                );
            }
        }
    }
    if systems.contains(&System::Punctual)
        && scenarios.contains(&Scenario::Memory)
        && ctx.sizes.memory_tasks > 0
    {
        eprintln!("== Punctual memory at {} pending", ctx.sizes.memory_tasks);
        if let Err(e) = memory_big(&ctx, &mut results).await {
            results
                .notes
                .push(format!("Punctual memory at scale: failed: {e:#}"));
        }
    }
    results.elapsed = started.elapsed();
    results.finished_ms = subject::now_ms();

    let command = std::iter::once("punctual-bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let raw = report::Raw::new(results, ctx.sizes, systems, command);
    match &opts.report {
        Some(path) => write_report(path, &raw, true),
        None => {
            let results = raw.results()?;
            let markdown = report::render(
                &raw.sizes,
                &results,
                &raw.systems,
                &raw.command,
                None,
                (false, false),
            );
            println!("{markdown}");
            Ok(())
        }
    }
}

/// Writes the report's generated section into `path` and its plots beside it, from `raw`; and,
/// for a run (not a replot), the raw results as `<name>-raw.json`.
fn write_report(path: &std::path::Path, raw: &report::Raw, keep_raw: bool) -> Result<()> {
    let results = raw.results()?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("benchmarks")
        .to_owned();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if keep_raw {
        let raw_path = path.with_file_name(format!("{stem}-raw.json"));
        std::fs::write(&raw_path, serde_json::to_vec(raw)?)
            .with_context(|| format!("writing {}", raw_path.display()))?;
        eprintln!("raw results written to {}", raw_path.display());
    }
    let plots = report::Plots {
        lateness: format!("{stem}-lateness.svg"),
        throughput: format!("{stem}-throughput.svg"),
    };
    let wrote = (
        plot::lateness_cdf(&path.with_file_name(&plots.lateness), &results, &raw.sizes)?,
        plot::throughput(
            &path.with_file_name(&plots.throughput),
            &results,
            &raw.systems,
        )?,
    );
    let markdown = report::render(
        &raw.sizes,
        &results,
        &raw.systems,
        &raw.command,
        Some(&plots).filter(|_| wrote.0 || wrote.1),
        wrote,
    );
    report::write(path, &markdown)?;
    eprintln!("report written to {}", path.display());
    for (name, written) in [(&plots.lateness, wrote.0), (&plots.throughput, wrote.1)] {
        if written {
            eprintln!("plot written to {}", path.with_file_name(name).display());
        }
    }
    Ok(())
}

/// `--replot RAW --report FILE`: the report and its plots again from an earlier run's raw results.
fn replot(raw_path: &std::path::Path, report_path: &std::path::Path) -> Result<()> {
    let bytes =
        std::fs::read(raw_path).with_context(|| format!("reading {}", raw_path.display()))?;
    let raw: report::Raw = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a punctual-bench raw results file",
            raw_path.display()
        )
    })?;
    if raw.format != report::RAW_FORMAT {
        bail!(
            "{} has raw format {}; this punctual-bench reads format {}",
            raw_path.display(),
            raw.format,
            report::RAW_FORMAT
        );
    }
    write_report(report_path, &raw, false)
}

/// Task `n` of the pending set: due somewhere between one hour and 30 days from `now_ms`.
pub(crate) fn pending_job(n: u64, now_ms: u64) -> Job {
    const THIRTY_DAYS_MS: u64 = 30 * 86_400_000;
    Job {
        n,
        due_ms: now_ms + 3_600_000 + (n.wrapping_mul(2_654_435_761) % THIRTY_DAYS_MS),
    }
}

/// Schedules tasks `first..first+count` due over 30 days; returns tasks per second.
async fn fill<S: Subject>(
    ctx: &Ctx,
    subject: &S,
    first: u64,
    count: u64,
    connections: usize,
) -> Result<f64> {
    let now = now_ms();
    let jobs = (first..first + count)
        .map(|n| match ctx.sizes.due_in_ms {
            Some(delay) => Job {
                n,
                due_ms: now + delay,
            },
            None => pending_job(n, now),
        })
        .collect();
    let bar = Bar::new(
        format!("{}: ingest, {connections} conn.", S::SYSTEM.label()),
        count,
    );
    let secs = subject.schedule(ctx, jobs, connections, &bar).await?;
    bar.finish();
    Ok(count as f64 / secs)
}

/// The id ranges of one run's scenarios on the system filled with `tasks` pending.
struct Ranges {
    burst: u64,
    away: u64,
    twice: u64,
    restart: u64,
}

impl Ranges {
    fn new(s: &Sizes) -> Ranges {
        let burst = s.tasks;
        let away = burst + s.burst;
        let twice = away + s.correctness;
        Ranges {
            burst,
            away,
            twice,
            restart: twice + s.correctness,
        }
    }
}

/// Runs the selected scenarios against one system: one fresh instance per extra ingest connection
/// count, one filled instance for memory, burst, correctness and restart (in that order; restart
/// kills it), and one for the drain.
async fn drive<S: Subject>(ctx: &Ctx, scenarios: &[Scenario], res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let system = S::SYSTEM;
    let wants = |scenario| scenarios.contains(&scenario);
    let fill_with = s.fill_connections();
    if wants(Scenario::Ingest) {
        for &connections in &s.connections[..s.connections.len() - 1] {
            let subject = S::start(ctx).await?;
            let rate = fill(ctx, &subject, 0, s.tasks, connections).await;
            subject.stop().await;
            res.add_ingest(connections, system, rate?);
        }
    }
    let filled = [
        Scenario::Ingest,
        Scenario::Memory,
        Scenario::Burst,
        Scenario::Correctness,
        Scenario::Restart,
    ];
    if filled.into_iter().any(wants) {
        let mut subject = S::start(ctx).await?;
        let outcome = async {
            let empty = subject.memory_bytes().await?;
            let written_before = subject.disk_bytes_written();
            let rate = fill(ctx, &subject, 0, s.tasks, fill_with).await?;
            if wants(Scenario::Ingest) {
                res.add_ingest(fill_with, system, rate);
                if let (Some(before), Some(after)) = (written_before, subject.disk_bytes_written())
                {
                    res.add(
                        Scenario::Ingest,
                        "written_per_task",
                        "bytes written to disk per task during the ingest (/proc/PID/io)",
                        Unit::Bytes,
                        system,
                        after.saturating_sub(before) as f64 / s.tasks as f64,
                    );
                }
            }
            if wants(Scenario::Memory) {
                let used = subject.memory_bytes().await?.saturating_sub(empty);
                res.add(
                    Scenario::Memory,
                    "memory_per_task",
                    format!("bytes of RAM per pending task at {} pending", s.tasks),
                    Unit::Bytes,
                    system,
                    used as f64 / s.tasks as f64,
                );
                res.add(
                    Scenario::Memory,
                    "memory_total",
                    format!("RAM used by {} pending (above an empty server)", s.tasks),
                    Unit::MiB,
                    system,
                    used as f64 / 1048576.0,
                );
            }
            let ranges = Ranges::new(s);
            if wants(Scenario::Burst) {
                burst(ctx, &subject, ranges.burst, res).await?;
            }
            if wants(Scenario::Correctness) {
                correctness(ctx, &subject, &ranges, res).await?;
            }
            if wants(Scenario::Restart) {
                restart(ctx, &mut subject, ranges.restart, res).await?;
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        subject.stop().await;
        outcome?;
    }
    if wants(Scenario::Drain) {
        let subject = S::start(ctx).await?;
        let outcome = drain(ctx, &subject, res).await;
        subject.stop().await;
        outcome?;
    }
    Ok(())
}

/// Sleeps until Unix time `at_ms`.
async fn sleep_until_ms(at_ms: u64) {
    let wait = at_ms.saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

pub(crate) fn deadline_at_ms(at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms()))
}

/// The burst's tasks `first..first+burst`, due evenly over `burst_over` from `lead_ms` after now; and
/// when the first is due.
pub(crate) fn burst_jobs(s: &Sizes, first: u64) -> (u64, Vec<Job>) {
    let start = now_ms() + s.lead_ms();
    let jobs = (0..s.burst)
        .map(|i| Job {
            n: first + i,
            due_ms: start + i * s.burst_over_ms / s.burst,
        })
        .collect();
    (start, jobs)
}

/// `burst` tasks due evenly over `burst_over` on top of the pending ones; consumers take them as
/// they fall due.
async fn burst<S: Subject>(ctx: &Ctx, subject: &S, first: u64, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let label = S::SYSTEM.label();
    let (start, jobs) = burst_jobs(s, first);
    let bar = Bar::new(format!("{label}: schedule the burst"), s.burst);
    subject
        .schedule(ctx, jobs, s.fill_connections(), &bar)
        .await?;
    bar.finish();
    if now_ms() >= start {
        res.notes.push(format!(
            "{label}: the burst was still being scheduled when its first task fell due."
        ));
    }
    let consumers = if S::BROADCAST { 1 } else { s.consumers };
    let sink = Sink::new(&format!("{label}: burst"), first, s.burst, s.burst);
    let deadline = deadline_at_ms(start + s.burst_over_ms + s.give_up_ms);
    subject
        .consume(ctx, consumers, sink.clone(), deadline)
        .await?;
    sink.finish();
    let lateness = sink.lateness();
    res.add_burst(S::SYSTEM, &lateness, s, sink.duplicates());
    Ok(())
}

/// Two checks: the consumer is away while tasks fall due (are they delivered when it is back?), and
/// two consumers take the same tasks (is any delivered to both?).
async fn correctness<S: Subject>(
    ctx: &Ctx,
    subject: &S,
    ranges: &Ranges,
    res: &mut Results,
) -> Result<()> {
    let s = &ctx.sizes;
    let label = S::SYSTEM.label();
    let count = s.correctness;
    // How long a consumer has to get what it should get, once it is there.
    let catch_up_ms = s.give_up_ms.min(10_000);

    // The consumer is away while every task falls due.
    let start = now_ms() + 500;
    let jobs = (0..count)
        .map(|i| Job {
            n: ranges.away + i,
            due_ms: start + i * s.disconnect_ms / count,
        })
        .collect();
    let bar = Bar::new(format!("{label}: schedule, consumer away"), count);
    subject.schedule(ctx, jobs, 1, &bar).await?;
    bar.finish();
    sleep_until_ms(start + s.disconnect_ms).await;
    let sink = Sink::new(
        &format!("{label}: consumer back"),
        ranges.away,
        count,
        count,
    );
    let deadline = Instant::now() + Duration::from_millis(catch_up_ms);
    subject.consume(ctx, 1, sink.clone(), deadline).await?;
    sink.finish();
    res.add(
        Scenario::Correctness,
        "lost_away",
        format!(
            "lost: {count} tasks fall due while the consumer is away for {} s",
            s.disconnect_ms as f64 / 1000.0
        ),
        Unit::Count,
        S::SYSTEM,
        (count - sink.received()) as f64,
    );

    // Two consumers at once.
    let start = now_ms() + 500;
    let jobs = (0..count)
        .map(|i| Job {
            n: ranges.twice + i,
            due_ms: start + i * 1000 / count,
        })
        .collect();
    let bar = Bar::new(format!("{label}: schedule, two consumers"), count);
    subject.schedule(ctx, jobs, 1, &bar).await?;
    bar.finish();
    let sink = Sink::new(
        &format!("{label}: two consumers"),
        ranges.twice,
        count,
        count,
    );
    let deadline = deadline_at_ms(start + 1000 + catch_up_ms);
    subject.consume(ctx, 2, sink.clone(), deadline).await?;
    sink.finish();
    res.add(
        Scenario::Correctness,
        "twice",
        format!("delivered twice: {count} tasks due over 1 s, two consumers"),
        Unit::Count,
        S::SYSTEM,
        sink.duplicates() as f64,
    );
    res.add(
        Scenario::Correctness,
        "lost_twice",
        format!(
            "not delivered within {} s: the same, two consumers",
            catch_up_ms as f64 / 1000.0
        ),
        Unit::Count,
        S::SYSTEM,
        (count - sink.received()) as f64,
    );
    Ok(())
}

/// `kill -9` with the pending tasks and a few already due: how soon the server answers, how soon a
/// due task is delivered, and how many tasks it still has.
async fn restart<S: Subject>(
    ctx: &Ctx,
    subject: &mut S,
    first: u64,
    res: &mut Results,
) -> Result<()> {
    let s = &ctx.sizes;
    let label = S::SYSTEM.label();
    let due_now = 10;
    let now = now_ms();
    let jobs = (0..due_now)
        .map(|i| Job {
            n: first + i,
            due_ms: now,
        })
        .collect();
    let bar = Bar::new(format!("{label}: schedule, due now"), due_now);
    subject.schedule(ctx, jobs, 1, &bar).await?;
    bar.finish();
    let before = subject.pending().await?;
    let killed_us = now_us();
    let killed = Instant::now();
    subject.kill9_restart().await?;
    subject::wait_until(Duration::from_secs(120), label, || subject.answers()).await?;
    let answered = killed.elapsed();
    let after = subject.pending().await.unwrap_or(0);
    let sink = Sink::new(
        &format!("{label}: first delivery after kill -9"),
        first,
        due_now,
        1,
    );
    let deadline = Instant::now() + Duration::from_millis(s.give_up_ms.min(10_000));
    subject.consume(ctx, 1, sink.clone(), deadline).await?;
    sink.finish();
    let first_ms = sink.first_at_us().map_or(f64::INFINITY, |at| {
        at.saturating_sub(killed_us) as f64 / 1000.0
    });
    res.add(
        Scenario::Restart,
        "restart_answers",
        "answers again after kill -9",
        Unit::Ms,
        S::SYSTEM,
        answered.as_secs_f64() * 1000.0,
    );
    res.add(
        Scenario::Restart,
        "restart_first",
        "first due task delivered after kill -9",
        Unit::Ms,
        S::SYSTEM,
        first_ms,
    );
    res.add(
        Scenario::Restart,
        "restart_kept",
        format!("tasks still there after kill -9 (of {before})"),
        Unit::Percent,
        S::SYSTEM,
        after as f64 * 100.0 / before.max(1) as f64,
    );
    Ok(())
}

/// `drain` tasks all due at once, taken by the consumers as fast as they can.
async fn drain<S: Subject>(ctx: &Ctx, subject: &S, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let label = S::SYSTEM.label();
    subject.hold_due().await?;
    let now = now_ms();
    let jobs = (0..s.drain).map(|n| Job { n, due_ms: now }).collect();
    let bar = Bar::new(format!("{label}: schedule the drain"), s.drain);
    subject
        .schedule(ctx, jobs, s.fill_connections(), &bar)
        .await?;
    bar.finish();
    let consumers = if S::BROADCAST { 1 } else { s.consumers };
    let sink = Sink::new(&format!("{label}: drain"), 0, s.drain, s.drain);
    let started = Instant::now();
    let deadline = started + Duration::from_millis(s.give_up_ms.max(1000) * 10);
    subject
        .consume(ctx, consumers, sink.clone(), deadline)
        .await?;
    let secs = started.elapsed().as_secs_f64();
    sink.finish();
    res.add(
        Scenario::Drain,
        "drain_rate",
        format!("tasks/s delivered, {} all due at once", s.drain),
        Unit::Rate,
        S::SYSTEM,
        sink.received() as f64 / secs,
    );
    res.add(
        Scenario::Drain,
        "drain_missing",
        "not delivered",
        Unit::Count,
        S::SYSTEM,
        (s.drain - sink.received()) as f64,
    );
    res.add(
        Scenario::Drain,
        "drain_twice",
        "delivered twice",
        Unit::Count,
        S::SYSTEM,
        sink.duplicates() as f64,
    );
    Ok(())
}

/// Punctual only: RAM with `--memory-tasks` pending, filled a million at a time.
async fn memory_big(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let server = punctual::Punctual::start(ctx).await?;
    let outcome = async {
        let empty = server.memory_bytes().await?;
        let mut done = 0;
        while done < s.memory_tasks {
            let step = (s.memory_tasks - done).min(1_000_000);
            fill(ctx, &server, done, step, s.fill_connections()).await?;
            done += step;
        }
        let used = server.memory_bytes().await?.saturating_sub(empty);
        res.add(
            Scenario::Memory,
            "memory_per_task_big",
            format!(
                "bytes of RAM per pending task at {} pending",
                s.memory_tasks
            ),
            Unit::Bytes,
            System::Punctual,
            used as f64 / s.memory_tasks as f64,
        );
        res.add(
            Scenario::Memory,
            "memory_total_big",
            format!(
                "RAM used by {} pending (above an empty server)",
                s.memory_tasks
            ),
            Unit::MiB,
            System::Punctual,
            used as f64 / 1048576.0,
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    server.stop().await;
    outcome.context("filling Punctual for the memory point")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw files of session 14 wrote "never" (∞) as `null`; they still read, as ∞.
    #[test]
    fn raw_figures_read_null_as_never() {
        let row: report::Row = serde_json::from_str(
            r#"{"scenario":"Restart","key":"restart_first","label":"first","unit":"Ms",
                "values":{"Punctual":[403.2,"inf"],"Zset":[null,null]}}"#,
        )
        .unwrap();
        assert_eq!(row.values[&System::Punctual], [403.2, f64::INFINITY]);
        assert_eq!(row.values[&System::Zset], [f64::INFINITY, f64::INFINITY]);
        let text = serde_json::to_string(&row).unwrap();
        assert!(text.contains(r#""Zset":["inf","inf"]"#), "{text}");
    }

    /// A run's raw results, written and read back, redraw the same report and the same plots:
    /// what `--replot` relies on.
    #[test]
    fn raw_results_replot_to_the_same_report_and_plots() {
        let opts =
            <BenchOpts as clap::Parser>::try_parse_from(["punctual-bench", "--quick"]).unwrap();
        let sizes = Sizes::new(&opts).unwrap();
        let mut results = report::Results::new(2);
        for (run, rate) in [(0, 41_000.0), (1, 43_500.0)] {
            let _ = run;
            results.add_ingest(1, System::Punctual, rate);
            results.add_ingest(1, System::Zset, rate * 1.3);
        }
        let mut lateness = subject::lateness_histogram();
        for us in [400u64, 900, 1_100, 2_500, 2_500, 30_000, 1_200_000] {
            lateness.record(us).unwrap();
        }
        results.add_burst(System::Punctual, &lateness, &sizes, 0);
        // "Never" is ∞, which a JSON number cannot hold.
        for (system, ms) in [(System::Punctual, 403.2), (System::Zset, f64::INFINITY)] {
            results.add(
                Scenario::Restart,
                "restart_first",
                "first due task delivered after kill -9",
                Unit::Ms,
                system,
                ms,
            );
        }
        results.notes.push("a note".into());
        let systems = vec![System::Punctual, System::Zset];
        let dir = std::env::temp_dir().join(format!("punctual-bench-raw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let raw = report::Raw::new(results, sizes, systems, "punctual-bench --quick".into());
        let first = dir.join("a/bench.md");
        write_report(&first, &raw, true).unwrap();
        let second = dir.join("b/bench.md");
        replot(&dir.join("a/bench-raw.json"), &second).unwrap();
        for name in ["bench.md", "bench-lateness.svg", "bench-throughput.svg"] {
            let a = std::fs::read(dir.join("a").join(name)).unwrap();
            let b = std::fs::read(dir.join("b").join(name)).unwrap();
            assert!(
                a == b,
                "{name} differs after a replot:\n{}\n---\n{}",
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b)
            );
        }
        let report = std::fs::read_to_string(&first).unwrap();
        assert!(report.contains("bench-lateness.svg") && report.contains("a note"));
        assert!(
            !dir.join("b/bench-raw.json").exists(),
            "a replot writes no raw file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
