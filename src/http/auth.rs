//! Bearer tokens with scopes. Built from config once per (re)load, checked per request.

use std::collections::HashMap;

use http::{header, HeaderMap, StatusCode};

use super::problem::Problem;
use crate::config::{secrets, Scope, TokenConfig};

/// The tokens in force. An empty set means anonymous access (config validation allows that
/// only on loopback listeners or with `allow_anonymous`).
#[derive(Debug, Default)]
pub struct Tokens {
    by_value: HashMap<String, (String, Vec<Scope>)>,
}

impl Tokens {
    /// Resolves every token's value (inline, env var or file).
    pub fn from_config(tokens: &[TokenConfig]) -> Result<Self, secrets::SecretError> {
        let mut by_value = HashMap::new();
        for t in tokens {
            let value = secrets::resolve_token(t)?;
            by_value.insert(value, (t.name.clone(), t.scopes.clone()));
        }
        Ok(Tokens { by_value })
    }

    /// True when no token is configured (anonymous access).
    pub fn is_open(&self) -> bool {
        self.by_value.is_empty()
    }

    /// Checks that the request carries a token with `scope`; `admin` implies every scope.
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<(), Box<Problem>> {
        if self.is_open() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(presented) = presented else {
            return Err(Box::new(Problem::new(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs an `Authorization: Bearer <token>` header",
            )));
        };
        match self.by_value.get(presented) {
            Some((_, scopes)) if scopes.contains(&scope) || scopes.contains(&Scope::Admin) => {
                Ok(())
            }
            Some((name, _)) => Err(Box::new(Problem::new(
                StatusCode::FORBIDDEN,
                format!("token {name:?} lacks the {scope:?} scope"),
            ))),
            None => Err(Box::new(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unknown token",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, value: &str, scopes: Vec<Scope>) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            scopes,
            value: Some(value.into()),
            value_env: None,
            value_file: None,
        }
    }

    #[test]
    fn scopes_are_enforced() {
        let t = Tokens::from_config(&[
            token("reader", "read-secret-1", vec![Scope::Read]),
            token("root", "admin-secret-1", vec![Scope::Admin]),
        ])
        .unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(t.check(&h, Scope::Read).unwrap_err().status, 401);
        h.insert(
            header::AUTHORIZATION,
            "Bearer read-secret-1".parse().unwrap(),
        );
        assert!(t.check(&h, Scope::Read).is_ok());
        assert_eq!(t.check(&h, Scope::Write).unwrap_err().status, 403);
        h.insert(
            header::AUTHORIZATION,
            "Bearer admin-secret-1".parse().unwrap(),
        );
        assert!(t.check(&h, Scope::Write).is_ok());
        h.insert(
            header::AUTHORIZATION,
            "Bearer nope-nope-nope".parse().unwrap(),
        );
        assert_eq!(t.check(&h, Scope::Read).unwrap_err().status, 401);
    }
}
