//! The ClickHouse backend end to end, through the real `clickhouse` client
//! (LZ4 on) against the chDB-backed front (or BIZSIGNAL_TEST_CLICKHOUSE_URL).

mod common;

use bizsignal::config::StorageKind;
use bizsignal::runs::run::ProcessRun;
use bizsignal::signal::{Fact, RunKey, Signal, SignalKind};
use bizsignal::storage::clickhouse::{self as ch, ClickHouseStore};
use bizsignal::storage::{Store, WriteBatch};
use common::chdb::{unique_db, ChServer};
use common::{logs_json, n, now, s, Server};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn signal(id: u128, run: &str, t: i64, ok: f64) -> Signal {
    Signal {
        id,
        kind: SignalKind::Log,
        process: "import".into(),
        run_id: Some(run.into()),
        trace_id: format!("{id:032x}"),
        span_id: String::new(),
        name: "INFO".into(),
        start_ns: t,
        time_ns: t,
        text: "batch".into(),
        service: "importer".into(),
        attributes: Default::default(),
        resource: vec![].into(),
        facts: vec![Fact::Records { outcome: "ok".into(), count: ok }],
    }
}

fn batch(run: &mut ProcessRun, signals: &[Signal]) -> WriteBatch {
    let mut b = WriteBatch::default();
    for s in signals {
        run.apply(s, bizsignal::now_ns());
        b.push_events(&s.to_events(&run.run_id));
    }
    b.runs.push(std::sync::Arc::new(run.clone()));
    b
}

/// A chDB endpoint, a runtime, a fresh database and a data dir for one test.
struct Fixture {
    ch: ChServer,
    rt: tokio::runtime::Runtime,
    db: String,
    cfg: bizsignal::config::ClickHouseConfig,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(db_prefix: &str) -> Fixture {
        let ch = ChServer::start();
        let db = unique_db(db_prefix);
        let cfg = ch.config(&db);
        Fixture { ch, rt: tokio::runtime::Runtime::new().unwrap(), db, cfg, dir: tempfile::tempdir().unwrap() }
    }
}

fn run_r1(t: i64) -> ProcessRun {
    ProcessRun::new(&RunKey { process: "import".into(), run_id: "r1".into() }, t)
}

fn open(
    rt: &tokio::runtime::Runtime,
    cfg: &bizsignal::config::ClickHouseConfig,
    dir: &std::path::Path,
) -> ClickHouseStore {
    rt.block_on(ClickHouseStore::open(cfg, dir, Arc::new(Default::default()))).unwrap()
}

fn tsv(rt: &tokio::runtime::Runtime, ch: &ChServer, db: &str, sql: &str) -> String {
    rt.block_on(ch.tsv(&sql.replace("{db}", db))).trim().to_string()
}

#[test]
fn migrations_from_empty_rerun_and_concurrent() {
    let ch = ChServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = unique_db("mig");
    let cfg = ch.config(&db);
    let (a, b) = rt.block_on(async { tokio::join!(ch::migrate(&cfg), ch::migrate(&cfg)) });
    let applied = [a.unwrap(), b.unwrap()];
    assert!(applied.iter().any(|v| v == &vec![1]), "{applied:?}");
    assert_eq!(rt.block_on(ch::migrate(&cfg)).unwrap(), Vec::<u32>::new(), "re-run is a no-op");
    let tables = tsv(&rt, &ch, &db, "SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name");
    for t in [
        "business_events",
        "process_runs",
        "process_runs_mv",
        "process_rollup_1m",
        "process_rollup_1m_mv",
        "run_aliases",
        "run_state",
        "process_violations",
        "schema_migrations",
    ] {
        assert!(tables.lines().any(|l| l == t), "{t} missing: {tables}");
    }
    assert_eq!(tsv(&rt, &ch, &db, "SELECT DISTINCT version FROM {db}.schema_migrations"), "1");
    // A newer schema than the binary knows is refused with a clear error.
    tsv(&rt, &ch, &db, "INSERT INTO {db}.schema_migrations (version, name) VALUES (99, 'future')");
    let e = rt.block_on(ch::migrate(&cfg)).unwrap_err().to_string();
    assert!(e.contains("newer than this bizsignal knows"), "{e}");
}

#[test]
fn schema_mismatch_is_a_clear_error() {
    let ch = ChServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = unique_db("mis");
    tsv(&rt, &ch, &db, "CREATE DATABASE {db}");
    tsv(
        &rt,
        &ch,
        &db,
        "CREATE TABLE {db}.business_events (event_id UInt64, time DateTime) ENGINE = MergeTree ORDER BY event_id",
    );
    let e = rt.block_on(ch::migrate(&ch.config(&db))).unwrap_err().to_string();
    assert!(e.contains("does not match") && e.contains("event_id is UInt64"), "{e}");
}

#[test]
fn bad_password_and_unreachable_url_name_the_url_not_the_password() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = bizsignal::config::ClickHouseConfig { url: "http://127.0.0.1:9".into(), ..Default::default() };
    cfg.password = Some("s3cret-pw".into());
    let e = rt.block_on(ch::migrate(&cfg)).unwrap_err().to_string();
    assert!(e.contains("http://127.0.0.1:9") && !e.contains("s3cret-pw") && !e.contains('\n'), "{e}");
    let ch = ChServer::start();
    if ch.is_local() {
        // The front checks passwords only when started with one: a wrong user is refused by a real server too.
        let mut cfg = ch.config(&unique_db("pw"));
        cfg.user = "nobody_here".into();
        cfg.password = Some("s3cret-pw".into());
        if let Err(e) = rt.block_on(ch::migrate(&cfg)) {
            let e = e.to_string();
            assert!(e.contains(&ch.url) && !e.contains("s3cret-pw") && !e.contains('\n'), "{e}");
        }
    }
}

#[test]
fn same_group_replayed_after_a_crash_is_not_duplicated() {
    let Fixture { ch, rt, db, cfg, dir } = Fixture::new("dup");
    let t = bizsignal::now_ns();
    let mut run = run_r1(t);
    let b = batch(&mut run, &[signal(1, "r1", t, 10.0), signal(3, "r1", t + 1, 5.0)]);
    // Spool the batch with a writer that cannot reach ClickHouse, and keep a copy of the spool.
    let store = open(&rt, &cfg, dir.path());
    drop(store);
    let spool_dir = dir.path().join("clickhouse-spool");
    {
        let spool = bizsignal::storage::spool::Spool::open(&spool_dir, 1 << 30).unwrap();
        let rec = serde_json::json!({"written_ns": t, "events": b.events().collect::<Vec<_>>(), "runs": b.runs, "merges": [], "aliases": [], "process_violations": []});
        spool.append(&serde_json::to_vec(&rec).unwrap()).unwrap();
    }
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&spool_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
    }
    let counts = |rt: &tokio::runtime::Runtime| {
        tsv(rt, &ch, &db, "SELECT sumMap(counts), sum(signal_count) FROM {db}.process_runs WHERE run_id = 'r1'")
    };
    let store = open(&rt, &cfg, dir.path());
    store.flush(Duration::from_secs(30)).unwrap();
    drop(store);
    let first = counts(&rt);
    assert_eq!(first, "{'ok':15}\t2");
    // "Crash": the spool comes back as it was before ClickHouse acknowledged; the same group is sent again.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(&spool_dir).unwrap();
    std::fs::create_dir_all(&spool_dir).unwrap();
    for e in std::fs::read_dir(copy.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), spool_dir.join(e.file_name())).unwrap();
    }
    let store = open(&rt, &cfg, dir.path());
    assert_eq!(store.spool_len(), 1);
    store.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(counts(&rt), first, "process_runs unchanged after the replay");
    assert_eq!(tsv(&rt, &ch, &db, "SELECT count() FROM {db}.business_events"), "4");

    // The same block inserted twice with the same token, bypassing the writer's event-id check.
    let client = clickhouse::Client::default()
        .with_url(ch.url.clone())
        .with_database(db.clone())
        .with_compression(clickhouse::Compression::Lz4);
    let rows: Vec<ch::schema::EventRow> = batch(&mut run, &[signal(5, "r1", t + 2, 7.0)])
        .events()
        .map(|e| ch::schema::EventRow::from_event(&e))
        .collect();
    for _ in 0..2 {
        rt.block_on(async {
            let mut ins = client
                .insert::<ch::schema::EventRow>("business_events")
                .await
                .unwrap()
                .with_setting("insert_deduplication_token", "test-token-1");
            for r in &rows {
                ins.write(r).await.unwrap();
            }
            ins.end().await.unwrap();
        });
    }
    assert_eq!(counts(&rt), "{'ok':22}\t3", "the repeated block was dropped");
    // Signal ids with their earliest time, whole and by range (the tracker's
    // de-duplication of signals older than its window).
    let key = run.key();
    let mut ids = store.signal_ids(&key, i64::MIN, i64::MAX).unwrap();
    ids.sort();
    assert_eq!(ids, vec![(1, t), (3, t + 1), (5, t + 2)]);
    assert_eq!(store.signal_ids(&key, t + 1, t + 1).unwrap(), vec![(3, t + 1)], "range, both ends included");
    assert_eq!(store.get_run(&run.key()).unwrap().unwrap().counts.get("ok"), Some(&22.0));
}

#[test]
fn an_undecodable_spool_record_is_dead_lettered_once_and_the_rest_delivered() {
    let Fixture { ch, rt, db, cfg, dir } = Fixture::new("dead");
    let t = bizsignal::now_ns();
    let b = batch(&mut run_r1(t), &[signal(1, "r1", t, 10.0)]);
    drop(open(&rt, &cfg, dir.path()));
    {
        // Checksummed (so not a torn tail) but not a batch, between two good records.
        let spool = bizsignal::storage::spool::Spool::open(&dir.path().join("clickhouse-spool"), 1 << 30).unwrap();
        let good = bizsignal::storage::spool::SpoolBatch::encode(&b);
        spool.append(&good).unwrap();
        spool.append(br#"{"written_ns": 1, "not": "a batch"}"#).unwrap();
        let mut run2 = ProcessRun::new(&RunKey { process: "import".into(), run_id: "r2".into() }, t);
        spool
            .append(&bizsignal::storage::spool::SpoolBatch::encode(&batch(&mut run2, &[signal(2, "r2", t, 4.0)])))
            .unwrap();
    }
    let store = open(&rt, &cfg, dir.path());
    store.flush(Duration::from_secs(30)).unwrap();
    drop(store);
    let dead = std::fs::read_to_string(dir.path().join("clickhouse-dead-letter.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("undecodable spool record 2") && dead.contains("a batch"), "{dead}");
    let counts =
        tsv(&rt, &ch, &db, "SELECT run_id, sumMap(counts) FROM {db}.process_runs GROUP BY run_id ORDER BY run_id");
    assert_eq!(counts, "r1\t{'ok':10}\nr2\t{'ok':4}");
}

#[test]
fn two_instances_writing_one_run_converge() {
    let ch = ChServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = unique_db("conv");
    let cfg = ch.config(&db);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(&rt, &cfg, d1.path()), open(&rt, &cfg, d2.path()));
    let t = bizsignal::now_ns();
    let key = RunKey { process: "import".into(), run_id: "shared".into() };
    // Each instance sees part of the run's signals.
    let (mut ra, mut rb) = (ProcessRun::new(&key, t), ProcessRun::new(&key, t));
    a.write(batch(&mut ra, &[signal(11, "shared", t, 10.0), signal(13, "shared", t + 10, 1.0)])).unwrap();
    let mut end = signal(15, "shared", t + 20, 4.0);
    end.facts.push(Fact::Status { status: bizsignal::signal::LifecycleStatus::Succeeded, error: None });
    b.write(batch(&mut rb, &[end])).unwrap();
    a.flush(Duration::from_secs(30)).unwrap();
    b.flush(Duration::from_secs(30)).unwrap();
    let rows = tsv(&rt, &ch, &db, "SELECT run_id, sumMap(counts), sum(signal_count), tupleElement(max(terminal), 4) FROM {db}.process_runs GROUP BY process, run_id");
    assert_eq!(rows, "shared\t{'ok':15}\t3\tsucceeded", "one converged row");
    for s in [&a, &b] {
        let r = s.get_run(&key).unwrap().unwrap();
        assert_eq!((r.counts.get("ok"), r.signal_count, r.status.as_str()), (Some(&15.0), 3, "succeeded"));
    }
}

/// The whole server on ClickHouse: OTLP/JSON in, REST out; then an outage
/// while signals arrive (the spool grows), and recovery (every signal stored once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_on_clickhouse_rides_out_an_outage() {
    let mut chs = ChServer::start();
    if !chs.is_local() {
        eprintln!("skipping the outage part: it stops and restarts the local chDB front");
    }
    let db = unique_db("srv");
    let chcfg = chs.config(&db);
    let srv = Server::start_with(|c| {
        c.storage.kind = StorageKind::Clickhouse;
        c.storage.clickhouse = chcfg.clone();
    })
    .await;
    let send = |run: &str, i: i64| {
        logs_json(
            "importer",
            &[(
                now(),
                "step",
                vec![
                    ("business.process.name", s("import")),
                    ("business.run.id", s(run)),
                    ("business.records.ok", n(i)),
                ],
            )],
        )
    };
    let (st, body) = srv.post_json("/v1/logs", &send("before", 5)).await;
    assert_eq!(st, 200, "{body}");
    let v = srv.wait_run("import", "before", Duration::from_secs(30), |v| v["counts"]["ok"] == 5.0).await;
    assert_eq!(v["status"], "running", "{v}");
    if !chs.is_local() {
        srv.stop().await;
        return;
    }
    // Outage: intake continues into the spool.
    let spool_records = || srv.app().metrics.clickhouse.spool_records.load(std::sync::atomic::Ordering::Relaxed);
    tokio::task::block_in_place(|| chs.stop());
    for i in 0..10 {
        let (st, body) = srv.post_json("/v1/logs", &send("during", i + 1)).await;
        assert_eq!(st, 200, "request {i} during the outage: {body}");
    }
    assert!(spool_records() >= 10, "spool grows: {}", spool_records());
    // A signal stamped an hour ago is older than the de-duplication window:
    // whether it is a duplicate only ClickHouse can say, so it is refused
    // (retryably) rather than risk counting it twice; after the outage it is taken.
    let late_body = logs_json(
        "importer",
        &[(
            now() - 3_600_000_000_000,
            "late",
            vec![
                ("business.process.name", s("import")),
                ("business.run.id", s("before")),
                ("business.records.ok", n(100)),
            ],
        )],
    );
    let (st, body) = srv.post_json("/v1/logs", &late_body).await;
    assert_eq!(st, 503, "late signal during the outage: {body}");
    let (_, metrics) = (0, srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap());
    assert!(metrics.contains("bizsignal_clickhouse_spool_oldest_age_seconds"), "{metrics}");
    tokio::task::block_in_place(|| chs.restart());
    let deadline = Instant::now() + Duration::from_secs(60);
    while spool_records() > 0 {
        assert!(Instant::now() < deadline, "spool did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = srv.wait_run("import", "during", Duration::from_secs(30), |v| v["counts"]["ok"] == 55.0).await;
    assert_eq!(v["signal_count"], 10, "{v}");
    for _ in 0..2 {
        let (st, body) = srv.post_json("/v1/logs", &late_body).await;
        assert_eq!(st, 200, "late signal after the outage: {body}");
    }
    let v = srv.wait_run("import", "before", Duration::from_secs(30), |v| v["counts"]["ok"] == 105.0).await;
    assert_eq!(v["signal_count"], 2, "the late signal counted once: {v}");
    let q = format!("SELECT count(), uniqExact(event_id) FROM {db}.business_events WHERE run_id = 'during'");
    assert_eq!(chs.tsv(&q).await.trim(), "20\t20", "every signal exactly once");
    srv.stop().await;
}

/// Every ```sql block of docs/storage.md runs, on data written through the store.
#[test]
fn docs_example_queries_run() {
    let ch = ChServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = unique_db("docs");
    let cfg = ch.config(&db);
    let dir = tempfile::tempdir().unwrap();
    let store = open(&rt, &cfg, dir.path());
    let t = bizsignal::now_ns();
    let mut run = ProcessRun::new(&RunKey { process: "import".into(), run_id: "r1".into() }, t);
    let mut skipped = signal(21, "r1", t, 3.0);
    skipped.facts.push(Fact::Records { outcome: "skipped".into(), count: 2.0 });
    skipped.facts.push(Fact::ProgressDone(5.0));
    skipped.facts.push(Fact::ProgressTotal(10.0));
    store.write(batch(&mut run, &[skipped])).unwrap();
    store.flush(Duration::from_secs(30)).unwrap();
    let doc =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/storage.md")).unwrap();
    let queries: Vec<&str> = doc.split("```sql\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert_eq!(queries.len(), 10, "ten example queries");
    let client = reqwest::Client::new();
    let run_q = |q: &str| {
        rt.block_on(async {
            let r = client
                .post(format!("{}/?database={db}&default_format=TabSeparated", ch.url))
                .body(q.to_string())
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        })
    };
    for q in &queries {
        let (status, text) = run_q(q);
        assert!(status.is_success(), "{q}\n{text}");
    }
    let r = run_q(queries[1]).1;
    assert!(r.contains("import\t2"), "skipped records per day: {r}");
}
