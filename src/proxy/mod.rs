//! Forwarding one request upstream: a pooled HTTP/1.1 client per backend
//! ([`client::ConnPool`]), header hygiene ([`headers`]), bodies that stream both ways with
//! an idle limit ([`body`]), and one error type that says what failed and whether anything
//! reached the upstream, so retry decisions read the error instead of guessing.
//!
//! The balancer (and later the edge) own the policy — which backend, whether to retry; this
//! module only moves bytes and reports.

pub mod body;
pub mod client;
pub mod h1;
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
    /// The client's request body stalled past the idle limit (not the upstream's fault).
    ClientTimeout,
    /// The client's request body broke off (not the upstream's fault).
    ClientAborted,
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
            FailureKind::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            FailureKind::ClientAborted => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether this counts against the backend's health and may be retried elsewhere: a
    /// client that stalls or breaks off its body must not get backends ejected.
    pub fn blames_upstream(&self) -> bool {
        !matches!(
            self.kind,
            FailureKind::ClientTimeout | FailureKind::ClientAborted
        )
    }

    /// Classifies a failed exchange: the client's body failing is the client's fault.
    pub fn from_exchange(e: hyper::Error) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(c) = cause {
            if let Some(b) = c.downcast_ref::<body::BodyStreamError>() {
                let (kind, what) = match b {
                    body::BodyStreamError::Idle(_) => (
                        FailureKind::ClientTimeout,
                        "the client stopped sending its request body",
                    ),
                    body::BodyStreamError::Peer(_) => (
                        FailureKind::ClientAborted,
                        "the client's request body broke off",
                    ),
                };
                return ProxyError::new(kind, what, Some(Box::new(e)));
            }
            cause = c.source();
        }
        ProxyError::new(
            FailureKind::Upstream,
            "the backend failed before sending a response",
            Some(Box::new(e)),
        )
    }
}
