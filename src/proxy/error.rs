//! Why a request could not be proxied, and the one place that turns that into a response: the
//! status, a short public reason and the request id; the detail (addresses, error chains) goes
//! to the log under that id, never to the client.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use super::ProxyBody;
use crate::domain::{HostnameError, Refusal, SetName};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("missing Host header")]
    MissingHost,
    #[error("malformed Host header: {0}")]
    BadHost(#[source] HostnameError),
    #[error("malformed Host header: not visible ASCII text")]
    HostNotText,
    #[error("malformed tunnox-hops header (not one decimal number)")]
    BadHops,
    #[error("request passed through this proxy fleet {hops} times (limit {max}): a loop")]
    LoopDetected { hops: u32, max: u32 },
    #[error("no mapping for host {0}")]
    UnknownHost(String),
    #[error("{host} is served by business {business}, not by this proxy's")]
    OtherBusiness { host: String, business: String },
    #[error(
        "{host} is placed on set {placement}: neither it nor its business's DR set has a healthy node"
    )]
    Unserved { host: String, placement: SetName },
    #[error("forwarding {host} to a node of set {set} failed: {reason}")]
    SetForward {
        host: String,
        set: SetName,
        reason: String,
    },
    #[error("mapping for {0} is not active")]
    Inactive(String),
    #[error("tunnel client {0} has no session on any proxy")]
    TunnelNotConnected(String),
    #[error("no member of tunnel group {0} has a session on any proxy")]
    TunnelGroupOffline(String),
    #[error("tunnel client {client} answered with its own error {label}")]
    TunnelAgent { client: String, label: &'static str },
    #[error("tunnel client {client}: {reason}")]
    TunnelStream { client: String, reason: String },
    #[error("forwarding to node {node} (holding the session of {client}) failed: {reason}")]
    PeerForward {
        node: String,
        client: String,
        reason: String,
    },
    /// A request another node forwarded here finds no session of the client on this node (the
    /// record that sent it here went stale, e.g. the agent just moved): that node may retry.
    #[error("tunnel client {0} has no usable session on this node (forwarded by a peer)")]
    NotHeldHere(String),
    #[error("tunnox-node header does not carry this fleet's node token")]
    NodeAuth,
    #[error("routing store unavailable and {0} is not cached")]
    StoreUnavailable(String),
    #[error("egress policy refused the target of {host}: {refusal}")]
    EgressRefused { host: String, refusal: Refusal },
    #[error("cannot reach upstream {upstream}: {reason}")]
    UpstreamConnect { upstream: String, reason: String },
    #[error("upstream {upstream} failed: {reason}")]
    Upstream { upstream: String, reason: String },
    #[error("upstream {0} did not answer in time")]
    UpstreamTimeout(String),
    #[error("proxy is shutting down")]
    ShuttingDown,
    /// Not an error: the mapping redirects plain HTTP to HTTPS.
    #[error("redirected to {location}")]
    RedirectToHttps { location: String },
    #[error("request for {host} on a TLS connection for {sni}")]
    Misdirected { sni: String, host: String },
    #[error("request for {host} refused: {over}")]
    OverLimit {
        host: String,
        over: super::limits::Over,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingHost | Self::BadHost(_) | Self::HostNotText | Self::BadHops => {
                StatusCode::BAD_REQUEST
            }
            Self::LoopDetected { .. } => StatusCode::LOOP_DETECTED,
            Self::UnknownHost(_) => StatusCode::NOT_FOUND,
            Self::OtherBusiness { .. } | Self::Misdirected { .. } => {
                StatusCode::MISDIRECTED_REQUEST
            }
            Self::RedirectToHttps { .. } => StatusCode::PERMANENT_REDIRECT,
            Self::Unserved { .. }
            | Self::OverLimit { .. }
            | Self::Inactive(_)
            | Self::StoreUnavailable(_)
            | Self::NotHeldHere(_)
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::NodeAuth => StatusCode::FORBIDDEN,
            Self::TunnelNotConnected(_)
            | Self::TunnelGroupOffline(_)
            | Self::TunnelAgent { .. }
            | Self::TunnelStream { .. }
            | Self::PeerForward { .. }
            | Self::SetForward { .. }
            | Self::EgressRefused { .. }
            | Self::UpstreamConnect { .. }
            | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissingHost => "missing_host",
            Self::BadHost(_) | Self::HostNotText => "bad_host",
            Self::BadHops => "bad_hops",
            Self::LoopDetected { .. } => "loop_detected",
            Self::UnknownHost(_) => "unknown_host",
            Self::OtherBusiness { .. } => "other_business",
            Self::Unserved { .. } => "unserved",
            Self::SetForward { .. } => "set_forward",
            Self::Inactive(_) => "inactive",
            Self::TunnelNotConnected(_) => "tunnel_not_connected",
            Self::TunnelGroupOffline(_) => "tunnel_group_offline",
            Self::TunnelAgent { .. } => "tunnel_agent",
            Self::TunnelStream { .. } => "tunnel_stream",
            Self::PeerForward { .. } => "peer_forward",
            Self::NotHeldHere(_) => "not_held_here",
            Self::NodeAuth => "node_auth",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::EgressRefused { .. } => "egress_refused",
            Self::UpstreamConnect { .. } => "upstream_connect",
            Self::Upstream { .. } => "upstream",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::RedirectToHttps { .. } => "redirect_https",
            Self::Misdirected { .. } => "misdirected",
            Self::OverLimit { .. } => "over_limit",
        }
    }

    /// What a client is told: short, fixed text. No upstream address, no error chain, nothing
    /// from the store (those are in the log under the request id).
    pub fn public_reason(&self) -> &'static str {
        match self {
            Self::MissingHost => "missing Host header",
            Self::BadHost(_) | Self::HostNotText => "malformed Host header",
            Self::BadHops => "malformed tunnox-hops header",
            Self::LoopDetected { .. } => "request loop: too many hops through this proxy fleet",
            Self::UnknownHost(_) => "no mapping for this host",
            Self::OtherBusiness { .. } => "this host is served by another business's proxies",
            Self::Unserved { .. } => "no proxy set serves this host now",
            Self::SetForward { .. } => "the proxy set serving this host could not be reached",
            Self::Inactive(_) => "the mapping for this host is not active",
            Self::TunnelNotConnected(_) => "the tunnel client is offline (no agent connected)",
            Self::TunnelGroupOffline(_) => "every tunnel client of the group is offline",
            Self::TunnelAgent { .. } => "the tunnel client could not serve the request",
            Self::TunnelStream { .. } => "the tunnel to the client failed",
            Self::PeerForward { .. } => "the proxy holding the tunnel could not be reached",
            Self::NotHeldHere(_) => "the tunnel client's session is not on this proxy",
            Self::NodeAuth => "forbidden",
            Self::StoreUnavailable(_) => "routing store unavailable",
            Self::EgressRefused { .. } => "the mapping's target is refused by the egress policy",
            Self::UpstreamConnect { .. } => "cannot connect to the upstream",
            Self::Upstream { .. } => "the upstream failed",
            Self::UpstreamTimeout(_) => "the upstream did not answer in time",
            Self::ShuttingDown => "the proxy is shutting down",
            Self::RedirectToHttps { .. } => "this host is served over HTTPS",
            Self::Misdirected { .. } => {
                "this connection is for another host: open a new one for this host"
            }
            Self::OverLimit { .. } => "too many requests for this host right now: retry later",
        }
    }

    /// `Retry-After` seconds, for a refusal that passes.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::OverLimit { over, .. } => Some(over.retry_after()),
            _ => None,
        }
    }

    /// The body a client sees: status, short reason, request id.
    pub fn body(&self, id: &RequestId) -> String {
        let status = self.status();
        format!(
            "{} {}: {}\nrequest id: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.public_reason(),
            id.as_str()
        )
    }

    /// The response a client sees on the general path.
    pub fn into_response(self, id: &RequestId) -> Response<ProxyBody> {
        let mut resp = error_response(self.status(), self.body(id), Some(id));
        if let Self::RedirectToHttps { location } = &self
            && let Ok(v) = HeaderValue::from_str(location)
        {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::NotHeldHere(_)) {
            // Tells the forwarding node (and only it: a node strips this from agents'
            // answers) that nothing was sent and the request may go elsewhere.
            resp.headers_mut().insert(
                super::tunnel::NOT_HELD_HEADER,
                HeaderValue::from_static("1"),
            );
        }
        resp
    }
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The headers of every response the proxy produces itself (not an upstream), besides
/// `x-request-id`.
pub const OWN_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/plain; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-tunnox-error", "1"),
];

/// A plain-text response produced by the proxy itself (not by an upstream).
pub fn error_response(
    status: StatusCode,
    body: String,
    id: Option<&RequestId>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(BoxBody::new(
        Full::new(Bytes::from(body)).map_err(|never| match never {}),
    ));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    for (name, value) in OWN_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
    if let Some(v) = id.and_then(|id| HeaderValue::from_str(id.as_str()).ok()) {
        h.insert(X_REQUEST_ID, v);
    }
    resp
}

/// The most of a client's `x-request-id` the proxy takes over.
const MAX_REQUEST_ID: usize = 64;

/// The id a proxy-made response and its log line share: the client's `x-request-id` when it is
/// well-formed (1–64 of `A-Z a-z 0-9 - _ . :`), else a new one. Kept on the stack.
#[derive(Clone, Copy)]
pub struct RequestId {
    buf: [u8; MAX_REQUEST_ID],
    len: u8,
}

impl RequestId {
    pub fn from_header(value: Option<&[u8]>) -> Self {
        match value {
            Some(v) if Self::well_formed(v) => {
                let mut buf = [0u8; MAX_REQUEST_ID];
                buf[..v.len()].copy_from_slice(v);
                Self {
                    buf,
                    len: v.len() as u8,
                }
            }
            _ => Self::generate(),
        }
    }

    fn well_formed(v: &[u8]) -> bool {
        !v.is_empty()
            && v.len() <= MAX_REQUEST_ID
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    }

    /// 8 hex digits chosen at random per process, then a per-process counter: unique within
    /// the fleet in practice, and cheap.
    pub fn generate() -> Self {
        static PREFIX: OnceLock<u32> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let prefix = *PREFIX.get_or_init(rand::random);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; MAX_REQUEST_ID];
        let text = format!("{prefix:08x}{n:012x}");
        buf[..text.len()].copy_from_slice(text.as_bytes());
        Self {
            buf,
            len: text.len() as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_error_to_its_status_and_tells_no_detail() {
        let up = || "127.0.0.1:1".to_string();
        let refusal = Refusal::Reserved {
            target: "169.254.169.254:80".into(),
            kind: "link-local",
        };
        let cases = [
            (ProxyError::MissingHost, 400),
            (ProxyError::BadHost(HostnameError::Empty), 400),
            (ProxyError::HostNotText, 400),
            (ProxyError::BadHops, 400),
            (ProxyError::LoopDetected { hops: 3, max: 3 }, 508),
            (ProxyError::UnknownHost("a.b".into()), 404),
            (
                ProxyError::OtherBusiness {
                    host: "a.b".into(),
                    business: "x".into(),
                },
                421,
            ),
            (
                ProxyError::Unserved {
                    host: "a.b".into(),
                    placement: SetName::parse("x.y").unwrap(),
                },
                503,
            ),
            (
                ProxyError::SetForward {
                    host: "a.b".into(),
                    set: SetName::parse("x.y").unwrap(),
                    reason: "10.0.0.1:8080 refused".into(),
                },
                502,
            ),
            (ProxyError::Inactive("a.b".into()), 503),
            (ProxyError::TunnelNotConnected("c".into()), 502),
            (ProxyError::TunnelGroupOffline("ns/g".into()), 502),
            (
                ProxyError::RedirectToHttps {
                    location: "https://a.b/".into(),
                },
                308,
            ),
            (
                ProxyError::Misdirected {
                    sni: "a.b".into(),
                    host: "c.d".into(),
                },
                421,
            ),
            (
                ProxyError::TunnelAgent {
                    client: "c".into(),
                    label: "not_allowed",
                },
                502,
            ),
            (ProxyError::NotHeldHere("c".into()), 503),
            (ProxyError::NodeAuth, 403),
            (ProxyError::StoreUnavailable("a.b".into()), 503),
            (
                ProxyError::EgressRefused {
                    host: "a.b".into(),
                    refusal,
                },
                502,
            ),
            (
                ProxyError::UpstreamConnect {
                    upstream: up(),
                    reason: "ECONNREFUSED".into(),
                },
                502,
            ),
            (
                ProxyError::Upstream {
                    upstream: up(),
                    reason: "ECONNRESET".into(),
                },
                502,
            ),
            (ProxyError::UpstreamTimeout(up()), 504),
            (ProxyError::ShuttingDown, 503),
        ];
        let id = RequestId::from_header(Some(b"abc-123"));
        for (err, want) in cases {
            let label = err.label();
            let body = err.body(&id);
            assert!(
                body.starts_with(&format!("{want} ")) && body.ends_with("request id: abc-123\n"),
                "{label}: {body:?}"
            );
            for secret in ["127.0.0.1", "169.254", "ECONN", "a.b", "x.y"] {
                assert!(!body.contains(secret), "{label} tells {secret}: {body:?}");
            }
            let resp = err.into_response(&id);
            assert_eq!(resp.status().as_u16(), want, "{label}");
            assert!(resp.headers().contains_key("x-tunnox-error"), "{label}");
            assert_eq!(resp.headers()["x-request-id"], "abc-123", "{label}");
        }
    }

    #[test]
    fn takes_well_formed_request_ids_and_makes_the_rest() {
        let long = [b'a'; 65];
        let cases: [(Option<&[u8]>, Option<&str>); 6] = [
            (Some(b"req-1.a_b:c"), Some("req-1.a_b:c")),
            (Some(b""), None),
            (Some(b"has space"), None),
            (Some(b"nl\r\nx: y"), None),
            (Some(&long), None),
            (None, None),
        ];
        for (given, want) in cases {
            let id = RequestId::from_header(given);
            match want {
                Some(w) => assert_eq!(id.as_str(), w),
                None => {
                    assert_eq!(id.as_str().len(), 20, "{given:?} → {id}");
                    assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
                }
            }
        }
        assert_ne!(
            RequestId::generate().as_str(),
            RequestId::generate().as_str()
        );
    }
}
