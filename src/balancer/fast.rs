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

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pool::Tried;
use super::{health, no_backend, problem_for, Balancer, StatusLabel, MAX_ATTEMPTS};
use crate::config::HttpLimits;
use crate::http::fastio::{self, bufs, timed, timed_at, HeadLimits, READ_CHUNK};
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

    async fn serve_conn(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
        head: HeadLimits,
    ) -> Option<Handoff> {
        let (head_timeout, max_head) = (head.timeout, head.max_bytes);
        let fwd = Forwarding::new(peer.ip(), "http");
        // Buffers are taken per request and given back while the connection idles, so an
        // idle connection holds none.
        let mut input: Vec<u8> = Vec::new();
        let mut waits = fastio::Waits::new(&shutdown);
        loop {
            if *shutdown.borrow() {
                return None;
            }
            // Wait for the next request without holding a buffer.
            if input.is_empty() {
                let deadline = Instant::now() + head_timeout;
                if !waits.request(&client, deadline).await {
                    return None;
                }
                input = bufs::take();
            }
            let mut bufs = Bufs::take();
            let deadline = Instant::now() + head_timeout;
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
                    match h1::prepare_request(&input, &fwd, key, &mut bufs.up_req) {
                        RequestPrep::Ready(i) => break (i, pool),
                        RequestPrep::Fallback => {
                            bufs.give_back();
                            return Some(Handoff {
                                stream: client,
                                read: input,
                            });
                        }
                        RequestPrep::Partial if input.len() >= max_head => {
                            bufs.give_back();
                            return Some(Handoff {
                                stream: client,
                                read: input,
                            });
                        }
                        RequestPrep::Partial => {}
                    }
                }
                input.reserve(READ_CHUNK);
                let read = tokio::select! {
                    biased;
                    r = timed_at(deadline, client.read_buf(&mut input)) => r,
                    _ = waits.stopping() => return None,
                };
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    // Closed, broken, or too slow with its head (slowloris): drop it.
                    _ => return None,
                }
            };
            let keep = self
                .exchange(&pool, &mut client, &input, &info, &fwd, &mut bufs)
                .await;
            bufs.give_back();
            if !keep || info.close {
                return None;
            }
            input.drain(..info.head_len + info.body_len);
            if input.is_empty() {
                bufs::give(std::mem::take(&mut input));
            }
        }
    }

    /// Forwards one request and relays its answer; false when the client connection
    /// cannot carry another request.
    async fn exchange(
        &self,
        pool: &Arc<super::Pool>,
        client: &mut TcpStream,
        input: &[u8],
        info: &RequestInfo,
        fwd: &Forwarding,
        bufs: &mut Bufs,
    ) -> bool {
        let started = std::time::Instant::now();
        let up = &pool.upstream;
        pool.budget.on_request();
        let attempts = (pool.retry.attempts as usize).clamp(1, MAX_ATTEMPTS);
        // The upstream request stays in its buffer, so a retry resends the same bytes; the
        // rules of which requests may be resent are the general path's.
        let replayable = attempts > 1 && headers::idempotent(&info.method) && info.body_len == 0;
        let head_request = info.method == http::Method::HEAD;
        let request_id = info.request_id.clone();
        let mut tried = Tried::default();
        let mut last: Option<(ProxyError, SocketAddr)> = None;
        let mut status = 0u16;
        let mut keep = true;
        for attempt in 0..attempts {
            let now = health::now_ms();
            if attempt > 0 && !pool.budget.try_retry(now / 1000) {
                self.budget_exhausted.inc();
                break;
            }
            let Some(i) = pool.pick_untried(info.key, now, &mut tried) else {
                break;
            };
            let backend = &pool.backends[i];
            backend.in_flight.fetch_add(1, Ordering::Relaxed);
            backend.metrics.requests.inc();
            let sent_at = std::time::Instant::now();
            let id = &bufs.up_req[request_id.clone()];
            let outcome = send(
                backend,
                up,
                &bufs.up_req,
                &mut bufs.up_resp,
                &mut bufs.down,
                head_request,
                id,
                info.close,
                client,
            )
            .await;
            match outcome {
                Ok((conn, resp)) => {
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
                    let relayed = relay(client, conn, &resp, bufs, up.idle_timeout).await;
                    backend.in_flight.fetch_sub(1, Ordering::Relaxed);
                    keep = match relayed {
                        Relayed::Reusable(conn) => {
                            backend.conns.put_raw(conn, up.pool_max_idle);
                            resp.framing != Framing::UntilClose
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
        client: &mut TcpStream,
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

/// Why an attempt produced no response.
enum Failed {
    /// Nothing reached the upstream.
    NotSent(ProxyError),
    /// The request went out; only a replayable one may be tried again.
    Sent(ProxyError),
    /// The client went away while 1xx heads were relayed.
    Client,
}

/// Sends the request on a pooled (or new) connection and reads the final response head
/// into `resp_buf`; the downstream head is in `down` on success. 1xx heads are relayed to
/// the client on the way.
#[allow(clippy::too_many_arguments)]
async fn send(
    backend: &super::Backend,
    up: &crate::proxy::client::UpstreamSettings,
    request: &[u8],
    resp_buf: &mut Vec<u8>,
    down: &mut Vec<u8>,
    head_request: bool,
    request_id: &[u8],
    close: bool,
    client: &mut TcpStream,
) -> Result<(RawConn, h1::ResponseInfo), Failed> {
    let mut conn = backend.conns.raw(up).await.map_err(Failed::NotSent)?;
    let deadline = Instant::now() + up.response_timeout;
    let timeout = || {
        Failed::Sent(ProxyError::new(
            FailureKind::ResponseTimeout,
            "the backend did not answer in time",
            None,
        ))
    };
    match timed_at(deadline, conn.stream.write_all(request)).await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            let e = ProxyError::new(
                FailureKind::Connect,
                "the backend closed the connection before the request was sent",
                Some(Box::new(e)),
            );
            // A write refused outright sent nothing; but the upstream may have read part
            // of a request on a reused connection, so only a fresh one counts as unsent.
            return Err(if conn.reused {
                Failed::Sent(e)
            } else {
                Failed::NotSent(e)
            });
        }
        None => return Err(timeout()),
    }
    resp_buf.clear();
    loop {
        down.clear();
        if !resp_buf.is_empty() {
            match h1::prepare_response(resp_buf, head_request, request_id, close, down) {
                ResponsePrep::Ready(r) if r.informational => {
                    resp_buf.drain(..r.head_len);
                    if !write_all(client, down, up.idle_timeout).await {
                        return Err(Failed::Client);
                    }
                    continue;
                }
                ResponsePrep::Ready(r) => return Ok((conn, r)),
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
        resp_buf.reserve(READ_CHUNK);
        match timed_at(deadline, conn.stream.read_buf(resp_buf)).await {
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
            None => return Err(timeout()),
        }
    }
}

/// How a relayed response ended.
enum Relayed {
    /// Complete, and the upstream connection can carry another request.
    Reusable(RawConn),
    /// Complete; the upstream connection is done.
    Done,
    /// Cut short: the client connection must close.
    Broken,
}

/// Relays the response whose downstream head is in `bufs.down` and whose first bytes
/// (head included) are in `bufs.up_resp`.
async fn relay(
    client: &mut TcpStream,
    mut conn: RawConn,
    resp: &h1::ResponseInfo,
    bufs: &mut Bufs,
    idle: Duration,
) -> Relayed {
    let body = &bufs.up_resp[resp.head_len..];
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
    let mut stray = body.len() > take;
    bufs.down.extend_from_slice(&body[..take]);
    if !write_all(client, &bufs.down, idle).await {
        return Relayed::Broken;
    }
    while !done {
        let buf = &mut bufs.up_resp;
        buf.clear();
        buf.reserve(READ_CHUNK);
        let n = match timed(idle, conn.stream.read_buf(buf)).await {
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
            Framing::Chunked => match chunked.feed(&buf[..n]) {
                Ok(Some(end)) => {
                    done = true;
                    end
                }
                Ok(None) => n,
                Err(_) => return Relayed::Broken,
            },
            _ => n,
        };
        stray |= n > take;
        if !write_all(client, &buf[..take], idle).await {
            return Relayed::Broken;
        }
    }
    if stray || resp.upstream_close {
        Relayed::Done
    } else {
        Relayed::Reusable(conn)
    }
}

/// Writes all of `buf`, waiting at most `idle` each time the client's socket is full.
async fn write_all(client: &mut TcpStream, buf: &[u8], idle: Duration) -> bool {
    matches!(timed(idle, client.write_all(buf)).await, Some(Ok(())))
}

/// The buffers one exchange works in.
struct Bufs {
    /// The upstream request (head and body).
    up_req: Vec<u8>,
    /// Bytes read from the upstream.
    up_resp: Vec<u8>,
    /// Bytes for the client.
    down: Vec<u8>,
}

impl Bufs {
    fn take() -> Self {
        Bufs {
            up_req: bufs::take(),
            up_resp: bufs::take(),
            down: bufs::take(),
        }
    }

    fn give_back(&mut self) {
        bufs::give(std::mem::take(&mut self.up_req));
        bufs::give(std::mem::take(&mut self.up_resp));
        bufs::give(std::mem::take(&mut self.down));
    }
}
