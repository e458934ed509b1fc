//! The admin listener every node runs: `/healthz`, `/readyz`, `/metrics`, `/admin/status`,
//! `/admin/reload`, `/admin/backup`, and the dashboard at `/admin/`. Roles plug in as
//! [`Component`]s, so this module knows no role.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;

use super::auth::Tokens;
use super::body::{self, Body};
use super::problem::Problem;
use crate::config::{self, LiveConfig, ReloadReport, Scope};
use crate::metrics::Metrics;
use crate::storage::backup::BackupError;

/// A role as the admin endpoints see it.
pub trait Component: Send + Sync {
    /// The role's name in status output.
    fn name(&self) -> &'static str;
    /// `Ok` when the role can serve; otherwise why not.
    fn ready(&self) -> Result<(), String>;
    /// The role's section of `/admin/status`.
    fn status(&self) -> serde_json::Value;
}

type Reloader = Box<dyn Fn() -> ReloadReport + Send + Sync>;
type Purger = Box<dyn Fn(Option<&str>, Option<&str>) -> usize + Send + Sync>;
/// What `POST /admin/promote` runs: the storage role's promotion, answering a JSON report
/// or why it was refused.
pub type Promoter = Box<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<serde_json::Value, String>> + Send>,
        > + Send
        + Sync,
>;

/// What `GET /admin/backup` runs: starts a backup and hands back its byte stream (only
/// nodes that hold data have one).
pub type Backup = Box<dyn Fn() -> Result<BackupStream, BackupError> + Send + Sync>;
/// The bytes of a backup as they are produced.
pub type BackupStream = tokio::sync::mpsc::Receiver<Result<bytes::Bytes, BackupError>>;

/// State behind the admin endpoints.
pub struct Admin {
    started: Instant,
    live: Arc<LiveConfig>,
    metrics: Arc<Metrics>,
    tokens: Arc<ArcSwap<Tokens>>,
    components: Mutex<Vec<Arc<dyn Component>>>,
    reloader: OnceLock<Reloader>,
    purger: OnceLock<Purger>,
    promoter: OnceLock<Promoter>,
    backup: OnceLock<Backup>,
    last_reload: Mutex<Option<ReloadReport>>,
}

impl Admin {
    /// Admin state for a node.
    pub fn new(
        live: Arc<LiveConfig>,
        metrics: Arc<Metrics>,
        tokens: Arc<ArcSwap<Tokens>>,
    ) -> Arc<Self> {
        Arc::new(Admin {
            started: Instant::now(),
            live,
            metrics,
            tokens,
            components: Mutex::new(Vec::new()),
            reloader: OnceLock::new(),
            purger: OnceLock::new(),
            promoter: OnceLock::new(),
            backup: OnceLock::new(),
            last_reload: Mutex::new(None),
        })
    }

    /// Adds a role to readiness and status.
    pub fn add_component(&self, c: Arc<dyn Component>) {
        if let Ok(mut cs) = self.components.lock() {
            cs.push(c);
        }
    }

    /// Sets the function `POST /admin/reload` calls (the node's reload).
    pub fn set_reloader(&self, f: impl Fn() -> ReloadReport + Send + Sync + 'static) {
        let _ = self.reloader.set(Box::new(f));
    }

    /// Sets the function `POST /admin/purge` calls with the `url` or `prefix` of its JSON
    /// body (the edge's purge); it returns how many stored URLs it dropped.
    pub fn set_purger(
        &self,
        f: impl Fn(Option<&str>, Option<&str>) -> usize + Send + Sync + 'static,
    ) {
        let _ = self.purger.set(Box::new(f));
    }

    /// Sets what `POST /admin/promote` runs (only storage nodes have one).
    pub fn set_promoter(&self, f: Promoter) {
        let _ = self.promoter.set(f);
    }

    /// Sets what `GET /admin/backup` streams (nodes with a storage engine).
    pub fn set_backup(&self, f: Backup) {
        let _ = self.backup.set(f);
    }

    /// Runs the node's reload, records the outcome for `/admin/status`, then logs it (in
    /// that order, so whoever reads the log line finds the status already updated).
    pub fn reload(&self) -> Option<ReloadReport> {
        let report = (self.reloader.get()?)();
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(report.clone());
        }
        if report.applied {
            tracing::info!(version = %report.version, message = %report.message, "config reloaded");
        } else {
            tracing::error!(reason = %report.message, "config reload refused; keeping the running config");
        }
        Some(report)
    }

    fn components(&self) -> Vec<Arc<dyn Component>> {
        self.components
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Why the node is not ready, if it is not.
    pub fn not_ready(&self) -> Vec<String> {
        self.components()
            .iter()
            .filter_map(|c| c.ready().err().map(|e| format!("{}: {e}", c.name())))
            .collect()
    }

    /// The `/admin/status` document.
    pub fn status(&self) -> serde_json::Value {
        let cfg = self.live.get();
        let mut roles = serde_json::Map::new();
        for c in self.components() {
            roles.insert(c.name().to_owned(), c.status());
        }
        let not_ready = self.not_ready();
        json!({
            "node": cfg.node.name,
            "roles": cfg.roles(),
            "ready": not_ready.is_empty(),
            "not_ready": not_ready,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "pid": std::process::id(),
            "config": {
                "version": config::version(&cfg),
                "source": self.live.source().describe(),
                "last_reload": self.last_reload.lock().ok().and_then(|l| l.clone()),
            },
            "components": roles,
            "requests": self.metrics.requests_by_role(),
        })
    }

    /// Answers one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let (route, resp) = if req.uri().path() == "/admin/purge" {
            ("purge", self.purge(req).await)
        } else {
            self.clone().route(&req).await
        };
        self.metrics
            .observe_request("admin", route, resp.status().as_u16(), started.elapsed());
        Ok(resp)
    }

    /// `POST /admin/purge` with `{"url": "..."}` and/or `{"prefix": "..."}`; admin token.
    async fn purge(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        use http_body_util::BodyExt;
        if req.method() != Method::POST {
            return method_not_allowed(&[Method::POST]);
        }
        if let Err(problem) = self.tokens.load().check(req.headers(), Scope::Admin) {
            return problem.into_response();
        }
        let Some(purger) = self.purger.get() else {
            return Problem::new(StatusCode::NOT_FOUND, "no edge cache runs on this node")
                .into_response();
        };
        let limited = http_body_util::Limited::new(req.into_body(), 64 * 1024);
        let bytes =
            match tokio::time::timeout(std::time::Duration::from_secs(10), limited.collect()).await
            {
                Ok(Ok(b)) => b.to_bytes(),
                _ => {
                    return Problem::new(StatusCode::BAD_REQUEST, "cannot read the request body")
                        .into_response()
                }
            };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            url: Option<String>,
            prefix: Option<String>,
        }
        let p: Purge = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                return Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"url\": ...}} or {{\"prefix\": ...}}: {e}"),
                )
                .into_response()
            }
        };
        if p.url.is_none() && p.prefix.is_none() {
            return Problem::new(StatusCode::BAD_REQUEST, "name a url or a prefix").into_response();
        }
        let purged = purger(p.url.as_deref(), p.prefix.as_deref());
        json_response(StatusCode::OK, &json!({ "purged": purged }))
    }

    async fn route(
        self: Arc<Self>,
        req: &Request<hyper::body::Incoming>,
    ) -> (&'static str, Response<Body>) {
        let path = req.uri().path();
        if let Some(asset) = super::dashboard::asset(path) {
            return ("dashboard", super::dashboard::respond(&asset, req.method()));
        }
        let (route, allowed): (&'static str, &[Method]) = match path {
            "/healthz" => ("healthz", &[Method::GET, Method::HEAD]),
            "/readyz" => ("readyz", &[Method::GET, Method::HEAD]),
            "/metrics" => ("metrics", &[Method::GET]),
            "/admin/status" => ("status", &[Method::GET]),
            "/admin/reload" => ("reload", &[Method::POST]),
            "/admin/promote" => ("promote", &[Method::POST]),
            "/admin/backup" => ("backup", &[Method::GET]),
            _ => {
                return (
                    "unknown",
                    Problem::new(
                        StatusCode::NOT_FOUND,
                        format!("no admin endpoint at {path}"),
                    )
                    .into_response(),
                )
            }
        };
        if !allowed.contains(req.method()) {
            return (route, method_not_allowed(allowed));
        }
        if matches!(
            route,
            "metrics" | "status" | "reload" | "promote" | "backup"
        ) {
            if let Err(problem) = self.tokens.load().check(req.headers(), Scope::Admin) {
                return (route, problem.into_response());
            }
        }
        let resp = match route {
            "healthz" => text(StatusCode::OK, "ok\n"),
            "readyz" => {
                let not_ready = self.not_ready();
                if not_ready.is_empty() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", not_ready.join("; ")),
                    )
                }
            }
            "metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            "status" => json_response(StatusCode::OK, &self.status()),
            "backup" => self.backup_response(),
            "promote" => match self.promoter.get() {
                Some(promote) => match promote().await {
                    Ok(report) => {
                        tracing::warn!(%report, "promoted by the admin API");
                        json_response(StatusCode::OK, &report)
                    }
                    Err(why) => Problem::new(StatusCode::CONFLICT, why).into_response(),
                },
                None => Problem::new(
                    StatusCode::CONFLICT,
                    "this node has no storage role to promote",
                )
                .into_response(),
            },
            // Reload reads files: run it on the blocking pool, off the async workers.
            _ => match tokio::task::spawn_blocking(move || self.reload())
                .await
                .ok()
                .flatten()
            {
                Some(report) => {
                    let status = if report.applied {
                        StatusCode::OK
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                    json_response(status, &serde_json::to_value(&report).unwrap_or_default())
                }
                None => Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reload is not available yet",
                )
                .into_response(),
            },
        };
        (route, resp)
    }
}

impl Admin {
    /// `GET /admin/backup`: the node's data as a backup file, streamed as it is read. A
    /// backup that fails part-way aborts the response, so the client never gets a file
    /// with a valid trailer.
    fn backup_response(&self) -> Response<Body> {
        use http_body_util::BodyExt;
        let Some(start) = self.backup.get() else {
            return Problem::new(StatusCode::NOT_FOUND, "this node holds no data to back up")
                .into_response();
        };
        let rx = match start() {
            Ok(rx) => rx,
            Err(e) => return Problem::new(StatusCode::CONFLICT, e.to_string()).into_response(),
        };
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            let frame = item
                .map(hyper::body::Frame::data)
                .map_err(|e| -> body::BodyError { Box::new(e) });
            Some((frame, rx))
        });
        let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
        let name = format!(
            "attachment; filename=\"{}.strata-backup\"",
            self.live.get().node.name.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_"
            )
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&name) {
            r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
        r
    }
}

/// A 405 listing what is allowed.
pub fn method_not_allowed(allowed: &[Method]) -> Response<Body> {
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut resp = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this resource allows {allow}"),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(body::full(s.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(body::full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
