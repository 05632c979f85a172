//! One conformance suite for the `Store` interface, run against SQLite and
//! ClickHouse (the chDB-backed front, or BIZSIGNAL_TEST_CLICKHOUSE_URL), so
//! the backends cannot drift.

mod common;

use bizsignal::runs::run::{ProcessRun, RunStatus, Violation};
use bizsignal::signal::{Attributes, Fact, LifecycleStatus, RunKey, Signal, SignalKind};
use bizsignal::storage::clickhouse::ClickHouseStore;
use bizsignal::storage::sqlite::SqliteStore;
use bizsignal::storage::{RunQuery, Store, WriteBatch};
use std::sync::Arc;
use std::time::Duration;

// Recent (whole seconds, an hour ago): ClickHouse's TTL drops rows older than ttl_days.
static T0_CELL: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
#[allow(non_snake_case)]
fn T0() -> i64 {
    *T0_CELL.get_or_init(|| (bizsignal::now_ns() / 1_000_000_000 - 3600) * 1_000_000_000)
}
const S: i64 = 1_000_000_000;

fn sig(id: u128, process: &str, run_id: Option<&str>, trace: &str, t: i64, facts: Vec<Fact>) -> Signal {
    Signal {
        id,
        kind: if id.is_multiple_of(2) { SignalKind::Span } else { SignalKind::Log },
        process: process.into(),
        run_id: run_id.map(str::to_string),
        trace_id: trace.into(),
        span_id: format!("{:016x}", id),
        name: format!("step-{id}"),
        start_ns: t,
        time_ns: if id.is_multiple_of(2) { t + 2 * S } else { t },
        text: format!("text {id}"),
        service: format!("svc-{}", id % 3),
        attributes: Attributes::from_pairs(&[("a".into(), format!("{id}")), ("k".into(), "v".into())]),
        resource: vec![("service.name".into(), format!("svc-{}", id % 3))].into(),
        facts,
    }
}

/// Folds signals into `run` the way the tracker does and returns the batch.
fn fold(run: &mut ProcessRun, signals: &[Signal]) -> WriteBatch {
    let mut b = WriteBatch::default();
    for s in signals {
        run.apply(s, T0());
        b.push_events(&s.to_events(&run.run_id));
    }
    b.runs.push(std::sync::Arc::new(run.clone()));
    b
}

fn key(p: &str, r: &str) -> RunKey {
    RunKey { process: p.into(), run_id: r.into() }
}

fn write(store: &dyn Store, b: &WriteBatch) {
    store.write(b.clone()).unwrap();
    store.flush(Duration::from_secs(30)).unwrap();
}

pub fn suite(store: &dyn Store) {
    // A full run in two commits.
    let k = key("import", "r1");
    let mut run = ProcessRun::new(&k, T0());
    let first = vec![
        sig(
            2,
            "import",
            Some("r1"),
            "t1",
            T0(),
            vec![Fact::Status { status: LifecycleStatus::Started, error: None }, Fact::ProgressTotal(100.0)],
        ),
        sig(
            3,
            "import",
            Some("r1"),
            "t1",
            T0() + S,
            vec![
                Fact::Records { outcome: "ok".into(), count: 10.0 },
                Fact::ProgressDone(10.0),
                Fact::Milestone("parsed".into()),
            ],
        ),
        sig(
            5,
            "import",
            Some("r1"),
            "t1",
            T0() + 3 * S,
            vec![
                Fact::Note("half way".into()),
                Fact::Value { name: "amount".into(), value: 12.5 },
                Fact::Payload("{\"x\":1}".into()),
            ],
        ),
    ];
    write(store, &fold(&mut run, &first));
    assert_eq!(store.get_run(&k).unwrap().as_ref(), Some(&run), "run after the first commit");
    assert_eq!(
        store.load_open_runs().unwrap().iter().filter(|r| r.process == "import").cloned().collect::<Vec<_>>(),
        vec![run.clone()]
    );
    let second = vec![
        sig(
            7,
            "import",
            Some("r1"),
            "t1",
            T0() + 4 * S,
            vec![
                Fact::Records { outcome: "ok".into(), count: 5.0 },
                Fact::Records { outcome: "skipped".into(), count: 2.0 },
                Fact::ProgressDone(100.0),
                Fact::Value { name: "amount".into(), value: 20.0 },
            ],
        ),
        sig(
            8,
            "import",
            Some("r1"),
            "t1",
            T0() + 5 * S,
            vec![Fact::Milestone("loaded".into()), Fact::Status { status: LifecycleStatus::Succeeded, error: None }],
        ),
    ];
    let b2 = fold(&mut run, &second);
    write(store, &b2);
    let got = store.get_run(&k).unwrap().expect("run stored");
    assert_eq!(got, run, "run after the second commit");
    assert_eq!(got.status, RunStatus::Succeeded);
    assert_eq!(got.counts.get("ok"), Some(&15.0));
    assert!(store.load_open_runs().unwrap().iter().all(|r| r.process != "import"), "an ended run is not open");

    // Events in time order; a re-written batch changes nothing.
    let events = store.run_events(&k, 1000).unwrap();
    let n_events: usize = first.iter().chain(&second).map(|s| s.facts.len() + 1).sum();
    assert_eq!(events.len(), n_events);
    assert!(events.windows(2).all(|w| (w[0].time_ns, &w[0].event_id) <= (w[1].time_ns, &w[1].event_id)));
    // Ids with their time (the earliest row time), whole and by range (the
    // tracker's de-duplication of signals older than its window reads these).
    let mut ids = store.signal_ids(&k, i64::MIN, i64::MAX).unwrap();
    ids.sort();
    assert_eq!(ids, vec![(2, T0()), (3, T0() + S), (5, T0() + 3 * S), (7, T0() + 4 * S), (8, T0() + 5 * S)]);
    let mut ids = store.signal_ids(&k, T0() + S, T0() + 4 * S).unwrap();
    ids.sort();
    assert_eq!(ids, vec![(3, T0() + S), (5, T0() + 3 * S), (7, T0() + 4 * S)], "range, both ends included");
    write(store, &b2);
    assert_eq!(store.run_events(&k, 1000).unwrap().len(), n_events, "re-write is idempotent");
    assert_eq!(store.get_run(&k).unwrap().unwrap(), run, "re-write leaves the run alone");
    assert_eq!(store.run_events(&k, 3).unwrap().len(), 3, "limit");

    // Paging and filters.
    let mut all = Vec::new();
    for i in 0..5i64 {
        let k = key("paged", &format!("p{i}"));
        let mut r = ProcessRun::new(&k, T0());
        let mut facts = vec![Fact::Records { outcome: "ok".into(), count: i as f64 + 1.0 }];
        if i % 2 == 0 {
            facts.push(Fact::Status { status: LifecycleStatus::Failed, error: Some("boom".into()) });
        }
        write(
            store,
            &fold(
                &mut r,
                &[sig(100 + i as u128 * 2, "paged", Some(&k.run_id), &format!("tp{i}"), T0() + i * 60 * S, facts)],
            ),
        );
        all.push(r);
    }
    all.reverse();
    let mut page = RunQuery { process: Some("paged".into()), limit: 2, ..Default::default() };
    let mut seen = Vec::new();
    loop {
        let (runs, next) = store.list_runs(&page).unwrap();
        seen.extend(runs);
        match next {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, all, "pages chain newest first");
    let (failed, _) = store
        .list_runs(&RunQuery {
            process: Some("paged".into()),
            status: Some(RunStatus::Failed),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(failed.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["p4", "p2", "p0"]);
    assert_eq!(failed[0].error(), Some("boom"));
    let (since, _) =
        store.list_runs(&RunQuery { since_ns: Some(T0() + 180 * S), limit: 10, ..Default::default() }).unwrap();
    assert_eq!(since.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), vec!["p4", "p3"]);

    // Aliases: the first wins.
    write(
        store,
        &WriteBatch { aliases: vec![("orders".into(), "trace-a".into(), "order-1".into())], ..Default::default() },
    );
    write(
        store,
        &WriteBatch { aliases: vec![("orders".into(), "trace-a".into(), "order-2".into())], ..Default::default() },
    );
    assert_eq!(store.alias("orders", "trace-a").unwrap().as_deref(), Some("order-1"));
    assert_eq!(store.alias("orders", "trace-b").unwrap(), None);

    // A trace-keyed run merged into a named run.
    let tk = key("orders", "trace-m");
    let mut traced = ProcessRun::new(&tk, T0());
    write(
        store,
        &fold(
            &mut traced,
            &[sig(201, "orders", None, "trace-m", T0(), vec![Fact::Records { outcome: "ok".into(), count: 3.0 }])],
        ),
    );
    assert!(store.get_run(&tk).unwrap().is_some());
    let nk = key("orders", "order-9");
    let mut named = ProcessRun::new(&nk, T0());
    let s2 = sig(
        203,
        "orders",
        Some("order-9"),
        "trace-m",
        T0() + S,
        vec![Fact::Records { outcome: "ok".into(), count: 4.0 }],
    );
    named.apply(&s2, T0());
    named.merge(&traced);
    let mut mb = WriteBatch { runs: vec![std::sync::Arc::new(named.clone())], ..Default::default() };
    mb.push_events(&s2.to_events("order-9"));
    mb.merges.push((tk.clone(), "order-9".into()));
    mb.aliases.push(("orders".into(), "trace-m".into(), "order-9".into()));
    write(store, &mb);
    assert_eq!(store.get_run(&tk).unwrap(), None, "the trace-keyed run is gone");
    assert_eq!(store.run_events(&tk, 100).unwrap().len(), 0);
    let merged = store.get_run(&nk).unwrap().unwrap();
    assert_eq!(merged.counts.get("ok"), Some(&7.0));
    assert_eq!(merged, named);
    assert_eq!(store.run_events(&nk, 100).unwrap().len(), 4, "moved events plus new ones");
    let mut ids: Vec<u128> = store.signal_ids(&nk, i64::MIN, i64::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
    ids.sort();
    assert_eq!(ids, vec![201, 203]);

    // Process violations and the board.
    let v = Violation { rule: "deadline".into(), message: "no successful run by 06:00".into(), at_ns: T0() + 9 * S };
    write(store, &WriteBatch { process_violations: vec![("nightly".into(), v.clone())], ..Default::default() });
    let procs = store.list_processes().unwrap();
    assert_eq!(procs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), vec!["import", "nightly", "orders", "paged"]);
    let nightly = &procs[1];
    assert_eq!(nightly.violations, vec![v]);
    assert!(nightly.latest_run.is_none());
    let import = &procs[0];
    assert_eq!(import.latest_run.as_ref(), Some(&run));
    assert_eq!(import.last_success_at_ns, run.ended_at_ns());
    assert_eq!(import.active_runs, 0);
    assert_eq!(procs[3].active_runs, 2);
    assert_eq!(procs[3].latest_run.as_ref().map(|r| r.run_id.as_str()), Some("p4"));
    let mut ls = store.last_successes().unwrap();
    ls.sort();
    assert_eq!(ls, vec![("import".to_string(), run.ended_at_ns().unwrap())]);
}

#[test]
fn sqlite_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    suite(&store);
}

#[test]
fn clickhouse_conforms() {
    let ch = common::chdb::ChServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ch.config(&common::chdb::unique_db("conf"));
    let store: Arc<ClickHouseStore> =
        Arc::new(rt.block_on(ClickHouseStore::open(&cfg, dir.path(), Arc::new(Default::default()))).unwrap());
    suite(store.as_ref());
}
