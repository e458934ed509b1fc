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
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::body::Body;
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

/// Accepts connections until `shutdown`, serving each with a service made per connection
/// from the peer address — after a TLS handshake (bounded by the header read timeout) when
/// `tls` is set; then waits up to `grace` for in-flight requests to finish. Returns how
/// many connections were still open when the grace period ran out.
pub async fn serve<F, S>(
    name: &'static str,
    listener: TcpListener,
    limits: &HttpLimits,
    tls: Option<Tls>,
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
        let service = make_service(peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.load_full()));
        tokio::spawn(async move {
            let result =
                match acceptor {
                    None => {
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
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
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(tls_stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(listener = name, open, "draining connections");
    }
    tokio::select! {
        _ = graceful.shutdown() => 0,
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, "drain deadline passed; closing remaining connections");
            open.max(1)
        }
    }
}
