//! The gRPC query API (`proto/bizsignal/v1/query.proto`), served on the
//! `--http` port next to REST. Every call goes through [`Queries`], exactly
//! like the REST handlers; this module only renders domain values as messages.

use super::{ApiError, Queries, RunsRequest};
use crate::runs::run::{ProcessRun, RunStatus, Violation};
use crate::signal::RunKey;
use crate::storage::ProcessSummary;
use futures_util::StreamExt;
use std::pin::Pin;
use tonic::{Request, Response, Status};

/// Generated messages, client and server.
pub mod pb {
    tonic::include_proto!("bizsignal.v1");
}

pub use pb::query_service_client::QueryServiceClient;
pub use pb::query_service_server::QueryServiceServer;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::BadRequest(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Storage(e) => {
                tracing::warn!(error = %e, "query failed");
                Status::unavailable("storage unavailable")
            }
        }
    }
}

pub fn status(s: RunStatus) -> pb::RunStatus {
    match s {
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::Stalled => pb::RunStatus::Stalled,
    }
}

fn violations(v: &[Violation]) -> Vec<pb::Violation> {
    v.iter()
        .map(|v| pb::Violation { rule: v.rule.clone(), message: v.message.clone(), at_unix_nano: v.at_ns })
        .collect()
}

/// A run in full, as every RPC returns it.
pub fn run(r: &ProcessRun, now: i64) -> pb::Run {
    let progress = (r.progress_done.is_some() || r.progress_total.is_some()).then(|| pb::Progress {
        done: r.progress_done.as_ref().map(|s| s.value),
        total: r.progress_total.as_ref().map(|s| s.value),
        ratio: r.progress_ratio(),
        eta_unix_nano: r.eta_ns(),
    });
    pb::Run {
        process: r.process.clone(),
        run_id: r.run_id.clone(),
        status: status(r.status) as i32,
        started_at_unix_nano: r.started_at_ns,
        ended_at_unix_nano: r.ended_at_ns(),
        last_seen_at_unix_nano: r.last_seen_at_ns,
        duration_seconds: r.duration_seconds(now),
        counts: r.counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        progress,
        milestones: r
            .milestones
            .iter()
            .map(|m| pb::Milestone { name: m.name.to_string(), at_unix_nano: m.at_ns })
            .collect(),
        notes: r.notes.iter().map(|n| pb::Note { at_unix_nano: n.at_ns, text: n.text.to_string() }).collect(),
        payloads: r.payloads.iter().map(|p| pb::Payload { at_unix_nano: p.at_ns, json: p.json.to_string() }).collect(),
        violations: violations(&r.violations),
        trace_ids: r.trace_ids.iter().map(|t| t.to_string()).collect(),
        services: r.services.iter().map(|s| s.to_string()).collect(),
        error: r.error().map(str::to_string),
        values: r.values.iter().map(|(k, s)| (k.to_string(), s.value)).collect(),
        signal_count: r.signal_count,
    }
}

pub fn process(p: &ProcessSummary, now: i64) -> pb::Process {
    pb::Process {
        name: p.name.clone(),
        latest_run: p.latest_run.as_ref().map(|r| run(r, now)),
        last_success_at_unix_nano: p.last_success_at_ns,
        active_runs: p.active_runs,
        violations: violations(&p.violations),
    }
}

/// The `QueryService` implementation.
#[derive(Clone)]
pub struct QueryApi {
    pub queries: Queries,
}

impl QueryApi {
    pub fn into_service(self) -> QueryServiceServer<QueryApi> {
        QueryServiceServer::new(self)
    }

    /// The service as an axum router (routes `/bizsignal.v1.QueryService/*`
    /// only, so REST keeps its own 404s), to merge with the REST router.
    pub fn router(self) -> axum::Router {
        use tonic::server::NamedService;
        axum::Router::new()
            .route_service(&format!("/{}/{{*rest}}", QueryServiceServer::<QueryApi>::NAME), self.into_service())
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

type WatchStream = Pin<Box<dyn futures_util::Stream<Item = Result<pb::RunChange, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::query_service_server::QueryService for QueryApi {
    async fn list_processes(
        &self,
        _req: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let now = crate::now_ns();
        let list = self.queries.processes().await?;
        Ok(Response::new(pb::ListProcessesResponse { processes: list.iter().map(|p| process(p, now)).collect() }))
    }

    async fn list_runs(&self, req: Request<pb::ListRunsRequest>) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = req.into_inner();
        let status = match pb::RunStatus::try_from(r.status) {
            Ok(pb::RunStatus::Unspecified) => None,
            Ok(pb::RunStatus::Running) => Some("running"),
            Ok(pb::RunStatus::Succeeded) => Some("succeeded"),
            Ok(pb::RunStatus::Failed) => Some("failed"),
            Ok(pb::RunStatus::Stalled) => Some("stalled"),
            Err(_) => {
                return Err(Status::invalid_argument(format!("status must be a RunStatus value, got {}", r.status)))
            }
        };
        let q = RunsRequest {
            process: non_empty(r.process),
            status: status.map(str::to_string),
            since: non_empty(r.since),
            limit: (r.limit != 0).then(|| r.limit.to_string()),
            cursor: non_empty(r.cursor),
        };
        let now = crate::now_ns();
        let (runs, next) = self.queries.runs(&q, now).await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(|x| run(x, now)).collect(),
            next_cursor: next.unwrap_or_default(),
        }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let r = req.into_inner();
        if r.process.is_empty() || r.run_id.is_empty() {
            return Err(Status::invalid_argument("process and run_id are required"));
        }
        let found = self.queries.run(RunKey { process: r.process, run_id: r.run_id }).await?;
        Ok(Response::new(run(&found, crate::now_ns())))
    }

    type WatchRunsStream = WatchStream;

    async fn watch_runs(&self, req: Request<pb::WatchRunsRequest>) -> Result<Response<WatchStream>, Status> {
        let process = non_empty(req.into_inner().process);
        let changes = self.queries.watch(process).map(|r| {
            Ok(match r {
                Ok(after) => pb::RunChange { run: Some(run(&after, crate::now_ns())), resync: false, missed: 0 },
                Err(missed) => pb::RunChange { run: None, resync: true, missed },
            })
        });
        // The changes end at shutdown (or if the tracker goes away): say so.
        let stream = changes.chain(futures_util::stream::once(std::future::ready(Err(Status::unavailable(
            "bizsignal is shutting down",
        )))));
        Ok(Response::new(Box::pin(stream)))
    }
}
