//! Bodies that stream through the proxy without buffering. Each side gets an idle limit:
//! a pause longer than it between two chunks ends the exchange instead of holding a
//! connection forever. The response body also tells its owner when it is done, so the
//! upstream connection goes back to the pool only after the whole response was read.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::http::body::BodyError;

/// Why a body stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyStreamError {
    /// No chunk arrived within the idle limit.
    #[error("body stalled for more than {0:?}")]
    Idle(Duration),
    /// The peer's stream failed (it vanished, or sent bad framing).
    #[error("body stream failed: {0}")]
    Peer(#[source] hyper::Error),
}

pin_project! {
    /// An incoming body with an idle limit: once the reader asks for a chunk, the peer has
    /// `limit` to deliver it. Time the reader spends not asking (a slow client on the
    /// other side) does not count against the peer.
    ///
    /// The timer is made the first time the body has to wait: a small body that arrives
    /// with its head (the common case) never touches the timer wheel.
    pub struct IdleBody {
        #[pin]
        inner: Incoming,
        idle: Option<Pin<Box<Sleep>>>,
        limit: Duration,
        waiting: bool,
    }
}

impl IdleBody {
    /// Wraps `inner`; each chunk must arrive within `limit` of being asked for.
    pub fn new(inner: Incoming, limit: Duration) -> Self {
        IdleBody {
            inner,
            idle: None,
            limit,
            waiting: false,
        }
    }
}

impl HttpBody for IdleBody {
    type Data = Bytes;
    type Error = BodyStreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if polled.is_ready() {
            *this.waiting = false;
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyStreamError::Peer(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !*this.waiting {
                    // The clock starts when we start waiting, not at the last chunk.
                    *this.waiting = true;
                    let deadline = Instant::now() + *this.limit;
                    match this.idle {
                        Some(idle) => idle.as_mut().reset(deadline),
                        None => *this.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let Some(idle) = this.idle.as_mut() else {
                    // Set just above whenever we wait.
                    return Poll::Pending;
                };
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyStreamError::Idle(*this.limit)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Empty => f.write_str("RequestBody::Empty"),
            RequestBody::Stream { .. } => f.write_str("RequestBody::Stream"),
        }
    }
}

pin_project! {
    /// The body sent upstream: nothing (no allocation, no timer) or the client's stream.
    // The variant's field is documented here: pin_project_lite takes no field docs.
    // `Stream.body`: the client's stream with its idle limit.
    #[project = RequestBodyProj]
    #[allow(missing_docs)]
    pub enum RequestBody {
        /// No body.
        Empty,
        /// The client's body, streamed.
        Stream {
            #[pin]
            body: IdleBody,
        },
    }
}

impl RequestBody {
    /// The upstream body for a client body: `Empty` when the client sent none.
    pub fn from_incoming(body: Incoming, idle: Duration) -> Self {
        if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Stream {
                body: IdleBody::new(body, idle),
            }
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyStreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            RequestBodyProj::Empty => Poll::Ready(None),
            RequestBodyProj::Stream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream { body } => body.size_hint(),
        }
    }
}

/// Told how a response stream ended: cleanly (the connection may be reused) or not.
pub trait OnEnd: Send + Unpin + 'static {
    /// Called exactly once, when the body ended or was dropped.
    fn end(&mut self, clean: bool);
}

pin_project! {
    /// A response body on its way to the client; reports its end to `on_end`.
    pub struct ResponseBody<E: OnEnd> {
        #[pin]
        body: IdleBody,
        on_end: Option<E>,
    }

    impl<E: OnEnd> PinnedDrop for ResponseBody<E> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut e) = this.on_end.take() {
                e.end(false);
            }
        }
    }
}

impl<E: OnEnd> ResponseBody<E> {
    /// Wraps an upstream response body. An already finished body reports at once.
    pub fn new(body: Incoming, idle: Duration, mut on_end: E) -> Self {
        let done = body.is_end_stream();
        if done {
            on_end.end(true);
        }
        ResponseBody {
            body: IdleBody::new(body, idle),
            on_end: (!done).then_some(on_end),
        }
    }
}

impl<E: OnEnd> HttpBody for ResponseBody<E> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.body.as_mut().poll_frame(cx);
        let clean = match &polled {
            Poll::Ready(None) => Some(true),
            Poll::Ready(Some(Err(_))) => Some(false),
            // A sized body may not be polled again once it is complete.
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => Some(true),
            _ => None,
        };
        if let Some(clean) = clean {
            if let Some(mut e) = this.on_end.take() {
                e.end(clean);
            }
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BodyError)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
