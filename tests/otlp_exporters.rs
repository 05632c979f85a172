//! Runs assembled from signals sent through the real `opentelemetry-otlp`
//! exporter, over gRPC and over HTTP/protobuf.

mod common;
use common::*;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _};
use std::time::Duration;

/// A log-only run with progress and an explicit status.
fn send_log_run(endpoint: String, proto: Proto, run_id: String) {
    let (tp, lp) = providers(&endpoint, proto, "importer");
    let logger = lp.logger("test");
    for (i, status) in [(1_i64, "started"), (2, ""), (3, "succeeded")] {
        let mut r = logger.create_log_record();
        r.set_body(AnyValue::from(format!("step {i}")));
        r.add_attribute("business.process.name", "import");
        r.add_attribute("business.run.id", run_id.clone());
        r.add_attribute("business.records.imported", AnyValue::Int(100));
        r.add_attribute("business.progress.done", AnyValue::Int(i * 100));
        r.add_attribute("business.progress.total", AnyValue::Int(300));
        if !status.is_empty() {
            r.add_attribute("business.run.status", status);
        }
        logger.emit(r);
    }
    lp.force_flush().unwrap();
    lp.shutdown().unwrap();
    let _ = tp.shutdown();
}

async fn spans_and_logs(proto: Proto) {
    let srv = Server::start().await;
    let endpoint = match proto {
        Proto::Grpc => srv.grpc_endpoint(),
        Proto::HttpProtobuf => format!("http://{}", srv.app().otlp_http),
    };
    let e = endpoint.clone();
    tokio::task::spawn_blocking(move || send_span_run(e, proto, "r-1", true)).await.unwrap();
    let run = srv.wait_run("reconcile", "r-1", Duration::from_secs(5), |r| r["status"] == "failed").await;
    assert_eq!(run["counts"]["processed"], 17);
    assert_eq!(run["error"], "ledger unavailable");
    let names: Vec<_> =
        run["milestones"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["fetched", "matched"]);
    assert_eq!(run["services"][0], "billing-worker");
    assert_eq!(run["trace_ids"].as_array().unwrap().len(), 1);

    let e = endpoint.clone();
    tokio::task::spawn_blocking(move || send_log_run(e, proto, "imp-1".into())).await.unwrap();
    let run = srv.wait_run("import", "imp-1", Duration::from_secs(5), |r| r["status"] == "succeeded").await;
    assert_eq!(run["counts"]["imported"], 300);
    assert_eq!(run["progress"]["done"], 300);
    assert_eq!(run["progress"]["total"], 300);
    assert_eq!(run["progress"]["ratio"], 1.0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_over_grpc_assembles_runs() {
    spans_and_logs(Proto::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_over_http_protobuf_assembles_runs() {
    spans_and_logs(Proto::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_root_span_ends_run_succeeded() {
    let srv = Server::start().await;
    let e = srv.grpc_endpoint();
    tokio::task::spawn_blocking(move || send_span_run(e, Proto::Grpc, "ok-1", false)).await.unwrap();
    let run = srv.wait_run("reconcile", "ok-1", Duration::from_secs(5), |r| r["status"] == "succeeded").await;
    assert!(run["ended_at"].is_string());
    assert!(run["error"].is_null());
    let (_, procs) = srv.get("/api/v1/processes").await;
    let p = &procs["processes"].as_array().unwrap().iter().find(|p| p["name"] == "reconcile").unwrap().clone();
    assert_eq!(p["latest_run"]["run_id"], "ok-1");
    assert!(p["last_success_at"].is_string());
    assert_eq!(p["active_runs"], 0);
    srv.stop().await;
}
