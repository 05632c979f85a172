//! Lazy OTLP protobuf decoding: most spans and log records a team forwards
//! carry no business meaning, and decoding each into prost's types (a
//! `String` per attribute key and value, a `Vec` per list) was most of the
//! cost of handling them.
//!
//! The request is decoded down to its resources and scopes; each span or log
//! record stays raw bytes (a slice of the request, not a copy) until a scan of
//! its attribute keys says it may be business: a `business.*` key, a resource
//! naming the process, or mapping rules configured (rules can match any
//! record, so then everything is decoded). Only those are decoded and
//! classified; the rest are counted as discarded, exactly as the classifier
//! would have discarded them. The scan checks the record's protobuf framing;
//! the contents of a record that is not business (its strings' UTF-8, its
//! events) are never looked at.
//!
//! Used by the OTLP/gRPC receiver (through its codec) and for OTLP/HTTP
//! protobuf bodies (OTLP/JSON is decoded whole). An earlier attempt on HTTP
//! was reverted when `tests/reliability_memory.rs` found acknowledged runs
//! missing from reads; the cause was a read racing a SQLite flush (fixed in
//! `storage::sqlite`), not the decoding, and that test now passes with it.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

/// `ExportTraceServiceRequest` with each span left encoded.
#[derive(Clone, PartialEq, Message)]
pub struct LazyTraces {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<LazyResourceSpans>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LazyResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<LazyScopeSpans>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct LazyScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub spans: Vec<Bytes>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `ExportLogsServiceRequest` with each log record left encoded.
#[derive(Clone, PartialEq, Message)]
pub struct LazyLogs {
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<LazyResourceLogs>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LazyResourceLogs {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<LazyScopeLogs>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct LazyScopeLogs {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub log_records: Vec<Bytes>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// `Span.attributes` and `LogRecord.attributes` field numbers.
const SPAN_ATTRIBUTES: u64 = 9;
const LOG_ATTRIBUTES: u64 = 6;

/// A request whose non-business records were dropped undecoded.
pub struct Expanded<R> {
    pub request: R,
    /// Records in the request.
    pub total: usize,
    /// Records dropped by the scan (no business meaning).
    pub skipped: u64,
}

impl LazyTraces {
    /// Decodes the spans that may be business. `decode_all`: mapping rules
    /// are configured, so any span may match one.
    pub fn expand(self, decode_all: bool) -> Result<Expanded<ExportTraceServiceRequest>, String> {
        let (mut total, mut skipped) = (0, 0);
        let mut resource_spans = Vec::with_capacity(self.resource_spans.len());
        for rs in self.resource_spans {
            let all = decode_all || resource_is_business(rs.resource.as_ref());
            let mut scope_spans = Vec::with_capacity(rs.scope_spans.len());
            for ss in rs.scope_spans {
                total += ss.spans.len();
                let mut spans = Vec::new();
                for raw in ss.spans {
                    let scan = scan(&raw, SPAN_ATTRIBUTES).map_err(framing)?;
                    if all || scan.business {
                        // Decoded into a vector of the right size: grown one
                        // attribute at a time it was reallocated twice per span.
                        let mut span = Span { attributes: Vec::with_capacity(scan.attributes), ..Default::default() };
                        span.merge(raw).map_err(|e| format!("failed to decode a span: {e}"))?;
                        spans.push(span);
                    } else {
                        skipped += 1;
                    }
                }
                if !spans.is_empty() {
                    scope_spans.push(ScopeSpans { scope: ss.scope, spans, schema_url: ss.schema_url });
                }
            }
            if !scope_spans.is_empty() {
                resource_spans.push(ResourceSpans { resource: rs.resource, scope_spans, schema_url: rs.schema_url });
            }
        }
        Ok(Expanded { request: ExportTraceServiceRequest { resource_spans }, total, skipped })
    }
}

impl LazyLogs {
    /// Decodes the log records that may be business (see [`LazyTraces::expand`]).
    pub fn expand(self, decode_all: bool) -> Result<Expanded<ExportLogsServiceRequest>, String> {
        let (mut total, mut skipped) = (0, 0);
        let mut resource_logs = Vec::with_capacity(self.resource_logs.len());
        for rl in self.resource_logs {
            let all = decode_all || resource_is_business(rl.resource.as_ref());
            let mut scope_logs = Vec::with_capacity(rl.scope_logs.len());
            for sl in rl.scope_logs {
                total += sl.log_records.len();
                let mut log_records = Vec::new();
                for raw in sl.log_records {
                    let scan = scan(&raw, LOG_ATTRIBUTES).map_err(framing)?;
                    if all || scan.business {
                        let mut log =
                            LogRecord { attributes: Vec::with_capacity(scan.attributes), ..Default::default() };
                        log.merge(raw).map_err(|e| format!("failed to decode a log record: {e}"))?;
                        log_records.push(log);
                    } else {
                        skipped += 1;
                    }
                }
                if !log_records.is_empty() {
                    scope_logs.push(ScopeLogs { scope: sl.scope, log_records, schema_url: sl.schema_url });
                }
            }
            if !scope_logs.is_empty() {
                resource_logs.push(ResourceLogs { resource: rl.resource, scope_logs, schema_url: rl.schema_url });
            }
        }
        Ok(Expanded { request: ExportLogsServiceRequest { resource_logs }, total, skipped })
    }
}

/// An OTLP export request decoded whole (OTLP/HTTP, OTLP/JSON, tests).
pub trait OtlpRequest: Message + Default + Sized {
    /// Records in the request.
    fn records(&self) -> usize;

    /// Decodes protobuf lazily: records without business meaning are
    /// counted and dropped undecoded (`decode_all`: mapping rules are
    /// configured, decode everything).
    fn decode_lazy(body: Bytes, decode_all: bool) -> Result<Expanded<Self>, String>;

    /// The request as an [`Expanded`] one with nothing skipped.
    fn whole(self) -> Expanded<Self> {
        Expanded { total: self.records(), skipped: 0, request: self }
    }
}

impl OtlpRequest for ExportTraceServiceRequest {
    fn records(&self) -> usize {
        self.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum()
    }

    fn decode_lazy(body: Bytes, decode_all: bool) -> Result<Expanded<Self>, String> {
        LazyTraces::decode(body).map_err(|e| e.to_string())?.expand(decode_all)
    }
}

impl OtlpRequest for ExportLogsServiceRequest {
    fn records(&self) -> usize {
        self.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum()
    }

    fn decode_lazy(body: Bytes, decode_all: bool) -> Result<Expanded<Self>, String> {
        LazyLogs::decode(body).map_err(|e| e.to_string())?.expand(decode_all)
    }
}

fn resource_is_business(r: Option<&Resource>) -> bool {
    r.is_some_and(|r| crate::classify::has_business(&r.attributes))
}

/// Whether an encoded span or log record has an attribute (repeated
/// `KeyValue` field `attributes_tag`) whose key starts with `business.`.
/// Walks the fields without decoding them; an error means broken framing.
pub fn has_business_attribute(buf: &[u8], attributes_tag: u64) -> Result<bool, String> {
    scan(buf, attributes_tag).map(|s| s.business).map_err(framing)
}

fn framing(e: Framing) -> String {
    format!("failed to decode a record: {e}")
}

/// What the walk over a record's fields found.
struct Scan {
    /// An attribute key starts with `business.`.
    business: bool,
    /// Attribute fields.
    attributes: usize,
}

/// The walk behind [`has_business_attribute`]. It runs for every span and log
/// record received, so it indexes the slice directly and its error is a
/// small enum: with prost's `decode_varint` and a `String` error per field
/// it was ≈ 260 ns per non-business span, most of the receivers' cost for them.
fn scan(buf: &[u8], attributes_tag: u64) -> Result<Scan, Framing> {
    let mut found = Scan { business: false, attributes: 0 };
    let mut pos = 0;
    while pos < buf.len() {
        let (tag, field) = field_at(buf, &mut pos)?;
        if tag != attributes_tag {
            continue;
        }
        found.attributes += 1;
        let Some(kv) = field else { continue };
        if found.business {
            continue;
        }
        let mut p = 0;
        while p < kv.len() {
            let (t, f) = field_at(kv, &mut p)?;
            if t == 1 {
                found.business = f.is_some_and(|key| key.starts_with(b"business."));
                break;
            }
        }
    }
    Ok(found)
}

/// How a record's protobuf framing is broken.
#[derive(Debug, PartialEq)]
enum Framing {
    FieldNumberZero,
    Truncated,
    Varint,
    WireType(u64),
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Framing::FieldNumberZero => f.write_str("field number 0"),
            Framing::Truncated => f.write_str("truncated field"),
            Framing::Varint => f.write_str("invalid varint"),
            Framing::WireType(w) => write!(f, "wire type {w}"),
        }
    }
}

/// Reads the field at `pos`: its number and, for a length-delimited one, its bytes.
#[inline(always)]
fn field_at<'a>(buf: &'a [u8], pos: &mut usize) -> Result<(u64, Option<&'a [u8]>), Framing> {
    let key = varint_at(buf, pos)?;
    let (tag, wire_type) = (key >> 3, key & 7);
    if tag == 0 {
        return Err(Framing::FieldNumberZero);
    }
    let len = match wire_type {
        0 => return varint_at(buf, pos).map(|_| (tag, None)),
        1 => 8,
        5 => 4,
        2 => usize::try_from(varint_at(buf, pos)?).map_err(|_| Framing::Truncated)?,
        w => return Err(Framing::WireType(w)),
    };
    let end = pos.checked_add(len).filter(|&end| end <= buf.len()).ok_or(Framing::Truncated)?;
    let field = &buf[*pos..end];
    *pos = end;
    Ok((tag, (wire_type == 2).then_some(field)))
}

/// A base-128 varint at `pos`, as prost reads it: at most ten bytes, the
/// tenth at most 1.
#[inline(always)]
fn varint_at(buf: &[u8], pos: &mut usize) -> Result<u64, Framing> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos + i).ok_or(Framing::Truncated)?;
        if i == 9 && b > 1 {
            return Err(Framing::Varint);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *pos += i + 1;
            return Ok(value);
        }
    }
    Err(Framing::Varint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::tests::kv;
    use opentelemetry_proto::tonic::common::v1::KeyValue;

    fn span(name: &str, attrs: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            start_time_unix_nano: 5,
            attributes: attrs,
            ..Default::default()
        }
    }

    fn request(resource: Vec<KeyValue>, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource { attributes: resource, ..Default::default() }),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn lazy(r: &ExportTraceServiceRequest) -> LazyTraces {
        LazyTraces::decode(Bytes::from(r.encode_to_vec())).unwrap()
    }

    #[test]
    fn only_spans_with_a_business_key_are_decoded_and_they_decode_whole() {
        let business = span("b", vec![kv("http.route", "/x"), kv("business.process.name", "import")]);
        let plain = span("p", vec![kv("http.route", "/x"), kv("note", "business.process.name")]);
        let r = request(vec![kv("service.name", "svc")], vec![plain.clone(), business.clone(), plain]);
        let e = lazy(&r).expand(false).unwrap();
        assert_eq!((e.total, e.skipped), (3, 1 + 1));
        assert_eq!(e.request.resource_spans[0].scope_spans[0].spans, vec![business]);
        let attributes = &e.request.resource_spans[0].scope_spans[0].spans[0].attributes;
        assert_eq!(attributes.capacity(), 2, "decoded into a vector of its size");
        assert_eq!(e.request.resource_spans[0].resource, r.resource_spans[0].resource);
    }

    #[test]
    fn a_business_resource_or_rules_decode_everything() {
        let plain = span("p", vec![kv("http.route", "/x")]);
        let r = request(vec![kv("business.process.name", "import")], vec![plain.clone()]);
        assert_eq!(lazy(&r).expand(false).unwrap().skipped, 0);
        let r = request(vec![], vec![plain.clone()]);
        let e = lazy(&r).expand(true).unwrap();
        assert_eq!((e.skipped, e.request), (0, r.clone()));
        let e = lazy(&r).expand(false).unwrap();
        assert_eq!((e.skipped, e.request.resource_spans.len()), (1, 0));
    }

    #[test]
    fn broken_framing_in_a_span_is_an_error_not_a_skip() {
        let mut raw = span("p", vec![kv("http.route", "/x")]).encode_to_vec();
        raw.truncate(raw.len() - 2);
        assert!(has_business_attribute(&raw, SPAN_ATTRIBUTES).is_err());
        assert!(has_business_attribute(&[0x4a, 0x05, 0x0a], SPAN_ATTRIBUTES).is_err());
        assert!(has_business_attribute(&[0x00], SPAN_ATTRIBUTES).is_err());
        assert!(has_business_attribute(&[0x4f], SPAN_ATTRIBUTES).is_err(), "wire type 7");
        assert!(has_business_attribute(&[0x08, 0x80], SPAN_ATTRIBUTES).is_err(), "a varint cut off");
        // Field 1 as a varint of ten bytes: nine full ones, then the tenth.
        let ten_bytes = |last: u8| [[0x08].as_slice(), &[0xff; 9], &[last]].concat();
        assert!(has_business_attribute(&ten_bytes(0x02), SPAN_ATTRIBUTES).is_err(), "a varint over 64 bits");
        assert!(has_business_attribute(&ten_bytes(0x01), SPAN_ATTRIBUTES).is_ok(), "u64::MAX");
        // A key whose tag and length take more than one byte each.
        let long = format!("business.{}", "x".repeat(200));
        let raw = span("p", vec![kv("http.route", "/x"), kv(&long, "v")]).encode_to_vec();
        assert_eq!(has_business_attribute(&raw, SPAN_ATTRIBUTES), Ok(true));
        let raw = span("p", vec![kv(&"x".repeat(200), "business.")]).encode_to_vec();
        assert_eq!(has_business_attribute(&raw, SPAN_ATTRIBUTES), Ok(false));
    }

    #[test]
    fn logs_are_scanned_by_their_own_attribute_field() {
        let business = LogRecord { attributes: vec![kv("business.milestone", "m")], ..Default::default() };
        let plain = LogRecord { attributes: vec![kv("k", "v")], severity_text: "INFO".into(), ..Default::default() };
        let r = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs { log_records: vec![plain, business.clone()], ..Default::default() }],
                ..Default::default()
            }],
        };
        let e = LazyLogs::decode(Bytes::from(r.encode_to_vec())).unwrap().expand(false).unwrap();
        assert_eq!((e.total, e.skipped), (2, 1));
        assert_eq!(e.request.resource_logs[0].scope_logs[0].log_records, vec![business]);
    }
}
