//! The binary as a user runs it: `serve`, `demo`, `check-config`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::serve::BIN;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check_config(path: &Path) -> (bool, String) {
    let out = Command::new(BIN).arg("check-config").arg(path).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn every_example_config_passes_check_config() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("config")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let (ok, out) = check_config(&p);
            assert!(ok, "{}: {out}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2, "config/ holds example configs");
}

#[test]
fn every_yaml_example_in_the_docs_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for doc in ["docs/configuration.md", "docs/metrics.md", "README.md"] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```yaml\n") {
            let body = &rest[start + 8..];
            let end = body.find("```").unwrap();
            let block = &body[..end];
            rest = &body[end + 3..];
            // Collector configs in the README are not bizsignal configs.
            if block.contains("exporters:") {
                continue;
            }
            let p = dir.path().join(format!("ex{n}.yaml"));
            std::fs::write(&p, block).unwrap();
            let (ok, out) = check_config(&p);
            assert!(ok, "{doc} example {n} fails: {out}\n{block}");
            n += 1;
        }
    }
    assert!(n >= 3, "docs contain config examples");
}

#[test]
fn broken_config_files_name_the_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("server: [1, 2\n", "not valid YAML"),
        ("server:\n  otlp_grpc: not-an-address\n", "server.otlp_grpc: invalid socket address"),
        ("processes:\n  imp:\n    stall_after: soon\n", "processes.imp.stall_after: "),
        ("processes:\n  imp:\n    deadline: { time: '06:00', timezone: Mars/Base }\n", "processes.imp.deadline: unknown IANA time zone"),
        ("rules:\n  - name: r\n    match: { span_name: { regex: '(' } }\n    set: { process: p }\n", "rules[0].match.span_name: invalid regex"),
        ("rules:\n  - name: r\n    set: { process: { from: nowhere } }\n", "rules[0].set.process: unknown source"),
        ("metrics:\n  cardinality_limit: 0\n", "metrics.cardinality_limit: must be from 1"),
        ("metrics:\n  otlp: { endpoint: 'collector:4317' }\n", "metrics.otlp.endpoint: must be an http"),
        ("metrics:\n  otlp: { temporality: sometimes }\n", "metrics.otlp.temporality: unknown variant"),
        ("metrics:\n  user_defined:\n    - { name: x, instrument: counter, source: business.records. }\n", "metrics.user_defined[0].source: business.records. needs an outcome"),
        ("metrics:\n  user_defined:\n    - { name: x, instrument: meter, source: a }\n", "metrics.user_defined[0].instrument: unknown variant"),
        ("metrics:\n  user_defined:\n    - { name: business.process.x, instrument: gauge, source: a }\n", "metrics.user_defined[0].name: business.process.*"),
        ("metrics:\n  user_defined:\n    - { name: x, instrument: gauge, source: a, dimensions: [tier, business.run.id] }\n", "metrics.user_defined[0].dimensions[1]: run and trace ids"),
        ("metrics:\n  user_defined:\n    - { name: x.y, instrument: gauge, source: a }\n    - { name: x_y, instrument: counter, source: b }\n", "metrics.user_defined[1].name: another user-defined metric"),
        ("limits:\n  max_request_bytes: 12 parsecs\n", "limits.max_request_bytes: unknown size unit"),
        ("data_dir: ${env:BIZSIGNAL_SURELY_UNSET_VAR}\n", "data_dir: environment variable BIZSIGNAL_SURELY_UNSET_VAR is not set"),
        ("storage:\n  kind: mongodb\n", "storage.kind: unknown variant `mongodb`"),
        ("sever: {}\n", "unknown field `sever`"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        let (ok, out) = check_config(&p);
        assert!(!ok, "{yaml} was accepted");
        assert!(out.starts_with(&p.display().to_string()), "names the file: {out}");
        assert!(out.contains(want), "{yaml}: want {want:?} in {out:?}");
    }
    let (ok, out) = check_config(Path::new("/nonexistent/bizsignal.yaml"));
    assert!(!ok && out.contains("/nonexistent/bizsignal.yaml: cannot read"), "{out}");
    // serve refuses a broken file the same way, before binding anything.
    let p = dir.path().join("bad0.yaml");
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&p).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid YAML"));
}

/// Starts `bizsignal serve` on ephemeral ports and reads the bound addresses from its log.
#[test]
fn serve_then_demo_shows_runs_within_two_seconds_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::serve::ServeProcess::spawn(dir.path(), None);
    let (grpc, http) = (server.otlp_grpc.clone(), server.http.clone());
    let demo = Command::new(BIN)
        .args(["demo", "--pace", "10ms", "--run-suffix", "t1", "--endpoint"])
        .arg(format!("http://{grpc}"))
        .output()
        .unwrap();
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let sent = Instant::now();
    let client = reqwest::blocking_get_json(&format!("http://{http}/api/v1/runs"));
    let mut seen = client;
    while seen["runs"].as_array().map_or(0, |a| a.len()) < 3 {
        assert!(sent.elapsed() < Duration::from_secs(2), "runs not visible within 2 s: {seen}");
        std::thread::sleep(Duration::from_millis(20));
        seen = reqwest::blocking_get_json(&format!("http://{http}/api/v1/runs"));
    }
    let by = |p: &str| seen["runs"].as_array().unwrap().iter().find(|r| r["process"] == p).unwrap().clone();
    assert_eq!(by("invoice-reconciliation")["status"], "failed");
    assert_eq!(by("nightly-report")["status"], "succeeded");
    assert_eq!(by("product-import")["status"], "succeeded");
    assert_eq!(by("product-import")["counts"]["skipped"], 12);
    assert_eq!(by("product-import")["run_id"], "import-t1");

    let child = &mut server.child;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "exit status after SIGTERM: {st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tiny blocking GET for these process-level tests (no runtime needed).
mod reqwest {
    pub fn blocking_get_json(url: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }
}
