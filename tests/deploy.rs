//! The deployment kit in deploy/ (docs/deploy.md), validated statically —
//! there is no container engine in the test environment:
//!
//! * every SQL query of the Grafana dashboards (macros and `${process}`
//!   substituted) runs against the chDB-backed ClickHouse after a bizsignal
//!   server on ClickHouse created the schema and stored signals;
//! * every PromQL expression (dashboards and alert rules) parses
//!   (`promtool check rules`), and every metric it names is on a live
//!   `/metrics` of that server (or, for series that only appear after a rare
//!   event, in the docs catalogue);
//! * the compose, collector, Prometheus, Grafana and Kubernetes YAML parse,
//!   reference files that exist and agree on names and ports, and the
//!   bizsignal configs pass `bizsignal check-config`.

mod common;

use bizsignal::config::{ProcessExpectations, StorageKind};
use common::chdb::{unique_db, ChServer};
use common::{logs_json, n, now, s, Server};
use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bizsignal");
const CH_TYPE: &str = "grafana-clickhouse-datasource";
const DASHBOARDS: &[&str] = &["business-overview.json", "process-drilldown.json"];

fn deploy(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(deploy(p)).unwrap_or_else(|e| panic!("deploy/{p}: {e}"))
}

fn yaml(p: &str) -> Yaml {
    serde_norway::from_str(&read(p)).unwrap_or_else(|e| panic!("deploy/{p} is not valid YAML: {e}"))
}

/// Every document of a multi-document YAML file.
fn yaml_docs(p: &str) -> Vec<Yaml> {
    let text = read(p);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("deploy/{p} is not valid YAML: {e}")))
        .filter(|v: &Yaml| !v.is_null())
        .collect()
}

fn get<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    let mut cur = v;
    for k in path.split('.') {
        cur = match cur {
            Yaml::Mapping(m) => {
                m.get(Yaml::String(k.to_string())).unwrap_or_else(|| panic!("missing key {k:?} (of {path:?}) in {v:?}"))
            }
            Yaml::Sequence(s) => &s[k.parse::<usize>().unwrap()],
            _ => panic!("{path}: {k:?} not found in {cur:?}"),
        };
    }
    cur
}

fn str_of<'a>(v: &'a Yaml, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string"))
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| match x {
                    Yaml::String(s) => s.clone(),
                    Yaml::Number(n) => n.to_string(),
                    o => panic!("not a scalar: {o:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn keys(v: &Yaml) -> BTreeSet<String> {
    v.as_mapping().map(|m| m.keys().map(|k| k.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn dashboard(name: &str) -> Json {
    serde_json::from_str(&read(&format!("grafana/dashboards/{name}")))
        .unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"))
}

/// Every query target of a dashboard (panels nested in rows included):
/// (panel title, target).
fn targets(d: &Json) -> Vec<(String, Json)> {
    fn walk(panels: &Json, out: &mut Vec<(String, Json)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let mut t = t.clone();
                if t.get("datasource").is_none() {
                    t["datasource"] = p["datasource"].clone();
                }
                out.push((title.clone(), t));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The SQL of a dashboard: (label, sql) for each ClickHouse target and variable.
fn dashboard_sql(d: &Json) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = targets(d)
        .into_iter()
        .filter(|(_, t)| t["datasource"]["type"] == CH_TYPE)
        .map(|(title, t)| {
            let sql =
                t["rawSql"].as_str().unwrap_or_else(|| panic!("panel {title:?}: ClickHouse target without rawSql"));
            (title, sql.to_string())
        })
        .collect();
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        if var["datasource"]["type"] == CH_TYPE {
            v.push((format!("variable {}", var["name"]), var["query"].as_str().expect("variable query").to_string()));
        }
    }
    v
}

/// The PromQL of a dashboard: (panel title, expr).
fn dashboard_promql(d: &Json) -> Vec<(String, String)> {
    targets(d)
        .into_iter()
        .filter(|(_, t)| t["datasource"]["type"] == "prometheus")
        .map(|(title, t)| {
            let e = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: Prometheus target without expr"));
            (title, e.to_string())
        })
        .collect()
}

/// What Grafana's ClickHouse plugin does with the macros (time in seconds),
/// plus the dashboard variable. Anything `$` left over is an unknown macro.
fn substitute_sql(sql: &str, from: i64, to: i64, process: &str) -> String {
    let filter = regex::Regex::new(r"\$__timeFilter\(([^()]+)\)").unwrap();
    let interval = regex::Regex::new(r"\$__timeInterval\(([^()]+)\)").unwrap();
    let mut q = filter
        .replace_all(sql, |c: &regex::Captures| {
            let col = c[1].trim();
            format!("{col} >= toDateTime({from}) AND {col} <= toDateTime({to})")
        })
        .into_owned();
    q = interval
        .replace_all(&q, |c: &regex::Captures| {
            format!("toStartOfInterval(toDateTime({}), INTERVAL 60 second)", c[1].trim())
        })
        .into_owned();
    q = q
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
        .replace("${process}", process)
        .replace("$process", process);
    assert!(!q.contains('$'), "unsubstituted macro or variable left in:\n{q}");
    q
}

/// What Grafana does with its PromQL variables before sending the query.
fn substitute_promql(e: &str) -> String {
    let q = e
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${process}", "import")
        .replace("$process", "import");
    assert!(!q.contains('$'), "unsubstituted variable left in: {q}");
    q
}

/// Metric names a PromQL expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let strip = [
        r#""(?:[^"\\]|\\.)*""#,                                             // string literals
        r"\{[^}]*\}",                                                       // label matchers
        r"\[[^\]]*\]",                                                      // ranges
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", // label lists
    ];
    let mut e = expr.to_string();
    for r in strip {
        e = regex::Regex::new(r).unwrap().replace_all(&e, " ").into_owned();
    }
    let ident = regex::Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").unwrap();
    let keywords = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    ident
        .find_iter(&e)
        .filter(|m| !e[m.end()..].trim_start().starts_with('('))
        .filter(|m| m.start() == 0 || !e.as_bytes()[m.start() - 1].is_ascii_digit())
        .map(|m| m.as_str().to_string())
        .filter(|w| !keywords.contains(&w.to_lowercase().as_str()))
        .collect()
}

/// Metric names of the alert rules: (alert, expr).
fn alert_exprs() -> Vec<(String, String)> {
    let y = yaml("prometheus/alerts.yml");
    let mut v = Vec::new();
    for g in get(&y, "groups").as_sequence().unwrap() {
        for r in get(g, "rules").as_sequence().unwrap() {
            v.push((str_of(r, "alert").to_string(), str_of(r, "expr").to_string()));
        }
    }
    assert!(!v.is_empty());
    v
}

// ---------------------------------------------------------------- promtool

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("promtool")).find(|p| p.is_file()));
    if found.is_none() {
        if std::env::var_os("BIZSIGNAL_SKIP_PROMTOOL").is_some() {
            eprintln!("promtool not found; BIZSIGNAL_SKIP_PROMTOOL is set, so PromQL is NOT validated");
            return None;
        }
        panic!(
            "promtool not found on PATH: the deploy tests validate PromQL with it. Install Prometheus' tools \
             (`apt-get install -y prometheus`, which tests/run.sh does when run as root), or set \
             BIZSIGNAL_SKIP_PROMTOOL=1 to skip that check explicitly"
        );
    }
    found
}

fn check_rules(promtool: &Path, file: &Path) -> (bool, String) {
    let out = Command::new(promtool).args(["check", "rules"]).arg(file).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A rules file with one recording rule per expression, so promtool parses each.
fn recording_rules(exprs: &[(String, String)]) -> String {
    let mut groups = serde_norway::Mapping::new();
    let rules: Vec<Yaml> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let mut m = serde_norway::Mapping::new();
            m.insert("record".into(), format!("dashboard:expr_{i}").into());
            m.insert("expr".into(), e.clone().into());
            Yaml::Mapping(m)
        })
        .collect();
    let mut g = serde_norway::Mapping::new();
    g.insert("name".into(), "dashboards".into());
    g.insert("rules".into(), Yaml::Sequence(rules));
    groups.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(g)]));
    serde_norway::to_string(&Yaml::Mapping(groups)).unwrap()
}

#[test]
fn promql_of_rules_and_dashboards_parses() {
    let Some(promtool) = promtool() else { return };
    let (ok, out) = check_rules(&promtool, &deploy("prometheus/alerts.yml"));
    assert!(ok, "promtool check rules deploy/prometheus/alerts.yml:\n{out}");
    let n_alerts = alert_exprs().len();
    assert!(out.contains(&format!("{n_alerts} rules found")), "{out}");

    let mut exprs = Vec::new();
    for d in DASHBOARDS {
        let q = dashboard_promql(&dashboard(d));
        assert!(q.len() >= 5, "{d}: expected PromQL panels, found {}", q.len());
        exprs.extend(q.into_iter().map(|(t, e)| (format!("{d}: {t}"), substitute_promql(&e))));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboards.rules.yml");
    std::fs::write(&file, recording_rules(&exprs)).unwrap();
    let (ok, out) = check_rules(&promtool, &file);
    assert!(ok, "dashboard PromQL does not parse:\n{out}\n{exprs:#?}");
    assert!(out.contains(&format!("{} rules found", exprs.len())), "{out}");

    // The check itself catches a broken expression.
    let bad = dir.path().join("bad.rules.yml");
    let broken = vec![("broken".to_string(), "sum by (x) (rate(foo[5m])".to_string())];
    std::fs::write(&bad, recording_rules(&broken)).unwrap();
    assert!(!check_rules(&promtool, &bad).0, "promtool accepted a broken expression");
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"sum by (business_process_name, le) (rate(business_process_run_duration_seconds_bucket{business_process_name="$process"}[$__rate_interval])) / on (x) group_left time() - up{job="a"} > 26 * 3600"#,
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["business_process_run_duration_seconds_bucket", "up"]);
}

// ---------------------------------------------------------------- live server

/// The /metrics sample names of a server.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Metric names (with histogram and counter suffixes) the docs catalogue.
fn documented_names() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    ["metrics.md", "storage.md"].iter().map(|f| std::fs::read_to_string(root.join(f)).unwrap()).collect()
}

/// Dashboards' SQL runs on ClickHouse with bizsignal's schema and data; the
/// metric names of the dashboards and rules exist on a live /metrics; the
/// probe paths of the Kubernetes manifests answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_work_against_a_live_server_on_clickhouse() {
    let chs = ChServer::start();
    let db = unique_db("deploy");
    let chcfg = chs.config(&db);
    let srv = Server::start_with(|c| {
        c.storage.kind = StorageKind::Clickhouse;
        c.storage.clickhouse = chcfg.clone();
        c.processes.insert(
            "import".into(),
            ProcessExpectations { stall_after: Some(Duration::from_secs(2)), ..Default::default() },
        );
    })
    .await;
    let t = now();
    let log = |dt: u64, run: &str, extra: Vec<(&'static str, serde_json::Value)>| {
        let mut a = vec![("business.process.name", s("import")), ("business.run.id", s(run))];
        a.extend(extra);
        (t + dt, "step", a)
    };
    let body = logs_json(
        "importer",
        &[
            log(
                0,
                "ok",
                vec![
                    ("business.records.imported", n(10)),
                    ("business.records.skipped", n(2)),
                    ("business.progress.done", n(10)),
                    ("business.progress.total", n(12)),
                    ("business.milestone", s("loaded")),
                ],
            ),
            log(1_000_000, "ok", vec![("business.run.status", s("succeeded"))]),
            log(0, "bad", vec![("business.records.imported", n(1))]),
            log(
                2_000_000,
                "bad",
                vec![("business.run.status", s("failed")), ("business.error.message", s("feed unreachable"))],
            ),
            log(0, "stuck", vec![("business.progress.done", n(3)), ("business.progress.total", n(9))]),
            // Rejected (not a number): exercises bizsignal_records_rejected_total.
            log(0, "invalid", vec![("business.records.imported", s("many"))]),
        ],
    );
    let (st, resp) = srv.post_json("/v1/logs", &body).await;
    assert_eq!(st, 200, "{resp}");
    srv.wait_run("import", "ok", Duration::from_secs(30), |v| v["status"] == "succeeded").await;
    srv.wait_run("import", "bad", Duration::from_secs(30), |v| v["status"] == "failed").await;
    srv.wait_run("import", "stuck", Duration::from_secs(30), |v| v["status"] == "stalled").await;

    // Probes of deploy/kubernetes/deployment.yaml and the compose health check.
    for p in ["/healthz", "/readyz"] {
        let r = srv.http.get(srv.api(p)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{p}");
    }

    // Everything drained into ClickHouse, including the stall.
    let client = reqwest::Client::new();
    let query = |sql: String| {
        let client = client.clone();
        let url = format!("{}/?database={db}&default_format=TabSeparated", chs.url);
        async move {
            let r = client.post(url).body(sql).send().await.unwrap();
            (r.status().is_success(), r.text().await.unwrap())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = query("SELECT count() FROM run_state WHERE status = 'stalled'".into()).await;
        let spooled = srv.app().metrics.clickhouse.spool_records.load(std::sync::atomic::Ordering::Relaxed);
        if ok && out.trim() != "0" && spooled == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the stall never reached ClickHouse: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every dashboard query runs.
    let now_s = (t / 1_000_000_000) as i64;
    let (from, to) = (now_s - 86_400, now_s + 3_600);
    let mut results: BTreeMap<String, String> = BTreeMap::new();
    let mut n_sql = 0;
    for d in DASHBOARDS {
        let sql = dashboard_sql(&dashboard(d));
        assert!(sql.len() >= 5, "{d}: expected ClickHouse panels, found {}", sql.len());
        for (title, q) in sql {
            let q = substitute_sql(&q, from, to, "import");
            let (ok, out) = query(q.clone()).await;
            assert!(ok, "{d}: panel {title:?} fails on ClickHouse:\n{q}\n{out}");
            results.insert(format!("{d}: {title}"), out);
            n_sql += 1;
        }
    }
    eprintln!("{n_sql} dashboard queries ran");
    let r = |k: &str| results.get(k).unwrap_or_else(|| panic!("no panel {k:?}: {:?}", results.keys()));
    let by_status = r("business-overview.json: Runs by status (started in range)");
    for row in ["failed\t1", "stalled\t1", "succeeded\t1"] {
        assert!(by_status.contains(row), "runs by status lacks {row:?}:\n{by_status}");
    }
    let late = r("business-overview.json: Stalled and late runs");
    assert!(late.contains("stuck\tstalled") && late.contains("stall_after"), "{late}");
    assert!(!late.contains("\tok\t"), "{late}");
    assert!(r("business-overview.json: Freshness: since last success").starts_with("import\t"));
    let recs = r("business-overview.json: Records by outcome");
    assert!(recs.contains("imported\t11") && recs.contains("skipped\t2"), "{recs}");
    let runs = r("process-drilldown.json: Runs");
    for id in ["ok\tsucceeded", "bad\tfailed", "stuck\tstalled"] {
        assert!(runs.contains(id), "{runs}");
    }
    assert!(r("process-drilldown.json: Failed runs").contains("feed unreachable"));
    assert!(r("process-drilldown.json: Milestones").starts_with("loaded\t1"));
    assert!(r("process-drilldown.json: Progress of open runs").starts_with("stuck\t3\t9"));
    assert!(r("process-drilldown.json: Violations").contains("stall_after"));
    assert_eq!(r("process-drilldown.json: variable \"process\"").trim(), "import");

    // Every metric the dashboards and alert rules select exists.
    let text = srv.http.get(srv.api("/metrics")).send().await.unwrap().text().await.unwrap();
    let live = sample_names(&text);
    let docs = documented_names();
    // Series that appear only after a rare event; they must be catalogued.
    let rare = ["bizsignal_metrics_overflow_total"];
    let mut exprs: Vec<(String, String)> = alert_exprs();
    for d in DASHBOARDS {
        exprs.extend(dashboard_promql(&dashboard(d)));
    }
    let mut missing = Vec::new();
    for (what, e) in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{what}: no metric in {e}");
        for m in names {
            if m == "up" {
                continue; // Prometheus' own scrape health series
            }
            let known = live.contains(&m) || (rare.contains(&m.as_str()) && docs.contains(&format!("`{m}`")));
            if !known {
                missing.push(format!("{what}: {m}"));
            }
        }
    }
    assert!(missing.is_empty(), "metrics not on /metrics:\n{}\n--- /metrics:\n{text}", missing.join("\n"));
    srv.stop().await;
}

// ---------------------------------------------------------------- static checks

fn check_config(file: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(BIN);
    c.arg("check-config").arg(file).env_remove("CLICKHOUSE_PASSWORD");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `host:port` → (host, port).
fn host_port(s: &str) -> (String, u16) {
    let s = s.trim_start_matches("http://");
    let s = s.split('/').next().unwrap();
    let (h, p) = s.rsplit_once(':').unwrap_or_else(|| panic!("no port in {s:?}"));
    (h.to_string(), p.parse().unwrap())
}

fn port_of(addr: &str) -> u16 {
    host_port(addr).1
}

/// A compose service's bind mounts: container path → file under deploy/.
fn bind_mounts(svc: &Yaml) -> BTreeMap<String, String> {
    strings(get(svc, "volumes"))
        .into_iter()
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let src = parts.next().unwrap().trim_start_matches("./").to_string();
            let dst = parts.next().unwrap().to_string();
            assert!(deploy(&src).exists(), "compose mounts deploy/{src}, which does not exist");
            (dst, src)
        })
        .collect()
}

#[test]
fn deploy_configs_pass_check_config() {
    let file = deploy("bizsignal/config.yaml");
    let (ok, out) = check_config(&file, &[("CLICKHOUSE_PASSWORD", "secret")]);
    assert!(ok, "{out}");
    let (ok, out) = check_config(&file, &[]);
    assert!(!ok && out.contains("CLICKHOUSE_PASSWORD"), "the password comes from the environment: {out}");
    let c = yaml("bizsignal/config.yaml");
    assert_eq!(str_of(&c, "storage.kind"), "clickhouse");
    assert_eq!(str_of(&c, "storage.clickhouse.password"), "${env:CLICKHOUSE_PASSWORD}");

    // The Kubernetes ConfigMap's config file.
    let cm = yaml_docs("kubernetes/configmap.yaml").remove(0);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("config.yaml");
    std::fs::write(&f, get(&cm, "data").get("config.yaml").and_then(Yaml::as_str).expect("data[config.yaml]")).unwrap();
    let (ok, out) = check_config(&f, &[("CLICKHOUSE_PASSWORD", "secret")]);
    assert!(ok, "ConfigMap bizsignal-config: {out}");
}

#[test]
fn compose_stack_is_consistent() {
    let compose = yaml("docker-compose.yml");
    let services = get(&compose, "services");
    for s in ["bizsignal", "clickhouse", "otel-collector", "prometheus", "grafana"] {
        get(services, s);
    }
    let named_volumes = keys(get(&compose, "volumes"));
    for s in keys(services) {
        let svc = get(services, &s);
        for v in strings(get(svc, "volumes")) {
            if !v.starts_with("./") {
                let name = v.split(':').next().unwrap();
                assert!(named_volumes.contains(name), "{s}: volume {name} is not declared");
            }
        }
        if s != "bizsignal" {
            assert!(str_of(svc, "image").contains(':'), "{s}: pin the image tag");
        }
    }

    // bizsignal: built from deploy/Dockerfile, config mounted where the command reads it.
    let biz = get(services, "bizsignal");
    assert_eq!(str_of(biz, "build.context"), "..");
    let dockerfile = str_of(biz, "build.dockerfile");
    assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(dockerfile).is_file(), "{dockerfile}");
    let df = read("Dockerfile");
    assert!(
        df.contains("cargo build --release --locked") && df.contains("FROM debian:bookworm-slim"),
        "multi-stage build"
    );
    // What the build copies from the context exists and is not ignored.
    let ignored = read("Dockerfile.dockerignore");
    let ignored: Vec<&str> = ignored.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let mut copied = 0;
    for l in df.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
            assert!(!ignored.contains(src), "{src} is excluded from the build context");
            copied += 1;
        }
    }
    assert!(copied >= 3, "Cargo.toml, Cargo.lock and src are copied");
    for p in ["4317", "4318", "8080"] {
        assert!(df.contains(p), "Dockerfile EXPOSEs {p}");
        assert!(strings(get(biz, "expose")).contains(&p.to_string()), "compose exposes {p}");
    }
    let cmd = strings(get(biz, "command"));
    let arg = |flag: &str| cmd[cmd.iter().position(|a| a == flag).unwrap() + 1].clone();
    let mounts = bind_mounts(biz);
    assert_eq!(mounts.get(&arg("--config")).map(String::as_str), Some("bizsignal/config.yaml"));
    let cfg = yaml("bizsignal/config.yaml");
    assert_eq!(arg("--data-dir"), str_of(&cfg, "data_dir"));
    assert!(
        strings(get(biz, "volumes")).iter().any(|v| v.ends_with(&format!(":{}", arg("--data-dir")))),
        "data dir on a volume"
    );
    let grpc = port_of(str_of(&cfg, "server.otlp_grpc"));
    assert_eq!(
        (grpc, port_of(str_of(&cfg, "server.otlp_http")), port_of(str_of(&cfg, "server.http"))),
        (4317, 4318, 8080)
    );
    assert!(
        get(biz, "environment").get("CLICKHOUSE_PASSWORD").is_some(),
        "password env for ${{env:CLICKHOUSE_PASSWORD}}"
    );

    // bizsignal → ClickHouse: the service name and its HTTP port.
    let (h, p) = host_port(str_of(&cfg, "storage.clickhouse.url"));
    assert_eq!((h.as_str(), p), ("clickhouse", 8123));
    let chsvc = get(services, "clickhouse");
    assert!(str_of(chsvc, "image").starts_with("clickhouse/clickhouse-server:"));
    assert_eq!(str_of(chsvc, "environment.CLICKHOUSE_USER"), str_of(&cfg, "storage.clickhouse.user"));
    assert_eq!(str_of(chsvc, "environment.CLICKHOUSE_DB"), str_of(&cfg, "storage.clickhouse.database"));

    // Collector → bizsignal's OTLP/gRPC port.
    let col = get(services, "otel-collector");
    assert!(str_of(col, "image").starts_with("otel/opentelemetry-collector-contrib:"));
    let colm = bind_mounts(col);
    let colcfg_path = colm.values().find(|v| v.starts_with("otel-collector/")).expect("collector config mounted");
    let colcfg = yaml(colcfg_path);
    let exporters = otlp_exporter_endpoints(&colcfg);
    assert!(!exporters.is_empty(), "{colcfg_path}: an otlp exporter");
    for e in exporters {
        assert_eq!(host_port(&e), ("bizsignal".to_string(), grpc), "{colcfg_path}");
    }
    let cmdline = strings(get(col, "command")).join(" ");
    assert!(colm.keys().any(|k| cmdline.contains(k.as_str())), "the collector reads the mounted config: {cmdline}");

    // Prometheus scrapes bizsignal's /metrics and loads the rules.
    let prom = get(services, "prometheus");
    let pm = bind_mounts(prom);
    let (pcfg_target, _) =
        pm.iter().find(|(_, src)| src.as_str() == "prometheus/prometheus.yml").expect("prometheus.yml mounted");
    assert!(strings(get(prom, "command")).contains(&format!("--config.file={pcfg_target}")));
    let pcfg = yaml("prometheus/prometheus.yml");
    for r in strings(get(&pcfg, "rule_files")) {
        assert_eq!(
            pm.get(&r).map(String::as_str),
            Some("prometheus/alerts.yml"),
            "rule file {r} is the mounted alerts.yml"
        );
    }
    let job = &get(&pcfg, "scrape_configs").as_sequence().unwrap()[0];
    assert_eq!(str_of(job, "metrics_path"), "/metrics");
    let scrape_targets = strings(get(job, "static_configs.0.targets"));
    assert_eq!(scrape_targets, vec![format!("bizsignal:{}", port_of(str_of(&cfg, "server.http")))]);
    // The alert rules refer to the scrape job by name.
    let jobname = str_of(job, "job_name");
    assert!(read("prometheus/alerts.yml").contains(&format!("up{{job=\"{jobname}\"}}")));

    // Grafana: plugin installed, provisioning and dashboards mounted.
    let gf = get(services, "grafana");
    assert!(str_of(gf, "environment.GF_INSTALL_PLUGINS").contains(CH_TYPE));
    assert!(get(gf, "environment").get("CLICKHOUSE_PASSWORD").is_some());
    let gm = bind_mounts(gf);
    let ds_dir =
        gm.iter().find(|(_, s)| s.as_str() == "grafana/provisioning/datasources").expect("datasources mounted").0;
    assert_eq!(ds_dir, "/etc/grafana/provisioning/datasources");
    assert!(gm.contains_key("/etc/grafana/provisioning/dashboards"));
    let provider = yaml("grafana/provisioning/dashboards/dashboards.yaml");
    let dash_path = str_of(&provider, "providers.0.options.path");
    assert_eq!(
        gm.get(dash_path).map(String::as_str),
        Some("grafana/dashboards"),
        "provider path {dash_path} is the mounted dashboards dir"
    );
    let ds = yaml("grafana/provisioning/datasources/datasources.yaml");
    let mut uids = BTreeMap::new();
    for d in get(&ds, "datasources").as_sequence().unwrap() {
        uids.insert(str_of(d, "uid").to_string(), str_of(d, "type").to_string());
        match str_of(d, "type") {
            CH_TYPE => {
                assert_eq!(str_of(d, "jsonData.host"), "clickhouse");
                assert_eq!(get(d, "jsonData.port").as_u64(), Some(8123));
                assert_eq!(str_of(d, "jsonData.protocol"), "http");
                assert_eq!(str_of(d, "jsonData.defaultDatabase"), str_of(&cfg, "storage.clickhouse.database"));
                assert_eq!(str_of(d, "jsonData.username"), str_of(&cfg, "storage.clickhouse.user"));
                assert_eq!(str_of(d, "secureJsonData.password"), "${CLICKHOUSE_PASSWORD}");
            }
            "prometheus" => {
                let ports = strings(get(prom, "ports"));
                let (h, p) = host_port(str_of(d, "url"));
                assert_eq!(h, "prometheus");
                assert!(ports.iter().any(|x| x.ends_with(&format!(":{p}"))), "{ports:?}");
            }
            t => panic!("unexpected datasource type {t}"),
        }
    }
    // Every dashboard on disk; every target uses a provisioned datasource.
    let on_disk: BTreeSet<String> = std::fs::read_dir(deploy("grafana/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(on_disk, DASHBOARDS.iter().map(|s| s.to_string()).collect());
    let mut dash_uids = BTreeSet::new();
    for name in DASHBOARDS {
        let d = dashboard(name);
        assert!(dash_uids.insert(d["uid"].as_str().unwrap().to_string()), "duplicate uid");
        for (title, t) in targets(&d) {
            let uid = t["datasource"]["uid"].as_str().unwrap_or_else(|| panic!("{name}: {title}: no datasource uid"));
            assert_eq!(uids.get(uid).map(String::as_str), t["datasource"]["type"].as_str(), "{name}: {title}");
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            assert_eq!(
                uids.get(v["datasource"]["uid"].as_str().unwrap()).map(String::as_str),
                v["datasource"]["type"].as_str()
            );
        }
    }
    let drill = dashboard("process-drilldown.json");
    assert!(drill["templating"]["list"].as_array().unwrap().iter().any(|v| v["name"] == "process"));
}

/// Endpoints of the collector config's `otlp` exporters that are used in a pipeline.
fn otlp_exporter_endpoints(c: &Yaml) -> Vec<String> {
    let used: BTreeSet<String> =
        get(c, "service.pipelines").as_mapping().unwrap().values().flat_map(|p| strings(get(p, "exporters"))).collect();
    keys(get(c, "exporters"))
        .into_iter()
        .filter(|k| (k == "otlp" || k.starts_with("otlp/")) && used.contains(k))
        .map(|k| str_of(get(c, "exporters"), &format!("{k}.endpoint")).to_string())
        .collect()
}

#[test]
fn collector_configs_are_consistent() {
    let files: Vec<String> = std::fs::read_dir(deploy("otel-collector"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for f in ["forward-all.yaml", "business-only.yaml", "loadbalancing.yaml"] {
        assert!(files.contains(&f.to_string()), "{f}");
    }
    let k8s_services: BTreeSet<String> =
        yaml_docs("kubernetes/service.yaml").iter().map(|s| str_of(s, "metadata.name").to_string()).collect();
    for f in &files {
        let c = yaml(&format!("otel-collector/{f}"));
        // Every component a pipeline names is defined; every pipeline has traces or logs.
        let pipelines = get(&c, "service.pipelines");
        let mut kinds = BTreeSet::new();
        for (name, p) in pipelines.as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            kinds.insert(name.split('/').next().unwrap().to_string());
            for section in ["receivers", "processors", "exporters"] {
                let defined = keys(get(&c, section));
                for comp in strings(p.get(section).unwrap_or(&Yaml::Null)) {
                    assert!(defined.contains(&comp), "{f}: pipeline {name} uses undefined {section} {comp}");
                }
            }
        }
        assert_eq!(kinds, ["logs", "traces"].map(String::from).into(), "{f}: traces and logs pipelines");
        assert_eq!(str_of(&c, "receivers.otlp.protocols.grpc.endpoint"), "0.0.0.0:4317", "{f}");
        assert_eq!(str_of(&c, "receivers.otlp.protocols.http.endpoint"), "0.0.0.0:4318", "{f}");
        for e in otlp_exporter_endpoints(&c) {
            assert_eq!(host_port(&e), ("bizsignal".to_string(), 4317), "{f}");
        }
        match f.as_str() {
            "business-only.yaml" => {
                let filt = get(&c, "processors.filter/business-only");
                for cond in strings(get(filt, "traces.span")).into_iter().chain(strings(get(filt, "logs.log_record"))) {
                    assert!(cond.contains(r#"attributes["business.process.name"] == nil"#), "{cond}");
                }
                for p in pipelines.as_mapping().unwrap().values() {
                    assert!(strings(get(p, "processors")).contains(&"filter/business-only".to_string()));
                }
            }
            "loadbalancing.yaml" => {
                let lb = get(&c, "exporters.loadbalancing/bizsignal");
                assert_eq!(str_of(lb, "routing_key"), "traceID");
                assert!(
                    lb.get("protocol").and_then(|p| p.get("otlp")).and_then(|o| o.get("endpoint")).is_none(),
                    "the loadbalancer sets endpoints"
                );
                let host = str_of(lb, "resolver.dns.hostname");
                let svc = host.split('.').next().unwrap();
                assert!(k8s_services.contains(svc), "{host}: no Service {svc} in deploy/kubernetes/service.yaml");
                assert_eq!(str_of(lb, "resolver.dns.port"), "4317");
                for p in pipelines.as_mapping().unwrap().values() {
                    assert_eq!(strings(get(p, "exporters")), vec!["loadbalancing/bizsignal".to_string()]);
                }
            }
            _ => assert!(!otlp_exporter_endpoints(&c).is_empty(), "{f}: an otlp exporter to bizsignal"),
        }
    }
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let kust = yaml("kubernetes/kustomization.yaml");
    let mut by_kind: BTreeMap<(String, String), Yaml> = BTreeMap::new();
    for r in strings(get(&kust, "resources")) {
        for d in yaml_docs(&format!("kubernetes/{r}")) {
            let key = (str_of(&d, "kind").to_string(), str_of(&d, "metadata.name").to_string());
            if key.0 != "Namespace" {
                assert_eq!(str_of(&d, "metadata.namespace"), str_of(&kust, "namespace"), "{key:?}");
            }
            by_kind.insert(key, d);
        }
    }
    let find = |kind: &str, name: &str| {
        by_kind
            .get(&(kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes (kustomization resources)"))
    };
    let dep = find("Deployment", "bizsignal");
    let pod = get(dep, "spec.template");
    let labels = get(pod, "metadata.labels");
    assert_eq!(get(dep, "spec.selector.matchLabels"), labels);
    let c = get(pod, "spec.containers.0");
    let ports: BTreeMap<String, u64> = get(c, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (str_of(p, "name").to_string(), get(p, "containerPort").as_u64().unwrap()))
        .collect();
    assert_eq!(ports.values().copied().collect::<BTreeSet<_>>(), [4317, 4318, 8080].into());
    let resolve = |p: &Yaml| match p {
        Yaml::String(n) => *ports.get(n).unwrap_or_else(|| panic!("no container port named {n}")),
        Yaml::Number(n) => n.as_u64().unwrap(),
        o => panic!("{o:?}"),
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")] {
        let pr = get(c, probe);
        assert_eq!(str_of(pr, "httpGet.path"), path, "{probe}");
        assert_eq!(resolve(get(pr, "httpGet.port")), 8080, "{probe}");
    }
    // Config from the ConfigMap, data dir on the PVC, password from a Secret.
    let args = strings(get(c, "args"));
    let arg = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
    let mounts: BTreeMap<String, String> = get(c, "volumeMounts")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (str_of(m, "name").to_string(), str_of(m, "mountPath").to_string()))
        .collect();
    let volumes = get(pod, "spec.volumes").as_sequence().unwrap();
    let mut cm_checked = false;
    let mut pvc_checked = false;
    for v in volumes {
        let mount = mounts.get(str_of(v, "name")).expect("volume mounted");
        if let Some(cm) = v.get("configMap") {
            let cm = find("ConfigMap", str_of(cm, "name"));
            let file = arg("--config");
            let (dir, key) = file.rsplit_once('/').unwrap();
            assert_eq!(mount, dir);
            let cfg: Yaml =
                serde_norway::from_str(get(cm, "data").get(key).and_then(Yaml::as_str).expect("ConfigMap key"))
                    .unwrap();
            assert_eq!(str_of(&cfg, "data_dir"), arg("--data-dir"));
            assert_eq!(port_of(str_of(&cfg, "server.otlp_grpc")), 4317);
            assert_eq!(port_of(str_of(&cfg, "server.otlp_http")), 4318);
            assert_eq!(port_of(str_of(&cfg, "server.http")), 8080);
            assert_eq!(str_of(&cfg, "storage.clickhouse.password"), "${env:CLICKHOUSE_PASSWORD}");
            cm_checked = true;
        }
        if let Some(p) = v.get("persistentVolumeClaim") {
            find("PersistentVolumeClaim", str_of(p, "claimName"));
            assert_eq!(mount, &arg("--data-dir"), "the PVC holds the data dir (spool)");
            pvc_checked = true;
        }
    }
    assert!(cm_checked && pvc_checked);
    let env = get(c, "env").as_sequence().unwrap();
    assert!(env.iter().any(|e| str_of(e, "name") == "CLICKHOUSE_PASSWORD" && e.get("valueFrom").is_some()));
    assert_eq!(str_of(dep, "spec.strategy.type"), "Recreate", "a ReadWriteOnce volume");
    // Services select the pods and target existing ports.
    for name in ["bizsignal", "bizsignal-headless"] {
        let svc = find("Service", name);
        for (k, v) in get(svc, "spec.selector").as_mapping().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{name} selects the pods");
        }
        for p in get(svc, "spec.ports").as_sequence().unwrap() {
            assert_eq!(resolve(get(p, "targetPort")), get(p, "port").as_u64().unwrap(), "{name}");
        }
    }
    assert_eq!(str_of(find("Service", "bizsignal-headless"), "spec.clusterIP"), "None");
}

#[test]
fn run_sh_installs_promtool() {
    let sh = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/run.sh")).unwrap();
    assert!(sh.contains("command -v promtool") && sh.contains("apt-get install -y") && sh.contains("prometheus"));
}
