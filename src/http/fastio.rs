//! Plumbing shared by the hand-written HTTP/1.1 fast paths (the balancer's proxy path and
//! the app's record reads): per-thread buffer reuse and timeouts that skip the timer when a
//! future is ready at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::server::{wait_for, FastPath, Handoff, Shutdown};
use crate::config::HttpLimits;

/// The listener limits a fast path enforces itself, as hyper does on the general path.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Time for a whole request head (and for an idle connection to start one).
    pub timeout: Duration,
    /// Largest request head; a longer one goes to hyper, which refuses it.
    pub max_bytes: usize,
}

/// Makes the [`FastPath`] that serves each plain-TCP connection of a listener with `limits`
/// by `serve` on `target` (the balancer's and the app's connection loops).
pub fn fast_path<T, F, Fut>(target: &Arc<T>, limits: &HttpLimits, serve: F) -> FastPath
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, TcpStream, SocketAddr, Shutdown, HeadLimits) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Handoff>> + Send + 'static,
{
    let target = target.clone();
    let head = HeadLimits {
        timeout: limits.header_read_timeout.get(),
        max_bytes: limits.max_header_bytes.as_usize().max(8192),
    };
    Arc::new(move |stream, peer, shutdown| {
        Box::pin(serve(target.clone(), stream, peer, shutdown, head))
    })
}

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 16 << 10;

/// Runs `fut` with a time limit, touching the timer only when it does not finish at once.
pub async fn timed<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Some(out) = (&mut fut).now_or_never() {
        return Some(out);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

/// [`timed`] with a deadline.
pub async fn timed_at<F: Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Some(out) = (&mut fut).now_or_never() {
        return Some(out);
    }
    tokio::time::timeout_at(deadline, fut).await.ok()
}

/// Waits, without holding a buffer, until an idle `client` sends something (or closes).
/// False when `deadline` passes, the socket fails or shutdown begins: drop the connection.
pub async fn await_request(client: &TcpStream, deadline: Instant, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, client.readable()) => matches!(r, Ok(Ok(()))),
        _ = wait_for(shutdown) => false,
    }
}

/// Appends one `name: value` line of an HTTP/1.1 head.
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A per-thread stock of buffers, so exchanges neither allocate nor keep buffers while
/// their connection idles.
pub mod bufs {
    use std::cell::RefCell;

    /// Buffers kept per thread.
    const KEEP: usize = 64;
    /// Larger buffers are freed instead of kept.
    const MAX_KEPT: usize = 64 << 10;

    thread_local! {
        static STOCK: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer.
    pub fn take() -> Vec<u8> {
        STOCK
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(super::READ_CHUNK))
    }

    /// Gives a buffer back.
    pub fn give(mut b: Vec<u8>) {
        if b.capacity() == 0 || b.capacity() > MAX_KEPT {
            return;
        }
        b.clear();
        STOCK.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(b);
            }
        });
    }
}
