//! Forwarding one request to its upstream: header rewriting (hop-by-hop removal,
//! `X-Forwarded-*`, the mapping's headers), keep-alive pools, timeouts, WebSocket upgrades.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use super::connect::refusal_in;
use super::deadline::join_with_idle;
use super::metrics::ProxyMetrics;
use super::policy::{Admitted, HOPS};
use super::{ProxyBody, ProxyError};
use crate::domain::EgressPolicy;

#[derive(Debug, Clone, Copy)]
pub struct ForwardSettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub websocket_idle: Duration,
}

/// The upstream clients: one keep-alive pool per upstream authority, and one client per
/// declarer (a connection checked for the operator is never reused for a tenant).
#[derive(Clone)]
pub struct Forwarder {
    clients: super::upstream::Clients,
    response_timeout: Duration,
    websocket_idle: Duration,
    metrics: Arc<ProxyMetrics>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What the caller knows about the client side of a request.
#[derive(Clone, Copy)]
pub struct ClientInfo<'a> {
    pub peer: SocketAddr,
    /// The `Host` (or `:authority`) exactly as the client sent it.
    pub host: &'a HeaderValue,
    /// The hop count the upstream is told.
    pub hops: u32,
    /// `X-Forwarded-Proto`: `http` or `https`, as the client reached this proxy.
    pub proto: &'static str,
}

impl Forwarder {
    pub fn new(s: ForwardSettings, policy: Arc<EgressPolicy>, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            clients: super::upstream::Clients::new(s, policy),
            response_timeout: s.response_timeout,
            websocket_idle: s.websocket_idle,
            metrics,
        }
    }

    /// Sends `req` to `scheme://authority` and returns the upstream's response, ready for the
    /// client. Upgrades (WebSocket) are joined in a background task once both sides agree.
    pub async fn forward(
        &self,
        mut req: Request<ProxyBody>,
        to: &Admitted,
        client: ClientInfo<'_>,
        upstream_seconds: &prometheus::Histogram,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (scheme, authority, extra) = (&to.scheme, &to.authority, to.route.headers());
        let upgrade = upgrade_protocol(req.headers());
        let via = to.route.upstream();
        let http2 = via.is_some_and(|v| v.protocol.is_http2());
        if http2 && upgrade.is_some() {
            return Err(ProxyError::Upstream {
                upstream: authority.to_string(),
                reason: "an upgrade (WebSocket) needs the target protocol http1".into(),
            });
        }
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::Upstream {
                upstream: authority.to_string(),
                reason: e.to_string(),
            })?;
        parts.version = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        rewrite_request_headers(&mut parts.headers, &client, upgrade.as_ref(), extra);
        if http2 {
            // HTTP/2 names the target in `:authority` (the upstream's address); a `Host` that
            // disagrees is malformed (RFC 9113 8.3.1). The client's host is in X-Forwarded-Host.
            parts.headers.remove(header::HOST);
        }
        let out = Request::from_parts(parts, body);

        let started = Instant::now();
        let client = self.clients.get(to.who, via);
        let sent = tokio::time::timeout(self.response_timeout, client.request(out)).await;
        upstream_seconds.observe(started.elapsed().as_secs_f64());
        let mut resp = match sent {
            Err(_) => return Err(ProxyError::UpstreamTimeout(authority.to_string())),
            Ok(Err(e)) => return Err(classify(authority, &e)),
            Ok(Ok(resp)) => resp,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgrade) else {
                return Err(ProxyError::Upstream {
                    upstream: authority.to_string(),
                    reason: "switched protocols without being asked to".into(),
                });
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(join_upgraded(
                client_upgrade,
                upstream_upgrade,
                self.websocket_idle,
                self.metrics.clone(),
            ));
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
            return Ok(Response::from_parts(parts, super::empty_body()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ))
    }
}

fn classify(authority: &Authority, e: &hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(refusal) = refusal_in(e) {
        return ProxyError::EgressRefused {
            host: authority.to_string(),
            refusal: refusal.clone(),
        };
    }
    let reason = error_chain(e);
    if e.is_connect() {
        ProxyError::UpstreamConnect {
            upstream: authority.to_string(),
            reason,
        }
    } else {
        ProxyError::Upstream {
            upstream: authority.to_string(),
            reason,
        }
    }
}

/// An error and its sources, one line (`a: b: c`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: x`).
pub(super) fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

pub(super) use crate::hop::strip as strip_hop_by_hop;

pub(super) fn rewrite_request_headers(
    h: &mut HeaderMap,
    client: &ClientInfo<'_>,
    upgrade: Option<&HeaderValue>,
    extra: &[(HeaderName, HeaderValue)],
) {
    // `TE: trailers` is the one TE value a proxy passes on.
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    strip_hop_by_hop(h);
    // The tunnel's own headers mean something only when this proxy sets them.
    for own in super::tunnel::INTERNAL_HEADERS {
        h.remove(own);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    // Every earlier hop, in order (several headers count as one list), then the client.
    let mut xff = String::new();
    for prev in h
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    xff.push_str(&client.peer.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.proto));
    h.insert(HOPS, HeaderValue::from(client.hops));
    h.insert(X_FORWARDED_HOST, client.host.clone());
    // The upstream sees the host the client asked for (HTTP/2 clients send no Host header).
    h.insert(header::HOST, client.host.clone());
    for (name, value) in extra {
        h.insert(name.clone(), value.clone());
    }
}

pub(super) async fn join_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
    metrics: Arc<ProxyMetrics>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let client = TokioIo::new(client);
    let upstream = TokioIo::new(upstream);
    match join_with_idle(client, upstream, idle, &metrics).await {
        Ok(true) => tracing::debug!(?idle, "upgraded connection closed: idle"),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in crate::proxy::header_pairs(pairs) {
            h.append(k, v);
        }
        h
    }

    fn rewrite(pairs: &[(&str, &str)], extra: &[(&str, &str)]) -> HeaderMap {
        let mut h = headers(pairs);
        let host = HeaderValue::from_static("App.Example.com:8080");
        let info = ClientInfo {
            peer: "10.1.2.3:5555".parse().unwrap(),
            host: &host,
            hops: 2,
            proto: "http",
        };
        let upgrade = upgrade_protocol(&h);
        let extra = crate::proxy::header_pairs(extra);
        rewrite_request_headers(&mut h, &info, upgrade.as_ref(), &extra);
        h
    }

    #[test]
    fn rewrites_request_headers() {
        let h = rewrite(
            &[
                ("connection", "keep-alive, x-secret"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "gzip, trailers"),
                ("transfer-encoding", "chunked"),
                ("proxy-authorization", "Basic x"),
                ("x-forwarded-for", "192.0.2.1"),
                ("x-forwarded-proto", "https"),
                ("x-env", "client"),
                ("tunnox-hops", "1"),
                ("tunnox-hops", "7"),
                ("tunnox-target", "10.0.0.1:22"),
                ("tunnox-control", "1"),
                ("tunnox-node", "guess"),
                ("accept", "*/*"),
            ],
            &[("x-env", "dev")],
        );
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
            "tunnox-target",
            "tunnox-control",
            "tunnox-node",
        ] {
            assert!(!h.contains_key(gone), "{gone} must not be forwarded: {h:?}");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "App.Example.com:8080");
        assert_eq!(h["host"], "App.Example.com:8080");
        assert_eq!(h["x-env"], "dev", "the mapping's header wins");
        assert_eq!(
            h.get_all("tunnox-hops").iter().collect::<Vec<_>>(),
            ["2"],
            "the hop count is the proxy's"
        );
        assert_eq!(h["accept"], "*/*");
    }

    #[test]
    fn keeps_upgrade_headers_only_for_upgrades() {
        let ws = rewrite(&[("connection", "Upgrade"), ("upgrade", "websocket")], &[]);
        assert_eq!(ws["connection"], "upgrade");
        assert_eq!(ws["upgrade"], "websocket");
        let stray = rewrite(&[("upgrade", "websocket")], &[]);
        assert!(!stray.contains_key("upgrade"));
        assert!(!stray.contains_key("connection"));
    }
}
