//! The REST API (JSON) on the `--http` port, plus health and `/metrics`.
//! Reads go through [`Queries`], one query layer over the store, so every
//! surface shows the same thing.

pub mod events;
pub mod grpc;
pub mod views;

use crate::metrics::SelfMetrics;
use crate::runs::run::{ProcessRun, RunStatus};
use crate::signal::RunKey;
use crate::storage::{RunCursor, RunQuery, StorageError, Store};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("storage unavailable")]
    Storage(#[from] StorageError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Storage(e) => {
                tracing::warn!(error = %e, "query failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The one query layer used by REST, gRPC, the page and the CLI: every
/// surface asks here and only renders the answer.
#[derive(Clone)]
pub struct Queries {
    pub store: Arc<dyn Store>,
    /// Processes named in the config's expectations: listed even before their first run.
    pub configured_processes: Vec<String>,
    /// Committed run changes, for the live streams.
    pub tracker: crate::runs::tracker::TrackerHandle,
    /// Turns true at shutdown: live streams end then, so servers can close
    /// their connections without waiting for watchers to go away.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Unvalidated run-listing parameters as a surface received them.
#[derive(Debug, Default, Clone)]
pub struct RunsRequest {
    pub process: Option<String>,
    /// `running`, `succeeded`, `failed` or `stalled`.
    pub status: Option<String>,
    /// RFC 3339 timestamp or a duration back from now.
    pub since: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;

impl RunsRequest {
    /// Validates into a store query; empty strings count as absent.
    pub fn to_query(&self, now: i64) -> Result<RunQuery, ApiError> {
        let given = |o: &Option<String>| o.clone().filter(|x| !x.is_empty());
        Ok(RunQuery {
            process: given(&self.process),
            status: match given(&self.status) {
                None => None,
                Some(x) => Some(RunStatus::parse(&x).ok_or_else(|| {
                    ApiError::BadRequest(format!("status must be running, succeeded, failed or stalled, got {x:?}"))
                })?),
            },
            since_ns: given(&self.since).map(|x| parse_since(&x, now)).transpose()?,
            limit: match given(&self.limit) {
                None => DEFAULT_LIMIT,
                Some(x) => match x.parse::<usize>() {
                    Ok(n @ 1..=MAX_LIMIT) => n,
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "limit must be a whole number from 1 to 1000, got {x:?}"
                        )))
                    }
                },
            },
            cursor: match given(&self.cursor) {
                None => None,
                Some(c) => Some(
                    RunCursor::decode(&c)
                        .ok_or_else(|| ApiError::BadRequest("cursor is not one this API returned".into()))?,
                ),
            },
        })
    }
}

impl Queries {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|_| ApiError::Storage(StorageError::Unavailable("query task failed".into())))?
            .map_err(ApiError::from)
    }

    /// Every process with runs or violations plus the configured ones, by name.
    pub async fn processes(&self) -> Result<Vec<crate::storage::ProcessSummary>, ApiError> {
        let mut list = self.blocking(|st| st.list_processes()).await?;
        for name in &self.configured_processes {
            if !list.iter().any(|p| &p.name == name) {
                list.push(crate::storage::ProcessSummary {
                    name: name.clone(),
                    latest_run: None,
                    last_success_at_ns: None,
                    active_runs: 0,
                    violations: vec![],
                });
            }
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// One page of runs, newest first, and the encoded cursor of the next page.
    pub async fn runs(&self, req: &RunsRequest, now: i64) -> Result<(Vec<ProcessRun>, Option<String>), ApiError> {
        let q = req.to_query(now)?;
        let (runs, next) = self.blocking(move |st| st.list_runs(&q)).await?;
        Ok((runs, next.map(|c| c.encode())))
    }

    /// One run; `NotFound` when there is none.
    pub async fn run(&self, key: RunKey) -> Result<ProcessRun, ApiError> {
        let k = key.clone();
        let run = self.blocking(move |st| st.get_run(&k)).await?;
        run.ok_or_else(|| ApiError::NotFound(format!("no run {:?} of process {:?}", key.run_id, key.process)))
    }

    /// A run's stored events in time order; `NotFound` when there is no such run.
    pub async fn run_events(&self, key: RunKey) -> Result<Vec<crate::signal::BusinessEvent>, ApiError> {
        let k = key.clone();
        let (exists, events) = self
            .blocking(move |st| {
                let exists = st.get_run(&k)?.is_some();
                Ok((exists, st.run_events(&k, 10_000)?))
            })
            .await?;
        if !exists {
            return Err(ApiError::NotFound(format!("no run {:?} of process {:?}", key.run_id, key.process)));
        }
        Ok(events)
    }

    /// Committed run changes from now on, optionally of one process only.
    /// `Err(n)` means this subscriber fell behind and missed `n` changes.
    /// The stream ends at shutdown.
    pub fn watch(
        &self,
        process: Option<String>,
    ) -> impl futures_util::Stream<Item = Result<Arc<ProcessRun>, u64>> + Send + 'static {
        use futures_util::StreamExt;
        use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
        let mut stop = self.stop.clone();
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        BroadcastStream::new(self.tracker.subscribe())
            .filter_map(move |r| {
                let out = match r {
                    Ok(change) if process.as_ref().is_none_or(|p| *p == change.key.process) => Some(Ok(change.after)),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(n)),
                };
                std::future::ready(out)
            })
            .take_until(stopping)
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub queries: Queries,
    pub metrics: Arc<SelfMetrics>,
    /// Business and self-metrics for `GET /metrics`.
    pub exposition: Arc<crate::metrics::export::MetricsPipeline>,
    pub ready: Arc<AtomicBool>,
    pub trace_url_template: Option<String>,
    pub events: events::EventsIntake,
}

/// The live page: one self-contained HTML file compiled into the binary.
const PAGE: &str = include_str!("page.html");

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/processes", get(processes))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{process}/{run_id}", get(run))
        .route("/api/v1/runs/{process}/{run_id}/events", get(run_events))
        .route("/api/v1/events", axum::routing::post(events::post_event))
        .route("/api/v1/stream", get(stream))
        .route(
            "/",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE)
            }),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<ApiState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready"}))).into_response()
    }
}

/// Prometheus text format, or OpenMetrics when the `Accept` header asks for it.
async fn metrics(State(s): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    use crate::metrics::prometheus::{wants_openmetrics, OPENMETRICS, TEXT};
    let om = wants_openmetrics(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let body = s.exposition.render(om);
    ([(header::CONTENT_TYPE, if om { OPENMETRICS } else { TEXT })], body).into_response()
}

async fn processes(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let now = crate::now_ns();
    let list = s.queries.processes().await?;
    Ok(Json(json!({ "processes": list.iter().map(|p| views::process(p, now)).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct RunsParams {
    process: Option<String>,
    status: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn runs(
    State(s): State<ApiState>,
    params: Result<Query<RunsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let now = crate::now_ns();
    let req = RunsRequest { process: p.process, status: p.status, since: p.since, limit: p.limit, cursor: p.cursor };
    let (runs, next) = s.queries.runs(&req, now).await?;
    Ok(Json(json!({
        "runs": runs.iter().map(|r| views::run_summary(r, now)).collect::<Vec<_>>(),
        "next_cursor": next,
    })))
}

/// `since` is an RFC 3339 timestamp or a duration back from now (`24h`).
fn parse_since(s: &str, now: i64) -> Result<i64, ApiError> {
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Ok(ts.as_nanosecond() as i64);
    }
    match crate::config::parse_duration(s) {
        Ok(d) => Ok(now.saturating_sub(d.as_nanos().min(i64::MAX as u128) as i64)),
        Err(_) => {
            Err(ApiError::BadRequest(format!("since must be an RFC 3339 timestamp or a duration like 24h, got {s:?}")))
        }
    }
}

async fn run(
    State(s): State<ApiState>,
    Path((process, run_id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = s.queries.run(RunKey { process, run_id }).await?;
    Ok(Json(views::run_full(&run, crate::now_ns(), s.trace_url_template.as_deref())))
}

async fn run_events(
    State(s): State<ApiState>,
    Path((process, run_id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let events = s.queries.run_events(RunKey { process, run_id }).await?;
    Ok(Json(json!({ "events": events.iter().map(views::event).collect::<Vec<_>>() })))
}

/// Server-Sent Events: one `run` event (a run summary) per committed change;
/// `resync` when this client fell behind and should reload everything.
async fn stream(
    State(s): State<ApiState>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    let hello = futures_util::stream::once(async { Ok(Event::default().event("hello").data("{}")) });
    let changes = s.queries.watch(None).map(|r| {
        Ok(match r {
            Ok(run) => Event::default().event("run").data(views::run_summary(&run, crate::now_ns()).to_string()),
            Err(_) => Event::default().event("resync").data("{}"),
        })
    });
    Sse::new(hello.chain(changes)).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}
