//! The classifier with mapping rules over arbitrary OTLP traces and logs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::sync::OnceLock;

const RULES: &str = r#"
rules:
  - name: steps
    match:
      signal: span
      span_name: {glob: "sync/*"}
      attributes:
        job.id: {exists: true}
    set:
      process: sync
      run_id: {from_attribute: job.id}
      records:
        written: db.rows
  - name: alerts
    match:
      signal: log
      log_body: {glob: "budget exceeded*"}
    set:
      process: budget
      run_id: {from_attribute: budget.id}
      note: "budget exceeded"
"#;

/// Built once: loading the config and compiling the rules' regexes on every
/// input held the target at ~30 executions/s.
fn classifier() -> &'static bizsignal::classify::Classifier {
    static C: OnceLock<bizsignal::classify::Classifier> = OnceLock::new();
    C.get_or_init(|| {
        let config = bizsignal::config::Config::from_yaml(RULES, "fuzz.yaml").unwrap();
        bizsignal::classify::Classifier::new(config.limits.clone(), &config.rules).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let c = classifier();
    if let Ok(r) = ExportTraceServiceRequest::decode(data) {
        c.classify_traces(&r.resource_spans, 0);
    }
    if let Ok(r) = ExportLogsServiceRequest::decode(data) {
        c.classify_logs(&r.resource_logs, 0);
    }
});
