//! The bench's figures and the markdown report made from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use super::subject::lateness_histogram;
use super::{Scenario, Sizes, System};

#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Unit {
    Rate,
    Ms,
    Bytes,
    MiB,
    Count,
    Percent,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub scenario: Scenario,
    pub key: String,
    pub label: String,
    pub unit: Unit,
    #[serde(with = "figures")]
    pub values: BTreeMap<System, Vec<f64>>,
}

/// A row's figures in the raw file: finite ones as JSON numbers, the others (∞ is "never") as the
/// strings `inf`, `-inf` and `nan`, which JSON numbers cannot hold. A `null` reads as ∞: raw files
/// written before this (session 14) have it for "never", the only non-finite figure the bench makes.
mod figures {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::System;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Figure {
        Number(f64),
        Text(String),
        Null(()),
    }

    pub fn serialize<S: Serializer>(
        values: &BTreeMap<System, Vec<f64>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let out: BTreeMap<&System, Vec<Figure>> = values
            .iter()
            .map(|(system, figures)| {
                let figures = figures
                    .iter()
                    .map(|&v| match v {
                        v if v.is_finite() => Figure::Number(v),
                        v if v.is_nan() => Figure::Text("nan".into()),
                        v if v > 0.0 => Figure::Text("inf".into()),
                        _ => Figure::Text("-inf".into()),
                    })
                    .collect();
                (system, figures)
            })
            .collect();
        out.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<System, Vec<f64>>, D::Error> {
        let raw = BTreeMap::<System, Vec<Figure>>::deserialize(deserializer)?;
        raw.into_iter()
            .map(|(system, figures)| {
                let figures = figures
                    .into_iter()
                    .map(|figure| match figure {
                        Figure::Number(v) => Ok(v),
                        Figure::Null(()) => Ok(f64::INFINITY),
                        Figure::Text(text) => match text.as_str() {
                            "inf" => Ok(f64::INFINITY),
                            "-inf" => Ok(f64::NEG_INFINITY),
                            "nan" => Ok(f64::NAN),
                            _ => Err(serde::de::Error::custom(format!("not a figure: {text:?}"))),
                        },
                    })
                    .collect::<Result<Vec<f64>, D::Error>>()?;
                Ok((system, figures))
            })
            .collect()
    }
}

/// A run's raw results, kept beside its report as `<name>-raw.json` so `--replot` can redraw the
/// report and its plots without running again.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Raw {
    /// Bumped when the shape changes incompatibly.
    pub format: u32,
    pub command: String,
    pub systems: Vec<System>,
    pub sizes: Sizes,
    pub runs: usize,
    pub finished_ms: u64,
    pub elapsed_ms: u64,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Each system's burst lateness: the histogram's bounds and every recorded (µs, count).
    pub lateness: Vec<RawLateness>,
    /// The machine and the versions the run measured (read again at a replot of a raw file of
    /// session 14, which did not keep them).
    #[serde(default)]
    pub setting: Option<Setting>,
}

/// Where a run ran: the report's "Machine" and "Versions" lines.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Setting {
    pub machine: String,
    pub versions: String,
}

impl Setting {
    /// This machine and the programs on it, now.
    pub fn read() -> Setting {
        let git = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty());
        Setting {
            machine: machine(),
            versions: format!(
                "punctual {}{}; {}; {}",
                env!("CARGO_PKG_VERSION"),
                git.map(|g| format!(" ({g})")).unwrap_or_default(),
                version_of("redis-server", "--version")
                    .unwrap_or_else(|| "redis-server not found".into()),
                version_of("beanstalkd", "-v").unwrap_or_else(|| "beanstalkd not found".into())
            ),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct RawLateness {
    pub system: System,
    pub due: u64,
    pub low: u64,
    pub high: u64,
    pub sigfig: u8,
    pub recorded: Vec<(u64, u64)>,
}

pub const RAW_FORMAT: u32 = 1;

impl Raw {
    pub fn new(results: Results, sizes: Sizes, systems: Vec<System>, command: String) -> Raw {
        let lateness = results
            .lateness
            .iter()
            .map(|(system, (hist, due))| RawLateness {
                system: *system,
                due: *due,
                low: hist.low(),
                high: hist.high(),
                sigfig: hist.sigfig(),
                recorded: hist
                    .iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value()))
                    .collect(),
            })
            .collect();
        Raw {
            format: RAW_FORMAT,
            command,
            systems,
            sizes,
            runs: results.runs,
            finished_ms: results.finished_ms,
            elapsed_ms: results.elapsed.as_millis() as u64,
            rows: results.rows,
            notes: results.notes,
            lateness,
            setting: Some(results.setting),
        }
    }

    /// The results again, histograms rebuilt bucket for bucket.
    pub fn results(&self) -> Result<Results> {
        let mut lateness = BTreeMap::new();
        for l in &self.lateness {
            let mut hist = Histogram::<u64>::new_with_bounds(l.low, l.high, l.sigfig)
                .map_err(|e| anyhow::anyhow!("a lateness histogram's bounds: {e}"))?;
            for &(value, count) in &l.recorded {
                hist.record_n(value, count)
                    .map_err(|e| anyhow::anyhow!("a lateness value: {e}"))?;
            }
            lateness.insert(l.system, (hist, l.due));
        }
        Ok(Results {
            runs: self.runs,
            finished_ms: self.finished_ms,
            rows: self
                .rows
                .iter()
                .map(|r| Row {
                    scenario: r.scenario,
                    key: r.key.clone(),
                    label: r.label.clone(),
                    unit: r.unit,
                    values: r.values.clone(),
                })
                .collect(),
            notes: self.notes.clone(),
            lateness,
            elapsed: Duration::from_millis(self.elapsed_ms),
            setting: self.setting.clone().unwrap_or_else(Setting::read),
        })
    }
}

/// The plots' file names, beside the report.
pub struct Plots {
    pub lateness: String,
    pub throughput: String,
}

pub struct Results {
    pub runs: usize,
    /// When the run ended (unix ms): the report's date, also after a replot.
    pub finished_ms: u64,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Burst lateness of every run per system, and how many tasks fell due in those bursts.
    pub lateness: BTreeMap<System, (Histogram<u64>, u64)>,
    pub elapsed: Duration,
    pub setting: Setting,
}

impl Results {
    pub fn new(runs: usize) -> Results {
        Results {
            runs,
            finished_ms: super::subject::now_ms(),
            rows: Vec::new(),
            notes: Vec::new(),
            lateness: BTreeMap::new(),
            elapsed: Duration::ZERO,
            setting: Setting::read(),
        }
    }

    /// Records one run's `value` of a figure; `key` names the figure across runs and systems.
    pub fn add(
        &mut self,
        scenario: Scenario,
        key: impl Into<String>,
        label: impl Into<String>,
        unit: Unit,
        system: System,
        value: f64,
    ) {
        let key = key.into();
        let index = match self.rows.iter().position(|r| r.key == key) {
            Some(index) => index,
            None => {
                self.rows.push(Row {
                    scenario,
                    key,
                    label: label.into(),
                    unit,
                    values: BTreeMap::new(),
                });
                self.rows.len() - 1
            }
        };
        self.rows[index]
            .values
            .entry(system)
            .or_default()
            .push(value);
    }

    pub fn add_ingest(&mut self, connections: usize, system: System, rate: f64) {
        self.add(
            Scenario::Ingest,
            format!("ingest_{connections}"),
            format!(
                "tasks/s acknowledged, {connections} connection{}",
                if connections == 1 { "" } else { "s" }
            ),
            Unit::Rate,
            system,
            rate,
        );
    }

    pub fn add_burst(
        &mut self,
        system: System,
        lateness: &Histogram<u64>,
        s: &Sizes,
        duplicates: u64,
    ) {
        let ms = |q: f64| {
            if lateness.is_empty() {
                f64::NAN
            } else {
                lateness.value_at_quantile(q) as f64 / 1000.0
            }
        };
        for (key, label, q) in [
            ("burst_p50", "lateness p50", 0.5),
            ("burst_p99", "lateness p99", 0.99),
            ("burst_p999", "lateness p99.9", 0.999),
            ("burst_max", "lateness max", 1.0),
        ] {
            self.add(Scenario::Burst, key, label, Unit::Ms, system, ms(q));
        }
        let on_time = lateness.count_between(0, s.give_up_ms * 1000);
        self.add(
            Scenario::Burst,
            "burst_missed",
            format!(
                "did not fire within {} s of their due time (of {})",
                s.give_up_ms / 1000,
                s.burst
            ),
            Unit::Count,
            system,
            s.burst.saturating_sub(on_time) as f64,
        );
        self.add(
            Scenario::Burst,
            "burst_twice",
            "delivered twice",
            Unit::Count,
            system,
            duplicates as f64,
        );
        let (all, due) = self
            .lateness
            .entry(system)
            .or_insert_with(|| (lateness_histogram(), 0));
        let _ = all.add(lateness);
        *due += s.burst;
    }

    /// The median of a figure over the runs.
    pub fn median(&self, key: &str, system: System) -> Option<f64> {
        let row = self.rows.iter().find(|r| r.key == key)?;
        spread(row.values.get(&system)?).map(|(_, median, _)| median)
    }
}

/// (min, median, max) of one figure's runs.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((*sorted.first()?, sorted[sorted.len() / 2], *sorted.last()?))
}

fn format_value(unit: Unit, v: f64) -> String {
    if v.is_nan() {
        return "—".to_owned();
    }
    match unit {
        Unit::Rate if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        Unit::Rate if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        Unit::Rate => format!("{v:.0}/s"),
        Unit::Ms if v.is_infinite() => "never".to_owned(),
        Unit::Ms if v < 10.0 => format!("{v:.2} ms"),
        Unit::Ms if v < 1000.0 => format!("{v:.1} ms"),
        Unit::Ms => format!("{:.2} s", v / 1000.0),
        Unit::Bytes => format!("{v:.0} B"),
        Unit::MiB => format!("{v:.1} MiB"),
        Unit::Count => format!("{v:.0}"),
        Unit::Percent => format!("{v:.1} %"),
    }
}

/// "median (min–max)" over the runs, or the one value.
fn cell(unit: Unit, values: Option<&Vec<f64>>) -> String {
    let Some((low, median, high)) = values.and_then(|v| spread(v)) else {
        return "—".to_owned();
    };
    let [low, median, high] = [low, median, high].map(|v| format_value(unit, v));
    if low == high {
        median
    } else {
        format!("{median} ({low} – {high})")
    }
}

fn scenario_intro(scenario: Scenario, s: &Sizes) -> String {
    let m = |n: u64| {
        if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
            format!("{} M", n / 1_000_000)
        } else if n >= 1000 && n.is_multiple_of(1000) {
            format!("{} k", n / 1000)
        } else {
            n.to_string()
        }
    };
    let conns = s
        .connections
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    match scenario {
        Scenario::Ingest => format!(
            "{} tasks due {}, {} per round trip (a batch request or a pipeline), over {conns} connections, each on a fresh server; tasks/s until the last was acknowledged.",
            m(s.tasks),
            s.due_in_ms.map_or_else(
                || "over 30 days".to_owned(),
                |d| format!("{} s after each is sent", d / 1000)
            ),
            s.batch
        ),
        Scenario::Burst => format!(
            "{} pending, then {} more due evenly over {} s; {} consumers (one subscriber for keyspace events, where every subscriber gets every event). Lateness is from the due time to the consumer holding the payload.",
            m(s.tasks),
            m(s.burst),
            s.burst_over_ms as f64 / 1000.0,
            s.consumers
        ),
        Scenario::Drain => format!(
            "{} tasks all due at once on a fresh server, taken by {} consumers (up to {} per reserve or claim; beanstalkd reserves one at a time; keyspace: one subscriber).",
            m(s.drain),
            s.consumers,
            s.reserve_max
        ),
        Scenario::Memory => "RAM per pending task: RSS above the empty server's for Punctual and beanstalkd, `used_memory` above the empty server's for Redis.".to_owned(),
        Scenario::Restart => format!(
            "`kill -9` with {} pending and 10 already due, then the same command line again; times are from the kill.",
            m(s.tasks)
        ),
        Scenario::Correctness => format!(
            "With {} pending: {} tasks fall due over {} s while no consumer is connected; then {} tasks due over 1 s with two consumers taking them at once.",
            m(s.tasks),
            s.correctness,
            s.disconnect_ms as f64 / 1000.0,
            s.correctness
        ),
        Scenario::Webhook => "Punctual only: webhook tasks delivered to a local target that answers 204 at once, 64 deliveries in flight.".to_owned(),
        Scenario::Schedules => format!(
            "Punctual only: {} recurring schedules every 1 s for {} s, their occurrences taken by {} consumers (reserve up to 1 000, ack in batches), lateness from each occurrence's due time to the reserve answer; then, on a fresh server, {} schedules (1 in 100 every minute, the rest daily at some minute, Europe/Berlin) and the server's RSS and CPU at rest over {} s, measured after as long again to settle.",
            s.schedules,
            s.schedules_for_ms / 1000,
            s.consumers,
            m(s.daily_schedules),
            s.idle_ms / 1000
        ),
        Scenario::Distributed => format!(
            "Punctual only: nodes on Redis (`serve --redis` / `--redis-cluster`), Redis with AOF on and `appendfsync everysec`, started fresh for each row. Per row: ingest of {} due over 30 days ({} per batch, {} connections spread over the nodes); Redis commands per second and node while idle with them pending (counted over {} s); a burst of {} due over {} s on top, and a drain of {} all due at once, each taken by {} consumers spread over the nodes. Every node and Redis process shares the machine with the load generator.",
            m(s.tasks),
            s.batch,
            s.fill_connections(),
            s.idle_ms as f64 / 1000.0,
            m(s.burst),
            s.burst_over_ms as f64 / 1000.0,
            m(s.drain),
            s.consumers
        ),
    }
}

fn scenario_title(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Ingest => "Ingest",
        Scenario::Burst => "Lateness under a burst",
        Scenario::Drain => "Drain",
        Scenario::Memory => "Memory",
        Scenario::Restart => "Restart after kill -9",
        Scenario::Correctness => "Correctness",
        Scenario::Webhook => "Webhooks",
        Scenario::Schedules => "Recurring schedules",
        Scenario::Distributed => "Distributed mode (Redis)",
    }
}

fn durability(system: System) -> &'static str {
    match system {
        System::Punctual | System::PunctualResp => "yes: fsync before the answer",
        System::Zset | System::Keyspace => "no: in RAM only (persistence off)",
        System::Beanstalkd => "written to the binlog, not fsynced (`-b`, default policy)",
    }
}

fn version_of(program: &str, arg: &str) -> Option<String> {
    let out = std::process::Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1048576.0);
    format!(
        "{} cores ({cpu}), {mem_gib:.0} GiB RAM, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/kernel/osrelease").trim()
    )
}

pub fn render(
    s: &Sizes,
    res: &Results,
    systems: &[System],
    command: &str,
    plots: Option<&Plots>,
    wrote: (bool, bool),
) -> String {
    let mut md = String::new();
    let now = res.finished_ms;
    let _ = writeln!(md, "## Side by side (generated by `punctual-bench`)\n");
    let _ = writeln!(md, "- **Command:** `{command}`");
    let _ = writeln!(
        md,
        "- **When:** {} (took {:.0} s); {} run{} per figure: each cell is the median, with the range when runs differ.",
        punctual_core::time::format_rfc3339_ms(now),
        res.elapsed.as_secs_f64(),
        res.runs,
        if res.runs == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        md,
        "- **Machine:** {}; every server and the load generator share it.",
        res.setting.machine
    );
    let _ = writeln!(md, "- **Versions:** {}.", res.setting.versions);
    let described: Vec<&str> = systems
        .iter()
        .map(|system| match system {
            System::Punctual => "Punctual on its embedded store with default settings",
            System::Zset => "Redis sorted-set polling (`ZADD` + a hash of payloads, an atomic Lua claim, 10 ms sleep when idle; persistence off)",
            System::Keyspace => "Redis keyspace notifications (`notify-keyspace-events Ex`, `SET … PX`, the payload in a second key, a subscriber on `__keyevent@0__:expired`; persistence off)",
            System::Beanstalkd => "beanstalkd with `-b` (`put` with a delay in whole seconds, `reserve` + `delete`)",
            System::PunctualResp => "Punctual over its Redis protocol, driven by the keyspace-notification program (`PSETEX task:<n>:<due> <ttl> <payload>` pipelined, subscribers on `__keyevent@0__:expired` sharing the events as one group and taking the task from the key name)",
        })
        .collect();
    let _ = writeln!(md, "- **Systems:** {}.\n", described.join("; "));

    let header = format!(
        "| | {} |\n|---|{}\n",
        systems
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(systems.len())
    );
    let mut scenarios: Vec<Scenario> = res.rows.iter().map(|r| r.scenario).collect();
    scenarios.sort();
    scenarios.dedup();
    for scenario in scenarios {
        let _ = writeln!(
            md,
            "### {}\n\n{}\n",
            scenario_title(scenario),
            scenario_intro(scenario, s)
        );
        if scenario == Scenario::Distributed {
            md.push_str(&distributed_table(res));
            continue;
        }
        if matches!(scenario, Scenario::Webhook | Scenario::Schedules) {
            let _ = writeln!(md, "| | Punctual |\n|---|---|");
            for row in res.rows.iter().filter(|r| r.scenario == scenario) {
                let _ = writeln!(
                    md,
                    "| {} | {} |",
                    row.label,
                    cell(row.unit, row.values.get(&System::Punctual))
                );
            }
            md.push('\n');
            continue;
        }
        md.push_str(&header);
        for row in res.rows.iter().filter(|r| r.scenario == scenario) {
            let cells: Vec<String> = systems
                .iter()
                .map(|sys| cell(row.unit, row.values.get(sys)))
                .collect();
            let _ = writeln!(md, "| {} | {} |", row.label, cells.join(" | "));
        }
        if scenario == Scenario::Ingest {
            let cells: Vec<&str> = systems.iter().map(|&sys| durability(sys)).collect();
            let _ = writeln!(md, "| acknowledged task on disk? | {} |", cells.join(" | "));
        }
        if scenario == Scenario::Burst
            && wrote.0
            && let Some(plots) = plots
        {
            let _ = writeln!(
                md,
                "\n![Share of the burst delivered within a given lateness, per system]({})\n\nThe plot: the share of the burst's tasks delivered within a given lateness (log scale); a curve that stops short of 100 % is tasks that never came.",
                plots.lateness
            );
        }
        if scenario == Scenario::Drain
            && wrote.1
            && let Some(plots) = plots
        {
            let _ = writeln!(
                md,
                "\n![Ingest and drain, tasks per second, per system]({})",
                plots.throughput
            );
        }
        md.push('\n');
    }
    let targets = targets(res);
    if !targets.is_empty() {
        let _ = writeln!(md, "### Against the targets (issues 4 and 14)\n");
        for line in targets {
            let _ = writeln!(md, "- {line}");
        }
    }
    if !res.notes.is_empty() {
        let _ = writeln!(md, "\n### Notes from this run\n");
        for note in &res.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md
}

/// One row per backend and node count, one column per figure.
fn distributed_table(res: &Results) -> String {
    use super::distributed::Backend;
    let columns = [
        ("ingest", "ingest", Unit::Rate),
        ("idle", "idle Redis cmd/s per node", Unit::Rate),
        ("p50", "burst p50", Unit::Ms),
        ("p99", "burst p99", Unit::Ms),
        ("max", "burst max", Unit::Ms),
        ("missed", "burst missed", Unit::Count),
        ("drain", "drain", Unit::Rate),
        ("drain_missing", "drain missing", Unit::Count),
        ("twice", "delivered twice", Unit::Count),
    ];
    let mut md = format!(
        "| | {} |\n|---|{}\n",
        columns.map(|c| c.1).join(" | "),
        "---|".repeat(columns.len())
    );
    for backend in [Backend::Standalone, Backend::Cluster] {
        for nodes in 1..=16 {
            let cells: Vec<String> = columns
                .iter()
                .map(|(metric, _, unit)| {
                    let key = format!("dist_{}_{nodes}_{metric}", backend.key());
                    let values = res
                        .rows
                        .iter()
                        .find(|r| r.key == key)
                        .and_then(|r| r.values.get(&System::Punctual));
                    cell(*unit, values)
                })
                .collect();
            if cells.iter().all(|c| c == "—") {
                continue;
            }
            let _ = writeln!(
                md,
                "| {}, {nodes} node{} | {} |",
                backend.label(),
                if nodes == 1 { "" } else { "s" },
                cells.join(" | ")
            );
        }
    }
    md.push('\n');
    md
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// One line per target of issue 4 that this run measured.
fn targets(res: &Results) -> Vec<String> {
    use System::*;
    let get = |key: &str, sys| res.median(key, sys);
    let ms = |v: f64| format_value(Unit::Ms, v);
    let rate = |v: f64| format_value(Unit::Rate, v);
    let mut lines = Vec::new();
    if let (Some(p99), Some(max), Some(missed)) = (
        get("burst_p99", Punctual),
        get("burst_max", Punctual),
        get("burst_missed", Punctual),
    ) {
        lines.push(format!(
            "Lateness p99 ≤ 2 ms: {} ({}). Max ≤ 20 ms: {} ({}). 0 missed: {} ({missed:.0}). Sorted set p99 {}, beanstalkd p99 {}, keyspace events missed {}.",
            verdict(p99 <= 2.0),
            ms(p99),
            verdict(max <= 20.0),
            ms(max),
            verdict(missed == 0.0),
            get("burst_p99", Zset).map_or("—".into(), ms),
            get("burst_p99", Beanstalkd).map_or("—".into(), ms),
            get("burst_missed", Keyspace).map_or("—".into(), |v| format!("{v:.0}")),
        ));
    }
    let ingest_key = res
        .rows
        .iter()
        .filter(|r| r.scenario == Scenario::Ingest)
        .map(|r| r.key.clone())
        .next_back();
    if let Some(key) = ingest_key
        && let Some(ours) = get(&key, Punctual)
    {
        // Punctual against a peer, as a multiple of the peer's rate.
        let against = |peer: System, name: &str, times: f64| {
            get(&key, peer).map(|theirs| {
                format!(
                    "≥ {times}× {name} ({}): {} ({:.2}×)",
                    rate(theirs),
                    verdict(ours >= times * theirs),
                    ours / theirs
                )
            })
        };
        let parts: Vec<String> = [
            against(Zset, "the sorted set", 2.0),
            against(Beanstalkd, "beanstalkd", 3.0),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !parts.is_empty() {
            let connections = key.trim_start_matches("ingest_");
            lines.push(format!(
                "Durable ingest with {connections} connection(s), {}: {}.",
                rate(ours),
                parts.join("; ")
            ));
        }
    }
    if let (Some(ours), Some(zset)) = (get("drain_rate", Punctual), get("drain_rate", Zset)) {
        lines.push(format!(
            "Drain ≥ the sorted set: {} ({} vs {}, {:.2}×).",
            verdict(ours >= zset),
            rate(ours),
            rate(zset),
            ours / zset
        ));
    }
    let ours = get("memory_per_task_big", Punctual).or(get("memory_per_task", Punctual));
    if let (Some(ours), Some(redis)) = (ours, get("memory_per_task", Zset)) {
        lines.push(format!(
            "RAM per pending task ≤ 1/10 of Redis's: {} ({ours:.0} B vs {redis:.0} B for the sorted set{}).",
            verdict(ours * 10.0 <= redis),
            if get("memory_per_task_big", Punctual).is_some() { ", Punctual at the larger size" } else { "" }
        ));
    }
    if let Some(first) = get("restart_first", Punctual) {
        lines.push(format!(
            "First delivery after kill -9 ≤ 1 s: {} ({}).",
            verdict(first <= 1000.0),
            ms(first)
        ));
    }
    let faults: Vec<(String, f64)> = [
        "burst_missed",
        "burst_twice",
        "drain_missing",
        "drain_twice",
        "lost_away",
        "twice",
        "lost_twice",
    ]
    .iter()
    .filter_map(|key| {
        Some((
            key.to_string(),
            res.rows
                .iter()
                .find(|r| r.key == *key)?
                .values
                .get(&Punctual)?
                .iter()
                .sum::<f64>(),
        ))
    })
    .collect();
    if !faults.is_empty() {
        let total: f64 = faults.iter().map(|(_, v)| v).sum();
        lines.push(format!(
            "0 lost, 0 duplicates (every run of burst, drain and correctness): {} ({total:.0}).",
            verdict(total == 0.0)
        ));
    }
    lines.extend(resp_targets(res));
    lines
}

/// Issue 14's targets: RESP ingest ≥ HTTP batch ingest; expiry-event lateness p99 ≤ 2 ms, 0 lost.
fn resp_targets(res: &Results) -> Vec<String> {
    use System::*;
    let get = |key: &str, sys| res.median(key, sys);
    let mut lines = Vec::new();
    let ingest_keys: Vec<String> = res
        .rows
        .iter()
        .filter(|r| r.scenario == Scenario::Ingest && r.key.starts_with("ingest_"))
        .map(|r| r.key.clone())
        .collect();
    for key in ingest_keys {
        if let (Some(resp), Some(http)) = (get(&key, PunctualResp), get(&key, Punctual)) {
            lines.push(format!(
                "RESP ingest ≥ HTTP batch ingest, {} connection(s): {} ({} vs {}, {:.2}×).",
                key.trim_start_matches("ingest_"),
                verdict(resp >= http),
                format_value(Unit::Rate, resp),
                format_value(Unit::Rate, http),
                resp / http
            ));
        }
    }
    if let (Some(p99), Some(missed)) = (
        get("burst_p99", PunctualResp),
        get("burst_missed", PunctualResp),
    ) {
        let lost: f64 = ["lost_away", "drain_missing"]
            .iter()
            .filter_map(|key| get(key, PunctualResp))
            .fold(0.0, |a, b| a + b);
        lines.push(format!(
            "Expired-event lateness p99 ≤ 2 ms over RESP: {} ({}), with 0 lost: {} ({:.0} missed in the burst, {lost:.0} lost elsewhere); Redis keyspace events missed {}.",
            verdict(p99 <= 2.0),
            format_value(Unit::Ms, p99),
            verdict(missed + lost == 0.0),
            missed,
            get("burst_missed", Keyspace).map_or("—".into(), |v| format!("{v:.0}")),
        ));
    }
    lines
}

const BEGIN: &str = "<!-- generated by `punctual-bench --report`: everything down to the end marker is rewritten by the next run -->";
/// The marker of reports written while the bench was `punctual bench`, a subcommand of the server's
/// binary: found and replaced like [`BEGIN`].
const OLD_BEGIN: &str = "<!-- generated by `punctual bench --report`: everything down to the end marker is rewritten by the next run -->";
const END: &str = "<!-- end of the generated section -->";

/// Writes the generated section into `path`, keeping what is written around it by hand.
pub fn write(path: &Path, generated: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path)
        .unwrap_or_default()
        .replacen(OLD_BEGIN, BEGIN, 1);
    let section = format!("{BEGIN}\n{generated}{END}");
    let out = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{section}{}",
            &existing[..begin],
            &existing[end + END.len()..]
        ),
        _ if existing.trim().is_empty() => format!("# Benchmarks\n\n{section}\n"),
        _ => format!("{}\n{section}\n", existing.trim_end()),
    };
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_is_the_median_with_the_range() {
        assert_eq!(
            cell(Unit::Ms, Some(&vec![3.0, 1.0, 2.0])),
            "2.00 ms (1.00 ms – 3.00 ms)"
        );
        assert_eq!(cell(Unit::Count, Some(&vec![0.0, 0.0])), "0");
        assert_eq!(cell(Unit::Ms, Some(&vec![f64::INFINITY])), "never");
        assert_eq!(cell(Unit::Rate, None), "—");
        assert_eq!(format_value(Unit::Rate, 22_400.0), "22.4 k/s");
    }

    #[test]
    fn rewriting_keeps_the_text_around_the_generated_section() {
        let dir = std::env::temp_dir().join(format!("punctual-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.md");
        let _ = std::fs::remove_file(&path);
        write(&path, "first\n").unwrap();
        let fresh = std::fs::read_to_string(&path).unwrap();
        assert!(fresh.starts_with("# Benchmarks\n") && fresh.contains("first\n"));
        let edited = fresh.replace("# Benchmarks\n", "# Benchmarks\n\nby hand, before\n")
            + "by hand, after\n";
        std::fs::write(&path, edited).unwrap();
        write(&path, "second\n").unwrap();
        let again = std::fs::read_to_string(&path).unwrap();
        assert!(again.contains("by hand, before") && again.contains("by hand, after"));
        assert!(again.contains("second\n") && !again.contains("first\n"));
        assert_eq!(again.matches(BEGIN).count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn targets_say_met_or_missed_from_the_medians() {
        let mut res = Results::new(1);
        res.add(
            Scenario::Drain,
            "drain_rate",
            "d",
            Unit::Rate,
            System::Punctual,
            10.0,
        );
        res.add(
            Scenario::Drain,
            "drain_rate",
            "d",
            Unit::Rate,
            System::Zset,
            20.0,
        );
        res.add(
            Scenario::Restart,
            "restart_first",
            "r",
            Unit::Ms,
            System::Punctual,
            19.0,
        );
        let lines = targets(&res);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("Drain ≥ the sorted set: **missed**"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("First delivery after kill -9 ≤ 1 s: met"))
        );
    }
}
