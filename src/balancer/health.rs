//! Backend health: active probes (rise/fall counting) and passive ejection on failures seen
//! in real traffic (with an ejection time that grows on repeat, and a cap on how much of
//! the pool may be ejected at once).
//!
//! The state machines ([`Active`], [`ejection_time`], [`may_eject`]) are pure. The request
//! path reads only atomics ([`BackendHealth::available`]); the mutex inside is taken on
//! probe results and on ejection, never per request.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Rise/fall counting of probe results: `fall` failures in a row take a backend down,
/// `rise` successes in a row bring it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Active {
    /// Whether the probes say the backend is up.
    pub up: bool,
    streak: u32,
}

impl Active {
    /// Starts up: a new backend takes traffic at once and the probes take it out if they
    /// must (connect failures are retried meanwhile).
    pub fn new() -> Self {
        Active {
            up: true,
            streak: 0,
        }
    }

    /// Records a probe; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed.max(1) {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

impl Default for Active {
    fn default() -> Self {
        Active::new()
    }
}

/// How long the `times`-th ejection in a row lasts: `base`, doubling per repeat, at most
/// `max`.
pub fn ejection_time(base: Duration, max: Duration, times: u32) -> Duration {
    let doublings = times.saturating_sub(1).min(20);
    base.saturating_mul(1 << doublings).min(max)
}

/// Whether one more backend may be ejected when `ejected` of `total` already are, without
/// exceeding `max_percent` of the pool.
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected + 1) * 100 <= total * max_percent as usize
}

/// Milliseconds on a process-wide monotonic clock; 0 is reserved for "never".
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] for a moment already read from the clock.
pub fn ms_at(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| at);
    u64::try_from(at.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX) + 1
}

/// The health of one backend, shared by the request path and the health checker.
#[derive(Debug, Default)]
pub struct BackendHealth {
    active_up: AtomicBool,
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    slow: Mutex<Slow>,
}

#[derive(Debug, Default)]
struct Slow {
    active: Active,
    ejections: u32,
    last_ejection_end: u64,
}

/// What a backend's health looks like to `/admin/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Taking traffic.
    Healthy,
    /// The probes say it is down.
    Down,
    /// Ejected for failing real requests.
    Ejected,
}

impl BackendHealth {
    /// A backend that starts healthy.
    pub fn new() -> Self {
        BackendHealth {
            active_up: AtomicBool::new(true),
            ..BackendHealth::default()
        }
    }

    /// Whether it may take requests at `now` (from [`now_ms`]).
    pub fn available(&self, now: u64) -> bool {
        self.active_up.load(Ordering::Relaxed) && !self.ejected(now)
    }

    /// Whether it is ejected at `now`.
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// The state at `now`.
    pub fn state(&self, now: u64) -> HealthState {
        if !self.active_up.load(Ordering::Relaxed) {
            HealthState::Down
        } else if self.ejected(now) {
            HealthState::Ejected
        } else {
            HealthState::Healthy
        }
    }

    /// Records a probe result; returns the new up/down state when it changed.
    pub fn probe_result(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let mut slow = self.slow.lock().ok()?;
        let changed = slow.active.observe(ok, rise, fall);
        self.active_up.store(slow.active.up, Ordering::Relaxed);
        changed
    }

    /// Forces the probe state (active checks switched off: everyone is up).
    pub fn set_up(&self) {
        if let Ok(mut slow) = self.slow.lock() {
            slow.active = Active::new();
        }
        self.active_up.store(true, Ordering::Relaxed);
    }

    /// A request succeeded: the failure streak resets (written only when non-zero, so the
    /// common path does not bounce the cache line between cores).
    pub fn request_ok(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed; returns true when the streak reached `threshold` (0 = never) and
    /// the caller should consider ejecting.
    pub fn request_failed(&self, threshold: u32) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        threshold > 0 && n >= threshold
    }

    /// Ejects the backend from `now` for a time that grows with repeated ejections; the
    /// repeat count resets once the backend behaved for `max` after its last ejection.
    /// Returns how long.
    pub fn eject(&self, now: u64, base: Duration, max: Duration) -> Option<Duration> {
        let mut slow = self.slow.lock().ok()?;
        if self.ejected(now) {
            return None;
        }
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        if slow.last_ejection_end > 0 && now.saturating_sub(slow.last_ejection_end) > max_ms {
            slow.ejections = 0;
        }
        slow.ejections += 1;
        let time = ejection_time(base, max, slow.ejections);
        let until = now + u64::try_from(time.as_millis()).unwrap_or(u64::MAX / 2);
        slow.last_ejection_end = until;
        self.ejected_until.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        Some(time)
    }

    /// The current failure streak.
    pub fn failure_streak(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Milliseconds of ejection left at `now`.
    pub fn ejected_for_ms(&self, now: u64) -> u64 {
        self.ejected_until
            .load(Ordering::Relaxed)
            .saturating_sub(now)
    }
}

/// One active probe: `GET path` on a fresh connection; healthy when it answers below 500
/// within `timeout`. A fresh connection tests what a new request would meet.
pub async fn probe(addr: std::net::SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(TokioIo::new(stream))
        .await
        .ok()?;
        let driver = tokio::spawn(conn);
        let host = HeaderValue::from_str(&addr.to_string()).ok()?;
        let req = Request::get(path)
            .header(header::HOST, host)
            .header(header::USER_AGENT, "strata-health")
            .header(header::CONNECTION, "close")
            .body(http_body_util::Empty::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok();
        driver.abort();
        resp.map(|r| r.status().as_u16() < 500)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_streaks() {
        let mut a = Active::new();
        assert_eq!(a.observe(false, 2, 3), None);
        assert_eq!(a.observe(true, 2, 3), None, "a success breaks the streak");
        assert_eq!(a.observe(false, 2, 3), None);
        assert_eq!(a.observe(false, 2, 3), None);
        assert_eq!(a.observe(false, 2, 3), Some(false));
        assert!(!a.up);
        assert_eq!(a.observe(true, 2, 3), None);
        assert_eq!(a.observe(true, 2, 3), Some(true));
        assert!(a.up);
    }

    #[test]
    fn ejection_grows_and_is_capped() {
        let s = Duration::from_secs;
        assert_eq!(ejection_time(s(10), s(300), 1), s(10));
        assert_eq!(ejection_time(s(10), s(300), 2), s(20));
        assert_eq!(ejection_time(s(10), s(300), 4), s(80));
        assert_eq!(ejection_time(s(10), s(300), 9), s(300));
        assert_eq!(ejection_time(s(10), s(300), 1000), s(300));
    }

    #[test]
    fn ejection_is_capped_by_percentage() {
        assert!(may_eject(0, 3, 50));
        assert!(!may_eject(1, 3, 50), "two of three is more than half");
        assert!(may_eject(1, 4, 50));
        assert!(!may_eject(0, 1, 50), "never the only backend at 50%");
        assert!(may_eject(0, 1, 100));
        assert!(!may_eject(0, 10, 0));
    }

    #[test]
    fn passive_ejection_lifecycle() {
        let h = BackendHealth::new();
        let t0 = 1_000;
        assert!(h.available(t0));
        assert!(!h.request_failed(3));
        h.request_ok();
        assert!(!h.request_failed(3));
        assert!(!h.request_failed(3));
        assert!(h.request_failed(3));
        let d = h
            .eject(t0, Duration::from_millis(100), Duration::from_secs(1))
            .unwrap();
        assert_eq!(d, Duration::from_millis(100));
        assert_eq!(h.state(t0 + 50), HealthState::Ejected);
        assert!(h
            .eject(t0 + 50, Duration::from_millis(100), Duration::from_secs(1))
            .is_none());
        assert!(h.available(t0 + 101));
        // A repeat soon after doubles; after a long quiet spell it starts over.
        let d = h
            .eject(t0 + 200, Duration::from_millis(100), Duration::from_secs(1))
            .unwrap();
        assert_eq!(d, Duration::from_millis(200));
        let d = h
            .eject(
                t0 + 5_000,
                Duration::from_millis(100),
                Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(d, Duration::from_millis(100));
    }

    #[test]
    fn probes_drive_availability() {
        let h = BackendHealth::new();
        assert_eq!(h.probe_result(false, 1, 2), None);
        assert_eq!(h.probe_result(false, 1, 2), Some(false));
        assert_eq!(h.state(1), HealthState::Down);
        assert!(!h.available(1));
        assert_eq!(h.probe_result(true, 1, 2), Some(true));
        assert!(h.available(1));
    }
}
