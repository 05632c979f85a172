//! `bizsignal loadgen`: an OTLP load generator for benchmarks and smoke tests.
//!
//! Requests are encoded once, up front (`--templates` distinct bodies); before
//! each send only the span ids (a per-request sequence number) and the
//! timestamps (the clock) are patched in place, so every span the server sees
//! is new and current (de-duplication cannot make the run cheap, nor old
//! timestamps make it dearer) while the generator spends almost nothing per span.
//! gRPC goes through tonic with a pass-through codec (the body is already
//! protobuf), HTTP through reqwest with `application/x-protobuf`.
//!
//! Business spans/logs carry ~10 attributes, spread over `--processes`
//! processes and `--runs` run ids; the rest look like ordinary service
//! telemetry (HTTP/DB attributes, no `business.` key).
//!
//! Given `--server-pid`, the report includes the server's CPU seconds
//! (user+sys from `/proc/<pid>/stat`) per million accepted spans and its
//! peak RSS (`VmHWM`).

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status as SpanStatus,
};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    Traces,
    Logs,
}

/// Load generator settings (also the `bizsignal loadgen` arguments).
#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenOptions {
    /// Target: `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318` (HTTP).
    #[arg(long)]
    pub endpoint: String,
    #[arg(long, value_enum, default_value = "grpc")]
    pub protocol: Protocol,
    #[arg(long, value_enum, default_value = "traces")]
    pub signal: Signal,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Spans (or log records) per request.
    #[arg(long, default_value_t = 200)]
    pub batch: usize,
    /// Total requests per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rps: f64,
    /// How long to send, e.g. `10s`.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Share of business records, 0.0..=1.0.
    #[arg(long, default_value_t = 0.1)]
    pub business_ratio: f64,
    /// Distinct business processes.
    #[arg(long, default_value_t = 5)]
    pub processes: usize,
    /// Distinct run ids (spread over the processes).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Distinct pre-encoded request bodies.
    #[arg(long, default_value_t = 32)]
    pub templates: usize,
    /// Server pid: report its CPU per million accepted spans and peak RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a load run measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub protocol: String,
    pub signal: String,
    pub duration_s: f64,
    pub requests_ok: u64,
    /// Requests the server refused (429/503, RESOURCE_EXHAUSTED/UNAVAILABLE).
    pub requests_refused: u64,
    /// Requests that failed otherwise (connection errors, other statuses).
    pub requests_failed: u64,
    pub spans_sent: u64,
    /// Records in successful requests minus those rejected by partial success.
    pub spans_accepted: u64,
    pub spans_rejected: u64,
    /// Business records in successful requests (acknowledged = stored).
    pub business_acked: u64,
    pub accepted_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_s_per_million: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
    pub server_rss_kib: Option<u64>,
    pub loadgen_cpu_s: Option<f64>,
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = format!(
            "protocol={} signal={} duration={:.2}s\nrequests: ok={} refused={} failed={}\nspans: sent={} accepted={} rejected={} business_acked={}\naccepted/s: {:.0}\nlatency ms: p50={:.2} p90={:.2} p99={:.2} max={:.2}\n",
            self.protocol,
            self.signal,
            self.duration_s,
            self.requests_ok,
            self.requests_refused,
            self.requests_failed,
            self.spans_sent,
            self.spans_accepted,
            self.spans_rejected,
            self.business_acked,
            self.accepted_per_s,
            self.latency_ms_p50,
            self.latency_ms_p90,
            self.latency_ms_p99,
            self.latency_ms_max
        );
        if let (Some(c), Some(m)) = (self.server_cpu_s, self.server_cpu_s_per_million) {
            s.push_str(&format!("server cpu: {c:.3}s total, {m:.3}s per million accepted spans\n"));
        }
        if let (Some(p), Some(r)) = (self.server_peak_rss_kib, self.server_rss_kib) {
            s.push_str(&format!("server rss: peak {p} KiB, now {r} KiB\n"));
        }
        if let Some(c) = self.loadgen_cpu_s {
            s.push_str(&format!("loadgen cpu: {c:.3}s\n"));
        }
        s
    }
}

/// A pre-encoded request: the body, where its span ids sit, how many records
/// and business records it carries.
struct Template {
    body: Vec<u8>,
    id_offsets: Vec<usize>,
    /// Where the start (span) and end/record times (fixed64) sit: rewritten
    /// with the clock at each send, so signals are as fresh as real traffic
    /// (a server de-duplicates old signals differently from new ones).
    start_offsets: Vec<usize>,
    end_offsets: Vec<usize>,
    records: u64,
    business: u64,
}

const MARKER: u64 = 0xA5C3_0000_0000_0000;
/// Placeholder times in a template, replaced at each send.
const START_MARK: u64 = 0x1A2B_3C4D_5E6F_7A01;
const END_MARK: u64 = 0x1A2B_3C4D_5E6F_7A02;

fn kv(k: &str, v: Value) -> KeyValue {
    KeyValue { key: k.to_string(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}
fn s(v: impl Into<String>) -> Value {
    Value::StringValue(v.into())
}

/// Deterministic xorshift so templates are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PROCESSES: [&str; 8] = [
    "invoice-reconciliation",
    "nightly-report",
    "price-import",
    "payroll-export",
    "stock-sync",
    "order-fulfilment",
    "refund-batch",
    "ledger-close",
];

/// A business span's attributes and the trace id of its run: a run is one
/// execution of a job, and its spans share the job's trace (with a span of
/// its own trace per business span, every run would carry the maximum of
/// 100 trace ids, which real runs rarely do).
fn business_attrs(rng: &mut Rng, o: &LoadgenOptions) -> (Vec<KeyValue>, [u8; 16]) {
    let p = rng.below(o.processes.clamp(1, PROCESSES.len()));
    let run = rng.below(o.runs);
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(0xB0B0_0000_0000_0000u64 | p as u64).to_be_bytes());
    trace_id[8..].copy_from_slice(&(run as u64).to_be_bytes());
    let attrs = vec![
        kv("business.process.name", s(PROCESSES[p])),
        kv("business.run.id", s(format!("run-{p}-{run:07}"))),
        kv("business.records.processed", Value::IntValue(rng.below(5000) as i64)),
        kv("business.records.failed", Value::IntValue(rng.below(5) as i64)),
        kv("business.milestone", s(["fetched", "matched", "posted", "validated"][rng.below(4)])),
        kv("business.value.amount_eur", Value::DoubleValue(rng.below(1_000_000) as f64 / 100.0)),
        kv("code.function", s("process_batch")),
        kv("thread.name", s("worker-3")),
        kv("db.system", s("postgresql")),
        kv("batch.size", Value::IntValue(500)),
    ];
    (attrs, trace_id)
}

fn plain_attrs(rng: &mut Rng) -> Vec<KeyValue> {
    let route = ["/api/orders/{id}", "/api/customers", "/api/cart/{id}/items", "/healthz"][rng.below(4)];
    vec![
        kv("http.request.method", s(["GET", "POST", "PUT"][rng.below(3)])),
        kv("http.route", s(route)),
        kv("url.path", s(route.replace("{id}", &rng.below(100_000).to_string()))),
        kv("http.response.status_code", Value::IntValue([200, 200, 200, 201, 404, 500][rng.below(6)])),
        kv("server.address", s("orders.internal")),
        kv("server.port", Value::IntValue(8080)),
        kv("network.protocol.version", s("1.1")),
        kv("user_agent.original", s("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36")),
        kv("client.address", s(format!("10.0.{}.{}", rng.below(255), rng.below(255)))),
        kv("db.system", s("postgresql")),
    ]
}

fn resource(service: &str) -> Option<Resource> {
    Some(Resource {
        attributes: vec![
            kv("service.name", s(service)),
            kv("service.version", s("1.4.2")),
            kv("deployment.environment.name", s("production")),
            kv("host.name", s("node-7")),
            kv("telemetry.sdk.language", s("rust")),
        ],
        ..Default::default()
    })
}

fn build_template(t: usize, o: &LoadgenOptions, rng: &mut Rng) -> Template {
    let mut business = 0;
    let mut ids = Vec::with_capacity(o.batch);
    let mut is_business = |rng: &mut Rng| {
        let b = (rng.next() % 1_000_000) as f64 / 1_000_000.0 < o.business_ratio;
        business += b as u64;
        b
    };
    let body = match o.signal {
        Signal::Traces => {
            let mut spans = Vec::with_capacity(o.batch);
            for i in 0..o.batch {
                let id = MARKER | ((t as u64) << 24) | i as u64;
                ids.push(id);
                let b = is_business(rng);
                let (attributes, trace_id) = if b {
                    business_attrs(rng, o)
                } else {
                    let mut trace_id = [0u8; 16];
                    trace_id[..8].copy_from_slice(&rng.next().to_be_bytes());
                    trace_id[8..].copy_from_slice(&rng.next().to_be_bytes());
                    (plain_attrs(rng), trace_id)
                };
                spans.push(Span {
                    trace_id: trace_id.to_vec(),
                    span_id: id.to_be_bytes().to_vec(),
                    // Never a root: business runs stay open (active runs).
                    parent_span_id: rng.next().to_be_bytes().to_vec(),
                    name: if b { "reconcile batch".into() } else { "GET /api/orders/{id}".into() },
                    kind: SpanKind::Server as i32,
                    start_time_unix_nano: START_MARK,
                    end_time_unix_nano: END_MARK,
                    attributes,
                    status: Some(SpanStatus { code: StatusCode::Ok as i32, message: String::new() }),
                    ..Default::default()
                });
            }
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: resource(["checkout", "billing", "inventory"][t % 3]),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "loadgen".into(),
                            version: "1".into(),
                            ..Default::default()
                        }),
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            req.encode_to_vec()
        }
        Signal::Logs => {
            let mut records = Vec::with_capacity(o.batch);
            for i in 0..o.batch {
                let id = MARKER | ((t as u64) << 24) | i as u64;
                ids.push(id);
                let b = is_business(rng);
                records.push(LogRecord {
                    time_unix_nano: END_MARK,
                    observed_time_unix_nano: END_MARK,
                    severity_number: 9,
                    severity_text: "INFO".into(),
                    body: Some(AnyValue { value: Some(s(if b { "batch reconciled" } else { "request served" })) }),
                    attributes: if b { business_attrs(rng, o).0 } else { plain_attrs(rng) },
                    trace_id: vec![7; 16],
                    span_id: id.to_be_bytes().to_vec(),
                    ..Default::default()
                });
            }
            let req = ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: resource(["checkout", "billing", "inventory"][t % 3]),
                    scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
                    ..Default::default()
                }],
            };
            req.encode_to_vec()
        }
    };
    let mut id_offsets = Vec::with_capacity(ids.len());
    for id in ids {
        let needle = id.to_be_bytes();
        let pos = body.windows(8).position(|w| w == needle).expect("span id in the encoded body");
        id_offsets.push(pos);
    }
    let find = |mark: u64| -> Vec<usize> {
        let needle = mark.to_le_bytes();
        body.windows(8).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
    };
    let (start_offsets, end_offsets) = (find(START_MARK), find(END_MARK));
    Template { body, id_offsets, start_offsets, end_offsets, records: o.batch as u64, business }
}

/// Writes fresh span ids for request `seq` and the current time into a copy
/// of the template (spans last 2 ms and end now).
fn instantiate(t: &Template, seq: u64) -> Bytes {
    let mut body = t.body.clone();
    for (i, &off) in t.id_offsets.iter().enumerate() {
        let id = (1u64 << 63) | ((seq & 0x7F_FFFF_FFFF) << 20) | (i as u64 & 0xF_FFFF);
        body[off..off + 8].copy_from_slice(&id.to_be_bytes());
    }
    let end = crate::now_ns() as u64;
    for (offsets, time) in [(&t.start_offsets, end - 2_000_000), (&t.end_offsets, end)] {
        for &off in offsets {
            body[off..off + 8].copy_from_slice(&time.to_le_bytes());
        }
    }
    Bytes::from(body)
}

/// A tonic codec that sends pre-encoded bytes and decodes the response.
struct RawCodec<R>(std::marker::PhantomData<R>);
struct RawEncoder;
struct RespDecoder<R>(std::marker::PhantomData<R>);

impl<R: Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = RespDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RespDecoder<R> {
        RespDecoder(std::marker::PhantomData)
    }
}
impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}
impl<R: Message + Default> tonic::codec::Decoder for RespDecoder<R> {
    type Item = R;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<R>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        R::decode(bytes).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

enum Outcome {
    /// Accepted, with the number of records rejected by partial success.
    Ok(u64),
    Refused,
    Failed(String),
}

enum Client {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    Http(reqwest::Client, String),
}

impl Client {
    async fn send(&mut self, signal: Signal, body: Bytes) -> Outcome {
        match self {
            Client::Grpc(g) => {
                if let Err(e) = g.ready().await {
                    return Outcome::Failed(e.to_string());
                }
                let r = match signal {
                    Signal::Traces => g
                        .unary(
                            tonic::Request::new(body),
                            http::uri::PathAndQuery::from_static(
                                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                            ),
                            RawCodec::<ExportTraceServiceResponse>(std::marker::PhantomData),
                        )
                        .await
                        .map(|r| r.into_inner().partial_success.map(|p| p.rejected_spans).unwrap_or(0)),
                    Signal::Logs => g
                        .unary(
                            tonic::Request::new(body),
                            http::uri::PathAndQuery::from_static(
                                "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                            ),
                            RawCodec::<ExportLogsServiceResponse>(std::marker::PhantomData),
                        )
                        .await
                        .map(|r| r.into_inner().partial_success.map(|p| p.rejected_log_records).unwrap_or(0)),
                };
                match r {
                    Ok(rej) => Outcome::Ok(rej.max(0) as u64),
                    Err(st) if matches!(st.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable) => {
                        Outcome::Refused
                    }
                    Err(st) => Outcome::Failed(format!("{:?}: {}", st.code(), st.message())),
                }
            }
            Client::Http(c, url) => {
                let r = c.post(url.as_str()).header("content-type", "application/x-protobuf").body(body).send().await;
                let r = match r {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
                let status = r.status().as_u16();
                let bytes = r.bytes().await.unwrap_or_default();
                match status {
                    200 => {
                        let rej = match signal {
                            Signal::Traces => ExportTraceServiceResponse::decode(bytes)
                                .ok()
                                .and_then(|r| r.partial_success)
                                .map(|p| p.rejected_spans),
                            Signal::Logs => ExportLogsServiceResponse::decode(bytes)
                                .ok()
                                .and_then(|r| r.partial_success)
                                .map(|p| p.rejected_log_records),
                        };
                        Outcome::Ok(rej.unwrap_or(0).max(0) as u64)
                    }
                    429 | 503 => Outcome::Refused,
                    other => Outcome::Failed(format!("HTTP {other}")),
                }
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    business: AtomicU64,
}

/// CPU seconds (user+sys) of a process, from `/proc/<pid>/stat`.
pub fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (peak RSS, current RSS) in KiB from `/proc/<pid>/status`.
pub fn proc_rss_kib(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs the load and returns the report (needs a tokio runtime).
pub async fn run(o: &LoadgenOptions) -> anyhow::Result<Report> {
    let duration = crate::config::parse_duration(&o.duration).map_err(|e| anyhow::anyhow!("--duration: {e}"))?;
    anyhow::ensure!(o.batch > 0 && o.batch < (1 << 20), "--batch must be 1..1048575");
    anyhow::ensure!(o.concurrency > 0, "--concurrency must be > 0");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let templates: Arc<Vec<Template>> =
        Arc::new((0..o.templates.max(1)).map(|t| build_template(t, o, &mut rng)).collect());
    let base = o.endpoint.trim_end_matches('/').to_string();
    let channel = match o.protocol {
        Protocol::Grpc => Some(tonic::transport::Endpoint::from_shared(base.clone())?.connect().await?),
        Protocol::Http => None,
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(o.concurrency).build()?;
    let url = format!("{base}/v1/{}", if o.signal == Signal::Traces { "traces" } else { "logs" });

    let pid = o.server_pid.map(|p| p.to_string());
    let cpu0 = pid.as_deref().and_then(proc_cpu_seconds);
    let self_cpu0 = proc_cpu_seconds("self");
    let counters = Arc::new(Counters::default());
    // Sequence numbers start at the current time in microseconds (mod 2^39,
    // the bits a span id has for them): a later run against the same server
    // never reuses an earlier run's span ids, so nothing is a duplicate.
    let seq = Arc::new(AtomicU64::new((((crate::now_ns() as u64) / 1000) & 0x7F_FFFF_FFFF).max(1)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let mut client = match &channel {
            Some(ch) => Client::Grpc(tonic::client::Grpc::new(ch.clone())),
            None => Client::Http(http.clone(), url.clone()),
        };
        let (templates, counters, seq, first_error, signal) =
            (templates.clone(), counters.clone(), seq.clone(), first_error.clone(), o.signal);
        let conc = o.concurrency;
        let period = (o.rps > 0.0).then(|| Duration::from_secs_f64(o.concurrency as f64 / o.rps));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            // Stagger the workers' first sends over one period.
            let mut next = Instant::now() + period.map(|p| p.mul_f64(w as f64 / conc as f64)).unwrap_or_default();
            while Instant::now() < deadline {
                if let Some(p) = period {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                    next += p;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let t = &templates[(n as usize) % templates.len()];
                let body = instantiate(t, n);
                let t0 = Instant::now();
                let outcome = client.send(signal, body).await;
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                counters.sent.fetch_add(t.records, Ordering::Relaxed);
                match outcome {
                    Outcome::Ok(rej) => {
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        counters.accepted.fetch_add(t.records.saturating_sub(rej), Ordering::Relaxed);
                        counters.rejected.fetch_add(rej, Ordering::Relaxed);
                        if rej == 0 {
                            counters.business.fetch_add(t.business, Ordering::Relaxed);
                        }
                    }
                    Outcome::Refused => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Failed(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = pid.as_deref().and_then(proc_cpu_seconds);
    let self_cpu1 = proc_cpu_seconds("self");
    lat.sort_unstable();
    if let Some(e) = first_error.lock().unwrap().take() {
        eprintln!("loadgen: first failed request: {e}");
    }
    let c = &counters;
    let accepted = c.accepted.load(Ordering::Relaxed);
    let server_cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let rss = pid.as_deref().and_then(proc_rss_kib);
    Ok(Report {
        protocol: format!("{:?}", o.protocol).to_lowercase(),
        signal: format!("{:?}", o.signal).to_lowercase(),
        duration_s: elapsed,
        requests_ok: c.ok.load(Ordering::Relaxed),
        requests_refused: c.refused.load(Ordering::Relaxed),
        requests_failed: c.failed.load(Ordering::Relaxed),
        spans_sent: c.sent.load(Ordering::Relaxed),
        spans_accepted: accepted,
        spans_rejected: c.rejected.load(Ordering::Relaxed),
        business_acked: c.business.load(Ordering::Relaxed),
        accepted_per_s: accepted as f64 / elapsed,
        latency_ms_p50: percentile(&lat, 0.50),
        latency_ms_p90: percentile(&lat, 0.90),
        latency_ms_p99: percentile(&lat, 0.99),
        latency_ms_max: lat.last().map(|&m| m as f64 / 1000.0).unwrap_or(0.0),
        server_cpu_s: server_cpu,
        server_cpu_s_per_million: server_cpu.filter(|_| accepted > 0).map(|c| c * 1e6 / accepted as f64),
        server_peak_rss_kib: rss.map(|r| r.0),
        server_rss_kib: rss.map(|r| r.1),
        loadgen_cpu_s: self_cpu0.zip(self_cpu1).map(|(a, b)| b - a),
    })
}

/// The `bizsignal loadgen` entry point.
pub fn main(o: LoadgenOptions) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&o)) {
        Ok(r) => {
            if o.json {
                println!("{}", serde_json::to_string(&r).expect("report serialises"));
            } else {
                print!("{}", r.text());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One encoded request as the loadgen sends it (for benchmarks): `batch`
/// records, `business_ratio` of them business. Returns the body and how many
/// business records it holds.
pub fn sample_request(signal: Signal, batch: usize, business_ratio: f64, seed: u64) -> (Vec<u8>, u64) {
    let o = LoadgenOptions {
        endpoint: String::new(),
        protocol: Protocol::Grpc,
        signal,
        concurrency: 1,
        batch,
        rps: 0.0,
        duration: "1s".into(),
        business_ratio,
        processes: 5,
        runs: 1000,
        templates: 1,
        server_pid: None,
        json: false,
    };
    let t = build_template(0, &o, &mut Rng(seed | 1));
    (instantiate(&t, seed.max(1)).to_vec(), t.business)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: LoadgenOptions,
    }

    #[test]
    fn each_send_carries_new_span_ids_and_the_current_time() {
        for signal in ["traces", "logs"] {
            let cli = Cli::parse_from(["loadgen", "--endpoint", "http://x", "--signal", signal, "--batch", "20"]);
            let t = build_template(0, &cli.o, &mut Rng(42));
            let before = crate::now_ns() as u64;
            let (a, b) = (instantiate(&t, 1), instantiate(&t, 2));
            let after = crate::now_ns() as u64;
            let fresh = |x: u64| (before..=after).contains(&x);
            if signal == "traces" {
                let (ra, rb) =
                    (ExportTraceServiceRequest::decode(a).unwrap(), ExportTraceServiceRequest::decode(b).unwrap());
                let (sa, sb) = (&ra.resource_spans[0].scope_spans[0].spans, &rb.resource_spans[0].scope_spans[0].spans);
                assert_eq!(sa.len(), 20);
                for (x, y) in sa.iter().zip(sb) {
                    assert_ne!(x.span_id, y.span_id);
                    assert!(fresh(x.end_time_unix_nano) && fresh(y.end_time_unix_nano), "{}", x.end_time_unix_nano);
                    assert_eq!(x.start_time_unix_nano, x.end_time_unix_nano - 2_000_000);
                }
            } else {
                let r = ExportLogsServiceRequest::decode(a).unwrap();
                let logs = &r.resource_logs[0].scope_logs[0].log_records;
                assert_eq!(logs.len(), 20);
                assert!(logs.iter().all(|l| fresh(l.time_unix_nano) && l.observed_time_unix_nano == l.time_unix_nano));
            }
        }
    }
}
