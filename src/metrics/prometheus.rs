//! Prometheus text exposition (0.0.4) and OpenMetrics 1.0 rendering of a
//! collected `ResourceMetrics`, following the OpenTelemetry → Prometheus
//! compatibility rules: dots and other invalid characters become `_`, the
//! unit becomes a suffix (`s` → `_seconds`, `By` → `_bytes`, `1` on a gauge
//! → `_ratio`, `{…}` annotations dropped), monotonic sums get `_total`,
//! histograms become `_bucket{le}`/`_sum`/`_count`, non-monotonic sums are
//! gauges. Attribute keys are sanitized the same way.

use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use std::fmt::Write as _;

/// Content types of the two formats.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A metric or label name with every invalid character replaced by `_`
/// (repeats collapsed; a leading digit prefixed by `_`).
pub fn base_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == ':' { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn label_name(key: &str) -> String {
    base_name(&key.replace(':', "_"))
}

fn unit_word(u: &str) -> String {
    match u {
        "s" => "seconds".into(),
        "ms" => "milliseconds".into(),
        "us" => "microseconds".into(),
        "ns" => "nanoseconds".into(),
        "min" => "minutes".into(),
        "h" => "hours".into(),
        "d" => "days".into(),
        "By" => "bytes".into(),
        "KiBy" => "kibibytes".into(),
        "MiBy" => "mebibytes".into(),
        "GiBy" => "gibibytes".into(),
        "KBy" => "kilobytes".into(),
        "MBy" => "megabytes".into(),
        "GBy" => "gigabytes".into(),
        "%" => "percent".into(),
        other => base_name(other).trim_matches('_').to_string(),
    }
}

/// The unit suffix for a unit, if any (`{…}` annotations are dropped).
pub fn unit_suffix(unit: &str, gauge: bool) -> Option<String> {
    let mut u = String::new();
    let mut depth = 0;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => u.push(c),
            _ => {}
        }
    }
    let u = u.trim();
    if u.is_empty() {
        return None;
    }
    if u == "1" {
        return gauge.then(|| "ratio".to_string());
    }
    let s = match u.split_once('/') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => {
            format!("{}_per_{}", unit_word(a), unit_word(b))
        }
        _ => unit_word(u),
    };
    (!s.is_empty()).then_some(s)
}

/// The Prometheus family name (without `_total`) of an OTel metric.
pub fn family_name(name: &str, unit: &str, gauge: bool) -> String {
    let mut n = base_name(name);
    if let Some(sfx) = unit_suffix(unit, gauge) {
        if !n.ends_with(&format!("_{sfx}")) {
            n.push('_');
            n.push_str(&sfx);
        }
    }
    n
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn labels<'a>(attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<(String, String)> =
        attrs.map(|kv| (label_name(kv.key.as_str()), kv.value.as_str().into_owned())).collect();
    parts.sort();
    if let Some((k, v)) = extra {
        parts.push((k.to_string(), v));
    }
    if parts.is_empty() {
        return String::new();
    }
    let body: Vec<String> = parts.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
    format!("{{{}}}", body.join(","))
}

trait Num: Copy {
    fn f(self) -> f64;
}
impl Num for f64 {
    fn f(self) -> f64 {
        self
    }
}
impl Num for u64 {
    fn f(self) -> f64 {
        self as f64
    }
}
impl Num for i64 {
    fn f(self) -> f64 {
        self as f64
    }
}

fn render_metric<T: Num>(out: &mut String, m: &Metric, data: &MetricData<T>, om: bool) {
    let (kind, gauge) = match data {
        MetricData::Gauge(_) => ("gauge", true),
        MetricData::Sum(s) if s.is_monotonic() => ("counter", false),
        MetricData::Sum(_) => ("gauge", true),
        MetricData::Histogram(_) => ("histogram", false),
        // Not produced by the default aggregations; skipped.
        MetricData::ExponentialHistogram(_) => return,
    };
    let family = family_name(m.name(), m.unit(), gauge);
    let counter = kind == "counter";
    let sample = if counter { format!("{family}_total") } else { family.clone() };
    let meta = if counter && !om { &sample } else { &family };
    let _ = writeln!(out, "# TYPE {meta} {kind}");
    if om {
        if let Some(u) = unit_suffix(m.unit(), gauge) {
            let _ = writeln!(out, "# UNIT {meta} {u}");
        }
    }
    if !m.description().is_empty() {
        let _ = writeln!(out, "# HELP {meta} {}", escape_help(m.description()));
    }
    match data {
        MetricData::Gauge(g) => {
            for p in g.data_points() {
                let _ = writeln!(out, "{sample}{} {}", labels(p.attributes(), None), num(p.value().f()));
            }
        }
        MetricData::Sum(s) => {
            for p in s.data_points() {
                let _ = writeln!(out, "{sample}{} {}", labels(p.attributes(), None), num(p.value().f()));
            }
        }
        MetricData::Histogram(h) => {
            for p in h.data_points() {
                let mut cum = 0u64;
                for (b, c) in p.bounds().zip(p.bucket_counts()) {
                    cum += c;
                    let _ = writeln!(out, "{family}_bucket{} {cum}", labels(p.attributes(), Some(("le", num(b)))));
                }
                let _ = writeln!(
                    out,
                    "{family}_bucket{} {}",
                    labels(p.attributes(), Some(("le", "+Inf".into()))),
                    p.count()
                );
                let _ = writeln!(out, "{family}_sum{} {}", labels(p.attributes(), None), num(p.sum().f()));
                let _ = writeln!(out, "{family}_count{} {}", labels(p.attributes(), None), p.count());
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// Renders collected metrics; `openmetrics` selects OpenMetrics 1.0 (with `# EOF`).
pub fn render(rm: &ResourceMetrics, openmetrics: bool) -> String {
    let mut out = String::new();
    for sm in rm.scope_metrics() {
        for m in sm.metrics() {
            match m.data() {
                AggregatedMetrics::F64(d) => render_metric(&mut out, m, d, openmetrics),
                AggregatedMetrics::U64(d) => render_metric(&mut out, m, d, openmetrics),
                AggregatedMetrics::I64(d) => render_metric(&mut out, m, d, openmetrics),
            }
        }
    }
    if openmetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').any(|p| p.trim().starts_with("application/openmetrics-text")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_otel_prometheus_rules() {
        assert_eq!(family_name("business.process.run.duration", "s", false), "business_process_run_duration_seconds");
        assert_eq!(family_name("business.process.runs.started", "{run}", false), "business_process_runs_started");
        assert_eq!(family_name("business.process.run.progress", "1", true), "business_process_run_progress_ratio");
        assert_eq!(
            family_name("business.process.last_success.time", "s", true),
            "business_process_last_success_time_seconds"
        );
        assert_eq!(family_name("payload.size", "By", false), "payload_size_bytes");
        assert_eq!(label_name("customer.tier"), "customer_tier");
        assert_eq!(base_name("9lives"), "_9lives");
    }
}
