//! The background writer: drains the spool into ClickHouse in order.
//!
//! Records are grouped by rows and time (`batch_max_rows`, `batch_max_wait`).
//! A group's record range is written to the spool ledger before it is sent,
//! and every insert of the group carries `insert_deduplication_token =
//! <spool id>:<first>-<last>:<table>`, so a retry, or a replay after a crash,
//! of the same group is dropped by ClickHouse instead of duplicating rows
//! (and, because the source block is dropped, the materialized views do not
//! see it twice either). Transient failures retry with exponential backoff
//! and jitter; permanent ones (schema or type errors) move the group to the
//! dead-letter file with the reason, so nothing is retried forever.

use super::schema::{
    AliasRow, EventRow, ResourcePairs, RunStateRow, ViolationRow, ALIASES, EVENTS, PROCESS_VIOLATIONS, RUN_STATE,
};
use super::StoreShared;
use crate::storage::spool::{RunStateJson, SpoolBatch};
use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Whether an error may go away by itself.
#[derive(Debug, PartialEq)]
pub enum Failure {
    Transient(String),
    Permanent(String),
}

/// ClickHouse error codes that mean "this data or this schema is wrong":
/// retrying cannot help.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    130, // CANNOT_READ_ARRAY_FROM_TEXT
];

/// The `Code: N.` of a ClickHouse error text.
pub fn error_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    rest[..rest.find('.')?].parse().ok()
}

pub fn classify(e: &clickhouse::error::Error) -> Failure {
    use clickhouse::error::Error as E;
    let text = e.to_string();
    match e {
        E::Network(_) | E::TimedOut => Failure::Transient(text),
        // Client-side validation against the table's columns: the schema differs.
        E::SchemaMismatch(_) | E::DataFormat(_) | E::Custom(_) | E::InvalidColumnsHeader(_) => Failure::Permanent(text),
        E::BadResponse(body) => match error_code(body) {
            Some(c) if PERMANENT_CODES.contains(&c) => Failure::Permanent(text),
            // Everything else (TOO_MANY_PARTS, timeouts, memory, Keeper,
            // 5xx without a code, authentication during a password rotation)
            // is retried: the spool holds the data meanwhile.
            _ => Failure::Transient(text),
        },
        _ => Failure::Transient(text),
    }
}

/// Exponential backoff with ±50% jitter.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(max);
    let jitter = (xxhash_rust::xxh3::xxh3_64(&crate::now_ns().to_le_bytes()) % 1000) as f64 / 1000.0;
    base.mul_f64(0.5 + jitter)
}

/// One group of spool records, decoded.
struct Group {
    first: u64,
    last: u64,
    batches: Vec<(i64, SpoolBatch<RunStateJson>)>,
}

pub async fn run(shared: Arc<StoreShared>) {
    let mut attempt = 0u32;
    // Spool records are read into this one buffer (see `Spool::read_each`).
    let mut buf = Vec::new();
    loop {
        // On stop, what is still spooled stays on disk and is replayed at the next start.
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let group = match next_group(&shared, &mut buf).await {
            Ok(Some(g)) => g,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the ClickHouse spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match deliver(&shared, &group).await {
            Ok(()) => {
                attempt = 0;
                finish(&shared, &group);
            }
            Err(Failure::Permanent(reason)) => {
                attempt = 0;
                tracing::error!(%reason, first = group.first, last = group.last, "ClickHouse refused a batch permanently; moved to the dead-letter file");
                dead_letter(&shared, &group, &reason);
                shared.metrics.clickhouse.dead_lettered.fetch_add(group.batches.len() as u64, Ordering::Relaxed);
                finish(&shared, &group);
            }
            Err(Failure::Transient(reason)) => {
                shared.metrics.clickhouse.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(attempt, shared.cfg.max_backoff);
                attempt = attempt.saturating_add(1);
                tracing::warn!(%reason, attempt, wait_ms = wait.as_millis() as u64, "ClickHouse insert failed; will retry");
                *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.stopped.notified() => {}
                }
            }
        }
    }
}

fn finish(shared: &StoreShared, g: &Group) {
    if let Err(e) = shared.spool.ack(g.last) {
        tracing::error!(error = %e, "cannot record ClickHouse progress in the spool ledger");
    }
    let rows: usize = g.batches.iter().map(|(_, b)| b.event_count()).sum();
    shared.metrics.clickhouse.replayed_rows.fetch_add(rows as u64, Ordering::Relaxed);
    shared.forget_pending(g.last);
    *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.drained.notify_waiters();
}

/// Waits for records and cuts the next group (or re-sends the in-flight one).
///
/// Records are read and decoded a few at a time until the group has
/// `batch_max_rows` rows, and the group is built from what was read: a
/// backlog in the spool is never read whole to cut one group, and no record
/// is read or decoded twice.
async fn next_group(shared: &StoreShared, buf: &mut Vec<u8>) -> Result<Option<Group>, String> {
    let ledger = shared.spool.ledger();
    if let Some((first, last)) = ledger.inflight {
        let mut batches = Vec::new();
        shared
            .spool
            .read_each(first - 1, (last - first + 1) as usize, buf, |seq, _, payload| {
                if seq <= last {
                    decode_into(shared, &mut batches, seq, payload);
                }
                seq < last
            })
            .map_err(|e| e.to_string())?;
        return Ok(Some(Group { first, last, batches }));
    }
    let Some(oldest) = shared.spool.oldest_at_ns() else {
        tokio::select! {
            _ = shared.appended.notified() => {}
            _ = shared.stopped.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        return Ok(None);
    };
    // Cut by rows; wait for more until the oldest record is `batch_max_wait` old.
    const CHUNK: usize = 16;
    let mut recs = Vec::new();
    let mut rows = 0usize;
    let mut last = ledger.acked;
    loop {
        // Decoded one at a time, stopping where the group is full: what
        // lies past the cut is read and decoded for the next group only.
        let n = shared
            .spool
            .read_each(last, CHUNK, buf, |seq, _, payload| {
                let decoded = SpoolBatch::decode_as(payload);
                rows += decoded.as_ref().map(|b| b.event_count().max(1)).unwrap_or(1);
                last = seq;
                recs.push((seq, decoded));
                rows < shared.cfg.batch_max_rows
            })
            .map_err(|e| e.to_string())?;
        if n < CHUNK || rows >= shared.cfg.batch_max_rows {
            break;
        }
    }
    if recs.is_empty() {
        return Ok(None);
    }
    let age = Duration::from_nanos((crate::now_ns() - oldest).max(0) as u64);
    let flush = shared.flush_requested.load(Ordering::Acquire) || shared.stop.load(Ordering::Acquire);
    if rows < shared.cfg.batch_max_rows && age < shared.cfg.batch_max_wait && !flush {
        let wait = shared.cfg.batch_max_wait - age;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.flush_kick.notified() => {}
            _ = shared.stopped.notified() => {}
        }
        return Ok(None);
    }
    let first = ledger.acked + 1;
    shared.spool.set_inflight(Some((first, last))).map_err(|e| e.to_string())?;
    // Only now, with the group cut: an undecodable record goes to the
    // dead-letter file once, not at every look at a group still filling.
    let mut batches = Vec::with_capacity(recs.len());
    for (seq, decoded) in recs {
        match decoded {
            Ok(b) => batches.push((seq as i64, b)),
            Err(e) => undecodable(shared, seq, &e),
        }
    }
    Ok(Some(Group { first, last, batches }))
}

fn decode_into(shared: &StoreShared, batches: &mut Vec<(i64, SpoolBatch<RunStateJson>)>, seq: u64, payload: &[u8]) {
    match SpoolBatch::decode_as(payload) {
        Ok(b) => batches.push((seq as i64, b)),
        Err(e) => undecodable(shared, seq, &e),
    }
}

/// A record that does not decode cannot be delivered: it goes to the
/// dead-letter file (re-read from the spool, which still holds it).
fn undecodable(shared: &StoreShared, seq: u64, e: &serde_json::Error) {
    tracing::error!(seq, error = %e, "undecodable spool record; moved to the dead-letter file");
    let reason = format!("undecodable spool record {seq}: {e}");
    let res = shared.spool.read_each(seq - 1, 1, &mut Vec::new(), |_, _, raw| {
        dead_letter_raw(shared, raw, &reason);
        false
    });
    if let Err(e) = res {
        tracing::error!(seq, error = %e, "cannot re-read an undecodable spool record for the dead-letter file");
    }
}

async fn deliver(shared: &StoreShared, g: &Group) -> Result<(), Failure> {
    let token = |table: &str, part: usize| format!("{}:{}-{}:{table}:{part}", shared.spool_id, g.first, g.last);
    let mut events = Vec::with_capacity(g.batches.iter().map(|(_, b)| b.event_count()).sum());
    let mut resources = ResourcePairs::default();
    for s in g.batches.iter().flat_map(|(_, b)| &b.signals) {
        EventRow::extend_from_signal(&mut events, s, &mut resources);
    }
    let events = without_stored(shared, events).await?;
    insert(shared, EVENTS, &events, &token(EVENTS, 0)).await?;
    if !events.is_empty() {
        shared.metrics.clickhouse.event_inserts.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(rows = events.len(), records = g.batches.len(), "ClickHouse business_events insert");
    }
    let aliases: Vec<AliasRow> = g
        .batches
        .iter()
        .flat_map(|(_, b)| {
            b.aliases.iter().map(move |(p, t, r)| AliasRow {
                process: p.clone(),
                trace_id: t.clone(),
                run_id: r.clone(),
                created_ns: b.written_ns,
            })
        })
        .collect();
    insert(shared, ALIASES, &aliases, &token(ALIASES, 0)).await?;
    let violations: Vec<ViolationRow> = g
        .batches
        .iter()
        .flat_map(|(_, b)| {
            b.process_violations.iter().map(|(p, v)| ViolationRow {
                process: p.clone(),
                run_id: String::new(),
                rule: v.rule.clone(),
                message: v.message.clone(),
                at: v.at_ns,
            })
        })
        .collect();
    insert(shared, PROCESS_VIOLATIONS, &violations, &token(PROCESS_VIOLATIONS, 0)).await?;
    // Merged trace-keyed runs: re-insert their stored events under the named
    // run id (ClickHouse is append-only) and tombstone the old run in run_state.
    let mut part = 0;
    let mut states: HashMap<(String, String), RunStateRow> = HashMap::new();
    for (_, b) in &g.batches {
        for (from, to) in &b.merges {
            part += 1;
            let moved: Vec<EventRow> = shared
                .client
                .query("SELECT ?fields FROM business_events WHERE process = ? AND run_id = ? ORDER BY time, event_id LIMIT 1 BY event_id")
                .bind(&from.process)
                .bind(&from.run_id)
                .fetch_all::<EventRow>()
                .await
                .map_err(|e| classify(&e))?
                .into_iter()
                .map(|mut e| {
                    e.run_id = to.as_str().into();
                    e
                })
                .collect();
            let moved = without_stored(shared, moved).await?;
            insert(shared, EVENTS, &moved, &token("merge", part)).await?;
            let tomb = RunStateRow {
                process: from.process.clone(),
                run_id: from.run_id.clone(),
                status: "merged".into(),
                state: String::new(),
                version: b.written_ns as u64,
                deleted: 1,
            };
            states.insert((from.process.clone(), from.run_id.clone()), tomb);
        }
        for r in &b.runs {
            let key = (r.process.clone(), r.run_id.clone());
            let version = b.written_ns as u64;
            if states.get(&key).is_none_or(|cur| cur.version <= version) {
                let row = RunStateRow {
                    process: r.process.clone(),
                    run_id: r.run_id.clone(),
                    status: r.status.as_str().into(),
                    // As journaled: a copy, not a parse and re-serialization.
                    state: r.json.get().to_string(),
                    version,
                    deleted: 0,
                };
                states.insert(key, row);
            }
        }
    }
    let mut states: Vec<RunStateRow> = states.into_values().collect();
    states.sort_by(|a, b| (&a.process, &a.run_id).cmp(&(&b.process, &b.run_id)));
    insert(shared, RUN_STATE, &states, &token(RUN_STATE, 0)).await?;
    Ok(())
}

/// Drops events already stored under the same run (a re-sent signal, or the
/// same signal written by another instance), so the per-run aggregates that
/// the materialized views sum are not counted twice. Deterministic event ids
/// make this a lookup; a retried group additionally carries the same
/// deduplication token.
async fn without_stored(shared: &StoreShared, mut events: Vec<EventRow>) -> Result<Vec<EventRow>, Failure> {
    let mut seen = HashSet::new();
    events.retain(|e| seen.insert(event_key(&e.process, &e.run_id, &e.event_id)));
    let mut stored = HashSet::new();
    // Chunks keep the query text (values are inlined by the client) under
    // max_query_size. Asked by signal id (a signal's rows are always in one
    // group): a fifth of the ids to send and escape, the same answer.
    for chunk in events.chunks(2000) {
        let processes: HashSet<&str> = chunk.iter().map(|e| &*e.process).collect();
        let runs: HashSet<&str> = chunk.iter().map(|e| &*e.run_id).collect();
        let signals: HashSet<&str> = chunk.iter().map(|e| &*e.signal_id).collect();
        let rows: Vec<(String, String, String)> = shared
            .client
            .query("SELECT DISTINCT toString(process), run_id, event_id FROM business_events WHERE process IN ? AND run_id IN ? AND signal_id IN ?")
            .bind(processes.into_iter().collect::<Vec<_>>())
            .bind(runs.into_iter().collect::<Vec<_>>())
            .bind(signals.into_iter().collect::<Vec<_>>())
            .fetch_all()
            .await
            .map_err(|e| classify(&e))?;
        stored.extend(rows.iter().map(|(p, r, e)| event_key(p, r, e)));
    }
    events.retain(|e| !stored.contains(&event_key(&e.process, &e.run_id, &e.event_id)));
    Ok(events)
}

/// A row's identity (process, run, event id) as a 128-bit hash: set
/// membership without copying three strings per row.
fn event_key(process: &str, run_id: &str, event_id: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [process, run_id, event_id] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.digest128()
}

async fn insert<T>(shared: &StoreShared, table: &str, rows: &[T], token: &str) -> Result<(), Failure>
where
    T: clickhouse::RowOwned + clickhouse::RowWrite,
{
    if rows.is_empty() {
        return Ok(());
    }
    let timeout = Some(shared.cfg.request_timeout);
    let mut ins = shared
        .client
        .insert::<T>(table)
        .await
        .map_err(|e| classify(&e))?
        .with_timeouts(timeout, timeout)
        .with_setting("insert_deduplicate", "1")
        .with_setting("insert_deduplication_token", token)
        .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1");
    ins = if shared.cfg.async_insert {
        ins.with_setting("async_insert", "1")
            .with_setting("wait_for_async_insert", "1")
            .with_setting("async_insert_deduplicate", "1")
    } else {
        ins.with_setting("async_insert", "0")
    };
    for r in rows {
        ins.write(r).await.map_err(|e| classify(&e))?;
    }
    ins.end().await.map_err(|e| classify(&e))
}

/// The group's records, as spooled, to the dead-letter file (re-read: the
/// spool keeps them until the group is finished).
fn dead_letter(shared: &StoreShared, g: &Group, reason: &str) {
    let res = shared.spool.read_each(g.first - 1, (g.last + 1 - g.first) as usize, &mut Vec::new(), |seq, _, raw| {
        if seq <= g.last {
            dead_letter_raw(shared, raw, reason)
        }
        seq < g.last
    });
    if let Err(e) = res {
        tracing::error!(error = %e, first = g.first, last = g.last, "cannot re-read a group for the dead-letter file");
    }
}

fn dead_letter_raw(shared: &StoreShared, raw: &[u8], reason: &str) {
    let line = serde_json::json!({
        "at_ns": crate::now_ns(),
        "reason": reason,
        "batch": serde_json::from_slice::<serde_json::Value>(raw).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(raw).into())),
    });
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&shared.dead_letter_path)
        .and_then(|mut f| writeln!(f, "{line}").and_then(|_| f.sync_data()));
    if let Err(e) = res {
        tracing::error!(error = %e, path = %shared.dead_letter_path.display(), "cannot write the dead-letter file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_backoff() {
        assert_eq!(error_code("Code: 252. DB::Exception: Too many parts"), Some(252));
        let perm =
            clickhouse::error::Error::BadResponse("Code: 53. DB::Exception: Type mismatch. (TYPE_MISMATCH)".into());
        assert!(matches!(classify(&perm), Failure::Permanent(_)));
        let parts =
            clickhouse::error::Error::BadResponse("Code: 252. DB::Exception: Too many parts. (TOO_MANY_PARTS)".into());
        assert!(matches!(classify(&parts), Failure::Transient(_)));
        assert!(matches!(classify(&clickhouse::error::Error::TimedOut), Failure::Transient(_)));
        let max = Duration::from_secs(5);
        for a in 0..40 {
            let b = backoff(a, max);
            assert!(b <= max.mul_f64(1.5) && b >= Duration::from_millis(50), "{b:?}");
        }
    }
}
