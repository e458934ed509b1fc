//! `application/problem+json` (RFC 9457) responses: one shape for every error any role sends.

use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use super::body::{self, Body};

/// A problem detail. `title` is the same for every instance of a kind of problem; `detail`
/// says what happened this time.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// A URI naming the problem kind; `about:blank` means "see the status code".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Short, stable summary of the kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What happened, for a human.
    pub detail: String,
    /// Seconds after which a retry may succeed, sent as `Retry-After` (503s).
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl Problem {
    /// A problem of status `status` with the status' reason as its title.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The same problem, telling the client when to retry (`Retry-After`).
    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The response carrying this problem.
    pub fn into_response(self) -> Response<Body> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let json = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(body::full(json));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
