//! Why a request could not be proxied, and the one place that turns that into a response.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use super::ProxyBody;
use crate::domain::{HostnameError, SetName};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("missing Host header")]
    MissingHost,
    #[error("malformed Host header: {0}")]
    BadHost(#[source] HostnameError),
    #[error("malformed Host header: not visible ASCII text")]
    HostNotText,
    #[error("no mapping for host {0}")]
    UnknownHost(String),
    #[error("{host} is served by business {business}, not by this proxy's")]
    OtherBusiness { host: String, business: String },
    #[error("{host} is placed on set {set}, which this proxy does not serve")]
    OtherSet { host: String, set: SetName },
    #[error("mapping for {0} is not active")]
    Inactive(String),
    #[error("tunnel client {0} is not connected to this proxy")]
    TunnelNotConnected(String),
    #[error("routing store unavailable and {0} is not cached")]
    StoreUnavailable(String),
    #[error("cannot reach upstream {upstream}: {reason}")]
    UpstreamConnect { upstream: String, reason: String },
    #[error("upstream {upstream} failed: {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("upstream {0} did not answer in time")]
    UpstreamTimeout(String),
    #[error("proxy is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingHost | Self::BadHost(_) | Self::HostNotText => StatusCode::BAD_REQUEST,
            Self::UnknownHost(_) => StatusCode::NOT_FOUND,
            Self::OtherBusiness { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::OtherSet { .. }
            | Self::Inactive(_)
            | Self::StoreUnavailable(_)
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::TunnelNotConnected(_) | Self::UpstreamConnect { .. } | Self::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissingHost => "missing_host",
            Self::BadHost(_) | Self::HostNotText => "bad_host",
            Self::UnknownHost(_) => "unknown_host",
            Self::OtherBusiness { .. } => "other_business",
            Self::OtherSet { .. } => "other_set",
            Self::Inactive(_) => "inactive",
            Self::TunnelNotConnected(_) => "tunnel_not_connected",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::UpstreamConnect { .. } => "upstream_connect",
            Self::Upstream { .. } => "upstream",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// The body a client sees: the status and a one-line plain-text reason.
    pub fn body(&self) -> String {
        let status = self.status();
        format!(
            "{} {}: {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
    }

    /// The response a client sees.
    pub fn into_response(self) -> Response<ProxyBody> {
        error_response(self.status(), self.body())
    }
}

/// The headers of every response the proxy produces itself (not an upstream).
pub const OWN_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/plain; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-tunnox-error", "1"),
];

/// A plain-text response produced by the proxy itself (not by an upstream).
pub fn error_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(BoxBody::new(
        Full::new(Bytes::from(body)).map_err(|never| match never {}),
    ));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    for (name, value) in OWN_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_error_to_its_status() {
        let up = || "127.0.0.1:1".to_string();
        let cases = [
            (ProxyError::MissingHost, 400),
            (ProxyError::BadHost(HostnameError::Empty), 400),
            (ProxyError::HostNotText, 400),
            (ProxyError::UnknownHost("a.b".into()), 404),
            (
                ProxyError::OtherBusiness {
                    host: "a.b".into(),
                    business: "x".into(),
                },
                421,
            ),
            (
                ProxyError::OtherSet {
                    host: "a.b".into(),
                    set: SetName::parse("x.y").unwrap(),
                },
                503,
            ),
            (ProxyError::Inactive("a.b".into()), 503),
            (ProxyError::TunnelNotConnected("c".into()), 502),
            (ProxyError::StoreUnavailable("a.b".into()), 503),
            (
                ProxyError::UpstreamConnect {
                    upstream: up(),
                    reason: "refused".into(),
                },
                502,
            ),
            (
                ProxyError::Upstream {
                    upstream: up(),
                    reason: "reset".into(),
                },
                502,
            ),
            (ProxyError::UpstreamTimeout(up()), 504),
            (ProxyError::ShuttingDown, 503),
        ];
        for (err, want) in cases {
            let label = err.label();
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), want, "{label}");
            assert!(resp.headers().contains_key("x-tunnox-error"), "{label}");
        }
    }
}
