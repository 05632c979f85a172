//! OTLP/gRPC: `TraceService/Export` and `LogsService/Export` on tonic, gzip
//! accepted, message size limited after decompression (tonic enforces the
//! limit while inflating, so a gzip bomb stops at the limit).

use super::admission::{MemoryExhausted, Reservation};
use super::Intake;
use crate::metrics::SelfMetrics;
use crate::runs::tracker::SubmitError;
use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_server::{LogsService, LogsServiceServer},
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Clone)]
pub struct GrpcReceiver {
    intake: Intake,
    retry_after: Duration,
}

/// Maps tonic's own refusals to the codes OTLP clients act on correctly.
///
/// tonic answers INTERNAL for a request it cannot decode (gRPC's general
/// guidance); OTLP clients must see INVALID_ARGUMENT so they do not retry a
/// body that will never decode. The status travels in a trailers-only
/// response, so rewriting the header is enough.
pub fn invalid_argument_for_decode_errors<B>(mut r: http::Response<B>) -> http::Response<B> {
    let h = r.headers_mut();
    let decode_error = h.get("grpc-status").is_some_and(|v| v == "13")
        && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.starts_with("failed%20to%20decode"));
    if decode_error {
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    // Over the size limit: tonic says OUT_OF_RANGE, which OTLP clients retry
    // forever. RESOURCE_EXHAUSTED without RetryInfo tells them not to.
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11");
    if too_large {
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    r
}

impl GrpcReceiver {
    pub fn new(intake: Intake, retry_after: Duration) -> Self {
        GrpcReceiver { intake, retry_after }
    }

    /// The tonic router with both OTLP services.
    pub fn router<I: tonic::service::Interceptor + Clone + Send + Sync + 'static>(
        self,
        max_message_bytes: usize,
        auth: I,
    ) -> tonic::service::Routes {
        use tonic::service::interceptor::InterceptedService;
        let traces = TraceServiceServer::new(self.clone())
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max_message_bytes);
        let logs = LogsServiceServer::new(self)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max_message_bytes);
        tonic::service::Routes::new(InterceptedService::new(traces, auth.clone()))
            .add_service(InterceptedService::new(logs, auth))
    }

    /// The admission layer reserved the message's bytes as they arrived;
    /// its decoded form is reserved now (about its protobuf size, like
    /// OTLP/HTTP), or the request is refused retryably.
    fn reserve_decoded<M: prost::Message>(&self, request: &Request<M>) -> Result<(), Status> {
        let Some(r) = request.extensions().get::<Arc<Reservation>>() else { return Ok(()) };
        let decoded = request.get_ref().encoded_len() * super::http::DECODED_PER_PROTOBUF_BYTE;
        r.grow(decoded).map_err(|_| {
            SelfMetrics::add(&self.intake.metrics.requests_refused_memory, 1);
            Status::with_error_details(
                Code::ResourceExhausted,
                MemoryExhausted.to_string(),
                ErrorDetails::with_retry_info(Some(self.retry_after)),
            )
        })
    }

    fn status(&self, e: SubmitError) -> Status {
        // Both codes are retryable for OTLP clients; RESOURCE_EXHAUSTED only
        // because RetryInfo is attached.
        let code = match e {
            SubmitError::Busy => Code::ResourceExhausted,
            _ => Code::Unavailable,
        };
        Status::with_error_details(code, e.to_string(), ErrorDetails::with_retry_info(Some(self.retry_after)))
    }
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.reserve_decoded(&request)?;
        let accepted = self.intake.traces(request.into_inner()).await.map_err(|e| self.status(e))?;
        let partial_success = (accepted.rejected > 0)
            .then(|| ExportTracePartialSuccess { rejected_spans: accepted.rejected, error_message: accepted.message });
        Ok(Response::new(ExportTraceServiceResponse { partial_success }))
    }
}

#[tonic::async_trait]
impl LogsService for GrpcReceiver {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.reserve_decoded(&request)?;
        let accepted = self.intake.logs(request.into_inner()).await.map_err(|e| self.status(e))?;
        let partial_success = (accepted.rejected > 0).then(|| ExportLogsPartialSuccess {
            rejected_log_records: accepted.rejected,
            error_message: accepted.message,
        });
        Ok(Response::new(ExportLogsServiceResponse { partial_success }))
    }
}
