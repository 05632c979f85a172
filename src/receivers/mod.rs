//! OTLP receivers (gRPC and HTTP) and the intake step they share: classify,
//! hand to the run tracker, wait until stored, answer. Answers follow the
//! OTLP specification: partial success for invalid records, retryable
//! statuses when bizsignal cannot take more, never success for dropped data.

pub mod grpc;
pub mod http;

use crate::classify::{Classified, Classifier};
use crate::metrics::SelfMetrics;
use crate::runs::tracker::{SubmitError, TrackerHandle};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use std::sync::Arc;

/// The outcome of an accepted export: how many records were rejected and why.
#[derive(Debug, Default, Clone)]
pub struct Accepted {
    pub rejected: i64,
    pub message: String,
}

/// Shared intake used by every receiver.
#[derive(Clone)]
pub struct Intake {
    pub classifier: Arc<Classifier>,
    pub tracker: TrackerHandle,
    pub metrics: Arc<SelfMetrics>,
}

impl Intake {
    pub async fn traces(&self, req: ExportTraceServiceRequest) -> Result<Accepted, SubmitError> {
        let n: usize = req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        SelfMetrics::add(&self.metrics.spans_received, n as u64);
        let classified = self.classifier.classify_traces(&req.resource_spans, crate::now_ns());
        self.submit(classified).await
    }

    pub async fn logs(&self, req: ExportLogsServiceRequest) -> Result<Accepted, SubmitError> {
        let n: usize = req.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum();
        SelfMetrics::add(&self.metrics.logs_received, n as u64);
        let classified = self.classifier.classify_logs(&req.resource_logs, crate::now_ns());
        self.submit(classified).await
    }

    pub async fn submit(&self, c: Classified) -> Result<Accepted, SubmitError> {
        SelfMetrics::add(&self.metrics.records_discarded, c.discarded);
        SelfMetrics::add(&self.metrics.records_rejected, c.rejected);
        SelfMetrics::add(&self.metrics.signals_classified, c.signals.len() as u64);
        let message = c.rejection_message();
        if c.rejected > 0 {
            tracing::debug!(rejected = c.rejected, reason = %message, "rejected invalid business records");
        }
        self.tracker.submit(c.signals).await?;
        Ok(Accepted { rejected: c.rejected as i64, message })
    }
}
