//! `tunnox agent`: holds `sessions` tunnel sessions to proxies and serves the forwarded streams
//! they carry to the local targets its allow-list names (docs/agent.md). One supervisor task per
//! slot: dial with backoff, serve until the session ends, move make-before-break on
//! `ServerShutdown`, retire cleanly on SIGTERM.

pub mod allow;
pub mod forward;
pub mod health;
pub mod metrics;
pub mod pushed;
pub mod servers;
pub mod session;
mod slot;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{AgentConfig, ConfigError};
use crate::observe::admin::{self, Health};

pub use metrics::AgentMetrics;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] crate::tunnel::tls::TlsError),
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until SIGTERM/SIGINT; `cfg` is validated, `token` read.
pub async fn run(cfg: AgentConfig, token: String) -> Result<(), AgentError> {
    let metrics = AgentMetrics::new();
    let tls = if cfg.insecure {
        tracing::warn!(
            "agent.insecure: sessions use plain TCP, unencrypted and unauthenticated server; \
             for tests on loopback only"
        );
        None
    } else {
        Some(Arc::new(crate::tunnel::tls::client_config(
            cfg.ca_file.as_deref(),
        )?))
    };
    let pushed = Arc::new(pushed::Pushed::new(
        &cfg.client_id,
        allow::AllowList::new(&cfg.allow),
        cfg.config_cache.clone(),
        metrics.clone(),
    ));
    let forwarder = Arc::new(forward::Forwarder::new(
        allow::AllowList::new(&cfg.allow),
        cfg.connect_timeout.get(),
        cfg.response_timeout.get(),
        metrics.clone(),
    ));
    let dialer = session::Dialer {
        tls,
        server_name: cfg.server_name.clone(),
        client_id: cfg.client_id.clone(),
        token,
        instance: ulid::Ulid::new().to_string().to_ascii_lowercase(),
        connect_timeout: cfg.connect_timeout.get(),
        max_streams: cfg.max_streams,
        forwarder,
        pushed,
        metrics: metrics.clone(),
    };
    let health = Health::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = match cfg.admin_listen {
        Some(addr) => {
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            Some(
                admin::serve(addr, metrics.registry.clone(), health.clone(), shutdown)
                    .await
                    .map_err(|source| AgentError::Admin { addr, source })?,
            )
        }
        None => None,
    };
    tracing::info!(
        servers = %cfg.server.join(","),
        client_id = %cfg.client_id,
        instance = %dialer.instance,
        sessions = cfg.sessions,
        allow = %cfg.allow.join(","),
        "tunnox agent starting"
    );
    let shared = Arc::new(slot::Shared {
        dialer,
        servers: Mutex::new(servers::Servers::new(&cfg.server)),
        held: Mutex::new(vec![None; cfg.sessions as usize]),
        grace: cfg.grace_period.get(),
        health,
        started: tokio::sync::watch::channel(0).0,
        stagger: cfg.connect_timeout.get(),
    });
    let slots: Vec<_> = (0..cfg.sessions)
        .map(|i| tokio::spawn(slot::run(shared.clone(), i, stop_rx.clone())))
        .collect();
    crate::observe::shutdown_signal().await;
    tracing::info!("stopping: retiring sessions (Leaving, GOAWAY; streams in flight finish)");
    let _ = stop_tx.send(true);
    let bound = cfg.grace_period.get() + Duration::from_secs(2);
    for s in slots {
        let _ = tokio::time::timeout(bound, s).await;
    }
    if let Some(t) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    tracing::info!("tunnox agent stopped");
    Ok(())
}
