//! RFC 9111 cases for the policy functions.

use super::*;

const T0: u64 = 1_700_000_000;

fn h(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

fn date(t: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(t))
}

fn store(req: &[(&str, &str)], status: u16, resp: &[(&str, &str)]) -> Result<(), NotStorable> {
    let resp = h(resp);
    let cc = response_directives(&resp);
    storable(
        &Method::GET,
        &h(req),
        StatusCode::from_u16(status).unwrap(),
        &resp,
        &cc,
        T0,
        &Settings::default(),
    )
}

fn fresh(resp: &[(&str, &str)], req_time: u64, resp_time: u64) -> Freshness {
    let resp = h(resp);
    let cc = response_directives(&resp);
    Freshness::of(
        StatusCode::OK,
        &resp,
        &cc,
        req_time,
        resp_time,
        &Settings::default(),
    )
}

#[test]
fn explicit_freshness_makes_200_storable() {
    assert_eq!(store(&[], 200, &[("cache-control", "max-age=60")]), Ok(()));
    assert_eq!(store(&[], 200, &[("cache-control", "s-maxage=60")]), Ok(()));
    assert_eq!(
        store(
            &[],
            200,
            &[("expires", &date(T0 + 60)), ("date", &date(T0))]
        ),
        Ok(())
    );
}

#[test]
fn no_store_and_private_are_never_stored() {
    assert_eq!(
        store(&[], 200, &[("cache-control", "no-store, max-age=60")]),
        Err(NotStorable::NoStore)
    );
    assert_eq!(
        store(
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")]
        ),
        Err(NotStorable::NoStore)
    );
    assert_eq!(
        store(&[], 200, &[("cache-control", "private, max-age=60")]),
        Err(NotStorable::Private)
    );
    assert_eq!(
        store(&[], 200, &[("cache-control", "private=\"x\", max-age=60")]),
        Err(NotStorable::Private)
    );
}

#[test]
fn only_get_is_stored() {
    let resp = h(&[("cache-control", "max-age=60")]);
    let cc = response_directives(&resp);
    let r = storable(
        &Method::POST,
        &HeaderMap::new(),
        StatusCode::OK,
        &resp,
        &cc,
        T0,
        &Settings::default(),
    );
    assert_eq!(r, Err(NotStorable::Method));
}

#[test]
fn statuses() {
    assert_eq!(
        store(&[], 206, &[("cache-control", "max-age=60")]),
        Err(NotStorable::Status)
    );
    assert_eq!(
        store(&[], 304, &[("cache-control", "max-age=60")]),
        Err(NotStorable::Status)
    );
    // Any final status may be stored with explicit freshness (§3; cache-tests
    // status-500-fresh, status-299-fresh and their -stale follow-ups).
    for code in [299, 303, 400, 499, 500, 502, 503, 504, 599] {
        assert_eq!(
            store(&[], code, &[("cache-control", "max-age=60")]),
            Ok(()),
            "{code}"
        );
        assert_eq!(
            store(&[], code, &[("last-modified", &date(T0 - 1000))]),
            Err(NotStorable::Status),
            "{code}: no heuristics"
        );
    }
    assert_eq!(store(&[], 404, &[("cache-control", "max-age=60")]), Ok(()));
    assert_eq!(store(&[], 301, &[("cache-control", "max-age=60")]), Ok(()));
    // 302 only with explicit freshness.
    assert_eq!(store(&[], 302, &[("cache-control", "max-age=60")]), Ok(()));
    assert_eq!(
        store(&[], 302, &[("last-modified", &date(T0 - 1000))]),
        Err(NotStorable::Status)
    );
}

#[test]
fn authorization_needs_public_s_maxage_or_must_revalidate() {
    let auth = [("authorization", "Bearer x")];
    assert_eq!(
        store(&auth, 200, &[("cache-control", "max-age=60")]),
        Err(NotStorable::Authorization)
    );
    assert_eq!(
        store(&auth, 200, &[("cache-control", "public, max-age=60")]),
        Ok(())
    );
    assert_eq!(
        store(&auth, 200, &[("cache-control", "s-maxage=60")]),
        Ok(())
    );
    assert_eq!(
        store(
            &auth,
            200,
            &[("cache-control", "must-revalidate, max-age=60")]
        ),
        Ok(())
    );
}

#[test]
fn set_cookie_needs_public_or_s_maxage() {
    assert_eq!(
        store(
            &[],
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
        ),
        Err(NotStorable::SetCookie)
    );
    assert_eq!(
        store(
            &[],
            200,
            &[
                ("cache-control", "public, max-age=60"),
                ("set-cookie", "a=b")
            ]
        ),
        Ok(())
    );
}

#[test]
fn vary_star_is_never_stored() {
    assert_eq!(
        store(
            &[],
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept, *")]
        ),
        Err(NotStorable::VaryStar)
    );
}

#[test]
fn no_freshness_no_validator_is_not_stored() {
    assert_eq!(store(&[], 200, &[]), Err(NotStorable::NoFreshness));
    assert_eq!(
        store(&[], 200, &[("cache-control", "max-age=0")]),
        Err(NotStorable::NoFreshness)
    );
    assert_eq!(
        store(
            &[],
            200,
            &[("cache-control", "no-cache"), ("etag", "\"a\"")]
        ),
        Ok(())
    );
    assert_eq!(
        store(
            &[],
            200,
            &[("cache-control", "max-age=0"), ("etag", "\"a\"")]
        ),
        Ok(())
    );
}

#[test]
fn cdn_cache_control_overrides_cache_control() {
    let r = h(&[
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=100"),
    ]);
    let d = response_directives(&r);
    assert_eq!(d.max_age, Some(100));
    assert!(!d.no_store);
    let r = h(&[
        ("cache-control", "max-age=100"),
        ("cdn-cache-control", "no-store"),
    ]);
    assert!(response_directives(&r).no_store);
    assert_eq!(
        store(
            &[],
            200,
            &[
                ("cache-control", "private"),
                ("cdn-cache-control", "max-age=5")
            ]
        ),
        Ok(())
    );
}

#[test]
fn lifetime_precedence() {
    let s = Settings::default();
    let ok = StatusCode::OK;
    let r = h(&[
        ("cache-control", "max-age=10, s-maxage=20"),
        ("expires", &date(T0 + 30)),
        ("date", &date(T0)),
    ]);
    assert_eq!(
        freshness_lifetime(ok, &r, &response_directives(&r), T0, &s),
        20
    );
    let r = h(&[
        ("cache-control", "max-age=10"),
        ("expires", &date(T0 + 30)),
        ("date", &date(T0)),
    ]);
    assert_eq!(
        freshness_lifetime(ok, &r, &response_directives(&r), T0, &s),
        10
    );
    let r = h(&[("expires", &date(T0 + 30)), ("date", &date(T0))]);
    assert_eq!(
        freshness_lifetime(ok, &r, &response_directives(&r), T0, &s),
        30
    );
}

#[test]
fn invalid_or_past_expires_is_stale() {
    let s = Settings::default();
    let r = h(&[("expires", "0"), ("date", &date(T0))]);
    assert_eq!(
        freshness_lifetime(StatusCode::OK, &r, &response_directives(&r), T0, &s),
        0
    );
    let r = h(&[("expires", &date(T0 - 5)), ("date", &date(T0))]);
    assert_eq!(
        freshness_lifetime(StatusCode::OK, &r, &response_directives(&r), T0, &s),
        0
    );
}

#[test]
fn heuristic_is_ten_percent_capped_and_only_where_allowed() {
    let s = Settings::default();
    let r = h(&[("last-modified", &date(T0 - 1000)), ("date", &date(T0))]);
    assert_eq!(
        freshness_lifetime(StatusCode::OK, &r, &response_directives(&r), T0, &s),
        100
    );
    let r = h(&[
        ("last-modified", &date(T0 - 100_000_000)),
        ("date", &date(T0)),
    ]);
    assert_eq!(
        freshness_lifetime(StatusCode::OK, &r, &response_directives(&r), T0, &s),
        86_400
    );
    let r = h(&[("last-modified", &date(T0 - 1000))]);
    assert_eq!(
        freshness_lifetime(StatusCode::FOUND, &r, &response_directives(&r), T0, &s),
        0
    );
    let off = Settings {
        heuristic_fraction: 0.0,
        ..s
    };
    let r = h(&[("last-modified", &date(T0 - 1000))]);
    assert_eq!(
        freshness_lifetime(StatusCode::OK, &r, &response_directives(&r), T0, &off),
        0
    );
}

#[test]
fn age_calculation_follows_4_2_3() {
    // Age header plus the request's delay.
    let r = h(&[("age", "10"), ("date", &date(T0))]);
    assert_eq!(initial_age(&r, T0, T0 + 2), 12);
    // Apparent age wins when larger (the origin's Date is old).
    let r = h(&[("age", "1"), ("date", &date(T0 - 50))]);
    assert_eq!(initial_age(&r, T0, T0), 50);
    // A Date in the future never makes age negative.
    let r = h(&[("date", &date(T0 + 500))]);
    assert_eq!(initial_age(&r, T0, T0), 0);
    // Garbage Age is ignored.
    let r = h(&[("age", "x")]);
    assert_eq!(initial_age(&r, T0, T0), 0);
    let f = fresh(
        &[
            ("cache-control", "max-age=100"),
            ("age", "10"),
            ("date", &date(T0)),
        ],
        T0,
        T0,
    );
    assert_eq!(f.age(T0 + 5), 15);
    assert_eq!(f.ttl(T0 + 5), 85);
}

#[test]
fn reuse_fresh_then_stale() {
    let f = fresh(&[("cache-control", "max-age=10")], T0, T0);
    let none = Directives::default();
    assert_eq!(f.reuse(&none, false, T0 + 9), Reuse::Fresh);
    assert_eq!(f.reuse(&none, false, T0 + 10), Reuse::Revalidate);
}

#[test]
fn request_directives_tighten_reuse() {
    let f = fresh(&[("cache-control", "max-age=100")], T0, T0);
    assert_eq!(
        f.reuse(&Directives::parse("no-cache"), false, T0 + 1),
        Reuse::Revalidate
    );
    assert_eq!(
        f.reuse(&Directives::parse("max-age=5"), false, T0 + 6),
        Reuse::Revalidate
    );
    assert_eq!(
        f.reuse(&Directives::parse("max-age=5"), false, T0 + 4),
        Reuse::Fresh
    );
    assert_eq!(
        f.reuse(&Directives::parse("min-fresh=50"), false, T0 + 60),
        Reuse::Revalidate
    );
    assert_eq!(
        f.reuse(&Directives::parse("max-stale=20"), false, T0 + 110),
        Reuse::StaleAllowed
    );
    assert_eq!(
        f.reuse(&Directives::parse("max-stale=5"), false, T0 + 110),
        Reuse::Revalidate
    );
}

#[test]
fn no_cache_response_always_revalidates() {
    let f = fresh(
        &[
            ("cache-control", "no-cache, max-age=100"),
            ("etag", "\"1\""),
        ],
        T0,
        T0,
    );
    assert_eq!(
        f.reuse(&Directives::default(), false, T0),
        Reuse::Revalidate
    );
}

#[test]
fn stale_while_revalidate_window() {
    let f = fresh(
        &[("cache-control", "max-age=10, stale-while-revalidate=20")],
        T0,
        T0,
    );
    let none = Directives::default();
    assert_eq!(f.reuse(&none, false, T0 + 15), Reuse::StaleWhileRevalidate);
    assert_eq!(f.reuse(&none, false, T0 + 30), Reuse::StaleWhileRevalidate);
    assert_eq!(f.reuse(&none, false, T0 + 31), Reuse::Revalidate);
}

#[test]
fn must_revalidate_and_s_maxage_forbid_stale() {
    for cc in [
        "max-age=10, stale-while-revalidate=20, must-revalidate",
        "max-age=10, stale-while-revalidate=20, proxy-revalidate",
        "s-maxage=10, stale-while-revalidate=20, stale-if-error=60",
    ] {
        let f = fresh(&[("cache-control", cc)], T0, T0);
        assert_eq!(
            f.reuse(&Directives::parse("max-stale"), false, T0 + 15),
            Reuse::Revalidate,
            "{cc}"
        );
        assert!(
            !f.stale_if_error(&Directives::parse("stale-if-error=100"), T0 + 15),
            "{cc}"
        );
    }
}

#[test]
fn stale_if_error_window_from_response_or_request() {
    let f = fresh(
        &[("cache-control", "max-age=10, stale-if-error=60")],
        T0,
        T0,
    );
    let none = Directives::default();
    assert!(f.stale_if_error(&none, T0 + 70));
    assert!(!f.stale_if_error(&none, T0 + 71));
    let g = fresh(&[("cache-control", "max-age=10")], T0, T0);
    assert!(!g.stale_if_error(&none, T0 + 20));
    assert!(g.stale_if_error(&Directives::parse("stale-if-error=30"), T0 + 20));
}

#[test]
fn authorization_bypasses_unshared_entries() {
    let f = fresh(&[("cache-control", "max-age=100")], T0, T0);
    assert_eq!(f.reuse(&Directives::default(), true, T0), Reuse::Bypass);
    let g = fresh(&[("cache-control", "public, max-age=100")], T0, T0);
    assert_eq!(g.reuse(&Directives::default(), true, T0), Reuse::Fresh);
}

#[test]
fn vary_fields_and_secondary_keys() {
    let r = h(&[
        ("vary", "Accept-Language, accept"),
        ("vary", "accept-language"),
    ]);
    let f = vary_fields(&r).unwrap();
    assert_eq!(
        f.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["accept", "accept-language"]
    );
    let a = secondary_key(
        &f,
        &h(&[("accept-language", "en"), ("accept", "text/html")]),
    );
    let b = secondary_key(
        &f,
        &h(&[("accept-language", "de"), ("accept", "text/html")]),
    );
    let c = secondary_key(
        &f,
        &h(&[("accept", "text/html"), ("accept-language", "en")]),
    );
    assert_ne!(a, b);
    assert_eq!(a, c);
    // Whitespace differences do not split variants.
    let d = secondary_key(
        &f,
        &h(&[("accept-language", "en"), ("accept", "text/html ")]),
    );
    assert_eq!(a, d);
    // Absent header is its own variant.
    let e = secondary_key(&f, &h(&[("accept", "text/html")]));
    assert_ne!(a, e);
    assert!(vary_fields(&h(&[("vary", "*")])).is_err());
}

#[test]
fn accept_encoding_is_normalised_in_keys() {
    let f = vec![header::ACCEPT_ENCODING];
    let a = secondary_key(&f, &h(&[("accept-encoding", "gzip, deflate")]));
    let b = secondary_key(&f, &h(&[("accept-encoding", "deflate, gzip;q=0.9")]));
    assert_eq!(a, b);
}

#[test]
fn encoding_negotiation() {
    let n = |v: &str| negotiate_encoding(&h(&[("accept-encoding", v)]));
    assert_eq!(n("gzip, deflate, br"), Coding::Br);
    assert_eq!(n("gzip"), Coding::Gzip);
    assert_eq!(n("br;q=0.5, gzip"), Coding::Gzip);
    assert_eq!(n("br;q=0, gzip;q=0"), Coding::Identity);
    assert_eq!(n("*"), Coding::Br);
    assert_eq!(n("*;q=0"), Coding::Identity);
    assert_eq!(n("identity"), Coding::Identity);
    assert_eq!(negotiate_encoding(&HeaderMap::new()), Coding::Identity);
}

#[test]
fn compressible_types() {
    let c = |s: &str| compressible(Some(&HeaderValue::from_str(s).unwrap()));
    assert!(c("text/html; charset=utf-8"));
    assert!(c("application/json"));
    assert!(c("application/problem+json"));
    assert!(c("application/javascript"));
    assert!(c("image/svg+xml"));
    assert!(c("application/xml"));
    assert!(!c("image/png"));
    assert!(!compressible(None));
}

#[test]
fn merge_304_replaces_fields_but_keeps_length_and_coding() {
    let mut stored = h(&[
        ("content-length", "10"),
        ("content-encoding", "gzip"),
        ("etag", "W/\"1\""),
        ("cache-control", "max-age=1"),
        ("x-a", "old"),
    ]);
    let fresh = h(&[
        ("content-length", "0"),
        ("etag", "\"1\""),
        ("cache-control", "max-age=99"),
        ("x-a", "new1"),
        ("x-a", "new2"),
        ("connection", "close"),
    ]);
    merge_304(&mut stored, &fresh, true);
    assert_eq!(stored["content-length"], "10");
    assert_eq!(stored["content-encoding"], "gzip");
    assert_eq!(stored["etag"], "W/\"1\"");
    assert_eq!(stored["cache-control"], "max-age=99");
    assert_eq!(stored.get_all("x-a").iter().count(), 2);
    assert!(!stored.contains_key("connection"));
}

#[test]
fn unsafe_methods_invalidate_on_success_only() {
    assert!(invalidates(&Method::POST, StatusCode::OK));
    assert!(invalidates(&Method::DELETE, StatusCode::NO_CONTENT));
    assert!(invalidates(&Method::PUT, StatusCode::SEE_OTHER));
    assert!(!invalidates(
        &Method::POST,
        StatusCode::INTERNAL_SERVER_ERROR
    ));
    assert!(!invalidates(&Method::POST, StatusCode::NOT_FOUND));
    assert!(!invalidates(&Method::GET, StatusCode::OK));
}

#[test]
fn location_targets_only_on_the_same_host() {
    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    assert_eq!(
        same_host_target(&v("/a/b"), "ex.com", "/x"),
        Some("/a/b".into())
    );
    assert_eq!(
        same_host_target(&v("http://EX.com/q?1"), "ex.com", "/x"),
        Some("/q?1".into())
    );
    assert_eq!(
        same_host_target(&v("https://other.com/q"), "ex.com", "/x"),
        None
    );
    assert_eq!(same_host_target(&v("//other.com/q"), "ex.com", "/x"), None);
    assert_eq!(
        same_host_target(&v("c"), "ex.com", "/a/b"),
        Some("/a/c".into())
    );
}

#[test]
fn client_conditionals() {
    let stored = h(&[("etag", "\"abc\""), ("last-modified", &date(T0))]);
    assert!(not_modified(
        &h(&[("if-none-match", "\"x\", W/\"abc\"")]),
        &stored
    ));
    assert!(not_modified(&h(&[("if-none-match", "*")]), &stored));
    assert!(!not_modified(&h(&[("if-none-match", "\"x\"")]), &stored));
    // If-None-Match takes precedence over If-Modified-Since.
    assert!(!not_modified(
        &h(&[
            ("if-none-match", "\"x\""),
            ("if-modified-since", &date(T0 + 10))
        ]),
        &stored
    ));
    assert!(not_modified(
        &h(&[("if-modified-since", &date(T0))]),
        &stored
    ));
    assert!(!not_modified(
        &h(&[("if-modified-since", &date(T0 - 1))]),
        &stored
    ));
    assert!(!not_modified(&HeaderMap::new(), &stored));
}

#[test]
fn ranges() {
    let s = h(&[("etag", "\"e\""), ("last-modified", &date(T0))]);
    let r = |v: &str| range(&h(&[("range", v)]), &s, 100);
    assert_eq!(r("bytes=0-9"), RangeAnswer::Partial(0, 9));
    assert_eq!(r("bytes=90-"), RangeAnswer::Partial(90, 99));
    assert_eq!(r("bytes=95-200"), RangeAnswer::Partial(95, 99));
    assert_eq!(r("bytes=-10"), RangeAnswer::Partial(90, 99));
    assert_eq!(r("bytes=-1000"), RangeAnswer::Partial(0, 99));
    assert_eq!(r("bytes=100-"), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=-0"), RangeAnswer::Unsatisfiable);
    assert_eq!(r("bytes=5-1"), RangeAnswer::Full);
    assert_eq!(r("bytes=0-1,5-6"), RangeAnswer::Full);
    assert_eq!(r("items=0-1"), RangeAnswer::Full);
    assert_eq!(
        range(
            &h(&[("range", "bytes=0-1"), ("if-range", "\"e\"")]),
            &s,
            100
        ),
        RangeAnswer::Partial(0, 1)
    );
    assert_eq!(
        range(
            &h(&[("range", "bytes=0-1"), ("if-range", "\"z\"")]),
            &s,
            100
        ),
        RangeAnswer::Full
    );
    assert_eq!(
        range(
            &h(&[("range", "bytes=0-1"), ("if-range", &date(T0))]),
            &s,
            100
        ),
        RangeAnswer::Partial(0, 1)
    );
}

#[test]
fn hop_by_hop_fields_are_stripped() {
    let mut m = h(&[
        ("connection", "close, x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "5"),
        ("x-ok", "1"),
        ("transfer-encoding", "chunked"),
    ]);
    strip_hop_by_hop(&mut m);
    assert_eq!(m.len(), 1);
    assert!(m.contains_key("x-ok"));
}

#[test]
fn must_understand_overrides_no_store_only_for_understood_statuses() {
    let cc = [("cache-control", "max-age=60, must-understand, no-store")];
    assert_eq!(store(&[], 200, &cc), Ok(()));
    assert_eq!(store(&[], 599, &cc), Err(NotStorable::Status));
    assert_eq!(
        store(
            &[],
            599,
            &[("cache-control", "max-age=60, must-understand")]
        ),
        Err(NotStorable::Status)
    );
    // The request's no-store still wins.
    assert_eq!(
        store(&[("cache-control", "no-store")], 200, &cc),
        Err(NotStorable::NoStore)
    );
}

#[test]
fn an_age_list_counts_its_first_member() {
    // cache-tests age-parse-suffix / age-parse-prefix: `Age: 7200, 0` is old.
    assert_eq!(initial_age(&h(&[("age", "7200, 0")]), T0, T0), 7200);
    assert_eq!(initial_age(&h(&[("age", "0, 7200")]), T0, T0), 0);
    let f = fresh(
        &[("cache-control", "max-age=3600"), ("age", "7200, 0")],
        T0,
        T0,
    );
    assert_eq!(
        f.reuse(&Directives::default(), false, T0),
        Reuse::Revalidate
    );
}

#[test]
fn invalid_cdn_cache_control_falls_back_to_cache_control() {
    // cache-tests cdn-cc-invalid-sh-type-unknown and -wrong: the targeted field is not a
    // valid dictionary / has the wrong type, so Cache-Control: no-store governs.
    for cdn in ["max-age=10000, &&&&&", "max-age=\"10000\""] {
        let r = [("cdn-cache-control", cdn), ("cache-control", "no-store")];
        assert!(response_directives(&h(&r)).no_store, "{cdn}");
        assert_eq!(store(&[], 200, &r), Err(NotStorable::NoStore), "{cdn}");
    }
    // A valid one still wins over Cache-Control.
    let r = [
        ("cdn-cache-control", "max-age=100"),
        ("cache-control", "no-store"),
    ];
    assert_eq!(store(&[], 200, &r), Ok(()));
}

#[test]
fn stale_when_unreachable_within_the_limit_unless_forbidden() {
    let f = fresh(&[("cache-control", "max-age=10")], T0, T0);
    assert!(f.stale_if_unreachable(100, T0 + 110));
    assert!(!f.stale_if_unreachable(100, T0 + 111));
    assert!(!f.stale_if_unreachable(0, T0 + 11), "0 turns it off");
    for cc in [
        "max-age=10, must-revalidate",
        "max-age=10, proxy-revalidate",
        "s-maxage=10",
        "max-age=10, no-cache",
    ] {
        let f = fresh(&[("cache-control", cc)], T0, T0);
        assert!(!f.stale_if_unreachable(100, T0 + 20), "{cc}");
    }
}

#[test]
fn http_dates_are_read_leniently_but_never_wrongly() {
    let exact = parse_http_date("Thu, 18 Aug 2050 02:01:18 GMT").unwrap();
    assert_eq!(exact, 2_544_400_878);
    for v in [
        "THU, 18 Aug 2050 02:01:18 GMT",
        "Thu, 18 AUG 2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 gMT",
        "Mon, 18 Aug 2050 02:01:18 GMT",
        "Thu Aug 18 02:01:18 2050",
        "thu aug 18 02:01:18 2050",
        "Thursday, 18-Aug-50 02:01:18 GMT",
        "MONDAY, 18-aug-50 02:01:18 gmt",
    ] {
        assert_eq!(parse_http_date(v), Some(exact), "{v}");
    }
    assert_eq!(
        parse_http_date("Thu Aug  8 02:01:18 2050"),
        Some(exact - 10 * 86_400)
    );
    assert_eq!(
        parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(
        parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
        Some(784_111_777)
    );
    assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
    for bad in [
        "0",
        "-1",
        "",
        "Thu, 32 Aug 2050 02:01:18 GMT",
        "Thu, 29 Feb 2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 25:01:18 GMT",
        "Thu, 18 Aug 2050 02:01 GMT",
        "Thu, 18 Foo 2050 02:01:18 GMT",
        "tomorrow",
        "18 Aug 2050",
        // Malformed layouts stay invalid (cache-tests freshness-expires-invalid-*).
        "Thu, 18 Aug 50 02:01:18 GMT",
        "Thu 18 Aug 2050 02:01:18 GMT",
        "Thu, 18 Aug  2050 02:01:18 GMT",
        "Thu, 18-Aug-2050 02:01:18 GMT",
        "Thu, 18 Aug 2050 02:01:18 UTC",
        "Thu Aug 18 02:01:18 50",
    ] {
        assert_eq!(parse_http_date(bad), None, "{bad}");
    }
    // An Expires the strict parser refuses but that is a real date still gives freshness.
    let f = fresh(
        &[
            ("expires", "THU, 18 Aug 2050 02:01:18 GMT"),
            ("date", &date(T0)),
        ],
        T0,
        T0,
    );
    assert!(f.lifetime > 0);
}
