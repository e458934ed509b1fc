//! A pool of keep-alive HTTP/1.1 connections to one upstream, and sending a request on it.
//!
//! Built on hyper's connection API rather than a general client so that a failed send
//! hands the request back when nothing was written: that is what makes "retry only when
//! nothing reached the backend" exact instead of a guess.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::{FailureKind, ProxyError};

/// Sends requests on one upstream connection.
pub type Sender = SendRequest<RequestBody>;

/// Timeouts and pool limits of upstream exchanges.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Time from sending a request to its response head.
    pub response_timeout: Duration,
    /// Longest pause between body chunks, either direction.
    pub idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept.
    pub pool_max_idle: usize,
}

/// Why an exchange produced no response.
#[derive(Debug)]
pub enum SendFailure {
    /// Nothing reached the upstream; the request comes back untouched for another try.
    NotSent(ProxyError, Box<Request<RequestBody>>),
    /// The request (or part of it) went out; only an idempotent one may be tried again.
    Sent(ProxyError),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// A plain keep-alive TCP connection to the upstream for the fast path, which speaks
/// HTTP/1.1 on it itself ([`super::h1`]). Counted in [`ConnPool::open_connections`] until
/// dropped.
pub struct RawConn {
    /// The connection.
    pub stream: TcpStream,
    /// True when it came from the pool (it may have been closed by the upstream since).
    pub reused: bool,
    open: OpenGuard,
}

/// Decrements the open-connection count when the connection is dropped.
struct OpenGuard(Arc<AtomicI64>);

impl OpenGuard {
    fn new(open: &Arc<AtomicI64>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct RawIdle {
    stream: TcpStream,
    since: Instant,
    open: OpenGuard,
}

impl RawIdle {
    /// Still usable: fresh enough, and the upstream has neither closed it nor sent
    /// anything unasked. Costs no syscall unless the reactor saw the socket readable.
    fn alive(&self, max_age: Duration) -> bool {
        if self.since.elapsed() >= max_age {
            return false;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            std::task::Poll::Pending => true,
            std::task::Poll::Ready(Err(_)) => false,
            // Readable while idle: EOF, an error, or stray bytes — unless it was only
            // leftover readiness, which `try_read` clears.
            std::task::Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

/// Keep-alive connections to one upstream address.
pub struct ConnPool {
    addr: SocketAddr,
    idle: Mutex<VecDeque<Idle>>,
    raw: Mutex<Vec<RawIdle>>,
    open: Arc<AtomicI64>,
}

impl ConnPool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        ConnPool {
            addr,
            idle: Mutex::new(VecDeque::new()),
            raw: Mutex::new(Vec::new()),
            open: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The upstream address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now (idle or busy).
    pub fn open_connections(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections waiting in the pool.
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
            + self.raw.lock().map(|i| i.len()).unwrap_or(0)
    }

    /// A fast-path connection: the most recently used idle one that is still alive, or a
    /// new one.
    pub async fn raw(&self, settings: &UpstreamSettings) -> Result<RawConn, ProxyError> {
        if let Some(c) = self.take_raw(settings.pool_idle_timeout) {
            return Ok(c);
        }
        let stream = self.open_tcp(settings.connect_timeout).await?;
        Ok(RawConn {
            stream,
            reused: false,
            open: OpenGuard::new(&self.open),
        })
    }

    fn take_raw(&self, max_age: Duration) -> Option<RawConn> {
        let mut idle = self.raw.lock().ok()?;
        while let Some(i) = idle.pop() {
            if i.alive(max_age) {
                return Some(RawConn {
                    stream: i.stream,
                    reused: true,
                    open: i.open,
                });
            }
        }
        None
    }

    /// Returns a fast-path connection whose last response was read exactly to its end.
    pub fn put_raw(&self, conn: RawConn, max_idle: usize) {
        if let Ok(mut idle) = self.raw.lock() {
            if idle.len() < max_idle {
                idle.push(RawIdle {
                    stream: conn.stream,
                    since: Instant::now(),
                    open: conn.open,
                });
            }
        }
    }

    /// Returns a connection whose last response was read to its end.
    pub fn put(&self, sender: Sender, max_idle: usize) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < max_idle {
                idle.push_back(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    /// Drops connections idle longer than `max_age` or closed by the upstream.
    pub fn sweep(&self, max_age: Duration) {
        let stale: Vec<Idle> = match self.idle.lock() {
            Ok(mut idle) => {
                let (keep, stale) = idle
                    .drain(..)
                    .partition(|i| !i.sender.is_closed() && i.since.elapsed() < max_age);
                *idle = keep;
                stale.into()
            }
            Err(_) => return,
        };
        drop(stale);
        let stale_raw: Vec<RawIdle> = match self.raw.lock() {
            Ok(mut idle) => {
                let (keep, stale) = idle.drain(..).partition(|i| i.alive(max_age));
                *idle = keep;
                stale
            }
            Err(_) => return,
        };
        drop(stale_raw);
    }

    /// Drops every idle connection (the backend left the pool).
    pub fn clear(&self) {
        let all: VecDeque<Idle> = match self.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => return,
        };
        drop(all);
        let all_raw = match self.raw.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => return,
        };
        drop(all_raw);
    }

    /// The most recently used idle connection that is still fresh.
    fn take(&self, max_age: Duration) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(i) = idle.pop_back() {
            if !i.sender.is_closed() && i.since.elapsed() < max_age {
                return Some(i.sender);
            }
        }
        None
    }

    /// Opens a new connection and starts driving it.
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ProxyError> {
        let stream = self.open_tcp(timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(256 << 10)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                ProxyError::new(
                    FailureKind::Connect,
                    "HTTP handshake with the backend failed",
                    Some(Box::new(e)),
                )
            })?;
        let open = OpenGuard::new(&self.open);
        tokio::spawn(async move {
            // Ends when the upstream closes, on an error, or once every sender is dropped.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
            drop(open);
        });
        Ok(sender)
    }

    /// Opens a TCP connection within `timeout`.
    async fn open_tcp(&self, timeout: Duration) -> Result<TcpStream, ProxyError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ProxyError::new(
                    FailureKind::Connect,
                    "could not connect to the backend",
                    Some(Box::new(e)),
                ))
            }
            Err(_) => {
                return Err(ProxyError::new(
                    FailureKind::ConnectTimeout,
                    "connecting to the backend timed out",
                    None,
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends `req` on a pooled connection (or a new one) and waits for the response head.
    /// Returns the response and the connection, which the caller hands back with
    /// [`ConnPool::put`] once the response body has been read to its end.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        settings: &UpstreamSettings,
    ) -> Result<(Response<Incoming>, Sender), SendFailure> {
        // A pooled connection may turn out to be closed by the upstream; then the request is
        // still ours and moves to the next connection. After a few dead pooled connections
        // a fresh one is opened, so this loop always ends.
        let mut pooled_tries = 0;
        loop {
            let pooled = if pooled_tries < 4 {
                pooled_tries += 1;
                self.take(settings.pool_idle_timeout)
            } else {
                None
            };
            let (mut sender, reused) = match pooled {
                Some(s) => (s, true),
                None => match self.connect(settings.connect_timeout).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(SendFailure::NotSent(e, Box::new(req))),
                },
            };
            // Usually ready at once; only then is the timer skipped.
            let ready = sender.is_ready()
                || matches!(
                    tokio::time::timeout(settings.connect_timeout, sender.ready()).await,
                    Ok(Ok(()))
                );
            if !ready {
                if reused {
                    continue;
                }
                let e = ProxyError::new(
                    FailureKind::Connect,
                    "the backend closed the new connection",
                    None,
                );
                return Err(SendFailure::NotSent(e, Box::new(req)));
            }
            let sent =
                tokio::time::timeout(settings.response_timeout, sender.try_send_request(req)).await;
            match sent {
                Ok(Ok(resp)) => return Ok((resp, sender)),
                Err(_) => {
                    return Err(SendFailure::Sent(ProxyError::new(
                        FailureKind::ResponseTimeout,
                        "the backend did not answer in time",
                        None,
                    )))
                }
                Ok(Err(mut e)) => match e.take_message() {
                    Some(back) if reused => req = back,
                    Some(back) => {
                        let e = ProxyError::new(
                            FailureKind::Connect,
                            "the backend closed the connection before the request was sent",
                            Some(Box::new(e.into_error())),
                        );
                        return Err(SendFailure::NotSent(e, Box::new(back)));
                    }
                    None => {
                        return Err(SendFailure::Sent(ProxyError::from_exchange(e.into_error())))
                    }
                },
            }
        }
    }
}
