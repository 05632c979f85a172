//! State limits: distinct processes and open runs in memory.

mod common;
use common::*;
use std::time::Duration;

const T0: u64 = 1_795_240_800_000_000_000;

fn rec(t: u64, process: &str, run: &str, n_: i64) -> (u64, &'static str, Vec<(&'static str, serde_json::Value)>) {
    (t, "x", vec![("business.process.name", s(process)), ("business.run.id", s(run)), ("business.records.done", n(n_))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_processes_beyond_the_limit_are_rejected_by_name() {
    let srv = Server::start_with(|c| c.limits.max_processes = 2).await;
    let body = logs_json(
        "svc",
        &[rec(T0, "a", "r", 1), rec(T0 + 1, "b", "r", 1), rec(T0 + 2, "c", "r", 1), rec(T0 + 3, "a", "r", 1)],
    );
    let (st, resp) = srv.post_json("/v1/logs", &body).await;
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["partialSuccess"]["rejectedLogRecords"], "1");
    assert!(
        v["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("process \"c\": more than limits.max_processes (2)"),
        "{v}"
    );
    assert_eq!(srv.run("a", "r").await.unwrap()["counts"]["done"], 2);
    assert!(srv.run("c", "r").await.is_none());
    // The script intake is held to the same limit.
    let r = srv
        .http
        .post(srv.api("/api/v1/events"))
        .json(&serde_json::json!({"process": "d", "run_id": "r", "note": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let m = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("reason=\"process_limit\"} 2"), "{m}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_active_runs_are_evicted_marked_and_reloaded() {
    let mut srv = Server::start_with(|c| c.limits.max_active_runs = 3).await;
    for i in 0..5u64 {
        // One request per run, so their receive times are ordered r0 < … < r4.
        srv.post_json("/v1/logs", &logs_json("svc", &[rec(T0 + i, "p", &format!("r{i}"), 1)])).await;
    }
    for i in 0..2 {
        let run = srv
            .wait_run("p", &format!("r{i}"), Duration::from_secs(5), |r| {
                r["violations"].as_array().unwrap().iter().any(|v| v["rule"] == "evicted")
            })
            .await;
        assert_eq!(run["status"], "running", "eviction marks the run, it does not end it");
    }
    for i in 2..5 {
        let run = srv.run("p", &format!("r{i}")).await.unwrap();
        assert!(run["violations"].as_array().unwrap().is_empty(), "r{i} was the most recent and stays: {run}");
    }
    // An evicted run comes back from storage with its counts and de-duplication intact.
    srv.post_json("/v1/logs", &logs_json("svc", &[rec(T0, "p", "r0", 1)])).await;
    srv.post_json("/v1/logs", &logs_json("svc", &[rec(T0 + 100, "p", "r0", 4)])).await;
    assert_eq!(srv.run("p", "r0").await.unwrap()["counts"]["done"], 5);
    // After a restart only max_active_runs open runs are loaded; the rest still answer from storage.
    srv.restart_with(|c| c.limits.max_active_runs = 3).await;
    let (_, runs) = srv.get("/api/v1/runs?status=running").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 5);
    srv.post_json("/v1/logs", &logs_json("svc", &[rec(T0 + 1, "p", "r1", 1)])).await;
    assert_eq!(srv.run("p", "r1").await.unwrap()["counts"]["done"], 1, "duplicate after restart is still recognised");
    srv.stop().await;
}
