//! Sending a request through a tunnel: down a local session as one HTTP/2 stream (extended
//! CONNECT for upgrades), or over HTTP to the node holding the client's session. Header
//! rewriting is the direct path's (`forward.rs`); only the transport differs.

use std::sync::Arc;

use chrono::Utc;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;

use super::Tunnels;
use super::body::{Counted, Hold, Holding};
use super::choose::{self, LocalView, Pick};
use super::peer_stream::CLIENT_HEADER;
use super::session::{Session, StreamError, chain};
use super::{NODE_HEADER, NOT_HELD_HEADER};
use crate::proxy::forward::{
    ClientInfo, join_upgraded, rewrite_request_headers, strip_hop_by_hop, upgrade_protocol,
};
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::policy::Admitted;
use crate::proxy::{ProxyBody, ProxyError};
use crate::tunnel::{ERROR_HEADER, TARGET_HEADER};

/// The labels an agent may put in `tunnox-error` (anything else counts as `other`).
pub(super) fn agent_label(v: &HeaderValue) -> &'static str {
    match v.as_bytes() {
        b"not_allowed" => "not_allowed",
        b"connect" => "connect",
        b"timeout" => "timeout",
        b"bad_target" => "bad_target",
        b"too_many_streams" => "too_many_streams",
        _ => "other",
    }
}

impl Tunnels {
    /// Sends `req` for the tunnel target `to` through `client_id`'s sessions. `from_peer`: it
    /// came from another node of the fleet, served from local sessions only. `hold` lives as
    /// long as the response (its body, or its upgraded stream).
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        mut req: Request<ProxyBody>,
        to: &Admitted,
        client_id: String,
        client: ClientInfo<'_>,
        from_peer: bool,
        proxy_metrics: &Arc<ProxyMetrics>,
        mut hold: Hold,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = upgrade_protocol(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        rewrite_request_headers(
            &mut parts.headers,
            &client,
            upgrade.as_ref(),
            to.route.headers(),
        );
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let mut tried: Vec<String> = Vec::new();
        let mut pending = Some(Counted::new(body, self.metrics.bytes_out.clone(), None).boxed());
        // Nodes whose session records turned out stale (their holder unreachable).
        let mut dead_nodes: Vec<String> = Vec::new();
        let mut local_retry = false;
        let mut reread = false;
        for _attempt in 0..4 {
            let (mut local, mut views) = self.local_views(&client_id, &tried);
            // Only a request a peer sent here stays on this node. A stream this node's session
            // refused (its agent is leaving it for a session elsewhere, make-before-break) goes
            // where the agent went.
            let local_only = from_peer;
            let remote = if choose::needs_store(&views, local_only) {
                let remote = match self.registry.sessions(&client_id).await {
                    Ok(mut r) => {
                        r.retain(|r| !dead_nodes.contains(&r.node_id));
                        r
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %client_id, error = %e, "cannot read the client's sessions from the store");
                        Vec::new()
                    }
                };
                // Looked at again after the read: a session of this node registered meanwhile
                // (its record can replace the one it moved from) is in the local table by now,
                // as sessions enter it before their record is written.
                (local, views) = self.local_views(&client_id, &tried);
                remote
            } else {
                Vec::new()
            };
            let pick = choose::choose(&views, &remote, &self.node_id, Utc::now(), local_only);
            tracing::debug!(client_id = %client_id, ?views, remote = ?remote.iter().map(|r| (&r.node_id, r.state)).collect::<Vec<_>>(), ?dead_nodes, ?pick, from_peer, "tunnel session choice");
            match pick {
                // The node that sent it here read a record that has gone stale (the agent
                // moved): it may try elsewhere, as nothing was sent on.
                Pick::Offline if from_peer => return Err(ProxyError::NotHeldHere(client_id)),
                // The client's sessions are moving: one here is closing, or the store still
                // names this node. A read issued now sees where the agent went (it writes its new
                // record before it closes the old session), so read once more.
                Pick::Offline
                    if !reread && choose::in_flux(&views, &remote, &self.node_id, local_retry) =>
                {
                    reread = true;
                    continue;
                }
                Pick::Offline if !local_retry => {
                    return Err(ProxyError::TunnelNotConnected(client_id));
                }
                Pick::Offline => {
                    return Err(ProxyError::TunnelStream {
                        client: client_id,
                        reason: "the session refused the stream and no other session is open"
                            .into(),
                    });
                }
                Pick::Peer { address, node_id } => {
                    let body = pending.take().unwrap_or_else(crate::proxy::empty_body);
                    // A bodiless request can go to another holder when this one is gone.
                    let replayable = upgrade.is_none() && hyper::body::Body::is_end_stream(&body);
                    let mut out = Request::from_parts(parts.clone(), body);
                    if let Some(proto) = &upgrade {
                        out.headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        out.headers_mut().insert(header::UPGRADE, proto.clone());
                    }
                    if replayable {
                        let sent = self
                            .to_peer(
                                out,
                                &address,
                                &node_id,
                                &client_id,
                                &path,
                                None,
                                None,
                                proxy_metrics,
                                &mut hold,
                            )
                            .await;
                        match sent {
                            Err((e, true)) => {
                                tracing::info!(client_id = %client_id, node = %node_id, error = %e, "the node named by the session record is unreachable or no longer holds it; trying the client's other sessions");
                                dead_nodes.push(node_id);
                                pending = Some(crate::proxy::empty_body());
                                continue;
                            }
                            other => return other.map_err(|(e, _)| e),
                        }
                    }
                    return self
                        .to_peer(
                            out,
                            &address,
                            &node_id,
                            &client_id,
                            &path,
                            client_upgrade,
                            upgrade,
                            proxy_metrics,
                            &mut hold,
                        )
                        .await
                        .map_err(|(e, _)| e);
                }
                Pick::Local(i) => {
                    let session = local[i].clone();
                    tried.push(session.id.clone());
                    let Some(slot) = session.enter() else {
                        self.metrics.streams.with_label_values(&["busy"]).inc();
                        local_retry = true;
                        continue;
                    };
                    let body = match upgrade {
                        Some(_) => crate::proxy::empty_body(),
                        None => pending.take().unwrap_or_else(crate::proxy::empty_body),
                    };
                    let replayable = hyper::body::Body::is_end_stream(&body);
                    let mut h2 = Request::from_parts(parts.clone(), body);
                    self.to_h2(
                        &mut h2,
                        client.host,
                        &path,
                        to.authority.as_ref(),
                        upgrade.as_ref(),
                    )?;
                    let sent = tokio::time::timeout(
                        self.settings.response_timeout,
                        session.transport.open(h2),
                    )
                    .await;
                    let resp = match sent {
                        Err(_) => {
                            self.metrics.streams.with_label_values(&["timeout"]).inc();
                            return Err(ProxyError::UpstreamTimeout(format!(
                                "tunnel client {client_id}"
                            )));
                        }
                        Ok(Ok(resp)) => resp,
                        Ok(Err(StreamError::NotSent(back))) => {
                            self.metrics.streams.with_label_values(&["retried"]).inc();
                            tracing::debug!(client_id = %client_id, session = %session.id, "stream not started (session closing); trying another");
                            if upgrade.is_none() {
                                pending = Some(back.into_body());
                            }
                            local_retry = true;
                            continue;
                        }
                        Ok(Err(StreamError::Refused(why))) if replayable => {
                            self.metrics.streams.with_label_values(&["retried"]).inc();
                            tracing::debug!(client_id = %client_id, session = %session.id, %why, "stream refused; trying another");
                            pending = Some(crate::proxy::empty_body());
                            local_retry = true;
                            continue;
                        }
                        Ok(Err(StreamError::Refused(reason) | StreamError::Failed(reason))) => {
                            self.metrics.streams.with_label_values(&["failed"]).inc();
                            return Err(ProxyError::TunnelStream {
                                client: client_id,
                                reason,
                            });
                        }
                    };
                    return self.answer(
                        resp,
                        &client_id,
                        slot,
                        client_upgrade,
                        upgrade,
                        proxy_metrics,
                        hold,
                    );
                }
            }
        }
        Err(ProxyError::TunnelStream {
            client: client_id,
            reason: "no session took the stream".into(),
        })
    }

    /// This node's sessions of the client not tried yet, and what the choice needs of each.
    pub(super) fn local_views(
        &self,
        client_id: &str,
        tried: &[String],
    ) -> (Vec<Arc<Session>>, Vec<LocalView>) {
        let local: Vec<Arc<Session>> = self
            .local
            .of(client_id)
            .into_iter()
            .filter(|s| !tried.contains(&s.id))
            .collect();
        let views = local
            .iter()
            .map(|s| {
                // Parked streams give way to a new one (`Session::enter`).
                let busy = s.busy_streams();
                LocalView {
                    leaving: s.is_leaving(),
                    usable: s.transport.usable(),
                    open: busy,
                    full: busy >= s.max_streams,
                }
            })
            .collect();
        (local, views)
    }

    /// Makes a rewritten request one HTTP/2 stream for the agent.
    fn to_h2(
        &self,
        req: &mut Request<ProxyBody>,
        host: &HeaderValue,
        path: &PathAndQuery,
        target: &str,
        upgrade: Option<&HeaderValue>,
    ) -> Result<(), ProxyError> {
        h2_request(req, host, path, target, upgrade)
    }
}

/// A request already rewritten for forwarding, as one HTTP/2 stream for the agent: `:authority`
/// the host the client asked for, `tunnox-target` the agent-side target, no connection-specific
/// headers; an upgrade becomes an extended CONNECT (RFC 8441) with `:protocol` its token.
fn h2_request(
    req: &mut Request<ProxyBody>,
    host: &HeaderValue,
    path: &PathAndQuery,
    target: &str,
    upgrade: Option<&HeaderValue>,
) -> Result<(), ProxyError> {
    // The agent sees the host the client asked for; where the stream goes is
    // `tunnox-target`, set by this proxy only.
    let authority = host
        .to_str()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or(target);
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path.clone())
        .build()
        .map_err(|e| ProxyError::Upstream {
            upstream: target.to_string(),
            reason: e.to_string(),
        })?;
    *req.version_mut() = Version::HTTP_2;
    let h = req.headers_mut();
    h.remove(header::CONNECTION);
    h.remove(header::UPGRADE);
    h.remove(header::HOST);
    let value = HeaderValue::from_str(target).map_err(|e| ProxyError::Upstream {
        upstream: target.to_string(),
        reason: e.to_string(),
    })?;
    h.insert(TARGET_HEADER, value);
    if let Some(proto) = upgrade {
        // RFC 8441: the upgrade becomes an extended CONNECT.
        *req.method_mut() = Method::CONNECT;
        let token = proto.to_str().unwrap_or("websocket").to_ascii_lowercase();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from(token.as_str()));
    }
    Ok(())
}

impl Tunnels {
    /// The agent's answer, ready for the client.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        mut resp: Response<ProxyBody>,
        client_id: &str,
        slot: super::session::StreamSlot,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        upgrade: Option<HeaderValue>,
        proxy_metrics: &Arc<ProxyMetrics>,
        hold: Hold,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Some(v) = resp.headers().get(ERROR_HEADER) {
            let label = agent_label(v);
            self.metrics
                .streams
                .with_label_values(&["agent_error"])
                .inc();
            tracing::warn!(client_id, label, session = %slot.session().id, "the tunnel client refused the request");
            return Err(ProxyError::TunnelAgent {
                client: client_id.to_string(),
                label,
            });
        }
        self.metrics.streams.with_label_values(&["ok"]).inc();
        // Only a node may say it holds no session; an agent's answer cannot.
        resp.headers_mut().remove(NOT_HELD_HEADER);
        if let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgrade)
            && resp.status() == StatusCode::OK
        {
            let agent_upgrade = hyper::upgrade::on(&mut resp);
            let idle = self.settings.websocket_idle;
            let m = proxy_metrics.clone();
            tokio::spawn(async move {
                // The stream stays open (and counted) while the pipe lives.
                let _slot = slot;
                let _hold = hold;
                join_upgraded(client_upgrade, agent_upgrade, idle, m).await;
            });
            let (mut parts, _) = resp.into_parts();
            parts.status = StatusCode::SWITCHING_PROTOCOLS;
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
            parts.headers.remove(header::CONTENT_LENGTH);
            return Ok(Response::from_parts(parts, crate::proxy::empty_body()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Counted::new(body, self.metrics.bytes_in.clone(), Some(slot)).boxed();
        Ok(Response::from_parts(parts, held(body, hold)))
    }

    /// Forwards to the node holding the client's session, with the node token.
    #[allow(clippy::too_many_arguments)]
    async fn to_peer(
        &self,
        mut req: Request<ProxyBody>,
        address: &str,
        node_id: &str,
        client_id: &str,
        path: &PathAndQuery,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        upgrade: Option<HeaderValue>,
        proxy_metrics: &Arc<ProxyMetrics>,
        hold: &mut Hold,
    ) -> Result<Response<ProxyBody>, (ProxyError, bool)> {
        let count = |outcome: &str| {
            self.metrics
                .forwarded_to_peer
                .with_label_values(&[outcome])
                .inc();
        };
        let fail = |reason: String| ProxyError::PeerForward {
            node: node_id.to_string(),
            client: client_id.to_string(),
            reason,
        };
        // The member a group target chose here is the one the peer serves.
        let client_value = HeaderValue::from_str(client_id)
            .map_err(|_| (fail("client id is not a header value".into()), false))?;
        req.headers_mut().insert(CLIENT_HEADER, client_value);
        let not_connected = || ProxyError::TunnelNotConnected(client_id.to_string());
        let resp = self
            .send_to_node(req, address, path, &count, &fail, &not_connected)
            .await?;
        if resp.headers().contains_key(NOT_HELD_HEADER) {
            count("not_held");
            return Err((
                fail("the node no longer holds a session of the client".into()),
                true,
            ));
        }
        count("ok");
        Ok(self.node_answer(resp, client_upgrade, upgrade, proxy_metrics, hold))
    }

    /// Sends `req` to the node at `address` with the node token: the one transport of every
    /// node-to-node request (a client's session held there, a set serving there). `count`
    /// counts an outcome; `fail` makes the error of a failure; `no_token` the error when this
    /// node has no node token. The error's flag: the request never reached the node, so it may
    /// go elsewhere.
    pub(crate) async fn send_to_node(
        &self,
        mut req: Request<ProxyBody>,
        address: &str,
        path: &PathAndQuery,
        count: &(dyn Fn(&str) + Sync),
        fail: &(dyn Fn(String) -> ProxyError + Sync),
        no_token: &(dyn Fn() -> ProxyError + Sync),
    ) -> Result<Response<hyper::body::Incoming>, (ProxyError, bool)> {
        let Some(token) = &self.node_token else {
            if !self
                .warned_no_token
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    "a request is for another node of the fleet but proxy.tunnel.node_token_file is not set: not forwarding to peers"
                );
            }
            count("no_token");
            return Err((no_token(), false));
        };
        let own = address == self.node_address
            || address
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| self.own.contains(&a));
        if own {
            // A stale record (its address reused by this pod): another node may still serve.
            count("own_address");
            return Err((
                fail("the peer's address is one of this proxy's own".into()),
                true,
            ));
        }
        if let Err(why) = peer_address_ok(address) {
            count("bad_address");
            return Err((fail(why), true));
        }
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(address)
            .path_and_query(path.clone())
            .build()
            .map_err(|e| (fail(e.to_string()), false))?;
        *req.version_mut() = Version::HTTP_11;
        let value = HeaderValue::from_str(token.expose())
            .map_err(|_| (fail("node token is not a header value".into()), false))?;
        req.headers_mut().insert(NODE_HEADER, value);
        let sent =
            tokio::time::timeout(self.settings.response_timeout, self.peers.request(req)).await;
        match sent {
            Err(_) => {
                count("timeout");
                Err((
                    ProxyError::UpstreamTimeout(format!("node {address}")),
                    false,
                ))
            }
            Ok(Err(e)) => {
                count("failed");
                Err((fail(chain(&e)), e.is_connect()))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A node's answer, as the client gets it: an upgrade joined to the client's connection,
    /// or the response with `hold` kept until its body is done.
    pub(crate) fn node_answer(
        &self,
        mut resp: Response<hyper::body::Incoming>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        upgrade: Option<HeaderValue>,
        proxy_metrics: &Arc<ProxyMetrics>,
        hold: &mut Hold,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgrade)
        {
            let peer_upgrade = hyper::upgrade::on(&mut resp);
            let (idle, m, hold) = (
                self.settings.websocket_idle,
                proxy_metrics.clone(),
                hold.take(),
            );
            tokio::spawn(async move {
                let _hold = hold;
                join_upgraded(client_upgrade, peer_upgrade, idle, m).await;
            });
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
            return Response::from_parts(parts, crate::proxy::empty_body());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, held(body.map_err(Into::into).boxed(), hold.take()))
    }
}

/// A node address from the registry is written by proxies of the fleet; one that names no
/// peer a proxy could be (a hostname, an unspecified, link-local, multicast or broadcast
/// address) is never sent the node token or a client's request.
fn peer_address_ok(address: &str) -> Result<(), String> {
    let addr: std::net::SocketAddr = address
        .parse()
        .map_err(|_| format!("node address {address:?} is not an IP address and port"))?;
    if super::never_a_node(addr.ip()) || addr.port() == 0 {
        return Err(format!("node address {address} cannot be a peer"));
    }
    Ok(())
}

/// `body`, keeping `hold` alive until it is done.
fn held(body: ProxyBody, hold: Hold) -> ProxyBody {
    match hold {
        Some(h) => Holding::new(body, h).boxed(),
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> Request<ProxyBody> {
        let mut r = Request::get("/ignored")
            .body(crate::proxy::empty_body())
            .unwrap();
        for (k, v) in crate::proxy::header_pairs(pairs) {
            r.headers_mut().append(k, v);
        }
        r
    }

    #[test]
    fn makes_one_stream_for_the_agent() {
        let host = HeaderValue::from_static("app.tunnox.net");
        let path = PathAndQuery::from_static("/a?b=1");
        let mut r = req(&[
            ("host", "app.tunnox.net"),
            ("x-env", "dev"),
            ("connection", "keep-alive"),
        ]);
        h2_request(&mut r, &host, &path, "127.0.0.1:3000", None).unwrap();
        assert_eq!(r.uri().to_string(), "http://app.tunnox.net/a?b=1");
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.method(), Method::GET);
        assert_eq!(r.headers()["tunnox-target"], "127.0.0.1:3000");
        assert_eq!(r.headers()["x-env"], "dev");
        for gone in ["host", "connection", "upgrade"] {
            assert!(!r.headers().contains_key(gone), "{gone}");
        }
        assert!(r.extensions().get::<hyper::ext::Protocol>().is_none());

        let ws = HeaderValue::from_static("WebSocket");
        let mut r = req(&[
            ("connection", "upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "k"),
        ]);
        h2_request(&mut r, &host, &path, "[::1]:8080", Some(&ws)).unwrap();
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(
            r.extensions()
                .get::<hyper::ext::Protocol>()
                .map(|p| p.as_str()),
            Some("websocket")
        );
        assert_eq!(r.headers()["sec-websocket-key"], "k");
        assert!(!r.headers().contains_key("upgrade"));
        assert_eq!(r.headers()["tunnox-target"], "[::1]:8080");

        // A target that is not a header value is an error, never a panic.
        let mut r = req(&[]);
        assert!(h2_request(&mut r, &host, &path, "bad\ntarget", None).is_err());
    }

    #[test]
    fn only_addresses_a_peer_could_have_are_dialled() {
        for ok in ["10.1.2.3:8080", "127.0.0.1:8080", "[fd00::1]:8080"] {
            assert!(peer_address_ok(ok).is_ok(), "{ok}");
        }
        for bad in [
            "metadata.internal:80",
            "169.254.169.254:80",
            "0.0.0.0:8080",
            "[::]:8080",
            "[fe80::1]:8080",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "10.1.2.3:0",
            "",
        ] {
            assert!(peer_address_ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_only_known_agent_error_labels() {
        let cases = [
            ("not_allowed", "not_allowed"),
            ("connect", "connect"),
            ("too_many_streams", "too_many_streams"),
            ("rm -rf", "other"),
            ("", "other"),
        ];
        for (v, want) in cases {
            assert_eq!(agent_label(&HeaderValue::from_str(v).unwrap()), want, "{v}");
        }
    }
}
