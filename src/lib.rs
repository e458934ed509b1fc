//! Strata: one binary that is a whole web stack.
//!
//! Module map — where each concept lives:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the `strata` command line (`serve`, `check`, `promote`) |
//! | [`config`] | the TOML model, loading with file:line:col errors, secrets, live copy |
//! | [`node`] | starting the roles a config names; reload on SIGHUP; ordered shutdown |
//! | [`http`] | body type, problem+json, bearer auth, listeners (limits, drain), admin endpoints |
//! | [`app`] | the app role: routing, data API handlers, static files |
//! | [`storage`] | keys and records, the [`storage::Store`] handle, the sled engine, the storage server and its client |
//! | [`tls`] | rustls server and client configs from PEM files (storage links; later the edge) |
//! | [`cache`] | the byte-bounded, LSN-gated, scan-resistant cache the app and edge roles share |
//! | [`metrics`] | the Prometheus registry every role reports into |

pub mod app;
pub mod cache;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod node;
pub mod storage;
pub mod tls;
