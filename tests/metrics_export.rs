//! Derived business metrics and self-metrics, end to end: signals go in
//! through the real `opentelemetry-otlp` exporters, metrics come out over
//! OTLP (to a test `MetricsService` receiver) and on `GET /metrics` (parsed
//! as Prometheus text / OpenMetrics), and both show the same exact values.

mod common;
use bizsignal::config::{InstrumentKind, OtlpProtocol, ProcessExpectations, TemporalityConfig, UserMetricConfig};
use common::*;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as PV;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, Metric};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------- a test OTLP metrics receiver ----------

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

async fn start_sink() -> (Sink, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let sink = Sink::default();
    let svc = MetricsServiceServer::new(sink.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (sink, format!("http://{addr}"))
}

type Attrs = BTreeMap<String, String>;

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Attrs {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(PV::StringValue(s)) => s.clone(),
                Some(PV::BoolValue(b)) => b.to_string(),
                Some(PV::IntValue(i)) => i.to_string(),
                Some(PV::DoubleValue(d)) => d.to_string(),
                _ => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn a(pairs: &[(&str, &str)]) -> Attrs {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// One exported point: a number, or a histogram's (count, sum).
#[derive(Debug, Clone, PartialEq)]
enum Point {
    Num(f64),
    Hist { count: u64, sum: f64 },
}

/// The metrics of one export request: name → (metric, points by attributes).
fn points(req: &ExportMetricsServiceRequest) -> BTreeMap<String, (Metric, BTreeMap<Attrs, Point>)> {
    let mut out = BTreeMap::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let mut pts = BTreeMap::new();
                let num = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsDouble(d)) => *d,
                    Some(number_data_point::Value::AsInt(i)) => *i as f64,
                    None => f64::NAN,
                };
                match &m.data {
                    Some(Data::Sum(s)) => s.data_points.iter().for_each(|p| {
                        pts.insert(attrs(&p.attributes), Point::Num(num(&p.value)));
                    }),
                    Some(Data::Gauge(g)) => g.data_points.iter().for_each(|p| {
                        pts.insert(attrs(&p.attributes), Point::Num(num(&p.value)));
                    }),
                    Some(Data::Histogram(h)) => h.data_points.iter().for_each(|p| {
                        pts.insert(
                            attrs(&p.attributes),
                            Point::Hist { count: p.count, sum: p.sum.unwrap_or(f64::NAN) },
                        );
                    }),
                    _ => {}
                }
                out.insert(m.name.clone(), (m.clone(), pts));
            }
        }
    }
    out
}

fn temporality(m: &Metric) -> i32 {
    match &m.data {
        Some(Data::Sum(s)) => s.aggregation_temporality,
        Some(Data::Histogram(h)) => h.aggregation_temporality,
        _ => 0,
    }
}

impl Sink {
    /// Waits for an export that satisfies `pred`; returns its points.
    async fn wait(
        &self,
        within: Duration,
        pred: impl Fn(&BTreeMap<String, (Metric, BTreeMap<Attrs, Point>)>) -> bool,
    ) -> BTreeMap<String, (Metric, BTreeMap<Attrs, Point>)> {
        let deadline = Instant::now() + within;
        loop {
            let last = self.0.lock().unwrap().iter().rev().map(points).find(|p| pred(p));
            if let Some(p) = last {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no matching OTLP export within {within:?}; got {} exports",
                self.0.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn get(p: &BTreeMap<String, (Metric, BTreeMap<Attrs, Point>)>, name: &str, at: &Attrs) -> Option<Point> {
    p.get(name).and_then(|(_, pts)| pts.get(at).cloned())
}

// ---------- a Prometheus text-format / OpenMetrics parser ----------

#[derive(Debug, Default)]
struct Exposition {
    /// family → type
    types: BTreeMap<String, String>,
    units: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
    /// (sample name, labels) → value
    samples: BTreeMap<(String, Attrs), f64>,
    eof: bool,
}

fn parse_labels(s: &str) -> (Attrs, &str) {
    // s starts after '{'; returns the labels and the rest after '}'.
    let mut out = Attrs::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while b[i] == b' ' || b[i] == b',' {
            i += 1;
        }
        if b[i] == b'}' {
            return (out, &s[i + 1..]);
        }
        let start = i;
        while b[i] != b'=' {
            assert!(b[i].is_ascii_alphanumeric() || b[i] == b'_', "bad label name in {s:?}");
            i += 1;
        }
        let name = s[start..i].to_string();
        assert_eq!(b[i + 1], b'"', "label value must be quoted: {s:?}");
        i += 2;
        let mut v = String::new();
        loop {
            match b[i] {
                b'\\' => {
                    v.push(match b[i + 1] {
                        b'n' => '\n',
                        c => c as char,
                    });
                    i += 2;
                }
                b'"' => {
                    i += 1;
                    break;
                }
                _ => {
                    let ch = s[i..].chars().next().unwrap();
                    v.push(ch);
                    i += ch.len_utf8();
                }
            }
        }
        assert!(out.insert(name, v).is_none(), "duplicate label in {s:?}");
    }
}

fn parse_value(v: &str) -> f64 {
    match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v.parse().unwrap_or_else(|_| panic!("bad sample value {v:?}")),
    }
}

fn parse_exposition(text: &str, openmetrics: bool) -> Exposition {
    let mut e = Exposition::default();
    for line in text.lines() {
        assert!(!e.eof, "content after # EOF");
        if line.is_empty() {
            assert!(!openmetrics, "OpenMetrics has no empty lines");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            if rest == "EOF" {
                e.eof = true;
                continue;
            }
            let mut it = rest.splitn(3, ' ');
            let (kw, name, val) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap_or(""));
            match kw {
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped", "unknown"].contains(&val),
                        "bad type {val}"
                    );
                    assert!(e.types.insert(name.to_string(), val.to_string()).is_none(), "TYPE {name} twice");
                }
                "HELP" => {
                    e.help.insert(name.to_string(), val.to_string());
                }
                "UNIT" => {
                    assert!(name.ends_with(&format!("_{val}")), "OpenMetrics: {name} must end with its unit {val}");
                    e.units.insert(name.to_string(), val.to_string());
                }
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let name_end = line.find(['{', ' ']).expect("sample has a value");
        let name = &line[..name_end];
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad metric name {name:?}");
        let (labels, rest) = if line.as_bytes()[name_end] == b'{' {
            parse_labels(&line[name_end + 1..])
        } else {
            (Attrs::new(), &line[name_end..])
        };
        let mut vals = rest.split_whitespace();
        let value = parse_value(vals.next().expect("a value"));
        // The sample must belong to a declared family.
        let family = [
            name,
            name.strip_suffix("_total").unwrap_or("-"),
            name.strip_suffix("_bucket").unwrap_or("-"),
            name.strip_suffix("_sum").unwrap_or("-"),
            name.strip_suffix("_count").unwrap_or("-"),
        ]
        .into_iter()
        .find(|f| e.types.contains_key(*f))
        .unwrap_or_else(|| panic!("sample {name} without a TYPE"));
        if e.types[family] == "counter" {
            assert!(name.ends_with("_total"), "counter sample {name} must end in _total");
        }
        assert!(e.samples.insert((name.to_string(), labels), value).is_none(), "duplicate series {line}");
    }
    assert_eq!(e.eof, openmetrics, "# EOF iff OpenMetrics");
    e
}

async fn scrape(srv: &Server, openmetrics: bool) -> (String, Exposition) {
    let mut req = srv.http.get(srv.api("/metrics"));
    if openmetrics {
        req = req.header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ct.starts_with(if openmetrics { "application/openmetrics-text" } else { "text/plain; version=0.0.4" }),
        "{ct}"
    );
    let text = r.text().await.unwrap();
    let e = parse_exposition(&text, openmetrics);
    (text, e)
}

fn p(pairs: &[(&str, &str)]) -> Attrs {
    a(pairs)
}

// ---------- drivers: real SDK exporters into bizsignal ----------

/// Log records of one run: (records.imported, progress done, status).
fn send_logs(endpoint: String, process: &str, run_id: &str, tier: &str, steps: &[(i64, i64, &str)]) {
    let (tp, lp) = providers(&endpoint, Proto::Grpc, "importer");
    let logger = lp.logger("test");
    for (i, (n, done, status)) in steps.iter().enumerate() {
        let mut r = logger.create_log_record();
        r.set_body(AnyValue::from(format!("step {i}")));
        r.add_attribute("business.process.name", process.to_string());
        r.add_attribute("business.run.id", run_id.to_string());
        r.add_attribute("customer.tier", tier.to_string());
        if *n > 0 {
            r.add_attribute("business.records.imported", AnyValue::Int(*n));
        }
        if *done > 0 {
            r.add_attribute("business.progress.done", AnyValue::Int(*done));
            r.add_attribute("business.progress.total", AnyValue::Int(300));
        }
        if !status.is_empty() {
            r.add_attribute("business.run.status", status.to_string());
        }
        logger.emit(r);
    }
    lp.force_flush().unwrap();
    lp.shutdown().unwrap();
    let _ = tp.shutdown();
}

fn user_histogram() -> UserMetricConfig {
    UserMetricConfig {
        name: "import.batch.size".into(),
        instrument: InstrumentKind::Histogram,
        source: "business.records.imported".into(),
        unit: "{record}".into(),
        description: "Records per import signal.".into(),
        process: Some("import".into()),
        dimensions: vec!["customer.tier".into()],
        cardinality_limit: None,
    }
}

fn ts_seconds(v: &serde_json::Value) -> f64 {
    let t: jiff::Timestamp = v.as_str().unwrap().parse().unwrap();
    t.as_nanosecond() as f64 / 1e9
}

const P: &str = "business.process.name";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue_over_otlp_cumulative_and_on_prometheus() {
    let (sink, endpoint) = start_sink().await;
    let srv = Server::start_with(|c| {
        c.metrics.otlp.endpoint = Some(endpoint.clone());
        c.metrics.otlp.protocol = Some(OtlpProtocol::Grpc);
        c.metrics.otlp.interval = Some(Duration::from_millis(200));
        c.metrics.otlp.temporality = Some(TemporalityConfig::Cumulative);
        c.metrics.user_defined.push(user_histogram());
        c.processes.insert(
            "stuck".into(),
            ProcessExpectations { stall_after: Some(Duration::from_millis(300)), ..Default::default() },
        );
    })
    .await;
    let g = srv.grpc_endpoint();
    let e = g.clone();
    tokio::task::spawn_blocking(move || send_span_run(e.clone(), Proto::Grpc, "r-1", true)).await.unwrap();
    srv.wait_run("reconcile", "r-1", Duration::from_secs(5), |r| r["status"] == "failed").await;
    let e = g.clone();
    tokio::task::spawn_blocking(move || send_span_run(e, Proto::Grpc, "r-2", false)).await.unwrap();
    let r2 = srv.wait_run("reconcile", "r-2", Duration::from_secs(5), |r| r["status"] == "succeeded").await;
    let r1 = srv.run("reconcile", "r-1").await.unwrap();
    let e = g.clone();
    tokio::task::spawn_blocking(move || {
        send_logs(e, "import", "imp-1", "gold", &[(100, 100, "started"), (100, 200, ""), (100, 300, "succeeded")])
    })
    .await
    .unwrap();
    let imp1 = srv.wait_run("import", "imp-1", Duration::from_secs(5), |r| r["status"] == "succeeded").await;
    let e = g.clone();
    tokio::task::spawn_blocking(move || send_logs(e, "import", "imp-2", "silver", &[(50, 100, "started")]))
        .await
        .unwrap();
    srv.wait_run("import", "imp-2", Duration::from_secs(5), |r| r["counts"]["imported"] == 50).await;
    let e = g.clone();
    tokio::task::spawn_blocking(move || send_logs(e, "stuck", "s-1", "gold", &[(0, 0, "started")])).await.unwrap();
    srv.wait_run("stuck", "s-1", Duration::from_secs(5), |r| r["status"] == "stalled").await;

    let stalled = p(&[(P, "stuck")]);
    let got = sink
        .wait(Duration::from_secs(10), |m| get(m, "business.process.runs.stalled", &stalled) == Some(Point::Num(1.0)))
        .await;

    let last_r = ts_seconds(&r2["ended_at"]);
    let last_i = ts_seconds(&imp1["ended_at"]);
    let h = |count, sum| Point::Hist { count, sum };
    let n = Point::Num;
    // (OTel name, unit, attributes, Prometheus sample name, value)
    let expected: Vec<(&str, &str, Attrs, &str, Point)> = vec![
        (
            "business.process.runs.started",
            "{run}",
            p(&[(P, "reconcile")]),
            "business_process_runs_started_total",
            n(2.0),
        ),
        ("business.process.runs.started", "{run}", p(&[(P, "import")]), "business_process_runs_started_total", n(2.0)),
        ("business.process.runs.started", "{run}", p(&[(P, "stuck")]), "business_process_runs_started_total", n(1.0)),
        (
            "business.process.runs.finished",
            "{run}",
            p(&[(P, "reconcile"), ("business.run.outcome", "failed")]),
            "business_process_runs_finished_total",
            n(1.0),
        ),
        (
            "business.process.runs.finished",
            "{run}",
            p(&[(P, "reconcile"), ("business.run.outcome", "succeeded")]),
            "business_process_runs_finished_total",
            n(1.0),
        ),
        (
            "business.process.runs.finished",
            "{run}",
            p(&[(P, "import"), ("business.run.outcome", "succeeded")]),
            "business_process_runs_finished_total",
            n(1.0),
        ),
        (
            "business.process.run.duration",
            "s",
            p(&[(P, "reconcile"), ("business.run.outcome", "failed")]),
            "business_process_run_duration_seconds",
            h(1, r1["duration_seconds"].as_f64().unwrap()),
        ),
        (
            "business.process.run.duration",
            "s",
            p(&[(P, "import"), ("business.run.outcome", "succeeded")]),
            "business_process_run_duration_seconds",
            h(1, imp1["duration_seconds"].as_f64().unwrap()),
        ),
        ("business.process.runs.active", "{run}", p(&[(P, "reconcile")]), "business_process_runs_active", n(0.0)),
        ("business.process.runs.active", "{run}", p(&[(P, "import")]), "business_process_runs_active", n(1.0)),
        ("business.process.runs.active", "{run}", p(&[(P, "stuck")]), "business_process_runs_active", n(1.0)),
        ("business.process.runs.stalled", "{run}", p(&[(P, "stuck")]), "business_process_runs_stalled", n(1.0)),
        (
            "business.process.records",
            "{record}",
            p(&[(P, "reconcile"), ("business.records.outcome", "processed")]),
            "business_process_records_total",
            n(34.0),
        ),
        (
            "business.process.records",
            "{record}",
            p(&[(P, "import"), ("business.records.outcome", "imported")]),
            "business_process_records_total",
            n(350.0),
        ),
        (
            "business.process.milestones",
            "{milestone}",
            p(&[(P, "reconcile"), ("business.milestone", "fetched")]),
            "business_process_milestones_total",
            n(2.0),
        ),
        (
            "business.process.milestones",
            "{milestone}",
            p(&[(P, "reconcile"), ("business.milestone", "matched")]),
            "business_process_milestones_total",
            n(2.0),
        ),
        (
            "business.process.violations",
            "{violation}",
            p(&[(P, "stuck"), ("business.expectation.rule", "stall_after")]),
            "business_process_violations_total",
            n(1.0),
        ),
        (
            "business.process.last_success.time",
            "s",
            p(&[(P, "reconcile")]),
            "business_process_last_success_time_seconds",
            n(last_r),
        ),
        (
            "business.process.last_success.time",
            "s",
            p(&[(P, "import")]),
            "business_process_last_success_time_seconds",
            n(last_i),
        ),
        (
            "business.process.run.progress",
            "1",
            p(&[(P, "import")]),
            "business_process_run_progress_ratio",
            n(100.0 / 300.0),
        ),
        (
            "import.batch.size",
            "{record}",
            p(&[(P, "import"), ("customer.tier", "gold")]),
            "import_batch_size",
            h(3, 300.0),
        ),
        (
            "import.batch.size",
            "{record}",
            p(&[(P, "import"), ("customer.tier", "silver")]),
            "import_batch_size",
            h(1, 50.0),
        ),
        ("bizsignal.spans.received", "{span}", Attrs::new(), "bizsignal_spans_received_total", n(6.0)),
        ("bizsignal.logs.received", "{log_record}", Attrs::new(), "bizsignal_logs_received_total", n(5.0)),
        ("bizsignal.signals.classified", "{signal}", Attrs::new(), "bizsignal_signals_classified_total", n(11.0)),
        (
            "bizsignal.records.rejected",
            "{record}",
            p(&[("reason", "invalid_number")]),
            "bizsignal_records_rejected_total",
            n(0.0),
        ),
    ];
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * y.abs().max(1.0);
    let same = |got: &Point, want: &Point| match (got, want) {
        (Point::Num(x), Point::Num(y)) => close(*x, *y),
        (Point::Hist { count: c1, sum: s1 }, Point::Hist { count: c2, sum: s2 }) => c1 == c2 && close(*s1, *s2),
        _ => false,
    };
    for (name, unit, at, _, want) in &expected {
        let (m, pts) =
            got.get(*name).unwrap_or_else(|| panic!("{name} not exported; have {:?}", got.keys().collect::<Vec<_>>()));
        assert_eq!(m.unit, *unit, "{name} unit");
        assert!(!m.description.is_empty(), "{name} has a description");
        let v =
            pts.get(at).unwrap_or_else(|| panic!("{name}{at:?} missing; have {:?}", pts.keys().collect::<Vec<_>>()));
        assert!(same(v, want), "{name}{at:?}: got {v:?}, want {want:?}");
        for k in pts.keys().flat_map(|a| a.keys()) {
            assert!(!k.contains("run.id") && k != "trace_id", "{name} carries a run id attribute");
        }
    }
    // Cumulative temporality (2) on sums and histograms; monotonic counters.
    for name in [
        "business.process.runs.started",
        "business.process.records",
        "business.process.run.duration",
        "bizsignal.spans.received",
    ] {
        assert_eq!(temporality(&got[name].0), 2, "{name} is cumulative");
    }
    match &got["business.process.runs.active"].0.data {
        Some(Data::Sum(s)) => assert!(!s.is_monotonic && s.aggregation_temporality == 2),
        d => panic!("active runs is an up-down counter, got {d:?}"),
    }
    assert!(matches!(got["business.process.last_success.time"].0.data, Some(Data::Gauge(_))));

    // The same values on /metrics, in both formats.
    for om in [false, true] {
        let (text, e) = scrape(&srv, om).await;
        for (name, _, at, prom, want) in &expected {
            let labels: Attrs = at.iter().map(|(k, v)| (k.replace('.', "_"), v.clone())).collect();
            let got = match want {
                Point::Num(_) => Point::Num(
                    *e.samples
                        .get(&(prom.to_string(), labels.clone()))
                        .unwrap_or_else(|| panic!("{prom}{labels:?} ({name}) missing:\n{text}")),
                ),
                Point::Hist { .. } => {
                    let count = e.samples[&(format!("{prom}_count"), labels.clone())];
                    let mut inf = labels.clone();
                    inf.insert("le".into(), "+Inf".into());
                    assert_eq!(e.samples[&(format!("{prom}_bucket"), inf)], count, "{prom} +Inf bucket equals count");
                    Point::Hist { count: count as u64, sum: e.samples[&(format!("{prom}_sum"), labels.clone())] }
                }
            };
            assert!(same(&got, want), "{prom}{labels:?}: got {got:?}, want {want:?}");
        }
        let family = |f: &str| e.types.get(f).cloned();
        if om {
            assert_eq!(family("business_process_runs_started").as_deref(), Some("counter"));
            assert_eq!(e.units.get("business_process_run_duration_seconds").map(String::as_str), Some("seconds"));
        } else {
            assert_eq!(family("business_process_runs_started_total").as_deref(), Some("counter"));
        }
        assert_eq!(family("business_process_run_duration_seconds").as_deref(), Some("histogram"));
        assert_eq!(family("business_process_runs_active").as_deref(), Some("gauge"));
        assert_eq!(family("business_process_last_success_time_seconds").as_deref(), Some("gauge"));
        assert!(!text.contains("r-1") && !text.contains("imp-1"), "no run id in any label");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_temporality_exports_increments() {
    let (sink, endpoint) = start_sink().await;
    let srv = Server::start_with(|c| {
        c.metrics.otlp.endpoint = Some(endpoint.clone());
        c.metrics.otlp.interval = Some(Duration::from_millis(150));
        c.metrics.otlp.temporality = Some(TemporalityConfig::Delta);
    })
    .await;
    let g = srv.grpc_endpoint();
    let started = p(&[(P, "reconcile")]);
    let records = p(&[(P, "reconcile"), ("business.records.outcome", "processed")]);
    for (i, run) in ["d-1", "d-2"].into_iter().enumerate() {
        let e = g.clone();
        tokio::task::spawn_blocking(move || send_span_run(e, Proto::Grpc, run, false)).await.unwrap();
        srv.wait_run("reconcile", run, Duration::from_secs(5), |r| r["status"] == "succeeded").await;
        // Wait until the exported deltas add up to what has been sent so far.
        let want = (i + 1) as f64;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let total: f64 = sink
                .0
                .lock()
                .unwrap()
                .iter()
                .map(points)
                .filter_map(|m| match get(&m, "business.process.runs.started", &started) {
                    Some(Point::Num(v)) => Some(v),
                    _ => None,
                })
                .sum();
            if total == want {
                break;
            }
            assert!(total < want, "deltas add up to more than sent: {total}");
            assert!(Instant::now() < deadline, "deltas did not reach {want}: {total}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let all: Vec<_> = sink.0.lock().unwrap().iter().map(points).collect();
    let sum = |name: &str, at: &Attrs| -> f64 {
        all.iter()
            .filter_map(|m| match get(m, name, at) {
                Some(Point::Num(v)) => Some(v),
                Some(Point::Hist { count, .. }) => Some(count as f64),
                None => None,
            })
            .sum()
    };
    assert_eq!(sum("business.process.records", &records), 34.0);
    assert_eq!(
        sum("business.process.run.duration", &p(&[(P, "reconcile"), ("business.run.outcome", "succeeded")])),
        2.0
    );
    // No single export carries both starts: each interval reports its increment.
    assert!(all.iter().all(|m| get(m, "business.process.runs.started", &started).is_none_or(|v| v == Point::Num(1.0))));
    for m in &all {
        for name in ["business.process.runs.started", "business.process.records", "business.process.run.duration"] {
            if let Some((metric, _)) = m.get(name) {
                assert_eq!(temporality(metric), 1, "{name} is delta");
            }
        }
        if let Some((metric, _)) = m.get("business.process.runs.active") {
            assert_eq!(temporality(metric), 2, "up-down counters stay cumulative under delta preference");
        }
    }
    // /metrics stays cumulative whatever the OTLP temporality.
    let (_, e) = scrape(&srv, false).await;
    assert_eq!(
        e.samples[&("business_process_runs_started_total".to_string(), a(&[("business_process_name", "reconcile")]))],
        2.0
    );
    srv.stop().await;
}
