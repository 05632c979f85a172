//! The real `bizsignal serve` binary as a child process, for tests that need
//! a process to signal, kill or measure. Ports are ephemeral; the bound
//! addresses are read from the start-up log line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_bizsignal");

/// A running `bizsignal serve`; killed when dropped.
pub struct ServeProcess {
    pub child: Child,
    pub otlp_grpc: String,
    pub otlp_http: String,
    pub http: String,
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeProcess {
    /// Starts `serve` on `data_dir`, with `config` (YAML text) written next to it if given.
    pub fn spawn(data_dir: &Path, config: Option<&str>) -> ServeProcess {
        Self::try_spawn_with(data_dir, config, |_| {}).expect("serve printed its addresses")
    }

    /// Like [`spawn`](Self::spawn), with `adjust` applied to the command (e.g.
    /// resource limits); `Err` with the exit status when it stops before
    /// printing its addresses.
    pub fn try_spawn_with(
        data_dir: &Path,
        config: Option<&str>,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<ServeProcess, std::process::ExitStatus> {
        let mut cmd = Command::new(BIN);
        adjust(&mut cmd);
        cmd.arg("serve");
        if let Some(text) = config {
            let path = data_dir.join("config.yaml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd
            .args(["--otlp-grpc", "127.0.0.1:0", "--otlp-http", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let field = |line: &str, key: &str| {
            line.split(&format!(" {key}=")).nth(1).map(|r| r.split_whitespace().next().unwrap().to_string())
        };
        loop {
            let Some(Ok(line)) = lines.next() else {
                return Err(child.wait().unwrap());
            };
            if line.contains("bizsignal started") {
                let (otlp_grpc, otlp_http, http) = (
                    field(&line, "otlp_grpc").unwrap(),
                    field(&line, "otlp_http").unwrap(),
                    field(&line, "http").unwrap(),
                );
                // Keep draining stderr so the server never blocks on a full pipe
                // (and show it with BIZSIGNAL_TEST_SERVE_LOG=1).
                let echo = std::env::var_os("BIZSIGNAL_TEST_SERVE_LOG").is_some();
                std::thread::spawn(move || {
                    for l in lines.map_while(Result::ok) {
                        if echo {
                            eprintln!("serve: {l}");
                        }
                    }
                });
                return Ok(ServeProcess { child, otlp_grpc, otlp_http, http });
            }
        }
    }

    /// Peak resident set size in KiB (VmHWM from /proc).
    pub fn vm_hwm_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// An OTLP/HTTP URL on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.otlp_http)
    }
}
