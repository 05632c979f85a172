//! JSON shapes of the API. Timestamps are RFC 3339 UTC; durations seconds.

use crate::runs::run::{ProcessRun, Violation};
use crate::signal::BusinessEvent;
use crate::storage::ProcessSummary;
use serde_json::{json, Value};

pub fn ts(ns: i64) -> Value {
    match jiff::Timestamp::from_nanosecond(ns as i128) {
        Ok(t) if ns != i64::MAX && ns != i64::MIN => Value::String(t.to_string()),
        _ => Value::Null,
    }
}

fn opt_ts(ns: Option<i64>) -> Value {
    ns.map(ts).unwrap_or(Value::Null)
}

fn violations(v: &[Violation]) -> Value {
    Value::Array(v.iter().map(|v| json!({"rule": v.rule, "message": v.message, "at": ts(v.at_ns)})).collect())
}

/// Counts as JSON numbers: integers when whole.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9e15 {
        json!(n as i64)
    } else {
        json!(n)
    }
}

fn progress(r: &ProcessRun) -> Value {
    if r.progress_done.is_none() && r.progress_total.is_none() {
        return Value::Null;
    }
    json!({
        "done": r.progress_done.as_ref().map(|s| number(s.value)),
        "total": r.progress_total.as_ref().map(|s| number(s.value)),
        "ratio": r.progress_ratio(),
        "eta": opt_ts(r.eta_ns()),
    })
}

pub fn run_summary(r: &ProcessRun, now: i64) -> Value {
    json!({
        "process": r.process,
        "run_id": r.run_id,
        "status": r.status.as_str(),
        "started_at": ts(r.started_at_ns),
        "ended_at": opt_ts(r.ended_at_ns()),
        "last_seen_at": ts(r.last_seen_at_ns),
        "duration_seconds": r.duration_seconds(now),
        "counts": r.counts.iter().map(|(k, v)| (k.to_string(), number(*v))).collect::<serde_json::Map<_, _>>(),
        "progress": progress(r),
        "last_milestone": r.milestones.last().map(|m| m.name.clone()),
        "violations": violations(&r.violations),
        "error": r.error(),
    })
}

pub fn run_full(r: &ProcessRun, now: i64, trace_url_template: Option<&str>) -> Value {
    let mut v = run_summary(r, now);
    let o = v.as_object_mut().expect("object");
    o.insert("milestones".into(), r.milestones.iter().map(|m| json!({"name": m.name, "at": ts(m.at_ns)})).collect());
    o.insert("notes".into(), r.notes.iter().map(|n| json!({"at": ts(n.at_ns), "text": n.text})).collect());
    o.insert(
        "payloads".into(),
        r.payloads
            .iter()
            .map(|p| json!({"at": ts(p.at_ns), "payload": serde_json::from_str::<Value>(&p.json).unwrap_or(Value::String(p.json.to_string()))}))
            .collect(),
    );
    o.insert(
        "values".into(),
        r.values.iter().map(|(k, s)| (k.to_string(), number(s.value))).collect::<serde_json::Map<_, _>>().into(),
    );
    o.insert("trace_ids".into(), json!(r.trace_ids));
    if let Some(t) = trace_url_template {
        o.insert(
            "trace_urls".into(),
            r.trace_ids.iter().map(|id| Value::String(t.replace("{trace_id}", id))).collect(),
        );
    }
    o.insert("services".into(), json!(r.services));
    o.insert("signal_count".into(), json!(r.signal_count));
    v
}

pub fn process(p: &ProcessSummary, now: i64) -> Value {
    json!({
        "name": p.name,
        "latest_run": p.latest_run.as_ref().map(|r| run_summary(r, now)),
        "last_success_at": opt_ts(p.last_success_at_ns),
        "active_runs": p.active_runs,
        "violations": violations(&p.violations),
    })
}

pub fn event(e: &BusinessEvent) -> Value {
    json!({
        "event_id": e.event_id,
        "at": ts(e.time_ns),
        "kind": e.kind,
        "name": e.name,
        "value": e.value,
        "text": e.text,
        "payload": if e.payload.is_empty() { Value::Null } else { serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null) },
        "service": e.service,
        "trace_id": e.trace_id,
        "span_id": e.span_id,
        "attributes": serde_json::from_str::<Value>(&e.attributes).unwrap_or(Value::Null),
    })
}
