//! A signal as the journal and SQLite keep it: what all its rows share (ids,
//! service, attributes, resource) once, then its rows (the signal itself, kind
//! `span`/`log`/`event`, and one per business fact).
//!
//! [`WriteBatch`](super::WriteBatch) carries one [`BusinessEvent`] per row —
//! the ClickHouse layout, where "records skipped per day" is a plain `SUM` —
//! and each repeats the signal's attribute and resource JSON. Grouped, a
//! typical signal (a span with four facts) is about a fifth of the bytes to
//! journal, encode and index.

use crate::signal::{BusinessEvent, Fact, Signal, SignalKind};
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
    /// A signal's storage form under `run_id`: the row of the signal itself
    /// (kind `span`/`log`/`event`, at its start, value = duration in seconds
    /// for spans), then one row per fact.
    pub fn from_signal(s: &Signal, run_id: &str) -> SignalRecord {
        Self::from_signal_memo(s, run_id, &mut ResourceMemo::default())
    }

    /// [`from_signal`](Self::from_signal) with the resource's JSON remembered
    /// between calls: the signals of one export mostly share one resource.
    pub fn from_signal_memo(s: &Signal, run_id: &str, memo: &mut ResourceMemo) -> SignalRecord {
        let mut rows = Vec::with_capacity(s.facts.len() + 1);
        let row =
            |seq: u32, kind: &str, name: String, time_ns: i64, value: Option<f64>, text: String, payload: String| {
                Row(crate::signal::event_id(s.id, seq), kind.to_string(), name, time_ns, value, text, payload)
            };
        let duration = (s.kind == SignalKind::Span).then(|| (s.time_ns - s.start_ns).max(0) as f64 / 1e9);
        rows.push(row(0, s.kind.as_str(), s.name.clone(), s.start_ns, duration, s.text.clone(), String::new()));
        let t = s.time_ns;
        for (i, fact) in s.facts.iter().enumerate() {
            let seq = i as u32 + 1;
            let none = String::new;
            rows.push(match fact {
                Fact::Records { outcome, count } => {
                    row(seq, "records", outcome.clone(), t, Some(*count), none(), none())
                }
                Fact::ProgressDone(v) => row(seq, "progress", "done".into(), t, Some(*v), none(), none()),
                Fact::ProgressTotal(v) => row(seq, "progress", "total".into(), t, Some(*v), none(), none()),
                Fact::Milestone(m) => row(seq, "milestone", m.clone(), t, None, none(), none()),
                Fact::Note(n) => row(seq, "note", none(), t, None, n.clone(), none()),
                Fact::Payload(p) => row(seq, "payload", none(), t, None, none(), p.clone()),
                Fact::Value { name, value } => row(seq, "value", name.clone(), t, Some(*value), none(), none()),
                Fact::Status { status, error } => {
                    row(seq, "status", status.as_str().into(), t, None, error.clone().unwrap_or_default(), none())
                }
            });
        }
        SignalRecord {
            signal_id: hex128(s.id),
            process: s.process.clone(),
            run_id: run_id.to_string(),
            service: s.service.clone(),
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            attributes: json_object(&s.attributes),
            resource: memo.json(&s.resource),
            rows,
        }
    }

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

/// The last resource seen and its JSON.
#[derive(Default)]
pub struct ResourceMemo(Vec<(String, String)>, String);

impl ResourceMemo {
    fn json(&mut self, pairs: &[(String, String)]) -> String {
        if self.0 != pairs || self.1.is_empty() {
            self.0 = pairs.to_vec();
            self.1 = json_object(pairs);
        }
        self.1.clone()
    }
}

/// A JSON object of string pairs, keys sorted, the last of a repeated key
/// winning: byte for byte what serde_json makes of the pairs collected into a
/// `BTreeMap`, without building the map (this ran for every stored signal).
pub fn json_object(pairs: &[(String, String)]) -> String {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    // Equal keys: the later pair first, so `dedup_by` keeps it.
    order.sort_unstable_by(|&a, &b| pairs[a].0.cmp(&pairs[b].0).then(b.cmp(&a)));
    order.dedup_by(|a, b| pairs[*a].0 == pairs[*b].0);
    let mut out = String::with_capacity(2 + pairs.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>());
    out.push('{');
    for (n, &i) in order.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        json_str(&mut out, &pairs[i].0);
        out.push(':');
        json_str(&mut out, &pairs[i].1);
    }
    out.push('}');
    out
}

fn json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly these; anything else is copied as is.
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// `{:032x}` without the formatting machinery (two per stored row).
pub fn hex128(v: u128) -> String {
    crate::classify::hex(&v.to_be_bytes())
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
    fn json_object_matches_serde_json_of_a_btreemap() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("b", "2"), ("a", "1")],
            vec![("k", "first"), ("j", "x"), ("k", "last")],
            vec![("quote\"d", "back\\slash"), ("ctl", "a\u{1}b\n"), ("ü", "日本\u{7f}")],
        ];
        for c in cases {
            let pairs: Vec<(String, String)> = c.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let map: std::collections::BTreeMap<&str, &str> = c.iter().copied().collect();
            assert_eq!(json_object(&pairs), serde_json::to_string(&map).unwrap(), "{c:?}");
        }
        for v in [0u128, 1, u128::MAX, 0x0123_4567_89ab_cdef_0011_2233_4455_6677] {
            assert_eq!(hex128(v), format!("{v:032x}"));
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
