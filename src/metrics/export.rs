//! The metrics pipeline: one `SdkMeterProvider` with two readers — a
//! `ManualReader` (cumulative) collected on every `GET /metrics`, and, when an
//! endpoint is configured, a `PeriodicReader` pushing over OTLP. Export
//! failures are counted and logged at a bounded rate; they never block
//! intake or storage (the periodic reader runs on its own thread).

use super::business::BusinessMetrics;
use super::user::UserMetric;
use super::{Budget, SelfMetrics};
use crate::config::{MetricsConfig, OtlpProtocol, TemporalityConfig};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{MetricExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    Instrument, InstrumentKind, ManualReader, PeriodicReader, Pipeline, SdkMeterProvider, Stream, Temporality,
};
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A `ManualReader` shared between the provider and the `/metrics` handler.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Wraps the OTLP exporter: counts failures, logs at most one warning per
/// minute (with the number suppressed), and reports success to the SDK so it
/// does not log every failure itself.
#[derive(Debug)]
struct CountingExporter {
    inner: MetricExporter,
    metrics: Arc<SelfMetrics>,
    last_log_s: AtomicI64,
}

const LOG_EVERY_S: i64 = 60;

impl PushMetricExporter for CountingExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        if let Err(e) = self.inner.export(metrics).await {
            let n = self.metrics.export_failures.fetch_add(1, Relaxed) + 1;
            let now = crate::now_ns() / 1_000_000_000;
            let last = self.last_log_s.load(Relaxed);
            if now - last >= LOG_EVERY_S && self.last_log_s.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
                tracing::warn!(error = %e, failures_so_far = n, "OTLP metrics export failed (logged at most once a minute; see bizsignal_metrics_export_failures_total)");
            }
        }
        Ok(())
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// The running pipeline.
pub struct MetricsPipeline {
    provider: SdkMeterProvider,
    prometheus: Arc<ManualReader>,
    pub business: Arc<BusinessMetrics>,
    pub otlp_endpoint: Option<String>,
}

impl std::fmt::Debug for MetricsPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsPipeline").field("otlp_endpoint", &self.otlp_endpoint).finish()
    }
}

fn env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

/// The OTLP endpoint in effect: config, else the standard environment variables.
fn endpoint(cfg: &MetricsConfig, protocol: OtlpProtocol) -> Option<String> {
    if let Some(e) = &cfg.otlp.endpoint {
        return Some(match protocol {
            OtlpProtocol::Grpc => e.clone(),
            OtlpProtocol::Http if e.trim_end_matches('/').ends_with("/v1/metrics") => e.clone(),
            OtlpProtocol::Http => format!("{}/v1/metrics", e.trim_end_matches('/')),
        });
    }
    if let Some(e) = env(&["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]) {
        return Some(e);
    }
    let e = env(&["OTEL_EXPORTER_OTLP_ENDPOINT"])?;
    Some(match protocol {
        OtlpProtocol::Grpc => e,
        OtlpProtocol::Http => format!("{}/v1/metrics", e.trim_end_matches('/')),
    })
}

fn protocol(cfg: &MetricsConfig) -> OtlpProtocol {
    cfg.otlp.protocol.unwrap_or_else(|| {
        match env(&["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]).as_deref() {
            Some(p) if p.starts_with("http") => OtlpProtocol::Http,
            _ => OtlpProtocol::Grpc,
        }
    })
}

fn exporter(cfg: &MetricsConfig, protocol: OtlpProtocol, endpoint: &str) -> Result<MetricExporter, String> {
    let o = &cfg.otlp;
    let temporality = o.temporality.map(|t| match t {
        TemporalityConfig::Cumulative => Temporality::Cumulative,
        TemporalityConfig::Delta => Temporality::Delta,
    });
    let built = match protocol {
        OtlpProtocol::Grpc => {
            let mut b = MetricExporter::builder().with_tonic().with_endpoint(endpoint);
            if let Some(t) = o.timeout {
                b = b.with_timeout(t);
            }
            if !o.headers.is_empty() {
                let mut md = tonic::metadata::MetadataMap::new();
                for (k, v) in &o.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|e| format!("header {k}: {e}"))?;
                    md.insert(key, v.parse().map_err(|_| format!("header {k}: invalid value"))?);
                }
                b = b.with_metadata(md);
            }
            match temporality {
                Some(t) => b.with_temporality(t).build(),
                None => b.build(),
            }
        }
        OtlpProtocol::Http => {
            let mut b = MetricExporter::builder().with_http().with_endpoint(endpoint);
            if let Some(t) = o.timeout {
                b = b.with_timeout(t);
            }
            if !o.headers.is_empty() {
                b = b.with_headers(o.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            }
            match temporality {
                Some(t) => b.with_temporality(t).build(),
                None => b.build(),
            }
        }
    };
    built.map_err(|e| format!("cannot build the OTLP metrics exporter: {e}"))
}

impl MetricsPipeline {
    /// Builds the provider, the instruments and the observer. Call from a
    /// blocking context inside the runtime (the HTTP exporter's client must
    /// not be created on an async worker).
    pub fn build(cfg: &MetricsConfig, self_metrics: Arc<SelfMetrics>) -> Result<MetricsPipeline, String> {
        // Budgets are enforced before recording; the SDK's own limit sits above them.
        let sdk_limit = UserMetric::max_limit(cfg) + 16;
        let prometheus = Arc::new(ManualReader::builder().with_temporality(Temporality::Cumulative).build());
        let mut builder = SdkMeterProvider::builder()
            .with_resource(Resource::builder().with_service_name("bizsignal").build())
            .with_reader(SharedReader(prometheus.clone()))
            .with_view(move |_: &Instrument| Stream::builder().with_cardinality_limit(sdk_limit).build().ok());
        let proto = protocol(cfg);
        let otlp_endpoint = endpoint(cfg, proto);
        if let Some(ep) = &otlp_endpoint {
            let exp = CountingExporter {
                inner: exporter(cfg, proto, ep)?,
                metrics: self_metrics.clone(),
                last_log_s: AtomicI64::new(0),
            };
            let mut r = PeriodicReader::builder(exp);
            if let Some(i) = cfg.otlp.interval {
                r = r.with_interval(i);
            }
            builder = builder.with_reader(r.build());
            tracing::info!(endpoint = %ep, protocol = ?proto, "exporting metrics over OTLP");
        }
        let provider = builder.build();
        let meter = provider.meter("bizsignal");
        let mut budgets: Vec<Arc<Budget>> = Vec::new();
        let user = UserMetric::build_all(&meter, cfg, &mut budgets);
        let business = Arc::new(BusinessMetrics::new(&meter, cfg.cardinality_limit, user, &mut budgets));
        super::business::register_self_metrics(&meter, &self_metrics, budgets);
        Ok(MetricsPipeline { provider, prometheus, business, otlp_endpoint })
    }

    /// Collects now and renders for Prometheus (`openmetrics`: OpenMetrics 1.0).
    pub fn render(&self, openmetrics: bool) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.prometheus.collect(&mut rm) {
            tracing::warn!(error = %e, "metrics collection failed");
        }
        super::prometheus::render(&rm, openmetrics)
    }

    /// Flushes a last OTLP export and stops. Blocking.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "meter provider shutdown");
        }
    }
}
