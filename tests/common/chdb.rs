//! A ClickHouse endpoint for tests: `BIZSIGNAL_TEST_CLICKHOUSE_URL` (a real
//! server), or the chDB-backed HTTP front `tests/support/chdb_http.py` run
//! with `BIZSIGNAL_TEST_PYTHON` (set by tests/run.sh) or `.venv-test/bin/python`.
//! Without either, ClickHouse tests fail with a message saying how to get one;
//! they never pass untested.

use bizsignal::config::ClickHouseConfig;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub struct ChServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    pub dir: tempfile::TempDir,
    python: Option<PathBuf>,
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("BIZSIGNAL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "ClickHouse tests need an endpoint: run `bash tests/run.sh` (it creates .venv-test with tests/support/requirements.txt \
         and sets BIZSIGNAL_TEST_PYTHON), or set BIZSIGNAL_TEST_PYTHON to a python with those packages, \
         or BIZSIGNAL_TEST_CLICKHOUSE_URL to a real ClickHouse server"
    );
}

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A database name unique to this test process and call.
pub fn unique_db(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id(), DB_SEQ.fetch_add(1, Ordering::Relaxed))
}

impl ChServer {
    pub fn start() -> ChServer {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(url) = std::env::var("BIZSIGNAL_TEST_CLICKHOUSE_URL") {
            return ChServer { child: None, port: 0, url, dir, python: None };
        }
        let py = python();
        let mut s = ChServer { child: None, port: 0, url: String::new(), dir, python: Some(py) };
        s.spawn(0);
        s
    }

    fn spawn(&mut self, port: u16) {
        let py = self.python.clone().expect("a local front");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/chdb_http.py");
        let mut child = Command::new(&py)
            .arg(&script)
            .args(["--port", &port.to_string(), "--data-dir"])
            .arg(self.dir.path().join("chdb"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {}: {e}", py.display(), script.display()));
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("the chDB front exited before listening (see its stderr above)");
            }
            if let Some(p) = line.trim().strip_prefix("LISTENING ") {
                self.port = p.parse().unwrap();
                break;
            }
        }
        // Keep draining stdout so the front never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        self.url = format!("http://127.0.0.1:{}", self.port);
        self.child = Some(child);
    }

    /// Whether this is the local front (stop/restart work only there).
    pub fn is_local(&self) -> bool {
        self.python.is_some()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data dir.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        for _ in 0..50 {
            let ok = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn(port);
    }

    pub fn config(&self, database: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.url.clone(),
            database: database.to_string(),
            batch_max_wait: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            request_timeout: Duration::from_secs(20),
            ..ClickHouseConfig::default()
        }
    }

    /// Runs a query and returns its TSV output (through the real HTTP interface).
    pub async fn tsv(&self, sql: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/?default_format=TabSeparated", self.url))
            .body(sql.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "query failed ({status}): {sql}\n{text}");
        text
    }
}

fn terminate(c: &Child) {
    // SIGTERM lets the front shut chDB down cleanly (its tables persist).
    let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
}

impl Drop for ChServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
