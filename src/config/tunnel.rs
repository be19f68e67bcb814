//! Configuration of tunnels: the proxy's tunnel listener (`proxy.tunnel`), the single-node
//! proxy's agent credentials (`tunnel_clients`), and `tunnox agent` (`agent`). docs/tunnels.md
//! and docs/configuration.md are the reference.

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

/// `tunnox agent`. Every field also has a flag and an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The proxy's tunnel listener, `host:port`.
    pub server: String,
    /// TLS server name to verify; default the host of `server`.
    pub server_name: Option<String>,
    pub client_id: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) to trust; default the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Plain TCP, no TLS (logged as a warning).
    pub insecure: bool,
    /// Local targets the agent may reach, `host:port` each; nothing else is served.
    pub allow: Vec<String>,
    /// Sessions held at once, to different proxies when the server address spreads them.
    pub sessions: u32,
    /// `/metrics` and `/healthz`; `None`: no admin server.
    pub admin_listen: Option<SocketAddr>,
    pub connect_timeout: Dur,
    /// Most concurrent streams served per session.
    pub max_streams: u32,
    /// How long a retired session is kept for streams in flight.
    pub grace_period: Dur,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: String::new(),
            server_name: None,
            client_id: String::new(),
            token: None,
            token_file: None,
            ca_file: None,
            insecure: false,
            allow: Vec::new(),
            sessions: 1,
            admin_listen: None,
            connect_timeout: Dur::secs(5),
            max_streams: 1000,
            grace_period: Dur::secs(30),
        }
    }
}
