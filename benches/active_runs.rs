//! Memory per active run, in process, through the real run tracker:
//!
//! ```text
//! cargo bench --bench active_runs -- [RUNS=1000000] [null|sqlite] [SIGNALS_PER_RUN=1]
//! ```
//!
//! Opens RUNS runs, each with SIGNALS_PER_RUN business signals (the loadgen's
//! business span: one process of five, a run id, a trace id, two record
//! counts, a milestone and a value; never a root span, so every run stays
//! open), submitted in batches of 200 with 8 batches in flight (group commit),
//! with a null store or a real SQLite store (`synchronous=FULL`, in a temp
//! dir). Reports the live heap (a counting global allocator) and VmRSS
//! before and after, each divided by the number of active runs. The SQLite
//! page cache (up to 32 MiB) is part of the RSS figure.

use bizsignal::classify::Classifier;
use bizsignal::config::{Limits, PipelineConfig};
use bizsignal::loadgen::{sample_request, Signal as Kind};
use bizsignal::metrics::SelfMetrics;
use bizsignal::runs::tracker::Tracker;
use bizsignal::signal::Signal;
use bizsignal::storage::sqlite::SqliteStore;
use bizsignal::storage::{NullStore, Store};
use mimalloc::MiMalloc;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The server's allocator (`src/alloc.rs`), counting live bytes.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        MiMalloc.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        MiMalloc.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        MiMalloc.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        MiMalloc.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    bizsignal::alloc::configure();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: then a quick smoke run.
    let bench = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let default_runs = if bench { 1_000_000 } else { 2_000 };
    let runs: usize = args.first().map(|a| a.parse().expect("RUNS")).unwrap_or(default_runs);
    let kind = args.get(1).cloned().unwrap_or_else(|| if bench { "sqlite" } else { "null" }.into());
    let per_run: usize = args.get(2).map(|a| a.parse().expect("SIGNALS_PER_RUN")).unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = match kind.as_str() {
        "null" => Arc::new(NullStore),
        "sqlite" => Arc::new(SqliteStore::open(&dir.path().join("runs.db")).unwrap()),
        k => panic!("store kind {k}: null or sqlite"),
    };

    let (body, _) = sample_request(Kind::Traces, 200, 1.0, 7);
    let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
    let template = Classifier::new(Limits::default(), &[]).unwrap().classify_traces(&req.resource_spans, 1).signals;
    assert_eq!(template.len(), 200);

    let sd = Arc::new(AtomicBool::new(false));
    let (handle, join) = Tracker::start(
        store,
        BTreeMap::new(),
        PipelineConfig::default(),
        Arc::new(SelfMetrics::default()),
        vec![],
        usize::MAX,
        sd.clone(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_kib());
    let started = Instant::now();
    let total = runs * per_run;
    let mut next = 0usize;
    let mut batches = Vec::new();
    while next < total {
        let mut batch = Vec::with_capacity(200);
        while batch.len() < 200 && next < total {
            // Signal `next` goes to run `next % runs`: runs fill round-robin.
            let run = next % runs;
            let mut s: Signal = template[next % 200].clone();
            s.id = (1u128 << 120) | next as u128;
            s.run_id = Some(format!("run-{run:09}"));
            s.trace_id = format!("{:032x}", (7u128 << 100) | run as u128);
            s.span_id = format!("{:016x}", next);
            batch.push(s);
            next += 1;
        }
        batches.push(batch);
        if batches.len() == 8 || next == total {
            let futs = batches.drain(..).map(|b| handle.submit(b));
            for r in rt.block_on(futures_util::future::join_all(futs)) {
                r.unwrap();
            }
        }
    }
    let elapsed = started.elapsed();
    // Let the tracker run a tick (eviction check, expectation checks) so steady state is measured.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed), rss_kib());
    let heap = (heap1 - heap0) as f64;
    let rss = (rss1 as f64 - rss0 as f64) * 1024.0;
    println!(
        "store={kind} runs={runs} signals_per_run={per_run} signals={total} elapsed={:.1}s ({:.1} µs/signal)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / total as f64
    );
    println!(
        "live heap: {:.1} MiB -> {:.1} MiB, {:.0} bytes per active run",
        heap0 as f64 / 1048576.0,
        heap1 as f64 / 1048576.0,
        heap / runs as f64
    );
    println!(
        "VmRSS: {:.1} MiB -> {:.1} MiB, {:.0} bytes ({:.2} KiB) per active run",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss / runs as f64,
        rss / runs as f64 / 1024.0
    );
    sd.store(true, Ordering::SeqCst);
    drop(handle);
    let _ = join.join();
}
