//! OTLP receivers (gRPC and HTTP) and the intake step they share: classify,
//! hand to the run tracker, wait until stored, answer. Answers follow the
//! OTLP specification: partial success for invalid records, retryable
//! statuses when bizsignal cannot take more, never success for dropped data.

pub mod admission;
pub mod grpc;
pub mod http;
pub mod lazy;

use crate::classify::{Classified, Classifier};
use crate::metrics::SelfMetrics;
use crate::runs::tracker::{SubmitError, TrackerHandle};
use lazy::OtlpRequest as _;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use std::sync::Arc;

/// The outcome of an accepted export: how many records were rejected and why.
#[derive(Debug, Default, Clone)]
pub struct Accepted {
    pub rejected: i64,
    pub message: String,
    /// Signals newly stored, and signals recognised as already stored.
    pub stored: usize,
    pub duplicates: usize,
}

/// Shared intake used by every receiver.
#[derive(Clone)]
pub struct Intake {
    pub classifier: Arc<Classifier>,
    pub tracker: TrackerHandle,
    pub metrics: Arc<SelfMetrics>,
    pub processes: Arc<ProcessRegistry>,
}

/// The distinct process names bizsignal has accepted, bounded by
/// `limits.max_processes` so a client cannot create unbounded state (and
/// metric series) by inventing process names.
pub struct ProcessRegistry {
    known: std::sync::Mutex<std::collections::HashSet<String>>,
    max: usize,
}

impl ProcessRegistry {
    pub fn new(max: usize, existing: impl IntoIterator<Item = String>) -> Self {
        ProcessRegistry { known: std::sync::Mutex::new(existing.into_iter().collect()), max }
    }

    /// Removes the signals of processes beyond the limit (registering new
    /// processes while there is room) and returns them. One lock per request,
    /// and signals of already-known processes cost one set lookup.
    pub fn admit(&self, signals: &mut Vec<crate::signal::Signal>) -> Vec<crate::signal::Signal> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if signals.iter().all(|sig| known.contains(&sig.process)) {
            return Vec::new();
        }
        let (admitted, refused) = std::mem::take(signals).into_iter().partition(|sig| {
            if known.contains(&sig.process) {
                return true;
            }
            if known.len() < self.max {
                known.insert(sig.process.clone());
                return true;
            }
            false
        });
        *signals = admitted;
        refused
    }
}

impl Intake {
    pub async fn traces(&self, req: ExportTraceServiceRequest) -> Result<Accepted, SubmitError> {
        self.expanded_traces(req.whole()).await
    }

    /// Traces decoded lazily (protobuf): `skipped` spans were dropped undecoded.
    pub async fn expanded_traces(&self, e: lazy::Expanded<ExportTraceServiceRequest>) -> Result<Accepted, SubmitError> {
        SelfMetrics::add(&self.metrics.spans_received, e.total as u64);
        let mut classified = self.classifier.classify_traces(&e.request.resource_spans, crate::now_ns());
        classified.discarded += e.skipped;
        // Only the signals wait for the commit; the decoded request goes now.
        drop(e);
        self.submit(classified).await
    }

    pub async fn logs(&self, req: ExportLogsServiceRequest) -> Result<Accepted, SubmitError> {
        self.expanded_logs(req.whole()).await
    }

    /// Logs decoded lazily (protobuf): `skipped` records were dropped undecoded.
    pub async fn expanded_logs(&self, e: lazy::Expanded<ExportLogsServiceRequest>) -> Result<Accepted, SubmitError> {
        SelfMetrics::add(&self.metrics.logs_received, e.total as u64);
        let mut classified = self.classifier.classify_logs(&e.request.resource_logs, crate::now_ns());
        classified.discarded += e.skipped;
        drop(e);
        self.submit(classified).await
    }

    pub async fn submit(&self, mut c: Classified) -> Result<Accepted, SubmitError> {
        let refused = self.processes.admit(&mut c.signals);
        if !refused.is_empty() {
            let code = crate::classify::REJECT_REASONS.iter().position(|r| *r == "process_limit").unwrap_or(0);
            let max = self.processes.max;
            for sig in refused {
                let name = crate::classify::truncate(&sig.process, 64);
                c.reject(code, format!("process {name:?}: more than limits.max_processes ({max}) distinct processes"));
            }
        }
        SelfMetrics::add(&self.metrics.records_discarded, c.discarded);
        SelfMetrics::add(&self.metrics.records_rejected, c.rejected);
        for (counter, n) in self.metrics.rejected_by_reason.iter().zip(c.rejected_by_reason) {
            if n > 0 {
                SelfMetrics::add(counter, n);
            }
        }
        SelfMetrics::add(&self.metrics.signals_classified, c.signals.len() as u64);
        let message = c.rejection_message();
        if c.rejected > 0 {
            tracing::debug!(rejected = c.rejected, reason = %message, "rejected invalid business records");
        }
        let o = self.tracker.submit(c.signals).await?;
        Ok(Accepted { rejected: c.rejected as i64, message, stored: o.stored, duplicates: o.duplicates })
    }
}
