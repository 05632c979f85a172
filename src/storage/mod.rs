//! Storage behind one interface: the run tracker writes [`WriteBatch`]es and
//! the query layer reads runs, processes and events. SQLite is the embedded
//! default; other backends implement the same [`Store`] trait and pass the
//! same conformance suite (`tests/storage_conformance.rs`).

pub mod clickhouse;
pub mod record;
pub mod spool;
pub mod sqlite;

use crate::runs::run::{ProcessRun, Violation};
use crate::signal::{BusinessEvent, RunKey};
use record::SignalRecord;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage schema problem: {0}")]
    Schema(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Everything one tracker commit changes, written atomically. Handed to the
/// store by value: the signals move into the journal's pending set without a
/// copy, and the run states are shared with the tracker (`Arc`).
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// The new signals, each with its rows (see [`record`]).
    pub signals: Vec<SignalRecord>,
    /// Runs to insert or replace (full state).
    pub runs: Vec<Arc<ProcessRun>>,
    /// Trace-keyed runs merged into a run with an explicit id: their events
    /// move to `to_run_id` and the old run row disappears.
    pub merges: Vec<(RunKey, String)>,
    /// (process, trace id) → run id learned from `business.run.id`.
    pub aliases: Vec<(String, String, String)>,
    pub process_violations: Vec<(String, Violation)>,
}

impl WriteBatch {
    /// The signals' rows as events, in order (the ClickHouse row form).
    pub fn events(&self) -> impl Iterator<Item = BusinessEvent> + '_ {
        self.signals.iter().flat_map(|s| s.expand())
    }

    /// Adds events as signal records (tests and tools that build rows by hand).
    pub fn push_events(&mut self, events: &[BusinessEvent]) {
        self.signals.extend(record::group(events));
    }

    pub fn is_empty(&self) -> bool {
        self.signals.is_empty()
            && self.runs.is_empty()
            && self.merges.is_empty()
            && self.aliases.is_empty()
            && self.process_violations.is_empty()
    }
}

/// A process as the board shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSummary {
    pub name: String,
    pub latest_run: Option<ProcessRun>,
    pub last_success_at_ns: Option<i64>,
    pub active_runs: u64,
    /// Process-level violations (e.g. a deadline with no run), newest first.
    pub violations: Vec<Violation>,
}

#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub process: Option<String>,
    pub status: Option<crate::runs::run::RunStatus>,
    /// Runs started at or after this time.
    pub since_ns: Option<i64>,
    pub limit: usize,
    /// Opaque cursor from a previous page.
    pub cursor: Option<RunCursor>,
}

/// Position in the newest-first run order.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCursor {
    pub started_at_ns: i64,
    pub process: String,
    pub run_id: String,
}

impl RunCursor {
    pub fn encode(&self) -> String {
        let json = serde_json::json!([self.started_at_ns, self.process, self.run_id]).to_string();
        crate::classify::hex(json.as_bytes())
    }

    pub fn decode(s: &str) -> Option<RunCursor> {
        if !s.len().is_multiple_of(2) || s.len() > 4096 {
            return None;
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let (t, p, r): (i64, String, String) = serde_json::from_slice(&bytes).ok()?;
        Some(RunCursor { started_at_ns: t, process: p, run_id: r })
    }
}

pub trait Store: Send + Sync + 'static {
    /// Applies a batch atomically and durably: when this returns `Ok`, the
    /// batch survives a crash.
    fn write(&self, batch: WriteBatch) -> Result<(), StorageError>;
    /// Runs that have not ended (the tracker keeps them in memory).
    fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError>;
    fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError>;
    /// Identities and times (`time_ns`: the signal's earliest row time) of
    /// the run's stored signals with `from_ns <= time_ns <= to_ns`, for
    /// de-duplication (merged runs' signals count as the run's own). With a
    /// bounded `to_ns` (the tracker checking signals older than its window) a
    /// backend must answer completely or fail, never from a partial view.
    fn signal_ids(&self, key: &RunKey, from_ns: i64, to_ns: i64) -> Result<Vec<(u128, i64)>, StorageError>;
    fn alias(&self, process: &str, trace_id: &str) -> Result<Option<String>, StorageError>;
    /// Newest successful end time per process.
    fn last_successes(&self) -> Result<Vec<(String, i64)>, StorageError>;
    fn list_processes(&self) -> Result<Vec<ProcessSummary>, StorageError>;
    /// Newest first; returns the page and the cursor of the next one.
    fn list_runs(&self, q: &RunQuery) -> Result<(Vec<ProcessRun>, Option<RunCursor>), StorageError>;
    /// A run's events in time order.
    fn run_events(&self, key: &RunKey, limit: usize) -> Result<Vec<BusinessEvent>, StorageError>;
    /// Waits until everything written is visible to reads (backends that
    /// write asynchronously after making a batch durable, like ClickHouse's spool).
    fn flush(&self, _timeout: std::time::Duration) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Keeps nothing and finds nothing: measures the pipeline without storage
/// (benchmarks).
#[derive(Debug, Default)]
pub struct NullStore;
impl Store for NullStore {
    fn write(&self, _: WriteBatch) -> Result<(), StorageError> {
        Ok(())
    }
    fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
        Ok(vec![])
    }
    fn get_run(&self, _: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
        Ok(None)
    }
    fn signal_ids(&self, _: &RunKey, _: i64, _: i64) -> Result<Vec<(u128, i64)>, StorageError> {
        Ok(vec![])
    }
    fn alias(&self, _: &str, _: &str) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
    fn last_successes(&self) -> Result<Vec<(String, i64)>, StorageError> {
        Ok(vec![])
    }
    fn list_processes(&self) -> Result<Vec<ProcessSummary>, StorageError> {
        Ok(vec![])
    }
    fn list_runs(&self, _: &RunQuery) -> Result<(Vec<ProcessRun>, Option<RunCursor>), StorageError> {
        Ok((vec![], None))
    }
    fn run_events(&self, _: &RunKey, _: usize) -> Result<Vec<BusinessEvent>, StorageError> {
        Ok(vec![])
    }
}
