//! `POST /api/v1/events`: scripts report progress without an OTel SDK.

mod common;
use common::*;
use serde_json::json;

async fn post(srv: &Server, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = srv.http.post(srv.api("/api/v1/events")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_build_runs_like_otlp_signals() {
    let srv = Server::start().await;
    let (st, b) =
        post(&srv, json!({"process": "backup", "run_id": "b-1", "status": "started", "progress": {"total": 10}})).await;
    assert_eq!((st, b["stored"].as_bool()), (200, Some(true)));
    post(&srv, json!({"process": "backup", "run_id": "b-1", "records": {"copied": 7, "failed": 1}, "progress": {"done": 8}, "event_id": "step-1"})).await;
    // A retry with the same event_id is recognised.
    let (st, b) = post(&srv, json!({"process": "backup", "run_id": "b-1", "records": {"copied": 7, "failed": 1}, "progress": {"done": 8}, "event_id": "step-1"})).await;
    assert_eq!((st, b["duplicate"].as_bool()), (200, Some(true)));
    post(&srv, json!({"process": "backup", "run_id": "b-1", "milestone": "snapshot-taken", "note": "1 file locked", "payload": {"bytes": 123}})).await;
    post(&srv, json!({"process": "backup", "run_id": "b-1", "status": "failed", "error": "disk full", "time": "2030-01-01T00:00:00Z"})).await;
    let run = srv.run("backup", "b-1").await.unwrap();
    assert_eq!(run["counts"]["copied"], 7);
    assert_eq!(run["counts"]["failed"], 1);
    assert_eq!(run["progress"]["done"], 8);
    assert_eq!(run["milestones"][0]["name"], "snapshot-taken");
    assert_eq!(run["notes"][0]["text"], "1 file locked");
    assert_eq!(run["payloads"][0]["payload"]["bytes"], 123);
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"], "disk full");
    assert_eq!(run["ended_at"], "2030-01-01T00:00:00Z");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_get_400_with_the_reason_and_store_nothing() {
    let srv = Server::start().await;
    for (body, want) in [
        (json!({"process": "p", "run_id": "r"}), "give at least one of"),
        (json!({"process": "", "run_id": "r", "note": "x"}), "process must be 1 to"),
        (json!({"process": "p", "run_id": "r", "records": {"x": -1}}), "records.x must be a non-negative number"),
        (json!({"process": "p", "run_id": "r", "records": {"x": "many"}}), "records.x must be a number"),
        (json!({"process": "p", "run_id": "r", "status": "exploded"}), "status must be started, succeeded or failed"),
        (
            json!({"process": "p", "run_id": "r", "note": "x", "time": "yesterday"}),
            "time must be an RFC 3339 timestamp",
        ),
        (json!({"process": "p", "run_id": "r", "note": "x", "colour": "red"}), "unknown field `colour`"),
        (
            json!({"process": "p", "run_id": "r", "progress": {"done": 1e300}}),
            "progress.done must be a non-negative number",
        ),
    ] {
        let (st, b) = post(&srv, body.clone()).await;
        assert_eq!(st, 400, "{body}");
        assert!(b["error"].as_str().unwrap().contains(want), "{body}: {b}");
    }
    let r = srv
        .http
        .post(srv.api("/api/v1/events"))
        .header("content-type", "text/plain")
        .body("note")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let r = srv
        .http
        .post(srv.api("/api/v1/events"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(srv.run("p", "r").await.is_none());
    srv.stop().await;
}
