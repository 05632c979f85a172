//! Abuse and overload against the real binary, with its peak RSS (VmHWM from
//! /proc) checked against a bound: a 1 GiB gzip bomb, 10,000 malformed
//! requests, a span with 100,000 attributes, 64 KiB attribute keys, and an
//! overload burst far above what a tiny queue sustains. The server must
//! answer each with the right status and keep serving.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

mod common;
use common::serve::ServeProcess as Proc;

/// Peak resident memory allowed for the server under abuse.
const RSS_BOUND_KIB: u64 = 256 * 1024;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
        ..Default::default()
    }
}

fn trace_request(attrs: Vec<KeyValue>, run: &str) -> Vec<u8> {
    let mut attributes =
        vec![kv("business.process.name", "abuse"), kv("business.run.id", run), kv("business.records.ok", "1")];
    attributes.extend(attrs);
    let span = Span {
        trace_id: vec![7; 16],
        span_id: vec![9; 8],
        name: "s".into(),
        start_time_unix_nano: 1_795_000_000_000_000_000,
        end_time_unix_nano: 1_795_000_000_000_000_100,
        attributes,
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A gzip stream that inflates to 1 GiB of zeros: one 64 MiB member repeated 16 times (~1 MiB on the wire).
fn gzip_bomb() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    let member = enc.finish().unwrap();
    member.repeat(16)
}

async fn post(c: &reqwest::Client, url: &str, ct: &str, gzip: bool, body: Vec<u8>) -> (u16, bool) {
    let mut r = c.post(url).header("content-type", ct);
    if gzip {
        r = r.header("content-encoding", "gzip");
    }
    let resp = r.body(body).send().await.unwrap();
    (resp.status().as_u16(), resp.headers().contains_key("retry-after"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gzip_bomb_malformed_flood_huge_attributes_keep_the_server_serving_within_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(dir.path(), "pipeline: { tick: 100ms }\n");
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let traces = p.url("/v1/traces");
    let pb = "application/x-protobuf";
    let baseline = p.vm_hwm_kib();

    // 1 GiB gzip bomb: refused with 413 once inflation passes the 64 MiB limit.
    let bomb = gzip_bomb();
    assert!(bomb.len() < 2 << 20, "bomb is {} bytes on the wire", bomb.len());
    for _ in 0..3 {
        assert_eq!(post(&c, &traces, pb, true, bomb.clone()).await.0, 413);
    }
    let after_bomb = p.vm_hwm_kib();

    // 10,000 malformed requests of many kinds, 16 at a time.
    let kinds: Vec<(&str, bool, Vec<u8>, &[u16])> = vec![
        (pb, false, vec![0xff; 64], &[400]),
        (pb, false, b"\x0a\x05abc".to_vec(), &[400]),
        ("application/json", false, b"{\"resourceSpans\": [".to_vec(), &[400]),
        ("application/json", false, b"{\"resourceSpans\": 7}".to_vec(), &[400]),
        (pb, true, b"not gzip at all".to_vec(), &[400]),
        ("text/plain", false, b"hello".to_vec(), &[415]),
        ("application/json", false, vec![b'['; 100_000], &[400]),
    ];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (c, url, kinds) = (c.clone(), traces.clone(), kinds.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..625 {
                let (ct, gz, body, ok) = &kinds[(t + i) % kinds.len()];
                let (st, _) = post(&c, &url, ct, *gz, body.clone()).await;
                assert!(ok.contains(&st), "malformed request kind {} answered {st}", (t + i) % kinds.len());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // A span with 100,000 attributes: rejected as a record (partial success), not a crash.
    let many: Vec<KeyValue> = (0..100_000).map(|i| kv(&format!("k{i}"), "v")).collect();
    let resp = c
        .post(&traces)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&serde_json::json!({})).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = c.post(&traces).header("content-type", pb).body(trace_request(many, "many")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let r = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
        resp.bytes().await.unwrap(),
    )
    .unwrap();
    assert_eq!(
        r.partial_success.map(|p| p.rejected_spans),
        Some(1),
        "100,000 attributes exceed max_attributes_per_record"
    );

    // 64 KiB attribute keys: the record is kept, the oversized key dropped.
    let long_key = "k".repeat(64 << 10);
    assert_eq!(post(&c, &traces, pb, false, trace_request(vec![kv(&long_key, "v")], "longkey")).await.0, 200);
    // ... and a 64 KiB outcome name is an invalid record.
    let resp = c
        .post(&traces)
        .header("content-type", pb)
        .body(trace_request(vec![kv(&format!("business.records.{long_key}"), "1")], "longoutcome"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let r = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
        resp.bytes().await.unwrap(),
    )
    .unwrap();
    assert_eq!(r.partial_success.map(|p| p.rejected_spans), Some(1));

    // Still serving, correctly.
    assert_eq!(post(&c, &traces, pb, false, trace_request(vec![], "after")).await.0, 200);
    let run: serde_json::Value =
        c.get(format!("http://{}/api/v1/runs/abuse/longkey", p.http)).send().await.unwrap().json().await.unwrap();
    assert_eq!(run["counts"]["ok"], 1);
    let peak = p.vm_hwm_kib();
    eprintln!(
        "abuse: VmHWM baseline {} MiB, after 3 gzip bombs {} MiB, after everything {} MiB",
        baseline / 1024,
        after_bomb / 1024,
        peak / 1024
    );
    assert!(peak < RSS_BOUND_KIB, "peak RSS {peak} KiB over the bound of {RSS_BOUND_KIB} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_gets_retryable_refusals_and_keeps_every_acknowledged_signal() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny queue so that 64 concurrent clients are far above what it sustains.
    let p = spawn(dir.path(), "pipeline: { queue_capacity: 2, max_batches_per_commit: 2, tick: 100ms }\n");
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let url = p.url("/v1/logs");
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut refused) = (0u64, 0u64);
            for i in 0..40u64 {
                let body = serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": (1_795_000_000_000_000_000u64 + w * 1000 + i).to_string(),
                    "attributes": [{"key": "business.process.name", "value": {"stringValue": "overload"}}, {"key": "business.run.id", "value": {"stringValue": "r"}},
                    {"key": "business.records.ok", "value": {"intValue": "1"}}]}]}]}]});
                let r = c.post(&url).header("content-type", "application/json").body(body.to_string()).send().await.unwrap();
                match r.status().as_u16() {
                    200 => acked += 1,
                    429 | 503 => {
                        assert!(r.headers().contains_key("retry-after"), "retryable refusal without Retry-After");
                        refused += 1;
                    }
                    s => panic!("unexpected status {s} under overload"),
                }
            }
            (acked, refused)
        }));
    }
    let (mut acked, mut refused) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        acked += a;
        refused += r;
    }
    let run: serde_json::Value =
        c.get(format!("http://{}/api/v1/runs/overload/r", p.http)).send().await.unwrap().json().await.unwrap();
    let peak = p.vm_hwm_kib();
    eprintln!(
        "overload: {acked} acknowledged, {refused} refused with 429/503 + Retry-After, stored count {}, VmHWM {} MiB",
        run["counts"]["ok"],
        peak / 1024
    );
    assert!(refused > 0, "overload produced no retryable refusals");
    assert_eq!(run["counts"]["ok"], acked, "every acknowledged signal kept, nothing else counted");
    assert!(peak < RSS_BOUND_KIB);
}

fn spawn(data_dir: &Path, config: &str) -> Proc {
    Proc::spawn(data_dir, Some(config))
}
