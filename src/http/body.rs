//! The one response body type every role returns, so handlers of all roles compose.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Errors a body stream can end with (an upstream that vanished, a file read that failed).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed, streaming response body. Boxing costs one allocation per response and buys one
/// type for in-memory, file-streamed and proxied bodies alike.
pub type Body = BoxBody<Bytes, BodyError>;

/// A body holding these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body (HEAD, 304, 204).
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}
