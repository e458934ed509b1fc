//! Reaching the origins: a pooled keep-alive client, round robin over the configured
//! upstreams, and simple passive health (an upstream that fails to connect or answer is
//! skipped for a while). Bodies coming back are wrapped so that an origin that goes quiet
//! mid-body ends the response with an error instead of hanging it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Sleep;

use crate::balancer::health::{self, Active};
use crate::config::edge::{EdgeConfig, EdgeHealth};
use crate::http::body::{self, Body, BodyError};
use crate::http::interim::InterimRelay;

use super::policy::strip_hop_by_hop;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream answered within the timeout.
    #[error("upstream {0} timed out")]
    Timeout(String),
    /// The connection could not be made or broke before a response head.
    #[error("upstream {upstream}: {reason}")]
    Failed {
        /// Which upstream.
        upstream: String,
        /// What went wrong.
        reason: String,
    },
    /// The request could not be built (bad target).
    #[error("cannot build the upstream request: {0}")]
    Request(String),
}

/// The upstream set of one config version.
pub struct Upstreams {
    list: Vec<Upstream>,
    next: AtomicUsize,
    client: Client<HttpConnector, Body>,
    timeout: Duration,
    down_for: Duration,
    origin: Instant,
}

struct Upstream {
    authority: String,
    /// Milliseconds since `origin` until which this upstream is skipped.
    down_until: AtomicU64,
    failures: AtomicU64,
    /// What the active probes say (true while probes are off or not yet decided).
    probed_up: AtomicBool,
    probes: Mutex<Active>,
}

impl Upstreams {
    /// Builds the client and the rotation from config.
    pub fn new(cfg: &EdgeConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout.get()));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Upstreams {
            list: cfg
                .upstreams
                .iter()
                .map(|a| Upstream {
                    authority: a.clone(),
                    down_until: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    probed_up: AtomicBool::new(true),
                    probes: Mutex::new(Active::new()),
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
            timeout: cfg.upstream_timeout.get(),
            down_for: cfg.upstream_down_for.get(),
            origin: Instant::now(),
        }
    }

    /// The per-wait timeout (response head, and each body chunk).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next upstream in rotation that is not marked down (or the next one at all when
    /// every one is down: better to try than to fail without trying).
    fn pick(&self) -> usize {
        let n = self.list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.list[i].available(now))
            .unwrap_or(start % n)
    }

    /// Probes every upstream once (concurrently) and updates their probe state; an
    /// upstream going down or coming back is logged.
    pub async fn probe_all(&self, h: &EdgeHealth) {
        let timeout = h.timeout.get();
        let results = futures_util::future::join_all(self.list.iter().map(|u| async move {
            let addr = tokio::time::timeout(timeout, tokio::net::lookup_host(&u.authority))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|mut a| a.next());
            match addr {
                Some(a) => health::probe(a, &h.path, timeout).await,
                None => false,
            }
        }))
        .await;
        for (u, ok) in self.list.iter().zip(results) {
            let changed = match u.probes.lock() {
                Ok(mut a) => a.observe(ok, h.rise, h.fall),
                Err(_) => None,
            };
            if let Some(up) = changed {
                u.probed_up.store(up, Ordering::Relaxed);
                if up {
                    tracing::info!(upstream = %u.authority, "edge upstream is back (probes pass)");
                } else {
                    tracing::warn!(upstream = %u.authority, path = %h.path, "edge upstream is down (probes fail)");
                }
            }
        }
    }

    fn mark_down(&self, i: usize) {
        let until = self
            .now_ms()
            .saturating_add(self.down_for.as_millis() as u64);
        self.list[i].down_until.store(until, Ordering::Relaxed);
        self.list[i].failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends a request. Without a body it is retried once on another upstream when the
    /// first fails before answering (safe: nothing reached the application). 1xx interim
    /// responses go to `interim` (never into the cache: only the final response is
    /// returned).
    pub async fn send(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: Option<Body>,
        interim: Option<&InterimRelay>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let retryable = body.is_none() && self.list.len() > 1;
        let mut body = body;
        let attempts = if retryable { 2 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            let i = self.pick();
            let up = &self.list[i];
            let uri: Uri = format!("http://{}{target}", up.authority)
                .parse()
                .map_err(|e: http::uri::InvalidUri| UpstreamError::Request(e.to_string()))?;
            let mut req = Request::new(body.take().unwrap_or_else(body::empty));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri;
            *req.headers_mut() = headers.clone();
            if let Some(relay) = interim {
                let relay = relay.clone();
                hyper::ext::on_informational(&mut req, move |res| {
                    let mut headers = res.headers().clone();
                    strip_hop_by_hop(&mut headers);
                    if !relay.send(res.status(), &headers) {
                        tracing::debug!(status = %res.status(), "interim response not relayed");
                    }
                });
            }
            match tokio::time::timeout(self.timeout, self.client.request(req)).await {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => {
                    self.mark_down(i);
                    let mut reason = e.to_string();
                    if let Some(src) = std::error::Error::source(&e) {
                        reason = format!("{reason}: {src}");
                    }
                    last = Some(UpstreamError::Failed {
                        upstream: up.authority.clone(),
                        reason,
                    });
                }
                Err(_) => {
                    self.mark_down(i);
                    last = Some(UpstreamError::Timeout(up.authority.clone()));
                }
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Request("no upstream".into())))
    }

    /// Health per upstream, for `/admin/status`.
    pub fn status(&self) -> serde_json::Value {
        let now = self.now_ms();
        self.list
            .iter()
            .map(|u| {
                serde_json::json!({
                    "upstream": u.authority,
                    "healthy": u.available(now),
                    "probes_pass": u.probed_up.load(Ordering::Relaxed),
                    "failures": u.failures.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

impl Upstream {
    /// Takes requests: the probes pass and no recent request failed on it.
    fn available(&self, now: u64) -> bool {
        self.probed_up.load(Ordering::Relaxed) && self.down_until.load(Ordering::Relaxed) <= now
    }
}

/// How reading a body to store it ended.
pub enum Collected {
    /// The whole body, within the limit.
    Full(Bytes),
    /// More than the limit: what was read so far and the rest, to stream on.
    TooLarge(Bytes, Incoming),
}

/// Reads a whole body, waiting at most `idle` for each chunk, up to `limit` bytes.
/// A body that errors (reset, truncated against its Content-Length, idle) is an error: it
/// must never be stored.
pub async fn collect(
    mut incoming: Incoming,
    limit: usize,
    idle: Duration,
) -> Result<Collected, BodyError> {
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, incoming.frame()).await {
            Err(_) => return Err("upstream body went idle".into()),
            Ok(None) => return Ok(Collected::Full(buf.freeze())),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Collected::TooLarge(buf.freeze(), incoming));
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A streamed upstream body that fails when the origin is silent for longer than
    /// `idle`, optionally preceded by bytes already read.
    pub struct IdleBody {
        #[pin]
        inner: Incoming,
        #[pin]
        sleep: Sleep,
        idle: Duration,
        prefix: Option<Bytes>,
    }
}

impl IdleBody {
    /// Wraps `inner`, sending `prefix` first.
    pub fn boxed(inner: Incoming, idle: Duration, prefix: Option<Bytes>) -> Body {
        IdleBody {
            inner,
            sleep: tokio::time::sleep(idle),
            idle,
            prefix,
        }
        .boxed()
    }
}

impl HttpBody for IdleBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(r) => {
                let deadline = tokio::time::Instant::now() + *this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("upstream body went idle".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut h = self.inner.size_hint();
        if let Some(p) = &self.prefix {
            let n = p.len() as u64;
            h.set_lower(h.lower() + n);
            if let Some(u) = h.upper() {
                h.set_upper(u + n);
            }
        }
        h
    }
}
