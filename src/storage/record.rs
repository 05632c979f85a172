//! A signal as the journal and SQLite keep it: what all its rows share (ids,
//! service, attributes, resource) once, then its rows (the signal itself, kind
//! `span`/`log`/`event`, and one per business fact).
//!
//! [`WriteBatch`](super::WriteBatch) carries one [`BusinessEvent`] per row —
//! the ClickHouse layout, where "records skipped per day" is a plain `SUM` —
//! and each repeats the signal's attribute and resource JSON. Grouped, a
//! typical signal (a span with four facts) is about a fifth of the bytes to
//! journal, encode and index.

use crate::signal::BusinessEvent;
use serde::{Deserialize, Serialize};

/// One row of a signal: `[event_id, kind, name, time_ns, value, text, payload]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row(pub String, pub String, pub String, pub i64, pub Option<f64>, pub String, pub String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    pub signal_id: String,
    pub process: String,
    pub run_id: String,
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub attributes: String,
    pub resource: String,
    pub rows: Vec<Row>,
}

impl SignalRecord {
    fn shares(&self, e: &BusinessEvent) -> bool {
        self.signal_id == e.signal_id
            && self.run_id == e.run_id
            && self.process == e.process
            && self.service == e.service
            && self.trace_id == e.trace_id
            && self.span_id == e.span_id
            && self.attributes == e.attributes
            && self.resource == e.resource
    }

    /// Earliest row time (SQLite orders a run's signals by it).
    pub fn first_time_ns(&self) -> i64 {
        self.rows.iter().map(|r| r.3).min().unwrap_or(0)
    }

    pub fn expand(&self) -> impl Iterator<Item = BusinessEvent> + '_ {
        self.rows.iter().map(move |r| BusinessEvent {
            event_id: r.0.clone(),
            signal_id: self.signal_id.clone(),
            process: self.process.clone(),
            run_id: self.run_id.clone(),
            time_ns: r.3,
            kind: r.1.clone(),
            name: r.2.clone(),
            value: r.4,
            text: r.5.clone(),
            payload: r.6.clone(),
            service: self.service.clone(),
            trace_id: self.trace_id.clone(),
            span_id: self.span_id.clone(),
            attributes: self.attributes.clone(),
            resource: self.resource.clone(),
        })
    }
}

/// Groups consecutive events of the same signal (as `Signal::to_events`
/// produces them). Lossless: an event that differs in any shared field starts
/// a new record.
pub fn group(events: &[BusinessEvent]) -> Vec<SignalRecord> {
    let mut out: Vec<SignalRecord> = Vec::new();
    for e in events {
        let row = Row(
            e.event_id.clone(),
            e.kind.clone(),
            e.name.clone(),
            e.time_ns,
            e.value,
            e.text.clone(),
            e.payload.clone(),
        );
        match out.last_mut() {
            Some(last) if last.shares(e) => last.rows.push(row),
            _ => out.push(SignalRecord {
                signal_id: e.signal_id.clone(),
                process: e.process.clone(),
                run_id: e.run_id.clone(),
                service: e.service.clone(),
                trace_id: e.trace_id.clone(),
                span_id: e.span_id.clone(),
                attributes: e.attributes.clone(),
                resource: e.resource.clone(),
                rows: vec![row],
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(signal: &str, seq: u32, kind: &str, attrs: &str) -> BusinessEvent {
        BusinessEvent {
            event_id: format!("{signal}-{seq}"),
            signal_id: signal.into(),
            process: "p".into(),
            run_id: "r".into(),
            time_ns: 10 - seq as i64,
            kind: kind.into(),
            name: "n".into(),
            value: (seq > 0).then_some(seq as f64),
            text: String::new(),
            payload: String::new(),
            service: "s".into(),
            trace_id: "t".into(),
            span_id: "x".into(),
            attributes: attrs.into(),
            resource: "{}".into(),
        }
    }

    #[test]
    fn grouping_is_lossless_and_keeps_order() {
        let events = vec![
            ev("a", 0, "span", "{}"),
            ev("a", 1, "records", "{}"),
            ev("a", 2, "milestone", "{}"),
            ev("b", 0, "log", "{}"),
            // Same signal id, different attributes: its own record.
            ev("b", 1, "records", r#"{"k":1}"#),
        ];
        let g = group(&events);
        assert_eq!(g.iter().map(|r| r.rows.len()).collect::<Vec<_>>(), vec![3, 1, 1]);
        assert_eq!(g[0].first_time_ns(), 8);
        let back: Vec<BusinessEvent> = g.iter().flat_map(|r| r.expand()).collect();
        assert_eq!(back, events);
    }
}
