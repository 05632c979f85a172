//! Crash recovery with the real binary: sustained OTLP/HTTP ingest from
//! several clients, `kill -9` mid-ingest several times, restart on the same
//! data dir. After every restart each acknowledged signal must be in storage;
//! at the end, after clients retried what was never acknowledged (and
//! re-sent some acknowledged requests on purpose), every run's counts equal
//! the number of distinct signals: nothing missing, nothing counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::serve::ServeProcess as Proc;

const WORKERS: usize = 4;
const KILLS: usize = 4;
const T0: u64 = 1_795_000_000_000_000_000;

fn spawn(data_dir: &Path) -> Proc {
    Proc::spawn(data_dir, None)
}

fn body(worker: usize, seq: u64) -> String {
    serde_json::json!({"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "crash"}}]},
      "scopeLogs": [{"logRecords": [{"timeUnixNano": (T0 + seq * 1000 + worker as u64).to_string(), "body": {"stringValue": "batch"},
        "attributes": [
          {"key": "business.process.name", "value": {"stringValue": "crash-test"}},
          {"key": "business.run.id", "value": {"stringValue": format!("w{worker}")}},
          {"key": "business.records.imported", "value": {"intValue": "1"}},
          {"key": "seq", "value": {"stringValue": format!("w{worker}-{seq}")}}]}]}]}]})
    .to_string()
}

#[derive(Default)]
struct Ledger {
    /// Per worker: sequence numbers acknowledged with 200.
    acked: Vec<BTreeSet<u64>>,
    /// Per worker: sent, answer unknown or refused (to be retried).
    pending: Vec<BTreeSet<u64>>,
    next: Vec<u64>,
}

async fn send(c: &reqwest::Client, url: &str, worker: usize, seq: u64) -> bool {
    match c.post(url).header("content-type", "application/json").body(body(worker, seq)).send().await {
        Ok(r) => r.status().as_u16() == 200,
        Err(_) => false,
    }
}

/// Stored `seq` tags of one worker's run.
async fn stored(c: &reqwest::Client, http: &str, worker: usize) -> (BTreeMap<String, usize>, serde_json::Value) {
    let r = c.get(format!("http://{http}/api/v1/runs/crash-test/w{worker}/events")).send().await.unwrap();
    let mut tags = BTreeMap::new();
    if r.status().as_u16() == 200 {
        let v: serde_json::Value = r.json().await.unwrap();
        for e in v["events"].as_array().unwrap() {
            // One signal yields a `log` event and a `records` event; count the latter.
            if e["kind"] != "records" {
                continue;
            }
            let attrs = e["attributes"].to_string();
            if let Some(pos) = attrs.find(&format!("w{worker}-")) {
                let tag: String = attrs[pos..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                *tags.entry(tag).or_insert(0) += 1;
            }
        }
    }
    let run = c.get(format!("http://{http}/api/v1/runs/crash-test/w{worker}")).send().await.unwrap();
    let run = if run.status().as_u16() == 200 { run.json().await.unwrap() } else { serde_json::Value::Null };
    (tags, run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_sustained_ingest_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger {
        acked: vec![BTreeSet::new(); WORKERS],
        pending: vec![BTreeSet::new(); WORKERS],
        next: vec![0; WORKERS],
    }));
    let mut report = Vec::new();
    for round in 0..=KILLS {
        let mut p = spawn(dir.path());
        let url = format!("http://{}/v1/logs", p.otlp_http);
        // Every acknowledged signal so far must be stored, exactly once.
        {
            let l = ledger.lock().unwrap();
            for w in 0..WORKERS {
                let (tags, _) = stored(&c, &p.http, w).await;
                for seq in &l.acked[w] {
                    assert_eq!(
                        tags.get(&format!("w{w}-{seq}")),
                        Some(&1),
                        "round {round}: acknowledged w{w}-{seq} missing or duplicated after kill -9"
                    );
                }
                assert!(tags.values().all(|n| *n == 1), "a signal stored twice");
            }
        }
        if round == KILLS {
            // Final: retry everything never acknowledged, re-send some acknowledged ones.
            let (retry, resend): (Vec<_>, Vec<_>) = {
                let l = ledger.lock().unwrap();
                (
                    (0..WORKERS).flat_map(|w| l.pending[w].iter().map(move |s| (w, *s))).collect(),
                    (0..WORKERS).flat_map(|w| l.acked[w].iter().step_by(7).map(move |s| (w, *s))).collect(),
                )
            };
            for (w, seq) in retry.iter().chain(&resend) {
                assert!(send(&c, &url, *w, *seq).await, "retry after restart refused");
                let mut l = ledger.lock().unwrap();
                l.pending[*w].remove(seq);
                l.acked[*w].insert(*seq);
            }
            let mut acked_total = 0;
            let mut stored_total = 0;
            for w in 0..WORKERS {
                let (tags, run) = stored(&c, &p.http, w).await;
                let l = ledger.lock().unwrap();
                let expected = l.next[w] as usize;
                assert_eq!(l.acked[w].len(), expected, "every request eventually acknowledged");
                assert_eq!(tags.len(), expected, "w{w}: stored distinct signals");
                assert!(tags.values().all(|n| *n == 1), "w{w}: a signal stored twice");
                assert_eq!(run["counts"]["imported"], expected as u64, "w{w}: counts");
                assert_eq!(run["signal_count"], expected as u64, "w{w}: signal_count");
                acked_total += l.acked[w].len();
                stored_total += tags.len();
            }
            report.push(format!(
                "final: {acked_total} signals acknowledged, {stored_total} stored, {} retried, {} re-sent duplicates",
                retry.len(),
                resend.len()
            ));
            break;
        }
        // Sustained ingest; kill -9 while the workers are still sending.
        let stop_at = Instant::now() + Duration::from_millis(600 + 300 * round as u64);
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            let (c, url, ledger) = (c.clone(), url.clone(), ledger.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = 0;
                while failures < 3 {
                    let seq = {
                        let mut l = ledger.lock().unwrap();
                        let s = l.next[w];
                        l.next[w] += 1;
                        l.pending[w].insert(s);
                        s
                    };
                    if send(&c, &url, w, seq).await {
                        let mut l = ledger.lock().unwrap();
                        l.pending[w].remove(&seq);
                        l.acked[w].insert(seq);
                    } else {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        tokio::time::sleep_until(stop_at.into()).await;
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let l = ledger.lock().unwrap();
        let acked: usize = l.acked.iter().map(|s| s.len()).sum();
        let pending: usize = l.pending.iter().map(|s| s.len()).sum();
        report.push(format!(
            "kill {}: {acked} acknowledged so far, {pending} in flight or refused at the kill",
            round + 1
        ));
    }
    for line in &report {
        eprintln!("{line}");
    }
}
