//! Shared HTTP plumbing: the response body type, problem+json errors, listeners with
//! limits and graceful drain, and the admin endpoints every node serves.

pub mod body;
