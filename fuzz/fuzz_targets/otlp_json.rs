//! OTLP/JSON decode (the receivers' decoder, snake_case tolerant), then classification.
#![no_main]
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

fuzz_target!(|data: &[u8]| {
    let c = bizsignal::classify::Classifier::new(Default::default(), &[]).unwrap();
    if let Ok(r) = bizsignal::receivers::http::decode_json::<ExportTraceServiceRequest>(data) {
        c.classify_traces(&r.resource_spans, 0);
    }
    if let Ok(r) = bizsignal::receivers::http::decode_json::<ExportLogsServiceRequest>(data) {
        c.classify_logs(&r.resource_logs, 0);
    }
});
