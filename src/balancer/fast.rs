//! The fast path for plain HTTP/1.1 clients: one task per client connection reads a request
//! head, writes the upstream request on a pooled plain TCP connection, reads the response
//! head and relays the response — no hyper server or client machinery, no task hand-offs,
//! no header maps. Heads are parsed and rewritten by the pure [`crate::proxy::h1`].
//!
//! Whatever [`h1::prepare_request`] does not take (upgrades, `Expect`, streamed or chunked
//! request bodies, HTTP/1.0, malformed or oversized heads, h2c) hands the connection to the
//! general hyper path ([`Balancer::handle`]) for the rest of its life, with the bytes read
//! so far. The policy is the general path's: same picks, health accounting, retry rules and
//! budget, timeouts, metrics, access log and problem+json answers.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pipe::{self, Unread};
use super::pool::Tried;
use super::{health, no_backend, problem_for, Balancer, StatusLabel, MAX_ATTEMPTS};
use crate::config::HttpLimits;
use crate::http::fastio::{self, bufs, timed, timed_at, HeadLimits, Waited, READ_CHUNK};
use crate::http::problem::Problem;
use crate::http::server::{FastPath, Handoff, Shutdown};
use crate::proxy::client::RawConn;
use crate::proxy::h1::{self, ChunkedEnd, Framing, RequestInfo, RequestPrep, ResponsePrep};
use crate::proxy::headers::{self, Forwarding};
use crate::proxy::{FailureKind, ProxyError};

impl Balancer {
    /// The fast path for this balancer's plain-HTTP listener with `limits`.
    pub fn fast_path(self: &Arc<Self>, limits: &HttpLimits) -> FastPath {
        fastio::fast_path(self, limits, Self::serve_conn)
    }

    /// Serves one client connection: waits for a request in a small state, then serves
    /// requests in a boxed one made per busy period, which ends when the client sends
    /// nothing for [`BUSY_WINDOW`]. The request state machine (timers, pipelines, relays)
    /// is most of the connection's task; kept inline, every idle keep-alive connection
    /// held it (~3 KB per idle connection, `benches/proxy/idle.py --serial`, against ~1.8
    /// KB now), and boxed per request it cost ~5 % more instructions per request
    /// (callgrind). Boxed per busy period, a connection in use keeps it and an idle one
    /// lets it go.
    async fn serve_conn(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
        head: HeadLimits,
    ) -> Option<Handoff> {
        let mut conn = Conn {
            waits: fastio::Waits::new(&shutdown),
            client,
            fwd: Forwarding::new(peer.ip(), "http"),
            input: Vec::new(),
            timer: fastio::Timer::default(),
        };
        let mut deadline = Instant::now() + head.timeout;
        loop {
            if conn.waits.request(&conn.client, deadline).await != Waited::Request {
                return None;
            }
            match Box::pin(self.serve_busy(&mut conn, &shutdown, head)).await {
                Busy::Quiet(idle_until) => deadline = idle_until,
                Busy::Done => return None,
                Busy::Close => {
                    fastio::close_gracefully(conn.client).await;
                    return None;
                }
                Busy::Handoff => {
                    return Some(Handoff {
                        stream: conn.client,
                        read: conn.input,
                    })
                }
            }
        }
    }

    /// Serves the requests of one busy period, the first of which has begun to arrive.
    async fn serve_busy(&self, conn: &mut Conn, shutdown: &Shutdown, head: HeadLimits) -> Busy {
        let Conn {
            client,
            fwd,
            input,
            waits,
            timer,
        } = conn;
        loop {
            if *shutdown.borrow() {
                return Busy::Close;
            }
            // Buffers are taken per request and given back while the connection waits, so
            // a waiting connection holds none.
            if input.is_empty() {
                *input = bufs::take();
            }
            let mut bufs = Bufs::take();
            // Set when a read of this head first has to wait; most heads come in one read.
            let mut deadline = None;
            let (info, pool) = loop {
                if !input.is_empty() {
                    // The pool as of this request: loaded once its bytes are here, not when
                    // the connection started waiting for it, so a request that arrives
                    // after a reload is never routed by the config before it.
                    let pool = self.pool.load_full();
                    bufs.up_req.clear();
                    let key = |f: &[httparse::Header<'_>]| {
                        let k = pool.key.as_ref()?;
                        k.hash_fields(f.iter().map(|h| (h.name.as_bytes(), h.value)))
                    };
                    match h1::prepare_request(input, fwd, key, &mut bufs.up_req) {
                        RequestPrep::Ready(i) => break (i, pool),
                        RequestPrep::Fallback => {
                            bufs.give_back();
                            return Busy::Handoff;
                        }
                        RequestPrep::Partial if input.len() >= head.max_bytes => {
                            bufs.give_back();
                            return Busy::Handoff;
                        }
                        RequestPrep::Partial => {}
                    }
                }
                input.reserve(READ_CHUNK);
                let read = match fastio::read_into(client, input).now_or_never() {
                    Some(read) => Some(read),
                    None => {
                        let deadline =
                            *deadline.get_or_insert_with(|| Instant::now() + head.timeout);
                        let read = fastio::read_into(client, input);
                        tokio::select! {
                            biased;
                            r = tokio::time::timeout_at(deadline, read) => r.ok(),
                            _ = waits.stopping() => return Busy::Close,
                        }
                    }
                };
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    // Closed, broken, or too slow with its head (slowloris): drop it.
                    _ => return Busy::Done,
                }
            };
            let keep = self
                .exchange(&pool, client, input, &info, fwd, &mut bufs, timer)
                .await;
            bufs.give_back();
            if !keep {
                return Busy::Done;
            }
            if info.close {
                return Busy::Close;
            }
            input.drain(..info.head_len + info.body_len);
            if input.is_empty() {
                bufs::give(std::mem::take(input));
                // The next request, within the busy window (or the idle timeout, if sooner).
                let now = Instant::now();
                let wait = head.timeout.min(BUSY_WINDOW);
                match waits.request(client, now + wait).await {
                    Waited::Request => {}
                    Waited::Expired if wait < head.timeout => {
                        return Busy::Quiet(now + head.timeout)
                    }
                    _ => return Busy::Done,
                }
            }
        }
    }

    /// Forwards one request and relays its answer; false when the client connection
    /// cannot carry another request.
    #[allow(clippy::too_many_arguments)] // each is the connection's own, borrowed per request
    async fn exchange(
        &self,
        pool: &Arc<super::Pool>,
        client: &TcpStream,
        input: &[u8],
        info: &RequestInfo,
        fwd: &Forwarding,
        bufs: &mut Bufs,
        timer: &mut fastio::Timer,
    ) -> bool {
        let started = std::time::Instant::now();
        let up = &pool.upstream;
        pool.budget.on_request();
        let attempts = (pool.retry.attempts as usize).clamp(1, MAX_ATTEMPTS);
        // The upstream request stays in its buffer, so a retry resends the same bytes; the
        // rules of which requests may be resent are the general path's.
        let replayable = attempts > 1 && headers::idempotent(&info.method) && info.body_len == 0;
        let pipelined = pool.pipeline > 1
            && info.body_len == 0
            && !info.close
            && (info.method == http::Method::GET || info.method == http::Method::HEAD);
        let request_id = info.request_id.clone();
        let mut head = HeadRead {
            head_request: info.method == http::Method::HEAD,
            request_id: request_id.clone(),
            close: info.close,
            idle: up.idle_timeout,
            deadline: Instant::from_std(started) + up.response_timeout,
        };
        let mut tried = Tried::default();
        let mut last: Option<(ProxyError, SocketAddr)> = None;
        let mut status = 0u16;
        let mut keep = true;
        for attempt in 0..attempts {
            // One clock read per attempt serves the health clock, the latency metric and
            // the response deadline (clock reads were ~2 % of the proxy's instructions).
            // The first attempt's deadline was set with `head`, from the same instant.
            let sent_at = match attempt {
                0 => started,
                _ => {
                    let t = std::time::Instant::now();
                    head.deadline = Instant::from_std(t) + up.response_timeout;
                    t
                }
            };
            let now = health::ms_at(sent_at);
            if attempt > 0 && !pool.budget.try_retry(now / 1000) {
                self.budget_exhausted.inc();
                break;
            }
            let Some(i) = pool.pick_untried(info.key, now, &mut tried) else {
                break;
            };
            let backend = &pool.backends[i];
            backend.dispatch();
            let outcome = if pipelined {
                send_pipelined(backend, up, pool.pipeline, bufs, &head, client, timer).await
            } else {
                send(backend, up, bufs, &head, client, timer).await
            };
            match outcome {
                Ok((upstream, resp)) => {
                    backend
                        .metrics
                        .latency
                        .observe(sent_at.elapsed().as_secs_f64());
                    if resp.status >= 500 {
                        self.failed(pool, backend, now);
                    } else {
                        backend.health.request_ok();
                    }
                    status = resp.status;
                    let relayed =
                        relay(client, upstream.stream(), &resp, bufs, up.idle_timeout).await;
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    keep = match relayed {
                        Relayed::Complete => {
                            if !resp.upstream_close {
                                upstream.reuse(&mut bufs.up_resp, backend, up.pool_max_idle);
                            }
                            true
                        }
                        Relayed::Done => resp.framing != Framing::UntilClose,
                        Relayed::Broken => false,
                    };
                    last = None;
                    break;
                }
                Err(Failed::NotSent(e)) => {
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    self.failed(pool, backend, now);
                    backend.metrics.retries.inc();
                    tracing::debug!(backend = %backend.address, error = %e, "nothing sent; trying another backend");
                    last = Some((e, backend.address));
                }
                Err(Failed::Sent(e)) => {
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    self.failed(pool, backend, now);
                    // A timeout is not retried: the backend may still be working on it.
                    let again = replayable
                        && e.kind != FailureKind::ResponseTimeout
                        && attempt + 1 < attempts;
                    tracing::debug!(backend = %backend.address, error = %e, retry = again, "exchange failed");
                    let addr = backend.address;
                    last = Some((e, addr));
                    if !again {
                        break;
                    }
                    backend.metrics.retries.inc();
                }
                Err(Failed::Client) => {
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        if status == 0 {
            let problem = match &last {
                Some((e, addr)) => problem_for(e, *addr, started),
                None => no_backend(pool),
            };
            status = problem.status;
            keep = self
                .answer_locally(
                    client,
                    &problem,
                    &bufs.up_req[request_id.clone()],
                    info.close,
                    &mut bufs.down,
                )
                .await;
        }
        if pool.access_log {
            let target = String::from_utf8_lossy(&input[info.target.clone()]);
            let path = target.split('?').next().unwrap_or("");
            let id = String::from_utf8_lossy(&bufs.up_req[request_id]);
            tracing::info!(target: "access", peer = %fwd.client, method = %info.method, path, status, micros = started.elapsed().as_micros() as u64, request_id = %id);
        }
        keep
    }

    async fn answer_locally(
        &self,
        client: &TcpStream,
        problem: &Problem,
        request_id: &[u8],
        close: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        self.local
            .get_or_create(&StatusLabel {
                status: problem.status,
            })
            .inc();
        out.clear();
        h1::write_problem(out, problem, request_id, close);
        write_all(client, out, Duration::from_secs(10)).await
    }
}

/// How long a connection keeps its request state machine while waiting for its next
/// request (see `serve_conn`).
const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// A client connection's own state, kept across its busy periods.
struct Conn {
    client: TcpStream,
    fwd: Forwarding,
    /// Request bytes read and not yet served (no buffer while the connection waits).
    input: Vec<u8>,
    waits: fastio::Waits,
    timer: fastio::Timer,
}

/// How a busy period ended.
enum Busy {
    /// The client sent nothing for [`BUSY_WINDOW`]; it may idle until this instant.
    Quiet(Instant),
    /// The connection is done.
    Done,
    /// This side ends the connection while the client may still be sending (requests
    /// pipelined behind the last one answered): close it gracefully.
    Close,
    /// Hand the connection, with `Conn::input`, to the general path.
    Handoff,
}

/// Why an attempt produced no response.
enum Failed {
    /// Nothing reached the upstream.
    NotSent(ProxyError),
    /// The request went out; only a replayable one may be tried again.
    Sent(ProxyError),
    /// The client went away while 1xx heads were relayed.
    Client,
}

/// How a response head is read and rewritten for the client.
struct HeadRead {
    /// The request was HEAD: the response has no body, whatever it says.
    head_request: bool,
    /// Where the request id (echoed to the client) is in the upstream request.
    request_id: std::ops::Range<usize>,
    /// The client's connection closes after this exchange.
    close: bool,
    /// Longest wait for the client to take a relayed 1xx head.
    idle: Duration,
    /// When the attempt's response timeout ends: it runs from the attempt's start, across
    /// getting a connection, sending, and waiting in a pipeline for the responses before.
    deadline: Instant,
}

/// The upstream connection a response is read from.
enum Upstream {
    /// A connection of its own.
    Conn(RawConn),
    /// A turn on a pipelined connection.
    Turn(pipe::Turn),
}

impl Upstream {
    fn stream(&self) -> &TcpStream {
        match self {
            Upstream::Conn(c) => &c.stream,
            Upstream::Turn(t) => t.stream(),
        }
    }

    /// The response was relayed whole and the upstream keeps the connection open; `read`
    /// holds what was read past the response (the next pipelined responses, or stray
    /// bytes that make a connection of its own unusable).
    fn reuse(self, read: &mut Unread, backend: &super::Backend, max_idle: usize) {
        match self {
            Upstream::Conn(c) if read.is_empty() => backend.conns.put_raw(c, max_idle),
            Upstream::Conn(_) => {}
            Upstream::Turn(t) => {
                let next = std::mem::replace(read, Unread::new(bufs::take()));
                t.hand_on(next, &backend.pipes, &backend.conns, max_idle)
            }
        }
    }
}

/// A pipelined request whose connection breaks before any byte of its response is sent
/// again; this many times when the break was not benign ([`pipe::Turn::ended_benignly`]),
/// before it counts as failed. The response timeout bounds it all.
const FRUITLESS_RESENDS: usize = 3;

/// A request write the upstream refused.
fn closed_before_sent(e: std::io::Error) -> ProxyError {
    ProxyError::new(
        FailureKind::Connect,
        "the backend closed the connection before the request was sent",
        Some(Box::new(e)),
    )
}

fn response_timeout() -> Failed {
    Failed::Sent(ProxyError::new(
        FailureKind::ResponseTimeout,
        "the backend did not answer in time",
        None,
    ))
}

/// Sends the request on a pooled (or new) connection and reads the final response head
/// into `bufs.up_resp`; the downstream head is in `bufs.down` on success. 1xx heads are
/// relayed to the client on the way.
async fn send(
    backend: &super::Backend,
    up: &crate::proxy::client::UpstreamSettings,
    bufs: &mut Bufs,
    head: &HeadRead,
    client: &TcpStream,
    timer: &mut fastio::Timer,
) -> Result<(Upstream, h1::ResponseInfo), Failed> {
    let conn = backend.conns.raw(up).await.map_err(Failed::NotSent)?;
    match timed_at(
        head.deadline,
        fastio::write_from(&conn.stream, &bufs.up_req),
    )
    .await
    {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            let e = closed_before_sent(e);
            // A write refused outright sent nothing; but the upstream may have read part
            // of a request on a reused connection, so only a fresh one counts as unsent.
            return Err(if conn.reused {
                Failed::Sent(e)
            } else {
                Failed::NotSent(e)
            });
        }
        None => return Err(response_timeout()),
    }
    bufs.up_resp.clear();
    let resp = read_head(&conn.stream, bufs, head, client, timer).await?;
    Ok((Upstream::Conn(conn), resp))
}

/// [`send`] for a request that may share a pipelined connection ([`pipe`]): the request
/// joins the moving connection to `backend` (at most `depth` unanswered), and its response
/// head is read when the ones before it have been relayed. A request whose connection broke
/// before its response began was not answered and is sent again, on a new connection.
/// The response timeout ([`HeadRead::deadline`]) runs across all of that.
async fn send_pipelined(
    backend: &super::Backend,
    up: &crate::proxy::client::UpstreamSettings,
    depth: usize,
    bufs: &mut Bufs,
    head: &HeadRead,
    client: &TcpStream,
    timer: &mut fastio::Timer,
) -> Result<(Upstream, h1::ResponseInfo), Failed> {
    let deadline = head.deadline;
    let mut fruitless = 0;
    while fruitless < FRUITLESS_RESENDS {
        let joined = backend.pipes.join(&backend.conns, up, depth, &bufs.up_req);
        let turn = match joined.await.map_err(Failed::NotSent)? {
            pipe::Joined::Flusher(f) => match f.flush(deadline).await {
                Ok(turn) => {
                    bufs.up_resp.clear();
                    turn
                }
                Err((_, None)) => return Err(response_timeout()),
                Err((turn, Some(e))) if !turn.reused() => {
                    return Err(Failed::NotSent(closed_before_sent(e)))
                }
                // A pooled connection the backend had closed: nothing was answered.
                Err(_) => continue,
            },
            // No timer of its own while it waits (one per request cost ~1k instructions):
            // every turn before it reads its head by its own deadline, no later than this
            // one's (they joined earlier), and a turn that fails breaks the pipe at once.
            // Only a body before it that keeps flowing delays it longer.
            pipe::Joined::Member(m) => match m.turn(&backend.pipes, deadline).await {
                Ok((turn, read)) => {
                    bufs::give(std::mem::replace(&mut bufs.up_resp, read).into_buf());
                    turn
                }
                Err(benign) => {
                    fruitless += usize::from(!benign);
                    continue;
                }
            },
        };
        match read_head(turn.stream(), bufs, head, client, timer).await {
            Ok(resp) => {
                if resp.upstream_close {
                    turn.last_on_connection();
                }
                return Ok((Upstream::Turn(turn), resp));
            }
            // The connection ended before any of this response: it was not answered.
            Err(Failed::Sent(e))
                if bufs.up_resp.is_empty() && e.kind != FailureKind::ResponseTimeout =>
            {
                fruitless += usize::from(!turn.ended_benignly());
            }
            Err(e) => return Err(e),
        }
    }
    Err(Failed::Sent(ProxyError::new(
        FailureKind::Upstream,
        "the backend closed its connections before answering",
        None,
    )))
}

/// Reads the final response head from `stream` into `bufs.up_resp` (which may hold its
/// first bytes already) by `head.deadline`, waiting on the connection's `timer`, and
/// relays 1xx heads to the client; the downstream head is in `bufs.down` on success.
async fn read_head(
    stream: &TcpStream,
    bufs: &mut Bufs,
    head: &HeadRead,
    client: &TcpStream,
    timer: &mut fastio::Timer,
) -> Result<h1::ResponseInfo, Failed> {
    let Bufs {
        up_req,
        up_resp: resp_buf,
        down,
    } = bufs;
    let request_id = &up_req[head.request_id.clone()];
    loop {
        down.clear();
        if !resp_buf.is_empty() {
            let unread = resp_buf.bytes();
            match h1::prepare_response(unread, head.head_request, request_id, head.close, down) {
                ResponsePrep::Ready(r) if r.informational => {
                    resp_buf.consume(r.head_len);
                    if !write_all(client, down, head.idle).await {
                        return Err(Failed::Client);
                    }
                    continue;
                }
                ResponsePrep::Ready(r) => return Ok(r),
                ResponsePrep::Invalid(what) => {
                    return Err(Failed::Sent(ProxyError::new(
                        FailureKind::Upstream,
                        what,
                        None,
                    )))
                }
                ResponsePrep::Partial => {}
            }
        }
        resp_buf.buf_mut().reserve(READ_CHUNK);
        match timer
            .run(head.deadline, fastio::read_into(stream, resp_buf.buf_mut()))
            .await
        {
            Some(Ok(n)) if n > 0 => {}
            Some(Ok(_)) => {
                return Err(Failed::Sent(ProxyError::new(
                    FailureKind::Upstream,
                    "the backend closed the connection before sending a response",
                    None,
                )))
            }
            Some(Err(e)) => {
                return Err(Failed::Sent(ProxyError::new(
                    FailureKind::Upstream,
                    "the backend failed before sending a response",
                    Some(Box::new(e)),
                )))
            }
            None => return Err(response_timeout()),
        }
    }
}

/// How a relayed response ended.
enum Relayed {
    /// Complete; whatever was read past its end is in `bufs.up_resp`.
    Complete,
    /// Complete; the upstream connection is done.
    Done,
    /// Cut short: the client connection must close.
    Broken,
}

/// Relays the response whose downstream head is in `bufs.down` and whose first bytes
/// (head included) are in `bufs.up_resp`.
async fn relay(
    client: &TcpStream,
    stream: &TcpStream,
    resp: &h1::ResponseInfo,
    bufs: &mut Bufs,
    idle: Duration,
) -> Relayed {
    let body = &bufs.up_resp.bytes()[resp.head_len..];
    let mut chunked = ChunkedEnd::default();
    // How much of what is buffered belongs to the body, and whether the body is complete.
    let (take, mut remaining, mut done) = match resp.framing {
        Framing::Empty => (0, 0, true),
        Framing::Length(n) => {
            let take = (body.len() as u64).min(n);
            (take as usize, n - take, take == n)
        }
        Framing::Chunked => match chunked.feed(body) {
            Ok(Some(end)) => (end, 0, true),
            Ok(None) => (body.len(), 0, false),
            Err(_) => return Relayed::Broken,
        },
        Framing::UntilClose => (body.len(), 0, false),
    };
    // The head and the body's first bytes go out in one call, the body from where it was read.
    let parts = &mut [IoSlice::new(&bufs.down), IoSlice::new(&body[..take])];
    if !write_all_parts(client, parts, idle).await {
        return Relayed::Broken;
    }
    // Keep what follows this response (a pipelined connection's next one).
    bufs.up_resp.consume(resp.head_len + take);
    while !done {
        // Everything read so far was used: this read lands at the buffer's start.
        let unread = &mut bufs.up_resp;
        unread.buf_mut().reserve(READ_CHUNK);
        let n = match timed(idle, fastio::read_into(stream, unread.buf_mut())).await {
            Some(Ok(n)) => n,
            _ => return Relayed::Broken,
        };
        if n == 0 {
            return if resp.framing == Framing::UntilClose {
                Relayed::Done
            } else {
                Relayed::Broken
            };
        }
        let take = match resp.framing {
            Framing::Length(_) => {
                let take = (n as u64).min(remaining);
                remaining -= take;
                done = remaining == 0;
                take as usize
            }
            Framing::Chunked => match chunked.feed(unread.bytes()) {
                Ok(Some(end)) => {
                    done = true;
                    end
                }
                Ok(None) => n,
                Err(_) => return Relayed::Broken,
            },
            _ => n,
        };
        if !write_all(client, &unread.bytes()[..take], idle).await {
            return Relayed::Broken;
        }
        unread.consume(take);
    }
    Relayed::Complete
}

/// Writes all of `buf`, waiting at most `idle` each time the client's socket is full.
async fn write_all(client: &TcpStream, buf: &[u8], idle: Duration) -> bool {
    write_all_parts(client, &mut [IoSlice::new(buf)], idle).await
}

/// [`write_all`] for bytes in several places.
async fn write_all_parts(client: &TcpStream, parts: &mut [IoSlice<'_>], idle: Duration) -> bool {
    matches!(
        timed(idle, fastio::write_parts_from(client, parts)).await,
        Some(Ok(()))
    )
}

/// The buffers one exchange works in.
struct Bufs {
    /// The upstream request (head and body).
    up_req: Vec<u8>,
    /// Bytes read from the upstream.
    up_resp: Unread,
    /// Heads (and local answers) for the client; bodies go out from `up_resp`.
    down: Vec<u8>,
}

impl Bufs {
    #[inline]
    fn take() -> Self {
        Bufs {
            up_req: bufs::take(),
            up_resp: Unread::new(bufs::take()),
            down: bufs::take(),
        }
    }

    #[inline]
    fn give_back(&mut self) {
        bufs::give(std::mem::take(&mut self.up_req));
        bufs::give(std::mem::take(&mut self.up_resp).into_buf());
        bufs::give(std::mem::take(&mut self.down));
    }
}
