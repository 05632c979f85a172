//! The embedded default store: one SQLite file in the data dir, WAL mode,
//! `synchronous=FULL` so a committed batch survives power loss. One writer
//! connection (the run tracker) and one reader connection (the query layer).

use super::{ProcessSummary, RunCursor, RunQuery, StorageError, Store, WriteBatch};
use crate::runs::run::{ProcessRun, Violation};
use crate::signal::{BusinessEvent, RunKey};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;

/// Versioned migrations, applied in order and recorded in `schema_migrations`.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[(1, "init", include_str!("sqlite/0001_init.sql"))];

pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Unavailable(e.to_string())
    }
}

fn corrupt(e: serde_json::Error) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StorageError> {
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
        Ok(SqliteStore { writer: Mutex::new(writer), reader: Mutex::new(reader) })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let c = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&c)
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

impl Store for SqliteStore {
    fn write(&self, b: &WriteBatch) -> Result<(), StorageError> {
        if b.is_empty() {
            return Ok(());
        }
        let mut c = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = c.transaction()?;
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
            let mut pv = tx.prepare_cached(
                "INSERT INTO process_violations (process, rule, message, at_ns) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (p, v) in &b.process_violations {
                pv.execute(params![p, v.rule, v.message, v.at_ns])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT state FROM process_runs WHERE status IN ('running', 'stalled')")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.map(|s| run_from_state(&s?)).collect()
        })
    }

    fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
        self.read(|c| {
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
        self.read(|c| {
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
        self.read(|c| {
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
