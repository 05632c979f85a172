//! The run tracker: the one place that owns run state. It runs on its own
//! thread, takes classified batches from a bounded queue, folds them into
//! runs, commits events and runs to storage in one transaction per group of
//! batches (group commit), and only then acknowledges the receivers. When the
//! queue is full, submitters get [`SubmitError::Busy`] and answer their client
//! with a retryable status, so pressure reaches the sender instead of memory.

use super::expect::{check_counts, check_run, check_run_due, DeadlineRule};
use super::linger::{GroupCommit, ENOUGH_TO_COMMIT};
use super::run::{ProcessRun, RunStatus, Violation};
use super::seen::{DedupWindow, RecentIds, SeenIds};
use crate::config::{PipelineConfig, ProcessExpectations};
use crate::metrics::SelfMetrics;
use crate::signal::{RunKey, Signal};
use crate::storage::record::{ResourceMemo, SignalRecord};
use crate::storage::{StorageError, Store, WriteBatch};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};

/// Maps keyed by process and run ids (client input): foldhash, randomly
/// seeded per process, instead of SipHash, which was ≈ 4 % of the tracker
/// thread in lookups alone.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Terminal runs stay in memory this long after their last signal (late
/// milestones are common right after the end); later ones are reloaded on demand.
const KEEP_ENDED: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
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
    /// Shared with observers and subscribers as `RunChange::before`/`after`;
    /// replaced (never mutated) when a commit changes the run.
    run: Arc<ProcessRun>,
    /// Identities of the committed signals folded in whose time is within
    /// the de-duplication window (older ones are looked up in storage).
    seen: RecentIds,
}

/// A run's working copy in one commit. The committed state stays untouched
/// in [`Tracker::runs`] until the write succeeds, so a failed write leaves the
/// tracker exactly as it was; only the run state is copied, never its
/// de-duplication set.
struct Draft {
    run: ProcessRun,
    /// (id, signal time) of the signals folded in by this commit, sorted by
    /// id: checked together with the committed set, merged into it when the
    /// commit succeeds, dropped when it fails.
    new_ids: Vec<(u128, i64)>,
    /// Committed ids that are not in `Tracker::runs` under this key: those of
    /// a run this commit loaded from storage, and of runs merged into this one.
    extra: RecentIds,
    /// Ids of this run's stored signals older than the window, loaded at the
    /// commit's first signal that old (see [`Tracker::fold`]).
    stored: Option<SeenIds>,
}

impl Draft {
    fn new(run: ProcessRun, extra: RecentIds) -> Self {
        Draft { run, new_ids: Vec::new(), extra, stored: None }
    }

    /// Whether `id` is already folded in: by this commit or a committed one
    /// within the window (`committed`: the run's set in memory).
    fn has(&self, committed: Option<&RecentIds>, id: u128) -> bool {
        self.new_ids.binary_search_by_key(&id, |(i, _)| *i).is_ok()
            || self.extra.contains(id)
            || committed.is_some_and(|c| c.contains(id))
    }

    fn add(&mut self, id: u128, t: i64) {
        if let Err(pos) = self.new_ids.binary_search_by_key(&id, |(i, _)| *i) {
            self.new_ids.insert(pos, (id, t));
        }
    }
}

/// (process, trace id) → explicit run id, nested so lookups take `&str`s.
#[derive(Default)]
struct Aliases(FastMap<String, FastMap<String, String>>);

impl Aliases {
    fn get(&self, process: &str, trace_id: &str) -> Option<&String> {
        self.0.get(process)?.get(trace_id)
    }

    fn contains(&self, process: &str, trace_id: &str) -> bool {
        self.get(process, trace_id).is_some()
    }

    fn insert(&mut self, process: &str, trace_id: &str, run_id: String) {
        match self.0.get_mut(process) {
            Some(m) => {
                m.insert(trace_id.to_string(), run_id);
            }
            None => {
                self.0.insert(process.to_string(), FastMap::from_iter([(trace_id.to_string(), run_id)]));
            }
        }
    }

    fn extend(&mut self, other: Aliases) {
        for (p, m) in other.0 {
            self.0.entry(p).or_default().extend(m);
        }
    }

    /// Forgets the aliases of runs no longer in memory (storage keeps them;
    /// `route` asks it again when one of their traces shows up).
    fn forget_runs(&mut self, removed: &[RunKey]) {
        if removed.is_empty() {
            return;
        }
        let mut by_process: HashMap<&str, HashSet<&str>> = HashMap::new();
        for k in removed {
            by_process.entry(k.process.as_str()).or_default().insert(k.run_id.as_str());
        }
        self.0.retain(|p, m| {
            if let Some(gone) = by_process.get(p.as_str()) {
                m.retain(|_, r| !gone.contains(r.as_str()));
                if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                    m.shrink_to_fit();
                }
            }
            !m.is_empty()
        });
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
    runs: FastMap<RunKey, RunEntry>,
    /// (process, trace id) → explicit run id, for the runs in memory.
    aliases: Aliases,
    last_success: HashMap<String, i64>,
    /// Per process: the rule and its next deadline instant.
    deadlines: HashMap<String, (DeadlineRule, i64)>,
    /// Which signal ids stay in memory (`pipeline.dedup_window`).
    window: DedupWindow,
    /// The first bucket kept by the last sweep of `RunEntry::seen`.
    swept: i64,
    /// `Work::dirty` between commits, empty, keeping its capacity: grown from
    /// nothing every commit, its rehashes of large entries were ≈ 13 % of the
    /// tracker thread's samples under all-business load (glibc `_int_malloc`).
    spare_dirty: FastMap<RunKey, Draft>,
}

/// The most drafts whose slots are kept between commits (a few hundred KiB).
const SPARE_DRAFTS: usize = 4096;

/// How often the tracker's busy share is handed to group commit.
const LOAD_SPAN: Duration = Duration::from_millis(250);

/// Keeps a commit holding one batch open until `deadline` for more: waits
/// for the next batch, then for each further one at the pace they came
/// ([`GroupCommit::next_wait`]), and closes it once a wait gathers nothing,
/// it holds `max` batches or [`ENOUGH_TO_COMMIT`] signals.
fn gather(
    rx: &Receiver<Submission>,
    group: &mut GroupCommit,
    batch: &mut Vec<Submission>,
    deadline: Instant,
    max: usize,
) {
    let mut first = true;
    let mut signals: usize = batch.iter().map(|s| s.signals.len()).sum();
    while batch.len() < max && signals < ENOUGH_TO_COMMIT {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait = if first { remaining } else { group.next_wait(remaining) };
        if wait.is_zero() {
            break;
        }
        let started = Instant::now();
        let got = rx.recv_timeout(wait).ok();
        group.waited(first, got.as_ref().map(|_| started.elapsed()));
        first = false;
        let Some(s) = got else { break };
        signals += s.signals.len();
        batch.push(s);
        for s in rx.try_iter().take(max - batch.len()) {
            signals += s.signals.len();
            batch.push(s);
        }
    }
}

/// The time a signal is de-duplicated by, the same in every retry: its
/// earliest row time, which is what storage keeps as the signal's time
/// (`SignalRecord::first_time_ns`: the signal row at its start, facts at its end).
fn signal_time(s: &Signal) -> i64 {
    if s.facts.is_empty() {
        s.start_ns
    } else {
        s.start_ns.min(s.time_ns)
    }
}

/// The per-commit working set: copies of the runs a commit touches and the
/// ids it folds in, so a failed write leaves the tracker exactly as it was.
#[derive(Default)]
struct Work {
    /// Indexes (submission, signal) of new signals and the run id they were filed under.
    accepted: Vec<(usize, usize, String)>,
    dirty: FastMap<RunKey, Draft>,
    merged_away: HashSet<RunKey>,
    /// Runs loaded from storage (not in memory) by this commit, as they were:
    /// the `before` observers see, so a reloaded run is not mistaken for a new one.
    loaded: HashMap<RunKey, Arc<ProcessRun>>,
    aliases: Aliases,
    batch: WriteBatch,
    resource: ResourceMemo,
    /// The commit's clock.
    now: i64,
    /// Signals older than this are checked against storage.
    horizon: i64,
    /// The earliest time among the commit's signals older than `horizon`
    /// (one storage read per run covers all of them).
    oldest: i64,
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
        let mut runs = FastMap::default();
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
        let window = DedupWindow::new(pipeline.dedup_window);
        let mut remembered = 0;
        for run in open {
            let key = run.key();
            let seen = window.recent(store.signal_ids(&key, window.horizon(now), i64::MAX)?, now);
            remembered += seen.len();
            runs.insert(key, RunEntry { run: Arc::new(run), seen });
        }
        metrics.dedup_ids.store(remembered as u64, Ordering::Relaxed);
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
            aliases: Aliases::default(),
            deadlines,
            window,
            swept: window.first_kept(now),
            spare_dirty: FastMap::default(),
        };
        let join = std::thread::Builder::new()
            .name("run-tracker".into())
            .spawn(move || tracker.run(rx, shutdown))
            .expect("spawn run tracker thread");
        Ok((handle, join))
    }

    fn run(mut self, rx: Receiver<Submission>, shutdown: Arc<AtomicBool>) {
        let mut next_tick = Instant::now() + self.pipeline.tick;
        let mut group = GroupCommit::new(self.pipeline.commit_linger);
        // Wall-clock time spent committing since `measured` (group commit's load signal).
        let (mut measured, mut busy) = (Instant::now(), Duration::ZERO);
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    // Take what is already queued; alone, maybe keep the
                    // commit open a little for more (adaptive group commit, `linger`).
                    let max = self.pipeline.max_batches_per_commit;
                    batch.extend(rx.try_iter().take(max - 1));
                    let window = group.wait(batch.len(), batch[0].signals.len());
                    if !window.is_zero() && !shutdown.load(Ordering::Acquire) {
                        gather(&rx, &mut group, &mut batch, Instant::now() + window, max);
                    }
                    self.metrics.queue_depth.fetch_sub(batch.len() as u64, Ordering::Relaxed);
                    let started = Instant::now();
                    self.commit(batch);
                    busy += started.elapsed();
                    let span = measured.elapsed();
                    if span >= LOAD_SPAN {
                        group.load(busy.as_secs_f64() / span.as_secs_f64());
                        (measured, busy) = (Instant::now(), Duration::ZERO);
                    }
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
        // Never below what the last sweep forgot, even if the wall clock stepped back.
        let horizon = self.window.horizon(now).max(self.window.bucket_start(self.swept));
        let oldest = batch.iter().flat_map(|s| &s.signals).map(signal_time).filter(|t| *t < horizon).min();
        let mut work = Work {
            now,
            horizon,
            oldest: oldest.unwrap_or(horizon),
            dirty: std::mem::take(&mut self.spare_dirty),
            ..Work::default()
        };
        // Sized once: grown one push at a time, these (≈ 250-byte records,
        // a few hundred KiB a commit) were reallocated and copied ~10 times per
        // commit, ≈ 15 % of the tracker thread under all-business load.
        let total: usize = batch.iter().map(|s| s.signals.len()).sum();
        work.batch.signals.reserve_exact(total);
        work.accepted.reserve_exact(total);
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
        // (key, ids folded in, committed ids from elsewhere, new state) of each run the commit changed.
        let mut order = Vec::with_capacity(work.dirty.len());
        if result.is_ok() {
            for (key, d) in work.dirty.iter_mut() {
                if let Some(exp) = self.expectations.get(&key.process) {
                    check_run(&mut d.run, exp, now);
                    check_counts(&mut d.run, exp, now);
                }
            }
            // The drafts become the shared new states: the batch and the
            // tracker hold the same `Arc`s, nothing is copied.
            work.batch.runs.reserve_exact(work.dirty.len());
            for (key, d) in work.dirty.drain() {
                let after = Arc::new(d.run);
                work.batch.runs.push(after.clone());
                order.push((key, d.new_ids, d.extra, after));
            }
            let started = Instant::now();
            result = self.store.write(std::mem::take(&mut work.batch));
            self.metrics.storage_write(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(()) => {
                SelfMetrics::add(&self.metrics.storage_commits, 1);
                let dup: usize = outcomes.iter().map(|o| o.duplicates).sum();
                SelfMetrics::add(&self.metrics.signals_duplicate, dup as u64);
                let mut changes = Vec::with_capacity(order.len() + work.merged_away.len());
                for key in &work.merged_away {
                    // A trace-keyed run folded into a named one: observers see it end as merged (after == before).
                    if let Some(old) = self.runs.remove(key) {
                        changes.push(RunChange { key: key.clone(), before: Some(old.run.clone()), after: old.run });
                    }
                }
                self.aliases.extend(work.aliases);
                for (key, new_ids, extra, after) in order {
                    if after.status == RunStatus::Succeeded {
                        let end = after.ended_at_ns().unwrap_or(now);
                        let cur = self.last_success.entry(key.process.clone()).or_insert(end);
                        *cur = (*cur).max(end);
                    }
                    let before = match self.runs.get_mut(&key) {
                        Some(e) => {
                            e.seen.absorb(extra);
                            self.window.remember(&mut e.seen, new_ids, now);
                            Some(std::mem::replace(&mut e.run, after.clone()))
                        }
                        None => {
                            let mut seen = extra;
                            self.window.remember(&mut seen, new_ids, now);
                            self.runs.insert(key.clone(), RunEntry { run: after.clone(), seen });
                            work.loaded.remove(&key)
                        }
                    };
                    changes.push(RunChange { key, before, after });
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
        // Drafts left by a failed fold or write are dropped here; the slots stay.
        work.dirty.clear();
        if work.dirty.capacity() <= SPARE_DRAFTS {
            self.spare_dirty = work.dirty;
        }
    }

    /// Folds one signal into its run's working copy; returns the run id it
    /// was filed under, `None` for a duplicate.
    ///
    /// De-duplication is exact: ids of signals within the window are in
    /// memory; a signal older than that (late data, a replay, a retry after a
    /// long outage) is also checked against the run's stored ids.
    fn fold(&mut self, s: &Signal, now: i64, work: &mut Work) -> Result<Option<String>, StorageError> {
        let key = self.route(s, work)?;
        let t = signal_time(s);
        // Runs this commit merged into `key`: their stored signals count as its own.
        let merged: Vec<RunKey> = if t < work.horizon {
            work.batch
                .merges
                .iter()
                .filter(|(from, to)| *to == key.run_id && from.process == key.process)
                .map(|(from, _)| from.clone())
                .collect()
        } else {
            Vec::new()
        };
        let (horizon, oldest) = (work.horizon, work.oldest);
        let draft = self.draft(&key, work, now)?;
        if draft.has(self.runs.get(&key).map(|e| &e.seen), s.id) {
            return Ok(None);
        }
        if t < horizon {
            if draft.stored.is_none() {
                let mut ids = Vec::new();
                for k in std::iter::once(&key).chain(&merged) {
                    ids.extend(self.store.signal_ids(k, oldest, horizon - 1)?.into_iter().map(|(id, _)| id));
                }
                draft.stored = Some(SeenIds::from_ids(ids));
            }
            if draft.stored.as_ref().is_some_and(|st| st.contains(s.id)) {
                return Ok(None);
            }
        }
        draft.add(s.id, t);
        draft.run.apply(s, now);
        work.batch.signals.push(SignalRecord::from_signal_memo(s, &key.run_id, &mut work.resource));
        Ok(Some(key.run_id))
    }

    /// Decides which run a signal belongs to, learning trace aliases and
    /// merging a trace-keyed run into the named run when one appears.
    fn route(&mut self, s: &Signal, work: &mut Work) -> Result<RunKey, StorageError> {
        let process = &s.process;
        if let Some(run_id) = &s.run_id {
            let key = RunKey { process: process.clone(), run_id: run_id.clone() };
            let traced = !s.trace_id.is_empty() && s.trace_id != *run_id;
            if traced && !work.aliases.contains(process, &s.trace_id) && !self.aliases.contains(process, &s.trace_id) {
                // First alias wins, also across restarts.
                if let Some(existing) = self.store.alias(process, &s.trace_id)? {
                    self.aliases.insert(process, &s.trace_id, existing);
                    return Ok(key);
                }
                work.aliases.insert(process, &s.trace_id, run_id.clone());
                work.batch.aliases.push((process.clone(), s.trace_id.clone(), run_id.clone()));
                let tkey = RunKey { process: process.clone(), run_id: s.trace_id.clone() };
                if let Some(old) = self.take_draft(&tkey, work)? {
                    let now = crate::now_ns();
                    let target = self.draft(&key, work, now)?;
                    target.run.merge(&old.run);
                    target.extra.absorb(old.extra);
                    for (id, t) in old.new_ids {
                        target.add(id, t);
                    }
                    // Its stored ids (older than the window) now count too: read them again.
                    target.stored = None;
                    // Events of the trace-keyed run queued in this very commit move too.
                    for e in
                        work.batch.signals.iter_mut().filter(|e| e.process == tkey.process && e.run_id == tkey.run_id)
                    {
                        e.run_id = run_id.clone();
                    }
                    work.batch.merges.push((tkey.clone(), run_id.clone()));
                    work.merged_away.insert(tkey);
                }
            }
            return Ok(key);
        }
        if let Some(r) = work.aliases.get(process, &s.trace_id).or_else(|| self.aliases.get(process, &s.trace_id)) {
            return Ok(RunKey { process: process.clone(), run_id: r.clone() });
        }
        let tkey = RunKey { process: process.clone(), run_id: s.trace_id.clone() };
        if work.dirty.contains_key(&tkey) || self.runs.contains_key(&tkey) {
            return Ok(tkey);
        }
        if let Some(r) = self.store.alias(process, &s.trace_id)? {
            self.aliases.insert(process, &s.trace_id, r.clone());
            return Ok(RunKey { process: process.clone(), run_id: r });
        }
        Ok(tkey)
    }

    /// The working copy of a run: already touched, in memory, in storage, or new.
    fn draft<'w>(&self, key: &RunKey, work: &'w mut Work, now: i64) -> Result<&'w mut Draft, StorageError> {
        if !work.dirty.contains_key(key) {
            let d = match self.runs.get(key) {
                // Its committed ids stay in `self.runs`; only the run state is copied.
                Some(e) => Draft::new((*e.run).clone(), RecentIds::default()),
                None => match self.load(key, now)? {
                    Some((run, seen)) => {
                        let d = Draft::new(run.clone(), seen);
                        work.loaded.insert(key.clone(), Arc::new(run));
                        d
                    }
                    None => Draft::new(ProcessRun::new(key, now), RecentIds::default()),
                },
            };
            work.dirty.insert(key.clone(), d);
        }
        Ok(work.dirty.get_mut(key).expect("inserted above"))
    }

    /// A run about to be merged into another, with all its ids (committed ones in `extra`).
    fn take_draft(&self, key: &RunKey, work: &mut Work) -> Result<Option<Draft>, StorageError> {
        if let Some(mut d) = work.dirty.remove(key) {
            if let Some(e) = self.runs.get(key) {
                d.extra.absorb(e.seen.clone());
            }
            return Ok(Some(d));
        }
        if let Some(e) = self.runs.get(key) {
            return Ok(Some(Draft::new((*e.run).clone(), e.seen.clone())));
        }
        Ok(self.load(key, work.now)?.map(|(run, seen)| Draft::new(run, seen)))
    }

    /// A run from storage with the ids of its signals within the window as of
    /// `now` (the commit's clock, so memory and the commit agree on the horizon).
    fn load(&self, key: &RunKey, now: i64) -> Result<Option<(ProcessRun, RecentIds)>, StorageError> {
        let Some(run) = self.store.get_run(key)? else { return Ok(None) };
        let seen = self.window.recent(self.store.signal_ids(key, self.window.horizon(now), i64::MAX)?, now);
        Ok(Some((run, seen)))
    }

    /// Time-driven checks: stalls, durations, deadlines; and forgetting old ended runs.
    /// Keeps at most `max_active_runs` open runs in memory: the least
    /// recently active are marked `evicted`, written, and dropped from memory
    /// (a later signal reloads them from storage).
    fn evict(&mut self, now: i64, removed: &mut Vec<RunKey>) {
        let open_runs = self.runs.values().filter(|e| !e.run.status.is_terminal()).count();
        if open_runs <= self.max_active_runs {
            return;
        }
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
            let before = self.runs[&key].run.clone();
            let mut after = (*before).clone();
            after.add_violation(Violation {
                rule: "evicted".into(),
                message: format!(
                    "evicted from memory: more than {} active runs (limits.max_active_runs); kept in storage and reloaded on its next signal, not checked for stalls or deadlines meanwhile",
                    self.max_active_runs
                ),
                at_ns: now,
            });
            let after = Arc::new(after);
            batch.runs.push(after.clone());
            changes.push(RunChange { key, before: Some(before), after });
        }
        if let Err(e) = self.store.write(batch) {
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
            removed.push(c.key.clone());
        }
        for o in &self.observers {
            o.committed(&[], &changes, &[]);
        }
        for c in changes {
            let _ = self.changes.send(c);
        }
    }

    /// Drops the ids that fell out of the de-duplication window (each time
    /// the horizon enters a new bucket: a quarter window).
    fn forget_old_ids(&mut self, now: i64) {
        let first = self.window.first_kept(now);
        if first <= self.swept {
            return;
        }
        self.swept = first;
        let mut kept = 0;
        for e in self.runs.values_mut() {
            e.seen.forget_before(first);
            kept += e.seen.len();
        }
        self.metrics.dedup_ids.store(kept as u64, Ordering::Relaxed);
    }

    fn tick(&mut self, now: i64) {
        let mut batch = WriteBatch::default();
        let mut changed: Vec<ProcessRun> = Vec::new();
        for (key, e) in &self.runs {
            let Some(exp) = self.expectations.get(&key.process) else { continue };
            // Copy only the runs the check will change.
            if e.run.status.is_terminal() || !check_run_due(&e.run, exp, now) {
                continue;
            }
            let mut copy = (*e.run).clone();
            if check_run(&mut copy, exp, now) {
                changed.push(copy);
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
                let base = changed.iter().position(|c| c.process == key.process && c.run_id == key.run_id);
                let mut copy = match base {
                    Some(i) => changed.remove(i),
                    None => (*e.run).clone(),
                };
                copy.add_violation(Violation {
                    message: format!("{} (this run was still {})", v.message, copy.status.as_str()),
                    ..v.clone()
                });
                changed.push(copy);
            }
            if !any_open {
                batch.process_violations.push((
                    process.clone(),
                    Violation { message: format!("{}; no run was in progress", v.message), ..v },
                ));
            }
        }
        let changed: Vec<Arc<ProcessRun>> = changed.into_iter().map(Arc::new).collect();
        let process_violations = batch.process_violations.clone();
        batch.runs = changed.clone();
        if !batch.is_empty() {
            let started = Instant::now();
            let written = self.store.write(batch);
            self.metrics.storage_write(started.elapsed().as_secs_f64());
            if let Err(e) = written {
                SelfMetrics::add(&self.metrics.storage_failures, 1);
                tracing::warn!(error = %e, "storage write of expectation checks failed; will retry next tick");
                return;
            }
            for v in &process_violations {
                tracing::info!(process = %v.0, rule = %v.1.rule, "process expectation violated");
            }
        }
        for p in fired {
            if let Some((rule, next)) = self.deadlines.get_mut(&p) {
                *next = rule.next_after(now);
            }
        }
        let mut changes = Vec::with_capacity(changed.len());
        for after in changed {
            let key = after.key();
            if let Some(e) = self.runs.get_mut(&key) {
                let before = std::mem::replace(&mut e.run, after.clone());
                changes.push(RunChange { key, before: Some(before), after });
            }
        }
        if !changes.is_empty() || !process_violations.is_empty() {
            for o in &self.observers {
                o.committed(&[], &changes, &process_violations);
            }
        }
        for c in changes {
            let _ = self.changes.send(c);
        }
        self.forget_old_ids(now);
        let mut removed = Vec::new();
        self.evict(now, &mut removed);
        let keep = KEEP_ENDED.as_nanos() as i64;
        self.runs.retain(|k, e| {
            let stay = !e.run.status.is_terminal() || now - e.run.last_received_at_ns < keep;
            if !stay {
                removed.push(k.clone());
            }
            stay
        });
        self.aliases.forget_runs(&removed);
        if !removed.is_empty() && self.runs.capacity() > 1024 && self.runs.len() < self.runs.capacity() / 4 {
            self.runs.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{BusinessEvent, Fact, SignalKind};
    use crate::storage::{ProcessSummary, RunCursor, RunQuery};
    use std::sync::Mutex;

    /// An in-memory store whose writes can be made to fail.
    #[derive(Default)]
    struct MemStore {
        fail: AtomicBool,
        runs: Mutex<HashMap<RunKey, ProcessRun>>,
        ids: Mutex<HashMap<RunKey, Vec<(u128, i64)>>>,
        /// How many signal id reads asked for signals older than the window (not at start or load).
        old_reads: std::sync::atomic::AtomicUsize,
        aliases: Mutex<HashMap<(String, String), String>>,
    }

    impl Store for MemStore {
        fn write(&self, b: WriteBatch) -> Result<(), StorageError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StorageError::Unavailable("disk on fire".into()));
            }
            let mut ids = self.ids.lock().unwrap();
            let mut runs = self.runs.lock().unwrap();
            for e in &b.signals {
                let key = RunKey { process: e.process.clone(), run_id: e.run_id.clone() };
                ids.entry(key).or_default().push((u128::from_str_radix(&e.signal_id, 16).unwrap(), e.first_time_ns()));
            }
            for (from, to) in &b.merges {
                let moved = ids.remove(from).unwrap_or_default();
                ids.entry(RunKey { process: from.process.clone(), run_id: to.clone() }).or_default().extend(moved);
                runs.remove(from);
            }
            for r in &b.runs {
                runs.insert(r.key(), (**r).clone());
            }
            for (p, t, r) in &b.aliases {
                self.aliases.lock().unwrap().entry((p.clone(), t.clone())).or_insert_with(|| r.clone());
            }
            Ok(())
        }
        fn load_open_runs(&self) -> Result<Vec<ProcessRun>, StorageError> {
            Ok(self.runs.lock().unwrap().values().filter(|r| !r.status.is_terminal()).cloned().collect())
        }
        fn get_run(&self, key: &RunKey) -> Result<Option<ProcessRun>, StorageError> {
            Ok(self.runs.lock().unwrap().get(key).cloned())
        }
        fn signal_ids(&self, key: &RunKey, from: i64, to: i64) -> Result<Vec<(u128, i64)>, StorageError> {
            if to != i64::MAX {
                self.old_reads.fetch_add(1, Ordering::SeqCst);
            }
            let mut v = self.ids.lock().unwrap().get(key).cloned().unwrap_or_default();
            v.retain(|(_, t)| (from..=to).contains(t));
            v.sort_unstable();
            v.dedup();
            Ok(v)
        }
        fn alias(&self, p: &str, t: &str) -> Result<Option<String>, StorageError> {
            Ok(self.aliases.lock().unwrap().get(&(p.to_string(), t.to_string())).cloned())
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

    /// Signal times: long before any de-duplication window (`OLD`, checked
    /// against storage) or now (checked in memory). Tests run with both.
    const OLD: i64 = 0;

    fn sig_at(t0: i64, id: u128, run_id: Option<&str>, trace: &str, n: f64) -> Signal {
        Signal {
            id,
            kind: SignalKind::Span,
            process: "p".into(),
            run_id: run_id.map(str::to_string),
            trace_id: trace.into(),
            span_id: format!("{id:016x}"),
            name: "s".into(),
            start_ns: t0 + 1_000 + id as i64,
            time_ns: t0 + 2_000 + id as i64,
            text: String::new(),
            service: "svc".into(),
            attributes: Default::default(),
            resource: vec![].into(),
            facts: vec![Fact::Records { outcome: "ok".into(), count: n }],
        }
    }

    fn start(store: Arc<MemStore>) -> (TrackerHandle, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        start_with(store, PipelineConfig::default(), Arc::new(SelfMetrics::default()))
    }

    fn start_with(
        store: Arc<MemStore>,
        pipeline: PipelineConfig,
        metrics: Arc<SelfMetrics>,
    ) -> (TrackerHandle, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let sd = Arc::new(AtomicBool::new(false));
        let (h, j) = Tracker::start(store, BTreeMap::new(), pipeline, metrics, vec![], usize::MAX, sd.clone()).unwrap();
        (h, sd, j)
    }

    fn key(run: &str) -> RunKey {
        RunKey { process: "p".into(), run_id: run.into() }
    }

    /// A tracker with `commit_linger: linger` over a memory store, a
    /// runtime to submit from, and its metrics (commits are counted).
    fn lingering(
        linger: Duration,
    ) -> (tokio::runtime::Runtime, TrackerHandle, Arc<AtomicBool>, std::thread::JoinHandle<()>, Arc<SelfMetrics>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let metrics = Arc::new(SelfMetrics::default());
        let pipeline = PipelineConfig { commit_linger: linger, ..PipelineConfig::default() };
        let (h, sd, j) = start_with(Arc::new(MemStore::default()), pipeline, metrics.clone());
        (rt, h, sd, j, metrics)
    }

    #[test]
    fn commit_linger_groups_the_batch_that_arrives_while_the_first_waits_and_commits_then() {
        let (rt, h, sd, j, metrics) = lingering(Duration::from_secs(2));
        let t0 = crate::now_ns();
        let started = Instant::now();
        let (a, b) = rt.block_on(async {
            let first = tokio::spawn({
                let h = h.clone();
                async move { h.submit(vec![sig_at(t0, 1, Some("r"), "", 1.0)]).await }
            });
            // A gap no commit without a linger would wait for.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let second = h.submit(vec![sig_at(t0, 2, Some("r"), "", 1.0)]).await;
            (first.await.unwrap(), second)
        });
        assert_eq!((a.unwrap().stored, b.unwrap().stored), (1, 1));
        assert_eq!(metrics.storage_commits.load(Ordering::Relaxed), 1, "both batches in one commit");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "the first batch waited for the second");
        assert!(took < Duration::from_secs(1), "not to the end of the window once one wait came up empty: {took:?}");
        sd.store(true, Ordering::Release);
        drop(h);
        j.join().unwrap();
    }

    #[test]
    fn commit_linger_keeps_the_commit_open_for_senders_at_a_steady_pace() {
        let (rt, h, sd, j, metrics) = lingering(Duration::from_secs(1));
        let t0 = crate::now_ns();
        const N: u64 = 24;
        let stored = rt.block_on(async {
            // One batch every 20 ms, each sender waiting for its own answer
            // only: waiting for the next batch alone would commit them in pairs.
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let h = h.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20 * i)).await;
                        h.submit(vec![sig_at(t0, i as u128 + 1, Some("r"), "", 1.0)]).await
                    })
                })
                .collect();
            let mut stored = 0;
            for t in tasks {
                stored += t.await.unwrap().unwrap().stored;
            }
            stored
        });
        assert_eq!(stored, N as usize);
        let commits = metrics.storage_commits.load(Ordering::Relaxed);
        assert!(commits < N / 2, "{commits} commits for {N} batches: the window closed after the next batch");
        sd.store(true, Ordering::Release);
        drop(h);
        j.join().unwrap();
    }

    #[test]
    fn a_failed_write_leaves_runs_and_deduplication_as_they_were() {
        for t0 in [OLD, crate::now_ns()] {
            let sig = |id: u128, run: Option<&str>, trace: &str, n: f64| sig_at(t0, id, run, trace, n);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let store = Arc::new(MemStore::default());
            let (h, sd, j) = start(store.clone());
            let ok = |stored, duplicates| Ok(Outcome { stored, duplicates });
            assert_eq!(rt.block_on(h.submit(vec![sig(1, Some("r"), "", 1.0), sig(2, Some("r"), "", 2.0)])), ok(2, 0));
            // A commit that fails: a new signal, a duplicate, a new signal twice, a new run.
            store.fail.store(true, Ordering::SeqCst);
            let batch = || {
                vec![
                    sig(3, Some("r"), "", 4.0),
                    sig(1, Some("r"), "", 1.0),
                    sig(4, Some("r"), "", 8.0),
                    sig(4, Some("r"), "", 8.0),
                    sig(5, Some("q"), "", 16.0),
                ]
            };
            assert!(matches!(rt.block_on(h.submit(batch())), Err(SubmitError::Storage(_))));
            store.fail.store(false, Ordering::SeqCst);
            // The retry: exactly the signals the failed commit would have added count, once.
            assert_eq!(rt.block_on(h.submit(batch())), ok(3, 2));
            assert_eq!(rt.block_on(h.submit(batch())), ok(0, 5));
            let r = store.get_run(&key("r")).unwrap().unwrap();
            assert_eq!((r.counts.get("ok"), r.signal_count), (Some(&15.0), 4));
            let q = store.get_run(&key("q")).unwrap().unwrap();
            assert_eq!((q.counts.get("ok"), q.signal_count), (Some(&16.0), 1));
            sd.store(true, Ordering::SeqCst);
            drop(h);
            j.join().unwrap();
        }
    }

    #[test]
    fn duplicates_of_a_merged_trace_run_are_recognised_after_the_merge_and_a_restart() {
        for t0 in [OLD, crate::now_ns()] {
            let sig = |id: u128, run: Option<&str>, trace: &str, n: f64| sig_at(t0, id, run, trace, n);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let store = Arc::new(MemStore::default());
            let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
            let (h, sd, j) = start(store.clone());
            // Children first (trace-keyed run), then the named root merges it; then every signal again.
            assert_eq!(
                rt.block_on(h.submit(vec![sig(10, None, trace, 1.0), sig(11, None, trace, 1.0)])).unwrap().stored,
                2
            );
            store.fail.store(true, Ordering::SeqCst);
            assert!(rt
                .block_on(h.submit(vec![sig(12, Some("named"), trace, 1.0), sig(13, None, trace, 1.0)]))
                .is_err());
            store.fail.store(false, Ordering::SeqCst);
            let o = rt.block_on(h.submit(vec![
                sig(12, Some("named"), trace, 1.0),
                sig(13, None, trace, 1.0),
                sig(10, None, trace, 1.0),
            ]));
            assert_eq!(o, Ok(Outcome { stored: 2, duplicates: 1 }));
            let all =
                || (10..14).map(|i| sig(i, if i == 12 { Some("named") } else { None }, trace, 1.0)).collect::<Vec<_>>();
            assert_eq!(rt.block_on(h.submit(all())), Ok(Outcome { stored: 0, duplicates: 4 }));
            sd.store(true, Ordering::SeqCst);
            drop(h);
            j.join().unwrap();
            let r = store.get_run(&key("named")).unwrap().unwrap();
            assert_eq!((r.counts.get("ok"), r.signal_count), (Some(&4.0), 4));
            // After a restart the set comes from storage.
            let (h, sd, j) = start(store.clone());
            assert_eq!(rt.block_on(h.submit(all())), Ok(Outcome { stored: 0, duplicates: 4 }));
            sd.store(true, Ordering::SeqCst);
            drop(h);
            j.join().unwrap();
        }
    }

    #[test]
    fn the_deduplication_time_is_the_time_storage_keeps() {
        // The tracker computes it before the record exists; the two must not drift apart.
        let mut s = sig_at(OLD, 7, Some("r"), "", 1.0);
        for (start, end, facts) in [(10, 20, true), (30, 20, true), (10, 20, false), (30, 20, false)] {
            (s.start_ns, s.time_ns) = (start, end);
            if !facts {
                s.facts.clear();
            }
            assert_eq!(signal_time(&s), SignalRecord::from_signal(&s, "r").first_time_ns(), "{start} {end} {facts}");
        }
    }

    #[test]
    fn ids_that_leave_the_window_are_still_recognised_through_storage() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = Arc::new(MemStore::default());
        let metrics = Arc::new(SelfMetrics::default());
        let pipeline = PipelineConfig {
            dedup_window: Duration::from_millis(200),
            tick: Duration::from_millis(5),
            ..Default::default()
        };
        let (h, sd, j) = start_with(store.clone(), pipeline, metrics.clone());
        let batch = |t0: i64| (1..=3).map(|id| sig_at(t0, id, Some("r"), "", 1.0)).collect::<Vec<_>>();
        let t0 = crate::now_ns();
        assert_eq!(rt.block_on(h.submit(batch(t0))), Ok(Outcome { stored: 3, duplicates: 0 }));
        assert_eq!(rt.block_on(h.submit(batch(t0))), Ok(Outcome { stored: 0, duplicates: 3 }), "found in memory");
        assert_eq!(store.old_reads.load(Ordering::SeqCst), 0, "signals within the window never ask storage");
        // The tracker forgets the ids once the window has passed ...
        let wait_for = |want: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while metrics.dedup_ids.load(Ordering::Relaxed) != want {
                assert!(Instant::now() < deadline, "dedup_ids never became {want}");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        wait_for(3);
        wait_for(0);
        // ... and still recognises them, from storage.
        assert_eq!(rt.block_on(h.submit(batch(t0))), Ok(Outcome { stored: 0, duplicates: 3 }), "found in storage");
        assert_eq!(store.old_reads.load(Ordering::SeqCst), 1, "one storage read for the run, not one per signal");
        let r = store.get_run(&key("r")).unwrap().unwrap();
        assert_eq!(r.signal_count, 3);
        sd.store(true, Ordering::SeqCst);
        drop(h);
        j.join().unwrap();
    }
}
