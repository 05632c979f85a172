//! OTLP/gRPC: `TraceService/Export` and `LogsService/Export` on tonic, gzip
//! accepted, message size limited after decompression (tonic enforces the
//! limit while inflating, so a gzip bomb stops at the limit).

use super::admission::{MemoryExhausted, Reservation};
use super::lazy::{LazyLogs, LazyTraces};
use super::Intake;
use crate::metrics::SelfMetrics;
use crate::runs::tracker::SubmitError;
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
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
        let traces =
            OtlpService::<Traces> { receiver: Arc::new(self.clone()), max_message_bytes, kind: Default::default() };
        let logs = OtlpService::<Logs> { receiver: Arc::new(self), max_message_bytes, kind: Default::default() };
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

/// One OTLP export service (`TraceService` or `LogsService`), as the code
/// tonic generates for them, but decoding the request lazily (see
/// [`super::lazy`]): the generated servers decode every span into prost's
/// types before the handler runs.
#[derive(Clone)]
struct OtlpService<K> {
    receiver: Arc<GrpcReceiver>,
    max_message_bytes: usize,
    kind: std::marker::PhantomData<K>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What differs between the two services.
trait Kind: Clone + Send + Sync + 'static {
    const NAME: &'static str;
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Default + Send + 'static;
    fn export(r: Arc<GrpcReceiver>, req: Request<Self::Request>)
        -> BoxFuture<Result<Response<Self::Response>, Status>>;
}

#[derive(Clone)]
struct Traces;
#[derive(Clone)]
struct Logs;

impl Kind for Traces {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    type Request = LazyTraces;
    type Response = ExportTraceServiceResponse;
    fn export(
        r: Arc<GrpcReceiver>,
        request: Request<LazyTraces>,
    ) -> BoxFuture<Result<Response<Self::Response>, Status>> {
        Box::pin(async move {
            r.reserve_decoded(&request)?;
            let expanded =
                request.into_inner().expand(r.intake.classifier.has_rules()).map_err(Status::invalid_argument)?;
            let accepted = r.intake.expanded_traces(expanded).await.map_err(|e| r.status(e))?;
            let partial_success = (accepted.rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: accepted.rejected,
                error_message: accepted.message,
            });
            Ok(Response::new(ExportTraceServiceResponse { partial_success }))
        })
    }
}

impl Kind for Logs {
    const NAME: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    type Request = LazyLogs;
    type Response = ExportLogsServiceResponse;
    fn export(r: Arc<GrpcReceiver>, request: Request<LazyLogs>) -> BoxFuture<Result<Response<Self::Response>, Status>> {
        Box::pin(async move {
            r.reserve_decoded(&request)?;
            let expanded =
                request.into_inner().expand(r.intake.classifier.has_rules()).map_err(Status::invalid_argument)?;
            let accepted = r.intake.expanded_logs(expanded).await.map_err(|e| r.status(e))?;
            let partial_success = (accepted.rejected > 0).then_some(ExportLogsPartialSuccess {
                rejected_log_records: accepted.rejected,
                error_message: accepted.message,
            });
            Ok(Response::new(ExportLogsServiceResponse { partial_success }))
        })
    }
}

impl<K: Kind> tonic::server::NamedService for OtlpService<K> {
    const NAME: &'static str = K::NAME;
}

struct Export<K>(Arc<GrpcReceiver>, std::marker::PhantomData<K>);

impl<K: Kind> tonic::server::UnaryService<K::Request> for Export<K> {
    type Response = K::Response;
    type Future = BoxFuture<Result<Response<K::Response>, Status>>;
    fn call(&mut self, request: Request<K::Request>) -> Self::Future {
        K::export(self.0.clone(), request)
    }
}

impl<K: Kind, B> tower::Service<http::Request<B>> for OtlpService<K>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let export = req.uri().path().strip_prefix('/').and_then(|p| p.strip_prefix(K::NAME)) == Some("/Export");
        if !export {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let (receiver, max) = (self.receiver.clone(), self.max_message_bytes);
        Box::pin(async move {
            let mut gzip = EnabledCompressionEncodings::default();
            gzip.enable(CompressionEncoding::Gzip);
            let codec = tonic_prost::ProstCodec::<K::Response, K::Request>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_compression_config(gzip, gzip)
                .apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(Export::<K>(receiver, std::marker::PhantomData), req).await)
        })
    }
}
