//! ClickHouse writer throughput, rows per insert and CPU per row (issue #7).
//!
//! ```text
//! cargo bench --bench clickhouse_writer -- [--endpoint sink|chdb|URL] [--rate SIGNALS_PER_S (0 = max)]
//!                                          [--duration SECS] [--batch SIGNALS_PER_WRITE]
//! ```
//!
//! A producer thread writes `WriteBatch`es of realistic business events
//! (loadgen sample spans classified as business, `Signal::to_events`, ~5 rows
//! per signal, plus the touched runs' states, as the tracker commits them)
//! into a `ClickHouseStore` for `--duration` seconds, paced at `--rate`
//! signals/s (0: as fast as it can), then `Store::flush` waits until the
//! spool is drained. The store (and so its writer task and HTTP client) runs
//! on its own one-worker tokio runtime whose threads are named `ch-writer`:
//! the writer's CPU is the on-CPU time of those threads
//! (`/proc/self/task/*/schedstat`), apart from the producer's (its own thread,
//! which also pays `Store::write`: spool append + fsync) and the endpoint's.
//!
//! Endpoints: `chdb` is tests/support/chdb_http.py (chDB behind a Python HTTP
//! front, as the tests use; `BIZSIGNAL_TEST_PYTHON` or `.venv-test/bin/python`);
//! `sink` (default) is an in-process HTTP server (threads `sink`) that accepts
//! and discards every INSERT, answers the writer's duplicate check with no
//! rows, and forwards everything else (migrations, `DESCRIBE TABLE`) to a chDB
//! front, so the endpoint is not the bottleneck; a URL is a real ClickHouse.
//! Rows per insert come from the writer's debug event per `business_events`
//! insert (and `bizsignal.clickhouse.inserts`/`rows_written` counters).
//!
//! Without `--bench` (i.e. under `cargo test --all-targets`) it returns at once.

use bizsignal::classify::Classifier;
use bizsignal::config::{ClickHouseConfig, Limits};
use bizsignal::loadgen::{sample_request, Signal as Kind};
use bizsignal::metrics::SelfMetrics;
use bizsignal::runs::run::ProcessRun;
use bizsignal::signal::{RunKey, Signal};
use bizsignal::storage::clickhouse::ClickHouseStore;
use bizsignal::storage::{StorageError, Store, WriteBatch};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The server's allocator (`src/alloc.rs`), so the writer's CPU per row is the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Args {
    endpoint: String,
    rate: f64,
    duration: f64,
    batch: usize,
}

fn args() -> Option<Args> {
    let v: Vec<String> = std::env::args().skip(1).collect();
    if !v.iter().any(|a| a == "--bench") {
        return None;
    }
    let get = |name: &str, default: &str| {
        v.iter().position(|a| a == name).and_then(|i| v.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    Some(Args {
        endpoint: get("--endpoint", "sink"),
        rate: get("--rate", "0").parse().expect("--rate"),
        duration: get("--duration", "10").parse().expect("--duration"),
        batch: get("--batch", "500").parse().expect("--batch"),
    })
}

// ------------------------------------------------------------------ chDB front

struct ChDb {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

fn start_chdb() -> ChDb {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = std::env::var("BIZSIGNAL_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv-test/bin/python"));
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(&py)
        .arg(root.join("tests/support/chdb_http.py"))
        .args(["--port", "0", "--data-dir"])
        .arg(dir.path().join("chdb"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} tests/support/chdb_http.py: {e}", py.display()));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the chDB front exited before listening");
        if let Some(p) = line.trim().strip_prefix("LISTENING ") {
            break p.parse::<u16>().unwrap();
        }
    };
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    ChDb { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
}

impl Drop for ChDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the sink

#[derive(Default)]
struct SinkStats {
    inserts: Mutex<HashMap<String, u64>>,
    insert_bytes: AtomicU64,
    dedup_queries: AtomicU64,
    forwarded: AtomicU64,
}

struct Sink {
    upstream: String,
    http: reqwest::Client,
    stats: Arc<SinkStats>,
}

/// RowBinaryWithNamesAndTypes header of (String, String, String) and no rows:
/// the answer to the writer's "already stored?" query.
fn empty_three_strings() -> Vec<u8> {
    let mut b = vec![3u8];
    for name in ["toString(process)", "run_id", "event_id"] {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
    }
    for _ in 0..3 {
        b.push(6);
        b.extend_from_slice(b"String");
    }
    b
}

async fn sink_handle(
    axum::extract::State(s): axum::extract::State<Arc<Sink>>,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), urlencoding_decode(v)))
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(sql) = query.get("query").filter(|q| q.trim_start().to_ascii_uppercase().starts_with("INSERT INTO")) {
        let table = sql.trim_start()[12..].split(['(', ' ']).next().unwrap_or("").to_string();
        if table != "schema_migrations" && !table.ends_with(".schema_migrations") {
            *s.stats.inserts.lock().unwrap().entry(table).or_default() += 1;
            s.stats.insert_bytes.fetch_add(body.len() as u64, Relaxed);
            return http::StatusCode::OK.into_response();
        }
    }
    if body.windows(36).any(|w| w == b"FROM business_events WHERE process I") {
        s.stats.dedup_queries.fetch_add(1, Relaxed);
        return (http::StatusCode::OK, empty_three_strings()).into_response();
    }
    s.stats.forwarded.fetch_add(1, Relaxed);
    let mut req = s.http.post(format!("{}{}", s.upstream, uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")));
    for (k, v) in headers.iter() {
        let n = k.as_str();
        if n.starts_with("x-clickhouse") || n == "content-type" || n == "user-agent" {
            req = req.header(k, v);
        }
    }
    match req.body(body).send().await {
        Ok(r) => {
            let mut out = http::Response::builder().status(r.status().as_u16());
            for (k, v) in r.headers() {
                let n = k.as_str();
                if n.starts_with("x-clickhouse") || n == "content-type" || n == "content-encoding" {
                    out = out.header(k.as_str(), v.as_bytes());
                }
            }
            let b = r.bytes().await.unwrap_or_default();
            out.body(axum::body::Body::from(b)).unwrap()
        }
        Err(e) => (http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

fn urlencoding_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts the sink on its own runtime (threads named `sink`); returns its URL.
fn start_sink(upstream: &str, stats: Arc<SinkStats>) -> (String, tokio::runtime::Runtime) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("sink").enable_all().build().unwrap();
    let sink = Arc::new(Sink { upstream: upstream.to_string(), http: reqwest::Client::new(), stats });
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // As a ClickHouse server does: no Nagle delay on its answers.
    let listener = axum::serve::ListenerExt::tap_io(listener, |s: &mut tokio::net::TcpStream| {
        let _ = s.set_nodelay(true);
    });
    let app =
        axum::Router::new().fallback(sink_handle).layer(axum::extract::DefaultBodyLimit::disable()).with_state(sink);
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rt)
}

// ------------------------------------------------------------------ rows per insert (from the writer's debug event)

static INSERT_ROWS: Mutex<Vec<(Instant, u64)>> = Mutex::new(Vec::new());

struct InsertRows;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for InsertRows {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct V(Option<u64>);
        impl tracing::field::Visit for V {
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                if f.name() == "rows" {
                    self.0 = Some(v);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut v = V(None);
        e.record(&mut v);
        if let Some(rows) = v.0 {
            INSERT_ROWS.lock().unwrap().push((Instant::now(), rows));
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            InsertRows
                .with_filter(Targets::new().with_target("bizsignal::storage::clickhouse::writer", LevelFilter::DEBUG)),
        )
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(LevelFilter::WARN))
        .init();
}

// ------------------------------------------------------------------ CPU accounting

/// On-CPU nanoseconds per thread name, from /proc/self/task/*/{comm,schedstat}.
fn thread_cpu() -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default().trim().to_string();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        *out.entry(comm).or_default() += ns;
    }
    out
}

/// user+sys CPU seconds of a process (all threads, including exited ones).
fn proc_cpu(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit_once(')').map(|r| r.1).unwrap_or("").split_whitespace().collect();
    let tick = 100.0;
    (f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
        / tick
}

// ------------------------------------------------------------------ workload

fn templates() -> Vec<Signal> {
    let cl = Classifier::new(Limits::default(), &[]).unwrap();
    let mut out = Vec::new();
    for seed in 1..=8u64 {
        let (body, _) = sample_request(Kind::Traces, 500, 1.0, seed * 7919);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        out.extend(cl.classify_traces(&req.resource_spans, bizsignal::now_ns()).signals);
    }
    assert!(!out.is_empty());
    out
}

struct Produced {
    signals: u64,
    rows: u64,
    writes: u64,
    refused: u64,
    elapsed: f64,
    cpu_ns: u64,
    write_ns: u64,
}

fn thread_cpu_self() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn produce(store: &ClickHouseStore, a: &Args, tpl: &[Signal]) -> Produced {
    let cpu0 = thread_cpu_self();
    let mut runs: HashMap<RunKey, ProcessRun> = HashMap::new();
    let mut next_id: u128 = (bizsignal::now_ns() as u128) << 40;
    let mut p = Produced { signals: 0, rows: 0, writes: 0, refused: 0, elapsed: 0.0, cpu_ns: 0, write_ns: 0 };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.duration);
    let mut i = 0usize;
    while Instant::now() < end {
        if a.rate > 0.0 {
            let due = start + Duration::from_secs_f64(p.signals as f64 / a.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let now = bizsignal::now_ns();
        let mut b = WriteBatch::default();
        let mut touched: Vec<RunKey> = Vec::new();
        for _ in 0..a.batch {
            let mut s = tpl[i % tpl.len()].clone();
            i += 1;
            s.id = next_id;
            next_id += 1;
            let key = s.run_key();
            let run = runs.entry(key.clone()).or_insert_with(|| ProcessRun::new(&key, now));
            run.apply(&s, now);
            b.signals.push(bizsignal::storage::record::SignalRecord::from_signal(&s, &key.run_id));
            touched.push(key);
        }
        touched.sort();
        touched.dedup();
        b.runs = touched.iter().map(|k| std::sync::Arc::new(runs[k].clone())).collect();
        let rows = b.signals.iter().map(|s| s.rows.len()).sum::<usize>() as u64;
        loop {
            // The copy for a retry is made outside the measured write.
            let attempt = b.clone();
            let w0 = thread_cpu_self();
            let res = store.write(attempt);
            p.write_ns += thread_cpu_self() - w0;
            match res {
                Ok(()) => break,
                Err(StorageError::Unavailable(_)) => {
                    p.refused += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("write failed: {e}"),
            }
        }
        p.signals += a.batch as u64;
        p.rows += rows;
        p.writes += 1;
    }
    p.elapsed = start.elapsed().as_secs_f64();
    p.cpu_ns = thread_cpu_self() - cpu0;
    p
}

fn main() {
    bizsignal::alloc::configure();
    let Some(a) = args() else {
        println!(
            "clickhouse_writer: run with `cargo bench --bench clickhouse_writer -- [--endpoint sink|chdb|URL] ...`"
        );
        return;
    };
    init_tracing();
    let (chdb, direct_url) = match a.endpoint.as_str() {
        "sink" | "chdb" => (Some(start_chdb()), None),
        url => (None, Some(url.to_string())),
    };
    let stats = Arc::new(SinkStats::default());
    let (url, _sink_rt) = match (a.endpoint.as_str(), &chdb) {
        ("sink", Some(c)) => {
            let (u, rt) = start_sink(&c.url, stats.clone());
            (u, Some(rt))
        }
        (_, Some(c)) => (c.url.clone(), None),
        _ => (direct_url.clone().unwrap(), None),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ch-writer")
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(SelfMetrics::default());
    let cfg = ClickHouseConfig {
        url,
        database: format!("chbench_{}", std::process::id()),
        request_timeout: Duration::from_secs(120),
        ..ClickHouseConfig::default()
    };
    let store = Arc::new(rt.block_on(ClickHouseStore::open(&cfg, dir.path(), metrics.clone())).unwrap());
    let tpl = templates();
    let rows_per_signal = tpl.iter().map(|s| s.to_events("r").len()).sum::<usize>() as f64 / tpl.len() as f64;

    // Spool sampler.
    let done = Arc::new(AtomicBool::new(false));
    let spool_max = Arc::new(AtomicU64::new(0));
    let samples: Arc<Mutex<Vec<(f64, u64, u64)>>> = Default::default();
    let sampler = {
        let (done, spool_max, samples, m) = (done.clone(), spool_max.clone(), samples.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let t0 = Instant::now();
                while !done.load(Relaxed) {
                    let b = m.clickhouse.spool_bytes.load(Relaxed);
                    spool_max.fetch_max(b, Relaxed);
                    samples.lock().unwrap().push((
                        t0.elapsed().as_secs_f64(),
                        b,
                        m.clickhouse.replayed_rows.load(Relaxed),
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .unwrap()
    };

    let cpu0 = thread_cpu();
    let pid = std::process::id().to_string();
    let chdb_pid = chdb.as_ref().map(|c| c.child.id().to_string());
    let chdb_cpu0 = chdb_pid.as_deref().map(proc_cpu).unwrap_or(0.0);
    let proc0 = proc_cpu(&pid);
    let t0 = Instant::now();
    let s2 = store.clone();
    let prod = {
        let a = a.clone();
        std::thread::Builder::new()
            .name("producer".into())
            .spawn(move || produce(&s2, &a, &tpl))
            .unwrap()
            .join()
            .unwrap()
    };
    let spool_at_end = metrics.clickhouse.spool_bytes.load(Relaxed);
    let rows_at_end = metrics.clickhouse.replayed_rows.load(Relaxed);
    let t_end = Instant::now();
    store.flush(Duration::from_secs(900)).expect("spool drained");
    let drain = t_end.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let cpu1 = thread_cpu();
    let proc1 = proc_cpu(&pid);
    let chdb_cpu = chdb_pid.as_deref().map(proc_cpu).unwrap_or(0.0) - chdb_cpu0;
    done.store(true, Relaxed);
    sampler.join().unwrap();

    let d = |name: &str| (cpu1.get(name).copied().unwrap_or(0) - cpu0.get(name).copied().unwrap_or(0)) as f64 / 1e9;
    let writer_cpu = d("ch-writer");
    let sink_cpu = d("sink");
    let rows = metrics.clickhouse.replayed_rows.load(Relaxed);
    let inserts = metrics.clickhouse.event_inserts.load(Relaxed);
    let per: Vec<(Instant, u64)> = INSERT_ROWS.lock().unwrap().clone();
    let during: Vec<u64> = per.iter().filter(|(t, _)| *t <= t_end).map(|x| x.1).collect();
    let mut all: Vec<u64> = per.iter().map(|x| x.1).collect();
    all.sort();
    let mut sorted_during = during.clone();
    sorted_during.sort();
    let pct = |v: &[u64], q: f64| if v.is_empty() { 0 } else { v[((v.len() - 1) as f64 * q).round() as usize] };

    println!(
        "== clickhouse_writer: endpoint={} rate={} signals/s (0 = max) duration={}s batch={} signals/write",
        a.endpoint, a.rate, a.duration, a.batch
    );
    println!(
        "config: batch_max_rows={} batch_max_wait={:?} compression={} async_insert={}",
        cfg.batch_max_rows, cfg.batch_max_wait, cfg.compression, cfg.async_insert
    );
    println!("rows per signal (templates): {rows_per_signal:.2}");
    println!(
        "produced: {} signals, {} rows, {} writes in {:.2}s = {:.0} signals/s, {:.0} rows/s; refused (spool full) {}",
        prod.signals,
        prod.rows,
        prod.writes,
        prod.elapsed,
        prod.signals as f64 / prod.elapsed,
        prod.rows as f64 / prod.elapsed,
        prod.refused
    );
    println!(
        "drained: {} rows; at end of production {} rows in ClickHouse, spool {} bytes; drain after production {:.2}s; total {:.2}s",
        rows, rows_at_end, spool_at_end, drain, total
    );
    println!(
        "drain rate: {:.0} signals/s, {:.0} rows/s (all rows / (production + drain time))",
        prod.signals as f64 / total,
        rows as f64 / total
    );
    println!(
        "spool bytes: max {} ({:.1} MiB), at end of production {}",
        spool_max.load(Relaxed),
        spool_max.load(Relaxed) as f64 / 1048576.0,
        spool_at_end
    );
    println!(
        "business_events inserts: {} (counter), rows/insert mean {:.0}; during production: n={} min {} p10 {} p50 {} p90 {} max {}; all: n={} min {} p50 {} max {}",
        inserts,
        rows as f64 / inserts.max(1) as f64,
        sorted_during.len(), pct(&sorted_during, 0.0), pct(&sorted_during, 0.1), pct(&sorted_during, 0.5), pct(&sorted_during, 0.9), pct(&sorted_during, 1.0),
        all.len(), pct(&all, 0.0), pct(&all, 0.5), pct(&all, 1.0)
    );
    println!("insert sizes in order: {:?}", per.iter().map(|x| x.1).collect::<Vec<_>>());
    if a.endpoint == "sink" {
        println!(
            "sink: inserts by table {:?}, {:.1} MiB insert bodies (LZ4), {} duplicate-check queries answered, {} requests forwarded to chDB",
            stats.inserts.lock().unwrap(), stats.insert_bytes.load(Relaxed) as f64 / 1048576.0, stats.dedup_queries.load(Relaxed), stats.forwarded.load(Relaxed)
        );
    }
    println!(
        "CPU s: writer runtime (ch-writer threads) {:.2}, producer thread {:.2} (of which Store::write {:.2}), sink {:.2}, this process {:.2}, chDB front {:.2}",
        writer_cpu, prod.cpu_ns as f64 / 1e9, prod.write_ns as f64 / 1e9, sink_cpu, proc1 - proc0, chdb_cpu
    );
    println!(
        "writer CPU: {:.2} µs/row, {:.2} µs/signal; at 50,000 signals/s that is {:.0} % of one core",
        writer_cpu * 1e6 / rows.max(1) as f64,
        writer_cpu * 1e6 / prod.signals.max(1) as f64,
        writer_cpu / prod.signals.max(1) as f64 * 50_000.0 * 100.0
    );
    println!(
        "producer CPU: {:.2} µs/signal (Store::write {:.2} µs/signal)",
        prod.cpu_ns as f64 / 1e3 / prod.signals.max(1) as f64,
        prod.write_ns as f64 / 1e3 / prod.signals.max(1) as f64
    );
    let s = samples.lock().unwrap();
    let step = (s.len() / 40).max(1);
    println!(
        "spool samples (t s, spool MiB, rows written): {}",
        s.iter()
            .step_by(step)
            .map(|(t, b, r)| format!("{t:.1}:{:.1}:{r}", *b as f64 / 1048576.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(store);
    drop(rt);
}
