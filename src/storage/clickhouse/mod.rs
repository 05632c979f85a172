//! ClickHouse storage (HTTP, RowBinary, LZ4) behind the sync [`Store`] trait.
//!
//! Writes: `write()` appends the batch to the on-disk [`spool`] and returns
//! once it is fsynced (durable); the background [`writer`] drains the spool
//! into ClickHouse in order. Until a record is acknowledged by ClickHouse,
//! what it says about runs, aliases and signal ids is kept in memory
//! ([`Pending`]) so the tracker reads its own writes even during an outage.
//!
//! Reads: runs are built from `process_runs` (aggregated over every
//! instance's events, so runs written by several instances converge), with
//! values, notes and payloads from `business_events`, and what only the
//! tracker knows (violations, stalls, receive time) from the newest
//! `run_state` row. See docs/storage.md for the precedence.
//!
//! The sync methods `block_on` a handle to the runtime captured in
//! [`ClickHouseStore::open`]; they are called from the tracker thread and
//! from `spawn_blocking`, never from an async task.

pub mod schema;
pub mod writer;

use super::spool::{Spool, SpoolBatch};
use super::{ProcessSummary, RunCursor, RunQuery, StorageError, Store, WriteBatch};
use crate::config::ClickHouseConfig;
use crate::metrics::SelfMetrics;
use crate::runs::run::{Milestone, Note, Payload, ProcessRun, RunStatus, Sample, Terminal, Violation};
use crate::signal::{BusinessEvent, RunKey};
use schema::{EventRow, SchemaOpts};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What spooled-but-unacknowledged records say, keyed with the record's seq.
#[derive(Default)]
struct Pending {
    runs: HashMap<RunKey, (u64, Arc<ProcessRun>)>,
    deleted: HashMap<RunKey, u64>,
    aliases: HashMap<(String, String), (u64, String)>,
    /// Per run: (last spool sequence, signal id → time).
    signals: HashMap<RunKey, (u64, HashMap<u128, i64>)>,
}

impl Pending {
    fn apply(&mut self, seq: u64, b: &WriteBatch) {
        for e in &b.signals {
            let key = RunKey { process: e.process.clone(), run_id: e.run_id.clone() };
            let slot = self.signals.entry(key).or_default();
            slot.0 = seq;
            if let Ok(id) = u128::from_str_radix(&e.signal_id, 16) {
                slot.1.insert(id, e.first_time_ns());
            }
        }
        for (from, _) in &b.merges {
            self.deleted.insert(from.clone(), seq);
            self.runs.remove(from);
        }
        for r in &b.runs {
            self.runs.insert(r.key(), (seq, r.clone()));
            self.deleted.remove(&r.key());
        }
        for (p, t, r) in &b.aliases {
            self.aliases.entry((p.clone(), t.clone())).or_insert((seq, r.clone()));
        }
    }

    fn forget(&mut self, upto: u64) {
        self.runs.retain(|_, v| v.0 > upto);
        self.deleted.retain(|_, v| *v > upto);
        self.aliases.retain(|_, v| v.0 > upto);
        self.signals.retain(|_, v| v.0 > upto);
    }
}

/// State shared by the store and its writer task.
pub struct StoreShared {
    client: clickhouse::Client,
    cfg: ClickHouseConfig,
    spool: Spool,
    spool_id: String,
    pending: Mutex<Pending>,
    metrics: Arc<SelfMetrics>,
    dead_letter_path: PathBuf,
    appended: Notify,
    flush_kick: Notify,
    stopped: Notify,
    drained: Notify,
    stop: AtomicBool,
    flush_requested: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl StoreShared {
    fn forget_pending(&self, upto: u64) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).forget(upto);
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = &self.metrics.clickhouse;
        m.spool_bytes.store(self.spool.bytes(), Ordering::Relaxed);
        m.spool_records.store(self.spool.len() as u64, Ordering::Relaxed);
        m.spool_oldest_ns.store(self.spool.oldest_at_ns().unwrap_or(0) as u64, Ordering::Relaxed);
    }
}

pub struct ClickHouseStore {
    shared: Arc<StoreShared>,
    rt: tokio::runtime::Handle,
    db: String,
}

/// The URL without any `user:password@` part, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn opts(cfg: &ClickHouseConfig) -> SchemaOpts {
    SchemaOpts { database: cfg.database.clone(), cluster: cfg.cluster.clone(), ttl_days: cfg.ttl_days }
}

/// The DDL `bizsignal migrate --dry-run` prints: every statement, in order.
pub fn ddl_text(cfg: &ClickHouseConfig) -> String {
    let o = opts(cfg);
    let mut out = String::new();
    for s in schema::bootstrap(&o) {
        out.push_str(&s);
        out.push_str(";\n\n");
    }
    for m in schema::migrations(&o) {
        out.push_str(&format!("-- migration {} ({})\n", m.version, m.name));
        for s in m.statements {
            out.push_str(&s);
            out.push_str(";\n\n");
        }
    }
    out
}

fn base_client(cfg: &ClickHouseConfig) -> Result<clickhouse::Client, StorageError> {
    let password = cfg.resolve_password().map_err(StorageError::Unavailable)?;
    // The HTTP connections as the `clickhouse` crate makes them by default
    // (keepalive 60 s, idle ones closed after 2 s, below ClickHouse's 3 s),
    // plus TCP_NODELAY: without it the tail of each insert body waited for
    // the server's delayed ACK (Nagle), ≈ 40 ms per insert, and the writer
    // idled two thirds of the time with a backlog to send. (Built inline:
    // the crate exports neither the client trait nor the body type to name.)
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(connector);
    let mut c = clickhouse::Client::with_http_client(http).with_url(cfg.url.clone()).with_user(cfg.user.clone());
    if !password.is_empty() {
        c = c.with_password(password);
    }
    c = c.with_compression(if cfg.compression { clickhouse::Compression::Lz4 } else { clickhouse::Compression::None });
    Ok(c)
}

fn unavailable(cfg: &ClickHouseConfig, e: impl std::fmt::Display) -> StorageError {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or("").trim().to_string();
    StorageError::Unavailable(format!("ClickHouse at {} (user {}): {line}", redact_url(&cfg.url), cfg.user))
}

/// Connects, checks the server answers, applies the migrations; returns the
/// versions applied now (empty when the schema was current).
pub async fn migrate(cfg: &ClickHouseConfig) -> Result<Vec<u32>, StorageError> {
    let client = base_client(cfg)?;
    let timeout = cfg.request_timeout.min(Duration::from_secs(30));
    match tokio::time::timeout(timeout, client.query("SELECT 1").fetch_one::<u8>()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(unavailable(cfg, e)),
        Err(_) => return Err(unavailable(cfg, format!("no answer within {timeout:?}"))),
    }
    let o = opts(cfg);
    let ddl = |sql: String| {
        let client = client.clone();
        async move {
            client.query(&sql).execute().await.map_err(|e| {
                let first = sql.lines().next().unwrap_or("").to_string();
                StorageError::Schema(format!("ClickHouse at {}: `{first}` failed: {e}", redact_url(&cfg.url)))
            })
        }
    };
    for s in schema::bootstrap(&o) {
        ddl(s).await?;
    }
    // An existing events table that differs from ours is reported as such,
    // before a migration trips over it.
    verify(cfg, &client, true).await?;
    let db = &cfg.database;
    let applied: Vec<u32> = client
        .query(&format!("SELECT DISTINCT version FROM {db}.schema_migrations ORDER BY version"))
        .fetch_all::<u32>()
        .await
        .map_err(|e| unavailable(cfg, e))?;
    let all = schema::migrations(&o);
    let known = all.last().map(|m| m.version).unwrap_or(0);
    if let Some(newest) = applied.iter().max().filter(|v| **v > known) {
        return Err(StorageError::Schema(format!(
            "ClickHouse database {db} has schema version {newest}, newer than this bizsignal knows ({known}); upgrade bizsignal"
        )));
    }
    let mut now = Vec::new();
    for m in all {
        if applied.contains(&m.version) {
            continue;
        }
        // Every statement is IF NOT EXISTS, so two instances starting at once
        // both succeed; the ledger is keyed by version (ReplacingMergeTree).
        for s in m.statements {
            ddl(s).await?;
        }
        client
            .query(&format!("INSERT INTO {db}.schema_migrations (version, name) VALUES (?, ?)"))
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(|e| unavailable(cfg, e))?;
        now.push(m.version);
    }
    verify(cfg, &client, false).await?;
    Ok(now)
}

/// Checks that `business_events` has the columns and types bizsignal writes.
async fn verify(cfg: &ClickHouseConfig, client: &clickhouse::Client, absent_ok: bool) -> Result<(), StorageError> {
    let table = if cfg.cluster.is_some() { "business_events_local" } else { "business_events" };
    let cols: Vec<(String, String)> = client
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(&cfg.database)
        .bind(table)
        .fetch_all()
        .await
        .map_err(|e| unavailable(cfg, e))?;
    if cols.is_empty() && absent_ok {
        return Ok(());
    }
    let have: HashMap<&str, &str> = cols.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    let mut problems = Vec::new();
    for (name, ty) in schema::EVENT_COLUMNS {
        match have.get(name) {
            None => problems.push(format!("column {name} is missing")),
            Some(t) if t != ty => problems.push(format!("column {name} is {t}, expected {ty}")),
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(StorageError::Schema(format!(
            "ClickHouse table {}.{table} does not match bizsignal's schema: {}",
            cfg.database,
            problems.join("; ")
        )));
    }
    Ok(())
}

impl ClickHouseStore {
    /// Connects, migrates, opens the spool in `data_dir` and starts the writer.
    /// Must be called inside a tokio runtime (the handle is kept for the sync methods).
    pub async fn open(
        cfg: &ClickHouseConfig,
        data_dir: &Path,
        metrics: Arc<SelfMetrics>,
    ) -> Result<ClickHouseStore, StorageError> {
        migrate(cfg).await?;
        let client = base_client(cfg)?.with_database(cfg.database.clone());
        let dir = data_dir.join("clickhouse-spool");
        let max = cfg.spool_max_bytes as u64;
        let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, max))
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))?
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        SelfMetrics::add(&metrics.journal_discarded_bytes, spool.discarded_bytes());
        let ledger = spool.ledger();
        let mut pending = Pending::default();
        for (seq, _, payload) in
            spool.read(ledger.acked, usize::MAX).map_err(|e| StorageError::Corrupt(e.to_string()))?
        {
            if let Ok(b) = SpoolBatch::decode(&payload) {
                pending.apply(seq, &b.into_write_batch());
            }
        }
        metrics.clickhouse.enabled.store(true, Ordering::Relaxed);
        let shared = Arc::new(StoreShared {
            client,
            cfg: cfg.clone(),
            spool_id: ledger.id.clone(),
            spool,
            pending: Mutex::new(pending),
            metrics,
            dead_letter_path: data_dir.join("clickhouse-dead-letter.jsonl"),
            appended: Notify::new(),
            flush_kick: Notify::new(),
            stopped: Notify::new(),
            drained: Notify::new(),
            stop: AtomicBool::new(false),
            flush_requested: AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        shared.update_gauges();
        if !shared.spool.is_empty() {
            tracing::info!(
                records = shared.spool.len(),
                bytes = shared.spool.bytes(),
                "replaying the ClickHouse spool"
            );
        }
        tokio::spawn(writer::run(shared.clone()));
        Ok(ClickHouseStore { shared, rt: tokio::runtime::Handle::current(), db: cfg.database.clone() })
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn client(&self) -> &clickhouse::Client {
        &self.shared.client
    }

    /// Spooled records not yet in ClickHouse.
    pub fn spool_len(&self) -> usize {
        self.shared.spool.len()
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.shared.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs matching `filter` (fixed SQL fragments, values bound in order), newest first.
    fn query_runs(&self, filter: &RunFilter) -> Result<Vec<ProcessRun>, StorageError> {
        let mut inner_where = vec!["1"];
        let mut outer_where = vec!["s.st_deleted = 0"];
        if filter.process.is_some() {
            inner_where.push("process = ?");
        }
        if filter.run_id.is_some() {
            inner_where.push("run_id = ?");
        }
        if filter.status.is_some() {
            outer_where.push("status = ?");
        }
        if filter.open_only {
            outer_where.push("term_ns = 0");
        }
        if filter.since_ns.is_some() {
            outer_where.push("a.started_ns >= ?");
        }
        if filter.cursor.is_some() {
            outer_where.push("(a.started_ns, a.process, a.run_id) < (?, ?, ?)");
        }
        let iw = inner_where.join(" AND ");
        let sql = format!(
            "SELECT a.process AS process, a.run_id AS run_id, a.started_ns AS started_ns, a.last_seen_ns AS last_seen_ns, a.signals AS signals,
                mapKeys(a.counts) AS ck, mapValues(a.counts) AS cv,
                toUnixTimestamp64Nano(tupleElement(a.term, 1)) AS term_ns, tupleElement(a.term, 3) AS term_tie,
                tupleElement(a.term, 4) AS term_status, tupleElement(a.term, 5) AS term_error,
                toUnixTimestamp64Nano(tupleElement(a.pdone, 1)) AS pdone_ns, tupleElement(a.pdone, 2) AS pdone_tie, tupleElement(a.pdone, 3) AS pdone_v,
                toUnixTimestamp64Nano(tupleElement(a.ptotal, 1)) AS ptotal_ns, tupleElement(a.ptotal, 2) AS ptotal_tie, tupleElement(a.ptotal, 3) AS ptotal_v,
                mapKeys(a.ms) AS mk, mapValues(a.ms) AS mv, a.svc AS svc, a.tids AS tids,
                toString(s.st_status) AS state_status, s.st_state AS state,
                multiIf(term_ns > 0, term_status, state_status = 'stalled', 'stalled', 'running') AS status
             FROM (
                SELECT process, run_id,
                    toUnixTimestamp64Nano(min(started_at)) AS started_ns, toUnixTimestamp64Nano(max(last_seen_at)) AS last_seen_ns,
                    sum(signal_count) AS signals, sumMap(counts) AS counts, max(terminal) AS term,
                    max(progress_done) AS pdone, max(progress_total) AS ptotal, minMap(milestones) AS ms,
                    groupUniqArrayArray(services) AS svc, groupUniqArrayArray(trace_ids) AS tids
                FROM {db}.process_runs WHERE {iw} GROUP BY process, run_id
             ) AS a
             LEFT JOIN (
                SELECT process, run_id, argMax(status, version) AS st_status, argMax(state, version) AS st_state, argMax(deleted, version) AS st_deleted
                FROM {db}.run_state WHERE {iw} GROUP BY process, run_id
             ) AS s ON a.process = s.process AND a.run_id = s.run_id
             WHERE {ow}
             ORDER BY a.started_ns DESC, a.process DESC, a.run_id DESC
             LIMIT ?",
            db = self.db,
            ow = outer_where.join(" AND "),
        );
        let mut q = self.client().query(&sql);
        for _ in 0..2 {
            if let Some(p) = &filter.process {
                q = q.bind(p);
            }
            if let Some(r) = &filter.run_id {
                q = q.bind(r);
            }
        }
        if let Some(s) = filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = filter.since_ns {
            q = q.bind(t);
        }
        if let Some(c) = &filter.cursor {
            q = q.bind(c.started_at_ns).bind(&c.process).bind(&c.run_id);
        }
        q = q.bind(filter.limit as u64);
        let rows: Vec<RunRow> = self.block(q.fetch_all()).map_err(|e| self.read_err(e))?;
        self.build_runs(rows)
    }

    fn read_err(&self, e: clickhouse::error::Error) -> StorageError {
        unavailable(&self.shared.cfg, e)
    }

    /// Reads on the tracker's path (a run, its signal ids, an alias) must not
    /// stop intake while ClickHouse is unreachable: they fall back to what the
    /// spool holds (`Pending`). The cost is bounded: run counts, progress and
    /// the terminal status are rebuilt from events at read time anyway; only
    /// violations and stalls of a run not in memory could be missed.
    fn degrade<T>(&self, r: Result<T, StorageError>, fallback: T) -> Result<T, StorageError> {
        match r {
            Err(StorageError::Unavailable(e)) => {
                tracing::debug!(error = %e, "ClickHouse unreachable; answering from the spool");
                Ok(fallback)
            }
            other => other,
        }
    }

    /// Adds what the aggregate does not hold: values, notes, payloads and the
    /// first progress sample (from events), violations and receive time (from run_state).
    fn build_runs(&self, rows: Vec<RunRow>) -> Result<Vec<ProcessRun>, StorageError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let processes: Vec<&str> =
            rows.iter().map(|r| r.process.as_str()).collect::<HashSet<_>>().into_iter().collect();
        let run_ids: Vec<&str> = rows.iter().map(|r| r.run_id.as_str()).collect::<HashSet<_>>().into_iter().collect();
        let extras: Vec<ExtraRow> = self
            .block(
                self.client()
                    .query(
                        "SELECT process, run_id, toString(kind) AS kind, toString(name) AS name, toUnixTimestamp64Nano(time) AS t, ifNull(value, 0) AS v, text, payload, event_id
                         FROM business_events
                         WHERE process IN ? AND run_id IN ? AND (kind IN ('value', 'note', 'payload') OR (kind = 'progress' AND name = 'done'))
                         ORDER BY process, run_id, t, event_id
                         LIMIT 1 BY process, run_id, event_id",
                    )
                    .bind(&processes)
                    .bind(&run_ids)
                    .fetch_all(),
            )
            .map_err(|e| self.read_err(e))?;
        let mut by_run: HashMap<(String, String), Vec<ExtraRow>> = HashMap::new();
        for x in extras {
            by_run.entry((x.process.clone(), x.run_id.clone())).or_default().push(x);
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let key = RunKey { process: r.process.clone(), run_id: r.run_id.clone() };
            let base: Option<ProcessRun> = if r.state.is_empty() { None } else { serde_json::from_str(&r.state).ok() };
            let mut run = ProcessRun::new(&key, base.as_ref().map(|b| b.last_received_at_ns).unwrap_or(r.last_seen_ns));
            run.started_at_ns = r.started_ns;
            run.last_seen_at_ns = r.last_seen_ns;
            run.signal_count = r.signals;
            run.counts = r.ck.into_iter().map(Into::into).zip(r.cv).collect();
            if r.term_ns > 0 {
                let status = if r.term_status == "failed" { RunStatus::Failed } else { RunStatus::Succeeded };
                run.terminal = Some(Terminal {
                    at_ns: r.term_ns,
                    status,
                    error: (!r.term_error.is_empty()).then_some(r.term_error),
                    tie: r.term_tie,
                });
                run.status = status;
            } else if r.state_status == "stalled" {
                run.status = RunStatus::Stalled;
            }
            if r.pdone_ns > 0 || !r.pdone_tie.is_empty() {
                run.progress_done = Some(Sample { at_ns: r.pdone_ns, value: r.pdone_v, tie: r.pdone_tie.into() });
            }
            if r.ptotal_ns > 0 || !r.ptotal_tie.is_empty() {
                run.progress_total = Some(Sample { at_ns: r.ptotal_ns, value: r.ptotal_v, tie: r.ptotal_tie.into() });
            }
            let mut ms: Vec<Milestone> =
                r.mk.into_iter().zip(r.mv).map(|(name, at_ns)| Milestone { name: name.into(), at_ns }).collect();
            ms.sort_by(|a, b| (a.at_ns, &a.name).cmp(&(b.at_ns, &b.name)));
            run.milestones = ms;
            run.services = r.svc.into_iter().take(crate::runs::run::MAX_SERVICES).map(Into::into).collect();
            run.trace_ids = r.tids.into_iter().take(crate::runs::run::MAX_TRACE_IDS).map(Into::into).collect();
            for x in by_run.remove(&(key.process.clone(), key.run_id.clone())).unwrap_or_default() {
                let smp = Sample { at_ns: x.t, value: x.v, tie: x.event_id.as_str().into() };
                match x.kind.as_str() {
                    "value"
                        if run
                            .values
                            .get(x.name.as_str())
                            .is_none_or(|cur| (smp.at_ns, &smp.tie) > (cur.at_ns, &cur.tie)) =>
                    {
                        run.values.insert(x.name.as_str().into(), smp);
                    }
                    "note" => run.notes.push(Note { at_ns: x.t, text: x.text.into() }),
                    "payload" => run.payloads.push(Payload { at_ns: x.t, json: x.payload.into() }),
                    "progress"
                        if run.progress_first.as_ref().is_none_or(|f| (smp.at_ns, &smp.tie) < (f.at_ns, &f.tie)) =>
                    {
                        run.progress_first = Some(smp);
                    }
                    _ => {}
                }
            }
            run.notes.sort();
            run.notes.dedup();
            let n = run.notes.len();
            run.notes.drain(..n.saturating_sub(crate::runs::run::MAX_NOTES));
            run.payloads.sort();
            run.payloads.dedup();
            let n = run.payloads.len();
            run.payloads.drain(..n.saturating_sub(crate::runs::run::MAX_PAYLOADS));
            if let Some(b) = base {
                run.violations = b.violations;
            }
            out.push(run);
        }
        Ok(out)
    }

    fn is_deleted(&self, key: &RunKey) -> Result<bool, StorageError> {
        if self.pending().deleted.contains_key(key) {
            return Ok(true);
        }
        let d: Option<u8> = self
            .block(
                self.client()
                    .query("SELECT argMax(deleted, version) FROM run_state WHERE process = ? AND run_id = ? GROUP BY process, run_id")
                    .bind(&key.process)
                    .bind(&key.run_id)
                    .fetch_optional(),
            )
            .map_err(|e| self.read_err(e))?;
        Ok(d == Some(1))
    }
}

#[derive(Default)]
struct RunFilter {
    process: Option<String>,
    run_id: Option<String>,
    status: Option<RunStatus>,
    open_only: bool,
    since_ns: Option<i64>,
    cursor: Option<RunCursor>,
    limit: usize,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RunRow {
    process: String,
    run_id: String,
    started_ns: i64,
    last_seen_ns: i64,
    signals: u64,
    ck: Vec<String>,
    cv: Vec<f64>,
    term_ns: i64,
    term_tie: String,
    term_status: String,
    term_error: String,
    pdone_ns: i64,
    pdone_tie: String,
    pdone_v: f64,
    ptotal_ns: i64,
    ptotal_tie: String,
    ptotal_v: f64,
    mk: Vec<String>,
    mv: Vec<i64>,
    svc: Vec<String>,
    tids: Vec<String>,
    state_status: String,
    state: String,
    #[allow(dead_code)]
    status: String,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ExtraRow {
    process: String,
    run_id: String,
    kind: String,
    name: String,
    t: i64,
    v: f64,
    text: String,
    payload: String,
    event_id: String,
}

impl Drop for ClickHouseStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stopped.notify_one();
        self.shared.appended.notify_one();
        self.shared.flush_kick.notify_one();
    }
}

impl Store for ClickHouseStore {
    fn write(&self, b: WriteBatch) -> Result<(), StorageError> {
        if b.is_empty() {
            return Ok(());
        }
        let payload = SpoolBatch::encode(&b);
        let seq = self.shared.spool.append(&payload).map_err(|e| StorageError::Unavailable(e.to_string()))?;
        self.pending().apply(seq, &b);
        self.shared.update_gauges();
        self.shared.appended.notify_one();
        Ok(())
    }

    fn flush(&self, timeout: Duration) -> Result<(), StorageError> {
        let deadline = Instant::now() + timeout;
        self.shared.flush_requested.store(true, Ordering::Release);
        let res = loop {
            self.shared.flush_kick.notify_one();
            if self.shared.spool.is_empty() {
                break Ok(());
            }
            if Instant::now() > deadline {
                let why = self.shared.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
                break Err(StorageError::Unavailable(format!(
                    "{} spooled records not yet in ClickHouse {why}",
                    self.shared.spool.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.shared.flush_requested.store(false, Ordering::Release);
        res
    }

    fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
        let stored = self.query_runs(&RunFilter { open_only: true, limit: 1_000_000, ..Default::default() })?;
        let p = self.pending();
        let mut by_key: BTreeMap<RunKey, ProcessRun> = stored.into_iter().map(|r| (r.key(), r)).collect();
        for k in p.deleted.keys() {
            by_key.remove(k);
        }
        for (k, (_, r)) in &p.runs {
            by_key.insert(k.clone(), (**r).clone());
        }
        Ok(by_key.into_values().filter(|r| !r.status.is_terminal()).collect())
    }

    fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
        {
            let p = self.pending();
            if p.deleted.contains_key(key) {
                return Ok(None);
            }
            if let Some((_, r)) = p.runs.get(key) {
                return Ok(Some((**r).clone()));
            }
        }
        let f = RunFilter {
            process: Some(key.process.clone()),
            run_id: Some(key.run_id.clone()),
            limit: 1,
            ..Default::default()
        };
        self.degrade(self.query_runs(&f).map(|r| r.into_iter().next()), None)
    }

    fn signal_ids(&self, key: &RunKey, from_ns: i64, to_ns: i64) -> Result<Vec<(u128, i64)>, StorageError> {
        let ids: Result<Vec<(String, i64)>, StorageError> = self
            .block(
                self.client()
                    .query(
                        "SELECT signal_id, toUnixTimestamp64Nano(min(time)) AS t FROM business_events
                         WHERE process = ? AND run_id = ? GROUP BY signal_id HAVING t BETWEEN ? AND ?",
                    )
                    .bind(&key.process)
                    .bind(&key.run_id)
                    .bind(from_ns)
                    .bind(to_ns)
                    .fetch_all(),
            )
            .map_err(|e| self.read_err(e));
        // Loading a run's recent ids (`to_ns` open) may fall back to the spool
        // like the other tracker reads; checking a signal older than the
        // tracker's window may not — answering "not stored" while ClickHouse
        // is unreachable would count a late duplicate twice, so that commit
        // fails and the client retries.
        let ids = if to_ns == i64::MAX { self.degrade(ids, Vec::new())? } else { ids? };
        let mut out: HashMap<u128, i64> = HashMap::new();
        for (s, t) in ids {
            let id = u128::from_str_radix(&s, 16).map_err(|_| StorageError::Corrupt(format!("bad signal id {s:?}")))?;
            out.insert(id, t);
        }
        if let Some((_, pending)) = self.pending().signals.get(key) {
            out.extend(pending.iter().filter(|(_, t)| (from_ns..=to_ns).contains(*t)).map(|(id, t)| (*id, *t)));
        }
        Ok(out.into_iter().collect())
    }

    fn alias(&self, process: &str, trace_id: &str) -> Result<Option<String>, StorageError> {
        let stored: Result<Option<String>, StorageError> = self
            .block(
                self.client()
                    .query("SELECT argMin(run_id, created_ns) FROM run_aliases WHERE process = ? AND trace_id = ? GROUP BY process, trace_id")
                    .bind(process)
                    .bind(trace_id)
                    .fetch_optional(),
            )
            .map_err(|e| self.read_err(e));
        let stored = self.degrade(stored, None)?;
        if stored.is_some() {
            return Ok(stored);
        }
        Ok(self.pending().aliases.get(&(process.to_string(), trace_id.to_string())).map(|v| v.1.clone()))
    }

    fn last_successes(&self) -> Result<Vec<(String, i64)>, StorageError> {
        let rows: Vec<(String, i64)> = self
            .block(
                self.client()
                    .query(
                        "SELECT toString(process), max(toUnixTimestamp64Nano(tupleElement(t, 1))) FROM (
                            SELECT process, run_id, max(terminal) AS t FROM process_runs GROUP BY process, run_id
                         ) WHERE tupleElement(t, 4) = 'succeeded' GROUP BY process",
                    )
                    .fetch_all(),
            )
            .map_err(|e| self.read_err(e))?;
        let mut m: BTreeMap<String, i64> = rows.into_iter().collect();
        for (_, r) in self.pending().runs.values() {
            if r.status == RunStatus::Succeeded {
                let end = r.ended_at_ns().unwrap_or(r.last_seen_at_ns);
                let cur = m.entry(r.process.clone()).or_insert(end);
                *cur = (*cur).max(end);
            }
        }
        Ok(m.into_iter().collect())
    }

    fn list_processes(&self) -> Result<Vec<ProcessSummary>, StorageError> {
        let names: Vec<String> = self
            .block(
                self.client()
                    .query("SELECT DISTINCT toString(process) AS p FROM process_runs UNION DISTINCT SELECT DISTINCT toString(process) AS p FROM process_violations")
                    .fetch_all(),
            )
            .map_err(|e| self.read_err(e))?;
        let mut names: Vec<String> = names.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        names.sort();
        let successes: HashMap<String, i64> = self.last_successes()?.into_iter().collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let latest = self
                .query_runs(&RunFilter { process: Some(name.clone()), limit: 1, ..Default::default() })?
                .into_iter()
                .next();
            let active = self
                .query_runs(&RunFilter {
                    process: Some(name.clone()),
                    open_only: true,
                    limit: 1_000_000,
                    ..Default::default()
                })?
                .len() as u64;
            let rows: Vec<(String, String, i64)> = self
                .block(
                    self.client()
                        .query(
                            "SELECT toString(rule), message, toUnixTimestamp64Nano(at) FROM process_violations WHERE process = ? AND run_id = ''
                             ORDER BY at DESC, rule LIMIT 1 BY at, rule LIMIT 20",
                        )
                        .bind(&name)
                        .fetch_all(),
                )
                .map_err(|e| self.read_err(e))?;
            let violations =
                rows.into_iter().map(|(rule, message, at_ns)| Violation { rule, message, at_ns }).collect();
            out.push(ProcessSummary {
                last_success_at_ns: successes.get(&name).copied(),
                latest_run: latest,
                name,
                active_runs: active,
                violations,
            });
        }
        Ok(out)
    }

    fn list_runs(&self, q: &RunQuery) -> Result<(Vec<ProcessRun>, Option<RunCursor>), StorageError> {
        let limit = q.limit.clamp(1, 1000);
        let f = RunFilter {
            process: q.process.clone(),
            status: q.status,
            since_ns: q.since_ns,
            cursor: q.cursor.clone(),
            limit: limit + 1,
            ..Default::default()
        };
        let mut runs = self.query_runs(&f)?;
        let mut next = None;
        if runs.len() > limit {
            runs.truncate(limit);
            let last = runs.last().unwrap();
            next = Some(RunCursor {
                started_at_ns: last.started_at_ns,
                process: last.process.clone(),
                run_id: last.run_id.clone(),
            });
        }
        Ok((runs, next))
    }

    fn run_events(&self, key: &RunKey, limit: usize) -> Result<Vec<BusinessEvent>, StorageError> {
        if self.is_deleted(key)? {
            return Ok(Vec::new());
        }
        let rows: Vec<EventRow> = self
            .block(
                self.client()
                    .query("SELECT ?fields FROM business_events WHERE process = ? AND run_id = ? ORDER BY time, event_id LIMIT 1 BY event_id LIMIT ?")
                    .bind(&key.process)
                    .bind(&key.run_id)
                    .bind(limit as u64)
                    .fetch_all(),
            )
            .map_err(|e| self.read_err(e))?;
        Ok(rows.into_iter().map(EventRow::into_event).collect())
    }
}
