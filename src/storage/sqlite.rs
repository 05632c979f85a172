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

use super::record::SignalRecord;
use super::spool::{Spool, SpoolBatch};
use super::{ProcessSummary, RunCursor, RunQuery, StorageError, Store, WriteBatch};
use crate::config::SqliteConfig;
use crate::metrics::SelfMetrics;
use crate::runs::run::{ProcessRun, Violation};
use crate::signal::{BusinessEvent, RunKey};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Versioned migrations, applied in order and recorded in `schema_migrations`.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("sqlite/0001_init.sql")),
    (2, "journal_state", include_str!("sqlite/0002_journal_state.sql")),
    (3, "signals", include_str!("sqlite/0003_signals.sql")),
];

/// Apply early when this many signals are pending, whatever the interval.
const FLUSH_SIGNALS: usize = 10_000;

pub struct SqliteStore {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    journal: Spool,
    pending: Mutex<Pending>,
    /// The journal record being encoded, reused across writes.
    encode_buf: Mutex<Vec<u8>>,
    /// Signalled when pending grows past [`FLUSH_SIGNALS`] or at shutdown.
    wake: Condvar,
    /// Held for a whole flush, so batches reach SQLite in journal order.
    flushing: Mutex<()>,
    /// The batches a flush in progress is applying: taken out of `pending`,
    /// not yet committed. Set and cleared with `pending` locked, so a reader
    /// holding `pending` sees each batch in `pending`, here, or (once this is
    /// cleared after the commit) in SQLite — without waiting for the flush,
    /// which can take up to the busy timeout while the database is locked.
    inflight: Mutex<Option<Arc<Pending>>>,
    stop: AtomicBool,
    commit_interval: Duration,
    metrics: Option<Arc<SelfMetrics>>,
}

/// Acknowledged batches not yet in SQLite, folded into one batch: signals in
/// order, the newest state of each run, merges, aliases, violations.
#[derive(Default)]
struct Pending {
    /// All but the signals (`batch.signals` stays empty).
    batch: WriteBatch,
    /// The signals, as the commits brought them: kept in their own vectors,
    /// not appended to one, which copied every pending signal each time it
    /// grew (≈ 1 % of the server's CPU under all-business load).
    signals: Vec<Vec<SignalRecord>>,
    signal_count: usize,
    /// `batch.runs[i]` as JSON, made once for the journal and kept for SQLite.
    states: Vec<String>,
    run_index: RunIndex,
    merged_from: HashSet<RunKey>,
    aliases: HashMap<(String, String), String>,
    last_seq: u64,
}

/// Where each pending run is in `Pending::batch.runs`, found by the run's
/// own process and run id: a lookup builds no `RunKey` (two string copies;
/// the tracker's every commit looks up each run it touched).
#[derive(Default)]
struct RunIndex {
    hasher: foldhash::fast::RandomState,
    slots: hashbrown::HashTable<usize>,
}

impl RunIndex {
    fn hash(&self, process: &str, run_id: &str) -> u64 {
        self.hasher.hash_one((process, run_id))
    }

    fn get(&self, runs: &[Arc<ProcessRun>], process: &str, run_id: &str) -> Option<usize> {
        let h = self.hash(process, run_id);
        self.slots.find(h, |&i| runs[i].process == process && runs[i].run_id == run_id).copied()
    }

    /// Indexes `runs[i]`, which is not indexed yet.
    fn insert(&mut self, runs: &[Arc<ProcessRun>], i: usize) {
        let h = self.hash(&runs[i].process, &runs[i].run_id);
        let hasher = &self.hasher;
        self.slots.insert_unique(h, i, |&j| hasher.hash_one((runs[j].process.as_str(), runs[j].run_id.as_str())));
    }

    fn remove(&mut self, runs: &[Arc<ProcessRun>], key: &RunKey) -> Option<usize> {
        let h = self.hash(&key.process, &key.run_id);
        let eq = |&i: &usize| runs[i].process == key.process && runs[i].run_id == key.run_id;
        self.slots.find_entry(h, eq).ok().map(|e| e.remove().0)
    }

    /// `runs[i]` was at `from` (a `swap_remove` moved it).
    fn moved(&mut self, runs: &[Arc<ProcessRun>], from: usize, i: usize) {
        let h = self.hash(&runs[i].process, &runs[i].run_id);
        if let Some(slot) = self.slots.find_mut(h, |&j| j == from) {
            *slot = i;
        }
    }

    fn contains(&self, runs: &[Arc<ProcessRun>], key: &RunKey) -> bool {
        self.get(runs, &key.process, &key.run_id).is_some()
    }
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.signal_count == 0 && self.batch.is_empty()
    }

    /// Folds in a batch that comes after everything already pending.
    fn absorb(&mut self, seq: u64, b: WriteBatch, states: Vec<String>) {
        // A merge deletes the trace-keyed run's row; a pending upsert of it
        // must not bring it back (the merge is applied before the upserts).
        for (from, to) in b.merges {
            if let Some(i) = self.run_index.remove(&self.batch.runs, &from) {
                let last = self.batch.runs.len() - 1;
                self.batch.runs.swap_remove(i);
                self.states.swap_remove(i);
                if i < last {
                    self.run_index.moved(&self.batch.runs, last, i);
                }
            }
            self.merged_from.insert(from.clone());
            self.batch.merges.push((from, to));
        }
        for (r, state) in b.runs.into_iter().zip(states) {
            match self.run_index.get(&self.batch.runs, &r.process, &r.run_id) {
                Some(i) => (self.batch.runs[i], self.states[i]) = (r, state),
                None => {
                    self.batch.runs.push(r);
                    self.states.push(state);
                    self.run_index.insert(&self.batch.runs, self.batch.runs.len() - 1);
                }
            }
        }
        if !b.signals.is_empty() {
            self.signal_count += b.signals.len();
            self.signals.push(b.signals);
        }
        for a in b.aliases {
            self.aliases.entry((a.0.clone(), a.1.clone())).or_insert_with(|| a.2.clone());
            self.batch.aliases.push(a);
        }
        self.batch.process_violations.extend(b.process_violations);
        self.last_seq = self.last_seq.max(seq);
    }

    fn touches(&self, key: &RunKey) -> bool {
        self.run_index.contains(&self.batch.runs, key) || self.merged_from.contains(key)
    }

    /// `key` and the runs a pending merge folds into it (their rows in
    /// SQLite still carry the old run id).
    fn related(&self, key: &RunKey) -> Vec<RunKey> {
        let mut keys = vec![key.clone()];
        keys.extend(
            self.batch
                .merges
                .iter()
                .filter(|(f, to)| f.process == key.process && *to == key.run_id)
                .map(|(f, _)| f.clone()),
        );
        keys
    }

    fn signals_of<'a>(&'a self, keys: &'a [RunKey]) -> impl Iterator<Item = &'a SignalRecord> + 'a {
        self.signals
            .iter()
            .flatten()
            .filter(move |e| keys.iter().any(|k| k.process == e.process && k.run_id == e.run_id))
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
            // Takes effect only while the file is still empty (before WAL
            // mode writes its header); an existing database keeps its size.
            c.pragma_update(None, "page_size", cfg.page_size as i64)?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            // Throughput (docs/benchmarks.md): a page cache that holds the hot
            // index pages (default 2 MiB re-reads them from the OS on every
            // commit), and checkpoints every 32 MiB of WAL instead of 4 MiB so a
            // page rewritten by many commits is copied back once.
            c.pragma_update(None, "cache_size", -32768)?;
            let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            c.pragma_update(None, "wal_autocheckpoint", (32 << 20) / page.max(512))?;
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
                Ok(b) => {
                    let b = b.into_write_batch();
                    let states = run_states(&b)?;
                    pending.absorb(seq, b, states)
                }
                Err(e) => {
                    // Checksummed, so written by a bizsignal that encoded differently.
                    undecodable += payload.len() as u64;
                    tracing::error!(seq, error = %e, "undecodable journal record skipped");
                }
            }
        }
        let replay = pending.signal_count;
        if let Some(m) = &metrics {
            SelfMetrics::add(&m.journal_discarded_bytes, journal.discarded_bytes() + undecodable);
        }
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            journal,
            pending: Mutex::new(pending),
            encode_buf: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            flushing: Mutex::new(()),
            inflight: Mutex::new(None),
            stop: AtomicBool::new(false),
            commit_interval: cfg.commit_interval,
            metrics,
        });
        if replay > 0 || !shared.journal.is_empty() {
            let started = std::time::Instant::now();
            match shared.flush() {
                Ok(()) => tracing::info!(
                    signals = replay,
                    seconds = started.elapsed().as_secs_f64(),
                    "applied journal records left by the previous run"
                ),
                // Start anyway (no crash loop while the disk is full): reads
                // answer from SQLite plus the journal, the flusher retries.
                Err(e) => tracing::warn!(
                    signals = replay,
                    error = %e,
                    "cannot apply the journal to SQLite yet; serving from the journal and retrying"
                ),
            }
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

    /// Reads what SQLite holds without applying pending batches first.
    fn read_committed<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let c = lock(&self.shared.reader);
        f(&c)
    }

    /// Applies pending batches (when `needed`). If that fails (database
    /// locked, disk full), returns the pending batches so the caller can
    /// answer from SQLite plus them: the tracker and the run page keep
    /// working through a database outage, and a restart does not crash-loop.
    fn flush_or_pending(&self, needed: impl FnOnce(&Pending) -> bool) -> Option<MutexGuard<'_, Pending>> {
        // A flush in progress has taken its batches out of `pending` and not
        // committed them yet: without waiting for it, a read could find them
        // in neither place (an acknowledged run answered 404 under load).
        let order = lock(&self.shared.flushing);
        if !needed(&lock(&self.shared.pending)) {
            return None;
        }
        match self.shared.flush_in_order(&order) {
            Ok(()) => None,
            Err(e) => {
                tracing::debug!(error = %e, "answering a read from SQLite plus the journal");
                Some(lock(&self.shared.pending))
            }
        }
    }

    fn committed_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
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

    fn committed_signal_ids(&self, key: &RunKey, from_ns: i64, to_ns: i64) -> Result<Vec<(u128, i64)>, StorageError> {
        self.read_committed(|c| {
            // The unique index (process, run_id, time_ns, signal_id) answers this alone.
            let mut st = c.prepare_cached(
                "SELECT signal_id, time_ns FROM business_signals
                 WHERE process = ?1 AND run_id = ?2 AND time_ns BETWEEN ?3 AND ?4",
            )?;
            let rows = st.query_map(params![key.process, key.run_id, from_ns, to_ns], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            rows.map(|row| {
                let (id, t) = row?;
                Ok((parse_signal_id(&id)?, t))
            })
            .collect()
        })
    }

    fn committed_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
        self.read_committed(|c| {
            let mut st = c.prepare("SELECT state FROM process_runs WHERE status IN ('running', 'stalled')")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            rows.map(|s| run_from_state(&s?)).collect()
        })
    }

    fn committed_events(&self, key: &RunKey, limit: usize) -> Result<Vec<BusinessEvent>, StorageError> {
        self.read_committed(|c| {
            let mut st = c.prepare_cached(
                "SELECT signal_id, process, run_id, service, trace_id, span_id, attributes, resource, rows, time_ns
                 FROM business_signals WHERE process = ?1 AND run_id = ?2 ORDER BY time_ns",
            )?;
            let mut rows = st.query(params![key.process, key.run_id])?;
            let mut out: Vec<BusinessEvent> = Vec::new();
            // Signals come by their earliest row time, and every row of a
            // signal is at or after it: once `limit` events are kept, a signal
            // starting after the last kept one cannot contribute.
            let mut bound: Option<i64> = None;
            while let Some(r) = rows.next()? {
                let first: i64 = r.get(9)?;
                if bound.is_some_and(|b| first > b) {
                    break;
                }
                let rec = super::record::SignalRecord {
                    signal_id: r.get(0)?,
                    process: r.get(1)?,
                    run_id: r.get(2)?,
                    service: r.get(3)?,
                    trace_id: r.get(4)?,
                    span_id: r.get(5)?,
                    attributes: r.get(6)?,
                    resource: r.get::<_, String>(7)?.into(),
                    rows: super::record::Rows::from_json(r.get(8)?).map_err(corrupt)?,
                };
                out.extend(rec.expand());
                if out.len() >= limit {
                    sort_events(&mut out, limit);
                    bound = out.last().map(|e| e.time_ns);
                }
            }
            sort_events(&mut out, limit);
            Ok(out)
        })
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
                if !self.stop.load(Ordering::Acquire) && p.signal_count < FLUSH_SIGNALS {
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
        let order = lock(&self.flushing);
        self.flush_in_order(&order)
    }

    /// [`flush`](Self::flush) for a caller that holds `flushing`.
    fn flush_in_order(&self, _order: &MutexGuard<'_, ()>) -> Result<(), StorageError> {
        let p = {
            let mut pending = lock(&self.pending);
            if pending.is_empty() {
                return Ok(());
            }
            let p = Arc::new(std::mem::take(&mut *pending));
            *lock(&self.inflight) = Some(p.clone());
            p
        };
        let started = std::time::Instant::now();
        let res = (|| -> Result<(), StorageError> {
            let mut c = lock(&self.writer);
            let tx = c.transaction()?;
            apply(&tx, &p)?;
            tx.execute("UPDATE journal_state SET applied_seq = ?1", [p.last_seq as i64])?;
            tx.commit()?;
            Ok(())
        })();
        if let Some(m) = &self.metrics {
            m.storage_write(started.elapsed().as_secs_f64());
        }
        match res {
            Ok(()) => {
                lock(&self.inflight).take();
                if let Err(e) = self.journal.ack(p.last_seq) {
                    // SQLite knows what it applied; a replay skips it.
                    tracing::warn!(error = %e, "could not trim the journal");
                }
                self.update_gauges();
                Ok(())
            }
            Err(e) => {
                let mut cur = lock(&self.pending);
                lock(&self.inflight).take();
                // Readers only borrow the in-flight batches under `pending`, which we hold.
                let p = Arc::into_inner(p).expect("no other owner of the in-flight batches");
                let newer = std::mem::replace(&mut *cur, p);
                let seq = newer.last_seq;
                cur.signal_count += newer.signal_count;
                cur.signals.extend(newer.signals);
                cur.absorb(seq, newer.batch, newer.states);
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

/// Each run's state JSON, in order. Written into one reused buffer and
/// copied out at its exact size: serialized into a fresh `String`, each
/// state was grown ~7 times and shrunk once more (≈ 1.5 % of the server's
/// CPU under all-business load).
fn run_states(b: &WriteBatch) -> Result<Vec<String>, StorageError> {
    let mut scratch = Vec::with_capacity(2048);
    b.runs
        .iter()
        .map(|r| {
            scratch.clear();
            serde_json::to_writer(&mut scratch, &**r).map_err(corrupt)?;
            Ok(std::str::from_utf8(&scratch).expect("serde_json writes UTF-8").to_string())
        })
        .collect()
}

/// Writes the pending batches inside the caller's transaction.
fn apply(tx: &Transaction, p: &Pending) -> Result<(), StorageError> {
    let (b, states) = (&p.batch, &p.states);
    {
        let mut ins = tx.prepare_cached(
            "INSERT OR IGNORE INTO business_signals (signal_id, process, run_id, time_ns, service, trace_id, span_id, attributes, resource, rows)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for r in p.signals.iter().flatten() {
            ins.execute(params![
                r.signal_id,
                r.process,
                r.run_id,
                r.first_time_ns(),
                r.service,
                r.trace_id,
                r.span_id,
                r.attributes,
                &*r.resource,
                r.rows.json()
            ])?;
        }
        // After the inserts, so nothing of a merged run stays behind under its trace id.
        for (from, to_run) in &b.merges {
            tx.execute(
                "UPDATE business_signals SET run_id = ?1 WHERE process = ?2 AND run_id = ?3",
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
        for (r, state) in b.runs.iter().zip(states) {
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
    fn write(&self, b: WriteBatch) -> Result<(), StorageError> {
        if b.is_empty() {
            return Ok(());
        }
        let sh = &self.shared;
        let states = run_states(&b)?;
        let seq = {
            let mut buf = lock(&sh.encode_buf);
            SpoolBatch::encode_with_states(&b, &states, &mut buf);
            sh.journal.append(&buf).map_err(|e| StorageError::Unavailable(e.to_string()))?
        };
        let mut p = lock(&sh.pending);
        p.absorb(seq, b, states);
        if p.signal_count >= FLUSH_SIGNALS {
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
        let pending = self.flush_or_pending(|p| !p.is_empty());
        let mut runs = self.committed_open_runs()?;
        if let Some(p) = pending {
            runs.retain(|r| !p.touches(&r.key()));
            runs.extend(p.batch.runs.iter().filter(|r| !r.status.is_terminal()).map(|r| (**r).clone()));
        }
        Ok(runs)
    }

    fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
        if let Some(p) = self.flush_or_pending(|p| p.touches(key)) {
            return Ok(p.run_index.get(&p.batch.runs, &key.process, &key.run_id).map(|i| (*p.batch.runs[i]).clone()));
        }
        self.committed_run(key)
    }

    /// Never flushes or waits for a flush: the tracker asks this on its
    /// commit path (for signals older than its de-duplication window).
    fn signal_ids(&self, key: &RunKey, from_ns: i64, to_ns: i64) -> Result<Vec<(u128, i64)>, StorageError> {
        let mut ids: HashMap<u128, i64> = HashMap::new();
        let mut related = vec![key.clone()];
        {
            let p = lock(&self.shared.pending);
            let inflight = lock(&self.shared.inflight);
            for batches in std::iter::once(&*p).chain(inflight.as_deref()) {
                for k in batches.related(key) {
                    if !related.contains(&k) {
                        related.push(k);
                    }
                }
            }
            for batches in std::iter::once(&*p).chain(inflight.as_deref()) {
                for e in batches.signals_of(&related) {
                    let t = e.first_time_ns();
                    if (from_ns..=to_ns).contains(&t) {
                        ids.insert(parse_signal_id(&e.signal_id)?, t);
                    }
                }
            }
        }
        for k in &related {
            ids.extend(self.committed_signal_ids(k, from_ns, to_ns)?);
        }
        Ok(ids.into_iter().collect())
    }

    fn alias(&self, process: &str, trace_id: &str) -> Result<Option<String>, StorageError> {
        let k = (process.to_string(), trace_id.to_string());
        if let Some(p) = self.flush_or_pending(|p| p.aliases.contains_key(&k)) {
            return Ok(p.aliases.get(&k).cloned());
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
        let pending = self.flush_or_pending(|p| !p.is_empty());
        let committed: Vec<(String, i64)> = self.read_committed(|c| {
            let mut st = c.prepare(
                "SELECT process, MAX(ended_at_ns) FROM process_runs WHERE status = 'succeeded' GROUP BY process",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        let Some(p) = pending else { return Ok(committed) };
        let mut best: HashMap<String, i64> = committed.into_iter().collect();
        for r in p.batch.runs.iter().filter(|r| r.status == crate::runs::run::RunStatus::Succeeded) {
            if let Some(end) = r.ended_at_ns() {
                let cur = best.entry(r.process.clone()).or_insert(end);
                *cur = (*cur).max(end);
            }
        }
        Ok(best.into_iter().collect())
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
        let Some(p) = self.flush_or_pending(|p| p.touches(key)) else { return self.committed_events(key, limit) };
        let related = p.related(key);
        let mut out: Vec<BusinessEvent> = p.signals_of(&related).flat_map(|s| s.expand()).collect();
        drop(p);
        for k in &related {
            out.extend(self.committed_events(k, limit)?);
        }
        for e in &mut out {
            e.run_id = key.run_id.clone();
        }
        sort_events(&mut out, limit);
        Ok(out)
    }
}

fn sort_events(events: &mut Vec<BusinessEvent>, limit: usize) {
    events.sort_by(|a, b| (a.time_ns, &a.event_id).cmp(&(b.time_ns, &b.event_id)));
    events.truncate(limit);
}

fn parse_signal_id(s: &str) -> Result<u128, StorageError> {
    u128::from_str_radix(s, 16).map_err(|_| StorageError::Corrupt(format!("bad signal id {s:?}")))
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
        let mut b = WriteBatch { runs: vec![Arc::new(run)], ..Default::default() };
        b.push_events(&[event]);
        b
    }

    fn slow() -> SqliteConfig {
        SqliteConfig { commit_interval: Duration::from_secs(60), ..Default::default() }
    }

    fn page_size(db: &Path) -> i64 {
        Connection::open(db).unwrap().query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_new_database_gets_the_configured_page_size_and_an_existing_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        let store = SqliteStore::open_with(&db, &SqliteConfig { page_size: 8192, ..slow() }, None).unwrap();
        store.write(batch("r", 3)).unwrap();
        let checkpoint_pages: i64 =
            lock(&store.shared.writer).query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        assert_eq!(checkpoint_pages, 4096, "checkpoints every 32 MiB of WAL, whatever the page size");
        drop(store);
        assert_eq!(page_size(&db), 8192);
        assert_eq!(SqliteConfig::default().page_size, 16384);
        let store = SqliteStore::open_with(&db, &SqliteConfig { page_size: 65536, ..slow() }, None).unwrap();
        assert_eq!(page_size(&db), 8192, "not rewritten");
        let key = RunKey { process: "import".into(), run_id: "r".into() };
        assert_eq!(store.get_run(&key).unwrap().map(|r| r.signal_count), Some(3), "and still readable");
        assert_eq!(store.run_events(&key, 100).unwrap().len(), 1);
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
            store.write(batch("r1", n)).unwrap();
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
        store.write(b).unwrap();
        // Keep the journal (segments and ledger) as it was before the commit trims it.
        let saved: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(journal_dir(&db))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        assert!(saved.iter().any(|(p, _)| p.extension().is_some_and(|x| x == "log")));
        store.flush(Duration::from_secs(5)).unwrap();
        drop(store);
        for (p, data) in &saved {
            std::fs::write(p, data).unwrap();
        }
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        let procs = store.list_processes().unwrap();
        assert_eq!(procs[0].violations.len(), 1, "the violation was not applied twice");
        // New records get sequence numbers past the applied one.
        store.write(batch("r2", 2)).unwrap();
        store.abandon();
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        assert!(store.get_run(&RunKey { process: "import".into(), run_id: "r2".into() }).unwrap().is_some());
    }

    #[test]
    fn pending_runs_stay_found_after_a_merge_moves_them() {
        let key = |r: &str| RunKey { process: "import".into(), run_id: r.into() };
        let run = |r: &str, n: u64| {
            let mut run = ProcessRun::new(&key(r), 0);
            run.signal_count = n;
            Arc::new(run)
        };
        let absorb = |p: &mut Pending, seq: u64, b: WriteBatch| {
            let states = run_states(&b).unwrap();
            p.absorb(seq, b, states);
        };
        let mut p = Pending::default();
        absorb(&mut p, 1, WriteBatch { runs: vec![run("a", 1), run("b", 1), run("c", 1)], ..Default::default() });
        // Merging `a` away moves the last run, `c`, into its slot.
        absorb(&mut p, 2, WriteBatch { merges: vec![(key("a"), "b".into())], ..Default::default() });
        absorb(&mut p, 3, WriteBatch { runs: vec![run("c", 2), run("d", 1)], ..Default::default() });
        let names: Vec<&str> = p.batch.runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(names, ["c", "b", "d"], "c's newer state replaced it where it moved; no copy of it was added");
        assert_eq!(p.batch.runs[0].signal_count, 2);
        assert!(p.states[0].contains("\"signal_count\":2"), "its state JSON moved with it");
        for r in ["b", "c", "d"] {
            assert!(p.touches(&key(r)), "{r} is found");
        }
        assert!(!p.run_index.contains(&p.batch.runs, &key("a")), "the merged run is gone from the index");
        assert!(p.touches(&key("a")), "but still known as merged");
    }

    #[test]
    fn pending_merges_do_not_resurrect_the_merged_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        store.write(batch("trace-1", 1)).unwrap();
        let to = RunKey { process: "import".into(), run_id: "named".into() };
        let mut b = batch("named", 2);
        b.merges.push((RunKey { process: "import".into(), run_id: "trace-1".into() }, to.run_id.clone()));
        store.write(b).unwrap();
        assert!(store.get_run(&RunKey { process: "import".into(), run_id: "trace-1".into() }).unwrap().is_none());
        assert_eq!(store.run_events(&to, 10).unwrap().len(), 2, "the trace-keyed run's events moved");
    }

    #[test]
    fn migration_3_regroups_fact_rows_into_signals_and_keeps_the_old_table_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        {
            let c = Connection::open(&db).unwrap();
            c.execute_batch("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ns INTEGER NOT NULL)").unwrap();
            for (v, name, sql) in &MIGRATIONS[..2] {
                c.execute_batch(sql).unwrap();
                c.execute("INSERT INTO schema_migrations VALUES (?1, ?2, 0)", params![v, name]).unwrap();
            }
            let mut b: Vec<BusinessEvent> = batch("r1", 7).events().collect();
            let mut fact = b[0].clone();
            (fact.event_id, fact.kind, fact.name, fact.value, fact.time_ns) =
                ("f1".into(), "records".into(), "imported".into(), Some(3.0), 9);
            b.push(fact);
            for e in &b {
                c.execute(
                    "INSERT INTO business_events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    params![e.event_id, e.signal_id, e.process, e.run_id, e.time_ns, e.kind, e.name, e.value, e.text, e.payload, e.service, e.trace_id, e.span_id, e.attributes, e.resource],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&db).unwrap();
        let key = RunKey { process: "import".into(), run_id: "r1".into() };
        let events = store.run_events(&key, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["log", "records"]);
        assert_eq!(events[1].value, Some(3.0));
        assert_eq!(store.signal_ids(&key, i64::MIN, i64::MAX).unwrap().len(), 1);
        assert_eq!(store.signal_ids(&key, i64::MIN, i64::MAX).unwrap()[0].0, 7);
        drop(store);
        let c = Connection::open(&db).unwrap();
        let (signals, rows): (i64, i64) = c
            .query_row(
                "SELECT (SELECT COUNT(*) FROM business_signals), (SELECT COUNT(*) FROM business_events)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((signals, rows), (1, 2), "one signal row; the view still shows one row per fact");
    }

    #[test]
    fn run_events_are_the_earliest_by_time_across_signals_that_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        // A long span (starts at 1, its fact at 100) and short ones in between.
        let mut long = batch("r", 1);
        let mut fact = long.events().next().unwrap();
        (fact.event_id, fact.kind, fact.time_ns) = ("long-fact".into(), "records".into(), 100);
        long.signals[0].rows.push(super::super::record::Row(
            fact.event_id,
            fact.kind,
            fact.name,
            fact.time_ns,
            fact.value,
            fact.text,
            fact.payload,
        ));
        store.write(long).unwrap();
        for n in 2..=5 {
            store.write(batch("r", n)).unwrap();
        }
        let key = RunKey { process: "import".into(), run_id: "r".into() };
        let times: Vec<i64> = store.run_events(&key, 3).unwrap().iter().map(|e| e.time_ns).collect();
        assert_eq!(times, vec![1, 2, 3]);
        let all: Vec<i64> = store.run_events(&key, 100).unwrap().iter().map(|e| e.time_ns).collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 100]);
    }

    #[test]
    fn while_sqlite_is_full_reads_answer_from_the_journal_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        store.write(batch("r1", 1)).unwrap();
        store.flush(Duration::from_secs(5)).unwrap();
        {
            // "Database or disk is full" for anything that needs a new page.
            let w = lock(&store.shared.writer);
            let pages: i64 = w.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            w.pragma_update(None, "max_page_count", pages).unwrap();
        }
        let mut big = batch("r1", 2);
        // More than the free pages the migrations left behind, at any page size.
        big.signals[0].attributes = format!("{{\"blob\":\"{}\"}}", "x".repeat(1 << 20));
        store.write(big).unwrap();
        store.write(batch("r2", 3)).unwrap();
        assert!(store.shared.flush().is_err(), "the database is full");
        let r1 = RunKey { process: "import".into(), run_id: "r1".into() };
        let r2 = RunKey { process: "import".into(), run_id: "r2".into() };
        assert_eq!(store.get_run(&r1).unwrap().unwrap().signal_count, 2);
        assert!(store.get_run(&r2).unwrap().is_some());
        let mut ids: Vec<u128> =
            store.signal_ids(&r1, i64::MIN, i64::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(store.run_events(&r1, 10).unwrap().len(), 2);
        assert_eq!(store.load_open_runs().unwrap().len(), 2);
        assert!(store.list_runs(&RunQuery { limit: 10, ..Default::default() }).is_err(), "no stale list");
        // Space again (a new connection has no page limit): everything is applied.
        store.abandon();
        let store = SqliteStore::open_with(&db, &slow(), None).unwrap();
        assert_eq!(store.run_events(&r1, 10).unwrap().len(), 2);
        assert_eq!(store.list_runs(&RunQuery { limit: 10, ..Default::default() }).unwrap().0.len(), 2);
    }
}
