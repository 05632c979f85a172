//! Spool full: while ClickHouse is down the spool fills up; then intake is
//! refused with retryable statuses (nothing acknowledged is dropped), and a
//! restart starts cleanly and replays everything exactly once.

mod common;

use bizsignal::config::StorageKind;
use common::chdb::{unique_db, ChServer};
use common::{logs_json, n, now, s, Server};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_refuses_retryably_and_restart_replays_exactly_once() {
    let mut chs = ChServer::start();
    if !chs.is_local() {
        eprintln!("skipping: this test stops and restarts the local chDB front");
        return;
    }
    let db = unique_db("spoolfull");
    let mut chcfg = chs.config(&db);
    chcfg.spool_max_bytes = 1 << 20;
    let cfg = chcfg.clone();
    let mut srv = Server::start_with(|c| {
        c.storage.kind = StorageKind::Clickhouse;
        c.storage.clickhouse = cfg;
        c.pipeline.shutdown_timeout = Duration::from_secs(2);
    })
    .await;
    tokio::task::block_in_place(|| chs.stop());
    // ~60 KiB of payload per request (and the run state carrying them): the 1 MiB spool fills within a few requests.
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(60 << 10));
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let body = logs_json(
            "importer",
            &[(
                now(),
                "step",
                vec![
                    ("business.process.name", s("import")),
                    ("business.run.id", s("full")),
                    ("business.records.ok", n(1)),
                    ("business.payload", s(&big)),
                    ("business.milestone", s(&format!("m{i}"))),
                ],
            )],
        );
        let r = srv
            .http
            .post(srv.otlp_http("/v1/logs"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => acked.push(i),
            503 | 429 => {
                assert!(r.headers().contains_key("retry-after"), "retryable refusal carries Retry-After");
                refused = Some(i);
                break;
            }
            other => panic!("unexpected status {other}: {}", r.text().await.unwrap()),
        }
    }
    let refused_at = refused.expect("the full spool refuses intake");
    assert!(acked.len() >= 2, "some requests were spooled first: {}", acked.len());
    assert_eq!(acked.len(), refused_at);
    // Stop while ClickHouse is still down (the spool stays on disk), bring
    // ClickHouse back, start again: no crash loop, the spool replays.
    let app = srv.app.take().unwrap();
    let _ = app.shutdown().await;
    tokio::task::block_in_place(|| chs.restart());
    let mut c = common::base_config(srv.dir.path());
    c.storage.kind = StorageKind::Clickhouse;
    c.storage.clickhouse = chcfg.clone();
    let started = Instant::now();
    srv.app = Some(bizsignal::app::start(c).await.expect("restarts with a full spool"));
    let deadline = started + Duration::from_secs(60);
    let spooled = || srv.app().metrics.clickhouse.spool_records.load(std::sync::atomic::Ordering::Relaxed);
    while spooled() > 0 {
        assert!(Instant::now() < deadline, "spool did not drain after restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("start-up plus replay of {} spooled requests: {:?}", acked.len(), started.elapsed());
    let want = acked.len() as f64;
    let run = srv.wait_run("import", "full", Duration::from_secs(30), |v| v["counts"]["ok"] == want).await;
    assert_eq!(run["signal_count"], acked.len() as u64, "{run}");
    let q = format!(
        "SELECT count(), uniqExact(event_id) FROM {db}.business_events WHERE run_id = 'full' AND kind = 'records'"
    );
    assert_eq!(chs.tsv(&q).await.trim(), format!("{0}\t{0}", acked.len()), "every acknowledged signal exactly once");
    srv.stop().await;
}
