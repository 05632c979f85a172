//! Replays the committed fuzz seed corpus (fuzz/corpus/) through the real
//! server: every input gets a well-formed answer with a correct status code,
//! nothing crashes, and the server keeps serving. This is what CI runs; the
//! fuzzers themselves (`cargo +nightly fuzz run TARGET`, see fuzz/README.md)
//! add their findings to the same directories.
//!
//! `BIZSIGNAL_WRITE_SEEDS=1` (re)writes the binary seeds (protobuf, gzip)
//! derived from the JSON fixtures.

mod common;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "seed corpus {target} is empty");
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (p, data) in corpus("otlp_json") {
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        let pb = if let Some(r) = bizsignal::receivers::http::decode_json::<ExportTraceServiceRequest>(&data)
            .ok()
            .filter(|r| !r.resource_spans.is_empty())
        {
            r.encode_to_vec()
        } else if let Ok(r) = bizsignal::receivers::http::decode_json::<ExportLogsServiceRequest>(&data) {
            r.encode_to_vec()
        } else {
            continue;
        };
        for t in ["otlp_protobuf", "classifier_rules"] {
            std::fs::write(root.join(t).join(format!("{stem}.pb")), &pb).unwrap();
        }
        std::fs::write(root.join("http_gzip").join(format!("{stem}.pb.gz")), gzip(&pb)).unwrap();
        std::fs::write(root.join("http_gzip").join(format!("{stem}.json.gz")), gzip(&data)).unwrap();
    }
    // A truncated gzip stream and a small bomb (1 MiB of zeros).
    let full = gzip(b"{\"resourceSpans\":[]}");
    std::fs::write(root.join("http_gzip/truncated.gz"), &full[..full.len() / 2]).unwrap();
    std::fs::write(root.join("http_gzip/zeros.gz"), gzip(&vec![0u8; 1 << 20])).unwrap();
    std::fs::write(root.join("otlp_protobuf/garbage.pb"), [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_corpus_replayed_through_the_server() {
    if std::env::var_os("BIZSIGNAL_WRITE_SEEDS").is_some() {
        write_seeds();
    }
    let srv = common::Server::start().await;
    let mut n = 0;
    let send = |path: &'static str, ct: &'static str, gz: bool, body: Vec<u8>| {
        let mut r = srv.http.post(srv.otlp_http(path)).header("content-type", ct);
        if gz {
            r = r.header("content-encoding", "gzip");
        }
        r.body(body).send()
    };
    let ok = |st: u16, what: &Path| assert!([200, 400, 413, 415].contains(&st), "{}: status {st}", what.display());
    for target in ["otlp_protobuf", "classifier_rules"] {
        for (p, data) in corpus(target) {
            for path in ["/v1/traces", "/v1/logs"] {
                ok(send(path, "application/x-protobuf", false, data.clone()).await.unwrap().status().as_u16(), &p);
                n += 1;
            }
        }
    }
    for (p, data) in corpus("otlp_json") {
        for path in ["/v1/traces", "/v1/logs"] {
            ok(send(path, "application/json", false, data.clone()).await.unwrap().status().as_u16(), &p);
            n += 1;
        }
    }
    for (p, data) in corpus("http_gzip") {
        for ct in ["application/x-protobuf", "application/json"] {
            ok(send("/v1/traces", ct, true, data.clone()).await.unwrap().status().as_u16(), &p);
            n += 1;
        }
    }
    for (p, data) in corpus("config") {
        // The loader must answer, never panic; the fuzz target does the same.
        if let Ok(text) = std::str::from_utf8(&data) {
            let _ = std::panic::catch_unwind(|| bizsignal::config::Config::from_yaml(text, "seed.yaml"))
                .unwrap_or_else(|_| panic!("{} panicked", p.display()));
        }
        n += 1;
    }
    // Still serving, and the valid seeds produced runs.
    let (st, runs) = srv.get("/api/v1/runs").await;
    assert_eq!(st, 200);
    assert!(!runs["runs"].as_array().unwrap().is_empty());
    eprintln!("replayed {n} seed inputs");
    srv.stop().await;
}
