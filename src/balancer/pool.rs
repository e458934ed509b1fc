//! The backend pool: one immutable snapshot per config (backends, weights, policy data,
//! timeouts), swapped whole on reload. Backends are shared `Arc`s, so a backend that stays
//! across a reload keeps its health, connections and counters, and a removed one lives on
//! until its last in-flight request finishes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::HeaderName;
use http::HeaderMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::health::BackendHealth;
use super::pick::{self, Weights};
use super::pipe::Pipes;
use super::retry::RetryBudget;
use super::MAX_ATTEMPTS;
use crate::config::balancer::{Algorithm, BalancerConfig, HashKey, HealthConfig, RetryConfig};
use crate::proxy::client::{ConnPool, UpstreamSettings};

/// Label naming one backend in metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// The backend's `ip:port`.
    pub backend: String,
}

/// The per-backend metric families; each backend keeps its own handles (atomics), so the
/// request path never looks anything up.
#[derive(Clone)]
pub struct Families {
    /// Requests sent (attempts, retries included).
    pub requests: Family<BackendLabel, Counter>,
    /// Attempts that failed: connect errors, timeouts, broken exchanges, 5xx answers.
    pub errors: Family<BackendLabel, Counter>,
    /// Attempts on this backend that were retried elsewhere.
    pub retries: Family<BackendLabel, Counter>,
    /// Passive ejections.
    pub ejections: Family<BackendLabel, Counter>,
    /// Time from sending the request to the response head.
    pub latency: Family<BackendLabel, Histogram>,
    /// Requests per pipelined batch written (`[balancer] pipeline`): whether pipelining
    /// groups enough requests to pay (batches of two or three cost more than they save).
    pub batch_requests: Family<BackendLabel, Histogram>,
}

impl Default for Families {
    fn default() -> Self {
        fn histogram() -> Histogram {
            Histogram::new(exponential_buckets(0.00005, 2.0, 18))
        }
        fn batch_histogram() -> Histogram {
            // 1, 2, 4 … 128 requests.
            Histogram::new(exponential_buckets(1.0, 2.0, 8))
        }
        Families {
            requests: Family::default(),
            errors: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            latency: Family::new_with_constructor(histogram as fn() -> Histogram),
            batch_requests: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
        }
    }
}

/// One backend's metric handles.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// See [`Families::requests`].
    pub requests: Counter,
    /// See [`Families::errors`].
    pub errors: Counter,
    /// See [`Families::retries`].
    pub retries: Counter,
    /// See [`Families::ejections`].
    pub ejections: Counter,
    /// See [`Families::latency`].
    pub latency: Histogram,
}

/// One app server behind the balancer.
pub struct Backend {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its keep-alive connections.
    pub conns: ConnPool,
    /// Its pipelined connections in use (`[balancer] pipeline`).
    pub pipes: Pipes,
    /// Requests sent to it and not finished (response body included).
    pub in_flight: AtomicU32,
    /// Probe and ejection state.
    pub health: BackendHealth,
    /// Its point on the hash ring (rendezvous seed), from its address.
    pub seed: u64,
    /// Its metric handles.
    pub metrics: BackendMetrics,
}

impl Backend {
    fn new(address: SocketAddr, families: &Families) -> Self {
        let label = BackendLabel {
            backend: address.to_string(),
        };
        Backend {
            address,
            conns: ConnPool::new(address),
            pipes: Pipes::new(families.batch_requests.get_or_create(&label).clone()),
            in_flight: AtomicU32::new(0),
            health: BackendHealth::new(),
            seed: pick::stable_hash(label.backend.as_bytes()),
            metrics: BackendMetrics {
                requests: families.requests.get_or_create(&label).clone(),
                errors: families.errors.get_or_create(&label).clone(),
                retries: families.retries.get_or_create(&label).clone(),
                ejections: families.ejections.get_or_create(&label).clone(),
                latency: families.latency.get_or_create(&label).clone(),
            },
        }
    }

    /// Requests in flight now.
    pub fn load(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request about to be sent to this backend: in flight until the caller
    /// decrements `in_flight` when the exchange ends, in the request metric, and as work
    /// this thread's turn sent upstream, which wake-up coalescing naps after
    /// ([`crate::wake::sent_upstream`]).
    pub fn dispatch(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.inc();
        crate::wake::sent_upstream();
    }
}

/// The hash key, parsed once per config.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
}

impl KeySource {
    /// [`KeySource::hash`] over raw fields (name, value), as the fast path has them.
    pub fn hash_fields<'a>(
        &self,
        mut fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Option<u64> {
        match self {
            KeySource::Header(name) => fields
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
                .map(|(_, v)| pick::stable_hash(v)),
            KeySource::Cookie(name) => fields
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
                .filter_map(|(_, v)| std::str::from_utf8(v).ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| pick::stable_hash(v.trim_matches('"').as_bytes())),
        }
    }

    /// The key's hash for this request, when the request carries it.
    pub fn hash(&self, headers: &HeaderMap) -> Option<u64> {
        match self {
            KeySource::Header(name) => headers.get(name).map(|v| pick::stable_hash(v.as_bytes())),
            KeySource::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| pick::stable_hash(v.trim_matches('"').as_bytes())),
        }
    }
}

/// One config's view of the pool.
pub struct Pool {
    /// The backends, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Their weights, same order.
    pub weights: Vec<u32>,
    cumulative: Weights,
    schedule: Vec<u32>,
    seeds: Vec<u64>,
    rr: AtomicUsize,
    /// The policy.
    pub algorithm: Algorithm,
    /// What `hash` hashes.
    pub key: Option<KeySource>,
    /// Upstream timeouts and pool limits.
    pub upstream: UpstreamSettings,
    /// Most requests per upstream pipeline; 1: none.
    pub pipeline: usize,
    /// Health settings.
    pub health: HealthConfig,
    /// Retry settings.
    pub retry: RetryConfig,
    /// The retry budget (kept across reloads while the retry settings stay the same).
    pub budget: Arc<RetryBudget>,
    /// Log one line per request (`[node] access_log`).
    pub access_log: bool,
}

impl Pool {
    /// Builds the pool for `cfg`, taking over every backend of `previous` whose address is
    /// still listed (health, connections and counters carry over).
    pub fn build(cfg: &BalancerConfig, previous: Option<&Pool>, families: &Families) -> Pool {
        let backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b| {
                previous
                    .and_then(|p| p.backends.iter().find(|old| old.address == b.address))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(b.address, families)))
            })
            .collect();
        let weights: Vec<u32> = cfg.backends.iter().map(|b| b.weight.max(1)).collect();
        let budget = match previous {
            Some(p) if p.retry == cfg.retry => p.budget.clone(),
            _ => Arc::new(RetryBudget::new(
                cfg.retry.budget_percent,
                cfg.retry.min_per_second,
            )),
        };
        let key = cfg.hash_key.as_ref().and_then(|k| match k {
            HashKey::Header(h) => HeaderName::from_bytes(h.as_bytes())
                .ok()
                .map(KeySource::Header),
            HashKey::Cookie(c) => Some(KeySource::Cookie(c.clone())),
        });
        Pool {
            cumulative: Weights::new(&weights),
            schedule: pick::wrr_schedule(&weights),
            seeds: backends.iter().map(|b| b.seed).collect(),
            rr: AtomicUsize::new(previous.map_or(0, |p| p.rr.load(Ordering::Relaxed))),
            backends,
            weights,
            algorithm: cfg.algorithm,
            key,
            upstream: UpstreamSettings {
                connect_timeout: cfg.connect_timeout.get(),
                response_timeout: cfg.response_timeout.get(),
                idle_timeout: cfg.idle_timeout.get(),
                pool_idle_timeout: cfg.pool_idle_timeout.get(),
                pool_max_idle: cfg.pool_max_idle,
            },
            pipeline: cfg.pipeline,
            health: cfg.health.clone(),
            retry: cfg.retry.clone(),
            budget,
            access_log: false,
        }
    }

    /// Picks the backend for a request's next attempt: healthy at `now` and not yet in
    /// `tried`, to which it is added. `None`: no backend is left to try.
    pub fn pick_untried(&self, key: Option<u64>, now: u64, tried: &mut Tried) -> Option<usize> {
        let i = self.pick(key, |i| {
            self.backends[i].health.available(now) && !tried.0[..tried.1].contains(&i)
        })?;
        if tried.1 < tried.0.len() {
            tried.0[tried.1] = i;
            tried.1 += 1;
        }
        Some(i)
    }

    /// Picks a backend for a request with hash `key` (when the policy hashes), among those
    /// for which `ok` holds.
    pub fn pick(&self, key: Option<u64>, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let load = |i: usize| self.backends[i].load();
        let weight = |i: usize| self.weights[i];
        match (self.algorithm, key) {
            (Algorithm::Hash, Some(k)) => pick::rendezvous(k, &self.seeds, weight, ok),
            (Algorithm::RoundRobin, _) => pick::round_robin(&self.schedule, &self.rr, ok),
            (Algorithm::LeastConnections, _) => {
                let start = pick::random() as usize % self.backends.len().max(1);
                pick::least_loaded(self.backends.len(), start, load, weight, ok)
            }
            _ => pick::p2c(&self.cumulative, pick::random, load, weight, ok),
        }
    }

    /// How many backends are ejected at `now`.
    pub fn ejected(&self, now: u64) -> usize {
        self.backends
            .iter()
            .filter(|b| b.health.ejected(now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> BalancerConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn reload_keeps_backends_that_stay() {
        let f = Families::default();
        let a = Pool::build(
            &cfg("backends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]"),
            None,
            &f,
        );
        a.backends[0].health.probe_result(false, 1, 1);
        let b = Pool::build(
            &cfg("backends = [\"127.0.0.1:2\", { address = \"127.0.0.1:1\", weight = 5 }, \"127.0.0.1:3\"]"),
            Some(&a),
            &f,
        );
        assert!(Arc::ptr_eq(&a.backends[0], &b.backends[1]));
        assert!(Arc::ptr_eq(&a.backends[1], &b.backends[0]));
        assert_eq!(b.weights, vec![1, 5, 1]);
        assert!(!b.backends[1].health.available(1), "health carried over");
        assert!(b.backends[2].health.available(1));
        assert!(Arc::ptr_eq(&a.budget, &b.budget));
    }

    #[test]
    fn cookie_and_header_keys() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=\"xyz\"; b=2".parse().unwrap());
        h.insert("x-user", "alice".parse().unwrap());
        let c = KeySource::Cookie("session".into()).hash(&h);
        assert_eq!(c, Some(pick::stable_hash(b"xyz")));
        assert_eq!(KeySource::Cookie("nope".into()).hash(&h), None);
        let x = KeySource::Header(HeaderName::from_static("x-user")).hash(&h);
        assert_eq!(x, Some(pick::stable_hash(b"alice")));
        // The fast path's raw fields hash the same.
        let raw = [
            (&b"Cookie"[..], &b"a=1; session=\"xyz\"; b=2"[..]),
            (b"X-User", b"alice"),
        ];
        let raw_hash = |k: &KeySource| k.hash_fields(raw.iter().copied());
        assert_eq!(raw_hash(&KeySource::Cookie("session".into())), c);
        assert_eq!(
            raw_hash(&KeySource::Header(HeaderName::from_static("x-user"))),
            x
        );
    }
}

/// The backends one request has been sent to, so that a retry goes elsewhere.
#[derive(Default)]
pub struct Tried([usize; MAX_ATTEMPTS], usize);
