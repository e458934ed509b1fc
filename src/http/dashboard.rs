//! The admin dashboard at `/admin/`: one HTML page, its script and its stylesheet, compiled
//! into the binary so every node serves it with no files to deploy and no network access.
//!
//! The page holds no data: it polls `/admin/status` (which needs the admin token when
//! tokens are configured; the page asks for one) and draws its charts from successive
//! samples. So these assets are public, and served with a strict Content-Security-Policy
//! that allows nothing but this origin.

use http::{header, HeaderValue, Method, Response, StatusCode};

use super::body::{self, Body};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Only this origin, no inline script or style, no framing: the page cannot be used to
/// exfiltrate the token or be clickjacked.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What a path under `/admin` maps to, decided without I/O so routing can be tested alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Asset {
    /// `/admin` without the slash: redirect, so the page's relative URLs resolve.
    Redirect,
    /// `/admin/` or `/admin/index.html`.
    Index,
    /// `/admin/dashboard.js`.
    Script,
    /// `/admin/dashboard.css`.
    Style,
}

/// The dashboard asset at `path`, if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    match path {
        "/admin" => Some(Asset::Redirect),
        "/admin/" | "/admin/index.html" => Some(Asset::Index),
        "/admin/dashboard.js" => Some(Asset::Script),
        "/admin/dashboard.css" => Some(Asset::Style),
        _ => None,
    }
}

/// Answers a request for `asset` (GET or HEAD; anything else is a 405).
pub fn respond(asset: &Asset, method: &Method) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        return super::admin::method_not_allowed(&[Method::GET, Method::HEAD]);
    }
    let (content, content_type) = match asset {
        Asset::Redirect => {
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/admin/"));
            return r;
        }
        Asset::Index => (INDEX, "text/html; charset=utf-8"),
        Asset::Script => (SCRIPT, "text/javascript; charset=utf-8"),
        Asset::Style => (STYLE, "text/css; charset=utf-8"),
    };
    let mut r = if method == Method::HEAD {
        Response::new(body::empty())
    } else {
        Response::new(body::full(content))
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(content.len()));
    // Assets change only with the binary; revalidating each load is cheap on an admin port.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_assets() {
        assert_eq!(asset("/admin"), Some(Asset::Redirect));
        assert_eq!(asset("/admin/"), Some(Asset::Index));
        assert_eq!(asset("/admin/dashboard.js"), Some(Asset::Script));
        assert_eq!(asset("/admin/dashboard.css"), Some(Asset::Style));
        assert_eq!(asset("/admin/status"), None);
        assert_eq!(asset("/admin/../etc/passwd"), None);
    }

    #[test]
    fn the_page_references_only_its_own_assets() {
        // No external URLs: the page must work on a node with no network access.
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(!text.contains("https://"), "external reference in an asset");
            assert!(!text.contains("//cdn"), "external reference in an asset");
        }
        assert!(INDEX.contains("src=\"dashboard.js\""));
        assert!(INDEX.contains("href=\"dashboard.css\""));
        // The CSP forbids inline script and style, so the page must have none.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
    }

    #[test]
    fn responses_carry_type_and_policy() {
        let r = respond(&Asset::Index, &Method::GET);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        assert_eq!(
            respond(&Asset::Script, &Method::POST).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&Asset::Redirect, &Method::GET).status(),
            StatusCode::PERMANENT_REDIRECT
        );
    }
}
