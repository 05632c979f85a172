//! Per-client request rate limit (`limits.requests_per_second_per_client`):
//! a token bucket per peer IP, or per intake token when tokens are
//! configured, on OTLP/HTTP, OTLP/gRPC and `POST /api/v1/events`; refusals
//! are 429 + `Retry-After` / RESOURCE_EXHAUSTED + `RetryInfo`, and nothing
//! refused is stored.

mod common;

use common::{logs_json, n, now, s, Server};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use std::time::Duration;
use tonic_types::StatusExt;

fn body(run: &str, i: i64) -> String {
    logs_json(
        "rl",
        &[(
            now() + i as u64,
            "step",
            vec![
                ("business.process.name", s("rl")),
                ("business.run.id", s(run)),
                ("business.records.ok", n(1)),
                ("seq", n(i)),
            ],
        )],
    )
}

async fn post(srv: &Server, run: &str, i: i64, token: Option<&str>) -> reqwest::Response {
    let mut r = srv.http.post(srv.otlp_http("/v1/logs")).header("content-type", "application/json").body(body(run, i));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn grpc(srv: &Server, run: &str, i: i64, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = LogsServiceClient::connect(srv.grpc_endpoint()).await.unwrap();
    let msg: ExportLogsServiceRequest = bizsignal::receivers::http::decode_json(body(run, i).as_bytes()).unwrap();
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.export(req).await.map(|_| ())
}

async fn metric(srv: &Server, name: &str) -> u64 {
    let text = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()?.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_limit_on_http_grpc_and_events() {
    // 2 requests per second, bursts of 3: one bucket for 127.0.0.1, shared by all intake ports.
    let srv = Server::start_with(|c| {
        c.limits.requests_per_second_per_client = Some(2.0);
        c.limits.request_burst_per_client = Some(3);
    })
    .await;

    // OTLP/HTTP: the burst passes, the next request is refused retryably.
    for i in 0..3 {
        assert_eq!(post(&srv, "h", i, None).await.status().as_u16(), 200, "request {i} of the burst");
    }
    let r = post(&srv, "h", 3, None).await;
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1", "a token is back within 0.5 s");
    let st: serde_json::Value = r.json().await.unwrap();
    assert_eq!(st["code"], 8, "google.rpc.Status RESOURCE_EXHAUSTED: {st}");
    assert!(st["message"].as_str().unwrap().contains("rate limit"), "{st}");
    // Reads are never rate limited.
    for _ in 0..10 {
        assert_eq!(srv.get("/api/v1/runs/rl/h").await.0, 200);
    }

    // Refilled after 1.5 s (3 tokens at 2/s): the bucket is shared with gRPC.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    for i in 0..3 {
        grpc(&srv, "g", i, None).await.unwrap_or_else(|e| panic!("gRPC request {i} of the burst: {e:?}"));
    }
    let e = grpc(&srv, "g", 3, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let delay = e.get_details_retry_info().expect("RetryInfo").retry_delay.expect("a delay");
    assert!(delay > Duration::ZERO && delay <= Duration::from_millis(500), "{delay:?}");
    // ... and with POST /api/v1/events.
    let ev = srv
        .http
        .post(srv.api("/api/v1/events"))
        .json(&serde_json::json!({"process": "rl", "run_id": "e", "records": {"ok": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(ev.status().as_u16(), 429);
    assert!(ev.headers().contains_key("retry-after"));

    // Every acknowledged request is stored, no refused one.
    assert_eq!(srv.run("rl", "h").await.unwrap()["counts"]["ok"], 3);
    assert_eq!(srv.run("rl", "g").await.unwrap()["counts"]["ok"], 3);
    assert!(srv.run("rl", "e").await.is_none());
    assert_eq!(metric(&srv, "bizsignal_requests_rate_limited_total").await, 3);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_intake_tokens_each_token_is_its_own_client() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("intake-tokens");
    std::fs::write(&tokens, "token-a\ntoken-b\n").unwrap();
    let srv = Server::start_with(|c| {
        c.limits.requests_per_second_per_client = Some(0.5);
        c.limits.request_burst_per_client = Some(2);
        c.server.auth.intake_tokens_file = Some(tokens.clone());
    })
    .await;
    // Token A uses up its burst over HTTP and gRPC ...
    assert_eq!(post(&srv, "a", 0, Some("token-a")).await.status().as_u16(), 200);
    grpc(&srv, "a", 1, Some("token-a")).await.unwrap();
    let r = post(&srv, "a", 2, Some("token-a")).await;
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "2", "one token every 2 s");
    let e = grpc(&srv, "a", 3, Some("token-a")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.get_details_retry_info().is_some());
    // ... while token B, from the same address, has its own bucket.
    assert_eq!(post(&srv, "b", 0, Some("token-b")).await.status().as_u16(), 200);
    grpc(&srv, "b", 1, Some("token-b")).await.unwrap();
    // Without a valid token the answer is still 401 / UNAUTHENTICATED.
    assert_eq!(post(&srv, "x", 0, Some("wrong")).await.status().as_u16(), 401);
    assert_eq!(grpc(&srv, "x", 0, None).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(srv.run("rl", "a").await.unwrap()["counts"]["ok"], 2);
    assert_eq!(srv.run("rl", "b").await.unwrap()["counts"]["ok"], 2);
    srv.stop().await;
}
