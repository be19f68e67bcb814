//! Remote-port connections whose client's session is on another node of the set: the node that
//! accepted the connection sends `CONNECT target` over HTTP/1.1 to the holder's HTTP address,
//! with the fleet's node token, the client id and the transport; the holder opens the stream on
//! its own session and both sides join the bytes. A holder serves such a CONNECT only for a
//! (client, target, transport) its own remote-port table carries, and only from its own
//! sessions (never forwarded again); with no session it answers `503 tunnox-not-held`, and the
//! sender tries the client's next node.

use std::net::SocketAddr;

use chrono::Utc;
use http::header::HeaderValue;
use http::{HeaderName, Method, Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;

use super::choose::{self, Pick};
use super::remote::CarryError;
use super::{NODE_HEADER, NOT_HELD_HEADER, Tunnels};
use crate::proxy::{ProxyBody, ProxyError};
use crate::tunnel::udp::TRANSPORT_HEADER;

/// On a node-to-node CONNECT: the client whose session carries the stream.
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("tunnox-client");

impl Tunnels {
    /// Opens the stream through another node holding a session of `client_id` (active sessions
    /// first; a node that no longer holds one, or cannot be reached, gives way to the next).
    pub(super) async fn open_via_peer(
        &self,
        client_id: &str,
        target: &str,
        udp: bool,
    ) -> Result<Upgraded, CarryError> {
        let Some(token) = &self.node_token else {
            return Err(CarryError::Offline(client_id.to_string()));
        };
        let mut dead: Vec<String> = Vec::new();
        for _attempt in 0..3 {
            let mut remote =
                self.registry
                    .sessions(client_id)
                    .await
                    .map_err(|e| CarryError::Stream {
                        client: client_id.to_string(),
                        reason: format!("cannot read the client's sessions: {e}"),
                    })?;
            remote.retain(|r| !dead.contains(&r.node_id));
            let Pick::Peer { address, node_id } =
                choose::choose(&[], &remote, &self.node_id, Utc::now(), false)
            else {
                return Err(CarryError::Offline(client_id.to_string()));
            };
            match self
                .connect_peer(&address, token.expose(), client_id, target, udp)
                .await
            {
                Ok(up) => {
                    self.metrics
                        .forwarded_to_peer
                        .with_label_values(&["ok"])
                        .inc();
                    return Ok(up);
                }
                Err((why, retry)) => {
                    let label = if retry { "not_held" } else { "failed" };
                    self.metrics
                        .forwarded_to_peer
                        .with_label_values(&[label])
                        .inc();
                    if !retry {
                        return Err(CarryError::Stream {
                            client: client_id.to_string(),
                            reason: format!("via node {node_id}: {why}"),
                        });
                    }
                    tracing::info!(client_id, node = %node_id, %why, "the node named by the session record does not carry the stream; trying the client's other sessions");
                    dead.push(node_id);
                }
            }
        }
        Err(CarryError::Offline(client_id.to_string()))
    }

    /// One CONNECT to a peer; `Err((why, worth trying another node))`.
    async fn connect_peer(
        &self,
        address: &str,
        token: &str,
        client_id: &str,
        target: &str,
        udp: bool,
    ) -> Result<Upgraded, (String, bool)> {
        let own = address == self.node_address
            || address
                .parse::<SocketAddr>()
                .is_ok_and(|a| self.own.contains(&a));
        if own {
            return Err(("the peer's address is one of this proxy's own".into(), true));
        }
        let tcp = tokio::time::timeout(
            self.settings.connect_timeout,
            tokio::net::TcpStream::connect(address),
        )
        .await
        .map_err(|_| ("connect timed out".to_string(), true))?
        .map_err(|e| (e.to_string(), true))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| (e.to_string(), true))?;
        tokio::spawn(conn.with_upgrades());
        let header = |v: &str| HeaderValue::from_str(v).map_err(|e| (e.to_string(), false));
        let mut req = Request::new(crate::proxy::empty_body());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = target
            .parse()
            .map_err(|e: http::uri::InvalidUri| (e.to_string(), false))?;
        let h = req.headers_mut();
        h.insert(http::header::HOST, header(target)?);
        h.insert(NODE_HEADER, header(token)?);
        h.insert(CLIENT_HEADER, header(client_id)?);
        if udp {
            h.insert(TRANSPORT_HEADER, HeaderValue::from_static("udp"));
        }
        let resp = tokio::time::timeout(self.settings.response_timeout, send.send_request(req))
            .await
            .map_err(|_| ("no answer in time".to_string(), false))?
            .map_err(|e| (e.to_string(), true))?;
        if resp.headers().contains_key(NOT_HELD_HEADER) {
            return Err(("it holds no session of the client".into(), true));
        }
        if resp.status() != StatusCode::OK {
            return Err((format!("answered {}", resp.status()), false));
        }
        hyper::upgrade::on(resp)
            .await
            .map_err(|e| (e.to_string(), false))
    }

    /// A node-to-node CONNECT arriving at this node: checked (node token, a tunnel this node's
    /// table carries), then joined to a stream on one of this node's own sessions.
    pub async fn serve_peer_connect(
        &self,
        mut req: Request<hyper::body::Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let presented = req.headers().get(NODE_HEADER).map(HeaderValue::as_bytes);
        if !presented.is_some_and(|v| self.node_token_matches(v)) {
            return Err(ProxyError::NodeAuth);
        }
        let client_id = req
            .headers()
            .get(CLIENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let target = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let udp = req
            .headers()
            .get(TRANSPORT_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"udp"));
        if !self.carries(&client_id, &target, udp) {
            tracing::warn!(
                client_id,
                target,
                udp,
                "node-to-node CONNECT refused: no such tunnel in this node's remote ports"
            );
            return Err(ProxyError::NodeAuth);
        }
        let (stream, slot) = match self.open_stream(&client_id, &target, udp, true).await {
            Ok(s) => s,
            Err(CarryError::Offline(c)) => return Err(ProxyError::NotHeldHere(c)),
            Err(e) => {
                return Err(ProxyError::TunnelStream {
                    client: client_id,
                    reason: e.to_string(),
                });
            }
        };
        let from_peer = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(peer) = from_peer.await else { return };
            let mut a = TokioIo::new(peer);
            let mut b = TokioIo::new(stream);
            let _ = crate::tunnel::pipe(&mut a, &mut b).await;
        });
        Ok(Response::new(crate::proxy::empty_body()))
    }
}
