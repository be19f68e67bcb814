//! Configuration: the YAML model, environment overrides, seed 001's auto-sharing rules and
//! validation. `docs/configuration.md` is the reference.

pub mod agent;
mod api;
mod duration;
mod load;
mod model;
mod resolve;
mod secret;
mod stream;
mod tls;
mod tunnel;

use std::fmt;
use std::path::Path;

pub use agent::AgentConfig;
pub use api::{ApiConfig, ApiRole, ApiTls, ApiTokenEntry, MAX_USER_ID, check_user_id};
pub use duration::Dur;
pub use load::{ENV_OVERRIDE_PREFIX, Environment, ProcessEnv, parse};
pub use model::*;
pub use resolve::{AUTO_BROKER, AUTO_CACHE, AUTO_STORAGE, Settings, apply_auto_sharing, resolve};
pub use secret::{AdminToken, read_secret};
pub use tls::{CertFiles, MappingCert, MappingTlsEntry, ProxyTlsConfig};
pub use tunnel::{
    DEFAULT_UDP_FLOWS, DEFAULT_UDP_SESSION_TIMEOUT, MAX_BYTES_PER_SECOND, MIN_BYTES_PER_SECOND,
    TunnelClientEntry, TunnelEntry, TunnelKind, TunnelListenerConfig, group_members,
};

/// Most runtime threads `proxy.worker_threads` and `agent.worker_threads` accept.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Invalid configuration: where (file, line, field path) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub path: String,
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl ConfigError {
    pub fn at(
        origin: &str,
        path: &str,
        message: impl Into<String>,
        line: Option<usize>,
        column: Option<usize>,
    ) -> Self {
        Self {
            origin: origin.to_string(),
            path: path.to_string(),
            message: message.into(),
            line,
            column,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        f.write_str(": ")?;
        if !self.path.is_empty() && self.path != "." {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and resolves a configuration file (or the defaults when `path` is `None`).
pub fn load(path: Option<&Path>, env: &dyn Environment) -> Result<Settings, ConfigError> {
    let (text, origin) = match path {
        Some(p) => {
            let origin = p.display().to_string();
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigError::at(
                    &origin,
                    "",
                    format!("cannot read configuration: {e}"),
                    None,
                    None,
                )
            })?;
            (text, origin)
        }
        None => (String::new(), "<defaults>".to_string()),
    };
    let mut cfg = parse(&text, &origin, env)?;
    // Secret files are read here, at the I/O edge; `resolve` stays pure.
    secret::fill_password(&mut cfg, &origin)?;
    let mut settings = resolve(cfg, &origin)?;
    settings.admin_token = secret::admin_token(&settings.config, &origin)?;
    settings.api_tokens = api::tokens(&settings.config, &origin)?;
    Ok(settings)
}

#[cfg(test)]
mod tests;
