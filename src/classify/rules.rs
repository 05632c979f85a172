//! Mapping rules: classify existing telemetry as business without code
//! changes. The first rule whose `match` fits a record decides its process and
//! run; `business.*` attributes on the record still win over what a rule sets.

use super::{any_to_string, number, truncate, RecordView};
use crate::config::Limits;
use crate::signal::{Fact, SignalKind};
use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Shown in errors and logs.
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    pub set: SetConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// `span`, `log` or `any` (default).
    pub signal: Option<String>,
    /// Matches the resource's `service.name`.
    pub service: Option<TextMatch>,
    pub span_name: Option<TextMatch>,
    pub log_body: Option<TextMatch>,
    /// Attribute (record or resource) equality or existence.
    pub attributes: BTreeMap<String, TextMatch>,
}

/// A plain string matches exactly; `{glob: "import-*"}`, `{regex: "^a.+"}`
/// and `{exists: true|false}` do what they say.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TextMatch {
    Exact(String),
    Pattern(PatternConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternConfig {
    pub glob: Option<String>,
    pub regex: Option<String>,
    pub exists: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SetConfig {
    /// Literal, or `{from_attribute: KEY}`, `{from: span_name|log_body}`.
    pub process: Option<Source>,
    /// `{from_attribute: KEY}`; default: the trace id identifies the run.
    pub run_id: Option<Source>,
    /// Outcome name → numeric attribute holding the count.
    pub records: BTreeMap<String, String>,
    pub milestone: Option<Source>,
    pub note: Option<Source>,
    /// Treat matching spans as the run's root span (its end ends the run).
    pub root: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Source {
    Literal(String),
    From(FromConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromConfig {
    pub from_attribute: Option<String>,
    pub from: Option<String>,
}

enum Matcher {
    Exact(String),
    Regex(Regex),
    Exists(bool),
}

impl Matcher {
    fn compile(m: &TextMatch) -> Result<Matcher, String> {
        match m {
            TextMatch::Exact(s) => Ok(Matcher::Exact(s.clone())),
            TextMatch::Pattern(p) => match (&p.glob, &p.regex, p.exists) {
                (Some(g), None, None) => {
                    Regex::new(&glob_to_regex(g)).map(Matcher::Regex).map_err(|e| format!("invalid glob: {e}"))
                }
                (None, Some(r), None) => regex::RegexBuilder::new(r)
                    .size_limit(1 << 20)
                    .build()
                    .map(Matcher::Regex)
                    .map_err(|e| format!("invalid regex: {e}")),
                (None, None, Some(e)) => Ok(Matcher::Exists(e)),
                _ => Err("give exactly one of glob, regex, exists".into()),
            },
        }
    }

    fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (Matcher::Exists(want), v) => v.is_some() == *want,
            (_, None) => false,
            (Matcher::Exact(s), Some(v)) => s == v,
            (Matcher::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

fn glob_to_regex(g: &str) -> String {
    let mut r = String::from("^");
    for c in g.chars() {
        match c {
            '*' => r.push_str(".*"),
            '?' => r.push('.'),
            c => r.push_str(&regex::escape(&c.to_string())),
        }
    }
    r.push('$');
    r
}

#[derive(Clone)]
enum ValueFrom {
    Literal(String),
    Attribute(String),
    SpanName,
    LogBody,
    TraceId,
}

impl ValueFrom {
    fn compile(s: &Source, allowed: &[&str]) -> Result<ValueFrom, String> {
        match s {
            Source::Literal(l) if l.is_empty() => Err("must not be empty".into()),
            Source::Literal(l) => Ok(ValueFrom::Literal(l.clone())),
            Source::From(FromConfig { from_attribute: Some(a), from: None }) if !a.is_empty() => {
                Ok(ValueFrom::Attribute(a.clone()))
            }
            Source::From(FromConfig { from_attribute: None, from: Some(f) }) if allowed.contains(&f.as_str()) => {
                Ok(match f.as_str() {
                    "span_name" => ValueFrom::SpanName,
                    "log_body" => ValueFrom::LogBody,
                    _ => ValueFrom::TraceId,
                })
            }
            Source::From(FromConfig { from: Some(f), .. }) => {
                Err(format!("unknown source {f:?}; use one of {allowed:?} or from_attribute"))
            }
            _ => Err("give a literal, {from_attribute: KEY} or {from: ...}".into()),
        }
    }

    fn get(&self, view: &RecordView) -> Option<String> {
        let s = match self {
            ValueFrom::Literal(l) => l.clone(),
            ValueFrom::Attribute(a) => any_to_string(view.attr(a)?),
            ValueFrom::SpanName if view.kind == SignalKind::Span => view.name.to_string(),
            ValueFrom::LogBody => any_to_string(view.body?),
            ValueFrom::TraceId => return None,
            _ => return None,
        };
        (!s.is_empty()).then_some(s)
    }
}

/// A validated rule.
pub struct Rule {
    signal: Option<SignalKind>,
    service: Option<Matcher>,
    span_name: Option<Matcher>,
    log_body: Option<Matcher>,
    attributes: Vec<(String, Matcher)>,
    process: Option<ValueFrom>,
    run_id: Option<ValueFrom>,
    records: Vec<(String, String)>,
    milestone: Option<ValueFrom>,
    note: Option<ValueFrom>,
    root: bool,
}

impl Rule {
    /// Compiles a rule; the error is (key path inside the rule, reason).
    pub fn compile(c: &RuleConfig) -> Result<Rule, (String, String)> {
        if c.name.is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        let signal = match c.matcher.signal.as_deref() {
            None | Some("any") => None,
            Some("span") => Some(SignalKind::Span),
            Some("log") => Some(SignalKind::Log),
            Some(o) => return Err(("match.signal".into(), format!("must be span, log or any, got {o:?}"))),
        };
        fn at(p: &str) -> impl Fn(String) -> (String, String) + '_ {
            move |e| (p.to_string(), e)
        }
        let opt = |m: &Option<TextMatch>, p: &str| m.as_ref().map(Matcher::compile).transpose().map_err(at(p));
        let attributes = c
            .matcher
            .attributes
            .iter()
            .map(|(k, m)| Matcher::compile(m).map(|m| (k.clone(), m)).map_err(|e| (format!("match.attributes.{k}"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let src = |s: &Option<Source>, p: &str, allowed: &[&str]| {
            s.as_ref().map(|s| ValueFrom::compile(s, allowed)).transpose().map_err(at(p))
        };
        let rule = Rule {
            signal,
            service: opt(&c.matcher.service, "match.service")?,
            span_name: opt(&c.matcher.span_name, "match.span_name")?,
            log_body: opt(&c.matcher.log_body, "match.log_body")?,
            attributes,
            process: src(&c.set.process, "set.process", &["span_name", "log_body"])?,
            run_id: src(&c.set.run_id, "set.run_id", &["trace_id"])?,
            records: c.set.records.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            milestone: src(&c.set.milestone, "set.milestone", &["span_name", "log_body"])?,
            note: src(&c.set.note, "set.note", &["span_name", "log_body"])?,
            root: c.set.root,
        };
        if rule.process.is_none() {
            return Err(("set.process".into(), "is required".into()));
        }
        if rule.span_name.is_some() && rule.signal == Some(SignalKind::Log) {
            return Err(("match.span_name".into(), "cannot match log records (match.signal is log)".into()));
        }
        if rule.log_body.is_some() && rule.signal == Some(SignalKind::Span) {
            return Err(("match.log_body".into(), "cannot match spans (match.signal is span)".into()));
        }
        for (outcome, attr) in &rule.records {
            if outcome.is_empty() || attr.is_empty() {
                return Err((format!("set.records.{outcome}"), "outcome and attribute must not be empty".into()));
            }
        }
        Ok(rule)
    }

    fn matches(&self, view: &RecordView) -> bool {
        if self.signal.is_some_and(|k| k != view.kind) {
            return false;
        }
        if self.service.as_ref().is_some_and(|m| !m.matches(Some(view.service))) {
            return false;
        }
        if let Some(m) = &self.span_name {
            if view.kind != SignalKind::Span || !m.matches(Some(view.name)) {
                return false;
            }
        }
        if let Some(m) = &self.log_body {
            let body = view.body.map(any_to_string);
            if view.kind != SignalKind::Log || !m.matches(body.as_deref()) {
                return false;
            }
        }
        self.attributes.iter().all(|(k, m)| {
            let v = view.attr(k).map(any_to_string);
            m.matches(v.as_deref())
        })
    }

    pub(crate) fn process(&self, view: &RecordView) -> Option<String> {
        self.process.as_ref()?.get(view)
    }

    pub(crate) fn run_id(&self, view: &RecordView) -> Option<String> {
        self.run_id.as_ref()?.get(view)
    }

    /// Adds the facts this rule derives; `business.*` attributes already
    /// present on the record take precedence.
    pub(crate) fn apply(
        &self,
        view: &RecordView,
        facts: &mut Vec<Fact>,
        root: &mut bool,
        limits: &Limits,
    ) -> Result<(), String> {
        for (outcome, attr) in &self.records {
            let has = facts.iter().any(|f| matches!(f, Fact::Records { outcome: o, .. } if o == outcome));
            if let (false, Some(v)) = (has, view.attr(attr)) {
                facts.push(Fact::Records { outcome: outcome.clone(), count: number(v, attr, limits, false)? });
            }
        }
        if !facts.iter().any(|f| matches!(f, Fact::Milestone(_))) {
            if let Some(m) = self.milestone.as_ref().and_then(|m| m.get(view)) {
                facts.push(Fact::Milestone(truncate(&m, limits.max_name_length).to_string()));
            }
        }
        if !facts.iter().any(|f| matches!(f, Fact::Note(_))) {
            if let Some(n) = self.note.as_ref().and_then(|n| n.get(view)) {
                facts.push(Fact::Note(truncate(&n, limits.max_attribute_value_bytes).to_string()));
            }
        }
        *root |= self.root;
        Ok(())
    }
}

/// The compiled rules, tried in order.
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        RuleSet { rules }
    }
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
    pub(crate) fn first_match(&self, view: &RecordView) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(view))
    }
}
