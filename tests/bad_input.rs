//! Bad input gets a clear error and loses nothing else; the server keeps serving.

mod common;
use common::*;
use flate2::write::GzEncoder;
use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_client::LogsServiceClient, ExportLogsServiceRequest,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_client::TraceServiceClient, ExportTraceServiceRequest,
};
use prost::Message;
use std::io::Write;
use std::time::Duration;

const T0: u64 = 1_795_240_800_000_000_000;

async fn post(
    srv: &Server,
    path: &str,
    ct: &str,
    enc: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = srv.http.post(srv.otlp_http(path)).header("content-type", ct).body(body);
    if let Some(e) = enc {
        req = req.header("content-encoding", e);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.headers().clone(), r.bytes().await.unwrap().to_vec())
}

fn json_msg(body: &[u8]) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(body).unwrap_or_else(|_| panic!("json error body: {:?}", String::from_utf8_lossy(body)));
    v["message"].as_str().unwrap().to_string()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One valid business record still goes through afterwards.
async fn still_serving(srv: &Server, run: &str) {
    let body = logs_json(
        "svc",
        &[(
            T0,
            "ok",
            vec![("business.process.name", s("health")), ("business.run.id", s(run)), ("business.records.ok", n(1))],
        )],
    );
    assert_eq!(srv.post_json("/v1/logs", &body).await.0, 200);
    assert_eq!(srv.run("health", run).await.expect("stored")["counts"]["ok"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refusals_have_exact_statuses_and_messages() {
    let srv = Server::start_with(|c| {
        c.limits.max_request_bytes = 256 << 10;
        c.limits.max_decompressed_bytes = 1 << 20;
    })
    .await;

    // Malformed protobuf → 400 with a google.rpc.Status protobuf body.
    let (st, h, body) =
        post(&srv, "/v1/traces", "application/x-protobuf", None, vec![0x0a, 0xff, 0xff, 0xff, 0x0f, 1, 2]).await;
    assert_eq!(st, 400);
    assert_eq!(h["content-type"], "application/x-protobuf");
    let status = tonic_types::Status::decode(body.as_slice()).unwrap();
    assert_eq!(status.code, 3);
    assert!(status.message.contains("not a valid OTLP protobuf"), "{}", status.message);
    still_serving(&srv, "a").await;

    // Malformed JSON, wrong shape, invalid UTF-8 → 400 in JSON.
    for (bad, want) in [
        (b"{\"resourceSpans\": [".to_vec(), "not valid JSON"),
        (b"{\"resourceSpans\": {\"oops\": 1}}".to_vec(), "not a valid OTLP/JSON"),
        (vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'], "not valid JSON"),
        (
            br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz-not-hex","spanId":"00"}]}]}]}"#.to_vec(),
            "not a valid OTLP/JSON",
        ),
    ] {
        let (st, _, body) = post(&srv, "/v1/traces", "application/json", None, bad).await;
        assert_eq!(st, 400);
        assert!(json_msg(&body).contains(want), "{}", json_msg(&body));
    }
    still_serving(&srv, "b").await;

    // Unknown content type or encoding → 415.
    let (st, _, body) = post(&srv, "/v1/logs", "text/plain", None, b"hello".to_vec()).await;
    assert_eq!(st, 415);
    assert!(json_msg(&body).contains("unsupported content type \"text/plain\""));
    let (st, _, body) = post(&srv, "/v1/logs", "application/json", Some("br"), b"{}".to_vec()).await;
    assert_eq!(st, 415);
    assert!(json_msg(&body).contains("unsupported content encoding"));

    // Too large on the wire → 413.
    let big = vec![b' '; 300 << 10];
    let (st, _, body) = post(&srv, "/v1/logs", "application/json", None, big).await;
    assert_eq!(st, 413);
    assert!(json_msg(&body).contains("larger than the limit of 262144 bytes"), "{}", json_msg(&body));

    // A gzip bomb: 64 KiB on the wire, 64 MiB inflated → 413 after inflating at most 1 MiB.
    let bomb = gzip(&vec![b' '; 64 << 20]);
    assert!(bomb.len() < 256 << 10);
    let (st, _, body) = post(&srv, "/v1/logs", "application/json", Some("gzip"), bomb).await;
    assert_eq!(st, 413);
    assert!(json_msg(&body).contains("inflates to more than the limit of 1048576 bytes"));

    // Corrupt gzip → 400.
    let (st, _, body) =
        post(&srv, "/v1/logs", "application/json", Some("gzip"), b"\x1f\x8b\x08\x00garbage".to_vec()).await;
    assert_eq!(st, 400);
    assert!(json_msg(&body).contains("not valid gzip"));
    still_serving(&srv, "c").await;

    // Gzip that is fine is accepted.
    let ok = logs_json(
        "svc",
        &[(
            T0,
            "ok",
            vec![("business.process.name", s("health")), ("business.run.id", s("gz")), ("business.records.ok", n(2))],
        )],
    );
    let (st, _, _) = post(&srv, "/v1/logs", "application/json", Some("gzip"), gzip(ok.as_bytes())).await;
    assert_eq!(st, 200);
    assert_eq!(srv.run("health", "gz").await.unwrap()["counts"]["ok"], 2);

    let m = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("bizsignal_requests_too_large_total 2"), "{m}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_rejected_individually_with_partial_success() {
    let srv = Server::start().await;
    let good = |run: &str| {
        vec![("business.process.name", s("p")), ("business.run.id", s(run)), ("business.records.imported", n(5))]
    };
    let mut neg = good("r");
    neg[2] = ("business.records.imported", n(-3));
    let mut absurd = good("r");
    absurd[2] = ("business.records.imported", serde_json::json!(1e300));
    let mut nan = good("r");
    nan[2] = ("business.records.imported", s("NaN"));
    let mut bad_json = good("r");
    bad_json.push(("business.payload", s("{not json")));
    let mut bad_status = good("r");
    bad_status.push(("business.run.status", s("exploded")));
    let body = logs_json(
        "svc",
        &[
            (T0, "1", good("r")),
            (T0 + 1, "2", neg),
            (T0 + 2, "3", absurd),
            (T0 + 3, "4", nan),
            (T0 + 4, "5", bad_json),
            (T0 + 5, "6", bad_status),
            (T0 + 6, "7", good("r")),
        ],
    );
    let (st, resp) = srv.post_json("/v1/logs", &body).await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["partialSuccess"]["rejectedLogRecords"], "5");
    let msg = v["partialSuccess"]["errorMessage"].as_str().unwrap();
    for want in [
        "must not be negative",
        "finite number",
        "at most 1e15, got NaN",
        "not valid JSON",
        "must be started, succeeded or failed",
    ] {
        assert!(msg.contains(want), "{want} missing from {msg}");
    }
    assert_eq!(srv.run("p", "r").await.unwrap()["counts"]["imported"], 10, "the two good records are kept");

    // Same over protobuf: the response is a protobuf ExportLogsServiceResponse.
    let req: ExportLogsServiceRequest = bizsignal::receivers::http::decode_json(body.as_bytes()).unwrap();
    let (st, _, resp) = post(&srv, "/v1/logs", "application/x-protobuf", None, req.encode_to_vec()).await;
    assert_eq!(st, 200);
    let resp =
        opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse::decode(resp.as_slice()).unwrap();
    assert_eq!(resp.partial_success.unwrap().rejected_log_records, 5);

    // A span with an invalid trace id length and no run id is rejected with a reason.
    let bad_span = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[
        {"traceId":"","spanId":"0102030405060708","name":"x","attributes":[{"key":"business.process.name","value":{"stringValue":"p"}}]},
        {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"0102030405060709","name":"y","attributes":[{"key":"business.process.name","value":{"stringValue":"p"}},{"key":"business.run.id","value":{"intValue":"42"}}]}
    ]}]}]}"#;
    let (st, resp) = srv.post_json("/v1/traces", bad_span).await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["partialSuccess"]["rejectedSpans"], "1");
    assert!(v["partialSuccess"]["errorMessage"].as_str().unwrap().contains("no business.run.id and no trace id"));
    assert!(srv.run("p", "42").await.is_some(), "int run ids are accepted as strings");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_partial_success_gzip_and_size_limit() {
    let srv = Server::start_with(|c| c.limits.max_decompressed_bytes = 1 << 20).await;
    let mut client = LogsServiceClient::connect(srv.grpc_endpoint())
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let mut neg = vec![("business.process.name", s("g")), ("business.run.id", s("r")), ("business.records.x", n(-1))];
    let good = vec![("business.process.name", s("g")), ("business.run.id", s("r")), ("business.records.x", n(4))];
    neg.push(("business.note", s("bad one")));
    let req: ExportLogsServiceRequest =
        bizsignal::receivers::http::decode_json(logs_json("svc", &[(T0, "a", good), (T0 + 1, "b", neg)]).as_bytes())
            .unwrap();
    let resp = client.export(req).await.unwrap().into_inner();
    let ps = resp.partial_success.unwrap();
    assert_eq!(ps.rejected_log_records, 1);
    assert!(ps.error_message.contains("business.records.x must not be negative"));
    assert_eq!(srv.run("g", "r").await.unwrap()["counts"]["x"], 4);

    // Over the decompressed limit (a compressible 2 MiB message) → refused, server fine.
    let mut big: ExportTraceServiceRequest =
        bizsignal::receivers::http::decode_json(fixture("http-noise-trace.json").as_bytes()).unwrap();
    big.resource_spans[0].scope_spans[0].spans[0].name = "x".repeat(2 << 20);
    let mut tc = TraceServiceClient::connect(srv.grpc_endpoint())
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let err = tc.export(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit"), "{err:?}");
    use tonic_types::StatusExt;
    assert!(err.get_details_retry_info().is_none(), "no RetryInfo: a too-large message must not be retried");
    still_serving(&srv, "grpc-after").await;
    srv.stop().await;
}

#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_undecodable_message_is_invalid_argument() {
    let srv = Server::start().await;
    let channel = tonic::transport::Endpoint::from_shared(srv.grpc_endpoint()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<
        Garbage,
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
    >::default();
    let path = http::uri::PathAndQuery::from_static("/opentelemetry.proto.collector.trace.v1.TraceService/Export");
    // Field 1 (resource_spans) holding bytes that are not a ResourceSpans message.
    let err = grpc.unary(tonic::Request::new(Garbage { data: vec![0xff; 12] }), path, codec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");
    still_serving(&srv, "after-garbage").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fills_the_journal_then_refuses_retryably_and_keeps_acknowledged_data() {
    let srv = Server::start_with(|c| {
        c.storage.sqlite.journal_max_bytes = 64 << 10;
        c.storage.sqlite.commit_interval = Duration::from_millis(20);
        c.pipeline.retry_after = Duration::from_secs(2);
    })
    .await;
    // Hold SQLite's write lock from outside: acknowledged batches pile up in
    // the journal until it is full, and then intake must be refused.
    let lock = rusqlite::Connection::open(srv.db_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let filler = "x".repeat(3000);
    let body = |i: usize| {
        logs_json(
            "svc",
            &[(
                T0 + i as u64,
                "x",
                vec![
                    ("business.process.name", s("busy")),
                    ("business.run.id", s("r")),
                    ("business.records.n", n(1)),
                    ("filler", s(&filler)),
                ],
            )],
        )
    };
    let mut acked = 0;
    let mut refused = None;
    for i in 0..200 {
        let r = srv
            .http
            .post(srv.otlp_http("/v1/logs"))
            .header("content-type", "application/json")
            .body(body(i))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => acked += 1,
            503 => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
        }
    }
    let r = refused.expect("intake is refused once the journal is full");
    assert!(acked >= 2, "the journal held some batches before it filled ({acked})");
    assert_eq!(r.headers()["retry-after"], "2");
    // gRPC says UNAVAILABLE with RetryInfo.
    let mut client = LogsServiceClient::connect(srv.grpc_endpoint()).await.unwrap();
    let req: ExportLogsServiceRequest = bizsignal::receivers::http::decode_json(body(1000).as_bytes()).unwrap();
    let err = client.export(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    use tonic_types::StatusExt;
    assert_eq!(err.get_details_retry_info().expect("RetryInfo").retry_delay, Some(Duration::from_secs(2)));

    lock.execute_batch("ROLLBACK").unwrap();
    assert_eq!(srv.run("busy", "r").await.unwrap()["counts"]["n"], acked, "every acknowledged signal was stored");
    // And intake works again.
    let r = srv
        .http
        .post(srv.otlp_http("/v1/logs"))
        .header("content-type", "application/json")
        .body(body(2000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    srv.stop().await;
}

/// OTLP/HTTP protobuf is decoded lazily, as gRPC is: a span without business
/// meaning is counted and dropped without being decoded, so a broken string
/// in one (invalid UTF-8, which a whole decode refuses for the entire
/// request) does not cost the business span beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_does_not_decode_spans_without_business_meaning() {
    let srv = Server::start().await;
    let json = format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"shop"}}}}]}},
        "scopeSpans":[{{"spans":[
          {{"traceId":"0af7651916cd43dd8448eb211c80319c","spanId":"b7ad6b7169203331","name":"import",
            "startTimeUnixNano":"{t0}","endTimeUnixNano":"{t1}","attributes":[
              {{"key":"business.process.name","value":{{"stringValue":"lazyhttp"}}}},
              {{"key":"business.run.id","value":{{"stringValue":"r1"}}}},
              {{"key":"business.records.ok","value":{{"intValue":"3"}}}}]}},
          {{"traceId":"0af7651916cd43dd8448eb211c80319d","spanId":"b7ad6b7169203332","name":"GET /",
            "startTimeUnixNano":"{t0}","endTimeUnixNano":"{t1}","attributes":[
              {{"key":"http.route","value":{{"stringValue":"MARKMARK"}}}}]}}]}}]}}]}}"#,
        t0 = T0,
        t1 = T0 + 1_000_000
    );
    let req = bizsignal::receivers::http::decode_json::<ExportTraceServiceRequest>(json.as_bytes()).unwrap();
    let mut pb = req.encode_to_vec();
    let at = pb.windows(8).position(|w| w == b"MARKMARK").expect("marker in the encoding");
    pb[at..at + 8].copy_from_slice(&[0xff; 8]);
    assert!(ExportTraceServiceRequest::decode(pb.as_slice()).is_err(), "a whole decode refuses the request");

    let (st, _, body) = post(&srv, "/v1/traces", "application/x-protobuf", None, pb).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(srv.run("lazyhttp", "r1").await.expect("stored")["counts"]["ok"], 3);
    let m = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("bizsignal_spans_received_total 2"), "{m}");
    srv.stop().await;
}
