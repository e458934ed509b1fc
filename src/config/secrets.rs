//! Secrets from inline values, environment variables or files. A secret file that other
//! users can read is refused: a leaked token or cluster secret is worse than a failed start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::model::{NodeConfig, TokenConfig};

/// Environment variable that supplies the cluster secret when the config names none.
pub const CLUSTER_SECRET_ENV: &str = "STRATA_CLUSTER_SECRET";

/// Shortest cluster secret accepted: it is the only thing between the network and the data.
pub const MIN_CLUSTER_SECRET_LEN: usize = 16;

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("secret file {path} is readable by other users (mode {mode:o}); run chmod 600 on it")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The env var is unset or empty.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// Not exactly one source configured, or an empty value.
    #[error("{0}")]
    Source(String),
}

/// Reads a secret file, refusing group- or world-readable ones; trailing newline trimmed.
pub fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(SecretError::Source(format!(
            "secret file {} is empty",
            path.display()
        )));
    }
    Ok(value)
}

/// The token value from whichever single source the config names.
pub fn resolve_token(token: &TokenConfig) -> Result<String, SecretError> {
    let sources = [
        token.value.is_some(),
        token.value_env.is_some(),
        token.value_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(SecretError::Source(format!(
            "token {:?} needs exactly one of value, value_env, value_file",
            token.name
        )));
    }
    let value = if let Some(v) = &token.value {
        v.clone()
    } else if let Some(var) = &token.value_env {
        std::env::var(var).map_err(|_| SecretError::MissingEnv(var.clone()))?
    } else if let Some(file) = &token.value_file {
        read_secret_file(file)?
    } else {
        unreachable!("exactly one source was checked above")
    };
    if value.len() < 8 {
        return Err(SecretError::Source(format!(
            "token {:?} is shorter than 8 characters",
            token.name
        )));
    }
    Ok(value)
}

/// The cluster secret from `node.cluster_secret`, `node.cluster_secret_file` or, when the
/// config names neither, the `STRATA_CLUSTER_SECRET` environment variable. `Ok(None)` when
/// no source has one; a secret shorter than [`MIN_CLUSTER_SECRET_LEN`] is refused.
pub fn resolve_cluster_secret(node: &NodeConfig) -> Result<Option<String>, SecretError> {
    let value = if let Some(v) = &node.cluster_secret {
        v.clone()
    } else if let Some(file) = &node.cluster_secret_file {
        read_secret_file(file)?
    } else {
        match std::env::var(CLUSTER_SECRET_ENV) {
            Ok(v) if !v.is_empty() => v,
            _ => return Ok(None),
        }
    };
    if value.len() < MIN_CLUSTER_SECRET_LEN {
        return Err(SecretError::Source(format!(
            "the cluster secret is shorter than {MIN_CLUSTER_SECRET_LEN} characters; \
             make one with e.g. `openssl rand -hex 32`"
        )));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "supersecret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "supersecret");
    }
}
