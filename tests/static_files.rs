//! Static files through the real binary: types, validators, ranges, cache rules, and path
//! traversal in every form sent as raw bytes (an HTTP client would normalise them away).

mod common;

use std::time::Duration;

use common::{client, raw, raw_status, Node};
use reqwest::StatusCode;

fn site() -> (tempfile::TempDir, Node) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("site");
    std::fs::create_dir_all(root.join("assets")).unwrap();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("docs/index.html"), "<h1>docs</h1>").unwrap();
    std::fs::write(root.join("assets/app.3f9a.js"), "console.log(1)").unwrap();
    std::fs::write(root.join("file1k"), "x".repeat(1024)).unwrap();
    std::fs::write(tmp.path().join("secret.txt"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root.join("escape.txt")).unwrap();
    let text = common::app_config(
        tmp.path(),
        &format!("static_dir = \"{}\"\n", root.display()),
    );
    let node = Node::start_with(tmp.path(), &text);
    (tmp, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_files_with_validators_ranges_and_rules() {
    let (_tmp, node) = site();
    let c = client();
    let base = node.url();
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(r.text().await.unwrap(), "<h1>home</h1>");
    let r = c
        .get(format!("{base}/index.html"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    let r = c
        .get(format!("{base}/assets/app.3f9a.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));

    let r = c
        .get(format!("{base}/file1k"))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1024");
    assert_eq!(r.bytes().await.unwrap().len(), 10);
    let r = c
        .get(format!("{base}/file1k"))
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = c.head(format!("{base}/file1k")).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], "1024");
    let r = c.get(format!("{base}/nope.txt")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c.delete(format!("{base}/file1k")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn path_traversal_in_every_form_is_404_and_never_leaks() {
    let (_tmp, node) = site();
    let addr = node.app.unwrap();
    let attempts = [
        "/../secret.txt",
        "/../../../../etc/passwd",
        "/docs/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/%2e%2e/etc/passwd",
        "/docs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/..%2fsecret.txt",
        "/..%5csecret.txt",
        "/..\\secret.txt",
        "/%252e%252e/secret.txt",
        "/escape.txt",
        "/docs/%00/../../secret.txt",
        "//etc/passwd",
        "/.%2e/secret.txt",
    ];
    for path in attempts {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = raw(addr, req.as_bytes(), Duration::from_secs(3));
        assert!(
            !out.contains("TOP SECRET") && !out.contains("root:"),
            "{path} leaked: {out}"
        );
        let status = raw_status(&out);
        assert!(matches!(status, Some(404) | Some(400)), "{path}: {out}");
        // Good data intact after each attempt.
        let ok = raw(
            addr,
            b"GET /file1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(3),
        );
        assert_eq!(raw_status(&ok), Some(200), "after {path}");
    }
}
