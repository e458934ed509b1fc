//! Upstream HTTP/1.1 pipelining for the fast path (`[balancer] pipeline`).
//!
//! Proxying costs most of its CPU in the kernel: per request one `recv` and one `send` on
//! the client's connection and the same again on the upstream one, each `send` on
//! loopback running the receiver's TCP stack too. Requests that arrive together (in one
//! turn of the scheduler) can share the upstream half: they are written to one upstream
//! connection as a pipeline, in one `send`, and their responses come back in order, read
//! by as few `recv`s as the bytes allow.
//!
//! A batch forms like this. The first request for a backend that finds no batch collecting
//! opens one on a pooled (or new) connection and becomes its *flusher*: it yields to the
//! scheduler ([`tokio::task::yield_now`] runs it again only after every task that was
//! ready has run), and meanwhile every other request for that backend joins the batch.
//! Then the flusher writes the whole batch and takes no more joiners, so a request never
//! waits behind a response that was already on its way when it arrived; it only shares a
//! fate with the requests that arrived with it.
//!
//! Responses are read in order by whoever holds the connection's read *turn*: the first
//! request of the batch, then each next one, handed on with the bytes already read past
//! the previous response. A turn dropped without being handed on (failure, timeout, a
//! client gone mid-body) breaks the pipe: the connection closes and every request still
//! waiting learns at once that it was not answered, and is sent again on a fresh
//! connection. Only idempotent requests without a body are pipelined, so that is always
//! safe (RFC 9112 §9.3.2).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::http::fastio::{self, bufs, timed_at};
use crate::proxy::client::{ConnPool, RawConn, UpstreamSettings};
use crate::proxy::ProxyError;

/// Most bytes of requests in one batch (a first request may be larger on its own). The
/// flusher writes the whole batch before it reads any response, so the batch must fit in
/// the socket buffers between here and the backend (16 KiB of send buffer and 128 KiB of
/// receive buffer by Linux's defaults) without the backend having to answer first: else
/// a backend whose responses fill the buffers the other way stops reading, and both sides
/// wait on each other until the response timeout.
pub const MAX_BATCH_BYTES: usize = 32 << 10;

/// The batches now collecting for one backend (normally none or one).
pub struct Pipes {
    collecting: Mutex<Vec<Arc<Pipe>>>,
    /// Requests per batch written, for the backend's metrics.
    batch_requests: Histogram,
}

/// One upstream connection carrying one batch of pipelined requests.
pub struct Pipe {
    conn: RawConn,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The batch's requests, until the flusher writes them.
    out: Vec<u8>,
    /// The requests after the current turn's, in order: each gets the read turn and the
    /// bytes read past the response before it. While the batch collects, that is every
    /// request but the flusher's.
    waiting: VecDeque<oneshot::Sender<Unread>>,
    /// No more turns: the connection is done and everything waiting was told.
    broken: bool,
    /// Responses read whole so far.
    answered: usize,
}

/// A request's place in a batch.
pub enum Joined<'a> {
    /// It opened the batch: call [`Flusher::flush`], then read the first response.
    Flusher(Flusher<'a>),
    /// It joined one: [`Member::turn`] waits for its response to be next.
    Member(Member),
}

impl Pipes {
    /// No batches yet; each one written is counted in `batch_requests`.
    pub fn new(batch_requests: Histogram) -> Self {
        Pipes {
            collecting: Mutex::default(),
            batch_requests,
        }
    }

    /// Puts `request` into the batch collecting for this backend, or opens one with at most
    /// `depth` requests on a connection from `conns`. Fails only when no connection could
    /// be had (nothing was sent).
    pub async fn join(
        &self,
        conns: &ConnPool,
        settings: &UpstreamSettings,
        depth: usize,
        request: &[u8],
    ) -> Result<Joined<'_>, ProxyError> {
        {
            // (The lock is let go before waiting for a connection.)
            let mut list = self.list();
            list.retain(|p| !p.state().broken);
            for pipe in list.iter() {
                let mut state = pipe.state();
                let requests = state.waiting.len() + 1;
                if requests < depth && state.out.len() + request.len() <= MAX_BATCH_BYTES {
                    let (tx, rx) = oneshot::channel();
                    state.out.extend_from_slice(request);
                    state.waiting.push_back(tx);
                    return Ok(Joined::Member(Member {
                        pipe: pipe.clone(),
                        rx,
                    }));
                }
            }
        }
        let conn = conns.raw(settings).await?;
        let mut out = bufs::take();
        out.extend_from_slice(request);
        let pipe = Arc::new(Pipe {
            conn,
            state: Mutex::new(State {
                out,
                ..State::default()
            }),
        });
        self.list().push(pipe.clone());
        Ok(Joined::Flusher(Flusher {
            turn: Turn {
                pipe,
                handed_on: false,
            },
            pipes: self,
        }))
    }
}

impl Pipes {
    fn list(&self) -> MutexGuard<'_, Vec<Arc<Pipe>>> {
        // A panic while holding the lock leaves nothing half-done that matters here.
        self.collecting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pipe {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-done that matters here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ended_benignly(&self) -> bool {
        self.conn.reused || self.state().answered > 0
    }

    /// Ends the pipe: everything still waiting is told it was not answered.
    fn break_off(&self) {
        let waiting = {
            let mut state = self.state();
            state.broken = true;
            std::mem::take(&mut state.waiting)
        };
        drop(waiting);
    }
}

/// The request that opened a batch.
pub struct Flusher<'a> {
    turn: Turn,
    pipes: &'a Pipes,
}

impl Flusher<'_> {
    /// Lets every ready request join, then writes the batch by `deadline`; on success the
    /// caller holds the read turn for the first response (its own). On failure, the turn
    /// says whether the connection was reused ([`Turn::reused`]); `None`: out of time.
    ///
    /// Not to be polled through `now_or_never` (as [`crate::http::fastio::timed`] does):
    /// that poll would use up the yield, and the batch would leave with one request.
    pub async fn flush(self, deadline: Instant) -> Result<Turn, (Turn, Option<std::io::Error>)> {
        tokio::task::yield_now().await;
        let pipe = &self.turn.pipe;
        let (out, requests) = {
            let mut list = self.pipes.list();
            list.retain(|p| !Arc::ptr_eq(p, pipe));
            let mut state = pipe.state();
            (std::mem::take(&mut state.out), state.waiting.len() + 1)
        };
        let written = timed_at(deadline, fastio::write_from(&pipe.conn.stream, &out)).await;
        bufs::give(out);
        match written {
            Some(Ok(())) => {
                self.pipes.batch_requests.observe(requests as f64);
                Ok(self.turn)
            }
            Some(Err(e)) => Err((self.turn, Some(e))),
            None => Err((self.turn, None)),
        }
    }
}

/// A request that joined a batch.
pub struct Member {
    pipe: Arc<Pipe>,
    rx: oneshot::Receiver<Unread>,
}

impl Member {
    /// Waits until the responses before this request's have been read: then the read turn
    /// and the bytes already read past them. `Err`: the pipe broke first, so this request
    /// was not answered; the flag is [`Turn::ended_benignly`].
    pub async fn turn(self) -> Result<(Turn, Unread), bool> {
        match self.rx.await {
            Ok(read) => Ok((
                Turn {
                    pipe: self.pipe,
                    handed_on: false,
                },
                read,
            )),
            Err(_) => Err(self.pipe.ended_benignly()),
        }
    }
}

/// The right to read the next response from a pipe's connection. Dropped without
/// [`Turn::hand_on`], it breaks the pipe.
pub struct Turn {
    pipe: Arc<Pipe>,
    handed_on: bool,
}

impl Turn {
    /// The upstream connection.
    pub fn stream(&self) -> &TcpStream {
        &self.pipe.conn.stream
    }

    /// True when the connection came from the pool (the upstream may have closed it).
    pub fn reused(&self) -> bool {
        self.pipe.conn.reused
    }

    /// True when a connection that ended says nothing about the backend: it came from the
    /// pool (the backend may close idle connections at any time), or it answered others
    /// first (a backend may end connections after so many requests, like nginx's
    /// `keepalive_requests`). Resending its unanswered requests makes progress either way:
    /// the pool only shrinks, and each such round answered someone.
    pub fn ended_benignly(&self) -> bool {
        self.pipe.ended_benignly()
    }

    /// This turn's response was read to its end and `read` holds the bytes after it: the
    /// next request's turn begins. After the batch's last response the connection goes
    /// back to `conns` (with no stray bytes only).
    pub fn hand_on(mut self, read: Unread, conns: &ConnPool, max_idle: usize) {
        self.handed_on = true;
        let next = {
            let mut state = self.pipe.state();
            if state.broken {
                return bufs::give(read.into_buf());
            }
            state.answered += 1;
            state.waiting.pop_front()
        };
        match next {
            Some(tx) => {
                if let Err(read) = tx.send(read) {
                    // That request gave up waiting; its response would be read by nobody.
                    bufs::give(read.into_buf());
                    self.pipe.break_off();
                }
            }
            None => {
                let stray = !read.is_empty();
                bufs::give(read.into_buf());
                let pipe = self.pipe.clone();
                drop(self);
                match Arc::try_unwrap(pipe) {
                    Ok(pipe) if !stray => conns.put_raw(pipe.conn, max_idle),
                    Ok(_) => {}
                    Err(pipe) => pipe.break_off(),
                }
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !self.handed_on {
            self.pipe.break_off();
        }
    }
}

/// Bytes read from an upstream connection and not yet used: a buffer with a cursor. A
/// batch's responses arrive together in one buffer; each is used from the front, and
/// draining them from the front moved the rest every time (quadratic in the batch: 30 %
/// of the balancer's instructions at a depth of 32, callgrind).
#[derive(Default)]
pub struct Unread {
    buf: Vec<u8>,
    start: usize,
}

impl Unread {
    /// An empty one, reading into `buf`.
    pub fn new(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Unread { buf, start: 0 }
    }

    /// The bytes not yet used.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// True when every byte read has been used.
    pub fn is_empty(&self) -> bool {
        self.start >= self.buf.len()
    }

    /// Marks the first `n` unused bytes used.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.buf.len() {
            self.clear();
        }
    }

    /// Forgets everything read.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// The buffer to read more into (appended after the unused bytes).
    pub fn buf_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// The buffer back, for the stock.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn batches_stop_at_their_depth_and_their_byte_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conns = ConnPool::new(listener.local_addr().unwrap());
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(2),
            pool_max_idle: 4,
        };
        let pipes = Pipes::new(Histogram::new([1.0].into_iter()));
        let small = [b'x'; 100];
        let first = pipes.join(&conns, &settings, 3, &small).await.unwrap();
        assert!(matches!(first, Joined::Flusher(_)));
        for _ in 0..2 {
            let joined = pipes.join(&conns, &settings, 3, &small).await.unwrap();
            assert!(matches!(joined, Joined::Member(_)));
        }
        // Depth 3 reached: the next request opens a batch of its own.
        let second = pipes.join(&conns, &settings, 3, &small).await.unwrap();
        assert!(matches!(second, Joined::Flusher(_)));
        // A request that would take that batch past its byte limit opens another.
        let big = vec![b'y'; MAX_BATCH_BYTES];
        let third = pipes.join(&conns, &settings, 3, &big).await.unwrap();
        assert!(matches!(third, Joined::Flusher(_)));
        drop((first, second));
    }

    #[test]
    fn unread_bytes_are_used_from_the_front_and_reads_append() {
        let mut u = Unread::new(b"stale".to_vec());
        assert!(u.is_empty(), "a new one starts empty");
        u.buf_mut().extend_from_slice(b"HEAD1body1HEAD2");
        u.consume(5);
        assert_eq!(u.bytes(), b"body1HEAD2");
        u.consume(5);
        assert_eq!(u.bytes(), b"HEAD2");
        u.buf_mut().extend_from_slice(b"body2");
        assert_eq!(u.bytes(), b"HEAD2body2");
        u.consume(10);
        assert!(u.is_empty());
        // Once all is used, the next read lands at the buffer's start.
        u.buf_mut().extend_from_slice(b"next");
        assert_eq!(u.bytes(), b"next");
        assert_eq!(u.into_buf(), b"next");
    }
}
