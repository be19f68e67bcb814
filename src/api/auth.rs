//! Bearer tokens and roles. Every configured token is compared, in time that depends only on
//! the presented token's length, whichever matches: timing tells a caller nothing about which
//! token (or how much of one) was right. Tokens are never logged.

use axum::http::{HeaderMap, header};

use super::error::ApiError;
use crate::config::{AdminToken, ApiRole};
use crate::domain::Mapping;

/// The accepted tokens and their roles.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<(AdminToken, ApiRole)>);

impl Tokens {
    pub fn new(tokens: Vec<(AdminToken, ApiRole)>) -> Self {
        Self(tokens)
    }

    /// The role of the request's `Authorization: Bearer <token>`.
    pub fn check(&self, headers: &HeaderMap) -> Result<ApiRole, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing Authorization: Bearer <token>",
            ));
        };
        let raw = value.as_bytes();
        let presented = match raw.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => raw[7..].trim_ascii(),
            _ => {
                return Err(ApiError::unauthorized(
                    "the Authorization header is not a bearer token",
                ));
            }
        };
        let mut role = None;
        for (token, r) in &self.0 {
            // No early exit: every token is compared.
            if token.matches(presented) && role.is_none() {
                role = Some(r.clone());
            }
        }
        role.ok_or_else(|| ApiError::unauthorized("the bearer token is not accepted"))
    }
}

/// What a role may see and do with one mapping.
pub fn owns(role: &ApiRole, m: &Mapping) -> bool {
    match role {
        ApiRole::Admin => true,
        ApiRole::User(id) => m.owner_user_id.as_deref() == Some(id.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_name_their_role() {
        let t = Tokens::new(vec![
            (AdminToken::new("admin-token-0123456789"), ApiRole::Admin),
            (
                AdminToken::new("user-token-0123456789"),
                ApiRole::User("7".into()),
            ),
        ]);
        let cases: &[(Option<&str>, Result<ApiRole, &str>)] = &[
            (Some("Bearer admin-token-0123456789"), Ok(ApiRole::Admin)),
            (
                Some("bearer user-token-0123456789"),
                Ok(ApiRole::User("7".into())),
            ),
            (None, Err("missing")),
            (Some("Basic YWRtaW4="), Err("not a bearer")),
            (Some("Bearer admin-token-012345678"), Err("not accepted")),
            (Some("Bearer "), Err("not accepted")),
            (Some("Bearer"), Err("not a bearer")),
        ];
        for (auth, want) in cases {
            match (t.check(&headers(*auth)), want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{auth:?}"),
                (Err(e), Err(want)) => {
                    assert_eq!(e.status, axum::http::StatusCode::UNAUTHORIZED);
                    assert!(
                        e.body.message.contains(want),
                        "{auth:?}: {}",
                        e.body.message
                    );
                    assert!(!e.body.message.contains("0123456789"));
                }
                (got, want) => panic!("{auth:?}: {got:?}, wanted {want:?}"),
            }
        }
        assert!(Tokens::default().check(&headers(Some("Bearer x"))).is_err());
    }
}
