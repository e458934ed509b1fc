//! An HTTP listener every role uses: HTTP/1.1 and h2c on one port, a deadline for request
//! headers, header size and connection limits, and a graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::body::Body;
use super::interim;
use crate::config::HttpLimits;

/// A stop signal shared by every task of a node: flips to `true` once, on shutdown.
pub type Shutdown = watch::Receiver<bool>;

/// Waits until the shutdown signal fires (or its sender is gone).
pub async fn wait_for(shutdown: &mut Shutdown) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// TLS for a listener: the server config behind an `ArcSwap`, so certificates reload
/// without a restart and every new connection takes the current one.
pub type Tls = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// A handler that serves plain-TCP connections itself (an HTTP/1.1 fast path: balancer, app)
/// until it meets something it leaves to hyper: then it returns the connection with the
/// bytes it already read, and hyper serves the rest of it. `None`: the connection is done.
pub type FastPath = Arc<
    dyn Fn(
            tokio::net::TcpStream,
            SocketAddr,
            Shutdown,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Handoff>> + Send>>
        + Send
        + Sync,
>;

/// A connection handed from a [`FastPath`] to hyper mid-stream.
pub struct Handoff {
    /// The client connection.
    pub stream: tokio::net::TcpStream,
    /// Bytes read from it and not yet served; hyper reads these first.
    pub read: Vec<u8>,
}

/// How a listener treats its connections beyond plain hyper.
pub enum ConnMode {
    /// hyper serves every connection.
    Plain,
    /// Plain-TCP connections go to this handler first (the balancer's and the app's fast
    /// paths).
    FastPath(FastPath),
    /// HTTP/1.1 requests carry an [`interim::InterimRelay`] through which the handler can send 1xx
    /// interim responses from its upstream to the client (the edge).
    RelayInterim,
}

/// Accepts connections until `shutdown`, serving each with a service made per connection
/// from the peer address — after a TLS handshake (bounded by the header read timeout) when
/// `tls` is set; then waits up to `grace` for in-flight requests to finish. Returns how
/// many connections were still open when the grace period ran out.
#[allow(clippy::too_many_arguments)]
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
    limits: &HttpLimits,
    tls: Option<Tls>,
    mode: ConnMode,
    make_service: F,
    mut shutdown: Shutdown,
    grace: Duration,
) -> usize
where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Small responses go out in one write() instead of a writev of head and body.
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.get())
        .max_buf_size(limits.max_header_bytes.as_usize().max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes.bytes()).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    // Shared, not cloned per connection: every connection task holds it for its lifetime.
    let builder = Arc::new(builder);
    let handshake_timeout = limits.header_read_timeout.get();
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = wait_for(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and friends: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = wait_for(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.load_full()));
        if let (None, ConnMode::FastPath(fast)) = (&acceptor, &mode) {
            // The fast path serves the connection; hyper takes over what it hands back.
            let served = fast(stream, peer, shutdown.clone());
            let make = make_service(peer);
            tokio::spawn(async move {
                if let Some(handoff) = served.await {
                    // Boxed: inline, hyper's connection state would size every fast-path
                    // connection's task (~2 KB more per idle connection) for the few
                    // that are handed over.
                    Box::pin(serve_handoff(&builder, handoff, make, watcher, peer)).await;
                }
                drop(permit);
            });
            continue;
        }
        let service = make_service(peer);
        let relay = matches!(mode, ConnMode::RelayInterim);
        tokio::spawn(async move {
            let result =
                match acceptor {
                    None => serve_io(&builder, stream, service, relay, watcher).await,
                    Some(acceptor) => {
                        let tls_stream =
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                        serve_io(&builder, tls_stream, service, relay, watcher).await
                    }
                };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a slot until it is done, hyper's and the fast path's alike
    // (the fast path finishes its request in flight, then sees the shutdown).
    let open = limits.max_connections - slots.available_permits();
    if open > 0 {
        tracing::info!(listener = name, open, "draining connections");
    }
    let every_slot = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = async {
            graceful.shutdown().await;
            let _ = slots.acquire_many(every_slot).await;
        } => 0,
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, "drain deadline passed; closing remaining connections");
            open.max(1)
        }
    }
}

/// Serves with hyper what a fast path handed over: the connection, after the bytes it read.
async fn serve_handoff<S>(
    builder: &auto::Builder<TokioExecutor>,
    handoff: Handoff,
    service: S,
    watcher: Watcher,
    peer: SocketAddr,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(Prefixed {
        read: handoff.read,
        at: 0,
        stream: handoff.stream,
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Serves one connection with hyper, wrapped for interim relays when `relay` is set.
async fn serve_io<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    relay: bool,
    watcher: Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    if relay {
        let (io, relay) = interim::wrap(io);
        let conn = builder.serve_connection_with_upgrades(
            TokioIo::new(io),
            interim::WithRelay::new(service, relay),
        );
        watcher.watch(conn.into_owned()).await
    } else {
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        watcher.watch(conn.into_owned()).await
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed {
    read: Vec<u8>,
    at: usize,
    stream: tokio::net::TcpStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.read.len() {
            let n = buf.remaining().min(self.read.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.read[at..at + n]);
            self.at += n;
            if self.at == self.read.len() {
                self.read = Vec::new();
                self.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
