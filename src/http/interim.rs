//! Relaying 1xx interim responses (103 Early Hints, 102 Processing) from an upstream to an
//! HTTP/1.1 client while hyper serves the client connection.
//!
//! A proxy must forward the interim responses it did not ask for (RFC 9110 §15.2), but
//! hyper's server has no API for sending them. So the connection's byte stream is wrapped
//! ([`InterimIo`]) and the request carries a handle to it ([`InterimRelay`]); the upstream
//! client's 1xx callback hands the encoded interim response to the handle, and the wrapper
//! writes it the next time hyper touches the connection — at once, because the handle wakes
//! the connection task.
//!
//! The one hard part is order: interim bytes must never land inside a message hyper is
//! writing. hyper only flushes its transport when its own write buffer is empty, so a
//! completed flush marks a message boundary: the wrapper is *clean* from then until hyper's
//! next write. An interim response is accepted only while the connection is clean (while a
//! request waits on its upstream, which is when 1xx responses arrive, that is the normal
//! state) and is written before any further byte of hyper's. Otherwise — the client is not
//! reading and hyper still holds bytes of an earlier response — it is dropped: 1xx responses
//! are advisory, and a late or missing hint is better than a corrupted stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use http::{HeaderMap, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most interim bytes queued for one connection; more are dropped (a misbehaving upstream
/// must not grow memory without bound while the client does not read).
const MAX_QUEUED: usize = 16 * 1024;

/// Encodes an interim response for the wire, or `None` for statuses that must not be
/// relayed: anything but 1xx, `100 Continue` (hyper answers `Expect` itself) and
/// `101 Switching Protocols` (an upgrade, not an interim response). Hop-by-hop fields are the
/// caller's to strip.
pub fn encode(status: StatusCode, headers: &HeaderMap) -> Option<Vec<u8>> {
    let code = status.as_u16();
    if !(102..200).contains(&code) {
        return None;
    }
    let mut out = Vec::with_capacity(64 + headers.len() * 48);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Interim").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        super::fastio::push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// hyper holds no unwritten bytes: an interim response may go out next.
const CLEAN: u8 = 0;
/// hyper has written since its last completed flush: it may be mid-message.
const DIRTY: u8 = 1;
/// An interim response is queued and must go out before hyper's next byte.
const PENDING: u8 = 2;

struct Shared {
    state: AtomicU8,
    queue: Mutex<Vec<u8>>,
    waker: AtomicWaker,
}

/// The request-side handle: where a handler sends interim responses for the client of the
/// request it serves. Put into each HTTP/1.1 request's extensions by the listener.
#[derive(Clone)]
pub struct InterimRelay {
    shared: Arc<Shared>,
}

impl InterimRelay {
    /// Queues an interim response for the client. Returns false when it was dropped: not
    /// relayable ([`encode`]), the connection is mid-message, or the queue is full.
    pub fn send(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let Some(bytes) = encode(status, headers) else {
            return false;
        };
        let Ok(mut queue) = self.shared.queue.lock() else {
            return false;
        };
        if queue.len() + bytes.len() > MAX_QUEUED {
            return false;
        }
        let accepted = match self.shared.state.compare_exchange(
            CLEAN,
            PENDING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(state) => state == PENDING,
        };
        if accepted {
            queue.extend_from_slice(&bytes);
            drop(queue);
            self.shared.waker.wake();
        }
        accepted
    }
}

/// A client connection whose writes can be preceded by relayed interim responses.
pub struct InterimIo<S> {
    io: S,
    shared: Arc<Shared>,
    /// Interim bytes are partly written: finish them before anything of hyper's.
    draining: bool,
}

/// Wraps a client connection; the relay goes into the requests served on it.
pub fn wrap<S>(io: S) -> (InterimIo<S>, InterimRelay) {
    let shared = Arc::new(Shared {
        state: AtomicU8::new(DIRTY),
        queue: Mutex::new(Vec::new()),
        waker: AtomicWaker::new(),
    });
    (
        InterimIo {
            io,
            shared: shared.clone(),
            draining: false,
        },
        InterimRelay { shared },
    )
}

impl<S: AsyncWrite + Unpin> InterimIo<S> {
    /// Writes every queued interim byte.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.draining = true;
        let mut queue = self
            .shared
            .queue
            .lock()
            .map_err(|_| io::Error::other("interim queue poisoned"))?;
        while !queue.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &queue) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    queue.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.draining = false;
        Poll::Ready(Ok(()))
    }

    /// Before hyper writes: queued interim bytes go first, and the connection is no longer
    /// at a message boundary.
    fn poll_before_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shared.state.swap(DIRTY, Ordering::AcqRel) == PENDING || self.draining {
            return self.poll_drain(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for InterimIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for InterimIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_before_write(cx))?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_before_write(cx))?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The relay wakes this task so that a queued interim response goes out now, not
        // with the final response. (hyper flushes on every turn of its connection loop.)
        self.shared.waker.register(cx.waker());
        // hyper flushes only with its own buffer empty: interim bytes queued now go out
        // between messages.
        if self.draining
            || self
                .shared
                .state
                .compare_exchange(PENDING, DIRTY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            std::task::ready!(self.poll_drain(cx))?;
        }
        std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        // Only a flush that wrote everything marks a boundary; an interim response that
        // arrived meanwhile (PENDING) stays queued for the next call.
        let _ =
            self.shared
                .state
                .compare_exchange(DIRTY, CLEAN, Ordering::AcqRel, Ordering::Acquire);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A service that puts the connection's [`InterimRelay`] into each request's extensions.
pub struct WithRelay<S> {
    inner: S,
    relay: InterimRelay,
}

impl<S> WithRelay<S> {
    /// Serves `inner` with `relay` attached to its requests.
    pub fn new(inner: S, relay: InterimRelay) -> Self {
        WithRelay { inner, relay }
    }
}

impl<B, S: hyper::service::Service<Request<B>>> hyper::service::Service<Request<B>>
    for WithRelay<S>
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.relay.clone());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tokio::io::AsyncWriteExt;

    fn hints() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static("</s.css>; rel=preload; as=style"),
        );
        h
    }

    #[test]
    fn encodes_only_relayable_statuses() {
        let bytes = encode(StatusCode::EARLY_HINTS, &hints()).unwrap();
        assert_eq!(
            bytes,
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload; as=style\r\n\r\n"
        );
        assert!(encode(StatusCode::PROCESSING, &HeaderMap::new()).is_some());
        for s in [
            StatusCode::CONTINUE,
            StatusCode::SWITCHING_PROTOCOLS,
            StatusCode::OK,
        ] {
            assert!(encode(s, &hints()).is_none(), "{s}");
        }
    }

    #[tokio::test]
    async fn interim_goes_out_between_messages_and_before_the_next() {
        let (mut io, relay) = wrap(Vec::<u8>::new());
        // Fresh connection: hyper has not flushed yet, so nothing is accepted.
        assert!(!relay.send(StatusCode::EARLY_HINTS, &hints()));
        io.write_all(b"A").await.unwrap();
        io.flush().await.unwrap();
        assert!(relay.send(StatusCode::EARLY_HINTS, &hints()));
        assert!(relay.send(StatusCode::PROCESSING, &HeaderMap::new()));
        io.write_all(b"B").await.unwrap();
        // Mid-message (written, not flushed): dropped.
        assert!(!relay.send(StatusCode::EARLY_HINTS, &hints()));
        io.flush().await.unwrap();
        let mut want = b"A".to_vec();
        want.extend(encode(StatusCode::EARLY_HINTS, &hints()).unwrap());
        want.extend(encode(StatusCode::PROCESSING, &HeaderMap::new()).unwrap());
        want.push(b'B');
        assert_eq!(io.io, want);
    }

    #[tokio::test]
    async fn a_flush_alone_sends_what_is_queued() {
        let (mut io, relay) = wrap(Vec::<u8>::new());
        io.flush().await.unwrap();
        assert!(relay.send(StatusCode::EARLY_HINTS, &hints()));
        io.flush().await.unwrap();
        assert_eq!(io.io, encode(StatusCode::EARLY_HINTS, &hints()).unwrap());
        // Still at a boundary: another hint is accepted.
        assert!(relay.send(StatusCode::EARLY_HINTS, &hints()));
    }

    #[test]
    fn the_queue_is_bounded() {
        let (_io, relay) = wrap(Vec::<u8>::new());
        relay.shared.state.store(CLEAN, Ordering::Relaxed);
        let mut big = HeaderMap::new();
        big.insert("x", HeaderValue::from_bytes(&[b'a'; 6000]).unwrap());
        assert!(relay.send(StatusCode::EARLY_HINTS, &big));
        assert!(relay.send(StatusCode::EARLY_HINTS, &big));
        assert!(!relay.send(StatusCode::EARLY_HINTS, &big));
    }
}
