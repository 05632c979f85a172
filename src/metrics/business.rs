//! The tracker observer that turns committed run changes into business
//! metrics. Everything is derived from before/after diffs and the committed
//! signals (never from storage), on the tracker thread, so it stays cheap.

use super::user::UserMetric;
use super::{Budget, SelfMetrics};
use crate::runs::run::{ProcessRun, RunStatus, Violation};
use crate::runs::tracker::{Observer, RunChange};
use crate::signal::{Fact, Signal};
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};
use opentelemetry::KeyValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const PROCESS: &str = "business.process.name";
pub const OUTCOME: &str = "business.run.outcome";
pub const RECORD_OUTCOME: &str = "business.records.outcome";
pub const MILESTONE: &str = "business.milestone";
pub const RULE: &str = "business.expectation.rule";

/// Bucket boundaries (seconds) of `business.process.run.duration`.
pub const DURATION_BUCKETS: [f64; 14] =
    [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0];

struct Inst<I> {
    i: I,
    budget: Arc<Budget>,
}

impl<I> Inst<I> {
    fn new(i: I, name: &str, limit: usize, budgets: &mut Vec<Arc<Budget>>) -> Self {
        let budget = Arc::new(Budget::new(name, limit));
        budgets.push(budget.clone());
        Inst { i, budget }
    }
}

pub struct BusinessMetrics {
    started: Inst<Counter<u64>>,
    finished: Inst<Counter<u64>>,
    duration: Inst<Histogram<f64>>,
    active: Inst<UpDownCounter<i64>>,
    stalled: Inst<UpDownCounter<i64>>,
    records: Inst<Counter<f64>>,
    milestones: Inst<Counter<u64>>,
    violations: Inst<Counter<u64>>,
    last_success: Inst<Gauge<f64>>,
    progress: Inst<Gauge<f64>>,
    user: Vec<UserMetric>,
    /// Latest successful run end per process (unix ns); the gauge reports the maximum.
    last_success_ns: Mutex<HashMap<String, i64>>,
}

impl BusinessMetrics {
    /// Creates the catalogue's instruments (and the user-defined ones) on
    /// `meter`; every budget is added to `budgets` for the overflow self-metric.
    pub fn new(meter: &Meter, limit: usize, user: Vec<UserMetric>, budgets: &mut Vec<Arc<Budget>>) -> Self {
        let b = budgets;
        BusinessMetrics {
            started: Inst::new(
                meter
                    .u64_counter("business.process.runs.started")
                    .with_unit("{run}")
                    .with_description("Process runs started.")
                    .build(),
                "business.process.runs.started",
                limit,
                b,
            ),
            finished: Inst::new(
                meter
                    .u64_counter("business.process.runs.finished")
                    .with_unit("{run}")
                    .with_description("Process runs finished, by outcome.")
                    .build(),
                "business.process.runs.finished",
                limit,
                b,
            ),
            duration: Inst::new(
                meter
                    .f64_histogram("business.process.run.duration")
                    .with_unit("s")
                    .with_description("Duration of finished process runs.")
                    .build(),
                "business.process.run.duration",
                limit,
                b,
            ),
            active: Inst::new(
                meter
                    .i64_up_down_counter("business.process.runs.active")
                    .with_unit("{run}")
                    .with_description("Process runs not yet finished (running or stalled).")
                    .build(),
                "business.process.runs.active",
                limit,
                b,
            ),
            stalled: Inst::new(
                meter
                    .i64_up_down_counter("business.process.runs.stalled")
                    .with_unit("{run}")
                    .with_description("Process runs currently stalled.")
                    .build(),
                "business.process.runs.stalled",
                limit,
                b,
            ),
            records: Inst::new(
                meter
                    .f64_counter("business.process.records")
                    .with_unit("{record}")
                    .with_description("Business records handled, by outcome.")
                    .build(),
                "business.process.records",
                limit,
                b,
            ),
            milestones: Inst::new(
                meter
                    .u64_counter("business.process.milestones")
                    .with_unit("{milestone}")
                    .with_description("Milestones reached (first time per run).")
                    .build(),
                "business.process.milestones",
                limit,
                b,
            ),
            violations: Inst::new(
                meter
                    .u64_counter("business.process.violations")
                    .with_unit("{violation}")
                    .with_description("Expectation violations, by rule.")
                    .build(),
                "business.process.violations",
                limit,
                b,
            ),
            last_success: Inst::new(
                meter
                    .f64_gauge("business.process.last_success.time")
                    .with_unit("s")
                    .with_description("End time (unix seconds) of the latest successful run.")
                    .build(),
                "business.process.last_success.time",
                limit,
                b,
            ),
            progress: Inst::new(
                meter
                    .f64_gauge("business.process.run.progress")
                    .with_unit("1")
                    .with_description("Progress ratio (done/total) of the latest updated run.")
                    .build(),
                "business.process.run.progress",
                limit,
                b,
            ),
            user,
            last_success_ns: Mutex::new(HashMap::new()),
        }
    }

    /// Seeds the gauges from the state bizsignal restarts with: open runs
    /// (active and stalled counts) and the latest success per process.
    pub fn seed(&self, open_runs: &[ProcessRun], last_successes: &[(String, i64)]) {
        for r in open_runs {
            self.status_delta(&r.process, None, Some(r.status));
        }
        for (p, t) in last_successes {
            self.success(p, *t);
        }
    }

    fn success(&self, process: &str, end_ns: i64) {
        let mut m = self.last_success_ns.lock().unwrap_or_else(|e| e.into_inner());
        let cur = m.entry(process.to_string()).or_insert(end_ns);
        *cur = (*cur).max(end_ns);
        let attrs = [KeyValue::new(PROCESS, process.to_string())];
        self.last_success.i.record(*cur as f64 / 1e9, self.last_success.budget.admit(&attrs));
    }

    /// Moves a run from status `from` (None: not counted yet) to `to` (None: gone).
    fn status_delta(&self, process: &str, from: Option<RunStatus>, to: Option<RunStatus>) {
        let open = |s: Option<RunStatus>| s.is_some_and(|s| !s.is_terminal()) as i64;
        let stalled = |s: Option<RunStatus>| (s == Some(RunStatus::Stalled)) as i64;
        let (da, ds) = (open(to) - open(from), stalled(to) - stalled(from));
        if da == 0 && ds == 0 && from.is_some() {
            return;
        }
        let attrs = [KeyValue::new(PROCESS, process.to_string())];
        // A process's first run creates its active series even at 0, so "no active run" is visible.
        if da != 0 || from.is_none() {
            self.active.i.add(da, self.active.budget.admit(&attrs));
        }
        if ds != 0 {
            self.stalled.i.add(ds, self.stalled.budget.admit(&attrs));
        }
    }

    /// Records handled, summed per process and outcome over the commit
    /// first: one counter add per series rather than per fact (each add
    /// builds, hashes and budget-checks its attribute set).
    fn records(&self, signals: &[(&Signal, &str)]) {
        let mut sums: Vec<(&str, &str, f64)> = Vec::new();
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        for (s, _) in signals {
            for f in &s.facts {
                if let Fact::Records { outcome, count } = f {
                    let i = *index.entry((s.process.as_str(), outcome.as_str())).or_insert_with(|| {
                        sums.push((s.process.as_str(), outcome.as_str(), 0.0));
                        sums.len() - 1
                    });
                    sums[i].2 += count;
                }
            }
        }
        for (process, outcome, n) in sums {
            let attrs =
                [KeyValue::new(PROCESS, process.to_string()), KeyValue::new(RECORD_OUTCOME, outcome.to_string())];
            self.records.i.add(n, self.records.budget.admit(&attrs));
        }
    }

    fn violation(&self, process: &str, v: &Violation) {
        let attrs = [KeyValue::new(PROCESS, process.to_string()), KeyValue::new(RULE, v.rule.clone())];
        self.violations.i.add(1, self.violations.budget.admit(&attrs));
    }

    /// One changed run; `prev` is what it was (or what it continues, for a
    /// run that absorbed a trace-keyed run), `absorbed` the runs merged into it.
    fn change(&self, prev: Option<&ProcessRun>, absorbed: &[&ProcessRun], after: &ProcessRun, now_ns: i64) {
        let process = &after.process;
        let pattr = || KeyValue::new(PROCESS, process.clone());
        if prev.is_none() {
            self.started.i.add(1, self.started.budget.admit(&[pattr()]));
        }
        self.status_delta(process, prev.map(|p| p.status), Some(after.status));
        if after.status.is_terminal() && prev.is_none_or(|p| !p.status.is_terminal()) {
            let attrs = [pattr(), KeyValue::new(OUTCOME, after.status.as_str())];
            self.finished.i.add(1, self.finished.budget.admit(&attrs));
            self.duration.i.record(after.duration_seconds(now_ns), self.duration.budget.admit(&attrs));
            if after.status == RunStatus::Succeeded {
                self.success(process, after.ended_at_ns().unwrap_or(now_ns));
            }
        }
        let earlier = || prev.into_iter().chain(absorbed.iter().copied());
        for m in &after.milestones {
            if !earlier().any(|r| r.milestones.iter().any(|x| x.name == m.name)) {
                let attrs = [pattr(), KeyValue::new(MILESTONE, m.name.clone())];
                self.milestones.i.add(1, self.milestones.budget.admit(&attrs));
            }
        }
        for v in &after.violations {
            if !earlier().any(|r| r.violations.iter().any(|x| x.rule == v.rule)) {
                self.violation(process, v);
            }
        }
        if let Some(ratio) = after.progress_ratio() {
            if prev.and_then(|p| p.progress_ratio()) != Some(ratio)
                || prev.is_some_and(|p| p.progress_done != after.progress_done)
            {
                self.progress.i.record(ratio, self.progress.budget.admit(&[pattr()]));
            }
        }
    }
}

impl Observer for BusinessMetrics {
    fn committed(
        &self,
        signals: &[(&Signal, &str)],
        changes: &[RunChange],
        process_violations: &[(String, Violation)],
    ) {
        let now = crate::now_ns();
        self.records(signals);
        for (s, _) in signals {
            for u in &self.user {
                u.observe(s);
            }
        }
        // A trace-keyed run merged into a named run shows up with before == after.
        let is_merged = |c: &RunChange| c.before.as_ref().is_some_and(|b| Arc::ptr_eq(b, &c.after));
        let merged: Vec<&ProcessRun> = changes.iter().filter(|c| is_merged(c)).map(|c| c.after.as_ref()).collect();
        let live: Vec<&RunChange> = changes.iter().filter(|c| !is_merged(c)).collect();
        // Which live run absorbed each merged run (its trace id is among the live run's).
        let mut continues: Vec<Option<&ProcessRun>> = vec![None; live.len()];
        let mut absorbed: Vec<Vec<&ProcessRun>> = vec![Vec::new(); live.len()];
        for m in &merged {
            let target =
                live.iter().position(|c| c.after.process == m.process && c.after.trace_ids.contains(m.run_id.as_str()));
            if let Some(i) = target {
                absorbed[i].push(m);
                if live[i].before.is_none() && continues[i].is_none() {
                    // The new named run continues the merged run: not a new start.
                    continues[i] = Some(m);
                    continue;
                }
            }
            // The merged run's own lifecycle ends here without finishing.
            self.status_delta(&m.process, Some(m.status), None);
        }
        for (i, c) in live.iter().enumerate() {
            let prev = c.before.as_deref().or(continues[i]);
            self.change(prev, &absorbed[i], &c.after, now);
        }
        for (p, v) in process_violations {
            self.violation(p, v);
        }
    }
}

/// Registers the self-metrics (`bizsignal.*`) as observable instruments
/// reading the atomics, plus the storage latency histogram.
pub fn register_self_metrics(meter: &Meter, m: &Arc<SelfMetrics>, budgets: Vec<Arc<Budget>>) {
    use crate::classify::REJECT_REASONS;
    use std::sync::atomic::Ordering::Relaxed;
    type Getter = fn(&SelfMetrics) -> u64;
    let counters: [(&'static str, &'static str, &'static str, Getter); 19] = [
        (
            "bizsignal.requests.refused",
            "{request}",
            "Requests refused with a retryable status because the pipeline was full.",
            |m| m.requests_refused_busy.load(Relaxed),
        ),
        (
            "bizsignal.requests.memory_limited",
            "{request}",
            "Intake requests refused with a retryable status because in-flight intake memory was at limits.max_inflight_bytes.",
            |m| m.requests_refused_memory.load(Relaxed),
        ),
        (
            "bizsignal.requests.rate_limited",
            "{request}",
            "Intake requests refused by the per-client rate limit (limits.requests_per_second_per_client).",
            |m| m.requests_rate_limited.load(Relaxed),
        ),
        (
            "bizsignal.requests.invalid",
            "{request}",
            "Requests refused as undecodable or of an unknown content type.",
            |m| m.requests_invalid.load(Relaxed),
        ),
        (
            "bizsignal.requests.too_large",
            "{request}",
            "Requests refused as too large (before or after decompression).",
            |m| m.requests_too_large.load(Relaxed),
        ),
        ("bizsignal.spans.received", "{span}", "Spans received over OTLP.", |m| m.spans_received.load(Relaxed)),
        ("bizsignal.logs.received", "{log_record}", "Log records received over OTLP.", |m| {
            m.logs_received.load(Relaxed)
        }),
        ("bizsignal.events.received", "{event}", "Events received on POST /api/v1/events.", |m| {
            m.events_received.load(Relaxed)
        }),
        ("bizsignal.signals.classified", "{signal}", "Records classified as business signals.", |m| {
            m.signals_classified.load(Relaxed)
        }),
        (
            "bizsignal.records.discarded",
            "{record}",
            "Records without business meaning, dropped after classification.",
            |m| m.records_discarded.load(Relaxed),
        ),
        ("bizsignal.signals.duplicate", "{signal}", "Signals delivered again and ignored.", |m| {
            m.signals_duplicate.load(Relaxed)
        }),
        ("bizsignal.storage.commits", "{commit}", "Batches committed to storage.", |m| m.storage_commits.load(Relaxed)),
        ("bizsignal.storage.failures", "{commit}", "Storage writes that failed.", |m| m.storage_failures.load(Relaxed)),
        (
            "bizsignal.storage.journal.discarded",
            "By",
            "Bytes cut off the journal or spool at start-up: a record torn by a crash (never acknowledged) or corrupted on disk.",
            |m| m.journal_discarded_bytes.load(Relaxed),
        ),
        ("bizsignal.metrics.export.failures", "{export}", "OTLP metric exports that failed.", |m| {
            m.export_failures.load(Relaxed)
        }), // The ClickHouse writer; zero with the SQLite backend.
        (
            "bizsignal.clickhouse.rows_written",
            "{row}",
            "Event rows drained from the spool into ClickHouse (replay progress).",
            |m| m.clickhouse.replayed_rows.load(Relaxed),
        ),
        (
            "bizsignal.clickhouse.inserts",
            "{insert}",
            "Inserts into business_events acknowledged by ClickHouse (one per writer group).",
            |m| m.clickhouse.event_inserts.load(Relaxed),
        ),
        ("bizsignal.clickhouse.retries", "{insert}", "ClickHouse inserts retried after a transient failure.", |m| {
            m.clickhouse.retries.load(Relaxed)
        }),
        (
            "bizsignal.clickhouse.dead_lettered",
            "{batch}",
            "Spooled batches ClickHouse refused permanently (see the dead-letter file).",
            |m| m.clickhouse.dead_lettered.load(Relaxed),
        ),
    ];
    for (name, unit, desc, get) in counters {
        let m = m.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(desc)
            .with_callback(move |o| o.observe(get(&m), &[]))
            .build();
    }
    let mm = m.clone();
    meter
        .u64_observable_counter("bizsignal.records.rejected")
        .with_unit("{record}")
        .with_description("Business records rejected as invalid (partial success), by reason.")
        .with_callback(move |o| {
            for (i, r) in REJECT_REASONS.iter().enumerate() {
                o.observe(mm.rejected_by_reason[i].load(Relaxed), &[KeyValue::new("reason", *r)]);
            }
        })
        .build();
    // The ClickHouse spool gauges; zero with the SQLite backend.
    let ch_gauges: [(&'static str, &'static str, &'static str, fn(&SelfMetrics) -> f64); 3] = [
        ("bizsignal.clickhouse.spool", "By", "Bytes in the ClickHouse spool (durable, not yet in ClickHouse).", |m| {
            m.clickhouse.spool_bytes.load(Relaxed) as f64
        }),
        ("bizsignal.clickhouse.spool.records", "{batch}", "Committed batches in the ClickHouse spool.", |m| {
            m.clickhouse.spool_records.load(Relaxed) as f64
        }),
        ("bizsignal.clickhouse.spool.oldest_age", "s", "Age of the oldest spooled batch.", |m| {
            let oldest = m.clickhouse.spool_oldest_ns.load(Relaxed);
            if oldest == 0 {
                0.0
            } else {
                (crate::now_ns() as u64).saturating_sub(oldest) as f64 / 1e9
            }
        }),
    ];
    for (name, unit, desc, get) in ch_gauges {
        let m = m.clone();
        meter
            .f64_observable_gauge(name)
            .with_unit(unit)
            .with_description(desc)
            .with_callback(move |o| o.observe(get(&m), &[]))
            .build();
    }
    let mm = m.clone();
    meter
        .i64_observable_gauge("bizsignal.storage.journal")
        .with_unit("By")
        .with_description("Bytes in the SQLite journal: acknowledged, durable, not yet applied to the database.")
        .with_callback(move |o| o.observe(mm.journal_bytes.load(Relaxed) as i64, &[]))
        .build();
    let mm = m.clone();
    meter
        .i64_observable_gauge("bizsignal.dedup.ids")
        .with_unit("{signal}")
        .with_description(
            "Signal ids held in memory for de-duplication (the signals of the last pipeline.dedup_window).",
        )
        .with_callback(move |o| o.observe(mm.dedup_ids.load(Relaxed) as i64, &[]))
        .build();
    let mm = m.clone();
    meter
        .i64_observable_gauge("bizsignal.queue.depth")
        .with_unit("{batch}")
        .with_description("Batches waiting for the run tracker.")
        .with_callback(move |o| o.observe(mm.queue_depth.load(Relaxed) as i64, &[]))
        .build();
    let mm = m.clone();
    meter
        .i64_observable_gauge("bizsignal.intake.inflight")
        .with_unit("By")
        .with_description("Bytes reserved by intake requests in flight (limits.max_inflight_bytes).")
        .with_callback(move |o| o.observe(mm.inflight_bytes.load(Relaxed) as i64, &[]))
        .build();
    meter
        .u64_observable_counter("bizsignal.metrics.overflow")
        .with_unit("{measurement}")
        .with_description(
            "Measurements folded into a metric's overflow series (cardinality budget exceeded), by metric.",
        )
        .with_callback(move |o| {
            for b in &budgets {
                let n = b.overflowed.load(Relaxed);
                if n > 0 {
                    o.observe(n, &[KeyValue::new("metric", b.metric.clone())]);
                }
            }
        })
        .build();
    let h = meter
        .f64_histogram("bizsignal.storage.write.duration")
        .with_unit("s")
        .with_description("Storage write (commit) latency.")
        .with_boundaries(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        .build();
    let _ = m.storage_write_seconds.set(h);
}

#[cfg(test)]
mod tests {
    use crate::config::MetricsConfig;
    use crate::metrics::export::MetricsPipeline;
    use crate::metrics::SelfMetrics;
    use crate::runs::tracker::Observer;
    use crate::signal::{Fact, Signal, SignalKind};
    use std::sync::Arc;

    fn signal(id: u128, process: &str, records: &[(&str, f64)]) -> Signal {
        Signal {
            id,
            kind: SignalKind::Log,
            process: process.into(),
            run_id: Some("r1".into()),
            trace_id: String::new(),
            span_id: String::new(),
            name: "log".into(),
            start_ns: 1,
            time_ns: 1,
            text: String::new(),
            service: "svc".into(),
            attributes: Default::default(),
            resource: vec![].into(),
            facts: records.iter().map(|(o, n)| Fact::Records { outcome: o.to_string(), count: *n }).collect(),
        }
    }

    /// The value of the records counter for one process and outcome.
    fn records(text: &str, process: &str, outcome: &str) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with("business_process_records_total{"))
            .find(|l| {
                l.contains(&format!("business_process_name=\"{process}\""))
                    && l.contains(&format!("business_records_outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn records_summed_within_a_commit_keep_process_and_outcome_apart() {
        let p = MetricsPipeline::build(&MetricsConfig::default(), Arc::new(SelfMetrics::default())).unwrap();
        let signals = [
            signal(1, "import", &[("ok", 2.0), ("failed", 1.0)]),
            signal(2, "import", &[("ok", 3.0)]),
            signal(3, "export", &[("ok", 7.0)]),
        ];
        let refs: Vec<(&Signal, &str)> = signals.iter().map(|s| (s, "r1")).collect();
        p.business.committed(&refs, &[], &[]);
        p.business.committed(&refs[..1], &[], &[]);
        let text = p.render(false);
        assert_eq!(records(&text, "import", "ok"), Some(7.0), "{text}");
        assert_eq!(records(&text, "import", "failed"), Some(2.0));
        assert_eq!(records(&text, "export", "ok"), Some(7.0));
        assert_eq!(records(&text, "export", "failed"), None, "no series for what was never reported");
    }
}
