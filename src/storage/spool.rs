//! The on-disk spool (write-ahead journal): every `WriteBatch` the tracker
//! commits is appended here (length-prefixed, checksummed, fsynced) before
//! `Store::write()` returns, and a background writer applies it to the
//! database in order: ClickHouse (`clickhouse/writer.rs`) or SQLite
//! (`sqlite.rs`, in bigger transactions than one per commit). This is what
//! makes a write durable at ack time, and what keeps intake going while the
//! database is slow or unreachable. Bounded: when `max_bytes` is reached,
//! `append` refuses and the receivers answer with retryable statuses.
//!
//! Layout in the spool dir: `seg-<first seq>.log` segment files and a
//! `state.json` ledger `{id, acked, inflight}` (replaced atomically). Record:
//! `len u32 | seq u64 | at_ns i64 | xxh3 u64 of (seq, at_ns, payload) | payload`.
//! On open, each segment is read up to its first record that is short or
//! fails its checksum; the rest of that segment is cut off, logged, and
//! counted ([`Spool::discarded_bytes`], the `bizsignal.storage.journal.discarded`
//! self-metric). After a crash that is the record being appended, which was
//! never acknowledged; anywhere else it is disk corruption.

use super::record::SignalRecord;
use super::WriteBatch;
use crate::runs::run::{ProcessRun, RunStatus, Violation};
use crate::signal::{BusinessEvent, RunKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const HEADER: usize = 4 + 8 + 8 + 8;
const SEGMENT_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({0} bytes); retry later")]
    Full(u64),
    #[error("spool I/O error in {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("spool record {0} is corrupt")]
    Corrupt(u64),
}

/// One spool record: a tracker commit, its events grouped by signal
/// (`signals`, see [`super::record`]). Records with a plain `events` list
/// (older spools) decode into the same grouped form.
///
/// `R` is how the runs' states are decoded: whole [`ProcessRun`]s (replay
/// into SQLite or memory), or [`RunStateJson`] for the ClickHouse writer,
/// which only passes the state on.
#[derive(Debug, Deserialize)]
pub struct SpoolBatch<R = Arc<ProcessRun>> {
    pub written_ns: i64,
    #[serde(default)]
    events: Vec<BusinessEvent>,
    #[serde(default)]
    pub signals: Vec<SignalRecord>,
    pub runs: Vec<R>,
    pub merges: Vec<(RunKey, String)>,
    pub aliases: Vec<(String, String, String)>,
    pub process_violations: Vec<(String, Violation)>,
}

/// A run's state as journaled: its key and status read out, the JSON kept
/// as written (building a `ProcessRun` only to write it back as JSON was
/// ≈ 20 % of the ClickHouse writer's CPU).
#[derive(Debug)]
pub struct RunStateJson {
    pub process: String,
    pub run_id: String,
    pub status: RunStatus,
    pub json: Box<RawValue>,
}

impl<'de> Deserialize<'de> for RunStateJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Head {
            process: String,
            run_id: String,
            status: RunStatus,
        }
        let json = Box::<RawValue>::deserialize(d)?;
        let h: Head = serde_json::from_str(json.get()).map_err(serde::de::Error::custom)?;
        Ok(RunStateJson { process: h.process, run_id: h.run_id, status: h.status, json })
    }
}

impl<R: serde::de::DeserializeOwned> SpoolBatch<R> {
    /// Decodes a record payload (see [`SpoolBatch::encode`]).
    pub fn decode_as(payload: &[u8]) -> Result<SpoolBatch<R>, serde_json::Error> {
        let mut b: SpoolBatch<R> = serde_json::from_slice(payload)?;
        if !b.events.is_empty() {
            let old = std::mem::take(&mut b.events);
            b.signals.extend(super::record::group(&old));
        }
        Ok(b)
    }

    /// How many event rows the record holds.
    pub fn event_count(&self) -> usize {
        self.signals.iter().map(|s| s.rows.len()).sum()
    }
}

impl SpoolBatch {
    /// The record payload for a batch (JSON; see docs/storage.md).
    pub fn encode(b: &WriteBatch) -> Vec<u8> {
        let mut buf = Vec::new();
        Self::encode_into(b, &mut buf);
        buf
    }

    /// Like [`encode`](Self::encode), into a reused buffer (the journal
    /// writes one record per tracker commit; a fresh buffer per commit was
    /// a large allocation and its page faults every time).
    pub fn encode_into(b: &WriteBatch, buf: &mut Vec<u8>) {
        Self::encode_parts(b, buf, |buf| json(buf, &b.runs))
    }

    /// Like [`encode_into`](Self::encode_into) with each run's state JSON
    /// given (`states[i]` is `b.runs[i]` serialized), so a store that keeps
    /// the state JSON serializes each run once.
    pub fn encode_with_states(b: &WriteBatch, states: &[String], buf: &mut Vec<u8>) {
        debug_assert_eq!(states.len(), b.runs.len());
        Self::encode_parts(b, buf, |buf| {
            buf.push(b'[');
            for (i, state) in states.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(state.as_bytes());
            }
            buf.push(b']');
        })
    }

    /// The record with the `runs` array written by `runs`.
    fn encode_parts(b: &WriteBatch, buf: &mut Vec<u8>, runs: impl FnOnce(&mut Vec<u8>)) {
        buf.clear();
        // By hand around the signals: each embeds its JSON fields as they
        // are (`SignalRecord::write_json`); the rest through serde.
        buf.extend_from_slice(b"{\"written_ns\":");
        json(buf, &crate::now_ns());
        buf.extend_from_slice(b",\"signals\":[");
        for (i, s) in b.signals.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            s.write_json(buf);
        }
        buf.extend_from_slice(b"],\"runs\":");
        runs(buf);
        buf.extend_from_slice(b",\"merges\":");
        json(buf, &b.merges);
        buf.extend_from_slice(b",\"aliases\":");
        json(buf, &b.aliases);
        buf.extend_from_slice(b",\"process_violations\":");
        json(buf, &b.process_violations);
        buf.push(b'}');
    }

    pub fn decode(payload: &[u8]) -> Result<SpoolBatch, serde_json::Error> {
        Self::decode_as(payload)
    }

    /// The rows of the record's signals as events, in order.
    pub fn events(&self) -> impl Iterator<Item = BusinessEvent> + '_ {
        self.signals.iter().flat_map(|s| s.expand())
    }

    pub fn into_write_batch(self) -> WriteBatch {
        WriteBatch {
            signals: self.signals,
            runs: self.runs,
            merges: self.merges,
            aliases: self.aliases,
            process_violations: self.process_violations,
        }
    }
}

/// Appends a value's JSON.
fn json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(&mut *buf, v).expect("a write batch serializes");
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.display().to_string(), source }
}

/// The ledger: what ClickHouse has acknowledged, and the group being sent.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Ledger {
    /// Identifies this spool in deduplication tokens (unique per data dir).
    pub id: String,
    /// Every record with `seq <= acked` is in ClickHouse.
    pub acked: u64,
    /// The record range being inserted; after a crash it is re-sent as the
    /// same group with the same tokens, so ClickHouse drops the repeat.
    pub inflight: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    seq: u64,
    at_ns: i64,
    segment: u64,
    offset: u64,
    len: u32,
}

struct Inner {
    ledger: Ledger,
    records: VecDeque<Meta>,
    bytes: u64,
    next_seq: u64,
    /// Current segment (its first seq) and open file.
    current: Option<(u64, File, u64)>,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes cut off segment tails when this spool was opened.
    discarded: u64,
    inner: Mutex<Inner>,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

fn checksum(seq: u64, at_ns: i64, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&seq.to_le_bytes());
    h.update(&at_ns.to_le_bytes());
    h.update(payload);
    h.digest()
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ledger_path = dir.join("state.json");
        let ledger: Ledger = match std::fs::read(&ledger_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|_| SpoolError::Corrupt(0))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = format!(
                    "{:016x}",
                    xxhash_rust::xxh3::xxh3_64(
                        format!("{}:{}:{}", dir.display(), crate::now_ns(), std::process::id()).as_bytes()
                    )
                );
                Ledger { id, acked: 0, inflight: None }
            }
            Err(e) => return Err(io(&ledger_path)(e)),
        };
        let mut segs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok())
            .collect();
        segs.sort();
        let mut records = VecDeque::new();
        let mut bytes = 0;
        let mut next_seq = ledger.acked + 1;
        let mut discarded = 0u64;
        for first in segs {
            let path = seg_path(dir, first);
            let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
            let mut data = Vec::new();
            f.read_to_end(&mut data).map_err(io(&path))?;
            let mut off = 0usize;
            while off + HEADER <= data.len() {
                let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                let seq = u64::from_le_bytes(data[off + 4..off + 12].try_into().unwrap());
                let at_ns = i64::from_le_bytes(data[off + 12..off + 20].try_into().unwrap());
                let sum = u64::from_le_bytes(data[off + 20..off + 28].try_into().unwrap());
                if off + HEADER + len > data.len()
                    || checksum(seq, at_ns, &data[off + HEADER..off + HEADER + len]) != sum
                {
                    break;
                }
                if seq > ledger.acked {
                    records.push_back(Meta { seq, at_ns, segment: first, offset: off as u64, len: len as u32 });
                    bytes += (HEADER + len) as u64;
                }
                next_seq = next_seq.max(seq + 1);
                off += HEADER + len;
            }
            if off < data.len() {
                discarded += (data.len() - off) as u64;
                tracing::warn!(
                    segment = %path.display(),
                    at = off,
                    bytes = data.len() - off,
                    "cutting a torn or corrupt record off a spool segment"
                );
                f.set_len(off as u64).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
            }
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            discarded,
            inner: Mutex::new(Inner { ledger, records, bytes, next_seq, current: None }),
        };
        {
            let inner = spool.inner.lock().unwrap();
            spool.save_ledger(&inner.ledger)?;
        }
        spool.remove_acked_segments()?;
        Ok(spool)
    }

    pub fn ledger(&self) -> Ledger {
        self.lock().ledger.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save_ledger(&self, l: &Ledger) -> Result<(), SpoolError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&serde_json::to_vec(l).expect("ledger serializes")).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    /// Appends one record durably; returns its sequence number.
    pub fn append(&self, payload: &[u8]) -> Result<u64, SpoolError> {
        let mut inner = self.lock();
        let size = (HEADER + payload.len()) as u64;
        if inner.bytes + size > self.max_bytes && !inner.records.is_empty() {
            return Err(SpoolError::Full(inner.bytes));
        }
        let seq = inner.next_seq;
        let at_ns = crate::now_ns();
        let roll = inner.current.as_ref().is_none_or(|(_, _, len)| *len >= SEGMENT_BYTES);
        if roll {
            let path = seg_path(&self.dir, seq);
            let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            inner.current = Some((seq, f, 0));
        }
        let (segment, file, len) = inner.current.as_mut().expect("opened above");
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        header[12..20].copy_from_slice(&at_ns.to_le_bytes());
        header[20..].copy_from_slice(&checksum(seq, at_ns, payload).to_le_bytes());
        let path = seg_path(&self.dir, *segment);
        let offset = *len;
        // Header and payload as two writes (no copy of the payload); a tear
        // between them is a torn record like any other, cut off on start-up.
        let res = file.write_all(&header).and_then(|_| file.write_all(payload)).and_then(|_| file.sync_data());
        if let Err(e) = res {
            // Cut back to the last whole record and start a fresh segment next time.
            let _ = file.set_len(offset);
            inner.current = None;
            return Err(io(&path)(e));
        }
        *len += size;
        let meta = Meta { seq, at_ns, segment: *segment, offset, len: payload.len() as u32 };
        inner.records.push_back(meta);
        inner.bytes += size;
        inner.next_seq += 1;
        Ok(seq)
    }

    /// Up to `max` unacknowledged records after `after`, oldest first.
    pub fn read(&self, after: u64, max: usize) -> Result<Vec<(u64, i64, Vec<u8>)>, SpoolError> {
        let mut out = Vec::new();
        self.read_each(after, max, &mut Vec::new(), |seq, at_ns, payload| {
            out.push((seq, at_ns, payload.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// [`read`](Self::read), handing each record to `each` from `buf`, which
    /// is reused: records run to hundreds of KB, and a fresh buffer per
    /// record (zeroed, or faulted in page by page) was ≈ 15 % of the
    /// ClickHouse writer's CPU. Stops early when `each` returns `false`.
    /// Returns how many records there were to read.
    pub fn read_each(
        &self,
        after: u64,
        max: usize,
        buf: &mut Vec<u8>,
        mut each: impl FnMut(u64, i64, &[u8]) -> bool,
    ) -> Result<usize, SpoolError> {
        let metas: Vec<Meta> = self.lock().records.iter().filter(|m| m.seq > after).take(max).copied().collect();
        let mut open: Option<(u64, File)> = None;
        for m in &metas {
            if open.as_ref().is_none_or(|(s, _)| *s != m.segment) {
                let path = seg_path(&self.dir, m.segment);
                open = Some((m.segment, File::open(&path).map_err(io(&path))?));
            }
            let (_, f) = open.as_mut().unwrap();
            let path = seg_path(&self.dir, m.segment);
            let mut header = [0u8; HEADER];
            buf.clear();
            buf.reserve(m.len as usize);
            f.seek(SeekFrom::Start(m.offset))
                .and_then(|_| f.read_exact(&mut header))
                .and_then(|_| Read::by_ref(f).take(u64::from(m.len)).read_to_end(buf))
                .map_err(io(&path))?;
            let sum = u64::from_le_bytes(header[20..28].try_into().expect("8 bytes"));
            if buf.len() != m.len as usize || checksum(m.seq, m.at_ns, buf) != sum {
                return Err(SpoolError::Corrupt(m.seq));
            }
            if !each(m.seq, m.at_ns, buf) {
                break;
            }
        }
        Ok(metas.len())
    }

    pub fn set_inflight(&self, range: Option<(u64, u64)>) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        inner.ledger.inflight = range;
        let l = inner.ledger.clone();
        drop(inner);
        self.save_ledger(&l)
    }

    /// Everything up to `seq` is in ClickHouse: forget it and free its segments.
    pub fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        inner.ledger.acked = inner.ledger.acked.max(seq);
        // The database may know of records this spool lost (a deleted spool
        // dir): never hand out a sequence number it already applied.
        inner.next_seq = inner.next_seq.max(seq + 1);
        inner.ledger.inflight = None;
        while inner.records.front().is_some_and(|m| m.seq <= seq) {
            let m = inner.records.pop_front().unwrap();
            inner.bytes -= HEADER as u64 + m.len as u64;
        }
        if inner.records.is_empty() && inner.current.as_ref().is_some_and(|c| c.2 > 0) {
            // Drained: start the next append in a fresh segment so this one
            // is deleted now, instead of growing to SEGMENT_BYTES first.
            inner.current = None;
        }
        let l = inner.ledger.clone();
        drop(inner);
        self.save_ledger(&l)?;
        self.remove_acked_segments()
    }

    fn remove_acked_segments(&self) -> Result<(), SpoolError> {
        let inner = self.lock();
        let oldest_needed = inner.records.front().map(|m| m.segment);
        let current = inner.current.as_ref().map(|c| c.0);
        let mut segs: Vec<u64> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok())
            .collect();
        segs.sort();
        for s in segs {
            let needed = oldest_needed.is_some_and(|o| s >= o);
            if !needed && Some(s) != current {
                let p = seg_path(&self.dir, s);
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        Ok(())
    }

    /// Bytes cut off segment tails when this spool was opened.
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append time of the oldest unacknowledged record.
    pub fn oldest_at_ns(&self) -> Option<i64> {
        self.lock().records.front().map(|m| m.at_ns)
    }

    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_decode_whole_or_as_the_json_written() {
        let key = RunKey { process: "import".into(), run_id: "r\"1".into() };
        let mut run = ProcessRun::new(&key, 5);
        run.status = RunStatus::Stalled;
        run.signal_count = 3;
        let b = WriteBatch { runs: vec![Arc::new(run.clone())], ..Default::default() };
        let payload = SpoolBatch::encode(&b);
        let whole = SpoolBatch::decode(&payload).unwrap();
        assert_eq!(*whole.runs[0], run);
        let raw = SpoolBatch::<RunStateJson>::decode_as(&payload).unwrap();
        let r = &raw.runs[0];
        assert_eq!((r.process.as_str(), r.run_id.as_str(), r.status), ("import", "r\"1", RunStatus::Stalled));
        assert_eq!(r.json.get(), serde_json::to_string(&run).unwrap(), "the state as the writer used to re-make it");
        // The SQLite store journals the state JSON it already made.
        let mut other = ProcessRun::new(&RunKey { process: "import".into(), run_id: "r2".into() }, 6);
        other.signal_count = 9;
        let b = WriteBatch { runs: vec![Arc::new(run.clone()), Arc::new(other.clone())], ..Default::default() };
        let states: Vec<String> = b.runs.iter().map(|r| serde_json::to_string(&**r).unwrap()).collect();
        let mut buf = Vec::new();
        SpoolBatch::encode_with_states(&b, &states, &mut buf);
        let decoded = SpoolBatch::decode(&buf).unwrap();
        assert_eq!(decoded.runs.iter().map(|r| (**r).clone()).collect::<Vec<_>>(), vec![run.clone(), other]);
        assert!(
            SpoolBatch::<RunStateJson>::decode_as(
                br#"{"written_ns":1,"runs":[{"process":"p"}],"merges":[],"aliases":[],"process_violations":[]}"#
            )
            .is_err(),
            "a state without its key is an undecodable record"
        );
    }

    #[test]
    fn read_each_reuses_one_buffer_and_stops_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            spool.append(&vec![i; 1000 + i as usize]).unwrap();
        }
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        let n = spool
            .read_each(1, 10, &mut buf, |seq, _, payload| {
                seen.push((seq, payload.len(), payload[0]));
                seq < 4
            })
            .unwrap();
        assert_eq!(n, 4, "records after seq 1");
        assert_eq!(seen, [(2, 1001, 1), (3, 1002, 2), (4, 1003, 3)], "stopped after the callback said so");
        assert!(buf.capacity() >= 1003);
        assert_eq!(spool.read(0, 2).unwrap().iter().map(|r| r.2.len()).collect::<Vec<_>>(), [1000, 1001]);
    }

    #[test]
    fn append_read_ack_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            assert_eq!(s.append(&[i; 10]).unwrap(), i as u64 + 1);
        }
        s.ack(2).unwrap();
        let got = s.read(0, 10).unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4, 5]);
        drop(s);
        // A torn tail: half a record.
        let seg = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.discarded_bytes(), 6);
        assert_eq!(s.append(b"x").unwrap(), 6);
        assert_eq!(s.read(5, 10).unwrap()[0].2, b"x");
        s.ack(6).unwrap();
        assert!(s.is_empty());
        let full = Spool::open(&dir.path().join("small"), 100).unwrap();
        full.append(&[0; 60]).unwrap();
        assert!(matches!(full.append(&[0; 60]), Err(SpoolError::Full(_))));
    }
}
