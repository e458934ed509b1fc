//! Running and watching many nodes from one command line: `strata fleet DIR` (every node
//! config of a directory as child processes), `strata status` and `strata reload` (one
//! node by admin address, one config file, or every node of a fleet directory).
//!
//! The supervisor is deliberately plain: it starts storage primaries, replicas, apps,
//! balancers and edges in that order without waiting between them (every role already
//! retries its connections), then polls each child's `/readyz` until all answer 200.

pub mod client;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::config::{self, secrets, Config, ConfigError, Overrides, Scope, Source};

/// Why a fleet command failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The directory could not be read or holds no config.
    #[error("{0}: {1}")]
    Dir(PathBuf, String),
    /// A node config was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Two configs of the fleet would bind the same address.
    #[error("{0} and {1} both use {2}")]
    Clash(String, String, String),
    /// A child process could not be started.
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// Nodes were not ready in time, or one exited while starting.
    #[error("{0}")]
    Start(String),
    /// Children exited unexpectedly or unsuccessfully.
    #[error("{0}")]
    Exited(String),
}

/// One node of a fleet directory.
pub struct Member {
    /// Its config file.
    pub file: PathBuf,
    /// The config, adjusted by the overrides.
    pub config: Config,
    /// Its log prefix: the node name (the file name when two nodes share a name).
    pub label: String,
}

/// The `*.toml` files of a directory, sorted.
pub fn configs_in(dir: &Path) -> Result<Vec<PathBuf>, FleetError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| FleetError::Dir(dir.to_path_buf(), e.to_string()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FleetError::Dir(
            dir.to_path_buf(),
            "no *.toml node configs here".into(),
        ));
    }
    Ok(files)
}

/// Loads every node config of `dir`. `validate` runs the full checks (as `strata serve`
/// would); without it only the TOML is parsed (enough to find admin addresses and tokens).
pub fn members(
    dir: &Path,
    overrides: &Overrides,
    validate: bool,
) -> Result<Vec<Member>, FleetError> {
    let mut out: Vec<Member> = Vec::new();
    for file in configs_in(dir)? {
        let config = if validate {
            Source::file(file.clone(), overrides.clone()).load()?
        } else {
            parse_only(&file, overrides)?
        };
        out.push(Member {
            label: config.node.name.clone(),
            file,
            config,
        });
    }
    let names: Vec<String> = out.iter().map(|m| m.label.clone()).collect();
    for m in &mut out {
        if names.iter().filter(|n| **n == m.label).count() > 1 {
            m.label = m
                .file
                .file_stem()
                .map_or_else(|| m.label.clone(), |s| s.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

fn parse_only(file: &Path, overrides: &Overrides) -> Result<Config, FleetError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let mut config = config::load::parse(file, &text)?;
    overrides
        .apply(&mut config)
        .map_err(|(field, reason)| ConfigError::invalid(file, &field, reason))?;
    Ok(config)
}

/// Start order: storage primaries, replicas, apps, balancers, edges.
fn tier(c: &Config) -> u8 {
    match (&c.storage, &c.app, &c.balancer) {
        (Some(s), _, _) if s.mode == config::StorageMode::Primary => 0,
        (Some(_), _, _) => 1,
        (None, Some(_), _) => 2,
        (None, None, Some(_)) => 3,
        _ => 4,
    }
}

/// The first admin-scoped token a config declares, resolved; `None` if it has none or its
/// value is not available here.
pub fn admin_token(c: &Config) -> Option<String> {
    let mut tokens = c.app.as_ref().map_or_else(Vec::new, |a| a.tokens.clone());
    if let Some(e) = &c.edge {
        tokens.extend(e.tokens.iter().cloned());
    }
    tokens.extend(c.node.admin_tokens.iter().cloned());
    tokens
        .iter()
        .filter(|t| t.scopes.contains(&Scope::Admin))
        .find_map(|t| secrets::resolve_token(t).ok())
}

/// An admin listener to talk to.
pub struct Target {
    /// What to call it in output.
    pub label: String,
    /// `host:port`.
    pub admin: String,
    /// Bearer token for it.
    pub token: Option<String>,
}

/// Resolves what `strata status` / `strata reload` were pointed at: a fleet directory, a
/// config file, or an admin address. `token` (from `--token` or `STRATA_ADMIN_TOKEN`)
/// overrides tokens found in configs.
pub fn targets(
    spec: &str,
    overrides: &Overrides,
    token: Option<String>,
) -> Result<Vec<Target>, FleetError> {
    let path = Path::new(spec);
    let files = if path.is_dir() {
        configs_in(path)?
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Ok(vec![Target {
            label: spec.to_owned(),
            admin: spec.to_owned(),
            token,
        }]);
    };
    let mut out = Vec::new();
    for file in files {
        match parse_only(&file, overrides) {
            Ok(c) => out.push(Target {
                label: c.node.name.clone(),
                admin: c.node.admin.to_string(),
                token: token.clone().or_else(|| admin_token(&c)),
            }),
            // A file being edited may not fit the model (that is what a reload will
            // report): its node still runs, so find its admin address leniently.
            Err(e) => match lenient_admin(&file, overrides) {
                Some((label, admin)) => out.push(Target {
                    label,
                    admin,
                    token: token.clone(),
                }),
                None => return Err(e),
            },
        }
    }
    Ok(out)
}

/// `node.name` and `node.admin` (shifted) of a file that parses as TOML but not as a
/// config.
fn lenient_admin(file: &Path, overrides: &Overrides) -> Option<(String, String)> {
    let v: toml::Value = std::fs::read_to_string(file).ok()?.parse().ok()?;
    let node = v.get("node");
    let default = config::NodeConfig::default();
    let mut admin: std::net::SocketAddr = match node.and_then(|n| n.get("admin")) {
        Some(a) => a.as_str()?.parse().ok()?,
        None => default.admin,
    };
    if admin.port() != 0 {
        admin.set_port(admin.port().checked_add(overrides.port_offset)?);
    }
    let name = node
        .and_then(|n| n.get("name"))
        .and_then(|n| n.as_str())
        .map_or(default.name, str::to_owned);
    Some((name, admin.to_string()))
}

/// `strata status`: the table, and whether every node answered ready.
pub async fn status(targets: &[Target]) -> (String, bool) {
    let mut rows = Vec::new();
    let mut all_ready = true;
    for t in targets {
        let answer = client::call(
            Method::GET,
            &t.admin,
            "/admin/status",
            t.token.as_deref(),
            Duration::from_secs(3),
        )
        .await;
        let row = match answer {
            Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => table::row(&v),
                Err(e) => table::unreachable(&t.label, &format!("bad status JSON: {e}")),
            },
            Ok((code, body)) => table::unreachable(
                &t.label,
                &format!("HTTP {code} {}", body.lines().next().unwrap_or("")),
            ),
            Err(e) => table::unreachable(&t.label, &e.to_string()),
        };
        all_ready &= row.ready == "yes";
        rows.push(row);
    }
    (table::render(&rows), all_ready)
}

/// `strata reload`: asks each node to reload; returns one line per node and whether all
/// applied their new config.
pub async fn reload(targets: &[Target]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for t in targets {
        let answer = client::call(
            Method::POST,
            &t.admin,
            "/admin/reload",
            t.token.as_deref(),
            Duration::from_secs(30),
        )
        .await;
        let line = match answer {
            Ok((code, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if v.get("applied").is_some() => {
                    let applied = v["applied"].as_bool() == Some(true);
                    ok &= applied;
                    let restart = v["restart_required"]
                        .as_array()
                        .filter(|r| !r.is_empty())
                        .map(|r| {
                            format!(
                                "; restart needed for: {}",
                                r.iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                        .unwrap_or_default();
                    if applied {
                        format!(
                            "{}: applied, config version {}{restart}",
                            t.label,
                            v["version"].as_str().unwrap_or("?")
                        )
                    } else {
                        format!(
                            "{}: REFUSED, still running version {}: {}",
                            t.label,
                            v["version"].as_str().unwrap_or("?"),
                            v["message"].as_str().unwrap_or("?")
                        )
                    }
                }
                _ => {
                    ok = false;
                    format!("{}: HTTP {code}: {}", t.label, body.trim())
                }
            },
            Err(e) => {
                ok = false;
                format!("{}: {e}", t.label)
            }
        };
        lines.push(line);
    }
    (lines, ok)
}

/// Set on every child: the supervisor's pid, so a child stops when the supervisor dies
/// without stopping it (see [`stop_with_parent`]).
pub const PARENT_ENV: &str = "STRATA_FLEET_PARENT";

/// In a child of `strata fleet`: asks the kernel for SIGTERM (a graceful stop) when the
/// supervisor dies, so a `kill -9` of the fleet leaves no orphaned nodes. Returns false
/// when the supervisor is already gone.
pub fn stop_with_parent() -> bool {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return true;
    };
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::TERM)) {
        tracing::warn!(error = %e, "cannot tie this node's life to the fleet supervisor");
    }
    // The supervisor may have died before the line above: then our parent changed.
    rustix::process::getppid().map(|p| p.as_raw_pid()) == Some(parent)
}

/// What `strata fleet` was asked to do.
pub struct FleetOptions {
    /// The directory of node configs.
    pub dir: PathBuf,
    /// Port offset and data root, passed on to every child.
    pub overrides: Overrides,
    /// How long to wait for every node to answer `/readyz` with 200.
    pub ready_timeout: Duration,
}

/// What a child printed that the supervisor needs.
#[derive(Default)]
struct Seen {
    admin: Option<String>,
    endpoints: Vec<String>,
}

struct Child {
    label: String,
    roles: String,
    pid: Option<Pid>,
    alive: bool,
    ready: bool,
    last_reason: String,
    seen: Arc<Mutex<Seen>>,
}

/// Runs a fleet until its children exit. Returns an error when a child failed to start,
/// was not ready in time, or exited when not asked to.
pub async fn run(opts: FleetOptions) -> Result<(), FleetError> {
    use tokio::signal::unix::{signal, SignalKind};
    let loaded = match members(&opts.dir, &opts.overrides, true) {
        Err(FleetError::Config(ConfigError::Invalid { field, .. }))
            if field == "node.cluster_secret"
                && std::env::var_os(secrets::CLUSTER_SECRET_ENV).is_none() =>
        {
            // A newcomer's laptop: make one secret for this run and hand it to every child.
            let secret: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            std::env::set_var(secrets::CLUSTER_SECRET_ENV, secret);
            println!(
                "strata fleet: no cluster secret configured; generated one for this run \
                 (set {} to choose it)",
                secrets::CLUSTER_SECRET_ENV
            );
            members(&opts.dir, &opts.overrides, true)?
        }
        other => other?,
    };
    let mut loaded = loaded;
    check_clashes(&loaded)?;
    loaded.sort_by_key(|m| tier(&m.config));
    let width = loaded.iter().map(|m| m.label.len()).max().unwrap_or(0);
    let exe = std::env::current_exe().map_err(|e| FleetError::Spawn("strata".into(), e))?;
    let (out_tx, out_rx) = mpsc::unbounded_channel::<(bool, String)>();
    let printer = tokio::spawn(print_lines(out_rx));
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<(usize, String, bool)>();
    let mut hup = signal(SignalKind::hangup()).map_err(FleetError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(FleetError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(FleetError::Signals)?;

    let mut children: Vec<Child> = Vec::new();
    for (i, m) in loaded.iter().enumerate() {
        // A new tier starts once the previous one is listening (or has had a few seconds),
        // so apps do not spend their first seconds retrying a storage node still booting.
        if i > 0 && tier(&m.config) != tier(&loaded[i - 1].config) {
            wait_listening(&children, Duration::from_secs(10)).await;
        }
        let file = std::path::absolute(&m.file).unwrap_or_else(|_| m.file.clone());
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("serve")
            .arg("--config")
            .arg(&file)
            .arg("--port-offset")
            .arg(opts.overrides.port_offset.to_string());
        if let Some(root) = &opts.overrides.data_root {
            cmd.arg("--data-root").arg(root);
        }
        // Own process group: a terminal's Ctrl-C reaches only the supervisor, which then
        // stops the children once, gracefully.
        cmd.env(
            PARENT_ENV,
            rustix::process::getpid().as_raw_pid().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                signal_all(&children, Signal::TERM);
                return Err(FleetError::Spawn(m.label.clone(), e));
            }
        };
        let seen = Arc::new(Mutex::new(Seen::default()));
        let prefix = format!("{:>width$} | ", m.label);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(
                out,
                prefix.clone(),
                false,
                out_tx.clone(),
                Some(seen.clone()),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, prefix, true, out_tx.clone(), None));
        }
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(Pid::from_raw);
        let exit = exit_tx.clone();
        tokio::spawn(async move {
            let (text, ok) = match child.wait().await {
                Ok(s) => (s.to_string(), s.success()),
                Err(e) => (e.to_string(), false),
            };
            let _ = exit.send((i, text, ok));
        });
        children.push(Child {
            label: m.label.clone(),
            roles: m.config.roles().join(","),
            pid,
            alive: true,
            ready: false,
            last_reason: "not started yet".into(),
            seen,
        });
    }
    drop(exit_tx);
    println!(
        "strata fleet: started {} nodes from {}; waiting until all are ready",
        children.len(),
        opts.dir.display()
    );

    let deadline = tokio::time::Instant::now() + opts.ready_timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut all_ready = false;
    let mut stopping = false;
    let mut problems: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = hup.recv() => {
                println!("strata fleet: SIGHUP: asking every node to reload");
                signal_all(&children, Signal::HUP);
            }
            _ = term.recv() => stop(&children, &mut stopping),
            _ = int.recv() => stop(&children, &mut stopping),
            exited = exit_rx.recv() => {
                let Some((i, text, ok)) = exited else { break };
                let c = &mut children[i];
                c.alive = false;
                if stopping {
                    println!("strata fleet: {} exited ({text})", c.label);
                    if !ok {
                        problems.push(format!("{} exited with {text}", c.label));
                    }
                } else {
                    let msg = format!("{} exited unexpectedly ({text})", c.label);
                    eprintln!("strata fleet: {msg}");
                    problems.push(msg);
                    if !all_ready {
                        eprintln!("strata fleet: stopping the other nodes");
                        stopping = true;
                        signal_all(&children, Signal::TERM);
                    }
                }
                if children.iter().all(|c| !c.alive) {
                    break;
                }
            }
            _ = tick.tick(), if !all_ready && !stopping => {
                for c in children.iter_mut().filter(|c| !c.ready && c.alive) {
                    let admin = c.seen.lock().ok().and_then(|s| s.admin.clone());
                    let Some(admin) = admin else { continue };
                    match client::call(Method::GET, &admin, "/readyz", None, Duration::from_secs(1)).await {
                        Ok((200, _)) => c.ready = true,
                        Ok((_, body)) => c.last_reason = body.trim().to_owned(),
                        Err(e) => c.last_reason = e.to_string(),
                    }
                }
                if children.iter().all(|c| c.ready) {
                    all_ready = true;
                    print_summary(&children);
                } else if tokio::time::Instant::now() >= deadline {
                    let waiting: Vec<String> = children
                        .iter()
                        .filter(|c| !c.ready)
                        .map(|c| format!("{} ({})", c.label, c.last_reason))
                        .collect();
                    let msg = format!(
                        "not ready within {:?}: {}",
                        opts.ready_timeout,
                        waiting.join("; ")
                    );
                    eprintln!("strata fleet: {msg}; stopping");
                    problems.push(msg);
                    stopping = true;
                    signal_all(&children, Signal::TERM);
                }
            }
        }
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), printer).await;
    match (all_ready, problems.is_empty()) {
        (_, true) => Ok(()),
        (false, false) => Err(FleetError::Start(problems.join("; "))),
        (true, false) => Err(FleetError::Exited(problems.join("; "))),
    }
}

/// Refuses a fleet whose nodes would bind the same fixed address (they would fail one by
/// one at start, with a less obvious message).
fn check_clashes(members: &[Member]) -> Result<(), FleetError> {
    let mut used: Vec<(std::net::SocketAddr, &str)> = Vec::new();
    for m in members {
        let c = &m.config;
        let mut addrs = vec![c.node.admin];
        addrs.extend(c.app.as_ref().map(|a| a.listen));
        addrs.extend(c.storage.as_ref().map(|s| s.listen));
        addrs.extend(c.balancer.as_ref().map(|b| b.listen));
        addrs.extend(c.edge.as_ref().map(|e| e.listen));
        for a in addrs.into_iter().filter(|a| a.port() != 0) {
            if let Some((_, other)) = used.iter().find(|(u, _)| *u == a) {
                return Err(FleetError::Clash(
                    (*other).to_owned(),
                    m.label.clone(),
                    a.to_string(),
                ));
            }
            used.push((a, &m.label));
        }
    }
    Ok(())
}

/// Waits until every child started so far has printed its admin address (printed once all
/// of its listeners are bound), or until `limit`.
async fn wait_listening(children: &[Child], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let all = children
            .iter()
            .all(|c| c.seen.lock().map(|s| s.admin.is_some()).unwrap_or(true));
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stop(children: &[Child], stopping: &mut bool) {
    if *stopping {
        println!("strata fleet: second stop signal: killing every node");
        signal_all(children, Signal::KILL);
    } else {
        println!("strata fleet: stopping every node (SIGTERM)");
        *stopping = true;
        signal_all(children, Signal::TERM);
    }
}

fn signal_all(children: &[Child], sig: Signal) {
    for c in children.iter().filter(|c| c.alive) {
        if let Some(pid) = c.pid {
            if let Err(e) = kill_process(pid, sig) {
                eprintln!("strata fleet: cannot signal {}: {e}", c.label);
            }
        }
    }
}

fn print_summary(children: &[Child]) {
    println!("strata fleet: all {} nodes ready", children.len());
    for c in children {
        let seen = c
            .seen
            .lock()
            .map(|s| (s.admin.clone(), s.endpoints.clone()));
        let (admin, endpoints) = seen.unwrap_or_default();
        println!(
            "strata fleet: {} ready ({}): {}; admin http://{}",
            c.label,
            c.roles,
            endpoints.join(", "),
            admin.unwrap_or_default()
        );
    }
}

/// Copies a child's output line by line with its prefix; on stdout, also notes where
/// the child listens.
async fn pump(
    stream: impl tokio::io::AsyncRead + Unpin,
    prefix: String,
    is_err: bool,
    out: mpsc::UnboundedSender<(bool, String)>,
    seen: Option<Arc<Mutex<Seen>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(seen) = &seen {
            if let Some((role, rest)) = line
                .strip_prefix("strata: ")
                .and_then(|r| r.split_once(" listening on "))
            {
                let url = rest.split_whitespace().next().unwrap_or("").to_owned();
                if let Ok(mut s) = seen.lock() {
                    if role == "admin" {
                        s.admin = url.strip_prefix("http://").map(str::to_owned);
                    } else {
                        s.endpoints.push(format!("{role} {url}"));
                    }
                }
            }
        }
        if out.send((is_err, format!("{prefix}{line}"))).is_err() {
            break;
        }
    }
}

/// Writes the children's prefixed lines, one whole line at a time.
async fn print_lines(mut rx: mpsc::UnboundedReceiver<(bool, String)>) {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some((is_err, mut line)) = rx.recv().await {
        line.push('\n');
        let w = if is_err {
            stderr.write_all(line.as_bytes()).await
        } else {
            stdout.write_all(line.as_bytes()).await
        };
        if w.is_err() {
            break;
        }
        let _ = if is_err {
            stderr.flush().await
        } else {
            stdout.flush().await
        };
    }
}
