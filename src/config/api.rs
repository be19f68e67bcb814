//! The management API's section (`api:`), the same for `tunnox proxy` (single-node) and
//! `tunnox controller` (cluster): where it listens and the bearer tokens it accepts, each with a
//! role. Tokens are read here, at the I/O edge, and never logged.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::duration::Dur;
use super::secret::{AdminToken, read_secret};
use super::{Config, ConfigError};

/// A token shorter than this is a password, not a secret worth the name.
pub const MIN_TOKEN_BYTES: usize = 16;
/// The longest user id a role names (the same bound as a mapping's `owner_user_id`).
pub const MAX_USER_ID: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where the API listens; unset: no API.
    pub listen: Option<SocketAddr>,
    pub tokens: Vec<ApiTokenEntry>,
    /// Mappings one user may hold through the API (a `user:<id>` token's creations count against
    /// it atomically in the store); 0: unlimited.
    pub max_mappings_per_user: usize,
    /// Cluster: the namespace the API's `HTTPDomainMapping` resources are created in; unset:
    /// the controller's own (`$POD_NAMESPACE`).
    pub namespace: Option<String>,
    /// Cluster: how long a create waits for its resource to be `Active` (or refused) before it
    /// answers `202 Accepted`; a delete, for the domain to be released.
    pub wait: Dur,
    /// Serve the API over TLS with this certificate chain and key (PEM); unset: plain HTTP,
    /// which belongs on loopback or behind a TLS-terminating hop only.
    pub tls: Option<ApiTls>,
}

/// The API listener's certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            tokens: Vec::new(),
            max_mappings_per_user: 100,
            namespace: None,
            wait: Dur::secs(10),
            tls: None,
        }
    }
}

/// One accepted bearer token: `token` inline or `token_file` (a mounted Secret), and its role.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiTokenEntry {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// `admin`, or `user:<id>`: may act only on the mappings whose `owner_user_id` is `<id>`.
    pub role: String,
}

impl fmt::Debug for ApiTokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiTokenEntry")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("role", &self.role)
            .finish()
    }
}

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRole {
    /// Everything, including force-delete and other users' mappings.
    Admin,
    /// Only the mappings this user owns.
    User(String),
}

impl ApiRole {
    /// `admin` or `user:<id>`; the error quotes the value.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw == "admin" {
            return Ok(Self::Admin);
        }
        let Some(id) = raw.strip_prefix("user:") else {
            return Err(format!("{raw:?}: expected admin or user:<id>"));
        };
        check_user_id(id).map_err(|e| format!("{raw:?}: {e}"))?;
        Ok(Self::User(id.to_string()))
    }
}

/// A user id as roles and filters name it: 1 to 128 visible ASCII characters, no spaces.
pub fn check_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_USER_ID {
        return Err(format!("a user id is 1 to {MAX_USER_ID} characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a user id is visible ASCII without spaces".into());
    }
    Ok(())
}

/// The accepted tokens and their roles, read from the section (files at this I/O edge).
pub fn tokens(cfg: &Config, origin: &str) -> Result<Vec<(AdminToken, ApiRole)>, ConfigError> {
    let api = &cfg.api;
    let mut out = Vec::with_capacity(api.tokens.len());
    for (i, t) in api.tokens.iter().enumerate() {
        let at = |field: &str| format!("api.tokens[{i}].{field}");
        let err = |field: &str, msg: String| ConfigError::at(origin, &at(field), msg, None, None);
        let role = ApiRole::parse(&t.role).map_err(|m| err("role", m))?;
        let secret = match (&t.token, &t.token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "token_file",
                    "is set together with token; use one".into(),
                ));
            }
            (None, None) => return Err(err("token", "token or token_file is required".into())),
            (Some(v), None) => v.clone(),
            (None, Some(p)) => read_secret(p, &at("token_file"), origin)?,
        };
        if secret.len() < MIN_TOKEN_BYTES {
            return Err(err(
                if t.token.is_some() {
                    "token"
                } else {
                    "token_file"
                },
                format!(
                    "is shorter than {MIN_TOKEN_BYTES} bytes; use a random secret (e.g. openssl rand -hex 32)"
                ),
            ));
        }
        if secret.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(err(
                if t.token.is_some() {
                    "token"
                } else {
                    "token_file"
                },
                "holds a space or a non-ASCII character; a bearer token is visible ASCII".into(),
            ));
        }
        if out
            .iter()
            .any(|(o, _): &(AdminToken, ApiRole)| o.expose() == secret)
        {
            return Err(err("token", "is the same as an earlier token".into()));
        }
        out.push((AdminToken::new(secret), role));
    }
    if api.listen.is_some() && out.is_empty() {
        return Err(ConfigError::at(
            origin,
            "api.tokens",
            "api.listen is set but no token is configured; every request would be refused",
            None,
            None,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        assert_eq!(ApiRole::parse("admin"), Ok(ApiRole::Admin));
        assert_eq!(ApiRole::parse("user:42"), Ok(ApiRole::User("42".into())));
        for bad in [
            "",
            "Admin",
            "user:",
            "user:a b",
            "root",
            &format!("user:{}", "x".repeat(129)),
        ] {
            assert!(ApiRole::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
        let entry =
            |token: Option<&str>, file: Option<&std::path::Path>, role: &str| ApiTokenEntry {
                token: token.map(str::to_string),
                token_file: file.map(|p| p.to_path_buf()),
                role: role.into(),
            };
        let mut cfg = Config::default();
        cfg.api.listen = Some("127.0.0.1:0".parse().unwrap());
        let e = tokens(&cfg, "o").unwrap_err();
        assert_eq!(e.path, "api.tokens");
        cfg.api.tokens = vec![
            entry(Some("inline-0123456789abcdef"), None, "admin"),
            entry(None, Some(&file), "user:7"),
        ];
        let got = tokens(&cfg, "o").unwrap();
        assert_eq!(got[0].1, ApiRole::Admin);
        assert_eq!(got[1].0.expose(), "from-a-file-0123456789");
        assert_eq!(got[1].1, ApiRole::User("7".into()));
        for (bad, path) in [
            (entry(Some("short"), None, "admin"), "api.tokens[0].token"),
            (entry(None, None, "admin"), "api.tokens[0].token"),
            (
                entry(Some("inline-0123456789abcdef"), Some(&file), "admin"),
                "api.tokens[0].token_file",
            ),
            (
                entry(Some("inline-0123456789abcdef"), None, "boss"),
                "api.tokens[0].role",
            ),
            (
                entry(Some("has a space 0123456789"), None, "admin"),
                "api.tokens[0].token",
            ),
        ] {
            cfg.api.tokens = vec![bad];
            assert_eq!(tokens(&cfg, "o").unwrap_err().path, path);
        }
        cfg.api.tokens = vec![
            entry(Some("inline-0123456789abcdef"), None, "admin"),
            entry(Some("inline-0123456789abcdef"), None, "user:1"),
        ];
        assert_eq!(tokens(&cfg, "o").unwrap_err().path, "api.tokens[1].token");
        let shown = format!(
            "{:?}",
            entry(Some("inline-0123456789abcdef"), None, "admin")
        );
        assert!(!shown.contains("inline"), "{shown}");
    }
}
