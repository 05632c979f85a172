//! Metrics. Two kinds, two exits:
//!
//! - self-metrics (`bizsignal.*`): what came in, what was kept, what was
//!   refused. Plain atomics on the hot path ([`SelfMetrics`]), read by
//!   observable instruments at collection time;
//! - business metrics (`business.process.*` and user-defined ones), derived
//!   in-process from the tracker's committed changes ([`business`], [`user`]).
//!
//! Both go through one OpenTelemetry `SdkMeterProvider` ([`export`]) and leave
//! over OTLP (optional) and on `GET /metrics` ([`prometheus`]). No attribute
//! ever carries a run id. The catalogue is docs/metrics.md.

pub mod business;
pub mod export;
pub mod prometheus;
pub mod user;

use crate::classify::REJECT_REASONS;
use opentelemetry::KeyValue;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Default)]
pub struct SelfMetrics {
    pub spans_received: AtomicU64,
    pub logs_received: AtomicU64,
    pub events_received: AtomicU64,
    pub signals_classified: AtomicU64,
    pub records_discarded: AtomicU64,
    pub records_rejected: AtomicU64,
    /// Per reason code, indexed like [`REJECT_REASONS`].
    pub rejected_by_reason: [AtomicU64; REJECT_REASONS.len()],
    pub signals_duplicate: AtomicU64,
    pub requests_refused_busy: AtomicU64,
    /// Intake requests refused because `limits.max_inflight_bytes` was reached.
    pub requests_refused_memory: AtomicU64,
    /// Intake requests refused by the per-client rate limit.
    pub requests_rate_limited: AtomicU64,
    /// Bytes reserved by intake requests in flight (see `receivers::admission`).
    pub inflight_bytes: AtomicU64,
    pub requests_invalid: AtomicU64,
    pub requests_too_large: AtomicU64,
    pub storage_commits: AtomicU64,
    pub storage_failures: AtomicU64,
    pub storage_commit_nanos: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Signal ids the run tracker holds for de-duplication (`pipeline.dedup_window`).
    pub dedup_ids: AtomicU64,
    /// Bytes cut off journal/spool tails at start-up (torn or corrupt records).
    pub journal_discarded_bytes: AtomicU64,
    /// Bytes in the SQLite journal not yet applied to the database.
    pub journal_bytes: AtomicU64,
    /// OTLP metric exports that failed.
    pub export_failures: AtomicU64,
    /// Storage write latency histogram, set once the meter provider exists.
    pub storage_write_seconds: OnceLock<opentelemetry::metrics::Histogram<f64>>,
    /// ClickHouse spool and writer (zero with the SQLite backend).
    pub clickhouse: ClickHouseMetrics,
}

/// The ClickHouse backend's spool and writer, kept apart from the core metrics.
#[derive(Debug, Default)]
pub struct ClickHouseMetrics {
    pub enabled: std::sync::atomic::AtomicBool,
    pub spool_bytes: AtomicU64,
    pub spool_records: AtomicU64,
    /// Append time (unix ns) of the oldest spooled record; 0 when empty.
    pub spool_oldest_ns: AtomicU64,
    pub replayed_rows: AtomicU64,
    /// `business_events` inserts sent and acknowledged (rows per insert =
    /// `replayed_rows / event_inserts`, ignoring skipped duplicates).
    pub event_inserts: AtomicU64,
    pub retries: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl SelfMetrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Records one storage write of `secs` seconds.
    pub fn storage_write(&self, secs: f64) {
        self.storage_commit_nanos.fetch_add((secs * 1e9) as u64, Relaxed);
        if let Some(h) = self.storage_write_seconds.get() {
            h.record(secs, &[]);
        }
    }
}

/// The overflow attribute set every metric folds into past its budget.
pub fn overflow_attributes() -> &'static [KeyValue] {
    static OVERFLOW: OnceLock<Vec<KeyValue>> = OnceLock::new();
    OVERFLOW.get_or_init(|| vec![KeyValue::new("otel.metric.overflow", true)])
}

/// A per-metric cardinality budget: the first `limit` distinct attribute sets
/// are kept; later ones are recorded on the overflow series and counted.
/// Admitted sets are remembered for the life of the process, so a series
/// never moves between its own and the overflow series.
#[derive(Debug)]
pub struct Budget {
    pub metric: String,
    limit: usize,
    seen: Mutex<HashSet<u64>>,
    /// Measurements folded into the overflow series.
    pub overflowed: AtomicU64,
}

impl Budget {
    pub fn new(metric: impl Into<String>, limit: usize) -> Self {
        Budget { metric: metric.into(), limit, seen: Mutex::new(HashSet::new()), overflowed: AtomicU64::new(0) }
    }

    /// The attribute set to record under: `attrs`, or the overflow set.
    pub fn admit<'a>(&self, attrs: &'a [KeyValue]) -> &'a [KeyValue] {
        let h = attrs_hash(attrs);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&h) {
            return attrs;
        }
        if seen.len() < self.limit {
            seen.insert(h);
            return attrs;
        }
        self.overflowed.fetch_add(1, Relaxed);
        overflow_attributes()
    }
}

fn attrs_hash(attrs: &[KeyValue]) -> u64 {
    let mut sorted: Vec<&KeyValue> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for kv in sorted {
        h.update(kv.key.as_str().as_bytes());
        h.update(&[0xff]);
        h.update(kv.value.as_str().as_bytes());
        h.update(&[0xfe]);
    }
    h.digest()
}
