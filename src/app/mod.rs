//! The app role: the data API, static files, and (later) the cache-aside in front of storage.

pub mod static_files;
