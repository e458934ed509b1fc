//! Shared HTTP plumbing: the response body type, problem+json errors, bearer-token auth,
//! listeners with limits and graceful drain, and the admin endpoints every node serves.

pub mod admin;
pub mod auth;
pub mod body;
pub mod dashboard;
pub mod date;
pub mod fastio;
pub mod interim;
pub mod problem;
pub mod server;
