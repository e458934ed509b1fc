//! Test harness: starts the real `strata` binary on ephemeral loopback ports with a temp
//! data dir, and talks to it over HTTP and raw TCP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// A running `strata serve` process.
pub struct Node {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub app: Option<SocketAddr>,
    /// The storage listener, from "strata: storage listening on tcp://ADDR".
    pub storage: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// Every "strata: <role> listening on http://ADDR" line seen at start, by role.
    pub listening: std::collections::HashMap<String, SocketAddr>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

/// The default app config for tests: loopback, ephemeral ports, data in the temp dir.
pub fn app_config(dir: &Path, extra_app: &str) -> String {
    format!(
        "[node]\nname = \"test\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\n[app]\nlisten = \"127.0.0.1:0\"\n{extra_app}\n",
        dir.join("data").display()
    )
}

impl Node {
    /// Starts a node with an app role whose `[app]` section gets `extra_app` appended.
    pub fn start_app(extra_app: &str) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let text = app_config(tmp.path(), extra_app);
        let mut node = Node::start_with(tmp.path(), &text);
        node._tmp = Some(tmp);
        node
    }

    /// Starts a node from config text written into `dir/strata.toml`.
    pub fn start_with(dir: &Path, config_text: &str) -> Node {
        let config = dir.join("strata.toml");
        std::fs::write(&config, config_text).expect("write config");
        Node::spawn(dir, &config)
    }

    /// Starts (or restarts) the process for an existing config file.
    pub fn spawn(dir: &Path, config: &Path) -> Node {
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn strata");
        let stdout = child.stdout.take().expect("stdout");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                if std::env::var_os("STRATA_TEST_LOG").is_some() {
                    eprintln!("[strata] {line}");
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut app = None;
        let mut storage = None;
        let mut admin = None;
        let mut listening = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "strata did not start: {}",
                        stderr.lock().map(|s| s.clone()).unwrap_or_default()
                    );
                }
            };
            let addr = || {
                line.split("://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            if let Some(role) = line
                .strip_prefix("strata: ")
                .and_then(|r| {
                    r.split_once(" listening on http://")
                        .or_else(|| r.split_once(" listening on https://"))
                })
                .map(|(role, _)| role.to_owned())
            {
                if let Some(a) = addr() {
                    listening.insert(role, a);
                }
            }
            if line.starts_with("strata: app listening on") {
                app = addr();
            } else if line.starts_with("strata: storage listening on") {
                storage = line
                    .split("tcp://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok());
            } else if line.starts_with("strata: admin listening on") {
                admin = addr();
            }
        }
        Node {
            child,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            app,
            storage,
            admin: admin.expect("admin address"),
            listening,
            stderr,
            _tmp: None,
        }
    }

    /// `http://addr` of the app listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.app.expect("app role"))
    }

    /// The node's `/admin/status` document (admin listener, no token).
    pub async fn status(&self) -> serde_json::Value {
        client()
            .get(format!("{}/admin/status", self.admin_url()))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status JSON")
    }

    /// The node's Prometheus metrics, as text (admin listener, no token).
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin_url()))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// One sample of the node's Prometheus metrics, by its full name (with `_total`).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `http://addr` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// kill -9, then start again with the same config and data.
    pub fn restart_after_kill9(mut self) -> Node {
        self.kill9();
        let tmp = self._tmp.take();
        let mut n = Node::spawn(&self.dir, &self.config);
        n._tmp = tmp;
        n
    }

    /// What the process logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster secret the shipped example configs are checked with (those that join
/// nodes over the network need one; `strata check` refuses them without).
pub const EXAMPLE_SECRET: &str = "an-example-secret-of-32-characters";

/// `strata check --config PATH`, with `secret` as the cluster secret, or none at all
/// (the caller's environment never leaks in).
pub fn check_config(path: &Path, secret: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(["check", "--config"]).arg(path);
    match secret {
        Some(s) => cmd.env("STRATA_CLUSTER_SECRET", s),
        None => cmd.env_remove("STRATA_CLUSTER_SECRET"),
    };
    cmd.output().expect("run strata check")
}

/// One of the example configs shipped in the repository's `config/` folder.
pub fn shipped_config(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(file)
}

/// Polls `f` every 20 ms until it is true; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A reqwest client with short timeouts and no proxy.
pub fn client() -> reqwest::Client {
    client_builder().build().expect("client")
}

/// A client that opens a fresh connection per request, for nodes with a short keep-alive
/// limit (`header_read_timeout`): a pooled connection left idle about that long can be
/// reused just as the node closes it, and the request is reset (a race of the test, not a
/// bug of either side).
pub fn unpooled_client() -> reqwest::Client {
    client_builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
}

/// Sends raw bytes on a fresh connection and returns whatever the server answered before
/// closing (or before `wait` passed).
pub fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("timeout");
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response (head and Content-Length body) from `s`; `head_only` for
/// answers to HEAD. Returns the head without its `date` line, and the body.
pub fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> (String, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            let body_len = if head_only || head.starts_with("HTTP/1.1 304") {
                0
            } else {
                len
            };
            if buf.len() >= end + 4 + body_len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + body_len]).into_owned();
                buf.drain(..end + 4 + body_len);
                let head = head
                    .lines()
                    .filter(|l| !l.starts_with("date: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return (head, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "closed early; have {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status code of a raw HTTP response, if there is one.
pub fn raw_status(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}
pub mod fault_proxy;
pub mod suite;
pub mod tls;
