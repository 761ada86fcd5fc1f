//! Punctual only: recurring schedules. The lateness of occurrences of many schedules every second,
//! taken by pull consumers, and what many mostly-daily schedules cost a server at rest.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::progress::Bar;
use super::punctual::Punctual;
use super::report::{Results, Unit};
use super::subject::{Subject as _, lateness_histogram, now_us, rss_bytes};
use super::{Ctx, Scenario, System};

const QUEUE: &str = "sched";

/// PUTs `count` schedules named `s<i>` with the body `body(i)`, 32 requests in flight.
async fn create(
    server: &Punctual,
    http: &reqwest::Client,
    count: u64,
    label: &str,
    body: impl Fn(u64) -> Value,
) -> Result<()> {
    let bar = Bar::new(label, count);
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut puts = Vec::with_capacity(count as usize);
    for i in 0..count {
        let permit = limit.clone().acquire_owned().await?;
        let request = http
            .put(format!("{}/v1/queues/{QUEUE}/schedules/s{i}", server.url))
            .json(&body(i))
            .send();
        let bar = bar.clone();
        puts.push(tokio::spawn(async move {
            let response = request.await;
            drop(permit);
            bar.add(1);
            match response {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => bail!("PUT schedule: {}", r.status()),
                Err(e) => Err(e.into()),
            }
        }));
    }
    for put in puts {
        put.await??;
    }
    bar.finish();
    Ok(())
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let http = ctx.http.clone();

    // Lateness: `schedules` schedules every second for `schedules_for_ms`.
    let server = Punctual::start_with(ctx, &[]).await?;
    let outcome = async {
        // With --schedules-spread, the schedules start at evenly spaced instants of one second,
        // so their occurrences are spread over each second instead of falling due together.
        let base_ms = super::subject::now_ms() + 2_000;
        let spread = s.schedules_spread;
        let count = s.schedules;
        create(
            &server,
            &http,
            s.schedules,
            "Punctual: create schedules every 1 s",
            move |i| {
                if spread {
                    let at = base_ms + i * 1000 / count;
                    json!({"every_ms": 1000, "start_at": punctual_core::time::format_rfc3339_ms(at)})
                } else {
                    json!({"every_ms": 1000})
                }
            },
        )
        .await?;
        let lateness = Arc::new(Mutex::new(lateness_histogram()));
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        let duplicates = Arc::new(Mutex::new(0u64));
        let deadline = Instant::now() + Duration::from_millis(s.schedules_for_ms);
        let bar = Bar::new(
            "Punctual: occurrences taken",
            s.schedules * s.schedules_for_ms / 1000,
        );
        let mut workers = Vec::new();
        for _ in 0..s.consumers {
            let (http, url) = (http.clone(), server.url.clone());
            let (lateness, seen, duplicates, bar) = (
                lateness.clone(),
                seen.clone(),
                duplicates.clone(),
                bar.clone(),
            );
            workers.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let Ok(response) = http
                        .post(format!("{url}/v1/queues/{QUEUE}/reserve"))
                        .json(&json!({"max": 1000, "wait_ms": 1000}))
                        .send()
                        .await
                    else {
                        continue;
                    };
                    let at_us = now_us();
                    let Ok(body) = response.json::<Value>().await else {
                        continue;
                    };
                    let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
                    let mut acks = Vec::with_capacity(tasks.len());
                    for task in &tasks {
                        let run_at_ms = task["run_at_ms"].as_u64().unwrap_or(0);
                        let late_us = at_us.saturating_sub(run_at_ms * 1000).max(1);
                        let _ = lateness
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(late_us);
                        let id = task["id"].as_str().unwrap_or("").to_owned();
                        if !seen
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.clone())
                        {
                            *duplicates.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        }
                        acks.push(json!({"id": id, "lease_token": task["lease_token"]}));
                    }
                    bar.add(tasks.len() as u64);
                    if !acks.is_empty() {
                        // Acked beside the next reserve, as the other scenarios' consumers do: an
                        // ack waits for an fsync, and a reserve waiting behind it would add that
                        // to the lateness of what fires meanwhile.
                        let (http, url) = (http.clone(), url.clone());
                        tokio::spawn(async move {
                            let _ = http
                                .post(format!("{url}/v1/queues/{QUEUE}/ack"))
                                .json(&json!({ "tasks": acks }))
                                .send()
                                .await;
                        });
                    }
                }
            }));
        }
        for worker in workers {
            worker.await?;
        }
        bar.finish();
        let hist = lateness.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let label = format!(
            "{} schedules every 1 s for {} s{}",
            s.schedules,
            s.schedules_for_ms / 1000,
            if spread { ", spread over the second" } else { "" }
        );
        for (key, what, q) in [
            (
                "schedule_p50",
                "occurrence lateness p50, due time to reserve answer",
                0.5,
            ),
            ("schedule_p99", "occurrence lateness p99", 0.99),
            ("schedule_max", "occurrence lateness max", 1.0),
        ] {
            res.add(
                Scenario::Schedules,
                key,
                format!("{what} ({label})"),
                Unit::Ms,
                System::Punctual,
                hist.value_at_quantile(q) as f64 / 1000.0,
            );
        }
        res.add(
            Scenario::Schedules,
            "schedule_taken",
            format!("occurrences taken ({label}; about one per schedule and second expected)"),
            Unit::Count,
            System::Punctual,
            hist.len() as f64,
        );
        res.add(
            Scenario::Schedules,
            "schedule_duplicates",
            "occurrences taken twice",
            Unit::Count,
            System::Punctual,
            *duplicates.lock().unwrap_or_else(|p| p.into_inner()) as f64,
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    server.stop().await;
    outcome?;

    // Cost at rest: `daily_schedules` schedules, all but one in a hundred daily at some minute.
    let server = Punctual::start_with(ctx, &[]).await?;
    let outcome = async {
        let pid = server.pid();
        let empty_rss = rss_bytes(pid);
        let creating = Instant::now();
        create(
            &server,
            &http,
            s.daily_schedules,
            "Punctual: create mostly daily schedules",
            |i| {
                if i % 100 == 0 {
                    json!({"every_ms": 60_000})
                } else {
                    json!({"cron": format!("{} {} * * *", i % 60, (i / 60) % 24), "timezone": "Europe/Berlin"})
                }
            },
        )
        .await?;
        let create_rate = s.daily_schedules as f64 / creating.elapsed().as_secs_f64();
        // Let what creating them started (the journal's checkpoint) settle, then measure a quiet
        // stretch.
        tokio::time::sleep(Duration::from_millis(s.idle_ms)).await;
        let cpu_before = cpu_seconds(pid).context("reading /proc/PID/stat")?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(s.idle_ms)).await;
        let cpu = cpu_seconds(pid).context("reading /proc/PID/stat")? - cpu_before;
        let rss = rss_bytes(pid);
        let label = format!("{} schedules, 99 % daily", s.daily_schedules);
        res.add(
            Scenario::Schedules,
            "schedule_create_rate",
            "schedules created per second (one PUT each, 32 in flight)",
            Unit::Rate,
            System::Punctual,
            create_rate,
        );
        res.add(
            Scenario::Schedules,
            "schedule_rss",
            format!("RSS with {label} (above the empty server's)"),
            Unit::MiB,
            System::Punctual,
            rss.saturating_sub(empty_rss) as f64 / (1024.0 * 1024.0),
        );
        res.add(
            Scenario::Schedules,
            "schedule_cpu",
            format!(
                "CPU at rest with {label}, % of one core over {} s",
                s.idle_ms / 1000
            ),
            Unit::Percent,
            System::Punctual,
            100.0 * cpu / started.elapsed().as_secs_f64(),
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    server.stop().await;
    outcome
}
