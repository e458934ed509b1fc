//! Upstream HTTP/1.1 pipelining for the fast path (`[balancer] pipeline`).
//!
//! Proxying costs most of its CPU in the kernel: per request one `recv` and one `send` on
//! the client's connection and the same again on the upstream one, each `send` on
//! loopback running the receiver's TCP stack too. Requests that arrive together (in one
//! turn of the scheduler) can share the upstream half: they are written to one upstream
//! connection as a pipeline, in one `send`, and their responses come back in order, read
//! by as few `recv`s as the bytes allow.
//!
//! A pipeline forms like this. The first request for a backend that finds no pipeline to
//! join opens one on a pooled (or new) connection and becomes its *flusher*: it yields to
//! the scheduler ([`tokio::task::yield_now`] runs it again only after every task that was
//! ready has run), and meanwhile every other request for that backend joins; then it
//! writes them all. Later requests keep joining the same connection while it is moving
//! (its first unanswered request has been first for less than [`STALLED_AFTER`]), while it
//! has fewer than `depth` requests unanswered and [`MAX_PENDING_BYTES`] allow; the first to
//! join after a write becomes that connection's next writer, the same way.
//!
//! Why one connection rather than a batch per turn, each on its own: a backend serves
//! the requests pipelined on one connection in order, but it serves its connections in
//! turn (nginx handles one request per connection per round), so batches on several
//! connections are interleaved, and the last requests of the oldest batch wait for the
//! newest batches' first ones. Under load that reordering widened the latency
//! distribution: one moving connection per backend kept it first come, first served (p90
//! and p99 7 % lower at 64 clients, BENCHMARKS.md, "Stage 3: one pipeline per backend,
//! first come first served"). The price: a request can wait behind a response that was already
//! on its way when it arrived. [`STALLED_AFTER`] bounds that: a slow response holds up
//! only the requests that joined within that long of it becoming first; the next ones
//! open another connection.
//!
//! Responses are read in order by whoever holds the connection's read *turn*: the first
//! request, then each next one, handed on with the bytes already read past the previous
//! response. A turn dropped without being handed on (failure, timeout, a client gone
//! mid-body) breaks the pipe: the connection closes and every request still waiting learns
//! at once that it was not answered, and is sent again on a fresh connection. Only
//! idempotent requests without a body are pipelined, so that is always safe (RFC 9112
//! §9.3.2).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::http::fastio::{self, bufs, timed_at};
use crate::proxy::client::{ConnPool, RawConn, UpstreamSettings};
use crate::proxy::ProxyError;

/// Most bytes of requests written to one connection and not yet answered (a first request
/// may be larger on its own). A writer writes without reading any response, so these must
/// fit in the socket buffers between here and the backend (16 KiB of send buffer and 128
/// KiB of receive buffer by Linux's defaults) without the backend having to answer first:
/// else a backend whose responses fill the buffers the other way (their reader busy
/// relaying to a slow client) stops reading, and both sides wait on each other until the
/// response timeout.
pub const MAX_PENDING_BYTES: usize = 32 << 10;

/// How long a connection's first unanswered request may have been first before the
/// connection takes no more requests. Long enough that a backend which shares its core
/// with others and answers in bursts keeps its one connection (on the benchmark machine
/// the gaps between bursts reach several hundred microseconds; 300 µs lost the gain),
/// short enough that a slow response holds up few requests.
pub const STALLED_AFTER: Duration = Duration::from_millis(1);

/// The pipelined connections in use to one backend (normally none or one).
pub struct Pipes {
    open: Mutex<Vec<Arc<Pipe>>>,
    /// Requests per write, for the backend's metrics.
    batch_requests: Histogram,
}

/// One upstream connection carrying pipelined requests.
pub struct Pipe {
    conn: RawConn,
    state: Mutex<State>,
}

struct State {
    /// Requests joined and not yet written.
    out: Vec<u8>,
    /// How many requests `out` holds.
    out_requests: usize,
    /// A writer is due (it yields, then writes `out` until it stays empty).
    writing: bool,
    /// The sizes of the requests joined and not yet answered, in order.
    unanswered: VecDeque<usize>,
    /// Their sum.
    unanswered_bytes: usize,
    /// When the first unanswered request became first (the connection opened, or the one
    /// before it was answered).
    front_since: Instant,
    /// The requests after the current turn's, in order: each gets the read turn and the
    /// bytes read past the response before it.
    waiting: VecDeque<oneshot::Sender<Unread>>,
    /// No more turns: the connection is done and everything waiting was told.
    broken: bool,
    /// The backend said it closes the connection after the current response.
    closing: bool,
    /// Responses read whole so far.
    answered: usize,
}

impl State {
    /// A new connection's, with its first request, at `now`.
    fn opened(request: &[u8], now: Instant) -> Self {
        let mut out = bufs::take();
        out.extend_from_slice(request);
        State {
            out,
            out_requests: 1,
            writing: true,
            unanswered: VecDeque::from([request.len()]),
            unanswered_bytes: request.len(),
            front_since: now,
            waiting: VecDeque::new(),
            broken: false,
            closing: false,
            answered: 0,
        }
    }

    /// Whether `request` may join at `now`: the connection is moving and has room.
    fn takes(&self, request: &[u8], depth: usize, now: Instant) -> bool {
        !self.broken
            && now.saturating_duration_since(self.front_since) < STALLED_AFTER
            && self.unanswered.len() < depth
            && self.unanswered_bytes + request.len() <= MAX_PENDING_BYTES
    }

    /// Adds `request` behind the others; true when it is the one to write it.
    fn join(&mut self, request: &[u8], tx: oneshot::Sender<Unread>) -> bool {
        self.out.extend_from_slice(request);
        self.out_requests += 1;
        self.unanswered.push_back(request.len());
        self.unanswered_bytes += request.len();
        self.waiting.push_back(tx);
        !std::mem::replace(&mut self.writing, true)
    }

    /// What joined since the last write, and how many requests that is; `None` (and no
    /// writer is due any more) when nothing has, or the pipe broke.
    fn take_out(&mut self) -> Option<(Vec<u8>, usize)> {
        if self.out.is_empty() || self.broken {
            self.writing = false;
            return None;
        }
        let requests = std::mem::take(&mut self.out_requests);
        Some((std::mem::take(&mut self.out), requests))
    }

    /// The first unanswered request was answered at `now`: the next one's turn, if any.
    fn answer(&mut self, now: Instant) -> Option<oneshot::Sender<Unread>> {
        self.answered += 1;
        if let Some(n) = self.unanswered.pop_front() {
            self.unanswered_bytes -= n;
        }
        self.front_since = now;
        self.waiting.pop_front()
    }
}

/// A request's place in a pipeline.
pub enum Joined<'a> {
    /// It opened the connection: call [`Flusher::flush`], then read the first response.
    Flusher(Flusher<'a>),
    /// It joined one: [`Member::turn`] waits for its response to be next.
    Member(Member),
}

impl Pipes {
    /// No connections yet; each write is counted in `batch_requests`.
    pub fn new(batch_requests: Histogram) -> Self {
        Pipes {
            open: Mutex::default(),
            batch_requests,
        }
    }

    /// Puts `request` on the moving connection to this backend that has room for it (at
    /// most `depth` requests unanswered), or opens one from `conns`. Fails only when no
    /// connection could be had (nothing was sent).
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
            let now = Instant::now();
            for pipe in list.iter() {
                let mut state = pipe.state();
                if state.takes(request, depth, now) {
                    let (tx, rx) = oneshot::channel();
                    let write = state.join(request, tx);
                    return Ok(Joined::Member(Member {
                        pipe: pipe.clone(),
                        rx,
                        write,
                    }));
                }
            }
        }
        let conn = conns.raw(settings).await?;
        let pipe = Arc::new(Pipe {
            conn,
            state: Mutex::new(State::opened(request, Instant::now())),
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

    /// Yields once, so that every ready request can join, then writes what joined until
    /// nothing more has (by `deadline`). A failed write breaks the pipe.
    async fn write_out(
        &self,
        pipe: &Pipe,
        deadline: Instant,
    ) -> Result<(), Option<std::io::Error>> {
        tokio::task::yield_now().await;
        loop {
            let Some((out, requests)) = pipe.state().take_out() else {
                return Ok(());
            };
            let written = timed_at(deadline, fastio::write_from(&pipe.conn.stream, &out)).await;
            bufs::give(out);
            match written {
                Some(Ok(())) => self.batch_requests.observe(requests as f64),
                Some(Err(e)) => {
                    pipe.break_off();
                    return Err(Some(e));
                }
                None => {
                    pipe.break_off();
                    return Err(None);
                }
            }
        }
    }
}

impl Pipes {
    fn list(&self) -> MutexGuard<'_, Vec<Arc<Pipe>>> {
        // A panic while holding the lock leaves nothing half-done that matters here.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pipe {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-done that matters here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ended_benignly(&self) -> bool {
        let state = self.state();
        self.conn.reused || state.answered > 0 || state.closing
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

/// The request that opened a pipelined connection.
pub struct Flusher<'a> {
    turn: Turn,
    pipes: &'a Pipes,
}

impl Flusher<'_> {
    /// Lets every ready request join, then writes them by `deadline`; on success the
    /// caller holds the read turn for the first response (its own). On failure, the turn
    /// says whether the connection was reused ([`Turn::reused`]); `None`: out of time.
    ///
    /// Not to be polled through `now_or_never` (as [`crate::http::fastio::timed`] does):
    /// that poll would use up the yield, and the write would leave with one request.
    pub async fn flush(self, deadline: Instant) -> Result<Turn, (Turn, Option<std::io::Error>)> {
        match self.pipes.write_out(&self.turn.pipe, deadline).await {
            Ok(()) => Ok(self.turn),
            Err(e) => Err((self.turn, e)),
        }
    }
}

/// A request that joined a pipelined connection.
pub struct Member {
    pipe: Arc<Pipe>,
    rx: oneshot::Receiver<Unread>,
    /// It is the one to write what joined (dropped before that, it breaks the pipe: the
    /// requests behind it would never be written).
    write: bool,
}

impl Member {
    /// Writes what joined when it is this request's to write (as [`Flusher::flush`], by
    /// `deadline`), then waits until the responses before this request's have been read:
    /// then the read turn and the bytes already read past them. `Err`: the pipe broke
    /// first, so this request was not answered; the flag is [`Turn::ended_benignly`].
    pub async fn turn(mut self, pipes: &Pipes, deadline: Instant) -> Result<(Turn, Unread), bool> {
        if self.write {
            // A failed write breaks the pipe, which the wait below reports.
            let _ = pipes.write_out(&self.pipe, deadline).await;
            self.write = false;
        }
        match (&mut self.rx).await {
            Ok(read) => Ok((
                Turn {
                    pipe: self.pipe.clone(),
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
    /// first or said it would close (a backend may end connections after so many
    /// requests, like nginx's `keepalive_requests`). Resending its unanswered requests
    /// makes progress either way: the pool only shrinks, and each such round answered
    /// someone.
    pub fn ended_benignly(&self) -> bool {
        self.pipe.ended_benignly()
    }

    /// The backend closes the connection after this turn's response (`Connection:
    /// close`): the requests behind it will not be answered, so they learn it now and go
    /// elsewhere, and none join.
    pub fn last_on_connection(&self) {
        self.pipe.state().closing = true;
        self.pipe.break_off();
    }

    /// This turn's response was read to its end and `read` holds the bytes after it: the
    /// next request's turn begins. When no request is left unanswered the connection goes
    /// back to `conns` (with no stray bytes only).
    pub fn hand_on(mut self, read: Unread, pipes: &Pipes, conns: &ConnPool, max_idle: usize) {
        self.handed_on = true;
        let mut next = {
            let mut state = self.pipe.state();
            if state.broken {
                return bufs::give(read.into_buf());
            }
            state.answer(Instant::now())
        };
        if next.is_none() {
            // Nothing is waiting: the connection leaves the list, unless a request joined
            // meanwhile. The list's lock first, as in `join`, so none joins after this look.
            let mut list = pipes.list();
            let mut state = self.pipe.state();
            if state.broken {
                return bufs::give(read.into_buf());
            }
            next = state.waiting.pop_front();
            if next.is_none() {
                drop(state);
                list.retain(|p| !Arc::ptr_eq(p, &self.pipe));
            }
        }
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

impl Drop for Member {
    fn drop(&mut self) {
        if self.write {
            self.pipe.break_off();
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

/// Bytes read from an upstream connection and not yet used: a buffer with a cursor.
/// Pipelined responses arrive together in one buffer; each is used from the front, and
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

    #[test]
    fn a_connection_takes_requests_while_it_moves_and_has_room() {
        let t0 = Instant::now();
        let req = [b'x'; 100];
        let soon = t0 + STALLED_AFTER / 2;
        let mut s = State::opened(&req, t0);
        assert!(s.takes(&req, 3, soon));
        let (tx, _rx2) = oneshot::channel();
        assert!(
            !s.join(&req, tx),
            "what joins before the first write is the opener's"
        );
        assert_eq!(s.take_out().map(|(out, n)| (out.len(), n)), Some((200, 2)));
        assert_eq!(s.take_out(), None, "all written: no writer due");
        let (tx, _rx3) = oneshot::channel();
        assert!(s.join(&req, tx), "the first to join after a write writes");
        assert!(!s.takes(&req, 3, soon), "three unanswered at a depth of 3");
        assert!(s.takes(&req, 4, soon));

        // The first is answered: room again, and the next one is first from then on.
        let t1 = t0 + STALLED_AFTER * 3;
        assert!(s.answer(t1).is_some(), "the second request's turn");
        assert!(s.takes(&req, 3, t1 + STALLED_AFTER / 2));
        assert!(
            !s.takes(&req, 3, t1 + STALLED_AFTER),
            "a connection whose first request has waited that long takes no more"
        );
        let big = vec![b'y'; MAX_PENDING_BYTES - 200];
        assert!(s.takes(&big, 3, t1));
        assert!(
            !s.takes(&[big.as_slice(), b"z"].concat(), 3, t1),
            "over the byte limit"
        );
        s.broken = true;
        assert!(!s.takes(&req, 3, t1), "a broken pipe takes nothing");
        assert_eq!(s.take_out(), None);
    }

    #[tokio::test]
    async fn joiners_fill_a_connection_then_open_another() {
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
        // This test is about room, not time: each join finds the connections just moved,
        // however slowly the test runs.
        let moved = || {
            for p in pipes.list().iter() {
                p.state().front_since = Instant::now();
            }
        };
        let small = [b'x'; 100];
        let first = pipes.join(&conns, &settings, 3, &small).await.unwrap();
        assert!(matches!(first, Joined::Flusher(_)));
        let mut members = Vec::new();
        for _ in 0..2 {
            moved();
            match pipes.join(&conns, &settings, 3, &small).await.unwrap() {
                Joined::Member(m) => members.push(m),
                Joined::Flusher(_) => panic!("a connection with room opened another"),
            }
        }
        // Depth 3 reached: the next request opens a connection of its own.
        moved();
        let second = pipes.join(&conns, &settings, 3, &small).await.unwrap();
        assert!(matches!(second, Joined::Flusher(_)));
        // A request that would take that one past its byte limit opens another.
        moved();
        let big = vec![b'y'; MAX_PENDING_BYTES];
        let third = pipes.join(&conns, &settings, 3, &big).await.unwrap();
        assert!(matches!(third, Joined::Flusher(_)));
        assert_eq!(pipes.list().len(), 3);
        // A member due to write that goes away breaks its pipe: the requests behind it
        // would never be written.
        let (tx, _rx) = oneshot::channel();
        let (pipe, write) = {
            let Joined::Flusher(f) = &second else {
                unreachable!()
            };
            let pipe = f.turn.pipe.clone();
            let mut state = pipe.state();
            assert!(state.take_out().is_some());
            assert!(state.take_out().is_none());
            (pipe.clone(), state.join(&small, tx))
        };
        assert!(write);
        drop(Member {
            pipe: pipe.clone(),
            rx: oneshot::channel().1,
            write,
        });
        assert!(pipe.state().broken);
        drop((first, second, third, members));
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
