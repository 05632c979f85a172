//! OTLP protobuf decode, then classification with default limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let c = bizsignal::classify::Classifier::new(Default::default(), &[]).unwrap();
    if let Ok(r) = ExportTraceServiceRequest::decode(data) {
        c.classify_traces(&r.resource_spans, 0);
    }
    if let Ok(r) = ExportLogsServiceRequest::decode(data) {
        c.classify_logs(&r.resource_logs, 0);
    }
});
