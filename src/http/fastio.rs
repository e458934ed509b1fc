//! Plumbing shared by the hand-written HTTP/1.1 fast paths (the balancer's proxy path and
//! the app's record reads): socket reads and writes through shared references, per-thread
//! buffer reuse, timeouts that skip the timer when a future is ready at once, and the
//! timers a connection keeps across its requests.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rustix::buffer::spare_capacity;
use rustix::net;
use tokio::io::Interest;
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

/// Reads what `stream` has into `buf`'s spare capacity (the caller reserves it), waiting
/// for it if need be; 0 at its end. Through a shared reference, since a pipelined upstream
/// connection is written by one task while another reads it.
///
/// A read that leaves room in `buf` emptied the socket, so the stream's readiness is
/// cleared with it, as tokio's own `AsyncRead` does: else the next read finds the stream
/// "ready", asks the kernel, and gets `EAGAIN` first (one wasted `recv` per proxied
/// request, `perf stat`: 1.0 per request without pipelining, 0.7 with). The clear uses the
/// readiness observed before the read (`try_io`), so an event that arrives meanwhile is
/// kept. One task at a time reads a connection, so it waits in the socket's one
/// read-waker slot, as [`Waits::request`] does.
///
/// The `recv` is rustix's raw system call: libc's is a thread-cancellation point, and
/// switching cancellation on and off around every call was ~1 % of the balancer's CPU
/// (`perf record`), for a feature no Rust thread uses.
pub async fn read_into(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    use io::ErrorKind::WouldBlock;
    loop {
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        let room = buf.capacity() - buf.len();
        if room == 0 {
            return Err(io::Error::other("read into a full buffer"));
        }
        let mut drained = None;
        let read = stream.try_io(Interest::READABLE, || {
            let (n, _) = net::recv(stream, spare_capacity(buf), net::RecvFlags::empty())?;
            if n > 0 && n < room {
                drained = Some(n);
                return Err(WouldBlock.into());
            }
            Ok(n)
        });
        match (read, drained) {
            (_, Some(n)) => return Ok(n),
            (Err(e), None) if e.kind() == WouldBlock => {}
            (read, None) => return read,
        }
    }
}

/// Writes all of `buf` to `stream`, waiting while its send buffer is full; through a
/// shared reference and a raw `send`, as [`read_into`] reads. One task at a time writes a
/// connection.
pub async fn write_from(stream: &TcpStream, buf: &[u8]) -> io::Result<()> {
    write_parts_from(stream, &mut [IoSlice::new(buf)]).await
}

/// [`write_from`] for bytes in several places: one `sendmsg` takes them all (a single part
/// goes with `send`), so a relayed response's body goes out behind its rewritten head
/// without being copied after it first (that copy, ~1 KiB per proxied request, cost
/// ~0.1–0.2 µs of the balancer's ~8.5 per request, `benches/proxy/split.sh`).
pub async fn write_parts_from(stream: &TcpStream, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut parts = parts;
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let flags = net::SendFlags::NOSIGNAL;
            Ok(match &*parts {
                [one] => net::send(stream, one, flags)?,
                many => net::sendmsg(stream, many, &mut Default::default(), flags)?,
            })
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Longest a connection closed by [`close_gracefully`] waits for its peer to close.
pub const LINGER: Duration = Duration::from_secs(2);

/// Ends a connection that this side chose to close while the peer may still be sending
/// (requests pipelined behind the last one answered), the way RFC 9112 §9.6 asks: the
/// write side first, so the peer reads everything sent and then the end; then whatever
/// still arrives is read and dropped until the peer closes too, for at most [`LINGER`].
/// Closed at once with bytes unread, the kernel would reset the connection instead, and
/// a reset throws away the part of the last response it had not sent yet: a pipelining
/// peer (the balancer with `pipeline` on) would see that response cut short.
pub async fn close_gracefully(stream: TcpStream) {
    if net::shutdown(&stream, net::Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = bufs::take();
    while let Some(Ok(n)) = timed_at(deadline, read_into(&stream, &mut sink)).await {
        if n == 0 {
            break;
        }
        sink.clear();
    }
    bufs::give(sink);
}

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

/// How late a reused timer may fire. Requests on a busy connection come well under this
/// apart, so most of them find the timer already within reach of their deadline and leave
/// it alone: moving it costs a clock conversion and an atomic update, two per proxied
/// request (~1 % of the balancer's CPU, `perf record`), for timeouts counted in seconds.
const SLACK: Duration = Duration::from_millis(10);

/// Sets `sleep` to fire no earlier than `deadline` and at most [`SLACK`] after it.
fn arm(sleep: Pin<&mut Sleep>, deadline: Instant) {
    let armed = sleep.deadline();
    if armed < deadline || armed > deadline + SLACK {
        sleep.reset(deadline + SLACK);
    }
}

/// A connection's own timer for waits that each have a deadline (the balancer's waits for
/// upstream response heads): made on first use, then moved to each next deadline (within
/// [`SLACK`]). Deadlines only move later, and moving a registered timer later is a store,
/// where a timeout made per wait costs a timer-wheel insert and remove (~400 instructions
/// per proxied request, callgrind).
#[derive(Default)]
pub struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    /// [`timed_at`] on this timer.
    pub async fn run<F: Future>(&mut self, deadline: Instant, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        if let Some(out) = (&mut fut).now_or_never() {
            return Some(out);
        }
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        arm(sleep.as_mut(), deadline);
        tokio::select! {
            biased;
            out = fut => Some(out),
            _ = sleep.as_mut() => None,
        }
    }
}

/// How a wait for a connection's next request ([`Waits::request`]) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The client sent something, or closed.
    Request,
    /// The deadline passed.
    Expired,
    /// The socket failed or shutdown began.
    Closed,
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
    /// closes: [`Waited::Request`] too, and the read finds the end). [`Waited::Expired`]
    /// when `deadline` passes (within [`SLACK`]); [`Waited::Closed`] when the socket fails
    /// or shutdown begins. The connection's task is the socket's only reader, so it waits
    /// in the socket's one read-waker slot (`poll_read_ready`) rather than joining its
    /// waiter list (`readable()`), which costs a lock and list updates per wait.
    pub async fn request(&mut self, client: &TcpStream, deadline: Instant) -> Waited {
        if self.stopped {
            return Waited::Closed;
        }
        arm(self.idle.as_mut(), deadline);
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| client.poll_read_ready(cx)) => match r {
                Ok(()) => Waited::Request,
                Err(_) => Waited::Closed,
            },
            _ = self.idle.as_mut() => Waited::Expired,
            _ = self.stop.as_mut() => {
                self.stopped = true;
                Waited::Closed
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Both ends of a fresh loopback connection: the one that connected, the one accepted.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    #[tokio::test]
    async fn a_graceful_close_delivers_everything_sent_despite_unread_requests() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = connected().await;
        // Requests the server will never read, then as much answer as the kernel takes
        // without the client reading: some of it is still in the server's send queue.
        client.write_all(&[b'r'; 10_000]).await.unwrap();
        let chunk = [b'a'; 65_536];
        let mut sent = 0;
        loop {
            match server.try_write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let closing = tokio::spawn(close_gracefully(server));
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        assert!(read.is_ok(), "the connection was reset: {read:?}");
        assert_eq!(got.len(), sent, "every byte sent arrived, then the end");
        drop(client);
        tokio::time::timeout(Duration::from_secs(1), closing)
            .await
            .expect("the close ends when the peer closes")
            .unwrap();
    }

    #[tokio::test]
    async fn a_read_that_drains_the_socket_clears_its_readiness() {
        use std::task::{Context, Waker};
        use tokio::io::AsyncWriteExt;
        let (mut writer, reader) = connected().await;
        let mut cx = Context::from_waker(Waker::noop());

        writer.write_all(b"0123456789").await.unwrap();
        let mut buf = Vec::with_capacity(64);
        assert_eq!(read_into(&reader, &mut buf).await.unwrap(), 10);
        assert_eq!(buf, b"0123456789");
        assert!(
            reader.poll_read_ready(&mut cx).is_pending(),
            "drained: the next read waits for the reactor instead of asking the kernel"
        );

        // A read that fills its buffer may have left bytes behind: the readiness stays.
        writer.write_all(&[b'x'; 100]).await.unwrap();
        let mut small = Vec::with_capacity(16);
        let n = read_into(&reader, &mut small).await.unwrap();
        assert_eq!((n, small.capacity()), (16, 16));
        assert!(reader.poll_read_ready(&mut cx).is_ready());
        let mut rest = Vec::with_capacity(128);
        assert_eq!(read_into(&reader, &mut rest).await.unwrap(), 84);
        assert!(reader.poll_read_ready(&mut cx).is_pending());

        // Bytes that come after the clear are still seen.
        writer.write_all(b"later").await.unwrap();
        let mut later = Vec::with_capacity(64);
        let read = tokio::time::timeout(Duration::from_secs(5), read_into(&reader, &mut later));
        assert_eq!(read.await.expect("new bytes wake the reader").unwrap(), 5);
        assert_eq!(later, b"later");
        // The end of the stream reads as 0.
        drop(writer);
        let mut end = Vec::with_capacity(8);
        assert_eq!(read_into(&reader, &mut end).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn writes_wait_out_a_full_send_buffer() {
        use tokio::io::AsyncWriteExt;
        let (writer, mut reader) = connected().await;
        // Far more than the socket buffers hold: the write must wait for the reader.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        });
        // One part, then several (one empty), each far larger than the socket buffers,
        // so partial writes end inside a part and at a part's end.
        let (a, rest) = data.split_at(3 << 20);
        let (b, c) = rest.split_at((3 << 20) + 1);
        write_from(&writer, a).await.unwrap();
        let parts = &mut [IoSlice::new(b), IoSlice::new(&[]), IoSlice::new(c)];
        write_parts_from(&writer, parts).await.unwrap();
        let mut writer = writer;
        writer.shutdown().await.unwrap();
        assert!(reading.await.unwrap() == data, "every byte, in order");
    }

    #[tokio::test]
    async fn arming_a_timer_never_makes_it_early_nor_more_than_slack_late() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let mut sleep = Box::pin(tokio::time::sleep_until(start + s(10)));
        // Already within the slack of the deadline: left alone.
        arm(sleep.as_mut(), start + s(10) - SLACK / 2);
        assert_eq!(sleep.deadline(), start + s(10));
        // Behind the deadline: moved to it plus the slack.
        arm(sleep.as_mut(), start + s(20));
        assert_eq!(sleep.deadline(), start + s(20) + SLACK);
        // Far past the deadline (a shorter timeout after a reload): brought back.
        arm(sleep.as_mut(), start + s(5));
        assert_eq!(sleep.deadline(), start + s(5) + SLACK);
    }

    #[tokio::test]
    async fn a_reused_timer_keeps_each_deadline() {
        let ms = Duration::from_millis;
        let mut timer = Timer::default();
        let start = Instant::now();
        let never = std::future::pending::<()>;
        // A wait that runs out, then a later deadline on the same timer.
        assert_eq!(timer.run(start + ms(50), never()).await, None);
        assert!(start.elapsed() >= ms(50));
        assert_eq!(timer.run(start + ms(150), never()).await, None);
        assert!(start.elapsed() >= ms(150));
        // A wait that finishes first leaves the timer armed at its deadline; the next,
        // later deadline is not cut short by the earlier one.
        let quick = tokio::time::sleep(ms(10));
        assert_eq!(timer.run(start + ms(300), quick).await, Some(()));
        assert_eq!(timer.run(start + ms(450), never()).await, None);
        assert!(start.elapsed() >= ms(450));
        // Ready at once: answered even with the deadline passed.
        assert_eq!(timer.run(start, async { 7 }).await, Some(7));
    }
}
