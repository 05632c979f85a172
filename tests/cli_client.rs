//! The operator CLI (`bizsignal runs …`, `bizsignal wait …`): the real binary
//! against a real server on ephemeral ports.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_bizsignal");

/// Runs the binary to completion off the runtime's worker threads.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).env_remove("BIZSIGNAL_SERVER").output().unwrap())
        .await
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn base(srv: &Server) -> String {
    format!("http://{}", srv.app().http)
}

async fn signal(srv: &Server, process: &str, run: &str, attrs: Vec<(&str, serde_json::Value)>) {
    let mut a = vec![("business.process.name", s(process)), ("business.run.id", s(run))];
    a.extend(attrs);
    let (code, body) = srv.post_json("/v1/logs", &logs_json("svc", &[(now(), "sig", a)])).await;
    assert_eq!(code, 200, "{body}");
}

async fn finished(srv: &Server, process: &str, run: &str, ok: bool) {
    signal(srv, process, run, vec![("business.run.status", s("started")), ("business.records.imported", n(7))]).await;
    let mut end = vec![("business.run.status", s(if ok { "succeeded" } else { "failed" }))];
    if !ok {
        end.push(("business.error.message", s("ledger unavailable")));
    }
    signal(srv, process, run, end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_and_show() {
    let srv = Server::start().await;
    finished(&srv, "import", "i1", true).await;
    finished(&srv, "recon", "r1", false).await;
    let url = base(&srv);

    let o = cli(&["runs", "list", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = out(&o);
    let lines: Vec<_> = text.lines().collect();
    assert!(lines[0].starts_with("PROCESS") && lines[0].contains("STATUS") && lines[0].contains("STARTED"), "{text}");
    assert!(
        lines[1].starts_with("recon")
            && lines[1].contains("failed")
            && (lines[1].contains("ago") || lines[1].contains("just now"))
            && lines[1].contains("error: ledger unavailable"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("import") && lines[2].contains("succeeded") && lines[2].contains("imported=7"),
        "{text}"
    );

    let o = cli(&["runs", "list", "--status", "failed", "--json", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 1);
    assert_eq!(v["runs"][0]["run_id"], "r1");

    let o = cli(&["runs", "list", "--process", "nope", "--server", &url]).await;
    assert_eq!((o.status.code(), out(&o).trim()), (Some(0), "no runs"));
    // The server rejects a bad filter: the message is shown, exit 4.
    let o = cli(&["runs", "list", "--status", "done", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(4));
    assert!(err(&o).contains("status must be running, succeeded, failed or stalled"), "{}", err(&o));

    // BIZSIGNAL_SERVER is the default server.
    let o = tokio::task::spawn_blocking({
        let url = url.clone();
        move || Command::new(BIN).args(["runs", "show", "recon", "r1"]).env("BIZSIGNAL_SERVER", url).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = out(&o);
    for want in [
        "process      recon",
        "run          r1",
        "status       failed",
        "error        ledger unavailable",
        "records      imported=7",
        "services     svc",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let o = cli(&["runs", "show", "recon", "r1", "--json", "--server", &url]).await;
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["error"], "ledger unavailable");

    let o = cli(&["runs", "show", "recon", "nope", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("no run \"nope\" of process \"recon\""), "{}", err(&o));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_watch_prints_each_change() {
    let srv = Server::start().await;
    let mut child = Command::new(BIN)
        .args(["runs", "watch", "--process", "b", "--server", &base(&srv)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Subscribed once it says so.
    let hello = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let first = lines.next().unwrap().unwrap();
        // Keep draining, so the client never writes into a closed pipe.
        std::thread::spawn(move || for _ in lines {});
        first
    });
    let hello = tokio::time::timeout(Duration::from_secs(10), hello).await.expect("watch says hello").unwrap();
    assert!(hello.contains("watching run changes of b"), "{hello}");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    signal(&srv, "a", "a1", vec![("business.run.status", s("started"))]).await;
    signal(&srv, "b", "b1", vec![("business.records.ok", n(3))]).await;
    signal(&srv, "b", "b1", vec![("business.run.status", s("succeeded"))]).await;
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a line within 10 s").unwrap();
    let l1 = next().await;
    assert!(l1.contains("  b  b1  running  ") && l1.contains("ok=3"), "{l1}");
    let l2 = next().await;
    assert!(l2.contains("  b  b1  succeeded  "), "{l2}");
    // Shutdown ends the stream (and stays clean); the watcher says so, exit 3.
    srv.stop().await;
    let st = tokio::task::spawn_blocking(move || {
        let st = child.wait().unwrap();
        (st, child)
    });
    let (st, _child) =
        tokio::time::timeout(Duration::from_secs(10), st).await.expect("watch exits when the server stops").unwrap();
    assert_eq!(st.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exit_codes() {
    let srv = Server::start().await;
    let url = base(&srv);
    finished(&srv, "good", "g1", true).await;
    finished(&srv, "bad", "b1", false).await;

    let o = cli(&["wait", "good", "--timeout", "10s", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).starts_with("good run g1 succeeded after"), "{}", out(&o));
    let o = cli(&["wait", "bad", "--run-id", "b1", "--timeout", "10s", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(out(&o).contains("bad run b1 failed") && out(&o).contains("ledger unavailable"), "{}", out(&o));

    // Timeout: a run that stays open, and a process with no run at all.
    signal(&srv, "slow", "s1", vec![("business.run.status", s("started"))]).await;
    let o = cli(&["wait", "slow", "--timeout", "1s", "--interval", "100ms", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("timed out after 1s waiting for slow: run s1 is still running"), "{}", err(&o));
    let o = cli(&["wait", "none", "--timeout", "300ms", "--interval", "100ms", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("no run started within the last 24h"), "{}", err(&o));
    // A run that started before --since does not count.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let o = cli(&["wait", "good", "--since", "1ms", "--timeout", "200ms", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));

    // Waits for a run that has not started yet, and for it to finish.
    let waiting = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            Command::new(BIN)
                .args(["wait", "later", "--timeout", "20s", "--interval", "100ms", "--server", &url])
                .output()
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&srv, "later", "l1", vec![("business.run.status", s("started"))]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&srv, "later", "l1", vec![("business.run.status", s("succeeded"))]).await;
    let o = waiting.await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).starts_with("later run l1 succeeded"), "{}", out(&o));

    // Unreachable server: exit 3 with a clear message. A port nothing listens on:
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let o = cli(&["wait", "good", "--timeout", "5s", "--server", &format!("http://{closed}")]).await;
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert!(err(&o).contains(&format!("cannot reach bizsignal at http://{closed}/")), "{}", err(&o));
    let o = cli(&["runs", "list", "--server", &format!("http://{closed}")]).await;
    assert_eq!(o.status.code(), Some(3));

    // Usage errors are 4, never 2 (which means "timed out").
    assert_eq!(cli(&["wait", "good"]).await.status.code(), Some(4));
    assert_eq!(cli(&["wait", "good", "--timeout", "soon"]).await.status.code(), Some(4));
    srv.stop().await;
}
