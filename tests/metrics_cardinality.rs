//! Cardinality budgets and exporter failures.

mod common;
use bizsignal::config::{InstrumentKind, UserMetricConfig};
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Samples of one Prometheus text exposition: (name, labels) → value.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        // Label values here never contain commas or quotes.
        let labels = labels
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push((name.to_string(), labels, value.parse().unwrap()));
    }
    out
}

async fn metrics_text(srv: &Server) -> String {
    srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_100_folds_10000_values_into_one_overflow_series() {
    let srv = Server::start_with(|c| {
        c.metrics.user_defined.push(UserMetricConfig {
            name: "orders.placed".into(),
            instrument: InstrumentKind::Counter,
            source: "business.records.ordered".into(),
            unit: "{order}".into(),
            description: "Orders placed, by customer.".into(),
            process: None,
            dimensions: vec!["customer.id".into()],
            cardinality_limit: Some(100),
        });
    })
    .await;
    let t0 = now();
    for batch in 0..10 {
        let records: Vec<_> = (0..1000)
            .map(|i| {
                let n = batch * 1000 + i;
                (
                    t0 + n as u64,
                    "order",
                    vec![
                        ("business.process.name", s("orders")),
                        ("business.run.id", s("day-1")),
                        ("business.records.ordered", self::n(1)),
                        ("customer.id", s(&format!("c-{n}"))),
                    ],
                )
            })
            .collect();
        let (st, body) = srv.post_json("/v1/logs", &logs_json("shop", &records)).await;
        assert_eq!(st, 200, "{body}");
    }
    srv.wait_run("orders", "day-1", Duration::from_secs(10), |r| r["counts"]["ordered"] == 10_000).await;

    let text = metrics_text(&srv).await;
    let series: Vec<_> = samples(&text).into_iter().filter(|(n, _, _)| n == "orders_placed_total").collect();
    assert!(series.len() <= 101, "{} series", series.len());
    assert_eq!(series.len(), 101);
    let overflow: Vec<_> =
        series.iter().filter(|(_, l, _)| l.get("otel_metric_overflow").map(String::as_str) == Some("true")).collect();
    assert_eq!(overflow.len(), 1, "exactly one overflow series");
    assert_eq!(overflow[0].1.len(), 1, "the overflow series carries only otel_metric_overflow");
    assert_eq!(overflow[0].2, 9_900.0);
    assert_eq!(series.iter().map(|(_, _, v)| v).sum::<f64>(), 10_000.0);
    let counted = samples(&text)
        .into_iter()
        .find(|(n, l, _)| {
            n == "bizsignal_metrics_overflow_total" && l.get("metric").map(String::as_str) == Some("orders.placed")
        })
        .expect("overflow self-metric");
    assert_eq!(counted.2, 9_900.0);
    // The built-in metric of the same records is unaffected (one series).
    assert!(text.contains("business_process_records_total{business_process_name=\"orders\",business_records_outcome=\"ordered\"} 10000"), "{text}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_failures_are_counted_and_never_block_intake() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let srv = Server::start_with(|c| {
        c.metrics.otlp.endpoint = Some(endpoint);
        c.metrics.otlp.interval = Some(Duration::from_millis(100));
        c.metrics.otlp.timeout = Some(Duration::from_millis(500));
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    loop {
        i += 1;
        let run = format!("r-{i}");
        let started = Instant::now();
        let (st, body) = srv
            .post_json(
                "/v1/logs",
                &logs_json(
                    "svc",
                    &[(
                        now(),
                        "x",
                        vec![
                            ("business.process.name", s("p")),
                            ("business.run.id", s(&run)),
                            ("business.records.ok", n(1)),
                        ],
                    )],
                ),
            )
            .await;
        assert_eq!(st, 200, "{body}");
        assert!(started.elapsed() < Duration::from_secs(2), "intake is not held up by the exporter");
        srv.wait_run("p", &run, Duration::from_secs(5), |r| r["counts"]["ok"] == 1).await;
        let failures = samples(&metrics_text(&srv).await)
            .into_iter()
            .find(|(n, _, _)| n == "bizsignal_metrics_export_failures_total")
            .map(|x| x.2)
            .unwrap_or(0.0);
        if failures >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "export failures were not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    srv.stop().await;
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples(text).into_iter().find(|(n, l, _)| n == name && *l == want).map(|x| x.2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resets_counters_and_reseeds_gauges_and_rejections_have_reasons() {
    let mut srv = Server::start().await;
    let rec = |run: &str, extra: Vec<(&'static str, serde_json::Value)>| {
        let mut a = vec![("business.process.name", s("imp")), ("business.run.id", s(run))];
        a.extend(extra);
        logs_json("svc", &[(now(), "x", a)])
    };
    let (st, _) = srv
        .post_json(
            "/v1/logs",
            &rec("open-1", vec![("business.run.status", s("started")), ("business.records.ok", n(5))]),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = srv.post_json("/v1/logs", &rec("done-1", vec![("business.run.status", s("succeeded"))])).await;
    assert_eq!(st, 200);
    let (st, body) = srv.post_json("/v1/logs", &rec("bad", vec![("business.records.ok", s("lots"))])).await;
    assert_eq!(st, 200);
    assert!(body.contains("rejected"), "{body}");
    srv.wait_run("imp", "done-1", Duration::from_secs(5), |r| r["status"] == "succeeded").await;
    let done = srv.run("imp", "done-1").await.unwrap();
    let t = metrics_text(&srv).await;
    let p = [("business_process_name", "imp")];
    assert_eq!(value(&t, "business_process_runs_started_total", &p), Some(2.0));
    assert_eq!(value(&t, "business_process_runs_active", &p), Some(1.0));
    assert_eq!(value(&t, "bizsignal_records_rejected_total", &[("reason", "invalid_number")]), Some(1.0));
    assert_eq!(value(&t, "bizsignal_records_rejected_total", &[("reason", "invalid_id")]), Some(0.0));
    let last = value(&t, "business_process_last_success_time_seconds", &p).unwrap();
    let ended: jiff::Timestamp = done["ended_at"].as_str().unwrap().parse().unwrap();
    assert!((last - ended.as_nanosecond() as f64 / 1e9).abs() < 1e-6);

    srv.restart_with(|_| {}).await;
    let t = metrics_text(&srv).await;
    // Counters start again from zero (a counter reset); gauges are re-seeded.
    assert_eq!(value(&t, "business_process_runs_started_total", &p), None);
    assert_eq!(
        value(
            &t,
            "business_process_records_total",
            &[("business_process_name", "imp"), ("business_records_outcome", "ok")]
        ),
        None
    );
    assert_eq!(value(&t, "business_process_runs_active", &p), Some(1.0));
    assert_eq!(value(&t, "business_process_last_success_time_seconds", &p), Some(last));
    // The open run ends after the restart: finished once, active back to 0, not started again.
    let (st, _) = srv.post_json("/v1/logs", &rec("open-1", vec![("business.run.status", s("failed"))])).await;
    assert_eq!(st, 200);
    srv.wait_run("imp", "open-1", Duration::from_secs(5), |r| r["status"] == "failed").await;
    let t = metrics_text(&srv).await;
    assert_eq!(value(&t, "business_process_runs_active", &p), Some(0.0));
    assert_eq!(value(&t, "business_process_runs_started_total", &p), None);
    assert_eq!(
        value(
            &t,
            "business_process_runs_finished_total",
            &[("business_process_name", "imp"), ("business_run_outcome", "failed")]
        ),
        Some(1.0)
    );
    srv.stop().await;
}
