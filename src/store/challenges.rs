//! ACME HTTP-01 challenge answers (`docs/https.md`): written by whoever orders a certificate
//! (the controller's leader), read by every proxy at `/.well-known/acme-challenge/<token>`
//! before Host routing, gone after their TTL. A token is the CA's; a proxy checks its shape
//! before it asks the store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::StoreError;

/// The longest token accepted (RFC 8555 tokens are 43 base64url characters).
pub const MAX_TOKEN_LEN: usize = 128;
/// The longest key authorization accepted (token, '.', a 43-character thumbprint).
pub const MAX_KEY_AUTHORIZATION: usize = 256;
/// Where HTTP-01 challenges are asked for.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";
/// Most answers a memory store holds (one per domain being validated at once).
const MAX_MEMORY_CHALLENGES: usize = 4096;

/// Whether `token` is a token a CA could have issued: 1 to [`MAX_TOKEN_LEN`] base64url
/// characters. Anything else is never looked up.
pub fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[async_trait]
pub trait ChallengeStore: Send + Sync + 'static {
    /// Publishes the answer to `token` for `ttl`.
    async fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// The answer to `token`, while it lives.
    async fn challenge(&self, token: &str) -> Result<Option<String>, StoreError>;

    async fn remove_challenge(&self, token: &str) -> Result<(), StoreError>;
}

/// The checks both stores make before writing.
pub(crate) fn check_put(token: &str, key_authorization: &str) -> Result<(), StoreError> {
    if !is_token(token) {
        return Err(StoreError::InvalidChallenge(format!(
            "ACME challenge token {:?} is not 1-{MAX_TOKEN_LEN} base64url characters",
            token.chars().take(MAX_TOKEN_LEN + 1).collect::<String>()
        )));
    }
    if key_authorization.len() > MAX_KEY_AUTHORIZATION
        || !key_authorization.starts_with(token)
        || key_authorization.as_bytes().get(token.len()) != Some(&b'.')
    {
        return Err(StoreError::InvalidChallenge(format!(
            "ACME key authorization for token {token} is not '<token>.<thumbprint>' of at most {MAX_KEY_AUTHORIZATION} bytes"
        )));
    }
    Ok(())
}

/// The memory store's answers (single-node), bounded: the oldest is dropped beyond
/// [`MAX_MEMORY_CHALLENGES`].
#[derive(Debug, Default)]
pub(crate) struct ChallengeTable {
    answers: HashMap<String, (String, Instant)>,
}

impl ChallengeTable {
    pub fn put(&mut self, token: &str, key_authorization: &str, ttl: Duration, now: Instant) {
        self.answers.retain(|_, (_, until)| *until > now);
        if self.answers.len() >= MAX_MEMORY_CHALLENGES
            && let Some(oldest) = self
                .answers
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(t, _)| t.clone())
        {
            self.answers.remove(&oldest);
        }
        // A TTL beyond what an Instant holds is cut to a year.
        let until = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(86_400 * 365));
        self.answers
            .insert(token.to_string(), (key_authorization.to_string(), until));
    }

    pub fn get(&self, token: &str, now: Instant) -> Option<String> {
        self.answers
            .get(token)
            .filter(|(_, until)| *until > now)
            .map(|(a, _)| a.clone())
    }

    pub fn remove(&mut self, token: &str) {
        self.answers.remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_base64url_and_bounded() {
        for ok in ["a", "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0", "a-b_c"] {
            assert!(is_token(ok), "{ok}");
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        for bad in ["", "a/b", "a.b", "../x", "a b", "%2e", long.as_str()] {
            assert!(!is_token(bad), "{bad}");
        }
    }

    #[test]
    fn key_authorizations_start_with_their_token() {
        assert!(check_put("tok", "tok.thumb").is_ok());
        for (t, k) in [
            ("tok", "other.thumb"),
            ("tok", "tokthumb"),
            ("tok", "tok"),
            ("../", "../.x"),
        ] {
            assert!(check_put(t, k).is_err(), "{t} {k}");
        }
        let long = format!("tok.{}", "x".repeat(MAX_KEY_AUTHORIZATION));
        assert!(check_put("tok", &long).is_err());
    }

    #[test]
    fn answers_expire_and_the_table_is_bounded() {
        let now = Instant::now();
        let mut t = ChallengeTable::default();
        t.put("a", "a.x", Duration::from_secs(1), now);
        assert_eq!(t.get("a", now).as_deref(), Some("a.x"));
        assert_eq!(t.get("a", now + Duration::from_secs(2)), None);
        for i in 0..MAX_MEMORY_CHALLENGES + 10 {
            t.put(
                &format!("t{i}"),
                &format!("t{i}.x"),
                Duration::from_secs(60 + i as u64),
                now,
            );
        }
        assert_eq!(t.answers.len(), MAX_MEMORY_CHALLENGES);
        assert!(t.get("t0", now).is_none(), "the oldest went first");
        t.remove(&format!("t{}", MAX_MEMORY_CHALLENGES + 9));
        assert_eq!(t.answers.len(), MAX_MEMORY_CHALLENGES - 1);
    }
}
