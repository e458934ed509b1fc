//! The data API suite: every behaviour of `/api/v1`, written against a base URL so the same
//! checks run against each storage layout (embedded, remote, replicated).

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

fn lsn(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("strata-lsn")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Strata-LSN header on a write")
}

fn etag(r: &reqwest::Response) -> String {
    r.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("ETag header")
        .to_owned()
}

async fn put(c: &Client, url: &str, body: Value) -> reqwest::Response {
    c.put(url).json(&body).send().await.expect("PUT")
}

/// Create, read, replace, delete; status codes, ETags and LSNs.
pub async fn crud(base: &str) {
    let c = super::client();
    let url = format!("{base}/api/v1/users/alice");
    let r = put(&c, &url, json!({"name": "Alice", "age": 30})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["location"], "/api/v1/users/alice");
    let lsn1 = lsn(&r);
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("strata-lsn=")
            && cookie.ends_with(&format!(
                ".{lsn1}; Path=/; Max-Age=300; SameSite=Lax; HttpOnly"
            )),
        "{cookie}"
    );
    let tag1 = etag(&r);
    // Media types compare case-insensitively, parameters aside; any +json type is JSON.
    let r = c
        .put(format!("{base}/api/v1/users/carol"))
        .header(
            "content-type",
            "Application/Vnd.Example+JSON; charset=utf-8",
        )
        .body(r#"{"name":"Carol"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(etag(&r), tag1);
    assert!(r.headers().contains_key("last-modified"));
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"name": "Alice", "age": 30})
    );

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(etag(&r), tag1);

    let r = put(&c, &url, json!({"name": "Alice", "age": 31})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let lsn2 = lsn(&r);
    assert!(lsn2 > lsn1, "LSNs grow: {lsn1} then {lsn2}");
    assert_ne!(etag(&r), tag1);

    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(lsn(&r) > lsn2);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["status"], 404);
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // POST makes time-ordered ids.
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = c
            .post(format!("{base}/api/v1/events"))
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        ids.push(loc.rsplit('/').next().unwrap().to_owned());
        let got: Value = c
            .get(format!("{base}{loc}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, json!({"n": i}));
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "POST ids are time-ordered");
}

/// Listing in id order with cursor pagination, prefix filter and limits.
pub async fn listing(base: &str) {
    let c = super::client();
    for i in 0..25 {
        let r = put(
            &c,
            &format!("{base}/api/v1/items/item-{i:03}"),
            json!({"i": i}),
        )
        .await;
        assert!(r.status().is_success());
    }
    put(&c, &format!("{base}/api/v1/items/other"), json!({"i": -1})).await;
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut url = format!("{base}/api/v1/items?limit=10&prefix=item-");
        if let Some(n) = &next {
            url.push_str(&format!("&after={n}"));
        }
        let page: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 10);
        for it in items {
            seen.push(it["id"].as_str().unwrap().to_owned());
            assert!(it["etag"].as_str().unwrap().starts_with('"'));
            assert!(it["value"]["i"].is_number());
        }
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("item-{i:03}")).collect();
    assert_eq!(seen, expected);
    let all: Value = c
        .get(format!("{base}/api/v1/items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 26);
    let r = c
        .get(format!("{base}/api/v1/items?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .get(format!("{base}/api/v1/items?limit=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let empty: Value = c
        .get(format!("{base}/api/v1/nothing-here"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(empty, json!({"items": [], "next": null}));
}

/// JSON Merge Patch (RFC 7396).
pub async fn merge_patch(base: &str) {
    let c = super::client();
    let url = format!("{base}/api/v1/docs/d1");
    put(
        &c,
        &url,
        json!({"a": 1, "b": {"c": 2, "d": 3}, "keep": true}),
    )
    .await;
    let r = c
        .patch(&url)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"a": null, "b": {"c": 20}, "new": [1,2]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    lsn(&r);
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        got,
        json!({"b": {"c": 20, "d": 3}, "keep": true, "new": [1, 2]})
    );
    let r = c
        .patch(format!("{base}/api/v1/docs/missing"))
        .header("content-type", "application/merge-patch+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Concurrent patches of different fields all land.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            c.patch(&url)
                .header("content-type", "application/json")
                .body(format!("{{\"f{i}\": {i}}}"))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let got: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    for i in 0..10 {
        assert_eq!(got[format!("f{i}")], json!(i), "patch {i} lost: {got}");
    }
}

/// Batches are atomic: one bad write and nothing applies.
pub async fn batch_atomicity(base: &str) {
    let c = super::client();
    let batch = format!("{base}/api/v1/batch");
    put(&c, &format!("{base}/api/v1/acct/a"), json!({"bal": 100})).await;
    let r = c
        .post(&batch)
        .json(&json!({"writes": [
            {"op": "put", "collection": "acct", "id": "a", "value": {"bal": 50}},
            {"op": "put", "collection": "acct", "id": "b", "value": {"bal": 50}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let l = lsn(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["lsn"], json!(l));
    assert_eq!(v["results"][1]["created"], json!(true));
    let tag_a = v["results"][0]["etag"].as_str().unwrap().to_owned();

    // A failing precondition in the middle: nothing applies.
    let r = c
        .post(&batch)
        .json(&json!({"writes": [
            {"op": "put", "collection": "acct", "id": "a", "value": {"bal": 0}},
            {"op": "put", "collection": "acct", "id": "c", "value": {"bal": 1}, "if_match": "\"999999\""},
            {"op": "delete", "collection": "acct", "id": "b"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    // An invalid id in the middle: nothing applies.
    let r = c
        .post(&batch)
        .json(&json!({"writes": [
            {"op": "put", "collection": "acct", "id": "a", "value": {"bal": 0}},
            {"op": "put", "collection": "acct", "id": "bad id!", "value": {}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    for (id, bal) in [("a", 50), ("b", 50)] {
        let got: Value = c
            .get(format!("{base}/api/v1/acct/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, json!({"bal": bal}));
    }
    assert_eq!(
        c.get(format!("{base}/api/v1/acct/c"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Conditional batch that holds.
    let r = c
        .post(&batch)
        .json(&json!({"writes": [
            {"op": "put", "collection": "acct", "id": "a", "value": {"bal": 49}, "if_match": tag_a},
            {"op": "put", "collection": "acct", "id": "c", "value": {"bal": 1}, "if_none_match": "*"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for bad in [
        json!({"writes": []}),
        json!({"writes": [{"op": "frobnicate", "collection": "a", "id": "b"}]}),
        json!({"writes": [{"op": "put", "collection": "a", "id": "b"}]}),
        json!({"nope": 1}),
    ] {
        let r = c.post(&batch).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// Every conditional-request case.
pub async fn conditionals(base: &str) {
    let c = super::client();
    let url = format!("{base}/api/v1/cond/x");
    // Create-only.
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .json(&json!({"v": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let tag = etag(&r);
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .json(&json!({"v": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    // If-Match mismatch / match.
    let r = c
        .put(&url)
        .header("if-match", "\"12345678\"")
        .json(&json!({"v": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c
        .put(&url)
        .header("if-match", "W/\"1\"")
        .json(&json!({"v": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c
        .put(&url)
        .header("if-match", &tag)
        .json(&json!({"v": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tag2 = etag(&r);
    let r = c
        .put(&url)
        .header("if-match", &tag)
        .json(&json!({"v": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PRECONDITION_FAILED,
        "old ETag no longer matches"
    );
    // If-None-Match on GET.
    let r = c
        .get(&url)
        .header("if-none-match", &tag2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag(&r), tag2);
    let r = c
        .get(&url)
        .header("if-none-match", format!("\"1\", {tag2}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = c
        .get(&url)
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let lm = r.headers()["last-modified"].to_str().unwrap().to_owned();
    let r = c
        .get(&url)
        .header("if-modified-since", &lm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // If-Match on PATCH and DELETE.
    let r = c
        .patch(&url)
        .header("if-match", &tag)
        .header("content-type", "application/json")
        .body("{\"w\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c
        .delete(&url)
        .header("if-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = c
        .delete(&url)
        .header("if-match", &tag2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = c
        .put(&url)
        .header("if-match", "*")
        .json(&json!({"v": 6}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PRECONDITION_FAILED,
        "If-Match: * needs an existing record"
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// Bad input of every kind gets the right status, and the data that was there is intact.
pub async fn bad_inputs(base: &str, max_body: usize) {
    let c = super::client();
    let good = format!("{base}/api/v1/safe/keep");
    put(&c, &good, json!({"precious": true})).await;
    let target = format!("{base}/api/v1/safe/keep");
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(max_body));
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode)> = vec![
        (
            "bad JSON",
            c.put(&target)
                .header("content-type", "application/json")
                .body("{\"x\": "),
            StatusCode::BAD_REQUEST,
        ),
        (
            "trailing garbage",
            c.put(&target)
                .header("content-type", "application/json")
                .body("{} {}"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no content type",
            c.put(&target).body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "text content type",
            c.put(&target)
                .header("content-type", "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "a +json type that only looks like one",
            c.put(&target)
                .header("content-type", "application/+json")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "oversize",
            c.put(&target)
                .header("content-type", "application/json")
                .body(big.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "bad id",
            c.put(format!("{base}/api/v1/safe/bad%20id"))
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "dot id",
            c.put(format!("{base}/api/v1/safe/.hidden"))
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "long id",
            c.put(format!("{base}/api/v1/safe/{}", "x".repeat(200)))
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad collection",
            c.get(format!("{base}/api/v1/sa$fe")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown path",
            c.get(format!("{base}/api/v1/safe/keep/deeper")),
            StatusCode::NOT_FOUND,
        ),
        (
            "unknown api version",
            c.get(format!("{base}/api/v2/safe")),
            StatusCode::NOT_FOUND,
        ),
        (
            "wrong method",
            c.post(&target).json(&json!({})),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "bad If-None-Match on write",
            c.put(&target)
                .header("if-none-match", "\"1\"")
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "patch create",
            c.patch(format!("{base}/api/v1/safe/new"))
                .header("if-none-match", "*")
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown query",
            c.get(format!("{base}/api/v1/safe?bogus=1")),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (name, req, want) in cases {
        let r = req.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status(), want, "{name}");
        if want == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(
                r.headers()["allow"],
                "GET, HEAD, PUT, PATCH, DELETE",
                "{name}"
            );
        }
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["status"], json!(want.as_u16()), "{name}");
        assert!(
            p["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}"
        );
        let got: Value = c.get(&good).send().await.unwrap().json().await.unwrap();
        assert_eq!(got, json!({"precious": true}), "data intact after {name}");
    }
    assert_eq!(
        c.get(format!("{base}/api/v1/safe/new"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

/// Runs the whole suite in order.
pub async fn all(base: &str, max_body: usize) {
    crud(base).await;
    listing(base).await;
    merge_patch(base).await;
    batch_atomicity(base).await;
    conditionals(base).await;
    bad_inputs(base, max_body).await;
}
