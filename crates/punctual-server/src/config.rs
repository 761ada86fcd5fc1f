//! Server settings that are not limits on client input.

use punctual_core::Limits;

use crate::webhook::WebhookConfig;

/// How the server behaves; `ServerConfig::default()` holds the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Lease length when neither the reserve request nor the task names one.
    pub default_lease_ms: u64,
    /// Attempts when a task does not say.
    pub default_max_attempts: u32,
    /// How long a succeeded task stays readable before it is purged.
    pub retention_ms: u64,
    /// How far ahead the timer window looks.
    pub window_span_ms: u64,
    /// Most distinct due times the timer window holds in memory.
    pub window_capacity: usize,
    /// Most due-index entries one timer tick processes before it yields to other writes.
    pub tick_limit: usize,
    /// Most commands one group commit gathers.
    pub max_commit_commands: usize,
    /// Bearer tokens accepted on `/v1` routes; empty means no authorization.
    pub auth_tokens: Vec<String>,
    /// Whether `/metrics` also needs a token (when tokens are configured).
    pub protect_metrics: bool,
    /// Serve the web dashboard at `/ui` (docs/dashboard.md).
    pub ui: bool,
    /// The store, as the dashboard names it (`journal`, `redb`, `redis`, `redis-cluster`, `memory`).
    pub store_kind: String,
    /// The embedded store's directory, for the dashboard's disk figures.
    pub data_dir: Option<std::path::PathBuf>,
    pub webhook: WebhookConfig,
    /// On a store shared with other nodes: how often the timer re-reads what is due soon, in case it
    /// missed another node's notice. (It also re-reads when the store asks, see `Notice::resync`.)
    pub resync_ms: u64,
    /// Connection cap and timeouts of the HTTP listener.
    pub conn: crate::listen::ConnLimits,
    /// Most memory that request bodies being read may take at once; past it, `503 server_busy`.
    pub max_body_memory_bytes: usize,
    /// A metric series not updated for this long leaves `/metrics` (the first server in a process
    /// decides, since the recorder is process-wide).
    pub metric_idle_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            default_lease_ms: 30_000,
            default_max_attempts: 5,
            retention_ms: 24 * 3600 * 1000,
            window_span_ms: 60_000,
            window_capacity: 100_000,
            tick_limit: 2_000,
            max_commit_commands: 10_000,
            auth_tokens: Vec::new(),
            protect_metrics: false,
            ui: true,
            store_kind: "memory".into(),
            data_dir: None,
            webhook: WebhookConfig::default(),
            resync_ms: 5_000,
            conn: crate::listen::ConnLimits::default(),
            max_body_memory_bytes: 256 << 20,
            metric_idle_ms: crate::metrics::METRIC_IDLE_MS,
        }
    }
}
