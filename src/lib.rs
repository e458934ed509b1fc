//! Strata: one binary that is a whole web stack.
//!
//! Module map — where each concept lives:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the TOML model, loading with file:line:col errors, validation, live reload |
//! | [`node`] | starting the roles a config names; signals and shutdown |
//! | [`http`] | body type, problem+json, listeners (limits, timeouts, drain), admin endpoints |
//! | [`app`] | the app role: data API routes, static files |
//! | [`storage`] | the key/record vocabulary and the embedded sled engine |
//! | [`metrics`] | Prometheus exposition of every role's counters |
//! | [`cli`] | the `strata` command line |

pub mod app;
pub mod http;
pub mod storage;
