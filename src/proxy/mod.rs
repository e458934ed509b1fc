//! Forwarding one request upstream: a pooled HTTP/1.1 client per backend
//! ([`client::ConnPool`]), header hygiene ([`headers`]), bodies that stream both ways with
//! an idle limit ([`body`]), and one error type that says what failed and whether anything
//! reached the upstream, so retry decisions read the error instead of guessing.
//!
//! The balancer (and later the edge) own the policy — which backend, whether to retry; this
//! module only moves bytes and reports.

pub mod body;
pub mod client;
pub mod headers;

use http::StatusCode;

use crate::http::body::BodyError;

/// What went wrong talking to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The TCP connection was refused or failed.
    Connect,
    /// The TCP connection did not open within `connect_timeout`.
    ConnectTimeout,
    /// The upstream accepted the request but sent no response head within
    /// `response_timeout`.
    ResponseTimeout,
    /// The connection broke or the upstream spoke bad HTTP before a response head.
    Upstream,
}

/// An upstream exchange that produced no response.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({kind:?}){}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct ProxyError {
    /// What failed.
    pub kind: FailureKind,
    /// A human summary, used in problem+json details.
    pub what: &'static str,
    /// The underlying error, if any.
    #[source]
    pub source: Option<BodyError>,
}

impl ProxyError {
    /// An error of `kind`.
    pub fn new(kind: FailureKind, what: &'static str, source: Option<BodyError>) -> Self {
        ProxyError { kind, what, source }
    }

    /// The status a client gets for it: 504 for a timeout waiting on the upstream, 502
    /// otherwise.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            FailureKind::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether this counts against the backend's health (every kind does; kept as a method
    /// so a future kind, e.g. a client abort, can opt out in one place).
    pub fn blames_upstream(&self) -> bool {
        true
    }
}
