//! The edge role: an RFC 9111 HTTP cache (CDN tier) in front of the origins.
//!
//! Split like Pingora's cache: `cache_control` parses directives, `policy` makes every
//! RFC 9111 decision (pure), `store` keeps objects with Vary variants on top of
//! [`crate::cache`], `coalesce` makes concurrent misses share one fetch.

pub mod cache_control;
pub mod coalesce;
pub mod policy;
pub mod store;
