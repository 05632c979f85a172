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
use std::borrow::Cow;
use std::sync::Arc;

/// One row of a signal: `[event_id, kind, name, time_ns, value, text, payload]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row(pub String, pub String, pub String, pub i64, pub Option<f64>, pub String, pub String);

/// [`Row`] with its strings borrowed where the JSON has no escapes.
#[derive(Deserialize)]
#[allow(dead_code)] // Read only to check the types.
struct RowCheck<'a>(
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    i64,
    Option<f64>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
);

/// A signal's rows as the JSON array the journal and SQLite's `rows` column
/// keep (`[[event_id, kind, name, time_ns, value, text, payload], …]`),
/// written once, straight from the signal, when the tracker files it: the
/// journal embeds it and SQLite binds it as is. Parsed into [`Row`]s only
/// where they are read (ClickHouse, replays, the API).
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    json: String,
    len: u32,
    first_time_ns: i64,
}

impl Rows {
    pub fn from_rows(rows: &[Row]) -> Rows {
        Rows {
            json: serde_json::to_string(rows).expect("rows serialize"),
            len: rows.len() as u32,
            first_time_ns: rows.iter().map(|r| r.3).min().unwrap_or(0),
        }
    }

    /// Rows from their JSON (a journal record, SQLite's `rows` column),
    /// checked as strictly as [`Row`] would be but without copying its
    /// strings (they are copied where the rows are read, if at all).
    pub fn from_json(json: String) -> Result<Rows, serde_json::Error> {
        let rows: Vec<RowCheck> = serde_json::from_str(&json)?;
        Ok(Rows { len: rows.len() as u32, first_time_ns: rows.iter().map(|r| r.3).min().unwrap_or(0), json })
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rows; the JSON was checked when these were built or read.
    pub fn parse(&self) -> Vec<Row> {
        serde_json::from_str(&self.json).unwrap_or_default()
    }

    /// Appends a row (tests build odd signals with it).
    #[cfg(test)]
    pub(crate) fn push(&mut self, row: Row) {
        let mut rows = self.parse();
        rows.push(row);
        *self = Rows::from_rows(&rows);
    }
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Rows::from_json(raw.get().to_string()).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SignalRecord {
    pub signal_id: String,
    pub process: String,
    pub run_id: String,
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// JSON object text (attribute → value).
    #[serde(deserialize_with = "json_text")]
    pub attributes: String,
    /// JSON object text, shared by the signals of one resource.
    #[serde(deserialize_with = "json_text")]
    pub resource: Arc<str>,
    pub rows: Rows,
}

/// A JSON text field of a journal record: embedded as JSON since rows were
/// written straight from signals; older journals hold it as a JSON string.
fn json_text<'de, D: serde::Deserializer<'de>, T: From<String>>(d: D) -> Result<T, D::Error> {
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    let text = raw.get();
    if text.starts_with('"') {
        return serde_json::from_str::<String>(text).map(T::from).map_err(serde::de::Error::custom);
    }
    Ok(T::from(text.to_string()))
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
    ///
    /// The rows go straight into their JSON (no `Row` of owned strings: that
    /// was ~30 allocations per signal, freed again on the SQLite flusher).
    pub fn from_signal_memo(s: &Signal, run_id: &str, memo: &mut ResourceMemo) -> SignalRecord {
        let mut w = RowsWriter::new(s.id, rows_capacity(s));
        let duration = (s.kind == SignalKind::Span).then(|| (s.time_ns - s.start_ns).max(0) as f64 / 1e9);
        w.row(s.kind.as_str(), &s.name, s.start_ns, duration, &s.text, "");
        let t = s.time_ns;
        for fact in &s.facts {
            match fact {
                Fact::Records { outcome, count } => w.row("records", outcome, t, Some(*count), "", ""),
                Fact::ProgressDone(v) => w.row("progress", "done", t, Some(*v), "", ""),
                Fact::ProgressTotal(v) => w.row("progress", "total", t, Some(*v), "", ""),
                Fact::Milestone(m) => w.row("milestone", m, t, None, "", ""),
                Fact::Note(n) => w.row("note", "", t, None, n, ""),
                Fact::Payload(p) => w.row("payload", "", t, None, "", p),
                Fact::Value { name, value } => w.row("value", name, t, Some(*value), "", ""),
                Fact::Status { status, error } => {
                    w.row("status", status.as_str(), t, None, error.as_deref().unwrap_or(""), "")
                }
            }
        }
        SignalRecord {
            signal_id: hex128(s.id),
            process: s.process.clone(),
            run_id: run_id.to_string(),
            service: s.service.clone(),
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            attributes: s.attributes.json().to_string(),
            resource: memo.get_or_make(&s.resource, |pairs| json_object(pairs).into()),
            rows: w.finish(),
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
            && *self.resource == *e.resource
    }

    /// Earliest row time (SQLite orders a run's signals by it).
    pub fn first_time_ns(&self) -> i64 {
        self.rows.first_time_ns
    }

    pub fn expand(&self) -> impl Iterator<Item = BusinessEvent> + '_ {
        self.rows.parse().into_iter().map(move |r| BusinessEvent {
            event_id: r.0,
            signal_id: self.signal_id.clone(),
            process: self.process.clone(),
            run_id: self.run_id.clone(),
            time_ns: r.3,
            kind: r.1,
            name: r.2,
            value: r.4,
            text: r.5,
            payload: r.6,
            service: self.service.clone(),
            trace_id: self.trace_id.clone(),
            span_id: self.span_id.clone(),
            attributes: self.attributes.clone(),
            resource: self.resource.to_string(),
        })
    }

    /// Appends the record as a JSON object (the journal's form, read back by
    /// `Deserialize`): the JSON fields embedded as they are, not escaped into
    /// strings (escaping them was ≈ 9 % of the tracker thread).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let fields: [(&str, &str); 6] = [
            ("signal_id", &self.signal_id),
            ("process", &self.process),
            ("run_id", &self.run_id),
            ("service", &self.service),
            ("trace_id", &self.trace_id),
            ("span_id", &self.span_id),
        ];
        out.push(b'{');
        for (k, v) in fields {
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
            json_str(out, v);
            out.push(b',');
        }
        for (k, v) in [("attributes", &*self.attributes), ("resource", &*self.resource), ("rows", self.rows.json())] {
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v.as_bytes());
            out.push(if k == "rows" { b'}' } else { b',' });
        }
    }
}

/// Room for a signal's rows JSON: its strings, plus 96 bytes a row for the
/// id, time, value and punctuation (≈ 80 in practice; a long value fits).
/// 64 bytes a row undershot, and growing the buffer was ≈ 1.5 % of the
/// server's CPU under mixed load.
fn rows_capacity(s: &Signal) -> usize {
    let strings: usize = s
        .facts
        .iter()
        .map(|f| match f {
            Fact::Records { outcome: t, .. } | Fact::Milestone(t) | Fact::Note(t) | Fact::Payload(t) => t.len(),
            Fact::Value { name, .. } => name.len(),
            Fact::Status { error, .. } => error.as_ref().map_or(0, String::len),
            Fact::ProgressDone(_) | Fact::ProgressTotal(_) => 0,
        })
        .sum();
    2 + 96 * (s.facts.len() + 1) + s.name.len() + s.text.len() + strings
}

/// Writes a signal's rows as JSON, byte for byte what serde_json makes of the `Vec<Row>`.
struct RowsWriter {
    id: u128,
    out: Vec<u8>,
    len: u32,
    first_time_ns: i64,
}

impl RowsWriter {
    fn new(id: u128, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity);
        out.push(b'[');
        RowsWriter { id, out, len: 0, first_time_ns: i64::MAX }
    }

    fn row(&mut self, kind: &str, name: &str, time_ns: i64, value: Option<f64>, text: &str, payload: &str) {
        let out = &mut self.out;
        if self.len > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"[\"");
        push_hex128(out, crate::signal::event_id_hash(self.id, self.len));
        out.extend_from_slice(b"\",");
        json_str(out, kind);
        out.push(b',');
        json_str(out, name);
        out.push(b',');
        serde_json::to_writer(&mut *out, &time_ns).expect("an integer serializes");
        out.push(b',');
        match value {
            Some(v) => serde_json::to_writer(&mut *out, &v).expect("a float serializes"),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b',');
        json_str(out, text);
        out.push(b',');
        json_str(out, payload);
        out.push(b']');
        self.len += 1;
        self.first_time_ns = self.first_time_ns.min(time_ns);
    }

    fn finish(mut self) -> Rows {
        self.out.push(b']');
        let json = String::from_utf8(self.out).expect("rows JSON is UTF-8 (built from &strs)");
        Rows { json, len: self.len, first_time_ns: if self.len == 0 { 0 } else { self.first_time_ns } }
    }
}

/// The last shared value seen (a resource's attributes, or its JSON) and
/// what was made of it: the signals of one export mostly share one resource,
/// so it is converted once, not once per signal.
pub struct LastShared<T: ?Sized, V>(Option<(Arc<T>, V)>);

impl<T: ?Sized, V> Default for LastShared<T, V> {
    fn default() -> Self {
        LastShared(None)
    }
}

impl<T: ?Sized + PartialEq, V: Clone> LastShared<T, V> {
    /// `make(key)`, or what it made last time for an equal key (mostly the same `Arc`).
    pub fn get_or_make(&mut self, key: &Arc<T>, make: impl FnOnce(&T) -> V) -> V {
        match &self.0 {
            Some((k, v)) if Arc::ptr_eq(k, key) || **k == **key => v.clone(),
            _ => {
                let v = make(key);
                self.0 = Some((key.clone(), v.clone()));
                v
            }
        }
    }
}

/// A resource's attributes → its JSON (the tracker, per commit).
pub type ResourceMemo = LastShared<[(String, String)], Arc<str>>;

/// A JSON object of string pairs, keys sorted, the last of a repeated key
/// winning: byte for byte what serde_json makes of the pairs collected into a
/// `BTreeMap`, without building the map (this ran for every stored signal).
pub fn json_object(pairs: &[(String, String)]) -> String {
    let capacity = 2 + pairs.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>();
    write_object((0..pairs.len()).collect(), |i| &pairs[i].0, |out, i| json_str(out, &pairs[i].1), capacity)
}

/// [`json_object`] of the pairs `order` picks out, each value written by
/// `value` (a JSON string), so the classifier can write protobuf attributes
/// without owned copies of them first.
pub fn write_object<'k>(
    mut order: Vec<usize>,
    key: impl Fn(usize) -> &'k str,
    mut value: impl FnMut(&mut Vec<u8>, usize),
    capacity: usize,
) -> String {
    // Equal keys: the later pair first, so `dedup_by` keeps it.
    order.sort_unstable_by(|&a, &b| key(a).cmp(key(b)).then(b.cmp(&a)));
    order.dedup_by(|a, b| key(*a) == key(*b));
    let mut out = Vec::with_capacity(capacity);
    out.push(b'{');
    for (n, &i) in order.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        json_str(&mut out, key(i));
        out.push(b':');
        value(&mut out, i);
    }
    out.push(b'}');
    String::from_utf8(out).expect("JSON of &strs is UTF-8")
}

/// Appends `s` as a JSON string, byte for byte as serde_json writes it.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly these; anything else is copied as is.
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        serde_json::to_writer(&mut *out, s).expect("a string serializes");
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// `{:032x}` without the formatting machinery (two per stored row).
pub fn hex128(v: u128) -> String {
    crate::classify::hex(&v.to_be_bytes())
}

fn push_hex128(out: &mut Vec<u8>, v: u128) {
    crate::classify::push_hex(out, &v.to_be_bytes());
}

/// Groups consecutive events of the same signal (as `Signal::to_events`
/// produces them). Lossless: an event that differs in any shared field starts
/// a new record.
pub fn group(events: &[BusinessEvent]) -> Vec<SignalRecord> {
    let mut out: Vec<(SignalRecord, Vec<Row>)> = Vec::new();
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
            Some((last, rows)) if last.shares(e) => rows.push(row),
            _ => out.push((
                SignalRecord {
                    signal_id: e.signal_id.clone(),
                    process: e.process.clone(),
                    run_id: e.run_id.clone(),
                    service: e.service.clone(),
                    trace_id: e.trace_id.clone(),
                    span_id: e.span_id.clone(),
                    attributes: e.attributes.clone(),
                    resource: e.resource.as_str().into(),
                    rows: Rows::from_rows(&[]),
                },
                vec![row],
            )),
        }
    }
    out.into_iter()
        .map(|(mut r, rows)| {
            r.rows = Rows::from_rows(&rows);
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Attributes;

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

    fn every_fact(text: &str) -> Signal {
        use crate::signal::LifecycleStatus;
        Signal {
            id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            kind: SignalKind::Span,
            process: "im\"port".into(),
            run_id: Some("r-1".into()),
            trace_id: "t".into(),
            span_id: "s".into(),
            name: "load \\ batch".into(),
            start_ns: 1_700_000_000_000_000_000,
            time_ns: 1_700_000_000_250_000_000,
            text: text.into(),
            service: "svc".into(),
            attributes: Attributes::from_pairs(&[
                ("business.note".into(), "a \"quoted\"\nline".into()),
                ("k".into(), "日本".into()),
            ]),
            resource: vec![("service.name".into(), "svc".into())].into(),
            facts: vec![
                Fact::Records { outcome: "imported".into(), count: 120.0 },
                Fact::Records { outcome: "skipped".into(), count: 0.5 },
                Fact::ProgressDone(1e21),
                Fact::ProgressTotal(f64::NAN),
                Fact::Milestone("halfway".into()),
                Fact::Note("ctl \u{1} char".into()),
                Fact::Payload(r#"{"a":[1,2]}"#.into()),
                Fact::Value { name: "eur".into(), value: -3.25 },
                Fact::Status { status: LifecycleStatus::Failed, error: Some("boom".into()) },
                Fact::Status { status: LifecycleStatus::Succeeded, error: None },
            ],
        }
    }

    /// The rows as the code before `RowsWriter` built them: owned `Row`s, then serde_json.
    fn rows_the_old_way(s: &Signal) -> Vec<Row> {
        let mut rows = vec![Row(
            crate::signal::event_id(s.id, 0),
            s.kind.as_str().into(),
            s.name.clone(),
            s.start_ns,
            Some((s.time_ns - s.start_ns) as f64 / 1e9),
            s.text.clone(),
            String::new(),
        )];
        for (i, f) in s.facts.iter().enumerate() {
            let (kind, name, value, text, payload) = match f {
                Fact::Records { outcome, count } => ("records", outcome.clone(), Some(*count), "", ""),
                Fact::ProgressDone(v) => ("progress", "done".into(), Some(*v), "", ""),
                Fact::ProgressTotal(v) => ("progress", "total".into(), Some(*v), "", ""),
                Fact::Milestone(m) => ("milestone", m.clone(), None, "", ""),
                Fact::Note(n) => ("note", String::new(), None, n.as_str(), ""),
                Fact::Payload(p) => ("payload", String::new(), None, "", p.as_str()),
                Fact::Value { name, value } => ("value", name.clone(), Some(*value), "", ""),
                Fact::Status { status, error } => {
                    ("status", status.as_str().into(), None, error.as_deref().unwrap_or(""), "")
                }
            };
            rows.push(Row(
                crate::signal::event_id(s.id, i as u32 + 1),
                kind.into(),
                name,
                s.time_ns,
                value,
                text.into(),
                payload.into(),
            ));
        }
        rows
    }

    #[test]
    fn rows_are_written_byte_for_byte_as_serde_json_writes_them() {
        for text in ["", "plain", "quote \" and \\ and \t tab", "\u{7f}ü"] {
            let s = every_fact(text);
            let rec = SignalRecord::from_signal(&s, "r-1");
            let old = rows_the_old_way(&s);
            assert_eq!(rec.rows.json(), serde_json::to_string(&old).unwrap(), "{text:?}");
            // Sized up front: no growing while writing, and not much more.
            let (len, cap) = (rec.rows.json().len(), rows_capacity(&s));
            assert!(len <= cap && cap < 2 * len, "{len} bytes in a buffer of {cap}");
            assert_eq!(rec.rows.len(), old.len());
            assert_eq!(rec.first_time_ns(), s.start_ns);
            // NaN is stored as null, as serde_json always did.
            assert_eq!(rec.rows.parse()[4].4, None);
            assert_eq!(Rows::from_json(rec.rows.json().to_string()).unwrap(), rec.rows);
        }
        let mut no_facts = every_fact("");
        no_facts.facts.clear();
        let rec = SignalRecord::from_signal(&no_facts, "r");
        assert_eq!((rec.rows.len(), rec.first_time_ns()), (1, no_facts.start_ns));
    }

    #[test]
    fn journal_form_embeds_json_fields_and_reads_back_old_and_new_records() {
        let rec = SignalRecord::from_signal(&every_fact("x"), "r-1");
        let mut buf = Vec::new();
        rec.write_json(&mut buf);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v["attributes"].is_object() && v["resource"].is_object() && v["rows"].is_array(), "{v}");
        assert_eq!(v["process"], "im\"port");
        let back: SignalRecord = serde_json::from_slice(&buf).unwrap();
        assert_eq!(back, rec);
        // A journal written before: the JSON fields as strings.
        let old = serde_json::json!({
            "signal_id": rec.signal_id, "process": rec.process, "run_id": rec.run_id,
            "service": rec.service, "trace_id": rec.trace_id, "span_id": rec.span_id,
            "attributes": rec.attributes, "resource": &*rec.resource,
            "rows": serde_json::from_str::<serde_json::Value>(rec.rows.json()).unwrap(),
        });
        assert!(old["attributes"].is_string());
        let back: SignalRecord = serde_json::from_str(&old.to_string()).unwrap();
        assert_eq!(back, rec);
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
