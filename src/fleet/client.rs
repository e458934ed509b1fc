//! A tiny HTTP/1.1 client for talking to admin listeners (`strata reload`, `strata status`,
//! `strata fleet`'s readiness checks): one request per connection, every step bounded by a
//! deadline.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer within the deadline.
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    /// The connection could not be made.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    /// The exchange failed mid-way.
    #[error("{0}: {1}")]
    Http(String, String),
}

/// Sends `method path` to `addr` with an optional bearer token; returns status and body.
pub async fn call(
    method: Method,
    addr: &str,
    path: &str,
    token: Option<&str>,
    deadline: Duration,
) -> Result<(u16, String), CallError> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| CallError::Connect(addr.to_owned(), e))?;
        let http = |e: hyper::Error| CallError::Http(addr.to_owned(), e.to_string());
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| CallError::Http(addr.to_owned(), e.to_string()))?;
        let resp = send.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| CallError::Timeout(addr.to_owned(), deadline))?
}
