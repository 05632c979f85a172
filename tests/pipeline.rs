//! Run semantics end to end over raw OTLP/JSON: samples, summing, duplicates,
//! ordering, stalls, deadlines, restarts, mapping rules.

mod common;
use common::*;
use std::time::Duration;

const T0: u64 = 1_795_240_800_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_requests_become_runs_and_noise_is_discarded() {
    let srv = Server::start().await;
    let (st, body) = srv.post_json("/v1/logs", &fixture("import-progress-logs.json")).await;
    assert_eq!((st, body.as_str()), (200, "{}"));
    let (st, _) = srv.post_json("/v1/traces", &fixture("reconciliation-trace.json")).await;
    assert_eq!(st, 200);
    let (st, _) = srv.post_json("/v1/traces", &fixture("http-noise-trace.json")).await;
    assert_eq!(st, 200);

    // Acknowledged means stored: visible immediately, no waiting.
    let imp = srv.run("product-import", "import-2026-11-21").await.expect("import run");
    assert_eq!(imp["status"], "running");
    assert_eq!(imp["counts"]["imported"], 11700);
    assert_eq!(imp["counts"]["skipped"], 12);
    assert_eq!(imp["progress"]["done"], 11706);
    assert_eq!(imp["progress"]["total"], 12000);
    assert!(imp["progress"]["eta"].is_string());
    assert_eq!(imp["milestones"][0]["name"], "prices-validated");
    assert_eq!(imp["notes"][0]["text"], "6 rows skipped because the EAN column was empty; supplier notified");
    assert_eq!(imp["payloads"][0]["payload"]["price_changes"], 214);
    assert_eq!(imp["started_at"], "2026-11-21T06:00:00Z");

    // Child spans without business.run.id joined the run named by the root span.
    let rec = srv.run("invoice-reconciliation", "recon-2026-11-21").await.expect("recon run");
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error"], "ledger unavailable");
    assert_eq!(rec["counts"]["processed"], 1840);
    assert_eq!(rec["counts"]["reconciled"], 1795);
    assert_eq!(rec["counts"]["unmatched"], 45);
    assert_eq!(rec["duration_seconds"], 303.0);
    let (_, runs) = srv.get("/api/v1/runs").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "noise made no runs, trace-keyed run was merged: {runs:#}");
    let m = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("bizsignal_records_discarded_total 20"), "{m}");

    let (_, events) = srv.get("/api/v1/runs/product-import/import-2026-11-21/events").await;
    let ev = events["events"].as_array().unwrap();
    assert!(ev.windows(2).all(|w| w[0]["at"].as_str() <= w[1]["at"].as_str()));
    assert!(ev.iter().any(|e| e["kind"] == "records" && e["name"] == "skipped" && e["value"] == 4.0));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_sum_across_batches_and_duplicates_do_not_count() {
    let srv = Server::start().await;
    let batch = |t: u64, k: i64| {
        logs_json(
            "svc",
            &[(
                t,
                "batch",
                vec![
                    ("business.process.name", s("p")),
                    ("business.run.id", s("r")),
                    ("business.records.imported", n(k)),
                ],
            )],
        )
    };
    let b1 = batch(T0, 10);
    let b2 = batch(T0 + 1, 5);
    assert_eq!(srv.post_json("/v1/logs", &b1).await.0, 200);
    assert_eq!(srv.post_json("/v1/logs", &b2).await.0, 200);
    assert_eq!(srv.run("p", "r").await.unwrap()["counts"]["imported"], 15);
    // A Collector retry delivers the same batch again.
    assert_eq!(srv.post_json("/v1/logs", &b1).await.0, 200);
    assert_eq!(srv.post_json("/v1/logs", &b2).await.0, 200);
    let run = srv.run("p", "r").await.unwrap();
    assert_eq!(run["counts"]["imported"], 15);
    assert_eq!(run["signal_count"], 2);
    // Same for spans: identity is trace id + span id.
    let trace = fixture("reconciliation-trace.json");
    srv.post_json("/v1/traces", &trace).await;
    srv.post_json("/v1/traces", &trace).await;
    assert_eq!(srv.run("invoice-reconciliation", "recon-2026-11-21").await.unwrap()["counts"]["processed"], 1840);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn milestones_in_time_order_and_terminal_status_not_undone() {
    let srv = Server::start().await;
    let ms = |t: u64, m: &str| {
        logs_json(
            "svc",
            &[(
                t,
                m,
                vec![("business.process.name", s("p")), ("business.run.id", s("r")), ("business.milestone", s(m))],
            )],
        )
    };
    // Delivered out of order.
    srv.post_json("/v1/logs", &ms(T0 + 3, "third")).await;
    srv.post_json("/v1/logs", &ms(T0 + 1, "first")).await;
    srv.post_json("/v1/logs", &ms(T0 + 2, "second")).await;
    let end = logs_json(
        "svc",
        &[(
            T0 + 10,
            "done",
            vec![
                ("business.process.name", s("p")),
                ("business.run.id", s("r")),
                ("business.run.status", s("succeeded")),
            ],
        )],
    );
    srv.post_json("/v1/logs", &end).await;
    // Older signals arriving after the end: recorded, but do not reopen the run.
    let late = logs_json(
        "svc",
        &[(
            T0 + 5,
            "late",
            vec![
                ("business.process.name", s("p")),
                ("business.run.id", s("r")),
                ("business.milestone", s("late-one")),
                ("business.run.status", s("failed")),
            ],
        )],
    );
    srv.post_json("/v1/logs", &late).await;
    let run = srv.run("p", "r").await.unwrap();
    let names: Vec<_> = run["milestones"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["first", "second", "third", "late-one"]);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["ended_at"], "2026-11-21T06:00:00.00000001Z");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_detection_and_recovery() {
    let srv = Server::start_with(|c| {
        c.processes.insert(
            "p".into(),
            bizsignal::config::ProcessExpectations {
                stall_after: Some(Duration::from_millis(400)),
                ..Default::default()
            },
        );
    })
    .await;
    let sig = |t: u64| {
        logs_json(
            "svc",
            &[(
                t,
                "tick",
                vec![("business.process.name", s("p")), ("business.run.id", s("r")), ("business.records.done", n(1))],
            )],
        )
    };
    srv.post_json("/v1/logs", &sig(now())).await;
    assert_eq!(srv.run("p", "r").await.unwrap()["status"], "running");
    let run = srv.wait_run("p", "r", Duration::from_secs(5), |r| r["status"] == "stalled").await;
    assert_eq!(run["violations"][0]["rule"], "stall_after");
    srv.post_json("/v1/logs", &sig(now())).await;
    let run = srv.run("p", "r").await.unwrap();
    assert_eq!(run["status"], "running", "a signal after a stall resumes the run");
    assert_eq!(run["counts"]["done"], 2);
    srv.stop().await;
}

fn deadline_in(secs: i64) -> bizsignal::config::Deadline {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    let civil = t.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap()).time();
    bizsignal::config::Deadline {
        time: format!("{:02}:{:02}:{:02}", civil.hour(), civil.minute(), civil.second()),
        timezone: "Europe/Berlin".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_violation_with_and_without_a_run() {
    let srv = Server::start_with(|c| {
        let exp =
            |secs| bizsignal::config::ProcessExpectations { deadline: Some(deadline_in(secs)), ..Default::default() };
        c.processes.insert("nightly".into(), exp(2));
        c.processes.insert("import".into(), exp(2));
    })
    .await;
    // "import" has a run that is still going at the deadline; "nightly" never started.
    let start = logs_json(
        "svc",
        &[(
            now(),
            "go",
            vec![
                ("business.process.name", s("import")),
                ("business.run.id", s("i1")),
                ("business.run.status", s("started")),
            ],
        )],
    );
    srv.post_json("/v1/logs", &start).await;
    let (_, procs) = srv.get("/api/v1/processes").await;
    assert!(procs["processes"].as_array().unwrap().iter().any(|p| p["name"] == "nightly" && p["latest_run"].is_null()));
    let run =
        srv.wait_run("import", "i1", Duration::from_secs(6), |r| !r["violations"].as_array().unwrap().is_empty()).await;
    assert_eq!(run["violations"][0]["rule"], "deadline");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, procs) = srv.get("/api/v1/processes").await;
        let nightly = procs["processes"].as_array().unwrap().iter().find(|p| p["name"] == "nightly").unwrap().clone();
        if let Some(v) = nightly["violations"].as_array().unwrap().first() {
            assert_eq!(v["rule"], "deadline");
            assert!(v["message"].as_str().unwrap().contains("no run was in progress"), "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no process violation: {nightly:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_records_and_max_duration_violations() {
    let srv = Server::start_with(|c| {
        let mut exp = bizsignal::config::ProcessExpectations {
            max_duration: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        exp.expected_records.insert("skipped".into(), bizsignal::config::RecordBounds { min: None, max: Some(5.0) });
        exp.expected_records.insert("imported".into(), bizsignal::config::RecordBounds { min: Some(100.0), max: None });
        c.processes.insert("p".into(), exp);
    })
    .await;
    let body = logs_json(
        "svc",
        &[
            (
                T0,
                "a",
                vec![
                    ("business.process.name", s("p")),
                    ("business.run.id", s("r")),
                    ("business.records.skipped", n(9)),
                ],
            ),
            (
                T0 + 120_000_000_000,
                "b",
                vec![
                    ("business.process.name", s("p")),
                    ("business.run.id", s("r")),
                    ("business.records.imported", n(3)),
                    ("business.run.status", s("succeeded")),
                ],
            ),
        ],
    );
    srv.post_json("/v1/logs", &body).await;
    let run = srv.run("p", "r").await.unwrap();
    let mut rules: Vec<_> =
        run["violations"].as_array().unwrap().iter().map(|v| v["rule"].as_str().unwrap().to_string()).collect();
    rules.sort();
    assert_eq!(rules, ["expected_records.imported.min", "expected_records.skipped.max", "max_duration"]);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_run_preserves_counts_and_dedup() {
    let mut srv = Server::start().await;
    let b = |t: u64, k: i64| {
        logs_json(
            "svc",
            &[(
                t,
                "b",
                vec![
                    ("business.process.name", s("p")),
                    ("business.run.id", s("r")),
                    ("business.records.imported", n(k)),
                    ("business.milestone", s(&format!("m{t}"))),
                ],
            )],
        )
    };
    let first = b(T0, 10);
    srv.post_json("/v1/logs", &first).await;
    srv.post_json(
        "/v1/traces",
        &fixture("reconciliation-trace.json").replace("\"key\": \"business.run.id\"", "\"key\": \"x.not-run-id\""),
    )
    .await;
    srv.restart_with(|_| {}).await;
    // The duplicate from before the restart is still recognised.
    srv.post_json("/v1/logs", &first).await;
    srv.post_json("/v1/logs", &b(T0 + 1, 5)).await;
    let run = srv.run("p", "r").await.unwrap();
    assert_eq!(run["counts"]["imported"], 15);
    assert_eq!(run["milestones"].as_array().unwrap().len(), 2);
    assert_eq!(run["status"], "running");
    // The trace-keyed run survived as well.
    let rec = srv.run("invoice-reconciliation", "5b8efff798038103d269b633813fc60c").await.unwrap();
    assert_eq!(rec["counts"]["processed"], 1840);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_before_root_across_batches_and_restart_merge_into_named_run() {
    let mut srv = Server::start().await;
    let v: serde_json::Value = serde_json::from_str(&fixture("reconciliation-trace.json")).unwrap();
    let spans = v["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().unwrap().clone();
    let with = |sp: Vec<serde_json::Value>| {
        let mut v = v.clone();
        v["resourceSpans"][0]["scopeSpans"][0]["spans"] = serde_json::Value::Array(sp);
        v.to_string()
    };
    // Children first (as a BatchSpanProcessor exports them), then a restart, then the root.
    srv.post_json("/v1/traces", &with(spans[..3].to_vec())).await;
    assert!(srv.run("invoice-reconciliation", "5b8efff798038103d269b633813fc60c").await.is_some());
    srv.restart_with(|_| {}).await;
    srv.post_json("/v1/traces", &with(spans[3..].to_vec())).await;
    let run = srv.run("invoice-reconciliation", "recon-2026-11-21").await.unwrap();
    assert_eq!(run["counts"]["reconciled"], 1795);
    assert_eq!(run["status"], "failed");
    assert!(srv.run("invoice-reconciliation", "5b8efff798038103d269b633813fc60c").await.is_none());
    // A child re-delivered after the merge still lands in (and is de-duplicated by) the named run.
    srv.post_json("/v1/traces", &with(spans[..1].to_vec())).await;
    assert_eq!(srv.run("invoice-reconciliation", "recon-2026-11-21").await.unwrap()["counts"]["processed"], 1840);
    let (_, ev) = srv.get("/api/v1/runs/invoice-reconciliation/recon-2026-11-21/events").await;
    assert_eq!(ev["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "span").count(), 4);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_rules_classify_untagged_telemetry() {
    let yaml = r#"
rules:
  - name: cron-export
    match:
      signal: span
      service: billing-worker
      span_name: { glob: "match *" }
    set:
      process: ledger-export
      run_id: { from: trace_id }
      records: { matched: business.records.reconciled }
      milestone: { from: span_name }
  - name: import-logs
    match:
      log_body: { regex: "^imported batch \\d+$" }
    set:
      process: { from_attribute: "deployment.environment.name" }
      run_id: "fixed-run"
      note: { from: log_body }
"#;
    let rules = bizsignal::config::Config::from_yaml(yaml, "t.yaml").unwrap().rules;
    let srv = Server::start_with(|c| c.rules = rules).await;
    // Strip business.* attributes so only the rules can classify.
    let strip = |s: String| {
        s.replace("\"business.process.name\"", "\"x.process\"")
            .replace("\"business.milestone\"", "\"x.milestone\"")
            .replace("\"business.note\"", "\"x.note\"")
            .replace("\"business.run.id\"", "\"x.run\"")
    };
    srv.post_json("/v1/traces", &strip(fixture("reconciliation-trace.json"))).await;
    srv.post_json("/v1/logs", &strip(fixture("import-progress-logs.json"))).await;
    let run = srv.run("ledger-export", "5b8efff798038103d269b633813fc60c").await.expect("rule-classified span run");
    assert_eq!(run["counts"]["matched"], 1795);
    assert_eq!(run["counts"]["unmatched"], 45, "business.records.* attributes still count");
    assert_eq!(run["milestones"][0]["name"], "match invoices");
    let run = srv.run("production", "fixed-run").await.expect("rule-classified log run");
    assert_eq!(run["notes"].as_array().unwrap().len(), 3);
    assert_eq!(run["counts"]["imported"], 11700);
    let (_, runs) = srv.get("/api/v1/runs").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 2, "{runs:#}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_listing_filters_and_paginates() {
    let srv = Server::start().await;
    let mut recs = Vec::new();
    for i in 0..7u64 {
        let status = if i % 2 == 0 { "succeeded" } else { "failed" };
        recs.push((
            T0 + i * 1000,
            "x",
            vec![
                ("business.process.name", s(if i < 5 { "a" } else { "b" })),
                ("business.run.id", s(&format!("r{i}"))),
                ("business.run.status", s(status)),
            ],
        ));
    }
    srv.post_json("/v1/logs", &logs_json("svc", &recs)).await;
    let (_, page) = srv.get("/api/v1/runs?limit=3").await;
    let ids: Vec<_> =
        page["runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["r6", "r5", "r4"]);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = srv.get(&format!("/api/v1/runs?limit=3&cursor={cursor}")).await;
    let ids: Vec<_> =
        page2["runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["r3", "r2", "r1"]);
    let (_, f) = srv.get("/api/v1/runs?process=a&status=failed").await;
    let ids: Vec<_> = f["runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["r3", "r1"]);
    let (_, f) = srv.get("/api/v1/runs?since=2026-11-21T06:00:00.000004Z").await;
    assert_eq!(f["runs"].as_array().unwrap().len(), 3);
    for bad in [
        "/api/v1/runs?limit=0",
        "/api/v1/runs?limit=abc",
        "/api/v1/runs?status=sleeping",
        "/api/v1/runs?since=yesterdayish",
        "/api/v1/runs?cursor=zz",
    ] {
        let (st, body) = srv.get(bad).await;
        assert_eq!(st, 400, "{bad}");
        assert!(body["error"].as_str().unwrap().len() > 10, "{bad}: {body}");
    }
    let (st, body) = srv.get("/api/v1/runs/a/nope").await;
    assert_eq!(st, 404);
    assert!(body["error"].as_str().unwrap().contains("nope"));
    let (st, _) = srv.get("/api/v1/runs/a/nope/events").await;
    assert_eq!(st, 404);
    assert_eq!(srv.get("/healthz").await.0, 200);
    assert_eq!(srv.get("/readyz").await.0, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_commit_merge_keeps_events_under_named_run_across_restart() {
    let mut srv = Server::start().await;
    let trace = fixture("reconciliation-trace.json");
    // Children and root in one request: merged within one commit.
    srv.post_json("/v1/traces", &trace).await;
    let (_, ev) = srv.get("/api/v1/runs/invoice-reconciliation/recon-2026-11-21/events").await;
    assert_eq!(ev["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "span").count(), 4, "{ev:#}");
    srv.restart_with(|_| {}).await;
    // A retry after the restart must be recognised as a duplicate.
    srv.post_json("/v1/traces", &trace).await;
    let run = srv.run("invoice-reconciliation", "recon-2026-11-21").await.unwrap();
    assert_eq!(run["counts"]["processed"], 1840);
    assert_eq!(run["signal_count"], 4);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_name_on_the_resource_applies_to_all_its_records() {
    let srv = Server::start().await;
    let body = r#"{"resourceLogs":[{"resource":{"attributes":[
        {"key":"service.name","value":{"stringValue":"etl"}},
        {"key":"business.process.name","value":{"stringValue":"etl-load"}},
        {"key":"business.run.id","value":{"stringValue":"load-7"}}]},
      "scopeLogs":[{"logRecords":[{"timeUnixNano":"1795240800000000000","body":{"stringValue":"loading"}}]}]}]}"#;
    assert_eq!(srv.post_json("/v1/logs", body).await.0, 200);
    let run = srv.run("etl-load", "load-7").await.expect("resource-level process name classifies the record");
    assert_eq!(run["services"][0], "etl");
    srv.stop().await;
}
