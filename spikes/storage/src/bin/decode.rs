//! Spike 4: what decoding an HTTP batch costs per task, as the API does it today: the body into
//! `{"tasks": [raw, …]}`, then each item into the schedule request with its payload kept raw.
//! Prints ns per task for 100 000 batches-worth of tasks. `decode [TASKS_PER_BATCH]`.
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Batch {
    tasks: Vec<Box<RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Schedule {
    id: Option<String>,
    payload: Option<Box<RawValue>>,
    delay_ms: Option<u64>,
    run_at: Option<String>,
    max_attempts: Option<u32>,
    backoff_ms: Option<Vec<u64>>,
}

fn main() {
    let per: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let items: Vec<String> = (0..per)
        .map(|i| format!(r#"{{"id":"order-{i:08}","payload":{{"order":{i},"user":"u{i}","kind":"cancel-unpaid"}},"delay_ms":2592000000}}"#))
        .collect();
    let body = format!(r#"{{"tasks":[{}]}}"#, items.join(","));
    let rounds = (1_000_000 / per).max(1);
    let started = Instant::now();
    let mut n = 0usize;
    for _ in 0..rounds {
        let batch: Batch = serde_json::from_str(&body).unwrap();
        for raw in &batch.tasks {
            let item: Schedule = serde_json::from_str(raw.get()).unwrap();
            n += item.id.map_or(0, |s| s.len()) + item.payload.map_or(0, |p| p.get().len());
        }
    }
    let total = rounds * per;
    let ns = started.elapsed().as_nanos() as f64 / total as f64;
    println!("{per} tasks per batch ({} B body): {ns:.0} ns per task decoded ({n} bytes seen)", body.len());
}
