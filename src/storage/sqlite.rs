//! The embedded default store: one SQLite file in the data dir, WAL mode,
//! `synchronous=FULL`, and in front of it a journal (the same checksummed,
//! fsynced [`Spool`] the ClickHouse backend uses) in `<database>.journal/`.
//!
//! Why the journal: a SQLite commit costs about the same whether it holds one
//! request or a hundred (every B-tree page it touches is written to SQLite's
//! WAL and later checkpointed), so committing once per request group made
//! SQLite most of bizsignal's CPU. `write()` now appends the batch to the
//! journal and returns once that is fsynced (the acknowledgement is durable);
//! a flusher thread applies everything pending to SQLite in one transaction
//! every `commit_interval`, together with the journal sequence number it
//! covers (`journal_state`), so a replay after a crash applies each record
//! exactly once.
//!
//! Reads see every acknowledged write: a read first applies what is pending
//! (only when it concerns the read, for the tracker's per-run lookups).

use super::spool::{Spool, SpoolBatch};
use super::{ProcessSummary, RunCursor, RunQuery, StorageError, Store, WriteBatch};
use crate::config::SqliteConfig;
use crate::metrics::SelfMetrics;
use crate::runs::run::{ProcessRun, Violation};
use crate::signal::{BusinessEvent, RunKey};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Versioned migrations, applied in order and recorded in `schema_migrations`.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("sqlite/0001_init.sql")),
    (2, "journal_state", include_str!("sqlite/0002_journal_state.sql")),
];

/// Apply early when this many events are pending, whatever the interval.
const FLUSH_EVENTS: usize = 50_000;

pub struct SqliteStore {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    journal: Spool,
    pending: Mutex<Pending>,
    /// Signalled when pending grows past [`FLUSH_EVENTS`] or at shutdown.
    wake: Condvar,
    /// Held for a whole flush, so batches reach SQLite in journal order.
    flushing: Mutex<()>,
    stop: AtomicBool,
    commit_interval: Duration,
    metrics: Option<Arc<SelfMetrics>>,
}

/// Acknowledged batches not yet in SQLite, folded into one batch: events in
/// order, the newest state of each run, merges, aliases, violations.
#[derive(Default)]
struct Pending {
    batch: WriteBatch,
    run_index: HashMap<RunKey, usize>,
    merged_from: HashSet<RunKey>,
    aliases: HashSet<(String, String)>,
    last_seq: u64,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Folds in a batch that comes after everything already pending.
    fn absorb(&mut self, seq: u64, b: WriteBatch) {
        // A merge deletes the trace-keyed run's row; a pending upsert of it
        // must not bring it back (the merge is applied before the upserts).
        for (from, to) in b.merges {
            if let Some(i) = self.run_index.remove(&from) {
                self.batch.runs.swap_remove(i);
                if let Some(moved) = self.batch.runs.get(i) {
                    self.run_index.insert(moved.key(), i);
                }
            }
            self.merged_from.insert(from.clone());
            self.batch.merges.push((from, to));
        }
        for r in b.runs {
            match self.run_index.get(&r.key()) {
                Some(&i) => self.batch.runs[i] = r,
                None => {
                    self.run_index.insert(r.key(), self.batch.runs.len());
                    self.batch.runs.push(r);
                }
            }
        }
        self.batch.events.extend(b.events);
        for a in b.aliases {
            self.aliases.insert((a.0.clone(), a.1.clone()));
            self.batch.aliases.push(a);
        }
        self.batch.process_violations.extend(b.process_violations);
        self.last_seq = self.last_seq.max(seq);
    }

    fn touches(&self, key: &RunKey) -> bool {
        self.run_index.contains_key(key) || self.merged_from.contains(key)
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Unavailable(e.to_string())
    }
}

fn corrupt(e: serde_json::Error) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the journal of a database file lives.
pub fn journal_dir(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".journal");
    db.with_file_name(name)
}

impl SqliteStore {
    /// Opens with the default settings and no self-metrics (tests, benches).
    pub fn open(path: &Path) -> Result<SqliteStore, StorageError> {
        Self::open_with(path, &SqliteConfig::default(), None)
    }

    /// Opens the database and its journal, applies what the journal holds
    /// beyond the database, and starts the flusher thread.
    pub fn open_with(
        path: &Path,
        cfg: &SqliteConfig,
        metrics: Option<Arc<SelfMetrics>>,
    ) -> Result<SqliteStore, StorageError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let open = || -> Result<Connection, StorageError> {
            let c = Connection::open(path)
                .map_err(|e| StorageError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
            c.busy_timeout(std::time::Duration::from_secs(30))?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            // Throughput (docs/benchmarks.md): a page cache that holds the hot
            // index pages (default 2 MiB re-reads them from the OS on every
            // commit), and checkpoints every 32 MiB of WAL instead of 4 MiB so a
            // page rewritten by many commits is copied back once.
            c.pragma_update(None, "cache_size", -32768)?;
            c.pragma_update(None, "wal_autocheckpoint", 8192)?;
            Ok(c)
        };
        let writer = open()?;
        migrate(&writer)?;
        let reader = open()?;
        let jdir = journal_dir(path);
        let journal = Spool::open(&jdir, cfg.journal_max_bytes as u64)
            .map_err(|e| StorageError::Unavailable(format!("journal: {e}")))?;
        let applied: i64 = writer.query_row("SELECT applied_seq FROM journal_state", [], |r| r.get(0))?;
        journal.ack(applied as u64).map_err(|e| StorageError::Unavailable(format!("journal: {e}")))?;
        let mut pending = Pending::default();
        let mut undecodable = 0u64;
        for (seq, _, payload) in
            journal.read(applied as u64, usize::MAX).map_err(|e| StorageError::Corrupt(format!("journal: {e}")))?
        {
            match SpoolBatch::decode(&payload) {
                Ok(b) => pending.absorb(seq, b.into_write_batch()),
                Err(e) => {
                    // Checksummed, so written by a bizsignal that encoded differently.
                    undecodable += payload.len() as u64;
                    tracing::error!(seq, error = %e, "undecodable journal record skipped");
                }
            }
        }
        let replay = pending.batch.events.len();
        if let Some(m) = &metrics {
            SelfMetrics::add(&m.journal_discarded_bytes, journal.discarded_bytes() + undecodable);
        }
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            journal,
            pending: Mutex::new(pending),
            wake: Condvar::new(),
            flushing: Mutex::new(()),
            stop: AtomicBool::new(false),
            commit_interval: cfg.commit_interval,
            metrics,
        });
        if replay > 0 || shared.journal.len() > 0 {
            let started = std::time::Instant::now();
            shared.flush()?;
            tracing::info!(
                events = replay,
                seconds = started.elapsed().as_secs_f64(),
                "applied journal records left by the previous run"
            );
        }
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("sqlite-flusher".into())
            .spawn(move || s.run_flusher())
            .map_err(|e| StorageError::Unavailable(format!("cannot start the SQLite flusher: {e}")))?;
        Ok(SqliteStore { shared, flusher: Some(flusher) })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
        self.shared.flush()?;
        self.read_committed(f)
    }

    /// Reads without applying pending batches first: only for reads the
    /// caller has checked pending batches do not concern.
    fn read_committed<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let c = lock(&self.shared.reader);
        f(&c)
    }

    /// Applies pending batches when they concern `key`.
    fn flush_for(&self, key: &RunKey) -> Result<(), StorageError> {
        if lock(&self.shared.pending).touches(key) {
            self.shared.flush()?;
        }
        Ok(())
    }

    /// Stops the flusher without applying what is pending, as a crash would
    /// (tests of journal recovery).
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        *lock(&self.shared.pending) = Pending::default();
        self.shared.wake.notify_all();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run_flusher(&self) {
        loop {
            {
                let p = lock(&self.pending);
                if !self.stop.load(Ordering::Acquire) && p.batch.events.len() < FLUSH_EVENTS {
                    let _ = self.wake.wait_timeout(p, self.commit_interval);
                }
            }
            let stopping = self.stop.load(Ordering::Acquire);
            if let Err(e) = self.flush() {
                if let Some(m) = &self.metrics {
                    SelfMetrics::add(&m.storage_failures, 1);
                }
                tracing::warn!(error = %e, "applying the journal to SQLite failed; will retry");
                if !stopping {
                    std::thread::sleep(self.commit_interval);
                }
            }
            if stopping {
                break;
            }
        }
    }

    /// Applies everything pending to SQLite in one transaction; on failure
    /// it stays pending (and in the journal) for the next attempt.
    fn flush(&self) -> Result<(), StorageError> {
        let _order = lock(&self.flushing);
        let p = std::mem::take(&mut *lock(&self.pending));
        if p.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let res = (|| -> Result<(), StorageError> {
            let mut c = lock(&self.writer);
            let tx = c.transaction()?;
            apply(&tx, &p.batch)?;
            tx.execute("UPDATE journal_state SET applied_seq = ?1", [p.last_seq as i64])?;
            tx.commit()?;
            Ok(())
        })();
        if let Some(m) = &self.metrics {
            m.storage_write(started.elapsed().as_secs_f64());
        }
        match res {
            Ok(()) => {
                if let Err(e) = self.journal.ack(p.last_seq) {
                    // SQLite knows what it applied; a replay skips it.
                    tracing::warn!(error = %e, "could not trim the journal");
                }
                self.update_gauges();
                Ok(())
            }
            Err(e) => {
                let mut cur = lock(&self.pending);
                let newer = std::mem::replace(&mut *cur, p);
                let seq = newer.last_seq;
                cur.absorb(seq, newer.batch);
                cur.merged_from.extend(newer.merged_from);
                Err(e)
            }
        }
    }

    fn update_gauges(&self) {
        if let Some(m) = &self.metrics {
            m.journal_bytes.store(self.journal.bytes(), Ordering::Relaxed);
        }
    }
}

fn migrate(c: &Connection) -> Result<(), StorageError> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ns INTEGER NOT NULL)",
    )?;
    for (version, name, sql) in MIGRATIONS {
        let done: Option<i64> = c
            .query_row("SELECT version FROM schema_migrations WHERE version = ?1", [version], |r| r.get(0))
            .optional()?;
        if done.is_some() {
            continue;
        }
        // IMMEDIATE takes the write lock first, so two processes starting at
        // once cannot both apply the same migration.
        c.execute_batch("BEGIN IMMEDIATE")?;
        let again: Option<i64> = c
            .query_row("SELECT version FROM schema_migrations WHERE version = ?1", [version], |r| r.get(0))
            .optional()?;
        if again.is_none() {
            if let Err(e) = c.execute_batch(sql) {
                let _ = c.execute_batch("ROLLBACK");
                return Err(StorageError::Schema(format!("migration {version} ({name}) failed: {e}")));
            }
            c.execute(
                "INSERT INTO schema_migrations (version, name, applied_at_ns) VALUES (?1, ?2, ?3)",
                params![version, name, crate::now_ns()],
            )?;
        }
        c.execute_batch("COMMIT")?;
    }
    let newest: i64 = c.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))?;
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if newest > known {
        return Err(StorageError::Schema(format!(
            "database schema version {newest} is newer than this bizsignal knows ({known}); upgrade bizsignal"
        )));
    }
    Ok(())
}

fn run_from_state(state: &str) -> Result<ProcessRun, StorageError> {
    serde_json::from_str(state).map_err(corrupt)
}

fn event_from_row(r: &rusqlite::Row) -> rusqlite::Result<BusinessEvent> {
    Ok(BusinessEvent {
        event_id: r.get(0)?,
        signal_id: r.get(1)?,
        process: r.get(2)?,
        run_id: r.get(3)?,
        time_ns: r.get(4)?,
        kind: r.get(5)?,
        name: r.get(6)?,
        value: r.get(7)?,
        text: r.get(8)?,
        payload: r.get(9)?,
        service: r.get(10)?,
        trace_id: r.get(11)?,
        span_id: r.get(12)?,
        attributes: r.get(13)?,
        resource: r.get(14)?,
    })
}

/// Writes one (folded) batch inside the caller's transaction.
fn apply(tx: &Transaction, b: &WriteBatch) -> Result<(), StorageError> {
    {
        let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO business_events (event_id, signal_id, process, run_id, time_ns, kind, name, value, text, payload, service, trace_id, span_id, attributes, resource)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
        for e in &b.events {
            ins.execute(params![
                e.event_id,
                e.signal_id,
                e.process,
                e.run_id,
                e.time_ns,
                e.kind,
                e.name,
                e.value,
                e.text,
                e.payload,
                e.service,
                e.trace_id,
                e.span_id,
                e.attributes,
                e.resource
            ])?;
        }
        // After the inserts, so nothing of a merged run stays behind under its trace id.
        for (from, to_run) in &b.merges {
            tx.execute(
                "UPDATE business_events SET run_id = ?1 WHERE process = ?2 AND run_id = ?3",
                params![to_run, from.process, from.run_id],
            )?;
            tx.execute(
                "DELETE FROM process_runs WHERE process = ?1 AND run_id = ?2",
                params![from.process, from.run_id],
            )?;
        }
        let mut up = tx.prepare_cached(
                "INSERT INTO process_runs (process, run_id, status, started_at_ns, last_seen_at_ns, ended_at_ns, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (process, run_id) DO UPDATE SET status = excluded.status, started_at_ns = excluded.started_at_ns,
                 last_seen_at_ns = excluded.last_seen_at_ns, ended_at_ns = excluded.ended_at_ns, state = excluded.state",
            )?;
        for r in &b.runs {
            let state = serde_json::to_string(r).map_err(corrupt)?;
            up.execute(params![
                r.process,
                r.run_id,
                r.status.as_str(),
                r.started_at_ns,
                r.last_seen_at_ns,
                r.ended_at_ns(),
                state
            ])?;
        }
        let mut al =
            tx.prepare_cached("INSERT OR IGNORE INTO run_aliases (process, trace_id, run_id) VALUES (?1, ?2, ?3)")?;
        for (p, t, r) in &b.aliases {
            al.execute(params![p, t, r])?;
        }
        let mut pv = tx
            .prepare_cached("INSERT INTO process_violations (process, rule, message, at_ns) VALUES (?1, ?2, ?3, ?4)")?;
        for (p, v) in &b.process_violations {
            pv.execute(params![p, v.rule, v.message, v.at_ns])?;
        }
    }
    Ok(())
}

impl Store for SqliteStore {
    fn write(&self, b: &WriteBatch) -> Result<(), StorageError> {
        if b.is_empty() {
            return Ok(());
        }
        let sh = &self.shared;
        let seq = sh.journal.append(&SpoolBatch::encode(b)).map_err(|e| StorageError::Unavailable(e.to_string()))?;
        let mut p = lock(&sh.pending);
        p.absorb(seq, b.clone());
        if p.batch.events.len() >= FLUSH_EVENTS {
            sh.wake.notify_one();
        }
        drop(p);
        sh.update_gauges();
        Ok(())
    }

    fn flush(&self, _timeout: Duration) -> Result<(), StorageError> {
        self.shared.flush()
    }

    fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT state FROM process_runs WHERE status IN ('running', 'stalled')")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.map(|s| run_from_state(&s?)).collect()
        })
    }

    fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
        self.flush_for(key)?;
        self.read_committed(|c| {
            let s: Option<String> = c
                .query_row(
                    "SELECT state FROM process_runs WHERE process = ?1 AND run_id = ?2",
                    params![key.process, key.run_id],
                    |r| r.get(0),
                )
                .optional()?;
            s.map(|s| run_from_state(&s)).transpose()
        })
    }

    fn signal_ids(&self, key: &RunKey) -> Result<Vec<u128>, StorageError> {
        self.flush_for(key)?;
        self.read_committed(|c| {
            let mut st =
                c.prepare("SELECT DISTINCT signal_id FROM business_events WHERE process = ?1 AND run_id = ?2")?;
            let rows = st.query_map(params![key.process, key.run_id], |r| r.get::<_, String>(0))?;
            rows.map(|s| {
                let s = s?;
                u128::from_str_radix(&s, 16).map_err(|_| StorageError::Corrupt(format!("bad signal id {s:?}")))
            })
            .collect()
        })
    }

    fn alias(&self, process: &str, trace_id: &str) -> Result<Option<String>, StorageError> {
        let pending = lock(&self.shared.pending).aliases.contains(&(process.to_string(), trace_id.to_string()));
        if pending {
            self.shared.flush()?;
        }
        self.read_committed(|c| {
            Ok(c.query_row(
                "SELECT run_id FROM run_aliases WHERE process = ?1 AND trace_id = ?2",
                params![process, trace_id],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    fn last_successes(&self) -> Result<Vec<(String, i64)>, StorageError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT process, MAX(ended_at_ns) FROM process_runs WHERE status = 'succeeded' GROUP BY process",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn list_processes(&self) -> Result<Vec<ProcessSummary>, StorageError> {
        self.read(|c| {
            let mut names: Vec<String> = {
                let mut st = c.prepare("SELECT DISTINCT process FROM process_runs UNION SELECT DISTINCT process FROM process_violations")?;
                let rows = st.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            names.sort();
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let latest: Option<String> = c
                    .query_row(
                        "SELECT state FROM process_runs WHERE process = ?1 ORDER BY started_at_ns DESC, run_id DESC LIMIT 1",
                        [&name],
                        |r| r.get(0),
                    )
                    .optional()?;
                let last_success: Option<i64> =
                    c.query_row("SELECT MAX(ended_at_ns) FROM process_runs WHERE process = ?1 AND status = 'succeeded'", [&name], |r| r.get(0))?;
                let active: i64 =
                    c.query_row("SELECT COUNT(*) FROM process_runs WHERE process = ?1 AND status IN ('running', 'stalled')", [&name], |r| r.get(0))?;
                let mut st = c.prepare_cached("SELECT rule, message, at_ns FROM process_violations WHERE process = ?1 ORDER BY at_ns DESC LIMIT 20")?;
                let violations = st
                    .query_map([&name], |r| Ok(Violation { rule: r.get(0)?, message: r.get(1)?, at_ns: r.get(2)? }))?
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(ProcessSummary {
                    latest_run: latest.map(|s| run_from_state(&s)).transpose()?,
                    name,
                    last_success_at_ns: last_success,
                    active_runs: active as u64,
                    violations,
                });
            }
            Ok(out)
        })
    }

    fn list_runs(&self, q: &RunQuery) -> Result<(Vec<ProcessRun>, Option<RunCursor>), StorageError> {
        self.read(|c| {
            // Fixed SQL with optional filters bound as parameters (NULL = no filter).
            let sql = "SELECT state, started_at_ns, process, run_id FROM process_runs
                 WHERE (?1 IS NULL OR process = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR started_at_ns >= ?3)
                   AND (?4 IS NULL OR (started_at_ns, process, run_id) < (?4, ?5, ?6))
                 ORDER BY started_at_ns DESC, process DESC, run_id DESC LIMIT ?7";
            let mut st = c.prepare_cached(sql)?;
            let cur = q.cursor.as_ref();
            let limit = q.limit.clamp(1, 1000);
            let rows = st.query_map(
                params![
                    q.process,
                    q.status.map(|s| s.as_str()),
                    q.since_ns,
                    cur.map(|c| c.started_at_ns),
                    cur.map(|c| c.process.clone()),
                    cur.map(|c| c.run_id.clone()),
                    (limit + 1) as i64
                ],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)),
            )?;
            let mut runs = Vec::new();
            let mut next = None;
            for row in rows {
                let (state, t, p, id) = row?;
                if runs.len() == limit {
                    let last: &ProcessRun = runs.last().unwrap();
                    next = Some(RunCursor { started_at_ns: last.started_at_ns, process: last.process.clone(), run_id: last.run_id.clone() });
                    let _ = (t, p, id);
                    break;
                }
                runs.push(run_from_state(&state)?);
            }
            Ok((runs, next))
        })
    }

    fn run_events(&self, key: &RunKey, limit: usize) -> Result<Vec<BusinessEvent>, StorageError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT event_id, signal_id, process, run_id, time_ns, kind, name, value, text, payload, service, trace_id, span_id, attributes, resource
                 FROM business_events WHERE process = ?1 AND run_id = ?2 ORDER BY time_ns, event_id LIMIT ?3",
            )?;
            let rows = st.query_map(params![key.process, key.run_id, limit as i64], event_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn batch(run_id: &str, n: i64) -> WriteBatch {
        let key = RunKey { process: "import".into(), run_id: run_id.into() };
        let mut run = ProcessRun::new(&key, n);
        run.signal_count = n as u64;
        let event = BusinessEvent {
            event_id: format!("e{run_id}{n}"),
            signal_id: format!("{n:x}"),
            process: key.process.clone(),
            run_id: key.run_id.clone(),
            time_ns: n,
            kind: "log".into(),
            name: String::new(),
            value: None,
            text: String::new(),
            payload: String::new(),
            service: "svc".into(),
            trace_id: String::new(),
            span_id: String::new(),
            attributes: "{}".into(),
            resource: "{}".into(),
        };
        WriteBatch { events: vec![event], runs: vec![run], ..Default::default() }
    }

    fn slow() -> SqliteConfig {
        SqliteConfig { commit_interval: Duration::from_secs(60), ..Default::default() }
    }

    fn segments(db: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(journal_dir(db))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn acknowledged_batches_survive_a_crash_before_they_reach_sqlite_and_a_torn_tail_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        for n in 1..=3 {
            store.write(&batch("r1", n)).unwrap();
        }
        store.abandon();
        // Nothing reached SQLite: the journal is all there is.
        let raw = Connection::open(&db).unwrap();
        let rows: i64 = raw.query_row("SELECT COUNT(*) FROM process_runs", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0);
        drop(raw);
        // A crash in the middle of a fourth append leaves half a record.
        let seg = segments(&db).pop().unwrap();
        std::fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(&[200, 0, 0, 0, 7, 7, 7]).unwrap();

        let metrics = Arc::new(SelfMetrics::default());
        let store = SqliteStore::open_with(&db, &slow(), Some(metrics.clone())).unwrap();
        assert_eq!(metrics.journal_discarded_bytes.load(Ordering::Relaxed), 7);
        let key = RunKey { process: "import".into(), run_id: "r1".into() };
        assert_eq!(store.get_run(&key).unwrap().unwrap().signal_count, 3, "the newest acknowledged state");
        assert_eq!(store.run_events(&key, 10).unwrap().len(), 3);
        // Applied at start-up: the journal is empty again.
        assert_eq!(store.shared.journal.len(), 0);
    }

    #[test]
    fn a_replay_after_the_commit_but_before_the_journal_trim_applies_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        let v = Violation { rule: "deadline".into(), message: "late".into(), at_ns: 5 };
        let mut b = batch("r1", 1);
        b.process_violations.push(("import".into(), v));
        store.write(&b).unwrap();
        // Keep the journal as it was before the commit trims it.
        let saved: Vec<(PathBuf, Vec<u8>)> =
            segments(&db).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
        assert!(!saved.is_empty());
        store.flush(Duration::from_secs(5)).unwrap();
        drop(store);
        for (p, data) in &saved {
            std::fs::write(p, data).unwrap();
        }
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        let procs = store.list_processes().unwrap();
        assert_eq!(procs[0].violations.len(), 1, "the violation was not applied twice");
        // New records get sequence numbers past the applied one.
        store.write(&batch("r2", 2)).unwrap();
        store.abandon();
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        assert!(store.get_run(&RunKey { process: "import".into(), run_id: "r2".into() }).unwrap().is_some());
    }

    #[test]
    fn pending_merges_do_not_resurrect_the_merged_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        store.write(&batch("trace-1", 1)).unwrap();
        let to = RunKey { process: "import".into(), run_id: "named".into() };
        let mut b = batch("named", 2);
        b.merges.push((RunKey { process: "import".into(), run_id: "trace-1".into() }, to.run_id.clone()));
        store.write(&b).unwrap();
        assert!(store.get_run(&RunKey { process: "import".into(), run_id: "trace-1".into() }).unwrap().is_none());
        assert_eq!(store.run_events(&to, 10).unwrap().len(), 2, "the trace-keyed run's events moved");
    }
}
