//! Reading a config file into the model, with errors a user can act on: file, line, column,
//! and a "did you mean" for misspelt keys; then the checks serde cannot express.

use std::path::{Path, PathBuf};

use super::model::{Config, Scope};
use super::secrets;
use super::storage::{StorageMode, StorageTarget};
use super::units::Size;
use crate::storage::protocol::MAX_FRAME_CEILING;

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the model.
    #[error("{path}:{line}:{column}: {message}{}", hint.as_ref().map(|h| format!(" (did you mean `{h}`?)")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column of the offending text.
        column: usize,
        /// What is wrong.
        message: String,
        /// The known key closest to a misspelt one.
        hint: Option<String>,
    },
    /// The config parses but a value is not acceptable.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// The file (or `<default>` for the built-in config).
        path: PathBuf,
        /// Dotted name of the offending setting, e.g. `app.listen`.
        field: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

impl ConfigError {
    /// A validation error about one setting.
    pub fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = parse(path, &text)?;
    validate(path, &config)?;
    Ok(config)
}

/// Parses TOML text into the model, mapping serde's error to file:line:col.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    toml::from_str::<Config>(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((1, 1));
        let message = e.message().trim().to_owned();
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            hint: did_you_mean(&message),
            message,
        }
    })
}

/// Checks what the types alone cannot: listeners opened without auth, limits that make no
/// sense, secrets that cannot be read.
pub fn validate(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let node = &config.node;
    if node.cluster_secret.is_some() && node.cluster_secret_file.is_some() {
        return Err(ConfigError::invalid(
            path,
            "node.cluster_secret",
            "set cluster_secret or cluster_secret_file, not both",
        ));
    }
    if let Some(file) = &node.cluster_secret_file {
        secrets::read_secret_file(file)
            .map_err(|e| ConfigError::invalid(path, "node.cluster_secret_file", e.to_string()))?;
    }
    if let Some(app) = &config.app {
        if app.max_body.bytes() == 0 {
            return Err(ConfigError::invalid(
                path,
                "app.max_body",
                "must be more than 0",
            ));
        }
        if app.list_max_limit == 0 || app.list_default_limit == 0 {
            return Err(ConfigError::invalid(
                path,
                "app.list_default_limit",
                "limits must be at least 1",
            ));
        }
        if app.list_default_limit > app.list_max_limit {
            return Err(ConfigError::invalid(
                path,
                "app.list_default_limit",
                format!(
                    "{} exceeds list_max_limit {}",
                    app.list_default_limit, app.list_max_limit
                ),
            ));
        }
        if app.max_batch_writes == 0 {
            return Err(ConfigError::invalid(
                path,
                "app.max_batch_writes",
                "must be at least 1",
            ));
        }
        if app.http.max_connections == 0 {
            return Err(ConfigError::invalid(
                path,
                "app.http.max_connections",
                "must be at least 1",
            ));
        }
        for (i, token) in app.tokens.iter().enumerate() {
            secrets::resolve_token(token).map_err(|e| {
                ConfigError::invalid(path, &format!("app.tokens[{i}]"), e.to_string())
            })?;
            if token.scopes.is_empty() {
                return Err(ConfigError::invalid(
                    path,
                    &format!("app.tokens[{i}].scopes"),
                    "a token needs at least one scope (read, write, admin)",
                ));
            }
        }
        crate::app::static_files::CacheRules::new(&app.static_cache)
            .map_err(|e| ConfigError::invalid(path, "app.static_cache", e.to_string()))?;
        let exposed = !app.listen.ip().is_loopback() || !node.admin.ip().is_loopback();
        if exposed && app.tokens.is_empty() && !app.allow_anonymous {
            return Err(ConfigError::invalid(
                path,
                "app.tokens",
                "a listener is on a non-loopback address but no tokens are configured; \
                 add [[app.tokens]] or set allow_anonymous = true to serve without authentication",
            ));
        }
    }
    for (i, token) in node.admin_tokens.iter().enumerate() {
        secrets::resolve_token(token).map_err(|e| {
            ConfigError::invalid(path, &format!("node.admin_tokens[{i}]"), e.to_string())
        })?;
        if !token.scopes.contains(&Scope::Admin) {
            return Err(ConfigError::invalid(
                path,
                &format!("node.admin_tokens[{i}].scopes"),
                "an admin token needs the admin scope",
            ));
        }
    }
    validate_storage(path, config)?;
    // A storage node's admin API can promote it: never open to a network.
    if config.storage.is_some()
        && config.app.is_none()
        && node.admin_tokens.is_empty()
        && config.edge.as_ref().is_none_or(|e| e.tokens.is_empty())
        && !node.admin.ip().is_loopback()
    {
        return Err(ConfigError::invalid(
            path,
            "node.admin_tokens",
            "the admin listener is on a non-loopback address but this storage node has no \
             tokens to protect it (/admin/promote); add [[node.admin_tokens]] or keep it on loopback",
        ));
    }
    if let Some(balancer) = &config.balancer {
        crate::balancer::validate(balancer)
            .map_err(|(field, reason)| ConfigError::invalid(path, &field, reason))?;
        if config.app.is_none() && node.admin_tokens.is_empty() && !node.admin.ip().is_loopback() {
            return Err(ConfigError::invalid(
                path,
                "node.admin",
                "the admin listener is on a non-loopback address but a balancer-only node has \
                 no tokens to protect it; add [[node.admin_tokens]] or keep it on loopback",
            ));
        }
    }
    if let Some(edge) = &config.edge {
        edge.validate(path)?;
        // Without an [app] the edge's tokens are the only ones: an exposed admin listener
        // (purge, reload, status) must have one with the admin scope.
        let edge_admin = edge.tokens.iter().any(|t| t.scopes.contains(&Scope::Admin));
        if config.app.is_none() && !node.admin.ip().is_loopback() && !edge_admin {
            return Err(ConfigError::invalid(
                path,
                "node.admin",
                "the admin listener is on a non-loopback address but no [[edge.tokens]] entry \
                 has the admin scope to protect it; add one or keep it on loopback",
            ));
        }
    }
    if config.roles().is_empty() {
        return Err(ConfigError::invalid(
            path,
            "config",
            "no role is switched on; add an [app], [storage], [balancer] or [edge] section",
        ));
    }
    Ok(())
}

/// The storage role and an app's link to remote storage: both need the cluster secret
/// (always, even on loopback: the secret is what keeps another local user's process from
/// reading or writing the data), sane limits, and TLS files that load.
fn validate_storage(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let remote = match config.app.as_ref().map(|a| &a.storage) {
        Some(StorageTarget::Remote(r)) => Some(r),
        _ => None,
    };
    if config.storage.is_none() && remote.is_none() {
        return Ok(());
    }
    match secrets::resolve_cluster_secret(&config.node) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(ConfigError::invalid(
                path,
                "node.cluster_secret",
                format!(
                    "{} needs a cluster secret: set node.cluster_secret_file (a file only its \
                     owner can read), node.cluster_secret, or the {} environment variable",
                    if config.storage.is_some() {
                        "the storage role"
                    } else {
                        "an app with remote storage"
                    },
                    secrets::CLUSTER_SECRET_ENV
                ),
            ))
        }
        Err(e) => {
            return Err(ConfigError::invalid(
                path,
                "node.cluster_secret",
                e.to_string(),
            ))
        }
    }
    if let Some(st) = &config.storage {
        if st.mode == StorageMode::Replica && st.follow.is_none() {
            return Err(ConfigError::invalid(
                path,
                "storage.follow",
                "mode = \"replica\" needs follow = \"host:port\" of the primary",
            ));
        }
        if st.mode == StorageMode::Replica && st.sync_replicas > 0 {
            return Err(ConfigError::invalid(
                path,
                "storage.sync_replicas",
                "only a primary waits for replicas; set it on the primary",
            ));
        }
        if st.mode == StorageMode::Primary && st.follow.is_some() {
            return Err(ConfigError::invalid(
                path,
                "storage.follow",
                "follow is only meaningful with mode = \"replica\"",
            ));
        }
        let max = st.max_frame.as_usize();
        if !(4096..=MAX_FRAME_CEILING).contains(&max) {
            return Err(ConfigError::invalid(
                path,
                "storage.max_frame",
                format!(
                    "must be between 4KiB and {}",
                    Size(MAX_FRAME_CEILING as u64)
                ),
            ));
        }
        if st.max_in_flight == 0 || st.max_connections == 0 {
            return Err(ConfigError::invalid(
                path,
                "storage.max_in_flight",
                "max_in_flight and max_connections must be at least 1",
            ));
        }
        if let Some(tls) = &st.tls {
            crate::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref())
                .map_err(|e| ConfigError::invalid(path, "storage.tls", e.to_string()))?;
        }
    }
    if let Some(r) = remote {
        let Some((host, port)) = r.primary.rsplit_once(':') else {
            return Err(ConfigError::invalid(
                path,
                "app.storage.primary",
                format!("{:?} is not host:port", r.primary),
            ));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(ConfigError::invalid(
                path,
                "app.storage.primary",
                format!("{:?} is not host:port", r.primary),
            ));
        }
        if !(1..=64).contains(&r.connections) {
            return Err(ConfigError::invalid(
                path,
                "app.storage.connections",
                "must be between 1 and 64",
            ));
        }
        let max = r.max_frame.as_usize();
        if !(4096..=MAX_FRAME_CEILING).contains(&max) {
            return Err(ConfigError::invalid(
                path,
                "app.storage.max_frame",
                format!(
                    "must be between 4KiB and {}",
                    Size(MAX_FRAME_CEILING as u64)
                ),
            ));
        }
        if let Some(tls) = &r.tls {
            crate::tls::client_config(&tls.ca, tls.cert.as_deref(), tls.key.as_deref())
                .map_err(|e| ConfigError::invalid(path, "app.storage.tls", e.to_string()))?;
            let name = tls.server_name.as_deref().unwrap_or(host);
            crate::tls::server_name(name.trim_start_matches('[').trim_end_matches(']')).map_err(
                |e| ConfigError::invalid(path, "app.storage.tls.server_name", e.to_string()),
            )?;
        }
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" (also "unknown variant"),
/// the expected name closest to `x`, if any is close enough to be a likely typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (strsim::jaro_winkler(unknown, candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("test.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_column_and_suggests() {
        let e = err("[node]\nname = \"a\"\n\n[app]\nlisen = \"127.0.0.1:1\"\n");
        assert!(e.starts_with("test.toml:5:1: unknown field `lisen`"), "{e}");
        assert!(e.contains("did you mean `listen`?"), "{e}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let e = err("[bogus]\nx = 1\n");
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn bad_units_are_explained() {
        let e = err("[app]\nmax_body = \"lots\"\n");
        assert!(e.starts_with("test.toml:2:12"), "{e}");
        assert!(e.contains("invalid size"), "{e}");
    }

    #[test]
    fn defaults_fill_in() {
        let c = parse(Path::new("t"), "[app]\n").unwrap();
        assert_eq!(c.app.unwrap().max_body.bytes(), 1 << 20);
        assert_eq!(c.node.name, "strata");
    }

    #[test]
    fn storage_only_admin_off_loopback_needs_admin_tokens() {
        let base = "[node]\nadmin = \"0.0.0.0:9900\"\ncluster_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let c = parse(
            Path::new("t"),
            &format!("{base}[storage]\nlisten = \"127.0.0.1:7000\"\n"),
        )
        .unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("node.admin_tokens"), "{e}");
        let read_only = "[[node.admin_tokens]]\nname = \"ops\"\nscopes = [\"read\"]\nvalue = \"t0ken-t0ken-t0ken-t0ken\"\n";
        let c = parse(
            Path::new("t"),
            &format!("{base}{read_only}[storage]\nlisten = \"127.0.0.1:7000\"\n"),
        )
        .unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("admin scope"), "{e}");
        let admin = read_only.replace("\"read\"", "\"admin\"");
        let c = parse(
            Path::new("t"),
            &format!("{base}{admin}[storage]\nlisten = \"127.0.0.1:7000\"\n"),
        )
        .unwrap();
        validate(Path::new("t"), &c).unwrap();
    }

    #[test]
    fn non_loopback_without_tokens_is_refused() {
        let c = parse(Path::new("t"), "[app]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("allow_anonymous"), "{e}");
        let c = parse(
            Path::new("t"),
            "[app]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n",
        )
        .unwrap();
        validate(Path::new("t"), &c).unwrap();
    }

    #[test]
    fn an_exposed_edge_admin_needs_an_admin_token() {
        let edge = "[edge]\nupstreams = [\"127.0.0.1:1\"]\n";
        let exposed = format!("[node]\nadmin = \"0.0.0.0:9900\"\n{edge}");
        let c = parse(Path::new("t"), &exposed).unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("node.admin") && e.contains("edge.tokens"), "{e}");
        let read_only = format!(
            "{exposed}[[edge.tokens]]\nname = \"r\"\nscopes = [\"read\"]\nvalue = \"0123456789abcdef\"\n"
        );
        let c = parse(Path::new("t"), &read_only).unwrap();
        assert!(
            validate(Path::new("t"), &c).is_err(),
            "a read token does not protect admin"
        );
        let admin = format!(
            "{exposed}[[edge.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"0123456789abcdef\"\n"
        );
        let c = parse(Path::new("t"), &admin).unwrap();
        validate(Path::new("t"), &c).unwrap();
        // On loopback no token is needed.
        let c = parse(Path::new("t"), edge).unwrap();
        validate(Path::new("t"), &c).unwrap();
    }

    #[test]
    fn storage_needs_a_secret_and_refuses_replica_mode() {
        let with = "[node]\ncluster_secret = \"0123456789abcdef0\"\n";
        let storage = "[storage]\nlisten = \"127.0.0.1:7000\"\n";
        let c = parse(Path::new("t"), storage).unwrap();
        if std::env::var_os(secrets::CLUSTER_SECRET_ENV).is_none() {
            let e = validate(Path::new("t"), &c).unwrap_err().to_string();
            assert!(e.contains("needs a cluster secret"), "{e}");
        }
        let c = parse(Path::new("t"), &format!("{with}{storage}")).unwrap();
        validate(Path::new("t"), &c).unwrap();
        assert_eq!(c.roles(), vec!["storage"]);
        let c = parse(
            Path::new("t"),
            &format!("{with}{storage}mode = \"replica\"\n"),
        )
        .unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("needs follow"), "{e}");
        let c = parse(
            Path::new("t"),
            &format!("{with}{storage}mode = \"replica\"\nfollow = \"127.0.0.1:7001\"\n"),
        )
        .unwrap();
        validate(Path::new("t"), &c).unwrap();
        let c = parse(
            Path::new("t"),
            &format!("{with}[app]\nstorage = {{ primary = \"nope\" }}\n"),
        )
        .unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("host:port"), "{e}");
        let c = parse(
            Path::new("t"),
            "[node]\ncluster_secret = \"short\"\n[app]\nstorage = { primary = \"db:7000\" }\n",
        )
        .unwrap();
        let e = validate(Path::new("t"), &c).unwrap_err().to_string();
        assert!(e.contains("shorter than"), "{e}");
    }

    #[test]
    fn no_role_is_refused() {
        let c = parse(Path::new("t"), "[node]\nname = \"x\"\n").unwrap();
        assert!(validate(Path::new("t"), &c).is_err());
    }
}
