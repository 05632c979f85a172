//! The operator CLI (`bizsignal runs …`, `bizsignal wait …`): a client of the
//! REST API of a running bizsignal. Exit codes are listed in [`exit`].

use serde_json::Value;
use std::io::Write as _;
use std::time::{Duration, Instant};

/// Exit codes of the client commands.
pub mod exit {
    /// Done; for `wait`: the run succeeded.
    pub const OK: u8 = 0;
    /// `wait`: the run failed. `runs show`: no such run.
    pub const FAILED: u8 = 1;
    /// `wait`: no terminal run before `--timeout`.
    pub const TIMEOUT: u8 = 2;
    /// The server is unreachable or answered with an error.
    pub const UNREACHABLE: u8 = 3;
    /// Invalid command line, or the server rejected a parameter.
    pub const USAGE: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach bizsignal at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("bizsignal at {url} answered {status}: {message}")]
    Server { url: String, status: u16, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } | ClientError::Server { .. } => exit::UNREACHABLE,
            ClientError::BadRequest(_) => exit::USAGE,
            ClientError::NotFound(_) => exit::FAILED,
        }
    }
}

/// Why a full error chain is worth showing: reqwest hides the cause (connection refused, DNS) in its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = c.source();
    }
    s
}

/// The innermost cause ("Connection refused (os error 111)"), for connection errors.
fn root_cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut cur: &dyn std::error::Error = e;
    while let Some(c) = cur.source() {
        cur = c;
    }
    cur.to_string()
}

pub struct Client {
    base: reqwest::Url,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str) -> Result<Client, ClientError> {
        let mut base = reqwest::Url::parse(server)
            .map_err(|e| ClientError::BadRequest(format!("--server {server:?} is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::BadRequest(format!("--server {server:?} must be an http:// URL")));
        }
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ClientError::BadRequest(chain(&e)))?;
        Ok(Client { base, http })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut u = self.base.clone();
        u.path_segments_mut().expect("http URL").pop_if_empty().extend(segments);
        u
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &reqwest::Url) -> Result<reqwest::Response, ClientError> {
        let unreachable =
            |e: reqwest::Error| ClientError::Unreachable { url: self.base.to_string(), reason: root_cause(&e) };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(match status {
            400 => ClientError::BadRequest(message),
            404 => ClientError::NotFound(if message.is_empty() {
                format!("{url} not found: is this a bizsignal server?")
            } else {
                message
            }),
            _ => ClientError::Server { url: url.to_string(), status, message },
        })
    }

    async fn get_json(&self, url: reqwest::Url, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let resp = self.send(self.http.get(url.clone()).query(query).timeout(Duration::from_secs(30)), &url).await?;
        resp.json().await.map_err(|e| ClientError::Unreachable {
            url: url.to_string(),
            reason: format!("unreadable answer: {}", chain(&e)),
        })
    }

    /// `GET /api/v1/runs` with the given filters (empty values are ignored).
    pub async fn runs(&self, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let q: Vec<_> = query.iter().copied().filter(|(_, v)| !v.is_empty()).collect();
        self.get_json(self.url(&["api", "v1", "runs"]), &q).await
    }

    /// One run in full; `Ok(None)` when there is no such run.
    pub async fn run(&self, process: &str, run_id: &str) -> Result<Option<Value>, ClientError> {
        match self.get_json(self.url(&["api", "v1", "runs", process, run_id]), &[]).await {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The live stream (`/api/v1/stream`): calls `on` with each SSE event's
    /// name and data until the server closes the stream.
    pub async fn stream(&self, mut on: impl FnMut(&str, &str)) -> Result<(), ClientError> {
        let url = self.url(&["api", "v1", "stream"]);
        let mut resp = self.send(self.http.get(url.clone()).header("accept", "text/event-stream"), &url).await?;
        let mut buf = String::new();
        loop {
            let chunk =
                resp.chunk().await.map_err(|e| ClientError::Unreachable { url: url.to_string(), reason: chain(&e) })?;
            let Some(chunk) = chunk else { return Ok(()) };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut data) = ("message".to_string(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if !data.is_empty() {
                    on(&event, &data);
                }
            }
        }
    }
}

// ---- human-readable rendering ----

fn parse_ts(v: &Value) -> Option<jiff::Timestamp> {
    v.as_str()?.parse().ok()
}

/// `45s`, `3m 20s`, `2h 5m`, `3d 4h`.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 10.0 {
        let r = (secs * 10.0).round() / 10.0;
        return if r.fract() == 0.0 { format!("{}s", r as u64) } else { format!("{r:.1}s") };
    }
    let s = secs.round() as u64;
    let (d, h, m, s) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// `just now`, `5m ago`, `in 2h` (relative to now), `-` when absent.
pub fn relative(v: &Value) -> String {
    let Some(t) = parse_ts(v) else {
        return "-".into();
    };
    let secs = (jiff::Timestamp::now().as_nanosecond() - t.as_nanosecond()) as f64 / 1e9;
    if secs.abs() < 1.0 {
        "just now".into()
    } else if secs > 0.0 {
        format!("{} ago", coarse(secs))
    } else {
        format!("in {}", coarse(-secs))
    }
}

/// The largest unit only: `5s`, `3m`, `2h`, `4d`.
fn coarse(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(n) if n.fract() == 0.0 && n.abs() < 9e15 => format!("{}", n as i64),
        Some(n) => format!("{n}"),
        None => "-".into(),
    }
}

fn counts(run: &Value) -> String {
    run["counts"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", num(v))).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn progress(run: &Value) -> String {
    let p = &run["progress"];
    if p.is_null() {
        return String::new();
    }
    let mut s = match (p["done"].is_null(), p["total"].is_null()) {
        (false, false) => format!("{}/{}", num(&p["done"]), num(&p["total"])),
        (false, true) => format!("{} done", num(&p["done"])),
        _ => format!("0/{}", num(&p["total"])),
    };
    if let Some(r) = p["ratio"].as_f64() {
        s.push_str(&format!(" ({:.0}%)", r * 100.0));
    }
    if !p["eta"].is_null() {
        s.push_str(&format!(", done {}", relative(&p["eta"])));
    }
    s
}

/// What is most worth knowing about a run beyond its status, in a few words.
fn detail(run: &Value) -> String {
    let mut parts = vec![];
    if let Some(e) = run["error"].as_str() {
        parts.push(format!("error: {e}"));
    }
    if let Some(v) = run["violations"].as_array().filter(|v| !v.is_empty()) {
        parts.push(format!("violated: {}", v.iter().filter_map(|x| x["rule"].as_str()).collect::<Vec<_>>().join(", ")));
    }
    let p = progress(run);
    if !p.is_empty() && run["status"] != "succeeded" {
        parts.push(p);
    }
    let c = counts(run);
    if !c.is_empty() {
        parts.push(c);
    }
    if parts.is_empty() {
        if let Some(m) = run["last_milestone"].as_str() {
            parts.push(format!("at {m}"));
        }
    }
    parts.join("; ")
}

/// A plain-text table with columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

pub fn runs_table(runs: &[Value]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r["process"].as_str().unwrap_or("").to_string(),
                r["run_id"].as_str().unwrap_or("").to_string(),
                r["status"].as_str().unwrap_or("").to_string(),
                relative(&r["started_at"]),
                r["duration_seconds"].as_f64().map(human_duration).unwrap_or_else(|| "-".into()),
                detail(r),
            ]
        })
        .collect();
    table(&["PROCESS", "RUN", "STATUS", "STARTED", "DURATION", "DETAIL"], &rows)
}

/// `runs show`: one field per line.
pub fn run_text(r: &Value) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("process".into(), r["process"].as_str().unwrap_or("").into()),
        ("run".into(), r["run_id"].as_str().unwrap_or("").into()),
        ("status".into(), r["status"].as_str().unwrap_or("").into()),
        ("started".into(), format!("{} ({})", r["started_at"].as_str().unwrap_or("-"), relative(&r["started_at"]))),
    ];
    if !r["ended_at"].is_null() {
        rows.push((
            "ended".into(),
            format!("{} ({})", r["ended_at"].as_str().unwrap_or("-"), relative(&r["ended_at"])),
        ));
    }
    rows.push(("duration".into(), r["duration_seconds"].as_f64().map(human_duration).unwrap_or_else(|| "-".into())));
    rows.push(("last signal".into(), relative(&r["last_seen_at"])));
    if let Some(e) = r["error"].as_str() {
        rows.push(("error".into(), e.into()));
    }
    let c = counts(r);
    if !c.is_empty() {
        rows.push(("records".into(), c));
    }
    let p = progress(r);
    if !p.is_empty() {
        rows.push(("progress".into(), p));
    }
    for m in r["milestones"].as_array().into_iter().flatten() {
        rows.push(("milestone".into(), format!("{} ({})", m["name"].as_str().unwrap_or(""), relative(&m["at"]))));
    }
    for v in r["violations"].as_array().into_iter().flatten() {
        rows.push((
            "violation".into(),
            format!("{}: {}", v["rule"].as_str().unwrap_or(""), v["message"].as_str().unwrap_or("")),
        ));
    }
    for n in r["notes"].as_array().into_iter().flatten() {
        rows.push(("note".into(), format!("{} ({})", n["text"].as_str().unwrap_or(""), relative(&n["at"]))));
    }
    if let Some(vals) = r["values"].as_object() {
        for (k, v) in vals {
            rows.push((format!("value {k}"), num(v)));
        }
    }
    for (key, label) in [("services", "services"), ("trace_ids", "traces")] {
        if let Some(a) = r[key].as_array().filter(|a| !a.is_empty()) {
            rows.push((label.into(), a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")));
        }
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

/// One line per change for `runs watch`.
pub fn change_line(r: &Value) -> String {
    let now = jiff::Zoned::now().strftime("%H:%M:%S").to_string();
    let d = detail(r);
    format!(
        "{now}  {}  {}  {}  {}{}",
        r["process"].as_str().unwrap_or(""),
        r["run_id"].as_str().unwrap_or(""),
        r["status"].as_str().unwrap_or(""),
        r["duration_seconds"].as_f64().map(human_duration).unwrap_or_else(|| "-".into()),
        if d.is_empty() { String::new() } else { format!("  {d}") }
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn fail(e: ClientError) -> u8 {
    eprintln!("error: {e}");
    e.exit_code()
}

// ---- the commands ----

pub struct ListArgs {
    pub process: Option<String>,
    pub status: Option<String>,
    pub since: Option<String>,
    pub limit: u32,
}

pub async fn runs_list(c: &Client, a: &ListArgs, json: bool) -> u8 {
    let limit = a.limit.to_string();
    let q = [
        ("process", a.process.as_deref().unwrap_or("")),
        ("status", a.status.as_deref().unwrap_or("")),
        ("since", a.since.as_deref().unwrap_or("")),
        ("limit", limit.as_str()),
    ];
    match c.runs(&q).await {
        Ok(v) if json => {
            println!("{}", pretty(&v));
            exit::OK
        }
        Ok(v) => {
            let runs = v["runs"].as_array().cloned().unwrap_or_default();
            if runs.is_empty() {
                println!("no runs");
            } else {
                print!("{}", runs_table(&runs));
                if !v["next_cursor"].is_null() {
                    println!("(more runs: raise --limit or narrow with --process, --status, --since)");
                }
            }
            exit::OK
        }
        Err(e) => fail(e),
    }
}

pub async fn runs_show(c: &Client, process: &str, run_id: &str, json: bool) -> u8 {
    match c.run(process, run_id).await {
        Ok(Some(v)) if json => {
            println!("{}", pretty(&v));
            exit::OK
        }
        Ok(Some(v)) => {
            print!("{}", run_text(&v));
            exit::OK
        }
        Ok(None) => fail(ClientError::NotFound(format!("no run {run_id:?} of process {process:?}"))),
        Err(e) => fail(e),
    }
}

pub async fn runs_watch(c: &Client, process: Option<&str>, json: bool) -> u8 {
    let r = c
        .stream(|event, data| match event {
            "hello" => eprintln!(
                "watching run changes{} (Ctrl-C to stop)",
                process.map(|p| format!(" of {p}")).unwrap_or_default()
            ),
            "run" => {
                let Ok(run) = serde_json::from_str::<Value>(data) else { return };
                if process.is_some_and(|p| run["process"] != p) {
                    return;
                }
                if json {
                    println!("{run}");
                } else {
                    println!("{}", change_line(&run));
                }
                let _ = std::io::stdout().flush();
            }
            "resync" => eprintln!("fell behind and missed some changes; `bizsignal runs list` shows the current state"),
            _ => {}
        })
        .await;
    match r {
        Ok(()) => {
            fail(ClientError::Unreachable { url: c.base.to_string(), reason: "the server closed the stream".into() })
        }
        Err(e) => fail(e),
    }
}

pub struct WaitArgs {
    pub process: String,
    pub run_id: Option<String>,
    pub since: String,
    pub timeout: Duration,
    pub interval: Duration,
}

/// Polls until the run is terminal: 0 succeeded, 1 failed, 2 timeout, 3 unreachable, 4 bad parameters.
pub async fn wait(c: &Client, a: &WaitArgs, json: bool) -> u8 {
    let deadline = Instant::now() + a.timeout;
    let mut last: Option<Value> = None;
    loop {
        let found = match &a.run_id {
            Some(id) => c.run(&a.process, id).await,
            None => c
                .runs(&[("process", &a.process), ("since", &a.since), ("limit", "1")])
                .await
                .map(|v| v["runs"].get(0).cloned()),
        };
        let run = match found {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        if let Some(r) = &run {
            let outcome = match r["status"].as_str() {
                Some("succeeded") => Some(exit::OK),
                Some("failed") => Some(exit::FAILED),
                _ => None,
            };
            if let Some(code) = outcome {
                if json {
                    println!("{}", pretty(r));
                } else {
                    let dur = r["duration_seconds"].as_f64().map(human_duration).unwrap_or_else(|| "-".into());
                    let err = r["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
                    println!(
                        "{} run {} {} after {dur}{err}",
                        a.process,
                        r["run_id"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or("")
                    );
                }
                return code;
            }
        }
        if run.is_some() {
            last = run;
        }
        let now = Instant::now();
        if now >= deadline {
            let what = match (&last, &a.run_id) {
                (Some(r), _) => format!(
                    "run {} is still {}",
                    r["run_id"].as_str().unwrap_or(""),
                    r["status"].as_str().unwrap_or("")
                ),
                (None, Some(id)) => format!("no run {id:?} yet"),
                (None, None) => format!("no run started within the last {}", a.since),
            };
            if json {
                println!("{}", serde_json::json!({"timed_out": true, "process": a.process, "run": last}));
            }
            eprintln!("timed out after {} waiting for {}: {what}", human_duration(a.timeout.as_secs_f64()), a.process);
            return exit::TIMEOUT;
        }
        tokio::time::sleep(a.interval.min(deadline - now)).await;
    }
}
