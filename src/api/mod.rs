//! The REST API (JSON) on the `--http` port, plus health and `/metrics`.
//! Reads go through [`Queries`], one query layer over the store, so every
//! surface shows the same thing.

pub mod views;

use crate::metrics::SelfMetrics;
use crate::runs::run::RunStatus;
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

/// The one query layer used by REST, the page and the CLI.
#[derive(Clone)]
pub struct Queries {
    pub store: Arc<dyn Store>,
}

impl Queries {
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&dyn Store) -> Result<T, StorageError> + Send + 'static) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|_| ApiError::Storage(StorageError::Unavailable("query task failed".into())))?
            .map_err(ApiError::from)
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub queries: Queries,
    pub metrics: Arc<SelfMetrics>,
    pub ready: Arc<AtomicBool>,
    pub trace_url_template: Option<String>,
    /// Processes named in the config's expectations: listed even before their first run.
    pub configured_processes: Vec<String>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/processes", get(processes))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{process}/{run_id}", get(run))
        .route("/api/v1/runs/{process}/{run_id}/events", get(run_events))
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

async fn metrics(State(s): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render_prometheus()).into_response()
}

async fn processes(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let now = crate::now_ns();
    let mut list = s.queries.blocking(|st| st.list_processes()).await?;
    for name in &s.configured_processes {
        if !list.iter().any(|p| &p.name == name) {
            list.push(crate::storage::ProcessSummary { name: name.clone(), latest_run: None, last_success_at_ns: None, active_runs: 0, violations: vec![] });
        }
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
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

async fn runs(State(s): State<ApiState>, params: Result<Query<RunsParams>, axum::extract::rejection::QueryRejection>) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let now = crate::now_ns();
    let q = RunQuery {
        process: p.process.filter(|x| !x.is_empty()),
        status: match p.status.as_deref() {
            None | Some("") => None,
            Some(x) => Some(RunStatus::parse(x).ok_or_else(|| ApiError::BadRequest(format!("status must be running, succeeded, failed or stalled, got {x:?}")))?),
        },
        since_ns: p.since.as_deref().filter(|x| !x.is_empty()).map(|x| parse_since(x, now)).transpose()?,
        limit: match p.limit.as_deref() {
            None | Some("") => 50,
            Some(x) => match x.parse::<usize>() {
                Ok(n @ 1..=1000) => n,
                _ => return Err(ApiError::BadRequest(format!("limit must be a whole number from 1 to 1000, got {x:?}"))),
            },
        },
        cursor: match p.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => Some(RunCursor::decode(c).ok_or_else(|| ApiError::BadRequest("cursor is not one this API returned".into()))?),
        },
    };
    let (runs, next) = s.queries.blocking(move |st| st.list_runs(&q)).await?;
    Ok(Json(json!({
        "runs": runs.iter().map(|r| views::run_summary(r, now)).collect::<Vec<_>>(),
        "next_cursor": next.map(|c| c.encode()),
    })))
}

/// `since` is an RFC 3339 timestamp or a duration back from now (`24h`).
fn parse_since(s: &str, now: i64) -> Result<i64, ApiError> {
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Ok(ts.as_nanosecond() as i64);
    }
    match crate::config::parse_duration(s) {
        Ok(d) => Ok(now.saturating_sub(d.as_nanos().min(i64::MAX as u128) as i64)),
        Err(_) => Err(ApiError::BadRequest(format!("since must be an RFC 3339 timestamp or a duration like 24h, got {s:?}"))),
    }
}

async fn run(State(s): State<ApiState>, Path((process, run_id)): Path<(String, String)>) -> Result<Json<serde_json::Value>, ApiError> {
    let key = RunKey { process, run_id };
    let k = key.clone();
    let run = s.queries.blocking(move |st| st.get_run(&k)).await?;
    let run = run.ok_or_else(|| ApiError::NotFound(format!("no run {:?} of process {:?}", key.run_id, key.process)))?;
    Ok(Json(views::run_full(&run, crate::now_ns(), s.trace_url_template.as_deref())))
}

async fn run_events(State(s): State<ApiState>, Path((process, run_id)): Path<(String, String)>) -> Result<Json<serde_json::Value>, ApiError> {
    let key = RunKey { process, run_id };
    let k = key.clone();
    let (exists, events) = s
        .queries
        .blocking(move |st| {
            let exists = st.get_run(&k)?.is_some();
            Ok((exists, st.run_events(&k, 10_000)?))
        })
        .await?;
    if !exists {
        return Err(ApiError::NotFound(format!("no run {:?} of process {:?}", key.run_id, key.process)));
    }
    Ok(Json(json!({ "events": events.iter().map(views::event).collect::<Vec<_>>() })))
}
