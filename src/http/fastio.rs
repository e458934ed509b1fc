//! Plumbing shared by the hand-written HTTP/1.1 fast paths (the balancer's proxy path and
//! the app's record reads): per-thread buffer reuse and timeouts that skip the timer when a
//! future is ready at once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

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

/// What a fast-path connection waits on between requests, made once per connection: an
/// idle timer that each wait moves forward and one shutdown future. A timeout and a watch
/// subscription made per wait cost ~1.8k instructions per request (callgrind, app PUT):
/// a timer-wheel insert and remove, a waiter added to and removed from the watch's list.
/// Moving a registered timer later is a store; the wheel re-files it when it comes due.
pub struct Waits {
    idle: Pin<Box<Sleep>>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    stopped: bool,
}

impl Waits {
    /// Waits for `shutdown`, which stays untouched for the caller's own checks.
    pub fn new(shutdown: &Shutdown) -> Self {
        let mut rx = shutdown.clone();
        Waits {
            idle: Box::pin(tokio::time::sleep_until(Instant::now())),
            stop: Box::pin(async move { wait_for(&mut rx).await }),
            stopped: false,
        }
    }

    /// Waits, without holding a buffer, until an idle `client` sends something (or
    /// closes). False when `deadline` passes, the socket fails or shutdown begins: drop
    /// the connection. The connection's task is the socket's only reader, so it waits in
    /// the socket's one read-waker slot (`poll_read_ready`) rather than joining its
    /// waiter list (`readable()`), which costs a lock and list updates per wait.
    pub async fn request(&mut self, client: &TcpStream, deadline: Instant) -> bool {
        if self.stopped {
            return false;
        }
        self.idle.as_mut().reset(deadline);
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| client.poll_read_ready(cx)) => r.is_ok(),
            _ = self.idle.as_mut() => false,
            _ = self.stop.as_mut() => {
                self.stopped = true;
                false
            }
        }
    }

    /// Resolves once shutdown has begun; for a `select!` branch.
    pub async fn stopping(&mut self) {
        if !self.stopped {
            self.stop.as_mut().await;
            self.stopped = true;
        }
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

    /// Buffers kept per thread. A proxied exchange holds four (client input, upstream
    /// request, upstream response, client output), so 64 busy client connections need 256
    /// at once; with a stock of 64 (before 2026-11-29) most of them were freed and
    /// allocated again per request, and at 16 KiB each is a jemalloc "large" allocation
    /// (extent search, not the thread cache): 7.8 % of the balancer's CPU under `wrk -c64`
    /// (`perf record`). The stock keeps what the busiest moment needed, up to 16 MiB per
    /// thread; those bytes were in use at that moment anyway.
    const KEEP: usize = 1024;
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
