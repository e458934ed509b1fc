//! Wake-up coalescing: a short nap before the runtime waits for I/O, while enough requests
//! are in flight that the nap's delay hides behind them.
//!
//! A proxy that keeps up with its load is idle between packets, so nearly every packet a
//! backend or client sends finds its thread asleep in `epoll_wait` and wakes it: an
//! interrupt to another core, a switch back in, cold caches, for one or two packets each
//! time. The peers pay too, since every send that wakes a sleeper carries the cost of that
//! wake-up. Network cards face the same problem and coalesce interrupts; this does it for
//! the event loop. When the runtime runs out of work after a turn that sent requests to
//! backends, while at least `min_in_flight` requests are out there, its thread sleeps `nap`
//! first (nothing can wake it), then collects in one turn everything that arrived
//! meanwhile. Under the benchmark's load (`../shared/bench/compare.sh proxy`) that cut the
//! balancer's CPU per request by about a third, and the backend's with it (BENCHMARKS.md,
//! "Stage 3: wake-up coalescing").
//!
//! Why only after sending: the requests just sent cannot be answered before the backend
//! has worked on them, so a nap then delays nothing that is ready, and the next batch
//! collects meanwhile. After a turn that only relayed responses, more responses of earlier
//! batches are likely on their way while the backend works on the rest; relayed as they
//! come, the clients have them while the backend is still busy (BENCHMARKS.md, "the p99
//! tail": at 64 clients 5 % lower p99 and 5 % more req/s than napping after every turn).
//!
//! The price is up to `nap` more latency per wake-up, paid only when `min_in_flight`
//! requests are outstanding, i.e. when responses already wait behind each other; with
//! fewer (a lone client, light traffic) the runtime parks at once, as without it. A
//! saturated process never runs out of work, so it never naps.
//!
//! The policy ([`Coalescing`]) is pure. What the runtime's park hook ([`before_park`])
//! consults is installed process-wide by the role that counts the requests in flight
//! (the balancer, from its config, again on every reload).

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;

/// Longest nap allowed: the delay is added to a wake-up, so it must stay well below the
/// latencies a proxy is judged by.
pub const MAX_NAP: Duration = Duration::from_millis(1);

/// When to nap before waiting for I/O, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalescing {
    /// How long to sleep before waiting; zero turns coalescing off.
    pub nap: Duration,
    /// Fewest requests in flight that make a nap worth its delay.
    pub min_in_flight: usize,
}

impl Coalescing {
    /// The nap to take before parking after a turn that did (`sent`) or did not send
    /// requests upstream, with `in_flight()` requests outstanding (never more than
    /// [`MAX_NAP`]); `None`: park at once. `in_flight` is called only when the rest
    /// allows a nap: the runtime parks often, and most parks need no count.
    pub fn nap_before_park(
        &self,
        sent: bool,
        in_flight: impl FnOnce() -> usize,
    ) -> Option<Duration> {
        (sent && !self.nap.is_zero() && in_flight() >= self.min_in_flight)
            .then_some(self.nap.min(MAX_NAP))
    }
}

/// A policy in force and the count it is applied to.
struct Installed {
    policy: Coalescing,
    in_flight: Box<dyn Fn() -> usize + Send + Sync>,
}

static INSTALLED: ArcSwapOption<Installed> = ArcSwapOption::const_empty();

/// Puts `policy` in force for this process, applied to what `in_flight` counts when the
/// runtime is about to park. A policy with no nap removes the one in force.
pub fn install(policy: Coalescing, in_flight: impl Fn() -> usize + Send + Sync + 'static) {
    let installed = (!policy.nap.is_zero()).then(|| {
        Arc::new(Installed {
            policy,
            in_flight: Box::new(in_flight),
        })
    });
    INSTALLED.store(installed);
}

/// Naps taken so far: one process-wide counter (a clone registers it with the metrics).
pub fn naps() -> &'static Counter {
    static NAPS: OnceLock<Counter> = OnceLock::new();
    NAPS.get_or_init(Counter::default)
}

thread_local!(static SENT: Cell<bool> = const { Cell::new(false) });

/// Notes that this thread's current turn sends a request to a backend (the roles call it
/// where they dispatch one); [`before_park`] reads and clears it.
pub fn sent_upstream() {
    SENT.with(|s| s.set(true));
}

/// The runtime's `on_thread_park` hook: naps when the policy in force says so. The sleep
/// blocks the runtime's thread on purpose: the runtime has nothing to run, and the thread
/// would block in `epoll_wait` next anyway; asleep instead, no packet wakes it, and the
/// nap is bounded by [`MAX_NAP`].
pub fn before_park() {
    let sent = SENT.with(|s| s.replace(false));
    let guard = INSTALLED.load();
    let Some(installed) = guard.as_ref() else {
        return;
    };
    if let Some(nap) = installed
        .policy
        .nap_before_park(sent, || (installed.in_flight)())
    {
        precise_sleeps();
        naps().inc();
        std::thread::sleep(nap);
    }
}

/// Makes this thread's sleeps end on time: Linux lets a normal thread's timers run up to
/// 50 µs late (timer slack, to batch wake-ups), a quarter of a 200 µs nap.
fn precise_sleeps() {
    thread_local!(static SET: Cell<bool> = const { Cell::new(false) });
    if !SET.replace(true) {
        // Best effort: without it, naps are only longer.
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1_000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naps_only_with_a_nap_after_sending_with_enough_requests_in_flight() {
        let on = Coalescing {
            nap: Duration::from_micros(200),
            min_in_flight: 16,
        };
        assert_eq!(on.nap_before_park(true, || 0), None);
        assert_eq!(on.nap_before_park(true, || 15), None);
        assert_eq!(
            on.nap_before_park(true, || 16),
            Some(Duration::from_micros(200))
        );
        assert_eq!(
            on.nap_before_park(true, || 1000),
            Some(Duration::from_micros(200))
        );
        assert_eq!(on.nap_before_park(false, || 1000), None);
        let uncounted = || -> usize { panic!("counted in flight after a turn that sent nothing") };
        assert_eq!(on.nap_before_park(false, uncounted), None);
        let off = Coalescing {
            nap: Duration::ZERO,
            ..on
        };
        assert_eq!(off.nap_before_park(true, || 1000), None);
        let long = Coalescing {
            nap: Duration::from_secs(1),
            ..on
        };
        assert_eq!(long.nap_before_park(true, || 16), Some(MAX_NAP));
    }
}
