//! The OTLP/HTTP body path with `Content-Encoding: gzip`: bounded inflation
//! (1 MiB here), then protobuf and JSON decoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = bizsignal::receivers::http::inflate_limited(data, 1 << 20) {
        assert!(body.len() <= 1 << 20);
        let _ = ExportTraceServiceRequest::decode(body.as_slice());
        let _ = bizsignal::receivers::http::decode_json::<ExportTraceServiceRequest>(&body);
    }
});
