//! `punctual serve` settings: flags over environment variables over the config file over defaults.
//!
//! Every setting is an optional flag (clap reads the flag, then its environment variable), a key of
//! the TOML file given by `--config`, and a built-in default. An unknown key or a value of the wrong
//! type in the file is an error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The flags of `punctual serve`, and also the shape of the config file (every key optional; `config`
/// and `print_config` are flags only). Defaults are applied after the file is read, so they are in
/// the help text rather than in clap.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOpts {
    /// TOML file with any of the settings below (keys as the flags, with '_' for '-').
    #[arg(long, env = "PUNCTUAL_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory of the data file, created if missing [default: ./punctual-data].
    #[arg(long, env = "PUNCTUAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The embedded store: `journal` (the sequential-write store: a journal, time-sliced files and a
    /// compact id table; docs/storage.md) or `redb` (one redb file, the earlier default, kept for one
    /// release) [default: journal].
    #[arg(long, env = "PUNCTUAL_STORE")]
    pub store: Option<String>,
    /// Journal store: refuse new tasks (507) while the data directory's disk has less free space than
    /// this, in MiB, keeping room for acks and recovery; 0 turns the check off [default: 64].
    #[arg(long, env = "PUNCTUAL_MIN_FREE_DISK_MB")]
    pub min_free_disk_mb: Option<u64>,
    /// Journal store: write a checkpoint each time the journal has grown by this many MiB, so a
    /// restart replays at most about this much [default: 16].
    #[arg(long, env = "PUNCTUAL_CHECKPOINT_MB")]
    pub checkpoint_mb: Option<u64>,
    /// Address to serve HTTP on [default: 127.0.0.1:7070].
    #[arg(long, env = "PUNCTUAL_HTTP")]
    pub http: Option<SocketAddr>,
    /// Memory for the store's page cache in MiB; bounds RSS whatever the number of pending tasks [default: 64].
    #[arg(long, env = "PUNCTUAL_CACHE_MB")]
    pub cache_mb: Option<usize>,
    /// Lease length in ms when neither the reserve nor the task names one [default: 30000].
    #[arg(long, env = "PUNCTUAL_DEFAULT_LEASE_MS")]
    pub default_lease_ms: Option<u64>,
    /// Attempts when a task does not say [default: 5].
    #[arg(long, env = "PUNCTUAL_DEFAULT_MAX_ATTEMPTS")]
    pub default_max_attempts: Option<u32>,
    /// How long succeeded tasks stay readable, in ms [default: 86400000, 24 h].
    #[arg(long, env = "PUNCTUAL_RETENTION_MS")]
    pub retention_ms: Option<u64>,
    /// Largest payload in bytes, as the JSON text sent [default: 1048576].
    #[arg(long, env = "PUNCTUAL_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most tasks in one batch request [default: 1000].
    #[arg(long, env = "PUNCTUAL_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Longest long-poll a reserve may ask for (`wait_ms`), in ms [default: 60000].
    #[arg(long, env = "PUNCTUAL_MAX_WAIT_MS")]
    pub max_wait_ms: Option<u64>,
    /// Require `Authorization: Bearer <token>` on /v1 routes; repeat for several tokens (the env var
    /// takes a comma-separated list). /healthz stays open [default: none, no authorization].
    #[arg(
        long = "auth-token",
        env = "PUNCTUAL_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub auth_tokens: Vec<String>,
    /// A file of bearer tokens, one per line (blank lines and lines starting with # are skipped), so
    /// tokens need not appear in argv or the environment; added to --auth-token [default: none].
    #[arg(long, env = "PUNCTUAL_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// The web dashboard at /ui (and / redirecting there): on or off [default: on].
    #[arg(long, env = "PUNCTUAL_UI", value_parser = parse_on_off)]
    pub ui: Option<bool>,
    /// With tokens configured, require one on /metrics too [default: false].
    #[arg(long, env = "PUNCTUAL_PROTECT_METRICS", num_args = 0..=1, default_missing_value = "true")]
    pub protect_metrics: Option<bool>,
    /// Sign webhook requests with HMAC-SHA256 under this secret (header punctual-signature) [default: none].
    #[arg(long, env = "PUNCTUAL_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Webhook deliveries in flight at once, over all targets [default: 64].
    #[arg(long, env = "PUNCTUAL_WEBHOOK_CONCURRENCY")]
    pub webhook_concurrency: Option<usize>,
    /// Webhook deliveries in flight at once to one host:port [default: 16].
    #[arg(long, env = "PUNCTUAL_WEBHOOK_PER_HOST")]
    pub webhook_per_host: Option<usize>,
    /// Let webhooks reach private, loopback, link-local and unique-local addresses (a receiver on the
    /// same host or network) [default: false: such targets are refused].
    #[arg(long, env = "PUNCTUAL_WEBHOOK_ALLOW_PRIVATE", num_args = 0..=1, default_missing_value = "true")]
    pub webhook_allow_private: Option<bool>,
    /// Addresses webhooks may reach although private: CIDRs (10.1.0.0/16, ::1/128) or host names,
    /// comma-separated or repeated [default: none].
    #[arg(
        long = "webhook-allow",
        env = "PUNCTUAL_WEBHOOK_ALLOW",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub webhook_allow: Vec<String>,
    /// Longest wait a webhook target's Retry-After may ask for, in ms [default: 86400000, 1 day].
    #[arg(long, env = "PUNCTUAL_WEBHOOK_RETRY_AFTER_MAX_MS")]
    pub webhook_retry_after_max_ms: Option<u64>,
    /// Most HTTP connections served at once; more are answered 503 and closed [default: 10000].
    #[arg(long, env = "PUNCTUAL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time from a request's first byte to the end of its head, in ms [default: 10000].
    #[arg(long, env = "PUNCTUAL_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Time to receive a request body, in ms; past it, 408 and the connection is closed [default: 30000].
    #[arg(long, env = "PUNCTUAL_BODY_READ_TIMEOUT_MS")]
    pub body_read_timeout_ms: Option<u64>,
    /// How long a connection may wait for its next request, in ms [default: 60000].
    #[arg(long, env = "PUNCTUAL_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Memory for request bodies being read at once, in MiB; past it, 503 server_busy [default: 256].
    #[arg(long, env = "PUNCTUAL_MAX_BODY_MEMORY_MB")]
    pub max_body_memory_mb: Option<usize>,
    /// Run as a stateless node of a distributed deployment on this Redis instead of the embedded store:
    /// redis://[user:password@]host:port/db, or rediss:// for TLS [default: none, embedded store].
    #[arg(
        long,
        env = "PUNCTUAL_REDIS",
        hide_env_values = true,
        conflicts_with = "redis_cluster"
    )]
    pub redis: Option<String>,
    /// Run on a Redis Cluster, given by one or more of its nodes (comma-separated redis:// URLs)
    /// [default: none].
    #[arg(
        long,
        env = "PUNCTUAL_REDIS_CLUSTER",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub redis_cluster: Vec<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis [default: punctual].
    #[arg(long, env = "PUNCTUAL_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Shards (hash slots) per queue, fixed when the keyspace is first used; later nodes adopt it
    /// [default: the stored value, else 1 on a standalone Redis and 12 on a cluster].
    #[arg(long, env = "PUNCTUAL_REDIS_SHARDS")]
    pub redis_shards: Option<u32>,
    /// Answer a schedule, ack, nack, cancel … only once this many replicas have it (Redis WAIT)
    /// [default: 0, don't wait].
    #[arg(long, env = "PUNCTUAL_REDIS_WAIT_REPLICAS")]
    pub redis_wait_replicas: Option<u32>,
    /// How long to wait for those replicas before the request fails, in ms [default: 1000].
    #[arg(long, env = "PUNCTUAL_REDIS_WAIT_TIMEOUT_MS")]
    pub redis_wait_timeout_ms: Option<u64>,
    /// PEM file of the CA(s) to trust for rediss:// instead of the bundled Mozilla roots, e.g. a
    /// private CA [default: none].
    #[arg(long, env = "PUNCTUAL_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate for rediss://, for a Redis with tls-auth-clients on; needs
    /// --redis-tls-key [default: none].
    #[arg(long, env = "PUNCTUAL_REDIS_TLS_CERT", requires = "redis_tls_key")]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM private key of --redis-tls-cert [default: none].
    #[arg(long, env = "PUNCTUAL_REDIS_TLS_KEY", requires = "redis_tls_cert")]
    pub redis_tls_key: Option<PathBuf>,
    /// Also speak the Redis protocol on this address (keyspace-notification code works unchanged;
    /// docs/redis-protocol.md); 127.0.0.1:6380 is the documented choice [default: off].
    #[arg(long, env = "PUNCTUAL_RESP")]
    pub resp: Option<SocketAddr>,
    /// Redis protocol: give every expiry event to every subscriber, as Redis does, instead of to
    /// one subscriber per group [default: false].
    #[arg(long, env = "PUNCTUAL_RESP_BROADCAST", num_args = 0..=1, default_missing_value = "true")]
    pub resp_broadcast: Option<bool>,
    /// Redis protocol: number of databases (SELECT 0..N-1); database N is queue db<N> [default: 16].
    #[arg(long, env = "PUNCTUAL_RESP_DATABASES")]
    pub resp_databases: Option<u32>,
    /// Redis protocol: database N is the queue <prefix><N>, its waiting events <prefix><N>.expired
    /// [default: db].
    #[arg(long, env = "PUNCTUAL_RESP_QUEUE_PREFIX")]
    pub resp_queue_prefix: Option<String>,
    /// Redis protocol: notify-keyspace-events at start (CONFIG SET changes it until restart)
    /// [default: xE, expired events on the keyevent channel].
    #[arg(long, env = "PUNCTUAL_RESP_NOTIFY")]
    pub resp_notify: Option<String>,
    /// Redis protocol: most expiry events kept per backlog (a group's, or a database's shared
    /// one) while no subscriber takes them; past it new ones are dropped and counted
    /// [default: 1000000].
    #[arg(long, env = "PUNCTUAL_RESP_MAX_WAITING")]
    pub resp_max_waiting: Option<u64>,
    /// Redis protocol: most connections at once [default: 10000].
    #[arg(long, env = "PUNCTUAL_RESP_MAX_CONNECTIONS")]
    pub resp_max_connections: Option<usize>,
    /// Print the resolved settings as JSON and exit (tokens are not shown).
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

/// The settings `serve` runs with.
#[derive(Debug, Serialize)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub cache_mb: usize,
    pub default_lease_ms: u64,
    pub default_max_attempts: u32,
    pub retention_ms: u64,
    pub max_payload_bytes: usize,
    pub max_batch: usize,
    pub max_wait_ms: u64,
    #[serde(skip)]
    pub auth_tokens: Vec<String>,
    /// How many tokens are configured (the tokens themselves are never printed).
    pub auth_token_count: usize,
    pub protect_metrics: bool,
    pub ui: bool,
    #[serde(skip)]
    pub webhook_secret: Option<String>,
    /// Whether a webhook secret is configured (the secret itself is never printed).
    pub webhook_signing: bool,
    pub webhook_concurrency: usize,
    pub webhook_per_host: usize,
    pub webhook_allow_private: bool,
    pub webhook_allow: Vec<String>,
    pub webhook_retry_after_max_ms: u64,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_body_memory_mb: usize,
    pub min_free_disk_mb: u64,
    pub checkpoint_mb: u64,
    /// `redb` (embedded), `redis` or `redis-cluster`.
    pub store: &'static str,
    pub resp: Option<SocketAddr>,
    pub resp_broadcast: bool,
    pub resp_databases: u32,
    pub resp_queue_prefix: String,
    pub resp_notify: String,
    pub resp_max_waiting: u64,
    pub resp_max_connections: usize,
    #[serde(skip)]
    pub redis_urls: Vec<String>,
    /// The Redis URLs with any password hidden.
    pub redis_nodes: Vec<String>,
    pub redis_prefix: String,
    pub redis_shards: Option<u32>,
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout_ms: u64,
    pub redis_tls_ca: Option<PathBuf>,
    pub redis_tls_cert: Option<PathBuf>,
    pub redis_tls_key: Option<PathBuf>,
}

/// `redis://user:secret@host` shown as `redis://user:***@host`.
fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            let user = auth.split_once(':').map_or("", |(user, _)| user);
            if auth.contains(':') {
                format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
            } else {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
        }
        _ => url.to_owned(),
    }
}

fn read_file(path: &Path) -> Result<ServeOpts> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "invalid config file {}: {}",
            path.display(),
            e.to_string().trim()
        )
    })
}

impl ServeOpts {
    /// Resolves flags (and their env vars) over the file over the defaults.
    pub fn resolve(self) -> Result<Settings> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => ServeOpts::default(),
        };
        let mut auth_tokens: Vec<String> = if self.auth_tokens.is_empty() {
            file.auth_tokens
        } else {
            self.auth_tokens
        };
        if let Some(path) = self.auth_token_file.or(file.auth_token_file) {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read auth_token_file {}", path.display()))?;
            auth_tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let auth_tokens: Vec<String> = auth_tokens.into_iter().filter(|t| !t.is_empty()).collect();
        let data_dir_given = self.data_dir.is_some() || file.data_dir.is_some();
        let redis = self.redis.or(file.redis).filter(|u| !u.is_empty());
        let redis_cluster: Vec<String> = if self.redis_cluster.is_empty() {
            file.redis_cluster
        } else {
            self.redis_cluster
        }
        .into_iter()
        .filter(|u| !u.is_empty())
        .collect();
        let embedded = match self.store.or(file.store).as_deref() {
            None | Some("journal") => "journal",
            Some("redb") => "redb",
            Some(other) => bail!("store must be journal or redb, got {other:?}"),
        };
        let (store, redis_urls) = match (redis, redis_cluster.is_empty()) {
            (None, true) => (embedded, Vec::new()),
            (Some(url), true) => ("redis", vec![url]),
            (None, false) => ("redis-cluster", redis_cluster),
            (Some(_), false) => bail!("give either redis or redis_cluster, not both"),
        };
        if store.starts_with("redis") && data_dir_given {
            bail!("data_dir is for the embedded store; a node on Redis keeps no data of its own");
        }
        let settings = Settings {
            store,
            redis_nodes: redis_urls.iter().map(|u| hide_password(u)).collect(),
            redis_urls,
            redis_prefix: self
                .redis_prefix
                .or(file.redis_prefix)
                .unwrap_or_else(|| "punctual".into()),
            redis_shards: self.redis_shards.or(file.redis_shards),
            redis_wait_replicas: self
                .redis_wait_replicas
                .or(file.redis_wait_replicas)
                .unwrap_or(0),
            redis_wait_timeout_ms: self
                .redis_wait_timeout_ms
                .or(file.redis_wait_timeout_ms)
                .unwrap_or(1_000),
            redis_tls_ca: self.redis_tls_ca.or(file.redis_tls_ca),
            redis_tls_cert: self.redis_tls_cert.or(file.redis_tls_cert),
            redis_tls_key: self.redis_tls_key.or(file.redis_tls_key),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| "./punctual-data".into()),
            http: self
                .http
                .or(file.http)
                .unwrap_or_else(|| ([127, 0, 0, 1], 7070).into()),
            cache_mb: self.cache_mb.or(file.cache_mb).unwrap_or(64),
            default_lease_ms: self
                .default_lease_ms
                .or(file.default_lease_ms)
                .unwrap_or(30_000),
            default_max_attempts: self
                .default_max_attempts
                .or(file.default_max_attempts)
                .unwrap_or(5),
            retention_ms: self
                .retention_ms
                .or(file.retention_ms)
                .unwrap_or(86_400_000),
            max_payload_bytes: self
                .max_payload_bytes
                .or(file.max_payload_bytes)
                .unwrap_or(1 << 20),
            max_batch: self.max_batch.or(file.max_batch).unwrap_or(1000),
            max_wait_ms: self.max_wait_ms.or(file.max_wait_ms).unwrap_or(60_000),
            auth_token_count: auth_tokens.len(),
            auth_tokens,
            protect_metrics: self
                .protect_metrics
                .or(file.protect_metrics)
                .unwrap_or(false),
            ui: self.ui.or(file.ui).unwrap_or(true),
            webhook_signing: false,
            webhook_secret: self
                .webhook_secret
                .or(file.webhook_secret)
                .filter(|s| !s.is_empty()),
            webhook_concurrency: self
                .webhook_concurrency
                .or(file.webhook_concurrency)
                .unwrap_or(64),
            webhook_per_host: self
                .webhook_per_host
                .or(file.webhook_per_host)
                .unwrap_or(16),
            webhook_allow_private: self
                .webhook_allow_private
                .or(file.webhook_allow_private)
                .unwrap_or(false),
            webhook_allow: if self.webhook_allow.is_empty() {
                file.webhook_allow
            } else {
                self.webhook_allow
            },
            webhook_retry_after_max_ms: self
                .webhook_retry_after_max_ms
                .or(file.webhook_retry_after_max_ms)
                .unwrap_or(86_400_000),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(10_000),
            header_read_timeout_ms: self
                .header_read_timeout_ms
                .or(file.header_read_timeout_ms)
                .unwrap_or(10_000),
            body_read_timeout_ms: self
                .body_read_timeout_ms
                .or(file.body_read_timeout_ms)
                .unwrap_or(30_000),
            idle_timeout_ms: self
                .idle_timeout_ms
                .or(file.idle_timeout_ms)
                .unwrap_or(60_000),
            max_body_memory_mb: self
                .max_body_memory_mb
                .or(file.max_body_memory_mb)
                .unwrap_or(256),
            min_free_disk_mb: self
                .min_free_disk_mb
                .or(file.min_free_disk_mb)
                .unwrap_or(64),
            resp: self.resp.or(file.resp),
            resp_broadcast: self.resp_broadcast.or(file.resp_broadcast).unwrap_or(false),
            resp_databases: self.resp_databases.or(file.resp_databases).unwrap_or(16),
            resp_queue_prefix: self
                .resp_queue_prefix
                .or(file.resp_queue_prefix)
                .unwrap_or_else(|| "db".into()),
            resp_notify: self
                .resp_notify
                .or(file.resp_notify)
                .unwrap_or_else(|| "xE".into()),
            resp_max_waiting: self
                .resp_max_waiting
                .or(file.resp_max_waiting)
                .unwrap_or(1_000_000),
            resp_max_connections: self
                .resp_max_connections
                .or(file.resp_max_connections)
                .unwrap_or(10_000),
            checkpoint_mb: self
                .checkpoint_mb
                .or(file.checkpoint_mb)
                .unwrap_or(punctual_store::JournalStoreOptions::default().checkpoint_bytes >> 20),
        };
        let settings = Settings {
            webhook_signing: settings.webhook_secret.is_some(),
            ..settings
        };
        settings.check()?;
        Ok(settings)
    }
}

impl Settings {
    fn check(&self) -> Result<()> {
        let limits = punctual_core::Limits::default();
        if self.cache_mb == 0 {
            bail!("cache_mb must be at least 1");
        }
        if !(limits.min_lease_ms..=limits.max_lease_ms).contains(&self.default_lease_ms) {
            bail!(
                "default_lease_ms must be between {} and {}",
                limits.min_lease_ms,
                limits.max_lease_ms
            );
        }
        if !(1..=limits.max_attempts).contains(&self.default_max_attempts) {
            bail!(
                "default_max_attempts must be between 1 and {}",
                limits.max_attempts
            );
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 64 << 20 {
            bail!("max_payload_bytes must be between 1 and 67108864");
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            bail!("max_connections must be between 1 and 1000000");
        }
        if !(1..=1_000_000).contains(&self.resp_max_connections) {
            bail!("resp_max_connections must be between 1 and 1000000");
        }
        if !(1..=1024).contains(&self.resp_databases) {
            bail!("resp_databases must be between 1 and 1024");
        }
        punctual_core::Limits::default()
            .check_queue(&format!(
                "{}{}.expired",
                self.resp_queue_prefix,
                self.resp_databases.saturating_sub(1)
            ))
            .map_err(|m| anyhow::anyhow!("resp_queue_prefix {:?}: {m}", self.resp_queue_prefix))?;
        if punctual_server::resp::events::Flags::parse(self.resp_notify.as_bytes()).is_none() {
            bail!(
                "resp_notify {:?} has a character that is not an event class; use 'Ag$lshzxeKEtmdn'",
                self.resp_notify
            );
        }
        for (name, ms) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                bail!("{name} must be between 100 and 3600000");
            }
        }
        if !(1..=65_536).contains(&self.checkpoint_mb) {
            bail!("checkpoint_mb must be between 1 and 65536");
        }
        if !(1..=65_536).contains(&self.max_body_memory_mb) {
            bail!("max_body_memory_mb must be between 1 and 65536");
        }
        if self.webhook_retry_after_max_ms == 0 {
            bail!("webhook_retry_after_max_ms must be at least 1");
        }
        for entry in &self.webhook_allow {
            punctual_server::webhook::AllowEntry::parse(entry)
                .map_err(|e| anyhow::anyhow!("webhook_allow: {e}"))?;
        }
        if !(1..=3_600_000).contains(&self.max_wait_ms) {
            bail!("max_wait_ms must be between 1 and 3600000");
        }
        if !(1..=100_000).contains(&self.max_batch) {
            bail!("max_batch must be between 1 and 100000");
        }
        if !(1..=10_000).contains(&self.webhook_concurrency) {
            bail!("webhook_concurrency must be between 1 and 10000");
        }
        if !(1..=10_000).contains(&self.webhook_per_host) {
            bail!("webhook_per_host must be between 1 and 10000");
        }
        if self
            .redis_shards
            .is_some_and(|s| s == 0 || s > punctual_store::MAX_SHARDS)
        {
            bail!(
                "redis_shards must be between 1 and {}",
                punctual_store::MAX_SHARDS
            );
        }
        if !(1..=60_000).contains(&self.redis_wait_timeout_ms) {
            bail!("redis_wait_timeout_ms must be between 1 and 60000");
        }
        for url in &self.redis_urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                bail!(
                    "a Redis URL starts with redis:// or rediss://, not {}",
                    hide_password(url)
                );
            }
        }
        if self.redis_tls_cert.is_some() != self.redis_tls_key.is_some() {
            bail!("redis_tls_cert and redis_tls_key go together");
        }
        let tls_files = self.redis_tls_ca.is_some() || self.redis_tls_cert.is_some();
        if tls_files && self.redis_urls.is_empty() {
            bail!("the redis_tls_* settings are for a node on Redis (redis or redis_cluster)");
        }
        // Certificates with a redis:// URL are refused by the store itself, for every caller.
        Ok(())
    }
}

/// `on`/`off` (or `true`/`false`) for a switch flag.
fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "punctual-config-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let path = file("cache_mb = 10\nretention_ms = 1000\nauth_tokens = [\"a\", \"b\"]\n");
        let settings = ServeOpts {
            config: Some(path),
            cache_mb: Some(30),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (settings.cache_mb, settings.retention_ms, settings.max_batch),
            (30, 1000, 1000)
        );
        assert_eq!(settings.auth_tokens, ["a", "b"]);
    }

    #[test]
    fn redis_settings_are_checked_and_passwords_hidden() {
        let settings = ServeOpts {
            redis: Some("redis://app:s3cret@10.0.0.5:6380/2".into()),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(settings.store, "redis");
        assert_eq!(settings.redis_nodes, ["redis://app:***@10.0.0.5:6380/2"]);
        let printed = serde_json::to_string(&settings).unwrap();
        assert!(!printed.contains("s3cret"), "{printed}");
        let both = ServeOpts {
            redis: Some("redis://a:1/".into()),
            redis_cluster: vec!["redis://b:1/".into()],
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(both.contains("not both"), "{both}");
        let with_dir = ServeOpts {
            redis_cluster: vec!["redis://b:1/".into()],
            data_dir: Some("/tmp/x".into()),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(with_dir.contains("data_dir"), "{with_dir}");
        let scheme = ServeOpts {
            redis: Some("http://a:1/".into()),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(scheme.contains("redis://"), "{scheme}");
    }

    #[test]
    fn the_dashboard_is_on_unless_switched_off() {
        let default = ServeOpts::default().resolve().unwrap();
        assert!(default.ui);
        let file_off = ServeOpts {
            config: Some(file("ui = false\n")),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap();
        assert!(!file_off.ui);
        let flag_on = ServeOpts {
            config: Some(file("ui = false\n")),
            ui: Some(true),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap();
        assert!(flag_on.ui);
        assert_eq!(parse_on_off("off"), Ok(false));
        assert_eq!(parse_on_off("on"), Ok(true));
        assert!(parse_on_off("maybe").unwrap_err().contains("on or off"));
    }

    #[test]
    fn bad_files_name_the_key() {
        let unknown = ServeOpts {
            config: Some(file("cache_mbs = 10\n")),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("cache_mbs"), "{unknown}");
        let wrong_type = ServeOpts {
            config: Some(file("retention_ms = \"a day\"\n")),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(wrong_type.contains("retention_ms"), "{wrong_type}");
        let out_of_range = ServeOpts {
            config: Some(file("default_lease_ms = 5\n")),
            ..ServeOpts::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(out_of_range.contains("default_lease_ms"), "{out_of_range}");
    }
}
