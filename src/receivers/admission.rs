//! Admission control for intake, before anything is decoded: the per-client
//! request rate limit and the memory budget of requests in flight.
//!
//! **Memory budget** (`limits.max_inflight_bytes`). Every intake request
//! (OTLP/gRPC, OTLP/HTTP, `POST /api/v1/events`) holds a [`Reservation`] from
//! the moment its headers arrive until it is answered. The reservation grows
//! *before* memory is used: with the announced `Content-Length` (HTTP), with
//! each body frame as it is read (both protocols, so chunked bodies and gRPC
//! streams are covered), with each chunk as a gzip body is inflated (HTTP),
//! and to the decoded message's size for compressed gRPC messages. When the
//! budget cannot cover the next step the request is refused with the same
//! retryable answer as a full queue (429 + `Retry-After`, or
//! `RESOURCE_EXHAUSTED` + `RetryInfo`) and counted in
//! `bizsignal.requests.memory_limited`. The reservation is released when the
//! answer is produced, so the signals of a request waiting in the tracker
//! queue stay covered by the bytes they came from.
//!
//! **Rate limit** (`limits.requests_per_second_per_client`, off by default).
//! A token bucket per client; the client is the intake token when intake
//! tokens are configured (its hash, never the token), else the peer IP. The
//! map is bounded: a client whose bucket has refilled is indistinguishable
//! from a new one and is dropped by a periodic sweep; at [`MAX_CLIENTS`] the
//! map sweeps at once, and if every client is still active, new clients
//! share one overflow bucket.

use crate::auth::Auth;
use crate::metrics::SelfMetrics;
use axum::body::Bytes;
use bytes::Buf;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Most clients tracked by the rate limiter (about 64 bytes each).
pub const MAX_CLIENTS: usize = 65_536;
/// How often idle clients are swept from the rate limiter's map.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Bytes reserved by requests in flight, bounded by a limit.
pub struct InflightBudget {
    limit: u64,
    metrics: Arc<SelfMetrics>,
}

impl InflightBudget {
    pub fn new(limit: usize, metrics: Arc<SelfMetrics>) -> Arc<Self> {
        Arc::new(InflightBudget { limit: limit as u64, metrics })
    }

    fn used(&self) -> &AtomicU64 {
        &self.metrics.inflight_bytes
    }

    fn try_take(&self, n: u64) -> bool {
        self.used()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= self.limit))
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used().fetch_sub(n, Ordering::AcqRel);
    }

    /// An empty reservation that grows on demand.
    pub fn reserve(self: &Arc<Self>) -> Arc<Reservation> {
        Arc::new(Reservation { budget: self.clone(), held: AtomicUsize::new(0) })
    }
}

/// The memory one request holds from its budget; released on drop.
pub struct Reservation {
    budget: Arc<InflightBudget>,
    held: AtomicUsize,
}

/// The budget cannot cover a request's next step.
#[derive(Debug, Clone, Copy)]
pub struct MemoryExhausted;

impl std::fmt::Display for MemoryExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bizsignal is at its in-flight memory limit (limits.max_inflight_bytes); retry later")
    }
}

impl std::error::Error for MemoryExhausted {}

impl Reservation {
    /// Makes the reservation at least `total` bytes.
    pub fn cover(&self, total: usize) -> Result<(), MemoryExhausted> {
        let held = self.held.load(Ordering::Acquire);
        if total <= held {
            return Ok(());
        }
        self.grow(total - held)
    }

    /// Adds `n` bytes to the reservation.
    pub fn grow(&self, n: usize) -> Result<(), MemoryExhausted> {
        if n == 0 {
            return Ok(());
        }
        if self.budget.try_take(n as u64) {
            self.held.fetch_add(n, Ordering::AcqRel);
            Ok(())
        } else {
            Err(MemoryExhausted)
        }
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(*self.held.get_mut() as u64);
    }
}

/// Who is sending: the rate limit's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// xxh3 of an intake token (the token itself is never kept).
    Token(u64),
    Ip(IpAddr),
    /// New clients while the map is full of active ones.
    Overflow,
    Unknown,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-client token buckets.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(HashMap<ClientKey, Bucket>, Instant)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: usize) -> Self {
        RateLimiter { rate, burst: burst as f64, state: Mutex::new((HashMap::new(), Instant::now())) }
    }

    /// Time for an empty bucket to refill completely: after that a client is
    /// indistinguishable from a new one.
    fn idle_after(&self) -> Duration {
        Duration::from_secs_f64(self.burst / self.rate)
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: ClientKey, now: Instant) -> Result<(), Duration> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (clients, last_sweep) = &mut *guard;
        let idle = self.idle_after();
        let mut key = key;
        if now.duration_since(*last_sweep) >= SWEEP_EVERY
            || (clients.len() >= MAX_CLIENTS && !clients.contains_key(&key))
        {
            clients.retain(|_, b| now.saturating_duration_since(b.last) < idle);
            *last_sweep = now;
            if clients.len() >= MAX_CLIENTS && !clients.contains_key(&key) {
                key = ClientKey::Overflow;
            }
        }
        let b = clients.entry(key).or_insert(Bucket { tokens: self.burst, last: now });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// Clients currently tracked.
    pub fn clients(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    Memory,
    /// Rate limited; a token is available after this long.
    Rate(Duration),
}

/// Admission for all intake endpoints.
pub struct Admission {
    pub budget: Arc<InflightBudget>,
    pub rate: Option<RateLimiter>,
    pub auth: Arc<Auth>,
    pub metrics: Arc<SelfMetrics>,
    /// Suggested delay after a memory refusal.
    pub retry_after: Duration,
    /// A refused request's body is read and discarded up to this many bytes
    /// before the refusal is sent, so clients that are still sending (HTTP/2
    /// clients such as tonic fail with "broken pipe" otherwise) see the
    /// retryable status; beyond it the stream is simply reset.
    pub drain_limit: usize,
}

impl Admission {
    pub fn new(
        limits: &crate::config::Limits,
        retry_after: Duration,
        auth: Arc<Auth>,
        metrics: Arc<SelfMetrics>,
    ) -> Arc<Self> {
        let rate = limits.requests_per_second_per_client.map(|r| {
            let burst = limits.request_burst_per_client.unwrap_or_else(|| (r.ceil() as usize).max(1));
            RateLimiter::new(r, burst)
        });
        Arc::new(Admission {
            budget: InflightBudget::new(limits.max_inflight_bytes, metrics.clone()),
            rate,
            auth,
            metrics,
            retry_after,
            drain_limit: limits.max_request_bytes.max(limits.max_decompressed_bytes) + (64 << 10),
        })
    }

    fn client(&self, authorization: Option<&[u8]>, peer: Option<IpAddr>) -> ClientKey {
        if self.auth.intake.enabled() {
            if let Some(token) = authorization.and_then(crate::auth::bearer) {
                if self.auth.intake.allows(Some(token)) {
                    return ClientKey::Token(xxhash_rust::xxh3::xxh3_64(token));
                }
            }
        }
        peer.map(ClientKey::Ip).unwrap_or(ClientKey::Unknown)
    }

    /// Checks the rate limit and opens a reservation, pre-sized with
    /// `announced` bytes (a `Content-Length` within the request size limit).
    pub fn admit(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
        announced: Option<usize>,
    ) -> Result<Arc<Reservation>, Refusal> {
        if let Some(rl) = &self.rate {
            if let Err(wait) = rl.check(self.client(authorization, peer), Instant::now()) {
                SelfMetrics::add(&self.metrics.requests_rate_limited, 1);
                return Err(Refusal::Rate(wait));
            }
        }
        let r = self.budget.reserve();
        if r.cover(announced.unwrap_or(0)).is_err() {
            self.memory_refused();
            return Err(Refusal::Memory);
        }
        Ok(r)
    }

    /// Counts a memory refusal made after admission (while reading or inflating).
    pub fn memory_refused(&self) {
        SelfMetrics::add(&self.metrics.requests_refused_memory, 1);
    }

    /// The delay to suggest for a refusal, in whole seconds for `Retry-After`.
    pub fn retry_after(&self, r: Refusal) -> Duration {
        match r {
            Refusal::Memory => self.retry_after,
            Refusal::Rate(wait) => Duration::from_secs(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// The gRPC refusal: RESOURCE_EXHAUSTED with RetryInfo (retryable for OTLP clients).
    pub fn grpc_status(&self, r: Refusal) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        let (msg, delay) = match r {
            Refusal::Memory => (MemoryExhausted.to_string(), self.retry_after),
            Refusal::Rate(wait) => (RATE_LIMITED.to_string(), wait.max(Duration::from_millis(1))),
        };
        tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            msg,
            ErrorDetails::with_retry_info(Some(delay)),
        )
    }
}

pub const RATE_LIMITED: &str =
    "request rate limit of this client exceeded (limits.requests_per_second_per_client); retry later";

/// A request body that reserves its bytes from the budget as they arrive.
pub struct CountedBody<B> {
    inner: B,
    seen: usize,
    reservation: Arc<Reservation>,
    admission: Arc<Admission>,
    /// gRPC bodies fail with a `tonic::Status` so tonic answers with its code.
    grpc: bool,
    /// Over the budget: the rest of the body is read and dropped, then the error is returned.
    draining: Option<usize>,
    failed: bool,
}

impl<B> CountedBody<B> {
    fn fail(&mut self) -> Box<dyn std::error::Error + Send + Sync> {
        self.failed = true;
        if self.grpc {
            Box::new(self.admission.grpc_status(Refusal::Memory))
        } else {
            Box::new(MemoryExhausted)
        }
    }

    pub fn new(inner: B, reservation: Arc<Reservation>, admission: Arc<Admission>, grpc: bool) -> Self {
        CountedBody { inner, seen: 0, reservation, admission, grpc, draining: None, failed: false }
    }
}

impl<B> http_body::Body for CountedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    if let Some(drained) = &mut this.draining {
                        // Dropped at once: only the bandwidth is spent.
                        *drained += n;
                        if *drained > this.admission.drain_limit {
                            return Poll::Ready(Some(Err(this.fail())));
                        }
                        continue;
                    }
                    this.seen += n;
                    if this.reservation.cover(this.seen).is_err() {
                        this.admission.memory_refused();
                        this.draining = Some(this.seen);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) if this.draining.is_some() => return Poll::Ready(Some(Err(this.fail()))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.draining.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads and drops a refused request's body, up to `limit` bytes.
pub async fn drain<B>(body: B, limit: usize)
where
    B: http_body::Body + Unpin,
{
    let mut body = body;
    let mut n = 0usize;
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                n += frame.data_ref().map_or(0, |d| d.remaining());
                if n > limit {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Whether an error (e.g. a body extractor's rejection) was caused by the memory budget.
pub fn is_memory_exhausted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<MemoryExhausted>() {
            return true;
        }
        cur = err.source();
    }
    false
}

// ------------------------------------------------------------------ HTTP

fn content_length(h: &http::HeaderMap) -> Option<usize> {
    h.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// State of the HTTP admission middleware.
#[derive(Clone)]
pub struct HttpAdmission {
    pub admission: Arc<Admission>,
    /// Body size limit of the port: a larger `Content-Length` is not
    /// reserved up front (the body extractor answers 413).
    pub max_body_bytes: usize,
    /// `true` on the OTLP/HTTP port (every POST is intake); on the API port
    /// only `POST /api/v1/events` is.
    pub otlp: bool,
}

/// Axum middleware: rate limit and memory reservation for intake requests.
/// Placed inside authentication, so only authenticated requests count.
pub async fn http_admission(
    axum::extract::State(s): axum::extract::State<HttpAdmission>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let intake = req.method() == http::Method::POST && (s.otlp || req.uri().path() == "/api/v1/events");
    if !intake {
        return next.run(req).await;
    }
    let peer = req.extensions().get::<axum::extract::ConnectInfo<crate::net::ConnInfo>>().map(|c| c.0.remote.ip());
    let announced = content_length(req.headers()).filter(|n| *n <= s.max_body_bytes);
    let auth = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
    let a = &s.admission;
    let reservation = match a.admit(auth, peer, announced) {
        Ok(r) => r,
        Err(refusal) => {
            let msg = match refusal {
                Refusal::Memory => MemoryExhausted.to_string(),
                Refusal::Rate(_) => RATE_LIMITED.to_string(),
            };
            let delay = a.retry_after(refusal);
            let (parts, body) = req.into_parts();
            drain(body, a.drain_limit).await;
            if s.otlp {
                let enc = super::http::request_encoding(&parts.headers);
                let mut e = super::http::HttpError::new(http::StatusCode::TOO_MANY_REQUESTS, msg, enc);
                e.retry_after = Some(delay);
                return e.into_response();
            }
            let mut r =
                (http::StatusCode::TOO_MANY_REQUESTS, axum::Json(serde_json::json!({ "error": msg }))).into_response();
            r.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(delay.as_secs().max(1)));
            return r;
        }
    };
    let (mut parts, body) = req.into_parts();
    let body = axum::body::Body::new(CountedBody::new(body, reservation.clone(), a.clone(), false));
    parts.extensions.insert(reservation.clone());
    let resp = next.run(axum::extract::Request::from_parts(parts, body)).await;
    drop(reservation);
    resp
}

// ------------------------------------------------------------------ gRPC

/// Tower layer for the OTLP/gRPC server: rate limit and memory reservation
/// before tonic reads and decodes the message.
#[derive(Clone)]
pub struct GrpcAdmissionLayer(pub Arc<Admission>);

impl<S> tower::Layer<S> for GrpcAdmissionLayer {
    type Service = GrpcAdmission<S>;
    fn layer(&self, inner: S) -> GrpcAdmission<S> {
        GrpcAdmission { inner, admission: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcAdmission<S> {
    inner: S,
    admission: Arc<Admission>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for GrpcAdmission<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let a = self.admission.clone();
        let peer = req.extensions().get::<crate::net::ConnInfo>().map(|c| c.remote.ip());
        let auth = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        let reservation = match a.admit(auth, peer, None) {
            Ok(r) => r,
            Err(refusal) => {
                let status = a.grpc_status(refusal);
                let limit = a.drain_limit;
                return Box::pin(async move {
                    drain(req.into_body(), limit).await;
                    Ok(status.into_http::<ResBody>())
                });
            }
        };
        let (mut parts, body) = req.into_parts();
        let body = tonic::body::Body::new(CountedBody::new(body, reservation.clone(), a, true));
        parts.extensions.insert(reservation.clone());
        // The service was made ready by poll_ready; hand it over, keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let r = fut.await;
            drop(reservation);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_reserves_and_releases() {
        let m = Arc::new(SelfMetrics::default());
        let b = InflightBudget::new(100, m.clone());
        let r1 = b.reserve();
        r1.cover(60).unwrap();
        r1.cover(40).unwrap();
        assert_eq!(r1.held(), 60);
        let r2 = b.reserve();
        assert!(r2.grow(41).is_err());
        r2.grow(40).unwrap();
        assert_eq!(m.inflight_bytes.load(Ordering::Relaxed), 100);
        drop(r1);
        assert_eq!(m.inflight_bytes.load(Ordering::Relaxed), 40);
        drop(r2);
        assert_eq!(m.inflight_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn token_bucket_refills_and_evicts_idle_clients() {
        let rl = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        let ip = |n: u8| ClientKey::Ip(IpAddr::from([10, 0, 0, n]));
        for _ in 0..3 {
            rl.check(ip(1), t0).unwrap();
        }
        let wait = rl.check(ip(1), t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another client has its own bucket.
        rl.check(ip(2), t0).unwrap();
        // Half a second later one token is back.
        rl.check(ip(1), t0 + Duration::from_millis(500)).unwrap();
        assert!(rl.check(ip(1), t0 + Duration::from_millis(500)).is_err());
        // After the sweep interval both are idle (refilled after 1.5 s) and dropped.
        rl.check(ip(3), t0 + SWEEP_EVERY + Duration::from_secs(1)).unwrap();
        assert_eq!(rl.clients(), 1);
    }
}
