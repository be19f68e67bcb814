//! ACME HTTP-01 answers: `GET /.well-known/acme-challenge/<token>` on any Host, before Host
//! routing and before any HTTPS redirect, when the store holds an answer for the token
//! (`docs/https.md`); otherwise the request is routed as usual. A token that is not a CA's
//! shape is never looked up, and lookups in flight are bounded, so a flood of such requests
//! costs the store little.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use super::ProxyBody;
use crate::store::{CHALLENGE_PATH, ChallengeStore, is_token};

/// Store lookups in flight at once; more are routed as usual (a CA retries).
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

    /// The answer to `token`: the key authorization as `text/plain`. `None` when this proxy
    /// has no answer for it (not a token, none stored, too many lookups, the store
    /// unreachable): the request is then routed like any other, so a tenant solving its own
    /// HTTP-01 challenges behind the proxy (cert-manager) still reaches its upstream.
    pub async fn answer(&self, token: &str) -> Option<Response<ProxyBody>> {
        if !is_token(token) {
            return None;
        }
        let Ok(_slot) = self.lookups.try_acquire() else {
            tracing::debug!("too many ACME challenge lookups at once; routing the request");
            return None;
        };
        let answer = match self.store.challenge(token).await {
            Ok(a) => a?,
            Err(e) => {
                tracing::debug!(token, error = %e, "ACME challenge lookup failed; routing the request");
                return None;
            }
        };
        let mut resp = Response::new(
            Full::new(Bytes::from(answer))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        Some(resp)
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
