//! `POST /api/v1/events`: plain-HTTP intake for scripts that have no OTel
//! SDK. A small JSON body becomes the same [`Signal`] an OTLP record would,
//! with the same limits, and goes through the same tracker (stored before
//! the answer, retryable refusals when full).
//!
//! ```json
//! {"process": "nightly-backup", "run_id": "2026-11-22",
//!  "records": {"copied": 120, "failed": 2}, "progress": {"done": 5, "total": 10},
//!  "milestone": "snapshot-taken", "note": "…", "payload": {…},
//!  "status": "succeeded", "error": "…", "event_id": "retry-safe-key", "time": "2026-11-22T01:00:00Z"}
//! ```

use crate::classify::Classified;
use crate::config::Limits;
use crate::receivers::Intake;
use crate::signal::{Fact, LifecycleStatus, Signal, SignalKind};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone)]
pub struct EventsIntake {
    pub intake: Intake,
    pub limits: Limits,
    pub retry_after: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    process: String,
    run_id: String,
    #[serde(default)]
    records: BTreeMap<String, Value>,
    progress: Option<ProgressBody>,
    milestone: Option<String>,
    note: Option<String>,
    payload: Option<Value>,
    status: Option<String>,
    error: Option<String>,
    /// Idempotency key: the same key for the same run is stored once.
    event_id: Option<String>,
    /// RFC 3339; default: the time bizsignal received it.
    time: Option<String>,
    /// Shown as the signal's service.
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressBody {
    done: Option<Value>,
    total: Option<Value>,
}

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg.into() }))).into_response()
}

fn num(v: &Value, what: &str, limits: &Limits) -> Result<f64, String> {
    let n = v.as_f64().ok_or_else(|| format!("{what} must be a number"))?;
    if !n.is_finite() || n.abs() > limits.max_number || n < 0.0 {
        return Err(format!("{what} must be a non-negative number of at most {:e}", limits.max_number));
    }
    Ok(n)
}

fn name(s: &str, what: &str, limits: &Limits) -> Result<String, String> {
    if s.is_empty() || s.len() > limits.max_name_length {
        return Err(format!("{what} must be 1 to {} bytes", limits.max_name_length));
    }
    Ok(s.to_string())
}

impl EventsIntake {
    /// Validates the body and builds the signal; the error is for the client.
    fn signal(&self, body: &[u8], now: i64) -> Result<Signal, String> {
        let l = &self.limits;
        let e: EventBody = serde_json::from_slice(body).map_err(|e| format!("body is not a valid event: {e}"))?;
        let process = name(&e.process, "process", l)?;
        let run_id = name(&e.run_id, "run_id", l)?;
        let mut facts = Vec::new();
        for (outcome, v) in &e.records {
            facts.push(Fact::Records {
                outcome: name(outcome, "records outcome", l)?,
                count: num(v, &format!("records.{outcome}"), l)?,
            });
        }
        if let Some(p) = &e.progress {
            if let Some(d) = &p.done {
                facts.push(Fact::ProgressDone(num(d, "progress.done", l)?));
            }
            if let Some(t) = &p.total {
                facts.push(Fact::ProgressTotal(num(t, "progress.total", l)?));
            }
        }
        if let Some(m) = &e.milestone {
            facts.push(Fact::Milestone(name(m, "milestone", l)?));
        }
        if let Some(n) = &e.note {
            if n.len() > l.max_attribute_value_bytes {
                return Err(format!("note is longer than {} bytes", l.max_attribute_value_bytes));
            }
            facts.push(Fact::Note(n.clone()));
        }
        if let Some(p) = &e.payload {
            let text = p.to_string();
            if text.len() > l.max_payload_bytes {
                return Err(format!("payload is {} bytes, over the limit of {}", text.len(), l.max_payload_bytes));
            }
            facts.push(Fact::Payload(text));
        }
        if let Some(s) = &e.status {
            let status = LifecycleStatus::parse(s)
                .ok_or_else(|| format!("status must be started, succeeded or failed, got {s:?}"))?;
            let error = e.error.clone().filter(|_| status == LifecycleStatus::Failed);
            facts.push(Fact::Status { status, error });
        }
        if facts.is_empty() {
            return Err("give at least one of records, progress, milestone, note, payload, status".into());
        }
        let time = match &e.time {
            Some(t) => t
                .parse::<jiff::Timestamp>()
                .map_err(|_| format!("time must be an RFC 3339 timestamp, got {t:?}"))?
                .as_nanosecond() as i64,
            None => now,
        };
        // With an event_id a retry is recognised; without one every POST counts.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(process.as_bytes());
        h.update(&[0]);
        h.update(run_id.as_bytes());
        h.update(&[0]);
        match &e.event_id {
            Some(id) => h.update(id.as_bytes()),
            None => {
                h.update(body);
                h.update(&now.to_le_bytes());
            }
        }
        Ok(Signal {
            id: h.digest128(),
            kind: SignalKind::Event,
            process,
            run_id: Some(run_id),
            trace_id: String::new(),
            span_id: String::new(),
            name: "event".into(),
            start_ns: time,
            time_ns: time,
            text: e.note.clone().unwrap_or_default(),
            service: e.service.unwrap_or_else(|| "api".into()),
            attributes: Default::default(),
            resource: Vec::new().into(),
            facts,
        })
    }
}

pub async fn post_event(
    State(api): State<super::ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if crate::receivers::admission::is_memory_exhausted(&e) => {
            let msg = crate::receivers::admission::MemoryExhausted.to_string();
            let mut r = (StatusCode::TOO_MANY_REQUESTS, Json(json!({ "error": msg }))).into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(api.events.retry_after.as_secs().max(1)));
            return r;
        }
        Err(e) => return e.into_response(),
    };
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("application/json") {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Json(json!({"error": "send Content-Type: application/json"})))
            .into_response();
    }
    let s = &api.events;
    crate::metrics::SelfMetrics::add(&s.intake.metrics.events_received, 1);
    let signal = match s.signal(&body, crate::now_ns()) {
        Ok(sig) => sig,
        Err(e) => {
            crate::metrics::SelfMetrics::add(&s.intake.metrics.records_rejected, 1);
            return bad(e);
        }
    };
    let c = Classified { signals: vec![signal], ..Default::default() };
    match s.intake.submit(c).await {
        Ok(a) if a.rejected > 0 => bad(a.message),
        Ok(a) => {
            (StatusCode::OK, Json(json!({"stored": a.stored == 1, "duplicate": a.duplicates == 1}))).into_response()
        }
        Err(e) => {
            let status = if matches!(e, crate::runs::tracker::SubmitError::Busy) {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut r = (status, Json(json!({"error": e.to_string()}))).into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s.retry_after.as_secs().max(1)));
            r
        }
    }
}
