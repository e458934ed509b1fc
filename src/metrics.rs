//! Prometheus exposition. Every role registers its metrics in one registry per node; the
//! admin listener serves it at `/metrics`.
//!
//! Counters and histograms are lock-free atomics once created. Resolving a labelled handle
//! through `prometheus_client`'s family map SipHashes the label strings under a lock (~1000
//! instructions per request under callgrind, two lookups per request), so the request path
//! keeps its own map of resolved handles keyed by the `'static` labels with a fast hasher.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Which role answered (`app`, `admin`, …).
    pub role: &'static str,
    /// The route, as a fixed name (never the raw path, which would explode cardinality).
    pub route: &'static str,
    /// HTTP status sent.
    pub status: u16,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Which role answered.
    pub role: &'static str,
    /// The route name.
    pub route: &'static str,
}

type Refresher = Box<dyn Fn() + Send + Sync>;

/// The handles one (role, route, status) resolves to; clones share the family's atomics.
#[derive(Clone)]
struct RouteHandles {
    requests: Counter,
    latency: Histogram,
}

type HandleKey = (&'static str, &'static str, u16);

/// The node's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Refresher>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    handles: dashmap::DashMap<HandleKey, RouteHandles, foldhash::fast::RandomState>,
}

/// Latency buckets from 50µs to ~6.5s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 18))
}

impl Metrics {
    /// A registry with the HTTP request metrics every role shares.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("strata");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head",
            latency.clone(),
        );
        Arc::new(Metrics {
            registry: Mutex::new(registry),
            refreshers: Mutex::new(Vec::new()),
            requests,
            latency,
            handles: dashmap::DashMap::default(),
        })
    }

    /// Counts one answered request and its latency.
    pub fn observe_request(
        &self,
        role: &'static str,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let key = (role, route, status);
        let handles = match self.handles.get(&key) {
            Some(h) => h,
            None => self
                .handles
                .entry(key)
                .or_insert_with(|| RouteHandles {
                    requests: self
                        .requests
                        .get_or_create(&RequestLabels {
                            role,
                            route,
                            status,
                        })
                        .clone(),
                    latency: self
                        .latency
                        .get_or_create(&RouteLabels { role, route })
                        .clone(),
                })
                .downgrade(),
        };
        handles.requests.inc();
        handles.latency.observe(elapsed.as_secs_f64());
    }

    /// Adds a metric owned by a role (the handle stays with the role, which updates it).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// Adds a gauge whose value is computed at scrape time.
    pub fn gauge_fn(
        &self,
        name: &str,
        help: &str,
        compute: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        let gauge = Gauge::<i64>::default();
        self.register(name, help, gauge.clone());
        if let Ok(mut r) = self.refreshers.lock() {
            r.push(Box::new(move || {
                gauge.set(compute());
            }));
        }
    }

    /// Runs `refresh` before every scrape, for metrics (such as labelled families) whose
    /// values are computed from state rather than counted.
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut r) = self.refreshers.lock() {
            r.push(Box::new(refresh));
        }
    }

    /// Requests answered so far per role, for `/admin/status` (the dashboard computes rates
    /// from successive readings). Sums the per-route handles; nothing on the request path.
    pub fn requests_by_role(&self) -> BTreeMap<String, RoleRequests> {
        let mut out: BTreeMap<String, RoleRequests> = BTreeMap::new();
        for h in self.handles.iter() {
            let (role, _, status) = *h.key();
            let n = h.value().requests.get();
            let entry = out.entry(role.to_owned()).or_default();
            entry.total += n;
            if status >= 500 {
                entry.errors += n;
            }
        }
        out
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        if let Ok(refreshers) = self.refreshers.lock() {
            for refresh in refreshers.iter() {
                refresh();
            }
        }
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// Requests one role answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoleRequests {
    /// Every answered request.
    pub total: u64,
    /// Those answered with a 5xx status.
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_gauges_are_exposed() {
        let m = Metrics::new();
        m.observe_request("app", "record", 200, Duration::from_millis(2));
        m.gauge_fn("records", "records stored", || 42);
        let text = m.encode();
        assert!(
            text.contains(
                "strata_http_requests_total{role=\"app\",route=\"record\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("strata_records 42"), "{text}");
    }

    #[test]
    fn requests_are_summed_by_role() {
        let m = Metrics::new();
        assert!(m.requests_by_role().is_empty());
        m.observe_request("app", "record", 200, Duration::from_millis(1));
        m.observe_request("app", "record", 200, Duration::from_millis(1));
        m.observe_request("app", "list", 503, Duration::from_millis(1));
        m.observe_request("admin", "status", 200, Duration::from_millis(1));
        let by_role = m.requests_by_role();
        assert_eq!(
            by_role["app"],
            RoleRequests {
                total: 3,
                errors: 1
            }
        );
        assert_eq!(
            by_role["admin"],
            RoleRequests {
                total: 1,
                errors: 0
            }
        );
        assert_eq!(by_role.len(), 2);
    }
}
