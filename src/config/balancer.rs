//! `[balancer]`: the reverse proxy in front of app servers. Everything here applies live on
//! reload except `listen` (and `http`, the listener's limits).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{de, Deserialize, Deserializer, Serialize};

use super::model::HttpLimits;
use super::units::Dur;

/// `[balancer]`: where to listen, which backends, how to pick one, how to judge their health.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    /// Where clients connect. Needs a restart to change.
    pub listen: SocketAddr,
    /// The app servers: `"10.0.0.11:8080"` or `{ address = "10.0.0.11:8080", weight = 3 }`.
    pub backends: Vec<BackendConfig>,
    /// How a backend is chosen per request.
    pub algorithm: Algorithm,
    /// What `algorithm = "hash"` hashes: `{ header = "X-User" }` or `{ cookie = "session" }`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// TLS termination; unset means plain HTTP (HTTP/1.1 and h2c).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Time to open a TCP connection to a backend before trying another (502 if none).
    pub connect_timeout: Dur,
    /// Time a backend has to send response headers once the request is sent (504 after).
    pub response_timeout: Dur,
    /// Longest pause between two body chunks, either direction, before the exchange is cut.
    pub idle_timeout: Dur,
    /// How long an unused pooled connection to a backend is kept. Keep it below the
    /// backend's own keep-alive timeout, or requests race the backend closing it.
    pub pool_idle_timeout: Dur,
    /// Most idle pooled connections kept per backend.
    pub pool_max_idle: usize,
    /// Most GET and HEAD requests (plain HTTP/1.1 clients, no body) pipelined on one
    /// connection to a backend and not yet answered. 1 (the default) sends one request per
    /// connection at a time. Requests that arrive together go in one write, and later ones
    /// join the same connection while it keeps answering, so the backend serves them first
    /// come, first served; the price is that a request waits for the responses ahead of it
    /// on its connection (for at most ~1 ms of arrivals behind a slow one).
    pub pipeline: usize,
    /// Wake-up coalescing: when this process runs out of work after sending requests to
    /// backends, while at least `coalesce_min_in_flight` requests are out there, it sleeps
    /// this long before waiting for I/O, then handles together everything that arrived.
    /// Fewer wake-ups cut CPU per request (here and at the peers) at the price of up to
    /// this much latency per wake-up under such load. `"0s"` (the default) is off; at most
    /// 1ms. See [`crate::wake`].
    pub coalesce_wakeups: Dur,
    /// Fewest requests in flight (all backends) at which `coalesce_wakeups` applies.
    pub coalesce_min_in_flight: usize,
    /// Active and passive health checking.
    pub health: HealthConfig,
    /// Retrying failed attempts on another backend.
    pub retry: RetryConfig,
    /// Listener limits: header read timeout (also the keep-alive idle limit), header size,
    /// connection count. Needs a restart to change.
    pub http: HttpLimits,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            backends: Vec::new(),
            algorithm: Algorithm::default(),
            hash_key: None,
            tls: None,
            connect_timeout: Dur::secs(2),
            response_timeout: Dur::secs(30),
            idle_timeout: Dur::secs(60),
            pool_idle_timeout: Dur::secs(4),
            pool_max_idle: 256,
            pipeline: 1,
            coalesce_wakeups: Dur::millis(0),
            coalesce_min_in_flight: 16,
            health: HealthConfig::default(),
            retry: RetryConfig::default(),
            http: HttpLimits::default(),
        }
    }
}

/// One backend. Written as a bare `"host:port"` string (weight 1) or a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// `ip:port` of the backend's HTTP listener.
    pub address: SocketAddr,
    /// Relative share of requests (round robin, p2c, hash); at least 1.
    pub weight: u32,
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: SocketAddr,
            #[serde(default = "one")]
            weight: u32,
        }
        fn one() -> u32 {
            1
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"ip:port\" or { address = \"ip:port\", weight = N }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BackendConfig, E> {
                let address = v.trim().parse().map_err(|_| {
                    E::custom(format!("invalid backend address {v:?}; write \"ip:port\""))
                })?;
                Ok(BackendConfig { address, weight: 1 })
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BackendConfig, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendConfig {
                    address: t.address,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// How a backend is picked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Power of two choices: of two random (weighted) backends, the one with fewer requests
    /// in flight per unit of weight. Adapts to slow backends without global coordination.
    #[default]
    P2c,
    /// Weighted round robin, interleaved so a heavy backend does not get bursts.
    RoundRobin,
    /// The backend with the fewest requests in flight per unit of weight.
    LeastConnections,
    /// Consistent (rendezvous) hashing of `hash_key`: a client sticks to one backend, and
    /// adding or removing a backend moves only the keys it gains or loses.
    Hash,
}

/// What `algorithm = "hash"` hashes. Requests without it fall back to p2c.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum HashKey {
    /// A request header, e.g. `X-User`.
    Header(String),
    /// A cookie, e.g. `session`.
    Cookie(String),
}

/// TLS termination: a default certificate plus optional per-server-name ones (SNI).
/// Certificates are re-read on reload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain served when no `sni` entry matches.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Certificates chosen by the server name the client asks for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniCert>,
}

/// One certificate for the names it is served to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Server names (exact, lower case) this certificate answers.
    pub names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Health checking: active probes plus passive ejection on observed failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Path probed with `GET`; any answer below 500 counts as healthy. Empty turns active
    /// checks off.
    pub path: String,
    /// Time between probes of one backend.
    pub interval: Dur,
    /// Time a probe may take.
    pub timeout: Dur,
    /// Consecutive good probes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failed probes that take a backend down.
    pub fall: u32,
    /// Consecutive failed requests (connect errors, timeouts, 5xx) that eject a backend;
    /// 0 turns passive ejection off.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each repeat doubles it, up to `max_ejection_time`.
    pub ejection_time: Dur,
    /// Longest ejection; also how long a backend must behave before its repeat count resets.
    pub max_ejection_time: Dur,
    /// Most backends that may be ejected at once, as a percentage of all of them, so a
    /// fleet-wide problem does not eject everyone.
    pub max_ejected_percent: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/".into(),
            interval: Dur::secs(2),
            timeout: Dur::secs(1),
            rise: 2,
            fall: 2,
            consecutive_failures: 5,
            ejection_time: Dur::secs(10),
            max_ejection_time: Dur::secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Retries on another backend. Only when nothing reached the first backend, or for an
/// idempotent method that failed before response headers; never a non-idempotent request
/// once sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Most attempts per request, the first included; 1 turns retries off.
    pub attempts: u32,
    /// Retries may add at most this percentage to the request rate (the retry budget),
    /// so a struggling fleet is not buried under a retry storm.
    pub budget_percent: u32,
    /// Retries per second allowed regardless of the budget, so a quiet balancer can retry.
    pub min_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            budget_percent: 20,
            min_per_second: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_accept_strings_and_tables() {
        let c: BalancerConfig = toml::from_str(
            "backends = [\"127.0.0.1:1\", { address = \"127.0.0.1:2\", weight = 3 }]\n\
             algorithm = \"hash\"\nhash_key = { cookie = \"session\" }\n",
        )
        .unwrap();
        assert_eq!(c.backends[0].weight, 1);
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.backends[1].address.port(), 2);
        assert_eq!(c.hash_key, Some(HashKey::Cookie("session".into())));
        let text = toml::to_string(&c).unwrap();
        let back: BalancerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_backend_is_explained() {
        let e = toml::from_str::<BalancerConfig>("backends = [\"nope\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ip:port"), "{e}");
    }
}
