//! User-defined metrics (`metrics.user_defined` in the config): a counter,
//! histogram or gauge over a `business.records.<outcome>`, a
//! `business.value.<name>` or a numeric attribute, with an allow-list of
//! dimensions and a cardinality budget. Validated at load.

use super::business::PROCESS;
use super::Budget;
use crate::config::{InstrumentKind, MetricsConfig, UserMetricConfig};
use crate::signal::{Fact, Signal};
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use opentelemetry::KeyValue;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

const RECORDS: &str = "business.records.";
const VALUE: &str = "business.value.";
/// Names the catalogue owns.
const RESERVED: [&str; 3] = ["business.process.", "bizsignal.", "otel."];
const MAX_DIMENSIONS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Records(String),
    Value(String),
    Attribute(String),
}

impl Source {
    fn parse(s: &str) -> Result<Source, String> {
        if let Some(o) = s.strip_prefix(RECORDS) {
            return if o.is_empty() {
                Err("business.records. needs an outcome, e.g. business.records.imported".into())
            } else {
                Ok(Source::Records(o.into()))
            };
        }
        if let Some(v) = s.strip_prefix(VALUE) {
            return if v.is_empty() {
                Err("business.value. needs a name, e.g. business.value.amount".into())
            } else {
                Ok(Source::Value(v.into()))
            };
        }
        if s.trim().is_empty() {
            return Err("must name business.records.<outcome>, business.value.<name> or a numeric attribute".into());
        }
        Ok(Source::Attribute(s.into()))
    }
}

enum Instrument {
    Counter(Counter<f64>),
    Histogram(Histogram<f64>),
    Gauge(Gauge<f64>),
}

pub struct UserMetric {
    source: Source,
    process: Option<String>,
    dimensions: Vec<String>,
    instrument: Instrument,
    budget: Arc<Budget>,
}

/// A valid OTel instrument name: a letter, then up to 254 of `[A-Za-z0-9_.-/]`.
fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && n.len() <= 255
        && c.all(|x| x.is_ascii_alphanumeric() || "_.-/".contains(x))
}

/// Checks the `metrics` section; errors carry the key path.
pub fn validate(m: &MetricsConfig) -> Result<(), (String, String)> {
    let err = |p: String, r: &str| Err((p, r.to_string()));
    if m.cardinality_limit == 0 || m.cardinality_limit > 1_000_000 {
        return err("metrics.cardinality_limit".into(), "must be from 1 to 1000000");
    }
    let o = &m.otlp;
    if let Some(e) = &o.endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) || e.parse::<http::Uri>().is_err() {
            return err("metrics.otlp.endpoint".into(), "must be an http:// or https:// URL");
        }
    }
    if o.interval.is_some_and(|d| d.is_zero()) {
        return err("metrics.otlp.interval".into(), "must be greater than zero");
    }
    if o.timeout.is_some_and(|d| d.is_zero()) {
        return err("metrics.otlp.timeout".into(), "must be greater than zero");
    }
    for (k, v) in &o.headers {
        if http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).is_err() {
            return err(format!("metrics.otlp.headers.{k}"), "not a valid header name");
        }
        if http::HeaderValue::from_str(v).is_err() {
            return err(format!("metrics.otlp.headers.{k}"), "not a valid header value");
        }
    }
    let mut names = HashSet::new();
    for (i, u) in m.user_defined.iter().enumerate() {
        let p = |k: &str| format!("metrics.user_defined[{i}].{k}");
        if !valid_name(&u.name) {
            return err(
                p("name"),
                "must start with a letter and contain only letters, digits, '_', '.', '-', '/' (at most 255)",
            );
        }
        if RESERVED.iter().any(|r| u.name.starts_with(r)) {
            return err(p("name"), "business.process.*, bizsignal.* and otel.* are reserved for built-in metrics");
        }
        if !names.insert(super::prometheus::base_name(&u.name)) {
            return err(p("name"), "another user-defined metric has the same (Prometheus) name");
        }
        Source::parse(&u.source).map_err(|r| (p("source"), r))?;
        if u.unit.len() > 63 || !u.unit.is_ascii() {
            return err(p("unit"), "must be ASCII, at most 63 characters");
        }
        if u.process.as_ref().is_some_and(|x| x.is_empty()) {
            return err(p("process"), "must not be empty");
        }
        if u.dimensions.len() > MAX_DIMENSIONS {
            return err(p("dimensions"), "at most 16 dimensions");
        }
        let mut seen = HashSet::new();
        for (j, d) in u.dimensions.iter().enumerate() {
            let dp = format!("metrics.user_defined[{i}].dimensions[{j}]");
            if d.trim().is_empty() {
                return err(dp, "must not be empty");
            }
            if d == crate::classify::RUN_ID || d == "trace_id" || d == "span_id" {
                return err(
                    dp,
                    "run and trace ids are never metric attributes (unbounded); link metrics to runs through the API",
                );
            }
            if d == PROCESS {
                return err(dp, "business.process.name is always an attribute; do not list it");
            }
            if !seen.insert(d) {
                return err(dp, "listed twice");
            }
        }
        if u.cardinality_limit.is_some_and(|l| l == 0 || l > 1_000_000) {
            return err(p("cardinality_limit"), "must be from 1 to 1000000");
        }
    }
    Ok(())
}

impl UserMetric {
    /// Builds the configured (already validated) metrics on `meter`.
    pub fn build_all(meter: &Meter, m: &MetricsConfig, budgets: &mut Vec<Arc<Budget>>) -> Vec<UserMetric> {
        m.user_defined.iter().map(|u| Self::build(meter, u, m.cardinality_limit, budgets)).collect()
    }

    fn build(meter: &Meter, u: &UserMetricConfig, default_limit: usize, budgets: &mut Vec<Arc<Budget>>) -> UserMetric {
        let name = u.name.clone();
        let instrument = match u.instrument {
            InstrumentKind::Counter => Instrument::Counter(
                meter
                    .f64_counter(name.clone())
                    .with_unit(u.unit.clone())
                    .with_description(u.description.clone())
                    .build(),
            ),
            InstrumentKind::Histogram => Instrument::Histogram(
                meter
                    .f64_histogram(name.clone())
                    .with_unit(u.unit.clone())
                    .with_description(u.description.clone())
                    .build(),
            ),
            InstrumentKind::Gauge => Instrument::Gauge(
                meter.f64_gauge(name.clone()).with_unit(u.unit.clone()).with_description(u.description.clone()).build(),
            ),
        };
        let budget = Arc::new(Budget::new(name, u.cardinality_limit.unwrap_or(default_limit)));
        budgets.push(budget.clone());
        UserMetric {
            source: Source::parse(&u.source).expect("validated at load"),
            process: u.process.clone(),
            dimensions: u.dimensions.clone(),
            instrument,
            budget,
        }
    }

    /// The largest budget among user-defined metrics.
    pub fn max_limit(m: &MetricsConfig) -> usize {
        m.user_defined
            .iter()
            .filter_map(|u| u.cardinality_limit)
            .chain([m.cardinality_limit])
            .max()
            .unwrap_or(m.cardinality_limit)
    }

    /// Records the signal's value(s), if it carries the source.
    pub fn observe(&self, s: &Signal) {
        if self.process.as_ref().is_some_and(|p| *p != s.process) {
            return;
        }
        let mut values = Vec::new();
        let mut attrs = Lookup { s, record: None };
        match &self.source {
            Source::Records(o) => values.extend(s.facts.iter().filter_map(|f| match f {
                Fact::Records { outcome, count } if outcome == o => Some(*count),
                _ => None,
            })),
            Source::Value(n) => values.extend(s.facts.iter().filter_map(|f| match f {
                Fact::Value { name, value } if name == n => Some(*value),
                _ => None,
            })),
            Source::Attribute(k) => {
                values.extend(attrs.get(k).and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| v.is_finite()))
            }
        }
        if values.is_empty() {
            return;
        }
        let mut labels = Vec::with_capacity(self.dimensions.len() + 1);
        labels.push(KeyValue::new(PROCESS, s.process.clone()));
        for d in &self.dimensions {
            if let Some(v) = attrs.get(d) {
                labels.push(KeyValue::new(d.clone(), v));
            }
        }
        let attrs = self.budget.admit(&labels);
        for v in values {
            match &self.instrument {
                // Counters are monotonic: negative values are skipped.
                Instrument::Counter(c) if v >= 0.0 => c.add(v, attrs),
                Instrument::Counter(_) => {}
                Instrument::Histogram(h) => h.record(v, attrs),
                Instrument::Gauge(g) => g.record(v, attrs),
            }
        }
    }
}

/// A signal's attributes for one metric's lookups: the record's JSON is
/// parsed at the first lookup and kept for the others (a source and its
/// dimensions would otherwise parse it once each).
struct Lookup<'a> {
    s: &'a Signal,
    record: Option<BTreeMap<String, String>>,
}

impl Lookup<'_> {
    /// An attribute of the record, or else of its resource (as the source and
    /// dimensions are documented to look them up).
    fn get(&mut self, key: &str) -> Option<String> {
        let record = self.record.get_or_insert_with(|| self.s.attributes.to_map());
        record.get(key).cloned().or_else(|| self.s.resource.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{Attributes, SignalKind};

    #[test]
    fn an_attribute_is_read_from_the_record_then_from_its_resource() {
        let s = Signal {
            id: 1,
            kind: SignalKind::Span,
            process: "p".into(),
            run_id: None,
            trace_id: String::new(),
            span_id: String::new(),
            name: String::new(),
            start_ns: 0,
            time_ns: 0,
            text: String::new(),
            service: String::new(),
            attributes: Attributes::from_pairs(&[("tier".into(), "gold".into()), ("size".into(), " 12 ".into())]),
            resource: vec![("tier".into(), "resource".into()), ("region".into(), "eu".into())].into(),
            facts: Vec::new(),
        };
        let mut attrs = Lookup { s: &s, record: None };
        assert_eq!(attrs.get("tier").as_deref(), Some("gold"));
        // Parsed once, kept for the metric's other lookups.
        assert_eq!(attrs.record.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!(attrs.get("region").as_deref(), Some("eu"));
        assert_eq!(attrs.get("missing"), None);
    }
}
