//! Criterion benchmarks of the per-span pipeline stages: decode + classify
//! (business and non-business), run tracker update, storage batch encode,
//! SQLite write and metrics update. `cargo bench --bench pipeline`.

use bizsignal::classify::Classifier;
use bizsignal::config::{Limits, MetricsConfig, PipelineConfig};
use bizsignal::loadgen::{sample_request, Signal as Kind};
use bizsignal::metrics::export::MetricsPipeline;
use bizsignal::metrics::SelfMetrics;
use bizsignal::receivers::lazy::LazyTraces;
use bizsignal::runs::tracker::{Observer, Tracker, TrackerHandle};
use bizsignal::signal::Signal;
use bizsignal::storage::sqlite::SqliteStore;
use bizsignal::storage::{NullStore, Store};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

const BATCH: usize = 200;

fn classifier() -> Classifier {
    Classifier::new(Limits::default(), &[]).unwrap()
}

fn business_signals(n: usize) -> Vec<Signal> {
    let (body, _) = sample_request(Kind::Traces, n, 1.0, 7);
    let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
    let c = classifier().classify_traces(&req.resource_spans, bizsignal::now_ns());
    assert_eq!(c.signals.len(), n, "all sample spans classify as business: {:?}", c.reasons);
    c.signals
}

fn decode_classify(c: &mut Criterion) {
    let cl = classifier();
    let mut g = c.benchmark_group("decode_classify");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, ratio) in [("non_business", 0.0), ("mixed_10pct", 0.1), ("business", 1.0)] {
        let (body, _) = sample_request(Kind::Traces, BATCH, ratio, 11);
        g.bench_function(format!("{name}/decode"), |b| {
            b.iter(|| ExportTraceServiceRequest::decode(body.as_slice()).unwrap())
        });
        // What the receivers do: spans without a `business.*` key stay undecoded.
        g.bench_function(format!("{name}/lazy decode"), |b| {
            b.iter(|| LazyTraces::decode(bytes::Bytes::from(body.clone())).unwrap().expand(false).unwrap())
        });
        g.bench_function(format!("{name}/decode+classify"), |b| {
            b.iter(|| {
                let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                cl.classify_traces(&req.resource_spans, 1_700_000_000_000_000_000)
            })
        });
    }
    g.finish();
}

fn start_tracker(store: Arc<dyn Store>, observers: Vec<Arc<dyn Observer>>) -> (TrackerHandle, Arc<AtomicBool>) {
    let sd = Arc::new(AtomicBool::new(false));
    let (h, _join) = Tracker::start(
        store,
        BTreeMap::new(),
        PipelineConfig::default(),
        Arc::new(SelfMetrics::default()),
        observers,
        usize::MAX,
        sd.clone(),
    )
    .unwrap();
    (h, sd)
}

/// Submits `template` with fresh signal ids each iteration (no de-duplication).
fn bench_tracker(c: &mut Criterion, name: &str, store: Arc<dyn Store>, observers: Vec<Arc<dyn Observer>>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (handle, sd) = start_tracker(store, observers);
    let template = business_signals(BATCH);
    let mut next_id: u128 = 1 << 100;
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                let mut s = template.clone();
                for sig in &mut s {
                    sig.id = next_id;
                    next_id += 1;
                }
                s
            },
            |s| rt.block_on(handle.submit(s)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    sd.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn tracker_update(c: &mut Criterion) {
    bench_tracker(c, "update (null store)", Arc::new(NullStore), vec![]);
}

fn metrics_update(c: &mut Criterion) {
    let p = MetricsPipeline::build(&MetricsConfig::default(), Arc::new(SelfMetrics::default())).unwrap();
    bench_tracker(c, "update+metrics (null store)", Arc::new(NullStore), vec![p.business.clone()]);
}

fn sqlite_write(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("bench.db")).unwrap();
    bench_tracker(c, "update+sqlite write", Arc::new(store), vec![]);
}

fn batch_encode(c: &mut Criterion) {
    let signals = business_signals(BATCH);
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Elements(BATCH as u64));
    // What the tracker builds per signal (one record, its rows inside).
    g.bench_function("batch encode (signal records)", |b| {
        let mut memo = bizsignal::storage::record::ResourceMemo::default();
        b.iter(|| {
            signals
                .iter()
                .map(|s| bizsignal::storage::record::SignalRecord::from_signal_memo(s, "run-1", &mut memo).rows.len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = decode_classify, batch_encode, tracker_update, metrics_update, sqlite_write }
criterion_main!(benches);
