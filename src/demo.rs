//! `bizsignal demo`: realistic business telemetry sent through the real
//! OpenTelemetry SDK and OTLP exporter, so a newcomer sees runs appear.
//!
//! - `product-import` reports progress and skipped rows through logs, then succeeds;
//! - `invoice-reconciliation` passes milestones in spans and ends failed;
//! - `nightly-report` succeeds.

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{LogExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("export to {endpoint} failed: {reason}")]
    Export { endpoint: String, reason: String },
}

pub struct DemoOptions {
    pub endpoint: String,
    pub protocol: Protocol,
    /// Pause between the import's progress steps.
    pub pace: Duration,
    /// Suffix for run ids; defaults to the current time.
    pub run_suffix: Option<String>,
}

fn providers(o: &DemoOptions, service: &str) -> Result<(SdkTracerProvider, SdkLoggerProvider), DemoError> {
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(KeyValue::new("deployment.environment.name", "demo"))
        .build();
    let ex = |e: opentelemetry_otlp::ExporterBuildError| DemoError::Exporter(e.to_string());
    let base = o.endpoint.trim_end_matches('/');
    let (spans, logs) = match o.protocol {
        Protocol::Grpc => (
            SpanExporter::builder()
                .with_tonic()
                .with_endpoint(base)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(ex)?,
            LogExporter::builder()
                .with_tonic()
                .with_endpoint(base)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(ex)?,
        ),
        Protocol::Http => (
            SpanExporter::builder().with_http().with_endpoint(format!("{base}/v1/traces")).build().map_err(ex)?,
            LogExporter::builder().with_http().with_endpoint(format!("{base}/v1/logs")).build().map_err(ex)?,
        ),
    };
    let tp = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build();
    let lp = SdkLoggerProvider::builder().with_resource(resource).with_batch_exporter(logs).build();
    Ok((tp, lp))
}

fn flush(o: &DemoOptions, tp: &SdkTracerProvider, lp: &SdkLoggerProvider) -> Result<(), DemoError> {
    let err = |e: opentelemetry_sdk::error::OTelSdkError| DemoError::Export {
        endpoint: o.endpoint.clone(),
        reason: e.to_string(),
    };
    tp.force_flush().map_err(err)?;
    lp.force_flush().map_err(err)?;
    Ok(())
}

fn log(lp: &SdkLoggerProvider, severity: Severity, body: &str, attrs: Vec<(&'static str, AnyValue)>) {
    let logger = lp.logger("bizsignal-demo");
    let mut rec = logger.create_log_record();
    rec.set_severity_number(severity);
    rec.set_severity_text(if severity == Severity::Warn { "WARN" } else { "INFO" });
    rec.set_body(AnyValue::from(body.to_string()));
    rec.set_timestamp(std::time::SystemTime::now());
    for (k, v) in attrs {
        rec.add_attribute(k, v);
    }
    logger.emit(rec);
}

/// Sends the demo traffic and waits until every export was acknowledged.
pub fn run(o: &DemoOptions) -> Result<Vec<(String, String)>, DemoError> {
    let suffix = o.run_suffix.clone().unwrap_or_else(|| jiff::Timestamp::now().strftime("%Y%m%dT%H%M%S").to_string());
    let import_id = format!("import-{suffix}");
    let recon_id = format!("recon-{suffix}");
    let report_id = format!("report-{suffix}");
    let proc_attr = |p: &'static str, run: &str| {
        vec![("business.process.name", AnyValue::from(p)), ("business.run.id", AnyValue::from(run.to_string()))]
    };

    // The import starts first and keeps running while the others happen.
    let (itp, ilp) = providers(o, "catalog-importer")?;
    let mut a = proc_attr("product-import", &import_id);
    a.push(("business.run.status", AnyValue::from("started")));
    a.push(("business.progress.total", AnyValue::Int(12_000)));
    log(&ilp, Severity::Info, "product import started: supplier feed acme.csv", a);
    flush(o, &itp, &ilp)?;

    // Nightly report: spans, succeeds.
    let (tp, lp) = providers(o, "reporting")?;
    {
        let tracer = tp.tracer("bizsignal-demo");
        let mut root = tracer
            .span_builder("generate nightly report")
            .with_attributes(vec![
                KeyValue::new("business.process.name", "nightly-report"),
                KeyValue::new("business.run.id", report_id.clone()),
            ])
            .start(&tracer);
        root.set_status(Status::Ok);
        let cx = Context::current_with_span(root);
        let mut q = tracer.start_with_context("query sales", &cx);
        q.set_attribute(KeyValue::new("business.process.name", "nightly-report"));
        q.set_attribute(KeyValue::new("business.records.processed", 5200_i64));
        q.set_attribute(KeyValue::new("business.milestone", "data-loaded"));
        q.end();
        let mut r = tracer.start_with_context("render pdf", &cx);
        r.set_attribute(KeyValue::new("business.process.name", "nightly-report"));
        r.set_attribute(KeyValue::new("business.milestone", "rendered"));
        r.set_attribute(KeyValue::new("business.payload", r#"{"pages": 42, "format": "pdf"}"#));
        r.end();
        cx.span().end();
    }
    flush(o, &tp, &lp)?;

    // Invoice reconciliation: milestones, then the ledger fails.
    let (tp, lp) = providers(o, "billing-worker")?;
    {
        let tracer = tp.tracer("bizsignal-demo");
        let root = tracer
            .span_builder("reconcile invoices")
            .with_attributes(vec![
                KeyValue::new("business.process.name", "invoice-reconciliation"),
                KeyValue::new("business.run.id", recon_id.clone()),
                KeyValue::new("business.note", "45 invoices left unmatched; posting failed"),
            ])
            .start(&tracer);
        let cx = Context::current_with_span(root);
        let child = |name: &'static str, attrs: Vec<KeyValue>, fail: Option<&'static str>| {
            let mut s = tracer.start_with_context(name, &cx);
            s.set_attribute(KeyValue::new("business.process.name", "invoice-reconciliation"));
            for kv in attrs {
                s.set_attribute(kv);
            }
            if let Some(msg) = fail {
                s.set_status(Status::error(msg));
            }
            s.end();
        };
        child(
            "fetch bank statements",
            vec![
                KeyValue::new("business.milestone", "statements-fetched"),
                KeyValue::new("business.records.processed", 1840_i64),
            ],
            None,
        );
        child(
            "match invoices",
            vec![
                KeyValue::new("business.milestone", "invoices-matched"),
                KeyValue::new("business.records.reconciled", 1795_i64),
                KeyValue::new("business.records.unmatched", 45_i64),
            ],
            None,
        );
        child("post to ledger", vec![], Some("ledger returned 503 after 3 retries"));
        cx.span().set_status(Status::error("ledger unavailable"));
        cx.span().end();
    }
    flush(o, &tp, &lp)?;

    // The import makes progress, skips a few rows, and finishes.
    let mut done = 0;
    for (batch, skipped) in [(1, 2), (2, 4), (3, 6)] {
        std::thread::sleep(o.pace);
        done += 3900 + skipped;
        let mut a = proc_attr("product-import", &import_id);
        a.push(("business.records.imported", AnyValue::Int(3900)));
        a.push(("business.records.skipped", AnyValue::Int(skipped)));
        a.push(("business.progress.done", AnyValue::Int(done)));
        a.push(("business.progress.total", AnyValue::Int(12_000)));
        log(&ilp, Severity::Info, &format!("imported batch {batch}"), a);
        flush(o, &itp, &ilp)?;
    }
    let mut a = proc_attr("product-import", &import_id);
    a.push(("business.note", AnyValue::from("12 rows skipped because the EAN column was empty; supplier notified")));
    log(&ilp, Severity::Warn, "12 rows skipped: missing EAN", a);
    let mut a = proc_attr("product-import", &import_id);
    a.push(("business.milestone", AnyValue::from("prices-validated")));
    a.push((
        "business.payload",
        AnyValue::from(r#"{"currency": "EUR", "price_changes": 214, "largest_change_pct": 12.5}"#),
    ));
    log(&ilp, Severity::Info, "prices validated", a);
    flush(o, &itp, &ilp)?;
    std::thread::sleep(o.pace);
    let mut a = proc_attr("product-import", &import_id);
    a.push(("business.records.imported", AnyValue::Int(294)));
    a.push(("business.progress.done", AnyValue::Int(12_000)));
    a.push(("business.run.status", AnyValue::from("succeeded")));
    log(&ilp, Severity::Info, "product import finished", a);
    flush(o, &itp, &ilp)?;
    let _ = itp.shutdown();
    let _ = ilp.shutdown();
    Ok(vec![
        ("product-import".into(), import_id),
        ("invoice-reconciliation".into(), recon_id),
        ("nightly-report".into(), report_id),
    ])
}
