//! Test harness: a real bizsignal on ephemeral ports with its own data dir,
//! plus real OTLP clients. Waiting is done by polling the API for a condition
//! (with a deadline), never by sleeping a guessed amount.
#![allow(dead_code)]

pub mod chdb;
pub mod serve;

use bizsignal::app::RunningApp;
use bizsignal::config::Config;
use opentelemetry_otlp::{LogExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Server {
    pub app: Option<RunningApp>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

pub fn base_config(data_dir: &Path) -> Config {
    let mut c = Config::default();
    c.data_dir = data_dir.to_path_buf();
    c.server.otlp_grpc = "127.0.0.1:0".parse().unwrap();
    c.server.otlp_http = "127.0.0.1:0".parse().unwrap();
    c.server.http = "127.0.0.1:0".parse().unwrap();
    c.pipeline.tick = Duration::from_millis(100);
    c
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut c = base_config(dir.path());
        f(&mut c);
        let app = bizsignal::app::start(c).await.expect("server starts");
        Server { app: Some(app), dir, http: reqwest::Client::new() }
    }

    /// Stops and starts again on the same data dir (new ports).
    pub async fn restart_with(&mut self, f: impl FnOnce(&mut Config)) {
        let app = self.app.take().unwrap();
        assert!(app.shutdown().await, "clean shutdown");
        let mut c = base_config(self.dir.path());
        f(&mut c);
        self.app = Some(bizsignal::app::start(c).await.expect("server restarts"));
    }

    pub fn app(&self) -> &RunningApp {
        self.app.as_ref().unwrap()
    }
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{}", self.app().http, path)
    }
    pub fn otlp_http(&self, path: &str) -> String {
        format!("http://{}{}", self.app().otlp_http, path)
    }
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.app().otlp_grpc)
    }
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("bizsignal.db")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.api(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn run(&self, process: &str, run_id: &str) -> Option<Value> {
        let (s, v) = self.get(&format!("/api/v1/runs/{process}/{run_id}")).await;
        (s == 200).then_some(v)
    }

    /// Polls a run until `pred` holds; panics with the last state after `within`.
    pub async fn wait_run(
        &self,
        process: &str,
        run_id: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let r = self.run(process, run_id).await;
            if let Some(v) = &r {
                if pred(v) {
                    return v.clone();
                }
            }
            if Instant::now() > deadline {
                panic!("run {process}/{run_id} did not reach the expected state within {within:?}; last: {r:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post_json(&self, path: &str, body: &str) -> (u16, String) {
        let r = self
            .http
            .post(self.otlp_http(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            assert!(app.shutdown().await);
        }
    }
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

#[derive(Clone, Copy, Debug)]
pub enum Proto {
    Grpc,
    HttpProtobuf,
}

/// Real SDK providers exporting to the server. Must be called from a
/// blocking context inside the runtime (`spawn_blocking`).
pub fn providers(endpoint: &str, proto: Proto, service: &str) -> (SdkTracerProvider, SdkLoggerProvider) {
    let resource = Resource::builder().with_service_name(service.to_string()).build();
    let (spans, logs) = match proto {
        Proto::Grpc => (
            SpanExporter::builder().with_tonic().with_endpoint(endpoint).build().unwrap(),
            LogExporter::builder().with_tonic().with_endpoint(endpoint).build().unwrap(),
        ),
        Proto::HttpProtobuf => (
            SpanExporter::builder().with_http().with_endpoint(format!("{endpoint}/v1/traces")).build().unwrap(),
            LogExporter::builder().with_http().with_endpoint(format!("{endpoint}/v1/logs")).build().unwrap(),
        ),
    };
    (
        SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(spans).build(),
        SdkLoggerProvider::builder().with_resource(resource).with_batch_exporter(logs).build(),
    )
}

/// Builds an OTLP/JSON log export with one record per attribute set.
pub fn logs_json(service: &str, records: &[(u64, &str, Vec<(&str, Value)>)]) -> String {
    let recs: Vec<Value> = records
        .iter()
        .map(|(t, body, attrs)| {
            serde_json::json!({
                "timeUnixNano": t.to_string(),
                "body": {"stringValue": body},
                "attributes": attrs.iter().map(|(k, v)| serde_json::json!({"key": k, "value": any(v)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]}, "scopeLogs": [{"logRecords": recs}]}]}).to_string()
}

fn any(v: &Value) -> Value {
    match v {
        Value::String(s) => serde_json::json!({"stringValue": s}),
        Value::Number(n) if n.is_i64() => serde_json::json!({"intValue": n.to_string()}),
        Value::Number(n) => serde_json::json!({"doubleValue": n}),
        Value::Bool(b) => serde_json::json!({"boolValue": b}),
        _ => serde_json::json!({}),
    }
}

pub fn s(v: &str) -> Value {
    Value::String(v.to_string())
}
pub fn n(v: i64) -> Value {
    Value::from(v)
}

/// Current time in unix nanoseconds.
pub fn now() -> u64 {
    bizsignal::now_ns() as u64
}

/// A span-based run: root with run id, children with milestones and counts;
/// the root's ERROR status ends the run failed.
pub fn send_span_run(endpoint: String, proto: Proto, run_id: &str, fail: bool) {
    use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _, TracerProvider as _};
    use opentelemetry::{Context, KeyValue};
    let (tp, lp) = providers(&endpoint, proto, "billing-worker");
    let tracer = tp.tracer("test");
    let root = tracer
        .span_builder("reconcile")
        .with_attributes(vec![
            KeyValue::new("business.process.name", "reconcile"),
            KeyValue::new("business.run.id", run_id.to_string()),
        ])
        .start(&tracer);
    let cx = Context::current_with_span(root);
    for (name, milestone, n) in [("fetch", "fetched", 10_i64), ("match", "matched", 7)] {
        let mut s = tracer.start_with_context(name, &cx);
        s.set_attribute(KeyValue::new("business.process.name", "reconcile"));
        s.set_attribute(KeyValue::new("business.milestone", milestone));
        s.set_attribute(KeyValue::new("business.records.processed", n));
        s.end();
    }
    if fail {
        cx.span().set_status(Status::error("ledger unavailable"));
    }
    cx.span().end();
    tp.force_flush().unwrap();
    tp.shutdown().unwrap();
    let _ = lp.shutdown();
}
