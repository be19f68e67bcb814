//! Secrets read from files (mounted Kubernetes Secrets) instead of the configuration text or
//! the environment: the Redis password (`storage.redis.password_file`) and the admin bearer
//! token (`proxy.admin_token_file`). Values never appear in `Debug` output or logs.

use std::fmt;
use std::io::Read;
use std::path::Path;

use super::{Config, ConfigError};

/// A token or password larger than this is not a secret file but a mistake (a wrong path).
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// The bearer token the admin port's state-changing endpoints accept.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token from text (tests, or a value read elsewhere). Empty is refused by the caller.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// Compares `presented` with the token in time that depends only on `presented`'s length,
    /// so response timing tells a caller nothing about how much of a guess was right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.is_empty() {
            return false;
        }
        let mut diff = u8::from(expected.len() != presented.len());
        for (i, b) in presented.iter().enumerate() {
            diff |= b ^ expected[i % expected.len()];
        }
        std::hint::black_box(diff) == 0
    }

    /// The token itself, to send it (`tunnox drain`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Reads one secret file: at most 64 KiB of UTF-8, trailing line breaks dropped, not empty.
/// Errors name `field` and the path, never the content.
pub fn read_secret(path: &Path, field: &str, origin: &str) -> Result<String, ConfigError> {
    let err = |msg: String| ConfigError::at(origin, field, msg, None, None);
    let file = std::fs::File::open(path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(err(format!(
            "{} is larger than 64 KiB; expected a file holding only the secret",
            path.display()
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| err(format!("{} is not UTF-8 text", path.display())))?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(err(format!("{} is empty", path.display())));
    }
    Ok(value.to_string())
}

/// Replaces `storage.redis.password` by the content of `storage.redis.password_file`, before
/// the auto-sharing rules copy it to the message broker.
pub fn fill_password(cfg: &mut Config, origin: &str) -> Result<(), ConfigError> {
    let redis = &mut cfg.storage.redis;
    // Empty means unset, so an environment override can turn a file's setting off.
    let Some(path) = redis
        .password_file
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return Ok(());
    };
    if !redis.password.is_empty() {
        return Err(ConfigError::at(
            origin,
            "storage.redis.password_file",
            "is set together with storage.redis.password; use one of them",
            None,
            None,
        ));
    }
    redis.password = read_secret(&path, "storage.redis.password_file", origin)?;
    Ok(())
}

/// The admin token from `proxy.admin_token_file`, if configured.
pub fn admin_token(cfg: &Config, origin: &str) -> Result<Option<AdminToken>, ConfigError> {
    cfg.proxy
        .admin_token_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| read_secret(p, "proxy.admin_token_file", origin).map(AdminToken))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        let t = AdminToken::new("s3cret");
        let cases: &[(&[u8], bool)] = &[
            (b"s3cret", true),
            (b"s3cre", false),
            (b"s3cret!", false),
            (b"s3creT", false),
            (b"", false),
            (b"s3crets3cret", false),
        ];
        for (presented, want) in cases {
            assert_eq!(t.matches(presented), *want, "{presented:?}");
        }
        assert!(
            !AdminToken::new("").matches(b""),
            "an empty token matches nothing"
        );
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let ok = write("ok", b"hunter2\n");
        assert_eq!(read_secret(&ok, "f", "o").unwrap(), "hunter2");
        let crlf = write("crlf", b"a b\r\n");
        assert_eq!(read_secret(&crlf, "f", "o").unwrap(), "a b");
        for (name, content, want) in [
            ("empty", &b"\n"[..], "is empty"),
            ("binary", &[0xff, 0xfe][..], "not UTF-8"),
        ] {
            let p = write(name, content);
            let e = read_secret(&p, "proxy.admin_token_file", "cfg.yaml").unwrap_err();
            assert_eq!(e.path, "proxy.admin_token_file");
            assert!(e.message.contains(want), "{e}");
        }
        let big = write("big", &vec![b'x'; 70_000]);
        assert!(
            read_secret(&big, "f", "o")
                .unwrap_err()
                .message
                .contains("64 KiB")
        );
        let missing =
            read_secret(&dir.path().join("nope"), "storage.redis.password_file", "o").unwrap_err();
        assert_eq!(missing.path, "storage.redis.password_file");
        assert!(missing.message.contains("cannot read"), "{missing}");
    }

    #[test]
    fn password_file_fills_the_password_and_excludes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "from-file\n").unwrap();
        let mut cfg = Config::default();
        cfg.storage.redis.password_file = Some(p.clone());
        fill_password(&mut cfg, "o").unwrap();
        assert_eq!(cfg.storage.redis.password, "from-file");
        let mut both = Config::default();
        both.storage.redis.password_file = Some(p);
        both.storage.redis.password = "inline".into();
        let e = fill_password(&mut both, "o").unwrap_err();
        assert_eq!(e.path, "storage.redis.password_file");
        let mut empty = Config::default();
        empty.storage.redis.password_file = Some("".into());
        fill_password(&mut empty, "o").unwrap();
        assert_eq!(empty.storage.redis.password, "", "empty path = unset");
        empty.proxy.admin_token_file = Some("".into());
        assert!(admin_token(&empty, "o").unwrap().is_none());
    }
}
