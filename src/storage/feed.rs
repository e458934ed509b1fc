//! The change feed: the keys each committed batch changed, with its LSN, streamed to apps
//! so they can drop those keys from their caches (stage 5).
//!
//! ```text
//! app                                        storage (primary or replica)
//!   ── Hello/Auth (Purpose::Feed) ─────────▶
//!   ◀───────────────────────────── Welcome
//!   ── FeedSubscribe{after, epoch} ───────▶   plan(): resume exactly, or start at the end
//!   ◀── FeedStart{epoch, after, resumed}
//!   ◀── FeedChanges{source_lsn, source_lag, [(lsn, keys)]} ...   woken by new durable entries
//!   ◀── FeedChanges{source_lsn, source_lag, []}                  when idle (heartbeat)
//! ```
//!
//! Keys only: values never cross this link, so a feed costs the source a log read and a
//! few bytes per changed key. The server never waits on the app: it reads the log itself
//! (no queue fed by writes) and one that stops reading for `frame_timeout` is cut. Any
//! break — a closed link, an epoch change, a snapshot install, the log truncated past the
//! app — ends the connection; the app resubscribes and [`plan`] tells it whether it must
//! empty its cache. [`plan`] and [`changes`] are pure.

use std::time::Duration;

use super::conn::{self, BoxStream, ConnError, FrameReader};
use super::engine::LogEntry;
use super::protocol::{Message, ProtocolError};
use super::Engine;
use crate::http::server::{wait_for, Shutdown};

/// Most log entries one `FeedChanges` frame carries.
const BATCH_ENTRIES: usize = 1024;
/// Largest frame a feed subscriber may send (it sends one small message).
const MAX_SUBSCRIBER_FRAME: usize = 64 << 10;
/// Bounds on the heartbeat interval a subscriber may ask for.
const MIN_HEARTBEAT: Duration = Duration::from_millis(20);
const MAX_HEARTBEAT: Duration = Duration::from_secs(1);

/// Where a feed starts, decided from the subscriber's position and the source's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    /// Changes after this LSN follow.
    pub after_lsn: u64,
    /// True when they follow exactly from where the subscriber asked.
    pub resumed: bool,
}

/// Decides where a subscriber at `(after_lsn, epoch)` starts on a source at `durable` in
/// `source_epoch` whose log holds `first_log_lsn..=durable`. It resumes exactly only when
/// the epochs agree and every entry after `after_lsn` is still in the log; otherwise it
/// starts at the source's end and the subscriber must forget what it cached before that.
pub fn plan(
    after_lsn: u64,
    epoch: u64,
    source_epoch: u64,
    durable: u64,
    first_log_lsn: u64,
) -> Start {
    let resumed = epoch != 0
        && epoch == source_epoch
        && after_lsn <= durable
        && after_lsn.saturating_add(1) >= first_log_lsn;
    Start {
        after_lsn: if resumed { after_lsn } else { durable },
        resumed,
    }
}

/// The feed's view of log entries: each entry's LSN and the keys it changed.
pub fn changes(entries: &[LogEntry]) -> Vec<(u64, Vec<String>)> {
    entries
        .iter()
        .map(|e| (e.lsn, e.writes.iter().map(|w| w.key.clone()).collect()))
        .collect()
}

/// The log entries after `next - 1` that a feed may send now (up to the durable LSN), or
/// `None` when the log no longer holds `next` (truncated, or replaced by a snapshot): the
/// feed cannot continue exactly.
pub fn read_from(engine: &Engine, next: u64) -> Result<Option<Vec<LogEntry>>, ConnError> {
    let entries = engine
        .read_log(next, BATCH_ENTRIES)
        .map_err(|e| ConnError::Refused(format!("reading the log: {e}")))?;
    if entries.iter().zip(next..).any(|(e, want)| e.lsn != want) {
        return Ok(None);
    }
    if entries.is_empty() && engine.status().durable_lsn >= next {
        return Ok(None);
    }
    Ok(Some(entries))
}

/// Serves one authenticated `Purpose::Feed` connection until the subscriber leaves, the
/// feed cannot continue exactly, or `shutdown`.
///
/// `source_lag` says how far this node is behind the primary (a replica's replication lag;
/// zero on a primary); it is sent with every batch and heartbeat.
pub async fn serve(
    engine: std::sync::Arc<Engine>,
    source_lag: impl Fn() -> Duration,
    fr: FrameReader<BoxStream>,
    frame_timeout: Duration,
    mut shutdown: Shutdown,
) -> Result<(), ConnError> {
    let (stream, buf) = fr.into_parts();
    let (rd, mut wr) = tokio::io::split(stream);
    let mut fr = FrameReader::with_buf(rd, buf, MAX_SUBSCRIBER_FRAME, frame_timeout);
    let first = tokio::select! {
        m = tokio::time::timeout(frame_timeout, fr.read()) => match m {
            Ok(m) => m?,
            Err(_) => return Err(ConnError::Timeout("the feed subscription")),
        },
        _ = wait_for(&mut shutdown) => return Ok(()),
    };
    let Some(Message::FeedSubscribe {
        after_lsn,
        epoch,
        heartbeat_ms,
    }) = first
    else {
        return Err(ProtocolError::Unexpected("expected FeedSubscribe").into());
    };
    if engine.resyncing() {
        conn::refuse(
            &mut wr,
            "installing a snapshot; no change feed until it is done",
        )
        .await;
        return Ok(());
    }
    let heartbeat =
        Duration::from_millis(u64::from(heartbeat_ms)).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
    let mut durable_rx = engine.subscribe_durable();
    let status = engine.status();
    let source_epoch = status.epoch;
    let start = plan(
        after_lsn,
        epoch,
        source_epoch,
        *durable_rx.borrow_and_update(),
        status.first_log_lsn,
    );
    write(
        &mut wr,
        &Message::FeedStart {
            epoch: source_epoch,
            after_lsn: start.after_lsn,
            resumed: start.resumed,
        },
        frame_timeout,
    )
    .await?;
    let mut next = start.after_lsn + 1;
    loop {
        if engine.epoch() != source_epoch || engine.resyncing() {
            // The app resubscribes and learns that it cannot resume.
            return Ok(());
        }
        let durable = *durable_rx.borrow_and_update();
        if durable >= next {
            let Some(entries) = read_from(&engine, next)? else {
                return Ok(());
            };
            if let Some(last) = entries.last() {
                next = last.lsn + 1;
                let msg = Message::FeedChanges {
                    source_lsn: durable,
                    source_lag_ms: millis(source_lag()),
                    changes: changes(&entries),
                };
                write(&mut wr, &msg, frame_timeout).await?;
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = wait_for(&mut shutdown) => return Ok(()),
            r = durable_rx.changed() => if r.is_err() { return Ok(()) },
            m = fr.read() => match m {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => return Err(ProtocolError::Unexpected("a message on a feed after FeedSubscribe").into()),
                Err(e) => return Err(e),
            },
            _ = tokio::time::sleep(heartbeat) => {
                let msg = Message::FeedChanges {
                    source_lsn: durable,
                    source_lag_ms: millis(source_lag()),
                    changes: Vec::new(),
                };
                write(&mut wr, &msg, frame_timeout).await?;
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn write(
    wr: &mut tokio::io::WriteHalf<BoxStream>,
    msg: &Message,
    stall: Duration,
) -> Result<(), ConnError> {
    match tokio::time::timeout(stall, conn::write_message(wr, msg)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnError::Timeout(
            "a write to a feed subscriber that is not reading",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_resumes_only_when_nothing_is_missing() {
        // Same epoch, the log still holds after+1: exact resume.
        assert_eq!(
            plan(10, 1, 1, 20, 5),
            Start {
                after_lsn: 10,
                resumed: true
            }
        );
        // Caught up exactly, and an empty-log edge (first_log = durable + 1).
        assert!(plan(20, 1, 1, 20, 21).resumed);
        // A fresh subscriber starts at the end.
        assert_eq!(
            plan(0, 0, 1, 20, 1),
            Start {
                after_lsn: 20,
                resumed: false
            }
        );
        // Retention passed: after+1 is gone.
        assert_eq!(plan(3, 1, 1, 20, 5).after_lsn, 20);
        assert!(!plan(3, 1, 1, 20, 5).resumed);
        // Another epoch (a promotion): start over.
        assert!(!plan(10, 1, 2, 20, 1).resumed);
        // The subscriber is ahead of this source (a lagging replica, a rebuilt node).
        assert!(!plan(30, 1, 1, 20, 1).resumed);
    }

    #[test]
    fn changes_keep_lsns_and_keys_in_order() {
        use super::super::engine::LoggedWrite;
        let e = |lsn, keys: &[&str]| LogEntry {
            lsn,
            epoch: 1,
            timestamp_ms: 0,
            writes: keys
                .iter()
                .map(|k| LoggedWrite {
                    key: (*k).into(),
                    value: None,
                })
                .collect(),
        };
        assert_eq!(
            changes(&[e(4, &["a/1", "b/2"]), e(5, &["a/1"])]),
            vec![
                (4, vec!["a/1".to_owned(), "b/2".to_owned()]),
                (5, vec!["a/1".to_owned()])
            ]
        );
    }
}
