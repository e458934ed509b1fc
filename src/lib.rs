//! Strata: one binary that is a whole web stack.
//!
//! Module map — where each concept lives:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the `strata` command line (`serve`, `check`, `promote`, `restore`, `reload`, `status`, `fleet`) |
//! | [`fleet`] | `strata fleet` (nodes of a directory as child processes), `strata status`, `strata reload` |
//! | [`config`] | the TOML model, loading with file:line:col errors, secrets, live copy |
//! | [`node`] | starting the roles a config names; reload on SIGHUP; ordered shutdown |
//! | [`http`] | body type, problem+json, bearer auth, listeners (limits, drain), admin endpoints |
//! | [`app`] | the app role: routing, data API handlers, static files, the coherent record cache and its change feed |
//! | [`storage`] | keys and records, the [`storage::Store`] handle, the sled engine, the storage server and its client, backups |
//! | [`tls`] | rustls server and client configs from PEM files (storage links, balancer and edge listeners) |
//! | [`edge`] | the edge role: RFC 9111 HTTP cache, Vary-keyed object store, coalescing, purge |
//! | [`cache`] | the byte-bounded, LSN-gated, scan-resistant cache the app and edge roles share |
//! | [`balancer`] | the balancer role: backend pool, pick policies, health, retry budget, TLS |
//! | [`proxy`] | forwarding upstream: pooled client, header hygiene, streaming bodies |
//! | [`metrics`] | the Prometheus registry every role reports into |
//! | [`wake`] | wake-up coalescing: a short nap before the runtime waits for I/O under load |

pub mod app;
pub mod balancer;
pub mod cache;
pub mod cli;
pub mod config;
pub mod edge;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod storage;
pub mod tls;
pub mod wake;
