//! The request policy both HTTP paths call (the fast path in `h1/`, the general path in
//! `server.rs`): hop check → route → serving check → egress check of the declared target →
//! what the upstream is sent (hop count, `X-Forwarded-*`) → the proxy's own error answer (one
//! function: metrics, log line under the request id, response). The paths differ only in how
//! they read and write bytes.

use std::sync::Arc;

use http::HeaderName;
use http::uri::{Authority, Scheme};

use super::ProxyError;
use super::cache::RouteCache;
use super::deadline::Deadlines;
use super::drain::Drain;
use super::error::RequestId;
use super::forward::Forwarder;
use super::h1::FastPath;
use super::metrics::ProxyMetrics;
use super::registry::HealthySets;
use super::route::{GroupRoute, Route, Target};
use super::stats::AccessLog;
use crate::domain::{Declarer, EgressPolicy, Hostname, SetName};

/// How many proxies of this fleet a request has passed through, as the upstream is told. A
/// request arriving with `proxy.limits.max_hops` or more is a loop (508).
pub const HOPS: HeaderName = HeaderName::from_static("tunnox-hops");

/// Everything a request needs.
pub struct Ctx {
    pub cache: Arc<RouteCache>,
    pub forwarder: Forwarder,
    pub metrics: Arc<ProxyMetrics>,
    pub drain: Arc<Drain>,
    pub access: Arc<AccessLog>,
    pub healthy: Arc<HealthySets>,
    pub set: SetName,
    /// The HTTP/1.1 fast path, unless turned off (`proxy.fast_path: false`).
    pub fast: Option<FastPath>,
    /// `egress` plus this proxy's own listeners.
    pub egress: Arc<EgressPolicy>,
    /// Single-node mode (no Redis): the configuration file's mappings are the operator's.
    pub single_node: bool,
    pub max_hops: u32,
    pub deadlines: Deadlines,
    /// Tunnel sessions held here, and forwarding to the nodes holding the others.
    pub tunnels: Arc<super::tunnel::Tunnels>,
    /// `proxy.tls.redirect_port`: where redirected plain requests are sent.
    pub https_port: u16,
    /// ACME HTTP-01 answers, asked for on any Host.
    pub challenges: Arc<super::acme::Challenges>,
    /// Per-mapping and per-proxy isolation limits.
    pub limits: super::limits::Limits,
}

/// A request the policy lets through, and where it goes.
pub struct Admitted {
    pub route: Arc<Route>,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Whose egress rules the connection follows.
    pub who: Declarer,
    /// The hop count the upstream receives.
    pub hops: u32,
    /// `Some`: the target is reached through a tunnel session (`authority` is then the
    /// agent-side target).
    pub tunnel: Option<Via>,
    /// `Some`: another set of the business serves the route; the request goes to one of its
    /// nodes instead (docs/sets.md).
    pub to_set: Option<SetName>,
    /// The request's places under the isolation limits (`Ctx::hold_places`), held until its
    /// response is done.
    pub permit: Option<super::limits::Permit>,
}

/// Which tunnel client carries a request.
#[derive(Debug, Clone)]
pub enum Via {
    Client(String),
    /// A member of the group, chosen when the request is sent.
    Group(Arc<GroupRoute>),
}

/// The hop count a request arrived with: the largest of its `tunnox-hops` values (none: 0).
pub fn parse_hops<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<u32, ProxyError> {
    let mut most = 0u32;
    for v in values {
        let v = v.trim_ascii();
        if v.is_empty() || v.len() > 9 || !v.iter().all(u8::is_ascii_digit) {
            return Err(ProxyError::BadHops);
        }
        let n = v.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        most = most.max(n);
    }
    Ok(most)
}

/// Normalises the `Host` (or `:authority`) a client sent.
pub fn requested_host(raw: &[u8]) -> Result<Hostname, ProxyError> {
    let text = std::str::from_utf8(raw).map_err(|_| ProxyError::HostNotText)?;
    Hostname::from_host_header(text).map_err(ProxyError::BadHost)
}

/// A TLS connection is for the name its handshake was for: a request for another name (a
/// client reusing the connection for a host the certificate also covers) is told to open its
/// own (421).
pub fn same_name(sni: Option<&Hostname>, host: &Hostname) -> Result<(), ProxyError> {
    match sni {
        Some(sni) if sni != host => Err(ProxyError::Misdirected {
            sni: sni.as_str().to_string(),
            host: host.as_str().to_string(),
        }),
        _ => Ok(()),
    }
}

impl Ctx {
    /// The HTTPS URL a plain request for `host` is redirected to (port 443 left out).
    pub fn https_location(&self, host: &Hostname, uri: &http::Uri) -> String {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        match self.https_port {
            443 => format!("https://{host}{path}"),
            port => format!("https://{host}:{port}{path}"),
        }
    }

    /// Decides whether a request for `host` that passed `hops` proxies of this fleet is
    /// forwarded, and where. `placed`: a node of the fleet sent it here (it is not forwarded to
    /// another set again).
    pub async fn admit(
        &self,
        host: &Hostname,
        hops: u32,
        placed: bool,
    ) -> Result<Admitted, ProxyError> {
        // First: a loop costs no lookup.
        if hops >= self.max_hops {
            return Err(ProxyError::LoopDetected {
                hops,
                max: self.max_hops,
            });
        }
        let (route, _source) = self.cache.resolve(host).await?;
        let to_set = route.placement(&self.set, || self.healthy.get(), placed)?;
        let (scheme, authority, tunnel) = match route.target() {
            Target::Direct { scheme, authority } => (scheme, authority, None),
            Target::Tunnel {
                client_id,
                authority,
            } => (Scheme::HTTP, authority, Some(Via::Client(client_id.into()))),
            Target::TunnelGroup { group, authority } => {
                (Scheme::HTTP, authority, Some(Via::Group(group)))
            }
            Target::Invalid { reason } => {
                return Err(ProxyError::Upstream {
                    upstream: host.as_str().to_string(),
                    reason: reason.to_string(),
                });
            }
        };
        let who = self.declarer(&route);
        route
            .check_declared(&self.egress, who)
            .map_err(|refusal| ProxyError::EgressRefused {
                host: host.as_str().to_string(),
                refusal,
            })?;
        Ok(Admitted {
            route,
            scheme,
            authority,
            who,
            hops: hops + 1,
            tunnel,
            to_set,
            permit: None,
        })
    }

    /// Takes the request's places under the isolation limits, held in `admitted` until it is
    /// dropped; called by each HTTP path once it serves the request itself (not for a request
    /// handed to the other path or forwarded to another set, which is counted where it is
    /// served).
    pub fn hold_places(&self, admitted: &mut Admitted) -> Result<(), ProxyError> {
        let permit = self
            .limits
            .admit(admitted.route.mapping_id().as_str())
            .map_err(|over| {
                self.metrics
                    .limited
                    .with_label_values(&[over.label()])
                    .inc();
                ProxyError::OverLimit {
                    host: admitted.route.host().to_string(),
                    over,
                }
            })?;
        admitted.permit = Some(permit);
        Ok(())
    }

    /// The operator declared a route only in single-node mode and only in the file; every
    /// record in Redis is a tenant's, whatever its `source` says.
    pub fn declarer(&self, route: &Route) -> Declarer {
        if self.single_node && route.from_config() {
            Declarer::Operator
        } else {
            Declarer::Tenant
        }
    }

    /// Counts and logs a request the proxy answers itself; the client is told only what
    /// [`ProxyError::body`] says, the log line has the detail under the same id.
    pub fn refused(&self, e: &ProxyError, id: &RequestId, peer: &dyn std::fmt::Display) {
        self.metrics.errors.with_label_values(&[e.label()]).inc();
        match e {
            ProxyError::EgressRefused { refusal, .. } => {
                self.metrics
                    .egress_refused
                    .with_label_values(&[refusal.label()])
                    .inc();
                tracing::warn!(request_id = %id, %peer, error = %e, "request refused by the egress policy");
            }
            // A client can send any hop count: not a warning, but visible.
            ProxyError::NodeAuth => {
                tracing::warn!(request_id = %id, %peer, "request with a wrong tunnox-node token refused");
            }
            ProxyError::LoopDetected { .. }
            | ProxyError::TunnelNotConnected(_)
            | ProxyError::TunnelGroupOffline(_)
            | ProxyError::TunnelAgent { .. }
            | ProxyError::TunnelStream { .. }
            | ProxyError::PeerForward { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamTimeout(_) => {
                tracing::info!(request_id = %id, %peer, error = %e, "request failed");
            }
            _ => tracing::debug!(request_id = %id, %peer, error = %e, "request refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hop_counts() {
        let cases: [(&[&str], Result<u32, ()>); 7] = [
            (&[], Ok(0)),
            (&["0"], Ok(0)),
            (&[" 2 "], Ok(2)),
            (&["1", "3"], Ok(3)),
            (&["x"], Err(())),
            (&["-1"], Err(())),
            (&["9999999999"], Err(())),
        ];
        for (values, want) in cases {
            let got = parse_hops(values.iter().map(|v| v.as_bytes())).map_err(|_| ());
            assert_eq!(got, want, "{values:?}");
        }
    }
}
