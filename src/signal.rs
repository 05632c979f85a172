//! The one type every stage after the receivers speaks: a classified business
//! [`Signal`] (one span, log record or API event) carrying business [`Fact`]s,
//! and its flattened storage form, [`BusinessEvent`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Where a signal came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalKind {
    Span,
    Log,
    /// Plain-HTTP intake (`POST /api/v1/events`).
    Event,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::Span => "span",
            SignalKind::Log => "log",
            SignalKind::Event => "event",
        }
    }
}

/// Explicit lifecycle statuses a signal can carry (`business.run.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleStatus {
    Started,
    Succeeded,
    Failed,
}

impl LifecycleStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "started" => Some(Self::Started),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// One business fact carried by a signal.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// `business.records.<outcome>`: records handled by this signal.
    Records { outcome: String, count: f64 },
    /// `business.progress.done` (absolute; latest wins).
    ProgressDone(f64),
    /// `business.progress.total` (absolute; latest wins).
    ProgressTotal(f64),
    /// `business.milestone`.
    Milestone(String),
    /// `business.note`.
    Note(String),
    /// `business.payload` (validated JSON text).
    Payload(String),
    /// `business.value.<name>`: a numeric business value (latest wins).
    Value { name: String, value: f64 },
    /// Lifecycle: explicit `business.run.status`, or the end of the run's root span.
    Status { status: LifecycleStatus, error: Option<String> },
}

/// A classified business signal: everything later stages need, nothing more.
#[derive(Debug, Clone)]
pub struct Signal {
    /// Stable identity used for de-duplication (trace id + span id for spans,
    /// a content hash for log records).
    pub id: u128,
    pub kind: SignalKind,
    pub process: String,
    /// Explicit run id; `None` means "the trace identifies the run".
    pub run_id: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    /// Span or event name; for logs the severity text.
    pub name: String,
    /// Start time (spans) or record time (logs), unix nanoseconds.
    pub start_ns: i64,
    /// End time (spans) or record time (logs), unix nanoseconds.
    pub time_ns: i64,
    /// Log body or span status message, shown on the run's timeline.
    pub text: String,
    pub service: String,
    pub attributes: Attributes,
    /// Shared by the signals of one resource (a request's spans mostly have
    /// one): made once per resource, not once per signal.
    pub resource: Arc<[(String, String)]>,
    pub facts: Vec<Fact>,
}

/// A record's attributes as they are stored: a JSON object of strings, keys
/// sorted, the last of a repeated key winning. Built once by the classifier,
/// straight from the protobuf values: as a list of owned `(key, value)`
/// strings it was ~20 allocations per business signal, freed on another
/// thread, only to be turned into this text by the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes(String);

impl Attributes {
    /// From JSON the classifier wrote (see [`crate::storage::record::write_object`]).
    pub(crate) fn from_json(json: String) -> Attributes {
        Attributes(json)
    }

    /// From string pairs (API events, tests).
    pub fn from_pairs(pairs: &[(String, String)]) -> Attributes {
        Attributes(crate::storage::record::json_object(pairs))
    }

    pub fn json(&self) -> &str {
        &self.0
    }

    /// The attributes parsed from the JSON (empty if it were not an object
    /// of strings). Only user-defined metrics that read attributes ask,
    /// once per signal; never the ingest path.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl Default for Attributes {
    fn default() -> Self {
        Attributes("{}".to_string())
    }
}

impl Signal {
    /// The run key this signal belongs to, before trace aliasing.
    pub fn run_key(&self) -> RunKey {
        RunKey { process: self.process.clone(), run_id: self.run_id.clone().unwrap_or_else(|| self.trace_id.clone()) }
    }

    /// Flattens the signal into storage rows: one row for the signal itself,
    /// one per fact. Event ids are deterministic, so a replayed insert can be
    /// recognised by every backend. (The tracker builds the grouped form,
    /// [`SignalRecord::from_signal`](crate::storage::record::SignalRecord::from_signal), directly.)
    pub fn to_events(&self, run_id: &str) -> Vec<BusinessEvent> {
        crate::storage::record::SignalRecord::from_signal(self, run_id).expand().collect()
    }
}

/// Deterministic event id: the signal identity plus the fact's position.
pub fn event_id(signal_id: u128, seq: u32) -> String {
    crate::storage::record::hex128(event_id_hash(signal_id, seq))
}

/// [`event_id`] before hex encoding.
pub fn event_id_hash(signal_id: u128, seq: u32) -> u128 {
    let mut buf = [0u8; 20];
    buf[..16].copy_from_slice(&signal_id.to_le_bytes());
    buf[16..].copy_from_slice(&seq.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&buf)
}

/// The identity of a process run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunKey {
    pub process: String,
    pub run_id: String,
}

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.process, self.run_id)
    }
}

/// The storage form of one business fact (or of the signal itself, kind
/// `span`/`log`/`event`). Append-only; `event_id` is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusinessEvent {
    pub event_id: String,
    pub signal_id: String,
    pub process: String,
    pub run_id: String,
    pub time_ns: i64,
    pub kind: String,
    pub name: String,
    pub value: Option<f64>,
    pub text: String,
    pub payload: String,
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// JSON object of the record's attributes.
    pub attributes: String,
    /// JSON object of the resource attributes.
    pub resource: String,
}

impl BusinessEvent {
    /// Rebuilds the business fact this row stands for, if it is one.
    pub fn fact(&self) -> Option<Fact> {
        let v = self.value.unwrap_or(0.0);
        Some(match self.kind.as_str() {
            "records" => Fact::Records { outcome: self.name.clone(), count: v },
            "progress" if self.name == "done" => Fact::ProgressDone(v),
            "progress" if self.name == "total" => Fact::ProgressTotal(v),
            "milestone" => Fact::Milestone(self.name.clone()),
            "note" => Fact::Note(self.text.clone()),
            "payload" => Fact::Payload(self.payload.clone()),
            "value" => Fact::Value { name: self.name.clone(), value: v },
            "status" => Fact::Status {
                status: LifecycleStatus::parse(&self.name)?,
                error: (!self.text.is_empty()).then(|| self.text.clone()),
            },
            _ => return None,
        })
    }
}
