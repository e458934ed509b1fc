//! The app's side of the change feed: a background task that keeps [`RecordCache`]
//! coherent with storage.
//!
//! - **Embedded storage**: the engine in this process is the feed. The task wakes on the
//!   engine's durable-LSN watch, reads the new log entries and drops their keys.
//! - **Remote storage**: the task follows a storage node (`app.cache.follow`, default the
//!   primary) over a `Purpose::Feed` link (see [`crate::storage::feed`]), reconnecting with
//!   backoff. Each (re)subscription asks to resume after the last applied LSN; when the
//!   source cannot resume exactly, the cache is emptied. While the link is down or silent
//!   the cache is trusted for at most `max_staleness` after the feed was last caught up,
//!   then bypassed until it has caught up again.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::cache::RecordCache;
use crate::config::{AppCacheConfig, RemoteStorage};
use crate::http::server::{wait_for, Shutdown};
use crate::storage::conn::{self, BoxStream, ConnError, FrameReader};
use crate::storage::feed::{changes, read_from};
use crate::storage::protocol::{self, Message, Purpose};
use crate::storage::Engine;

/// First reconnect wait; doubles per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest reconnect wait.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Time a started frame may take, and a connection attempt with its handshakes.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the feed could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The TLS settings (shared with `app.storage.tls`) are unusable.
    #[error("app.cache feed TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The feed address is not `host:port`.
    #[error("app.cache.follow: {0:?} is not host:port")]
    Address(String),
    /// The cache's bounds are unusable.
    #[error("app.cache: {0}")]
    Cache(#[from] crate::cache::CacheConfigError),
}

/// Builds the record cache of an app with embedded storage and starts its feed.
pub fn start_embedded(
    config: &AppCacheConfig,
    engine: Arc<Engine>,
    shutdown: Shutdown,
) -> Result<Arc<RecordCache>, FeedError> {
    let cache = RecordCache::new(config, true, "the local engine".into())?;
    start_local(engine, cache.clone(), shutdown);
    Ok(cache)
}

/// Builds the record cache of an app with remote storage and starts following the feed of
/// `app.cache.follow` (default: the storage primary).
pub fn start_following(
    config: &AppCacheConfig,
    link: &RemoteStorage,
    secret: &[u8],
    shutdown: Shutdown,
) -> Result<Arc<RecordCache>, FeedError> {
    let addr = config.follow.as_deref().unwrap_or(&link.primary);
    let cache = RecordCache::new(config, false, addr.to_owned())?;
    start_remote(addr, link, secret, cache.clone(), shutdown)?;
    Ok(cache)
}

/// Starts the task that feeds `cache` from the engine in this process.
pub fn start_local(engine: Arc<Engine>, cache: Arc<RecordCache>, shutdown: Shutdown) {
    tokio::spawn(follow_local(engine, cache, shutdown));
}

async fn follow_local(engine: Arc<Engine>, cache: Arc<RecordCache>, mut shutdown: Shutdown) {
    let mut durable_rx = engine.subscribe_durable();
    let mut epoch = engine.epoch();
    let start = *durable_rx.borrow_and_update();
    cache.feed_started(epoch, start, false);
    let mut next = start + 1;
    loop {
        if engine.epoch() != epoch {
            epoch = engine.epoch();
            let at = *durable_rx.borrow_and_update();
            cache.feed_started(epoch, at, false);
            next = at + 1;
        }
        let durable = *durable_rx.borrow_and_update();
        while durable >= next {
            match read_from(&engine, next) {
                Ok(Some(entries)) if !entries.is_empty() => {
                    for (lsn, keys) in changes(&entries) {
                        cache.feed_apply(lsn, &keys);
                        next = lsn + 1;
                    }
                }
                other => {
                    // The log moved on without us (truncated, replaced by a snapshot) or
                    // cannot be read: start over from here.
                    if let Err(e) = other {
                        tracing::warn!(error = %e, "cache feed could not read the log; emptying the cache");
                    }
                    cache.feed_started(epoch, durable, false);
                    next = durable + 1;
                }
            }
        }
        cache.feed_source_at(durable, Duration::ZERO);
        tokio::select! {
            r = durable_rx.changed() => if r.is_err() { break },
            _ = wait_for(&mut shutdown) => break,
        }
    }
}

/// How the app reaches the node whose feed it follows.
struct Remote {
    addr: String,
    secret: Arc<[u8]>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
}

/// Starts the task that feeds `cache` from the storage node at `addr`, using the TLS
/// settings and timeouts of the app's storage link.
pub fn start_remote(
    addr: &str,
    link: &RemoteStorage,
    secret: &[u8],
    cache: Arc<RecordCache>,
    shutdown: Shutdown,
) -> Result<(), FeedError> {
    let host = crate::storage::client::split_host(addr)
        .ok_or_else(|| FeedError::Address(addr.to_owned()))?;
    let tls = match &link.tls {
        Some(t) => {
            let cfg = crate::tls::client_config(&t.ca, t.cert.as_deref(), t.key.as_deref())?;
            let name = crate::tls::server_name(t.server_name.as_deref().unwrap_or(host))?;
            Some((TlsConnector::from(cfg), name))
        }
        None => None,
    };
    let remote = Remote {
        addr: addr.to_owned(),
        secret: Arc::from(secret),
        tls,
        connect_timeout: link.connect_timeout.get(),
    };
    tokio::spawn(follow_remote(remote, cache, shutdown));
    Ok(())
}

async fn follow_remote(remote: Remote, cache: Arc<RecordCache>, mut shutdown: Shutdown) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let outcome = tokio::select! {
            r = follow_once(&remote, &cache, &mut backoff) => r,
            _ = wait_for(&mut shutdown) => return,
        };
        let why = match outcome {
            Ok(()) => "the source closed the feed".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::debug!(source = %remote.addr, reason = %why, "cache feed down; reconnecting");
        cache.feed_down(why);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_for(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One feed session: connect, subscribe, apply changes until the link breaks.
async fn follow_once(
    remote: &Remote,
    cache: &RecordCache,
    backoff: &mut Duration,
) -> Result<(), ConnError> {
    let setup = async {
        let tcp = TcpStream::connect(&remote.addr).await?;
        let _ = tcp.set_nodelay(true);
        let stream: BoxStream = match &remote.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| ConnError::Tls(e.to_string()))?,
            ),
            None => Box::new(tcp),
        };
        let mut fr = FrameReader::new(stream, protocol::MAX_FRAME_CEILING, FRAME_TIMEOUT);
        conn::client_handshake(&mut fr, &remote.secret, Purpose::Feed).await?;
        Ok::<_, ConnError>(fr)
    };
    let mut fr = match tokio::time::timeout(remote.connect_timeout.max(FRAME_TIMEOUT), setup).await
    {
        Ok(r) => r?,
        Err(_) => return Err(ConnError::Timeout("connecting to the feed source")),
    };
    // Heartbeats often enough that a silent link is noticed well within max_staleness.
    let heartbeat =
        (cache.max_staleness() / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let silence = heartbeat * 3 + Duration::from_millis(500);
    let (after_lsn, epoch) = cache.feed_position();
    let subscribe = Message::FeedSubscribe {
        after_lsn,
        epoch,
        heartbeat_ms: u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX),
    };
    match tokio::time::timeout(FRAME_TIMEOUT, conn::write_message(fr.get_mut(), &subscribe)).await {
        Ok(r) => r?,
        Err(_) => return Err(ConnError::Timeout("subscribing to the feed")),
    }
    match read(&mut fr, silence).await? {
        Message::FeedStart {
            epoch,
            after_lsn,
            resumed,
        } => {
            if !resumed && cache.feed_position().1 != 0 {
                tracing::info!(source = %remote.addr, after_lsn, "cache feed could not resume exactly; cache emptied");
            }
            cache.feed_started(epoch, after_lsn, resumed);
            // Caught up only once the backlog or the first heartbeat says so (with the
            // source's own lag behind the primary).
        }
        Message::Refused { reason } => return Err(ConnError::Refused(reason)),
        _ => {
            return Err(protocol::ProtocolError::Unexpected("expected FeedStart").into());
        }
    }
    *backoff = MIN_BACKOFF;
    loop {
        match read(&mut fr, silence).await? {
            Message::FeedChanges {
                source_lsn,
                source_lag_ms,
                changes,
            } => {
                let (mut expect, _) = cache.feed_position();
                for (lsn, keys) in &changes {
                    if *lsn != expect + 1 {
                        return Err(protocol::ProtocolError::Unexpected(
                            "feed entries out of order",
                        )
                        .into());
                    }
                    cache.feed_apply(*lsn, keys);
                    expect = *lsn;
                }
                cache.feed_source_at(source_lsn, Duration::from_millis(source_lag_ms));
            }
            Message::Refused { reason } => return Err(ConnError::Refused(reason)),
            _ => {
                return Err(protocol::ProtocolError::Unexpected(
                    "a message that is not part of a feed",
                )
                .into())
            }
        }
    }
}

/// The next message, or an error if none comes within `silence` (heartbeats stopped).
async fn read(fr: &mut FrameReader<BoxStream>, silence: Duration) -> Result<Message, ConnError> {
    match tokio::time::timeout(silence, fr.read()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(ConnError::Refused("the source closed the feed".into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnError::Timeout("the feed went silent")),
    }
}
