//! Prometheus metrics: names in one place, one process-wide recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SCHEDULED: &str = "punctual_tasks_scheduled_total";
pub const DELIVERED: &str = "punctual_tasks_delivered_total";
pub const ACKED: &str = "punctual_tasks_acked_total";
pub const NACKED: &str = "punctual_tasks_nacked_total";
pub const EXPIRED: &str = "punctual_leases_expired_total";
pub const DEAD: &str = "punctual_tasks_dead_total";
pub const CANCELLED: &str = "punctual_tasks_cancelled_total";
pub const LATENESS: &str = "punctual_delivery_lateness_seconds";
pub const COMMIT_SECONDS: &str = "punctual_store_commit_duration_seconds";
pub const COMMIT_COMMANDS: &str = "punctual_store_commit_commands";
pub const TASKS: &str = "punctual_tasks";
pub const WEBHOOK_SECONDS: &str = "punctual_webhook_duration_seconds";
pub const WEBHOOK_DELIVERIES: &str = "punctual_webhook_deliveries_total";
pub const ORPHANED_LEASES: &str = "punctual_leases_orphaned_total";

/// By default, a metric series not updated for this long is dropped from `/metrics`.
pub const METRIC_IDLE_MS: u64 = 3_600_000;

/// Installs the process-wide recorder, forgetting series idle for `idle_ms`; the first call decides.
pub fn install(idle_ms: u64) -> PrometheusHandle {
    HANDLE.get_or_init(|| build(idle_ms)).clone()
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The recorder is global to the process (the `metrics` macros need that); every server in the process
/// shares it, which only matters for tests that start several.
pub fn handle() -> PrometheusHandle {
    install(METRIC_IDLE_MS)
}

fn build(idle_ms: u64) -> PrometheusHandle {
    let seconds = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
    let commands = [
        1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0,
    ];
    // A queue's series go once nothing has touched them for `idle_ms`, so short-lived queue names do
    // not pile up labels forever (a counter that comes back starts at 0 again, which Prometheus reads
    // as a reset).
    let builder = PrometheusBuilder::new()
        .idle_timeout(
            metrics_util::MetricKindMask::ALL,
            Some(std::time::Duration::from_millis(idle_ms)),
        )
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_COMMANDS.into()), &commands));
    match builder.map(|b| b.install_recorder()) {
        Ok(Ok(handle)) => {
            describe();
            handle
        }
        // Another recorder is installed (embedding); render this one's (empty) view.
        _ => PrometheusBuilder::new().build_recorder().handle(),
    }
}

/// The `# HELP` line of every metric (descriptions go to the installed recorder).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SCHEDULED, "Tasks created, by queue.");
    describe_counter!(
        DELIVERED,
        "Tasks handed to a consumer (reserve or webhook), by queue."
    );
    describe_counter!(ACKED, "Tasks acknowledged as done, by queue.");
    describe_counter!(
        ORPHANED_LEASES,
        "Tasks leased to a long-poll whose client had gone before the answer was ready, given back at once."
    );
    describe_counter!(
        NACKED,
        "Failed attempts reported by a nack or a failed webhook, by queue."
    );
    describe_counter!(
        EXPIRED,
        "Leases that ended without an ack or nack (each a failed attempt)."
    );
    describe_counter!(
        DEAD,
        "Tasks that used up their attempts and became dead, by queue."
    );
    describe_counter!(CANCELLED, "Tasks cancelled by id, by queue.");
    describe_counter!(
        crate::schedules::OCCURRENCES,
        "Occurrences of recurring schedules, by queue, schedule and outcome (created, skipped, \
         triggered)."
    );
    describe_histogram!(
        LATENESS,
        metrics::Unit::Seconds,
        "How long after its due time a task was handed out, by queue."
    );
    describe_histogram!(
        COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one store commit (group commit), fsync included."
    );
    describe_histogram!(COMMIT_COMMANDS, "Commands applied in one store commit.");
    describe_gauge!(
        TASKS,
        "Tasks stored, by queue and state (set at each scrape)."
    );
    describe_histogram!(
        WEBHOOK_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one webhook request."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook requests by outcome: 2xx, 3xx, 4xx, 5xx, timeout, error."
    );
}
