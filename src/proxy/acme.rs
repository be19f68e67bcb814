//! ACME HTTP-01 answers: `GET /.well-known/acme-challenge/<token>` on any Host, before Host
//! routing and before any HTTPS redirect, from the store's challenge answers
//! (`docs/https.md`). A token that is not a CA's shape is never looked up, and lookups in
//! flight are bounded, so a flood of such requests costs the store little.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use super::ProxyBody;
use super::ProxyError;
use crate::store::{CHALLENGE_PATH, ChallengeStore, is_token};

/// Store lookups in flight at once; more are answered 503 (a CA retries).
pub const MAX_LOOKUPS: usize = 32;

pub struct Challenges {
    store: Arc<dyn ChallengeStore>,
    lookups: Semaphore,
}

/// The token of a challenge request's path, if the path is one (a query is ignored).
pub fn challenge_token(path: &str) -> Option<&str> {
    path.strip_prefix(CHALLENGE_PATH)
}

impl Challenges {
    pub fn new(store: Arc<dyn ChallengeStore>) -> Self {
        Self {
            store,
            lookups: Semaphore::new(MAX_LOOKUPS),
        }
    }

    /// The answer to `token`: the key authorization as `text/plain`, 404 when there is none.
    pub async fn answer(&self, token: &str) -> Result<Response<ProxyBody>, ProxyError> {
        let shown = || token.chars().take(64).collect::<String>();
        if !is_token(token) {
            return Err(ProxyError::NoChallenge(shown()));
        }
        let _slot = self
            .lookups
            .try_acquire()
            .map_err(|_| ProxyError::ChallengesBusy)?;
        let answer = self
            .store
            .challenge(token)
            .await
            .map_err(|e| ProxyError::StoreUnavailable(format!("ACME challenge {token}: {e}")))?
            .ok_or_else(|| ProxyError::NoChallenge(shown()))?;
        let mut resp = Response::new(
            Full::new(Bytes::from(answer))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_challenge_path_has_a_token() {
        assert_eq!(
            challenge_token("/.well-known/acme-challenge/abc"),
            Some("abc")
        );
        assert_eq!(challenge_token("/.well-known/acme-challenge/"), Some(""));
        assert_eq!(challenge_token("/.well-known/acme-challengeX"), None);
        assert_eq!(challenge_token("/x/.well-known/acme-challenge/a"), None);
    }
}
