//! OTLP/HTTP: `POST /v1/traces` and `POST /v1/logs`, protobuf or JSON,
//! identity or gzip. The body limit is checked twice: on the wire and while
//! inflating (the decoder stops one byte past the limit, so a gzip bomb is
//! refused without being inflated).

use super::admission::Reservation;
use super::lazy::{Expanded, OtlpRequest};
use super::Intake;
use crate::runs::tracker::SubmitError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// Bytes reserved for the decoded form of a request, per byte of protobuf
/// (after decompression).
pub const DECODED_PER_PROTOBUF_BYTE: usize = 1;
/// The same per byte of OTLP/JSON (decoded through a JSON value tree).
pub const DECODED_PER_JSON_BYTE: usize = 2;

#[derive(Clone)]
pub struct HttpReceiver {
    pub intake: Intake,
    pub max_request_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub retry_after: Duration,
}

/// Which OTLP encoding a request uses; the response uses the same.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// A refusal, rendered in the request's encoding as a `google.rpc.Status`.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    pub encoding: Option<Encoding>,
    pub retry_after: Option<Duration>,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>, encoding: Option<Encoding>) -> Self {
        HttpError { status, message: message.into(), encoding, retry_after: None }
    }

    pub fn from_submit(e: SubmitError, encoding: Option<Encoding>, retry_after: Duration) -> Self {
        let status = match e {
            SubmitError::Busy => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        HttpError { status, message: e.to_string(), encoding, retry_after: Some(retry_after) }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let grpc_code = match self.status {
            StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => 3,
            StatusCode::PAYLOAD_TOO_LARGE => 11,
            StatusCode::TOO_MANY_REQUESTS => 8,
            StatusCode::UNAUTHORIZED => 16,
            _ => 14,
        };
        let mut resp = match self.encoding {
            Some(Encoding::Protobuf) => {
                let st = tonic_types::Status { code: grpc_code, message: self.message, details: vec![] };
                (self.status, [(header::CONTENT_TYPE, "application/x-protobuf")], st.encode_to_vec()).into_response()
            }
            _ => {
                let body = serde_json::json!({ "code": grpc_code, "message": self.message }).to_string();
                (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        };
        if let Some(d) = self.retry_after {
            let secs = d.as_secs().max(1).to_string();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
        }
        resp
    }
}

impl HttpReceiver {
    pub fn router(self) -> Router {
        let limit = self.max_request_bytes;
        Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/logs", post(logs))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self)
    }

    /// Content type and encoding checks, inflation with a limit, decoding.
    pub fn decode<T: OtlpRequest + DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
        reservation: Option<&Reservation>,
    ) -> Result<(Expanded<T>, Encoding), HttpError> {
        let metrics = &self.intake.metrics;
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let encoding = match mime.as_str() {
            "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
            "application/json" => Encoding::Json,
            _ => {
                crate::metrics::SelfMetrics::add(&metrics.requests_invalid, 1);
                return Err(HttpError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "unsupported content type {:?}; use application/x-protobuf or application/json",
                        crate::classify::truncate(ct, 100)
                    ),
                    None,
                ));
            }
        };
        let data: Bytes = match headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") | Some("identity") => body.clone(),
            Some("gzip") => {
                let inflated = inflate_reserving(body, self.max_decompressed_bytes, reservation).map_err(|e| {
                    if e.busy {
                        crate::metrics::SelfMetrics::add(&metrics.requests_refused_memory, 1);
                        let mut err = HttpError::new(StatusCode::TOO_MANY_REQUESTS, e.message, Some(encoding));
                        err.retry_after = Some(self.retry_after);
                        return err;
                    }
                    let status = if e.too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::BAD_REQUEST };
                    let counter = if e.too_large { &metrics.requests_too_large } else { &metrics.requests_invalid };
                    crate::metrics::SelfMetrics::add(counter, 1);
                    HttpError::new(status, e.message, Some(encoding))
                })?;
                Bytes::from(inflated)
            }
            Some(other) => {
                crate::metrics::SelfMetrics::add(&metrics.requests_invalid, 1);
                return Err(HttpError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "unsupported content encoding {:?}; use gzip or identity",
                        crate::classify::truncate(other, 50)
                    ),
                    Some(encoding),
                ));
            }
        };
        // The decoded form is reserved before decoding: about the protobuf
        // size, and for JSON (a value tree first) about twice the text.
        if let Some(r) = reservation {
            let factor = if encoding == Encoding::Json { DECODED_PER_JSON_BYTE } else { DECODED_PER_PROTOBUF_BYTE };
            if r.grow(data.len().saturating_mul(factor)).is_err() {
                crate::metrics::SelfMetrics::add(&metrics.requests_refused_memory, 1);
                let mut err = HttpError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    super::admission::MemoryExhausted.to_string(),
                    Some(encoding),
                );
                err.retry_after = Some(self.retry_after);
                return Err(err);
            }
        }
        let msg = match encoding {
            Encoding::Protobuf => T::decode_lazy(data, self.intake.classifier.has_rules())
                .map_err(|e| format!("body is not a valid OTLP protobuf message: {e}")),
            Encoding::Json => decode_json::<T>(&data).map(T::whole),
        };
        msg.map(|m| (m, encoding)).map_err(|m| {
            crate::metrics::SelfMetrics::add(&metrics.requests_invalid, 1);
            HttpError::new(StatusCode::BAD_REQUEST, m, Some(encoding))
        })
    }
}

pub struct InflateError {
    pub too_large: bool,
    /// The in-flight memory budget could not cover the inflated bytes (retryable).
    pub busy: bool,
    pub message: String,
}

/// Inflates gzip, stopping one byte past `limit`.
pub fn inflate_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    inflate_reserving(body, limit, None)
}

/// Inflates gzip, stopping one byte past `limit`; with a reservation, each
/// chunk is reserved from the in-flight memory budget before it is kept.
pub fn inflate_reserving(
    body: &[u8],
    limit: usize,
    reservation: Option<&Reservation>,
) -> Result<Vec<u8>, InflateError> {
    const CHUNK: usize = 256 << 10;
    let invalid = |e: std::io::Error| InflateError {
        too_large: false,
        busy: false,
        message: format!("body is not valid gzip: {e}"),
    };
    // The buffer grows by doubling; its capacity is reserved before each allocation.
    let base = reservation.map_or(0, |r| r.held());
    let mut out: Vec<u8> = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(body).take(limit as u64 + 1);
    loop {
        if out.len() == out.capacity() {
            let want = (out.capacity() * 2).clamp(CHUNK, limit + 1).max(out.len() + 1);
            if let Some(r) = reservation {
                if r.cover(base + want).is_err() {
                    return Err(InflateError {
                        too_large: false,
                        busy: true,
                        message: super::admission::MemoryExhausted.to_string(),
                    });
                }
            }
            out.reserve_exact(want - out.len());
        }
        let (start, cap) = (out.len(), out.capacity());
        out.resize(cap, 0);
        let mut filled = start;
        let mut eof = false;
        while filled < cap {
            match dec.read(&mut out[filled..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(invalid(e)),
            }
        }
        out.truncate(filled);
        if eof {
            break;
        }
    }
    if out.len() > limit {
        return Err(InflateError {
            too_large: true,
            busy: false,
            message: format!("body inflates to more than the limit of {limit} bytes"),
        });
    }
    Ok(out)
}

/// OTLP/JSON: the protobuf JSON mapping (lowerCamelCase names, hex ids, int64
/// as strings or numbers); snake_case field names are accepted too.
pub fn decode_json<T: DeserializeOwned>(data: &[u8]) -> Result<T, String> {
    let mut v: serde_json::Value = serde_json::from_slice(data).map_err(|e| format!("body is not valid JSON: {e}"))?;
    camel_case_keys(&mut v);
    serde_json::from_value(v).map_err(|e| format!("body is not a valid OTLP/JSON message: {e}"))
}

/// Renames snake_case object keys to lowerCamelCase. Safe for OTLP, where
/// user-chosen names (attribute keys) are values, never object keys.
fn camel_case_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map.keys().any(|k| k.contains('_')) {
                let old = std::mem::take(map);
                for (k, val) in old {
                    let key = if k.contains('_') { to_camel(&k) } else { k };
                    map.insert(key, val);
                }
            }
            map.values_mut().for_each(camel_case_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(camel_case_keys),
        _ => {}
    }
}

fn to_camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The export response; in JSON an absent `partialSuccess` is omitted (not null).
fn encode<M: Message>(m: &M, rejected_key: &str, accepted: &super::Accepted, encoding: Encoding) -> Response {
    match encoding {
        Encoding::Protobuf => ([(header::CONTENT_TYPE, "application/x-protobuf")], m.encode_to_vec()).into_response(),
        Encoding::Json => {
            let body = if accepted.rejected > 0 {
                serde_json::json!({ "partialSuccess": { rejected_key: accepted.rejected.to_string(), "errorMessage": accepted.message } })
            } else {
                serde_json::json!({})
            };
            ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
    }
}

/// The encoding to answer a refusal in, before the body is looked at:
/// protobuf when the client named it, else JSON.
pub fn request_encoding(headers: &HeaderMap) -> Option<Encoding> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if ct.starts_with("application/x-protobuf") || ct.starts_with("application/protobuf") {
        Some(Encoding::Protobuf)
    } else {
        None
    }
}

fn body_or_error(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    r: &HttpReceiver,
    headers: &HeaderMap,
) -> Result<Bytes, HttpError> {
    // Answer in the client's encoding when it named a known one.
    let enc = request_encoding(headers);
    body.map_err(|e| {
        let status = e.status();
        if super::admission::is_memory_exhausted(&e) {
            // Counted where the body reading stopped.
            let mut err =
                HttpError::new(StatusCode::TOO_MANY_REQUESTS, super::admission::MemoryExhausted.to_string(), enc);
            err.retry_after = Some(r.retry_after);
            err
        } else if status == StatusCode::PAYLOAD_TOO_LARGE {
            crate::metrics::SelfMetrics::add(&r.intake.metrics.requests_too_large, 1);
            HttpError::new(status, format!("body is larger than the limit of {} bytes", r.max_request_bytes), enc)
        } else {
            HttpError::new(status, format!("cannot read body: {e}"), enc)
        }
    })
}

async fn traces(
    State(r): State<HttpReceiver>,
    reservation: Option<Extension<Arc<Reservation>>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body_or_error(body, &r, &headers)?;
    let (req, enc) = r.decode::<ExportTraceServiceRequest>(&headers, &body, reservation.as_deref().map(|r| &**r))?;
    drop(body);
    let accepted =
        r.intake.expanded_traces(req).await.map_err(|e| HttpError::from_submit(e, Some(enc), r.retry_after))?;
    let partial_success = (accepted.rejected > 0).then(|| ExportTracePartialSuccess {
        rejected_spans: accepted.rejected,
        error_message: accepted.message.clone(),
    });
    Ok(encode(&ExportTraceServiceResponse { partial_success }, "rejectedSpans", &accepted, enc))
}

async fn logs(
    State(r): State<HttpReceiver>,
    reservation: Option<Extension<Arc<Reservation>>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body_or_error(body, &r, &headers)?;
    let (req, enc) = r.decode::<ExportLogsServiceRequest>(&headers, &body, reservation.as_deref().map(|r| &**r))?;
    drop(body);
    let accepted =
        r.intake.expanded_logs(req).await.map_err(|e| HttpError::from_submit(e, Some(enc), r.retry_after))?;
    let partial_success = (accepted.rejected > 0).then(|| ExportLogsPartialSuccess {
        rejected_log_records: accepted.rejected,
        error_message: accepted.message.clone(),
    });
    Ok(encode(&ExportLogsServiceResponse { partial_success }, "rejectedLogRecords", &accepted, enc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_keys_become_camel_case() {
        let mut v = serde_json::json!({"resource_spans": [{"scope_spans": [{"spans": [{"trace_id": "ab", "attributes": [{"key": "a_b"}]}]}]}]});
        camel_case_keys(&mut v);
        assert_eq!(v["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"], "ab");
        assert_eq!(v["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["key"], "a_b");
    }

    #[test]
    fn gzip_bomb_stops_at_limit() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        let err = inflate_limited(&bomb, 1 << 20).expect_err("refused");
        assert!(err.too_large);
    }
}
