//! bizsignal: an OpenTelemetry-native business-signal processor.
//!
//! Data flows one way: [`receivers`] decode OTLP → [`classify`] turns spans
//! and logs into business [`signal::Signal`]s → [`runs`] folds them into
//! process runs and checks expectations → [`storage`] keeps events and runs
//! → [`api`] serves them. [`app`] wires it together.

pub mod alloc;
pub mod api;
pub mod app;
pub mod auth;
pub mod classify;
pub mod client;
pub mod config;
pub mod demo;
pub mod loadgen;
pub mod metrics;
pub mod net;
pub mod receivers;
pub mod runs;
pub mod signal;
pub mod storage;

/// Wall-clock time in unix nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}
