//! The ClickHouse schema bizsignal owns: versioned migrations (DDL text
//! generated for single-node or cluster mode) and the Row structs that are
//! written and read through the `clickhouse` crate. Additive changes only:
//! a new version adds tables, columns or views; nothing is dropped.
//!
//! Single node: tables are named plainly (`business_events`). Cluster mode:
//! each table is a `Replicated*` `<name>_local` table per shard, created
//! `ON CLUSTER`, with a `Distributed` table under the plain name for writes
//! and reads, sharded by `cityHash64(process, run_id)` so every row of a run
//! lands on one shard (the per-run aggregates then converge per shard).

use crate::storage::record::{LastShared, SignalRecord};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the DDL depends on.
#[derive(Debug, Clone)]
pub struct SchemaOpts {
    /// A validated identifier.
    pub database: String,
    /// A validated identifier.
    pub cluster: Option<String>,
    /// 0 = keep forever.
    pub ttl_days: u32,
}

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: Vec<String>,
}

/// The tables written by bizsignal (in cluster mode through `Distributed` tables).
pub const EVENTS: &str = "business_events";
pub const RUNS: &str = "process_runs";
pub const RUN_STATE: &str = "run_state";
pub const ALIASES: &str = "run_aliases";
pub const PROCESS_VIOLATIONS: &str = "process_violations";
pub const ROLLUP: &str = "process_rollup_1m";

struct Ddl<'a> {
    o: &'a SchemaOpts,
}

impl Ddl<'_> {
    fn on_cluster(&self) -> String {
        self.o.cluster.as_ref().map(|c| format!(" ON CLUSTER {c}")).unwrap_or_default()
    }
    /// The physical (per-shard) table name.
    fn local(&self, t: &str) -> String {
        let db = &self.o.database;
        if self.o.cluster.is_some() {
            format!("{db}.{t}_local")
        } else {
            format!("{db}.{t}")
        }
    }
    /// `MergeTree` family engine, replicated in cluster mode.
    fn engine(&self, kind: &str, args: &str) -> String {
        if self.o.cluster.is_some() {
            let sep = if args.is_empty() { "" } else { ", " };
            format!("Replicated{kind}('/clickhouse/tables/{{shard}}/{{database}}/{{table}}', '{{replica}}'{sep}{args})")
        } else {
            format!("{kind}({args})")
        }
    }
    /// In cluster mode, the Distributed table under the plain name.
    fn distributed(&self, t: &str) -> Option<String> {
        let c = self.o.cluster.as_ref()?;
        let db = &self.o.database;
        Some(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{t}{oc} AS {db}.{t}_local ENGINE = Distributed({c}, {db}, {t}_local, cityHash64(process, run_id))",
            oc = self.on_cluster()
        ))
    }
    /// Replay protection for retried inserts (`insert_deduplication_token`)
    /// on non-replicated tables; replicated ones deduplicate by default.
    fn dedup_setting(&self) -> &'static str {
        if self.o.cluster.is_some() {
            ""
        } else {
            ", non_replicated_deduplication_window = 10000"
        }
    }
}

/// Every migration, in order.
pub fn migrations(o: &SchemaOpts) -> Vec<Migration> {
    let d = Ddl { o };
    let oc = d.on_cluster();
    let db = &o.database;
    let ttl = if o.ttl_days > 0 { format!("\nTTL toDate(time) + INTERVAL {} DAY", o.ttl_days) } else { String::new() };
    let ttl_min = if o.ttl_days > 0 { format!("\nTTL minute + INTERVAL {} DAY", o.ttl_days) } else { String::new() };
    let dedup = d.dedup_setting();
    let mut v1 = vec![
        // One row per business fact and one per signal (kind span/log/event).
        // ORDER BY serves "all events of a run" (process, run_id prefix) and,
        // with the daily partitions and the minmax index on time, "recent
        // events of a process". Replacing on the full key drops a replayed
        // row (same event id) at merge time.
        format!(
            "CREATE TABLE IF NOT EXISTS {events}{oc} (
    event_id    String CODEC(ZSTD(1)),
    signal_id   String CODEC(ZSTD(1)),
    process     LowCardinality(String),
    run_id      String CODEC(ZSTD(1)),
    time        DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)),
    kind        LowCardinality(String),
    name        LowCardinality(String),
    value       Nullable(Float64) CODEC(ZSTD(1)),
    text        String CODEC(ZSTD(3)),
    payload     String CODEC(ZSTD(3)),
    service     LowCardinality(String),
    trace_id    String CODEC(ZSTD(1)),
    span_id     String CODEC(ZSTD(1)),
    attributes  Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    resource    Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    INDEX time_minmax time TYPE minmax GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(time)
ORDER BY (process, run_id, time, event_id){ttl}
SETTINGS ttl_only_drop_parts = 1{dedup}",
            events = d.local(EVENTS),
            engine = d.engine("ReplacingMergeTree", ""),
        ),
        // Converged per-run aggregates, fed by the view below from every
        // instance's events: readers GROUP BY (process, run_id) with
        // min/max/sum/sumMap/minMap/groupUniqArrayArray (or FINAL).
        format!(
            "CREATE TABLE IF NOT EXISTS {runs}{oc} (
    process       LowCardinality(String),
    run_id        String,
    started_at    SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    last_seen_at  SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    signal_count  SimpleAggregateFunction(sum, UInt64),
    counts        SimpleAggregateFunction(sumMap, Map(String, Float64)),
    terminal      SimpleAggregateFunction(max, Tuple(at DateTime64(9, 'UTC'), failed UInt8, tie String, status String, error String)),
    progress_done SimpleAggregateFunction(max, Tuple(at DateTime64(9, 'UTC'), tie String, value Float64)),
    progress_total SimpleAggregateFunction(max, Tuple(at DateTime64(9, 'UTC'), tie String, value Float64)),
    milestones    SimpleAggregateFunction(minMap, Map(String, Int64)),
    services      SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    trace_ids     SimpleAggregateFunction(groupUniqArrayArray, Array(String))
) ENGINE = {engine}
ORDER BY (process, run_id){dedup_s}",
            runs = d.local(RUNS),
            engine = d.engine("AggregatingMergeTree", ""),
            dedup_s = if dedup.is_empty() { String::new() } else { format!("\nSETTINGS {}", &dedup[2..]) },
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{RUNS}_mv{oc} TO {runs} AS
SELECT
    process,
    run_id,
    min(time) AS started_at,
    max(if(kind = 'span', addNanoseconds(time, toInt64(round(ifNull(value, 0) * 1e9))), time)) AS last_seen_at,
    toUInt64(countIf(kind IN ('span', 'log', 'event'))) AS signal_count,
    sumMapIf(map(name, ifNull(value, 0)), kind = 'records') AS counts,
    maxIf(tuple(time, toUInt8(name = 'failed'), event_id, name, text), kind = 'status' AND name IN ('succeeded', 'failed')) AS terminal,
    maxIf(tuple(time, event_id, ifNull(value, 0)), kind = 'progress' AND name = 'done') AS progress_done,
    maxIf(tuple(time, event_id, ifNull(value, 0)), kind = 'progress' AND name = 'total') AS progress_total,
    minMapIf(map(toString(name), toUnixTimestamp64Nano(time)), kind = 'milestone') AS milestones,
    groupUniqArrayIf(toString(service), kind IN ('span', 'log', 'event')) AS services,
    groupUniqArrayIf(trace_id, kind IN ('span', 'log', 'event') AND trace_id != '') AS trace_ids
FROM {events}
GROUP BY process, run_id",
            runs = d.local(RUNS),
            events = d.local(EVENTS),
        ),
        // What the tracker decides that events do not carry: stalls,
        // violations, when the last signal was received; plus tombstones for
        // trace-keyed runs merged into a named run (deleted = 1). Newest
        // version (tracker wall clock) wins.
        format!(
            "CREATE TABLE IF NOT EXISTS {t}{oc} (
    process    LowCardinality(String),
    run_id     String,
    status     LowCardinality(String),
    state      String CODEC(ZSTD(3)),
    version    UInt64,
    deleted    UInt8
) ENGINE = {engine}
ORDER BY (process, run_id){dedup_s}",
            t = d.local(RUN_STATE),
            engine = d.engine("ReplacingMergeTree", "version"),
            dedup_s = if dedup.is_empty() { String::new() } else { format!("\nSETTINGS {}", &dedup[2..]) },
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {t}{oc} (
    process    LowCardinality(String),
    trace_id   String,
    run_id     String,
    created_ns Int64
) ENGINE = {engine}
ORDER BY (process, trace_id){dedup_s}",
            t = d.local(ALIASES),
            engine = d.engine("ReplacingMergeTree", ""),
            dedup_s = if dedup.is_empty() { String::new() } else { format!("\nSETTINGS {}", &dedup[2..]) },
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {t}{oc} (
    process    LowCardinality(String),
    run_id     String DEFAULT '',
    rule       LowCardinality(String),
    message    String,
    at         DateTime64(9, 'UTC')
) ENGINE = {engine}
ORDER BY (process, at, rule){dedup_s}",
            t = d.local(PROCESS_VIOLATIONS),
            engine = d.engine("ReplacingMergeTree", ""),
            dedup_s = if dedup.is_empty() { String::new() } else { format!("\nSETTINGS {}", &dedup[2..]) },
        ),
        // Per-minute dashboard rollup per process.
        format!(
            "CREATE TABLE IF NOT EXISTS {t}{oc} (
    process         LowCardinality(String),
    minute          DateTime('UTC'),
    runs_active     AggregateFunction(uniq, String),
    runs_started    AggregateFunction(uniqIf, String, UInt8),
    runs_succeeded  SimpleAggregateFunction(sum, UInt64),
    runs_failed     SimpleAggregateFunction(sum, UInt64),
    records         SimpleAggregateFunction(sumMap, Map(String, Float64)),
    span_seconds    AggregateFunction(quantiles(0.5, 0.9, 0.95, 0.99), Float64)
) ENGINE = {engine}
PARTITION BY toYYYYMM(minute)
ORDER BY (process, minute){ttl_min}{dedup_s}",
            t = d.local(ROLLUP),
            engine = d.engine("AggregatingMergeTree", ""),
            dedup_s = if dedup.is_empty() { String::new() } else { format!("\nSETTINGS {}", &dedup[2..]) },
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{ROLLUP}_mv{oc} TO {t} AS
SELECT
    process,
    toStartOfMinute(time) AS minute,
    uniqState(run_id) AS runs_active,
    uniqIfState(run_id, toUInt8(kind = 'status' AND name = 'started')) AS runs_started,
    toUInt64(countIf(kind = 'status' AND name = 'succeeded')) AS runs_succeeded,
    toUInt64(countIf(kind = 'status' AND name = 'failed')) AS runs_failed,
    sumMapIf(map(toString(name), ifNull(value, 0)), kind = 'records') AS records,
    quantilesStateIf(0.5, 0.9, 0.95, 0.99)(ifNull(value, 0), kind = 'span') AS span_seconds
FROM {events}
GROUP BY process, minute",
            t = d.local(ROLLUP),
            events = d.local(EVENTS),
        ),
    ];
    for t in [EVENTS, RUNS, RUN_STATE, ALIASES, PROCESS_VIOLATIONS, ROLLUP] {
        v1.extend(d.distributed(t));
    }
    vec![Migration { version: 1, name: "init", statements: v1 }]
}

/// Statements run before any migration: the database and the ledger.
pub fn bootstrap(o: &SchemaOpts) -> Vec<String> {
    let d = Ddl { o };
    let oc = d.on_cluster();
    let db = &o.database;
    let mut v = vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}{oc}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {t}{oc} (
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = {engine}
ORDER BY version",
            t = d.local("schema_migrations"),
            engine = d.engine("ReplacingMergeTree", ""),
        ),
    ];
    if let Some(c) = &o.cluster {
        v.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations{oc} AS {db}.schema_migrations_local ENGINE = Distributed({c}, {db}, schema_migrations_local, version)"
        ));
    }
    v
}

/// The `business_events` columns and types the store writes, checked at
/// start-up so a mismatched table gives a clear error instead of failed inserts.
pub const EVENT_COLUMNS: &[(&str, &str)] = &[
    ("event_id", "String"),
    ("signal_id", "String"),
    ("process", "LowCardinality(String)"),
    ("run_id", "String"),
    ("time", "DateTime64(9, 'UTC')"),
    ("kind", "LowCardinality(String)"),
    ("name", "LowCardinality(String)"),
    ("value", "Nullable(Float64)"),
    ("text", "String"),
    ("payload", "String"),
    ("service", "LowCardinality(String)"),
    ("trace_id", "String"),
    ("span_id", "String"),
    ("attributes", "Map(LowCardinality(String), String)"),
    ("resource", "Map(LowCardinality(String), String)"),
];

/// One `business_events` row. What the rows of one signal share — its ids,
/// service and attribute maps — is shared (`Arc`) rather than copied per row:
/// a signal is ~5 rows, and parsing and copying its attribute JSON for each
/// was the ClickHouse writer's largest cost. (`Arc<str>` and `Arc<[_]>`
/// serialize exactly as `String` and `Vec<_>` do.)
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
pub struct EventRow {
    pub event_id: String,
    pub signal_id: Arc<str>,
    pub process: Arc<str>,
    pub run_id: Arc<str>,
    /// DateTime64(9): nanoseconds since the epoch.
    pub time: i64,
    pub kind: String,
    pub name: String,
    pub value: Option<f64>,
    pub text: String,
    pub payload: String,
    pub service: Arc<str>,
    pub trace_id: Arc<str>,
    pub span_id: Arc<str>,
    pub attributes: Arc<[(String, String)]>,
    pub resource: Arc<[(String, String)]>,
}

/// A resource's JSON → its attribute map (the ClickHouse writer, per group).
pub type ResourcePairs = LastShared<str, Arc<[(String, String)]>>;

impl EventRow {
    pub fn from_event(e: &crate::signal::BusinessEvent) -> EventRow {
        EventRow {
            event_id: e.event_id.clone(),
            signal_id: e.signal_id.as_str().into(),
            process: e.process.as_str().into(),
            run_id: e.run_id.as_str().into(),
            time: e.time_ns,
            kind: e.kind.clone(),
            name: e.name.clone(),
            value: e.value,
            text: e.text.clone(),
            payload: e.payload.clone(),
            service: e.service.as_str().into(),
            trace_id: e.trace_id.as_str().into(),
            span_id: e.span_id.as_str().into(),
            attributes: json_to_pairs(&e.attributes).into(),
            resource: json_to_pairs(&e.resource).into(),
        }
    }

    /// Appends the rows of one stored signal (the same rows as
    /// `SignalRecord::expand` then [`from_event`](Self::from_event), with the
    /// shared parts parsed and allocated once per signal).
    pub fn extend_from_signal(out: &mut Vec<EventRow>, s: &SignalRecord, resources: &mut ResourcePairs) {
        let str = |v: &str| -> Arc<str> { v.into() };
        let (signal_id, process, run_id) = (str(&s.signal_id), str(&s.process), str(&s.run_id));
        let (service, trace_id, span_id) = (str(&s.service), str(&s.trace_id), str(&s.span_id));
        let attributes: Arc<[(String, String)]> = json_to_pairs(&s.attributes).into();
        let resource = resources.get_or_make(&s.resource, |json| json_to_pairs(json).into());
        out.extend(s.rows.parse().into_iter().map(|r| EventRow {
            event_id: r.0,
            signal_id: signal_id.clone(),
            process: process.clone(),
            run_id: run_id.clone(),
            time: r.3,
            kind: r.1,
            name: r.2,
            value: r.4,
            text: r.5,
            payload: r.6,
            service: service.clone(),
            trace_id: trace_id.clone(),
            span_id: span_id.clone(),
            attributes: attributes.clone(),
            resource: resource.clone(),
        }));
    }

    pub fn into_event(self) -> crate::signal::BusinessEvent {
        crate::signal::BusinessEvent {
            event_id: self.event_id,
            signal_id: self.signal_id.to_string(),
            process: self.process.to_string(),
            run_id: self.run_id.to_string(),
            time_ns: self.time,
            kind: self.kind,
            name: self.name,
            value: self.value,
            text: self.text,
            payload: self.payload,
            service: self.service.to_string(),
            trace_id: self.trace_id.to_string(),
            span_id: self.span_id.to_string(),
            attributes: pairs_to_json(&self.attributes),
            resource: pairs_to_json(&self.resource),
        }
    }
}

/// Attributes are stored as a JSON object in `BusinessEvent` and as a Map here.
fn json_to_pairs(s: &str) -> Vec<(String, String)> {
    let m: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_str(s).unwrap_or_default();
    m.into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

fn pairs_to_json(p: &[(String, String)]) -> String {
    let m: std::collections::BTreeMap<&str, &str> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    serde_json::to_string(&m).unwrap_or_default()
}

#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
pub struct RunStateRow {
    pub process: String,
    pub run_id: String,
    pub status: String,
    pub state: String,
    pub version: u64,
    pub deleted: u8,
}

#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
pub struct AliasRow {
    pub process: String,
    pub trace_id: String,
    pub run_id: String,
    pub created_ns: i64,
}

#[derive(Debug, Clone, clickhouse::Row, Serialize, Deserialize)]
pub struct ViolationRow {
    pub process: String,
    pub run_id: String,
    pub rule: String,
    pub message: String,
    pub at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_built_per_signal_equal_rows_built_per_event_and_share_what_they_share() {
        use crate::signal::{Fact, Signal, SignalKind};
        let resource: Arc<[(String, String)]> = vec![("service.name".to_string(), "billing".to_string())].into();
        let signal = |id: u128| Signal {
            id,
            kind: SignalKind::Span,
            process: "import".into(),
            run_id: Some("r1".into()),
            trace_id: "ab".repeat(16),
            span_id: "cd".repeat(8),
            name: "step \"quoted\"".into(),
            start_ns: 10,
            time_ns: 20,
            text: "line\nbreak".into(),
            service: "billing".into(),
            attributes: crate::signal::Attributes::from_pairs(&[
                ("b.count".into(), "7".into()),
                ("a.note".into(), "é".into()),
            ]),
            resource: resource.clone(),
            facts: vec![
                Fact::Records { outcome: "imported".into(), count: 3.0 },
                Fact::Milestone("fetched".into()),
                Fact::Payload("{\"k\":1}".into()),
            ],
        };
        let mut memo = crate::storage::record::ResourceMemo::default();
        let records: Vec<SignalRecord> =
            [1, 2].map(|id| SignalRecord::from_signal_memo(&signal(id), "r1", &mut memo)).into();
        let mut rows = Vec::new();
        let mut resources = ResourcePairs::default();
        for r in &records {
            EventRow::extend_from_signal(&mut rows, r, &mut resources);
        }
        let per_event: Vec<EventRow> =
            records.iter().flat_map(|r| r.expand()).map(|e| EventRow::from_event(&e)).collect();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows, per_event);
        assert!(Arc::ptr_eq(&rows[0].attributes, &rows[3].attributes), "one signal's rows share its attributes");
        assert!(Arc::ptr_eq(&rows[0].resource, &rows[4].resource), "signals of one resource share its map");
    }

    #[test]
    fn cluster_ddl_uses_on_cluster_replicated_and_distributed() {
        let o = SchemaOpts { database: "bs".into(), cluster: Some("prod".into()), ttl_days: 30 };
        let all: Vec<String> =
            bootstrap(&o).into_iter().chain(migrations(&o).into_iter().flat_map(|m| m.statements)).collect();
        for s in &all {
            assert!(s.contains(" ON CLUSTER prod"), "{s}");
        }
        for t in [EVENTS, RUNS, RUN_STATE, ALIASES, PROCESS_VIOLATIONS, ROLLUP, "schema_migrations"] {
            let local =
                all.iter().find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS bs.{t}_local "))).expect(t);
            assert!(local.contains("ENGINE = Replicated"), "{local}");
            let dist = all.iter().find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS bs.{t} "))).expect(t);
            assert!(dist.contains(&format!("ENGINE = Distributed(prod, bs, {t}_local,")), "{dist}");
        }
        let single = SchemaOpts { cluster: None, ..o };
        for s in migrations(&single).into_iter().flat_map(|m| m.statements) {
            assert!(!s.contains("ON CLUSTER") && !s.contains("Replicated") && !s.contains("Distributed"), "{s}");
        }
    }
}
