//! The balancer role: a reverse proxy that spreads requests over app servers.
//!
//! Per request ([`Balancer::handle`]): load the pool snapshot (one `ArcSwap` load, no
//! lock), rewrite headers ([`crate::proxy::headers`]), pick a backend ([`pick`]) among the
//! healthy ones ([`health`]), send on a pooled connection ([`crate::proxy::client`]), and
//! on failure retry elsewhere when that is safe and the retry budget ([`retry`]) allows.
//! Background: [`Balancer::run_health`] probes backends and sweeps idle connections.
//! Reload swaps the whole [`pool::Pool`]; certificates come from [`crate::tls`].

mod fast;
pub mod health;
pub mod pick;
mod pipe;
pub mod pool;
pub mod retry;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::config::balancer::{Algorithm, BalancerConfig};
use crate::http::admin::Component;
use crate::http::body::Body;
use crate::http::problem::Problem;
use crate::http::server::{wait_for, Shutdown};
use crate::metrics::Metrics;
use crate::proxy::body::{OnEnd, RequestBody, ResponseBody};
use crate::proxy::client::{SendFailure, Sender};
use crate::proxy::headers::{self, Forwarding};
use crate::proxy::{FailureKind, ProxyError};
use health::{now_ms, HealthState};
use pool::{Backend, BackendLabel, Families, Pool, Tried};

/// Why the balancer could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// A certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Most attempts a request may make, whatever the config says (bounds the per-request
/// record of tried backends).
const MAX_ATTEMPTS: usize = 10;
/// Most requests in one upstream pipeline.
const MAX_PIPELINE: usize = 256;

/// Checks a `[balancer]` section; errors name the field and say what to do.
pub fn validate(cfg: &BalancerConfig) -> Result<(), (String, String)> {
    let bad = |f: &str, r: String| Err((format!("balancer.{f}"), r));
    if cfg.backends.is_empty() {
        return bad("backends", "list at least one backend \"ip:port\"".into());
    }
    if cfg.backends.len() > 1000 {
        return bad("backends", "at most 1000 backends".into());
    }
    for (i, b) in cfg.backends.iter().enumerate() {
        if b.weight == 0 || b.weight > 1000 {
            return bad(
                &format!("backends[{i}].weight"),
                "weights go from 1 to 1000".into(),
            );
        }
        if cfg.backends[..i].iter().any(|o| o.address == b.address) {
            return bad(
                &format!("backends[{i}]"),
                format!("{} is listed twice", b.address),
            );
        }
    }
    match (&cfg.algorithm, &cfg.hash_key) {
        (Algorithm::Hash, None) => {
            return bad(
                "hash_key",
                "algorithm = \"hash\" needs hash_key = { header = \"X-User\" } or { cookie = \"session\" }"
                    .into(),
            )
        }
        (_, Some(crate::config::balancer::HashKey::Header(h)))
            if http::header::HeaderName::from_bytes(h.as_bytes()).is_err() =>
        {
            return bad("hash_key.header", format!("{h:?} is not a header name"))
        }
        (_, Some(crate::config::balancer::HashKey::Cookie(c))) if c.is_empty() => {
            return bad("hash_key.cookie", "name the cookie".into())
        }
        _ => {}
    }
    for (name, d) in [
        ("connect_timeout", cfg.connect_timeout),
        ("response_timeout", cfg.response_timeout),
        ("idle_timeout", cfg.idle_timeout),
        ("pool_idle_timeout", cfg.pool_idle_timeout),
        ("health.interval", cfg.health.interval),
        ("health.timeout", cfg.health.timeout),
        ("health.ejection_time", cfg.health.ejection_time),
        ("http.header_read_timeout", cfg.http.header_read_timeout),
    ] {
        if d.get().is_zero() {
            return bad(name, "must be more than 0".into());
        }
    }
    let h = &cfg.health;
    if !h.path.is_empty() && !h.path.starts_with('/') {
        return bad(
            "health.path",
            "must start with / (or be empty to switch probes off)".into(),
        );
    }
    if !h.path.is_empty() && h.path.parse::<Uri>().is_err() {
        return bad("health.path", format!("{:?} is not a valid path", h.path));
    }
    if h.rise == 0 || h.fall == 0 {
        return bad("health.rise", "rise and fall must be at least 1".into());
    }
    if h.max_ejected_percent > 100 {
        return bad(
            "health.max_ejected_percent",
            "a percentage: 0 to 100".into(),
        );
    }
    if h.max_ejection_time < h.ejection_time {
        return bad(
            "health.max_ejection_time",
            "must be at least ejection_time".into(),
        );
    }
    if cfg.retry.attempts == 0 || cfg.retry.attempts as usize > MAX_ATTEMPTS {
        return bad(
            "retry.attempts",
            format!("from 1 (no retries) to {MAX_ATTEMPTS}"),
        );
    }
    if cfg.pipeline == 0 || cfg.pipeline > MAX_PIPELINE {
        return bad(
            "pipeline",
            format!("from 1 (no pipelining) to {MAX_PIPELINE}"),
        );
    }
    if cfg.coalesce_wakeups.get() > crate::wake::MAX_NAP {
        return bad(
            "coalesce_wakeups",
            format!(
                "at most {} (it adds up to that much latency per wake-up)",
                crate::config::units::Dur(crate::wake::MAX_NAP)
            ),
        );
    }
    if cfg.coalesce_min_in_flight == 0 {
        return bad("coalesce_min_in_flight", "must be at least 1".into());
    }
    if cfg.http.max_connections == 0 {
        return bad("http.max_connections", "must be at least 1".into());
    }
    if let Some(t) = &cfg.tls {
        crate::tls::listener_config(t).map_err(|e| ("balancer.tls".to_owned(), e.to_string()))?;
    }
    Ok(())
}

/// The wake-up coalescing `cfg` asks for.
fn coalescing(cfg: &BalancerConfig) -> crate::wake::Coalescing {
    crate::wake::Coalescing {
        nap: cfg.coalesce_wakeups.get(),
        min_in_flight: cfg.coalesce_min_in_flight,
    }
}

/// A reload, prepared: applying it cannot fail.
pub struct Prepared {
    pool: Pool,
    tls: Option<Arc<rustls::ServerConfig>>,
    coalescing: crate::wake::Coalescing,
}

/// The running balancer role.
pub struct Balancer {
    pool: Arc<ArcSwap<Pool>>,
    families: Families,
    local: Family<StatusLabel, Counter>,
    budget_exhausted: Counter,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    listen: ArcSwap<Option<SocketAddr>>,
    shutdown: Shutdown,
}

/// Label of the balancer's own answers (502/503/504).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

impl Balancer {
    /// Builds the role from its config and registers its metrics.
    pub fn new(
        cfg: &BalancerConfig,
        access_log: bool,
        metrics: &Metrics,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, BalancerError> {
        let families = Families::default();
        let mut pool = Pool::build(cfg, None, &families);
        pool.access_log = access_log;
        let pool = Arc::new(ArcSwap::from_pointee(pool));
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(ArcSwap::new(crate::tls::listener_config(t)?))),
            None => None,
        };
        let b = Arc::new(Balancer {
            pool,
            families,
            local: Family::default(),
            budget_exhausted: Counter::default(),
            tls,
            listen: ArcSwap::from_pointee(None),
            shutdown,
        });
        b.register_metrics(metrics);
        b.coalesce(coalescing(cfg));
        Ok(b)
    }

    /// Puts `policy` in force for the process, applied to the requests in flight at the
    /// backends of the pool in force each time the runtime is about to park.
    fn coalesce(&self, policy: crate::wake::Coalescing) {
        let pool = Arc::downgrade(&self.pool);
        crate::wake::install(policy, move || {
            pool.upgrade().map_or(0, |p| {
                let pool = p.load();
                pool.backends.iter().map(|b| b.load() as usize).sum()
            })
        });
    }

    fn register_metrics(&self, m: &Metrics) {
        let f = &self.families;
        m.register(
            "balancer_backend_requests",
            "Attempts sent to a backend",
            f.requests.clone(),
        );
        m.register(
            "balancer_backend_errors",
            "Attempts that failed: connect errors, timeouts, broken exchanges, 5xx",
            f.errors.clone(),
        );
        m.register(
            "balancer_backend_retries",
            "Failed attempts on a backend that were retried on another",
            f.retries.clone(),
        );
        m.register(
            "balancer_backend_ejections",
            "Times a backend was ejected for failing requests",
            f.ejections.clone(),
        );
        m.register(
            "balancer_backend_response_seconds",
            "Time from sending a request to the backend's response head",
            f.latency.clone(),
        );
        m.register(
            "balancer_backend_pipeline_batch_requests",
            "Requests per pipelined batch written to a backend (pipeline > 1)",
            f.batch_requests.clone(),
        );
        m.register(
            "balancer_local_responses",
            "Errors the balancer answered itself (502, 503, 504)",
            self.local.clone(),
        );
        m.register(
            "balancer_wake_naps",
            "Naps taken before waiting for I/O (coalesce_wakeups)",
            crate::wake::naps().clone(),
        );
        m.register(
            "balancer_retry_budget_exhausted",
            "Retries refused because the retry budget was spent",
            self.budget_exhausted.clone(),
        );
        let live = |get: fn(&Backend, u64) -> i64| LiveGauge {
            pool: self.pool.clone(),
            get,
        };
        m.register(
            "balancer_backend_healthy",
            "1 when the backend takes traffic, 0 when down or ejected",
            live(|b, now| i64::from(b.health.available(now))),
        );
        m.register(
            "balancer_backend_open_connections",
            "Open connections to the backend",
            live(|b, _| b.conns.open_connections()),
        );
        m.register(
            "balancer_backend_in_flight",
            "Requests in flight to the backend",
            live(|b, _| i64::from(b.load())),
        );
    }

    /// Records the bound listen address, for status (and for tests that bind port 0).
    pub fn set_listen(&self, addr: SocketAddr) {
        self.listen.store(Arc::new(Some(addr)));
    }

    /// The TLS config in force, when TLS is on; swapped on reload.
    pub fn tls(&self) -> Option<Arc<ArcSwap<rustls::ServerConfig>>> {
        self.tls.clone()
    }

    /// Builds everything a reload needs; nothing changes until [`Balancer::apply`].
    pub fn prepare(
        &self,
        cfg: &BalancerConfig,
        access_log: bool,
    ) -> Result<Prepared, BalancerError> {
        let tls = match (&cfg.tls, &self.tls) {
            (Some(t), Some(_)) => Some(crate::tls::listener_config(t)?),
            _ => None,
        };
        let mut pool = Pool::build(cfg, Some(&self.pool.load()), &self.families);
        pool.access_log = access_log;
        Ok(Prepared {
            pool,
            tls,
            coalescing: coalescing(cfg),
        })
    }

    /// Installs a prepared reload. In-flight requests finish on the pool they started with;
    /// removed backends drop their idle connections now and busy ones when done.
    pub fn apply(&self, prepared: Prepared) {
        let new = Arc::new(prepared.pool);
        let old = self.pool.swap(new.clone());
        for b in &old.backends {
            if !new.backends.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.conns.clear();
                tracing::info!(backend = %b.address, in_flight = b.load(), "backend removed");
            }
        }
        for b in &new.backends {
            if !old.backends.iter().any(|o| Arc::ptr_eq(o, b)) {
                tracing::info!(backend = %b.address, "backend added");
            }
        }
        if let (Some(cfg), Some(slot)) = (prepared.tls, &self.tls) {
            slot.store(cfg);
        }
        self.coalesce(prepared.coalescing);
    }

    /// The service for one client connection from `peer` over `proto` (`http`/`https`).
    pub fn service(
        self: &Arc<Self>,
        peer: SocketAddr,
        proto: &'static str,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Send
           + 'static {
        let conn = Arc::new(Forwarding::new(peer.ip(), proto));
        let b = self.clone();
        hyper::service::service_fn(move |req| b.clone().handle(req, conn.clone()))
    }

    /// Answers one client request (errors become problem+json responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        fwd: Arc<Forwarding>,
    ) -> Result<Response<Body>, Infallible> {
        let pool = self.pool.load_full();
        let log = pool.access_log.then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                Instant::now(),
            )
        });
        let resp = match self.forward(&pool, req, &fwd).await {
            Ok(resp) => resp,
            Err((problem, id)) => {
                self.local
                    .get_or_create(&StatusLabel {
                        status: problem.status,
                    })
                    .inc();
                let mut resp = problem.into_response();
                if let Some(id) = id {
                    resp.headers_mut().insert(headers::X_REQUEST_ID.clone(), id);
                }
                resp
            }
        };
        if let Some((method, path, started)) = log {
            let id = resp
                .headers()
                .get(&headers::X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info!(target: "access", peer = %fwd.client, %method, path, status = resp.status().as_u16(), micros = started.elapsed().as_micros() as u64, request_id = id);
        }
        Ok(resp)
    }

    async fn forward(
        &self,
        pool: &Arc<Pool>,
        req: Request<Incoming>,
        fwd: &Forwarding,
    ) -> Result<Response<Body>, (Problem, Option<HeaderValue>)> {
        if req.method() == Method::CONNECT {
            return Err((
                Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "this is a reverse proxy; CONNECT tunnels are not offered",
                ),
                None,
            ));
        }
        pool.budget.on_request();
        let (mut parts, body) = req.into_parts();
        let (upgrade, request_id) = headers::to_upstream(
            &mut parts.headers,
            parts.version,
            parts.uri.authority().map(|a| a.as_str()),
            fwd,
        );
        parts.uri = origin_form(&parts.uri);
        parts.version = http::Version::HTTP_11;
        let key = match (&pool.algorithm, &pool.key) {
            (Algorithm::Hash, Some(k)) => k.hash(&parts.headers),
            _ => None,
        };
        let fail = |p: Problem| (p, Some(request_id.clone()));
        if upgrade.is_some() {
            return self
                .tunnel(pool, parts, body, key, &request_id)
                .await
                .map_err(fail);
        }
        let body = RequestBody::from_incoming(body, pool.upstream.idle_timeout);
        let attempts = (pool.retry.attempts as usize).clamp(1, MAX_ATTEMPTS);
        // What a retry after a sent request needs; only idempotent, bodiless requests can
        // be sent again, so only they pay for the copy.
        let replay = (attempts > 1
            && headers::idempotent(&parts.method)
            && matches!(body, RequestBody::Empty))
        .then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        let mut req = Request::from_parts(parts, body);
        let mut tried = Tried::default();
        let mut last: Option<(ProxyError, SocketAddr)> = None;
        let started = Instant::now();
        for attempt in 0..attempts {
            let now = now_ms();
            if attempt > 0 && !pool.budget.try_retry(now / 1000) {
                self.budget_exhausted.inc();
                break;
            }
            let Some(i) = pool.pick_untried(key, now, &mut tried) else {
                break;
            };
            let backend = &pool.backends[i];
            backend.dispatch();
            let sent_at = Instant::now();
            match backend.conns.send(req, &pool.upstream).await {
                Ok((resp, sender)) => {
                    backend
                        .metrics
                        .latency
                        .observe(sent_at.elapsed().as_secs_f64());
                    if resp.status().is_server_error() {
                        self.failed(pool, backend, now);
                    } else {
                        backend.health.request_ok();
                    }
                    return Ok(self.respond(pool, backend, resp, sender, &request_id));
                }
                Err(SendFailure::NotSent(e, back)) => {
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    self.failed(pool, backend, now);
                    backend.metrics.retries.inc();
                    tracing::debug!(backend = %backend.address, error = %e, "nothing sent; trying another backend");
                    req = *back;
                    last = Some((e, backend.address));
                }
                Err(SendFailure::Sent(e)) => {
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    if !e.blames_upstream() {
                        return Err(fail(problem_for(&e, backend.address, started)));
                    }
                    self.failed(pool, backend, now);
                    // A timeout is not retried: the backend may still be working on it, and
                    // repeating slow requests is how retry storms start.
                    let again = match (&replay, e.kind) {
                        (_, FailureKind::ResponseTimeout) | (None, _) => None,
                        (Some((m, u, h)), _) => {
                            let mut r = Request::new(RequestBody::Empty);
                            *r.method_mut() = m.clone();
                            *r.uri_mut() = u.clone();
                            *r.headers_mut() = h.clone();
                            Some(r)
                        }
                    };
                    tracing::debug!(backend = %backend.address, error = %e, retry = again.is_some(), "exchange failed");
                    let addr = backend.address;
                    match again {
                        Some(r) if attempt + 1 < attempts => {
                            backend.metrics.retries.inc();
                            req = r;
                            last = Some((e, addr));
                        }
                        _ => return Err(fail(problem_for(&e, addr, started))),
                    }
                }
            }
        }
        Err(fail(match last {
            Some((e, addr)) => problem_for(&e, addr, started),
            None => no_backend(pool),
        }))
    }

    /// Counts a failed attempt and ejects the backend when its failure streak is long
    /// enough and the pool can spare it.
    fn failed(&self, pool: &Pool, backend: &Backend, now: u64) {
        backend.metrics.errors.inc();
        let h = &pool.health;
        if !backend.health.request_failed(h.consecutive_failures) {
            return;
        }
        if !health::may_eject(
            pool.ejected(now),
            pool.backends.len(),
            h.max_ejected_percent,
        ) {
            return;
        }
        if let Some(time) =
            backend
                .health
                .eject(now, h.ejection_time.get(), h.max_ejection_time.get())
        {
            backend.metrics.ejections.inc();
            backend.conns.clear();
            tracing::warn!(backend = %backend.address, ejected_for = ?time, "backend ejected after consecutive failures");
        }
    }

    fn respond(
        &self,
        pool: &Pool,
        backend: &Arc<Backend>,
        resp: Response<Incoming>,
        sender: Sender,
        request_id: &HeaderValue,
    ) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        headers::to_downstream(&mut parts.headers, false, request_id);
        let done = Finish {
            backend: backend.clone(),
            sender: Some(sender),
            max_idle: pool.upstream.pool_max_idle,
        };
        let body = ResponseBody::new(body, pool.upstream.idle_timeout, done);
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }

    /// An upgrade (WebSocket): send the handshake on a fresh connection; on `101`, splice
    /// the two upgraded streams until either side closes or the node shuts down.
    async fn tunnel(
        &self,
        pool: &Arc<Pool>,
        mut parts: http::request::Parts,
        body: Incoming,
        key: Option<u64>,
        request_id: &HeaderValue,
    ) -> Result<Response<Body>, Problem> {
        let started = Instant::now();
        let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let now = now_ms();
        let mut tried = Tried::default();
        let attempts = (pool.retry.attempts as usize).clamp(1, MAX_ATTEMPTS);
        let mut last = None;
        for _ in 0..attempts {
            let Some(i) = pool.pick_untried(key, now, &mut tried) else {
                break;
            };
            let backend = &pool.backends[i];
            backend.metrics.requests.inc();
            let mut sender = match backend.conns.connect(pool.upstream.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    self.failed(pool, backend, now);
                    last = Some((e, backend.address));
                    continue;
                }
            };
            if !matches!(
                tokio::time::timeout(pool.upstream.connect_timeout, sender.ready()).await,
                Ok(Ok(()))
            ) {
                continue;
            }
            // The handshake request carries no body worth replaying; send it once.
            let req = Request::from_parts(
                parts,
                RequestBody::from_incoming(body, pool.upstream.idle_timeout),
            );
            let sent =
                tokio::time::timeout(pool.upstream.response_timeout, sender.send_request(req))
                    .await;
            let mut resp = match sent {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    self.failed(pool, backend, now);
                    let e = ProxyError::new(
                        FailureKind::Upstream,
                        "the backend failed the upgrade handshake",
                        Some(Box::new(e)),
                    );
                    return Err(problem_for(&e, backend.address, started));
                }
                Err(_) => {
                    self.failed(pool, backend, now);
                    let e = ProxyError::new(
                        FailureKind::ResponseTimeout,
                        "the backend did not answer the upgrade in time",
                        None,
                    );
                    return Err(problem_for(&e, backend.address, started));
                }
            };
            backend.health.request_ok();
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                backend.in_flight.fetch_add(1, Ordering::Relaxed);
                // Not pooled: this connection was opened for the upgrade.
                let (mut p, b) = resp.into_parts();
                headers::to_downstream(&mut p.headers, false, request_id);
                let done = Finish {
                    backend: backend.clone(),
                    sender: None,
                    max_idle: 0,
                };
                let b = ResponseBody::new(b, pool.upstream.idle_timeout, done);
                return Ok(Response::from_parts(p, http_body_util::BodyExt::boxed(b)));
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (mut p, _) = resp.into_parts();
            headers::to_downstream(&mut p.headers, true, request_id);
            let Some(client_upgrade) = client_upgrade else {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "this connection cannot be upgraded",
                ));
            };
            let backend = backend.clone();
            let mut shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                backend.in_flight.fetch_add(1, Ordering::Relaxed);
                let splice = async {
                    let (c, u) = tokio::try_join!(client_upgrade, upstream_upgrade)
                        .map_err(|e| e.to_string())?;
                    let mut c = hyper_util::rt::TokioIo::new(c);
                    let mut u = hyper_util::rt::TokioIo::new(u);
                    tokio::io::copy_bidirectional(&mut c, &mut u)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(())
                };
                tokio::select! {
                    r = splice => if let Err(e) = r {
                        tracing::debug!(error = %e, "tunnel ended with an error");
                    },
                    _ = wait_for(&mut shutdown) => {}
                }
                backend.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            return Ok(Response::from_parts(p, crate::http::body::empty()));
        }
        Err(match last {
            Some((e, addr)) => problem_for(&e, addr, started),
            None => no_backend(pool),
        })
    }

    /// Probes every backend each `health.interval` (all at once, each within
    /// `health.timeout`) and sweeps idle connections, until shutdown. Reads the pool anew
    /// each round, so reloaded settings and backends apply from the next round.
    pub async fn run_health(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            let pool = self.pool.load_full();
            let h = pool.health.clone();
            let mut probes = tokio::task::JoinSet::new();
            for b in &pool.backends {
                b.conns.sweep(pool.upstream.pool_idle_timeout);
                if h.path.is_empty() {
                    b.health.set_up();
                    continue;
                }
                let (b, path, timeout) = (b.clone(), h.path.clone(), h.timeout.get());
                probes.spawn(async move {
                    let ok = health::probe(b.address, &path, timeout).await;
                    (b, ok)
                });
            }
            let round = async {
                while let Some(Ok((b, ok))) = probes.join_next().await {
                    match b.health.probe_result(ok, h.rise, h.fall) {
                        Some(true) => {
                            tracing::info!(backend = %b.address, "backend is up (health check)")
                        }
                        Some(false) => {
                            b.conns.clear();
                            tracing::warn!(backend = %b.address, path = %h.path, "backend is down (health check)");
                        }
                        None => {}
                    }
                }
            };
            tokio::select! {
                _ = round => {}
                _ = wait_for(&mut shutdown) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(h.interval.get()) => {}
                _ = wait_for(&mut shutdown) => return,
            }
        }
    }
}

impl Component for Balancer {
    fn name(&self) -> &'static str {
        "balancer"
    }

    fn ready(&self) -> Result<(), String> {
        let pool = self.pool.load();
        let now = now_ms();
        if pool.backends.iter().any(|b| b.health.available(now)) {
            Ok(())
        } else {
            Err(format!(
                "no healthy backend (all {} are down or ejected)",
                pool.backends.len()
            ))
        }
    }

    fn status(&self) -> serde_json::Value {
        let pool = self.pool.load();
        let now = now_ms();
        let backends: Vec<serde_json::Value> = pool
            .backends
            .iter()
            .zip(&pool.weights)
            .map(|(b, w)| {
                let state = b.health.state(now);
                serde_json::json!({
                    "address": b.address.to_string(),
                    "weight": w,
                    "state": state,
                    "healthy": state == HealthState::Healthy,
                    "in_flight": b.load(),
                    "open_connections": b.conns.open_connections(),
                    "idle_connections": b.conns.idle_connections(),
                    "failure_streak": b.health.failure_streak(),
                    "ejected_for_ms": b.health.ejected_for_ms(now),
                    "requests": b.metrics.requests.get(),
                    "errors": b.metrics.errors.get(),
                    "ejections": b.metrics.ejections.get(),
                })
            })
            .collect();
        serde_json::json!({
            "listen": self.listen.load().as_ref().map(|a| a.to_string()),
            "tls": self.tls.is_some(),
            "algorithm": pool.algorithm,
            "healthy": pool.backends.iter().filter(|b| b.health.available(now)).count(),
            "backends": backends,
            "retry_budget_tokens": pool.budget.available(),
        })
    }
}

/// Hands the upstream connection back once the response was read to its end, and keeps
/// the in-flight count honest however the response ends.
struct Finish {
    backend: Arc<Backend>,
    sender: Option<Sender>,
    max_idle: usize,
}

impl OnEnd for Finish {
    fn end(&mut self, clean: bool) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let (true, Some(s)) = (clean, self.sender.take()) {
            self.backend.conns.put(s, self.max_idle);
        }
    }
}

/// A gauge per backend computed at scrape time from the live pool, so removed backends
/// disappear and nothing on the request path updates it.
#[derive(Debug)]
struct LiveGauge {
    pool: Arc<ArcSwap<Pool>>,
    get: fn(&Backend, u64) -> i64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backends", &self.backends.len())
            .finish()
    }
}

impl TypedMetric for LiveGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for LiveGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let pool = self.pool.load();
        let now = now_ms();
        for b in &pool.backends {
            let label = BackendLabel {
                backend: b.address.to_string(),
            };
            encoder
                .encode_family(&label)?
                .encode_gauge(&(self.get)(b, now))?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The request target in origin form (`/path?query`), which is what an HTTP/1.1 origin
/// expects, whatever form the client used (HTTP/2 sends absolute URIs).
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

fn problem_for(e: &ProxyError, addr: SocketAddr, started: Instant) -> Problem {
    let status = e.status();
    let detail = match e.kind {
        FailureKind::ResponseTimeout => format!(
            "upstream timeout: backend {addr} sent no response headers in time ({} ms)",
            started.elapsed().as_millis()
        ),
        FailureKind::Connect | FailureKind::ConnectTimeout => {
            format!("bad gateway: {} ({addr})", e.what)
        }
        FailureKind::Upstream => format!("bad gateway: {} ({addr})", e.what),
        FailureKind::ClientTimeout | FailureKind::ClientAborted => e.what.to_owned(),
    };
    Problem::new(status, detail)
}

fn no_backend(pool: &Pool) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no healthy backend: all {} backends are down or ejected",
            pool.backends.len()
        ),
    )
}
