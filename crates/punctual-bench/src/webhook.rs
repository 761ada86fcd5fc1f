//! Punctual only: webhook throughput (tasks all due at once) and lateness (a burst) against a fast
//! local target.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use super::progress::Bar;
use super::punctual::Punctual;
use super::report::{Results, Unit};
use super::subject::{Subject, lateness_histogram, now_ms, now_us};
use super::{Ctx, Scenario, System};

/// A local target that answers 204 at once and records the lateness of each request from the
/// `due_ms` in its payload (µs).
async fn target() -> Result<(String, Arc<Mutex<Vec<u64>>>)> {
    let arrivals: Arc<Mutex<Vec<u64>>> = Arc::default();
    let recorded = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let at_us = now_us();
                let due_ms = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["due_ms"].as_u64())
                    .unwrap_or(0);
                recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(at_us.saturating_sub(due_ms * 1000).max(1));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, arrivals))
}

fn count(arrivals: &Mutex<Vec<u64>>) -> u64 {
    arrivals.lock().map_or(0, |a| a.len()) as u64
}

/// Webhook task bodies for tasks `first..first+count` due at `due(i)`.
fn bodies(
    first: u64,
    count: u64,
    batch: usize,
    url: &str,
    due: impl Fn(u64) -> u64,
) -> Vec<(usize, Vec<u8>)> {
    let ids: Vec<u64> = (first..first + count).collect();
    ids.chunks(batch)
        .map(|chunk| {
            let items: Vec<String> = chunk
                .iter()
                .map(|&n| {
                    let at = due(n - first);
                    format!(
                        "{{\"id\":\"w{n}\",\"run_at\":\"{}\",\"webhook\":{{\"url\":\"{url}\"}},\"payload\":{{\"due_ms\":{at}}}}}",
                        punctual_core::time::format_rfc3339_ms(at)
                    )
                })
                .collect();
            (chunk.len(), format!("{{\"tasks\":[{}]}}", items.join(",")).into_bytes())
        })
        .collect()
}

pub async fn run(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let s = &ctx.sizes;
    let in_flight = [
        "--webhook-concurrency",
        "64",
        "--webhook-per-host",
        "64",
        // The target runs on this machine.
        "--webhook-allow-private",
    ]
    .map(String::from);
    let server = Punctual::start_with(ctx, &in_flight).await?;
    let outcome = async {
        let (url, arrivals) = target().await?;
        // Throughput: `burst` tasks all due at once, scheduling included.
        let now = now_ms();
        let due_now = bodies(0, s.burst, s.batch, &url, |_| now);
        let started = Instant::now();
        let bar = Bar::new("Punctual: webhooks all due", s.burst);
        let scheduling = Bar::new("Punctual: schedule webhooks all due", s.burst);
        server
            .post_batches(due_now, s.fill_connections(), &scheduling)
            .await?;
        scheduling.finish();
        let mut shown = 0;
        while shown < s.burst && started.elapsed() < Duration::from_secs(300) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let arrived = count(&arrivals);
            bar.add(arrived - shown);
            shown = arrived;
        }
        bar.finish();
        let secs = started.elapsed().as_secs_f64();
        res.add(
            Scenario::Webhook,
            "webhook_rate",
            format!(
                "deliveries/s, {} due at once (scheduling included)",
                s.burst
            ),
            Unit::Rate,
            System::Punctual,
            count(&arrivals) as f64 / secs,
        );

        // Lateness: a burst due over `burst_over`.
        arrivals.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let start = now_ms() + s.lead_ms();
        let burst = bodies(s.burst, s.burst, s.batch, &url, |i| {
            start + i * s.burst_over_ms / s.burst
        });
        let scheduling = Bar::new("Punctual: schedule a webhook burst", s.burst);
        server
            .post_batches(burst, s.fill_connections(), &scheduling)
            .await?;
        scheduling.finish();
        let deadline = Instant::now()
            + Duration::from_millis(
                (start + s.burst_over_ms + s.give_up_ms).saturating_sub(now_ms()),
            );
        while count(&arrivals) < s.burst && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut hist = lateness_histogram();
        for lateness in arrivals.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hist.record(*lateness)?;
        }
        for (key, label, q) in [
            (
                "webhook_p50",
                "lateness p50, due time to request received",
                0.5,
            ),
            ("webhook_p99", "lateness p99", 0.99),
            ("webhook_max", "lateness max", 1.0),
        ] {
            res.add(
                Scenario::Webhook,
                key,
                format!(
                    "{label} ({} due over {} s)",
                    s.burst,
                    s.burst_over_ms as f64 / 1000.0
                ),
                Unit::Ms,
                System::Punctual,
                hist.value_at_quantile(q) as f64 / 1000.0,
            );
        }
        res.add(
            Scenario::Webhook,
            "webhook_missing",
            "burst tasks not delivered",
            Unit::Count,
            System::Punctual,
            s.burst.saturating_sub(hist.len()) as f64,
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    server.stop().await;
    outcome
}
