//! [`ProcessRun`]: one execution of a business process, folded from its
//! signals. Every fold is order-independent (latest-by-time with a stable
//! tie-break, minimum for first-reached, sums over de-duplicated signals), so
//! the same set of signals yields the same run whatever order they arrive in.

use super::compact::{VecMap, VecSet};
use crate::signal::{event_id, Fact, LifecycleStatus, RunKey, Signal};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::sync::Arc;

/// Caps that keep one run's in-memory state bounded; all signals stay in storage.
pub const MAX_NOTES: usize = 200;
pub const MAX_PAYLOADS: usize = 50;
pub const MAX_PAYLOAD_BYTES: usize = 256 << 10;
pub const MAX_TRACE_IDS: usize = 100;
pub const MAX_SERVICES: usize = 50;

/// Text held in a run's state: shared, so copying a run (once per commit
/// that touches it, for the observers' before/after) copies pointers, not
/// strings. Serialized as a plain JSON string.
pub type Text = Arc<str>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Stalled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Stalled => "stalled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "stalled" => RunStatus::Stalled,
            _ => return None,
        })
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Succeeded | RunStatus::Failed)
    }
}

/// A timestamped value; `tie` (the event id) orders samples with equal times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at_ns: i64,
    pub value: f64,
    pub tie: Text,
}

impl Sample {
    fn newer_than(&self, other: &Sample) -> bool {
        (self.at_ns, &self.tie) > (other.at_ns, &other.tie)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Milestone {
    pub name: Text,
    pub at_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Note {
    pub at_ns: i64,
    pub text: Text,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Payload {
    pub at_ns: i64,
    /// Canonical JSON text.
    pub json: Text,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    pub rule: String,
    pub message: String,
    pub at_ns: i64,
}

/// The signal that ended the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Terminal {
    pub at_ns: i64,
    pub status: RunStatus,
    pub error: Option<String>,
    pub tie: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRun {
    pub process: String,
    pub run_id: String,
    pub status: RunStatus,
    pub started_at_ns: i64,
    pub last_seen_at_ns: i64,
    pub terminal: Option<Terminal>,
    /// Sorted small maps and sets ([`VecMap`], [`VecSet`]): they serialize
    /// like `BTreeMap`/`BTreeSet` and cost a fraction of their memory.
    pub counts: VecMap<Text, f64>,
    pub progress_done: Option<Sample>,
    pub progress_total: Option<Sample>,
    /// The earliest `done` sample, for the progress rate behind the ETA.
    pub progress_first: Option<Sample>,
    pub milestones: Vec<Milestone>,
    pub notes: Vec<Note>,
    pub payloads: Vec<Payload>,
    pub values: VecMap<Text, Sample>,
    pub trace_ids: VecSet<Text>,
    pub services: VecSet<Text>,
    pub violations: Vec<Violation>,
    /// Wall-clock time the last signal was received (stall detection uses
    /// this, not the producer's clock).
    pub last_received_at_ns: i64,
    pub signal_count: u64,
}

impl ProcessRun {
    pub fn new(key: &RunKey, received_ns: i64) -> Self {
        ProcessRun {
            process: key.process.clone(),
            run_id: key.run_id.clone(),
            status: RunStatus::Running,
            started_at_ns: i64::MAX,
            last_seen_at_ns: i64::MIN,
            terminal: None,
            counts: VecMap::new(),
            progress_done: None,
            progress_total: None,
            progress_first: None,
            milestones: Vec::new(),
            notes: Vec::new(),
            payloads: Vec::new(),
            values: VecMap::new(),
            trace_ids: VecSet::new(),
            services: VecSet::new(),
            violations: Vec::new(),
            last_received_at_ns: received_ns,
            signal_count: 0,
        }
    }

    pub fn key(&self) -> RunKey {
        RunKey { process: self.process.clone(), run_id: self.run_id.clone() }
    }

    pub fn ended_at_ns(&self) -> Option<i64> {
        self.terminal.as_ref().map(|t| t.at_ns)
    }

    pub fn error(&self) -> Option<&str> {
        self.terminal.as_ref().and_then(|t| t.error.as_deref())
    }

    pub fn duration_seconds(&self, now_ns: i64) -> f64 {
        let end = self.ended_at_ns().unwrap_or(now_ns.max(self.last_seen_at_ns));
        (end.saturating_sub(self.started_at_ns)).max(0) as f64 / 1e9
    }

    /// Folds one (already de-duplicated) signal into the run.
    pub fn apply(&mut self, s: &Signal, received_ns: i64) {
        self.signal_count += 1;
        self.started_at_ns = self.started_at_ns.min(s.start_ns);
        self.last_seen_at_ns = self.last_seen_at_ns.max(s.time_ns);
        self.last_received_at_ns = self.last_received_at_ns.max(received_ns);
        // The owned strings are made only when new.
        if !s.trace_id.is_empty() && self.trace_ids.len() < MAX_TRACE_IDS {
            self.trace_ids.insert_with(s.trace_id.as_str(), || s.trace_id.as_str().into());
        }
        if self.services.len() < MAX_SERVICES {
            self.services.insert_with(s.service.as_str(), || s.service.as_str().into());
        }
        for (i, fact) in s.facts.iter().enumerate() {
            let mut tie = Tie::new(s.id, i as u32 + 1);
            let t = s.time_ns;
            match fact {
                Fact::Records { outcome, count } => {
                    *self.counts.get_or_insert_with(outcome.as_str(), || (outcome.as_str().into(), 0.0)) += count
                }
                Fact::ProgressDone(v) => {
                    if self.progress_first.as_ref().is_none_or(|f| !tie.newer(t, f)) {
                        self.progress_first = Some(tie.sample(t, *v));
                    }
                    if self.progress_done.as_ref().is_none_or(|c| tie.newer(t, c)) {
                        self.progress_done = Some(tie.sample(t, *v));
                    }
                }
                Fact::ProgressTotal(v) => {
                    if self.progress_total.as_ref().is_none_or(|c| tie.newer(t, c)) {
                        self.progress_total = Some(tie.sample(t, *v));
                    }
                }
                Fact::Milestone(name) => self.add_milestone(name, t),
                Fact::Note(text) => self.add_note(Note { at_ns: t, text: text.as_str().into() }),
                Fact::Payload(json) => self.add_payload(Payload { at_ns: t, json: json.as_str().into() }),
                Fact::Value { name, value } => match self.values.get_mut(name.as_str()) {
                    Some(cur) => {
                        if tie.newer(t, cur) {
                            *cur = tie.sample(t, *value);
                        }
                    }
                    None => {
                        self.values.insert(name.as_str().into(), tie.sample(t, *value));
                    }
                },
                Fact::Status { status: LifecycleStatus::Started, .. } => {}
                Fact::Status { status, error } => {
                    let t = Terminal {
                        at_ns: s.time_ns,
                        status: if *status == LifecycleStatus::Failed {
                            RunStatus::Failed
                        } else {
                            RunStatus::Succeeded
                        },
                        error: error.clone(),
                        tie: event_id(s.id, i as u32 + 1),
                    };
                    self.set_terminal(t);
                }
            }
        }
        if self.terminal.is_none() {
            // New life in a stalled run.
            self.status = RunStatus::Running;
        }
    }

    fn set_terminal(&mut self, t: Terminal) {
        let replace = match &self.terminal {
            None => true,
            // Latest terminal signal wins; at equal times "failed" wins, then the tie.
            Some(cur) => {
                (t.at_ns, t.status == RunStatus::Failed, &t.tie)
                    > (cur.at_ns, cur.status == RunStatus::Failed, &cur.tie)
            }
        };
        if replace {
            self.status = t.status;
            self.terminal = Some(t);
        }
    }

    fn add_milestone(&mut self, name: &str, at_ns: i64) {
        match self.milestones.iter_mut().find(|m| &*m.name == name) {
            Some(m) => m.at_ns = m.at_ns.min(at_ns),
            None => self.milestones.push(Milestone { name: name.into(), at_ns }),
        }
        self.milestones.sort_by(|a, b| (a.at_ns, &a.name).cmp(&(b.at_ns, &b.name)));
    }

    fn add_note(&mut self, n: Note) {
        if let Err(pos) = self.notes.binary_search(&n) {
            self.notes.insert(pos, n);
        }
        if self.notes.len() > MAX_NOTES {
            self.notes.remove(0);
        }
    }

    fn add_payload(&mut self, p: Payload) {
        if let Err(pos) = self.payloads.binary_search(&p) {
            self.payloads.insert(pos, p);
        }
        // Bounded by count and bytes: the run state is rewritten on every
        // commit that touches the run; every payload stays in the events.
        while self.payloads.len() > MAX_PAYLOADS
            || (self.payloads.len() > 1
                && self.payloads.iter().map(|p| p.json.len()).sum::<usize>() > MAX_PAYLOAD_BYTES)
        {
            self.payloads.remove(0);
        }
    }

    /// Folds another run's state into this one (used when a run first known
    /// by its trace id turns out to carry an explicit `business.run.id`).
    pub fn merge(&mut self, o: &ProcessRun) {
        self.signal_count += o.signal_count;
        self.started_at_ns = self.started_at_ns.min(o.started_at_ns);
        self.last_seen_at_ns = self.last_seen_at_ns.max(o.last_seen_at_ns);
        self.last_received_at_ns = self.last_received_at_ns.max(o.last_received_at_ns);
        for (k, v) in &o.counts {
            *self.counts.get_or_insert_with(&**k, || (k.clone(), 0.0)) += v;
        }
        if let Some(s) = &o.progress_done {
            latest(&mut self.progress_done, s.clone());
        }
        if let Some(s) = &o.progress_total {
            latest(&mut self.progress_total, s.clone());
        }
        if let Some(s) = &o.progress_first {
            if self.progress_first.as_ref().is_none_or(|f| !s.newer_than(f)) {
                self.progress_first = Some(s.clone());
            }
        }
        for m in &o.milestones {
            self.add_milestone(&m.name, m.at_ns);
        }
        for n in &o.notes {
            self.add_note(n.clone());
        }
        for p in &o.payloads {
            self.add_payload(p.clone());
        }
        for (k, v) in &o.values {
            match self.values.get_mut(&**k) {
                Some(cur) if !v.newer_than(cur) => {}
                Some(cur) => *cur = v.clone(),
                None => {
                    self.values.insert(k.clone(), v.clone());
                }
            }
        }
        self.trace_ids.extend(o.trace_ids.iter().cloned());
        self.services.extend(o.services.iter().cloned());
        for v in &o.violations {
            self.add_violation(v.clone());
        }
        if let Some(t) = &o.terminal {
            self.set_terminal(t.clone());
        }
        if self.terminal.is_none() && !(self.status == RunStatus::Stalled && o.status == RunStatus::Stalled) {
            self.status = RunStatus::Running;
        }
    }

    /// Records a violation once per rule; returns whether it was new.
    pub fn add_violation(&mut self, v: Violation) -> bool {
        if self.violations.iter().any(|x| x.rule == v.rule) {
            return false;
        }
        self.violations.push(v);
        true
    }

    /// Done/total ratio in 0..=1 when both are known.
    pub fn progress_ratio(&self) -> Option<f64> {
        let (d, t) = (self.progress_done.as_ref()?, self.progress_total.as_ref()?);
        (t.value > 0.0).then(|| (d.value / t.value).clamp(0.0, 1.0))
    }

    /// Estimated completion time from the progress rate so far.
    pub fn eta_ns(&self) -> Option<i64> {
        if self.terminal.is_some() {
            return None;
        }
        let (first, done, total) =
            (self.progress_first.as_ref()?, self.progress_done.as_ref()?, self.progress_total.as_ref()?);
        let dt = (done.at_ns - first.at_ns) as f64;
        let dv = done.value - first.value;
        if dt <= 0.0 || dv <= 0.0 || total.value <= done.value {
            return None;
        }
        let remaining = (total.value - done.value) / (dv / dt);
        (remaining < 1e18).then(|| done.at_ns.saturating_add(remaining as i64))
    }
}

/// A fact's tie-break (its event id), made only when two samples have equal times.
struct Tie {
    signal_id: u128,
    seq: u32,
    text: Option<Text>,
}

impl Tie {
    fn new(signal_id: u128, seq: u32) -> Self {
        Tie { signal_id, seq, text: None }
    }

    fn get(&mut self) -> &Text {
        self.text.get_or_insert_with(|| event_id(self.signal_id, self.seq).into())
    }

    /// Whether a sample at `at_ns` with this tie is newer than `cur` (as [`Sample::newer_than`]).
    fn newer(&mut self, at_ns: i64, cur: &Sample) -> bool {
        match at_ns.cmp(&cur.at_ns) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => *self.get() > cur.tie,
        }
    }

    fn sample(&mut self, at_ns: i64, value: f64) -> Sample {
        Sample { at_ns, value, tie: self.get().clone() }
    }
}

fn latest(slot: &mut Option<Sample>, s: Sample) {
    if slot.as_ref().is_none_or(|cur| s.newer_than(cur)) {
        *slot = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form (`process_runs.state`, ClickHouse `run_state`) as the
    /// B-tree/String version of `ProcessRun` wrote it reads back and writes
    /// out byte for byte.
    #[test]
    fn stored_state_format_is_unchanged() {
        let old = r#"{"process":"p","run_id":"r","status":"succeeded","started_at_ns":1,"last_seen_at_ns":5,"terminal":{"at_ns":5,"status":"succeeded","error":null,"tie":"aa"},"counts":{"failed":1.0,"ok":3.5},"progress_done":{"at_ns":2,"value":5.0,"tie":"b"},"progress_total":null,"progress_first":{"at_ns":2,"value":5.0,"tie":"b"},"milestones":[{"name":"m","at_ns":3}],"notes":[{"at_ns":3,"text":"n"}],"payloads":[{"at_ns":4,"json":"{\"a\":1}"}],"values":{"amount":{"at_ns":4,"value":2.5,"tie":"c"},"b":{"at_ns":1,"value":-1.0,"tie":"d"}},"trace_ids":["t1","t2"],"services":["s"],"violations":[{"rule":"x","message":"y","at_ns":5}],"last_received_at_ns":6,"signal_count":4}"#;
        let run: ProcessRun = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_string(&run).unwrap(), old);
        assert_eq!(run.counts.get("ok"), Some(&3.5));
        assert!(run.trace_ids.contains("t2"));
        assert_eq!(&*run.values.get("amount").unwrap().tie, "c");
    }
}
