//! The wiring, in one place: receivers → classify → run tracker → storage,
//! with the API reading through the query layer. Start-up binds every port
//! first (so tests can use port 0), and shutdown goes in stages: receivers
//! and API stop accepting and finish in-flight requests, then the tracker
//! drains its queue and commits, each stage with a deadline.

use crate::api::{self, ApiState, Queries};
use crate::classify::Classifier;
use crate::config::{Config, StorageKind};
use crate::metrics::export::MetricsPipeline;
use crate::metrics::SelfMetrics;
use crate::receivers::admission::HttpAdmission;
use crate::receivers::{grpc::GrpcReceiver, http::HttpReceiver, Intake};
use crate::runs::tracker::{Tracker, TrackerHandle};
use crate::storage::{sqlite::SqliteStore, StorageError, Store};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A started bizsignal: its bound addresses and the handles to stop it.
pub struct RunningApp {
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
    pub tracker: TrackerHandle,
    pub metrics: Arc<SelfMetrics>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    auth_reloader: JoinHandle<()>,
    tracker_shutdown: Arc<AtomicBool>,
    tracker_thread: std::thread::JoinHandle<()>,
    store: Arc<dyn Store>,
    /// The metrics pipeline (OTLP export and `/metrics`).
    pub exposition: Arc<MetricsPipeline>,
    shutdown_timeout: Duration,
    /// `/readyz` answers 503 once shutdown begins, so load balancers stop sending.
    ready: Arc<AtomicBool>,
}

pub async fn start(config: Config) -> Result<RunningApp, AppError> {
    let metrics = Arc::new(SelfMetrics::default());
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| StorageError::Unavailable(format!("cannot create data dir {}: {e}", config.data_dir.display())))?;
    let store: Arc<dyn Store> = match config.storage.kind {
        StorageKind::Sqlite => {
            let (path, cfg, m) = (config.sqlite_path(), config.storage.sqlite.clone(), metrics.clone());
            let store = tokio::task::spawn_blocking(move || SqliteStore::open_with(&path, &cfg, Some(m)))
                .await
                .map_err(|e| StorageError::Unavailable(e.to_string()))??;
            Arc::new(store)
        }
        StorageKind::Clickhouse => Arc::new(
            crate::storage::clickhouse::ClickHouseStore::open(
                &config.storage.clickhouse,
                &config.data_dir,
                metrics.clone(),
            )
            .await?,
        ),
    };
    let classifier = Arc::new(Classifier::new(config.limits.clone(), &config.rules).map_err(AppError::Config)?);

    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
    };
    let grpc_l = bind("OTLP/gRPC", config.server.otlp_grpc).await?;
    let http_l = bind("OTLP/HTTP", config.server.otlp_http).await?;
    let api_l = bind("API", config.server.http).await?;
    let tls = |alpn: &[&[u8]]| -> Result<_, AppError> {
        match &config.server.tls {
            None => Ok(None),
            Some(t) => crate::net::load_tls(t, alpn)
                .map(Some)
                .map_err(|(k, r)| AppError::Config(format!("server.tls.{k}: {r}"))),
        }
    };
    let max_conns = config.server.max_connections;
    let grpc_l = crate::net::Acceptor::spawn(grpc_l, tls(&[b"h2"])?, max_conns, "OTLP/gRPC");
    let http_l = crate::net::Acceptor::spawn(http_l, tls(&[b"h2", b"http/1.1"])?, max_conns, "OTLP/HTTP");
    let api_l = crate::net::Acceptor::spawn(api_l, tls(&[b"h2", b"http/1.1"])?, max_conns, "API");
    let (otlp_grpc, otlp_http, http) = (grpc_l.local_addr(), http_l.local_addr(), api_l.local_addr());
    let auth = crate::auth::Auth::from_config(&config.server.auth)
        .map_err(|r| AppError::Config(format!("server.auth: {r}")))?;
    let auth_reloader = auth.spawn_reloader(config.server.auth.reload_interval);
    let cors = Arc::new(config.server.cors_allowed_origins.clone());

    let metrics_cfg = config.metrics.clone();
    let (m, st) = (metrics.clone(), store.clone());
    let exposition = tokio::task::spawn_blocking(move || -> Result<_, AppError> {
        let p = MetricsPipeline::build(&metrics_cfg, m).map_err(AppError::Config)?;
        // Gauges restart from the state bizsignal restarts with.
        p.business.seed(&st.load_open_runs()?, &st.last_successes()?);
        Ok(p)
    })
    .await
    .map_err(|e| StorageError::Unavailable(e.to_string()))??;
    let exposition = Arc::new(exposition);

    let tracker_shutdown = Arc::new(AtomicBool::new(false));
    let (st, exp, pipe, m, sd) =
        (store.clone(), config.processes.clone(), config.pipeline.clone(), metrics.clone(), tracker_shutdown.clone());
    let observers: Vec<Arc<dyn crate::runs::tracker::Observer>> = vec![exposition.business.clone()];
    let max_active_runs = config.limits.max_active_runs;
    let (tracker, tracker_thread) =
        tokio::task::spawn_blocking(move || Tracker::start(st, exp, pipe, m, observers, max_active_runs, sd))
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))??;

    let known = {
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.list_processes())
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))??
    };
    let processes = Arc::new(crate::receivers::ProcessRegistry::new(
        config.limits.max_processes,
        known.into_iter().map(|p| p.name),
    ));
    let intake = Intake { classifier, tracker: tracker.clone(), metrics: metrics.clone(), processes };
    let (stop, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = Vec::new();

    let admission = crate::receivers::admission::Admission::new(
        &config.limits,
        config.pipeline.retry_after,
        auth.clone(),
        metrics.clone(),
    );
    let grpc = GrpcReceiver::new(intake.clone(), config.pipeline.retry_after)
        .router(config.limits.max_decompressed_bytes, crate::auth::grpc_interceptor(auth.clone()));
    let incoming = grpc_l.into_stream();
    let grpc_admission = admission.clone();
    let rx = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(crate::receivers::grpc::invalid_argument_for_decode_errors))
            .layer(crate::receivers::admission::GrpcAdmissionLayer(grpc_admission))
            .add_routes(grpc)
            .serve_with_incoming_shutdown(incoming, stopped(rx));
        if let Err(e) = server.await {
            tracing::error!(error = %e, "OTLP/gRPC server failed");
        }
    }));

    let otlp_router = HttpReceiver {
        intake: intake.clone(),
        max_request_bytes: config.limits.max_request_bytes,
        max_decompressed_bytes: config.limits.max_decompressed_bytes,
        retry_after: config.pipeline.retry_after,
    }
    .router()
    .layer(axum::middleware::from_fn_with_state(
        HttpAdmission { admission: admission.clone(), max_body_bytes: config.limits.max_request_bytes, otlp: true },
        crate::receivers::admission::http_admission,
    ))
    .layer(axum::middleware::from_fn_with_state(auth.clone(), crate::auth::otlp_http_auth))
    .layer(axum::middleware::from_fn_with_state(cors.clone(), crate::auth::cors));
    let rx = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        let svc = otlp_router.into_make_service_with_connect_info::<crate::net::ConnInfo>();
        if let Err(e) = axum::serve(http_l, svc).with_graceful_shutdown(stopped(rx)).await {
            tracing::error!(error = %e, "OTLP/HTTP server failed");
        }
    }));

    let ready = Arc::new(AtomicBool::new(true));
    let events = crate::api::events::EventsIntake {
        intake: intake.clone(),
        limits: config.limits.clone(),
        retry_after: config.pipeline.retry_after,
    };
    let queries = Queries {
        store: store.clone(),
        configured_processes: config.processes.keys().cloned().collect(),
        tracker: tracker.clone(),
        stop: stop_rx.clone(),
    };
    // REST and the gRPC query API share the `--http` port (h2c for gRPC).
    let grpc_api = api::grpc::QueryApi { queries: queries.clone() }.router();
    let api_router = api::router(ApiState {
        queries,
        metrics: metrics.clone(),
        exposition: exposition.clone(),
        ready: ready.clone(),
        trace_url_template: config.ui.trace_url_template.clone(),
        events,
    })
    .merge(grpc_api)
    .layer(axum::middleware::from_fn_with_state(
        // axum's default body limit applies to POST /api/v1/events.
        HttpAdmission { admission, max_body_bytes: 2 << 20, otlp: false },
        crate::receivers::admission::http_admission,
    ))
    .layer(axum::middleware::from_fn_with_state(auth.clone(), crate::auth::api_auth))
    .layer(axum::middleware::from_fn_with_state(cors, crate::auth::cors));
    let rx = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        let svc = api_router.into_make_service_with_connect_info::<crate::net::ConnInfo>();
        if let Err(e) = axum::serve(api_l, svc).with_graceful_shutdown(stopped(rx)).await {
            tracing::error!(error = %e, "API server failed");
        }
    }));

    tracing::info!(%otlp_grpc, %otlp_http, %http, data_dir = %config.data_dir.display(), "bizsignal started");
    Ok(RunningApp {
        otlp_grpc,
        otlp_http,
        http,
        tracker,
        metrics,
        stop,
        servers,
        auth_reloader,
        tracker_shutdown,
        tracker_thread,
        store,
        exposition,
        shutdown_timeout: config.pipeline.shutdown_timeout,
        ready,
    })
}

impl RunningApp {
    /// The store (tests read it directly).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stops in stages; returns false when a stage missed its deadline.
    pub async fn shutdown(self) -> bool {
        let mut clean = true;
        self.ready.store(false, Ordering::Release);
        tracing::info!("shutting down: closing receivers");
        let _ = self.stop.send(true);
        self.auth_reloader.abort();
        for s in self.servers {
            let abort = s.abort_handle();
            if tokio::time::timeout(self.shutdown_timeout, s).await.is_err() {
                tracing::warn!("a server did not finish in-flight requests before the deadline");
                abort.abort();
                clean = false;
            }
        }
        tracing::info!("shutting down: draining the run tracker");
        self.tracker_shutdown.store(true, Ordering::Release);
        drop(self.tracker);
        let join = tokio::task::spawn_blocking(move || self.tracker_thread.join());
        if tokio::time::timeout(self.shutdown_timeout, join).await.is_err() {
            tracing::warn!("the run tracker did not drain before the deadline");
            clean = false;
        }
        // Writers: the SQLite journal is applied, the ClickHouse spool drained
        // as far as the deadline allows (what is left is durable and replays
        // at the next start).
        tracing::info!("shutting down: flushing storage");
        let (store, deadline) = (self.store.clone(), self.shutdown_timeout);
        match tokio::task::spawn_blocking(move || store.flush(deadline)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "storage not flushed at shutdown; the journal keeps it for the next start")
            }
            Err(_) => {}
        }
        // A last OTLP export with the final values, then stop the readers.
        let exposition = self.exposition.clone();
        let flush = tokio::task::spawn_blocking(move || exposition.shutdown());
        if tokio::time::timeout(self.shutdown_timeout, flush).await.is_err() {
            tracing::warn!("the metrics exporter did not stop before the deadline");
        }
        tracing::info!(clean, "bizsignal stopped");
        clean
    }
}
