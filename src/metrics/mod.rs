//! Self-metrics (`bizsignal.*`): what came in, what was kept, what was
//! refused. Plain atomics on the hot path; rendered for Prometheus on
//! `GET /metrics`. No label here ever carries a run id.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct SelfMetrics {
    pub spans_received: AtomicU64,
    pub logs_received: AtomicU64,
    pub signals_classified: AtomicU64,
    pub records_discarded: AtomicU64,
    pub records_rejected: AtomicU64,
    pub signals_duplicate: AtomicU64,
    pub requests_refused_busy: AtomicU64,
    pub requests_invalid: AtomicU64,
    pub requests_too_large: AtomicU64,
    pub storage_commits: AtomicU64,
    pub storage_failures: AtomicU64,
    pub storage_commit_nanos: AtomicU64,
    pub queue_depth: AtomicU64,
    /// ClickHouse spool and writer (rendered only with `storage.kind: clickhouse`).
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
    pub retries: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl ClickHouseMetrics {
    fn render(&self, s: &mut String) {
        if !self.enabled.load(Relaxed) {
            return;
        }
        let oldest = self.spool_oldest_ns.load(Relaxed);
        let age = if oldest == 0 {
            0.0
        } else {
            (crate::now_ns() as u64).saturating_sub(oldest) as f64 / 1e9
        };
        let gauges: [(&str, &str, String); 3] = [
            (
                "bizsignal_clickhouse_spool_bytes",
                "Bytes in the ClickHouse spool (durable, not yet in ClickHouse).",
                self.spool_bytes.load(Relaxed).to_string(),
            ),
            (
                "bizsignal_clickhouse_spool_records",
                "Committed batches in the ClickHouse spool.",
                self.spool_records.load(Relaxed).to_string(),
            ),
            (
                "bizsignal_clickhouse_spool_oldest_age_seconds",
                "Age of the oldest spooled batch.",
                age.to_string(),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters: [(&str, &str, &AtomicU64); 3] = [
            (
                "bizsignal_clickhouse_rows_written_total",
                "Event rows drained from the spool into ClickHouse (replay progress).",
                &self.replayed_rows,
            ),
            (
                "bizsignal_clickhouse_retries_total",
                "ClickHouse inserts retried after a transient failure.",
                &self.retries,
            ),
            (
                "bizsignal_clickhouse_dead_lettered_total",
                "Spooled batches ClickHouse refused permanently (see the dead-letter file).",
                &self.dead_lettered,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
    }
}

impl SelfMetrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Prometheus text exposition (0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut s = String::new();
        let counters: [(&str, &str, &AtomicU64); 11] = [
            ("bizsignal_spans_received_total", "Spans received over OTLP.", &self.spans_received),
            ("bizsignal_logs_received_total", "Log records received over OTLP.", &self.logs_received),
            ("bizsignal_signals_classified_total", "Records classified as business signals.", &self.signals_classified),
            ("bizsignal_records_discarded_total", "Records without business meaning, dropped after classification.", &self.records_discarded),
            ("bizsignal_records_rejected_total", "Business records rejected as invalid (partial success).", &self.records_rejected),
            ("bizsignal_signals_duplicate_total", "Signals delivered again and ignored.", &self.signals_duplicate),
            ("bizsignal_requests_refused_total", "Requests refused with a retryable status because the pipeline was full.", &self.requests_refused_busy),
            ("bizsignal_requests_invalid_total", "Requests refused as undecodable or of an unknown content type.", &self.requests_invalid),
            ("bizsignal_requests_too_large_total", "Requests refused as too large (before or after decompression).", &self.requests_too_large),
            ("bizsignal_storage_commits_total", "Batches committed to storage.", &self.storage_commits),
            ("bizsignal_storage_failures_total", "Storage commits that failed.", &self.storage_failures),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        let secs = self.storage_commit_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            s,
            "# HELP bizsignal_storage_commit_seconds_total Time spent committing to storage.\n# TYPE bizsignal_storage_commit_seconds_total counter\nbizsignal_storage_commit_seconds_total {secs}"
        );
        let _ = writeln!(
            s,
            "# HELP bizsignal_queue_depth Batches waiting for the run tracker.\n# TYPE bizsignal_queue_depth gauge\nbizsignal_queue_depth {}",
            self.queue_depth.load(Relaxed)
        );
        self.clickhouse.render(&mut s);
        s
    }
}
