//! Classification: OTLP spans and log records in, business [`Signal`]s out.
//!
//! A record is business when it carries `business.process.name` or when a
//! mapping rule matches it; everything else is discarded here, cheaply, and
//! only counted. Invalid business records are rejected one by one with a
//! reason, so the rest of the batch is still accepted (OTLP partial success).

pub mod rules;

use crate::config::Limits;
use crate::signal::{Attributes, Fact, LifecycleStatus, Signal, SignalKind};
use crate::storage::record::json_str;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, ResourceSpans, Span};
use rules::{Rule, RuleSet};
use std::cell::OnceCell;
use std::fmt::Write as _;
use std::sync::Arc;

pub const PROCESS: &str = "business.process.name";
pub const RUN_ID: &str = "business.run.id";
pub const RUN_STATUS: &str = "business.run.status";
pub const RUN_ROOT: &str = "business.run.root";
pub const RECORDS_PREFIX: &str = "business.records.";
pub const VALUE_PREFIX: &str = "business.value.";
pub const PROGRESS_DONE: &str = "business.progress.done";
pub const PROGRESS_TOTAL: &str = "business.progress.total";
pub const MILESTONE: &str = "business.milestone";
pub const NOTE: &str = "business.note";
pub const PAYLOAD: &str = "business.payload";
pub const ERROR_MESSAGE: &str = "business.error.message";

/// The result of classifying one export request.
#[derive(Debug, Default)]
pub struct Classified {
    pub signals: Vec<Signal>,
    /// Records without business meaning (dropped, counted).
    pub discarded: u64,
    /// Records rejected as invalid, with the first reasons.
    pub rejected: u64,
    pub reasons: Vec<String>,
    /// Rejections per reason code, indexed like [`REJECT_REASONS`].
    pub rejected_by_reason: [u64; REJECT_REASONS.len()],
}

/// The bounded set of rejection reason codes (a metric attribute).
pub const REJECT_REASONS: [&str; 7] = [
    "invalid_number",
    "invalid_id",
    "invalid_payload",
    "too_many_attributes",
    "invalid_timestamp",
    "process_limit",
    "invalid_value",
];

/// The reason code of a rejection message produced by this module.
pub fn reason_code(reason: &str) -> usize {
    let code = if reason.contains("attributes exceed the limit") {
        "too_many_attributes"
    } else if reason.contains("must be a number")
        || reason.contains("must be a finite number")
        || reason.contains("must not be negative")
    {
        "invalid_number"
    } else if reason.starts_with(PAYLOAD) {
        "invalid_payload"
    } else if reason.starts_with(RUN_ID)
        || reason.starts_with("trace id")
        || reason.starts_with("span id")
        || reason.starts_with("no business.run.id")
    {
        "invalid_id"
    } else if reason.contains("timestamp") {
        "invalid_timestamp"
    } else {
        "invalid_value"
    };
    REJECT_REASONS.iter().position(|r| *r == code).unwrap_or(REJECT_REASONS.len() - 1)
}

impl Classified {
    pub fn reject(&mut self, code: usize, reason: String) {
        self.rejected += 1;
        self.rejected_by_reason[code] += 1;
        // Keep the message bounded: the first few reasons tell the story.
        if self.reasons.len() < 5 {
            self.reasons.push(reason);
        }
    }

    /// The OTLP `partial_success.error_message`, empty when nothing was rejected.
    pub fn rejection_message(&self) -> String {
        if self.rejected == 0 {
            return String::new();
        }
        let mut msg = format!("{} record(s) rejected: ", self.rejected);
        msg.push_str(&self.reasons.join("; "));
        if self.rejected as usize > self.reasons.len() {
            let _ = write!(msg, "; and {} more", self.rejected as usize - self.reasons.len());
        }
        msg
    }
}

/// Classifies records using the conventions and the configured mapping rules.
pub struct Classifier {
    limits: Limits,
    rules: RuleSet,
}

/// One resource of a request, as every record under it is classified: its
/// attributes, service and whether it makes its records business, and its
/// flattened attributes made once, for the first signal that needs them —
/// all signals of the resource share them.
pub(crate) struct ResourceCtx<'a> {
    attributes: &'a [KeyValue],
    service: &'a str,
    business: bool,
    flat: OnceCell<Arc<[(String, String)]>>,
}

impl<'a> ResourceCtx<'a> {
    fn new(resource: Option<&'a Resource>) -> Self {
        let attributes = resource.map(|r| r.attributes.as_slice()).unwrap_or(&[]);
        ResourceCtx {
            attributes,
            service: service_name(attributes),
            business: has_business(attributes),
            flat: OnceCell::new(),
        }
    }
}

/// A view of one record that conventions and rules read from.
pub(crate) struct RecordView<'a> {
    pub kind: SignalKind,
    pub service: &'a str,
    pub name: &'a str,
    pub body: Option<&'a AnyValue>,
    pub attributes: &'a [KeyValue],
    pub resource: &'a [KeyValue],
    pub trace_id: &'a [u8],
}

impl RecordView<'_> {
    pub fn attr(&self, key: &str) -> Option<&AnyValue> {
        self.attributes.iter().chain(self.resource.iter()).find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref())
    }
}

impl Classifier {
    pub fn new(limits: Limits, rules: &[rules::RuleConfig]) -> Result<Self, String> {
        let compiled = rules
            .iter()
            .map(|r| Rule::compile(r).map_err(|(p, e)| format!("rule {:?}: {p}: {e}", r.name)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Classifier { limits, rules: RuleSet::new(compiled) })
    }

    /// Mapping rules configured: any record may be business.
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    pub fn classify_traces(&self, resource_spans: &[ResourceSpans], now_ns: i64) -> Classified {
        let mut out = Classified::default();
        for rs in resource_spans {
            let resource = ResourceCtx::new(rs.resource.as_ref());
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    self.classify_span(span, &resource, now_ns, &mut out);
                }
            }
        }
        out
    }

    pub fn classify_logs(&self, resource_logs: &[ResourceLogs], now_ns: i64) -> Classified {
        let mut out = Classified::default();
        for rl in resource_logs {
            let resource = ResourceCtx::new(rl.resource.as_ref());
            for sl in &rl.scope_logs {
                for log in &sl.log_records {
                    self.classify_log(log, &resource, now_ns, &mut out);
                }
            }
        }
        out
    }

    /// Cheap test: does anything make this record business? `resource_business`
    /// is computed once per resource (a resource may carry the process name).
    fn is_candidate(&self, attributes: &[KeyValue], resource_business: bool) -> bool {
        resource_business || !self.rules.is_empty() || attributes.iter().any(|kv| kv.key.starts_with("business."))
    }

    fn classify_span(&self, span: &Span, resource: &ResourceCtx, now_ns: i64, out: &mut Classified) {
        let service = resource.service;
        if !self.is_candidate(&span.attributes, resource.business) {
            out.discarded += 1;
            return;
        }
        let view = RecordView {
            kind: SignalKind::Span,
            service,
            name: &span.name,
            body: None,
            attributes: &span.attributes,
            resource: resource.attributes,
            trace_id: &span.trace_id,
        };
        let what = || format!("span {:?}{}", truncate(&span.name, 64), in_trace(&span.trace_id));
        let rule = self.rules.first_match(&view);
        let mut draft = match Draft::from_view(&view, rule, &self.limits) {
            Ok(Some(d)) => d,
            Ok(None) => {
                out.discarded += 1;
                return;
            }
            Err(reason) => return out.reject(reason_code(&reason), format!("{}: {reason}", what())),
        };
        if let Err(reason) = check_ids(&span.trace_id, &span.span_id, &draft.run_id) {
            return out.reject(reason_code(&reason), format!("{}: {reason}", what()));
        }
        let (start, end) = match (to_ns(span.start_time_unix_nano, now_ns), to_ns(span.end_time_unix_nano, now_ns)) {
            (Ok(s), Ok(e)) => (s, e.max(s)),
            _ => return out.reject(reason_code("timestamp"), format!("{}: timestamp out of range", what())),
        };
        let status = span.status.as_ref();
        let failed = status.is_some_and(|s| s.code == StatusCode::Error as i32);
        let status_msg = status.map(|s| s.message.as_str()).unwrap_or("");
        // A root business span ends the run: no parent, or marked explicitly.
        let is_root = span.parent_span_id.is_empty() || draft.root;
        if is_root && !draft.facts.iter().any(|f| matches!(f, Fact::Status { .. })) {
            let error = failed.then(|| {
                draft
                    .error
                    .clone()
                    .or_else(|| (!status_msg.is_empty()).then(|| status_msg.to_string()))
                    .or_else(|| exception_message(span))
                    .unwrap_or_else(|| "span status ERROR".into())
            });
            draft.facts.push(Fact::Status {
                status: if failed { LifecycleStatus::Failed } else { LifecycleStatus::Succeeded },
                error: error.map(|e| truncate(&e, self.limits.max_attribute_value_bytes).to_string()),
            });
        }
        let id = u128::from_le_bytes(
            xxhash_rust::xxh3::xxh3_128(&[span.trace_id.as_slice(), span.span_id.as_slice()].concat()).to_le_bytes(),
        );
        out.signals.push(self.finish(
            draft,
            &view,
            resource,
            id,
            hex(&span.span_id),
            span.name.clone(),
            start,
            end,
            status_msg.to_string(),
        ));
    }

    fn classify_log(&self, log: &LogRecord, resource: &ResourceCtx, now_ns: i64, out: &mut Classified) {
        let service = resource.service;
        if !self.is_candidate(&log.attributes, resource.business) {
            out.discarded += 1;
            return;
        }
        let view = RecordView {
            kind: SignalKind::Log,
            service,
            name: &log.severity_text,
            body: log.body.as_ref(),
            attributes: &log.attributes,
            resource: resource.attributes,
            trace_id: &log.trace_id,
        };
        let what = || format!("log record at {}{}", log.time_unix_nano, in_trace(&log.trace_id));
        let rule = self.rules.first_match(&view);
        let mut draft = match Draft::from_view(&view, rule, &self.limits) {
            Ok(Some(d)) => d,
            Ok(None) => {
                out.discarded += 1;
                return;
            }
            Err(reason) => return out.reject(reason_code(&reason), format!("{}: {reason}", what())),
        };
        if let Err(reason) = check_ids(&log.trace_id, &log.span_id, &draft.run_id) {
            return out.reject(reason_code(&reason), format!("{}: {reason}", what()));
        }
        let t = if log.time_unix_nano != 0 { log.time_unix_nano } else { log.observed_time_unix_nano };
        let Ok(time) = to_ns(t, now_ns) else {
            return out.reject(reason_code("timestamp"), format!("{}: timestamp out of range", what()));
        };
        let body = log.body.as_ref().map(any_to_string).unwrap_or_default();
        // A failed status on a log takes the body as the error when nothing better is given.
        for f in &mut draft.facts {
            if let Fact::Status { status: LifecycleStatus::Failed, error } = f {
                if error.is_none() && !body.is_empty() {
                    *error = Some(truncate(&body, self.limits.max_attribute_value_bytes).to_string());
                }
            }
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&log.time_unix_nano.to_le_bytes());
        h.update(&log.observed_time_unix_nano.to_le_bytes());
        h.update(&log.trace_id);
        h.update(&log.span_id);
        h.update(log.severity_text.as_bytes());
        h.update(body.as_bytes());
        h.update(service.as_bytes());
        for kv in &log.attributes {
            h.update(kv.key.as_bytes());
            h.update(&[0]);
            h.update(kv.value.as_ref().map(any_to_string).unwrap_or_default().as_bytes());
            h.update(&[0]);
        }
        let id = h.digest128();
        let name = if log.severity_text.is_empty() { "log".to_string() } else { log.severity_text.clone() };
        out.signals.push(self.finish(draft, &view, resource, id, hex(&log.span_id), name, time, time, body));
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        draft: Draft,
        view: &RecordView,
        resource: &ResourceCtx,
        id: u128,
        span_id: String,
        name: String,
        start: i64,
        end: i64,
        text: String,
    ) -> Signal {
        let max_v = self.limits.max_attribute_value_bytes;
        let flatten = |kvs: &[KeyValue]| -> Vec<(String, String)> {
            kvs.iter()
                .filter(|kv| kv.key.len() <= self.limits.max_name_length)
                .map(|kv| (kv.key.clone(), truncated(kv.value.as_ref().map(any_to_string).unwrap_or_default(), max_v)))
                .collect()
        };
        Signal {
            id,
            kind: view.kind,
            process: draft.process,
            run_id: draft.run_id,
            trace_id: hex(view.trace_id),
            span_id,
            name: truncate(&name, self.limits.max_name_length).to_string(),
            start_ns: start,
            time_ns: end,
            text: truncate(&text, max_v).to_string(),
            service: view.service.to_string(),
            attributes: attributes_json(view.attributes, self.limits.max_name_length, max_v),
            resource: resource.flat.get_or_init(|| flatten(resource.attributes).into()).clone(),
            facts: draft.facts,
        }
    }
}

/// What conventions and the matching rule say about one record.
struct Draft {
    process: String,
    run_id: Option<String>,
    facts: Vec<Fact>,
    root: bool,
    error: Option<String>,
}

impl Draft {
    /// `Ok(None)`: not business. `Err`: business but invalid.
    fn from_view(view: &RecordView, rule: Option<&Rule>, limits: &Limits) -> Result<Option<Draft>, String> {
        if view.attributes.len() > limits.max_attributes_per_record {
            // Only business records are worth a rejection message.
            let business = rule.is_some() || view.attributes.iter().any(|kv| kv.key == PROCESS);
            return if business {
                Err(format!(
                    "{} attributes exceed the limit of {}",
                    view.attributes.len(),
                    limits.max_attributes_per_record
                ))
            } else {
                Ok(None)
            };
        }
        let process = match view.attr(PROCESS) {
            Some(v) => Some(name_value(v, PROCESS, limits)?),
            None => rule.and_then(|r| r.process(view)),
        };
        let Some(process) = process else { return Ok(None) };
        if process.is_empty() || process.len() > limits.max_name_length {
            return Err(format!("process name must be 1 to {} bytes", limits.max_name_length));
        }
        let run_id = match view.attr(RUN_ID) {
            Some(v) => Some(name_value(v, RUN_ID, limits)?),
            None => rule.and_then(|r| r.run_id(view)),
        };
        if let Some(r) = &run_id {
            if r.is_empty() || r.len() > limits.max_name_length {
                return Err(format!("{RUN_ID} must be 1 to {} bytes", limits.max_name_length));
            }
        }
        let mut d = Draft { process, run_id, facts: Vec::new(), root: false, error: None };
        for kv in view.attributes {
            let Some(v) = kv.value.as_ref() else { continue };
            let key = kv.key.as_str();
            if !key.starts_with("business.") {
                continue;
            }
            if let Some(outcome) = key.strip_prefix(RECORDS_PREFIX) {
                check_name(outcome, key, limits)?;
                d.facts.push(Fact::Records { outcome: outcome.to_string(), count: number(v, key, limits, false)? });
            } else if let Some(name) = key.strip_prefix(VALUE_PREFIX) {
                check_name(name, key, limits)?;
                d.facts.push(Fact::Value { name: name.to_string(), value: number(v, key, limits, true)? });
            } else {
                match key {
                    PROGRESS_DONE => d.facts.push(Fact::ProgressDone(number(v, key, limits, false)?)),
                    PROGRESS_TOTAL => d.facts.push(Fact::ProgressTotal(number(v, key, limits, false)?)),
                    MILESTONE => d.facts.push(Fact::Milestone(name_value(v, key, limits)?)),
                    NOTE => {
                        let s = any_to_string(v);
                        let text = if s.is_empty() { view.body.map(any_to_string).unwrap_or_default() } else { s };
                        if !text.is_empty() {
                            d.facts.push(Fact::Note(truncate(&text, limits.max_attribute_value_bytes).to_string()));
                        }
                    }
                    PAYLOAD => d.facts.push(Fact::Payload(payload(v, limits)?)),
                    RUN_STATUS => {
                        let s = any_to_string(v);
                        let status = LifecycleStatus::parse(&s).ok_or_else(|| {
                            format!("{RUN_STATUS} must be started, succeeded or failed, got {:?}", truncate(&s, 32))
                        })?;
                        d.facts.push(Fact::Status { status, error: None });
                    }
                    RUN_ROOT => d.root = matches!(v.value, Some(Value::BoolValue(true))) || any_to_string(v) == "true",
                    ERROR_MESSAGE => {
                        d.error = Some(truncate(&any_to_string(v), limits.max_attribute_value_bytes).to_string())
                    }
                    _ => {}
                }
            }
        }
        if let Some(rule) = rule {
            rule.apply(view, &mut d.facts, &mut d.root, limits)?;
        }
        if let Some(err) = &d.error {
            for f in &mut d.facts {
                if let Fact::Status { status: LifecycleStatus::Failed, error } = f {
                    error.get_or_insert_with(|| err.clone());
                }
            }
        }
        Ok(Some(d))
    }
}

fn in_trace(trace_id: &[u8]) -> String {
    if trace_id.is_empty() {
        String::new()
    } else {
        format!(" in trace {}", hex(trace_id))
    }
}

fn check_ids(trace_id: &[u8], span_id: &[u8], run_id: &Option<String>) -> Result<(), String> {
    if !(trace_id.is_empty() || trace_id.len() == 16) {
        return Err(format!("trace id must be 16 bytes, got {}", trace_id.len()));
    }
    if !(span_id.is_empty() || span_id.len() == 8) {
        return Err(format!("span id must be 8 bytes, got {}", span_id.len()));
    }
    if run_id.is_none() && trace_id.iter().all(|b| *b == 0) {
        return Err(format!("no {RUN_ID} and no trace id to identify the run"));
    }
    Ok(())
}

fn check_name(name: &str, key: &str, limits: &Limits) -> Result<(), String> {
    if name.is_empty() || name.len() > limits.max_name_length {
        return Err(format!("{key}: name must be 1 to {} bytes", limits.max_name_length));
    }
    Ok(())
}

/// A string-valued name attribute (process, run id, milestone).
fn name_value(v: &AnyValue, key: &str, limits: &Limits) -> Result<String, String> {
    let s = match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        _ => return Err(format!("{key} must be a string")),
    };
    if s.is_empty() || s.len() > limits.max_name_length {
        return Err(format!("{key} must be 1 to {} bytes", limits.max_name_length));
    }
    Ok(s)
}

/// A finite number within limits; numeric strings are accepted because many
/// logging bridges stringify attributes.
pub(crate) fn number(v: &AnyValue, key: &str, limits: &Limits, allow_negative: bool) -> Result<f64, String> {
    let n = match &v.value {
        Some(Value::IntValue(i)) => *i as f64,
        Some(Value::DoubleValue(d)) => *d,
        Some(Value::StringValue(s)) => {
            s.trim().parse::<f64>().map_err(|_| format!("{key} must be a number, got {:?}", truncate(s, 32)))?
        }
        _ => return Err(format!("{key} must be a number")),
    };
    if !n.is_finite() || n.abs() > limits.max_number {
        let shown = if n.abs() >= 1e15 { format!("{n:e}") } else { n.to_string() };
        return Err(format!("{key} must be a finite number of at most {:e}, got {shown}", limits.max_number));
    }
    if !allow_negative && n < 0.0 {
        return Err(format!("{key} must not be negative, got {n}"));
    }
    Ok(n)
}

fn payload(v: &AnyValue, limits: &Limits) -> Result<String, String> {
    let s = match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::KvlistValue(_)) | Some(Value::ArrayValue(_)) => any_to_json(v).to_string(),
        _ => return Err(format!("{PAYLOAD} must be a JSON string")),
    };
    if s.len() > limits.max_payload_bytes {
        return Err(format!("{PAYLOAD} is {} bytes, over the limit of {}", s.len(), limits.max_payload_bytes));
    }
    let parsed: serde_json::Value =
        serde_json::from_str(&s).map_err(|e| format!("{PAYLOAD} is not valid JSON: {e}"))?;
    Ok(parsed.to_string())
}

fn to_ns(t: u64, now_ns: i64) -> Result<i64, ()> {
    if t == 0 {
        return Ok(now_ns);
    }
    i64::try_from(t).map_err(|_| ())
}

fn exception_message(span: &Span) -> Option<String> {
    span.events.iter().filter(|e| e.name == "exception").find_map(|e| {
        e.attributes.iter().find(|kv| kv.key == "exception.message").and_then(|kv| kv.value.as_ref()).map(any_to_string)
    })
}

/// Whether a resource names the process (then all its records are candidates).
pub(crate) fn has_business(resource: &[KeyValue]) -> bool {
    resource.iter().any(|kv| kv.key == PROCESS)
}

fn service_name(resource: &[KeyValue]) -> &str {
    resource
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("unknown_service")
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
}

/// A record's attributes as stored (see [`Attributes`]): keys longer than
/// `max_key` left out, values as [`any_to_string`] makes them, cut to `max_value` bytes.
fn attributes_json(kvs: &[KeyValue], max_key: usize, max_value: usize) -> Attributes {
    let order = (0..kvs.len()).filter(|&i| kvs[i].key.len() <= max_key).collect();
    let capacity = 2 + kvs.iter().map(|kv| kv.key.len() + 24).sum::<usize>();
    let json = crate::storage::record::write_object(
        order,
        |i| &kvs[i].key,
        |out, i| match kvs[i].value.as_ref().and_then(|v| v.value.as_ref()) {
            // The common values without a `String` of their own.
            Some(Value::StringValue(s)) => json_str(out, truncate(s, max_value)),
            // An i64 has at most 20 characters.
            Some(Value::IntValue(n)) if max_value >= 20 => {
                out.push(b'"');
                serde_json::to_writer(&mut *out, n).expect("an integer serializes");
                out.push(b'"');
            }
            None => out.extend_from_slice(b"\"\""),
            Some(_) => json_str(out, truncate(&any_to_string(kvs[i].value.as_ref().expect("matched")), max_value)),
        },
        capacity,
    );
    Attributes::from_json(json)
}

/// [`truncate`] of an owned string, in place (no second allocation).
fn truncated(mut s: String, max: usize) -> String {
    let end = truncate(&s, max).len();
    s.truncate(end);
    s
}

/// Truncates at a char boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn any_to_string(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(_) => any_to_json(v).to_string(),
        None => String::new(),
    }
}

fn any_to_json(v: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &v.value {
        Some(Value::StringValue(s)) => J::String(s.clone()),
        Some(Value::BoolValue(b)) => J::Bool(*b),
        Some(Value::IntValue(i)) => J::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map(J::Number).unwrap_or(J::Null),
        Some(Value::BytesValue(b)) => J::String(hex(b)),
        Some(Value::ArrayValue(a)) => J::Array(a.values.iter().map(any_to_json).collect()),
        Some(Value::KvlistValue(kv)) => J::Object(
            kv.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map(any_to_json).unwrap_or(J::Null)))
                .collect(),
        ),
        _ => J::Null,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::ScopeSpans;

    /// A string attribute (shared with the lazy decoder's tests).
    pub(crate) fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(Value::StringValue(v.into())) }),
            ..Default::default()
        }
    }

    fn resource_spans(service: &str, spans: u8) -> ResourceSpans {
        let span = |i: u8| Span {
            trace_id: vec![1; 16],
            span_id: vec![service.len() as u8, i, 0, 0, 0, 0, 0, 1],
            parent_span_id: vec![9; 8],
            name: "step".into(),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_000_001,
            attributes: vec![kv("business.process.name", "import"), kv("note", "één twee")],
            ..Default::default()
        };
        ResourceSpans {
            resource: Some(Resource { attributes: vec![kv("service.name", service)], ..Default::default() }),
            scope_spans: vec![ScopeSpans { spans: (0..spans).map(span).collect(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn signals_of_one_resource_share_its_attributes_and_long_values_are_cut_at_a_char_boundary() {
        // "één twee" is 10 bytes; 3 bytes would cut the second "é" in half.
        let limits = Limits { max_attribute_value_bytes: 3, ..Limits::default() };
        let c = Classifier::new(limits, &[]).unwrap();
        let out =
            c.classify_traces(&[resource_spans("billing", 2), resource_spans("ledger", 1)], 1_700_000_000_000_000_000);
        assert_eq!(out.signals.len(), 3, "{:?}", out.reasons);
        let [a, b, other] = &out.signals[..] else { unreachable!() };
        assert!(Arc::ptr_eq(&a.resource, &b.resource), "one resource, one copy of its attributes");
        assert!(!Arc::ptr_eq(&a.resource, &other.resource));
        assert_eq!(&*a.resource, &[("service.name".to_string(), "bil".to_string())]);
        assert_eq!(&*other.resource, &[("service.name".to_string(), "led".to_string())]);
        assert_eq!(a.attributes.to_map().get("note").map(String::as_str), Some("é"));
    }

    #[test]
    fn attributes_are_written_as_the_json_of_their_string_forms() {
        use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
        let any = |k: &str, v: Value| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        let kvs = vec![
            any("s", Value::StringValue("a \"quoted\"\nline é".into())),
            any("i", Value::IntValue(-9_223_372_036_854_775_808)),
            any("d", Value::DoubleValue(1e21)),
            any("b", Value::BoolValue(true)),
            any("x", Value::BytesValue(vec![0xab, 0x01])),
            any("arr", Value::ArrayValue(ArrayValue { values: vec![AnyValue { value: Some(Value::IntValue(1)) }] })),
            any("map", Value::KvlistValue(KeyValueList { values: vec![kv("k", "v")] })),
            KeyValue { key: "none".into(), value: None, ..Default::default() },
            any("s", Value::StringValue("the later one wins".into())),
            any(&"k".repeat(300), Value::StringValue("key too long".into())),
        ];
        // The old way: owned pairs, then the JSON of a map of them.
        let expected = |max_key: usize, max_value: usize| {
            let map: std::collections::BTreeMap<String, String> = kvs
                .iter()
                .filter(|kv| kv.key.len() <= max_key)
                .map(|kv| {
                    (kv.key.clone(), truncated(kv.value.as_ref().map(any_to_string).unwrap_or_default(), max_value))
                })
                .collect();
            serde_json::to_string(&map).unwrap()
        };
        for (max_key, max_value) in [(256, 4096), (256, 7), (1000, 3), (1, 4096)] {
            let got = attributes_json(&kvs, max_key, max_value);
            assert_eq!(got.json(), expected(max_key, max_value), "limits {max_key}/{max_value}");
        }
        let all = attributes_json(&kvs, 256, 4096).to_map();
        assert_eq!(all.get("s").map(String::as_str), Some("the later one wins"));
        assert_eq!(all.get("i").map(String::as_str), Some("-9223372036854775808"));
        assert_eq!(all.get("none").map(String::as_str), Some(""));
        assert_eq!(all.get("missing"), None);
    }
}
