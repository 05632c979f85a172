//! The run tracker: the one place that owns run state. It runs on its own
//! thread, takes classified batches from a bounded queue, folds them into
//! runs, commits events and runs to storage in one transaction per group of
//! batches (group commit), and only then acknowledges the receivers. When the
//! queue is full, submitters get [`SubmitError::Busy`] and answer their client
//! with a retryable status, so pressure reaches the sender instead of memory.

use super::expect::{check_counts, check_run, DeadlineRule};
use super::run::{ProcessRun, RunStatus, Violation};
use crate::config::{PipelineConfig, ProcessExpectations};
use crate::metrics::SelfMetrics;
use crate::signal::{RunKey, Signal};
use crate::storage::{StorageError, Store, WriteBatch};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};

/// Terminal runs stay in memory this long after their last signal (late
/// milestones are common right after the end); later ones are reloaded on demand.
const KEEP_ENDED: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error, Clone)]
pub enum SubmitError {
    #[error("the pipeline is full; retry later")]
    Busy,
    #[error("the signals could not be stored: {0}")]
    Storage(String),
    #[error("bizsignal is shutting down")]
    ShuttingDown,
    #[error("storage did not confirm in time; retry later")]
    Timeout,
}

/// What happened to a submission's signals.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub stored: usize,
    pub duplicates: usize,
}

/// A change to a run, published after it is committed: the run as it was
/// before the commit (`None` for a new run) and as it is now.
#[derive(Debug, Clone)]
pub struct RunChange {
    pub key: RunKey,
    pub before: Option<Arc<ProcessRun>>,
    pub after: Arc<ProcessRun>,
}

/// Something that must see every committed change, exactly once and in
/// order (derived metrics, live views). Called on the tracker thread right
/// after a commit succeeds, so it must be quick and must not block.
pub trait Observer: Send + Sync {
    /// `signals`: the new (non-duplicate) signals of the commit, each with
    /// the run id it was filed under; `changes`: every run the commit changed;
    /// `process_violations`: violations recorded on processes (no run).
    fn committed(&self, signals: &[(&Signal, &str)], changes: &[RunChange], process_violations: &[(String, Violation)]);
}

struct Submission {
    signals: Vec<Signal>,
    ack: oneshot::Sender<Result<Outcome, SubmitError>>,
}

/// The receivers' side of the tracker queue.
#[derive(Clone)]
pub struct TrackerHandle {
    tx: SyncSender<Submission>,
    metrics: Arc<SelfMetrics>,
    ack_timeout: Duration,
    changes: broadcast::Sender<RunChange>,
}

impl TrackerHandle {
    /// Queues signals and waits until they are durably stored.
    pub async fn submit(&self, signals: Vec<Signal>) -> Result<Outcome, SubmitError> {
        if signals.is_empty() {
            return Ok(Outcome::default());
        }
        let (ack, done) = oneshot::channel();
        match self.tx.try_send(Submission { signals, ack }) {
            Ok(()) => {
                self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                SelfMetrics::add(&self.metrics.requests_refused_busy, 1);
                return Err(SubmitError::Busy);
            }
            Err(TrySendError::Disconnected(_)) => return Err(SubmitError::ShuttingDown),
        }
        match tokio::time::timeout(self.ack_timeout, done).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(SubmitError::ShuttingDown),
            Err(_) => Err(SubmitError::Timeout),
        }
    }

    /// Committed run changes, for live views.
    pub fn subscribe(&self) -> broadcast::Receiver<RunChange> {
        self.changes.subscribe()
    }
}

struct RunEntry {
    run: ProcessRun,
    /// Identities of the signals folded in (de-duplication).
    seen: HashSet<u128>,
}

impl Clone for RunEntry {
    fn clone(&self) -> Self {
        RunEntry { run: self.run.clone(), seen: self.seen.clone() }
    }
}

pub struct Tracker {
    store: Arc<dyn Store>,
    max_active_runs: usize,
    observers: Vec<Arc<dyn Observer>>,
    expectations: BTreeMap<String, ProcessExpectations>,
    pipeline: PipelineConfig,
    metrics: Arc<SelfMetrics>,
    changes: broadcast::Sender<RunChange>,
    runs: HashMap<RunKey, RunEntry>,
    /// (process, trace id) → explicit run id.
    aliases: HashMap<(String, String), String>,
    last_success: HashMap<String, i64>,
    /// Per process: the rule and its next deadline instant.
    deadlines: HashMap<String, (DeadlineRule, i64)>,
}

/// The per-commit working set: copies of the runs a commit touches, so a
/// failed write leaves the tracker exactly as it was.
#[derive(Default)]
struct Work {
    /// Indexes (submission, signal) of new signals and the run id they were filed under.
    accepted: Vec<(usize, usize, String)>,
    dirty: HashMap<RunKey, RunEntry>,
    merged_away: HashSet<RunKey>,
    /// Runs loaded from storage (not in memory) by this commit, as they were:
    /// the `before` observers see, so a reloaded run is not mistaken for a new one.
    loaded: HashMap<RunKey, ProcessRun>,
    aliases: HashMap<(String, String), String>,
    batch: WriteBatch,
}

impl Tracker {
    /// Loads open runs from storage and starts the tracker thread.
    pub fn start(
        store: Arc<dyn Store>,
        expectations: BTreeMap<String, ProcessExpectations>,
        pipeline: PipelineConfig,
        metrics: Arc<SelfMetrics>,
        observers: Vec<Arc<dyn Observer>>,
        max_active_runs: usize,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(TrackerHandle, std::thread::JoinHandle<()>), StorageError> {
        let now = crate::now_ns();
        let mut runs = HashMap::new();
        let mut open = store.load_open_runs()?;
        if open.len() > max_active_runs {
            // The most recently active ones; the rest stay in storage and come back on their next signal.
            open.sort_by_key(|r| std::cmp::Reverse(r.last_received_at_ns));
            tracing::warn!(
                open = open.len(),
                max_active_runs,
                "more open runs in storage than limits.max_active_runs; loading the most recent"
            );
            open.truncate(max_active_runs);
        }
        for run in open {
            let key = run.key();
            let seen = store.signal_ids(&key)?.into_iter().collect();
            runs.insert(key, RunEntry { run, seen });
        }
        let deadlines = expectations
            .iter()
            .filter_map(|(p, e)| {
                let rule = DeadlineRule::parse(e.deadline.as_ref()?).ok()?;
                let next = rule.next_after(now);
                Some((p.clone(), (rule, next)))
            })
            .collect();
        let (changes, _) = broadcast::channel(4096);
        let (tx, rx) = sync_channel(pipeline.queue_capacity);
        let handle =
            TrackerHandle { tx, metrics: metrics.clone(), ack_timeout: pipeline.ack_timeout, changes: changes.clone() };
        tracing::info!(open_runs = runs.len(), "run tracker loaded open runs");
        let tracker = Tracker {
            last_success: store.last_successes()?.into_iter().collect(),
            store,
            max_active_runs,
            observers,
            expectations,
            pipeline,
            metrics,
            changes,
            runs,
            aliases: HashMap::new(),
            deadlines,
        };
        let join = std::thread::Builder::new()
            .name("run-tracker".into())
            .spawn(move || tracker.run(rx, shutdown))
            .expect("spawn run tracker thread");
        Ok((handle, join))
    }

    fn run(mut self, rx: Receiver<Submission>, shutdown: Arc<AtomicBool>) {
        let mut next_tick = Instant::now() + self.pipeline.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < self.pipeline.max_batches_per_commit {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    self.metrics.queue_depth.fetch_sub(batch.len() as u64, Ordering::Relaxed);
                    self.commit(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.tick(crate::now_ns());
                next_tick = Instant::now() + self.pipeline.tick;
            }
            if shutdown.load(Ordering::Acquire) {
                // Receivers are closed by now: drain what they queued, then stop.
                let rest: Vec<_> = rx.try_iter().collect();
                if !rest.is_empty() {
                    self.metrics.queue_depth.fetch_sub(rest.len() as u64, Ordering::Relaxed);
                    self.commit(rest);
                }
                break;
            }
        }
        tracing::info!("run tracker stopped");
    }

    fn commit(&mut self, batch: Vec<Submission>) {
        let now = crate::now_ns();
        let mut work = Work::default();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        'outer: for (si, sub) in batch.iter().enumerate() {
            let mut o = Outcome::default();
            for (i, s) in sub.signals.iter().enumerate() {
                match self.fold(s, now, &mut work) {
                    Ok(Some(run_id)) => {
                        o.stored += 1;
                        work.accepted.push((si, i, run_id));
                    }
                    Ok(None) => o.duplicates += 1,
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                }
            }
            outcomes.push(o);
        }
        if result.is_ok() {
            for (key, e) in work.dirty.iter_mut() {
                if let Some(exp) = self.expectations.get(&key.process) {
                    check_run(&mut e.run, exp, now);
                    check_counts(&mut e.run, exp, now);
                }
            }
            work.batch.runs = work.dirty.values().map(|e| e.run.clone()).collect();
            let started = Instant::now();
            result = self.store.write(&work.batch);
            self.metrics.storage_write(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                SelfMetrics::add(&self.metrics.storage_commits, 1);
                let dup: usize = outcomes.iter().map(|o| o.duplicates).sum();
                SelfMetrics::add(&self.metrics.signals_duplicate, dup as u64);
                let mut changes = Vec::with_capacity(work.dirty.len() + work.merged_away.len());
                for key in &work.merged_away {
                    // A trace-keyed run folded into a named one: observers see it end as merged (after == before).
                    if let Some(old) = self.runs.remove(key) {
                        let run = Arc::new(old.run);
                        changes.push(RunChange { key: key.clone(), before: Some(run.clone()), after: run });
                    }
                }
                self.aliases.extend(work.aliases);
                for (key, e) in work.dirty {
                    if e.run.status == RunStatus::Succeeded {
                        let end = e.run.ended_at_ns().unwrap_or(now);
                        let cur = self.last_success.entry(key.process.clone()).or_insert(end);
                        *cur = (*cur).max(end);
                    }
                    let before = self
                        .runs
                        .get(&key)
                        .map(|b| Arc::new(b.run.clone()))
                        .or_else(|| work.loaded.remove(&key).map(Arc::new));
                    changes.push(RunChange { key: key.clone(), before, after: Arc::new(e.run.clone()) });
                    self.runs.insert(key, e);
                }
                let signals: Vec<(&Signal, &str)> =
                    work.accepted.iter().map(|(si, i, r)| (&batch[*si].signals[*i], r.as_str())).collect();
                for o in &self.observers {
                    o.committed(&signals, &changes, &[]);
                }
                drop(signals);
                for c in changes {
                    let _ = self.changes.send(c);
                }
                for (sub, o) in batch.into_iter().zip(outcomes) {
                    let _ = sub.ack.send(Ok(o));
                }
            }
            Err(e) => {
                SelfMetrics::add(&self.metrics.storage_failures, 1);
                tracing::warn!(error = %e, batches = batch.len(), "storage commit failed; clients will retry");
                for sub in batch {
                    let _ = sub.ack.send(Err(SubmitError::Storage(e.to_string())));
                }
            }
        }
    }

    /// Folds one signal into its run's working copy; returns the run id it
    /// was filed under, `None` for a duplicate.
    fn fold(&mut self, s: &Signal, now: i64, work: &mut Work) -> Result<Option<String>, StorageError> {
        let key = self.route(s, work)?;
        let entry = self.entry(&key, work, now)?;
        if !entry.seen.insert(s.id) {
            return Ok(None);
        }
        entry.run.apply(s, now);
        work.batch.events.extend(s.to_events(&key.run_id));
        Ok(Some(key.run_id))
    }

    /// Decides which run a signal belongs to, learning trace aliases and
    /// merging a trace-keyed run into the named run when one appears.
    fn route(&mut self, s: &Signal, work: &mut Work) -> Result<RunKey, StorageError> {
        let process = &s.process;
        let trace_key = (process.clone(), s.trace_id.clone());
        if let Some(run_id) = &s.run_id {
            let key = RunKey { process: process.clone(), run_id: run_id.clone() };
            let traced = !s.trace_id.is_empty() && s.trace_id != *run_id;
            if traced && !work.aliases.contains_key(&trace_key) && !self.aliases.contains_key(&trace_key) {
                // First alias wins, also across restarts.
                if let Some(existing) = self.store.alias(process, &s.trace_id)? {
                    self.aliases.insert(trace_key, existing);
                    return Ok(key);
                }
                work.aliases.insert(trace_key.clone(), run_id.clone());
                work.batch.aliases.push((process.clone(), s.trace_id.clone(), run_id.clone()));
                let tkey = RunKey { process: process.clone(), run_id: s.trace_id.clone() };
                if let Some(old) = self.take_entry(&tkey, work)? {
                    let now = crate::now_ns();
                    let target = self.entry(&key, work, now)?;
                    target.run.merge(&old.run);
                    target.seen.extend(old.seen);
                    // Events of the trace-keyed run queued in this very commit move too.
                    for e in
                        work.batch.events.iter_mut().filter(|e| e.process == tkey.process && e.run_id == tkey.run_id)
                    {
                        e.run_id = run_id.clone();
                    }
                    work.batch.merges.push((tkey.clone(), run_id.clone()));
                    work.merged_away.insert(tkey);
                }
            }
            return Ok(key);
        }
        if let Some(r) = work.aliases.get(&trace_key).or_else(|| self.aliases.get(&trace_key)) {
            return Ok(RunKey { process: process.clone(), run_id: r.clone() });
        }
        let tkey = RunKey { process: process.clone(), run_id: s.trace_id.clone() };
        if work.dirty.contains_key(&tkey) || self.runs.contains_key(&tkey) {
            return Ok(tkey);
        }
        if let Some(r) = self.store.alias(process, &s.trace_id)? {
            self.aliases.insert(trace_key, r.clone());
            return Ok(RunKey { process: process.clone(), run_id: r });
        }
        Ok(tkey)
    }

    /// The working copy of a run: already touched, in memory, in storage, or new.
    fn entry<'w>(&mut self, key: &RunKey, work: &'w mut Work, now: i64) -> Result<&'w mut RunEntry, StorageError> {
        if !work.dirty.contains_key(key) {
            let e = match self.runs.get(key) {
                Some(e) => e.clone(),
                None => match self.load(key)? {
                    Some(e) => {
                        work.loaded.insert(key.clone(), e.run.clone());
                        e
                    }
                    None => RunEntry { run: ProcessRun::new(key, now), seen: HashSet::new() },
                },
            };
            work.dirty.insert(key.clone(), e);
        }
        Ok(work.dirty.get_mut(key).expect("inserted above"))
    }

    fn take_entry(&mut self, key: &RunKey, work: &mut Work) -> Result<Option<RunEntry>, StorageError> {
        if let Some(e) = work.dirty.remove(key) {
            return Ok(Some(e));
        }
        if let Some(e) = self.runs.get(key) {
            return Ok(Some(e.clone()));
        }
        self.load(key)
    }

    fn load(&self, key: &RunKey) -> Result<Option<RunEntry>, StorageError> {
        let Some(run) = self.store.get_run(key)? else { return Ok(None) };
        let seen = self.store.signal_ids(key)?.into_iter().collect();
        Ok(Some(RunEntry { run, seen }))
    }

    /// Time-driven checks: stalls, durations, deadlines; and forgetting old ended runs.
    /// Keeps at most `max_active_runs` open runs in memory: the least
    /// recently active are marked `evicted`, written, and dropped from memory
    /// (a later signal reloads them from storage).
    fn evict(&mut self, now: i64) {
        let mut open: Vec<(i64, RunKey)> = self
            .runs
            .iter()
            .filter(|(_, e)| !e.run.status.is_terminal())
            .map(|(k, e)| (e.run.last_received_at_ns, k.clone()))
            .collect();
        if open.len() <= self.max_active_runs {
            return;
        }
        let n = open.len() - self.max_active_runs;
        open.select_nth_unstable(n - 1);
        let mut batch = WriteBatch::default();
        let mut changes = Vec::with_capacity(n);
        for (_, key) in open.into_iter().take(n) {
            let before = Arc::new(self.runs[&key].run.clone());
            let mut after = (*before).clone();
            after.add_violation(Violation {
                rule: "evicted".into(),
                message: format!(
                    "evicted from memory: more than {} active runs (limits.max_active_runs); kept in storage and reloaded on its next signal, not checked for stalls or deadlines meanwhile",
                    self.max_active_runs
                ),
                at_ns: now,
            });
            batch.runs.push(after.clone());
            changes.push(RunChange { key, before: Some(before), after: Arc::new(after) });
        }
        if let Err(e) = self.store.write(&batch) {
            SelfMetrics::add(&self.metrics.storage_failures, 1);
            tracing::warn!(error = %e, "storage write of evicted runs failed; will retry next tick");
            return;
        }
        tracing::info!(
            evicted = n,
            max_active_runs = self.max_active_runs,
            "evicted least recently active runs from memory"
        );
        for c in &changes {
            self.runs.remove(&c.key);
        }
        for o in &self.observers {
            o.committed(&[], &changes, &[]);
        }
        for c in changes {
            let _ = self.changes.send(c);
        }
    }

    fn tick(&mut self, now: i64) {
        let mut batch = WriteBatch::default();
        let mut changed: Vec<RunEntry> = Vec::new();
        for (key, e) in &self.runs {
            let Some(exp) = self.expectations.get(&key.process) else { continue };
            if e.run.status.is_terminal() {
                continue;
            }
            let mut copy = e.run.clone();
            if check_run(&mut copy, exp, now) {
                changed.push(RunEntry { run: copy, seen: HashSet::new() });
            }
        }
        let mut fired = Vec::new();
        for (process, (rule, next)) in &self.deadlines {
            if now < *next {
                continue;
            }
            fired.push(process.clone());
            let window_start = *next - 86_400_000_000_000;
            if self.last_success.get(process).is_some_and(|t| *t >= window_start) {
                continue;
            }
            let message = format!("no successful run by {}", rule.label);
            let v = Violation { rule: "deadline".into(), message, at_ns: now };
            let mut any_open = false;
            for (key, e) in &self.runs {
                if key.process != *process || e.run.status.is_terminal() {
                    continue;
                }
                any_open = true;
                let base = changed.iter().position(|c| c.run.key() == *key);
                let mut copy = match base {
                    Some(i) => changed.remove(i).run,
                    None => e.run.clone(),
                };
                copy.add_violation(Violation {
                    message: format!("{} (this run was still {})", v.message, copy.status.as_str()),
                    ..v.clone()
                });
                changed.push(RunEntry { run: copy, seen: HashSet::new() });
            }
            if !any_open {
                batch.process_violations.push((
                    process.clone(),
                    Violation { message: format!("{}; no run was in progress", v.message), ..v },
                ));
            }
        }
        batch.runs = changed.iter().map(|e| e.run.clone()).collect();
        if !batch.is_empty() {
            let started = Instant::now();
            let written = self.store.write(&batch);
            self.metrics.storage_write(started.elapsed().as_secs_f64());
            if let Err(e) = written {
                SelfMetrics::add(&self.metrics.storage_failures, 1);
                tracing::warn!(error = %e, "storage write of expectation checks failed; will retry next tick");
                return;
            }
            for v in &batch.process_violations {
                tracing::info!(process = %v.0, rule = %v.1.rule, "process expectation violated");
            }
        }
        for p in fired {
            if let Some((rule, next)) = self.deadlines.get_mut(&p) {
                *next = rule.next_after(now);
            }
        }
        let mut changes = Vec::with_capacity(changed.len());
        for c in changed {
            let key = c.run.key();
            if let Some(e) = self.runs.get_mut(&key) {
                let before = Arc::new(std::mem::replace(&mut e.run, c.run));
                changes.push(RunChange { key, before: Some(before), after: Arc::new(e.run.clone()) });
            }
        }
        if !changes.is_empty() || !batch.process_violations.is_empty() {
            for o in &self.observers {
                o.committed(&[], &changes, &batch.process_violations);
            }
        }
        for c in changes {
            let _ = self.changes.send(c);
        }
        self.evict(now);
        let keep = KEEP_ENDED.as_nanos() as i64;
        self.runs.retain(|_, e| !e.run.status.is_terminal() || now - e.run.last_received_at_ns < keep);
    }
}
