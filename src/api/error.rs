//! The API's one error shape, `{code, message, field?}`, and the one map from every failure
//! (a refused token, bad input, a store error) to a status and that body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::SpecError;
use crate::store::StoreError;

/// Every error the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `unauthorized`, `forbidden`, `invalid`, `unknown_parameter`,
    /// `not_found`, `domain_taken`, `quota_exceeded`, `conflict`, `too_large`,
    /// `method_not_allowed`, `store_unavailable`.
    pub code: String,
    /// For a person; names the value when the input was at fault.
    pub message: String,
    /// The request field at fault (a query parameter, a body field, `authorization`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }

    pub fn at(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    /// A request value that is not acceptable: 400 naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message).at(field)
    }

    /// A well-formed mapping the rules refuse (a domain outside the base domains, a target the
    /// egress policy denies): 422 naming the field.
    pub fn refused(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message).at(field)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message).at("authorization")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

/// Which request field a spec error is about.
fn spec_field(e: &SpecError) -> &'static str {
    match e {
        SpecError::Subdomain { .. } => "subdomain",
        SpecError::TargetHost { .. } => "target_host",
        SpecError::TargetPort => "target_port",
        SpecError::ClientAndGroup => "target_client_id",
        SpecError::TargetGroup { .. } => "target_group",
        SpecError::Tls(_) => "tls",
        SpecError::Upstream(_) => "upstream",
        SpecError::HeaderName { .. }
        | SpecError::HeaderValue { .. }
        | SpecError::ReservedHeader { .. } => "custom_headers",
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::DomainTaken { .. } => {
                Self::new(StatusCode::CONFLICT, "domain_taken", e.to_string()).at("subdomain")
            }
            StoreError::QuotaExceeded { .. } => {
                Self::new(StatusCode::CONFLICT, "quota_exceeded", e.to_string())
            }
            StoreError::NotFound { .. } => Self::not_found(e.to_string()),
            StoreError::VersionConflict { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Invalid(spec) => Self::refused(spec_field(spec), spec.to_string()),
            StoreError::InvalidChallenge(m) => Self::invalid("token", m.clone()),
            // The detail is for the log, not for a caller.
            StoreError::Redis(_)
            | StoreError::Unreplicated { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Persist { .. } => {
                tracing::warn!(error = %e, "API request failed in the store");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the mapping store cannot be reached; try again",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Hostname, MappingId};

    #[test]
    fn store_errors_map_to_one_status_each() {
        let id = MappingId::generate();
        let cases = [
            (
                StoreError::DomainTaken {
                    domain: Hostname::parse("a.b").unwrap(),
                    holder: id.clone(),
                    holder_source: None,
                },
                409,
                "domain_taken",
                Some("subdomain"),
            ),
            (
                StoreError::NotFound { id: id.clone() },
                404,
                "not_found",
                None,
            ),
            (
                StoreError::Invalid(SpecError::TargetPort),
                422,
                "invalid",
                Some("target_port"),
            ),
            (
                StoreError::Corrupt {
                    at: "x".into(),
                    detail: "secret detail".into(),
                },
                503,
                "store_unavailable",
                None,
            ),
        ];
        for (e, status, code, field) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status);
            assert_eq!(a.body.code, code);
            assert_eq!(a.body.field.as_deref(), field);
            assert!(!a.body.message.contains("secret detail"));
        }
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_token() {
        let r = ApiError::unauthorized("missing").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
