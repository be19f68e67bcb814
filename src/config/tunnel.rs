//! Configuration of the proxy's side of tunnels: its tunnel listener (`proxy.tunnel`) and, in
//! single-node mode, the agents it admits (`tunnel_clients`). docs/tunnels.md and
//! docs/configuration.md are the reference.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Dur;

/// `proxy.tunnel`: where agents connect. Off unless `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelListenerConfig {
    /// e.g. `0.0.0.0:7000`; `None`: no tunnel listener.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key of the listener (TLS 1.3). Required with `listen` unless
    /// `insecure`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Plain TCP, no TLS: for tests on loopback only; logged as a warning.
    pub insecure: bool,
    /// `host:port` agents are told to reconnect to (`ServerShutdown.reconnect_to` of other
    /// nodes); default `$POD_IP` with the listen port, else the listen address.
    pub advertise_address: Option<String>,
    /// A file holding the secret proxies present to each other when one forwards a request for
    /// a client whose session another holds. Cluster mode: without it a proxy does not forward
    /// to peers (and refuses forwarded requests).
    pub node_token_file: Option<PathBuf>,
    pub heartbeat_interval: Dur,
    /// Time an agent has to authenticate after connecting.
    pub handshake_timeout: Dur,
    /// Most concurrent streams the proxy opens on one session.
    pub max_streams_per_session: u32,
    /// Most live sessions one client may hold on this proxy.
    pub max_sessions_per_client: usize,
    /// Most sessions on this proxy.
    pub max_sessions: usize,
}

impl Default for TunnelListenerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            cert_file: None,
            key_file: None,
            insecure: false,
            advertise_address: None,
            node_token_file: None,
            heartbeat_interval: Dur::secs(5),
            handshake_timeout: Dur::secs(5),
            max_streams_per_session: 1000,
            max_sessions_per_client: 8,
            max_sessions: 10_000,
        }
    }
}

/// A client a single-node proxy admits (`tunnel_clients:`). Exactly one of `token` and
/// `token_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelClientEntry {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}
