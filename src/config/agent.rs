//! Configuration of `tunnox agent` (`agent:`); every field also has a flag and an environment
//! variable. docs/tunnels.md and docs/configuration.md are the reference.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Dur;

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
