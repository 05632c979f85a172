//! The gRPC query API with a real tonic client against a real server, on the
//! same `--http` port as REST.

mod common;

use bizsignal::api::grpc::pb::{self, RunStatus};
use bizsignal::api::grpc::QueryServiceClient;
use common::*;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

async fn client(srv: &Server) -> QueryServiceClient<Channel> {
    QueryServiceClient::connect(format!("http://{}", srv.app().http))
        .await
        .expect("a tonic client connects to the --http port")
}

/// Sends one log record for a run; returns when it is stored.
async fn signal(srv: &Server, t: u64, process: &str, run: &str, attrs: Vec<(&str, serde_json::Value)>) {
    let mut a = vec![("business.process.name", s(process)), ("business.run.id", s(run))];
    a.extend(attrs);
    let (code, body) = srv.post_json("/v1/logs", &logs_json("svc", &[(t, "sig", a)])).await;
    assert_eq!(code, 200, "{body}");
}

async fn next(s: &mut tonic::Streaming<pb::RunChange>) -> pb::RunChange {
    tokio::time::timeout(Duration::from_secs(10), s.message()).await.expect("a change within 10 s").unwrap().unwrap()
}

const T0: u64 = 1_790_000_000_000_000_000;

#[tokio::test]
async fn list_processes_list_runs_and_get_run() {
    let srv = Server::start_with(|c| {
        c.processes.insert("configured-only".into(), Default::default());
    })
    .await;
    // Five runs of "import" (two failed), one of "report".
    for i in 0..5u64 {
        let status = if i % 2 == 1 { "failed" } else { "succeeded" };
        signal(
            &srv,
            T0 + i * 1000,
            "import",
            &format!("i{i}"),
            vec![("business.run.status", s("started")), ("business.records.ok", n(10 + i as i64))],
        )
        .await;
        let mut end = vec![("business.run.status", s(status))];
        if status == "failed" {
            end.push(("business.error.message", s("disk full")));
        }
        signal(&srv, T0 + i * 1000 + 500, "import", &format!("i{i}"), end).await;
    }
    signal(
        &srv,
        T0 + 10_000,
        "report",
        "r1",
        vec![
            ("business.progress.done", n(5)),
            ("business.progress.total", n(10)),
            ("business.milestone", s("fetched")),
        ],
    )
    .await;

    let mut c = client(&srv).await;

    let procs = c.list_processes(pb::ListProcessesRequest {}).await.unwrap().into_inner().processes;
    let names: Vec<_> = procs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["configured-only", "import", "report"]);
    assert!(procs[0].latest_run.is_none());
    let import = &procs[1];
    assert_eq!(import.latest_run.as_ref().unwrap().run_id, "i4");
    assert_eq!(import.last_success_at_unix_nano, Some((T0 + 4500) as i64));
    assert_eq!(import.active_runs, 0);
    assert_eq!(procs[2].active_runs, 1);

    // Paging through all runs, two at a time, newest first.
    let mut seen = vec![];
    let mut cursor = String::new();
    loop {
        let page = c
            .list_runs(pb::ListRunsRequest { limit: 2, cursor: cursor.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.runs.len() <= 2);
        seen.extend(page.runs.iter().map(|r| r.run_id.clone()));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(seen, ["r1", "i4", "i3", "i2", "i1", "i0"]);

    // Filters: process, status, since.
    let failed = c
        .list_runs(pb::ListRunsRequest {
            process: "import".into(),
            status: RunStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = failed.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["i3", "i1"]);
    assert!(failed.next_cursor.is_empty());
    assert!(failed.runs.iter().all(|r| r.status() == RunStatus::Failed && r.error.as_deref() == Some("disk full")));
    let since = jiff::Timestamp::from_nanosecond((T0 + 3000) as i128).unwrap().to_string();
    let recent = c.list_runs(pb::ListRunsRequest { since, ..Default::default() }).await.unwrap().into_inner();
    let ids: Vec<_> = recent.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["r1", "i4", "i3"]);
    let running = c
        .list_runs(pb::ListRunsRequest { status: RunStatus::Running as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.runs.len(), 1);
    assert_eq!(running.runs[0].process, "report");

    // GetRun: the full run.
    let r = c.get_run(pb::GetRunRequest { process: "import".into(), run_id: "i2".into() }).await.unwrap().into_inner();
    assert_eq!(r.status(), RunStatus::Succeeded);
    assert_eq!(r.started_at_unix_nano, (T0 + 2000) as i64);
    assert_eq!(r.ended_at_unix_nano, Some((T0 + 2500) as i64));
    assert_eq!(r.counts["ok"], 12.0);
    assert!((r.duration_seconds - 500e-9).abs() < 1e-12);
    assert_eq!(r.services, ["svc"]);
    assert!(r.error.is_none());
    let r = c.get_run(pb::GetRunRequest { process: "report".into(), run_id: "r1".into() }).await.unwrap().into_inner();
    let p = r.progress.unwrap();
    assert_eq!((p.done, p.total, p.ratio), (Some(5.0), Some(10.0), Some(0.5)));
    assert_eq!(r.milestones[0].name, "fetched");
    assert!(r.ended_at_unix_nano.is_none());

    // Errors.
    let e = c.get_run(pb::GetRunRequest { process: "import".into(), run_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("nope"), "{e:?}");
    let e = c.get_run(pb::GetRunRequest { process: "".into(), run_id: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for (req, want) in [
        (pb::ListRunsRequest { limit: 1001, ..Default::default() }, "limit must be"),
        (pb::ListRunsRequest { since: "yesterday".into(), ..Default::default() }, "since must be"),
        (pb::ListRunsRequest { cursor: "zz".into(), ..Default::default() }, "cursor is not"),
        (pb::ListRunsRequest { status: 42, ..Default::default() }, "status must be"),
    ] {
        let e = c.list_runs(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {e:?}");
        assert!(e.message().contains(want), "{req:?}: {e:?}");
    }

    // REST on the same port still answers, and unknown paths stay 404.
    assert_eq!(srv.get("/api/v1/runs?process=import&status=failed").await.1["runs"].as_array().unwrap().len(), 2);
    assert_eq!(srv.http.get(srv.api("/nope")).send().await.unwrap().status().as_u16(), 404);
    srv.stop().await;
}

#[tokio::test]
async fn watch_runs_streams_committed_changes_and_ends_at_shutdown() {
    let srv = Server::start().await;
    let mut c = client(&srv).await;
    let mut all = c.watch_runs(pb::WatchRunsRequest::default()).await.unwrap().into_inner();
    let mut only_b = c.watch_runs(pb::WatchRunsRequest { process: "b".into() }).await.unwrap().into_inner();

    signal(&srv, now(), "a", "a1", vec![("business.run.status", s("started"))]).await;
    signal(&srv, now(), "b", "b1", vec![("business.records.ok", n(3))]).await;
    signal(&srv, now(), "b", "b1", vec![("business.run.status", s("succeeded"))]).await;

    let ch = next(&mut all).await;
    assert!(!ch.resync);
    let run = ch.run.unwrap();
    assert_eq!((run.process.as_str(), run.run_id.as_str(), run.status()), ("a", "a1", RunStatus::Running));
    let run = next(&mut all).await.run.unwrap();
    assert_eq!((run.run_id.as_str(), run.counts["ok"]), ("b1", 3.0));
    assert_eq!(next(&mut all).await.run.unwrap().status(), RunStatus::Succeeded);

    // The filtered stream never sees process "a".
    let run = next(&mut only_b).await.run.unwrap();
    assert_eq!((run.process.as_str(), run.status()), ("b", RunStatus::Running));
    assert_eq!(next(&mut only_b).await.run.unwrap().status(), RunStatus::Succeeded);

    // Shutdown ends open streams with UNAVAILABLE (and shutdown stays clean).
    let stop = tokio::spawn(srv.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), all.message()).await.expect("stream ends at shutdown");
    match end {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        Ok(m) => panic!("expected UNAVAILABLE, got {m:?}"),
    }
    stop.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_api_needs_the_read_token_when_reads_are_protected() {
    std::env::set_var("BIZSIGNAL_TEST_GRPC_READ_TOKENS", "read-secret-1");
    let srv =
        Server::start_with(|c| c.server.auth.read_tokens_env = Some("BIZSIGNAL_TEST_GRPC_READ_TOKENS".into())).await;
    let mut c = client(&srv).await;
    let err = c.list_processes(pb::ListProcessesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(err.message(), "unauthenticated", "no detail leaked");
    let mut req = tonic::Request::new(pb::ListProcessesRequest {});
    req.metadata_mut().insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(c.list_processes(req).await.unwrap_err().code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::ListProcessesRequest {});
    req.metadata_mut().insert("authorization", "Bearer read-secret-1".parse().unwrap());
    assert!(c.list_processes(req).await.is_ok());
    srv.stop().await;
}
