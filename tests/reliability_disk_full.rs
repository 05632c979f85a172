//! Disk full with the embedded SQLite store, simulated without root or
//! mounts: the real binary runs with a small file-size limit (RLIMIT_FSIZE),
//! so writes past it fail with EFBIG (the server ignores SIGXFSZ, which would
//! otherwise kill it). Written against behaviour only — status codes and
//! what the API returns — not against how storage writes its files.
//!
//! Guarantees checked: while storage cannot grow, intake is refused with
//! retryable statuses (503 + `Retry-After`, UNAVAILABLE + `RetryInfo`),
//! never acknowledged and then lost; the server keeps running and serves
//! health and reads; a restart with the disk still full starts (no crash
//! loop) and still refuses retryably; a restart with space again has every
//! acknowledged signal.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::serve::ServeProcess as Proc;

/// Largest file the server may write while "the disk is full".
const FSIZE: u64 = 1 << 20;
/// Payload per request: the limit is reached after a few dozen requests.
const PAYLOAD: usize = 16 << 10;

fn spawn(dir: &Path, fsize: Option<u64>) -> Result<Proc, std::process::ExitStatus> {
    Proc::try_spawn_with(dir, Some("pipeline: { tick: 100ms, retry_after: 1s }\n"), |cmd| {
        if let Some(limit) = fsize {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    })
}

fn body(i: usize) -> String {
    let payload = serde_json::json!({ "blob": "x".repeat(PAYLOAD), "i": i }).to_string();
    serde_json::json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "timeUnixNano": (1_795_000_000_000_000_000u64 + i as u64).to_string(),
        "body": {"stringValue": "chunk"},
        "attributes": [
            {"key": "business.process.name", "value": {"stringValue": "disk"}},
            {"key": "business.run.id", "value": {"stringValue": "full"}},
            {"key": "business.records.ok", "value": {"intValue": "1"}},
            {"key": "business.payload", "value": {"stringValue": payload}},
            {"key": "tag", "value": {"stringValue": format!("@@{i}@@")}}]}]}]}]})
    .to_string()
}

/// `tag` values stored for the run, via the API.
async fn stored_tags(c: &reqwest::Client, p: &Proc) -> BTreeSet<usize> {
    let r = c.get(format!("http://{}/api/v1/runs/disk/full/events", p.http)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let mut tags = BTreeSet::new();
    for e in v["events"].as_array().unwrap() {
        if e["kind"] != "records" {
            continue;
        }
        let attrs = e["attributes"].to_string();
        if let Some(pos) = attrs.find("@@") {
            let n: String = attrs[pos + 2..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = n.parse() {
                tags.insert(n);
            }
        }
    }
    tags
}

fn alive(p: &mut Proc) {
    if let Some(st) = p.child.try_wait().unwrap() {
        use std::os::unix::process::ExitStatusExt;
        panic!("the server died: {st:?} (signal {:?})", st.signal());
    }
}

async fn send(c: &reqwest::Client, p: &Proc, i: usize) -> u16 {
    let r = c.post(p.url("/v1/logs")).header("content-type", "application/json").body(body(i)).send().await.unwrap();
    let st = r.status().as_u16();
    match st {
        200 => {}
        503 | 429 => assert!(r.headers().contains_key("retry-after"), "retryable refusal without Retry-After"),
        other => panic!("request {i}: unexpected status {other}: {}", r.text().await.unwrap()),
    }
    st
}

/// Sends over gRPC (numbers from `start`) until one export is refused and
/// checks the refusal is retryable with RetryInfo; accepted ones join `acked`.
async fn grpc_refused(p: &Proc, start: usize, acked: &mut BTreeSet<usize>) {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
    use tonic_types::StatusExt;
    let mut client = LogsServiceClient::connect(format!("http://{}", p.otlp_grpc)).await.unwrap();
    for i in start..start + 100 {
        let req = bizsignal::receivers::http::decode_json(body(i).as_bytes()).unwrap();
        match client.export(tonic::Request::new(req)).await {
            Ok(_) => {
                acked.insert(i);
            }
            Err(e) => {
                assert!(matches!(e.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted), "{e:?}");
                assert!(e.get_details_retry_info().is_some(), "{e:?}");
                return;
            }
        }
    }
    panic!("gRPC intake never refused while the disk is full");
}

fn sigterm(p: &mut Proc) -> std::process::ExitStatus {
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends requests numbered from `start` until 20 in a row after the first
/// refusal were answered; returns (first refused number, refusals).
async fn fill(c: &reqwest::Client, p: &mut Proc, start: usize, acked: &mut BTreeSet<usize>) -> (usize, usize) {
    let mut refused = 0usize;
    let mut first_refusal = None;
    for i in start..start + 400 {
        match send(c, p, i).await {
            200 => {
                acked.insert(i);
            }
            _ => {
                refused += 1;
                first_refusal.get_or_insert(i);
            }
        }
        if first_refusal.is_some_and(|f| i + 1 >= f + 20) {
            break;
        }
    }
    let first = first_refusal.expect("writes past the file-size limit are refused");
    // RLIMIT_FSIZE limits each file, not the disk: after a refused append
    // the journal starts a fresh segment file, so some of the next requests
    // may be acknowledged again. Every answer is checked to be 200 or a
    // retryable refusal (in `send`), and every acknowledged signal is checked
    // to be kept (by the callers).
    assert!(refused >= 1);
    alive(p);
    (first, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_retryably_keeps_serving_and_restarts_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut p = spawn(dir.path(), Some(FSIZE)).expect("starts under the file-size limit");

    // Ingest until storage cannot take more, then keep trying for a while.
    let mut acked = BTreeSet::new();
    let (first_refusal, refused) = fill(&c, &mut p, 0, &mut acked).await;
    alive(&mut p);
    grpc_refused(&p, 100_000, &mut acked).await;

    // Still serving: health, and reads of everything acknowledged.
    let health = c.get(format!("http://{}/healthz", p.http)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let tags = stored_tags(&c, &p).await;
    assert!(acked.is_subset(&tags), "acknowledged but not readable: {:?}", acked.difference(&tags).collect::<Vec<_>>());
    alive(&mut p);
    let st = sigterm(&mut p);
    assert_eq!(st.signal(), None, "stopped by a signal: {st:?}");
    drop(p);

    // Restart with the disk still full: it comes up (no crash loop), serves
    // the reads, and refuses intake retryably once storage cannot grow
    // (what fits in the space a clean shutdown may have freed is acknowledged).
    let started = Instant::now();
    let mut p = spawn(dir.path(), Some(FSIZE)).unwrap_or_else(|st| panic!("does not start with the disk full: {st:?}"));
    let restart_full = started.elapsed();
    assert!(acked.is_subset(&stored_tags(&c, &p).await));
    let before = acked.len();
    let (_, refused_again) = fill(&c, &mut p, 1000, &mut acked).await;
    let acked_again = acked.len() - before;
    grpc_refused(&p, 200_000, &mut acked).await;
    assert!(acked.is_subset(&stored_tags(&c, &p).await));
    let st = sigterm(&mut p);
    assert_eq!(st.signal(), None, "stopped by a signal: {st:?}");
    drop(p);

    // Space again: everything acknowledged is there, and intake works.
    let started = Instant::now();
    let p = spawn(dir.path(), None).expect("restarts");
    let restart_free = started.elapsed();
    let tags = stored_tags(&c, &p).await;
    let missing: Vec<_> = acked.difference(&tags).collect();
    assert!(missing.is_empty(), "acknowledged signals lost: {missing:?}");
    assert_eq!(send(&c, &p, 5000).await, 200);
    let run: serde_json::Value =
        c.get(format!("http://{}/api/v1/runs/disk/full", p.http)).send().await.unwrap().json().await.unwrap();
    eprintln!(
        "disk full: file-size limit {} KiB; {} acknowledged, first refusal at request {first_refusal}, {refused} refused \
         (503 + Retry-After), gRPC UNAVAILABLE + RetryInfo; restart with the disk still full in {restart_full:?}: \
         {acked_again} more acknowledged, then {refused_again} refused; restart with space in {restart_free:?}; \
         stored after restart {} (acknowledged {} + 1 new)",
        FSIZE >> 10,
        before,
        run["counts"]["ok"],
        acked.len(),
    );
    assert!(run["counts"]["ok"].as_u64().unwrap() > acked.len() as u64);
}
