//! The `bizsignal` command line.

use anyhow::Context as _;
use bizsignal::client::{self, exit};
use bizsignal::config::Config;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// See `bizsignal::alloc` for why, and the two settings `main` applies first.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "bizsignal", version, about = "OpenTelemetry-native business-signal processor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive OTLP, track process runs, serve the API.
    Serve {
        /// YAML config file (every key optional).
        #[arg(long)]
        config: Option<PathBuf>,
        /// OTLP/gRPC listen address [default: 0.0.0.0:4317]
        #[arg(long)]
        otlp_grpc: Option<SocketAddr>,
        /// OTLP/HTTP listen address [default: 0.0.0.0:4318]
        #[arg(long)]
        otlp_http: Option<SocketAddr>,
        /// API and /metrics listen address [default: 0.0.0.0:8080]
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Where the embedded store lives [default: ./data]
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config file without starting.
    CheckConfig { file: PathBuf },
    /// Apply the ClickHouse schema migrations (or print their DDL).
    Migrate {
        /// YAML config file with `storage.kind: clickhouse`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the DDL without connecting.
        #[arg(long)]
        dry_run: bool,
    },
    /// Send realistic business telemetry through the OTLP exporter.
    Demo {
        /// OTLP endpoint [default: http://localhost:4317 for grpc, http://localhost:4318 for http]
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, value_enum, default_value = "grpc")]
        protocol: bizsignal::demo::Protocol,
        /// Pause between progress steps of the import.
        #[arg(long, default_value = "1s")]
        pace: String,
        /// Suffix for the demo's run ids (default: the current time).
        #[arg(long)]
        run_suffix: Option<String>,
    },
    /// Generate OTLP load and report throughput, latency and server CPU.
    Loadgen(bizsignal::loadgen::LoadgenOptions),
    /// List, show and watch runs on a running bizsignal.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Wait until a run of PROCESS ends, for gating jobs: exits 0 when it
    /// succeeded, 1 when it failed, 2 on timeout, 3 when the server is unreachable.
    Wait {
        /// Process name.
        process: String,
        /// Wait for this run; without it, the newest run started within --since
        /// (waiting for one to start if there is none yet).
        #[arg(long)]
        run_id: Option<String>,
        /// How far back a run may have started (duration, or RFC 3339 time).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Give up after this long (e.g. 30m), exit code 2.
        #[arg(long)]
        timeout: String,
        /// Time between checks.
        #[arg(long, default_value = "1s")]
        interval: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Base URL of bizsignal's API (the --http port).
    #[arg(long, env = "BIZSIGNAL_SERVER", default_value = "http://localhost:8080")]
    server: String,
    /// Print JSON (the REST API's shapes) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs, newest first.
    List {
        /// Only runs of this process.
        #[arg(long)]
        process: Option<String>,
        /// Only runs with this status: running, stalled, succeeded or failed.
        #[arg(long)]
        status: Option<String>,
        /// Only runs started within this duration (24h) or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// At most this many runs (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// One run in full.
    Show {
        process: String,
        run_id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print a line for every change of a run as it happens.
    Watch {
        /// Only changes of this process.
        #[arg(long)]
        process: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    bizsignal::alloc::configure();
    // Usage errors exit 4, not clap's 2: `wait` uses 2 for "timed out".
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    match cli.command {
        Command::Runs { command } => client_command(command),
        Command::Wait { process, run_id, since, timeout, interval, server } => {
            let dur =
                |flag: &str, v: &str| bizsignal::config::parse_duration(v).map_err(|e| eprintln!("--{flag}: {e}"));
            let (Ok(timeout), Ok(interval)) = (dur("timeout", &timeout), dur("interval", &interval)) else {
                return ExitCode::from(exit::USAGE);
            };
            let args = client::WaitArgs { process, run_id, since, timeout, interval };
            with_client(&server, |c, json| async move { client::wait(&c, &args, json).await })
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Migrate { config, dry_run } => migrate(config, dry_run),
        Command::Loadgen(o) => bizsignal::loadgen::main(o),
        Command::Serve { config, otlp_grpc, otlp_http, http, data_dir } => {
            init_logging();
            let loaded = match config {
                Some(path) => Config::load(&path),
                None => Ok(Config::default()),
            };
            let mut cfg = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(a) = otlp_grpc {
                cfg.server.otlp_grpc = a;
            }
            if let Some(a) = otlp_http {
                cfg.server.otlp_http = a;
            }
            if let Some(a) = http {
                cfg.server.http = a;
            }
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            match serve(cfg) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(3),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { endpoint, protocol, pace, run_suffix } => {
            init_logging();
            let endpoint = endpoint.unwrap_or_else(|| match protocol {
                bizsignal::demo::Protocol::Grpc => "http://localhost:4317".into(),
                bizsignal::demo::Protocol::Http => "http://localhost:4318".into(),
            });
            let pace = match bizsignal::config::parse_duration(&pace) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("--pace: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            let opts = bizsignal::demo::DemoOptions { endpoint: endpoint.clone(), protocol, pace, run_suffix };
            // The OTLP exporters need a runtime context; the demo itself is sequential.
            let _guard = rt.enter();
            match rt.block_on(async { tokio::task::spawn_blocking(move || bizsignal::demo::run(&opts)).await }) {
                Ok(Ok(runs)) => {
                    for (p, r) in runs {
                        println!("sent {p} run {r}");
                    }
                    println!("see them at GET /api/v1/runs on bizsignal's --http port");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs one client command on a small runtime; returns its exit code.
fn with_client<F, Fut>(server: &ServerArgs, f: F) -> ExitCode
where
    F: FnOnce(client::Client, bool) -> Fut,
    Fut: std::future::Future<Output = u8>,
{
    let c = match client::Client::new(&server.server) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(rt.block_on(f(c, server.json)))
}

fn client_command(cmd: RunsCommand) -> ExitCode {
    match cmd {
        RunsCommand::List { process, status, since, limit, server } => {
            let args = client::ListArgs { process, status, since, limit };
            with_client(&server, |c, json| async move { client::runs_list(&c, &args, json).await })
        }
        RunsCommand::Show { process, run_id, server } => {
            with_client(&server, |c, json| async move { client::runs_show(&c, &process, &run_id, json).await })
        }
        RunsCommand::Watch { process, server } => {
            with_client(&server, |c, json| async move { client::runs_watch(&c, process.as_deref(), json).await })
        }
    }
}

fn migrate(config: Option<PathBuf>, dry_run: bool) -> ExitCode {
    let cfg = match config.map(|p| Config::load(&p)).unwrap_or_else(|| Ok(Config::default())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let ch = &cfg.storage.clickhouse;
    if dry_run {
        print!("{}", bizsignal::storage::clickhouse::ddl_text(ch));
        return ExitCode::SUCCESS;
    }
    if cfg.storage.kind != bizsignal::config::StorageKind::Clickhouse {
        eprintln!("migrate: storage.kind is not clickhouse (SQLite migrates itself at start-up)");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bizsignal::storage::clickhouse::migrate(ch)) {
        Ok(applied) if applied.is_empty() => {
            println!("schema is up to date");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            for v in applied {
                println!("applied migration {v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: Config) -> anyhow::Result<bool> {
    ignore_sigxfsz();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let app = bizsignal::app::start(cfg).await?;
        wait_for_signal().await;
        Ok(app.shutdown().await)
    })
}

/// A write past the file-size limit (`RLIMIT_FSIZE`: `ulimit -f`, systemd's
/// `LimitFSIZE=`, a container's limit) makes the kernel send SIGXFSZ, whose
/// default action kills the process — with storage full, every restart would
/// die at its first write (a crash loop). Ignored, the write fails with EFBIG
/// instead: the commit fails, clients get a retryable 503 / UNAVAILABLE, and
/// reads and health checks keep working (like ENOSPC on a full disk).
fn ignore_sigxfsz() {
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown signal received");
}
