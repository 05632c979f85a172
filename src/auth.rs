//! Bearer-token authentication and CORS.
//!
//! Two independent token sets: *intake* (OTLP/gRPC, OTLP/HTTP,
//! `POST /api/v1/events`) and *read* (REST API, live stream, `/metrics`).
//! A set with no configured source is open. Tokens come from a file (one per
//! line, `#` comments) re-read when it changes and on SIGHUP, and/or from an
//! environment variable (comma-separated, read at start). Comparison is
//! constant-time per token; refusals carry a fixed message and never echo
//! what the client sent. Tokens are never logged, only their number.

use crate::config::AuthConfig;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use subtle::ConstantTimeEq;

/// The one message every refusal carries.
pub const UNAUTHENTICATED: &str = "unauthenticated";

pub fn read_token_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
    Ok(parse_tokens(text.lines()))
}

pub fn read_token_env(name: &str) -> Result<Vec<Vec<u8>>, String> {
    let v = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
    Ok(parse_tokens(v.split(',')))
}

fn parse_tokens<'a>(items: impl Iterator<Item = &'a str>) -> Vec<Vec<u8>> {
    items.map(str::trim).filter(|t| !t.is_empty() && !t.starts_with('#')).map(|t| t.as_bytes().to_vec()).collect()
}

/// One token set.
pub struct Tokens {
    what: &'static str,
    enabled: bool,
    file: Option<PathBuf>,
    from_env: Vec<Vec<u8>>,
    current: RwLock<Arc<Vec<Vec<u8>>>>,
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

impl Tokens {
    fn new(what: &'static str, file: Option<PathBuf>, env: Option<&str>) -> Result<Tokens, String> {
        let from_env = match env {
            Some(n) => read_token_env(n)?,
            None => Vec::new(),
        };
        let t = Tokens {
            what,
            enabled: file.is_some() || env.is_some(),
            file,
            from_env,
            current: RwLock::new(Arc::new(Vec::new())),
            stamp: RwLock::new(None),
        };
        t.reload(true)?;
        Ok(t)
    }

    /// An open set: everything is allowed.
    pub fn open(what: &'static str) -> Tokens {
        Tokens {
            what,
            enabled: false,
            file: None,
            from_env: Vec::new(),
            current: RwLock::new(Arc::new(Vec::new())),
            stamp: RwLock::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Re-reads the file when it changed (or always with `force`). A file
    /// that cannot be read keeps the previous tokens.
    pub fn reload(&self, force: bool) -> Result<(), String> {
        let mut tokens = self.from_env.clone();
        if let Some(f) = &self.file {
            let meta = std::fs::metadata(f).map_err(|e| format!("cannot read token file {}: {e}", f.display()))?;
            let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
            if !force && *self.stamp.read().unwrap() == Some(stamp) {
                return Ok(());
            }
            tokens.extend(read_token_file(f)?);
            *self.stamp.write().unwrap() = Some(stamp);
        }
        let n = tokens.len();
        *self.current.write().unwrap() = Arc::new(tokens);
        if self.enabled {
            tracing::info!(tokens = n, set = self.what, "loaded authentication tokens");
        }
        Ok(())
    }

    /// Whether `token` is one of the set; always true for an open set.
    pub fn allows(&self, token: Option<&[u8]>) -> bool {
        if !self.enabled {
            return true;
        }
        let Some(token) = token else { return false };
        let tokens = self.current.read().unwrap().clone();
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.as_slice().ct_eq(token);
        }
        ok.into()
    }

    /// Checks an `Authorization: Bearer <token>` header value.
    pub fn allows_header(&self, value: Option<&HeaderValue>) -> bool {
        if !self.enabled {
            return true;
        }
        self.allows(value.and_then(|v| bearer(v.as_bytes())))
    }
}

pub(crate) fn bearer(v: &[u8]) -> Option<&[u8]> {
    if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        Some(v[7..].trim_ascii())
    } else {
        None
    }
}

/// Both token sets.
pub struct Auth {
    pub intake: Tokens,
    pub read: Tokens,
}

impl Auth {
    pub fn from_config(c: &AuthConfig) -> Result<Arc<Auth>, String> {
        Ok(Arc::new(Auth {
            intake: Tokens::new("intake", c.intake_tokens_file.clone(), c.intake_tokens_env.as_deref())?,
            read: Tokens::new("read", c.read_tokens_file.clone(), c.read_tokens_env.as_deref())?,
        }))
    }

    /// Re-reads changed token files every `interval`, and all of them on SIGHUP.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let auth = Arc::downgrade(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let force = tokio::select! {
                    _ = tick.tick() => false,
                    Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                #[cfg(not(unix))]
                let force = {
                    tick.tick().await;
                    false
                };
                let Some(auth) = auth.upgrade() else { return };
                for t in [&auth.intake, &auth.read] {
                    if let Err(e) = t.reload(force) {
                        tracing::warn!(set = t.what, error = %e, "cannot reload tokens; keeping the previous ones");
                    }
                }
            }
        })
    }
}

fn unauthorized_json() -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"error\":\"{UNAUTHENTICATED}\"}}"),
    )
        .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Middleware for the OTLP/HTTP port: everything there is intake.
pub async fn otlp_http_auth(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS || auth.intake.allows_header(req.headers().get(header::AUTHORIZATION)) {
        return next.run(req).await;
    }
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let enc = if ct.starts_with("application/x-protobuf") || ct.starts_with("application/protobuf") {
        Some(crate::receivers::http::Encoding::Protobuf)
    } else {
        Some(crate::receivers::http::Encoding::Json)
    };
    let mut r = crate::receivers::http::HttpError::new(StatusCode::UNAUTHORIZED, UNAUTHENTICATED, enc).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Middleware for the API port: `POST /api/v1/events` needs an intake token;
/// the page, `/healthz` and `/readyz` are open; everything else is a read.
pub async fn api_auth(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let tokens = if req.method() == Method::OPTIONS || matches!(path, "/" | "/healthz" | "/readyz") {
        None
    } else if path == "/api/v1/events" {
        Some(&auth.intake)
    } else {
        Some(&auth.read)
    };
    match tokens {
        Some(t) if !t.allows_header(req.headers().get(header::AUTHORIZATION)) => {
            // gRPC query API clients get a gRPC status, everyone else JSON.
            let grpc = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("application/grpc"));
            if grpc {
                tonic::Status::unauthenticated(UNAUTHENTICATED).into_http::<axum::body::Body>()
            } else {
                unauthorized_json()
            }
        }
        _ => next.run(req).await,
    }
}

/// The gRPC check, as a tonic interceptor.
pub fn grpc_interceptor(auth: Arc<Auth>) -> impl tonic::service::Interceptor + Clone {
    move |req: tonic::Request<()>| {
        let v = req.metadata().get("authorization").map(|v| v.as_bytes());
        if auth.intake.allows(v.and_then(bearer)) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(UNAUTHENTICATED))
        }
    }
}

/// CORS with an exact allow-list of origins; nothing at all when the list is empty.
pub async fn cors(State(origins): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    if origins.is_empty() {
        return next.run(req).await;
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| origins.iter().any(|a| a == o))
        .map(str::to_owned);
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h: &mut HeaderMap = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, content-encoding"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_compare_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "# ops\nalpha\n beta \n").unwrap();
        let t = Tokens::new("intake", Some(f.clone()), None).unwrap();
        assert!(t.allows_header(Some(&HeaderValue::from_static("Bearer alpha"))));
        assert!(t.allows_header(Some(&HeaderValue::from_static("bearer beta"))));
        assert!(!t.allows_header(Some(&HeaderValue::from_static("Bearer alph"))));
        assert!(!t.allows_header(Some(&HeaderValue::from_static("Bearer alphaa"))));
        assert!(!t.allows_header(Some(&HeaderValue::from_static("alpha"))));
        assert!(!t.allows_header(None));
        assert!(!t.allows(Some(b"# ops")));
        std::fs::write(&f, "gamma\n").unwrap();
        t.reload(true).unwrap();
        assert!(!t.allows(Some(b"alpha")) && t.allows(Some(b"gamma")));
        assert!(Tokens::open("read").allows(None));
    }
}
