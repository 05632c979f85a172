//! Configuration: one YAML file, every key optional, `${env:NAME}` references
//! expanded the way the OpenTelemetry Collector does. Loading validates
//! everything (rules, expectations, addresses) so `check-config` and `serve`
//! fail the same way, naming the file, the key path and the reason.

use crate::classify::rules::RuleConfig;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: {path}: {reason}")]
    Invalid { file: String, path: String, reason: String },
}

impl ConfigError {
    fn at(file: &str, path: impl Into<String>, reason: impl Into<String>) -> Self {
        let path = path.into();
        ConfigError::Invalid {
            file: file.to_string(),
            path: if path.is_empty() { "(top level)".into() } else { path },
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub pipeline: PipelineConfig,
    pub storage: StorageConfig,
    /// Expectations per process name.
    pub processes: BTreeMap<String, ProcessExpectations>,
    /// Mapping rules that classify telemetry without `business.*` attributes.
    pub rules: Vec<RuleConfig>,
    pub ui: UiConfig,
    /// Derived business metrics and self-metrics: OTLP export, budgets, user-defined metrics.
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            data_dir: PathBuf::from("./data"),
            limits: Limits::default(),
            pipeline: PipelineConfig::default(),
            storage: StorageConfig::default(),
            processes: BTreeMap::new(),
            rules: Vec::new(),
            ui: UiConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// OTLP/gRPC listen address.
    pub otlp_grpc: SocketAddr,
    /// OTLP/HTTP listen address.
    pub otlp_http: SocketAddr,
    /// REST API and `/metrics`.
    pub http: SocketAddr,
    /// Most simultaneous connections per port; further clients wait in the
    /// kernel's accept backlog.
    pub max_connections: usize,
    /// TLS (rustls) on all three ports; plain TCP when absent.
    pub tls: Option<TlsConfig>,
    /// Bearer-token authentication; open when no tokens are configured.
    pub auth: AuthConfig,
    /// Origins allowed to call the API and OTLP/HTTP from a browser (CORS);
    /// empty (the default) sends no CORS headers at all.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// signed by one of them (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Tokens for intake (OTLP, `POST /api/v1/events`) and, separately, for reads
/// (REST, stream, `/metrics`). Files hold one token per line and are re-read
/// when they change and on SIGHUP; environment variables hold a
/// comma-separated list and are read at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub intake_tokens_file: Option<PathBuf>,
    /// Name of an environment variable holding intake tokens.
    pub intake_tokens_env: Option<String>,
    pub read_tokens_file: Option<PathBuf>,
    /// Name of an environment variable holding read tokens.
    pub read_tokens_env: Option<String>,
    /// How often token files are checked for changes.
    #[serde(deserialize_with = "de_duration")]
    pub reload_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            intake_tokens_file: None,
            intake_tokens_env: None,
            read_tokens_file: None,
            read_tokens_env: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            otlp_grpc: "0.0.0.0:4317".parse().unwrap(),
            otlp_http: "0.0.0.0:4318".parse().unwrap(),
            http: "0.0.0.0:8080".parse().unwrap(),
            max_connections: 1024,
            tls: None,
            auth: AuthConfig::default(),
            cors_allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted on the wire (compressed size).
    #[serde(deserialize_with = "de_bytes")]
    pub max_request_bytes: usize,
    /// Largest request body after decompression (gRPC message or HTTP body).
    #[serde(deserialize_with = "de_bytes")]
    pub max_decompressed_bytes: usize,
    /// Largest `business.payload` JSON text.
    #[serde(deserialize_with = "de_bytes")]
    pub max_payload_bytes: usize,
    /// Attribute values longer than this are truncated in stored events.
    #[serde(deserialize_with = "de_bytes")]
    pub max_attribute_value_bytes: usize,
    /// Records with more attributes than this are rejected.
    pub max_attributes_per_record: usize,
    /// Longest process name, run id, milestone or outcome name.
    pub max_name_length: usize,
    /// Largest absolute value accepted for counts, progress and values.
    pub max_number: f64,
    /// Distinct process names; records of further processes are rejected.
    pub max_processes: usize,
    /// Open runs kept in memory; beyond it the least recently active are
    /// evicted: marked with an `evicted` violation, kept in storage, reloaded
    /// when a signal arrives (no stall or deadline checks while evicted).
    pub max_active_runs: usize,
    /// Memory budget for intake requests in flight (bodies as they are
    /// read, inflated and decoded, their signals while queued and until
    /// answered); beyond it receivers refuse with retryable statuses.
    #[serde(deserialize_with = "de_bytes")]
    pub max_inflight_bytes: usize,
    /// Token-bucket rate of intake requests per client (peer IP, or intake
    /// token when tokens are configured); `None` (the default) is no limit.
    #[serde(deserialize_with = "de_opt_rate")]
    pub requests_per_second_per_client: Option<f64>,
    /// Bucket size: requests a client may send at once after being idle;
    /// default the rate rounded up (at least 1).
    #[serde(deserialize_with = "de_opt_usize")]
    pub request_burst_per_client: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
            max_payload_bytes: 64 << 10,
            max_attribute_value_bytes: 4 << 10,
            max_attributes_per_record: 1024,
            max_name_length: 256,
            max_number: 1e15,
            max_processes: 10_000,
            max_active_runs: 100_000,
            max_inflight_bytes: 256 << 20,
            requests_per_second_per_client: None,
            request_burst_per_client: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Classified batches waiting for the run tracker; when full, receivers
    /// answer with retryable statuses.
    pub queue_capacity: usize,
    /// Batches the tracker commits together (group commit).
    pub max_batches_per_commit: usize,
    /// The `Retry-After` / RetryInfo delay suggested to clients.
    #[serde(deserialize_with = "de_duration")]
    pub retry_after: Duration,
    /// How often stalls, durations and deadlines are checked.
    #[serde(deserialize_with = "de_duration")]
    pub tick: Duration,
    /// How long receivers wait for the tracker to commit before answering
    /// with a retryable error.
    #[serde(deserialize_with = "de_duration")]
    pub ack_timeout: Duration,
    /// Drain deadline per stage on shutdown.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Signal ids newer than this stay in memory for de-duplication; older
    /// signals are checked against storage (exact either way).
    #[serde(deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// The longest the tracker keeps a commit open for more batches after
    /// the first (group commit): fewer, larger journal fsyncs under
    /// concurrent load at the price of up to this much acknowledgement
    /// latency. Adaptive: it stops waiting while waits gather nothing.
    #[serde(deserialize_with = "de_duration")]
    pub commit_linger: Duration,
}

/// Adaptive (`runs::linger`): the tracker only waits while waiting gathers
/// batches, so a client that exports one request at a time rarely pays it.
/// 50 ms: senders at a steady pace share one `fdatasync` per ~50 ms
/// (docs/benchmarks.md, session 10).
const LINGER_MS: u64 = 50;

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            queue_capacity: 256,
            max_batches_per_commit: 64,
            retry_after: Duration::from_secs(1),
            tick: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            dedup_window: Duration::from_secs(120),
            commit_linger: Duration::from_millis(LINGER_MS),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite` (embedded default) or `clickhouse`.
    pub kind: StorageKind,
    pub sqlite: SqliteConfig,
    /// Used when `kind: clickhouse`.
    pub clickhouse: ClickHouseConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Sqlite,
            sqlite: SqliteConfig::default(),
            clickhouse: ClickHouseConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Sqlite,
    Clickhouse,
}

/// ClickHouse over HTTP (RowBinary, LZ4). See docs/storage.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// `http://host:8123` (plain HTTP; put TLS in front with a proxy).
    pub url: String,
    /// Database for bizsignal's tables; created if missing.
    pub database: String,
    pub user: String,
    /// Password, usually `${env:CLICKHOUSE_PASSWORD}`.
    pub password: Option<String>,
    /// File whose first line is the password (alternative to `password`).
    pub password_file: Option<PathBuf>,
    /// Cluster name: `ON CLUSTER` DDL, `Replicated*` engines, `Distributed` tables.
    pub cluster: Option<String>,
    /// Days of events to keep (0 = forever).
    pub ttl_days: u32,
    /// LZ4 compression of requests and responses.
    pub compression: bool,
    /// Rows per insert (per table).
    pub batch_max_rows: usize,
    /// Longest a row waits before its batch is sent.
    #[serde(deserialize_with = "de_duration")]
    pub batch_max_wait: Duration,
    /// Use ClickHouse's server-side async inserts (`async_insert=1`,
    /// `wait_for_async_insert=1`); off by default because bizsignal batches itself.
    pub async_insert: bool,
    /// Timeout of one request.
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    /// Longest pause between retries of a failed insert.
    #[serde(deserialize_with = "de_duration")]
    pub max_backoff: Duration,
    /// Largest on-disk spool (signals waiting for ClickHouse); when full,
    /// receivers answer with retryable statuses.
    #[serde(deserialize_with = "de_bytes")]
    pub spool_max_bytes: usize,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://localhost:8123".into(),
            database: "bizsignal".into(),
            user: "default".into(),
            password: None,
            password_file: None,
            cluster: None,
            ttl_days: 90,
            compression: true,
            batch_max_rows: 10_000,
            batch_max_wait: Duration::from_secs(1),
            async_insert: false,
            request_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
            spool_max_bytes: 1 << 30,
        }
    }
}

impl ClickHouseConfig {
    /// The password from `password` or `password_file`.
    pub fn resolve_password(&self) -> Result<String, String> {
        match (&self.password, &self.password_file) {
            (Some(p), None) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.lines().next().unwrap_or("").to_string())
                .map_err(|e| format!("cannot read password file {}: {e}", f.display())),
            (None, None) => Ok(String::new()),
            (Some(_), Some(_)) => Err("give password or password_file, not both".into()),
        }
    }
}

/// ClickHouse database and cluster names are spliced into DDL, so they must be plain identifiers.
pub fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Database file; default `<data_dir>/bizsignal.db`.
    pub path: Option<PathBuf>,
    /// How often acknowledged batches are moved from the journal into the
    /// database (one transaction for all of them). Reads never wait for it:
    /// a read first applies whatever is pending.
    #[serde(deserialize_with = "de_duration")]
    pub commit_interval: Duration,
    /// The journal (`<database>.journal/`): acknowledged batches not yet in
    /// the database. When full, intake is refused with retryable statuses.
    #[serde(deserialize_with = "de_bytes")]
    pub journal_max_bytes: usize,
    /// SQLite page size of a database this creates (an existing database
    /// keeps its own). Larger pages mean fewer WAL frames, write calls and
    /// checkpoint copies per signal row (≈ 1 KB each).
    #[serde(deserialize_with = "de_bytes")]
    pub page_size: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: None,
            commit_interval: Duration::from_secs(2),
            journal_max_bytes: 256 << 20,
            page_size: 16 << 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// OTLP metrics export; off unless an endpoint is configured here or in
    /// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp: OtlpMetricsConfig,
    /// Default budget of attribute sets (series) per metric; more fold into
    /// one `otel.metric.overflow="true"` series.
    pub cardinality_limit: usize,
    /// Metrics defined by the user over business facts and attributes.
    pub user_defined: Vec<UserMetricConfig>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { otlp: OtlpMetricsConfig::default(), cardinality_limit: 2000, user_defined: Vec::new() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpMetricsConfig {
    /// gRPC: `http://collector:4317`; HTTP: `http://collector:4318` (`/v1/metrics` is appended).
    pub endpoint: Option<String>,
    /// `grpc` or `http` (HTTP/protobuf); default from `OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`, else `grpc`.
    pub protocol: Option<OtlpProtocol>,
    /// Extra headers (gRPC metadata), e.g. an API key.
    pub headers: BTreeMap<String, String>,
    /// Export interval; default from `OTEL_METRIC_EXPORT_INTERVAL`, else 60s.
    #[serde(deserialize_with = "de_opt_duration")]
    pub interval: Option<Duration>,
    /// Export timeout; default from `OTEL_EXPORTER_OTLP_(METRICS_)TIMEOUT`, else 10s.
    #[serde(deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// `cumulative` or `delta`; default from
    /// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`, else `cumulative`.
    pub temporality: Option<TemporalityConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemporalityConfig {
    Cumulative,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstrumentKind {
    Counter,
    Histogram,
    Gauge,
}

/// One user-defined metric.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserMetricConfig {
    /// OTel metric name, e.g. `orders.amount`.
    pub name: String,
    pub instrument: InstrumentKind,
    /// `business.records.<outcome>`, `business.value.<name>`, or any other
    /// attribute key holding a number.
    pub source: String,
    #[serde(default)]
    pub unit: String,
    #[serde(default)]
    pub description: String,
    /// Only signals of this process; default all.
    #[serde(default)]
    pub process: Option<String>,
    /// Allow-list of attribute keys copied onto the metric (record, then resource attributes).
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// Series budget for this metric; default `metrics.cardinality_limit`.
    #[serde(default)]
    pub cardinality_limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Link template for traces, `{trace_id}` is replaced,
    /// e.g. `http://localhost:16686/trace/{trace_id}` for Jaeger.
    pub trace_url_template: Option<String>,
}

/// What a process is expected to do; breaches become violations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessExpectations {
    /// A running run with no signal for this long becomes `stalled`.
    #[serde(deserialize_with = "de_opt_duration")]
    pub stall_after: Option<Duration>,
    /// A run running (or having run) longer than this is a violation.
    #[serde(deserialize_with = "de_opt_duration")]
    pub max_duration: Option<Duration>,
    /// A run must have succeeded by this time of day.
    pub deadline: Option<Deadline>,
    /// Bounds on the run's final counts, per outcome.
    pub expected_records: BTreeMap<String, RecordBounds>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadline {
    /// `HH:MM` or `HH:MM:SS`, local to `timezone`.
    pub time: String,
    /// IANA time zone, e.g. `Europe/Berlin`; default `UTC`.
    #[serde(default = "utc")]
    pub timezone: String,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordBounds {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Config {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { file: file.clone(), reason: e.to_string() })?;
        Self::from_yaml(&text, &file)
    }

    /// Parses YAML text; `file` names the source in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut value: serde_norway::Value = if text.trim().is_empty() {
            serde_norway::Value::Mapping(Default::default())
        } else {
            serde_norway::from_str(text).map_err(|e| {
                let loc = e.location().map(|l| format!("line {} column {}", l.line(), l.column())).unwrap_or_default();
                ConfigError::at(file, loc, format!("not valid YAML: {e}"))
            })?
        };
        if value.is_null() {
            value = serde_norway::Value::Mapping(Default::default());
        }
        expand_env(&mut value, &mut Vec::new(), file)?;
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::at(file, path, e.into_inner().to_string())
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_request_bytes == 0 || l.max_decompressed_bytes == 0 {
            return Err(ConfigError::at(file, "limits", "request size limits must be greater than zero"));
        }
        if l.max_decompressed_bytes < l.max_request_bytes {
            return Err(ConfigError::at(
                file,
                "limits.max_decompressed_bytes",
                "must be at least limits.max_request_bytes",
            ));
        }
        if l.max_inflight_bytes < l.max_request_bytes.saturating_add(l.max_decompressed_bytes) {
            return Err(ConfigError::at(
                file,
                "limits.max_inflight_bytes",
                "must be at least limits.max_request_bytes + limits.max_decompressed_bytes (so the largest request fits)",
            ));
        }
        if let Some(r) = l.requests_per_second_per_client {
            if !(r.is_finite() && r > 0.0) {
                return Err(ConfigError::at(
                    file,
                    "limits.requests_per_second_per_client",
                    "must be a positive number",
                ));
            }
        }
        if l.request_burst_per_client == Some(0) {
            return Err(ConfigError::at(file, "limits.request_burst_per_client", "must be at least 1"));
        }
        if l.request_burst_per_client.is_some() && l.requests_per_second_per_client.is_none() {
            return Err(ConfigError::at(
                file,
                "limits.request_burst_per_client",
                "needs limits.requests_per_second_per_client",
            ));
        }
        if l.max_processes == 0 || l.max_active_runs == 0 {
            return Err(ConfigError::at(file, "limits", "max_processes and max_active_runs must be greater than zero"));
        }
        if !(l.max_number.is_finite() && l.max_number > 0.0) {
            return Err(ConfigError::at(file, "limits.max_number", "must be a positive finite number"));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::at(file, "server.max_connections", "must be greater than zero"));
        }
        if let Some(tls) = &self.server.tls {
            crate::net::load_tls(tls, &[]).map_err(|(key, r)| ConfigError::at(file, format!("server.tls.{key}"), r))?;
        }
        let a = &self.server.auth;
        for (key, f) in [("intake_tokens_file", &a.intake_tokens_file), ("read_tokens_file", &a.read_tokens_file)] {
            if let Some(f) = f {
                crate::auth::read_token_file(f).map_err(|r| ConfigError::at(file, format!("server.auth.{key}"), r))?;
            }
        }
        for (key, v) in [("intake_tokens_env", &a.intake_tokens_env), ("read_tokens_env", &a.read_tokens_env)] {
            if let Some(v) = v {
                crate::auth::read_token_env(v).map_err(|r| ConfigError::at(file, format!("server.auth.{key}"), r))?;
            }
        }
        if a.reload_interval.is_zero() {
            return Err(ConfigError::at(file, "server.auth.reload_interval", "must be greater than zero"));
        }
        for (i, o) in self.server.cors_allowed_origins.iter().enumerate() {
            if o == "*" || !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(ConfigError::at(
                    file,
                    format!("server.cors_allowed_origins[{i}]"),
                    format!("{o:?} must be an exact origin such as https://ops.example.com (no wildcard, no trailing slash)"),
                ));
            }
        }
        if self.pipeline.queue_capacity == 0 {
            return Err(ConfigError::at(file, "pipeline.queue_capacity", "must be greater than zero"));
        }
        if self.pipeline.max_batches_per_commit == 0 {
            return Err(ConfigError::at(file, "pipeline.max_batches_per_commit", "must be greater than zero"));
        }
        if self.pipeline.dedup_window < Duration::from_millis(1)
            || self.pipeline.dedup_window > Duration::from_secs(7 * 86_400)
        {
            return Err(ConfigError::at(file, "pipeline.dedup_window", "must be between 1ms and 7d"));
        }
        if self.pipeline.commit_linger > Duration::from_secs(1) {
            return Err(ConfigError::at(file, "pipeline.commit_linger", "must be at most 1s"));
        }
        if self.pipeline.tick.is_zero() {
            return Err(ConfigError::at(file, "pipeline.tick", "must be greater than zero"));
        }
        for (name, exp) in &self.processes {
            let base = format!("processes.{name}");
            if name.is_empty() || name.len() > l.max_name_length {
                return Err(ConfigError::at(file, base, "process name must be 1..=max_name_length characters"));
            }
            if let Some(d) = &exp.deadline {
                crate::runs::expect::DeadlineRule::parse(d)
                    .map_err(|r| ConfigError::at(file, format!("{base}.deadline"), r))?;
            }
            for (outcome, b) in &exp.expected_records {
                let p = format!("{base}.expected_records.{outcome}");
                if b.min.is_none() && b.max.is_none() {
                    return Err(ConfigError::at(file, p, "give min, max or both"));
                }
                if let (Some(min), Some(max)) = (b.min, b.max) {
                    if min > max {
                        return Err(ConfigError::at(file, p, format!("min ({min}) is greater than max ({max})")));
                    }
                }
            }
            if exp.stall_after.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::at(file, format!("{base}.stall_after"), "must be greater than zero"));
            }
            if exp.max_duration.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::at(file, format!("{base}.max_duration"), "must be greater than zero"));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            crate::classify::rules::Rule::compile(rule).map_err(|(path, reason)| {
                ConfigError::at(file, format!("rules[{i}]{}{path}", if path.is_empty() { "" } else { "." }), reason)
            })?;
        }
        crate::metrics::user::validate(&self.metrics).map_err(|(path, reason)| ConfigError::at(file, path, reason))?;
        let sq = &self.storage.sqlite;
        if sq.journal_max_bytes < 64 << 10 {
            return Err(ConfigError::at(file, "storage.sqlite.journal_max_bytes", "must be at least 64KiB"));
        }
        if !(512..=65536).contains(&sq.page_size) || !sq.page_size.is_power_of_two() {
            return Err(ConfigError::at(file, "storage.sqlite.page_size", "must be a power of two from 512B to 64KiB"));
        }
        if sq.commit_interval.is_zero() || sq.commit_interval > Duration::from_secs(60) {
            return Err(ConfigError::at(file, "storage.sqlite.commit_interval", "must be between 1ms and 60s"));
        }
        if self.storage.kind == StorageKind::Clickhouse {
            let ch = &self.storage.clickhouse;
            let at = |k: &str, r: String| ConfigError::at(file, format!("storage.clickhouse.{k}"), r);
            if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
                return Err(at("url", format!("{:?} must start with http://", ch.url)));
            }
            if ch.url.starts_with("https://") {
                return Err(at(
                    "url",
                    "https is not built in; use http:// (e.g. behind a TLS proxy or on a private network)".into(),
                ));
            }
            if !valid_identifier(&ch.database) {
                return Err(at(
                    "database",
                    format!("{:?} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)", ch.database),
                ));
            }
            if let Some(c) = &ch.cluster {
                if !valid_identifier(c) {
                    return Err(at("cluster", format!("{c:?} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")));
                }
            }
            if ch.password.is_some() && ch.password_file.is_some() {
                return Err(at("password_file", "give password or password_file, not both".into()));
            }
            if ch.batch_max_rows == 0 {
                return Err(at("batch_max_rows", "must be greater than zero".into()));
            }
            if ch.spool_max_bytes < 1 << 20 {
                return Err(at("spool_max_bytes", "must be at least 1MiB".into()));
            }
        }
        if let Some(t) = &self.ui.trace_url_template {
            if !t.contains("{trace_id}") {
                return Err(ConfigError::at(file, "ui.trace_url_template", "must contain {trace_id}"));
            }
        }
        Ok(())
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.storage.sqlite.path.clone().unwrap_or_else(|| self.data_dir.join("bizsignal.db"))
    }
}

/// Expands `${env:NAME}` in every string; `$$` is a literal `$`. A scalar that
/// is exactly one reference is re-read as YAML so `port: ${env:PORT}` stays a number.
fn expand_env(v: &mut serde_norway::Value, path: &mut Vec<String>, file: &str) -> Result<(), ConfigError> {
    use serde_norway::Value;
    match v {
        Value::String(s) => {
            if !s.contains('$') {
                return Ok(());
            }
            let whole = s.starts_with("${env:") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand_str(s).map_err(|r| ConfigError::at(file, path.join("."), r))?;
            *v = if whole {
                serde_norway::from_str::<Value>(&expanded)
                    .ok()
                    .filter(|x| !x.is_mapping() && !x.is_sequence() && !x.is_null())
                    .unwrap_or(Value::String(expanded))
            } else {
                Value::String(expanded)
            };
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                expand_env(item, path, file)?;
                path.pop();
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                path.push(k.as_str().unwrap_or("?").to_string());
                expand_env(item, path, file)?;
                path.pop();
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path, file)?,
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("${env:") {
            let end = t.find('}').ok_or("unterminated ${env:...} reference")?;
            let name = &t[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let val = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&val);
            rest = &t[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `250ms`, `30s`, `5m`, `1h30m`, `2d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && (0.0..1e12).contains(&secs) {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(format!("invalid duration {s:?}"))
        };
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?} lacks a unit (ms, s, m, h, d)"))?;
        let n: f64 = rest[..num_end].parse().map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let mult = match rest[..unit_end].trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            u => return Err(format!("unknown duration unit {u:?} in {s:?} (use ms, s, m, h, d)")),
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    if total >= 1e12 {
        return Err(format!("duration {s:?} is too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses `512`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match s[split..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("unknown size unit {u:?} (use B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).and_then(|v| usize::try_from(v).ok()).ok_or_else(|| format!("size {s:?} is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(f64),
    Str(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => parse_duration(&n.to_string()),
        NumOrStr::Str(s) => parse_duration(&s),
    }
    .map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

fn de_opt_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    f64::deserialize(d).map(Some)
}

fn de_opt_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    usize::deserialize(d).map(Some)
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as usize),
        NumOrStr::Num(n) => Err(format!("invalid size {n}")),
        NumOrStr::Str(s) => parse_bytes(&s),
    }
    .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("1e300").is_err());
        assert_eq!(parse_bytes("16MiB").unwrap(), 16 << 20);
        assert!(parse_bytes("12 furlongs").is_err());
    }

    #[test]
    fn env_references_expand_and_keep_types() {
        std::env::set_var("BIZSIGNAL_TEST_PORT_ADDR", "127.0.0.1:9999");
        std::env::set_var("BIZSIGNAL_TEST_CAP", "17");
        let c = Config::from_yaml(
            "server: { http: \"${env:BIZSIGNAL_TEST_PORT_ADDR}\" }\npipeline: { queue_capacity: \"${env:BIZSIGNAL_TEST_CAP}\" }\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(c.server.http.port(), 9999);
        assert_eq!(c.pipeline.queue_capacity, 17);
        let e = Config::from_yaml("data_dir: \"${env:BIZSIGNAL_NOT_SET_XYZ}\"\n", "t.yaml").unwrap_err().to_string();
        assert!(e.contains("data_dir") && e.contains("BIZSIGNAL_NOT_SET_XYZ is not set"), "{e}");
    }

    #[test]
    fn intake_limits_are_validated() {
        let c = Config::from_yaml("limits: { requests_per_second_per_client: 2.5 }\n", "c.yaml").unwrap();
        assert_eq!(c.limits.max_inflight_bytes, 256 << 20);
        assert_eq!(c.limits.requests_per_second_per_client, Some(2.5));
        for (yaml, key) in [
            ("limits: { max_inflight_bytes: 64MiB }\n", "limits.max_inflight_bytes"),
            ("limits: { requests_per_second_per_client: 0 }\n", "limits.requests_per_second_per_client"),
            ("limits: { request_burst_per_client: 5 }\n", "limits.request_burst_per_client"),
            ("pipeline: { commit_linger: 2s }\n", "pipeline.commit_linger"),
            ("storage: { sqlite: { page_size: 3000 } }\n", "storage.sqlite.page_size"),
            ("storage: { sqlite: { page_size: 128KiB } }\n", "storage.sqlite.page_size"),
            (
                "limits: { requests_per_second_per_client: 1, request_burst_per_client: 0 }\n",
                "limits.request_burst_per_client",
            ),
        ] {
            let e = Config::from_yaml(yaml, "c.yaml").unwrap_err().to_string();
            assert!(e.starts_with(&format!("c.yaml: {key}:")), "{yaml}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key_path() {
        let e =
            Config::from_yaml("processes:\n  imp:\n    stall_after: 5 parsecs\n", "c.yaml").unwrap_err().to_string();
        assert!(e.starts_with("c.yaml: processes.imp.stall_after:"), "{e}");
        let e = Config::from_yaml("server:\n  htp: 1\n", "c.yaml").unwrap_err().to_string();
        assert!(e.contains("server") && e.contains("unknown field `htp`"), "{e}");
        let e = Config::from_yaml("processes:\n  imp:\n    deadline: { time: '25:00' }\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("processes.imp.deadline"), "{e}");
        let e = Config::from_yaml("server: [", "c.yaml").unwrap_err().to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }
}
