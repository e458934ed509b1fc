//! Routing for the app role: a pure function from a request path to an [`Endpoint`], so it
//! can be tested without a socket.

use http::Method;

/// What a request path addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `POST /api/v1/batch`: several writes applied atomically.
    Batch,
    /// `/api/v1/{collection}`: list or create.
    Collection {
        /// The collection name, not yet validated.
        collection: &'a str,
    },
    /// `/api/v1/{collection}/{id}`: one record.
    Record {
        /// The collection name, not yet validated.
        collection: &'a str,
        /// The record id, not yet validated.
        id: &'a str,
    },
    /// Anything under `/api/` that is none of the above.
    ApiNotFound,
    /// Everything else: a static file, if one exists.
    Static,
}

const API_PREFIX: &str = "/api/v1/";

impl Endpoint<'_> {
    /// Methods this endpoint answers, for 405's `Allow`.
    pub fn allowed(self) -> &'static [Method] {
        match self {
            Endpoint::Batch => &[Method::POST],
            Endpoint::Collection { .. } => &[Method::GET, Method::HEAD, Method::POST],
            Endpoint::Record { .. } => &[
                Method::GET,
                Method::HEAD,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ],
            Endpoint::ApiNotFound => &[],
            Endpoint::Static => &[Method::GET, Method::HEAD],
        }
    }

    /// A fixed name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Batch => "batch",
            Endpoint::Collection { .. } => "collection",
            Endpoint::Record { .. } => "record",
            Endpoint::ApiNotFound => "api_not_found",
            Endpoint::Static => "static",
        }
    }
}

/// Maps a request path to its endpoint. `batch` is reserved and cannot be a collection name.
pub fn route(path: &str) -> Endpoint<'_> {
    if path == "/api" || path == "/api/" || path == "/api/v1" {
        return Endpoint::ApiNotFound;
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return if path.starts_with("/api/") {
            Endpoint::ApiNotFound
        } else {
            Endpoint::Static
        };
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("batch"), None, _) => Endpoint::Batch,
        (Some(c), None, _) if !c.is_empty() => Endpoint::Collection { collection: c },
        (Some(c), Some(id), None) if !c.is_empty() && !id.is_empty() => {
            Endpoint::Record { collection: c, id }
        }
        _ => Endpoint::ApiNotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/batch"), Endpoint::Batch);
        assert_eq!(
            route("/api/v1/users"),
            Endpoint::Collection {
                collection: "users"
            }
        );
        assert_eq!(
            route("/api/v1/users/"),
            Endpoint::Collection {
                collection: "users"
            }
        );
        assert_eq!(
            route("/api/v1/users/42"),
            Endpoint::Record {
                collection: "users",
                id: "42"
            }
        );
        assert_eq!(route("/api/v1/users/42/x"), Endpoint::ApiNotFound);
        assert_eq!(route("/api/v1//42"), Endpoint::ApiNotFound);
        assert_eq!(route("/api/v2/users"), Endpoint::ApiNotFound);
        assert_eq!(route("/api/v1"), Endpoint::ApiNotFound);
        assert_eq!(route("/index.html"), Endpoint::Static);
        assert_eq!(route("/"), Endpoint::Static);
        assert_eq!(route("/apiary"), Endpoint::Static);
    }
}
