//! The admin dashboard at `/admin/`, rendered by a real headless Chromium against a real
//! node (app + embedded storage + balancer + edge in one process), and checked against
//! `/admin/status`: what the page shows is what the node reports.
//!
//! Chromium: Debian's `chromium` package (`.ci/run` installs it). Set `STRATA_CHROMIUM` to
//! use another binary. Without one the test fails when `CI` is set and is skipped, loudly,
//! otherwise.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, Node};
use serde_json::Value;

const ADMIN_TOKEN: &str = "dashboard-admin-token-1";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The Chromium to drive, or `None` (after saying so) when there is none and this is not CI.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STRATA_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let how = "the dashboard test needs headless Chromium: `sudo apt-get install -y chromium` \
               (Debian/Ubuntu), or set STRATA_CHROMIUM=/path/to/chrome";
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{how}");
    }
    eprintln!("\n*** SKIPPED: {how} ***\n");
    None
}

/// Loads `url` in headless Chromium, runs its scripts for `budget` of virtual time, and
/// returns the DOM as it then is.
fn dump_dom(chrome: &PathBuf, url: &str, budget: Duration) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish rendering {url} within 90s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader")
}

/// One element showing a status value: its `data-k` path, `data-v` raw JSON and its text.
#[derive(Debug)]
struct Shown {
    path: String,
    raw: Value,
    text: String,
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Every element with `data-k` and `data-v` in serialised DOM text (attribute values are
/// quoted and escaped by Chromium's serialiser, so a plain scan is exact).
fn shown(dom: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find(" data-k=\"") {
        let tag_start = rest[..i].rfind('<').unwrap_or(0);
        let after = &rest[i + 9..];
        let Some(end) = after.find('"') else { break };
        let path = unescape(&after[..end]);
        let tag_end = rest[i..].find('>').map(|e| i + e).unwrap_or(rest.len());
        let tag = &rest[tag_start..tag_end];
        let text_end = rest[tag_end..]
            .find('<')
            .map(|e| tag_end + e)
            .unwrap_or(rest.len());
        let text = unescape(rest.get(tag_end + 1..text_end).unwrap_or(""));
        if let Some(v) = tag
            .split(" data-v=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            let raw = serde_json::from_str(&unescape(v)).unwrap_or(Value::Null);
            out.push(Shown { path, raw, text });
        }
        rest = &rest[tag_end.min(rest.len())..];
    }
    out
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match v {
        Value::Array(a) => k
            .parse::<usize>()
            .ok()
            .and_then(|i| a.get(i))
            .unwrap_or(&Value::Null),
        _ => v.get(k).unwrap_or(&Value::Null),
    })
}

fn one<'a>(items: &'a [Shown], path: &str) -> &'a Shown {
    items
        .iter()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("the page shows nothing for {path}"))
}

/// Is `id`'s element marked hidden in the DOM text?
fn hidden(dom: &str, id: &str) -> bool {
    let needle = format!("id=\"{id}\"");
    let Some(i) = dom.find(&needle) else {
        panic!("no element #{id}")
    };
    let start = dom[..i].rfind('<').unwrap_or(0);
    let end = dom[i..].find('>').map_or(dom.len(), |e| i + e);
    dom[start..end].contains(" hidden")
}

async fn status(admin: &str) -> Value {
    client()
        .get(format!("{admin}/admin/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status json")
}

/// A node with every HTTP role: the balancer fronts this node's app and a dead backend,
/// the edge fronts the balancer. With `token`, the node's endpoints (the admin API
/// included) need [`ADMIN_TOKEN`].
fn start_node(token: bool) -> (Node, tempfile::TempDir, u16, u16, u16) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (app, balancer, dead) = (free_port(), free_port(), free_port());
    let text = format!(
        "[node]\nname = \"dash-node\"\ndata_dir = \"{data}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n\
         [app]\nlisten = \"127.0.0.1:{app}\"\n\n\
         [balancer]\nlisten = \"127.0.0.1:{balancer}\"\nbackends = [\"127.0.0.1:{app}\", \"127.0.0.1:{dead}\"]\n\
         [balancer.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\n\n\
         [edge]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:{balancer}\"]\n{tokens}",
        data = tmp.path().join("data").display(),
        tokens = if token {
            format!("[[edge.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"{ADMIN_TOKEN}\"\n")
        } else {
            String::new()
        },
    );
    let node = Node::start_with(tmp.path(), &text);
    (node, tmp, app, balancer, dead)
}

#[tokio::test]
async fn dashboard_in_chromium_shows_what_admin_status_says() {
    let Some(chrome) = chromium() else { return };
    let (node, _tmp, _app, _balancer, dead) = start_node(false);
    let admin = node.admin_url();
    let edge = format!("http://{}", node.listening["edge"]);
    let c = client();

    // Traffic: writes to the app, reads through edge → balancer → app.
    for i in 0..5 {
        let r = c
            .put(format!("{}/api/v1/notes/n{i}", node.url()))
            .json(&serde_json::json!({ "i": i }))
            .send()
            .await
            .expect("put");
        assert!(r.status().is_success(), "{}", r.status());
    }
    for _ in 0..6 {
        let r = c
            .get(format!("{edge}/api/v1/notes/n1"))
            .send()
            .await
            .expect("get via edge");
        assert_eq!(r.status(), 200);
    }
    // Wait until the balancer has marked the dead backend down.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&admin).await;
        if at(&s, "components.balancer.backends.1.healthy") == &Value::Bool(false) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead backend never marked down: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("{admin}/admin/?interval=500");
    let dom =
        tokio::task::spawn_blocking(move || dump_dom(&chrome, &url, Duration::from_millis(4000)))
            .await
            .expect("chromium");
    let s = status(&admin).await;
    let items = shown(&dom);
    assert!(hidden(&dom, "login"), "token prompt still shown");
    assert!(hidden(&dom, "problem"), "the page reports a problem: {dom}");

    // Identity, roles, readiness.
    assert_eq!(one(&items, "node").text, "dash-node");
    for (i, role) in ["app", "balancer", "edge"].iter().enumerate() {
        assert_eq!(at(&s, &format!("roles.{i}")), role);
        assert_eq!(one(&items, &format!("roles.{i}")).text, *role);
    }
    assert_eq!(s["ready"], true);
    assert_eq!(one(&items, "ready").text, "ready");
    assert_eq!(one(&items, "config.version").text, s["config"]["version"]);

    // Storage: the five writes.
    let lsn = one(&items, "components.app.storage.last_lsn");
    assert_eq!(lsn.text, "5");
    assert_eq!(s["components"]["app"]["storage"]["last_lsn"], 5);
    assert_eq!(one(&items, "components.app.storage.records").text, "5");

    // Balancer: both backends, one healthy and one down, as status says.
    let up = one(&items, "components.balancer.backends.0.state");
    let down = one(&items, "components.balancer.backends.1.state");
    assert_eq!(up.text, "healthy");
    assert_eq!(
        down.text,
        s["components"]["balancer"]["backends"][1]["state"]
    );
    assert_ne!(down.text, "healthy");
    assert_eq!(
        one(&items, "components.balancer.backends.1.address").text,
        format!("127.0.0.1:{dead}")
    );
    let sent: u64 = one(&items, "components.balancer.backends.0.requests")
        .text
        .replace(',', "")
        .parse()
        .expect("requests is a number");
    assert!(sent >= 1, "the balancer forwarded the edge's misses");

    // Edge cache: six lookups.
    let hits = s["components"]["edge"]["hits"].as_u64().expect("hits");
    let misses = s["components"]["edge"]["misses"].as_u64().expect("misses");
    assert!(hits + misses >= 6, "{s}");
    assert_eq!(one(&items, "components.edge.hits").text, hits.to_string());
    assert_eq!(
        one(&items, "components.edge.misses").text,
        misses.to_string()
    );

    // Everything else shown matches status too (the node is idle now, so only gauges of
    // connections and time can have moved between the page's last poll and ours).
    let volatile = [
        "open_connections",
        "idle_connections",
        "in_flight",
        "connections",
        "disk_bytes",
        "lag_seconds",
        "uptime_seconds",
        "ejected_for_ms",
    ];
    let mut compared = 0;
    for item in items.iter().filter(|i| i.path.starts_with("components.")) {
        if volatile.iter().any(|v| item.path.ends_with(v)) {
            continue;
        }
        let want = at(&s, &item.path);
        if item.path.ends_with("hit_ratio") {
            let (a, b) = (item.raw.as_f64(), want.as_f64());
            assert!(
                matches!((a, b), (Some(a), Some(b)) if (a - b).abs() < 1e-9),
                "{}: page {:?}, status {want}",
                item.path,
                item.raw
            );
        } else {
            assert_eq!(&item.raw, want, "{} differs from /admin/status", item.path);
        }
        if let Some(n) = want.as_u64() {
            // Integers are shown as numbers (with thousands separators) or as sizes.
            if !item.path.ends_with("bytes") && !item.path.ends_with("bytes_from_cache") {
                assert_eq!(item.text.replace(',', ""), n.to_string(), "{}", item.path);
            }
        }
        compared += 1;
    }
    assert!(compared >= 25, "only {compared} values compared");

    // Charts: the request-rate chart has drawn a line from successive samples.
    let rate_chart = dom
        .split("id=\"chart-rate\"")
        .nth(1)
        .and_then(|r| r.split("</svg>").next())
        .expect("rate chart");
    assert!(
        rate_chart.contains("<polyline"),
        "no rate line: {rate_chart}"
    );
    assert!(dom.contains("id=\"chart-hits\""));
    assert!(dom.contains("id=\"chart-lag\""));
}

#[tokio::test]
async fn dashboard_assets_are_public_and_status_is_not() {
    let (node, _tmp, ..) = start_node(true);
    let admin = node.admin_url();
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");

    let r = c.get(format!("{admin}/admin")).send().await.expect("get");
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/admin/");

    let r = c.get(format!("{admin}/admin/")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let html = r.text().await.expect("html");
    assert!(html.contains("dashboard.js") && html.contains("dashboard.css"));
    for (path, ty) in [
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
    ] {
        let r = c
            .get(format!("{admin}/admin/{path}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], ty);
    }
    let r = c
        .post(format!("{admin}/admin/"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 405);

    // The data stays behind the token; with it, status carries per-role request counts.
    let r = c
        .get(format!("{admin}/admin/status"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
    c.put(format!("{}/api/v1/notes/a", node.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"ok": true}))
        .send()
        .await
        .expect("put");
    let s = status(&admin).await;
    assert!(
        s["requests"]["app"]["total"].as_u64().unwrap_or(0) >= 1,
        "{s}"
    );
    assert_eq!(s["requests"]["app"]["errors"], 0);
}

#[tokio::test]
async fn dashboard_in_chromium_asks_for_the_admin_token() {
    let Some(chrome) = chromium() else { return };
    let (node, _tmp, ..) = start_node(true);
    let url = format!("{}/admin/?interval=500", node.admin_url());

    // Without a token the page asks for one and shows no data.
    let (chrome2, url2) = (chrome.clone(), url.clone());
    let dom =
        tokio::task::spawn_blocking(move || dump_dom(&chrome2, &url2, Duration::from_millis(1500)))
            .await
            .expect("chromium");
    assert!(!hidden(&dom, "login"), "no token prompt: {dom}");
    assert!(hidden(&dom, "overview"), "data shown without a token");
    assert!(
        !dom.contains("data-k=\"components."),
        "data shown without a token"
    );

    // A wrong token is refused and the prompt says so.
    let (chrome2, url2) = (chrome.clone(), format!("{url}#token=wrong-token-value"));
    let dom =
        tokio::task::spawn_blocking(move || dump_dom(&chrome2, &url2, Duration::from_millis(1500)))
            .await
            .expect("chromium");
    assert!(!hidden(&dom, "login"), "no token prompt: {dom}");
    assert!(dom.contains("The token was refused"), "{dom}");
    assert!(
        !dom.contains("data-k=\"components."),
        "data shown with a wrong token"
    );

    // With the token (in the fragment, as an operator's link would pass it) it shows it all.
    let url2 = format!("{url}#token={ADMIN_TOKEN}");
    let dom =
        tokio::task::spawn_blocking(move || dump_dom(&chrome, &url2, Duration::from_millis(2000)))
            .await
            .expect("chromium");
    let items = shown(&dom);
    assert!(hidden(&dom, "login"), "token prompt still shown");
    assert_eq!(one(&items, "node").text, "dash-node");
    assert_eq!(one(&items, "ready").text, "ready");
    let s = status(&node.admin_url()).await;
    assert_eq!(
        one(&items, "components.balancer.backends.0.address").raw,
        s["components"]["balancer"]["backends"][0]["address"]
    );
    assert!(!dom.contains(ADMIN_TOKEN), "the token leaked into the DOM");
}
