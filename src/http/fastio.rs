//! Plumbing shared by the hand-written HTTP/1.1 fast paths (the balancer's proxy path and
//! the app's record reads): per-thread buffer reuse and timeouts that skip the timer when a
//! future is ready at once.

use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;

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
